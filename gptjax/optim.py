"""AdamW as nanoGPT configures it (warmup + cosine schedule, global-norm clipping, decay on >= 2-D parameters)
and the TrainState it steps."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from gptjax.config import TrainConfig


class TrainState(NamedTuple):
    step: jax.Array  # optimizer steps taken
    params: object  # nnx.State of the model's parameters
    opt_state: optax.OptState
    best_val_loss: jax.Array  # lowest estimated val loss so far (inf before the first eval)


def lr_schedule(t: TrainConfig):
    """nanoGPT's get_lr: warmup lr*(it+1)/(warmup+1), cosine to min_lr at lr_decay_iters, then min_lr."""
    if not t.decay_lr:
        return lambda it: jnp.asarray(t.learning_rate, jnp.float32)

    def lr(it):
        it = jnp.asarray(it, jnp.float32)
        warm = t.learning_rate * (it + 1) / (t.warmup_iters + 1)
        ratio = jnp.clip((it - t.warmup_iters) / (t.lr_decay_iters - t.warmup_iters), 0.0, 1.0)
        cos = t.min_lr + 0.5 * (1.0 + jnp.cos(math.pi * ratio)) * (t.learning_rate - t.min_lr)
        return jnp.where(it < t.warmup_iters, warm, jnp.where(it > t.lr_decay_iters, t.min_lr, cos))

    return lr


def global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_: scale by min(1, max_norm / (norm + 1e-6))."""

    def update(updates, state, params=None):
        coef = jnp.minimum(max_norm / (global_norm(updates) + 1e-6), 1.0)
        return jax.tree.map(lambda g: g * coef, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def decay_mask(params):
    """Weight decay on matrices and embeddings (>= 2-D), not on biases and LayerNorm gains, as nanoGPT groups them."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(t: TrainConfig, params) -> optax.GradientTransformation:
    adamw = optax.adamw(lr_schedule(t), b1=t.beta1, b2=t.beta2, eps=1e-8, weight_decay=t.weight_decay,
                        mask=decay_mask(params))
    # One state structure whatever grad_clip is, so a resumed run may turn clipping on or off.
    return optax.chain(clip_by_global_norm(t.grad_clip) if t.grad_clip > 0 else optax.identity(), adamw)


def init_state(params, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jnp.asarray(jnp.inf, jnp.float32))
