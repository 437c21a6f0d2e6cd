import contextlib
import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import checkpoint, model
from gptjax.config import ModelConfig, TrainConfig, override
from gptjax.errors import UserError
from gptjax.optim import clip_by_global_norm, decay_mask, init_state, lr_schedule, make_optimizer
from gptjax.train import make_train_step, train

MCFG = ModelConfig(vocab_size=29, block_size=8, n_layer=2, n_head=2, n_embd=16)


TCFG = TrainConfig(max_iters=100, warmup_iters=0, lr_decay_iters=100, learning_rate=1e-2, batch_size=4)


def _setup(tcfg=TCFG, mcfg=MCFG):
    graphdef, params = model.split(model.create(mcfg, 0))
    tx = make_optimizer(tcfg, params)
    return graphdef, params, tx, make_train_step(graphdef, tx, tcfg)


def _batch(A=1, B=4, T=8, seed=0):
    x = np.random.default_rng(seed).integers(0, 29, (A, B, T + 1)).astype(np.int32)
    return x[..., :-1], x[..., 1:]


def test_schedule_matches_nanogpt_get_lr():
    from gptjax.reference.nanogpt import get_lr  # nanoGPT train.py's get_lr, in the PyTorch twin's loop

    t = TrainConfig(learning_rate=1e-3, warmup_iters=100, lr_decay_iters=2000, min_lr=1e-4)
    lr = lr_schedule(t)
    for it in (0, 1, 50, 99, 100, 101, 1000, 1999, 2000, 2001, 5000):
        assert float(lr(it)) == pytest.approx(get_lr(it, t), rel=1e-6), it
    assert float(lr(0)) > 0  # warmup starts at lr/(warmup+1), not 0
    assert float(lr_schedule(dataclasses.replace(t, decay_lr=False))(7)) == pytest.approx(1e-3)


def test_decay_mask_decays_matrices_and_embeddings_only():
    _, params = model.split(model.create(dataclasses.replace(MCFG, bias=True), 0))
    mask = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(decay_mask(params))}
    assert mask["['wte']['weight'].value"] and mask["['wpe']['weight'].value"]
    assert mask["['h'][0]['attn']['c_attn']['weight'].value"]
    assert not mask["['h'][0]['attn']['c_attn']['bias'].value"]
    assert not mask["['h'][0]['ln_1']['weight'].value"] and not mask["['ln_f']['weight'].value"]


def test_adamw_update_matches_pytorch_formula():
    t = TrainConfig(learning_rate=1e-2, decay_lr=False, weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=0.0)
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    tx = make_optimizer(t, params)
    g = {"w": jnp.full((2, 2), 0.5), "b": jnp.full((2,), 0.5)}
    updates, _ = tx.update(g, tx.init(params), params)
    # step 1: m_hat = g, v_hat = g^2 -> adam step = g/(|g|+eps) = ~1; decoupled decay lr*wd*p on w only
    adam = 0.5 / (0.5 + 1e-8)
    np.testing.assert_allclose(updates["w"], -1e-2 * (adam + 0.1 * 1.0), rtol=1e-6)
    np.testing.assert_allclose(updates["b"], -1e-2 * adam, rtol=1e-6)


def test_clipping_is_torch_clip_grad_norm():
    params = {"w": jnp.zeros((3,))}
    clip = clip_by_global_norm(1.0)
    g = {"w": jnp.asarray([3.0, 4.0, 0.0])}
    clipped, _ = clip.update(g, clip.init(params))
    np.testing.assert_allclose(clipped["w"], np.asarray([3.0, 4.0, 0.0]) * (1.0 / (5.0 + 1e-6)), rtol=1e-7)
    small = {"w": jnp.asarray([0.3, 0.4, 0.0])}
    np.testing.assert_array_equal(clip.update(small, clip.init(params))[0]["w"], small["w"])


def test_loss_falls_when_overfitting_one_batch():
    _, params, tx, step = _setup()
    state = init_state(params, tx)
    x, y = _batch()
    key = jax.random.PRNGKey(0)
    losses = []
    for _ in range(100):
        state, m = step(state, x, y, key)
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.3 * losses[0], losses[::10]
    assert int(state.step) == 100


@contextlib.contextmanager
def compile_log():
    """The messages of jax's compile log while the block runs."""
    records = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    jax.config.update("jax_log_compiles", True)
    try:
        yield records
    finally:
        jax.config.update("jax_log_compiles", False)
        logger.removeHandler(handler)


def test_train_step_compiles_once():
    _, params, tx, step = _setup()
    state = init_state(params, tx)
    key = jax.random.PRNGKey(0)
    with compile_log() as records:
        for i in range(30):
            state, m = step(state, *_batch(seed=i), key)
        jax.block_until_ready(state)
    compiles = [r for r in records if "Compiling jit(train_step)" in r]
    assert len(compiles) == 1, compiles
    assert step._cache_size() == 1


def test_dropout_masks_change_with_the_step():
    """The same params and batch at step 0 and at step 1 draw other dropout masks (the step's key folds in
    state.step), so the losses differ; without dropout they are equal, so the difference is the masks'."""
    x, y = _batch()
    losses = {}
    for rate in (0.0, 0.1):
        _, params, tx, step = _setup(mcfg=dataclasses.replace(MCFG, n_layer=1, dropout=rate))
        for at in (0, 1):  # the step donates its state: a fresh copy each call
            state = init_state(jax.tree.map(jnp.copy, params), tx)._replace(step=jnp.asarray(at, jnp.int32))
            losses[rate, at] = float(step(state, x, y, jax.random.PRNGKey(0))[1]["loss"])
    assert losses[0.0, 0] == losses[0.0, 1], losses
    assert abs(losses[0.1, 0] - losses[0.1, 1]) > 1e-4, losses  # measured 6e-3; one key for both steps gives 0


def test_gradient_accumulation_equals_the_big_batch():
    t1 = TrainConfig(max_iters=10, warmup_iters=0, lr_decay_iters=10, batch_size=8)
    t2 = dataclasses.replace(t1, batch_size=4, gradient_accumulation_steps=2)
    x, y = _batch(A=1, B=8)
    _, params, tx1, step1 = _setup(t1)
    _, _, tx2, step2 = _setup(t2)
    key = jax.random.PRNGKey(0)
    s1, m1 = step1(init_state(jax.tree.map(jnp.copy, params), tx1), x, y, key)
    s2, m2 = step2(init_state(jax.tree.map(jnp.copy, params), tx2), x.reshape(2, 4, 8), y.reshape(2, 4, 8), key)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    _, params, tx, step = _setup()
    state = init_state(params, tx)
    for i in range(3):
        state, _ = step(state, *_batch(seed=i), jax.random.PRNGKey(0))
    checkpoint.save(str(tmp_path), 3, state)
    checkpoint.save(str(tmp_path), 3, state)  # replacing an existing one works too
    _, fresh_params, _, _ = _setup()
    restored = checkpoint.restore(str(tmp_path), "latest", init_state(fresh_params, tx))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    params = checkpoint.restore(str(tmp_path), "latest", fresh_params, part="params")  # what sample and eval read
    assert jax.tree.structure(params) == jax.tree.structure(state.params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, b)
    renamed = {("zz_" + k if k == "lm_head" or k == "ln_f" else k): v for k, v in fresh_params.items()}
    with pytest.raises(UserError, match="holds another model .* parameters have other names"):
        checkpoint.restore(str(tmp_path), "latest", renamed, part="params")  # the same shapes under other names


def test_resume_equals_an_uninterrupted_run(tiny_config, tmp_path):
    def cfg(out, iters, init="scratch"):
        return override(tiny_config, {"out_dir": str(tmp_path / out), "max_iters": iters, "init_from": init,
                                      "dropout": 0.1, "eval_interval": 10})

    straight = train(cfg("a", 20), progress=False)
    train(cfg("b", 10), progress=False)
    resumed = train(cfg("b", 20, "resume"), progress=False)
    assert resumed["steps"] == 10
    from gptjax.rundir import load_run

    _, _, pa = load_run(str(tmp_path / "a"), "latest")
    _, _, pb = load_run(str(tmp_path / "b"), "latest")
    for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(a, b)
    assert straight["last"]["val_loss"] == resumed["last"]["val_loss"]
    import json

    def rows(run):
        return [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_sec", "elapsed_s")}
                for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    # step 10's row is written again by the resumed run, not twice: the file equals the uninterrupted run's
    assert [r["step"] for r in rows("b")] == [0, 10, 20] and rows("b") == rows("a")


def test_train_writes_the_run(tiny_config, tmp_path):
    import json

    out = tmp_path / "run"
    summary = train(override(tiny_config, {"out_dir": str(out)}), progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 10, 20]
    assert set(rows[0]) == {"step", "train_loss", "val_loss", "lr", "tokens_per_sec", "elapsed_s"}
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    assert rows[-1]["tokens_per_sec"] > 0
    assert (out / "loss.png").stat().st_size > 1000
    assert checkpoint.exists(str(out), "best") and checkpoint.exists(str(out), "latest")
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["vocab_size"] == 65 and saved["model"]["n_layer"] == 2
    assert summary["best_val_loss"] == min(r["val_loss"] for r in rows[1:])


def test_exact_eval_covers_every_token():
    from gptjax.evaluate import exact_loss

    graphdef, params = model.split(model.create(MCFG, 0))
    tokens = np.random.default_rng(0).integers(0, 29, 50).astype(np.uint16)
    total, n = exact_loss(graphdef, params, tokens, 8, batch_size=3)
    assert n == 49
    ref = 0.0
    for i in range(0, 49, 8):  # windows of 8, the last one short
        x = jnp.asarray(tokens[i:min(i + 8, 49)][None], jnp.int32)
        y = jnp.asarray(tokens[i + 1:min(i + 9, 50)][None], jnp.int32)
        ref += float(model.cross_entropy(model.apply(graphdef, params, x), y)) * x.shape[1]
    assert total == pytest.approx(ref, rel=1e-5)

    class OneBatchAtATime:  # a split read only in slices of one batch's windows, never whole
        def __len__(self):
            return len(tokens)

        def __getitem__(self, sl):
            assert isinstance(sl, slice) and len(range(*sl.indices(len(tokens)))) <= 3 * 8 + 1, sl
            return tokens[sl]

    assert exact_loss(graphdef, params, OneBatchAtATime(), 8, batch_size=3) == (total, n)


def test_the_token_reader_eval_uses_reads_what_the_memmap_holds(tmp_path):
    from gptjax.evaluate import TokenReader

    tokens = np.random.default_rng(1).integers(0, 65_000, 1001).astype(np.uint16)
    tokens.tofile(tmp_path / "t.bin")
    reader, mm = TokenReader(str(tmp_path / "t.bin"), "uint16"), np.memmap(tmp_path / "t.bin", np.uint16, mode="r")
    assert len(reader) == len(mm) == 1001
    for sl in (slice(0, 10), slice(990, 1001), slice(995, 2000), slice(None, None), slice(1001, 1001)):
        assert reader[sl].tolist() == mm[sl].tolist(), sl
    assert (reader[0], reader[-1], reader[500]) == (mm[0], mm[-1], mm[500])



def test_the_whole_loop_compiles_the_step_once(tiny_config, tmp_path):
    with compile_log() as records:  # evals at 0, 10, 20, 30 with new bests between: shardings must stay put
        train(override(tiny_config, {"out_dir": str(tmp_path / "run"), "max_iters": 30}), progress=False)
    for name in ("train_step", "estimate"):
        compiles = [r[:60] for r in records if f"Compiling jit({name})" in r]
        assert len(compiles) == 1, compiles
