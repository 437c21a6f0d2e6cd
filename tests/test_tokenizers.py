import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptjax import tokenizers
from gptjax.errors import UserError


def test_char_ids_match_the_lecture(shakespeare_text):
    tok = tokenizers.CharTokenizer.from_text(shakespeare_text)
    assert tok.vocab_size == 65
    assert tok.encode("Hello there") == [20, 43, 50, 50, 53, 1, 58, 46, 43, 56, 43]
    assert tok.decode([20, 43, 50, 50, 53]) == "Hello"


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"))
def test_char_round_trip(text):
    tok = tokenizers.CharTokenizer("\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
    assert tok.decode(tok.encode(text)) == text


def test_char_unknown_character_is_named():
    tok = tokenizers.CharTokenizer.from_text("abc")
    with pytest.raises(UserError, match="'é'"):
        tok.encode("abcé")


def test_gpt2_offline(data_dir):
    tok = tokenizers.gpt2()
    assert tok.encode("Hello there") == [15496, 612]
    assert tok.vocab_size == 50257


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_gpt2_round_trip(data_dir, text):
    tok = tokenizers.gpt2()
    assert tok.decode(tok.encode(text)) == text


@pytest.fixture(scope="module")
def bpe(shakespeare_text):
    return tokenizers.train_bpe(shakespeare_text[:200_000], 400)


def test_bpe_has_the_asked_size_and_compresses(bpe, shakespeare_text):
    text = shakespeare_text[200_000:220_000]
    assert bpe.vocab_size == 400
    assert len(bpe.encode(text)) < 0.6 * len(text.encode("utf-8"))


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_bpe_round_trip_any_text(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_save_load_encodes_identically(bpe, shakespeare_text, tmp_path):
    path = str(tmp_path / "tok.json")
    tokenizers.save(bpe, path)
    again = tokenizers.load(path)
    sample = shakespeare_text[500_000:510_000]
    assert again.encode(sample) == bpe.encode(sample)
    assert again.vocab_size == bpe.vocab_size


def test_bpe_merges_are_the_most_frequent_pairs():
    tok = tokenizers.train_bpe("ab ab ab ab cd", 258)
    ranks = tok.encoding._mergeable_ranks
    assert ranks[b"ab"] == 256 and ranks[b" ab"] == 257


@pytest.mark.parametrize("spec", ["bpe:100", "bpe:x", "word"])
def test_bad_tokenizer_specs(spec):
    with pytest.raises(UserError):
        tokenizers.build(spec, "some text")


def test_bpe_larger_than_the_corpus_allows():
    with pytest.raises(UserError, match="bpe:2"):
        tokenizers.train_bpe("the cat sat on the mat. " * 20, 400)
