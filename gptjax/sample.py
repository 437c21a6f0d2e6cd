"""Jitted autoregressive generation: one compiled loop per (prompt length, length, samples, top_k, top_p), not per
token; a KV-cache decoder (prefill, then one token a step) or the re-forward loop nanoGPT runs."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptjax import model, rundir, tokenizers
from gptjax.config import check_range
from gptjax.errors import UserError
from gptjax.options import SampleConfig

_D = SampleConfig()  # the defaults, which `gptjax sample --help` shows


def filter_logits(logits_NV, temperature, top_k: int | None, top_p: float | None = None):
    """Scale by 1/temperature, keep only the top_k largest logits (nanoGPT's sample), then the smallest set of the
    most likely tokens whose probability sums to at least top_p (nucleus sampling); the rest -> -inf.

    The largest logit is subtracted first (softmax does not change): a temperature so small that logits/temperature
    would overflow then leaves 0 for the most likely tokens and -inf for the rest, i.e. greedy sampling, its limit.
    (A temperature below float32's smallest normal number, flushed to 0 on the device, counts as that number.)"""
    logits_NV = logits_NV.astype(jnp.float32)
    temperature = jnp.maximum(temperature, jnp.finfo(jnp.float32).tiny)
    logits_NV = (logits_NV - logits_NV.max(axis=-1, keepdims=True)) / temperature
    if top_k:
        kth_N1 = jax.lax.top_k(logits_NV, min(top_k, logits_NV.shape[-1]))[0][:, -1:]
        logits_NV = jnp.where(logits_NV < kth_N1, -jnp.inf, logits_NV)
    if top_p is not None and top_p < 1.0:
        order_NV = jnp.argsort(-logits_NV, axis=-1)  # most likely first (stable: ties in vocabulary order)
        p_NV = jax.nn.softmax(jnp.take_along_axis(logits_NV, order_NV, axis=-1), axis=-1)
        # A token stays when the tokens ranked above it hold less than top_p: the smallest prefix reaching top_p.
        keep_sorted_NV = jnp.cumsum(p_NV, axis=-1) - p_NV < top_p
        keep_NV = jnp.zeros_like(keep_sorted_NV).at[jnp.arange(logits_NV.shape[0])[:, None], order_NV].set(
            keep_sorted_NV)
        logits_NV = jnp.where(keep_NV, logits_NV, -jnp.inf)
    return logits_NV


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), static_argnames=("n_tokens", "top_p", "kv_cache"))
def generate(graphdef, block_size: int, max_new_tokens: int, top_k: int | None, params, prompt_NP, key, temperature,
             n_tokens: int | None = None, top_p: float | None = None, kv_cache: bool = True):
    """prompt [N, P] -> tokens [N, P + max_new_tokens]; the model sees at most the last block_size tokens.

    kv_cache (GPT only): while the text fits in block_size, one prefill of the prompt and then one token a step
    against cached keys and values. Past block_size nanoGPT crops the context to its last block_size tokens, which
    moves every token to a new position; the cached keys hold the old positions, so each further token is computed
    as nanoGPT does, by re-running the cropped window (exact, at the re-forward path's speed). Without kv_cache
    every token re-runs the window. Both paths draw token i with the same key, so they give the same tokens
    (up to float rounding of the logits).
    n_tokens limits sampling to the tokenizer's ids when the model's vocabulary is padded (nanoGPT's 50304).
    """
    N, P = prompt_NP.shape
    L = P + max_new_tokens
    buf_NL = jnp.zeros((N, max(L, block_size)), jnp.int32).at[:, :P].set(prompt_NP)

    def pick(i, logits_NV, buf_NL):
        """Draw new token i (at index P + i) from logits."""
        probs = filter_logits(logits_NV[:, :n_tokens], temperature, top_k, top_p)
        nxt_N = jax.random.categorical(jax.random.fold_in(key, i), probs).astype(jnp.int32)
        return jax.lax.dynamic_update_slice(buf_NL, nxt_N[:, None], (0, P + i)), nxt_N

    def reforward(i, buf_NL):
        cur = P + i  # tokens known so far
        start = jnp.maximum(cur - block_size, 0)
        # A fixed-size window: while cur < block_size it runs past cur into zeros that causality ignores.
        window_NW = jax.lax.dynamic_slice(buf_NL, (0, start), (N, block_size))
        logits_NWV = model.apply(graphdef, params, window_NW)
        return pick(i, jax.lax.dynamic_index_in_dim(logits_NWV, cur - 1 - start, axis=1, keepdims=False), buf_NL)[0]

    cached = 0  # new tokens drawn through the cache: those with P + i <= block_size
    if kv_cache and max_new_tokens and P <= block_size and isinstance(nnx.merge(graphdef, params), model.GPT):
        cached = min(max_new_tokens, block_size - P + 1)
        logits_NPV, cache = model.decode(graphdef, params, prompt_NP, model.init_cache(graphdef, params, N), 0)
        buf_NL, tok_N = pick(0, logits_NPV[:, -1], buf_NL)

        def step(i, carry):  # the token at P + i - 1 goes in; token P + i comes out
            buf_NL, cache, tok_N = carry
            logits_N1V, cache = model.decode(graphdef, params, tok_N[:, None], cache, P + i - 1)
            buf_NL, tok_N = pick(i, logits_N1V[:, 0], buf_NL)
            return buf_NL, cache, tok_N

        buf_NL = jax.lax.fori_loop(1, cached, step, (buf_NL, cache, tok_N))[0]
    return jax.lax.fori_loop(cached, max_new_tokens, reforward, buf_NL)[:, :L]


def check_memory(m, num_samples: int, length: int) -> None:
    """Refuse, before allocating, samples that cannot fit: per sample the token buffer (on the device, on the host
    and as Python ints to decode), the re-forward window's float32 logits, the KV cache and a block's
    activations."""
    from gptjax.evaluate import refuse_unless_fits

    T, D = m.block_size, m.n_embd
    per_sample = 64 * max(length, T) + 8 * T * m.vocab_size + 8 * m.n_layer * T * D + 64 * T * D
    refuse_unless_fits(num_samples * per_sample, f"{num_samples:,} samples of {length:,} tokens",
                       "--num_samples or --max_new_tokens")


def default_start(tok) -> str:
    """A newline, as nanoGPT starts, if the vocabulary has one; else the vocabulary's first token."""
    try:
        if tok.encode("\n"):
            return "\n"
    except UserError:  # a char vocabulary from a corpus without newlines
        pass
    return tok.decode([0])


def sample(out_dir: str, start: str | None = None, num_samples: int = _D.num_samples,
           max_new_tokens: int = _D.max_new_tokens, temperature: float = _D.temperature, top_k: int | None = _D.top_k,
           seed: int = _D.seed, checkpoint: str | int = "best", top_p: float = _D.top_p, kv_cache: bool = _D.kv_cache,
           dtype: str = "auto", attention: str = "auto", init_from: str = "") -> list[str]:
    """Texts generated from a run's checkpoint (best by default), each beginning with `start` (or FILE:path's
    contents; None: default_start).

    top_k 0 or None samples from the whole distribution; top_p 1 turns nucleus filtering off. kv_cache: see
    generate. dtype and attention: how the model runs (auto: bfloat16 and flash attention on a GPU that has them,
    float32 on a CPU). init_from: a pretrained GPT-2 (gptjax.weights.hf.locate's names) instead of a run."""
    for key, value in (("temperature", temperature), ("num_samples", num_samples),
                       ("max_new_tokens", max_new_tokens), ("top_k", top_k or 0), ("seed", seed), ("top_p", top_p)):
        check_range(key, value)
    top_k = top_k or None  # 0 or None: no top-k filtering
    if start is not None and start.startswith("FILE:"):
        try:
            with open(start[5:], encoding="utf-8") as f:
                start = f.read()
        except OSError as e:
            raise UserError(f"--start={start}: cannot read that file ({e.strerror})") from None
        except UnicodeDecodeError:
            raise UserError(f"--start={start}: that file is not UTF-8 text; give a text file") from None
    if start == "":
        raise UserError("--start must not be empty: generation needs at least one token to condition on")
    if init_from:
        from gptjax.weights import hf

        config, graphdef, params, tok = hf.load_model(init_from, dtype=dtype, attention=attention)
    else:
        config, graphdef, params = rundir.load_run(out_dir, checkpoint, dtype=dtype, attention=attention)
        tok = tokenizers.load(os.path.join(out_dir, "tokenizer.json"))
    start = default_start(tok) if start is None else start
    prompt = np.asarray(tok.encode(start), np.int32)
    if len(prompt) == 0:
        raise UserError(f"--start={start!r} encodes to no tokens")
    check_memory(config.model, num_samples, len(prompt) + max_new_tokens)
    prompt_NP = np.tile(prompt, (num_samples, 1))
    out = generate(graphdef, config.model.block_size, max_new_tokens, top_k, params, prompt_NP,
                   jax.random.PRNGKey(seed), jnp.float32(temperature), n_tokens=tok.vocab_size,
                   top_p=top_p if top_p < 1.0 else None, kv_cache=kv_cache)
    return [tok.decode(row.tolist()) for row in np.asarray(out)]
