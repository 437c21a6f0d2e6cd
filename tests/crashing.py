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


def _wait_for_output(proc, needle: str, deadline: float) -> bool:
    """Read the process's merged output until a line holds needle; False if it ended first."""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            return False
        if needle in line:
            return True
    return False


def _in_save(out: str) -> bool:
    root = os.path.join(out, "checkpoints")
    return os.path.isdir(root) and any(n.startswith(".tmp_step") or n.startswith(".tmp_best")
                                       for n in os.listdir(root))


def crash_and_resume(train_args: list[str], out: str, kills: int, seed: int = 0, timeout: float = 300.0) -> list[dict]:
    """Start `gptjax train *train_args --out_dir=out`, SIGKILL it, resume with `gptjax train --init_from=resume
    --out_dir=out`, again and again: at least `kills` kills, then one resume runs to the end.

    The moments cycle through three kinds: as soon as a checkpoint save is under way (a .tmp_ directory in
    checkpoints/), a random time after the train step has compiled, and a random time after the process started
    (import, setup, restore). The first process is killed only once it has compiled, so the run exists.
    Returns one record per process: its kind, whether it was killed, what it was doing, and its exit status.
    """
    rng = random.Random(seed)
    log = []
    deadline = time.monotonic() + timeout
    kinds = ("in_save", "after_compile", "from_start")
    while True:
        first = not log
        cmd = gptjax("train", *train_args, f"--out_dir={out}") if first else \
            gptjax("train", "--init_from=resume", f"--out_dir={out}")
        kill = sum(r["killed"] for r in log) < kills
        kind = kinds[len(log) % 3] if kill and not first else ("after_compile" if kill else "to_the_end")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        record = {"process": len(log) + 1, "command": "train" if first else "train --init_from=resume",
                  "kind": kind, "killed": False, "inside_save": False}
        if kind == "in_save":
            while proc.poll() is None and not _in_save(out) and time.monotonic() < deadline:
                time.sleep(0.0005)  # polling for the save to begin; the kill's outcome is checked, not timed
        elif kind == "after_compile":
            _wait_for_output(proc, "compiled the train step", deadline)
            time.sleep(rng.uniform(0.0, 0.8))
        elif kind == "from_start":
            time.sleep(rng.uniform(0.0, 4.0))
        if kind != "to_the_end" and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            record["killed"] = True
            record["inside_save"] = _in_save(out)  # the save's temporary directory outlived the process
        rest = proc.communicate(timeout=max(deadline - time.monotonic(), 1))[0]
        record["exit"] = proc.returncode
        record["tail"] = rest.strip().splitlines()[-1][:200] if rest.strip() else ""
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
