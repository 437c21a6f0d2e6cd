"""A run's directory: config.json, metrics.jsonl, tokenizer.json, loss.png and checkpoints/; its lock; loading a
trained run back."""

from __future__ import annotations

import contextlib
import json
import os
import shutil

from gptjax import checkpoint, data, model, tokenizers
from gptjax.compute import compute_of
from gptjax.config import Config, validate
from gptjax.errors import UserError
from gptjax.optim import init_state, make_optimizer
from gptjax.writes import atomic_write, probe

RUN_FILES = ("config.json", "metrics.jsonl", "tokenizer.json", "data.json", "loss.png", "tensorboard", "checkpoints")


LOCK_FILE = ".gptjax.lock"


def write_json(path: str, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=1))


def keep_metrics_before(path: str, step: int) -> None:
    """Drop the rows a resumed run is about to write again (its checkpoint's step and later), atomically.

    A row cut short by a killed process (the last line, not ending in a newline) is dropped too; any other line that
    is not a metrics row is a UserError naming it, and the file is left as it is.
    """
    rows = read_metrics(path)
    if rows is None:
        return
    kept = [line.rstrip("\n") + "\n" for line, row in rows if row is not None and row["step"] < step]
    if kept != [line for line, _ in rows]:
        atomic_write(path, "".join(kept))


def read_metrics(path: str) -> list[tuple[str, dict | None]] | None:
    """metrics.jsonl's (line, row) pairs (row None for a last line cut short by a kill); None if there is no file."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path} cannot be read ({e}); restore it or delete it") from None
    rows = []
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        cut_short = i == len(lines) and not line.endswith("\n")
        if not cut_short and not _is_metrics_row(row):
            raise UserError(f"{path} line {i} is not a metrics row ({line.strip()[:60]!r}): fix or delete that "
                            "line, then run again")
        rows.append((line, row if _is_metrics_row(row) else None))
    return rows


def _is_metrics_row(row) -> bool:
    return isinstance(row, dict) and type(row.get("step")) is int and all(
        isinstance(row.get(k), (int, float)) for k in ("train_loss", "val_loss"))


def saved_config(out: str) -> Config | None:
    """The config.json of the run in `out`, or None if there is none."""
    path = os.path.join(out, "config.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            config = Config.from_dict(json.load(f))
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable gptjax run config ({type(e).__name__}: {str(e)[:200]}); restore "
                        "it, or start a new run with --force") from None
    try:
        validate(config)  # ranges, and a --model factory that must still import
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    return config


def check_out_dir(out: str) -> None:
    """--out_dir must name a directory that exists or can be made, and be writable: checked before any work."""
    if not out.strip():
        raise UserError("--out_dir is empty: name the run's directory, e.g. --out_dir=out-mine")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out_dir={out} is a file, not a directory: pick another --out_dir")
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"--out_dir={out}: {parent} is a file, so the directory cannot be made; pick another")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out_dir={out}: {parent} is not writable; pick a directory you can write to")


def check_writable(out: str) -> None:
    """Before a run is written to out (train, import): out can hold it, a `checkpoints` link there is not dangling,
    and its checkpoints directory takes a file."""
    check_out_dir(out)
    checkpoint.check_root(out)
    check_replaceable(out)


def holds_run(out: str) -> bool:
    """out holds a run's files (data.json alone, a name other tools use too, does not make one)."""
    return any(os.path.lexists(os.path.join(out, f)) for f in RUN_FILES if f != "data.json")


def claim_out_dir(out: str, force: bool, advice: str, remove: bool = True) -> None:
    """Refuse a directory that holds a run, unless force: then (if remove) its run files are removed."""
    if holds_run(out):
        if not force:
            raise UserError(f"{out} already holds a run: {advice}")
        if remove:
            remove_run_files(out)


def check_replaceable(out: str) -> None:
    """The run's files in out can be replaced: its checkpoints directory (or the directory a `checkpoints` link
    points to, on a scratch disk say) takes a new file. Checked before anything of an old run is removed."""
    r = os.path.join(out, "checkpoints")
    if not os.path.isdir(r):
        return
    try:
        probe(r)
    except OSError as e:
        where = f"{r} (a link to {os.path.realpath(r)})" if os.path.islink(r) else r
        raise UserError(f"cannot write checkpoints in {where}: {e.strerror}; make it writable or pick another "
                        "--out_dir") from None


def _owned(name: str) -> bool:
    """A name gptjax writes in a checkpoints directory: a checkpoint, or a save or removal in progress."""
    return bool(checkpoint.NAME.match(name)) or name.startswith(".tmp_")


def _run_entries(out: str) -> list[str]:
    """The paths a run has in out: its files, and its checkpoints, which a `checkpoints` link (to a scratch disk)
    points to; the link itself stays, and so does anything else in the directory it points to."""
    found = []
    for f in RUN_FILES:
        p = os.path.join(out, f)
        if f == "checkpoints" and os.path.islink(p) and os.path.isdir(p):
            found += [os.path.join(p, name) for name in sorted(os.listdir(p)) if _owned(name)]
        elif os.path.lexists(p):
            found.append(p)
    return found


def _delete(p: str) -> None:
    shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)


def remove_run_files(out: str) -> None:
    """Delete the files a run writes in out (its lock file stays), checkpoints first, so that a deletion cut short
    never leaves checkpoints without their config.json."""
    for p in sorted(_run_entries(out), key=lambda p: "checkpoints" not in p):
        _delete(p)


ASIDE = ".gptjax-replaced"  # where --force keeps the run it replaces until the new one saves a checkpoint


def set_aside(out: str) -> list[tuple[str, str]]:
    """Move the run in out out of the way (renames, within its filesystem): into OUT/.gptjax-replaced, and a
    `checkpoints` link's checkpoints into a .gptjax-replaced beside them. Returns the (from, to) moves, for
    put_back or drop_aside. A move that fails puts back the ones made and is one UserError."""
    moves = []
    try:
        for p in _run_entries(out):
            aside = os.path.join(os.path.dirname(p), ASIDE)
            if not moves or os.path.dirname(moves[-1][1]) != aside:
                if os.path.lexists(aside):  # left by a replacement that died before its first checkpoint
                    _delete(aside)
                os.makedirs(aside)
            moves.append((p, os.path.join(aside, os.path.basename(p))))
            os.rename(*moves[-1])
    except OSError as e:
        put_back(moves[:-1] if moves and not os.path.lexists(moves[-1][1]) else moves)
        raise UserError(f"cannot move the run in {out} aside to replace it ({e.strerror}: {e.filename}); it is "
                        "left as it was") from None
    return moves


def put_back(moves: list[tuple[str, str]]) -> None:
    """Undo set_aside: the replaced run returns as it was (the new run's files must be gone first)."""
    for src, dst in reversed(moves):
        os.rename(dst, src)
    for aside in {os.path.dirname(dst) for _, dst in moves}:
        shutil.rmtree(aside, ignore_errors=True)


def drop_aside(moves: list[tuple[str, str]]) -> None:
    """The new run has saved a checkpoint: the replaced one is deleted."""
    for aside in {os.path.dirname(dst) for _, dst in moves}:
        shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def run_lock(out: str, command: str = "train"):
    """Hold OUT_DIR's lock for the block: a second process writing the same run gets one line naming the holder.

    An flock: the kernel releases it when the holder exits, however it dies. The directory is made if needed.
    """
    import fcntl

    path = os.path.join(out, LOCK_FILE)
    try:
        os.makedirs(out, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"--out_dir={out}: cannot write there ({e.strerror}); pick a directory you can write to") \
            from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise UserError(f"{out} is in use by {holder}: wait for it to finish, or pick another --out_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"gptjax {command} (pid {os.getpid()})".encode(), 0)
        yield
    finally:
        os.close(fd)


def plot_metrics(metrics_path: str, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for _, row in read_metrics(metrics_path) or [] if row is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("train_loss", "val_loss"):
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker=".", label=key.replace("_", " "))
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def load_run(out_dir: str, which: str | int = "best", **compute):
    """(config, graphdef, params) of a trained run, its parameters alone read from checkpoint `which`: best (else
    latest), latest, or a step.

    compute: dtype/attention/scan_layers/remat/matmul overrides for the graphdef (default: float32, einsum
    attention, unrolled, the host's auto matmul: the exact forward pass); the parameters are the same whatever
    they are."""
    config, graphdef, params = _model_of(out_dir, compute)
    return config, graphdef, checkpoint.restore(out_dir, _checkpoint_name(out_dir, which), params, part="params")


def load_state(out_dir: str, which: str | int = "best", **compute):
    """(config, graphdef, TrainState) of a run, AdamW moments included, from checkpoint `which` (as load_run's)."""
    config, graphdef, params = _model_of(out_dir, compute)
    like = init_state(params, make_optimizer(config.train, params))
    return config, graphdef, checkpoint.restore(out_dir, _checkpoint_name(out_dir, which), like)


def _model_of(out_dir: str, compute: dict):
    """(config, graphdef, freshly initialised params) of the run in out_dir, its model run as `compute` says."""
    config = saved_config(out_dir)
    if config is None:
        raise UserError(f"{out_dir} holds no run (no config.json): train one with gptjax train --out_dir={out_dir}")
    # matmul: auto, not the run's own (a run trained with --matmul=mkl is read on a host without the kernel too)
    settings = {"dtype": "float32", "attention": "einsum", "scan_layers": False, "remat": "none", "matmul": "auto",
                **compute}
    graphdef, params = model.split(model.create(config.model, config.train.seed,
                                                compute_of(config, False, **settings)))
    return config, graphdef, params


def _checkpoint_name(out_dir: str, which: str | int) -> str | int:
    return "latest" if which == "best" and not checkpoint.exists(out_dir, "best") else which


def check_tokenizer(out_dir: str, prep: data.Prepared) -> None:
    """The prepared data must use the run's own tokenizer: the same text may be given as another corpus file."""
    run_tok = os.path.join(out_dir, "tokenizer.json")
    if os.path.exists(run_tok) and tokenizers.load(run_tok).to_json() != prep.tokenizer().to_json():
        raise UserError(f"this corpus tokenizes differently from {out_dir}/tokenizer.json: use the text the run "
                        "was trained on (--input=PATH)")


def check_corpus(out_dir: str, prep: data.Prepared) -> None:
    """The corpus must be the text the run was trained on: its data.json (the prepared meta, written when training
    began) keeps the corpus' sha256. Runs from before data.json are not checked."""
    path = os.path.join(out_dir, "data.json")
    try:
        with open(path, encoding="utf-8") as f:
            then = json.load(f)["corpus_sha256"]
    except FileNotFoundError:
        return
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a readable record of the run's corpus ({type(e).__name__}); restore it, or "
                        "delete it to skip this check") from None
    now = prep.meta["corpus_sha256"]
    if not isinstance(then, str):
        raise UserError(f"{path} is not a readable record of the run's corpus (its corpus_sha256 is {then!r}); "
                        "restore it, or delete it to skip this check")
    if then != now:
        raise UserError(f"the corpus {prep.meta['corpus']} has changed since {out_dir} was trained on it (sha256 "
                        f"{then[:12]}... then, {now[:12]}... now): pass the text it was trained on with --input=PATH, "
                        "or train a new run")
