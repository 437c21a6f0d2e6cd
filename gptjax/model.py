"""The models, Bigram and GPT (nanoGPT's structure, names and initialisation), as flax NNX modules.

How a GPT runs (not what it computes) is its `Compute`: the matmul dtype, the attention kernel, the blocks run
unrolled or by a scan, and rematerialisation. Parameters are float32 and laid out per layer (nanoGPT's names) in
every case, so checkpoints, export and the parity suite never see the difference.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import math
import os
import sysconfig
import traceback
import typing

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax.config import ModelConfig
from gptjax.errors import UserError


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


@dataclasses.dataclass(frozen=True)
class Compute:
    """How the forward pass runs; static (part of the graphdef), so each setting compiles its own program.

    dtype: the dtype of matmul inputs and their outputs. LayerNorm statistics, softmax, the residual stream, the
    logits and the loss stay float32, as under torch.autocast; parameters are float32 whatever it is.
    attention: "einsum" (explicit scores, the only path with attention dropout), "xla" or "cudnn" (both through
    jax.nn.dot_product_attention; cudnn is the fused flash kernel and needs a GPU and bfloat16).
    scan: run the blocks with lax.scan over their parameters stacked at call time (compile time flat in depth).
    remat: recompute each block's activations in the backward pass instead of storing them.
    """

    dtype: str = "float32"
    attention: str = "einsum"
    scan: bool = False
    remat: bool = False

    @property
    def jdtype(self):
        return jnp.dtype(self.dtype)


def supports_bfloat16(device=None) -> bool:
    """bfloat16 matmuls at full speed: a TPU, or an NVIDIA GPU of compute capability 8.0 (Ampere) or later."""
    device = device or jax.devices()[0]
    if device.platform == "tpu":
        return True
    if device.platform == "gpu":
        try:
            return float(getattr(device, "compute_capability", "0")) >= 8.0
        except ValueError:
            return False
    return False


def resolve_compute(dtype: str = "auto", attention: str = "auto", scan: bool = False, remat: str = "none",
                    attention_dropout: float = 0.0, device=None) -> Compute:
    """The Compute for the command-line choices on `device` (default: JAX's first device).

    auto dtype: bfloat16 where the device runs it fast (see supports_bfloat16), float32 elsewhere (a CPU).
    auto attention: cudnn on a GPU in bfloat16 without attention dropout, the einsum path otherwise.
    A choice the device or the settings cannot run is a UserError naming it and the fix.
    """
    device = device or jax.devices()[0]
    dtype = ("bfloat16" if supports_bfloat16(device) else "float32") if dtype == "auto" else dtype
    if attention == "auto":
        attention = "cudnn" if (device.platform == "gpu" and dtype == "bfloat16" and attention_dropout == 0.0) \
            else "einsum"
    if attention == "cudnn" and device.platform != "gpu":
        raise UserError(f"--attention=cudnn needs an NVIDIA GPU (this is a {device.platform}): use --attention=auto")
    if attention == "cudnn" and dtype != "bfloat16":
        raise UserError("--attention=cudnn runs in bfloat16 only: add --dtype=bfloat16, or use --attention=xla")
    if attention in ("xla", "cudnn") and attention_dropout > 0.0:
        raise UserError(f"--attention={attention} has no attention dropout and --dropout={attention_dropout}: use "
                        "--attention=einsum (or auto), or --dropout=0")
    return Compute(dtype=dtype, attention=attention, scan=scan, remat=remat == "block")


def compute_of(config, training: bool = True, **changes) -> Compute:
    """How this config's model runs on JAX's default device: the train settings dtype, attention, scan_layers
    and remat, resolved (auto -> a choice); `changes` override them (e.g. dtype="float32" for eval). Without
    training there is no dropout, so every attention path is open."""
    t = dataclasses.replace(config.train, **changes)
    return resolve_compute(t.dtype, t.attention, t.scan_layers, t.remat,
                                 config.model.dropout if training else 0.0)


def _normal(rngs: nnx.Rngs, shape, std: float):
    return std * jax.random.normal(rngs.params(), shape, jnp.float32)


class Linear(nnx.Module):
    """y = x @ weight + bias, weight stored [in, out] in float32, the product taken in `dtype`."""

    def __init__(self, d_in: int, d_out: int, bias: bool, std: float, rngs: nnx.Rngs, dtype: str = "float32"):
        self.weight = nnx.Param(_normal(rngs, (d_in, d_out), std))
        self.bias = nnx.Param(jnp.zeros((d_out,))) if bias else None
        self.dtype = dtype

    def __call__(self, x):
        dt = jnp.dtype(self.dtype)
        y = linear(x.astype(dt), self.weight[...].astype(dt))
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
        self.c_attn = Linear(c.n_embd, 3 * c.n_embd, c.bias, 0.02, rngs, compute.dtype)
        self.c_proj = Linear(c.n_embd, c.n_embd, c.bias, proj_std, rngs, compute.dtype)
        self.n_head = c.n_head
        self.dropout = c.dropout
        self.attention = compute.attention

    def __call__(self, x_BTD, key=None, kv=None, pos=None):
        """Causal self-attention over x; with kv=(k, v) caches [B, S, H, K] and the absolute position `pos` of
        x's first token, x's keys and values are written into the caches at pos and the queries attend to every
        cached position up to their own: returns (y, (k, v))."""
        B, T, D = x_BTD.shape
        H = self.n_head
        k_att, k_res = jax.random.split(key) if key is not None else (None, None)
        q_BTHK, k_BTHK, v_BTHK = jnp.split(self.c_attn(x_BTD).reshape(B, T, 3 * H, D // H), 3, axis=2)
        scale = 1.0 / math.sqrt(D // H)
        if kv is not None:
            k_BSHK = jax.lax.dynamic_update_slice(kv[0], k_BTHK.astype(kv[0].dtype), (0, pos, 0, 0))
            v_BSHK = jax.lax.dynamic_update_slice(kv[1], v_BTHK.astype(kv[1].dtype), (0, pos, 0, 0))
            mask_TS = jnp.arange(k_BSHK.shape[1])[None, :] <= pos + jnp.arange(T)[:, None]
            y_BTD = _einsum_attention(q_BTHK, k_BSHK, v_BSHK, mask_TS, scale, 0.0, None).reshape(B, T, D)
            return self.c_proj(y_BTD), (k_BSHK, v_BSHK)
        if self.attention == "einsum":
            causal_TT = jnp.tril(jnp.ones((T, T), bool))
            y_BTHK = _einsum_attention(q_BTHK, k_BTHK, v_BTHK, causal_TT, scale, self.dropout, k_att)
        else:
            y_BTHK = jax.nn.dot_product_attention(q_BTHK, k_BTHK, v_BTHK, scale=scale, is_causal=True,
                                                  implementation=self.attention)
        return dropout(self.c_proj(y_BTHK.reshape(B, T, D)), self.dropout, k_res)


def _einsum_attention(q_BTHK, k_BSHK, v_BSHK, mask_TS, scale, rate, key):
    """softmax(q·kᵀ·scale, masked) · v: scores and softmax in float32, the weighted sum in q's dtype."""
    att_BHTS = jnp.einsum("bthk,bshk->bhts", q_BTHK, k_BSHK, preferred_element_type=jnp.float32) * scale
    att_BHTS = jax.nn.softmax(jnp.where(mask_TS, att_BHTS, -jnp.inf), axis=-1)
    att_BHTS = dropout(att_BHTS, rate, key)
    return jnp.einsum("bhts,bshk->bthk", att_BHTS.astype(v_BSHK.dtype), v_BSHK)


class MLP(nnx.Module):
    def __init__(self, c: ModelConfig, rngs: nnx.Rngs, compute: Compute = Compute()):
        self.c_fc = Linear(c.n_embd, 4 * c.n_embd, c.bias, 0.02, rngs, compute.dtype)
        self.c_proj = Linear(4 * c.n_embd, c.n_embd, c.bias, 0.02 / math.sqrt(2 * c.n_layer), rngs, compute.dtype)
        self.dropout = c.dropout

    def __call__(self, x_BTD, key=None):
        h_BTF = self.c_fc(x_BTD)
        h_BTF = gelu(h_BTF.astype(jnp.float32)).astype(h_BTF.dtype)
        return dropout(self.c_proj(h_BTF), self.dropout, key)


class Block(nnx.Module):
    def __init__(self, c: ModelConfig, rngs: nnx.Rngs, compute: Compute = Compute()):
        self.ln_1 = LayerNorm(c.n_embd, c.bias)
        self.attn = CausalSelfAttention(c, rngs, compute)
        self.ln_2 = LayerNorm(c.n_embd, c.bias)
        self.mlp = MLP(c, rngs, compute)

    def __call__(self, x_BTD, key=None, kv=None, pos=None):
        """x (float32 residual stream) -> x; with a kv cache (see CausalSelfAttention) -> (x, kv)."""
        k_attn, k_mlp = jax.random.split(key) if key is not None else (None, None)
        if kv is not None:
            a_BTD, kv = self.attn(self.ln_1(x_BTD), kv=kv, pos=pos)
        else:
            a_BTD = self.attn(self.ln_1(x_BTD), k_attn)
        x_BTD = x_BTD + a_BTD.astype(jnp.float32)
        x_BTD = x_BTD + self.mlp(self.ln_2(x_BTD), k_mlp).astype(jnp.float32)
        return x_BTD if kv is None else (x_BTD, kv)


def _block_fn(block_graphdef, remat: bool):
    """(block state, x, key) -> x: one block as a pure function, rematerialised in the backward pass if asked."""

    def f(state, x_BTD, key):
        return nnx.merge(block_graphdef, state)(x_BTD, key)

    return jax.checkpoint(f) if remat else f


class GPT(nnx.Module):
    """Token + position embeddings, n_layer pre-LN blocks, final LayerNorm, LM head (tied to wte by default)."""

    def __init__(self, c: ModelConfig, rngs: nnx.Rngs, compute: Compute = Compute()):
        self.config = c
        self.compute = compute
        self.wte = Embedding(c.vocab_size, c.n_embd, 0.02, rngs)
        self.wpe = Embedding(c.block_size, c.n_embd, 0.02, rngs)
        self.h = nnx.List([Block(c, rngs, compute) for _ in range(c.n_layer)])
        self.ln_f = LayerNorm(c.n_embd, c.bias)
        self.lm_head = None if c.tie_weights else Linear(c.n_embd, c.vocab_size, False, 0.02, rngs, compute.dtype)

    def __call__(self, idx_BT, key=None):
        """Logits [B, T, V] in float32; key=None runs without dropout."""
        T = idx_BT.shape[1]
        assert T <= self.config.block_size, f"sequence length {T} exceeds block_size {self.config.block_size}"
        L = self.config.n_layer
        keys = jax.random.split(key, L + 1) if key is not None else None
        x_BTD = self.wte(idx_BT) + self.wpe(jnp.arange(T))
        x_BTD = dropout(x_BTD, self.config.dropout, None if keys is None else keys[0])
        graphdef = nnx.split(self.h[0])[0]
        block = _block_fn(graphdef, self.compute.remat)
        states = [nnx.split(b)[1] for b in self.h]
        if self.compute.scan:
            # The per-layer parameters are stacked here, inside the traced function: the scan compiles one block,
            # and checkpoints keep nanoGPT's per-layer layout. The copy costs one read and write of the blocks.
            stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
            if keys is None:
                x_BTD, _ = jax.lax.scan(lambda x, s: (block(s, x, None), None), x_BTD, stacked)
            else:
                x_BTD, _ = jax.lax.scan(lambda x, sk: (block(sk[0], x, sk[1]), None), x_BTD, (stacked, keys[1:]))
        else:
            for i, state in enumerate(states):
                x_BTD = block(state, x_BTD, None if keys is None else keys[i + 1])
        return self._logits(self.ln_f(x_BTD))

    def _logits(self, x_BTD):
        dt = self.compute.jdtype
        w_DV = self.wte.weight[...].T if self.lm_head is None else self.lm_head.weight[...]
        if dt == jnp.float32:
            return linear(x_BTD, w_DV)
        # Low-precision inputs, float32 products: the loss and sampling see float32 logits.
        return jnp.einsum("btd,dv->btv", x_BTD.astype(dt), w_DV.astype(dt), preferred_element_type=jnp.float32)

    def init_cache(self, batch_size: int):
        """Key and value caches for decode: n_layer x (k, v), each [B, block_size, n_head, head size], zeros."""
        c = self.config
        shape = (batch_size, c.block_size, c.n_head, c.n_embd // c.n_head)
        return [(jnp.zeros(shape, self.compute.jdtype), jnp.zeros(shape, self.compute.jdtype))
                for _ in range(c.n_layer)]

    def decode(self, idx_BT, cache, pos):
        """Logits [B, T, V] for tokens at absolute positions pos..pos+T-1, attending to the cache's earlier
        positions, and the cache with these tokens' keys and values written in: (logits, cache).

        pos + T must not exceed block_size. A prefill is decode(prompt, init_cache(B), 0); each next token is
        decode(token[:, None], cache, pos). Without dropout.
        """
        T = idx_BT.shape[1]
        x_BTD = self.wte(idx_BT) + jax.lax.dynamic_slice_in_dim(self.wpe.weight[...], pos, T)
        new = []
        for block, kv in zip(self.h, cache):
            x_BTD, kv = block(x_BTD, kv=kv, pos=pos)
            new.append(kv)
        return self._logits(self.ln_f(x_BTD)), new


class Bigram(nnx.Module):
    """The seeds' bigram model: row i of a V x V table holds the logits of the token after token i."""

    def __init__(self, c: ModelConfig, rngs: nnx.Rngs):
        self.config = c
        self.token_embedding_table = Embedding(c.vocab_size, c.vocab_size, 1.0, rngs)  # nn.Embedding's N(0, 1)

    def __call__(self, idx_BT, key=None):
        return self.token_embedding_table(idx_BT)


# Research API: the models a config's `model` field may name, beyond "gpt" and "bigram".
MODELS: dict[str, typing.Callable] = {}


def register(name: str, factory: typing.Callable | None = None):
    """Make `factory(config: ModelConfig, rngs: nnx.Rngs) -> nnx.Module` buildable as `--model=name`.

    The module maps tokens [B, T] (int32) to logits [B, T, V] (any float dtype; the loss takes float32) through
    `__call__(idx_BT, key=None)`: key is a PRNG key while training (for dropout; split it as you need) and None when
    evaluating or sampling. Its parameters are nnx.Param variables, drawn from `rngs.params()`. Use as a decorator
    (`@register("mine")`) or a call (`register("mine", factory)`); registering a name again replaces it.

    A run of a registered model resumes, samples and evaluates in any process that registered the name first. A
    model named `package.module:factory` instead is imported where it is needed, so `gptjax sample` and `gptjax
    eval` rebuild it too.
    """
    if name in BUILTIN_MODELS or not name or not name.replace(".", "").replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"cannot register a model as {name!r}: use letters, digits, '.', '_' or '-', and not "
                         f"{' or '.join(BUILTIN_MODELS)}")

    def add(f):
        MODELS[name] = f
        return f

    return add if factory is None else add(factory)


BUILTIN_MODELS = ("gpt", "bigram")


def factory_for(name: str) -> typing.Callable:
    """The factory (config, rngs, compute) -> module that builds `--model=name`; a UserError if none does.

    A research model's factory is checked as far as it can be without calling it (it must take (config, rngs)); the
    factory returned turns whatever the user's code raises or returns instead of an nnx.Module into a UserError.
    """
    if name == "gpt":
        return GPT
    if name == "bigram":
        return lambda c, rngs, compute: Bigram(c, rngs)
    if name in MODELS:
        factory = MODELS[name]
    elif ":" in name:
        factory = _import_factory(name)
    else:
        known = ", ".join([*BUILTIN_MODELS, *MODELS])
        raise UserError(f"--model={name} is not a model here ({known}): register it first "
                        "(gptjax.model.register), or name its factory as package.module:factory")
    if not _takes_config_and_rngs(factory):
        raise UserError(f"--model={name} is not a model factory (config, rngs) -> nnx.Module: "
                        f"{_describe(factory)}; name one that is")
    return functools.partial(_build, name, factory)


def _import_factory(name: str) -> typing.Callable:
    """package.module:factory, imported; every way the import can fail is a UserError naming --model."""
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise UserError(f"--model={name}: {'no factory after' if module_name else 'no module before'} ':'; name the "
                        "factory as package.module:factory")
    if module_name.startswith("."):
        raise UserError(f"--model={name}: {module_name} is a relative module name; name the factory by its "
                        "absolute import path, package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"--model={name}: cannot import {module_name} ({e}); put its package on PYTHONPATH") from None
    except SyntaxError as e:
        raise UserError(f"--model={name}: {e.filename} has a syntax error at line {e.lineno}: {e.msg}; fix it") \
            from None
    except (Exception, SystemExit) as e:  # the user's module: whatever it raises is theirs to fix, not a gptjax bug
        raise UserError(f"--model={name}: importing {module_name} raised {_where(e)}; fix it") from None
    try:
        factory = functools.reduce(getattr, attr.split("."), module)
    except AttributeError:
        raise UserError(f"--model={name}: {module_name} has no {attr}; name a model factory in it") from None
    if not callable(factory):
        raise UserError(f"--model={name}: {attr} is not callable; name a model factory (config, rngs) -> module")
    return factory


def _takes_config_and_rngs(factory) -> bool:
    """False when the factory's signature cannot take (config, rngs), or it is a class other than an nnx.Module."""
    if isinstance(factory, type) and not issubclass(factory, nnx.Module):
        return False
    try:  # an nnx.Module's own signature is its metaclass' (*args, **kwargs): its __init__ says what it takes
        if isinstance(factory, type):
            inspect.signature(factory.__init__).bind(None, None, None)
        else:
            inspect.signature(factory).bind(None, None)
    except TypeError:
        return False
    except ValueError:  # no signature to read (some builtins): the call will tell
        pass
    return True


def _describe(factory) -> str:
    if isinstance(factory, type) and not issubclass(factory, nnx.Module):
        return f"{factory.__qualname__} is a class but not an nnx.Module"
    try:
        sig = str(inspect.signature(factory.__init__ if isinstance(factory, type) else factory))
        return f"it takes {sig if len(sig) <= 60 else sig[:56] + ' ...)'}"
    except (TypeError, ValueError):
        return "it cannot be called with (config, rngs)"


def _build(name: str, factory: typing.Callable, c: ModelConfig, rngs: nnx.Rngs, compute: Compute) -> nnx.Module:
    """factory(c, rngs), its failures and a result that is not an nnx.Module a UserError naming --model."""
    try:
        module = factory(c, rngs)
    except UserError:
        raise
    except (Exception, SystemExit) as e:  # the user's code: whatever it raises is theirs to fix, not a gptjax bug
        if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e):
            raise  # out of memory, which the caller names
        if isinstance(e, TypeError) and e.__traceback__.tb_next is None:  # the call itself failed: not a factory
            raise UserError(f"--model={name} is not a model factory (config, rngs) -> nnx.Module: "
                            f"{_first_line(e)}; name one that is") from None
        raise UserError(f"--model={name}: the factory raised {_where(e)}; fix it") from None
    if not isinstance(module, nnx.Module):
        what = "None" if module is None else f"{_first_line(repr(module))[:60]} ({type(module).__name__})"
        raise UserError(f"--model={name}: the factory returned {what}, not an nnx.Module; return the model from it")
    return module


def _library_dirs() -> tuple[str, ...]:
    import flax
    import numpy

    dirs = [os.path.dirname(m.__file__) for m in (jax, flax, numpy)] + [os.path.dirname(os.path.abspath(__file__))]
    return tuple(os.path.join(d, "") for d in dirs)


def _where(e: BaseException) -> str:
    """'ValueError at FILE line N: message' for the deepest frame of the user's own code where e was raised
    (not gptjax's, JAX's, Flax's, NumPy's or Python's own library), else the deepest frame."""
    frames = traceback.extract_tb(e.__traceback__) if e.__traceback__ else []
    paths = sysconfig.get_paths()
    stdlib = os.path.join(paths["stdlib"], "")
    site = tuple(os.path.join(paths[k], "") for k in ("purelib", "platlib"))
    libs = _library_dirs()

    def is_user(f):
        p = os.path.abspath(f.filename)
        in_python = p.startswith(stdlib) and not p.startswith(site)
        return not (f.filename.startswith("<") or p.startswith(libs) or in_python)

    user = [f for f in frames if is_user(f)] or frames
    at = f" at {user[-1].filename} line {user[-1].lineno}" if user else ""
    what = f"exit({e.code})" if isinstance(e, SystemExit) else _first_line(e)
    return f"{type(e).__name__}{at}: {what}"


def _first_line(x) -> str:
    lines = [line.strip() for line in str(x).splitlines() if line.strip()]
    return (lines[0] if lines else "")[:200]


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
    """Each position's next-token negative log-likelihood in nats, computed in float32: [B, T]."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    picked_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return lse_BT - picked_BT


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
