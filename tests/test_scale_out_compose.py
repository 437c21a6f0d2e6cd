"""Gradient accumulation, bfloat16 and scanned layers composed with every scale-out backend, and each device's own
dropout masks: train's step straight through the API, in one 8-device interpreter (a module of its own, so that
pytest --dist loadscope can run it beside test_scale_out's CLI runs)."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from test_scale_out import CASES, _env

COMPOSE = textwrap.dedent("""
    import dataclasses, json, logging, os, re
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax
    import numpy as np
    jax.config.update("jax_log_compiles", True)
    from gptjax import model, optim, parallel, train
    from gptjax.compute import Compute
    from gptjax.config import ModelConfig, TrainConfig

    compiles = []

    class CountStepCompiles(logging.Handler):
        def emit(self, record):
            if re.match(r"Compiling jit\\((train_step|data_parallel_step|_fun)\\)", record.getMessage()):
                compiles.append(1)

    logging.getLogger("jax").addHandler(CountStepCompiles())

    def run(graphdef, params, t, impl, spec, batches):  # one step per [A, B, T + 1] batch, as train sets it up
        compiles.clear()
        tx = optim.make_optimizer(t, params)
        state, layout = optim.init_state(jax.tree.map(np.array, params), tx), None  # the step donates it
        if impl is None:
            step = train.make_train_step(graphdef, tx, t)
        else:
            layout = parallel.Layout(parallel.make_mesh(spec, t.batch_size), impl)
            state = jax.device_put(state, parallel.state_sharding(layout.mesh, state))
            step = train.make_train_step(graphdef, tx, t, layout.mesh, impl, state)
            state = layout.place(state)
        losses = []
        for tokens in batches:
            x, y = tokens[..., :-1], tokens[..., 1:]
            if layout is not None:
                x, y = layout.batch(x.shape, lambda lo, hi: (x[:, lo:hi], y[:, lo:hi]))
            state, metrics = step(state, x, y, jax.random.PRNGKey(0))
            losses.append(parallel.first(metrics["loss"]))
        state = state if layout is None else layout.canonical(state)
        return {"losses": losses, "compiles": len(compiles),
                "params": [np.asarray(p).tolist() for p in jax.tree.leaves(state.params)]}

    c = ModelConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32)
    A, B, T, STEPS = 2, 16, 16, 2
    t = TrainConfig(gradient_accumulation_steps=A, batch_size=B, learning_rate=1e-3)
    tokens = np.random.default_rng(0).integers(0, 65, (STEPS, A, B, T + 1)).astype(np.int32)
    cases = json.loads(os.environ["CASES"])
    out = {}
    for dtype in ("float32", "bfloat16"):
        graphdef, params = model.split(model.create(c, 0, Compute(dtype=dtype, scan=True)))
        for name, (impl, spec) in {"one": (None, None), **cases}.items():
            out[f"{dtype} {name}"] = run(graphdef, params, t, impl, spec, tokens)

    # dropout: one step on the same 2 rows repeated on every device (dp:8), and on one device
    graphdef, params = model.split(model.create(dataclasses.replace(c, n_layer=1, dropout=0.1), 0))
    shard = tokens[:1, :1, :2]  # [1, 1, 2, T + 1]
    tiled = np.tile(shard, (1, 1, 8, 1))
    t1 = TrainConfig(batch_size=16, learning_rate=1e-3, warmup_iters=0)
    for name, impl, batch in (("one shard", None, shard), ("shard_map_dp8", "shard_map", tiled),
                              ("pmap_dp8", "pmap", tiled)):
        t_rows = dataclasses.replace(t1, batch_size=batch.shape[2])
        out[f"dropout {name}"] = run(graphdef, params, t_rows, impl, "dp:8", batch)
    print(json.dumps(out))
""")


COMPOSED = {k: v for k, v in CASES.items() if k != "dp4_fsdp2"}  # dp x fsdp: the CLI runs (test_every_backend...)


@pytest.fixture(scope="module")
def composed():
    """COMPOSE's runs, in one 8-device interpreter."""
    r = subprocess.run([sys.executable, "-c", COMPOSE], capture_output=True, text=True, timeout=300,
                       env={**_env(), "CASES": json.dumps(COMPOSED)})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_accumulation_bfloat16_and_scanned_layers_compose_with_every_backend(composed):
    """Every backend and mesh on 2 accumulated micro-batches through scanned layers, in float32 and in bfloat16,
    against the one-device step: 2 steps, from the same init and batches, straight through train's own step."""
    got = composed
    # bfloat16 rounds each device's matmuls over its own rows: measured <= 1.7e-5 in the loss and 2.1e-5 in the
    # parameters (float32: 4.8e-7 and 1.3e-8); a device left out of the mean moves parameters by ~lr = 1e-3
    tolerance = {"float32": 1e-5, "bfloat16": 1e-4}
    for dtype, tol in tolerance.items():
        ref = got[f"{dtype} one"]
        for name in COMPOSED:
            run = got[f"{dtype} {name}"]
            assert run["compiles"] == 1 and ref["compiles"] == 1, (dtype, name, run["compiles"])
            np.testing.assert_allclose(run["losses"], ref["losses"], rtol=0, atol=tol, err_msg=f"{dtype} {name}")
            for a, b in zip(ref["params"], run["params"]):
                np.testing.assert_allclose(a, b, rtol=0, atol=tol, err_msg=f"{dtype} {name}")
    one = [np.asarray(p) for p in got["float32 one"]["params"]]
    moved = max(float(np.abs(a - b).max()) for a, b in zip(one, got["bfloat16 one"]["params"]))
    assert moved > 0  # bfloat16 really ran in bfloat16


def test_each_device_draws_its_own_dropout_masks(composed):
    """The same 2 rows on each of 8 devices, one step with dropout: shard_map and pmap fold the device's index into
    its key, so the mean of 8 devices' losses and gradients is not one device's step on those rows (devices that
    drew the same masks would give exactly that; measured: 3e-3 apart in the loss, 2e-3 = 2 lr in the parameters).
    The sharded jit draws the global batch's masks, as one device does (measured equal within 5e-7): no check here,
    it would cost two more compiles."""
    one_shard = composed["dropout one shard"]
    for name in ("shard_map_dp8", "pmap_dp8"):
        run = composed[f"dropout {name}"]
        assert run["compiles"] == 1, (name, run["compiles"])
        assert abs(run["losses"][0] - one_shard["losses"][0]) > 1e-4, (name, run["losses"], one_shard["losses"])
        moved = max(float(np.abs(np.subtract(a, b)).max()) for a, b in zip(run["params"], one_shard["params"]))
        assert moved > 1e-4, (name, moved)
