"""Streaming `prepare`: block cuts that change no token, the cache found without reading the corpus, one process at
work while the others wait, an interrupted prepare that leaves nothing usable-looking, memory bounded."""

import errno
import fcntl
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from gptjax import corpora, data, tokenizers
from gptjax.config import DataConfig
from gptjax.errors import UserError

# Every awkward place for a cut: multi-byte characters (2, 3 and 4 bytes), runs of spaces before words, blank lines,
# \r\n, tabs, a no-break space, contractions, digits, punctuation runs, a word of CJK, a line of no whitespace.
AWKWARD = ("First Citizen:\r\nBefore we   proceed any further,\thear me speak.\r\n\r\n"
           "All:\n  Speak, speak.   \n\n\n  Don't— you'll see 1234 héllo wörld\u00a0naïve 😀😀 日本語のテキスト\n"
           "Ｆｕｌｌｗｉｄｔｈ\u2003em-space\u3000ideographic-space ...!!! ??\n"
           + "x" * 300 + "\n \n\t\n  tail  words\u0085NEL ends\r\n"
           "no-break\u00a0  space, em\u2003 space\u3000\tand a lone\rreturn\n")


@pytest.fixture(scope="module")
def toks():
    return {"char": tokenizers.CharTokenizer.from_text(AWKWARD), "gpt2": tokenizers.gpt2(),
            "bpe": tokenizers.train_bpe(AWKWARD * 3, 300)}


def _allowed(text: str) -> list[int]:
    return [p for p in range(1, len(text)) if text[p] in "\n \t\r" and corpora._solid(text[p - 1])]


def test_every_cut_safe_cut_may_choose_leaves_the_tokens_unchanged(toks):
    allowed = _allowed(AWKWARD)
    assert len(allowed) > 20
    for name in ("gpt2", "bpe"):
        tok = toks[name]
        whole = tok.encode(AWKWARD)
        for p in allowed:
            assert tok.encode(AWKWARD[:p]) + tok.encode(AWKWARD[p:]) == whole, (name, p, AWKWARD[p - 3:p + 3])
    # and the cutters only ever choose one of them: safe_cut the last (a line break first), next_safe_cut the first
    for q in range(2, len(AWKWARD) + 1):
        cut = corpora.safe_cut(AWKWARD[:q])
        assert cut == 0 or cut in allowed, (q, cut)
        breaks = [p for p in allowed if p < q and AWKWARD[p] == "\n"]
        assert not breaks or cut == breaks[-1], (q, cut)
        after = [p for p in allowed if p >= q]
        assert corpora.next_safe_cut(AWKWARD, q, len(AWKWARD)) == (after[0] if after else 0), q


@pytest.mark.parametrize("read_bytes", [1, 5, 4096])
def test_streamed_blocks_encode_to_the_whole_texts_tokens(read_bytes, toks, tmp_path, monkeypatch):
    """Reads that split multi-byte characters, blocks far smaller than the text, a split point anywhere (inside \\r\\n,
    inside a run of spaces, next to a multi-byte character) and a leading byte-order mark: each part's blocks,
    encoded apart and joined, are the part's tokens."""
    monkeypatch.setattr(corpora, "READ_BYTES", read_bytes)
    path = tmp_path / "c.txt"
    path.write_bytes(b"\xef\xbb\xbf" + (AWKWARD * 4).encode())
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()  # as open() reads it, \r\n and \r as \n: the text the old whole-file prepare encoded
    assert "\r" not in text
    for bound in (1, text.index("\n\n") + 1, text.index("   ") + 2, text.index("😀") + 1, text.index("x" * 300) + 150,
                  len(text) // 2, len(text) - 1):
        blocks = list(corpora.text_blocks(str(path), [bound], block_chars=37))
        assert len(blocks) > 10 and "".join(t for _, t in blocks) == text
        for name, tok in toks.items():
            ids = {0: [], 1: []}
            for part, t in blocks:
                ids[part] += tok.encode_array(t).tolist()
            assert ids == {0: tok.encode(text[:bound]), 1: tok.encode(text[bound:])}, (name, bound)


def test_a_block_without_a_safe_cut_is_cut_anyway_and_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, "MAX_BLOCK_CHARS", 100)
    path = tmp_path / "c.txt"
    text = "é" * 1000 + "\n" + "ab" * 10
    path.write_text(text)
    stats = {}
    blocks = [t for _, t in corpora.text_blocks(str(path), block_chars=10, stats=stats)]
    assert "".join(blocks) == text and stats["forced_cuts"] == 9 and max(map(len, blocks)) <= 110


def test_prepare_in_small_blocks_gives_the_whole_texts_tokens(shakespeare, shakespeare_text, tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, "BLOCK_CHARS", 4096)  # 270 blocks, encoded in this process
    prep = data.prepare(DataConfig(input=shakespeare, tokenizer="gpt2", data_dir=str(tmp_path)))
    tok, parts = prep.tokenizer(), data.split_text(shakespeare_text)
    for split in data.SPLITS:
        assert prep.tokens(split).tolist() == tok.encode(parts[split])
    assert prep.meta["forced_cuts"] == 0 and prep.meta["corpus_bytes"] == os.path.getsize(shakespeare)


def test_val_fraction_moves_the_split_and_names_its_own_cache(shakespeare, shakespeare_text, tmp_path):
    prep = data.prepare(DataConfig(input=shakespeare, tokenizer="char", val_fraction=0.25, data_dir=str(tmp_path)))
    n = len(shakespeare_text)
    assert prep.meta["val_chars"] == n - int(n * 0.75) == prep.meta["val_tokens"]
    default = data.prepare(DataConfig(input=shakespeare, tokenizer="char", data_dir=str(tmp_path)))
    assert default.dir != prep.dir and default.meta["val_tokens"] == 111_540


def test_the_cache_is_found_without_reading_the_corpus_until_the_corpus_changes(tmp_path, shakespeare_text,
                                                                                 monkeypatch):
    corpus = tmp_path / "c.txt"
    corpus.write_text(shakespeare_text[:200_000])
    config = DataConfig(input=str(corpus), tokenizer="char", data_dir=str(tmp_path / "d"))
    first = data.prepare(config)
    real_scan = corpora.scan

    def no_scan(*a, **k):
        raise AssertionError("the corpus was read again")

    monkeypatch.setattr(corpora, "scan", no_scan)
    assert data.prepare(config) == first
    # The same size and modification time, one character changed inside a sampled block: a new corpus.
    st = os.stat(corpus)
    text = corpus.read_text()
    corpus.write_text(text[:100] + ("Z" if text[100] != "Z" else "Y") + text[101:])
    os.utime(corpus, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(AssertionError, match="read again"):
        data.prepare(config)
    monkeypatch.setattr(corpora, "scan", real_scan)
    second = data.prepare(config)
    assert second.dir != first.dir and second.meta["corpus_sha256"] == data.sha256(str(corpus))


def test_a_cache_whose_meta_names_another_corpus_is_prepared_again(tmp_path, shakespeare_text):
    """The cache found by name, but its meta.json gives another corpus' sha256: not used, prepared afresh."""
    corpus = tmp_path / "c.txt"
    corpus.write_text(shakespeare_text[:50_000])
    config = DataConfig(input=str(corpus), tokenizer="char", data_dir=str(tmp_path / "d"))
    first = data.prepare(config)
    (index,) = (tmp_path / "d" / "prepared" / "index").glob("*.json")
    first_dir = tmp_path / "d" / "prepared" / os.path.basename(first.dir)
    meta = (first_dir / "meta.json").read_text()
    (first_dir / "meta.json").write_text(meta.replace(first.meta["corpus_sha256"], "0" * 64))
    again = data.prepare(config)
    assert again.dir == first.dir and again.meta == first.meta and index.exists()


def _prepare_in_a_subprocess(corpus, data_dir, tokenizer):
    code = ("import sys; from gptjax import data; from gptjax.config import DataConfig; "
            f"p = data.prepare(DataConfig(input={str(corpus)!r}, tokenizer={tokenizer!r}, data_dir={str(data_dir)!r}));"
            " print(p.dir); print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')))")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _big_corpus(tmp_path, shakespeare_text, mb: int):
    corpus = tmp_path / "big.txt"
    with open(corpus, "w") as f:
        for _ in range(mb * 1_000_000 // len(shakespeare_text) + 1):
            f.write(shakespeare_text)
    return corpus


def test_an_interrupted_prepare_leaves_nothing_usable_looking(tmp_path, shakespeare_text):
    corpus = _big_corpus(tmp_path, shakespeare_text, 40)
    d = tmp_path / "d"
    proc = _prepare_in_a_subprocess(corpus, d, "gpt2")
    root = d / "prepared"
    deadline = time.time() + 120
    while not (root.is_dir() and any(e.name.startswith(".tmp-") for e in root.iterdir())):
        assert proc.poll() is None and time.time() < deadline, "prepare ended before it was interrupted"
        time.sleep(0.05)
    time.sleep(0.5)  # some blocks written
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = [e.name for e in root.iterdir() if e.name != "index"]
    assert left and all(n.startswith(".tmp-") for n in left)  # the half-written files, under no cache's name
    config = DataConfig(input=str(corpus), tokenizer="char", data_dir=str(d))
    data.prepare(config)  # another tokenizer: the gpt2 debris is not this one's to remove
    assert sorted(e.name for e in root.iterdir() if e.name.startswith(".")) == sorted(left)
    prep = data.prepare(DataConfig(input=str(corpus), tokenizer="gpt2", data_dir=str(d)))
    assert sorted(e.name for e in root.iterdir() if e.name.startswith(".")) == []  # the abandoned files removed
    assert data.cache_problem(prep.dir) is None and prep.meta["val_tokens"] > 0


def test_a_second_process_waits_for_the_first_then_takes_its_cache(tmp_path, shakespeare_text):
    corpus = tmp_path / "c.txt"
    corpus.write_text(shakespeare_text[:100_000])
    d = tmp_path / "d"
    lock = d / "prepared" / "index" / f"{corpora.fingerprint(str(corpus))}.lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "w") as held:  # the first process, at work
        fcntl.flock(held, fcntl.LOCK_EX)
        waiting = _prepare_in_a_subprocess(corpus, d, "char")
        assert waiting.stderr.readline().strip() == f"gptjax: another process is preparing {corpus}; waiting"
        assert waiting.poll() is None
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, err
    assert out.split()[0] == data.prepare(DataConfig(input=str(corpus), tokenizer="char", data_dir=str(d))).dir


def test_prepare_memory_stays_bounded_on_a_large_corpus(tmp_path, shakespeare_text):
    """A ~200 MB corpus in a few hundred MB, where holding it (as text, ids and their copies) took 12-14 bytes a byte:
    the peak resident memory of the process, read from the OS (VmHWM: ru_maxrss would carry the pytest worker's
    peak across the exec)."""
    corpus = _big_corpus(tmp_path, shakespeare_text, 200)
    proc = _prepare_in_a_subprocess(corpus, tmp_path / "d", "char")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    peak_mb = int(out.split()[1]) / 1024
    prep = data.prepare(DataConfig(input=str(corpus), tokenizer="char", data_dir=str(tmp_path / "d")))
    assert prep.meta["train_tokens"] + prep.meta["val_tokens"] == os.path.getsize(corpus)
    assert peak_mb < 400, f"prepare peaked at {peak_mb:.0f} MB for a {os.path.getsize(corpus) / 1e6:.0f} MB corpus"


@pytest.mark.parametrize("spec", ["char", "gpt2"])  # found by the decoding scan, and by the encoding pass
def test_a_corpus_that_is_not_utf8_is_one_line_naming_where(spec, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(b"hello world\n" * 1000 + b"caf\xe9\n")
    with pytest.raises(UserError, match=r"is not UTF-8 text \(an invalid byte near offset 12,003\)"):
        data.prepare(DataConfig(input=str(corpus), tokenizer=spec, data_dir=str(tmp_path / "d")))
    assert not any(e.name != "index" for e in (tmp_path / "d" / "prepared").iterdir())


def test_char_encode_array_is_encode(shakespeare_text):
    tok = tokenizers.CharTokenizer.from_text(AWKWARD + shakespeare_text[:1000])
    for text in (AWKWARD, shakespeare_text[:1000], ""):
        assert tok.encode_array(text).tolist() == tok.encode(text)
    with pytest.raises(UserError, match="'~' is not in this model's char vocabulary"):
        tok.encode_array("ab~")
    with pytest.raises(UserError, match=r"'\\U0010ffff' is not in"):
        tok.encode_array("ab\U0010ffff")
    assert np.asarray(tok.encode_array("ab")).dtype == np.uint32


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_the_undecoded_scan_counts_what_decoding_counts(bom, tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, "READ_BYTES", 3)  # chunks of 12 bytes: multi-byte characters across them
    path = tmp_path / "c.txt"
    path.write_bytes(bom + (AWKWARD * 3).encode())
    fast, decoded = corpora.scan(str(path), False), corpora.scan(str(path), True)
    assert (fast.sha256, fast.n_bytes, fast.n_chars) == (decoded.sha256, decoded.n_bytes, decoded.n_chars)
    with open(path, encoding="utf-8-sig") as f:
        assert fast.n_chars == len(f.read()) and fast.sha256 == data.sha256(str(path))


def test_a_crlf_corpus_gives_the_tokens_of_reading_it_whole(tmp_path, shakespeare_text):
    """\r\n and \r are read as \n, as open() in text mode reads them (and gptjax always has): the same tokens, the same
    vocabulary and the same split as before streaming."""
    path = tmp_path / "crlf.txt"
    path.write_bytes(shakespeare_text[:20_000].replace("\n", "\r\n").encode() + b"a lone\rreturn\r")
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    for spec in ("gpt2", "char"):  # each its own scan (gpt2's counts undecoded bytes), in a cache of its own
        prep = data.prepare(DataConfig(input=str(path), tokenizer=spec, data_dir=str(tmp_path / spec)))
        tok, parts = prep.tokenizer(), data.split_text(text)
        assert {s: prep.tokens(s).tolist() for s in data.SPLITS} == {s: tok.encode(parts[s]) for s in data.SPLITS}
        assert prep.meta["train_chars"] == len(parts["train"]) and "\r" not in tok.decode(prep.tokens("val").tolist())


def test_a_file_named_like_a_glob_is_that_file(tmp_path, shakespeare_text):
    path = tmp_path / "notes [v2]*.txt"
    path.write_text(shakespeare_text[:5000])
    prep = data.prepare(DataConfig(input=str(path), tokenizer="char", data_dir=str(tmp_path / "d")))
    assert prep.meta["train_chars"] + prep.meta["val_chars"] == 5000


def test_a_read_only_data_directory_serves_its_caches_and_names_the_fix(tmp_path, shakespeare_text, monkeypatch):
    corpus = tmp_path / "c.txt"
    corpus.write_text(shakespeare_text[:20_000])
    d = tmp_path / "d"
    first = data.prepare(DataConfig(input=str(corpus), tokenizer="char", data_dir=str(d)))
    real_open, real_mkdir = os.open, os.mkdir

    def refused(path):  # the data directory as a read-only mount refuses whatever would write in it
        return OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    def read_only_open(path, flags, *a, **k):
        if str(path).startswith(str(d)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise refused(path)
        return real_open(path, flags, *a, **k)

    def read_only_mkdir(path, *a, **k):
        if str(path).startswith(str(d)):
            raise refused(path)
        return real_mkdir(path, *a, **k)

    monkeypatch.setattr(os, "open", read_only_open)
    monkeypatch.setattr(os, "mkdir", read_only_mkdir)
    assert data.prepare(DataConfig(input=str(corpus), tokenizer="char", data_dir=str(d))) == first
    with pytest.raises(UserError, match=r"cannot write the prepared cache in .*Read-only file system.*: point "
                                        r"--data_dir"):
        data.prepare(DataConfig(input=str(corpus), tokenizer="gpt2", data_dir=str(d)))
