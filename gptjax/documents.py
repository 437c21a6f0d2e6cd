"""Corpora of documents: a directory or glob of files, JSON Lines (`--text_field`), Parquet, Arrow (a Hugging Face
dataset saved to disk, or the .arrow files of its cache), any of them compressed (.gz, .zst); read one document at a
time, identified without reading them all, split into train and val by document.

A text file among them is one document; a `.jsonl` / `.ndjson` file holds one per line, a `.parquet` or `.arrow`
file one per row.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
import re
import typing

from gptjax.errors import UserError

DOC_SUFFIXES = (".jsonl", ".ndjson", ".parquet", ".arrow")
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
    """The input is a corpus of documents (a directory, a glob, a JSON Lines, Parquet or Arrow file), not one text.
    An existing file is never a glob, whatever its name holds ([, *, ?)."""
    if os.path.isfile(input):
        return _base(input).endswith(DOC_SUFFIXES)
    return os.path.isdir(input) or glob.has_magic(input) or _base(input).endswith(DOC_SUFFIXES)


def files(input: str) -> list[str]:
    """The files of a corpus of documents in their order: a directory's files under it (hidden ones skipped) or a
    glob's matches, sorted by path; or the one file."""
    if os.path.isdir(input) and os.path.isfile(os.path.join(input, "dataset_dict.json")):
        return files(os.path.join(input, "train"))  # datasets' DatasetDict.save_to_disk: its train split
    if os.path.isdir(input) and os.path.isfile(os.path.join(input, "state.json")):
        return _saved_dataset(input)
    if os.path.isdir(input) and os.path.isfile(os.path.join(input, "dataset_info.json")):
        return _cached_split(input)
    if os.path.isfile(input):
        return [input]
    if os.path.isdir(input):
        found = []

        def unreadable(e: OSError):
            raise UserError(f"--input={input}: cannot read {e.filename} ({e.strerror}): fix its permissions, or give "
                            "a glob that leaves it out")

        for root, dirs, names in os.walk(input, onerror=unreadable):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found += [os.path.join(root, n) for n in names if not n.startswith(".")]
        found = sorted(found, key=lambda p: os.path.relpath(p, input))
    elif glob.has_magic(input):
        found = sorted(p for p in glob.glob(input, recursive=True) if os.path.isfile(p))
    else:
        raise UserError(f"--input={input}: no such file")
    if not found:
        raise UserError(f"--input={input}: no files there; give a text file, a directory or glob of files, or a "
                        ".jsonl / .parquet file")
    return found


def _saved_dataset(d: str) -> list[str]:
    """The Arrow files of a Hugging Face dataset saved with Dataset.save_to_disk, in order (its state.json)."""
    try:
        with open(os.path.join(d, "state.json"), encoding="utf-8") as f:
            names = [e["filename"] for e in json.load(f)["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{d}/state.json is not a saved dataset's state ({type(e).__name__}): pass the .arrow files "
                        "as a glob instead") from None
    paths = [os.path.join(d, n) for n in names]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing or not paths:
        raise UserError(f"{d}: the saved dataset's {missing[0] if missing else 'data files'} are missing")
    return paths


HF_PREFIX = "hf:"
_SHARD = re.compile(r".+-train(?:-(\d{5})-of-(\d{5}))?\.arrow")


def datasets_cache() -> str:
    """The datasets library's cache: $HF_DATASETS_CACHE, else $HF_HOME/datasets, else ~/.cache/huggingface/datasets
    ($XDG_CACHE_HOME honoured), where load_dataset keeps the Arrow files it prepared."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return os.path.expanduser(os.environ["HF_DATASETS_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return os.path.join(os.path.expanduser(home), "datasets")


def hf_dataset(input: str) -> str:
    """--input=hf:NAME[:CONFIG] (NAME as load_dataset takes it, e.g. Skylion007/openwebtext): the directory of the
    newest copy of it in the local datasets cache, whose train split is the corpus. Never the network."""
    name, _, config = input[len(HF_PREFIX):].partition(":")
    cache = datasets_cache()
    owner, _, short = name.rpartition("/")
    # the library names the directory OWNER___NAME, NAME in snake case (TinyStories: tiny_stories); older ones NAME
    roots = [os.path.join(cache, f"{owner}___{n}" if owner else n) for n in (short, _snake_case(short))]
    found = [d for root in dict.fromkeys(roots) if name
             for d in glob.glob(os.path.join(glob.escape(root), glob.escape(config) if config else "*", "*", "*"))
             if os.path.isfile(os.path.join(d, "dataset_info.json"))]
    if not found:
        raise UserError(f"--input={input}: {name or 'NAME'}{f' ({config})' if config else ''} is not in the datasets "
                        f"cache {cache}: run datasets.load_dataset({name!r}) where there is network, or set "
                        "HF_DATASETS_CACHE to the cache that has it")
    configs = sorted({os.path.basename(os.path.dirname(os.path.dirname(d))) for d in found})
    if len(configs) > 1:
        raise UserError(f"--input={input}: the cache holds {name} in configurations {', '.join(configs)}: pass "
                        f"--input=hf:{name}:{configs[0]} (or another)")
    return max(found, key=os.path.getmtime)  # the newest version, as load_dataset picks offline


def _snake_case(name: str) -> str:
    """The datasets library's camelcase_to_snakecase: TinyStories -> tiny_stories, OpenWebText -> open_web_text."""
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    return re.sub(r"([a-z\d])([A-Z])", r"\1_\2", name).lower()


def _cached_split(d: str) -> list[str]:
    """The train split's Arrow files of a datasets cache directory (NAME-train.arrow, or its shards
    NAME-train-00000-of-00004.arrow ...), in order, every shard there."""
    names = sorted(n for n in os.listdir(d) if _SHARD.fullmatch(n))
    if not names:
        arrows = sorted(n for n in os.listdir(d) if n.endswith(".arrow"))
        raise UserError(f"{d}: the cached dataset has no train split (its Arrow files: "
                        f"{', '.join(arrows[:4]) or 'none'})")
    total = _SHARD.fullmatch(names[0]).group(2)
    if total is not None and len(names) != int(total):
        raise UserError(f"{d}: {len(names)} of the train split's {int(total)} Arrow files are there: the download was "
                        "cut short; run load_dataset again where there is network")
    return [os.path.join(d, n) for n in names]


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


def _read_errors() -> tuple[type, ...]:
    """What reading a damaged file raises: the OS's and gzip's errors, zstd's and Arrow's when they are installed."""
    errors: list[type] = [OSError, EOFError]
    for module, name in (("zstandard", "ZstdError"), ("pyarrow", "ArrowException")):
        try:
            errors.append(getattr(__import__(module), name))
        except ImportError:
            pass
    return tuple(errors)


def read(paths: list[str], text_field: str = "text", progress=None) -> typing.Iterator[str]:
    """Every document of the files, in order; bytes done reported to progress after each file. A text file is read
    as open() reads it in text mode (\r\n and \r as \n), and whole: a document is held in memory at once."""
    done, errors = 0, _read_errors()
    for path in paths:
        base = _base(path)
        try:
            if base.endswith((".jsonl", ".ndjson")):
                yield from _json_lines(path, text_field)
            elif base.endswith(".parquet"):
                yield from _parquet(path, text_field)
            elif base.endswith(".arrow"):
                yield from _arrow(path, text_field)
            else:
                with open_binary(path) as f:
                    raw = f.read()
                try:
                    yield raw.decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")
                except UnicodeDecodeError:
                    raise _not_utf8(path, "") from None
        except errors as e:
            raise UserError(f"{path} cannot be read ({type(e).__name__}: {str(e)[:160]}): is it damaged or cut "
                            "short?") from None
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
        _check_column(path, pf.schema_arrow, field)
        for batch in pf.iter_batches(batch_size=1024, columns=[field]):
            for text in batch.column(0).to_pylist():
                if text is not None:
                    yield text


def _arrow(path: str, field: str) -> typing.Iterator[str]:
    """The rows of an Arrow IPC stream (how the datasets library writes its files), a record batch at a time."""
    try:
        import pyarrow as pa
    except ImportError:
        raise UserError(f"{path} is Arrow: pip install pyarrow (or gptjax's data extra)") from None
    with open_binary(path) as f:
        try:
            reader = pa.ipc.open_stream(f)
        except pa.ArrowInvalid:
            raise UserError(f"{path} is not an Arrow stream (as the datasets library writes)") from None
        _check_column(path, reader.schema, field)
        index = reader.schema.names.index(field)
        for batch in reader:
            for text in batch.column(index).to_pylist():
                if text is not None:
                    yield text


def _check_column(path: str, schema, field: str) -> None:
    import pyarrow as pa

    if field not in schema.names:
        raise UserError(f"{path} has no column {field!r} (it has: {', '.join(schema.names[:8])}): pass "
                        "--text_field=NAME")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UserError(f"{path}'s column {field!r} holds {kind}, not text: pass --text_field=NAME of a string column")


def in_val(index: int, val_fraction: float, seed: int) -> bool:
    """Whether document `index` is held out: a hash of (seed, index) below val_fraction, so about that fraction of
    the documents, spread at random over the corpus and the same in every run with that seed."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64
