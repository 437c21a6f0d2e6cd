"""Run gptjax and its PyTorch twin on the same weights and batches and measure how far apart they land."""

from __future__ import annotations

import dataclasses
import io

import jax
import jax.numpy as jnp
import numpy as np
import torch

from gptjax import data, evaluate, model, optim, sample, train
from gptjax.config import Config, ModelConfig
from gptjax.reference import convert
from gptjax.reference.bigram import BigramLanguageModel
from gptjax.reference.nanogpt import GPT, configure_optimizers, next_token_probs
from gptjax.reference.nanogpt import train_step as torch_train_step
from gptjax.weights import nanogpt as nanogpt_weights  # not reference.nanogpt, the twin
from gptjax.weights import torchfile


def twin(c: ModelConfig) -> torch.nn.Module:
    return BigramLanguageModel(c.vocab_size) if c.model == "bigram" else GPT(c)


def load_twin(params, c: ModelConfig, twin_config: ModelConfig | None = None) -> torch.nn.Module:
    """The PyTorch twin holding `params`. A different twin_config loads leniently (only the keys both have),
    the way a port that silently disagrees on a default would."""
    m = twin(twin_config or c)
    m.load_state_dict(convert.to_torch_state_dict(params, c), strict=twin_config is None)
    return m


def random_params(c: ModelConfig, seed: int, scale: float = 0.1):
    """Parameters drawn around their init (gains 1 + noise, the rest N(0, scale^2)), so no LayerNorm gain is 1 and
    no bias 0 as after training; drawn with numpy, which is much quicker than initialising the module."""
    rng = np.random.default_rng(seed)
    named = {}
    for name, x in model.param_names(model.abstract_params(c)).items():
        base = 1.0 if name.endswith("weight") and len(x.shape) == 1 else 0.0  # LayerNorm gains
        named[name] = jnp.asarray(base + scale * rng.standard_normal(x.shape), jnp.float32)
    return model.params_from_names(model.abstract_params(c), named)


def _t(x) -> torch.Tensor:
    return torch.from_numpy(np.array(x, dtype=np.int64))


def grad_error(g_jax: torch.Tensor, g_torch: torch.Tensor) -> float:
    """Max |a - b| / max(1, |b|): absolute for small values, relative for large ones."""
    return float(((g_jax - g_torch).abs() / g_torch.abs().clamp(min=1.0)).max())


def forward_backward(c: ModelConfig, params, x_BT, y_BT, twin_config: ModelConfig | None = None) -> dict:
    """Logits, loss and every parameter's gradient of both frameworks; the largest differences."""
    graphdef = model.split(model.abstract_model(c))[0]

    def loss_and_logits(p, x, y):
        logits = model.apply(graphdef, p, x)
        return model.cross_entropy(logits, y), logits

    grad_fn = jax.jit(jax.value_and_grad(loss_and_logits, has_aux=True))
    (loss, logits), grads = grad_fn(params, jnp.asarray(x_BT, jnp.int32), jnp.asarray(y_BT, jnp.int32))
    tm = load_twin(params, c, twin_config)
    t_logits, t_loss = tm(_t(x_BT), _t(y_BT))
    t_loss.backward()
    g_jax = convert.to_torch_state_dict(grads, c)
    errors = {name: grad_error(g_jax[name], p.grad) for name, p in tm.named_parameters() if name in g_jax}
    worst = max(errors, key=errors.get)
    return {"logits": float((torch.from_numpy(np.array(logits)) - t_logits.detach()).abs().max()),
            "loss": abs(float(loss) - t_loss.item()), "grad": errors[worst], "grad_worst": worst,
            "params": len(errors)}


def _batch(tokens, config: Config, it: int):
    A, B, T = config.train.gradient_accumulation_steps, config.train.batch_size, config.model.block_size
    x, y = data.get_batch(tokens, A * B, T, config.train.seed, it)
    return x.reshape(A, B, T), y.reshape(A, B, T)


def jax_steps(step_fn, state, tokens, config: Config, start: int, steps: int):
    """(state, losses, grad norms) after gptjax's train step runs steps start .. start + steps - 1."""
    losses, norms = [], []
    for it in range(start, start + steps):
        state, metrics = step_fn(state, *_batch(tokens, config, it), jax.random.PRNGKey(config.train.seed))
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
    return state, losses, norms


def torch_steps(tm, opt, tokens, config: Config, start: int, steps: int) -> list[float]:
    """Losses of nanoGPT's loop over the same steps and batches."""
    return [float(torch_train_step(tm, opt, *map(_t, _batch(tokens, config, it)), it, config.train))
            for it in range(start, start + steps)]


def _final_diff(params, c: ModelConfig, tm) -> tuple[float, str]:
    final = convert.to_torch_state_dict(params, c)
    diffs = {k: float((final[k] - p.detach()).abs().max()) for k, p in tm.state_dict().items() if k in final}
    worst = max(diffs, key=diffs.get)
    return diffs[worst], worst


def _curve_diff(a, b) -> float:
    return float(np.max(np.abs(np.subtract(a, b))))


def train_both(config: Config, tokens, steps: int, tx=None, jax_model: ModelConfig | None = None,
               torch_optimizer=None, eval_tokens=None) -> dict:
    """`steps` optimizer steps in both frameworks from the same initial weights on the same batches.

    gptjax runs its own jitted train step (train.make_train_step), the twin runs nanoGPT's loop
    (reference.nanogpt.train_step). tx / jax_model / torch_optimizer swap in a different optimizer or model
    on one side, to show what a silent difference does. Returns both loss curves and the final differences,
    and with eval_tokens both models' loss on the eval_iters validation batches `gptjax train` estimates with.
    """
    c, t = config.model, config.train
    assert c.dropout == 0.0, "parity runs without dropout: the two frameworks draw different masks"
    jc = jax_model or c
    graphdef, params = model.split(model.create(jc, t.seed))
    tm = load_twin(params, jc, None if jax_model is None else c)
    opt = (torch_optimizer or (lambda m: configure_optimizers(m, t)))(tm)
    tx = tx or optim.make_optimizer(t, params)
    state, loss_jax, norms = jax_steps(train.make_train_step(graphdef, tx, t), optim.init_state(params, tx), tokens,
                                       config, 0, steps)
    loss_torch = torch_steps(tm, opt, tokens, config, 0, steps)
    param_diff, worst = _final_diff(state.params, jc, tm)
    out = {"loss_jax": loss_jax, "loss_torch": loss_torch,
           "clipped_steps": sum(bool(t.grad_clip) and n > t.grad_clip for n in norms),
           "loss": _curve_diff(loss_jax, loss_torch), "params": param_diff, "params_worst": worst,
           "final_params": state.params}
    if eval_tokens is not None:
        x, y = evaluate.eval_batches(eval_tokens, t, c.block_size, "val", 0)
        out["eval_jax"] = float(evaluate.make_estimate_loss(graphdef)(state.params, x, y))
        with torch.no_grad():
            out["eval_torch"] = float(np.mean([tm(_t(xb), _t(yb))[1].item() for xb, yb in zip(x, y)]))
    return out


def _through_a_file(ckpt: dict) -> dict:
    """torch.save, then torch.load(weights_only=True), as a checkpoint travels between the frameworks."""
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def switch_frameworks(config: Config, tokens, before: int, after: int, direction: str,
                      keep_optimizer: bool = True) -> dict:
    """Train `before` steps in one framework, move the run through a nanoGPT checkpoint (weights and AdamW
    state) and train `after` more in the other, against staying in the first; direction is "jax->torch" or
    "torch->jax". keep_optimizer=False drops the optimizer state from the checkpoint, to show that it matters.
    """
    c, t = config.model, config.train
    assert c.dropout == 0.0 and direction in ("jax->torch", "torch->jax")
    graphdef, params = model.split(model.create(c, t.seed))
    tx = optim.make_optimizer(t, params)
    step_fn = train.make_train_step(graphdef, tx, t)
    tm = load_twin(params, c)
    opt = configure_optimizers(tm, t)
    if direction == "jax->torch":
        state, _, _ = jax_steps(step_fn, optim.init_state(params, tx), tokens, config, 0, before)
        ckpt = _through_a_file(nanogpt_weights.torch_checkpoint(config, state))
        if not keep_optimizer:
            ckpt.pop("optimizer")
        tm = GPT(dataclasses.replace(c, **ckpt["model_args"]))  # what nanoGPT's train.py does to resume
        tm.load_state_dict(ckpt["model"])
        opt = configure_optimizers(tm, t)
        if "optimizer" in ckpt:
            opt.load_state_dict(ckpt["optimizer"])
        start = ckpt["iter_num"]
    else:
        torch_steps(tm, opt, tokens, config, 0, before)
        ckpt = {"model": tm.state_dict(), "model_args": {k: getattr(c, k) for k in nanogpt_weights.MODEL_ARGS},
                "iter_num": before, "best_val_loss": torch.tensor(9.0), "config": {"dataset": "shakespeare_char"}}
        if keep_optimizer:
            ckpt["optimizer"] = opt.state_dict()
        state = nanogpt_weights.from_checkpoint(torchfile.from_torch(_through_a_file(ckpt)), config)
        start = int(state.step) if keep_optimizer else before
    # Both continue from the switch: the run that moved, and the one that stayed where it was.
    state, loss_jax, _ = jax_steps(step_fn, state, tokens, config, start, after)
    loss_torch = torch_steps(tm, opt, tokens, config, start, after)
    param_diff, worst = _final_diff(state.params, c, tm)
    return {"loss": _curve_diff(loss_jax, loss_torch), "params": param_diff, "params_worst": worst, "start": start}


def jax_floor(config: Config, tokens, steps: int) -> dict:
    """gptjax against itself with every initial weight moved by one ulp: how far rounding alone carries a run.

    Parity between frameworks cannot be tighter than this; where it is large the training is chaotic.
    """
    t = config.train
    graphdef, params = model.split(model.create(config.model, t.seed))
    tx = optim.make_optimizer(t, params)
    step_fn = train.make_train_step(graphdef, tx, t)
    (p0, l0, _), (p1, l1, _) = (
        jax_steps(step_fn, optim.init_state(p, tx), tokens, config, 0, steps)
        for p in (params, jax.tree.map(lambda x: jnp.nextafter(x, jnp.inf), params)))
    return {"loss": _curve_diff(l0, l1),
            "params": max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p0.params),
                                                                      jax.tree.leaves(p1.params)))}


def seeds_bigram(config: Config, tokens, val_tokens, steps: int = 10000) -> dict:
    """The seeds' bigram experiment in both frameworks: torch.optim.AdamW(m.parameters(), lr) as the seeds call it."""
    assert config.model.model == "bigram"
    return train_both(config, tokens, steps, eval_tokens=val_tokens,
                      torch_optimizer=lambda m: torch.optim.AdamW(m.parameters(), lr=config.train.learning_rate))


def sampling(logits_NV: np.ndarray, temperature: float, top_k: int | None) -> float:
    """Max difference of the next-token distributions: gptjax's filter_logits vs nanoGPT's, both softmaxed."""
    p_jax = jax.nn.softmax(sample.filter_logits(jnp.asarray(logits_NV), temperature, top_k), axis=-1)
    p_torch = next_token_probs(torch.from_numpy(np.asarray(logits_NV, np.float32)), temperature, top_k)
    return float(np.max(np.abs(np.asarray(p_jax) - p_torch.numpy())))


def parity_config(config: Config, **train_overrides) -> Config:
    """config without dropout, with train settings replaced (e.g. a short schedule for a 100-step run)."""
    return dataclasses.replace(config, model=dataclasses.replace(config.model, dropout=0.0),
                               train=dataclasses.replace(config.train, **train_overrides))
