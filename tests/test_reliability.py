"""Nothing lost, nothing hangs: a failed --force leaves the old run byte for byte, damaged run files and prepared
caches are one line (or rebuilt), and every command answers --help."""

import inspect
import json
import os
import shutil

import pytest
from conftest import CACHE_DAMAGE, DAMAGE, cli_run, damage_run, digest, user_error


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
    (scratch / "notes.txt").write_text("the user's, not the run's")
    before, before_scratch = digest(out), digest(scratch)
    user_error(capsys, "train", "--config=tiny", f"--input={shakespeare}", f"--out_dir={out}", "--force",
               "--mesh=dp:3")
    assert digest(out) == before and digest(scratch) == before_scratch
    r = cli_run("train", "--config=tiny", f"--input={shakespeare}", f"--out_dir={out}", "--force", "--max_iters=3",
                "--eval_interval=3", "--eval_iters=1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.path.islink(out / "checkpoints")
    assert sorted(os.listdir(scratch)) == ["best_00000003", "notes.txt", "step_00000003"]
    assert not os.path.exists(out / ".gptjax-replaced")


def test_a_force_that_fails_before_its_first_checkpoint_puts_the_old_run_back(capsys, trained, tmp_path, shakespeare,
                                                                             monkeypatch):
    """Every check passed and the new run began (the old one moved aside), then it failed before saving anything:
    the old run comes back byte for byte."""
    from gptjax import train

    out = _copy(trained, tmp_path)
    before = digest(out)

    def exhausted(*args, **kwargs):
        assert os.path.exists(out / ".gptjax-replaced")  # the new run had begun
        raise MemoryError

    monkeypatch.setattr(train, "make_train_step", exhausted)
    assert "out of memory" in user_error(capsys, "train", "--config=tiny", f"--input={shakespeare}",
                                         f"--out_dir={out}", "--force")
    assert digest(out) == before


@pytest.mark.parametrize("what", list(DAMAGE))
def test_damaged_run_files_are_one_line_and_change_nothing(capsys, trained, tmp_path, what):
    out = _copy(trained, tmp_path)
    damage_run(out, what)
    before = digest(tmp_path)
    argv = {"sample": ["sample", f"--out_dir={out}", "--max_new_tokens=3"], "eval": ["eval", f"--out_dir={out}"],
            "export": ["export", f"--out_dir={out}", "--to=nanogpt", tmp_path / "nano" / "ckpt.pt"],
            "resume": ["train", "--init_from=resume", f"--out_dir={out}", "--max_iters=6"]}
    for command, needle in DAMAGE[what].items():
        assert needle in user_error(capsys, *argv[command]), (what, command)
        assert digest(tmp_path) == before, (what, command)


def _tmpfs(path, options: str):
    """A tmpfs mounted at path with `options` for the test, unmounted after; skipped where mount is refused."""
    import subprocess

    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield path
    subprocess.run(["umount", str(path)], capture_output=True)


@pytest.fixture
def read_only_dir(tmp_path):
    """An empty read-only filesystem, as a run's checkpoints on a read-only mount."""
    yield from _tmpfs(tmp_path / "ro", "ro")


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB filesystem: too small for one checkpoint of the tiny model."""
    yield from _tmpfs(tmp_path / "full", "size=64k")


def test_a_disk_that_fills_inside_orbax_is_one_line(trained, tmp_path, full_disk):
    """tensorstore reports the full disk in its own words ([os_error_code='28']), and orbax's threads print pages of
    tracebacks as the save fails: the user sees one line, at once."""
    from conftest import error_line, run_cli

    out = _copy(trained, tmp_path)
    shutil.rmtree(out / "checkpoints")
    os.symlink(full_disk, out / "checkpoints")
    r = run_cli("train", "--init_from=resume", f"--out_dir={out}", "--max_iters=6", "--eval_interval=2", timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"cannot write the run in {out}: No space left on device" in error_line(r.stderr)


def test_checkpoints_on_a_read_only_mount_exit_at_once_with_one_line(trained, tmp_path, read_only_dir):
    from conftest import error_line, run_cli

    out = _copy(trained, tmp_path)
    shutil.rmtree(out / "checkpoints")
    os.symlink(read_only_dir, out / "checkpoints")
    before = digest(out)
    r = run_cli("train", "--init_from=resume", f"--out_dir={out}", "--max_iters=6", timeout=60)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "cannot write checkpoints in" in error_line(r.stderr) and "Read-only file system" in r.stderr
    assert digest(out) == before


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
    assert sorted(os.listdir(os.path.dirname(prep.dir))) == [os.path.basename(prep.dir), "index"]  # no debris left


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


def test_what_cannot_finish_or_fit_is_refused_up_front(capsys, trained, monkeypatch):
    from gptjax import evaluate

    out = str(trained)
    for argv, needle in ((["--num_samples=2147483647"], "out of memory: 2,147,483,647 samples of"),
                         (["--max_new_tokens=2147483647"], "--max_new_tokens=2147483647 is out of range")):
        assert needle in user_error(capsys, "sample", f"--out_dir={out}", *argv)
    monkeypatch.setattr(evaluate, "_available_bytes", lambda: (None, 1 << 15))  # a host with 32 KiB free
    assert "lower --batch_size" in user_error(capsys, "eval", f"--out_dir={out}", "--batch_size=64")
    assert "lower --num_samples or --max_new_tokens" in user_error(capsys, "sample", f"--out_dir={out}")


@pytest.mark.parametrize("address, needle", [
    ("no-such-host.invalid:1234", "host no-such-host.invalid does not resolve"),
    ("127.0.0.1", "write HOST:PORT"),
    ("127.0.0.1:99999", "port 99999 is not in 1..65535"),
])
def test_a_coordinator_address_that_cannot_work_is_one_line(capsys, tmp_path, shakespeare, address, needle):
    err = user_error(capsys, "train", "--config=tiny", f"--input={shakespeare}", f"--out_dir={tmp_path / 'r'}",
                     "--distributed", f"--coordinator_address={address}", "--num_processes=1", "--process_id=0")
    assert needle in err
    assert not (tmp_path / "r").exists()


def test_a_process_that_never_joins_ends_the_wait_with_one_line(tmp_path, shakespeare):
    """Two processes declared, one started: --distributed_timeout ends the wait with one line, not the runtime's
    abort minutes later."""
    import socket

    from conftest import error_line, run_cli

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = run_cli("train", "--config=tiny", f"--input={shakespeare}", f"--out_dir={tmp_path / 'r'}", "--distributed",
                f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", "--process_id=0",
                "--distributed_timeout=3", timeout=60)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "waited 3 s for 1 other process(es) to connect" in error_line(r.stderr)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("command", ["prepare", "train", "sample", "eval", "bench", "export", "import"])
def test_every_command_answers_help_with_every_option_and_key(capsys, command):
    """--help exits 0 and lists the command's options and, for the commands that take a config, every config key
    with its comment, type and the preset's value; the defaults shown are the ones the command uses."""
    from gptjax import cli, options
    from gptjax.args import descriptions
    from gptjax.config import field_types, load_config

    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: gptjax {command}")
    for name, option in options.OPTIONS[command].items():
        assert f"--{name}={option.metavar}" in out and option.help in out, name
    if command in options.TAKES_CONFIG:
        notes, config = descriptions(), load_config("tiny")
        assert cli.main([command, "--config=tiny", "--help"]) == 0
        out = capsys.readouterr().out
        for key, (section, typ) in field_types().items():
            value = getattr(getattr(config, section), key)
            shown = f"[{typ.__name__}, default {value!r}" if typ is str else f"[{typ.__name__}, default {value}"
            line = next(line for line in out.splitlines() if line.startswith(f"  --{key} "))
            assert notes[key] and notes[key] in line and shown in line, (key, line)
        assert "--max_iters                        optimizer steps [int, default 20, >= 0]" in out


def test_help_shows_the_defaults_the_commands_use():
    from gptjax import bench, config, options, sample

    o = bench.parse_options({})
    for key in ("steps", "eager_steps", "warmup", "repeats", "rounds", "max_new_tokens", "out"):
        assert options.OPTIONS["bench"][key].default == getattr(o, key), key
    assert options.OPTIONS["bench"]["modes"].default == ",".join(bench.runner.MODES)
    assert options.DEFAULT_RUN == config.load_config(options.DEFAULT_CONFIG).train.out_dir
    defaults = inspect.signature(sample.sample).parameters
    for key in ("num_samples", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "kv_cache"):
        assert options.OPTIONS["sample"][key].default == defaults[key].default, key


def test_version(capsys):
    from gptjax import __version__, cli

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith(f"gptjax {__version__} (jax ")


def test_small_corpora_byte_order_marks_home_and_working_directory(capsys, tmp_path, monkeypatch, shakespeare):
    from gptjax import config, data
    from gptjax.config import DataConfig

    one = tmp_path / "one.txt"
    one.write_text("a")
    assert "holds one character" in user_error(capsys, "prepare", f"--input={one}", f"--data_dir={tmp_path / 'd'}")
    bom = tmp_path / "bom.txt"
    bom.write_text("\ufeff" + "hello there, general kenobi\n" * 50, encoding="utf-8")
    prep = data.prepare(DataConfig(input=str(bom), data_dir=str(tmp_path / "d")))
    assert "\ufeff" not in prep.tokenizer().decode(list(range(prep.meta["vocab_size"])))
    assert prep.meta["vocab_size"] == len(set("hello there, general kenobi\n")) and \
        prep.meta["train_chars"] + prep.meta["val_chars"] == 50 * 28

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cli_run("prepare", "--config=tiny", f"--input={shakespeare}", "--data_dir=~/d").returncode == 0
    assert (tmp_path / "home" / "d" / "prepared").is_dir() and not os.path.exists("~")
    assert str(tmp_path / "home" / "nothing") in user_error(capsys, "sample", "--out_dir=~/nothing")
    monkeypatch.setenv("HOME", "")
    monkeypatch.delenv("GPTJAX_DATA_DIR")
    assert config.cache_home() != "/.cache/gptjax" and data.data_dir(DataConfig()) == config.cache_home()

    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    assert "the working directory no longer exists" in user_error(capsys, "eval")
