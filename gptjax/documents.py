"""Corpora of documents: a directory or glob of files, JSON Lines (`--text_field`), Parquet, any of them compressed
(.gz, .zst); read one document at a time, identified without reading them all, split into train and val by document.

A text file among them is one document; a `.jsonl` / `.ndjson` file holds one per line, a `.parquet` file one per row.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
import typing

from gptjax.errors import UserError

DOC_SUFFIXES = (".jsonl", ".ndjson", ".parquet")
COMPRESSIONS = (".gz", ".zst")
EDGE_BYTES = 1 << 12  # the head and tail of each file that its fingerprint reads


def _base(path: str) -> str:
    """The name without its compression suffix, lower case: what says how to read the file."""
    name = os.path.basename(path).lower()
    for suffix in COMPRESSIONS:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_documents(input: str) -> bool:
    """The input is a corpus of documents (a directory, a glob, a JSON Lines or Parquet file), not one text."""
    return os.path.isdir(input) or glob.has_magic(input) or _base(input).endswith(DOC_SUFFIXES)


def files(input: str) -> list[str]:
    """The files of a corpus of documents in their order: a directory's files under it (hidden ones skipped) or a
    glob's matches, sorted by path; or the one file."""
    if os.path.isdir(input):
        found = []
        for root, dirs, names in os.walk(input):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found += [os.path.join(root, n) for n in names if not n.startswith(".")]
        found = sorted(found, key=lambda p: os.path.relpath(p, input))
    elif glob.has_magic(input):
        found = sorted(p for p in glob.glob(input, recursive=True) if os.path.isfile(p))
    else:
        if not os.path.isfile(input):
            raise UserError(f"--input={input}: no such file")
        found = [input]
    if not found:
        raise UserError(f"--input={input}: no files there; give a text file, a directory or glob of files, or a "
                        ".jsonl / .parquet file")
    return found


def open_binary(path: str) -> typing.BinaryIO:
    """The file's bytes, decompressed (.gz by gzip, .zst by the zstandard package)."""
    if path.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    if path.lower().endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise UserError(f"{path} is zstd-compressed: pip install zstandard (or gptjax's data extra)") from None
        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    return open(path, "rb")


def fingerprint(paths: list[str]) -> str:
    """Who the files are without reading them all: each one's absolute path, size, modification time, first and last
    4 KiB."""
    h = hashlib.sha256(b"documents\0")
    for path in paths:
        st = os.stat(path)
        h.update(f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        with open(path, "rb") as f:
            h.update(f.read(EDGE_BYTES))
            f.seek(max(st.st_size - EDGE_BYTES, 0))
            h.update(f.read(EDGE_BYTES))
    return h.hexdigest()


def sha256(paths: list[str], root: str, progress=None) -> tuple[str, int]:
    """(sha256 over each file's path under root, size and own sha256, total bytes): the corpus' identity, read once."""
    h, total = hashlib.sha256(b"documents\0"), 0
    for path in paths:
        fh = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                fh.update(chunk)
                total += len(chunk)
                if progress:
                    progress.update(total)
        h.update(f"{os.path.relpath(path, root)}\0{os.path.getsize(path)}\0{fh.hexdigest()}\n".encode())
    return h.hexdigest(), total


def _not_utf8(path: str, where: str) -> UserError:
    return UserError(f"{path}{where} is not UTF-8 text: convert it, e.g. iconv -f LATIN1 -t UTF-8")


def read(paths: list[str], text_field: str = "text", progress=None) -> typing.Iterator[str]:
    """Every document of the files, in order; bytes done reported to progress after each file."""
    done = 0
    for path in paths:
        base = _base(path)
        if base.endswith((".jsonl", ".ndjson")):
            yield from _json_lines(path, text_field)
        elif base.endswith(".parquet"):
            yield from _parquet(path, text_field)
        else:
            with open_binary(path) as f:
                raw = f.read()
            try:
                yield raw.decode("utf-8-sig")
            except UnicodeDecodeError:
                raise _not_utf8(path, "") from None
        done += os.path.getsize(path)
        if progress:
            progress.update(done)


def _json_lines(path: str, field: str) -> typing.Iterator[str]:
    with open_binary(path) as raw:
        lines = io.TextIOWrapper(raw, encoding="utf-8-sig")
        lineno = 0
        try:
            for lineno, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    raise UserError(f"{path}:{lineno} is not a JSON object: a .jsonl file holds one per line") \
                        from None
                text = record.get(field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    keys = ", ".join(list(record)[:8]) if isinstance(record, dict) else type(record).__name__
                    raise UserError(f"{path}:{lineno} has no text field {field!r} (it has: {keys}): pass "
                                    "--text_field=NAME")
                yield text
        except UnicodeDecodeError:
            raise _not_utf8(path, f":{lineno + 1}") from None


def _parquet(path: str, field: str) -> typing.Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path} is Parquet: pip install pyarrow (or gptjax's data extra)") from None
    with open_binary(path) as f:
        pf = pq.ParquetFile(f)
        if field not in pf.schema_arrow.names:
            raise UserError(f"{path} has no column {field!r} (it has: {', '.join(pf.schema_arrow.names[:8])}): pass "
                            "--text_field=NAME")
        for batch in pf.iter_batches(batch_size=1024, columns=[field]):
            for text in batch.column(0).to_pylist():
                if text is not None:
                    yield text


def in_val(index: int, val_fraction: float, seed: int) -> bool:
    """Whether document `index` is held out: a hash of (seed, index) below val_fraction, so about that fraction of
    the documents, spread at random over the corpus and the same in every run with that seed."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64
