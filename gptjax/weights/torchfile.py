"""torch.save / torch.load of checkpoint files (weights_only, refusals named), and tensors <-> numpy arrays."""

from __future__ import annotations

import io
import re
import warnings
import zipfile

import numpy as np
import torch

from gptjax.errors import UserError


def to_torch(obj):
    """obj with every numpy array a float tensor sharing its memory; one array met twice becomes one tensor, as a
    tied weight is one tensor in a PyTorch state dict."""
    seen: dict[int, torch.Tensor] = {}

    def convert(x):
        if isinstance(x, np.ndarray):
            if id(x) not in seen:
                seen[id(x)] = torch.from_numpy(x)
            return seen[id(x)]
        if isinstance(x, dict):
            return {k: convert(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(convert(v) for v in x)
        return x

    return convert(obj)


def from_torch(obj):
    """obj with every tensor a numpy array of its dtype (bfloat16, which numpy lacks, as float32: exact)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        try:
            return t.numpy()
        except TypeError:
            return t.to(torch.float32).numpy()
    if isinstance(obj, dict):
        return {k: from_torch(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(from_torch(v) for v in obj)
    return obj


def adamw_groups(groups: list[dict]) -> list[dict]:
    """AdamW parameter groups with every field this torch version's AdamW.state_dict() writes (amsgrad, foreach,
    ...), so that its load_state_dict takes them."""
    defaults = torch.optim.AdamW([torch.zeros(1)]).state_dict()["param_groups"][0]
    return [dict(defaults, **g) for g in groups]


def save(obj, f) -> None:
    """torch.save of obj, its numpy arrays as tensors."""
    torch.save(to_torch(obj), f)


def load(path: str):
    """A torch.save file loaded with weights_only=True, its tensors as numpy arrays; a file that does not load is one
    line, naming the global it would import where there is one."""
    try:
        with warnings.catch_warnings():  # e.g. torch's note on a pickle protocol: the error below is the one line
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, KeyError... depending on the file
        name = _refused_global(path, e)
        reason = (f"it pickles {name}, which weights_only loading refuses to import (loading it could run code)"
                  if name else "not a file written by torch.save")
        raise UserError(f"{path} is not a PyTorch checkpoint that loads with weights_only=True: {reason}") from None
    return from_torch(obj)


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
