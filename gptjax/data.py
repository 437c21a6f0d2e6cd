"""Corpora (download + sha256, or a local path), 90/10 token files with a JSON meta, and the batch sampler."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import urllib.request
from dataclasses import dataclass

import numpy as np

from gptjax import tokenizers
from gptjax.config import DataConfig, cache_home, expand_path
from gptjax.errors import UserError

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
# nanoGPT's dataset names -> the tokenizer each one uses.
CORPORA = {"shakespeare_char": "char", "shakespeare": "gpt2"}
SPLITS = ("train", "val")


def data_dir(config: DataConfig) -> str:
    return config.data_dir or expand_path(os.environ.get("GPTJAX_DATA_DIR", "")) or cache_home()


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download_shakespeare(root: str) -> str:
    """The cached tiny Shakespeare, downloaded and checked on first use."""
    path = os.path.join(root, "tinyshakespeare", "input.txt")
    if os.path.exists(path) and sha256(path) == SHAKESPEARE_SHA256:
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=20) as r:
            body = r.read()
    except OSError as e:
        raise UserError(
            f"cannot download tiny Shakespeare ({e.__class__.__name__}); pass a local copy with --input=PATH "
            f"or place it at {path}"
        ) from None
    if hashlib.sha256(body).hexdigest() != SHAKESPEARE_SHA256:
        raise UserError(f"the download from {SHAKESPEARE_URL} does not match its sha256; pass --input=PATH")
    with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), delete=False) as f:
        f.write(body)
    os.replace(f.name, path)
    return path


def corpus_path(config: DataConfig) -> str:
    if config.input:
        if not os.path.isfile(config.input):
            raise UserError(f"--input={config.input}: no such file")
        return config.input
    if config.dataset not in CORPORA:
        raise UserError(f"--dataset={config.dataset} is not a known corpus ({', '.join(CORPORA)}); "
                        "for your own text pass --input=PATH")
    return _download_shakespeare(data_dir(config))


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is not text: dropped, as Python does
            text = f.read()
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    if not text:
        raise UserError(f"{path} is empty: a corpus needs text to train on")
    if len(text) < 2:
        raise UserError(f"{path} holds one character: a corpus needs text to train on (each split at least two "
                        "tokens)")
    return text


@dataclass(frozen=True)
class Prepared:
    """A tokenized corpus on disk: {train,val}.bin, meta.json and tokenizer.json in one directory."""

    dir: str
    meta: dict

    def tokens(self, split: str) -> np.memmap:
        return np.memmap(os.path.join(self.dir, f"{split}.bin"), dtype=self.meta["dtype"], mode="r")

    def tokenizer(self) -> tokenizers.Tokenizer:
        return tokenizers.load(os.path.join(self.dir, "tokenizer.json"))


def split_text(text: str) -> dict[str, str]:
    """The 90/10 split of a corpus' characters: {"train": the first 90%, "val": the rest}."""
    n = int(len(text) * 0.9)
    return {"train": text[:n], "val": text[n:]}


def _cache_entry(config: DataConfig) -> tuple[str, str, str, str]:
    """(corpus path, its sha256, tokenizer spec, the prepared directory for the pair)."""
    path = corpus_path(config)
    digest = sha256(path)
    spec = config.tokenizer or CORPORA.get(config.dataset, "char")
    # A BPE learns its merges from the train split only: merges fitted on val text as well made val tokens
    # likelier and the val loss lower than the model earned. "-train" keeps caches fitted the old way out of use.
    name = f"{digest[:16]}-{spec.replace(':', '')}" + ("-train" if spec.startswith("bpe:") else "")
    return path, digest, spec, os.path.join(data_dir(config), "prepared", name)


def prepare(config: DataConfig) -> Prepared:
    """Tokenize the corpus once (90/10 split of the text); reuse the cache when corpus and tokenizer match."""
    path, digest, spec, out = _cache_entry(config)
    if os.path.lexists(out):
        problem = cache_problem(out)
        if problem is None:
            with open(os.path.join(out, "meta.json"), encoding="utf-8") as f:
                return Prepared(out, json.load(f))
        print(f"gptjax: the prepared cache {out} is damaged ({problem}); preparing it again", file=sys.stderr)
        _discard(out)
    text = read_text(path)
    tok = tokenizers.build(spec, split_text(text)["train"] if spec.startswith("bpe:") else text)
    return _write_prepared(out, path, digest, spec, tok, text)


META_TYPES = {"corpus_sha256": str, "tokenizer": str, "vocab_size": int, "dtype": str, "train_tokens": int,
              "val_tokens": int, "train_chars": int, "val_chars": int}


def cache_problem(out: str) -> str | None:
    """What is wrong with the prepared cache in `out` (meta.json unreadable, a token file missing or not the size
    its meta gives, the tokenizer unreadable), or None when its files agree with its meta."""
    try:
        with open(os.path.join(out, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        return f"meta.json cannot be read: {type(e).__name__}"
    if not isinstance(meta, dict):
        return "meta.json is not an object"
    for key, typ in META_TYPES.items():
        if type(meta.get(key)) is not typ:
            return f"meta.json's {key} is {meta.get(key)!r}"
    if meta["dtype"] not in ("uint16", "uint32"):
        return f"meta.json's dtype is {meta['dtype']!r}"
    for split in SPLITS:
        want = meta[f"{split}_tokens"] * np.dtype(meta["dtype"]).itemsize
        try:
            size = os.path.getsize(os.path.join(out, f"{split}.bin"))
        except OSError:
            return f"{split}.bin is missing"
        if size != want:
            return f"{split}.bin has {size:,} bytes where its meta gives {want:,}"
    try:
        vocab = tokenizers.saved_vocab_size(os.path.join(out, "tokenizer.json"))
    except UserError:
        return "tokenizer.json is missing or unreadable"
    if vocab != meta["vocab_size"]:
        return f"tokenizer.json has {vocab} tokens where its meta gives {meta['vocab_size']}"
    return None


def _discard(out: str) -> None:
    """Move a damaged cache out of its name at once (another process may prepare it meanwhile), then delete it."""
    try:
        gone = tempfile.mkdtemp(prefix=".damaged-", dir=os.path.dirname(out))
        os.rename(out, os.path.join(gone, "cache"))
    except FileNotFoundError:  # another process discarded it first
        pass
    except OSError as e:
        raise UserError(f"the prepared cache {out} is damaged and cannot be removed ({e.strerror}): delete it") \
            from None
    shutil.rmtree(gone, ignore_errors=True)


def prepare_with(config: DataConfig, tok: tokenizers.Tokenizer) -> Prepared:
    """Tokenize the corpus with `tok` (one fitted some other way) into the directory prepare(config) reads: an
    experiment's control, e.g. a tokenizer fitted on the whole corpus. Replaces what is there."""
    path, digest, spec, out = _cache_entry(config)
    shutil.rmtree(out, ignore_errors=True)
    return _write_prepared(out, path, digest, spec, tok, read_text(path))


def _write_prepared(out: str, path: str, digest: str, spec: str, tok: tokenizers.Tokenizer, text: str) -> Prepared:
    parts = split_text(text)
    dtype = "uint16" if tok.vocab_size <= 1 << 16 else "uint32"
    ids = {s: np.asarray(tok.encode(parts[s]), dtype=dtype) for s in SPLITS}
    if min(len(ids["train"]), len(ids["val"])) < 2:
        raise UserError(f"{path} is too short: each split needs at least 2 tokens")
    meta = {
        "corpus": os.path.abspath(path), "corpus_sha256": digest, "tokenizer": spec,
        "vocab_size": tok.vocab_size, "dtype": dtype,
        "train_tokens": len(ids["train"]), "val_tokens": len(ids["val"]),
        "train_chars": len(parts["train"]), "val_chars": len(parts["val"]),
    }
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(out))  # written whole, then renamed: no half-prepared cache
    for s in SPLITS:
        ids[s].tofile(os.path.join(tmp, f"{s}.bin"))
    tokenizers.save(tok, os.path.join(tmp, "tokenizer.json"))
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    try:
        os.rename(tmp, out)
    except OSError:  # another process prepared it first
        shutil.rmtree(tmp)
    return Prepared(out, meta)


def check_fits(tokens: np.ndarray, block_size: int, split: str) -> None:
    if len(tokens) < block_size + 1:
        raise UserError(f"the {split} split has {len(tokens)} tokens, fewer than block_size+1={block_size + 1}; "
                        "lower --block_size or use a longer corpus")


def batch_starts(tokens: np.ndarray, batch_size: int, block_size: int, seed: int, step: int, stream: int = 0):
    """Where each row of a batch starts: [batch] offsets, a pure function of (seed, stream, step)."""
    return np.random.default_rng([seed, stream, step]).integers(0, len(tokens) - block_size, size=batch_size)


def windows(tokens: np.ndarray, starts: np.ndarray, block_size: int):
    """(x, y) int32 [*starts.shape, block]: the block_size+1 tokens from each start, split into input and target.
    A process reads only its own rows' windows (the starts it was given)."""
    window = tokens[starts[..., None] + np.arange(block_size + 1)].astype(np.int32)
    return window[..., :-1], window[..., 1:]


def get_batch(tokens: np.ndarray, batch_size: int, block_size: int, seed: int, step: int, stream: int = 0):
    """Random windows of block_size+1 tokens -> (x, y) int32 [batch, block]; a pure function of its arguments."""
    return windows(tokens, batch_starts(tokens, batch_size, block_size, seed, step, stream), block_size)
