"""Nothing lost, nothing hangs: a failed --force leaves the old run byte for byte, damaged run files and prepared
caches are one line (or rebuilt), and every command answers --help."""

import json
import os
import shutil

import pytest
from conftest import cli_run, digest, user_error


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shakespeare):
    """One tiny run, trained once; tests work on copies of it."""
    out = tmp_path_factory.mktemp("reliability") / "run"
    r = cli_run("train", "--config=tiny", f"--input={shakespeare}", f"--out_dir={out}", "--max_iters=4",
                "--eval_interval=2", "--eval_iters=1")
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def _copy(trained, tmp_path, name="run"):
    out = tmp_path / name
    shutil.copytree(trained, out, symlinks=True)
    return out


@pytest.mark.parametrize("bad", ["--input=/no/such.txt", "--mesh=dp:3", "--attention=cudnn", "--block_size=2000000",
                                 "--n_head=5"])
def test_a_failed_force_leaves_the_old_run_byte_for_byte(capsys, trained, tmp_path, shakespeare, bad):
    out = _copy(trained, tmp_path)
    before = digest(out)
    user_error(capsys, "train", "--config=tiny", f"--input={shakespeare}", f"--out_dir={out}", "--force", bad)
    assert digest(out) == before


def test_force_on_a_run_whose_checkpoints_are_a_link(capsys, trained, tmp_path, shakespeare):
    """checkpoints -> a scratch disk: a failed --force changes nothing on either side of the link; a good one keeps
    the link and replaces the checkpoints it points to."""
    out = _copy(trained, tmp_path)
    scratch = tmp_path / "scratch"
    shutil.move(out / "checkpoints", scratch)
    os.symlink(scratch, out / "checkpoints")
    before, before_scratch = digest(out), digest(scratch)
    user_error(capsys, "train", "--config=tiny", f"--input={shakespeare}", f"--out_dir={out}", "--force",
               "--mesh=dp:3")
    assert digest(out) == before and digest(scratch) == before_scratch
    r = cli_run("train", "--config=tiny", f"--input={shakespeare}", f"--out_dir={out}", "--force", "--max_iters=3",
                "--eval_interval=3", "--eval_iters=1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.path.islink(out / "checkpoints")
    assert sorted(os.listdir(scratch)) == ["best_00000003", "step_00000003"]


def _damage(out, what):
    if what == "config_list":
        (out / "config.json").write_text("[1, 2]")
    elif what == "config_type":
        c = json.loads((out / "config.json").read_text())
        c["model"]["n_layer"] = "abc"
        (out / "config.json").write_text(json.dumps(c))
    elif what == "config_shape":
        c = json.loads((out / "config.json").read_text())
        c["model"]["n_embd"] = 64
        (out / "config.json").write_text(json.dumps(c))
    elif what == "metrics_row":
        (out / "metrics.jsonl").write_text((out / "metrics.jsonl").read_text() + "[1, 2]\n")
    elif what == "tokenizer_missing":
        os.remove(out / "tokenizer.json")
    elif what == "tokenizer_corrupt":
        (out / "tokenizer.json").write_text("{garbage")
    elif what == "checkpoints_dangling":
        shutil.rmtree(out / "checkpoints")
        os.symlink(out.parent / "not-mounted", out / "checkpoints")


ALL = ("sample", "eval", "export", "resume")
DAMAGE = {  # what is damaged -> the commands that read it, and what their one line names
    "config_list": dict.fromkeys(ALL, "config.json is not a readable gptjax run config"),
    "config_type": dict.fromkeys(ALL, "model.n_layer is 'abc', not an int"),
    "config_shape": dict.fromkeys(ALL, "holds another model than the run's config.json describes"),
    "metrics_row": {"resume": "metrics.jsonl line 4 is not a metrics row"},
    "tokenizer_missing": dict.fromkeys(("sample", "export"), "tokenizer.json is missing"),  # eval, resume: prep's
    "tokenizer_corrupt": dict.fromkeys(ALL, "tokenizer.json is not a gptjax tokenizer"),
    "checkpoints_dangling": dict.fromkeys(ALL, "which does not exist (a disk not mounted?)"),
}


@pytest.mark.parametrize("what", list(DAMAGE))
def test_damaged_run_files_are_one_line_and_change_nothing(capsys, trained, tmp_path, what):
    out = _copy(trained, tmp_path)
    _damage(out, what)
    before = digest(tmp_path)
    argv = {"sample": ["sample", f"--out_dir={out}", "--max_new_tokens=3"], "eval": ["eval", f"--out_dir={out}"],
            "export": ["export", f"--out_dir={out}", "--to=nanogpt", tmp_path / "nano" / "ckpt.pt"],
            "resume": ["train", "--init_from=resume", f"--out_dir={out}", "--max_iters=6"]}
    for command, needle in DAMAGE[what].items():
        assert needle in user_error(capsys, *argv[command]), (what, command)
        assert digest(tmp_path) == before, (what, command)


@pytest.fixture
def read_only_dir(tmp_path):
    """An empty read-only filesystem (a tmpfs mounted ro), as a run's checkpoints on a read-only mount."""
    import subprocess

    d = tmp_path / "ro"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(d)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here")
    yield d
    subprocess.run(["umount", str(d)], capture_output=True)


def test_checkpoints_on_a_read_only_mount_exit_at_once_with_one_line(trained, tmp_path, read_only_dir):
    from conftest import error_line, run_cli

    out = _copy(trained, tmp_path)
    shutil.rmtree(out / "checkpoints")
    os.symlink(read_only_dir, out / "checkpoints")
    before = digest(out)
    r = run_cli("train", "--init_from=resume", f"--out_dir={out}", "--max_iters=6", timeout=60)
    assert r.returncode == 2 and "Read-only file system" in error_line(r.stderr), r.stderr[-2000:]
    assert digest(out) == before


CACHE_DAMAGE = {
    "train.bin truncated": lambda d: os.truncate(d / "train.bin", os.path.getsize(d / "train.bin") // 2),
    "train.bin an odd number of bytes": lambda d: os.truncate(d / "train.bin", os.path.getsize(d / "train.bin") - 1),
    "train.bin deleted": lambda d: os.remove(d / "train.bin"),
    "meta.json corrupt": lambda d: (d / "meta.json").write_text("{nope"),
    "meta.json not an object": lambda d: (d / "meta.json").write_text("[1]"),
    "tokenizer.json deleted": lambda d: os.remove(d / "tokenizer.json"),
}


def test_a_damaged_prepared_cache_is_named_and_rebuilt(capsys, tmp_path, shakespeare):
    from gptjax import data
    from gptjax.config import DataConfig

    config = DataConfig(input=shakespeare, data_dir=str(tmp_path))
    prep = data.prepare(config)
    whole = {f: (tmp_path / prep.dir / f).read_bytes() for f in ("train.bin", "val.bin", "meta.json")}
    capsys.readouterr()
    for what, damage in CACHE_DAMAGE.items():
        damage(tmp_path / prep.dir)
        again = data.prepare(config)
        assert again.dir == prep.dir and len(again.tokens("train")) == again.meta["train_tokens"] == 1_003_854, what
        assert {f: (tmp_path / prep.dir / f).read_bytes() for f in whole} == whole, what
        err = capsys.readouterr().err
        assert f"the prepared cache {prep.dir} is damaged" in err and "preparing it again" in err, (what, err)
    assert sorted(os.listdir(os.path.dirname(prep.dir))) == [os.path.basename(prep.dir)]  # no debris left


def test_a_corpus_changed_since_the_run_was_trained_is_named(capsys, trained, tmp_path, shakespeare):
    out = _copy(trained, tmp_path)
    corpus = tmp_path / "input.txt"
    shutil.copy(shakespeare, corpus)
    c = json.loads((out / "config.json").read_text())
    c["data"]["input"] = str(corpus)
    (out / "config.json").write_text(json.dumps(c))
    with open(corpus, "a", encoding="utf-8") as f:
        f.write("\u20ac")  # a character the run's vocabulary does not have
    before = digest(out)
    for argv in (["train", "--init_from=resume", f"--out_dir={out}", "--max_iters=6"], ["eval", f"--out_dir={out}"]):
        assert f"the corpus {corpus} has changed since {out} was trained on it" in user_error(capsys, *argv)
    assert digest(out) == before
