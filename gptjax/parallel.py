"""Device mesh and shardings: data parallelism over a 'data' axis, parameters and optimizer state replicated.

Also the process settings every gptjax entry point applies: `use_all_cores` and `reuse_freed_memory` (for a CPU
host) and `use_compilation_cache`. jax is imported inside the functions so that `use_all_cores` can run before jax
initialises its backends.
"""

from __future__ import annotations

import ctypes
import os
import sys

HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def use_all_cores() -> None:
    """On a CPU host, expose one XLA device per core so a data-parallel step runs its shards side by side.

    A device count already in XLA_FLAGS is left alone; it has no effect once jax has started.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if HOST_DEVICES_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {HOST_DEVICES_FLAG}={cores()}".strip()


# mallopt(3) parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
MALLOC_ENV = "GPTJAX_MALLOC"


def reuse_freed_memory(limit: int = 1 << 30) -> bool:
    """Let glibc's malloc give freed blocks of up to `limit` bytes to the next request instead of to the kernel.

    XLA:CPU allocates a step's temporaries afresh at every call (44 MB for a `shakespeare_char_cpu` train step on
    one device). By default glibc serves blocks over 32 MB (over 64 MB on a worker thread's arena) with mmap and
    hands them back with munmap, so at every step the kernel faults in and zeroes each page again: a third of
    the CPU time went to the kernel, and the step took 1.6x as long (experiments/results/xla_vs_eager_cpu_levers.md).
    Here blocks up to `limit` come from the heap, the heap keeps up to `limit` free bytes, and all threads share
    the main arena, whose heap has no size cap. The cost: after a peak, up to `limit` freed bytes stay resident.

    Applied once per process on glibc; GPTJAX_MALLOC=default leaves malloc as it is. Returns whether applied.
    """
    if os.environ.get(MALLOC_ENV, "") == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    return all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, limit), (M_TRIM_THRESHOLD, limit), (M_ARENA_MAX, 1)))


CACHE_ENV = "GPTJAX_CACHE_DIR"


def compilation_cache_dir() -> str | None:
    """$GPTJAX_CACHE_DIR, default ~/.cache/gptjax/xla; None when it is set to "" or "off"."""
    path = os.environ.get(CACHE_ENV, os.path.join(os.path.expanduser("~"), ".cache", "gptjax", "xla"))
    return None if path.strip() in ("", "off") else path


def use_compilation_cache() -> str | None:
    """Keep compiled programs on disk (JAX's persistent compilation cache), so a second run of the same step on
    the same device and versions loads it instead of compiling it. Only programs that took over a second to
    compile are kept. Returns the directory, or None when it is off or cannot be made."""
    import jax

    path = compilation_cache_dir()
    if path is None:
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return path


def data_mesh(batch_size: int, devices=None):
    """A 1-D mesh over as many devices as evenly divide the batch."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    devices = list(devices if devices is not None else jax.devices())
    n = max(d for d in range(1, len(devices) + 1) if batch_size % d == 0)
    return Mesh(np.array(devices[:n]), ("data",))


def replicated(mesh):
    from jax.sharding import NamedSharding, PartitionSpec

    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh, batch_axis: int = 1):
    """Arrays shaped [..., B, T] split along B (axis 1 for the [A, B, T] micro-batch stacks)."""
    from jax.sharding import NamedSharding, PartitionSpec

    return NamedSharding(mesh, PartitionSpec(*([None] * batch_axis), "data"))
