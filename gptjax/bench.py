"""Train-step benchmark: compile time, then the median of several timed runs of steady-state steps."""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np

from gptjax import data, model, parallel
from gptjax.config import Config
from gptjax.train import init_state, make_train_step, setup


def time_train_step(config: Config, steps: int = 20, repeats: int = 5) -> dict:
    """Seconds per optimizer step (median over `repeats` runs of `steps` steps) and the first call's time."""
    config, prep, graphdef, params, tx = setup(config)
    t, T = config.train, config.model.block_size
    A, B = t.gradient_accumulation_steps, t.batch_size
    tokens = prep.tokens("train")
    x, y = data.get_batch(tokens, A * B, T, t.seed, 0)
    mesh = parallel.data_mesh(B)  # as `train` runs it: the batch split over the devices that divide it
    x, y = (jax.device_put(a.reshape(A, B, T), parallel.batch_sharding(mesh)) for a in (x, y))
    step_fn = make_train_step(graphdef, tx, t, mesh)
    state = jax.device_put(init_state(params, tx), parallel.replicated(mesh))
    key = jax.random.PRNGKey(t.seed)
    tick = time.perf_counter()
    state, metrics = step_fn(state, x, y, key)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - tick
    runs = []
    for _ in range(repeats):
        tick = time.perf_counter()
        for _ in range(steps):
            state, metrics = step_fn(state, x, y, key)
        jax.block_until_ready(state)
        runs.append((time.perf_counter() - tick) / steps)
    per_step = statistics.median(runs)
    return {"device": jax.devices()[0].device_kind, "devices": mesh.size, "params": model.num_params(state.params),
            "first_call_s": first, "step_s": per_step, "step_s_runs": runs,
            "tokens_per_sec": A * B * T / per_step, "loss": float(np.asarray(metrics["loss"]))}


def run(config: Config, steps: int = 20, repeats: int = 5) -> dict:
    r = time_train_step(config, steps, repeats)
    m, t = config.model, config.train
    print(f"device: {r['devices']} x {r['device']}; {m.model} {m.n_layer}x{m.n_head}x{m.n_embd}, block {m.block_size}, "
          f"batch {t.batch_size}x{t.gradient_accumulation_steps}, {r['params'] / 1e6:.2f}M params")
    print(f"first call (compile + 1 step): {r['first_call_s']:.2f} s")
    print(f"train step: {r['step_s'] * 1e3:.1f} ms median of {repeats} runs x {steps} steps "
          f"(runs: {', '.join(f'{s * 1e3:.1f}' for s in r['step_s_runs'])} ms); {r['tokens_per_sec']:,.0f} tokens/s")
    return r
