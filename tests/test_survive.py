"""Runs that survive: kills at any moment, SIGINT/SIGTERM, non-finite losses, a second process, damaged checkpoints,
and run directories that cannot be written."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import cli_run, digest, run_cli, user_error
from crashing import crash_and_resume, metrics

from gptjax import checkpoint, cli, run, rundir, train
from gptjax.errors import UserError


def _tiny(shakespeare, *args):
    return ["--config=tiny", f"--input={shakespeare}", *args]


def _latest_params(out):
    return jax.tree.leaves(rundir.load_state(str(out), "latest")[2])


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path, shakespeare):
    """SIGKILL at >= 7 moments (inside checkpoint saves, mid-training, during start-up and restore), resumed each
    time with the plain `--init_from=resume --out_dir=DIR`: the metrics and final weights equal the straight run's."""
    args = _tiny(shakespeare, "--max_iters=300", "--eval_interval=5", "--dropout=0.1", "--keep_checkpoints=2")
    straight = tmp_path / "straight"
    r = run_cli("train", *args, f"--out_dir={straight}")
    assert r.returncode == 0, r.stderr[-2000:]
    crashed = tmp_path / "crashed"
    log = crash_and_resume(args, str(crashed), kills=7, seed=1)
    killed = [rec for rec in log if rec["killed"]]
    assert len(killed) >= 7
    assert sum(rec["inside_save"] for rec in killed) >= 2, log  # a save's .tmp_ directory outlived the process
    assert len({rec["from_step"] for rec in log}) >= 4, log  # resumed from many checkpoints, not over from step 0
    assert metrics(str(crashed)) == metrics(str(straight))
    for a, b in zip(_latest_params(crashed), _latest_params(straight)):
        np.testing.assert_array_equal(a, b)
    assert checkpoint.steps(str(crashed)) == [295, 300]


def _start_and_wait_for_compile(shakespeare, out, *args):
    proc = subprocess.Popen([sys.executable, "-m", "gptjax", "train", *_tiny(shakespeare, *args), f"--out_dir={out}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    output = ""
    while "compiled the train step" not in output:
        line = proc.stdout.readline()
        assert line, output
        output += line
    return proc, output


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_saves_the_step_reached_and_resume_finishes_the_run(tmp_path, shakespeare, sig, code):
    """SIGINT/SIGTERM: the step in flight finishes, `latest` is saved at that step (not at the last eval), the line
    says how to resume, exit 130/143; the plain resume goes on from that step. (That a resumed run equals an
    uninterrupted one is the SIGKILL test's to show.)"""
    out = tmp_path / "run"
    proc, _ = _start_and_wait_for_compile(shakespeare, out, "--max_iters=100000", "--eval_interval=50000")
    proc.send_signal(sig)
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == code, rest[-2000:]
    last = rest.strip().splitlines()[-1]
    step = checkpoint.steps(str(out))[-1]
    assert last == (f"gptjax: {signal.Signals(sig).name} at step {step}: saved {checkpoint.resolve(str(out), 'latest')}"
                    f"; continue with gptjax train --init_from=resume --out_dir={out}"), last
    assert 0 < step < 50000 and checkpoint.steps(str(out)) == [step]  # the steps since step 0's eval are kept
    state = rundir.load_state(str(out), "latest")[2]
    assert int(state.step) == step
    r = run_cli("train", "--init_from=resume", f"--out_dir={out}", f"--max_iters={step + 3}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "done: 3 steps" in r.stdout and checkpoint.steps(str(out)) == [step, step + 3]


def test_the_first_signal_leaves_the_second_to_kill_at_once():
    """After the first SIGINT the loop is asked to stop, and SIGINT/SIGTERM are back to their default action, so a
    second one ends the process even while it waits inside a long device call; on leaving, the handlers are what
    they were (Python's default_int_handler, or SIG_IGN where the shell started pytest in the background)."""
    before = signal.getsignal(signal.SIGINT)
    with run.StopOnSignal() as stop:
        assert signal.getsignal(signal.SIGINT) == stop._handle
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL == signal.getsignal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGINT) == before


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(capsys, tmp_path, shakespeare):
    out = tmp_path / "run"
    r = cli_run("train", *_tiny(shakespeare, "--max_iters=10", "--eval_interval=5"), f"--out_dir={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    before = digest(out / "checkpoints")
    rows = (out / "metrics.jsonl").read_text().splitlines()
    err = user_error(capsys, "train", "--init_from=resume", f"--out_dir={out}", f"--input={shakespeare}",
                      "--max_iters=30", "--learning_rate=1e30", "--grad_clip=0")
    assert "step 11: the gradient norm (nan) is not finite, so training stopped; the last good checkpoint, " \
           f"{checkpoint.resolve(str(out), 'latest')}, is kept" in err, err
    assert digest(out / "checkpoints") == before
    now = (out / "metrics.jsonl").read_text().splitlines()  # step 10's row is the resumed run's own eval
    assert now[:2] == rows[:2] and [json.loads(r)["step"] for r in now] == [0, 5, 10]
    # A fresh run that diverges before its first checkpoint leaves nothing behind.
    fresh = tmp_path / "fresh"
    err = user_error(capsys, "train", *_tiny(shakespeare, "--learning_rate=1e30", "--grad_clip=0"),
                      f"--out_dir={fresh}")
    assert "no checkpoint was saved" in err and not fresh.exists()


def test_a_second_process_on_the_same_run_is_refused(capsys, tmp_path, shakespeare):
    out = tmp_path / "run"
    r = run_cli("train", *_tiny(shakespeare, "--max_iters=5"), f"--out_dir={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    before = digest(out)
    with rundir.run_lock(str(out), "train"):
        err = user_error(capsys, "train", "--init_from=resume", f"--out_dir={out}", "--max_iters=10")
        assert f"{out} is in use by gptjax train (pid {os.getpid()})" in err, err
        err = user_error(capsys, "train", *_tiny(shakespeare), f"--out_dir={out}", "--force")
        assert "is in use by" in err
    assert digest(out) == before  # --force removed nothing while the run was held
    r = run_cli("train", "--init_from=resume", f"--out_dir={out}", "--max_iters=10")  # released: it goes on
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("bad, needle", [("", "--out_dir is empty"), ("  ", "--out_dir is empty"),
                                         ("FILE", "is a file, not a directory"),
                                         ("FILE/sub", "is a file, so the directory cannot be made"),
                                         ("/proc/gptjax-run", "cannot write there")])
def test_out_dir_that_cannot_hold_a_run(capsys, tmp_path, shakespeare, bad, needle, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative --out_dir that slips through lands here, not in the checkout
    (tmp_path / "FILE").write_text("keep me")
    out = bad.replace("FILE", str(tmp_path / "FILE"))
    for resume in ([], ["--init_from=resume"]):
        err = user_error(capsys, "train", *_tiny(shakespeare), f"--out_dir={out}", f"--data_dir={tmp_path / 'data'}",
                          *resume)
        assert needle in err or (resume and "holds no run" in err and needle == "cannot write there"), err
    assert (tmp_path / "FILE").read_text() == "keep me"
    assert not (tmp_path / "data").exists()  # refused before the data was prepared


def test_keep_checkpoints_keeps_the_newest_and_the_best(tmp_path, shakespeare):
    out = tmp_path / "run"
    r = cli_run("train", *_tiny(shakespeare, "--max_iters=40", "--eval_interval=5", "--keep_checkpoints=3"),
                f"--out_dir={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    best_step = min(rows[1:], key=lambda row: row["val_loss"])["step"]
    names = sorted(os.listdir(out / "checkpoints"))
    assert names == sorted({f"best_{best_step:08d}", "step_00000030", "step_00000035", "step_00000040"}), names
    state = rundir.load_state(str(out), "best")[2]
    assert float(state.best_val_loss) == pytest.approx(min(r["val_loss"] for r in rows[1:]), rel=1e-6)
    assert int(state.step) == best_step
    assert int(rundir.load_state(str(out), 35)[2].step) == 35


def test_damaged_checkpoint_is_named_in_one_line(capsys, tmp_path, shakespeare):
    out = tmp_path / "run"
    r = cli_run("train", *_tiny(shakespeare, "--max_iters=20", "--eval_interval=10"), f"--out_dir={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    best = checkpoint.resolve(str(out), "best")
    files = sorted((os.path.join(b, n) for b, _, ns in os.walk(best) for n in ns), key=os.path.getsize)
    with open(files[-1], "r+b") as f:  # the largest file: the arrays
        f.truncate(os.path.getsize(files[-1]) // 2)
    for argv in (("sample", f"--out_dir={out}", "--max_new_tokens=5"), ("eval", f"--out_dir={out}"),
                 ("export", f"--out_dir={out}", str(tmp_path / "ckpt.pt"))):
        err = user_error(capsys, *argv)
        assert f"checkpoint {best} is damaged" in err and "--checkpoint=best|latest|STEP" in err, err
    assert not (tmp_path / "ckpt.pt").exists()
    assert cli.main(["sample", f"--out_dir={out}", "--max_new_tokens=5", "--checkpoint=latest"]) == 0
    assert cli.main(["eval", f"--out_dir={out}", "--checkpoint=10"]) == 0
    capsys.readouterr()
    err = user_error(capsys, "eval", f"--out_dir={out}", "--checkpoint=15")
    assert "has no '15' checkpoint (steps 10, 20; best at step 20)" in err, err


def test_resume_drops_the_metrics_rows_from_the_restored_step_on(tmp_path):
    """Whole rows at and after the restored step go (they are written again), and so does a row cut short by a
    kill; a line that is not a metrics row anywhere else is one line and the file stays as it was."""
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "train_loss": 4.0 - s / 10, "val_loss": 4.1 - s / 10}) + "\n" for s in (0, 5, 10)]
    path.write_text("".join(rows) + '{"step": 15, "val')
    rundir.keep_metrics_before(str(path), 10)
    assert path.read_text() == "".join(rows[:2])
    rundir.keep_metrics_before(str(path), 5)
    assert path.read_text() == rows[0]
    path.write_text(rows[0] + "[1, 2]\n" + rows[1])
    with pytest.raises(UserError, match="line 2 is not a metrics row"):
        rundir.keep_metrics_before(str(path), 5)
    assert path.read_text() == rows[0] + "[1, 2]\n" + rows[1]


@pytest.mark.parametrize("body, needle", [
    ("n_layer = 4\nbatch_size = (\n", "has a syntax error at line 2"),
    ("n_layer = 4\nx = 1 / 0\n", "raised ZeroDivisionError at line 2"),
    ("import sys\nsys.exit(3)\n", "called exit(3)"),
    ("learning_rate = 'fast'\n", "--learning_rate=fast is not a valid float"),
    ("n_layers = 4\n", "unknown config key --n_layers; did you mean --n_layer"),
])
def test_a_bad_config_file_is_one_line(capsys, tmp_path, shakespeare, body, needle):
    path = tmp_path / "my_config.py"
    path.write_text(body)
    for command in ("prepare", "train", "bench"):
        err = user_error(capsys, command, f"--config={path}", f"--input={shakespeare}", f"--out_dir={tmp_path / 'r'}")
        assert needle in err and (str(path) in err or "--" in needle), err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("option, needle", [
    ("--n_embd=32768", "parameters; they need"),
    ("--vocab_size=2000000000", "parameters; they need"),
    ("--batch_size=2147483647", "of host memory"),
    ("--eval_iters=2000000000", "of host memory"),
])
def test_a_model_or_batch_too_large_for_memory_is_refused_before_allocating(capsys, tmp_path, shakespeare, option,
                                                                            needle):
    out = tmp_path / "run"
    err = user_error(capsys, "train", *_tiny(shakespeare, option), f"--out_dir={out}")
    assert err.startswith("gptjax: error: out of memory") and needle in err and "lower --" in err, err
    assert not out.exists()


def test_a_failed_device_allocation_is_one_line(capsys, tmp_path, shakespeare, monkeypatch):
    """Past the estimate (activations, fragmentation), XLA's RESOURCE_EXHAUSTED becomes the same one line; the fresh
    run's directory is not left behind."""
    def exhausted(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 123 bytes.")

    monkeypatch.setattr(train, "make_train_step", lambda *a, **k: exhausted)
    out = tmp_path / "run"
    err = user_error(capsys, "train", *_tiny(shakespeare), f"--out_dir={out}")
    assert err.startswith("gptjax: error: out of memory: lower --batch_size"), err
    assert not out.exists()


def test_a_char_corpus_without_newlines_trains_and_samples(tmp_path, shakespeare):
    """The closing sample starts from a character the vocabulary has when it has no newline."""
    corpus = tmp_path / "one_line.txt"
    with open(shakespeare, encoding="utf-8") as f:
        corpus.write_text(f.read()[:100_000].replace("\n", " "))
    r = cli_run("train", "--config=tiny", f"--input={corpus}", f"--out_dir={tmp_path / 'run'}", "--max_iters=4",
                "--eval_interval=2", "--eval_iters=1")
    assert r.returncode == 0, r.stderr[-2000:]
    text = r.stdout.split("sample:\n", 1)[1]
    assert text.startswith(" ") and len(text.strip()) > 100  # the vocabulary's first character: a space


@pytest.fixture(scope="module")
def ten_steps(tmp_path_factory, shakespeare):
    """A tiny run of 10 steps with checkpoints at 5 and 10, trained once for the module's tests to copy."""
    out = tmp_path_factory.mktemp("ten") / "run"
    r = cli_run("train", *_tiny(shakespeare, "--max_iters=10", "--eval_interval=5"), f"--out_dir={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.mark.parametrize("where", ["save", "inside orbax", "copying the best"])
def test_a_full_disk_while_saving_is_one_line_and_keeps_the_last_checkpoint(capsys, tmp_path, ten_steps,
                                                                            monkeypatch, where):
    """A write that fails for want of space (or permission) names the run and the fix, wherever in a save it
    fails (orbax wraps it in its own exception; copying the best checkpoint raises it from a file copy); every
    checkpoint saved before stays as it was."""
    import errno
    import shutil

    out = tmp_path / "run"
    shutil.copytree(ten_steps, out)
    before = digest(out / "checkpoints")
    path = str(out / "checkpoints" / ".tmp_step_00000015")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    def wrapped(*args, **kwargs):
        raise ValueError(f"Commit failed: [Errno 28] No space left on device: '{path}'")

    if where == "save":
        monkeypatch.setattr(checkpoint, "save", full)
    elif where == "inside orbax":
        monkeypatch.setattr(checkpoint.ocp.StandardCheckpointer, "save", wrapped)
    else:
        monkeypatch.setattr(checkpoint.shutil, "copyfile", full)
    err = user_error(capsys, "train", "--init_from=resume", f"--out_dir={out}", "--max_iters=20")
    assert f"cannot write the run in {out}: No space left on device" in err and "--init_from=resume" in err, err
    monkeypatch.setattr(checkpoint.shutil, "copyfile", shutil.copyfile)
    after = digest(out / "checkpoints")
    assert {k: after.get(k) for k in before} == before
