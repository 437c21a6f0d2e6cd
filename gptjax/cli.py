"""The `gptjax` commands (prepare, train, sample, eval, bench, export, import), thin: their options are options.py."""

from __future__ import annotations

import json
import os
import sys

from gptjax import distributed, parallel
from gptjax.args import parse, refuse_unknown, take
from gptjax.errors import Stopped, UserError
from gptjax.options import DEFAULT_CONFIG, OPTIONS, TAKES_FILE, USAGE, command_help, version


def _opt(opts: dict, command: str, key: str):
    """--key of `command`: its typed value, or its default from OPTIONS."""
    return take(opts, key, OPTIONS[command][key])


def _only(opts: dict, command: str) -> None:
    refuse_unknown(opts, OPTIONS[command], f"gptjax {command}")


def _config(opts: dict):
    from gptjax.config import load_config

    return load_config(opts.pop("config", DEFAULT_CONFIG), opts)  # the rest of opts: config overrides


def cmd_prepare(opts, pos):
    from gptjax import data

    config = _config(opts)
    prep = data.prepare(config.data)
    print(json.dumps(prep.meta, indent=1))
    print(f"prepared in {prep.dir}")


def _distributed(opts) -> bool:
    """--distributed: start jax's multi-controller runtime before anything touches a device; the processes other
    than process 0 print nothing from here on (their errors still reach stderr)."""
    keys = ("coordinator_address", "num_processes", "process_id", "distributed_timeout")
    wanted = _opt(opts, "train", "distributed")
    given = [k for k in keys if k in opts]
    if not wanted:
        if given:
            raise UserError(f"--{given[0]} applies with --distributed only: add --distributed")
        return False
    launch = {k: _opt(opts, "train", k) for k in keys}  # each range-checked when given
    distributed.init_distributed(**launch)
    if not distributed.is_lead():  # the file descriptor too: the runtime's collectives print from C++
        sys.stdout.flush()
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    return True


def cmd_train(opts, pos):
    from gptjax import checkpoint, run, sample, train

    force = _opt(opts, "train", "force")
    multihost = _distributed(opts)
    if opts.get("init_from") == "resume":  # the run's saved settings; only what is passed here changes
        preset = opts.pop("config", DEFAULT_CONFIG)
        config, changes = run.resume_config(opts, _config({"config": preset}).train.out_dir)
        print(f"resume: {config.train.out_dir}'s saved settings" + (f" (--config={preset} is not applied)"
              if preset != DEFAULT_CONFIG else "") + ("; changed: " + ", ".join(changes) if changes else ""))
    else:
        from gptjax.weights import hf

        if hf.is_pretrained(opts.get("init_from", "scratch")):
            fixed = [k for k in hf.FROM_FILE if k in opts]
            if fixed:
                raise UserError(f"--{fixed[0]}: the model comes from --init_from={opts['init_from']}'s config.json; "
                                f"drop --{fixed[0]} (--dropout and a smaller --block_size may be set)")
            opts.setdefault("vocab_size", 0)  # the file's vocabulary, padded only when --vocab_size asks
        config = _config(opts)
    summary = train.train(config, force=force, progress=True)
    if multihost:  # restoring a checkpoint is collective under jax.distributed: sample from one process later
        print(f"sample with: gptjax sample --out_dir={summary['out_dir']}")
        return
    if not checkpoint.exists(summary["out_dir"], "latest"):
        print("no checkpoint yet (no steps trained), so no sample")
        return
    print("sample:")
    print(sample.sample(summary["out_dir"], max_new_tokens=300)[0])


def cmd_sample(opts, pos):
    from gptjax import sample

    _only(opts, "sample")
    _one_source(opts, "sample")
    kw = {k: _opt(opts, "sample", k) for k in ("start", "num_samples", "max_new_tokens", "temperature", "top_k",
                                               "seed", "top_p", "kv_cache", "init_from")}
    texts = sample.sample(_opt(opts, "sample", "out_dir"), checkpoint=_checkpoint(opts),
                          dtype=_choice(opts, "sample", "dtype"), attention=_choice(opts, "sample", "attention"), **kw)
    for text in texts:
        print(text)
        print("---------------")


def _choice(opts, command: str, key: str) -> str:
    """--key=WORD, one of config.CHOICES[key]."""
    from gptjax.config import check_choice

    value = _opt(opts, command, key)
    check_choice(key, value)
    return value


def _one_source(opts, command: str) -> None:
    """--init_from names the model instead of a run: --out_dir and --checkpoint would be ignored, so refuse them."""
    if opts.get("init_from"):
        both = [k for k in ("out_dir", "checkpoint") if k in opts]
        if both:
            raise UserError(f"gptjax {command}: --init_from and --{both[0]} both name the model: pass one of them")


def _checkpoint(opts) -> str | int:
    """--checkpoint=best|latest|STEP (default best)."""
    raw = take(opts, "checkpoint", OPTIONS["sample"]["checkpoint"])
    if raw in ("best", "latest"):
        return raw
    if raw.isdigit():
        return int(raw)
    raise UserError(f"--checkpoint={raw}: use best, latest or a step number")


def cmd_eval(opts, pos):
    from gptjax import evaluate

    _only(opts, "eval")
    _one_source(opts, "eval")
    out_dir = _opt(opts, "eval", "out_dir")
    split = _opt(opts, "eval", "split")
    if split not in ("train", "val"):
        raise UserError(f"--split={split}: use train or val")
    dtype = _choice(opts, "eval", "dtype")
    r = evaluate.evaluate(out_dir, split, _opt(opts, "eval", "batch_size"), _opt(opts, "eval", "input"),
                       which=_checkpoint(opts), dtype=dtype, mesh=_opt(opts, "eval", "mesh"),
                       init_from=_opt(opts, "eval", "init_from"))
    print(f"{split}: loss {r['loss']:.4f} nats/token over {r['tokens']:,} tokens, "
          f"{r['bits_per_char']:.4f} bits/char over {r['chars']:,} chars")
    print(f"(batches of {r['batch_size']} on {r['mesh']})")


def cmd_bench(opts, pos):
    from gptjax import bench

    options = bench.parse_options(opts)
    if opts.get("init_from", "scratch") != "scratch":
        raise UserError(f"--init_from={opts['init_from']}: gptjax bench times a model from a fresh initialisation "
                        "(its shape is what is timed); drop --init_from")
    records = bench.run(_config(opts), options)
    failed = [r["mode"] for r in records if r["error"]]
    if failed:
        print(f"gptjax: {len(failed)} mode run(s) failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


def _file_and_format(opts, pos, key: str, command: str) -> tuple[str, str]:
    """(format, FILE) of export --to= / import --from=, the format a row of weights.FORMATS."""
    from gptjax import weights

    fmt = weights.get(_opt(opts, command, key), key)
    if fmt.directory and len(pos) != 1:
        raise UserError(f"gptjax {command} --{key}={fmt.name} takes one directory, DIR (e.g. out/{fmt.example})"
                        + (" or a model name (gpt2, gpt2-medium, ...)" if command == "import" else ""))
    if len(pos) != 1 or (command == "export" and not pos[0].endswith(fmt.suffix)):
        raise UserError(f"gptjax {command} takes one checkpoint file, FILE{fmt.suffix} (e.g. out/{fmt.example})")
    from gptjax.config import expand_path

    return fmt.name, expand_path(pos[0])


def cmd_export(opts, pos):
    from gptjax.weights import files

    _only(opts, "export")
    fmt, path = _file_and_format(opts, pos, "to", "export")
    force = _opt(opts, "export", "force")
    out_dir = _opt(opts, "export", "out_dir")
    which = _checkpoint(opts)
    r = files.export(fmt, out_dir, path, force=force, which=which)
    print(f"wrote {r['path']}: {r['tensors']} tensors from {out_dir} ({which} checkpoint, step {r['step']})"
          + (f"; vocabulary in {r['vocab']}" if r["vocab"] else ""))


def cmd_import(opts, pos):
    from gptjax import sample
    from gptjax.weights import files

    _only(opts, "import")
    fmt, path = _file_and_format(opts, pos, "from", "import")
    if "out_dir" not in opts:
        raise UserError("gptjax import needs --out_dir=DIR for the new run")
    out_dir = _opt(opts, "import", "out_dir")
    config, state = files.import_run(fmt, path, out_dir, _opt(opts, "import", "meta"),
                                     force=_opt(opts, "import", "force"))
    m, step = config.model, int(state.step)
    print(f"imported {path} into {out_dir}: {m.n_layer} layers x {m.n_head} heads x {m.n_embd}, block {m.block_size}, "
          f"vocab {m.vocab_size}, tokenizer {config.data.tokenizer}; "
          + (f"weights and AdamW state at step {step} (continue with gptjax train --init_from=resume "
             f"--out_dir={out_dir})" if step else "weights only (the optimizer starts afresh)"))
    print("sample:")
    print(sample.sample(out_dir, max_new_tokens=200)[0])


COMMANDS = {"prepare": cmd_prepare, "train": cmd_train, "sample": cmd_sample, "eval": cmd_eval, "bench": cmd_bench,
            "export": cmd_export, "import": cmd_import}


def _one_line(e: BaseException) -> str:
    """The message on one line whatever it quotes: a line break in a value the user gave (\\n, \\x1c, \\x85, ...) is
    written escaped, as repr() writes it."""
    return "".join(repr(c)[1:-1] if len(f"a{c}a".splitlines()) > 1 else c for c in str(e))


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit status. Without argv (the `gptjax` program itself) a failed command ends the
    process at once: a library's worker thread stuck on a failed write must not keep it alive."""
    if argv is None:
        try:
            code = main(sys.argv[1:])
        except Exception:  # a bug: its traceback, then out at once, as for any failure
            import traceback

            traceback.print_exc()
            code = 1
        if code:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
    import logging

    # orbax logs its threads' failures (through absl, and asyncio's "Task exception was never retrieved" when a save
    # fails): the failure reaches the command, which names it in one line.
    for name in ("absl", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    parallel.process_settings()
    if argv[:1] != ["prepare"]:  # the one command that never imports jax: its start-up stays a fraction of a second
        parallel.use_compilation_cache()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv[0] in ("--version", "-V", "version"):
        print(version())
        return 0
    command, rest = argv[0], argv[1:]
    try:
        os.getcwd()
    except FileNotFoundError:
        print("gptjax: error: the working directory no longer exists (deleted?): cd to one that does",
              file=sys.stderr)
        return 2
    if command not in COMMANDS:
        print(f"gptjax: error: unknown command {command!r}; use one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if "--help" in rest or "-h" in rest:
        try:
            print(command_help(command, [a for a in rest if a not in ("--help", "-h")]))
        except UserError as e:
            print(f"gptjax: error: {_one_line(e)}", file=sys.stderr)
            return 2
        return 0
    try:
        opts, pos = parse(rest)
        if pos and command not in TAKES_FILE:
            raise UserError(f"unexpected argument {pos[0]!r}: options are written --key=value")
        COMMANDS[command](opts, pos)
    except UserError as e:
        print(f"gptjax: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Stopped as e:
        print(f"gptjax: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("gptjax: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
