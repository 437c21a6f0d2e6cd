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
    from gptjax.train import init_state, make_optimizer, make_train_step

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


FAULTS_SCRIPT = textwrap.dedent("""
    import resource
    from gptjax import cli
    cli.main(["help"])  # what every gptjax command does before jax starts
    import jax, jax.numpy as jnp

    def f(x, w):
        h = jnp.tanh(x @ w)  # [4096, 4096] f32: a 64 MiB temporary that the backward pass keeps
        return (h @ w.T).sum()

    g = jax.jit(jax.grad(f, argnums=1))
    x, w = jnp.ones((4096, 256)), jnp.full((256, 4096), 1e-3)
    for _ in range(3):
        g(x, w).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        g(x, w).block_until_ready()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
""")


def _page_faults_per_call(env: dict) -> float:
    import os

    r = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT], capture_output=True, text=True, timeout=300,
                       env={**os.environ, **env})
    assert r.returncode == 0, r.stderr[-3000:]
    return float(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_cli_keeps_freed_step_buffers_mapped():
    # XLA:CPU allocates a step's temporaries at every call; with glibc's defaults each call maps them afresh and
    # the kernel faults in (and zeroes) every page again: 35k faults a call here, a third of a train step's time.
    tuned = _page_faults_per_call({"GPTJAX_MALLOC": ""})
    default = _page_faults_per_call({"GPTJAX_MALLOC": "default"})
    assert default > 16384 / 2, default  # the 64 MiB temporary alone is 16384 pages
    assert tuned < default / 3, (tuned, default)
