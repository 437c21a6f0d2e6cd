"""A training run killed with SIGKILL again and again, resumed each time with the plain command, against an
uninterrupted run. Used by tests/test_survive.py and experiments/reliability.py."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

TIMING = ("tokens_per_sec", "elapsed_s")


def gptjax(*args) -> list[str]:
    return [sys.executable, "-m", "gptjax", *args]


def metrics(out: str) -> list[dict]:
    """metrics.jsonl without the wall-clock columns, which no two runs share."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def _in_save(out: str, since: float = 0.0) -> bool:
    """A checkpoint save under way: a save's temporary directory, made at or after `since` (a time.time())."""
    root = os.path.join(out, "checkpoints")
    if not os.path.isdir(root):
        return False
    for name in os.listdir(root):
        if name.startswith((".tmp_step", ".tmp_best")):
            try:
                if os.stat(os.path.join(root, name)).st_mtime >= since:
                    return True
            except FileNotFoundError:  # committed or removed while we looked
                pass
    return False


def _newest(out: str) -> int:
    """The step of the newest committed checkpoint; -1 if there is none."""
    from gptjax import checkpoint

    kept = checkpoint.steps(out)
    return kept[-1] if kept else -1


def _poll(proc, done, deadline: float) -> bool:
    """Poll until done() or the process ends; True if done() came first."""
    while proc.poll() is None and time.monotonic() < deadline:
        if done():
            return True
        time.sleep(0.0005)  # polling for an event; what the kill did is checked afterwards, not timed
    return False


def crash_and_resume(train_args: list[str], out: str, kills: int, seed: int = 0, timeout: float = 300.0) -> list[dict]:
    """Start `gptjax train *train_args --out_dir=out`, SIGKILL it, resume with `gptjax train --init_from=resume
    --out_dir=out`, again and again: `kills` kills, then one resume runs to the end.

    The moments cycle through three kinds. `in_save`: once the process has committed a checkpoint of its own, as
    soon as its next save is under way (a .tmp_ directory in checkpoints/). `mid_training`: a random time up to
    0.3 s after it committed a checkpoint of its own. `from_start`: a random time up to 4 s after it started
    (import, setup, restore, compile). The first process is killed mid-training, so the run exists and has a
    checkpoint. Returns one record per process: the step it resumed from, the kind of moment, whether it was
    killed and inside a save, its exit status and the checkpoints it left.
    """
    rng = random.Random(seed)
    log = []
    deadline = time.monotonic() + timeout
    kinds = ("in_save", "mid_training", "from_start")
    while True:
        first = not log
        cmd = gptjax("train", *train_args, f"--out_dir={out}") if first else \
            gptjax("train", "--init_from=resume", f"--out_dir={out}")
        kill = sum(r["killed"] for r in log) < kills
        kind = ("mid_training" if first else kinds[len(log) % 3]) if kill else "to_the_end"
        start, started = _newest(out), time.time() - 1.0  # (mtimes may be coarser than time.time())
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        record = {"process": len(log) + 1, "command": "train" if first else "train --init_from=resume",
                  "from_step": max(start, 0), "kind": kind, "killed": False, "inside_save": False}
        if kind in ("in_save", "mid_training"):
            progressed = _poll(proc, lambda s=start: _newest(out) > s, deadline)
            if progressed and kind == "in_save":
                _poll(proc, lambda t=started: _in_save(out, t), deadline)
            elif progressed:
                time.sleep(rng.uniform(0.0, 0.3))
        elif kind == "from_start":
            time.sleep(rng.uniform(0.0, 4.0))
        if kind != "to_the_end" and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            record["killed"] = True
            record["inside_save"] = _in_save(out, started)  # this process's save outlived it, unfinished
        rest = proc.communicate(timeout=max(deadline - time.monotonic(), 1))[0]
        record["exit"] = proc.returncode
        ckpts = os.path.join(out, "checkpoints")
        record["checkpoints_after"] = sorted(n for n in os.listdir(ckpts) if not n.startswith(".")) \
            if os.path.isdir(ckpts) else []
        log.append(record)
        if not record["killed"]:
            if record["exit"] != 0:
                raise AssertionError(f"process {record['process']} ({record['command']}) failed: {rest[-3000:]}")
            if sum(r["killed"] for r in log) >= kills:
                return log
        if time.monotonic() > deadline:
            raise AssertionError(f"crash test ran past {timeout} s: {log}")
