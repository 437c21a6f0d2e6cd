"""A run's directory: config.json, metrics.jsonl, tokenizer.json, loss.png and checkpoints/; its lock; loading a
trained run back."""

from __future__ import annotations

import contextlib
import json
import os
import shutil

from gptjax import checkpoint, data, model, tokenizers
from gptjax.config import Config
from gptjax.errors import UserError
from gptjax.optim import init_state, make_optimizer

RUN_FILES = ("config.json", "metrics.jsonl", "tokenizer.json", "loss.png", "checkpoints")


LOCK_FILE = ".gptjax.lock"


def atomic_write(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_json(path: str, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=1))


def keep_metrics_before(path: str, step: int) -> None:
    """Drop the rows a resumed run is about to write again (its checkpoint's step and later), atomically.

    A row cut short by a killed process (the last line) is dropped too.
    """
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row["step"] < step:
            kept.append(line)
    if kept != lines:
        atomic_write(path, "".join(kept))


def saved_config(out: str) -> Config | None:
    """The config.json of the run in `out`, or None if there is none."""
    path = os.path.join(out, "config.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return Config.from_dict(json.load(f))
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{path} is not a readable gptjax run config ({type(e).__name__}: {e}); restore it, or "
                        "start a new run with --force") from None


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


def claim_out_dir(out: str, force: bool, advice: str, remove: bool = True) -> None:
    """Refuse a directory that holds a run, unless force: then (if remove) its run files are removed."""
    if any(os.path.exists(os.path.join(out, f)) for f in RUN_FILES):
        if not force:
            raise UserError(f"{out} already holds a run: {advice}")
        if remove:
            remove_run_files(out)


def remove_run_files(out: str) -> None:
    """Delete the files a run writes in out (its lock file stays)."""
    for f in RUN_FILES:
        p = os.path.join(out, f)
        shutil.rmtree(p) if os.path.isdir(p) else os.path.exists(p) and os.remove(p)


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

    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f]
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
    """(config, graphdef, params) of a trained run; `which` is best (else latest), latest, or a step.

    compute: dtype/attention/scan_layers/remat overrides for the graphdef (default: float32, einsum attention,
    unrolled: the exact forward pass); the parameters are the same whatever they are."""
    config, graphdef, state = load_state(out_dir, which, **compute)
    return config, graphdef, state.params


def load_state(out_dir: str, which: str | int = "best", **compute):
    """(config, graphdef, TrainState) of a run, from checkpoint `which`: best (else latest), latest, or a step."""
    config = saved_config(out_dir)
    if config is None:
        raise UserError(f"{out_dir} holds no run (no config.json): train one with gptjax train --out_dir={out_dir}")
    settings = {"dtype": "float32", "attention": "einsum", "scan_layers": False, "remat": "none", **compute}
    compute = model.compute_of(config, False, **settings)
    graphdef, params = model.split(model.create(config.model, config.train.seed, compute))
    tx = make_optimizer(config.train, params)
    name = "latest" if which == "best" and not checkpoint.exists(out_dir, "best") else which
    return config, graphdef, checkpoint.restore(out_dir, name, init_state(params, tx))


def check_tokenizer(out_dir: str, prep: data.Prepared) -> None:
    """The prepared data must use the run's own tokenizer: the same text may be given as another corpus file."""
    run_tok = os.path.join(out_dir, "tokenizer.json")
    if os.path.exists(run_tok) and tokenizers.load(run_tok).to_json() != prep.tokenizer().to_json():
        raise UserError(f"this corpus tokenizes differently from {out_dir}/tokenizer.json: use the text the run "
                        "was trained on (--input=PATH)")
