"""The fast paths compute what the plain path computes: scanned == unrolled, remat, the attention kernels, bfloat16
within its bound, the KV-cache sampler's tokens, top-p's definition, and each variant's train step compiling once."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import jaxpr_eqns
from flax import nnx
from test_train import compile_log

from gptjax import cli, evaluate, model, rundir, sample, train
from gptjax.compute import Compute, resolve_compute
from gptjax.config import ModelConfig, TrainConfig, override
from gptjax.errors import UserError

CFG = ModelConfig(vocab_size=37, block_size=16, n_layer=3, n_head=2, n_embd=32, dropout=0.1)


def _batch(B=4, T=16, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.integers(0, CFG.vocab_size, (B, T)), jnp.int32),
            jnp.asarray(rng.integers(0, CFG.vocab_size, (B, T)), jnp.int32))


def _loss_and_grads(compute: Compute, params, key):
    graphdef = model.graphdef_for(CFG, compute)
    x, y = _batch()
    return jax.jit(jax.value_and_grad(lambda p: evaluate.loss_fn(graphdef, p, x, y, key)))(params)


@functools.cache
def _reference(dropout: bool):
    """The unrolled einsum path's loss and gradients at seed-0 parameters, computed once per session."""
    params = model.split(model.create(CFG, 0))[1]
    return params, _loss_and_grads(Compute(), params, jax.random.PRNGKey(3) if dropout else None)


def _max_diff(a, b):
    return max(float(jnp.abs(u - v).max()) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("key", [None, jax.random.PRNGKey(3)], ids=["eval", "dropout"])
@pytest.mark.parametrize("compute", [Compute(scan=True), Compute(remat=True),
                                     Compute(scan=True, remat=True), Compute(attention="xla")],
                         ids=["scan", "remat", "scan+remat", "xla-attention"])
def test_fast_paths_equal_the_unrolled_einsum_path(compute, key):
    if compute.attention == "xla" and key is not None:
        pytest.skip("the xla attention path has no attention dropout")
    params, (loss0, grads0) = _reference(key is not None)
    loss1, grads1 = _loss_and_grads(compute, params, key)
    assert abs(float(loss0) - float(loss1)) <= 1e-6
    assert _max_diff(grads0, grads1) <= 1e-6
    assert model.param_names(grads1).keys() == model.param_names(params).keys()  # per-layer names either way


def test_bfloat16_stays_within_its_bound_of_float32():
    """bfloat16 matmuls (8 bits of mantissa) with float32 LayerNorm, softmax, residual stream and loss: the loss is
    within 1% of float32's and the gradients' direction within 1% (cosine >= 0.99); parameters stay float32."""
    params = model.split(model.create(CFG, 0))[1]
    loss32, g32 = _loss_and_grads(Compute(), params, None)
    loss16, g16 = _loss_and_grads(Compute(dtype="bfloat16"), params, None)
    assert abs(float(loss16) - float(loss32)) <= 0.01 * float(loss32)
    a, b = (jnp.concatenate([x.ravel() for x in jax.tree.leaves(g)]) for g in (g32, g16))
    assert float(a @ b / jnp.linalg.norm(a) / jnp.linalg.norm(b)) >= 0.99
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(g16))
    graphdef16 = model.graphdef_for(CFG, Compute(dtype="bfloat16"))
    logits = model.apply(graphdef16, params, _batch()[0])
    assert logits.dtype == jnp.bfloat16  # as torch.autocast gives them; the loss reads them in float32
    # Every matmul of the forward pass (4 projections and 2 attention products per layer, the head) is bfloat16.
    dots = _dot_dtypes(jax.make_jaxpr(lambda p: model.apply(graphdef16, p, _batch()[0]))(params).jaxpr)
    assert len(dots) == 6 * CFG.n_layer + 1 and set(dots) == {"bfloat16"}, dots
    # ...and it does round: a bfloat16 path that silently ran in float32 would differ by ~1e-7, not ~1e-3.
    assert abs(float(loss16) - float(loss32)) > 1e-5


def test_bfloat16_keeps_the_residual_stream_float32(monkeypatch):
    """The loss cannot tell (a bfloat16 residual stream moves it as little as the bfloat16 matmuls do), so: every
    LayerNorm (ln_1, ln_2, ln_f) reads a float32 stream, and a block's small update to a large stream survives the
    add (bfloat16 rounds x = 4·N(0, 1) by more than the ~0.02 of the update itself)."""
    params = model.split(model.create(CFG, 0))[1]
    read, layer_norm = [], model.layer_norm
    monkeypatch.setattr(model, "layer_norm", lambda x, *a: read.append(str(x.dtype)) or layer_norm(x, *a))
    jax.make_jaxpr(lambda p: model.apply(model.graphdef_for(CFG, Compute(dtype="bfloat16")), p,
                                         _batch()[0]))(params)
    assert read == ["float32"] * (2 * CFG.n_layer + 1), read
    x = 4 * jax.random.normal(jax.random.PRNGKey(0), (2, CFG.block_size, CFG.n_embd))

    def update(dtype):  # block(x) - x, jitted (op by op the block takes seconds)
        graphdef, state = nnx.split(model.Block(CFG, nnx.Rngs(params=0), Compute(dtype=dtype)))
        return np.asarray(jax.jit(lambda s: nnx.merge(graphdef, s)(x)[1])(state)) - np.asarray(x)

    u32, u16 = update("float32"), update("bfloat16")
    # measured 0.4% of the largest update (the matmuls' rounding); 210% with the stream in bfloat16
    err = np.abs(u16 - u32).max() / np.abs(u32).max()
    assert err < 0.05, err


def _dot_dtypes(jaxpr) -> list[str]:
    """The input dtype of every dot_general in a jaxpr, its sub-jaxprs (custom_vjp, scan, ...) included."""
    return ["/".join(sorted({str(v.aval.dtype) for v in eqn.invars})) for eqn in jaxpr_eqns(jaxpr)
            if eqn.primitive.name == "dot_general"]


def test_bfloat16_training_tracks_float32(tiny_config, tmp_path):
    """Both dtypes through `train`: 30 steps end within 2% of each other's val loss, and every matrix moved from
    its initial value in the same direction (cosine >= 0.5; measured 0.77-0.99). The loss alone would not do: after
    30 steps of `tiny` it comes from the embeddings, and a bf16 path whose matmul weights got no gradient matched."""
    runs, moved = {}, {}
    for dtype in ("float32", "bfloat16"):
        c = override(tiny_config, {"out_dir": str(tmp_path / dtype), "max_iters": 30, "dtype": dtype})
        runs[dtype] = train.train(c, progress=False)["last"]["val_loss"]
        config, _, params = rundir.load_run(c.train.out_dir, "latest")
        moved[dtype] = model.param_names(params)
    assert abs(runs["bfloat16"] - runs["float32"]) <= 0.02 * runs["float32"]
    init = model.param_names(model.split(model.create(config.model, config.train.seed))[1])
    for name, w0 in init.items():
        if w0.ndim >= 2:
            a, b = (np.asarray(moved[d][name] - w0).ravel() for d in ("float32", "bfloat16"))
            assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) >= 0.5, name


def test_compute_choices_resolve_per_device_and_refuse_what_cannot_run():
    cpu = jax.devices("cpu")[0]
    assert resolve_compute(device=cpu) == Compute("float32", "einsum", False, False)
    assert resolve_compute("bfloat16", "xla", True, "block", device=cpu) == \
        Compute("bfloat16", "xla", True, True)
    with pytest.raises(UserError, match="needs an NVIDIA GPU"):
        resolve_compute("bfloat16", "cudnn", device=cpu)
    with pytest.raises(UserError, match="no attention dropout"):
        resolve_compute("float32", "xla", attention_dropout=0.2, device=cpu)


def test_bad_compute_options_are_one_line(tiny_config, shakespeare, tmp_path, capsys):
    for args, match in ((["--dtype=fp16"], "--dtype=fp16: use one of auto, float32, bfloat16"),
                        (["--attention=cudnn"], "--attention=cudnn needs an NVIDIA GPU"),
                        (["--remat=all"], "--remat=all: use one of none, block")):
        code = cli.main(["train", "--config=tiny", f"--input={shakespeare}", f"--out_dir={tmp_path / 'r'}", *args])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and match in lines[0], lines
        assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("settings", [dict(scan_layers=True), dict(scan_layers=False, remat="block"),
                                      dict(dtype="bfloat16", attention="xla", dropout=0.0)],
                         ids=["scan", "unrolled+remat", "bf16+xla"])
def test_each_variant_compiles_its_step_once(tiny_config, tmp_path, settings):
    c = override(tiny_config, {"out_dir": str(tmp_path / "run"), "max_iters": 20, **settings})
    with compile_log() as records:
        train.train(c, progress=False)
    compiles = [r[:60] for r in records if "Compiling jit(train_step)" in r]
    assert len(compiles) == 1, compiles


# Sampling: the KV cache against the re-forward loop, top-p against its definition.

def _gen(graphdef, params, prompt, n, kv, top_k=None, top_p=None, seed=0, block_size=CFG.block_size):
    # At temperature 0.05 the (untrained, nearly uniform) logits' differences outweigh the Gumbel noise, so a
    # wrong logit changes the token; the draws stay random (seeds give different tokens).
    return np.asarray(sample.generate(graphdef, block_size, n, top_k, params, prompt, jax.random.PRNGKey(seed),
                                      jnp.float32(0.05), top_p=top_p, kv_cache=kv))


@pytest.mark.parametrize("P,n", [(1, 15), (5, 11), (16, 0), (3, 30), (15, 4), (20, 6)],
                         ids=["fills-block", "prompt-5", "prompt-fills", "past-block", "crosses-block",
                              "prompt-past-block"])
def test_kv_cache_gives_the_re_forward_tokens(P, n):
    """Every position: within block_size the cache path, past it the exact crop; sampled (not greedy) tokens."""
    c = dataclasses.replace(CFG, dropout=0.0)
    graphdef, params = model.split(model.create(c, 0))
    params = jax.tree.map(lambda w: 4 * w, params)  # sharper attention and logits than the init's near-uniform ones
    prompt = np.asarray(np.random.default_rng(P).integers(0, c.vocab_size, (3, P)), np.int32)
    outs = []
    for seed in range(3):
        a = _gen(graphdef, params, prompt, n, True, seed=seed)
        b = _gen(graphdef, params, prompt, n, False, seed=seed)
        np.testing.assert_array_equal(a, b)
        outs.append(a)
    assert a.shape == (3, P + n)
    assert n < 10 or len({o.tobytes() for o in outs}) > 1  # sampled, not greedy


def test_kv_cache_logits_equal_the_full_forward_at_every_position():
    c = dataclasses.replace(CFG, dropout=0.0)
    for compute in (Compute(), Compute(scan=True)):
        graphdef, params = model.split(model.create(c, 0, compute))
        x = _batch(B=2)[0]
        full = model.apply(graphdef, params, x)
        logits, cache = model.decode(graphdef, params, x[:, :5], model.init_cache(graphdef, params, 2), 0)
        steps = [logits]
        for t in range(5, c.block_size):
            logits, cache = model.decode(graphdef, params, x[:, t:t + 1], cache, t)
            steps.append(logits)
        assert float(jnp.abs(jnp.concatenate(steps, axis=1) - full).max()) <= 1e-5


def test_the_sampler_users_run_gives_the_same_text_with_and_without_the_cache(tiny_config, tmp_path):
    out = str(tmp_path / "run")
    train.train(override(tiny_config, {"out_dir": out, "max_iters": 10}), progress=False)
    kw = dict(num_samples=2, max_new_tokens=40, temperature=0.3, top_k=None, seed=5)  # 41 tokens > block 16
    assert sample.sample(out, kv_cache=True, **kw) == sample.sample(out, kv_cache=False, **kw)
    assert sample.sample(out, top_p=0.5, **kw) != sample.sample(out, **kw)


def _nucleus(logits: np.ndarray, p: float) -> np.ndarray:
    """The definition: the smallest set of most likely tokens whose probabilities sum to >= p (float64)."""
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    k = int(np.searchsorted(np.cumsum(probs[order]), p) + 1)
    keep = np.zeros(len(logits), bool)
    keep[order[:k]] = True
    return keep


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9, 0.999])
def test_top_p_keeps_the_smallest_set_with_mass_at_least_p(p):
    rng = np.random.default_rng(int(p * 1000))
    logits = (rng.standard_normal((64, 50)) * rng.uniform(0.3, 4.0, (64, 1))).astype(np.float32)
    kept = np.isfinite(np.asarray(sample.filter_logits(jnp.asarray(logits), 1.0, None, p)))
    want = np.stack([_nucleus(row.astype(np.float64), p) for row in logits])
    # float32 cumulative sums may round a boundary token differently: allow that on a row whose boundary is close.
    differ = np.flatnonzero((kept != want).any(1))
    assert len(differ) <= 1, differ
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    mass = (probs * kept).sum(1)
    assert (mass >= p - 1e-6).all()
    # Smallest: dropping the least likely kept token takes every row below p.
    least = np.where(kept, probs, np.inf).min(1)
    assert (mass - least < p + 1e-6).all()


def test_top_p_composes_after_temperature_and_top_k():
    logits = jnp.asarray([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert np.isfinite(np.asarray(sample.filter_logits(logits, 1.0, 2, 0.999))).sum() == 2  # top-k first
    sharp = np.isfinite(np.asarray(sample.filter_logits(logits, 0.1, None, 0.9))).sum()
    flat = np.isfinite(np.asarray(sample.filter_logits(logits, 10.0, None, 0.9))).sum()
    assert sharp == 1 and flat == 5


def test_sample_cli_takes_top_p_kv_cache_and_dtype(tiny_config, tmp_path, capsys):
    out = str(tmp_path / "run")
    train.train(override(tiny_config, {"out_dir": out, "max_iters": 10}), progress=False)
    base = ["sample", f"--out_dir={out}", "--max_new_tokens=30", "--seed=3", "--top_k=0", "--temperature=2"]
    capsys.readouterr()  # training's own output

    def text(*args):
        assert cli.main(base + list(args)) == 0
        return capsys.readouterr().out

    plain = text()
    assert plain and plain == text("--kv_cache=false") == text("--dtype=float32")
    assert text("--top_p=0.2") != plain
    assert cli.main(base + ["--top_p=0"]) == 2 and "--top_p=0.0 is out of range" in capsys.readouterr().err


def test_train_config_defaults_resolve_to_the_exact_path_on_a_cpu():
    t = TrainConfig()
    assert (t.dtype, t.attention, t.scan_layers, t.remat) == ("auto", "auto", False, "none")
    assert resolve_compute(t.dtype, t.attention, t.scan_layers, t.remat, 0.2,
                           device=jax.devices("cpu")[0]) == Compute("float32", "einsum", False, False)
