import dataclasses
import io
import os
import urllib.request

import numpy as np
import pytest

from gptjax import data, tokenizers
from gptjax.config import DataConfig
from gptjax.errors import UserError


def test_char_split_sizes(shakespeare):
    prep = data.prepare(DataConfig(dataset="shakespeare_char", input=shakespeare))
    assert prep.meta["train_tokens"] == 1_003_854 and prep.meta["val_tokens"] == 111_540
    assert prep.meta["vocab_size"] == 65 and prep.meta["dtype"] == "uint16"
    assert prep.meta["corpus_sha256"] == data.SHAKESPEARE_SHA256
    assert len(prep.tokens("train")) == 1_003_854
    tok = prep.tokenizer()
    assert tok.decode(prep.tokens("train")[:14].tolist()) == "First Citizen:"


def test_gpt2_token_count(shakespeare):
    prep = data.prepare(DataConfig(dataset="shakespeare", input=shakespeare))
    assert prep.meta["train_tokens"] + prep.meta["val_tokens"] == 338_025
    assert prep.meta["vocab_size"] == 50257


def test_prepare_reuses_its_cache(shakespeare):
    first = data.prepare(DataConfig(input=shakespeare, tokenizer="char"))
    mtime = os.path.getmtime(os.path.join(first.dir, "train.bin"))
    second = data.prepare(DataConfig(input=shakespeare, tokenizer="char"))
    assert second.dir == first.dir and os.path.getmtime(os.path.join(second.dir, "train.bin")) == mtime


def test_bpe_tokenizer_is_saved_with_the_data(tmp_path, shakespeare_text):
    corpus = tmp_path / "c.txt"
    corpus.write_text(shakespeare_text[:30_000])
    prep = data.prepare(DataConfig(input=str(corpus), tokenizer="bpe:300"))
    tok = prep.tokenizer()
    assert tok.vocab_size == 300 == prep.meta["vocab_size"]
    ids = np.concatenate([prep.tokens("train"), prep.tokens("val")]).tolist()
    assert tok.decode(ids) == corpus.read_text()


def test_bpe_merges_are_learned_from_the_train_split_only(tmp_path, shakespeare_text):
    """The val text's most frequent pair ("zq", 500 times in its last 10%) would be the first merge of a BPE fitted
    on the whole corpus; fitted on train, as it must be, the val text never shapes the vocabulary."""
    corpus = tmp_path / "c.txt"
    corpus.write_text(shakespeare_text[:9_000] + "zq" * 500)
    prep = data.prepare(DataConfig(input=str(corpus), tokenizer="bpe:257"))  # one merge
    assert prep.meta["train_chars"] == 9_000
    tok = prep.tokenizer()
    assert len(tok.encode("zq")) == 2 and len(tok.encode(shakespeare_text[:9_000])) < 9_000


def test_prepare_with_a_tokenizer_fitted_elsewhere_is_what_prepare_reads(tmp_path, shakespeare_text):
    corpus = tmp_path / "c.txt"
    corpus.write_text(shakespeare_text[:30_000])
    config = DataConfig(input=str(corpus), tokenizer="bpe:300", data_dir=str(tmp_path / "data"))
    whole = tokenizers.train_bpe(shakespeare_text[:30_000], 300)  # fitted on val too: an experiment's control
    data.prepare_with(config, whole)
    prep = data.prepare(config)
    assert prep.tokenizer().to_json() == whole.to_json() != data.prepare(dataclasses.replace(
        config, data_dir=str(tmp_path / "fresh"))).tokenizer().to_json()
    assert prep.tokens("val").tolist() == whole.encode(data.split_text(shakespeare_text[:30_000])["val"])


def test_uint32_when_the_vocabulary_needs_it(tmp_path):
    corpus = tmp_path / "wide.txt"
    corpus.write_text("".join(chr(0x10000 + i) for i in range(66_000)) * 2, encoding="utf-8")
    prep = data.prepare(DataConfig(input=str(corpus), tokenizer="char"))
    assert prep.meta["vocab_size"] > 65536 and prep.meta["dtype"] == "uint32"
    assert int(prep.tokens("train").max()) >= 65536


def test_batches_are_deterministic_windows():
    tokens = np.arange(1000, dtype=np.uint16)
    x1, y1 = data.get_batch(tokens, 8, 16, seed=3, step=7)
    x2, y2 = data.get_batch(tokens, 8, 16, seed=3, step=7)
    x3, _ = data.get_batch(tokens, 8, 16, seed=3, step=8)
    x4, _ = data.get_batch(tokens, 8, 16, seed=4, step=7)
    assert x1.shape == (8, 16) and x1.dtype == np.int32
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(x1, x3) and not np.array_equal(x1, x4)
    np.testing.assert_array_equal(y1, x1 + 1)  # y is x shifted by one in a contiguous window
    assert (x1[:, 1:] == x1[:, :-1] + 1).all()


def test_batches_reach_the_end_of_the_file():
    tokens = np.arange(20, dtype=np.uint16)
    starts = {int(data.get_batch(tokens, 64, 4, 0, s)[0][i, 0]) for s in range(20) for i in range(64)}
    assert starts == set(range(16))  # every window start 0..len-block-1, none past the end


def test_offline_without_input_says_how(monkeypatch, tmp_path):
    def no_network(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(UserError, match="--input"):
        data.prepare(DataConfig(dataset="shakespeare_char", data_dir=str(tmp_path)))


def test_download_is_verified_and_cached(monkeypatch, tmp_path, shakespeare):
    body = open(shakespeare, "rb").read()
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: io.BytesIO(body))
    path = data.corpus_path(DataConfig(dataset="shakespeare_char", data_dir=str(tmp_path)))
    assert data.sha256(path) == data.SHAKESPEARE_SHA256

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: io.BytesIO(b"tampered"))
    assert data.corpus_path(DataConfig(dataset="shakespeare_char", data_dir=str(tmp_path))) == path  # cached
    with pytest.raises(UserError, match="sha256"):
        data.corpus_path(DataConfig(dataset="shakespeare_char", data_dir=str(tmp_path / "other")))


@pytest.mark.parametrize("content,match", [("", "empty"), (b"\xff\xfe\xfa", "UTF-8")])
def test_bad_corpora(tmp_path, content, match):
    path = tmp_path / "bad.txt"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(UserError, match=match):
        data.prepare(DataConfig(input=str(path)))


def test_missing_input(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        data.prepare(DataConfig(input=str(tmp_path / "nope.txt")))
