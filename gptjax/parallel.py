"""Device mesh and shardings: data parallelism over a 'data' axis, parameters and optimizer state replicated.

jax is imported inside the functions so that `use_all_cores` can run before jax initialises its backends.
"""

from __future__ import annotations

import os

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
