"""Orbax checkpoints of the whole train state, committed atomically, the last N kept plus the best.

Arrays are saved as laid out (sharded over a mesh, or whole) and restored into whatever layout the caller's
`like` has, so a checkpoint moves between meshes and device counts. With several processes (jax.distributed),
all of them write their shards, and process 0 alone commits.

Layout under OUT_DIR/checkpoints:
  step_00000250/   one per save; the newest `keep` are kept ("latest" is the newest)
  best_00000250/   the checkpoint with the lowest val loss so far (only the newest best_ is kept)
  .tmp_*           a save in progress; never read, removed by the next save

A checkpoint is written into a .tmp_ directory and renamed into place only when orbax has finished, so a
process killed at any moment leaves every committed checkpoint whole and the previous ones still there.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import sys
import threading
import zlib

import jax
import orbax.checkpoint as ocp

from gptjax import distributed
from gptjax.errors import UserError, first_line

NAME = re.compile(r"^(step|best)_(\d{8,})$")  # a committed checkpoint
MANIFEST = "gptjax_manifest.json"  # every file of the checkpoint with its size and CRC-32, written last


def root(out_dir: str) -> str:
    return os.path.abspath(os.path.join(out_dir, "checkpoints"))


def _committed(out_dir: str, kind: str) -> list[tuple[int, str]]:
    """(step, path) of the committed `kind` (step or best) checkpoints, oldest first."""
    r = root(out_dir)
    if not os.path.isdir(r):
        return []
    found = []
    for name in os.listdir(r):
        m = NAME.match(name)
        if m and m.group(1) == kind and os.path.isdir(os.path.join(r, name)):
            found.append((int(m.group(2)), os.path.join(r, name)))
    return sorted(found)


def steps(out_dir: str) -> list[int]:
    """The steps of the kept checkpoints, oldest first."""
    return [s for s, _ in _committed(out_dir, "step")]


def resolve(out_dir: str, which: str | int) -> str | None:
    """Path of checkpoint `which`: "latest" (newest step), "best", or a step number; None if there is none."""
    if which == "best":
        found = _committed(out_dir, "best")
    elif which == "latest":
        found = _committed(out_dir, "step")
    else:
        found = [(s, p) for s, p in _committed(out_dir, "step") + _committed(out_dir, "best") if s == int(which)]
    return found[-1][1] if found else None


def exists(out_dir: str, which: str | int) -> bool:
    return resolve(out_dir, which) is not None


def _commit(tmp: str, final: str) -> None:
    if os.path.exists(final):  # the same step saved again (e.g. a resumed run): replace it, newest wins
        _remove(final)
    os.rename(tmp, final)


def save(out_dir: str, step: int, tree, keep: int = 2, best: bool = False) -> str:
    """Commit the tree as step_<step> (and as best_<step> if best); keep the newest `keep` step checkpoints."""
    r = root(out_dir)
    final = os.path.join(r, f"step_{step:08d}")
    tmp = os.path.join(r, f".tmp_step_{step:08d}")
    lead = jax.process_index() == 0  # with several processes, all write the arrays; process 0 commits
    if lead:
        os.makedirs(r, exist_ok=True)
        for name in os.listdir(r):  # saves a killed process left unfinished
            if name.startswith(".tmp_"):
                shutil.rmtree(os.path.join(r, name), ignore_errors=True)
    distributed.sync(f"gptjax-checkpoint-{step}-clean")
    with _quiet_on_failure(), ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp, tree)
        ckptr.wait_until_finished()
    if lead:
        _commit_all(out_dir, r, step, tmp, final, keep, best)
    distributed.sync(f"gptjax-checkpoint-{step}-committed")
    return final


class _ThreadsHeld:
    """sys.stderr for the main thread; what other threads write is held (or, once dropping, dropped)."""

    def __init__(self, real):
        self.real, self.held, self.dropping = real, io.StringIO(), False

    def write(self, text: str) -> int:
        if threading.current_thread() is threading.main_thread():
            return self.real.write(text)
        return len(text) if self.dropping else self.held.write(text)

    def __getattr__(self, name):
        return getattr(self.real, name)


@contextlib.contextmanager
def _quiet_on_failure():
    """orbax's worker threads print pages of tracebacks ("Event loop is closed") when a save fails, a full disk say,
    some of them after the failure has reached the caller: hold what other threads write to sys.stderr during the
    save; pass it on if the save succeeds; if it fails, drop it, and what they write from then on (the caller names
    the failure in one line)."""
    real = sys.stderr
    sys.stderr = held = _ThreadsHeld(real)
    try:
        yield
    except BaseException:
        held.dropping = True
        raise
    sys.stderr = real
    real.write(held.held.getvalue())


def _commit_all(out_dir: str, r: str, step: int, tmp: str, final: str, keep: int, best: bool) -> None:
    _write_manifest(tmp)
    _commit(tmp, final)
    if best:
        best_final = os.path.join(r, f"best_{step:08d}")
        best_tmp = os.path.join(r, f".tmp_best_{step:08d}")
        _copy_tree(final, best_tmp)  # a copy, not links: damage to one file leaves the other whole
        _commit(best_tmp, best_final)
        for _, p in _committed(out_dir, "best")[:-1]:
            _remove(p)
    for _, p in _committed(out_dir, "step")[:-keep]:
        _remove(p)


def _copy_tree(src: str, dst: str) -> None:
    """shutil.copytree, but the first failure (a full disk, say) is raised as the OSError it is, not gathered into
    a shutil.Error without an errno."""
    for base, _, names in os.walk(src):
        os.makedirs(os.path.join(dst, os.path.relpath(base, src)), exist_ok=True)
        for name in names:
            shutil.copyfile(os.path.join(base, name), os.path.join(dst, os.path.relpath(base, src), name))


def _remove(p: str) -> None:
    """Rename out of the committed names first, so a kill halfway through deleting leaves no half checkpoint."""
    head, name = os.path.split(p)
    gone = os.path.join(head, ".tmp_gone_" + name)
    os.rename(p, gone)
    shutil.rmtree(gone, ignore_errors=True)


def _files(d: str) -> dict[str, str]:
    out = {}
    for base, _, names in os.walk(d):
        for name in names:
            full = os.path.join(base, name)
            out[os.path.relpath(full, d)] = full
    return out


def _crc(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _write_manifest(d: str) -> None:
    files = {rel: [os.path.getsize(full), _crc(full)] for rel, full in sorted(_files(d).items())}
    with open(os.path.join(d, MANIFEST), "w") as f:
        json.dump(files, f)
        f.flush()
        os.fsync(f.fileno())


def verify(p: str) -> str | None:
    """What is wrong with the files of checkpoint directory p, or None if they match its manifest."""
    try:
        with open(os.path.join(p, MANIFEST)) as f:
            expected = json.load(f)
    except (OSError, ValueError):
        return f"its {MANIFEST} is missing or unreadable"
    present = _files(p)
    for rel, (size, crc) in expected.items():
        if rel not in present:
            return f"{rel} is missing"
        if os.path.getsize(present[rel]) != size:
            return f"{rel} has {os.path.getsize(present[rel])} bytes, not {size}"
        if _crc(present[rel]) != crc:
            return f"{rel} does not match its checksum"
    return None


def describe(out_dir: str) -> str:
    """The checkpoints a user can pick, for error messages."""
    kept = steps(out_dir)
    best = _committed(out_dir, "best")
    parts = [f"steps {', '.join(map(str, kept))}" if kept else "no step checkpoints"]
    if best:
        parts.append(f"best at step {best[-1][0]}")
    return "; ".join(parts)


def check_root(out_dir: str) -> None:
    """OUT_DIR/checkpoints, if there, must be a directory: a link to a scratch disk that is not mounted is named in
    one line rather than read as "no checkpoints" or written through."""
    r = os.path.join(out_dir, "checkpoints")
    if os.path.islink(r) and not os.path.exists(r):
        raise UserError(f"{r} is a link to {os.readlink(r)}, which does not exist (a disk not mounted?): mount or "
                        "make it, or remove the link")
    if os.path.exists(r) and not os.path.isdir(r):
        raise UserError(f"{r} is a file, not a directory of checkpoints: move it away")


def _shapes_differ(p: str, abstract, part: str | None = None) -> str | None:
    """How the arrays saved in checkpoint p (its field `part` alone, if given) differ in shape from `abstract`'s, or
    None if they do not: checked before orbax reads them, whose failure would come with pages of its threads'
    tracebacks."""
    from collections import Counter

    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(p)
    meta = getattr(meta, "item_metadata", meta)
    try:
        meta = meta[part] if part else meta
    except (KeyError, TypeError):
        return f"it holds no {part}"
    saved = Counter(tuple(m.shape) for m in jax.tree.leaves(meta))
    wanted = Counter(tuple(x.shape) for x in jax.tree.leaves(abstract))
    if saved == wanted:
        return None
    extra, missing = saved - wanted, wanted - saved
    if extra and missing:
        return f"it holds a {next(iter(extra))} array where the settings give {next(iter(missing))}"
    return f"it holds {sum(saved.values())} arrays where the settings give {sum(wanted.values())}"


def restore(out_dir: str, which: str | int, like, part: str | None = None):
    """The saved tree of checkpoint `which`, restored into the structure, shapes, dtypes and layout of `like`;
    with `part` (e.g. "params"), that field of the saved TrainState alone (the rest is not read)."""
    check_root(out_dir)
    p = resolve(out_dir, which)
    if p is None:
        if which in ("best", "latest") and not steps(out_dir):
            raise UserError(f"{out_dir} has no checkpoint yet: train there first (gptjax train --out_dir={out_dir})")
        raise UserError(f"{out_dir} has no '{which}' checkpoint ({describe(out_dir)}): pick one of those")
    problem = verify(p)
    if problem:
        raise damaged(out_dir, p, problem)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    try:
        differ = _shapes_differ(p, abstract, part)
        if differ:
            raise _another_model(p, differ)
        if part is None:
            with ocp.StandardCheckpointer() as ckptr:
                return ckptr.restore(p, abstract)
        wanted = {part: abstract}
        with ocp.PyTreeCheckpointer() as ckptr:
            got = ckptr.restore(p, args=ocp.args.PyTreeRestore(
                item=wanted, restore_args=ocp.checkpoint_utils.construct_restore_args(wanted),
                partial_restore=True))[part]
        if not all(isinstance(x, jax.Array) for x in jax.tree.leaves(got)):  # a name the checkpoint does not have
            raise _another_model(p, "its parameters have other names")
        return got
    except (OSError, ValueError) as e:  # files that match the manifest but orbax cannot read
        cause = first_line(e)
        if "structure" in cause or "shape" in cause:
            raise UserError(f"checkpoint {p} holds another train state than this run's settings describe "
                            f"({cause}); use the settings it was saved with (its run's config.json)") from None
        raise damaged(out_dir, p, f"{type(e).__name__}: {cause}") from None


def _another_model(p: str, why: str) -> UserError:
    return UserError(f"checkpoint {p} holds another model than the run's config.json describes ({why}); put "
                     "config.json's model settings back as they were when it was saved")


def damaged(out_dir: str, p: str, problem: str) -> UserError:
    return UserError(f"checkpoint {p} is damaged ({problem}); use another one "
                     f"with --checkpoint=best|latest|STEP ({describe(out_dir)}), or delete it to resume from the "
                     "one before")
