import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from gptjax import model, parallel
    from gptjax.config import ModelConfig, TrainConfig
    from gptjax.optim import init_state, make_optimizer
    from gptjax.train import make_train_step

    assert len(jax.devices()) == 8
    assert parallel.data_mesh(12).size == 6 and parallel.data_mesh(7).size == 7 and parallel.data_mesh(16).size == 8
    mcfg = ModelConfig(vocab_size=29, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    t = TrainConfig(batch_size=8, max_iters=10, warmup_iters=2, lr_decay_iters=10)
    graphdef, params = model.split(model.create(mcfg, 0))
    tx = make_optimizer(t, params)
    mesh = parallel.data_mesh(8)
    single, sharded = make_train_step(graphdef, tx, t), make_train_step(graphdef, tx, t, mesh)
    s1 = init_state(jax.tree.map(jnp.copy, params), tx)
    s8 = jax.device_put(init_state(params, tx), parallel.replicated(mesh))
    key = jax.random.PRNGKey(0)
    for i in range(5):
        w = np.random.default_rng(i).integers(0, 29, (1, 8, 9)).astype(np.int32)
        s1, m1 = single(s1, w[..., :-1], w[..., 1:], key)
        s8, m8 = sharded(s8, w[..., :-1], w[..., 1:], key)
        np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
        assert len(b.sharding.device_set) == 8 and b.sharding.is_fully_replicated
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    print("sharded == single")
""")


def test_sharded_step_equals_single_device_step():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sharded == single" in r.stdout


def test_cli_exposes_one_device_per_core(monkeypatch):
    from gptjax import parallel

    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    parallel.use_all_cores()
    import os

    assert parallel.HOST_DEVICES_FLAG in os.environ["XLA_FLAGS"] and "fast_math" in os.environ["XLA_FLAGS"]
    monkeypatch.setenv("XLA_FLAGS", f"{parallel.HOST_DEVICES_FLAG}=3")
    parallel.use_all_cores()
    assert os.environ["XLA_FLAGS"] == f"{parallel.HOST_DEVICES_FLAG}=3"


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
