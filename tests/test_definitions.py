"""Reported figures against their definitions, recomputed here from a trained run's own logits."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import evaluate, model, rundir, tokenizers, train
from gptjax.config import load_config


@pytest.fixture(scope="module")
def bpe_run(shakespeare_text, tmp_path_factory):
    """A few steps of the tiny GPT on a byte-level BPE, its val split chosen so that tokens, characters and bytes
    all differ and the split's first token (never predicted) is " the", four characters."""
    base = shakespeare_text.replace("'", "\u2019")  # three UTF-8 bytes a character
    start = base.index(" the", 18000)
    text = base[:18000] + base[start:start + 2000]  # 90/10: val is exactly the last 2000 characters
    d = tmp_path_factory.mktemp("definitions")
    corpus = d / "corpus.txt"
    corpus.write_text(text, encoding="utf-8")
    out = str(d / "run")
    train.train(load_config("tiny", {"input": str(corpus), "tokenizer": "bpe:320", "out_dir": out, "max_iters": 4}),
                progress=False)
    return out, text[int(len(text) * 0.9):]


def _nats(graphdef, params, ids: np.ndarray, T: int) -> float:
    """-sum log p(ids[i+1] | window) over consecutive windows of T tokens, log-softmax in float64."""
    logits_fn = jax.jit(lambda x: model.apply(graphdef, params, x))
    total = 0.0
    for i in range(0, len(ids) - 1, T):
        y = ids[i + 1:i + 1 + T]
        x = np.pad(ids[i:i + len(y)], (0, T - len(y)))  # the last window is short; causality ignores the padding
        logits_TV = np.asarray(logits_fn(jnp.asarray(x[None], jnp.int32))[0, :len(y)], np.float64)
        top_T = logits_TV.max(-1)
        lse_T = top_T + np.log(np.exp(logits_TV - top_T[:, None]).sum(-1))
        total += float((lse_T - logits_TV[np.arange(len(y)), y]).sum())
    return total


def test_eval_bits_per_char_is_its_definition(bpe_run):
    """bits/char = nats over every prediction of the split / ln 2 / the characters predicted, which are the split's
    characters after its first token (never predicted), counted as characters, not bytes or tokens.

    Guards against evaluate() counting the first token's characters, taking one character per token, dividing by
    tokens or bytes, the wrong log base, or an exact loss that drops or adds predictions."""
    out, val_text = bpe_run
    config, graphdef, params = rundir.load_run(out)
    tok = tokenizers.load(f"{out}/tokenizer.json")
    ids = np.asarray(tok.encode(val_text))
    assert tok.decode(ids.tolist()) == val_text
    predicted_chars = len(tok.decode(ids[1:].tolist()))
    # The split tells the candidate definitions apart: 2000 characters, 2014 bytes, first token 4 characters.
    assert predicted_chars == len(val_text) - 4 and len(val_text.encode()) > len(val_text) > len(ids)
    nats = _nats(graphdef, params, ids, config.model.block_size)

    r = evaluate.evaluate(out, "val")
    assert r["tokens"] == len(ids) - 1
    assert r["chars"] == predicted_chars
    assert r["loss"] == pytest.approx(nats / (len(ids) - 1), rel=1e-5)
    assert r["bits_per_char"] == pytest.approx(nats / math.log(2) / predicted_chars, rel=1e-5)
