import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import model, sample, tokenizers
from gptjax.config import ModelConfig, override
from gptjax.rundir import load_run
from gptjax.train import train

CFG = ModelConfig(vocab_size=23, block_size=8, n_layer=1, n_head=2, n_embd=16)


def test_filter_logits_temperature_and_top_k():
    logits = jnp.asarray([[1.0, 3.0, 2.0, 0.5]])
    out = sample.filter_logits(logits, 2.0, 2)  # logits / T, less their largest (softmax does not change)
    np.testing.assert_allclose(out, [[-np.inf, 0.0, -0.5, -np.inf]])
    np.testing.assert_allclose(sample.filter_logits(logits, 0.5, None), [[-4.0, 0.0, -2.0, -5.0]])
    np.testing.assert_allclose(sample.filter_logits(logits, 1.0, 100), logits - 3.0)  # top_k beyond the vocabulary
    # so small a temperature that logits / T overflow float32: greedy, not NaN (which samples token 0)
    for cold in (1e-40, 1e-30):
        np.testing.assert_array_equal(jax.nn.softmax(sample.filter_logits(logits, jnp.float32(cold), None)),
                                      [[0.0, 1.0, 0.0, 0.0]])


def _generate(params, graphdef, prompt, n, seed, top_k=None, temperature=1.0):
    return np.asarray(sample.generate(graphdef, CFG.block_size, n, top_k, params, prompt, jax.random.PRNGKey(seed),
                                      jnp.float32(temperature)))


def test_generation_is_seeded_and_keeps_the_prompt():
    graphdef, params = model.split(model.create(CFG, 0))
    prompt = np.asarray([[3, 4, 5]] * 2, np.int32)
    a = _generate(params, graphdef, prompt, 20, seed=1)
    b = _generate(params, graphdef, prompt, 20, seed=1)
    c = _generate(params, graphdef, prompt, 20, seed=2)
    assert a.shape == (2, 23)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(a[:, :3], prompt)
    assert not np.array_equal(a[0], a[1])  # samples in a batch differ


def test_top_k_1_is_greedy_with_a_sliding_window():
    graphdef, params = model.split(model.create(CFG, 0))
    prompt = np.asarray([[1, 2]], np.int32)
    out = _generate(params, graphdef, prompt, 12, seed=0, top_k=1)
    seq = [1, 2]
    for _ in range(12):  # reference: argmax over the model's last block_size tokens, recomputed from scratch
        ctx = jnp.asarray([seq[-CFG.block_size:]], jnp.int32)
        seq.append(int(jnp.argmax(model.apply(graphdef, params, ctx)[0, -1])))
    assert out[0].tolist() == seq


def _tempered_top_k(logits_RV, temperature, top_k):
    """softmax(logits / temperature) over each row's top_k largest logits, in float64 numpy."""
    z = logits_RV / temperature
    if top_k:
        z = np.where(z < np.sort(z, axis=-1)[:, -top_k:][:, :1], -np.inf, z)
    p = np.exp(z - z.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def _max_z(counts_RV, probs_RV):
    """Largest |observed - expected| / its binomial std over the cells that can occur."""
    n_R1 = counts_RV.sum(-1, keepdims=True)
    ok = probs_RV > 0
    z = (counts_RV - n_R1 * probs_RV) / np.sqrt(n_R1 * probs_RV * (1 - probs_RV) + 1e-12)
    return float(np.abs(z[ok]).max())


@pytest.mark.parametrize("temperature, top_k, n_tokens", [(0.5, None, None), (0.7, 4, None), (1.6, 3, 6)])
def test_generate_draws_from_softmax_of_tempered_top_k_logits(temperature, top_k, n_tokens):
    """Every token generate writes is drawn from softmax(logits / temperature) over the top_k logits (of the first
    n_tokens): counted over every step of 20000 sequences of a bigram whose table we set. Guards against a sampler
    that ignores or inverts the temperature, keeps other tokens than the top_k, or reads another position's logits;
    filter_logits' parity with nanoGPT cannot see what generate does with it."""
    V, N, steps = 7, 20000, 8
    rng = np.random.default_rng(0)
    table_VV = 1.5 * rng.standard_normal((V, V))
    c = ModelConfig(model="bigram", vocab_size=V, block_size=4)
    graphdef, params = model.split(model.create(c, 0))
    params = model.params_from_names(params, {"token_embedding_table.weight": jnp.asarray(table_VV, jnp.float32)})
    reachable = n_tokens or V
    prompt = rng.integers(0, reachable, (N, 1)).astype(np.int32)
    out = np.asarray(sample.generate(graphdef, c.block_size, steps, top_k, params, prompt, jax.random.PRNGKey(0),
                                     jnp.float32(temperature), n_tokens=n_tokens))
    assert out.shape == (N, 1 + steps) and (out[:, :1] == prompt).all()
    assert out.max() < reachable, "drew a token beyond the tokenizer's ids (n_tokens)"
    counts_RV = np.zeros((reachable, reachable))  # row: previous token, column: the token drawn after it
    np.add.at(counts_RV, (out[:, :-1].ravel(), out[:, 1:].ravel()), 1)
    assert counts_RV.sum(-1).min() > 1000  # every previous token is well sampled; the window slid past block_size

    expected_RV = _tempered_top_k(table_VV[:reachable, :reachable], temperature, top_k)
    assert counts_RV[expected_RV == 0].sum() == 0, "drew a token outside the top_k"
    assert _max_z(counts_RV, expected_RV) < 5.0
    # The same counts are far from the distribution at temperature 1: a sampler that dropped it would fail above.
    assert _max_z(counts_RV, _tempered_top_k(table_VV[:reachable, :reachable], 1.0, top_k)) > 20.0


def test_no_recompilation_across_calls():
    graphdef, params = model.split(model.create(CFG, 0))
    prompt = np.asarray([[1, 2]], np.int32)
    _generate(params, graphdef, prompt, 10, seed=0)
    size = sample.generate._cache_size()
    for seed in range(3):
        _generate(params, graphdef, prompt, 10, seed=seed, temperature=0.5 + seed)
    assert sample.generate._cache_size() == size


@pytest.fixture(scope="module")
def run_dir(tiny_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("sample") / "run"
    train(override(tiny_config, {"out_dir": str(out)}), progress=False)
    return str(out)


def test_sample_from_a_run(run_dir):
    a = sample.sample(run_dir, start="ROMEO:", num_samples=2, max_new_tokens=30, seed=5)
    b = sample.sample(run_dir, start="ROMEO:", num_samples=2, max_new_tokens=30, seed=5)
    assert a == b and len(a) == 2
    assert all(t.startswith("ROMEO:") and len(t) == 36 for t in a)


def _greedy_text(run_dir: str, start: str, n: int) -> str:
    """argmax continuation of a run's best checkpoint, each step recomputed from the last block_size tokens."""
    config, graphdef, params = load_run(run_dir)
    tok = tokenizers.load(f"{run_dir}/tokenizer.json")
    T = config.model.block_size
    logits_fn = jax.jit(lambda x: model.apply(graphdef, params, x))  # one shape: the context padded to T
    seq = tok.encode(start)
    for _ in range(n):
        ctx = seq[-T:]
        logits_V = np.asarray(logits_fn(jnp.asarray([ctx + [0] * (T - len(ctx))], jnp.int32))[0, len(ctx) - 1])
        logits_V = logits_V[:tok.vocab_size]
        top2 = np.sort(logits_V)[-2:]
        # At temperature 1e-6 a gap of 1e-4 is 100 nats; the two forward passes differ by ~1e-6 at most.
        assert top2[1] - top2[0] > 1e-4, "a near tie: greedy is not well defined here"
        seq.append(int(np.argmax(logits_V)))
    return tok.decode(seq)


def test_sample_passes_temperature_and_top_k_through(run_dir):
    """The path `gptjax sample` runs: temperature 1e-6 without top-k, and top_k 1 at temperature 100, are both
    greedy at every position. Guards against sample.sample dropping --temperature or --top_k on the way to generate
    (at temperature 1 or 0.8, or top_k 200 at temperature 100, the text would be sampled, not greedy)."""
    greedy = _greedy_text(run_dir, "ROMEO:", 40)
    for temperature in (1e-6, 1e-40):  # 1e-40: logits / T overflow float32
        cold = sample.sample(run_dir, start="ROMEO:", num_samples=2, max_new_tokens=40, temperature=temperature,
                             top_k=0, seed=3)
        assert cold == [greedy] * 2, temperature
    top1 = sample.sample(run_dir, start="ROMEO:", num_samples=2, max_new_tokens=40, temperature=100.0, top_k=1,
                         seed=3)
    assert top1 == [greedy] * 2
    hot = sample.sample(run_dir, start="ROMEO:", num_samples=2, max_new_tokens=40, temperature=1.0, top_k=0, seed=3)
    assert greedy not in hot  # the comparison has power: sampling at temperature 1 writes other text
