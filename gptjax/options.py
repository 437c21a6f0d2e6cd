"""What each `gptjax` command takes: the usage, each command's option table (defaults and help) and its --help text."""

from __future__ import annotations

import dataclasses

from gptjax.args import Option, from_fields, help_lines, help_text, parse
from gptjax.config import PRESETS
from gptjax.errors import UserError
from gptjax.weights import FORMATS

FORMAT_NAMES = "|".join(FORMATS)  # export --to= and import --from=: a row of weights.FORMATS each
USAGE = f"""usage: gptjax COMMAND [--key=value ...]

  prepare  [--config=NAME|FILE.py] [--dataset=shakespeare_char|shakespeare] [--input=PATH] [--tokenizer=char|gpt2|bpe:N]
           [--val_fraction=F] [--bpe_sample_bytes=N] [--text_field=NAME] [--split_seed=S] [--data_dir=DIR]
  train    [--config=NAME|FILE.py] [--key=value ...] [--init_from=resume|gpt2*|DIR] [--force] [--keep_checkpoints=N]
           [--mesh=dp:N,fsdp:M] [--step_impl=sharded|shard_map|pmap]
           [--distributed [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]
                          [--distributed_timeout=SECONDS]]
  sample   --out_dir=DIR|--init_from=gpt2*|DIR [--start=TEXT|FILE:path] [--num_samples=N] [--max_new_tokens=N]
           [--temperature=T] [--top_k=K] [--top_p=P] [--seed=S] [--checkpoint=best|latest|STEP]
           [--kv_cache=true|false] [--dtype=auto|float32|bfloat16] [--attention=auto|einsum|xla|cudnn]
  eval     --out_dir=DIR|--init_from=gpt2*|DIR [--split=val|train] [--batch_size=N] [--input=PATH]
           [--checkpoint=best|latest|STEP] [--dtype=float32|bfloat16|auto] [--mesh=dp:N,fsdp:M]
  bench    [--config=NAME|FILE.py] [--key=value ...] [--dtype=auto|float32|bfloat16]
           [--modes=jax_jit,jax_jit_dp,jax_eager,torch_eager,torch_compile,torch_fast,hf_eager,hf_compile]
           [--workload=train|forward|generate] [--sampler=kv,reforward] [--steps=N] [--eager_steps=N] [--warmup=N]
           [--repeats=R] [--rounds=R] [--sweep=KEY:V1,V2,...] [--max_new_tokens=N] [--out=DIR]
           [--mesh=dp:N,fsdp:M] [--step_impl=sharded|shard_map|pmap]   (the jax_jit_dp mode)
  export   --out_dir=DIR --to={FORMAT_NAMES} FILE.pt|DIR [--force] [--checkpoint=best|latest|STEP]
  import   --from={FORMAT_NAMES} FILE.pt|DIR|gpt2* --out_dir=DIR [--meta=PATH/meta.pkl] [--force]

presets: bigram, lecture, shakespeare_char, shakespeare_char_cpu (default), gpt2, tiny.
Config keys use nanoGPT's names (batch_size, block_size, n_layer, learning_rate, ...).
gptjax COMMAND --help lists a command's options and config keys with types, defaults and ranges; gptjax --version.
"""

DEFAULT_CONFIG = "shakespeare_char_cpu"
DEFAULT_RUN = PRESETS[DEFAULT_CONFIG]().train.out_dir  # where sample, eval and export look without --out_dir

SUMMARY = {
    "prepare": "Tokenize a corpus once: train.bin / val.bin, meta.json and tokenizer.json in the prepared cache.",
    "train": "Train a model as the config says, writing the run to --out_dir; a sample closes it.",
    "sample": "Generate text from a trained run's checkpoint.",
    "eval": "The exact loss of a run's checkpoint over a whole split, in nats per token and bits per character.",
    "bench": "Time one model in several execution modes (JAX and PyTorch), each in a process of its own.",
    "export": "Write a run's checkpoint as nanoGPT's ckpt.pt (and meta.pkl for a char vocabulary), or as a Hugging "
              "Face GPT-2 directory (config.json, model.safetensors).",
    "import": "Turn a nanoGPT ckpt.pt, or a Hugging Face GPT-2 (a directory or a cached model's name), into a gptjax "
              "run directory.",
}
CONFIG_OPTION = {"config": Option("NAME|FILE.py", DEFAULT_CONFIG, "a preset (bigram, lecture, shakespeare_char, "
                                                                  "shakespeare_char_cpu, gpt2, tiny) or a config file")}
CHECKPOINT = Option("best|latest|STEP", "best", "which checkpoint")
@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """How `gptjax sample` draws text: sample.sample's keyword defaults, and their help."""
    num_samples: int = 1  # texts to generate
    max_new_tokens: int = 500  # tokens generated after the prompt
    temperature: float = 0.8  # logits are divided by T (tiny values sample greedily)
    top_k: int = 200  # keep the K most likely tokens; 0: all
    top_p: float = 1.0  # keep the fewest most likely tokens whose probability reaches P; 1: all
    seed: int = 1337  # the same seed gives the same text
    kv_cache: bool = True  # cache keys and values (the same tokens, faster)


SAMPLE = from_fields(SampleConfig, {"num_samples": "N", "max_new_tokens": "N", "temperature": "T", "top_k": "K",
                                    "top_p": "P", "seed": "S", "kv_cache": "true|false"})
# Each command's own options, by name. The commands take their defaults from here (sample's from SampleConfig,
# which sample.sample's signature reads too), so --help and the code never disagree; ranges come from config.RANGES.
OPTIONS = {
    "prepare": CONFIG_OPTION,
    "train": {
        **CONFIG_OPTION,
        "force": Option("true|false", False, "replace the run in --out_dir (removed only once the new run's checks "
                                             "pass)"),
        "distributed": Option("true|false", False, "start jax.distributed: SLURM and TPU pods are found; elsewhere "
                                                   "pass the three options below"),
        "coordinator_address": Option("HOST:PORT", "", "with --distributed: where process 0 serves the coordinator"),
        "num_processes": Option("N", 0, "with --distributed: how many processes take part"),
        "process_id": Option("I", -1, "with --distributed: this process's rank, 0 to N-1"),
        "distributed_timeout": Option("SECONDS", 120, "with --distributed: how long to wait for every process to "
                                                      "connect"),
    },
    "sample": {
        "out_dir": Option("DIR", DEFAULT_RUN, "the run to sample from"),
        "init_from": Option("gpt2*|DIR", "", "a pretrained GPT-2 instead of a run: gpt2, gpt2-medium, gpt2-large, "
                                             "gpt2-xl (the Hugging Face cache) or a directory of its files"),
        "start": Option("TEXT|FILE:path", None, "the prompt, or a file's contents; default: a newline"),
        **{k: o for k, o in SAMPLE.items() if k != "kv_cache"},
        "checkpoint": CHECKPOINT,
        "kv_cache": SAMPLE["kv_cache"],
        "dtype": Option("auto|float32|bfloat16", "auto", "matmul dtype; auto: bfloat16 on a GPU/TPU and an AMX CPU "
                                                          "with the kernel, else float32"),
        "attention": Option("auto|einsum|xla|cudnn", "auto", "attention kernel; auto: cudnn on a GPU in bfloat16"),
    },
    "eval": {
        "out_dir": Option("DIR", DEFAULT_RUN, "the run to evaluate"),
        "init_from": Option("gpt2*|DIR", "", "a pretrained GPT-2 instead of a run (as sample's); the corpus is --input "
                                             "or tiny Shakespeare, in batches of 8 by default"),
        "split": Option("val|train", "val", "the split, whole"),
        "batch_size": Option("N", 0, "windows per call; 0: the run's own batch size", range="eval_batch_size"),
        "input": Option("PATH", "", "the corpus file, for a run moved or imported without one"),
        "checkpoint": CHECKPOINT,
        "dtype": Option("float32|bfloat16|auto", "float32", "float32 gives the figure to report"),
        "mesh": Option("dp:N,fsdp:M", "", "as train's --mesh; default every device on dp"),
    },
    "bench": {
        **CONFIG_OPTION,
        "modes": Option("M1,M2,...", "jax_jit,jax_jit_dp,jax_eager,torch_eager,torch_compile,torch_fast",
                        "the modes to time (without torch installed, the jax_* ones; transformers' GPT-2, hf_eager "
                        "and hf_compile, when named); a mode may take settings of its own: "
                        "jax_jit_dp[matmul=xla,dtype=bfloat16], torch_compile[dtype=bfloat16]"),
        "workload": Option("train|forward|generate", "train", "what each call runs"),
        "sampler": Option("kv,reforward", "kv,reforward", "--workload=generate: the samplers to time"),
        "steps": Option("N", 20, "timed calls per repeat"),
        "eager_steps": Option("N", 3, "timed calls per repeat for jax_eager (at most --steps unless given)"),
        "warmup": Option("N", 2, "untimed calls after the first"),
        "repeats": Option("R", 5, "timed repeats per round"),
        "rounds": Option("R", 1, "the modes run R times in turn, their repeats pooled"),
        "sweep": Option("KEY:V1,V2,...", "", "batch_size, block_size, n_layer or n_embd: a record per value"),
        "max_new_tokens": Option("N", 64, "--workload=generate: new tokens per sequence",
                                 range="bench_max_new_tokens"),
        "out": Option("DIR", "", "write results.json, results.md and results.png there"),
    },
    "export": {
        "out_dir": Option("DIR", DEFAULT_RUN, "the run to export"),
        "to": Option(FORMAT_NAMES, "nanogpt", "the format; the one positional argument is FILE.pt (nanogpt) or DIR "
                                              "(hf)"),
        "force": Option("true|false", False, "replace FILE.pt (or DIR's files) if it exists"),
        "checkpoint": CHECKPOINT,
    },
    "import": {
        "from": Option(FORMAT_NAMES, "nanogpt", "the format; the one positional argument is FILE.pt (nanogpt), or DIR "
                                                "or a model name in the Hugging Face cache (hf)"),
        "out_dir": Option("DIR", None, "the new run's directory (required)"),
        "meta": Option("PATH", None, "nanoGPT's meta.pkl; default: the one beside FILE.pt, else GPT-2's tokenizer"),
        "force": Option("true|false", False, "replace a run in --out_dir"),
    },
}
TAKES_CONFIG = ("prepare", "train", "bench")  # the commands that take --config and every config key
TAKES_FILE = ("export", "import")  # the commands that take one positional argument, a checkpoint file
COMMANDS = tuple(SUMMARY)


def command_help(command: str, argv: list[str]) -> str:
    """`gptjax COMMAND --help`: its options and, for the commands that take a config, every config key, each with
    type, default, range and description, generated from OPTIONS and the config dataclasses. A --config among argv
    shows that preset's (or file's) values."""
    from gptjax import config as cfg

    lines = [f"usage: gptjax {command} [--key=value ...]" + (" FILE.pt|DIR" if command in TAKES_FILE else ""), "",
             SUMMARY[command], "", "options:", *help_lines(OPTIONS[command])]
    if command in TAKES_CONFIG:
        preset = parse(argv)[0].get("config", DEFAULT_CONFIG)
        try:
            config = cfg.load_config(preset)
        except UserError:
            preset, config = DEFAULT_CONFIG, cfg.load_config(DEFAULT_CONFIG)
        lines += ["", help_text(config, preset)]
    return "\n".join(lines)


def version() -> str:
    """gptjax's version and those of the packages it runs on."""
    from importlib import metadata

    from gptjax import __version__

    found = []
    for package in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "torch"):
        try:
            found.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pass
    return f"gptjax {__version__} ({', '.join(found)})"
