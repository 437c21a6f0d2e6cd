import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptjax import model, ops
from gptjax.compute import Compute
from gptjax.config import Config, ModelConfig, validate
from gptjax.errors import UserError

CFG = ModelConfig(vocab_size=37, block_size=16, n_layer=2, n_head=4, n_embd=32, dropout=0.0)


def _tokens(B=3, T=16, V=37, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, (B, T)), jnp.int32)


@pytest.mark.parametrize("cfg", [
    CFG,
    dataclasses.replace(CFG, bias=True, tie_weights=False),
    dataclasses.replace(CFG, model="bigram"),
])
def test_shapes_and_finite(cfg):
    graphdef, params = model.split(model.create(cfg, 0))
    for T in (1, 7, 16):
        logits = model.apply(graphdef, params, _tokens(T=T))
        assert logits.shape == (3, T, 37)
        assert jnp.isfinite(logits).all()


def test_initial_loss_is_near_uniform():
    graphdef, params = model.split(model.create(CFG, 0))
    x, y = _tokens(seed=0), _tokens(seed=1)
    loss = model.cross_entropy(model.apply(graphdef, params, x), y)
    assert abs(float(loss) - np.log(37)) < 0.1


def test_parameter_layout_follows_nanogpt():
    _, params = model.split(model.create(dataclasses.replace(CFG, bias=True), 0))
    named = model.param_names(params)
    assert {"h.0.attn.c_attn.weight", "h.1.mlp.c_proj.bias", "wte.weight", "wpe.weight", "ln_f.bias"} <= set(named)
    assert named["h.0.attn.c_attn.weight"].shape == (32, 96)  # [in, out]: nanoGPT's Linear weight transposed
    assert not any("lm_head" in n for n in named)  # tied to wte
    assert abs(float(np.std(named["h.0.attn.c_attn.weight"])) - 0.02) < 0.002
    assert abs(float(np.std(named["h.0.mlp.c_proj.weight"])) - 0.02 / np.sqrt(4)) < 0.001
    assert float(np.abs(named["h.0.mlp.c_fc.bias"]).max()) == 0.0
    assert model.num_params(params) == sum(x.size for x in named.values()) - 16 * 32


@pytest.mark.parametrize("model_kind", ["gpt", "bigram"])
def test_causal_by_gradients(model_kind):
    cfg = dataclasses.replace(CFG, model=model_kind)
    graphdef, params = model.split(model.create(cfg, 0))
    x = _tokens(B=1)
    emb = params["wte"]["weight"][...] if model_kind == "gpt" else None

    # d logits[t] / d (one-hot input at s) for a GPT: go through the embedding by feeding a soft one-hot.
    if model_kind == "gpt":
        def out_at(t, onehot_TV):
            m = __import__("flax").nnx.merge(graphdef, params)
            x_BTD = (onehot_TV @ emb)[None] + m.wpe.weight[...][:16][None]
            for block in m.h:
                _, x_BTD = block(x_BTD)
            return (m.ln_f(x_BTD) @ emb.T)[0, t].sum()

        onehot = jax.nn.one_hot(x[0], 37)
        for t in (0, 5, 15):
            g = jax.grad(out_at, argnums=1)(t, onehot)
            assert jnp.all(g[t + 1:] == 0.0), f"position {t} sees the future"
            assert jnp.any(g[: t + 1] != 0.0)
    else:
        logits = model.apply(graphdef, params, x)
        x2 = x.at[0, 10].set((x[0, 10] + 1) % 37)
        logits2 = model.apply(graphdef, params, x2)
        np.testing.assert_array_equal(logits[0, :10], logits2[0, :10])


def test_future_tokens_do_not_change_past_logits():
    graphdef, params = model.split(model.create(CFG, 0))
    x = _tokens(B=2)
    y = x.at[:, 9:].set((x[:, 9:] + 5) % 37)
    a, b = model.apply(graphdef, params, x), model.apply(graphdef, params, y)
    np.testing.assert_array_equal(a[:, :9], b[:, :9])
    assert not np.allclose(a[:, 9:], b[:, 9:])


@pytest.mark.parametrize("cfg, key", [
    (CFG, None),
    (dataclasses.replace(CFG, bias=True, tie_weights=False, dropout=0.3), jax.random.PRNGKey(1)),  # training mode
    (dataclasses.replace(CFG, model="bigram"), None),
], ids=["gpt", "gpt-dropout", "bigram"])
def test_no_position_sees_any_later_token(cfg, key):
    """For every position t, changing all the tokens after t leaves the logits at 0..t bit-identical: row t of one
    batch changes tokens t+1..T-1. Guards against a leak anywhere in the mask (say T-2 seeing T-1), which checks
    that probe a few positions miss."""
    T, V = cfg.block_size, cfg.vocab_size
    graphdef, params = model.split(model.create(cfg, 0))
    x_TT = jnp.tile(_tokens(B=1, T=T), (T, 1))
    after_TT = jnp.arange(T)[None, :] > jnp.arange(T)[:, None]  # row t: positions t+1..T-1
    shift_TT = jnp.asarray(np.random.default_rng(1).integers(1, V, (T, T)), jnp.int32)
    changed_TT = jnp.where(after_TT, (x_TT + shift_TT) % V, x_TT)  # every later token takes another value
    logits = jax.jit(lambda x: model.apply(graphdef, params, x, key))
    a, b = np.asarray(logits(x_TT)), np.asarray(logits(changed_TT))
    for t in range(T):
        np.testing.assert_array_equal(a[t, :t + 1], b[t, :t + 1], err_msg=f"positions <= {t} see a later token")
        if t + 1 < T:  # the change is visible where it may be: the check has power
            assert not np.allclose(a[t, t + 1:], b[t, t + 1:]), t


def test_bigram_table_starts_standard_normal():
    """The seeds' nn.Embedding(V, V) draws its table from N(0, 1). Both frameworks start from gptjax's table in the
    parity tests, so only this sees a wrong initialisation: mean 0, std 1, 68.3% within one std (5-sigma bounds
    for 4225 draws), which GPT's N(0, 0.02), a uniform table or a constant one fail."""
    c = ModelConfig(model="bigram", vocab_size=65, block_size=8)
    table = np.asarray(model.param_names(model.split(model.create(c, 0))[1])["token_embedding_table.weight"],
                       np.float64)
    n = table.size
    assert table.shape == (65, 65)
    assert abs(table.mean()) < 5 / np.sqrt(n), table.mean()
    assert abs(table.std() - 1.0) < 5 / np.sqrt(2 * n), table.std()
    within = float((np.abs(table) < 1.0).mean())
    assert abs(within - 0.6827) < 5 * np.sqrt(0.6827 * 0.3173 / n), within
    other = np.asarray(model.param_names(model.split(model.create(c, 1))[1])["token_embedding_table.weight"])
    assert not np.array_equal(table, other)  # drawn from the seed


def test_jit_equals_no_jit():
    graphdef, params = model.split(model.create(CFG, 0))
    x = _tokens()

    def loss(p):
        return model.cross_entropy(model.apply(graphdef, p, x), x)

    l1, g1 = jax.jit(jax.value_and_grad(loss))(params)
    with jax.disable_jit():
        l2, g2 = jax.value_and_grad(loss)(params)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_custom_linear_gradient_matches_autodiff():
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    x, w = jax.random.normal(kx, (3, 5, 8)), jax.random.normal(kw, (8, 6))
    g = jax.random.normal(kg, (3, 5, 6))
    _, vjp = jax.vjp(ops.linear, x, w)
    _, vjp_ref = jax.vjp(lambda a, b: a @ b, x, w)
    for a, b in zip(vjp(g), vjp_ref(g)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_attention_is_its_definition_on_every_path():
    """CausalSelfAttention on the einsum and xla paths, and through the KV cache (5 tokens, then 11 more at pos 5),
    against softmax(q·kᵀ / √head_size, causal)·v and c_proj in float64 numpy. At the init's weights the scores are
    ~0 and a wrong scale barely shows; at 15x the weights (plus 0.1, so the biases count) they span units."""
    c = dataclasses.replace(CFG, bias=True)
    B, T, D, H = 2, c.block_size, c.n_embd, c.n_head
    K = D // H
    x = np.random.default_rng(0).standard_normal((B, T, D)).astype(np.float32)

    def definition(w):
        qkv = x.astype(np.float64) @ w["c_attn.weight"] + w["c_attn.bias"]
        q, k, v = (qkv[..., i * D:(i + 1) * D].reshape(B, T, H, K) for i in range(3))
        att = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(K)
        att = np.exp(np.where(np.tril(np.ones((T, T), bool)), att - att.max(-1, keepdims=True), -np.inf))
        y = np.einsum("bhts,bshk->bthk", att / att.sum(-1, keepdims=True), v).reshape(B, T, D)
        return y @ w["c_proj.weight"] + w["c_proj.bias"]

    def forward(graphdef, state, cached: bool):
        attn = nnx.merge(graphdef, state)
        if not cached:
            none, y = attn(jnp.asarray(x))
            assert none is None
            return y
        kv, y1 = attn(jnp.asarray(x[:, :5]), (jnp.zeros((B, T, H, K)), jnp.zeros((B, T, H, K))), 0)
        return jnp.concatenate([y1, attn(jnp.asarray(x[:, 5:]), kv, 5)[1]], axis=1)

    for attention, cached in (("einsum", False), ("xla", False), ("einsum", True)):
        compute = Compute(attention=attention)
        graphdef, state = nnx.split(model.CausalSelfAttention(c, nnx.Rngs(params=0), compute))
        state = jax.tree.map(lambda w: 15 * w + 0.1, state)
        want = definition({k: np.asarray(v, np.float64) for k, v in model.param_names(state).items()})
        got = np.asarray(jax.jit(forward, static_argnums=(0, 2))(graphdef, state, cached))
        # measured 2e-6 on outputs up to 7; a scale off by sqrt(2), on any one path, moves them by 0.7
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4, err_msg=f"{attention}, cached={cached}")


def test_dropout_only_with_a_key():
    cfg = dataclasses.replace(CFG, dropout=0.5)
    graphdef, params = model.split(model.create(cfg, 0))
    x = _tokens()
    eval1, eval2 = model.apply(graphdef, params, x), model.apply(graphdef, params, x)
    np.testing.assert_array_equal(eval1, eval2)
    k = jax.random.PRNGKey(1)
    tr1, tr2 = model.apply(graphdef, params, x, k), model.apply(graphdef, params, x, k)
    np.testing.assert_array_equal(tr1, tr2)
    assert not np.allclose(tr1, eval1)
    assert not np.allclose(tr1, model.apply(graphdef, params, x, jax.random.PRNGKey(2)))


def test_untied_head_has_its_own_matrix():
    graphdef, params = model.split(model.create(dataclasses.replace(CFG, tie_weights=False), 0))
    assert params["lm_head"]["weight"][...].shape == (32, 37)


def test_rope_scores_depend_on_relative_position_only():
    """RoPE turns q and k so that q·k depends on their offset, not on where both sit: the scores at positions
    0..T-1 equal those at 5..T+4; each vector keeps its length; and the rotation does change the scores."""
    q, k = jax.random.normal(jax.random.PRNGKey(0), (2, 1, 8, 1, 16))

    def scores(pos):
        return jnp.einsum("bthk,bshk->bts", model.rope(q, pos), model.rope(k, pos))

    np.testing.assert_allclose(scores(0), scores(5), rtol=0, atol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(model.rope(q, 3), axis=-1), jnp.linalg.norm(q, axis=-1), rtol=1e-6)
    assert float(jnp.abs(scores(0) - jnp.einsum("bthk,bshk->bts", q, k)).max()) > 0.1


def test_rope_gpt_has_no_wpe_and_decodes_as_its_full_forward():
    c = dataclasses.replace(CFG, pos_encoding="rope")
    for compute in (Compute(), Compute(scan=True)):
        graphdef, params = model.split(model.create(c, 0, compute))
        assert not any(name.startswith("wpe.") for name in model.param_names(params))
        x = _tokens(B=2)
        full = model.apply(graphdef, params, x)
        decode = jax.jit(functools.partial(model.decode, graphdef))  # pos traced, as the sampler runs it
        logits, cache = decode(params, x[:, :5], model.init_cache(graphdef, params, 2), 0)
        steps = [logits]
        for t in range(5, c.block_size):
            logits, cache = decode(params, x[:, t:t + 1], cache, t)
            steps.append(logits)
        assert float(jnp.abs(jnp.concatenate(steps, axis=1) - full).max()) <= 1e-5


def test_pos_encoding_is_checked():
    with pytest.raises(UserError, match="use one of learned, rope"):
        validate(Config(model=dataclasses.replace(CFG, pos_encoding="alibi")))
    with pytest.raises(UserError, match="head size n_embd/n_head=3 must be even"):
        validate(Config(model=dataclasses.replace(CFG, n_embd=12, pos_encoding="rope")))
    validate(Config(model=dataclasses.replace(CFG, pos_encoding="rope")))


def test_token_nll_picks_the_target_exactly_and_refuses_targets_outside_the_vocabulary():
    """The pick is an iota compare (its gradient a select, not a scatter): for every target in the vocabulary it
    gives lse - logit[target] bit for bit, gradient included; outside it (-1, V) NaN, as indexing out of bounds
    did, so a bad batch shows in the divergence check instead of training on a logsumexp."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(4 * rng.normal(size=(2, 7, 11)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (2, 7)), jnp.int32)

    def by_index(lg, t):
        return jax.nn.logsumexp(lg, axis=-1) - jnp.take_along_axis(lg, t[..., None], axis=-1)[..., 0]

    np.testing.assert_array_equal(model.token_nll(logits, targets), by_index(logits, targets))
    g_pick, g_index = (jax.grad(lambda lg, f=f: f(lg, targets).sum())(logits) for f in (model.token_nll, by_index))
    np.testing.assert_array_equal(g_pick, g_index)
    bad = targets.at[0, 3].set(-1).at[1, 5].set(11)
    nll = np.asarray(model.token_nll(logits, bad))
    assert np.isnan(nll[0, 3]) and np.isnan(nll[1, 5]) and np.isfinite(nll).sum() == nll.size - 2
    wide = jnp.asarray(rng.normal(size=(1, 4, 300)), jnp.float32)  # a uint8 iota would wrap: 256 == 0
    small = jnp.asarray([[0, 1, 44, 255]], jnp.uint8)
    np.testing.assert_array_equal(model.token_nll(wide, small), by_index(wide, small.astype(jnp.int32)))
