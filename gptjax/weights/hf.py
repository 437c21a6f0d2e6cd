"""Hugging Face's GPT-2 files (config.json, model.safetensors), read and written without torch or transformers, and
found on disk: a directory, or the hub cache under nanoGPT's names (gpt2, gpt2-medium, gpt2-large, gpt2-xl).

transformers' Conv1D keeps its weights [in, out], as gptjax's Linear does, so nothing is transposed except an untied
lm_head (an nn.Linear, [out, in]). Files on the hub may name tensors without the `transformer.` prefix and carry the
causal-mask buffers `h.N.attn.bias` / `h.N.attn.masked_bias`; both are taken.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import json
import os

import numpy as np

from gptjax.config import Config, DataConfig, ModelConfig, TrainConfig, expand_path
from gptjax.errors import UserError

PRETRAINED = {n: f"openai-community/{n}" for n in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
GPT2_VOCAB, EOT = 50257, 50256
EPS = 1e-5  # gptjax's LayerNorm epsilon (torch's default), GPT-2's layer_norm_epsilon
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}  # transformers' -> ours
WRITTEN_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu"}  # ours -> what GPT2LMHeadModel computes the same
WEIGHTS, CONFIG, VOCAB = "model.safetensors", "config.json", "gptjax-tokenizer.json"


# ---- finding the files -------------------------------------------------------------------------------------------

def hub_cache() -> str:
    """huggingface_hub's cache: $HF_HUB_CACHE (or its old name $HUGGINGFACE_HUB_CACHE), else $HF_HOME/hub, else
    ~/.cache/huggingface/hub ($XDG_CACHE_HOME honoured)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.path.expanduser(os.environ[var])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def _snapshot(repo_dir: str) -> str | None:
    """The snapshot refs/main points at, else the newest one, that holds both files; None if there is none."""
    try:
        with open(os.path.join(repo_dir, "refs", "main"), encoding="utf-8") as f:
            main = [os.path.join(repo_dir, "snapshots", f.read().strip())]
    except OSError:
        main = []
    others = sorted(glob.glob(os.path.join(glob.escape(repo_dir), "snapshots", "*")), key=os.path.getmtime,
                    reverse=True)
    return next((d for d in main + others if all(os.path.isfile(os.path.join(d, n)) for n in (CONFIG, WEIGHTS))),
                None)


def locate(source: str, option: str = "init_from") -> str:
    """The directory holding config.json and model.safetensors for `source`: a directory, or a model name
    (nanoGPT's gpt2* names, or any hub id such as openai-community/gpt2) looked up in the hub cache; never the
    network. Not found is one line naming where it looked and how to get the files."""
    path = expand_path(source)
    if os.path.isdir(path):
        missing = [n for n in (CONFIG, WEIGHTS) if not os.path.isfile(os.path.join(path, n))]
        if missing:
            raise UserError(f"--{option}={source}: the directory has no {' or '.join(missing)} (a Hugging Face "
                            "GPT-2 as save_pretrained writes it)")
        return path
    repos = [PRETRAINED[source], source] if source in PRETRAINED else [source]
    cache = hub_cache()
    looked = [os.path.join(cache, "models--" + r.replace("/", "--")) for r in repos]
    for repo_dir in looked:
        found = _snapshot(repo_dir)
        if found:
            return found
    names = ", ".join(PRETRAINED)
    close = difflib.get_close_matches(source, ["scratch", "resume", *PRETRAINED], n=1)
    if close and close[0] != source and option == "init_from":
        raise UserError(f"--init_from={source}: did you mean --init_from={close[0]}? (no such directory or model)")
    raise UserError(f"--{option}={source}: not a directory, and no {CONFIG} + {WEIGHTS} in {' or '.join(looked)}: "
                    f"download them where there is network (huggingface-cli download {repos[0]} {CONFIG} {WEIGHTS}), "
                    f"set HF_HUB_CACHE to the cache that has them, or pass a directory ({names} are the names known)")


# ---- safetensors ---------------------------------------------------------------------------------------------------

def _dtypes() -> dict:
    import ml_dtypes  # jax's own dependency: numpy's bfloat16

    return {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a .safetensors file as a read-only array over the file's pages (float16/bfloat16 as stored)."""
    dtypes = _dtypes()
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= size - 8:
                raise ValueError(f"a header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        body = size - 8 - n
        out = {}
        data = np.memmap(path, np.uint8, "r", offset=8 + n, shape=(body,)) if body else np.zeros(0, np.uint8)
        for name, t in header.items():
            if t["dtype"] not in dtypes:
                raise UserError(f"{path}: tensor {name} is {t['dtype']}; gptjax reads {', '.join(dtypes)}")
            lo, hi = t["data_offsets"]
            dt = np.dtype(dtypes[t["dtype"]])
            if not 0 <= lo <= hi <= body or hi - lo != dt.itemsize * int(np.prod(t["shape"])):
                raise ValueError(f"tensor {name}'s offsets {lo}..{hi} do not fit its shape or the file")
            out[name] = data[lo:hi].view(dt).reshape(t["shape"])
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}): is it cut short?"
                        ) from None


def write_safetensors(tensors: dict[str, np.ndarray], f, metadata: dict | None = None) -> None:
    """tensors as a .safetensors file into the binary file f, float32, in the given order."""
    header, offset = {}, 0
    for name, a in tensors.items():
        assert a.dtype == np.float32, f"{name} is {a.dtype}"
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    header["__metadata__"] = metadata or {"format": "pt"}  # transformers loads files marked pt (as torch writes)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the tensors 8-byte aligned, as the safetensors library writes them
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for a in tensors.values():
        f.write(np.ascontiguousarray(a).data)


# ---- config.json <-> ModelConfig -----------------------------------------------------------------------------------

def model_config(cfg: dict, where: str) -> ModelConfig:
    """The GPT that a transformers GPT2Config describes; what gptjax's GPT cannot compute is one line."""
    if not isinstance(cfg, dict) or cfg.get("model_type") != "gpt2":
        got = cfg.get("model_type") if isinstance(cfg, dict) else type(cfg).__name__
        raise UserError(f"{where}: model_type is {got!r}; gptjax loads GPT-2 models (model_type gpt2) only")
    # GPT2Config's defaults, for a file that leaves a size out
    defaults = {"vocab_size": GPT2_VOCAB, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12}
    try:
        shape = {k: int(cfg.get(k, d)) for k, d in defaults.items()}
    except (TypeError, ValueError):
        raise UserError(f"{where}: {', '.join(defaults)} must be numbers; is it a transformers GPT2Config?") from None
    D = shape["n_embd"]
    act = cfg.get("activation_function", "gelu_new")
    checks = [
        (cfg.get("n_inner") not in (None, 4 * D), f"n_inner={cfg.get('n_inner')} (gptjax's MLP is 4 x n_embd={4 * D})"),
        (cfg.get("layer_norm_epsilon", EPS) != EPS, f"layer_norm_epsilon={cfg.get('layer_norm_epsilon')} "
                                                   f"(gptjax's LayerNorm uses {EPS})"),
        (act not in ACTIVATIONS, f"activation_function={act!r} (gptjax has {', '.join(ACTIVATIONS)})"),
        (cfg.get("scale_attn_weights", True) is not True, "scale_attn_weights=false (gptjax scales by 1/sqrt(head))"),
        (cfg.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx=true"),
        (cfg.get("add_cross_attention", False), "add_cross_attention=true"),
        (D % shape["n_head"] != 0, f"n_embd={D} not divisible by n_head={shape['n_head']}"),
    ]
    bad = [what for failed, what in checks if failed]
    if bad:
        raise UserError(f"{where}: {bad[0]}: gptjax's GPT cannot compute this model")
    return ModelConfig(model="gpt", vocab_size=shape["vocab_size"], block_size=shape["n_positions"],
                       n_layer=shape["n_layer"], n_head=shape["n_head"], n_embd=D,
                       dropout=float(cfg.get("resid_pdrop", 0.1)), bias=True,
                       tie_weights=bool(cfg.get("tie_word_embeddings", True)), pos_encoding="learned",
                       activation=ACTIVATIONS[act])


def hf_config(c: ModelConfig, gpt2_vocab: bool) -> dict:
    """config.json for GPT2LMHeadModel: the same model, its activation written truthfully; GPT-2's token ids only
    where the vocabulary is GPT-2's."""
    cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
           "n_positions": c.block_size, "n_ctx": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer,
           "n_head": c.n_head, "n_inner": None, "activation_function": WRITTEN_ACTIVATION[c.activation],
           "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout, "layer_norm_epsilon": EPS,
           "initializer_range": 0.02, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
           "reorder_and_upcast_attn": False, "tie_word_embeddings": c.tie_weights, "use_cache": True}
    eot = EOT if gpt2_vocab else None  # None, not left out: GPT2Config's defaults are GPT-2's 50256
    return {**cfg, "bos_token_id": eot, "eos_token_id": eot}


# ---- tensors <-> parameters ----------------------------------------------------------------------------------------

def layout(c: ModelConfig) -> list[tuple[str, str, bool]]:
    """(safetensors key, gptjax name, transposed) of every tensor GPT2LMHeadModel saves for c; a tied head has none."""
    from gptjax.weights import nanogpt

    rows = []
    for key, name, _ in nanogpt.layout(dataclasses.replace(c, bias=True)):
        if key == "lm_head.weight":
            if not c.tie_weights:
                rows.append((key, name, True))  # nn.Linear: [out, in]
            continue
        rows.append((key, name, False))
    return rows


def _is_buffer(key: str) -> bool:
    return key.endswith((".attn.bias", ".attn.masked_bias")) and ".h." in f".{key}"


def params_from_tensors(tensors: dict, c: ModelConfig, where: str):
    """gptjax float32 parameters for c (bias=True) from a GPT2LMHeadModel's tensors, either name layout; its
    block_size below the file's crops wpe. c's vocab_size larger than the file's adds tokens to wte (and an untied
    head) initialised to the mean of the others (as transformers' resize_token_embeddings does): each new token's
    logit is then about the average token's, not 0, which would outweigh GPT-2's large negative logits."""
    import jax.numpy as jnp

    from gptjax import model

    sd = {k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": v for k, v in tensors.items()
          if not _is_buffer(k)}
    rows = layout(c)
    expected = {key for key, _, _ in rows}
    if c.tie_weights and "lm_head.weight" in sd:  # saved tied: the same tensor twice
        head = sd.pop("lm_head.weight")
        if not np.array_equal(head, sd.get("transformer.wte.weight")):
            raise UserError(f"{where}: lm_head.weight differs from wte.weight but config.json says tie_word_embeddings")
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        what = "; ".join(f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                         for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys)
        raise UserError(f"{where}: the tensors do not fit its config.json ({what})")
    like = model.param_names(model.abstract_params(c))
    named = {}
    for key, name, transposed in rows:
        x = np.asarray(sd[key], np.float32)
        x = x.T if transposed else x
        want = like[name].shape
        if name == "wpe.weight" and x.shape[0] >= want[0]:
            x = x[: want[0]]
        axis = {"wte.weight": 0, "lm_head.weight": 1}.get(name)
        if axis is not None and x.shape[axis] < want[axis]:
            extra = np.repeat(x.mean(axis=axis, keepdims=True), want[axis] - x.shape[axis], axis=axis)
            x = np.concatenate([x, extra], axis=axis)
        if x.shape != want:
            raise UserError(f"{where}: {key} has shape {tuple(sd[key].shape)}; its config.json needs "
                            f"{tuple(want[::-1] if transposed else want)}")
        named[name] = jnp.asarray(np.ascontiguousarray(x))
    return model.params_from_names(model.abstract_params(c), named)


def tensors_from_params(params, c: ModelConfig) -> dict[str, np.ndarray]:
    """GPT2LMHeadModel's tensors (transformer.-prefixed, float32) for gptjax parameters; a model without biases gets
    zero biases, which compute the same."""
    from gptjax import model

    named = {k: np.asarray(v, np.float32) for k, v in model.param_names(params).items()}
    out = {}
    for key, name, transposed in layout(c):
        if name in named:
            out[key] = np.ascontiguousarray(named[name].T if transposed else named[name])
        else:  # a bias of a bias=False model
            width = named[name.replace(".bias", ".weight")].shape[-1]
            out[key] = np.zeros(width, np.float32)
    return out


# ---- a directory in, a run or a model out --------------------------------------------------------------------------

def read_dir(path: str, tensors: bool = True) -> tuple[ModelConfig, dict | None]:
    """(model config, tensors or None) of a Hugging Face GPT-2 directory, every check made."""
    where = os.path.join(path, CONFIG)
    try:
        with open(where, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{where} cannot be read as JSON ({type(e).__name__}): is it a Hugging Face config?") from None
    c = model_config(cfg, where)
    return c, read_safetensors(os.path.join(path, WEIGHTS)) if tensors else None


FROM_FILE = ("model", "n_layer", "n_head", "n_embd", "bias", "tie_weights", "pos_encoding", "activation")


def is_pretrained(init_from: str) -> bool:
    """--init_from names pretrained weights (a model name or a directory), not scratch or resume."""
    return init_from not in ("scratch", "resume")


def pretrained_config(config: Config) -> Config:
    """The config to train from the pretrained GPT-2 that config.train.init_from names: the model from its files,
    with the config's dropout, its block_size where smaller (wpe cropped, as nanoGPT does) and its vocab_size where
    larger (wte padded with zero rows); the tokenizer gpt2."""
    source = config.train.init_from
    path = locate(source)
    c, _ = read_dir(path, tensors=False)
    gpt2_only(path, c, source)
    want = config.model
    if want.block_size > c.block_size:
        raise UserError(f"--block_size={want.block_size} exceeds {source}'s {c.block_size} positions: pass "
                        f"--block_size={c.block_size} or less")
    if config.data.tokenizer not in ("", "gpt2"):
        raise UserError(f"--tokenizer={config.data.tokenizer}: {source} reads GPT-2's tokens; drop --tokenizer")
    c = dataclasses.replace(c, dropout=want.dropout, block_size=want.block_size,
                            vocab_size=max(c.vocab_size, want.vocab_size))
    return dataclasses.replace(config, model=c, data=dataclasses.replace(config.data, tokenizer="gpt2"))


def load_params(source: str, c: ModelConfig):
    """The pretrained parameters for c, a pretrained_config's model."""
    path = locate(source)
    return params_from_tensors(read_dir(path)[1], c, path)


def load_model(source: str, option: str = "init_from", **compute):
    """(config, graphdef, params, tokenizer) of a pretrained GPT-2 as it was trained, for sample and eval; compute
    as rundir.load_run takes it (default: float32, einsum attention, the exact forward pass)."""
    from gptjax import model
    from gptjax.compute import compute_of

    path = locate(source, option)
    c, tensors = read_dir(path)
    config = Config(model=c, data=DataConfig(dataset="shakespeare", tokenizer="gpt2"),
                    train=TrainConfig(init_from=source))
    settings = {"dtype": "float32", "attention": "einsum", "scan_layers": False, "remat": "none", "matmul": "auto",
                **compute}
    graphdef = model.graphdef_for(c, compute_of(config, False, **settings))
    return config, graphdef, params_from_tensors(tensors, c, path), tokenizer(path, c)


def gpt2_only(path: str, c: ModelConfig, source: str) -> None:
    """train and eval --init_from read the corpus in GPT-2's tokens: refuse files that carry another vocabulary."""
    if os.path.isfile(os.path.join(path, VOCAB)) or c.vocab_size < GPT2_VOCAB:
        raise UserError(f"--init_from={source} holds a vocabulary other than GPT-2's: import it (gptjax import "
                        f"--from=hf {source} --out_dir=RUN) and continue that run with --init_from=resume")


def tokenizer(path: str, c: ModelConfig):
    """gptjax's own tokenizer file beside the weights where export wrote one, else GPT-2's."""
    from gptjax import tokenizers

    own = os.path.join(path, VOCAB)
    if os.path.isfile(own):
        tok = tokenizers.load(own)
    elif c.vocab_size >= GPT2_VOCAB:
        tok = tokenizers.gpt2()
    else:
        raise UserError(f"{path} has a {c.vocab_size}-token vocabulary and no {VOCAB}: gptjax knows only GPT-2's "
                        "vocabulary for Hugging Face files")
    if tok.vocab_size > c.vocab_size:
        raise UserError(f"the tokenizer has {tok.vocab_size} tokens but the model only {c.vocab_size}")
    return tok


def read(path: str, out_dir: str, vocab: str | None = None):
    """(config, TrainState at step 0, tokenizer) of a run in out_dir from a Hugging Face GPT-2 directory: its
    tokenizer gptjax's own file beside the weights where export wrote one, else GPT-2's."""
    from gptjax import optim

    if vocab is not None:
        raise UserError("--meta applies to nanoGPT checkpoints; a Hugging Face directory carries its vocabulary")
    path = locate(path, "from")
    if os.path.isdir(out_dir) and os.path.samefile(path, out_dir):
        raise UserError(f"--out_dir={out_dir} is the directory being imported: pick another --out_dir")
    c, tensors = read_dir(path)
    params = params_from_tensors(tensors, c, path)
    tok = tokenizer(path, c)
    config = Config(model=c, data=DataConfig(dataset="imported", tokenizer=tok.name),
                    train=TrainConfig(out_dir=out_dir))
    tx = optim.make_optimizer(config.train, params)
    return config, optim.init_state(params, tx), tok


def export_files(config: Config, state, out_dir: str, path: str, force: bool):
    """What `gptjax export --to=hf DIR` writes in DIR: config.json, model.safetensors and, for a vocabulary other than
    GPT-2's, gptjax's tokenizer file; ([(path, write(f))], summary), every check made."""
    from gptjax import tokenizers

    c = config.model
    if c.model != "gpt":
        raise UserError(f"{out_dir} holds a {c.model} model; a Hugging Face GPT-2 holds a GPT only")
    if c.pos_encoding != "learned":
        raise UserError(f"{out_dir} has pos_encoding={c.pos_encoding}; GPT-2 learns its position embeddings (wpe)")
    if any(os.path.lexists(os.path.join(path, f)) for f in ("metrics.jsonl", "checkpoints")):
        raise UserError(f"{path} holds a gptjax run, whose config.json the export would replace: export elsewhere")
    tok = tokenizers.load(os.path.join(out_dir, "tokenizer.json"))
    gpt2 = tok.name == "gpt2"
    stale = os.path.join(path, VOCAB)
    if gpt2 and os.path.lexists(stale):  # a --force export over one of another vocabulary: theirs would be read
        os.remove(stale)
    tensors = tensors_from_params(state.params, c)
    text = json.dumps(hf_config(c, gpt2), indent=2) + "\n"
    files = [(os.path.join(path, CONFIG), lambda f: f.write(text.encode())),
             (os.path.join(path, WEIGHTS), lambda f: write_safetensors(tensors, f))]
    if not gpt2:
        with open(os.path.join(out_dir, "tokenizer.json"), "rb") as fh:
            own = fh.read()
        files.append((os.path.join(path, VOCAB), lambda f: f.write(own)))
    return files, {"vocab": files[-1][0] if not gpt2 else None, "step": int(state.step), "tensors": len(tensors)}
