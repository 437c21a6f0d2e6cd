"""nanoGPT's formats: its state-dict names and layouts, its AdamW state, its ckpt.pt and meta.pkl, without torch."""

from __future__ import annotations

import dataclasses
import io
import math
import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gptjax import model, optim, tokenizers
from gptjax.config import INT_MAX, Config, DataConfig, ModelConfig, TrainConfig, field_types, validate
from gptjax.errors import UserError

MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")  # nanoGPT's GPTConfig
GPT2_VOCAB = 50257


def layout(c: ModelConfig) -> list[tuple[str, str, bool]]:
    """(PyTorch key, gptjax name, transposed) for every tensor of the twin's state dict, in its order.

    Linear weights are [in, out] in gptjax and [out, in] in PyTorch; a tied lm_head.weight is wte.weight.
    """
    if c.model == "bigram":
        return [("token_embedding_table.weight", "token_embedding_table.weight", False)]
    rows = [("transformer.wte.weight", "wte.weight", False)]
    if c.pos_encoding == "learned":  # rope turns queries and keys instead, with no parameters
        rows.append(("transformer.wpe.weight", "wpe.weight", False))

    def add(prefix: str, transposed: bool):
        rows.append((f"transformer.{prefix}.weight", f"{prefix}.weight", transposed))
        if c.bias:
            rows.append((f"transformer.{prefix}.bias", f"{prefix}.bias", False))

    for i in range(c.n_layer):
        for sub, is_linear in (("ln_1", False), ("attn.c_attn", True), ("attn.c_proj", True), ("ln_2", False),
                               ("mlp.c_fc", True), ("mlp.c_proj", True)):
            add(f"h.{i}.{sub}", is_linear)
    add("ln_f", False)
    head = ("wte.weight", False) if c.tie_weights else ("lm_head.weight", True)
    rows.append(("lm_head.weight", *head))
    return rows


def to_state_dict(params, c: ModelConfig) -> dict[str, np.ndarray]:
    """nanoGPT-named float32 arrays (a tied lm_head.weight is the same array as transformer.wte.weight).

    Works for any pytree shaped like the parameters, e.g. their gradients.
    """
    named = {k: np.asarray(v) for k, v in model.param_names(params).items()}
    rows = layout(c)
    assert {name for _, name, _ in rows} == set(named), "params do not match the config's layout"
    by_name: dict[str, np.ndarray] = {}
    sd = {}
    for key, name, transposed in rows:
        if not transposed and name in by_name:  # tied head: share the array, as nanoGPT's state_dict shares it
            sd[key] = by_name[name]
            continue
        x = named[name].T if transposed else named[name]
        sd[key] = np.array(x, dtype=np.float32, order="C")  # a writable copy
        if not transposed:
            by_name[name] = sd[key]
    return sd


def clean(sd: dict) -> dict:
    """Without torch.compile's _orig_mod. prefix and older nanoGPT's causal-mask buffers (h.N.attn.bias, 4-D)."""
    sd = {k.removeprefix("_orig_mod."): v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if not (k.endswith(".attn.bias") and getattr(v, "ndim", 0) == 4)}


def from_state_dict(sd: dict, c: ModelConfig):
    """gptjax parameters from a nanoGPT-named state dict of arrays; missing, unexpected or misshapen ones are
    errors."""
    sd = clean(sd)
    rows = layout(c)
    expected = {key for key, _, _ in rows}
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        what = "; ".join(f"{label} {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                         for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys)
        raise UserError(f"the state dict does not fit this model ({what}); check bias, n_layer and tie_weights")
    abstract = model.abstract_params(c)
    like = model.param_names(abstract)
    named = {}
    for key, name, transposed in rows:
        if not isinstance(sd[key], np.ndarray):
            raise UserError(f"{key} is a {type(sd[key]).__name__}, not a tensor")
        x = sd[key].astype(np.float32)
        x = x.T if transposed else x
        if x.shape != like[name].shape:
            raise UserError(f"{key} has shape {tuple(sd[key].shape)}; this model needs "
                            f"{tuple(like[name].shape[::-1] if transposed else like[name].shape)}")
        if name in named:  # the tied head must really be the embedding
            if not np.array_equal(named[name], x):
                raise UserError("lm_head.weight differs from transformer.wte.weight: the weights are not tied")
            continue
        named[name] = np.ascontiguousarray(x)
    return model.params_from_names(abstract, {k: jnp.asarray(v) for k, v in named.items()})


def optimizer_order(c: ModelConfig) -> tuple[list[str], int]:
    """nanoGPT's optimizer indices: the >= 2-D parameters, then the rest, each in named_parameters() order.

    Returns the PyTorch keys in index order and the size of the first (weight-decayed) group.
    """
    like = model.param_names(model.abstract_params(c))
    keys, seen = [], set()
    for key, name, _ in layout(c):
        if name not in seen:  # a tied head is wte's parameter, listed once
            seen.add(name)
            keys.append((key, len(like[name].shape)))
    decay = [k for k, ndim in keys if ndim >= 2]
    return decay + [k for k, ndim in keys if ndim < 2], len(decay)


def get_lr(it: int, t: TrainConfig) -> float:
    """nanoGPT's get_lr in Python floats (optim.lr_schedule's is float32): what its AdamW holds after step it, and
    the twin's schedule. Linear warmup from lr/(warmup+1), cosine to min_lr at lr_decay_iters, then min_lr."""
    if not t.decay_lr:
        return t.learning_rate
    if it < t.warmup_iters:
        return t.learning_rate * (it + 1) / (t.warmup_iters + 1)
    if it > t.lr_decay_iters:
        return t.min_lr
    ratio = (it - t.warmup_iters) / (t.lr_decay_iters - t.warmup_iters)
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (t.learning_rate - t.min_lr)


def _adam(opt_state) -> optax.ScaleByAdamState:
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    return next(x for x in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(x))


def to_optimizer_state(opt_state, config: Config) -> dict:
    """gptjax's AdamW state as the state_dict of nanoGPT's torch.optim.AdamW (its two parameter groups), in arrays;
    torch's own group fields (amsgrad, foreach, ...) are torchfile.adamw_groups'."""
    c, t = config.model, config.train
    order, n_decay = optimizer_order(c)
    adam = _adam(opt_state)
    count = int(adam.count)
    mu, nu = to_state_dict(adam.mu, c), to_state_dict(adam.nu, c)
    group = {"lr": get_lr(max(count - 1, 0), t), "betas": (t.beta1, t.beta2), "eps": 1e-8}
    groups = [dict(group, weight_decay=t.weight_decay, params=list(range(n_decay))),
              dict(group, weight_decay=0.0, params=list(range(n_decay, len(order))))]
    state = {i: {"step": np.array(float(count), np.float32), "exp_avg": mu[k], "exp_avg_sq": nu[k]}
             for i, k in enumerate(order)} if count else {}
    return {"state": state, "param_groups": groups}


def from_optimizer_state(osd, params, tx, c: ModelConfig):
    """gptjax's optimizer state (for tx, e.g. optim.make_optimizer) from nanoGPT's AdamW state_dict, in arrays."""
    order, n_decay = optimizer_order(c)
    groups = osd.get("param_groups") if isinstance(osd, dict) else None
    sizes = [len(g.get("params", [])) for g in groups] if isinstance(groups, list) else None
    if sizes != [n_decay, len(order) - n_decay] or not isinstance(osd.get("state"), dict):
        raise UserError(f"the optimizer state has parameter groups of sizes {sizes}; nanoGPT's AdamW for this model "
                        f"has [{n_decay}, {len(order) - n_decay}] (decayed >= 2-D parameters, then the rest)")
    state = osd["state"]
    ids = [i for g in groups for i in g["params"]]
    if not state:
        return tx.init(params)
    try:
        per_key = {k: state[i] for k, i in zip(order, ids)}
        steps = {float(st["step"]) for st in per_key.values()}
        moments = [{k: st[m] for k, st in per_key.items()} for m in ("exp_avg", "exp_avg_sq")]
    except (KeyError, TypeError):
        raise UserError("the optimizer state is not AdamW's (step, exp_avg, exp_avg_sq for every parameter)") from None
    if len(steps) != 1:
        raise UserError(f"the optimizer state's parameters have taken different numbers of steps: {sorted(steps)}")
    if c.tie_weights:
        for m in moments:
            m["lm_head.weight"] = m["transformer.wte.weight"]
    mu, nu = (from_state_dict(m, c) for m in moments)
    opt_state = optax.tree_utils.tree_set(tx.init(params), mu=mu, nu=nu, count=jnp.asarray(int(steps.pop()), jnp.int32))
    return jax.tree.map(jnp.copy, opt_state)  # Adam's and the schedule's counts must not share a (donated) buffer


def to_checkpoint(config: Config, state) -> dict:
    """nanoGPT's ckpt.pt contents for a gptjax TrainState, in arrays: model, optimizer, model_args, iter_num,
    best_val_loss, config; nanoGPT's train.py resumes from it (--init_from=resume) and its sample.py samples from it."""
    return {
        "model": to_state_dict(state.params, config.model),
        "optimizer": to_optimizer_state(state.opt_state, config),
        "model_args": {k: getattr(config.model, k) for k in MODEL_ARGS},
        "iter_num": int(state.step),
        "best_val_loss": float(state.best_val_loss),
        "config": {k: v for section in config.to_dict().values() for k, v in section.items()},  # its flat names
    }


def torch_checkpoint(config: Config, state) -> dict:
    """to_checkpoint's contents as torch.save writes them: tensors, and AdamW's groups with torch's own fields."""
    from gptjax.weights import torchfile  # torch only where a file for it is made

    ckpt = to_checkpoint(config, state)
    ckpt["optimizer"]["param_groups"] = torchfile.adamw_groups(ckpt["optimizer"]["param_groups"])
    return torchfile.to_torch(ckpt)


def from_checkpoint(ckpt: dict, config: Config):
    """A gptjax TrainState from nanoGPT's ckpt.pt contents in arrays: the optimizer state and step where the file
    has them, a fresh optimizer at step 0 where it holds weights only."""
    params = from_state_dict(ckpt["model"], config.model)
    tx = optim.make_optimizer(config.train, params)
    state = optim.init_state(params, tx)
    if "optimizer" not in ckpt:
        return state
    best = ckpt.get("best_val_loss", float("inf"))
    return state._replace(step=jnp.asarray(int(ckpt.get("iter_num", 0)), jnp.int32),
                          opt_state=from_optimizer_state(ckpt["optimizer"], params, tx, config.model),
                          best_val_loss=jnp.asarray(float(best), jnp.float32))


def export_files(config: Config, state, out_dir: str, path: str, force: bool):
    """What `gptjax export --to=nanogpt` writes: ckpt.pt at path and, for a char tokenizer, meta.pkl beside it
    (nanoGPT's stoi / itos, which its sample.py decodes with); ([(path, write(f))], summary), every check made."""
    c = config.model
    if c.model != "gpt":
        raise UserError(f"{out_dir} holds a {c.model} model; nanoGPT checkpoints hold its GPT only")
    if not c.tie_weights:
        raise UserError(f"{out_dir} has an untied LM head (tie_weights=False); nanoGPT's GPT always ties it to wte")
    if c.pos_encoding != "learned":
        raise UserError(f"{out_dir} has pos_encoding={c.pos_encoding}; nanoGPT's GPT learns its position embeddings "
                        "(wpe), so it cannot load this model")
    if c.activation != "gelu":
        raise UserError(f"{out_dir} has activation={c.activation}; nanoGPT's MLP computes the exact GELU, so it "
                        "would run another model: export it with --to=hf instead")
    tok = tokenizers.load(os.path.join(out_dir, "tokenizer.json"))
    meta_path = os.path.join(os.path.dirname(os.path.abspath(path)), "meta.pkl")
    meta = None
    if isinstance(tok, tokenizers.CharTokenizer):
        meta = {"vocab_size": tok.vocab_size, "itos": dict(enumerate(tok.chars)),
                "stoi": {ch: i for i, ch in enumerate(tok.chars)}}
    if meta is not None and os.path.isdir(meta_path):
        raise UserError(f"{meta_path} is a directory, where the vocabulary would go: move it or export elsewhere")
    if not force and meta is not None and os.path.exists(meta_path) and read_meta(meta_path) != meta:
        raise UserError(f"{meta_path} holds another vocabulary: export to another directory or pass --force")
    from gptjax.weights import torchfile

    ckpt = torch_checkpoint(config, state)
    files = [(path, lambda f: torchfile.save(ckpt, f))]
    if meta is not None:
        files.append((meta_path, lambda f: pickle.dump(meta, f)))
    return files, {"vocab": meta_path if meta is not None else None, "step": ckpt["iter_num"],
                   "tensors": len(ckpt["model"])}


def load(path: str) -> dict:
    """A nanoGPT ckpt.pt in arrays, loaded with weights_only=True and checked for 'model' and 'model_args'."""
    if os.path.isdir(path):
        raise UserError(f"{path} is a directory: name the checkpoint file inside it, e.g. "
                        f"{os.path.join(path, 'ckpt.pt')}")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    from gptjax.weights import torchfile

    ckpt = torchfile.load(path)
    if not (isinstance(ckpt, dict) and all(isinstance(ckpt.get(k), dict) for k in ("model", "model_args"))):
        raise UserError(f"{path} is not a nanoGPT checkpoint: expected a dict with 'model' (a state dict) and "
                        "'model_args', as nanoGPT's train.py saves in ckpt.pt")
    missing = [k for k in MODEL_ARGS if k not in ckpt["model_args"]]
    if missing:
        raise UserError(f"{path}: model_args lacks {', '.join(missing)}")
    return ckpt


def read(path: str, out_dir: str, vocab: str | None = None):
    """(config, TrainState, tokenizer) of a run in out_dir from a nanoGPT ckpt.pt, every check made.

    Weights and AdamW state come over exactly, so `gptjax train --init_from=resume` continues the run; a file
    without an optimizer state starts a fresh one at step 0. The tokenizer is vocab (a meta.pkl), else
    meta.pkl beside the checkpoint, else GPT-2's when the vocabulary is GPT-2's (as nanoGPT's sample.py does).
    """
    ckpt = load(path)
    args = ckpt["model_args"]
    sd = clean(ckpt["model"])
    wte, head = sd.get("transformer.wte.weight"), sd.get("lm_head.weight")
    tied = head is None or (isinstance(wte, np.ndarray) and isinstance(head, np.ndarray)
                            and wte.shape == head.shape and np.array_equal(wte, head))
    try:
        typed = {k: type(getattr(ModelConfig, k))(args[k]) for k in MODEL_ARGS}
        c = ModelConfig(model="gpt", tie_weights=tied, **typed)
    except (TypeError, ValueError):
        raise UserError(f"{path}: model_args {args} are not nanoGPT's GPTConfig values") from None
    if min(c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size) < 1 or c.n_embd % c.n_head:
        raise UserError(f"{path}: model_args {args} do not describe a GPT")
    if head is None:
        sd = dict(sd, **{"lm_head.weight": wte})

    saved = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    local_meta = os.path.join(os.path.dirname(os.path.abspath(path)), "meta.pkl")
    if vocab is not None or os.path.exists(local_meta):
        meta = read_meta(vocab or local_meta, option=vocab is not None)
        tok = tokenizers.CharTokenizer("".join(meta["itos"][i] for i in range(meta["vocab_size"])))
    elif c.vocab_size >= GPT2_VOCAB:
        tok = tokenizers.gpt2()
    else:
        raise UserError(f"{path} has a {c.vocab_size}-token vocabulary and no meta.pkl beside it: pass "
                        "--meta=PATH/meta.pkl (nanoGPT's data/<dataset>/meta.pkl)")
    if tok.vocab_size > c.vocab_size:
        raise UserError(f"the tokenizer has {tok.vocab_size} tokens but the model only {c.vocab_size}")

    types = field_types()
    carried = {}  # nanoGPT's training settings share gptjax's names; anything else in its config is left behind
    for k, v in saved.items():
        if types.get(k, (None,))[0] == "train" and k not in ("out_dir", "init_from"):
            typ = types[k][1]
            if typ is float and type(v) is int:
                v = float(v)
            if type(v) is typ:
                carried[k] = v
    dataset = saved.get("dataset") if isinstance(saved.get("dataset"), str) else "shakespeare_char"
    config = Config(model=c, data=DataConfig(dataset=dataset, tokenizer=tok.name),
                    train=dataclasses.replace(TrainConfig(**carried), out_dir=out_dir, init_from="scratch"))
    validate(config)  # nanoGPT's settings as carried over: dropout, betas, learning rates...
    _check_progress(path, ckpt)
    return config, from_checkpoint(dict(ckpt, model=sd), config), tok


def _check_progress(path: str, ckpt: dict) -> None:
    """iter_num and best_val_loss, where the file has them, must be a step count and a loss."""
    step, best = ckpt.get("iter_num", 0), ckpt.get("best_val_loss", float("inf"))
    if isinstance(best, np.ndarray) and best.size == 1:  # a tensor in the file
        best = best.item()
    if type(step) is not int or not 0 <= step <= INT_MAX:
        raise UserError(f"{path}: iter_num={step!r} is not a step count (an integer from 0 to {INT_MAX})")
    if isinstance(best, bool) or not isinstance(best, (int, float)) or best != best or best < 0:
        raise UserError(f"{path}: best_val_loss={best!r} is not a loss (a number >= 0)")


class _DataOnly(pickle.Unpickler):
    """meta.pkl holds dicts of ints and strings: refuse anything that would import code."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_meta(path: str, option: bool = False) -> dict:
    """A nanoGPT meta.pkl; anything else is one line naming it (as --meta=path when the user named it)."""
    what = f"--meta={path} must be nanoGPT's meta.pkl" if option else f"{path} is not a nanoGPT meta.pkl"
    if os.path.isdir(path):
        raise UserError(f"{what}, not a directory: name the meta.pkl inside it")
    if zipfile.is_zipfile(path):
        raise UserError(f"{what} (a pickled dict: vocab_size, itos, stoi), not a zip archive like a torch.save ckpt.pt")
    try:
        with open(path, "rb") as f:
            meta = _DataOnly(io.BytesIO(f.read())).load()
        itos = meta["itos"]
        chars = "".join(itos[i] for i in range(meta["vocab_size"]))
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
        why = " ".join(f"{type(e).__name__}: {e}".split())  # pickle's messages can span lines
        raise UserError(f"{what} (a pickled dict: vocab_size, itos, stoi): {why}") from None
    if len(chars) != meta["vocab_size"]:
        raise UserError(f"{path}: itos entries must be single characters")
    return meta
