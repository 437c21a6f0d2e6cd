"""Tokenizers: the lecture's char vocabulary, GPT-2's BPE via tiktoken, and a byte-level BPE trained on the corpus."""

from __future__ import annotations

import base64
import heapq
import json
from collections import Counter

import numpy as np
import regex
import tiktoken

from gptjax.errors import UserError

# GPT-2's pre-tokenizer: contractions, letter runs, digit runs, punctuation runs, whitespace.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class CharTokenizer:
    """One token per character; the vocabulary is the corpus's characters in sorted order."""

    def __init__(self, chars: str):
        self.name = "char"
        self.chars = chars
        self.vocab_size = len(chars)
        self._stoi = {c: i for i, c in enumerate(chars)}
        self._table = None  # code point -> id, built on the first encode_array
        self.eot = None  # no end-of-text token: the characters are the whole vocabulary

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        try:
            return [self._stoi[c] for c in text]
        except KeyError as e:
            raise UserError(f"character {e.args[0]!r} is not in this model's char vocabulary") from None

    def encode_array(self, text: str) -> np.ndarray:
        """encode(text) as a uint32 array, by table lookup on the code points (no Python loop)."""
        if self._table is None:
            table = np.full(max(map(ord, self.chars), default=0) + 1, 0xFFFFFFFF, np.uint32)
            table[[ord(c) for c in self.chars]] = np.arange(len(self.chars), dtype=np.uint32)
            self._table = table
        if text.isascii():
            cps = np.frombuffer(text.encode("ascii"), np.uint8)
        else:
            cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
        if len(cps) and int(cps.max()) >= len(self._table):
            raise UserError(f"character {chr(int(cps.max()))!r} is not in this model's char vocabulary")
        ids = self._table[cps]
        if (bad := ids == 0xFFFFFFFF).any():
            raise UserError(f"character {chr(int(cps[np.argmax(bad)]))!r} is not in this model's char vocabulary")
        return ids

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_json(self) -> dict:
        return {"kind": "char", "chars": self.chars}


class TiktokenTokenizer:
    """A tiktoken Encoding: GPT-2's ranks, or ranks trained on the corpus by `train_bpe`."""

    def __init__(self, name: str, encoding: tiktoken.Encoding):
        self.name = name
        self.encoding = encoding
        self.vocab_size = encoding.n_vocab
        self.eot = encoding.eot_token if "<|endoftext|>" in encoding.special_tokens_set else None

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_array(self, text: str) -> np.ndarray:
        """encode(text) as a uint32 array, without a Python list in between (special tokens' text is ordinary
        text here too)."""
        try:
            return self.encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
        except UnicodeEncodeError:  # a lone surrogate (JSON may spell one): replaced, as encode_ordinary does
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            return self.encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids) -> str:
        return self.encoding.decode([int(i) for i in ids])

    def to_json(self) -> dict:
        if self.name == "gpt2":
            return {"kind": "gpt2"}
        ranks = sorted(self.encoding._mergeable_ranks.items(), key=lambda kv: kv[1])
        return {"kind": "bpe", "pat_str": self.encoding._pat_str,
                "ranks": [base64.b64encode(b).decode("ascii") for b, _ in ranks]}


Tokenizer = CharTokenizer | TiktokenTokenizer
GPT2_VOCAB = 50257  # r50k_base's ranks and <|endoftext|>


def gpt2() -> TiktokenTokenizer:
    """GPT-2's BPE; tiktoken's r50k_base holds the same ranks and is found offline in TIKTOKEN_CACHE_DIR."""
    try:
        enc = tiktoken.get_encoding("r50k_base")
    except Exception as e:  # tiktoken raises whatever its downloader raised
        raise UserError(
            f"cannot load the GPT-2 BPE ranks ({type(e).__name__}); offline, set TIKTOKEN_CACHE_DIR to a "
            "directory holding tiktoken's cached r50k_base file"
        ) from None
    return TiktokenTokenizer("gpt2", enc)


def _bpe_encoding(name: str, ranks: list[bytes], pat_str: str = GPT2_PATTERN) -> tiktoken.Encoding:
    return tiktoken.Encoding(name=name, pat_str=pat_str, mergeable_ranks={b: i for i, b in enumerate(ranks)},
                             special_tokens={})


def count_words(text: str, words: Counter | None = None) -> Counter:
    """GPT-2's pre-tokenizer pieces of text, as UTF-8 bytes, counted (added to `words` when given)."""
    words = Counter() if words is None else words
    words.update(m.encode("utf-8") for m in regex.findall(GPT2_PATTERN, text))
    return words


def train_bpe(text: str | Counter, vocab_size: int) -> TiktokenTokenizer:
    """Byte-level BPE (GPT-2 pre-tokenization) grown from 256 bytes to vocab_size distinct tokens; from a text, or
    from its pieces already counted (count_words, over blocks cut where the pieces do not change)."""
    if vocab_size < 256:
        raise UserError(f"--tokenizer=bpe:{vocab_size}: a byte-level BPE needs at least 256 tokens")
    words = count_words(text) if isinstance(text, str) else text
    seqs = [list(w) for w in words]
    counts = list(words.values())
    ranks = [bytes([i]) for i in range(256)]
    rank_of = {b: i for i, b in enumerate(ranks)}

    pair_counts: Counter = Counter()
    where: dict[tuple[int, int], set[int]] = {}
    for i, seq in enumerate(seqs):
        for pair in zip(seq, seq[1:]):
            pair_counts[pair] += counts[i]
            where.setdefault(pair, set()).add(i)
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)

    while len(ranks) < vocab_size and heap:
        neg, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg or -neg == 0:
            continue  # stale entry
        merged = ranks[pair[0]] + ranks[pair[1]]
        if merged not in rank_of:  # two merge orders can spell the same bytes: keep one id for them
            rank_of[merged] = len(ranks)
            ranks.append(merged)
        new = rank_of[merged]
        for i in where.pop(pair, ()):
            seq, c = seqs[i], counts[i]
            if len(seq) < 2:
                continue
            out, j = [], 0
            while j < len(seq):
                if j + 1 < len(seq) and seq[j] == pair[0] and seq[j + 1] == pair[1]:
                    out.append(new)
                    j += 2
                else:
                    out.append(seq[j])
                    j += 1
            if len(out) == len(seq):
                continue
            changed = set()
            for p in zip(seq, seq[1:]):
                pair_counts[p] -= c
                changed.add(p)
            for p in zip(out, out[1:]):
                pair_counts[p] += c
                changed.add(p)
                where.setdefault(p, set()).add(i)
            seqs[i] = out
            for p in changed:
                if p != pair and pair_counts[p] > 0:
                    heapq.heappush(heap, (-pair_counts[p], p))
        pair_counts.pop(pair, None)
    if len(ranks) < vocab_size:
        raise UserError(f"--tokenizer=bpe:{vocab_size}: this corpus runs out of pairs to merge at {len(ranks)} "
                        f"tokens; ask for bpe:{len(ranks)} or fewer")
    return TiktokenTokenizer(f"bpe:{vocab_size}", _bpe_encoding(f"bpe{vocab_size}", ranks))


def bpe_size(spec: str) -> int | None:
    """N of a bpe:N spec (a UserError if N is not an integer); None for another spec."""
    if not spec.startswith("bpe:"):
        return None
    try:
        return int(spec[4:])
    except ValueError:
        raise UserError(f"--tokenizer={spec}: write bpe:N with N an integer, e.g. bpe:1024") from None


def check_spec(spec: str) -> None:
    """A UserError unless spec names a tokenizer: char | gpt2 | bpe:N."""
    if spec not in ("char", "gpt2") and bpe_size(spec) is None:
        raise UserError(f"--tokenizer={spec}: use char, gpt2 or bpe:N")


def build(spec: str, text: str | Counter) -> Tokenizer:
    """The tokenizer named by spec (char | gpt2 | bpe:N), fitted to text where it learns from the corpus (for char:
    the text or its characters; for bpe:N, the text or count_words of it)."""
    check_spec(spec)
    if spec == "char":
        return CharTokenizer.from_text(text)
    if spec == "gpt2":
        return gpt2()
    return train_bpe(text, bpe_size(spec))


def from_json(d: dict) -> Tokenizer:
    if d["kind"] == "char":
        return CharTokenizer(d["chars"])
    if d["kind"] == "gpt2":
        return gpt2()
    ranks = [base64.b64decode(r) for r in d["ranks"]]
    return TiktokenTokenizer(f"bpe:{len(ranks)}", _bpe_encoding(f"bpe{len(ranks)}", ranks, d["pat_str"]))


def saved_vocab_size(path: str) -> int:
    """The vocabulary size of the tokenizer saved at path, read from the file alone (building a gpt2 one would need
    tiktoken's ranks, which an offline machine may lack); a UserError if it is not a saved tokenizer."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        kind = d["kind"]
        if kind == "gpt2":
            return GPT2_VOCAB
        items = d["chars"] if kind == "char" else d["ranks"] if kind == "bpe" else None
        if not isinstance(items, (str, list)):
            raise ValueError(f"kind {kind!r}")
        return len(items)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a gptjax tokenizer ({type(e).__name__})") from None


def save(tok: Tokenizer, path: str) -> None:
    with open(path, "w") as f:
        json.dump(tok.to_json(), f)


def load(path: str) -> Tokenizer:
    """The tokenizer saved at path; a file that is missing or not a saved tokenizer is one UserError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return from_json(json.load(f))
    except FileNotFoundError:
        raise UserError(f"{path} is missing: the run's tokenizer is needed to read and write its text; copy it back "
                        "(the prepared cache holds one), or train the run again") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise UserError(f"{path} is not a gptjax tokenizer ({type(e).__name__}: {str(e)[:120]}); restore it (the "
                        "prepared cache holds one), or train the run again") from None
