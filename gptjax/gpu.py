"""NVIDIA GPUs, seen before jax starts: whether jax will start on one, the XLA flags gptjax runs them with, and a
quiet CPU start where jax's CUDA plugin is installed but there is no GPU (as for gptjax.bench.inspect)."""

from __future__ import annotations

import os

# XLA flags for NVIDIA GPUs, chosen by measurement and applied by every gptjax entry point (use_gpu_flags):
# cuBLAS instead of Triton for the GEMMs: on an H100, shakespeare_char's scanned step compiled in 5.4 s instead of
# 11.0 s (the autotuner has no Triton tilings to try) and ran 3.5% faster (experiments/results/gpu_speed.md). The
# unrolled step is yet to be timed both ways: experiments/results/gpu_inspect.md.
GPU_XLA_FLAGS = ("--xla_gpu_enable_triton_gemm=false",)


CUDA_PLUGINS = ("jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")  # jax[cuda12] and jax[cuda13]


def _installed(module: str) -> bool:
    from importlib import util

    try:
        return util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def cuda_plugin_installed() -> bool:
    return any(_installed(m) for m in CUDA_PLUGINS)


def other_accelerator_installed() -> bool:
    """A jax plugin for another accelerator (libtpu, a ROCm or other PJRT plugin) besides the CUDA ones."""
    import pkgutil

    if _installed("libtpu"):
        return True
    try:
        import jax_plugins
    except ImportError:
        return False
    return any(f"jax_plugins.{m.name}" not in CUDA_PLUGINS for m in pkgutil.iter_modules(jax_plugins.__path__))


def nvidia_driver_present() -> bool:
    """An NVIDIA driver's device files or its /proc entry, or WSL2's GPU device (what a CUDA process needs)."""
    import glob

    return (os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/dxg")
            or bool(glob.glob("/dev/nvidia[0-9]*")))


def gpu_expected() -> bool:
    """Whether jax will start on an NVIDIA GPU: its CUDA plugin installed, a driver present, JAX_PLATFORMS open."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    return (cuda_plugin_installed() and nvidia_driver_present()
            and (not platforms or any(p in platforms.split(",") for p in ("cuda", "gpu"))))


def skip_absent_gpu() -> bool:
    """JAX_PLATFORMS=cpu where it is unset, jax's CUDA plugin is installed (gptjax[cuda], for bench.inspect), there
    is no NVIDIA driver and no other accelerator's plugin: jax would print the CUDA plugin's failed start, a
    traceback, before falling back to the CPU. Returns whether set."""
    if ("JAX_PLATFORMS" in os.environ or not cuda_plugin_installed() or nvidia_driver_present()
            or other_accelerator_installed()):
        return False
    os.environ["JAX_PLATFORMS"] = "cpu"
    return True


def use_gpu_flags() -> None:
    """Add GPU_XLA_FLAGS to XLA_FLAGS, each unless XLA_FLAGS already sets that flag (so a user's choice stands). Only
    XLA's GPU backend reads them; no effect once jax has started."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    names = {f.split("=")[0] for f in flags}
    os.environ["XLA_FLAGS"] = " ".join(flags + [f for f in GPU_XLA_FLAGS if f.split("=")[0] not in names])
