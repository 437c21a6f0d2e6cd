"""Scaling out: the device mesh (dp x fsdp), the shardings of the train state and of batches made per process, and
the three forms of the train step (sharded jit, shard_map, pmap). Multi-host start-up: distributed.py.

Mesh axes: `dp` replicates the state and splits the batch; `fsdp` splits the batch too, and also splits each
parameter and AdamW moment of >= 2 dimensions along its largest axis that divides evenly (small ones replicated).

Also the process settings every gptjax entry point applies (`process_settings`: `use_all_cores` and
`reuse_freed_memory` for a CPU host, gpu.py's for an NVIDIA GPU) and `use_compilation_cache`. jax is imported
inside the functions so that `use_all_cores` can run before jax initialises its backends.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys

from gptjax.errors import UserError

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


def process_settings() -> bool:
    """What every gptjax entry point sets before jax starts (importing gptjax has already run gpu.skip_absent_gpu):
    use_all_cores, gpu.use_gpu_flags and reuse_freed_memory; returns whether the last was applied."""
    from gptjax import gpu

    use_all_cores()
    gpu.use_gpu_flags()
    return reuse_freed_memory()


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

    Applied once per process on glibc, where jax will run on the CPU: not where it will start on an NVIDIA GPU
    (gpu.gpu_expected), whose compiler and autotuner run in thread pools that one arena would serialise, and whose step
    buffers live on the device. GPTJAX_MALLOC=default leaves malloc as it is. Returns whether applied.
    """
    from gptjax import gpu

    if os.environ.get(MALLOC_ENV, "") == "default" or not sys.platform.startswith("linux") or gpu.gpu_expected():
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
    from gptjax.config import cache_home, expand_path

    path = expand_path(os.environ.get(CACHE_ENV, os.path.join(cache_home(), "xla")))
    return None if path.strip() in ("", "off") else path


def use_compilation_cache() -> str | None:
    """Keep compiled programs on disk (JAX's persistent compilation cache), so a second run of the same step on
    the same device and versions loads it instead of compiling it. Returns the directory, or None when it is off or
    cannot be made."""
    import jax

    path = compilation_cache_dir()
    if path is None:
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    # Every program, however quick to compile: a run's start-up is dozens of small ones (each initialiser, the
    # estimates, the sampler), 2 s of compiling on a CPU that the cache turns into 0.5 s. No size bound: jax's
    # eviction (jax_compilation_cache_max_size) fails every write in a directory holding entries written without
    # it (it looks for their access-time files), which is every cache made before; delete the directory to clear it.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


AXES = ("dp", "fsdp")  # the mesh's axes; the batch is split over both


def parse_mesh(spec: str, n_devices: int) -> dict[str, int]:
    """--mesh=dp:N,fsdp:M -> {"dp": N, "fsdp": M}; an axis left out has size 1, one size may be -1 (the rest).

    Empty: every device on dp. The sizes must multiply to n_devices."""
    if not spec.strip():
        return {"dp": n_devices, "fsdp": 1}
    sizes: dict[str, int] = {}
    for part in spec.split(","):
        name, colon, raw = part.strip().partition(":")
        if name not in AXES or not colon or name in sizes:
            raise UserError(f"--mesh={spec}: write each axis once as axis:size, over {' and '.join(AXES)}, e.g. "
                            "--mesh=dp:2,fsdp:4")
        try:
            sizes[name] = int(raw)
        except ValueError:
            raise UserError(f"--mesh={spec}: {name}'s size {raw!r} is not an integer") from None
        if sizes[name] < 1 and sizes[name] != -1:
            raise UserError(f"--mesh={spec}: {name}'s size must be at least 1 (or -1 for the devices left)")
    if list(sizes.values()).count(-1) > 1:
        raise UserError(f"--mesh={spec}: only one axis may be -1")
    known = math.prod(v for v in sizes.values() if v != -1)
    if -1 in sizes.values():
        if n_devices % known:
            raise UserError(f"--mesh={spec}: {n_devices} devices do not divide by {known}, so -1 has no size; "
                            f"pick sizes that multiply to {n_devices}")
        sizes = {k: n_devices // known if v == -1 else v for k, v in sizes.items()}
    full = {axis: sizes.get(axis, 1) for axis in AXES}
    if math.prod(full.values()) != n_devices:
        raise UserError(f"--mesh={spec}: dp:{full['dp']} x fsdp:{full['fsdp']} is {math.prod(full.values())} "
                        f"devices, but there are {n_devices}: make the sizes multiply to {n_devices}, or write -1 "
                        "for one of them")
    return full


def make_mesh(spec: str, batch_size: int, devices=None):
    """The (dp, fsdp) mesh of --mesh over `devices` (default: every device of every process).

    The batch must divide over dp x fsdp. With no --mesh, dp takes as many devices as evenly divide the batch."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    devices = list(devices if devices is not None else jax.devices())
    if not spec.strip():
        n = max(d for d in range(1, len(devices) + 1) if batch_size % d == 0)
        if jax.process_count() > 1 and n != len(devices):
            raise UserError(f"--batch_size={batch_size} does not divide over the {len(devices)} devices of "
                            f"{jax.process_count()} processes: make it a multiple of {len(devices)}")
        devices = devices[:n]
    sizes = parse_mesh(spec, len(devices))
    shards = sizes["dp"] * sizes["fsdp"]
    if batch_size % shards:
        raise UserError(f"--batch_size={batch_size} does not divide over the mesh's {shards} batch shards (dp:"
                        f"{sizes['dp']} x fsdp:{sizes['fsdp']}): make it a multiple of {shards}")
    shape = tuple(sizes[a] for a in AXES)
    try:  # the topology-aware order on TPUs and GPUs
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.array(devices).reshape(shape)
    return Mesh(grid, AXES)


def data_mesh(batch_size: int, devices=None):
    """A data-parallel mesh (fsdp 1) over as many devices as evenly divide the batch."""
    return make_mesh("", batch_size, devices)


def describe_mesh(mesh) -> str:
    return " x ".join(f"{a}:{mesh.shape[a]}" for a in AXES)


def describe_devices(mesh) -> str:
    """e.g. 'dp:4 x fsdp:2 (8 gpu devices in 2 processes)'."""
    import jax

    n, processes = mesh.size, jax.process_count()
    return (f"{describe_mesh(mesh)} ({n} {mesh.devices.flat[0].platform} device{'s' if n > 1 else ''}"
            + (f" in {processes} processes)" if processes > 1 else ")"))


def replicated(mesh):
    from jax.sharding import NamedSharding, PartitionSpec

    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh, batch_axis: int = 1):
    """Arrays shaped [..., B, T] split along B over dp x fsdp (axis 1 for the [A, B, T] micro-batch stacks)."""
    from jax.sharding import NamedSharding, PartitionSpec

    return NamedSharding(mesh, PartitionSpec(*([None] * batch_axis), AXES))


def fsdp_spec(shape: tuple[int, ...], fsdp: int):
    """A tensor of >= 2 dimensions is split over fsdp along its largest axis that fsdp divides; others replicate."""
    from jax.sharding import PartitionSpec

    if fsdp > 1 and len(shape) >= 2:
        for axis in sorted(range(len(shape)), key=lambda i: -shape[i]):
            if shape[axis] % fsdp == 0:
                return PartitionSpec(*(AXES[1] if i == axis else None for i in range(len(shape))))
    return PartitionSpec()


def state_sharding(mesh, tree):
    """The sharding of every leaf of a train state (or params) on the mesh: FSDP for matrices, replicated else."""
    import jax
    from jax.sharding import NamedSharding

    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, mesh.shape[AXES[1]])), tree)


def check_impl(impl: str, mesh) -> None:
    from gptjax.config import check_choice

    check_choice("step_impl", impl)
    if impl != "sharded" and mesh.shape["fsdp"] > 1:
        raise UserError(f"--step_impl={impl} replicates the train state on every device, so it has no fsdp axis: "
                        f"use --mesh=dp:{mesh.size}, or --step_impl=sharded to shard the state")
    if impl == "pmap":
        import jax

        if jax.process_count() > 1:
            raise UserError("--step_impl=pmap runs within one process here: use --step_impl=sharded or shard_map "
                            "with --distributed")


class Layout:
    """Where one backend's train state and batches live on the mesh, and how they get there.

    sharded and shard_map keep the state as global arrays (`state_sharding`: FSDP or replicated); pmap keeps one
    copy per device, stacked on a leading device axis. `canonical` turns a state into the global form that
    checkpoints and loss estimates use; `place` puts a global-form state where the step wants it.
    """

    def __init__(self, mesh, impl: str = "sharded"):
        check_impl(impl, mesh)
        self.mesh, self.impl = mesh, impl

    def _stacked(self):
        """pmap's layout: a leading device axis over a 1-D mesh of the same devices, as pmap's outputs have it (on the
        2-D mesh, the step's first output would differ from its first input and compile it again)."""
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        return NamedSharding(Mesh(self.mesh.devices.reshape(-1), AXES[:1]), PartitionSpec(AXES[0]))

    def place(self, state):
        import jax
        import jax.numpy as jnp

        if self.impl != "pmap":
            return jax.device_put(state, state_sharding(self.mesh, state))
        if not hasattr(self, "_stack"):  # jitted once per layout, so that each later call reuses the program
            n = self.mesh.size
            self._stack = jax.jit(lambda s: jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), s),
                                  out_shardings=self._stacked())
        return self._stack(state)

    def canonical(self, state):
        import jax

        if self.impl != "pmap":
            return state
        if not hasattr(self, "_unstack"):
            self._unstack = jax.jit(lambda s: jax.tree.map(lambda x: x[0], s), out_shardings=replicated(self.mesh))
        return self._unstack(state)

    def batch(self, shape: tuple[int, ...], rows_of):
        """(x, y), global [..., B, T] arrays (pmap: [devices, ..., B/devices, T]) made per process:
        rows_of(lo, hi) -> numpy (x, y) rows lo:hi of B. Only this process's devices' rows are read and copied."""
        import jax

        k = len(shape) - 2  # the batch axis
        cache = {}

        def rows(lo, hi):
            if (lo, hi) not in cache:
                cache[(lo, hi)] = rows_of(lo, hi)
            return cache[(lo, hi)]

        if self.impl == "pmap":
            per = shape[k] // self.mesh.size
            sharding, shape = self._stacked(), (self.mesh.size, *shape[:k], per, shape[k + 1])

            def part(index, i):
                d = index[0].start or 0
                return rows(d * per, (d + 1) * per)[i][None]
        else:
            sharding = batch_sharding(self.mesh, k)

            def part(index, i):
                sl = index[k]
                return rows(sl.start or 0, shape[k] if sl.stop is None else sl.stop)[i]

        return tuple(jax.make_array_from_callback(shape, sharding, lambda index, i=i: part(index, i)) for i in (0, 1))


def compile_step(body, mesh, impl: str, state_like):
    """The train step `body(state, x, y, key, reduce) -> (state, metrics)` as `impl` runs it on the mesh.

    `reduce(loss, grads)` is where data parallelism shows: the identity for the sharded jit (XLA inserts the
    all-reduce the shardings imply), lax.pmean over the data axes for shard_map and pmap. `state_like` gives the
    state's structure and shapes (for the sharded jit's shardings).
    """
    import jax
    from jax.sharding import PartitionSpec as P

    from gptjax.kernels import split_over

    def train_step(s, x, y, k):
        with split_over(mesh if impl == "sharded" else None):  # the matmul kernel splits as XLA's dots do
            return body(s, x, y, k, lambda loss, grads: (loss, grads))

    if mesh is None:
        return jax.jit(train_step, donate_argnums=0)
    if impl == "sharded":
        state_sh = replicated(mesh) if state_like is None else state_sharding(mesh, state_like)
        rep, batch = replicated(mesh), batch_sharding(mesh)
        return jax.jit(train_step, in_shardings=(state_sh, batch, batch, rep), out_shardings=(state_sh, rep),
                       donate_argnums=0)

    def data_parallel(axes):
        def data_parallel_step(s, x, y, k):
            mean = lambda loss, grads: jax.lax.pmean((loss, grads), axes)  # noqa: E731
            # each device draws its own dropout masks for its rows
            return body(s, x, y, jax.random.fold_in(k, jax.lax.axis_index(axes)), mean)

        return data_parallel_step

    if impl == "shard_map":
        batch = P(None, AXES)
        # check_vma off: the model's custom-VJP ops do not annotate which values vary across devices
        return jax.jit(jax.shard_map(data_parallel(AXES), mesh=mesh, in_specs=(P(), batch, batch, P()),
                                     out_specs=(P(), P()), check_vma=False), donate_argnums=0)
    # pmap: one program per device over a leading device axis; the key is the same on every device
    return jax.pmap(data_parallel(AXES[0]), axis_name=AXES[0], in_axes=(0, 0, 0, None), donate_argnums=0,
                    devices=list(mesh.devices.flat))


def param_bytes_per_device(params) -> int:
    """The most bytes of `params` any one device holds (its shards of the sharded ones, all of the replicated)."""
    import jax

    held: dict = {}
    for leaf in jax.tree.leaves(params):
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return max(held.values())


def first(x) -> float:
    """A metric's value as a float: a replicated scalar, or pmap's per-device copies (the first)."""
    import numpy as np

    return float(np.asarray(x.addressable_shards[0].data).reshape(-1)[0])
