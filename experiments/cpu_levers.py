"""Model-level speed levers for the XLA:CPU train step, measured side by side in one process.

    python experiments/cpu_levers.py --input=../shared/data/tinyshakespeare/input.txt [--config=shakespeare_char_cpu]
        [--devices=2] [--steps=30] [--repeats=9]

Each variant is the jitted train step of `gptjax train` (data parallel over --devices XLA CPU devices) traced with
one form of a layer: "before" is the model as it was (jax.nn.gelu(approximate=False), autodiff LayerNorm), the
next two switch one shipped lever on at a time, "now" is gptjax.model as shipped, and the last ones are levers
tried on top of it and not kept (the config must have no dropout: the attention variants leave it out).
The variants run in turn, --steps steps a turn on distinct batches, so the drift of a shared machine falls on all
alike; the median per step is printed.
Every variant computes the same function: the losses after the run are printed beside the times.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import time

from gptjax.args import Option, options  # noqa: E402 (before jax: the device count goes into XLA_FLAGS)
from gptjax.options import CONFIG_OPTION  # noqa: E402

args = options(sys.argv[1:], {
    "input": Option("PATH", None, "tiny Shakespeare's input.txt", required=True), **CONFIG_OPTION,
    "devices": Option("N", 2, "XLA CPU devices the step runs data parallel over", None),
    "steps": Option("N", 30, "steps per turn"), "repeats": Option("N", 9, "turns")}, "cpu_levers.py", __doc__)
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from gptjax import data, model, parallel  # noqa: E402
from gptjax.config import load_config  # noqa: E402
from gptjax.evaluate import setup  # noqa: E402
from gptjax.optim import init_state  # noqa: E402
from gptjax.train import make_train_step  # noqa: E402


def autodiff_layer_norm(self, x_BTD):
    mean = x_BTD.mean(-1, keepdims=True)
    var = jnp.square(x_BTD - mean).mean(-1, keepdims=True)
    y = (x_BTD - mean) * jax.lax.rsqrt(var + self.eps) * self.weight[...]
    return y if self.bias is None else y + self.bias[...]


def one_pass_layer_norm(self, x_BTD):
    """var = E[x²] - E[x]²: one reduction pass fewer, less accurate."""
    mean = x_BTD.mean(-1, keepdims=True)
    var = jnp.maximum(jnp.square(x_BTD).mean(-1, keepdims=True) - jnp.square(mean), 0.0)
    y = (x_BTD - mean) * jax.lax.rsqrt(var + self.eps) * self.weight[...]
    return y if self.bias is None else y + self.bias[...]


def attention(layout: str):
    """Causal self-attention (no dropout) with heads-major q/k/v, or through jax.nn.dot_product_attention."""
    def call(self, x_BTD, cache=None, pos=0, key=None):
        B, T, D = x_BTD.shape
        H, K = self.n_head, D // self.n_head
        qkv = self.c_attn(x_BTD).reshape(B, T, 3, H, K)
        if layout == "dpa":
            y_BTHK = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], is_causal=True,
                                                  implementation="xla")
            return cache, self.c_proj(y_BTHK.reshape(B, T, D))
        q_BHTK, k_BHTK, v_BHTK = qkv.transpose(2, 0, 3, 1, 4)
        att_BHTT = (q_BHTK @ jnp.swapaxes(k_BHTK, -1, -2)) * (1.0 / math.sqrt(K))
        att_BHTT = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((T, T), bool)), att_BHTT, -jnp.inf), axis=-1)
        return cache, self.c_proj((att_BHTT @ v_BHTK).transpose(0, 2, 1, 3).reshape(B, T, D))
    return call


@contextlib.contextmanager
def lever(gelu=None, layer_norm=None, attn=None, linear=None):
    """The model with other forms of GELU / LayerNorm / attention / linear while a variant is traced."""
    saved = model.gelu, model.LayerNorm.__call__, model.CausalSelfAttention.__call__, model.linear
    model.gelu = gelu or model.gelu
    model.LayerNorm.__call__ = layer_norm or model.LayerNorm.__call__
    model.CausalSelfAttention.__call__ = attn or model.CausalSelfAttention.__call__
    model.linear = linear or model.linear
    try:
        yield
    finally:
        model.gelu, model.LayerNorm.__call__, model.CausalSelfAttention.__call__, model.linear = saved


def erfc_gelu(x):
    return jax.nn.gelu(x, approximate=False)


VARIANTS = {
    "before (erfc GELU, autodiff LayerNorm)": dict(gelu=erfc_gelu, layer_norm=autodiff_layer_norm),
    "erf GELU only": dict(layer_norm=autodiff_layer_norm),
    "LayerNorm VJP only": dict(gelu=erfc_gelu),
    "now (both)": {},
    "now + one-pass LayerNorm variance": dict(layer_norm=one_pass_layer_norm),
    "now + heads-major attention": dict(attn=attention("heads_major")),
    "now + jax.nn.dot_product_attention": dict(attn=attention("dpa")),
    "now, autodiff x @ w (no custom-VJP linear)": dict(linear=lambda x, w: x @ w),
}

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
    with lever(**flags):
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
