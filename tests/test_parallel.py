import subprocess
import sys
import textwrap

import pytest


def test_cli_exposes_one_device_per_core(monkeypatch):
    from gptjax import parallel

    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    parallel.use_all_cores()
    import os

    assert parallel.HOST_DEVICES_FLAG in os.environ["XLA_FLAGS"] and "fast_math" in os.environ["XLA_FLAGS"]
    monkeypatch.setenv("XLA_FLAGS", f"{parallel.HOST_DEVICES_FLAG}=3")
    parallel.use_all_cores()
    assert os.environ["XLA_FLAGS"] == f"{parallel.HOST_DEVICES_FLAG}=3"


def test_gpu_flags_are_added_unless_the_user_set_them(monkeypatch):
    import os

    from gptjax import gpu

    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    gpu.use_gpu_flags()
    assert os.environ["XLA_FLAGS"].split() == ["--xla_cpu_enable_fast_math=false", *gpu.GPU_XLA_FLAGS]
    mine = "--xla_gpu_enable_triton_gemm=true"
    monkeypatch.setenv("XLA_FLAGS", mine)
    gpu.use_gpu_flags()
    assert os.environ["XLA_FLAGS"] == mine  # the user's choice stands


def test_malloc_is_left_alone_where_jax_will_run_on_a_gpu(monkeypatch):
    """reuse_freed_memory is for XLA:CPU's per-step buffers; on a GPU host it would serialise the GPU compiler's
    threads on one arena. (Only the decision is checked here: mallopt's effect is MALLOC_SCRIPT's.)"""
    from gptjax import gpu, parallel

    monkeypatch.delenv(parallel.MALLOC_ENV, raising=False)
    monkeypatch.setattr(gpu, "gpu_expected", lambda: True)
    assert parallel.reuse_freed_memory() is False
    monkeypatch.undo()
    monkeypatch.setattr(gpu, "cuda_plugin_installed", lambda: True)
    monkeypatch.setattr(gpu, "nvidia_driver_present", lambda: True)
    for platforms, expected in (("", True), ("cuda", True), ("cpu", False), ("cpu,cuda", True)):
        monkeypatch.setenv("JAX_PLATFORMS", platforms)
        assert gpu.gpu_expected() is expected, platforms
    monkeypatch.setattr(gpu, "nvidia_driver_present", lambda: False)
    monkeypatch.delenv("JAX_PLATFORMS")
    assert gpu.gpu_expected() is False


MALLOC_SCRIPT = textwrap.dedent("""
    import ctypes, threading
    from gptjax import cli
    cli.main(["help"])  # what every gptjax command does before jax starts

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype, libc.malloc.restype, libc.free.argtypes = MallInfo2, ctypes.c_void_p, [ctypes.c_void_p]
    mapped, kept = [], []

    def step_buffer(n):  # as XLA:CPU treats a step's temporaries: allocated, written, freed, at every call
        before = libc.mallinfo2().hblkhd
        p = libc.malloc(n)
        ctypes.memset(p, 1, n)
        mapped.append(libc.mallinfo2().hblkhd - before)  # bytes glibc mmapped for it (unmapped again on free)
        libc.free(p)
        kept.append(int(libc.mallinfo2().arena >= n))  # still in the heap after free, not trimmed back to the OS

    step_buffer(48 << 20)  # 44 MB: the one-device shakespeare_char_cpu step, on the calling thread
    worker = threading.Thread(target=step_buffer, args=(96 << 20,))  # over 64 MiB, on a thread of XLA's pool
    worker.start()
    worker.join()
    print(*mapped, kept[0])
""")


def _mmapped_step_buffers(env: dict) -> list[int]:
    import os

    r = subprocess.run([sys.executable, "-c", MALLOC_SCRIPT], capture_output=True, text=True, timeout=300,
                       env={**os.environ, **env})
    assert r.returncode == 0, r.stderr[-3000:]
    return [int(v) for v in r.stdout.strip().splitlines()[-1].split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_cli_keeps_freed_step_buffers_for_reuse():
    # glibc's defaults mmap a block over 32 MiB (over 64 MiB from a thread's arena) and unmap it on free, so XLA:CPU's
    # per-step temporaries were faulted in and zeroed by the kernel at every step: a third of a train step's time.
    # mallinfo2's hblkhd (bytes in mmapped blocks) shows where glibc put each block.
    main_thread, worker, _ = _mmapped_step_buffers({"GPTJAX_MALLOC": "default"})  # what the fix changes
    assert main_thread >= 48 << 20 and worker >= 96 << 20
    # from the heap, and kept there (not trimmed) for the next step
    assert _mmapped_step_buffers({"GPTJAX_MALLOC": ""}) == [0, 0, 1]


def test_jax_is_sent_to_the_cpu_only_where_no_accelerator_can_start(monkeypatch):
    """skip_absent_gpu: JAX_PLATFORMS=cpu with the CUDA plugin installed and neither an NVIDIA driver nor another
    accelerator's plugin (libtpu, ROCm); never over the user's own JAX_PLATFORMS."""
    import os

    from gptjax import gpu

    def decide(plugin=True, driver=False, other=False, platforms=None):
        monkeypatch.setattr(gpu, "cuda_plugin_installed", lambda: plugin)
        monkeypatch.setattr(gpu, "nvidia_driver_present", lambda: driver)
        monkeypatch.setattr(gpu, "other_accelerator_installed", lambda: other)
        if platforms is None:
            monkeypatch.delenv("JAX_PLATFORMS", raising=False)
        else:
            monkeypatch.setenv("JAX_PLATFORMS", platforms)
        return gpu.skip_absent_gpu(), os.environ.get("JAX_PLATFORMS")

    assert decide() == (True, "cpu")
    assert decide(driver=True) == (False, None)
    assert decide(other=True) == (False, None)
    assert decide(plugin=False) == (False, None)
    assert decide(platforms="cuda") == (False, "cuda")
