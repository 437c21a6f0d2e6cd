"""The timing protocol every bench mode shares: a first call apart, warm-up, timed repeats; and a process's peak RSS."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from typing import Any


def time_calls(call: Callable[[int], Any], sync: Callable[[], Any], steps: int, warmup: int, repeats: int,
               sync_each: bool = False, clock: Callable[[], float] = time.perf_counter
               ) -> tuple[float, list[float], list[Any]]:
    """call(i) queues call i (on batch i) and returns its loss handle; sync() waits for everything queued.

    Returns (first call's seconds, seconds per call of each repeat, every call's handle). The first call
    (compilation, or an eager framework's first-touch work) is timed apart from the steady state. Train steps
    depend on each other; independent calls (forward, generate) are waited for one by one with sync_each, as an
    evaluation loop reads each result (and XLA:CPU's collectives can deadlock with many executions in flight).
    clock() is the time in seconds (a test's fake clock).
    """
    outs = []

    def one(i):
        outs.append(call(i))
        if sync_each:
            sync()

    tick = clock()
    one(0)
    sync()
    first = clock() - tick
    for i in range(1, 1 + warmup):
        one(i)
    sync()
    runs = []
    for r in range(repeats):
        tick = clock()
        for s in range(steps):
            one(1 + warmup + r * steps + s)
        sync()
        runs.append((clock() - tick) / steps)
    return first, runs, outs


def n_calls(steps: int, warmup: int, repeats: int) -> int:
    """Calls time_calls makes, so batches for each of them can be made in advance."""
    return 1 + warmup + repeats * steps


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    Linux's VmHWM belongs to this program alone; ru_maxrss would carry the forking parent's peak across exec.
    """
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return rss if sys.platform == "darwin" else rss * 1024
