"""The kernels the models run: linear and LayerNorm with hand-written backward passes, exact GELU, dropout."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


@jax.custom_vjp
def linear(x, w):
    """x @ w with a hand-written backward (see _linear_bwd)."""
    return x @ w


def _linear_fwd(x, w):
    return x @ w, (x, w)


def _linear_bwd(res, g):
    # The barrier keeps XLA:CPU from fusing the incoming elementwise gradient (GELU', softmax') into a
    # transposing copy in front of the weight-gradient dot, which runs several times slower than either part.
    # Other backends run their dots as library calls and get no such fusion, so they go without it.
    x, w = res
    if jax.default_backend() == "cpu":
        g = jax.lax.optimization_barrier(g)
    dw = jnp.einsum("nc,nd->cd", x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]))
    return g @ w.T, dw


linear.defvjp(_linear_fwd, _linear_bwd)


def gelu(x):
    """nn.GELU()'s exact form, 0.5·x·(1 + erf(x/√2)).

    jax.nn.gelu(approximate=False) computes the same function through erfc, which XLA:CPU expands into a
    piecewise polynomial several times the cost of erf's; the step spent a sixth of its time there.
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, w, b, eps: float):
    """(x - mean) / sqrt(var + eps) · w (+ b) over the last axis, with PyTorch's LayerNorm backward (below)."""
    return _layer_norm_fwd(x, w, b, eps)[0]


def _layer_norm_fwd(x, w, b, eps):
    mean = x.mean(-1, keepdims=True)
    xc = x - mean
    rstd = jax.lax.rsqrt(jnp.square(xc).mean(-1, keepdims=True) + eps)
    xhat = xc * rstd
    y = xhat * w
    return (y if b is None else y + b), (xhat, rstd, w, b)


def _layer_norm_bwd(eps, res, g):
    # The closed form of the gradient (as native_layer_norm_backward): XLA's autodiff of the forward leaves
    # several separate reductions and broadcasts that XLA:CPU runs as many small kernels.
    xhat, rstd, w, b = res
    n = xhat.shape[-1]
    g_N, xhat_N = g.reshape(-1, n), xhat.reshape(-1, n)
    dxhat = g * w
    dx = rstd * (dxhat - dxhat.mean(-1, keepdims=True) - xhat * (dxhat * xhat).mean(-1, keepdims=True))
    return dx, jnp.sum(g_N * xhat_N, 0), None if b is None else jnp.sum(g_N, 0)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def dropout(x, rate: float, key):
    """Inverted dropout; identity when key is None (evaluation) or rate is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)

