import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import model, sample
from gptjax.config import ModelConfig, override
from gptjax.train import train

CFG = ModelConfig(vocab_size=23, block_size=8, n_layer=1, n_head=2, n_embd=16)


def test_filter_logits_temperature_and_top_k():
    logits = jnp.asarray([[1.0, 3.0, 2.0, 0.5]])
    out = sample.filter_logits(logits, 2.0, 2)
    np.testing.assert_allclose(out, [[-np.inf, 1.5, 1.0, -np.inf]])
    np.testing.assert_allclose(sample.filter_logits(logits, 0.5, None), [[2.0, 6.0, 4.0, 1.0]])
    np.testing.assert_allclose(sample.filter_logits(logits, 1.0, 100), logits)  # top_k beyond the vocabulary


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
