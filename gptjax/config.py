"""Frozen run configuration (model / data / train), presets, and type-checked --key=value overrides."""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import runpy
import traceback
import typing
from dataclasses import dataclass, field

from gptjax import registry
from gptjax.errors import UserError


@dataclass(frozen=True)
class ModelConfig:
    model: str = "gpt"  # gpt | bigram | a name given to gptjax.model.register | package.module:factory
    vocab_size: int = 0  # 0: taken from the prepared data
    block_size: int = 256  # context length
    n_layer: int = 6  # transformer blocks
    n_head: int = 6  # attention heads per block
    n_embd: int = 384  # model width
    dropout: float = 0.0  # on attention weights, residual branches and embeddings
    bias: bool = False  # biases in Linear and LayerNorm layers (nanoGPT's train.py default)
    tie_weights: bool = True  # LM head shares the token embedding matrix
    pos_encoding: str = "learned"  # learned (nanoGPT's wpe) | rope (rotary, on each head's queries and keys)
    activation: str = "gelu"  # the MLP's: gelu (exact erf form, nanoGPT's nn.GELU()) | gelu_tanh (GPT-2's, gelu_new)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "shakespeare_char"  # corpus name: shakespeare_char | shakespeare | a label for --input
    input: str = ""  # a text file, or documents: a directory, glob, .jsonl, .parquet, hf:NAME (datasets' cache)
    tokenizer: str = ""  # char | gpt2 | bpe:N; empty: the dataset's own
    data_dir: str = ""  # download + prepared-token cache; empty: $GPTJAX_DATA_DIR or ~/.cache/gptjax
    val_fraction: float = 0.1  # held out for validation: the text's last fraction, or that fraction of documents
    text_field: str = "text"  # the field of each JSON Lines record (column of a Parquet file) holding its text
    split_seed: int = 2357  # which documents go to val (nanoGPT's seed for OpenWebText's split)
    bpe_sample_bytes: int = 1 << 26  # bpe:N learns its merges from about this much of the train split (64 MiB)


@dataclass(frozen=True)
class TrainConfig:
    out_dir: str = "out"  # config.json, metrics.jsonl, checkpoints/, loss.png
    init_from: str = "scratch"  # scratch | resume | gpt2|gpt2-medium|gpt2-large|gpt2-xl | a Hugging Face GPT-2 dir
    seed: int = 1337  # parameters, batches and dropout all derive from it
    batch_size: int = 64  # sequences per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    max_iters: int = 5000  # optimizer steps
    eval_interval: int = 250  # steps between loss estimates and checkpoints
    eval_iters: int = 200  # batches per loss estimate
    log_interval: int = 10  # steps between progress-bar updates (each one syncs with the device)
    learning_rate: float = 1e-3  # peak learning rate
    decay_lr: bool = True  # linear warmup then cosine decay; False: constant learning_rate
    warmup_iters: int = 100  # warmup steps
    lr_decay_iters: int = 5000  # step at which the cosine reaches min_lr
    min_lr: float = 1e-4  # floor of the cosine
    weight_decay: float = 1e-1  # AdamW decoupled decay, only on >=2-D parameters
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.99  # AdamW second-moment decay
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    keep_checkpoints: int = 2  # step checkpoints kept (the newest), besides the best
    # How the step runs, not what it computes: a resumed run may change these.
    dtype: str = "auto"  # float32 | bfloat16 matmuls (parameters and AdamW stay float32); auto: bfloat16 on a GPU/TPU
    # and on a CPU with AMX under the mkl kernel
    matmul: str = "auto"  # xla | mkl (oneMKL kernel on a CPU, gptjax[mkl]); auto: mkl on an Intel CPU where it loads
    attention: str = "auto"  # einsum | xla | cudnn (flash); auto: cudnn on a GPU in bfloat16 without dropout
    scan_layers: bool = False  # True: the blocks run by one lax.scan (compile time flat in depth, steps slower)
    remat: str = "none"  # none | block: recompute each block's activations in the backward pass
    mesh: str = ""  # dp:N,fsdp:M (one size may be -1); empty: every device on dp (as many as divide the batch)
    step_impl: str = "sharded"  # sharded (jit + shardings, FSDP over fsdp) | shard_map | pmap (explicit pmean)
    # How the run is watched (metrics.jsonl always): a resumed run may change these.
    tensorboard: bool = False  # True: TensorBoard event files in OUT_DIR/tensorboard/, a point per metrics row
    wandb_log: bool = False  # True: metrics rows to Weights & Biases (pip install 'gptjax[wandb]'); honours WANDB_MODE
    wandb_project: str = "gptjax"  # the W&B project
    wandb_run_name: str = ""  # the W&B run's name; empty: out_dir's name


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        """to_dict's inverse; anything else (not an object, an unknown key, a value of the wrong type) is a
        ValueError naming it."""
        if not isinstance(d, dict):
            raise ValueError(f"it holds a JSON {type(d).__name__}, not an object")
        unknown = sorted(set(d) - set(SECTIONS))
        if unknown:
            raise ValueError(f"unknown section {unknown[0]!r}")
        types, sections = field_types(), {}
        for name, sub in SECTIONS.items():
            raw = d.get(name, {})
            if not isinstance(raw, dict):
                raise ValueError(f"its {name!r} section is a JSON {type(raw).__name__}, not an object")
            for key, value in raw.items():
                if types.get(key, ("",))[0] != name:
                    raise ValueError(f"unknown {name} setting {key!r}")
                typ = types[key][1]
                if not (type(value) is typ or (typ is float and type(value) is int)):
                    raise ValueError(f"{name}.{key} is {value!r}, not {'an' if typ is int else 'a'} {typ.__name__}")
            sections[name] = sub(**{k: float(v) if types[k][1] is float else v for k, v in raw.items()})
        return cls(**sections)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


def _shakespeare_char(**over) -> Config:
    """nanoGPT's config/train_shakespeare_char.py."""
    return override(
        Config(
            model=ModelConfig(block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2),
            data=DataConfig(dataset="shakespeare_char"),
            train=TrainConfig(
                out_dir="out-shakespeare-char", eval_interval=250, eval_iters=200, log_interval=10,
                batch_size=64, max_iters=5000, learning_rate=1e-3,
                lr_decay_iters=5000, min_lr=1e-4, beta2=0.99, warmup_iters=100,
            ),
        ),
        over,
    )


def _plain_adamw(lr: float) -> dict:
    """torch.optim.AdamW's defaults at a constant rate, as the lecture's scripts use it."""
    return dict(learning_rate=lr, decay_lr=False, warmup_iters=0, weight_decay=1e-2, beta2=0.999, grad_clip=0.0)


PRESETS = {
    # The seeds' bigram: an embedding table trained with AdamW(lr=1e-3), batch 32, block 8, 10000 steps.
    "bigram": lambda: override(
        Config(),
        dict(model="bigram", block_size=8, dataset="shakespeare_char", out_dir="out-bigram", batch_size=32,
             max_iters=10000, eval_interval=500, eval_iters=200, **_plain_adamw(1e-3)),
    ),
    # The lecture's final gpt.py: 6 layers x 6 heads x 384, block 256, batch 64, lr 3e-4, dropout 0.2.
    "lecture": lambda: override(
        Config(),
        dict(block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2, bias=True, tie_weights=False,
             dataset="shakespeare_char", out_dir="out-lecture", batch_size=64, max_iters=5000,
             eval_interval=500, eval_iters=200, **_plain_adamw(3e-4)),
    ),
    "shakespeare_char": _shakespeare_char,
    # nanoGPT README's CPU run of the same config.
    "shakespeare_char_cpu": lambda: _shakespeare_char(
        block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0, batch_size=12, max_iters=2000,
        lr_decay_iters=2000, eval_iters=20, log_interval=1, out_dir="out-shakespeare-char-cpu",
    ),
    # GPT-2 small's shape (124M) with nanoGPT's train_gpt2.py optimizer settings, on tiny Shakespeare BPE; the
    # vocabulary padded from 50257 to 50304 as nanoGPT pads it (a multiple of 64), for speed.
    "gpt2": lambda: override(
        Config(),
        dict(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768, dropout=0.0, dataset="shakespeare",
             out_dir="out-gpt2", batch_size=12, gradient_accumulation_steps=40, max_iters=600000,
             lr_decay_iters=600000, learning_rate=6e-4, min_lr=6e-5, warmup_iters=2000, beta2=0.95,
             eval_interval=1000, eval_iters=200),
    ),
    # For tests: seconds on a CPU.
    "tiny": lambda: override(
        Config(),
        dict(block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0, dataset="shakespeare_char",
             out_dir="out-tiny", batch_size=8, max_iters=20, eval_interval=10, eval_iters=2, log_interval=5,
             warmup_iters=5, lr_decay_iters=20, learning_rate=1e-2, min_lr=1e-3),
    ),
}


def field_types() -> dict[str, tuple[str, type]]:
    """Every overridable key -> (section, type)."""
    hints = {section: typing.get_type_hints(cls) for section, cls in SECTIONS.items()}
    return {f.name: (s, hints[s][f.name]) for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


def _parse(key: str, raw, typ: type):
    if typ is str:
        if not isinstance(raw, str):
            raise UserError(f"--{key} expects a string, got {raw!r}")
        return raw
    if isinstance(raw, str):
        try:
            value = float(raw) if typ is float else json.loads(raw.lower() if typ is bool else raw)
        except ValueError:  # json.JSONDecodeError is a ValueError
            raise UserError(f"--{key}={raw} is not a valid {typ.__name__}") from None
    else:
        value = raw
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not typ:
        raise UserError(f"--{key} expects a {typ.__name__}, got {raw!r}")
    return value


PATH_KEYS = ("out_dir", "input", "data_dir")  # a leading ~ is the user's home, as a shell would expand it


def home() -> str:
    """$HOME, or the password database's home directory when it is unset or empty (rather than the root, /)."""
    path = os.environ.get("HOME", "")
    if path.strip():
        return path
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        return os.getcwd()


def cache_home() -> str:
    """~/.cache/gptjax: downloads, prepared token files and compiled programs, unless told otherwise."""
    return os.path.join(home(), ".cache", "gptjax")


def expand_path(path: str) -> str:
    """~ and ~user expanded as a shell would (it does not after --key=)."""
    if path == "~" or path.startswith("~/"):
        return home() + path[1:]
    return os.path.expanduser(path)


def override(config: Config, overrides: dict) -> Config:
    """Apply {key: value} with nanoGPT's flat field names; values may be strings from the command line."""
    types = field_types()
    changes: dict[str, dict] = {s: {} for s in SECTIONS}
    for key, raw in overrides.items():
        if key not in types:
            close = difflib.get_close_matches(key, list(types), n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join('--' + c for c in close)}?" if close else ""
            raise UserError(f"unknown config key --{key}{hint}")
        section, typ = types[key]
        changes[section][key] = _parse(key, raw, typ)
        if key in PATH_KEYS:
            changes[section][key] = expand_path(changes[section][key])
    return Config(**{s: dataclasses.replace(getattr(config, s), **changes[s]) for s in SECTIONS})


# What a resumed run cannot change: the model's shape and the tokenization its weights were trained on.
FIXED_ON_RESUME = ("model", "vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias", "tie_weights",
                   "activation", "dataset", "tokenizer")


def resumed(saved: Config, overrides: dict, where: str = "the run") -> tuple[Config, list[str]]:
    """A saved run's config with only the settings the user passed changed; (config, "key: old -> new" lines).

    An override that contradicts the saved model or tokenization is refused, naming the field and both values.
    """
    config = override(saved, overrides)
    types, changes = field_types(), []
    for key in overrides:
        section = types[key][0]
        old, new = getattr(getattr(saved, section), key), getattr(getattr(config, section), key)
        if old == new:
            continue
        if key in FIXED_ON_RESUME:
            raise UserError(f"--{key}={new} contradicts {where}'s {key}={old}: a resumed run keeps its model and "
                            "tokenizer; drop --" + key + " or train a new run in another --out_dir")
        changes.append(f"{key}: {old} -> {new}")
    validate(config)
    return config, changes


def load_config(name_or_path: str, overrides: dict | None = None) -> Config:
    """A preset name or a Python file, then overrides."""
    if name_or_path in PRESETS:
        config = PRESETS[name_or_path]()
    elif name_or_path.endswith(".py"):
        name_or_path = expand_path(name_or_path)
        if not os.path.isfile(name_or_path):
            raise UserError(f"config file {name_or_path} not found")
        config = _from_file(name_or_path)
    else:
        close = difflib.get_close_matches(name_or_path, list(PRESETS), n=2)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise UserError(f"unknown config {name_or_path!r}{hint}: use one of {', '.join(PRESETS)} or a .py file")
    config = override(config, overrides or {})
    validate(config)
    return config


def _from_file(path: str) -> Config:
    """A file defining `config = Config(...)`, or nanoGPT-style globals (`n_layer = 4`) on top of `base`."""
    try:
        ns = runpy.run_path(path)
    except SyntaxError as e:
        raise UserError(f"config file {path} has a syntax error at line {e.lineno}: {e.msg}; fix it") from None
    except Exception as e:  # the user's own code: whatever it raises is theirs to fix, not a gptjax bug
        line = traceback.extract_tb(e.__traceback__)[-1].lineno if e.__traceback__ else "?"
        raise UserError(f"config file {path} raised {type(e).__name__} at line {line}: {e}; fix it") from None
    except SystemExit as e:
        raise UserError(f"config file {path} called exit({e.code}): a config file only sets values") from None
    if isinstance(ns.get("config"), Config):
        return ns["config"]
    base = ns.get("base", "shakespeare_char")
    if not isinstance(base, str) or base not in PRESETS:
        raise UserError(f"config file {path} sets base = {base!r}: use one of {', '.join(PRESETS)}")
    types = field_types()
    flat = {k: v for k, v in ns.items() if not k.startswith("_") and k in types}
    unknown = [k for k, v in ns.items() if not k.startswith("_") and k not in types and k != "base"
               and isinstance(v, (int, float, str, bool))]
    if unknown:
        override(Config(), {unknown[0]: None})  # raises with the closest valid keys
    return override(PRESETS[base](), flat)


INT_MAX = 2**31 - 1  # steps and sizes live in int32 on the device
# Every numeric setting's range, for every command: (low, high, low_open, high_open); None is unbounded.
# Config keys first, then the options of sample, eval and bench. NaN is outside every range.
RANGES = {
    "vocab_size": (0, INT_MAX, False, False), "block_size": (1, INT_MAX, False, False),
    "val_fraction": (0.0, 1.0, True, True), "bpe_sample_bytes": (1, None, False, False),
    "split_seed": (0, 2**63 - 1, False, False), "n_layer": (1, INT_MAX, False, False),
    "n_head": (1, INT_MAX, False, False), "n_embd": (1, INT_MAX, False, False), "dropout": (0.0, 1.0, False, True),
    "seed": (0, 2**32 - 1, False, False), "batch_size": (1, INT_MAX, False, False),
    "gradient_accumulation_steps": (1, INT_MAX, False, False), "max_iters": (0, INT_MAX, False, False),
    "eval_interval": (1, INT_MAX, False, False), "eval_iters": (1, INT_MAX, False, False),
    "log_interval": (1, INT_MAX, False, False), "learning_rate": (0.0, None, True, False),
    "warmup_iters": (0, INT_MAX, False, False), "lr_decay_iters": (0, INT_MAX, False, False),
    "min_lr": (0.0, None, False, False), "weight_decay": (0.0, None, False, False), "beta1": (0.0, 1.0, False, True),
    "beta2": (0.0, 1.0, False, True), "grad_clip": (0.0, None, False, False),
    "keep_checkpoints": (1, INT_MAX, False, False),
    # sample
    "num_samples": (1, INT_MAX, False, False),
    "max_new_tokens": (0, 10**6, False, False),  # one compiled loop that prints nothing until it ends: bounded
    "temperature": (0.0, None, True, False), "top_k": (0, INT_MAX, False, False),  # top_k 0: no filtering
    "top_p": (0.0, 1.0, True, False),  # top_p 1: no filtering
    # eval (0: the run's own batch size)
    "eval_batch_size": (0, INT_MAX, False, False),
    # bench
    "steps": (1, INT_MAX, False, False), "eager_steps": (1, INT_MAX, False, False),
    "warmup": (0, INT_MAX, False, False), "repeats": (1, INT_MAX, False, False), "rounds": (1, INT_MAX, False, False),
    "bench_max_new_tokens": (1, INT_MAX, False, False),
    # train --distributed
    "num_processes": (1, INT_MAX, False, False), "process_id": (0, INT_MAX, False, False),
    "distributed_timeout": (1, 86400, False, False),
    # research scripts
    "seeds": (1, INT_MAX, False, False),
}


# The settings that take one of a few words (sample and eval take dtype and attention too).
CHOICES = {"dtype": ("auto", "float32", "bfloat16"), "attention": ("auto", "einsum", "xla", "cudnn"),
           "matmul": ("auto", "xla", "mkl"),
           "remat": ("none", "block"), "step_impl": ("sharded", "shard_map", "pmap"),
           "pos_encoding": ("learned", "rope"), "activation": ("gelu", "gelu_tanh")}


def check_choice(key: str, value: str) -> None:
    if value not in CHOICES[key]:
        raise UserError(f"--{key}={value}: use one of {', '.join(CHOICES[key])}")


def check_range(key: str, value, name: str | None = None) -> None:
    """A UserError unless value lies in RANGES[key]; `name` is the option as the user wrote it (default key)."""
    lo, hi, lo_open, hi_open = RANGES[key]
    ok = value == value and value not in (float("inf"), float("-inf"))  # NaN and infinities fail every range
    ok = ok and (lo is None or (value > lo if lo_open else value >= lo))
    ok = ok and (hi is None or (value < hi if hi_open else value <= hi))
    if not ok:
        bounds = [f"> {lo}" if lo_open else f">= {lo}"] if lo is not None else []
        bounds += [f"< {hi}" if hi_open else f"<= {hi}"] if hi is not None else []
        raise UserError(f"--{name or key}={value} is out of range: it must be {' and '.join(bounds)}")


def validate(config: Config) -> None:
    """Every numeric setting's range, then the checks across settings that would otherwise fail inside JAX."""
    m, t, d = config.model, config.train, config.data
    for section in (m, t, d):
        for f in dataclasses.fields(section):
            if f.name in RANGES:
                check_range(f.name, getattr(section, f.name))
    if m.model not in registry.BUILTIN_MODELS:  # a registered research model, or package.module:factory
        registry.research_factory(m.model)
    if m.model == "gpt" and m.n_embd % m.n_head:
        raise UserError(f"n_embd={m.n_embd} is not divisible by n_head={m.n_head}")
    if m.model == "gpt" and m.pos_encoding == "rope" and m.n_embd // m.n_head % 2:
        raise UserError(f"--pos_encoding=rope turns pairs of features: the head size n_embd/n_head="
                        f"{m.n_embd // m.n_head} must be even")
    if not t.init_from:
        raise UserError("--init_from is empty: use scratch, resume, a GPT-2 name (gpt2, gpt2-medium, gpt2-large, "
                        "gpt2-xl) or a directory of Hugging Face GPT-2 files")
    if t.decay_lr and t.lr_decay_iters <= t.warmup_iters:
        raise UserError(f"--lr_decay_iters={t.lr_decay_iters} must exceed --warmup_iters={t.warmup_iters}")
    for key in CHOICES:
        check_choice(key, getattr(t if hasattr(t, key) else m, key))
    if d.tokenizer and not (d.tokenizer in ("char", "gpt2") or d.tokenizer.startswith("bpe:")):
        raise UserError(f"--tokenizer={d.tokenizer}: use char, gpt2 or bpe:N")

