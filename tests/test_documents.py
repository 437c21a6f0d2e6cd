"""Corpora of documents: every input kind (text files, JSON Lines, Parquet, a saved Hugging Face dataset) gives the
same tokens, each document followed by <|endoftext|>; val made of whole documents chosen by seed; long documents cut
without changing a token; bad input named in one line."""

import gzip
import json
import os

import numpy as np
import pytest

from gptjax import corpora, data, documents, tokenizers
from gptjax.config import DataConfig
from gptjax.errors import UserError

EOT = 50256


@pytest.fixture(scope="module")
def docs(shakespeare_text):
    """40 documents: the play's speeches, of every length, and a few with multi-byte text and odd whitespace."""
    speeches = [s for s in shakespeare_text.split("\n\n") if s][:37]
    return speeches + ["héllo wörld 😀\n\n  tail  ", "日本語のテキスト", "x" * 5000]


def _reference(docs, val_fraction, seed=2357):
    tok = tokenizers.gpt2()
    out = {"train": [], "val": []}
    for i, d in enumerate(docs):
        out["val" if documents.in_val(i, val_fraction, seed) else "train"] += tok.encode(d) + [EOT]
    return out


def _write_inputs(root, docs):
    """The same documents as a directory of text files, JSON Lines (plain, gzip, zstd) and Parquet."""
    d = root / "dir"
    d.mkdir()
    for i, doc in enumerate(docs):
        (d / f"doc{i:03d}.txt").write_text(doc, encoding="utf-8")
    (d / ".hidden").write_text("not a document")
    lines = "".join(json.dumps({"id": i, "text": doc}) + "\n" for i, doc in enumerate(docs))
    (root / "c.jsonl").write_text(lines, encoding="utf-8")
    with gzip.open(root / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(lines)
    inputs = {"directory": str(d), "glob": str(d / "doc*.txt"), "jsonl": str(root / "c.jsonl"),
              "jsonl.gz": str(root / "c.jsonl.gz")}
    zstandard = pytest.importorskip("zstandard")
    (root / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    inputs["jsonl.zst"] = str(root / "c.jsonl.zst")
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": docs}), root / "c.parquet", row_group_size=7)
    inputs["parquet"] = str(root / "c.parquet")
    # a Hugging Face dataset as Dataset.save_to_disk writes it: Arrow streams named in state.json, beside its info
    saved = root / "saved"
    saved.mkdir()
    table = pa.table({"id": list(range(len(docs))), "text": docs})
    for i, (lo, hi) in enumerate([(0, 15), (15, len(docs))]):
        with pa.ipc.new_stream(saved / f"data-{i:05d}-of-00002.arrow", table.schema) as w:
            for start in range(lo, hi, 4):  # several record batches per file
                w.write_table(table.slice(start, min(4, hi - start)))
    (saved / "state.json").write_text(json.dumps({"_data_files": [{"filename": f"data-{i:05d}-of-00002.arrow"}
                                                                  for i in range(2)], "_split": "train"}))
    (saved / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string"}}}))
    inputs["saved dataset"] = str(saved)
    (root / "dict").mkdir()
    (root / "dict" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    os.symlink(saved, root / "dict" / "train")
    inputs["saved dataset dict"] = str(root / "dict")
    inputs["datasets cache"] = _datasets_cache(root / "hf", docs, pa)
    return inputs


def _datasets_cache(cache, docs, pa, name="someone/corpus", configs=("default",), dirname="someone___corpus") -> str:
    """`name` in a datasets cache as load_dataset leaves it, in `dirname`: NAME-train-0000i-of-0000n.arrow shards and
    a test split in the newest version's directory, an older version of other documents beside it; the --input that
    finds it."""
    for config in configs:
        for version, texts, age in (("1.0.0/old", ["stale"] * 5, 10**6), ("1.0.0/new", docs, 0)):
            d = cache / dirname / config / version
            d.mkdir(parents=True)
            (d / "dataset_info.json").write_text(json.dumps({"splits": {"train": {}, "test": {}}}))
            base = dirname.split("___")[-1]
            table = pa.table({"text": texts})
            for i, (lo, hi) in enumerate([(0, 20), (20, len(texts))]):
                with pa.ipc.new_stream(d / f"{base}-train-{i:05d}-of-00002.arrow", table.schema) as w:
                    w.write_table(table.slice(lo, hi - lo))
            with pa.ipc.new_stream(d / f"{base}-test.arrow", table.schema) as w:
                w.write_table(pa.table({"text": ["a test document"]}))
            os.utime(d, (os.path.getmtime(d) - age,) * 2)
    os.environ["HF_DATASETS_CACHE"] = str(cache)  # the calling test's monkeypatch puts it back
    return f"hf:{name}"


def test_every_input_kind_gives_each_document_then_endoftext(docs, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", "")
    want = _reference(docs, 0.2)
    assert want["train"] and want["val"]
    for kind, path in _write_inputs(tmp_path, docs).items():
        prep = data.prepare(DataConfig(input=path, tokenizer="gpt2", val_fraction=0.2, data_dir=str(tmp_path / kind)))
        got = {s: prep.tokens(s).tolist() for s in data.SPLITS}
        assert got == want, kind
        n_val = sum(documents.in_val(i, 0.2, 2357) for i in range(len(docs)))
        assert (prep.meta["train_documents"], prep.meta["val_documents"]) == (len(docs) - n_val, n_val), kind
        assert prep.meta["val_chars"] == sum(len(d) for i, d in enumerate(docs) if documents.in_val(i, 0.2, 2357))


def test_val_is_whole_documents_chosen_by_the_seed(docs, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = tokenizers.gpt2()
    splits = {}
    for seed in (2357, 1):
        prep = data.prepare(DataConfig(input=str(path), tokenizer="gpt2", val_fraction=0.25, split_seed=seed,
                                       data_dir=str(tmp_path / "d")))
        texts = {s: tok.decode(prep.tokens(s).tolist()).split("<|endoftext|>") for s in data.SPLITS}
        assert all(t[-1] == "" for t in texts.values())  # every split ends with a document's end
        train, val = set(texts["train"][:-1]), set(texts["val"][:-1])
        assert not train & val and train | val == set(docs) and len(val) == prep.meta["val_documents"]
        splits[seed] = val
    assert splits[2357] != splits[1]  # another seed, other val documents
    assert 0.1 < len(splits[2357]) / len(docs) < 0.45


def test_a_long_document_is_cut_without_changing_its_tokens(docs, tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, "BLOCK_CHARS", 300)  # every speech over 300 characters in pieces
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prep = data.prepare(DataConfig(input=str(path), tokenizer="gpt2", val_fraction=0.2, data_dir=str(tmp_path / "d")))
    assert {s: prep.tokens(s).tolist() for s in data.SPLITS} == _reference(docs, 0.2)
    assert max(map(len, docs)) > 300 * 4


def test_one_text_file_stays_one_document_without_endoftext(shakespeare, tmp_path):
    prep = data.prepare(DataConfig(input=shakespeare, tokenizer="gpt2", data_dir=str(tmp_path)))
    assert EOT not in np.asarray(prep.tokens("train")) and "documents" not in str(prep.meta)


@pytest.mark.parametrize("content, says", [
    ('{"text": "a"}\n{"body": "b"}\n', r"c\.jsonl:2 has no text field 'text' \(it has: body\): pass --text_field"),
    ('{"text": "a"}\nnot json\n', r"c\.jsonl:2 is not a JSON object"),
    ('{"text": "a"}\n{"text": "b"}\n', r"of its 2 documents none fell into val at --val_fraction=0.1: raise"),
])
def test_bad_documents_are_one_line_and_leave_nothing(content, says, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=says):
        data.prepare(DataConfig(input=str(path), tokenizer="gpt2", data_dir=str(tmp_path / "d")))
    assert [e.name for e in (tmp_path / "d" / "prepared").iterdir()] == ["index"]


def test_text_field_picks_the_field_and_names_its_own_cache(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": "one", "body": f"doc {i} body"}) + "\n" for i in range(20)))
    body = data.prepare(DataConfig(input=str(path), tokenizer="gpt2", text_field="body", val_fraction=0.3,
                                   data_dir=str(tmp_path / "d")))
    tok = tokenizers.gpt2()
    assert "doc 0 body" in tok.decode(np.concatenate([body.tokens("train"), body.tokens("val")]).tolist())
    assert body.dir.endswith("-docs-body-val0.3")


def test_documents_need_an_endoftext_token(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "a"}\n')
    with pytest.raises(UserError, match="separated by an end-of-text token: --tokenizer=char has none; use "
                                        "--tokenizer=gpt2"):
        data.prepare(DataConfig(input=str(path), tokenizer="char", data_dir=str(tmp_path / "d")))


def test_an_empty_directory_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no files there"):
        data.prepare(DataConfig(input=str(tmp_path / "empty"), tokenizer="gpt2", data_dir=str(tmp_path / "d")))


def test_documents_text_as_each_format_holds_it(tmp_path):
    """A text file's \r\n is read as \n (as one text file's is); a JSON string keeps its \r; a lone surrogate that
    JSON can spell is replaced, as tiktoken's encode_ordinary replaces it."""
    d = tmp_path / "dir"
    d.mkdir()
    for i in range(30):
        (d / f"{i:02d}.txt").write_bytes(f"line one\r\nline {i}\r\n".encode())
    lines = "".join(json.dumps({"text": f"a\r\nb {i} \ud83d end"}) + "\n" for i in range(30))
    (tmp_path / "c.jsonl").write_text(lines)
    tok = tokenizers.gpt2()
    for path, doc in ((d, "line one\nline {i}\n"), (tmp_path / "c.jsonl", "a\r\nb {i} \ud83d end")):
        prep = data.prepare(DataConfig(input=str(path), tokenizer="gpt2", val_fraction=0.3, data_dir=str(tmp_path)))
        want = {"train": [], "val": []}
        for i in range(30):
            want["val" if documents.in_val(i, 0.3, 2357) else "train"] += tok.encode(doc.format(i=i)) + [EOT]
        assert {s: prep.tokens(s).tolist() for s in data.SPLITS} == want, path


def test_damaged_and_odd_inputs_are_one_line(tmp_path):
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 100)[:40])
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": list(range(10))}), tmp_path / "ints.parquet")
    for name, says in (("cut.jsonl.gz", r"cut\.jsonl\.gz cannot be read \((EOFError|BadGzipFile|OSError)"),
                       ("ints.parquet", r"ints\.parquet's column 'text' holds int64, not text")):
        with pytest.raises(UserError, match=says):
            data.prepare(DataConfig(input=str(tmp_path / name), tokenizer="gpt2", data_dir=str(tmp_path / "d")))


def test_the_datasets_cache_is_found_by_name_and_its_mistakes_are_one_line(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    monkeypatch.setenv("HF_DATASETS_CACHE", "")
    # the library writes a name in snake case: someone/TinyCorpus lives in someone___tiny_corpus
    given = _datasets_cache(tmp_path / "two", ["a doc"] * 30, pa, "someone/TinyCorpus", ("en", "fr"),
                            "someone___tiny_corpus")
    with pytest.raises(UserError, match="configurations en, fr: pass --input=hf:someone/TinyCorpus:en"):
        data.prepare(DataConfig(input=given, tokenizer="gpt2", data_dir=str(tmp_path / "d")))
    prep = data.prepare(DataConfig(input=given + ":fr", tokenizer="gpt2", val_fraction=0.2, data_dir=str(tmp_path)))
    assert prep.meta["train_documents"] + prep.meta["val_documents"] == 30
    with pytest.raises(UserError, match=r"someone/nothing is not in the datasets cache .*two: run datasets\.load_"):
        data.prepare(DataConfig(input="hf:someone/nothing", tokenizer="gpt2", data_dir=str(tmp_path / "d")))
    newest = tmp_path / "two" / "someone___tiny_corpus" / "en" / "1.0.0" / "new"
    (newest / "tiny_corpus-train-00001-of-00002.arrow").unlink()
    with pytest.raises(UserError, match="1 of the train split's 2 Arrow files are there"):
        data.prepare(DataConfig(input=given + ":en", tokenizer="gpt2", data_dir=str(tmp_path / "d")))
