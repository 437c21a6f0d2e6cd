"""`gptjax prepare | train | sample | eval | bench`: argument parsing and printing; the work lives in the library."""

from __future__ import annotations

import json
import os
import sys

from gptjax import parallel
from gptjax.errors import Stopped, UserError

USAGE = """usage: gptjax COMMAND [--key=value ...]

  prepare  [--config=NAME|FILE.py] [--dataset=shakespeare_char|shakespeare] [--input=PATH] [--tokenizer=char|gpt2|bpe:N]
  train    [--config=NAME|FILE.py] [--key=value ...] [--init_from=resume] [--force] [--keep_checkpoints=N]
           [--mesh=dp:N,fsdp:M] [--step_impl=sharded|shard_map|pmap]
           [--distributed [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]]
  sample   --out_dir=DIR [--start=TEXT|FILE:path] [--num_samples=N] [--max_new_tokens=N]
           [--temperature=T] [--top_k=K] [--top_p=P] [--seed=S] [--checkpoint=best|latest|STEP]
           [--kv_cache=true|false] [--dtype=auto|float32|bfloat16] [--attention=auto|einsum|xla|cudnn]
  eval     --out_dir=DIR [--split=val|train] [--batch_size=N] [--input=PATH] [--checkpoint=best|latest|STEP]
           [--dtype=float32|bfloat16|auto] [--mesh=dp:N,fsdp:M]
  bench    [--config=NAME|FILE.py] [--key=value ...] [--dtype=auto|float32|bfloat16]
           [--modes=jax_jit,jax_jit_dp,jax_eager,torch_eager,torch_compile,torch_fast]
           [--workload=train|forward|generate] [--sampler=kv,reforward] [--steps=N] [--eager_steps=N] [--warmup=N]
           [--repeats=R] [--rounds=R] [--sweep=KEY:V1,V2,...] [--max_new_tokens=N] [--out=DIR]
           [--mesh=dp:N,fsdp:M] [--step_impl=sharded|shard_map|pmap]   (the jax_jit_dp mode)
  export   --out_dir=DIR --to=nanogpt FILE.pt [--force] [--checkpoint=best|latest|STEP]
  import   --from=nanogpt FILE.pt --out_dir=DIR [--meta=PATH/meta.pkl] [--force]

presets: bigram, lecture, shakespeare_char, shakespeare_char_cpu (default), gpt2, tiny.
Config keys use nanoGPT's names (batch_size, block_size, n_layer, learning_rate, ...).
"""


DEFAULT_CONFIG = "shakespeare_char_cpu"


def parse(argv: list[str]) -> tuple[dict, list[str]]:
    """--key=value pairs (a bare --flag is True) and positional arguments."""
    opts, pos = {}, []
    for arg in argv:
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not key:
                raise UserError(f"malformed argument {arg!r}: write --key=value")
            opts[key] = value if eq else "true"
        else:
            pos.append(arg)
    return opts, pos


def _take(opts: dict, key: str, typ, default):
    if key not in opts:
        return default
    raw = opts.pop(key)
    if typ is str:
        return raw
    try:
        return typ(raw) if typ is not bool else {"true": True, "false": False}[raw.lower()]
    except (ValueError, KeyError):
        raise UserError(f"--{key}={raw} is not a valid {typ.__name__}") from None


def _only(opts: dict, allowed: tuple[str, ...], command: str) -> None:
    import difflib

    for key in opts:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=2, cutoff=0.5)
            hint = f"; did you mean {' or '.join('--' + c for c in close)}?" if close else ""
            raise UserError(f"gptjax {command} takes no --{key}{hint}")


def _config(opts: dict):
    from gptjax.config import load_config

    return load_config(opts.pop("config", DEFAULT_CONFIG), opts)


def cmd_prepare(opts, pos):
    from gptjax import data

    config = _config(opts)
    prep = data.prepare(config.data)
    print(json.dumps(prep.meta, indent=1))
    print(f"prepared in {prep.dir}")


def _distributed(opts) -> bool:
    """--distributed: start jax's multi-controller runtime before anything touches a device; the processes other
    than process 0 print nothing from here on (their errors still reach stderr)."""
    distributed = _take(opts, "distributed", bool, False)
    launch = {k: _take(opts, k, typ, default) for k, typ, default in (
        ("coordinator_address", str, ""), ("num_processes", int, 0), ("process_id", int, -1))}
    if not distributed:
        given = [k for k, v in launch.items() if v not in ("", 0, -1)]
        if given:
            raise UserError(f"--{given[0]} applies with --distributed only: add --distributed")
        return False
    parallel.init_distributed(**launch)
    if not parallel.is_lead():  # the file descriptor too: the runtime's collectives print from C++
        sys.stdout.flush()
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    return True


def cmd_train(opts, pos):
    from gptjax import checkpoint, sample, train

    force = _take(opts, "force", bool, False)
    distributed = _distributed(opts)
    if opts.get("init_from") == "resume":  # the run's saved settings; only what is passed here changes
        preset = opts.pop("config", DEFAULT_CONFIG)
        config, changes = train.resume_config(opts, _config({"config": preset}).train.out_dir)
        print(f"resume: {config.train.out_dir}'s saved settings" + (f" (--config={preset} is not applied)"
              if preset != DEFAULT_CONFIG else "") + ("; changed: " + ", ".join(changes) if changes else ""))
    else:
        config = _config(opts)
    summary = train.train(config, force=force, progress=True)
    if distributed:  # restoring a checkpoint is collective under jax.distributed: sample from one process later
        print(f"sample with: gptjax sample --out_dir={summary['out_dir']}")
        return
    if not checkpoint.exists(summary["out_dir"], "latest"):
        print("no checkpoint yet (no steps trained), so no sample")
        return
    print("sample:")
    print(sample.sample(summary["out_dir"], max_new_tokens=300)[0])


def cmd_sample(opts, pos):
    from gptjax import sample

    _only(opts, ("out_dir", "start", "num_samples", "max_new_tokens", "temperature", "top_k", "seed", "checkpoint",
                 "top_p", "kv_cache", "dtype", "attention"), "sample")
    out_dir = _take(opts, "out_dir", str, "out-shakespeare-char-cpu")
    texts = sample.sample(
        out_dir, start=_take(opts, "start", str, None), num_samples=_take(opts, "num_samples", int, 1),
        max_new_tokens=_take(opts, "max_new_tokens", int, 500), temperature=_take(opts, "temperature", float, 0.8),
        top_k=_take(opts, "top_k", int, 200), seed=_take(opts, "seed", int, 1337), checkpoint=_checkpoint(opts),
        top_p=_take(opts, "top_p", float, 1.0), kv_cache=_take(opts, "kv_cache", bool, True),
        dtype=_choice(opts, "dtype", "auto"), attention=_choice(opts, "attention", "auto"),
    )
    for text in texts:
        print(text)
        print("---------------")


def _choice(opts, key: str, default: str) -> str:
    """--key=WORD, one of config.CHOICES[key]."""
    from gptjax.config import check_choice

    value = _take(opts, key, str, default)
    check_choice(key, value)
    return value


def _checkpoint(opts) -> str | int:
    """--checkpoint=best|latest|STEP (default best)."""
    raw = _take(opts, "checkpoint", str, "best")
    if raw in ("best", "latest"):
        return raw
    if raw.isdigit():
        return int(raw)
    raise UserError(f"--checkpoint={raw}: use best, latest or a step number")


def cmd_eval(opts, pos):
    from gptjax import train

    _only(opts, ("out_dir", "split", "batch_size", "input", "checkpoint", "dtype", "mesh"), "eval")
    out_dir = _take(opts, "out_dir", str, "out-shakespeare-char-cpu")
    split = _take(opts, "split", str, "val")
    if split not in ("train", "val"):
        raise UserError(f"--split={split}: use train or val")
    dtype = _choice(opts, "dtype", "float32")
    r = train.evaluate(out_dir, split, _take(opts, "batch_size", int, 0), _take(opts, "input", str, ""),
                       which=_checkpoint(opts), dtype=dtype, mesh=_take(opts, "mesh", str, ""))
    print(f"{split}: loss {r['loss']:.4f} nats/token over {r['tokens']:,} tokens, "
          f"{r['bits_per_char']:.4f} bits/char over {r['chars']:,} chars")
    print(f"(batches of {r['batch_size']} on {r['mesh']})")


def cmd_bench(opts, pos):
    from gptjax import bench

    options = bench.parse_options(opts)
    records = bench.run(_config(opts), options)
    failed = [r["mode"] for r in records if r["error"]]
    if failed:
        print(f"gptjax: {len(failed)} mode run(s) failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


def _file_and_format(opts, pos, key: str, command: str) -> str:
    fmt = _take(opts, key, str, "nanogpt")
    if fmt != "nanogpt":
        raise UserError(f"--{key}={fmt}: the only checkpoint format is nanogpt")
    if len(pos) != 1 or (command == "export" and not pos[0].endswith(".pt")):
        raise UserError(f"gptjax {command} takes one checkpoint file, FILE.pt (e.g. out/ckpt.pt)")
    return pos[0]


def _torch_convert():
    try:
        from gptjax.reference import convert
    except ImportError:
        raise UserError("nanoGPT checkpoints need PyTorch: pip install 'gptjax[torch]'") from None
    return convert


def cmd_export(opts, pos):
    _only(opts, ("out_dir", "to", "force", "checkpoint"), "export")
    path = _file_and_format(opts, pos, "to", "export")
    force = _take(opts, "force", bool, False)
    out_dir = _take(opts, "out_dir", str, "out-shakespeare-char-cpu")
    which = _checkpoint(opts)
    r = _torch_convert().export_nanogpt(out_dir, path, force=force, which=which)
    print(f"wrote {r['path']}: {r['tensors']} tensors from {out_dir} ({which} checkpoint, step {r['iter_num']})"
          + (f"; vocabulary in {r['meta']}" if r["meta"] else ""))


def cmd_import(opts, pos):
    from gptjax import sample

    _only(opts, ("from", "out_dir", "meta", "force"), "import")
    path = _file_and_format(opts, pos, "from", "import")
    if "out_dir" not in opts:
        raise UserError("gptjax import needs --out_dir=DIR for the new run")
    out_dir = _take(opts, "out_dir", str, "")
    config, state = _torch_convert().import_nanogpt(path, out_dir, _take(opts, "meta", str, None),
                                                    force=_take(opts, "force", bool, False))
    m, step = config.model, int(state.step)
    print(f"imported {path} into {out_dir}: {m.n_layer} layers x {m.n_head} heads x {m.n_embd}, block {m.block_size}, "
          f"vocab {m.vocab_size}, tokenizer {config.data.tokenizer}; "
          + (f"weights and AdamW state at step {step} (continue with gptjax train --init_from=resume "
             f"--out_dir={out_dir})" if step else "weights only (the optimizer starts afresh)"))
    print("sample:")
    print(sample.sample(out_dir, max_new_tokens=200)[0])


COMMANDS = {"prepare": cmd_prepare, "train": cmd_train, "sample": cmd_sample, "eval": cmd_eval, "bench": cmd_bench,
            "export": cmd_export, "import": cmd_import}
TAKES_FILE = ("export", "import")


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit status. Without argv (the `gptjax` program itself) a failed command ends the
    process at once: a library's worker thread stuck on a failed write must not keep it alive."""
    if argv is None:
        code = main(sys.argv[1:])
        if code:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
    import logging

    logging.getLogger("absl").setLevel(logging.CRITICAL)  # orbax logs its threads' failures, which become our line
    parallel.use_all_cores()
    parallel.reuse_freed_memory()
    parallel.use_compilation_cache()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"gptjax: error: unknown command {command!r}; use one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        opts, pos = parse(rest)
        if pos and command not in TAKES_FILE:
            raise UserError(f"unexpected argument {pos[0]!r}: options are written --key=value")
        COMMANDS[command](opts, pos)
    except UserError as e:
        print(f"gptjax: error: {e}", file=sys.stderr)
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
