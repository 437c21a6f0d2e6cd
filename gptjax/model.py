"""The models, Bigram and GPT (nanoGPT's structure, names and initialisation), as flax NNX modules."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax.config import ModelConfig


@jax.custom_vjp
def linear(x, w):
    """x @ w with a hand-written backward (see _linear_bwd)."""
    return x @ w


def _linear_fwd(x, w):
    return x @ w, (x, w)


def _linear_bwd(res, g):
    # The barrier keeps XLA:CPU from fusing the incoming elementwise gradient (GELU', softmax') into a
    # transposing copy in front of the weight-gradient dot, which runs several times slower than either part.
    x, w = res
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


def _normal(rngs: nnx.Rngs, shape, std: float):
    return std * jax.random.normal(rngs.params(), shape, jnp.float32)


class Linear(nnx.Module):
    """y = x @ weight + bias, weight stored [in, out]."""

    def __init__(self, d_in: int, d_out: int, bias: bool, std: float, rngs: nnx.Rngs):
        self.weight = nnx.Param(_normal(rngs, (d_in, d_out), std))
        self.bias = nnx.Param(jnp.zeros((d_out,))) if bias else None

    def __call__(self, x):
        y = linear(x, self.weight[...])
        return y if self.bias is None else y + self.bias[...]


class Embedding(nnx.Module):
    def __init__(self, n: int, d: int, std: float, rngs: nnx.Rngs):
        self.weight = nnx.Param(_normal(rngs, (n, d), std))

    def __call__(self, idx):
        return self.weight[...][idx]


class LayerNorm(nnx.Module):
    """LayerNorm with an optional bias (PyTorch's has none to switch off), eps 1e-5 as in torch (flax's is 1e-6)."""

    eps = 1e-5

    def __init__(self, d: int, bias: bool):
        self.weight = nnx.Param(jnp.ones((d,)))
        self.bias = nnx.Param(jnp.zeros((d,))) if bias else None

    def __call__(self, x_BTD):
        return layer_norm(x_BTD, self.weight[...], None if self.bias is None else self.bias[...], self.eps)


class CausalSelfAttention(nnx.Module):
    def __init__(self, c: ModelConfig, rngs: nnx.Rngs):
        proj_std = 0.02 / math.sqrt(2 * c.n_layer)  # GPT-2: residual projections scaled by depth
        self.c_attn = Linear(c.n_embd, 3 * c.n_embd, c.bias, 0.02, rngs)
        self.c_proj = Linear(c.n_embd, c.n_embd, c.bias, proj_std, rngs)
        self.n_head = c.n_head
        self.dropout = c.dropout

    def __call__(self, x_BTD, key=None):
        B, T, D = x_BTD.shape
        H = self.n_head
        k_att, k_res = jax.random.split(key) if key is not None else (None, None)
        q_BTHK, k_BTHK, v_BTHK = jnp.split(self.c_attn(x_BTD).reshape(B, T, 3 * H, D // H), 3, axis=2)
        att_BHTT = jnp.einsum("bthk,bshk->bhts", q_BTHK, k_BTHK) * (1.0 / math.sqrt(D // H))
        causal_TT = jnp.tril(jnp.ones((T, T), bool))
        att_BHTT = jax.nn.softmax(jnp.where(causal_TT, att_BHTT, -jnp.inf), axis=-1)
        att_BHTT = dropout(att_BHTT, self.dropout, k_att)
        y_BTD = jnp.einsum("bhts,bshk->bthk", att_BHTT, v_BTHK).reshape(B, T, D)
        return dropout(self.c_proj(y_BTD), self.dropout, k_res)


class MLP(nnx.Module):
    def __init__(self, c: ModelConfig, rngs: nnx.Rngs):
        self.c_fc = Linear(c.n_embd, 4 * c.n_embd, c.bias, 0.02, rngs)
        self.c_proj = Linear(4 * c.n_embd, c.n_embd, c.bias, 0.02 / math.sqrt(2 * c.n_layer), rngs)
        self.dropout = c.dropout

    def __call__(self, x_BTD, key=None):
        h_BTF = gelu(self.c_fc(x_BTD))
        return dropout(self.c_proj(h_BTF), self.dropout, key)


class Block(nnx.Module):
    def __init__(self, c: ModelConfig, rngs: nnx.Rngs):
        self.ln_1 = LayerNorm(c.n_embd, c.bias)
        self.attn = CausalSelfAttention(c, rngs)
        self.ln_2 = LayerNorm(c.n_embd, c.bias)
        self.mlp = MLP(c, rngs)

    def __call__(self, x_BTD, key=None):
        k_attn, k_mlp = jax.random.split(key) if key is not None else (None, None)
        x_BTD = x_BTD + self.attn(self.ln_1(x_BTD), k_attn)
        return x_BTD + self.mlp(self.ln_2(x_BTD), k_mlp)


class GPT(nnx.Module):
    """Token + position embeddings, n_layer pre-LN blocks, final LayerNorm, LM head (tied to wte by default)."""

    def __init__(self, c: ModelConfig, rngs: nnx.Rngs):
        self.config = c
        self.wte = Embedding(c.vocab_size, c.n_embd, 0.02, rngs)
        self.wpe = Embedding(c.block_size, c.n_embd, 0.02, rngs)
        self.h = nnx.List([Block(c, rngs) for _ in range(c.n_layer)])
        self.ln_f = LayerNorm(c.n_embd, c.bias)
        self.lm_head = None if c.tie_weights else Linear(c.n_embd, c.vocab_size, False, 0.02, rngs)

    def __call__(self, idx_BT, key=None):
        """Logits [B, T, V]; key=None runs without dropout."""
        T = idx_BT.shape[1]
        assert T <= self.config.block_size, f"sequence length {T} exceeds block_size {self.config.block_size}"
        keys = list(jax.random.split(key, self.config.n_layer + 1)) if key is not None else [None] * (
            self.config.n_layer + 1)
        x_BTD = self.wte(idx_BT) + self.wpe(jnp.arange(T))
        x_BTD = dropout(x_BTD, self.config.dropout, keys[0])
        for block, k in zip(self.h, keys[1:]):
            x_BTD = block(x_BTD, k)
        x_BTD = self.ln_f(x_BTD)
        if self.lm_head is None:
            return linear(x_BTD, self.wte.weight[...].T)
        return self.lm_head(x_BTD)


class Bigram(nnx.Module):
    """The seeds' bigram model: row i of a V x V table holds the logits of the token after token i."""

    def __init__(self, c: ModelConfig, rngs: nnx.Rngs):
        self.config = c
        self.token_embedding_table = Embedding(c.vocab_size, c.vocab_size, 1.0, rngs)  # nn.Embedding's N(0, 1)

    def __call__(self, idx_BT, key=None):
        return self.token_embedding_table(idx_BT)


def create(c: ModelConfig, seed: int) -> nnx.Module:
    assert c.vocab_size > 0, "vocab_size must be set (from the prepared data) before building a model"
    return (GPT if c.model == "gpt" else Bigram)(c, nnx.Rngs(params=seed))


def split(model: nnx.Module):
    """(graphdef, params): the static structure and the parameter pytree that jitted functions take."""
    return nnx.split(model, nnx.Param)


def apply(graphdef, params, idx_BT, key=None):
    """Pure forward pass: logits [B, T, V]."""
    return nnx.merge(graphdef, params)(idx_BT, key)


def cross_entropy(logits_BTV, targets_BT):
    """Mean next-token negative log-likelihood in nats, computed in float32."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    picked_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return (lse_BT - picked_BT).mean()


def _name(path) -> str:
    parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    return ".".join(p for p in parts if p != "value")


def param_names(params) -> dict:
    """{"h.0.attn.c_attn.weight": array, ...}: nanoGPT's dotted names (without its "transformer." prefix)."""
    return {_name(path): x for path, x in jax.tree_util.tree_leaves_with_path(params)}


def params_from_names(like, named: dict):
    """The inverse of param_names: a pytree shaped like `like` whose leaves are named[name]."""
    assert set(named) == set(param_names(like)), "named arrays must cover exactly the parameters of `like`"
    return jax.tree_util.tree_map_with_path(lambda path, _: named[_name(path)], like)


def abstract_model(c: ModelConfig) -> nnx.Module:
    """A model for `c` whose parameters are shapes and dtypes only: nothing is initialised."""
    return nnx.eval_shape(lambda: create(c, 0))


def abstract_params(c: ModelConfig):
    return split(abstract_model(c))[1]


def num_params(params, exclude_wpe: bool = True) -> int:
    """Parameter count; like nanoGPT, position embeddings are not counted by default."""
    return sum(x.size for name, x in param_names(params).items() if not (exclude_wpe and name.startswith("wpe.")))
