"""Orbax checkpoints of the whole train state under OUT_DIR/checkpoints/{latest,best}, replaced atomically."""

from __future__ import annotations

import os
import shutil

import jax
import orbax.checkpoint as ocp

from gptjax.errors import UserError


def path(out_dir: str, name: str) -> str:
    return os.path.abspath(os.path.join(out_dir, "checkpoints", name))


def exists(out_dir: str, name: str) -> bool:
    return os.path.isdir(path(out_dir, name))


def save(out_dir: str, name: str, tree, copy_of: str | None = None) -> None:
    """Write to a temporary directory, then swap it in, so a crash never leaves no checkpoint.

    copy_of names a checkpoint just saved from the same tree: its files are copied instead of written again.
    """
    final = path(out_dir, name)
    tmp, old = final + ".tmp", final + ".old"
    for p in (tmp, old):
        shutil.rmtree(p, ignore_errors=True)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    if copy_of is not None:
        shutil.copytree(path(out_dir, copy_of), tmp)
    else:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp, tree)
            ckptr.wait_until_finished()
    if os.path.exists(final):
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def restore(out_dir: str, name: str, like):
    """The saved tree, restored into the structure, shapes and dtypes of `like`."""
    p = path(out_dir, name)
    if not os.path.isdir(p):
        raise UserError(f"no '{name}' checkpoint in {out_dir}: train there first (gptjax train --out_dir={out_dir})")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(p, abstract)
