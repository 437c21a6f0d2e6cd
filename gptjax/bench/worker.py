"""One benchmark mode in a process of its own: `python -m gptjax.bench.worker SPEC.json RESULT.json`.

A spec names the mode, the workload, the config, the timing protocol and the files holding the initial weights and
the batches; the result holds the first call's time, each repeat's seconds per call, every call's loss, the device
and the peak memory. JAX and PyTorch never share a process, so allocators and thread pools never meet.
"""

from __future__ import annotations

import json
import resource
import sys
import time

USER_ERROR = 2  # exit status of a worker that found a bad option; its result file is {"user_error": line}


def time_calls(call, sync, steps: int, warmup: int, repeats: int, sync_each: bool = False, clock=time.perf_counter):
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


def main(argv: list[str]) -> int:
    from gptjax import parallel

    malloc = "reuse_freed_memory" if parallel.reuse_freed_memory() else "default"
    spec_path, result_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    from gptjax.errors import UserError

    if spec["mode"].startswith("torch"):
        from gptjax.bench import torch_modes as impl
    else:
        from gptjax.bench import jax_modes as impl
    try:
        result = impl.run(spec)
    except UserError as e:  # an option this device cannot run (--attention=cudnn on a CPU): the runner's to say
        with open(result_path, "w") as f:
            json.dump({"user_error": str(e)}, f)
        return USER_ERROR
    if result.get("peak_mem_bytes") is None:
        result["peak_mem_bytes"], result["peak_mem_source"] = peak_rss_bytes(), "process peak RSS"
    result["malloc"] = malloc
    with open(result_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
