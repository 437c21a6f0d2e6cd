"""Corpora as streams: a text file read in blocks cut where no tokenizer's tokens change, scanned once (sha256,
characters) and encoded in parallel into token files, never holding more than a bounded window of it."""

from __future__ import annotations

import codecs
import collections
import concurrent.futures
import hashlib
import io
import multiprocessing
import os
import sys
import time
import typing
import unicodedata
from dataclasses import dataclass

import numpy as np

from gptjax import documents
from gptjax.errors import UserError

READ_BYTES = 1 << 20  # one read() of the corpus
BLOCK_CHARS = 1 << 20  # a block handed to a worker: a call's overhead vanishes, and several fit in memory
MAX_BLOCK_CHARS = 1 << 26  # past this a block with no safe cut is cut anyway (counted as a forced cut)
FINGERPRINT_SAMPLES, FINGERPRINT_BYTES = 16, 1 << 16


def _solid(c: str) -> bool:
    """c is whitespace under no definition a tokenizer may use (Python's, Unicode's White_Space, regex's \\s) and is
    not one of the format characters some engines once counted as space."""
    return not c.isspace() and unicodedata.category(c) not in ("Zs", "Zl", "Zp", "Cc", "Cf")


def safe_cut(text: str, end: int | None = None) -> int:
    """The last position 0 < p <= end (default len(text) - 1) at which text may be cut without changing its tokens
    under GPT-2's pre-tokenizer (and trivially the char tokenizer): an ASCII whitespace at p after a solid character
    at p - 1, preferring a line break; 0 where there is none.

    GPT-2's pieces (contractions, ` ?letters`, ` ?digits`, ` ?punctuation`, whitespace runs) hold whitespace only at
    their start or throughout, so no piece spans a solid character followed by whitespace: p is a piece boundary.
    The pieces after p depend on the text from p on only (the pattern looks ahead, never behind), and those before p
    end at or before p - 1 with every lookahead (`\\s+(?!\\S)`, inside whitespace runs) decided before p - 1; the
    `\\s++$` of tiktoken's newer spelling of the pattern matches nothing at a cut that follows a solid character."""
    end = len(text) - 1 if end is None else min(end, len(text) - 1)
    for ws in ("\n", " ", "\t", "\r"):
        p = end + 1
        while (p := text.rfind(ws, 1, p)) > 0:
            if _solid(text[p - 1]):
                return p
    return 0


def next_safe_cut(text: str, start: int, end: int) -> int:
    """The first position start <= p <= end at which safe_cut could cut text; 0 where there is none."""
    best = 0
    for ws in ("\n", " ", "\t", "\r"):
        p = max(start, 1) - 1
        while 0 <= (p := text.find(ws, p + 1, min(end, len(text) - 1) + 1)) and (not best or p < best):
            if _solid(text[p - 1]):
                best = p
                break
    return best


@dataclass(frozen=True)
class Scan:
    """One pass over a text file: sha256 of its bytes, its size, its characters (a byte-order mark is not text)
    and, when asked for, the set of them in sorted order."""

    sha256: str
    n_bytes: int
    n_chars: int
    chars: str | None = None


class Progress:
    """A progress line on stderr when it is a terminal (MB/s, tokens, ETA), at most twice a second."""

    def __init__(self, what: str, total_bytes: int, stream=None):
        self.what, self.total = what, max(total_bytes, 1)
        self.stream = stream or sys.stderr
        self.on = self.stream.isatty()
        self.t0 = self.last = time.perf_counter()
        self.done, self.tokens = 0, None

    def update(self, done: int | None = None, tokens: int | None = None, final: bool = False) -> None:
        """Bytes read so far and tokens written so far (each kept when not given)."""
        self.done = self.done if done is None else done
        self.tokens = self.tokens if tokens is None else tokens
        now = time.perf_counter()
        if not self.on or (now - self.last < 0.5 and not final):
            return
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        toks = f"  {self.tokens / 1e6:,.1f}M tokens" if self.tokens is not None else ""
        self.stream.write(f"\r{self.what}: {self.done / 1e6:,.1f}/{self.total / 1e6:,.1f} MB  {rate / 1e6:,.1f} "
                          f"MB/s{toks}  ETA {eta:,.0f}s   " + ("\n" if final else ""))
        self.stream.flush()


def _decoder():
    """UTF-8 decoded as open(path, encoding="utf-8-sig") reads it: a leading byte-order mark dropped, and \r\n and a
    lone \r read as \n (universal newlines), so a corpus gives the tokens it gave when it was read whole."""
    return io.IncrementalNewlineDecoder(codecs.getincrementaldecoder("utf-8-sig")(), translate=True)


def _not_utf8(path: str, offset: int) -> UserError:
    return UserError(f"{path} is not UTF-8 text (an invalid byte near offset {offset:,}): convert it, e.g. "
                     "iconv -f LATIN1 -t UTF-8")


def scan(path: str, want_chars: bool, progress: Progress | None = None) -> Scan:
    """Read the file once: sha256, size, character count, and the character set when want_chars (which decodes
    the text; without it the bytes are counted as they are, and the text is checked to be UTF-8 when encoded)."""
    if not want_chars:
        return _scan_bytes(path, progress)
    h, dec, n_bytes, n_chars = hashlib.sha256(), _decoder(), 0, 0
    seen_ascii = np.zeros(128, bool)
    other: set[str] = set()
    with documents.open_binary(path) as f:
        while True:
            chunk = f.read(READ_BYTES)
            try:
                text = dec.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                raise _not_utf8(path, n_bytes + e.start) from None
            h.update(chunk)
            n_bytes += len(chunk)
            n_chars += len(text)
            if want_chars and text:
                if text.isascii():
                    seen_ascii |= np.bincount(np.frombuffer(text.encode("ascii"), np.uint8), minlength=128) > 0
                else:
                    other.update(text)
            if progress:
                progress.update(n_bytes)
            if not chunk:
                break
    chars = None
    if want_chars:
        chars = "".join(sorted(other.union(chr(i) for i in np.flatnonzero(seen_ascii))))
    return Scan(h.hexdigest(), n_bytes, n_chars, chars)


def _scan_bytes(path: str, progress: Progress | None) -> Scan:
    """sha256 and the character count, undecoded: UTF-8's characters are its bytes other than continuation bytes
    (10xxxxxx), less a leading byte-order mark and one for each \r\n (read as one \n). The hash runs on a thread
    beside the count (both release the GIL)."""
    h, n_bytes, n_chars, bom, crlf, last = hashlib.sha256(), 0, 0, False, 0, b""
    with concurrent.futures.ThreadPoolExecutor(1) as pool, documents.open_binary(path) as f:
        for chunk in iter(lambda: f.read(4 * READ_BYTES), b""):
            hashed = pool.submit(h.update, chunk)
            a = np.frombuffer(chunk, np.uint8)
            n_chars += len(a) - int(np.count_nonzero((a & 0xC0) == 0x80))
            crlf += chunk.count(b"\r\n") + (last == b"\r" and chunk[:1] == b"\n")
            bom = bom or (n_bytes == 0 and chunk.startswith(b"\xef\xbb\xbf"))
            n_bytes += len(chunk)
            last = chunk[-1:]
            hashed.result()
            if progress:
                progress.update(n_bytes)
    return Scan(h.hexdigest(), n_bytes, n_chars - bom - crlf)


def fingerprint(path: str) -> str:
    """Who a file is without reading it all: its absolute path, size, modification time and a hash of 16 blocks of
    64 KiB spread over it (the first and the last among them)."""
    st = os.stat(path)
    h = hashlib.sha256(f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    with open(path, "rb") as f:
        span = max(st.st_size - FINGERPRINT_BYTES, 0)
        for i in range(FINGERPRINT_SAMPLES):
            f.seek(span * i // (FINGERPRINT_SAMPLES - 1))
            h.update(f.read(FINGERPRINT_BYTES))
    return h.hexdigest()


def _limit(block_chars: int) -> int:
    """How long a block may grow while no safe cut comes: past it, it is cut anyway."""
    return max(4 * block_chars, MAX_BLOCK_CHARS)


def _block_cut(text: str, block_chars: int, end: int) -> int:
    """Where a block of text ends: the last safe cut within block_chars, else the first after it up to end; 0: none."""
    return safe_cut(text, min(block_chars, end)) or next_safe_cut(text, block_chars, end)


def text_blocks(path: str, bounds: typing.Sequence[int] = (), block_chars: int | None = None,
                progress: Progress | None = None, stats: dict | None = None) -> typing.Iterator[tuple[int, str]]:
    """(part, text) blocks of the file in order, about block_chars long (default BLOCK_CHARS): cut at safe_cut points
    (at max(4 x block_chars, MAX_BLOCK_CHARS) characters when there is none so far: stats["forced_cuts"] counts
    them), and at each character offset in the increasing `bounds`, where part (0 before the first) goes up by one.
    Encoding each part's blocks apart and joining them gives the tokens of encoding each part whole."""
    dec, pending, held, pos, part, done = _decoder(), [], 0, 0, 0, 0
    block_chars = block_chars or BLOCK_CHARS
    limit = _limit(block_chars)
    stats = stats if stats is not None else {}
    stats.setdefault("forced_cuts", 0)
    with documents.open_binary(path) as f:
        eof = False
        while not eof:
            chunk = f.read(READ_BYTES)
            eof = not chunk
            try:
                text = dec.decode(chunk, final=eof)
            except UnicodeDecodeError as e:
                raise _not_utf8(path, done + e.start) from None
            done += len(chunk)
            if progress:
                progress.update(done)
            if text:
                pending.append(text)
                held += len(text)
            if held < block_chars and not eof:
                continue
            buf = "".join(pending)
            while buf:
                stop = bounds[part] - pos if part < len(bounds) else None  # characters left in this part
                if stop == 0:
                    part += 1
                    continue
                if stop is not None and stop <= min(len(buf), block_chars):
                    cut = stop
                elif len(buf) < block_chars and not eof:
                    break  # read on
                else:
                    hard = len(buf) if stop is None else min(stop, len(buf))  # no cut past the part's end
                    cut = _block_cut(buf, block_chars, min(limit, hard))
                    if not cut:
                        if stop is not None and stop <= min(len(buf), limit):
                            cut = stop
                        elif len(buf) > limit:
                            cut = limit
                            stats["forced_cuts"] += 1
                        elif eof:
                            cut = len(buf)  # the end of the text
                        else:
                            break  # read on: a safe cut may come
                yield part, buf[:cut]
                buf, pos = buf[cut:], pos + cut
            pending, held = ([buf], len(buf)) if buf else ([], 0)


def pieces(text: str, block_chars: int | None = None, stats: dict | None = None) -> list[str]:
    """text in pieces of about block_chars (default BLOCK_CHARS), cut as text_blocks cuts a file."""
    block_chars = block_chars or BLOCK_CHARS
    limit = _limit(block_chars)
    out = []
    while len(text) > block_chars:
        cut = _block_cut(text, block_chars, limit)
        if not cut:
            if len(text) <= limit:
                break
            cut = limit
            if stats is not None:
                stats["forced_cuts"] = stats.get("forced_cuts", 0) + 1
        out.append(text[:cut])
        text = text[cut:]
    return out + [text]


def document_blocks(docs: typing.Iterable[str], val_fraction: float, seed: int, stats: dict,
                    block_chars: int | None = None) -> typing.Iterator[tuple[int, list[tuple[str, bool]]]]:
    """(part, [(text, ends a document), ...]) blocks of about block_chars: each document goes whole to train (part
    0) or val (1) as documents.in_val decides, a long one in pieces; stats counts documents and characters per
    part."""
    block_chars = block_chars or BLOCK_CHARS
    pending: dict[int, list] = {0: [], 1: []}
    size = {0: 0, 1: 0}
    stats.update(documents=[0, 0], chars=[0, 0], forced_cuts=stats.get("forced_cuts", 0))
    for i, doc in enumerate(docs):
        part = int(documents.in_val(i, val_fraction, seed))
        stats["documents"][part] += 1
        stats["chars"][part] += len(doc)
        cut = pieces(doc, block_chars, stats)
        for j, piece in enumerate(cut):
            pending[part].append((piece, j == len(cut) - 1))
            size[part] += len(piece)
            if size[part] >= block_chars:
                yield part, pending[part]
                pending[part], size[part] = [], 0
    for part in (0, 1):
        if pending[part]:
            yield part, pending[part]


def encode_payload(tok, payload: str | list[tuple[str, bool]], dtype: str) -> np.ndarray:
    """The ids of a block: a text's, or a list of document pieces', each document followed by tok.eot."""
    if isinstance(payload, str):
        return tok.encode_array(payload).astype(dtype)
    eot = np.array([tok.eot if tok.eot is not None else 0], dtype)
    parts = []
    for text, ends in payload:
        parts.append(tok.encode_array(text).astype(dtype))
        if ends:
            parts.append(eot)
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


_worker_tok = None  # in an encoder process: its tokenizer


def _start_worker(tokenizer_json: dict) -> None:
    global _worker_tok
    import signal

    from gptjax import tokenizers

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: one line, not a traceback each

    _worker_tok = tokenizers.from_json(tokenizer_json)


def _encode_in_worker(payload, dtype: str) -> np.ndarray:
    return encode_payload(_worker_tok, payload, dtype)


def encode_blocks(blocks: typing.Iterable[tuple[int, typing.Any]], tok, dtype: str,
                  workers: int = 0) -> typing.Iterator[tuple[int, np.ndarray]]:
    """(part, ids as dtype) for each block (a text, or document pieces: encode_payload), in order: encoded by
    `workers` processes (default: one per core; 1: in this process), at most two blocks per worker in flight.

    Processes, not threads: tiktoken keeps part of its work under the GIL, and threads scaled worse than processes
    (experiments/results/data_scale.md measures both). Spawned, not forked: the parent may hold jax's threads."""
    workers = workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if workers == 1:
        for part, payload in blocks:
            yield part, encode_payload(tok, payload, dtype)
        return
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_start_worker,
                                                initargs=(tok.to_json(),)) as pool:
        inflight: collections.deque = collections.deque()
        try:
            for part, payload in blocks:
                inflight.append((part, pool.submit(_encode_in_worker, payload, dtype)))
                while len(inflight) >= 2 * workers:
                    p, fut = inflight.popleft()
                    yield p, fut.result()
            while inflight:
                p, fut = inflight.popleft()
                yield p, fut.result()
        finally:
            for _, fut in inflight:
                fut.cancel()
