"""`gptjax prepare | train | sample | eval | bench`: argument parsing and printing; the work lives in the library."""

from __future__ import annotations

import json
import os
import sys

from gptjax import distributed, parallel
from gptjax.args import parse
from gptjax.errors import Stopped, UserError
from gptjax.weights import FORMATS

FORMAT_NAMES = "|".join(FORMATS)  # export --to= and import --from=: a row of weights.FORMATS each
USAGE = f"""usage: gptjax COMMAND [--key=value ...]

  prepare  [--config=NAME|FILE.py] [--dataset=shakespeare_char|shakespeare] [--input=PATH] [--tokenizer=char|gpt2|bpe:N]
  train    [--config=NAME|FILE.py] [--key=value ...] [--init_from=resume] [--force] [--keep_checkpoints=N]
           [--mesh=dp:N,fsdp:M] [--step_impl=sharded|shard_map|pmap]
           [--distributed [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]
                          [--distributed_timeout=SECONDS]]
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
  export   --out_dir=DIR --to={FORMAT_NAMES} FILE.pt [--force] [--checkpoint=best|latest|STEP]
  import   --from={FORMAT_NAMES} FILE.pt --out_dir=DIR [--meta=PATH/meta.pkl] [--force]

presets: bigram, lecture, shakespeare_char, shakespeare_char_cpu (default), gpt2, tiny.
Config keys use nanoGPT's names (batch_size, block_size, n_layer, learning_rate, ...).
gptjax COMMAND --help lists a command's options and config keys with types, defaults and ranges; gptjax --version.
"""


DEFAULT_CONFIG = "shakespeare_char_cpu"
DEFAULT_RUN = "out-shakespeare-char-cpu"  # the default preset's out_dir: where sample, eval and export look

SUMMARY = {
    "prepare": "Tokenize a corpus once: train.bin / val.bin, meta.json and tokenizer.json in the prepared cache.",
    "train": "Train a model as the config says, writing the run to --out_dir; a sample closes it.",
    "sample": "Generate text from a trained run's checkpoint.",
    "eval": "The exact loss of a run's checkpoint over a whole split, in nats per token and bits per character.",
    "bench": "Time one model in several execution modes (JAX and PyTorch), each in a process of its own.",
    "export": "Write a run's checkpoint as nanoGPT's ckpt.pt (and meta.pkl for a char vocabulary).",
    "import": "Turn a nanoGPT ckpt.pt into a gptjax run directory.",
}
CONFIG_OPTION = {"config": ("NAME|FILE.py", DEFAULT_CONFIG, "a preset (bigram, lecture, shakespeare_char, "
                                                            "shakespeare_char_cpu, gpt2, tiny) or a config file")}
CHECKPOINT = ("best|latest|STEP", "best", "which checkpoint")
# Each command's own options: name -> (metavar, default, one-line help). The commands take their defaults from here,
# so --help and the code never disagree; ranges come from config.RANGES under RANGE_KEYS' name.
OPTIONS = {
    "prepare": CONFIG_OPTION,
    "train": {
        **CONFIG_OPTION,
        "force": ("true|false", False, "replace the run in --out_dir (removed only once the new run's checks pass)"),
        "distributed": ("true|false", False, "start jax.distributed: SLURM and TPU pods are found; elsewhere pass "
                                             "the three options below"),
        "coordinator_address": ("HOST:PORT", "", "with --distributed: where process 0 serves the coordinator"),
        "num_processes": ("N", 0, "with --distributed: how many processes take part"),
        "process_id": ("I", -1, "with --distributed: this process's rank, 0 to N-1"),
        "distributed_timeout": ("SECONDS", 120, "with --distributed: how long to wait for every process to connect"),
    },
    "sample": {
        "out_dir": ("DIR", DEFAULT_RUN, "the run to sample from"),
        "start": ("TEXT|FILE:path", None, "the prompt, or a file's contents; default: a newline"),
        "num_samples": ("N", 1, "texts to generate"),
        "max_new_tokens": ("N", 500, "tokens generated after the prompt"),
        "temperature": ("T", 0.8, "logits are divided by T (tiny values sample greedily)"),
        "top_k": ("K", 200, "keep the K most likely tokens; 0: all"),
        "top_p": ("P", 1.0, "keep the fewest most likely tokens whose probability reaches P; 1: all"),
        "seed": ("S", 1337, "the same seed gives the same text"),
        "checkpoint": CHECKPOINT,
        "kv_cache": ("true|false", True, "cache keys and values (the same tokens, faster)"),
        "dtype": ("auto|float32|bfloat16", "auto", "matmul dtype; auto: bfloat16 on a GPU/TPU, float32 on a CPU"),
        "attention": ("auto|einsum|xla|cudnn", "auto", "attention kernel; auto: cudnn on a GPU in bfloat16"),
    },
    "eval": {
        "out_dir": ("DIR", DEFAULT_RUN, "the run to evaluate"),
        "split": ("val|train", "val", "the split, whole"),
        "batch_size": ("N", 0, "windows per call; 0: the run's own batch size"),
        "input": ("PATH", "", "the corpus file, for a run moved or imported without one"),
        "checkpoint": CHECKPOINT,
        "dtype": ("float32|bfloat16|auto", "float32", "float32 gives the figure to report"),
        "mesh": ("dp:N,fsdp:M", "", "as train's --mesh; default every device on dp"),
    },
    "bench": {
        **CONFIG_OPTION,
        "modes": ("M1,M2,...", "jax_jit,jax_jit_dp,jax_eager,torch_eager,torch_compile,torch_fast",
                  "the modes to time (without torch installed, the jax_* ones)"),
        "workload": ("train|forward|generate", "train", "what each call runs"),
        "sampler": ("kv,reforward", "kv,reforward", "--workload=generate: the samplers to time"),
        "steps": ("N", 20, "timed calls per repeat"),
        "eager_steps": ("N", 3, "timed calls per repeat for jax_eager (at most --steps unless given)"),
        "warmup": ("N", 2, "untimed calls after the first"),
        "repeats": ("R", 5, "timed repeats per round"),
        "rounds": ("R", 1, "the modes run R times in turn, their repeats pooled"),
        "sweep": ("KEY:V1,V2,...", "", "batch_size, block_size, n_layer or n_embd: a record per value"),
        "max_new_tokens": ("N", 64, "--workload=generate: new tokens per sequence"),
        "out": ("DIR", "", "write results.json, results.md and results.png there"),
    },
    "export": {
        "out_dir": ("DIR", DEFAULT_RUN, "the run to export"),
        "to": (FORMAT_NAMES, "nanogpt", "the format; the file is the one positional argument, FILE.pt"),
        "force": ("true|false", False, "replace FILE.pt if it exists"),
        "checkpoint": CHECKPOINT,
    },
    "import": {
        "from": (FORMAT_NAMES, "nanogpt", "the format; the file is the one positional argument, FILE.pt"),
        "out_dir": ("DIR", None, "the new run's directory (required)"),
        "meta": ("PATH", None, "nanoGPT's meta.pkl; default: the one beside FILE.pt, else GPT-2's tokenizer"),
        "force": ("true|false", False, "replace a run in --out_dir"),
    },
}
RANGE_KEYS = {("eval", "batch_size"): "eval_batch_size", ("bench", "max_new_tokens"): "bench_max_new_tokens",
              ("train", "distributed_timeout"): "distributed_timeout", ("train", "num_processes"): "num_processes",
              ("train", "process_id"): "process_id"}
TAKES_CONFIG = ("prepare", "train", "bench")  # the commands that take --config and every config key


PATH_OPTIONS = ("out_dir", "input", "out", "meta")  # ~ expanded, as config.PATH_KEYS


def _take(opts: dict, key: str, typ, default):
    if key not in opts:
        return default
    raw = opts.pop(key)
    if typ is str:
        from gptjax.config import expand_path

        return expand_path(raw) if key in PATH_OPTIONS else raw
    try:
        return typ(raw) if typ is not bool else {"true": True, "false": False}[raw.lower()]
    except (ValueError, KeyError):
        raise UserError(f"--{key}={raw} is not a valid {typ.__name__}") from None


def _opt(opts: dict, command: str, key: str, typ=str):
    """--key of `command`, its default from OPTIONS."""
    return _take(opts, key, typ, OPTIONS[command][key][1])


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
    from gptjax.config import check_range

    wanted = _opt(opts, "train", "distributed", bool)
    given = [k for k in ("coordinator_address", "num_processes", "process_id", "distributed_timeout") if k in opts]
    launch = {k: _opt(opts, "train", k, typ) for k, typ in (
        ("coordinator_address", str), ("num_processes", int), ("process_id", int), ("distributed_timeout", int))}
    if not wanted:
        if given:
            raise UserError(f"--{given[0]} applies with --distributed only: add --distributed")
        return False
    for key in ("num_processes", "process_id", "distributed_timeout"):
        if key in given:
            check_range(RANGE_KEYS["train", key], launch[key], key)
    distributed.init_distributed(**launch)
    if not distributed.is_lead():  # the file descriptor too: the runtime's collectives print from C++
        sys.stdout.flush()
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    return True


def cmd_train(opts, pos):
    from gptjax import checkpoint, run, sample, train

    force = _opt(opts, "train", "force", bool)
    multihost = _distributed(opts)
    if opts.get("init_from") == "resume":  # the run's saved settings; only what is passed here changes
        preset = opts.pop("config", DEFAULT_CONFIG)
        config, changes = run.resume_config(opts, _config({"config": preset}).train.out_dir)
        print(f"resume: {config.train.out_dir}'s saved settings" + (f" (--config={preset} is not applied)"
              if preset != DEFAULT_CONFIG else "") + ("; changed: " + ", ".join(changes) if changes else ""))
    else:
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

    _only(opts, tuple(OPTIONS["sample"]), "sample")
    kw = {k: _opt(opts, "sample", k, typ) for k, typ in (
        ("start", str), ("num_samples", int), ("max_new_tokens", int), ("temperature", float), ("top_k", int),
        ("seed", int), ("top_p", float), ("kv_cache", bool))}
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


def _checkpoint(opts) -> str | int:
    """--checkpoint=best|latest|STEP (default best)."""
    raw = _take(opts, "checkpoint", str, CHECKPOINT[1])
    if raw in ("best", "latest"):
        return raw
    if raw.isdigit():
        return int(raw)
    raise UserError(f"--checkpoint={raw}: use best, latest or a step number")


def cmd_eval(opts, pos):
    from gptjax import evaluate

    _only(opts, tuple(OPTIONS["eval"]), "eval")
    out_dir = _opt(opts, "eval", "out_dir")
    split = _opt(opts, "eval", "split")
    if split not in ("train", "val"):
        raise UserError(f"--split={split}: use train or val")
    dtype = _choice(opts, "eval", "dtype")
    r = evaluate.evaluate(out_dir, split, _opt(opts, "eval", "batch_size", int), _opt(opts, "eval", "input"),
                       which=_checkpoint(opts), dtype=dtype, mesh=_opt(opts, "eval", "mesh"))
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


def _file_and_format(opts, pos, key: str, command: str) -> tuple[str, str]:
    """(format, FILE) of export --to= / import --from=, the format a row of weights.FORMATS."""
    from gptjax import weights

    fmt = weights.get(_opt(opts, command, key), key)
    if len(pos) != 1 or (command == "export" and not pos[0].endswith(fmt.suffix)):
        raise UserError(f"gptjax {command} takes one checkpoint file, FILE{fmt.suffix} (e.g. out/{fmt.example})")
    from gptjax.config import expand_path

    return fmt.name, expand_path(pos[0])


def cmd_export(opts, pos):
    from gptjax.weights import files

    _only(opts, tuple(OPTIONS["export"]), "export")
    fmt, path = _file_and_format(opts, pos, "to", "export")
    force = _opt(opts, "export", "force", bool)
    out_dir = _opt(opts, "export", "out_dir")
    which = _checkpoint(opts)
    r = files.export(fmt, out_dir, path, force=force, which=which)
    print(f"wrote {r['path']}: {r['tensors']} tensors from {out_dir} ({which} checkpoint, step {r['step']})"
          + (f"; vocabulary in {r['vocab']}" if r["vocab"] else ""))


def cmd_import(opts, pos):
    from gptjax import sample
    from gptjax.weights import files

    _only(opts, tuple(OPTIONS["import"]), "import")
    fmt, path = _file_and_format(opts, pos, "from", "import")
    if "out_dir" not in opts:
        raise UserError("gptjax import needs --out_dir=DIR for the new run")
    out_dir = _opt(opts, "import", "out_dir")
    config, state = files.import_run(fmt, path, out_dir, _opt(opts, "import", "meta"),
                                     force=_opt(opts, "import", "force", bool))
    m, step = config.model, int(state.step)
    print(f"imported {path} into {out_dir}: {m.n_layer} layers x {m.n_head} heads x {m.n_embd}, block {m.block_size}, "
          f"vocab {m.vocab_size}, tokenizer {config.data.tokenizer}; "
          + (f"weights and AdamW state at step {step} (continue with gptjax train --init_from=resume "
             f"--out_dir={out_dir})" if step else "weights only (the optimizer starts afresh)"))
    print("sample:")
    print(sample.sample(out_dir, max_new_tokens=200)[0])


def command_help(command: str, argv: list[str]) -> str:
    """`gptjax COMMAND --help`: its options and, for the commands that take a config, every config key, each with
    type, default, range and description, generated from OPTIONS and the config dataclasses. A --config among argv
    shows that preset's (or file's) values."""
    from gptjax import config as cfg

    lines = [f"usage: gptjax {command} [--key=value ...]" + (" FILE.pt" if command in TAKES_FILE else ""), "",
             SUMMARY[command], "", "options:"]
    for name, (metavar, default, note) in OPTIONS[command].items():
        key = RANGE_KEYS.get((command, name), name)
        typ = bool if isinstance(default, bool) else type(default) if default is not None else str
        facts = cfg.describe_value(key, typ, default) if key in cfg.RANGES or default is not None else "[str]"
        lines.append(cfg.help_line(f"{name}={metavar}", note, facts.replace("[bool, ", "[").replace("[str, ", "[")
                                   .replace("[int, ", "[").replace("[float, ", "[")))
    if command in TAKES_CONFIG:
        opts = parse(argv)[0]
        preset = opts.get("config", DEFAULT_CONFIG)
        try:
            config = cfg.load_config(preset)
        except UserError:
            preset, config = DEFAULT_CONFIG, cfg.load_config(DEFAULT_CONFIG)
        lines += ["", cfg.help_text(config, preset)]
    return "\n".join(lines)


def version() -> str:
    from importlib import metadata

    from gptjax import __version__

    found = []
    for package in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "torch"):
        try:
            found.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pass
    return f"gptjax {__version__} ({', '.join(found)})"


COMMANDS = {"prepare": cmd_prepare, "train": cmd_train, "sample": cmd_sample, "eval": cmd_eval, "bench": cmd_bench,
            "export": cmd_export, "import": cmd_import}
TAKES_FILE = ("export", "import")


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
    parallel.use_all_cores()
    parallel.reuse_freed_memory()
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
            print(f"gptjax: error: {e}", file=sys.stderr)
            return 2
        return 0
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
