"""What `gptjax export`, `gptjax import` and bench's results writer refuse or survive: one line, exit 2, and nothing
already written lost. No model is trained here: each check comes before the work, or the work is stubbed."""

import errno
import json
import os
import pickle
import shlex
import stat
import warnings

import pytest
import torch
from conftest import digest, user_error

from gptjax import cli, writes
from gptjax.bench import report, runner
from gptjax.config import ModelConfig
from gptjax.reference import parity
from gptjax.weights import files, nanogpt


@pytest.fixture
def no_checkpoint_load(monkeypatch):
    def load_state(*args, **kwargs):
        raise AssertionError("export loaded the checkpoint before checking the file it is to write")

    monkeypatch.setattr(files.rundir, "load_state", load_state)


def _export(capsys, tmp_path, target) -> str:
    return user_error(capsys, "export", f"--out_dir={tmp_path / 'run'}", "--to=nanogpt", target)


def test_export_to_a_path_that_cannot_be_written_is_refused_first(capsys, tmp_path, no_checkpoint_load):
    (tmp_path / "dir.pt").mkdir()
    (tmp_path / "file").write_text("keep me")
    before = digest(tmp_path)
    for target, needle in (
            (tmp_path / "dir.pt", f"{tmp_path / 'dir.pt'} is a directory: name the file to write inside it, e.g. "
                                  f"{tmp_path / 'dir.pt' / 'ckpt.pt'}"),
            (tmp_path / "file" / "x.pt", f"{tmp_path / 'file'} is a file, so the directory cannot be made"),
            (tmp_path / "file" / "a" / "x.pt", f"{tmp_path / 'file'} is a file, so the directory cannot be made"),
            ("/proc/x.pt", "/proc/x.pt: cannot write in /proc (No such file or directory); export to a directory"),
            ("/proc/gptjax-export/x.pt", "cannot write in /proc/gptjax-export")):
        assert needle in _export(capsys, tmp_path, target)
        assert digest(tmp_path) == before
    assert not os.path.exists("/proc/gptjax-export")


def test_export_into_a_read_only_directory_is_refused_first_and_leaves_nothing(capsys, tmp_path, no_checkpoint_load,
                                                                              monkeypatch):
    # A read-only file system, simulated (the tests may run as root, whom permissions do not stop): the directories
    # made for the probe are removed again.
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(writes.tempfile, "mkstemp", read_only)
    err = _export(capsys, tmp_path, tmp_path / "new" / "deeper" / "ckpt.pt")
    assert f"cannot write in {tmp_path / 'new' / 'deeper'} (Read-only file system)" in err, err
    assert os.listdir(tmp_path) == []


def test_import_of_a_directory_says_to_name_the_ckpt_inside(capsys, tmp_path):
    (tmp_path / "nano").mkdir()
    err = user_error(capsys, "import", "--from=nanogpt", tmp_path / "nano", f"--out_dir={tmp_path / 'run'}")
    assert f"{tmp_path / 'nano'} is a directory: name the checkpoint file inside it, e.g. " \
           f"{tmp_path / 'nano' / 'ckpt.pt'}" in err, err
    assert not (tmp_path / "run").exists()


class RunsCode:
    """Unpickling this runs a shell command, which leaves the marker file behind."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


@pytest.mark.parametrize("save", ["torch.save", "pickle.dump"])
def test_import_refuses_a_pickle_that_would_run_code_and_names_it(capsys, tmp_path, save):
    marker, path = tmp_path / "code-ran", tmp_path / "ckpt.pt"
    payload = {"model": {"transformer.wte.weight": RunsCode(str(marker))}, "model_args": {}}
    if save == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        err = user_error(capsys, "import", "--from=nanogpt", path, f"--out_dir={tmp_path / 'run'}")
    assert not [str(w.message) for w in seen]  # printed, a warning is more lines than the one error line
    assert f"it pickles {os.system.__module__}.system, which weights_only loading refuses to import" in err, err
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_import_meta_that_is_not_a_meta_pkl_is_one_line(capsys, tmp_path):
    c = ModelConfig(vocab_size=65, block_size=8, n_layer=1, n_head=2, n_embd=8)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": parity.twin(c).state_dict(), "model_args": {k: getattr(c, k) for k in nanogpt.MODEL_ARGS}},
               ckpt)
    notes = tmp_path / "notes.txt"
    notes.write_text("PS: not a pickle")  # 'P' is pickle's persistent-id opcode, whose error spans two lines
    for meta, needle in ((ckpt, "not a zip archive like a torch.save ckpt.pt"),
                         (tmp_path, "not a directory: name the meta.pkl inside it"),
                         (notes, "a load persistent id instruction was encountered, but no persistent_load")):
        err = user_error(capsys, "import", "--from=nanogpt", ckpt, f"--meta={meta}", f"--out_dir={tmp_path / 'run'}")
        assert f"--meta={meta} must be nanoGPT's meta.pkl" in err and needle in err.lower(), err
        assert not (tmp_path / "run").exists()


@pytest.fixture
def stub_bench(monkeypatch):
    """bench without a mode's process or a batch: every mode reports the same canned figures."""
    result = {"step_s_runs": [0.01, 0.02], "tokens_per_call": 128, "detail": "stub", "dtype": "float32",
              "device": "cpu", "devices": 1, "threads": None, "versions": {}, "first_call_s": 1.0,
              "peak_mem_bytes": 2**20, "peak_mem_source": "stub", "losses": [3.0, 2.9]}
    monkeypatch.setattr(runner, "_prepare_point", lambda config, o, modes, tmp, n: (config, {}, 1000))
    monkeypatch.setattr(runner, "_run_mode", lambda mode, spec, tmp: (dict(result), None))


def test_bench_results_replace_a_link_rather_than_write_through_it(capsys, tmp_path, stub_bench):
    out, theirs = tmp_path / "out", tmp_path / "theirs.json"
    out.mkdir()
    theirs.write_text("someone else's file")
    (out / "results.json").symlink_to(theirs)
    old = os.umask(0o022)
    try:
        assert cli.main(["bench", "--config=tiny", "--modes=jax_jit", f"--out={out}"]) == 0, capsys.readouterr().err
    finally:
        os.umask(old)
    assert theirs.read_text() == "someone else's file" and not (out / "results.json").is_symlink()
    with open(out / "results.json") as f:
        assert [r["mode"] for r in json.load(f)["records"]] == ["jax_jit"]
    assert sorted(os.listdir(out)) == sorted(report.FILES)
    assert {stat.S_IMODE(os.stat(out / n).st_mode) for n in report.FILES} == {0o644}  # not mkstemp's 0600


def test_a_failed_results_write_keeps_the_earlier_results_and_is_one_line(capsys, tmp_path, stub_bench, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    for name in report.FILES:
        (out / name).write_text(f"earlier {name}")
    before = digest(tmp_path)

    def disk_full(records, path):  # the disk fills up while the chart, the last file, is written
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(report, "chart", disk_full)
    err = user_error(capsys, "bench", "--config=tiny", "--modes=jax_jit", f"--out={out}")
    assert f"cannot write {out / 'results.png'} (No space left on device)" in err, err
    assert digest(tmp_path) == before


def test_export_refuses_a_model_nanogpt_cannot_hold(tmp_path):
    """nanoGPT's GPT is a learned-position, tied-head GPT: a rope, untied or bigram model is one line, before a file
    is written; a rope model's layout has no wpe row (its parameters have none)."""
    from gptjax.config import Config
    from gptjax.errors import UserError

    for change, needle in (({"pos_encoding": "rope"}, "pos_encoding=rope; nanoGPT's GPT learns its position"),
                           ({"tie_weights": False}, "untied LM head"), ({"model": "bigram"}, "holds a bigram model")):
        config = Config(model=ModelConfig(vocab_size=65, **change))
        with pytest.raises(UserError, match=needle):
            nanogpt.export_files(config, None, str(tmp_path), str(tmp_path / "ckpt.pt"), False)
    assert os.listdir(tmp_path) == []
    rope = ModelConfig(vocab_size=65, pos_encoding="rope")
    assert [row[1] for row in nanogpt.layout(rope)] == [row[1] for row in nanogpt.layout(ModelConfig(vocab_size=65))
                                                         if row[1] != "wpe.weight"]
