"""Parity of training: gptjax's jitted train step and nanoGPT's PyTorch loop take the same 100 AdamW steps, the
seeds' bigram experiment lands in the same place in both, and each silent difference of JAX ports is caught."""

import dataclasses

import jax
import jax.numpy as jnp
import optax
import pytest
import torch

from gptjax import data, model, optim
from gptjax.config import load_config
from gptjax.reference import parity

TOL = 1e-4
STEPS = 100


@pytest.fixture(scope="module")
def corpus(shakespeare):
    prep = data.prepare(load_config("tiny", {"input": shakespeare}).data)
    return prep.tokens("train"), prep.tokens("val"), prep.meta["vocab_size"]


def _gpt_config(shakespeare, vocab):
    """The tiny GPT with nanoGPT's GPT-2 optimizer (lr 6e-4 -> 6e-5, beta2 0.95, wd 0.1, clip 1.0), its warmup
    and cosine squeezed into 100 steps (warmup 10, min_lr from step 80), two accumulated micro-batches.

    At lr 1e-2 this model's training is chaotic: one ulp on the initial weights moves the loss by 1e-2 within
    100 steps in gptjax alone, so no two frameworks could agree there (experiments/results/parity.md).
    """
    config = load_config("tiny", {"input": shakespeare, "vocab_size": vocab})
    return parity.parity_config(config, learning_rate=6e-4, min_lr=6e-5, beta2=0.95, weight_decay=0.1,
                                grad_clip=1.0, warmup_iters=10, lr_decay_iters=80, batch_size=16,
                                gradient_accumulation_steps=2)


def _agrees(r: dict) -> bool:
    return r["loss"] <= TOL and r["params"] <= TOL


def test_100_adamw_steps_match_nanogpt(shakespeare, corpus):
    tokens, _, vocab = corpus
    config = _gpt_config(shakespeare, vocab)
    r = parity.train_both(config, tokens, STEPS)
    assert _agrees(r), {k: v for k, v in r.items() if not k.startswith("loss_")}
    assert r["loss_jax"][-1] < r["loss_jax"][0] - 0.5  # it learned, so the comparison covers real updates
    assert 0 < r["clipped_steps"] < STEPS  # clipping was both active and inactive
    t = config.train
    assert t.warmup_iters < t.lr_decay_iters < STEPS  # warmup, cosine and the min_lr floor all ran


def _port_optimizer(t, params, schedule=None, mask=None):
    """gptjax's optimizer with one piece swapped for what a JAX port typically writes."""
    adamw = optax.adamw(schedule or optim.lr_schedule(t), b1=t.beta1, b2=t.beta2, eps=1e-8,
                        weight_decay=t.weight_decay, mask=mask or optim.decay_mask(params))
    return optax.chain(optim.clip_by_global_norm(t.grad_clip), adamw)


def _no_embedding_decay(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p.ndim >= 2 and not model._name(path).startswith(("wte.", "wpe.")), params)


@pytest.mark.parametrize("difference", ["embeddings excluded from decay", "warmup starting at 0",
                                        "biases that nanoGPT's config switches off"])
def test_100_step_check_catches_a_port_that_differs(shakespeare, corpus, difference):
    tokens, _, vocab = corpus
    config = _gpt_config(shakespeare, vocab)
    t = config.train
    params = model.split(model.create(config.model, t.seed))[1]
    kwargs = {}
    if difference == "embeddings excluded from decay":
        kwargs["tx"] = _port_optimizer(t, params, mask=_no_embedding_decay(params))
    elif difference == "warmup starting at 0":  # optax's schedule: 0 at step 0 where nanoGPT has lr / (warmup + 1)
        kwargs["tx"] = _port_optimizer(t, params, schedule=optax.warmup_cosine_decay_schedule(
            0.0, t.learning_rate, t.warmup_iters, t.lr_decay_iters, t.min_lr))
    else:  # flax's and torch's Linear / LayerNorm default to a bias
        kwargs["jax_model"] = dataclasses.replace(config.model, bias=True)
    r = parity.train_both(config, tokens, STEPS, **kwargs)
    assert not _agrees(r), (difference, r["loss"], r["params"])


def _patch_shipped_code(monkeypatch, difference: str) -> None:
    """Put one difference into gptjax's own train / model code, where `gptjax train` would run it."""
    if difference == "weight decay on every parameter":  # optax.adamw without a mask decays LayerNorm gains too
        monkeypatch.setattr(optim, "decay_mask", lambda params: jax.tree.map(lambda p: True, params))
    elif difference == "cosine decay to 0, not min_lr":
        schedule = optim.lr_schedule
        monkeypatch.setattr(optim, "lr_schedule", lambda t: schedule(dataclasses.replace(t, min_lr=0.0)))
    else:  # PaLM's auxiliary z-loss, 1e-4 * logsumexp(logits)^2, added to the cross-entropy
        cross_entropy = model.cross_entropy

        def with_z_loss(logits_BTV, targets_BT):
            lse_BT = jax.nn.logsumexp(logits_BTV.astype(jnp.float32), axis=-1)
            return cross_entropy(logits_BTV, targets_BT) + 1e-4 * jnp.mean(jnp.square(lse_BT))

        monkeypatch.setattr(model, "cross_entropy", with_z_loss)


@pytest.mark.parametrize("difference", ["weight decay on every parameter", "cosine decay to 0, not min_lr",
                                        "z-loss added to the loss"])
def test_100_step_check_catches_a_difference_in_the_shipped_code(shakespeare, corpus, monkeypatch, difference):
    """A difference patched into gptjax's decay mask, lr schedule or loss (not passed in as an argument) must make
    the 100-step check fail: it guards against a check that runs its own copy of the optimizer or loss."""
    tokens, _, vocab = corpus
    config = _gpt_config(shakespeare, vocab)
    _patch_shipped_code(monkeypatch, difference)
    r = parity.train_both(config, tokens, STEPS)
    assert not _agrees(r), (difference, r["loss"], r["params"])


def _bigram_config(shakespeare, vocab):
    return load_config("bigram", {"input": shakespeare, "vocab_size": vocab})


def test_bigram_preset_is_torch_adamw_defaults(shakespeare, corpus):
    """The seeds call torch.optim.AdamW(m.parameters(), lr=1e-3); the preset must be that optimizer."""
    tokens, _, vocab = corpus
    r = parity.seeds_bigram(_bigram_config(shakespeare, vocab), tokens, None, steps=STEPS)
    assert r["loss"] <= TOL and r["params"] <= TOL, (r["loss"], r["params"])


def test_bigram_check_catches_optax_default_weight_decay(shakespeare, corpus):
    """optax.adamw(lr) decays by 1e-4 where torch.optim.AdamW(lr) decays by 1e-2."""
    tokens, _, vocab = corpus
    config = _bigram_config(shakespeare, vocab)
    lr = config.train.learning_rate
    r = parity.train_both(config, tokens, STEPS, tx=optax.adamw(lr),
                          torch_optimizer=lambda m: torch.optim.AdamW(m.parameters(), lr=lr))
    assert not (r["loss"] <= TOL and r["params"] <= TOL), (r["loss"], r["params"])


def test_seeds_bigram_experiment_in_both_frameworks(shakespeare, corpus):
    """Batch 32, block 8, AdamW lr 1e-3, 10000 steps, same initial table and batches: the seeds' 2.38-2.56, and
    the README's (and experiments/results/parity.md's) val loss 2.4898 and last-200-steps train loss 2.4666 to
    the 4 digits recorded. The range alone passes a table initialised at N(0, 0.02) instead of N(0, 1)."""
    tokens, val, vocab = corpus
    config = _bigram_config(shakespeare, vocab)
    r = parity.seeds_bigram(config, tokens, val, steps=config.train.max_iters)
    assert len(r["loss_jax"]) == 10000 and config.train.batch_size == 32 and config.model.block_size == 8
    assert r["loss"] <= TOL, r["loss"]  # the whole 10000-step loss curve
    assert abs(r["eval_jax"] - r["eval_torch"]) <= TOL
    train_jax, train_torch = (sum(r[k][-200:]) / 200 for k in ("loss_jax", "loss_torch"))
    for loss in (r["eval_jax"], r["eval_torch"], train_jax):
        assert 2.38 <= loss <= 2.56, loss
    # Measured 2.489759 (jax) and 2.489761 (torch), 2.466612 and 2.466615: the recorded figures, rounded; the val
    # loss sits 1e-5 above a rounding boundary, 8x the frameworks' difference.
    for loss, recorded in ((r["eval_jax"], 2.4898), (r["eval_torch"], 2.4898), (train_jax, 2.4666),
                           (train_torch, 2.4666)):
        assert round(loss, 4) == recorded, (loss, recorded)


@pytest.mark.parametrize("direction", ["jax->torch", "torch->jax"])
def test_a_run_moves_between_frameworks_through_a_nanogpt_checkpoint(shakespeare, corpus, direction):
    """50 steps in one framework, a nanoGPT ckpt.pt with AdamW state, 50 more in the other: the same as staying."""
    tokens, _, vocab = corpus
    config = _gpt_config(shakespeare, vocab)
    r = parity.switch_frameworks(config, tokens, 50, 50, direction)
    assert r["start"] == 50
    assert _agrees(r), r
    r = parity.switch_frameworks(config, tokens, 50, 50, direction, keep_optimizer=False)
    assert not _agrees(r), r  # the moments and step count matter: a weights-only move is caught
