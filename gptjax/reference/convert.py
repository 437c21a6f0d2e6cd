"""Weights between gptjax and PyTorch: nanoGPT's state-dict names and layout, and nanoGPT's ckpt.pt files."""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import re
import secrets
import tempfile
import warnings
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from gptjax import checkpoint, model, optim, rundir, tokenizers
from gptjax.config import INT_MAX, Config, DataConfig, ModelConfig, TrainConfig, field_types, validate
from gptjax.errors import UserError
from gptjax.reference.nanogpt import get_lr

MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")  # nanoGPT's GPTConfig
GPT2_VOCAB = 50257


def layout(c: ModelConfig) -> list[tuple[str, str, bool]]:
    """(PyTorch key, gptjax name, transposed) for every tensor of the twin's state dict, in its order.

    Linear weights are [in, out] in gptjax and [out, in] in PyTorch; a tied lm_head.weight is wte.weight.
    """
    if c.model == "bigram":
        return [("token_embedding_table.weight", "token_embedding_table.weight", False)]
    rows = [("transformer.wte.weight", "wte.weight", False), ("transformer.wpe.weight", "wpe.weight", False)]

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


def to_torch_state_dict(params, c: ModelConfig) -> dict[str, torch.Tensor]:
    """nanoGPT-named float32 tensors (a tied lm_head.weight is the same tensor as transformer.wte.weight).

    Works for any pytree shaped like the parameters, e.g. their gradients.
    """
    named = {k: np.asarray(v) for k, v in model.param_names(params).items()}
    rows = layout(c)
    assert {name for _, name, _ in rows} == set(named), "params do not match the config's layout"
    by_name: dict[str, torch.Tensor] = {}
    sd = {}
    for key, name, transposed in rows:
        if not transposed and name in by_name:  # tied head: share the tensor, as nanoGPT's state_dict does
            sd[key] = by_name[name]
            continue
        x = named[name].T if transposed else named[name]
        sd[key] = torch.from_numpy(np.array(x, dtype=np.float32, order="C"))  # a writable copy
        if not transposed:
            by_name[name] = sd[key]
    return sd


def _clean(sd: dict) -> dict:
    """Without torch.compile's _orig_mod. prefix and older nanoGPT's causal-mask buffers (h.N.attn.bias, 4-D)."""
    sd = {k.removeprefix("_orig_mod."): v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if not (k.endswith(".attn.bias") and getattr(v, "ndim", 0) == 4)}


def from_torch_state_dict(sd: dict, c: ModelConfig):
    """gptjax parameters from a nanoGPT-named state dict; missing, unexpected or misshapen tensors are errors."""
    sd = _clean(sd)
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
        if not isinstance(sd[key], torch.Tensor):
            raise UserError(f"{key} is a {type(sd[key]).__name__}, not a tensor")
        x = sd[key].detach().cpu().to(torch.float32).numpy()
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


def _optimizer_order(c: ModelConfig) -> tuple[list[str], int]:
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


def _adam(opt_state) -> optax.ScaleByAdamState:
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    return next(x for x in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(x))


def to_torch_optimizer_state(opt_state, config: Config) -> dict:
    """gptjax's AdamW state as the state_dict of nanoGPT's torch.optim.AdamW (its two parameter groups)."""
    c, t = config.model, config.train
    order, n_decay = _optimizer_order(c)
    adam = _adam(opt_state)
    count = int(adam.count)
    mu, nu = to_torch_state_dict(adam.mu, c), to_torch_state_dict(adam.nu, c)
    defaults = torch.optim.AdamW([torch.zeros(1)], lr=get_lr(max(count - 1, 0), t), betas=(t.beta1, t.beta2),
                                 eps=1e-8).state_dict()["param_groups"][0]  # this torch version's group fields
    groups = [dict(defaults, weight_decay=t.weight_decay, params=list(range(n_decay))),
              dict(defaults, weight_decay=0.0, params=list(range(n_decay, len(order))))]
    state = {i: {"step": torch.tensor(float(count)), "exp_avg": mu[k].clone(), "exp_avg_sq": nu[k].clone()}
             for i, k in enumerate(order)} if count else {}
    return {"state": state, "param_groups": groups}


def from_torch_optimizer_state(osd, params, tx, c: ModelConfig):
    """gptjax's optimizer state (for tx, e.g. optim.make_optimizer) from nanoGPT's AdamW state_dict."""
    order, n_decay = _optimizer_order(c)
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
    mu, nu = (from_torch_state_dict(m, c) for m in moments)
    opt_state = optax.tree_utils.tree_set(tx.init(params), mu=mu, nu=nu, count=jnp.asarray(int(steps.pop()), jnp.int32))
    return jax.tree.map(jnp.copy, opt_state)  # Adam's and the schedule's counts must not share a (donated) buffer


def _flat_config(config: Config) -> dict:
    """nanoGPT's checkpoint 'config': every setting under its flat name."""
    return {k: v for section in config.to_dict().values() for k, v in section.items()}


def nanogpt_checkpoint(config: Config, state) -> dict:
    """nanoGPT's ckpt.pt contents for a gptjax TrainState: model, optimizer, model_args, iter_num, best_val_loss,
    config; nanoGPT's train.py resumes from it (--init_from=resume) and its sample.py samples from it."""
    return {
        "model": to_torch_state_dict(state.params, config.model),
        "optimizer": to_torch_optimizer_state(state.opt_state, config),
        "model_args": {k: getattr(config.model, k) for k in MODEL_ARGS},
        "iter_num": int(state.step),
        "best_val_loss": float(state.best_val_loss),
        "config": _flat_config(config),
    }


def train_state_from_nanogpt(ckpt: dict, config: Config):
    """A gptjax TrainState from nanoGPT's ckpt.pt contents: the optimizer state and step where the file has them,
    a fresh optimizer at step 0 where it holds weights only."""
    params = from_torch_state_dict(ckpt["model"], config.model)
    tx = optim.make_optimizer(config.train, params)
    state = optim.init_state(params, tx)
    if "optimizer" not in ckpt:
        return state
    best = ckpt.get("best_val_loss", float("inf"))
    return state._replace(step=jnp.asarray(int(ckpt.get("iter_num", 0)), jnp.int32),
                          opt_state=from_torch_optimizer_state(ckpt["optimizer"], params, tx, config.model),
                          best_val_loss=jnp.asarray(float(best), jnp.float32))


def export_nanogpt(out_dir: str, path: str, force: bool = False, which: str | int = "best") -> dict:
    """Write a run's checkpoint `which` (best by default) as nanoGPT's ckpt.pt: model, model_args, iter_num,
    best_val_loss, config.

    A char tokenizer also goes to meta.pkl beside it (nanoGPT's stoi / itos), which its sample.py decodes with.
    """
    _check_target(path)
    if not force and os.path.lexists(path):
        raise UserError(f"{path} exists: pick another file or pass --force to overwrite it")
    config, _, state = rundir.load_state(out_dir, which)
    c = config.model
    if c.model != "gpt":
        raise UserError(f"{out_dir} holds a {c.model} model; nanoGPT checkpoints hold its GPT only")
    if not c.tie_weights:
        raise UserError(f"{out_dir} has an untied LM head (tie_weights=False); nanoGPT's GPT always ties it to wte")
    tok = tokenizers.load(os.path.join(out_dir, "tokenizer.json"))
    meta_path = os.path.join(os.path.dirname(os.path.abspath(path)), "meta.pkl")
    meta = None
    if isinstance(tok, tokenizers.CharTokenizer):
        meta = {"vocab_size": tok.vocab_size, "itos": dict(enumerate(tok.chars)),
                "stoi": {ch: i for i, ch in enumerate(tok.chars)}}
    if meta is not None and os.path.isdir(meta_path):
        raise UserError(f"{meta_path} is a directory, where the vocabulary would go: move it or export elsewhere")
    if not force and meta is not None and os.path.exists(meta_path) and _read_meta(meta_path) != meta:
        raise UserError(f"{meta_path} holds another vocabulary: export to another directory or pass --force")
    ckpt = nanogpt_checkpoint(config, state)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _atomic_write(path, lambda f: torch.save(ckpt, f))
    if meta is not None:
        _atomic_write(meta_path, lambda f: pickle.dump(meta, f))
    return {"path": path, "meta": meta_path if meta is not None else None, "iter_num": ckpt["iter_num"],
            "tensors": len(ckpt["model"])}


def _check_target(path: str) -> None:
    """PATH is not a directory and its directory can be made and takes a new file: checked before any work, with a
    probe file, removed again with every directory made for it."""
    if os.path.isdir(path):
        raise UserError(f"{path} is a directory: name the file to write inside it, e.g. "
                        f"{os.path.join(path, 'ckpt.pt')}")
    d = where = os.path.dirname(os.path.abspath(path))
    missing = []  # deepest first
    while not os.path.isdir(d):
        if os.path.lexists(d):
            raise UserError(f"{path}: {d} is a file, so the directory cannot be made; export to another path")
        missing.append(d)
        d = os.path.dirname(d)
    made = []
    try:
        for d in reversed(missing):
            os.mkdir(d)
            made.append(d)
        fd, probe = tempfile.mkstemp(prefix=".gptjax-export-probe-", dir=where)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{path}: cannot write in {d} ({e.strerror or e}); export to a directory you can write to"
                        ) from None
    finally:
        for m in reversed(made):
            try:
                os.rmdir(m)
            except OSError:
                pass


def _atomic_write(path: str, write) -> None:
    """Write through a temporary file of our own (a unique name beside path), then rename it into place. The file
    gets the mode any new file gets (0666 less the umask), not mkstemp's 0600: a ckpt.pt is made to be shared."""
    d, base = os.path.split(os.path.abspath(path))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = os.path.join(d, f"{base}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.remove(tmp)
        raise


class _DataOnly(pickle.Unpickler):
    """meta.pkl holds dicts of ints and strings: refuse anything that would import code."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_meta(path: str, option: bool = False) -> dict:
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


def _pickled_globals(path: str) -> list[str]:
    """The globals a torch.save file (or a plain pickle) would import, read from its opcodes: nothing is imported or
    run. Best effort, to name what weights_only loading refused whatever torch's message says."""
    import pickletools

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                streams = [z.read(n) for n in z.namelist() if n.endswith(".pkl")]
        else:
            with open(path, "rb") as f:
                streams = [f.read()]
    except (OSError, zipfile.BadZipFile):
        return []
    found = []
    for data in streams:
        f, memo, pushed = io.BytesIO(data), {}, []
        try:
            while f.tell() < len(data):  # torch's legacy format is several pickles in a row
                for op, arg, _ in pickletools.genops(f):
                    if op.name in ("GLOBAL", "INST"):
                        found.append(arg.replace(" ", "."))
                    elif op.name == "STACK_GLOBAL":
                        found.append(".".join(str(x) for x in pushed[-2:]))
                    if op.name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                        memo[len(memo) if arg is None else arg] = pushed[-1] if pushed else None
                    elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                        pushed.append(memo.get(arg))
                    elif op.name not in ("PROTO", "FRAME", "STOP"):
                        pushed.append(arg if isinstance(arg, str) else None)
        except Exception:  # a damaged stream: what was read so far is the answer
            pass
    return found


def _refused_global(path: str, error: Exception) -> str | None:
    """A global that weights_only loading refuses, from torch's message (its wordings differ between versions and
    between blocked modules and other globals) or else from the file's own opcodes."""
    found = re.search(r"\bGLOBAL ([\w.]+)", str(error))
    if found:
        return found.group(1).rstrip(".")
    allowed = getattr(getattr(torch, "_weights_only_unpickler", None), "_get_allowed_globals", dict)()
    return next((n for n in _pickled_globals(path) if n not in allowed and not n.startswith("torch.")), None)


def load_nanogpt(path: str) -> dict:
    """A nanoGPT ckpt.pt, loaded with weights_only=True and checked for 'model' and 'model_args'."""
    if os.path.isdir(path):
        raise UserError(f"{path} is a directory: name the checkpoint file inside it, e.g. "
                        f"{os.path.join(path, 'ckpt.pt')}")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():  # e.g. torch's note on a pickle protocol: the error below is the one line
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, KeyError... depending on the file
        name = _refused_global(path, e)
        reason = (f"it pickles {name}, which weights_only loading refuses to import (loading it could run code)"
                  if name else "not a file written by torch.save")
        raise UserError(f"{path} is not a PyTorch checkpoint that loads with weights_only=True: {reason}") from None
    if not (isinstance(ckpt, dict) and all(isinstance(ckpt.get(k), dict) for k in ("model", "model_args"))):
        raise UserError(f"{path} is not a nanoGPT checkpoint: expected a dict with 'model' (a state dict) and "
                        "'model_args', as nanoGPT's train.py saves in ckpt.pt")
    missing = [k for k in MODEL_ARGS if k not in ckpt["model_args"]]
    if missing:
        raise UserError(f"{path}: model_args lacks {', '.join(missing)}")
    return ckpt


def import_nanogpt(path: str, out_dir: str, meta_path: str | None = None, force: bool = False):
    """Make a gptjax run directory (config, tokenizer, best/latest checkpoints) from a nanoGPT ckpt.pt; (config, state).

    Weights and AdamW state come over exactly, so `gptjax train --init_from=resume` continues the run; a file
    without an optimizer state starts a fresh one at step 0. The tokenizer is meta_path, else
    meta.pkl beside the checkpoint, else GPT-2's when the vocabulary is GPT-2's (as nanoGPT's sample.py does).
    """
    ckpt = load_nanogpt(path)
    args = ckpt["model_args"]
    sd = _clean(ckpt["model"])
    wte, head = sd.get("transformer.wte.weight"), sd.get("lm_head.weight")
    tied = head is None or (isinstance(wte, torch.Tensor) and isinstance(head, torch.Tensor)
                            and wte.shape == head.shape and torch.equal(wte, head))
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
    if meta_path is not None or os.path.exists(local_meta):
        meta = _read_meta(meta_path or local_meta, option=meta_path is not None)
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
    state = train_state_from_nanogpt(dict(ckpt, model=sd), config)  # every check before anything is written
    rundir.check_out_dir(out_dir)
    checkpoint.check_root(out_dir)
    rundir.check_replaceable(out_dir)
    rundir.claim_out_dir(out_dir, force, "pick another --out_dir or pass --force to replace it", remove=False)
    with rundir.run_lock(out_dir, "import"):
        aside = rundir.set_aside(out_dir) if force else []  # the replaced run, until the new one is saved
        try:
            rundir.write_json(os.path.join(out_dir, "config.json"), config.to_dict())
            tokenizers.save(tok, os.path.join(out_dir, "tokenizer.json"))
            checkpoint.save(out_dir, int(state.step), state, keep=config.train.keep_checkpoints, best=True)
        except BaseException:
            rundir.remove_run_files(out_dir)
            rundir.put_back(aside)
            raise
        rundir.drop_aside(aside)
    return config, state


def _check_progress(path: str, ckpt: dict) -> None:
    """iter_num and best_val_loss, where the file has them, must be a step count and a loss."""
    step, best = ckpt.get("iter_num", 0), ckpt.get("best_val_loss", float("inf"))
    if isinstance(best, torch.Tensor) and best.numel() == 1:
        best = best.item()
    if type(step) is not int or not 0 <= step <= INT_MAX:
        raise UserError(f"{path}: iter_num={step!r} is not a step count (an integer from 0 to {INT_MAX})")
    if isinstance(best, bool) or not isinstance(best, (int, float)) or best != best or best < 0:
        raise UserError(f"{path}: best_val_loss={best!r} is not a loss (a number >= 0)")
