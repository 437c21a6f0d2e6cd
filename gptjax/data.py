"""Corpora (download + sha256, or a local path), their prepared token files (streamed, cached, locked) with a JSON
meta, and the batch sampler."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import urllib.request
from dataclasses import dataclass

import numpy as np

from gptjax import corpora, documents, tokenizers, writes
from gptjax.config import DataConfig, cache_home, check_range, expand_path
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
    if config.input.startswith(documents.HF_PREFIX):
        return documents.hf_dataset(config.input)
    if config.input:
        if documents.is_documents(config.input):
            documents.files(config.input)  # a UserError when there are none
        elif not os.path.isfile(config.input):
            raise UserError(f"--input={config.input}: no such file")
        return config.input
    if config.dataset not in CORPORA:
        raise UserError(f"--dataset={config.dataset} is not a known corpus ({', '.join(CORPORA)}); "
                        "for your own text pass --input=PATH")
    return _download_shakespeare(data_dir(config))


def read_text(path: str) -> str:
    """The whole corpus as one string (for experiments on small corpora; `prepare` streams it instead)."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is not text: dropped, as Python does
            text = f.read()
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    _check_length(path, len(text))
    return text


def _check_length(path: str, n_chars: int) -> None:
    if not n_chars:
        raise UserError(f"{path} is empty: a corpus needs text to train on")
    if n_chars < 2:
        raise UserError(f"{path} holds one character: a corpus needs text to train on (each split at least two "
                        "tokens)")


@dataclass(frozen=True)
class Prepared:
    """A tokenized corpus on disk: {train,val}.bin, meta.json and tokenizer.json in one directory."""

    dir: str
    meta: dict

    def tokens(self, split: str) -> np.memmap:
        return np.memmap(os.path.join(self.dir, f"{split}.bin"), dtype=self.meta["dtype"], mode="r")

    def tokenizer(self) -> tokenizers.Tokenizer:
        return tokenizers.load(os.path.join(self.dir, "tokenizer.json"))


def train_chars(n_chars: int, val_fraction: float = 0.1) -> int:
    """Where a text's train split ends: its first (1 - val_fraction) of characters are train, the rest val."""
    return int(n_chars * (1 - val_fraction))


def split_text(text: str, val_fraction: float = 0.1) -> dict[str, str]:
    """The split of a corpus' characters: {"train": the first 90% (by default), "val": the rest}."""
    n = train_chars(len(text), val_fraction)
    return {"train": text[:n], "val": text[n:]}


def _spec(config: DataConfig) -> str:
    spec = config.tokenizer or CORPORA.get(config.dataset, "char")
    tokenizers.check_spec(spec)
    return spec


def _bpe_stride(config: DataConfig, spec: str, scan: corpora.Scan) -> int:
    """A BPE learns from every k-th block of the train split, k such that about --bpe_sample_bytes are read (1: all
    of it, which a corpus under that size always gets)."""
    if not spec.startswith("bpe:"):
        return 1
    return max(1, -(-int(scan.n_bytes * (1 - config.val_fraction)) // config.bpe_sample_bytes))


def _cache_name(config: DataConfig, spec: str, scan: corpora.Scan, docs: bool) -> str:
    # A BPE learns its merges from the train split only: merges fitted on val text as well made val tokens
    # likelier and the val loss lower than the model earned. "-train" keeps caches fitted the old way out of use.
    name = f"{scan.sha256[:16]}-{spec.replace(':', '')}" + ("-train" if spec.startswith("bpe:") else "")
    if docs:
        name += "-docs" + (f"-{config.text_field}" if config.text_field != DataConfig.text_field else "")
        if config.split_seed != DataConfig.split_seed:
            name += f"-seed{config.split_seed}"
    if config.val_fraction != DataConfig.val_fraction:
        name += f"-val{config.val_fraction!r}"
    if _bpe_stride(config, spec, scan) > 1:
        name += f"-sample{config.bpe_sample_bytes}"
    return name


def prepare(config: DataConfig, tok: tokenizers.Tokenizer | None = None) -> Prepared:
    """The corpus tokenized into train/val token files, streamed; the cache reused when corpus, tokenizer and split
    match, found without reading the corpus (its fingerprint, then the index of scans); one process prepares it
    while others wait. `tok`: tokenize with it instead (an experiment's control), replacing what is there. One text
    file is split by characters; documents (documents.is_documents) by document, each followed by end-of-text."""
    path = corpus_path(config)
    spec = _spec(config)
    check_range("val_fraction", config.val_fraction)
    check_range("bpe_sample_bytes", config.bpe_sample_bytes)
    docs = documents.is_documents(path)
    paths = documents.files(path) if docs else [path]
    root = os.path.join(data_dir(config), "prepared")
    try:
        fp = documents.fingerprint(paths) if docs else corpora.fingerprint(path)
    except OSError as e:
        raise UserError(f"cannot read {e.filename or path}: {e.strerror}") from None
    try:
        os.makedirs(os.path.join(root, "index"), exist_ok=True)
    except OSError:
        pass  # a read-only data directory still serves the caches already in it
    with writes.locked(os.path.join(root, "index", f"{fp}.lock"), f"another process is preparing {path}; waiting",
                       optional=True):
        scan = _scan(root, fp, path, paths, docs, need_chars=spec == "char" and tok is None and not docs)
        out = os.path.join(root, _cache_name(config, spec, scan, docs))
        if tok is None and os.path.lexists(out):
            problem = cache_problem(out)
            if problem is None:
                with open(os.path.join(out, "meta.json"), encoding="utf-8") as f:
                    meta = json.load(f)
                if meta["corpus_sha256"] == scan.sha256:
                    return Prepared(out, meta)
                problem = "its meta.json names another corpus"
            print(f"gptjax: the prepared cache {out} is damaged ({problem}); preparing it again", file=sys.stderr)
        if os.path.lexists(out):
            _discard(out)
        if docs:
            return _write_documents(config, out, path, paths, spec, scan, tok)
        return _write_prepared(config, out, path, spec, scan, tok)


def _scan(root: str, fp: str, path: str, paths: list[str], docs: bool, need_chars: bool) -> corpora.Scan:
    """The corpus' scan from the index (by fingerprint), or read from the files once and indexed."""
    index = os.path.join(root, "index", f"{fp}.json")
    try:
        with open(index, encoding="utf-8") as f:
            scan = corpora.Scan(**json.load(f))
        if not need_chars or scan.chars is not None:
            return scan
    except (OSError, ValueError, TypeError):
        pass
    total = sum(os.path.getsize(p) for p in paths)
    progress = corpora.Progress(f"reading {os.path.basename(path.rstrip(os.sep))}", total)
    if docs:
        digest, n_bytes = documents.sha256(paths, path if os.path.isdir(path) else os.path.dirname(path), progress)
        scan = corpora.Scan(digest, n_bytes, 0)
    else:
        scan = corpora.scan(path, need_chars, progress)
        _check_length(path, scan.n_chars)
    try:
        writes.atomic_write(index, json.dumps(dataclasses.asdict(scan)))
    except OSError:
        pass  # a read-only data directory: the next run scans again
    return scan


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
    return prepare(config, tok)


def _fit(config: DataConfig, spec: str, path: str, scan: corpora.Scan, n_train: int) -> tokenizers.Tokenizer:
    """The tokenizer spec names, fitted where it learns: char on the corpus' characters, bpe:N on (a sample of)
    the train split's text, counted block by block."""
    if spec != "char" and not spec.startswith("bpe:"):
        return tokenizers.build(spec, "")
    if spec == "char":
        return tokenizers.build(spec, scan.chars)
    stride, words = _bpe_stride(config, spec, scan), collections.Counter()
    progress = corpora.Progress(f"learning {spec} from {os.path.basename(path)}", scan.n_bytes)
    for i, (part, text) in enumerate(corpora.text_blocks(path, [n_train], progress=progress)):
        if part:
            break
        if i % stride == 0:
            tokenizers.count_words(text, words)
    return tokenizers.build(spec, words)


def _write_prepared(config: DataConfig, out: str, path: str, spec: str, scan: corpora.Scan,
                    tok: tokenizers.Tokenizer | None) -> Prepared:
    n_train = train_chars(scan.n_chars, config.val_fraction)
    tok = tok or _fit(config, spec, path, scan, n_train)
    stats: dict = {}

    def blocks(progress):
        return corpora.text_blocks(path, [n_train], progress=progress, stats=stats)

    def meta(counts):
        if min(counts) < 2:
            raise UserError(f"{path} is too short: each split needs at least 2 tokens")
        m = {"train_chars": n_train, "val_chars": scan.n_chars - n_train, "forced_cuts": stats["forced_cuts"]}
        if spec.startswith("bpe:"):
            m["bpe_sample_stride"] = _bpe_stride(config, spec, scan)
        return m

    return _write(config, out, path, spec, scan, tok, blocks, meta)


def _write_documents(config: DataConfig, out: str, path: str, paths: list[str], spec: str, scan: corpora.Scan,
                     tok: tokenizers.Tokenizer | None) -> Prepared:
    if tok is None and spec == "gpt2":
        tok = tokenizers.gpt2()
    if tok is None or tok.eot is None:
        raise UserError(f"--input={path} is a corpus of documents, which are separated by an end-of-text token: "
                        f"--tokenizer={spec} has none; use --tokenizer=gpt2")
    stats: dict = {}

    def blocks(progress):
        docs = documents.read(paths, config.text_field, progress)
        return corpora.document_blocks(docs, config.val_fraction, config.split_seed, stats)

    def meta(counts):
        n = stats["documents"]
        if min(n) == 0:
            raise UserError(f"--input={path}: of its {sum(n):,} documents none fell into "
                            f"{'val' if n[0] else 'train'} at --val_fraction={config.val_fraction}: "
                            + ("raise --val_fraction, or give more documents" if n[0] else "lower --val_fraction"))
        return {"train_chars": stats["chars"][0], "val_chars": stats["chars"][1], "forced_cuts": stats["forced_cuts"],
                "train_documents": n[0], "val_documents": n[1], "text_field": config.text_field,
                "split_seed": config.split_seed, "eot": tok.eot, "files": len(paths)}

    return _write(config, out, path, spec, scan, tok, blocks, meta)


def _write(config: DataConfig, out: str, path: str, spec: str, scan: corpora.Scan, tok: tokenizers.Tokenizer,
           blocks, meta_of) -> Prepared:
    """Encode blocks(progress) into a temporary directory beside `out`, then rename it to `out`: no half-prepared
    cache is ever under the cache's name. meta_of(token counts) checks the result and gives the meta's own keys."""
    dtype = np.dtype("uint16" if tok.vocab_size <= 1 << 16 else "uint32")
    root = os.path.dirname(out)
    try:
        writes.remove_abandoned(root, f".tmp-{os.path.basename(out)}-")
        tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(out)}-{writes.writer_tag()}-", dir=root)
    except OSError as e:
        raise UserError(f"cannot write the prepared cache in {root} ({e.strerror}): point --data_dir (or "
                        "$GPTJAX_DATA_DIR) at a writable directory") from None
    try:
        counts = [0, 0]
        progress = corpora.Progress(f"tokenizing {os.path.basename(path.rstrip(os.sep))}", scan.n_bytes)
        with open(os.path.join(tmp, "train.bin"), "wb") as ftrain, open(os.path.join(tmp, "val.bin"), "wb") as fval:
            files = (ftrain, fval)
            # Worker processes for BPE where there is enough text to repay starting them (a second or so); the char
            # tokenizer's table lookup outruns what handing blocks to other processes costs.
            workers = 0 if scan.n_bytes >= 8 * corpora.BLOCK_CHARS and tok.name != "char" else 1
            for part, ids in corpora.encode_blocks(blocks(progress), tok, dtype.name, workers):
                files[part].write(ids.tobytes())
                counts[part] += len(ids)
                progress.update(tokens=sum(counts))
        progress.update(scan.n_bytes, sum(counts), final=True)
        meta = {
            "corpus": os.path.abspath(path), "corpus_sha256": scan.sha256, "tokenizer": spec,
            "vocab_size": tok.vocab_size, "dtype": dtype.name, "train_tokens": counts[0], "val_tokens": counts[1],
            "corpus_bytes": scan.n_bytes, "val_fraction": config.val_fraction, **meta_of(counts),
        }
        tokenizers.save(tok, os.path.join(tmp, "tokenizer.json"))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        try:
            os.rename(tmp, out)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if not os.path.isdir(out) or cache_problem(out) is not None:
                raise UserError(f"cannot move the prepared cache into {out} ({e.strerror})") from None
            with open(os.path.join(out, "meta.json"), encoding="utf-8") as f:  # another process prepared it first
                meta = json.load(f)
        return Prepared(out, meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
