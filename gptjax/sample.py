"""Jitted autoregressive generation: one compiled loop per (prompt length, length, samples, top_k), not per token."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import model, tokenizers
from gptjax.config import check_range
from gptjax.errors import UserError


def filter_logits(logits_NV, temperature, top_k: int | None):
    """Scale by 1/temperature and keep only the top_k largest logits (the rest -> -inf), as nanoGPT's sample."""
    logits_NV = logits_NV.astype(jnp.float32) / temperature
    if top_k:
        kth_N1 = jax.lax.top_k(logits_NV, min(top_k, logits_NV.shape[-1]))[0][:, -1:]
        logits_NV = jnp.where(logits_NV < kth_N1, -jnp.inf, logits_NV)
    return logits_NV


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), static_argnames=("n_tokens",))
def generate(graphdef, block_size: int, max_new_tokens: int, top_k: int | None, params, prompt_NP, key, temperature,
             n_tokens: int | None = None):
    """prompt [N, P] -> tokens [N, P + max_new_tokens]; the model sees at most the last block_size tokens.

    n_tokens limits sampling to the tokenizer's ids when the model's vocabulary is padded (nanoGPT's 50304).
    """
    N, P = prompt_NP.shape
    L = P + max_new_tokens
    buf_NL = jnp.zeros((N, max(L, block_size)), jnp.int32).at[:, :P].set(prompt_NP)

    def body(i, buf_NL):
        cur = P + i  # tokens known so far
        start = jnp.maximum(cur - block_size, 0)
        # A fixed-size window: while cur < block_size it runs past cur into zeros that causality ignores.
        window_NW = jax.lax.dynamic_slice(buf_NL, (0, start), (N, block_size))
        logits_NWV = model.apply(graphdef, params, window_NW)
        logits_NV = jax.lax.dynamic_index_in_dim(logits_NWV, cur - 1 - start, axis=1, keepdims=False)[:, :n_tokens]
        nxt_N = jax.random.categorical(jax.random.fold_in(key, i), filter_logits(logits_NV, temperature, top_k))
        return jax.lax.dynamic_update_slice(buf_NL, nxt_N[:, None].astype(jnp.int32), (0, cur))

    return jax.lax.fori_loop(0, max_new_tokens, body, buf_NL)[:, :L]


def default_start(tok) -> str:
    """A newline, as nanoGPT starts, if the vocabulary has one; else the vocabulary's first token."""
    try:
        if tok.encode("\n"):
            return "\n"
    except UserError:  # a char vocabulary from a corpus without newlines
        pass
    return tok.decode([0])


def sample(out_dir: str, start: str | None = None, num_samples: int = 1, max_new_tokens: int = 500,
           temperature: float = 0.8, top_k: int | None = 200, seed: int = 1337,
           checkpoint: str | int = "best") -> list[str]:
    """Texts generated from a run's checkpoint (best by default), each beginning with `start` (or FILE:path's
    contents; None: default_start).

    top_k 0 or None samples from the whole distribution."""
    from gptjax.train import load_run

    for key, value in (("temperature", temperature), ("num_samples", num_samples),
                       ("max_new_tokens", max_new_tokens), ("top_k", top_k or 0), ("seed", seed)):
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
    config, graphdef, params = load_run(out_dir, checkpoint)
    tok = tokenizers.load(os.path.join(out_dir, "tokenizer.json"))
    start = default_start(tok) if start is None else start
    prompt = np.asarray(tok.encode(start), np.int32)
    if len(prompt) == 0:
        raise UserError(f"--start={start!r} encodes to no tokens")
    prompt_NP = np.tile(prompt, (num_samples, 1))
    out = generate(graphdef, config.model.block_size, max_new_tokens, top_k, params, prompt_NP,
                   jax.random.PRNGKey(seed), jnp.float32(temperature), n_tokens=tok.vocab_size)
    return [tok.decode(row.tolist()) for row in np.asarray(out)]
