"""The optional CPU matmul kernel: gemm.cc, an XLA FFI handler that calls oneMKL (AMX or AVX-512 where the CPU has
them), built on first use with the machine's C++ compiler and kept in ~/.cache/gptjax/kernels ($GPTJAX_KERNEL_DIR).

It needs a C++ compiler (`$CXX`, else g++ or c++) and oneMKL's sequential libraries (`pip install gptjax[mkl]`, or a
system oneMKL on the library path). Without either, `available()` says why and the model runs on XLA's dots.
The kernel runs in XLA's own intra-op thread pool: MKL is linked sequential and starts no threads of its own.
"""

from __future__ import annotations

import contextlib
import contextvars
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig

TARGET = "gptjax_gemm"
SOURCE = os.path.join(os.path.dirname(__file__), "gemm.cc")
MKL_LIBS = ("mkl_intel_lp64", "mkl_sequential", "mkl_core")
MKL_ENV = "GPTJAX_MKL_DIR"  # a directory holding MKL_LIBS, searched first

_state: dict = {}  # "status": (ok, words) once load() has run in this process
_MESH: contextvars.ContextVar = contextvars.ContextVar("gptjax_kernel_mesh", default=None)  # see split_over


def _lib_dirs() -> list[str]:
    """Where oneMKL's libraries may be: $GPTJAX_MKL_DIR, this environment's lib (the mkl wheel puts them there),
    $LD_LIBRARY_PATH, then the system's."""
    dirs = [os.environ.get(MKL_ENV, ""), os.path.join(sys.prefix, "lib"), sysconfig.get_config_var("LIBDIR") or "",
            *os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep),
            "/usr/lib/x86_64-linux-gnu", "/usr/local/lib", "/opt/intel/oneapi/mkl/latest/lib"]
    return [d for d in dict.fromkeys(dirs) if d and os.path.isdir(d)]


def find_mkl() -> tuple[str, list[str]] | None:
    """(directory, [file name per MKL_LIBS]) of the first directory that has all three, or None."""
    for d in _lib_dirs():
        names = []
        for lib in MKL_LIBS:
            found = sorted(glob.glob(os.path.join(d, f"lib{lib}.so*")), key=len)
            if not found:
                break
            names.append(os.path.basename(found[0]))
        else:
            return d, names
    return None


def compiler() -> str | None:
    for c in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if c and shutil.which(c):
            return shutil.which(c)
    return None


def cache_dir() -> str:
    """Where built kernels are kept: $GPTJAX_KERNEL_DIR, default ~/.cache/gptjax/kernels (whatever the XLA cache's
    setting: GPTJAX_CACHE_DIR=off turns off compiled programs, not the kernel)."""
    from gptjax.config import cache_home, expand_path

    return expand_path(os.environ.get("GPTJAX_KERNEL_DIR") or os.path.join(cache_home(), "kernels"))


def build() -> str:
    """Compile gemm.cc against this jaxlib's FFI headers and the oneMKL found, once per (source, jaxlib, MKL,
    compiler); returns the shared library's path. Raises RuntimeError with the reason it cannot."""
    import jax
    import jaxlib

    mkl, cxx = find_mkl(), compiler()
    if mkl is None:
        raise RuntimeError("oneMKL's sequential libraries were not found (pip install 'gptjax[mkl]', or set "
                           f"{MKL_ENV} to the directory of libmkl_sequential.so)")
    if cxx is None:
        raise RuntimeError("no C++ compiler (install g++, or set CXX)")
    with open(SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(b"\0".join([source, jaxlib.__version__.encode(), mkl[0].encode(), *map(str.encode, mkl[1]),
                                     cxx.encode()])).hexdigest()[:16]
    out_dir = cache_dir()
    path = os.path.join(out_dir, f"gemm-{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(out_dir, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", "-I", jax.ffi.include_dir(), SOURCE, "-o", tmp,
           "-L", mkl[0], *(f"-l:{n}" for n in mkl[1]), f"-Wl,-rpath,{mkl[0]}"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines() or [f"exit status {done.returncode}"]
            first = next((ln for ln in lines if "error" in ln), lines[-1])
            raise RuntimeError(f"compiling gemm.cc failed ({' '.join(cmd[:1])}): {first.strip()}")
        os.replace(tmp, path)  # processes building at once each write their own file; the last rename wins
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load() -> tuple[bool, str]:
    """(True, where it came from) once the kernel is registered with XLA in this process, else (False, why not).
    Builds it first if needed; the answer is kept for the process. GPTJAX_KERNEL=off refuses it (the fallback)."""
    if "status" in _state:
        return _state["status"]
    if os.environ.get("GPTJAX_KERNEL", "").lower() in ("off", "0", "none"):
        _state["status"] = (False, "GPTJAX_KERNEL=off")
        return _state["status"]
    try:
        import ctypes

        import jax

        path = build()
        lib = ctypes.cdll.LoadLibrary(path)
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.GptjaxGemm), platform="cpu")
        _state["status"] = (True, f"oneMKL from {find_mkl()[0]}")
    except (RuntimeError, OSError, subprocess.SubprocessError, AttributeError) as e:
        _state["status"] = (False, str(e))
    return _state["status"]


def status() -> tuple[bool, str] | None:
    """load()'s answer if it has run in this process, else None (nothing built or tried)."""
    return _state.get("status")


def available() -> bool:
    return load()[0]


def gemm(a, b, trans_a: bool = False, trans_b: bool = False):
    """op(a) @ op(b) in float32 through the kernel; op transposes the last two axes where asked. a: [..., M, K],
    b: [..., K, N] with a's batch axes or none; float32 or bfloat16 (both the same). Call load() first."""
    import jax
    import jax.numpy as jnp

    m = a.shape[-1] if trans_a else a.shape[-2]
    n = b.shape[-2] if trans_b else b.shape[-1]
    out = jax.ShapeDtypeStruct(a.shape[:-2] + (m, n), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="broadcast_all")(a, b, trans_a=trans_a, trans_b=trans_b)


@contextlib.contextmanager
def split_over(mesh):
    """While a step that XLA splits over `mesh` by its shardings (a jit with in_shardings) is traced, the kernel's
    products split the same way: see matmul. Enter it inside the traced function; shard_map and pmap bodies, which
    already run per device, must not."""
    token = _MESH.set(mesh)
    try:
        yield
    finally:
        _MESH.reset(token)


def current_mesh():
    """The mesh of the innermost split_over, or None."""
    return _MESH.get()


def matmul(a, b, trans_a: bool = False, trans_b: bool = False, mesh=None):
    """gemm for two matrices, float32 out; under split_over(mesh) (or given `mesh`), split as XLA splits its dots:
    each device takes its rows of `a` (op(a)'s M, or the contracted rows when trans_a) against the whole of `b`,
    and a product over the rows is summed across the devices (data parallelism's weight gradient). XLA cannot
    split a library call itself: it would gather every operand onto every device, and each would compute the
    whole product.

    This is a shard_map rather than jax's custom_partitioning, whose lowering names a Python object by its id():
    the program would differ in every process and never load from the persistent compilation cache."""
    mesh = mesh or _MESH.get()
    # rows that do not divide over the devices (never the case for a batch the mesh was made for): the product
    # stays whole on every device, correct but not split
    if mesh is None or mesh.size == 1 or a.shape[0] % mesh.size:
        return gemm(a, b, trans_a, trans_b)
    import jax
    from jax.sharding import PartitionSpec as P

    axes = tuple(mesh.axis_names)
    rows = P(axes, None)
    if trans_a:  # b's rows are the same contracted rows: b is [rows, N], or [N, rows] with trans_b
        if trans_b:
            b = b.T

        def local(a, b):
            return jax.lax.psum(gemm(a, b, True, False), axes)

        return jax.shard_map(local, mesh=mesh, in_specs=(rows, rows), out_specs=P(), check_vma=False)(a, b)
    return jax.shard_map(lambda a, b: gemm(a, b, False, trans_b), mesh=mesh, in_specs=(rows, P()), out_specs=rows,
                         check_vma=False)(a, b)
