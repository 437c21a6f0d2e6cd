"""Model-level speed levers for the XLA:CPU train step, measured side by side in one process.

    python experiments/cpu_levers.py --input=../shared/data/tinyshakespeare/input.txt [--config=shakespeare_char_cpu]
        [--devices=2] [--steps=30] [--repeats=9]

Each variant is the jitted train step of `gptjax train` (data parallel over --devices XLA CPU devices) traced with
one form of a layer: "before" is the model as it was (jax.nn.gelu(approximate=False), autodiff LayerNorm), the
others switch one lever on at a time, "now" is gptjax.model as shipped. The variants run in turn, --steps steps a
turn on distinct batches, so the drift of a shared machine falls on all alike; the median per step is printed.
Every variant computes the same function: the losses after the run are printed beside the times.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--input", required=True)
p.add_argument("--config", default="shakespeare_char_cpu")
p.add_argument("--devices", type=int, default=2)
p.add_argument("--steps", type=int, default=30)
p.add_argument("--repeats", type=int, default=9)
args = p.parse_args()
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from gptjax import data, model, parallel  # noqa: E402
from gptjax.config import load_config  # noqa: E402
from gptjax.train import init_state, make_train_step, setup  # noqa: E402


def autodiff_layer_norm(self, x_BTD):
    mean = x_BTD.mean(-1, keepdims=True)
    var = jnp.square(x_BTD - mean).mean(-1, keepdims=True)
    y = (x_BTD - mean) * jax.lax.rsqrt(var + self.eps) * self.weight[...]
    return y if self.bias is None else y + self.bias[...]


@contextlib.contextmanager
def lever(gelu_erfc: bool, autodiff_ln: bool):
    """The model with the old GELU and/or LayerNorm forms while a variant is traced."""
    saved = model.gelu, model.LayerNorm.__call__
    if gelu_erfc:
        model.gelu = lambda x: jax.nn.gelu(x, approximate=False)
    if autodiff_ln:
        model.LayerNorm.__call__ = autodiff_layer_norm
    try:
        yield
    finally:
        model.gelu, model.LayerNorm.__call__ = saved


VARIANTS = {"before (erfc GELU, autodiff LayerNorm)": (True, True), "erf GELU only": (False, True),
            "LayerNorm VJP only": (True, False), "now (both)": (False, False)}

config = load_config(args.config, {"input": args.input})
config, prep, graphdef, params, tx = setup(config)
t, T = config.train, config.model.block_size
A, B = t.gradient_accumulation_steps, t.batch_size
mesh = parallel.data_mesh(B)
n_batches = 64  # distinct batches, cycled
batches = [tuple(jax.device_put(a.reshape(A, B, T), parallel.batch_sharding(mesh))
                 for a in data.get_batch(prep.tokens("train"), A * B, T, t.seed, i)) for i in range(n_batches)]
key = jax.random.PRNGKey(t.seed)
runs = {}
for name, flags in VARIANTS.items():
    with lever(*flags):
        fn = make_train_step(graphdef, tx, t, mesh)
        fresh = jax.tree.map(jnp.copy, params)  # each variant donates its own buffers
        state = jax.device_put(init_state(fresh, tx), parallel.replicated(mesh))
        state, _ = fn(state, *batches[0], key)  # compiled here, inside the lever
        jax.block_until_ready(state)
    runs[name] = {"fn": fn, "state": state, "i": 1, "ms": []}
for r in range(args.repeats + 1):  # the first turn warms up
    for v in runs.values():
        tick = time.perf_counter()
        for _ in range(args.steps):
            v["state"], metrics = v["fn"](v["state"], *batches[v["i"] % n_batches], key)
            v["i"] += 1
        jax.block_until_ready(v["state"])
        v["loss"] = float(metrics["loss"])
        if r:
            v["ms"].append((time.perf_counter() - tick) / args.steps * 1e3)
base = statistics.median(runs[next(iter(runs))]["ms"])
print(f"{args.config}, {mesh.size} XLA CPU device(s), {args.repeats} turns of {args.steps} steps; "
      f"jax {jax.__version__}; python {sys.version.split()[0]}")
print("| variant | ms/step median (min–max) | vs before | loss after the run |")
print("| --- | --- | --- | --- |")
for name, v in runs.items():
    med = statistics.median(v["ms"])
    print(f"| {name} | {med:.2f} ({min(v['ms']):.2f}–{max(v['ms']):.2f}) | {base / med:.2f}× | {v['loss']:.6f} |")
