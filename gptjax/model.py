"""The models, Bigram and GPT (nanoGPT's structure, names and initialisation), as flax NNX modules.

How a GPT runs (not what it computes) is its `Compute`: the matmul dtype, the attention kernel, the blocks run
unrolled or by a scan, and rematerialisation. Parameters are float32 and laid out per layer (nanoGPT's names) in
every case, so checkpoints, export and the parity suite never see the difference.
"""

from __future__ import annotations

import math
import typing

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax import registry
from gptjax.compute import Compute
from gptjax.config import ModelConfig
from gptjax.ops import dropout, gelu, gelu_tanh, layer_norm, linear
from gptjax.registry import register  # noqa: F401  the research API, named gptjax.model.register in docs and errors


def _normal(rngs: nnx.Rngs, shape, std: float):
    return std * jax.random.normal(rngs.params(), shape, jnp.float32)


class Linear(nnx.Module):
    """y = x @ weight + bias, weight stored [in, out] in float32, the product taken in `dtype`."""

    def __init__(self, d_in: int, d_out: int, bias: bool, std: float, rngs: nnx.Rngs, dtype: str = "float32",
                 matmul: str = "xla"):
        self.weight = nnx.Param(_normal(rngs, (d_in, d_out), std))
        self.bias = nnx.Param(jnp.zeros((d_out,))) if bias else None
        self.dtype = dtype
        self.matmul = matmul

    def __call__(self, x):
        dt = jnp.dtype(self.dtype)
        y = linear(x.astype(dt), self.weight[...].astype(dt), self.matmul)
        return y if self.bias is None else y + self.bias[...].astype(dt)


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
    def __init__(self, c: ModelConfig, rngs: nnx.Rngs, compute: Compute = Compute()):
        proj_std = 0.02 / math.sqrt(2 * c.n_layer)  # GPT-2: residual projections scaled by depth
        self.c_attn = Linear(c.n_embd, 3 * c.n_embd, c.bias, 0.02, rngs, compute.dtype, compute.matmul)
        self.c_proj = Linear(c.n_embd, c.n_embd, c.bias, proj_std, rngs, compute.dtype, compute.matmul)
        self.n_head = c.n_head
        self.dropout = c.dropout
        self.attention = compute.attention
        self.rope = c.pos_encoding == "rope"

    def __call__(self, x_BTD, cache=None, pos=0, key=None):
        """(cache, y): causal self-attention over x, whose first token is at absolute position `pos`.

        With a cache (k, v), each [B, S, H, K], x's keys and values are written into it at pos and the queries
        attend to every cached position up to their own; without one (None in, None out) x attends to itself.
        """
        B, T, D = x_BTD.shape
        H = self.n_head
        k_att, k_res = jax.random.split(key) if key is not None else (None, None)
        q_BTHK, k_BTHK, v_BTHK = jnp.split(self.c_attn(x_BTD).reshape(B, T, 3 * H, D // H), 3, axis=2)
        if self.rope:
            q_BTHK, k_BTHK = rope(q_BTHK, pos), rope(k_BTHK, pos)
        scale = 1.0 / math.sqrt(D // H)
        if cache is not None:
            k_BSHK = jax.lax.dynamic_update_slice(cache[0], k_BTHK.astype(cache[0].dtype), (0, pos, 0, 0))
            v_BSHK = jax.lax.dynamic_update_slice(cache[1], v_BTHK.astype(cache[1].dtype), (0, pos, 0, 0))
            mask_TS = jnp.arange(k_BSHK.shape[1])[None, :] <= pos + jnp.arange(T)[:, None]
            y_BTHK = _einsum_attention(q_BTHK, k_BSHK, v_BSHK, mask_TS, scale, self.dropout, k_att)
            cache = (k_BSHK, v_BSHK)
        elif self.attention == "einsum":
            causal_TT = jnp.tril(jnp.ones((T, T), bool))
            y_BTHK = _einsum_attention(q_BTHK, k_BTHK, v_BTHK, causal_TT, scale, self.dropout, k_att)
        else:
            y_BTHK = jax.nn.dot_product_attention(q_BTHK, k_BTHK, v_BTHK, scale=scale, is_causal=True,
                                                  implementation=self.attention)
        return cache, dropout(self.c_proj(y_BTHK.reshape(B, T, D)), self.dropout, k_res)


def rope(x_BTHK, pos):
    """Rotary position embedding (RoFormer, in GPT-NeoX's rotate-half layout): features i and i + K/2 of each head
    turned by the angle position * 10000^(-2i/K), for the positions pos..pos+T-1; in float32, returned in x's dtype."""
    T, K = x_BTHK.shape[1], x_BTHK.shape[3]
    inv_freq_F = 1.0 / 10000.0 ** (jnp.arange(0, K, 2, dtype=jnp.float32) / K)
    angle_TF = (pos + jnp.arange(T, dtype=jnp.float32))[:, None] * inv_freq_F[None, :]
    cos_1T1F, sin_1T1F = jnp.cos(angle_TF)[None, :, None, :], jnp.sin(angle_TF)[None, :, None, :]
    x1_BTHF, x2_BTHF = jnp.split(x_BTHK.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1_BTHF * cos_1T1F - x2_BTHF * sin_1T1F, x2_BTHF * cos_1T1F + x1_BTHF * sin_1T1F],
                           axis=-1).astype(x_BTHK.dtype)


def _einsum_attention(q_BTHK, k_BSHK, v_BSHK, mask_TS, scale, rate, key):
    """softmax(q·kᵀ·scale, masked) · v: the scores out of their matmul in q's dtype (so both of its backward matmuls
    run in it too, as under torch.autocast), scaled, masked and softmaxed in float32, the weighted sum in q's dtype."""
    att_BHTS = jnp.einsum("bthk,bshk->bhts", q_BTHK, k_BSHK).astype(jnp.float32) * scale
    att_BHTS = jax.nn.softmax(jnp.where(mask_TS, att_BHTS, -jnp.inf), axis=-1)
    att_BHTS = dropout(att_BHTS, rate, key)
    return jnp.einsum("bhts,bshk->bthk", att_BHTS.astype(v_BSHK.dtype), v_BSHK)


class MLP(nnx.Module):
    def __init__(self, c: ModelConfig, rngs: nnx.Rngs, compute: Compute = Compute()):
        self.c_fc = Linear(c.n_embd, 4 * c.n_embd, c.bias, 0.02, rngs, compute.dtype, compute.matmul)
        self.c_proj = Linear(4 * c.n_embd, c.n_embd, c.bias, 0.02 / math.sqrt(2 * c.n_layer), rngs, compute.dtype,
                             compute.matmul)
        self.dropout = c.dropout
        self.activation = c.activation

    def __call__(self, x_BTD, key=None):
        h_BTF = self.c_fc(x_BTD)
        act = gelu_tanh if self.activation == "gelu_tanh" else gelu
        h_BTF = act(h_BTF.astype(jnp.float32)).astype(h_BTF.dtype)
        return dropout(self.c_proj(h_BTF), self.dropout, key)


class Block(nnx.Module):
    def __init__(self, c: ModelConfig, rngs: nnx.Rngs, compute: Compute = Compute()):
        self.ln_1 = LayerNorm(c.n_embd, c.bias)
        self.attn = CausalSelfAttention(c, rngs, compute)
        self.ln_2 = LayerNorm(c.n_embd, c.bias)
        self.mlp = MLP(c, rngs, compute)

    def __call__(self, x_BTD, cache=None, pos=0, key=None):
        """(cache, x): the float32 residual stream through attention and MLP; the cache as CausalSelfAttention's."""
        k_attn, k_mlp = jax.random.split(key) if key is not None else (None, None)
        cache, a_BTD = self.attn(self.ln_1(x_BTD), cache, pos, k_attn)
        x_BTD = x_BTD + a_BTD.astype(jnp.float32)
        x_BTD = x_BTD + self.mlp(self.ln_2(x_BTD), k_mlp).astype(jnp.float32)
        return cache, x_BTD


def _block_fn(block_graphdef, remat: bool):
    """(block state, x, cache, pos, key) -> (cache, x): one block as a pure function, rematerialised in the
    backward pass if asked."""

    def f(state, x_BTD, cache, pos, key):
        return nnx.merge(block_graphdef, state)(x_BTD, cache, pos, key)

    return jax.checkpoint(f) if remat else f


class GPT(nnx.Module):
    """Token (+ learned position) embeddings, n_layer pre-LN blocks, final LayerNorm, LM head (tied to wte by default).

    Training, evaluation and decoding run one forward pass (`forward`); only decoding passes a KV cache.
    """

    def __init__(self, c: ModelConfig, rngs: nnx.Rngs, compute: Compute = Compute()):
        self.config = c
        self.compute = compute
        self.wte = Embedding(c.vocab_size, c.n_embd, 0.02, rngs)
        self.wpe = Embedding(c.block_size, c.n_embd, 0.02, rngs) if c.pos_encoding == "learned" else None
        self.h = nnx.List([Block(c, rngs, compute) for _ in range(c.n_layer)])
        self.ln_f = LayerNorm(c.n_embd, c.bias)
        self.lm_head = None if c.tie_weights else Linear(c.n_embd, c.vocab_size, False, 0.02, rngs, compute.dtype,
                                                         compute.matmul)

    def __call__(self, idx_BT, key=None):
        """Logits [B, T, V] in the compute dtype (see _logits); key=None runs without dropout."""
        return self.forward(idx_BT, key=key)[1]

    def decode(self, idx_BT, cache, pos):
        """Logits [B, T, V] for tokens at absolute positions pos..pos+T-1, attending to the cache's earlier
        positions, and the cache with these tokens' keys and values written in: (logits, cache).

        pos + T must not exceed block_size. A prefill is decode(prompt, init_cache(B), 0); each next token is
        decode(token[:, None], cache, pos). Without dropout.
        """
        cache, logits_BTV = self.forward(idx_BT, cache, pos)
        return logits_BTV, cache

    def forward(self, idx_BT, cache=None, pos=0, key=None):
        """(cache, logits [B, T, V] in the compute dtype) for tokens at positions pos..pos+T-1; cache None in, None
        out."""
        T = idx_BT.shape[1]
        assert T <= self.config.block_size, f"sequence length {T} exceeds block_size {self.config.block_size}"
        keys = jax.random.split(key, self.config.n_layer + 1) if key is not None else None
        x_BTD = self.wte(idx_BT)
        if self.wpe is not None:  # learned positions; with rope, attention turns queries and keys instead
            x_BTD = x_BTD + jax.lax.dynamic_slice_in_dim(self.wpe.weight[...], pos, T)
        x_BTD = dropout(x_BTD, self.config.dropout, None if keys is None else keys[0])
        cache, x_BTD = self._blocks(x_BTD, cache, pos, None if keys is None else keys[1:])
        return cache, self._logits(self.ln_f(x_BTD))

    def _blocks(self, x_BTD, cache, pos, keys):
        """(cache, x) through the n_layer blocks, unrolled or by a scan (Compute.scan), remat or not."""
        block = _block_fn(nnx.split(self.h[0])[0], self.compute.remat)
        states = [nnx.split(b)[1] for b in self.h]
        if self.compute.scan:
            # The per-layer parameters are stacked here, inside the traced function: the scan compiles one block,
            # and checkpoints keep nanoGPT's per-layer layout. The copy costs one read and write of the blocks.
            # A cache is stacked from the start (init_cache), so decoding copies nothing per step.
            stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)

            def layer(x_BTD, xs):
                state, cache, key = xs
                cache, x_BTD = block(state, x_BTD, cache, pos, key)
                return x_BTD, cache

            x_BTD, cache = jax.lax.scan(layer, x_BTD, (stacked, cache, keys))
            return cache, x_BTD
        caches = []
        for i, state in enumerate(states):
            c, x_BTD = block(state, x_BTD, None if cache is None else cache[i], pos, None if keys is None else keys[i])
            caches.append(c)
        return (None if cache is None else caches), x_BTD

    def _logits(self, x_BTD):
        """The LM head, in the compute dtype like every other matmul: bfloat16 logits out, as torch.autocast gives
        them. The loss (token_nll) and the sampler read them in float32, and on a GPU the loss's upcast, softmax and
        gradient fuse into the kernels that read and write them: no float32 logits are ever stored, and both
        backward matmuls run in bfloat16 (with float32 logits out they ran in float32 on a [tokens, vocab]
        operand: experiments/results/gpu_inspect.md)."""
        dt = self.compute.jdtype
        w_DV = self.wte.weight[...].T if self.lm_head is None else self.lm_head.weight[...]
        return linear(x_BTD.astype(dt), w_DV.astype(dt), self.compute.matmul)

    def init_cache(self, batch_size: int):
        """Key and value caches for decode, zeros: n_layer x (k, v), each [B, block_size, n_head, head size];
        with Compute.scan one (k, v) whose arrays hold the layers stacked, [n_layer, B, ...]."""
        c = self.config
        shape = (batch_size, c.block_size, c.n_head, c.n_embd // c.n_head)
        if self.compute.scan:
            shape = (c.n_layer, *shape)
            return jnp.zeros(shape, self.compute.jdtype), jnp.zeros(shape, self.compute.jdtype)
        return [(jnp.zeros(shape, self.compute.jdtype), jnp.zeros(shape, self.compute.jdtype))
                for _ in range(c.n_layer)]


class Bigram(nnx.Module):
    """The seeds' bigram model: row i of a V x V table holds the logits of the token after token i."""

    def __init__(self, c: ModelConfig, rngs: nnx.Rngs):
        self.config = c
        self.token_embedding_table = Embedding(c.vocab_size, c.vocab_size, 1.0, rngs)  # nn.Embedding's N(0, 1)

    def __call__(self, idx_BT, key=None):
        return self.token_embedding_table(idx_BT)


def factory_for(name: str) -> typing.Callable:
    """The factory (config, rngs, compute) -> module that builds `--model=name`; a UserError if none does."""
    if name == "gpt":
        return GPT
    if name == "bigram":
        return lambda c, rngs, compute: Bigram(c, rngs)
    return registry.research_factory(name)


def create(c: ModelConfig, seed: int, compute: Compute = Compute()) -> nnx.Module:
    """A model with freshly initialised parameters; `compute` (GPT only) says how its forward pass runs."""
    assert c.vocab_size > 0, "vocab_size must be set (from the prepared data) before building a model"
    return factory_for(c.model)(c, nnx.Rngs(params=seed), compute)


def split(model: nnx.Module):
    """(graphdef, params): the static structure and the parameter pytree that jitted functions take."""
    return nnx.split(model, nnx.Param)


def apply(graphdef, params, idx_BT, key=None):
    """Pure forward pass: logits [B, T, V]."""
    return nnx.merge(graphdef, params)(idx_BT, key)


def decode(graphdef, params, idx_BT, cache, pos):
    """Pure cached forward pass (GPT.decode): (logits [B, T, V], cache)."""
    return nnx.merge(graphdef, params).decode(idx_BT, cache, pos)


def init_cache(graphdef, params, batch_size: int):
    return nnx.merge(graphdef, params).init_cache(batch_size)


def token_nll(logits_BTV, targets_BT):
    """Each position's next-token negative log-likelihood in nats, computed in float32 (whatever the logits' dtype):
    [B, T].

    The target's logit is picked by comparing the vocabulary's indices with the target, not by indexing: its
    gradient is then a select that fuses with the softmax's, where take_along_axis's is a scatter into a
    [B, T, V] buffer of zeros. For a target in the vocabulary both pick the same value exactly (the one logit plus
    zeros); a target outside it gives NaN, as indexing out of bounds did, so a bad batch cannot train silently.
    """
    logits_BTV = logits_BTV.astype(jnp.float32)
    V = logits_BTV.shape[-1]
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    targets_BT = targets_BT.astype(jnp.int32)
    hit_BTV = jnp.arange(V, dtype=jnp.int32) == targets_BT[..., None]
    picked_BT = jnp.sum(jnp.where(hit_BTV, logits_BTV, 0.0), axis=-1)
    return jnp.where((targets_BT >= 0) & (targets_BT < V), lse_BT - picked_BT, jnp.nan)


def cross_entropy(logits_BTV, targets_BT):
    """Mean next-token negative log-likelihood in nats (the training loss)."""
    return token_nll(logits_BTV, targets_BT).mean()


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


def abstract_model(c: ModelConfig, compute: Compute = Compute()) -> nnx.Module:
    """A model for `c` whose parameters are shapes and dtypes only: nothing is initialised."""
    return nnx.eval_shape(lambda: create(c, 0, compute))


def abstract_params(c: ModelConfig):
    return split(abstract_model(c))[1]


def graphdef_for(c: ModelConfig, compute: Compute = Compute()):
    """The static structure of a model for `c` run as `compute`: pairs with any parameters of that config."""
    return split(abstract_model(c, compute))[0]


def num_params(params, exclude_wpe: bool = True) -> int:
    """Parameter count; like nanoGPT, position embeddings are not counted by default."""
    return sum(x.size for name, x in param_names(params).items() if not (exclude_wpe and name.startswith("wpe.")))
