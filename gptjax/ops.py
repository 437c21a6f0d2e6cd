"""The kernels the models run: linear and LayerNorm with hand-written backward passes, GELU (two forms), dropout."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


def linear(x, w, matmul: str = "xla", out_dtype=None):
    """x @ w with a hand-written backward (see _linear_bwd), in x's dtype or `out_dtype`.

    matmul: "xla" (XLA's dot) or "mkl" (gptjax.kernels' oneMKL kernel on a CPU; load() it first). Both compute
    the same products; the kernel accumulates bfloat16 inputs in float32 and rounds once, at the end. The kernel's
    products in both passes split over the mesh of the kernels.split_over the forward pass was traced in.
    """
    mesh = None
    if matmul == "mkl":
        from gptjax import kernels

        mesh = kernels.current_mesh()
    return _linear(x, w, matmul, out_dtype, mesh)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _linear(x, w, matmul, out_dtype, mesh):
    return _matmul(x, w, matmul, out_dtype, mesh)


def _matmul(a, b, matmul, out_dtype, mesh, trans_a=False, trans_b=False):
    """op(a) @ op(b) over a's leading axes (b is a matrix) in `out_dtype` (default a's dtype)."""
    out_dtype = out_dtype or a.dtype
    if matmul == "mkl":
        from gptjax import kernels

        if trans_a:  # a: [..., N, C] -> the [C, D] contraction over every leading row
            return kernels.matmul(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), True,
                                  mesh=mesh).astype(out_dtype)
        y = kernels.matmul(a.reshape(-1, a.shape[-1]), b, False, trans_b, mesh=mesh)
        return y.reshape(*a.shape[:-1], y.shape[-1]).astype(out_dtype)
    if trans_a:
        return jnp.einsum("nc,nd->cd", a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]),
                          preferred_element_type=out_dtype)
    return jnp.matmul(a, b.T if trans_b else b, preferred_element_type=out_dtype)


def _linear_fwd(x, w, matmul, out_dtype, mesh):
    return _matmul(x, w, matmul, out_dtype, mesh), (x, w)


def _linear_bwd(matmul, out_dtype, mesh, res, g):
    # The barrier keeps XLA:CPU from fusing the incoming elementwise gradient (GELU', softmax') into a
    # transposing copy in front of the weight-gradient dot, which runs several times slower than either part.
    # Other backends run their dots as library calls and get no such fusion, so they go without it; the kernel
    # is a call of its own too.
    x, w = res
    if matmul == "xla":  # decided by the platform the program is lowered for, not the default backend
        g = jax.lax.platform_dependent(g, cpu=jax.lax.optimization_barrier, default=lambda g: g)
    if out_dtype is not None:
        g = g.astype(x.dtype)
    return (_matmul(g, w, matmul, x.dtype, mesh, trans_b=True),
            _matmul(x, g, matmul, w.dtype, mesh, trans_a=True))


_linear.defvjp(_linear_fwd, _linear_bwd)


def gelu(x):
    """nn.GELU()'s exact form, 0.5·x·(1 + erf(x/√2)).

    jax.nn.gelu(approximate=False) computes the same function through erfc, which XLA:CPU expands into a
    piecewise polynomial several times the cost of erf's; the step spent a sixth of its time there.
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


def gelu_tanh(x):
    """GPT-2's GELU, the tanh approximation 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))): transformers' gelu_new,
    nn.GELU(approximate="tanh")."""
    return jax.nn.gelu(x, approximate=True)


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

