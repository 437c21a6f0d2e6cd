"""The benchmark harness without running a mode: the timing loop on a fake clock, the loss comparison on stubbed mode
results, and what `gptjax bench` refuses before any mode runs (one line, exit 2, nothing left behind)."""

import dataclasses
import errno
import json
import os
import subprocess
import types
from typing import ClassVar

import pytest

from gptjax import cli, parallel, writes
from gptjax.bench import modes, preflight, runner, timing, worker
from gptjax.bench.protocol import Mode, Result
from gptjax.config import load_config
from gptjax.errors import UserError

BIG = 2**31 - 1  # in range for every count option


class Clock:
    """Asynchronous dispatch: a call only queues its work; sync() waits, and only then does the time pass."""

    def __init__(self, seconds_of_call):
        self.now, self.queued, self.seconds_of_call, self.calls = 0.0, 0.0, seconds_of_call, []

    def call(self, i):
        self.calls.append(i)
        self.queued += self.seconds_of_call(i)
        return f"loss {i}"

    def sync(self):
        self.now, self.queued = self.now + self.queued, 0.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize("sync_each", [False, True])
def test_time_calls_gives_each_repeats_time_per_call(sync_each):
    clock = Clock(lambda i: (i + 1) / 64)  # call i takes (i + 1) / 64 s: binary fractions, so the figures are exact
    first, runs, outs = timing.time_calls(clock.call, clock.sync, steps=4, warmup=2, repeats=3, sync_each=sync_each,
                                          clock=clock)
    n = timing.n_calls(4, 2, 3)
    assert n == 15 and clock.calls == list(range(n)) and outs == [f"loss {i}" for i in range(n)]
    assert first == 1 / 64
    # calls 0, then 1-2 (warm-up, untimed), then 3-6, 7-10 and 11-14: each repeat's seconds over its 4 calls
    assert runs == [(4 + 5 + 6 + 7) / 64 / 4, (8 + 9 + 10 + 11) / 64 / 4, (12 + 13 + 14 + 15) / 64 / 4]
    # ... which the record gives in milliseconds per call
    res = Result(**dict(_result("jax_jit", []), step_s_runs=runs, first_call_s=first, tokens_per_call=128))
    rec = runner._record("jax_jit", None, runner.Options(steps=4, warmup=2, repeats=3), {}, load_config("tiny"), 1000,
                         res, None, None, {}, 4)
    runs_ms = [85.9375, 148.4375, 210.9375]
    assert rec["step_ms"] == {"median": 148.4375, "min": 85.9375, "max": 210.9375, "runs": runs_ms}
    assert rec["tokens_per_sec"] == 128 / 0.1484375 and rec["first_call_s"] == 0.015625


def _result(mode: str, losses: list[float]) -> dict:
    """A mode's result as its worker writes it."""
    return {"step_s_runs": [0.01, 0.02], "tokens_per_call": 128, "detail": mode, "dtype": "float32", "device": "cpu",
            "devices": 1, "threads": None, "versions": {}, "first_call_s": 1.0, "peak_mem_bytes": 2**20,
            "peak_mem_source": "stub", "losses": losses}


@pytest.fixture
def stub_modes(monkeypatch):
    """runner.run with every mode's process replaced by a canned result (losses per mode) and no weights or batches
    made; returns the log of the calls it saw."""
    log = {"losses": {}, "prepared": [], "ran": []}

    def prepare(config, o, modes, tmp, n):
        log["prepared"].append(n)
        return config, {}, 1000

    def run_mode(mode, spec, tmp):
        log["ran"].append(mode)
        return _result(mode, log["losses"].get(mode, [3.0, 2.9, 2.8, 2.7])), None

    monkeypatch.setattr(runner, "_prepare_point", prepare)
    monkeypatch.setattr(runner, "_run_mode", run_mode)
    return log


def test_every_mode_is_compared_with_jax_jits_losses(stub_modes, capsys):
    jit = [3.0, 2.9, 2.8, 2.7]
    stub_modes["losses"] = {"jax_jit": jit,
                            "torch_eager": [3.0, 2.9 + 1e-2, 2.8, 2.7 - 4e-3],  # fast but wrong: flagged
                            "jax_eager": [3.0, 2.9 + 2e-4, 2.8],  # fewer calls, within 1e-3: not flagged
                            "jax_jit_dp": list(jit)}
    o = runner.Options(modes=("torch_eager", "jax_eager", "jax_jit", "jax_jit_dp"))
    records = runner.run(load_config("tiny"), o, command="test")
    by_mode = {r["mode"]: r for r in records}
    assert [r["mode"] for r in records] == ["jax_jit", "torch_eager", "jax_eager", "jax_jit_dp"]  # jax_jit first
    assert by_mode["jax_jit"]["loss_diff"] is None and by_mode["jax_jit"]["loss_flag"] is False
    for mode, flagged in (("torch_eager", True), ("jax_eager", False), ("jax_jit_dp", False)):
        losses = stub_modes["losses"][mode]
        want = max(abs(a - b) for a, b in zip(losses, jit))  # over the calls both made
        assert by_mode[mode]["loss_diff"] == want and by_mode[mode]["loss_flag"] is flagged, (mode, by_mode[mode])
    assert by_mode["torch_eager"]["loss_diff"] == pytest.approx(1e-2)
    assert by_mode["jax_jit_dp"]["loss_diff"] == 0.0
    assert "!!! torch_eager: loss differs from jax_jit's" in capsys.readouterr().out


def test_batches_cover_the_mode_that_makes_the_most_calls(stub_modes):
    # jax_eager with more calls per repeat than the others (--eager_steps > --steps) has a batch for each of them
    runner.run(load_config("tiny"), runner.Options(modes=("jax_jit", "jax_eager"), steps=2, eager_steps=5, warmup=1,
                                                    repeats=2), command="test")
    assert stub_modes["prepared"] == [timing.n_calls(5, 1, 2)]
    # without jax_eager its steps make no calls
    assert preflight.calls_per_mode(runner.Options(modes=("jax_jit",), steps=2, eager_steps=5, warmup=1,
                                                   repeats=2)) == timing.n_calls(2, 1, 2)


@dataclasses.dataclass(frozen=True)
class Canned(Mode):
    """A family of its own that times nothing: fixed figures, losses and device."""

    framework: ClassVar[str] = "canned"

    def run(self, spec: dict) -> Result:
        n = timing.n_calls(spec["steps"], spec["warmup"], spec["repeats"])
        return Result(first_call_s=0.5, step_s_runs=[1 / 256] * spec["repeats"], tokens_per_call=64,
                      losses=[3.0] * n, device="abacus", devices=1, dtype="float32", peak_mem_bytes=None,
                      peak_mem_source=None, versions={"abacus": "1.0"}, threads=None, detail=f"{n} fixed calls")


def test_a_new_mode_is_one_entry_in_the_table(monkeypatch, tmp_path, capsys):
    # Put in the table and nowhere else, a mode is an option, runs through the worker's dispatch, takes the steps
    # option it names, and is recorded, printed and written like any other.
    monkeypatch.setitem(modes.MODES, "canned", Canned("canned", steps_option="eager_steps"))
    monkeypatch.setenv(parallel.MALLOC_ENV, "default")  # the worker runs in this process: leave its malloc alone
    monkeypatch.setattr(runner, "_prepare_point", lambda config, o, names, tmp, n: (config, {}, 1000))

    def in_process(cmd, env, **kwargs):
        assert cmd[1:3] == ["-m", "gptjax.bench.worker"]
        return subprocess.CompletedProcess(cmd, worker.main(cmd[3:]), "", "")

    monkeypatch.setattr(runner, "subprocess", types.SimpleNamespace(run=in_process))
    assert runner.parse_options({}).modes[-1] == "canned"  # the default: every mode in the table
    o = runner.parse_options({"modes": "canned", "steps": "5", "eager_steps": "2", "warmup": "1", "repeats": "3",
                              "out": str(tmp_path)})
    (rec,) = runner.run(load_config("tiny"), o, command="test")
    assert rec["mode"] == "canned" and rec["error"] is None and rec["detail"] == "8 fixed calls"  # 1 + 1 + 3 x 2
    assert rec["steps"] == 2 and rec["step_ms"]["runs"] == [1000 / 256] * 3 and rec["tokens_per_sec"] == 64 * 256
    assert rec["device"] == "abacus" and rec["versions"]["abacus"] == "1.0" and rec["loss"] == 3.0
    assert rec["peak_mem_source"] == "process peak RSS" and rec["peak_mem_bytes"] > 0 and rec["malloc"] == "default"
    assert rec["loss_diff"] is None  # jax_jit, the baseline, did not run
    assert "\ncanned        train    | 1 x abacus | first call 0.50 s | 3.91 ms/step" in capsys.readouterr().out
    with open(tmp_path / "results.json") as f:
        assert json.load(f)["records"] == [rec]
    assert "| canned | train | – | 1 × abacus | 0.50 s | 3.91 (3.91–3.91) | 16,384 | – |" in (
        tmp_path / "results.md").read_text()


@pytest.fixture
def no_mode_runs(monkeypatch):
    def prepare(*args):
        raise AssertionError("bench went on to run the modes instead of refusing")

    monkeypatch.setattr(runner, "_prepare_point", prepare)


def _refused(capsys, *args) -> str:
    code = cli.main(["bench", "--config=tiny", *args])
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err, err
    assert err.startswith("gptjax: error: ") and err.count("\n") == 1, err
    assert out == "", out  # refused before the run's header, before any mode
    return err


def _listing(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, dirs, files in os.walk(root) for n in dirs + files)


@pytest.mark.parametrize("out, needle", [
    ("FILE", "--out=FILE is a file: name a directory"),
    ("FILE/sub/deeper", "--out=FILE/sub/deeper: FILE is a file, so the directory cannot be made"),
    ("/proc/gptjax-bench-out/x", "--out=/proc/gptjax-bench-out/x: cannot write there"),
    ("DIR", "DIR/results.md is not a regular file"),  # a directory where bench would write its results
])
def test_out_that_cannot_be_written_is_refused_first(capsys, tmp_path, no_mode_runs, out, needle):
    (tmp_path / "FILE").write_text("keep me")
    (tmp_path / "DIR" / "results.md").mkdir(parents=True)
    (tmp_path / "DIR" / "results.json").write_text("old results")
    before = _listing(tmp_path)
    err = _refused(capsys, f"--out={out.replace('FILE', str(tmp_path / 'FILE')).replace('DIR', str(tmp_path / 'DIR'))}")
    assert needle.replace("FILE", str(tmp_path / "FILE")).replace("DIR", str(tmp_path / "DIR")) in err, err
    assert "name" in err or "move it" in err  # the fix
    assert _listing(tmp_path) == before and (tmp_path / "FILE").read_text() == "keep me"
    assert (tmp_path / "DIR" / "results.json").read_text() == "old results"
    assert not os.path.exists("/proc/gptjax-bench-out")


def test_out_in_a_directory_that_refuses_writes_leaves_nothing_behind(capsys, tmp_path, no_mode_runs, monkeypatch):
    # The directories --out needs are made for the probe and removed again when the directory refuses the probe
    # (here a read-only file system, simulated: the tests may run as root, whom permissions do not stop).
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(writes.tempfile, "mkstemp", read_only)
    err = _refused(capsys, f"--out={tmp_path / 'new' / 'deeper'}")
    assert f"--out={tmp_path / 'new' / 'deeper'}: cannot write there (Read-only file system)" in err, err
    assert os.listdir(tmp_path) == []


def test_out_in_a_read_only_directory_is_refused(capsys, tmp_path, no_mode_runs):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        try:
            (locked / "probe").mkdir()
            pytest.skip("permissions do not bind here (root with CAP_DAC_OVERRIDE)")
        except PermissionError:
            pass
        for out in (locked, locked / "new"):
            err = _refused(capsys, f"--out={out}")
            assert f"--out={out}: cannot write there (Permission denied)" in err and os.listdir(locked) == [], err
    finally:
        locked.chmod(0o755)


def test_out_check_keeps_what_is_there_and_leaves_nothing(tmp_path):
    (tmp_path / "results.json").write_text("old results")
    (tmp_path / "notes.txt").write_text("mine")
    before = {p: os.stat(tmp_path / p).st_mtime_ns for p in os.listdir(tmp_path)}
    preflight.check_out(str(tmp_path))
    preflight.check_out(str(tmp_path / "a" / "b"))  # can be made: made for the probe, then removed
    assert {p: os.stat(tmp_path / p).st_mtime_ns for p in os.listdir(tmp_path)} == before
    assert (tmp_path / "results.json").read_text() == "old results"


def test_out_that_holds_results_gets_new_ones_and_keeps_the_users_files(stub_modes, capsys, tmp_path):
    (tmp_path / "results.json").write_text("old results")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "a.json").write_text("{}")
    assert cli.main(["bench", "--config=tiny", "--modes=jax_jit,torch_eager", f"--out={tmp_path}"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "results.json", "results.md", "results.png", "runs"]
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "runs" / "a.json").read_text() == "{}"
    with open(tmp_path / "results.json") as f:
        assert [r["mode"] for r in json.load(f)["records"]] == ["jax_jit", "torch_eager"]


@pytest.mark.parametrize("args, key", [
    ((f"--steps={BIG}",), "steps"),
    ((f"--repeats={BIG}",), "repeats"),
    ((f"--warmup={BIG}",), "warmup"),
    ((f"--rounds={BIG}",), "rounds"),
    (("--modes=jax_jit,jax_eager", f"--eager_steps={BIG}"), "eager_steps"),
    ((f"--steps={BIG}", "--repeats=1000"), "steps"),
])
def test_counts_that_cannot_fit_in_memory_are_refused(capsys, tmp_path, no_mode_runs, args, key):
    err = _refused(capsys, *args, f"--out={tmp_path / 'out'}")
    assert err.startswith("gptjax: error: out of memory: ") and err.rstrip().endswith(f"is available: lower --{key}")
    assert os.listdir(tmp_path) == []


def test_memory_check_counts_the_batches_and_results(monkeypatch):
    config = load_config("tiny")  # batch 8 x (16 + 1) tokens
    o = runner.Options(modes=("jax_jit", "jax_eager"), steps=10, eager_steps=3, warmup=0, repeats=1, rounds=3)
    n = 11
    assert preflight.memory_needed(config, o) == n * (8 * 17 * 16 + 256) + 3 * 2 * n * 32
    monkeypatch.setattr(preflight, "host_available_bytes", lambda: preflight.memory_needed(config, o))
    preflight.check_memory(config, o)  # fits exactly
    preflight.check_memory(config, runner.Options(modes=("jax_jit",), steps=10, eager_steps=BIG, warmup=0, repeats=1,
                                                  rounds=3))  # no jax_eager: its steps make no calls
    with pytest.raises(UserError, match=r"--steps=12 makes 13 calls per mode .* MiB is available: lower --steps$"):
        preflight.check_memory(config, runner.Options(modes=o.modes, steps=12, warmup=0, repeats=1, rounds=1))
    monkeypatch.setattr(preflight, "host_available_bytes", lambda: None)  # unknown: nothing is refused
    preflight.check_memory(config, runner.Options(steps=BIG, repeats=BIG))


@pytest.mark.parametrize("args, needle", [
    (("--modes=jax_jit", "--mesh=dp:3"), "--mesh=dp:3 applies to the jax_jit_dp mode only: add it to --modes"),
    (("--modes=jax_jit,jax_eager", "--step_impl=pmap"), "--step_impl=pmap applies to the jax_jit_dp mode only"),
    (("--modes=jax_jit_dp", "--workload=forward", "--mesh=dp:1"), "--mesh=dp:1 applies to --workload=train only"),
])
def test_mesh_without_the_mode_it_lays_out_is_refused(capsys, no_mode_runs, args, needle):
    assert needle in _refused(capsys, *args)


@pytest.mark.parametrize("args", [("--modes=jax_jit,jax_jit_dp", "--mesh=dp:1", "--step_impl=shard_map"),
                                  ("--modes=jax_jit", "--mesh=", "--step_impl=sharded")])  # the defaults: no change
def test_mesh_with_the_mode_it_lays_out_runs(stub_modes, capsys, args):
    assert cli.main(["bench", "--config=tiny", *args]) == 0, capsys.readouterr().err
    assert stub_modes["ran"] == args[0].removeprefix("--modes=").split(",")


def test_mode_variants_run_side_by_side_and_the_best_of_each_framework_is_named(monkeypatch, capsys, tmp_path):
    """jax_jit_dp[matmul=xla] runs jax_jit_dp with that setting in place of the command's, under its own name; the
    report names each framework's fastest mode among those run, and their ratio."""
    specs, ms = {}, {"jax_jit": 30.0, "jax_jit_dp[matmul=xla,dtype=float32]": 20.0, "torch_eager": 40.0,
                     "torch_compile[dtype=bfloat16]": 25.0}

    def run_mode(mode, spec, tmp):
        specs[mode] = spec
        r = _result(spec["mode"], [3.0, 2.9])
        return r | {"step_s_runs": [ms[mode] / 1e3], "dtype": spec["config"]["train"]["dtype"],
                    "matmul": spec["config"]["train"]["matmul"]}, None

    monkeypatch.setattr(runner, "_prepare_point", lambda config, o, names, tmp, n: (config, {}, 1000))
    monkeypatch.setattr(runner, "_run_mode", run_mode)
    o = runner.parse_options({"modes": ",".join(ms), "out": str(tmp_path)})
    assert o.modes == tuple(ms)
    records = runner.run(load_config("tiny"), o, command="test")
    assert [r["mode"] for r in records] == list(ms)
    assert {m: s["mode"] for m, s in specs.items()} == {m: m.split("[")[0] for m in ms}  # the table's mode runs
    train = {m: s["config"]["train"] for m, s in specs.items()}
    assert train["jax_jit_dp[matmul=xla,dtype=float32]"]["matmul"] == "xla"
    assert train["torch_compile[dtype=bfloat16]"]["dtype"] == "bfloat16"
    assert train["jax_jit"]["matmul"] == train["torch_eager"]["matmul"] == "auto"  # the command's
    line = ("best of each framework (train): jax_jit_dp[matmul=xla,dtype=float32] (float32, xla) 20.00 ms/step "
            "against torch_compile[dtype=bfloat16] (bfloat16) 25.00: gptjax 1.25× PyTorch's best")
    assert line in capsys.readouterr().out and line in (tmp_path / "results.md").read_text()


def test_a_variants_mesh_keeps_its_commas():
    assert modes.settings("jax_jit_dp[mesh=dp:2,fsdp:1,dtype=float32]") == {"mesh": "dp:2,fsdp:1", "dtype": "float32"}
    assert runner.parse_options({"modes": "jax_jit,jax_jit_dp[mesh=dp:2,fsdp:1],torch_eager"}).modes == (
        "jax_jit", "jax_jit_dp[mesh=dp:2,fsdp:1]", "torch_eager")


@pytest.mark.parametrize("modes_arg, needle", [
    ("jax_jit,jax_jit[scan_layers=maybe]", "scan_layers"),  # refused before jax_jit runs
    ("jax_jit_dp[step_impl=pmap] --workload=forward", "step_impl applies to --workload=train only"),
    ("jax_jit[matmul=blas]", "--matmul=blas: use one of auto, xla, mkl"),
    ("torch_eager[matmul=mkl]", "keys of torch_eager: dtype"),
    ("jax_jit[step_impl=pmap]", "step_impl lays out a data-parallel step: jax_jit_dp[step_impl=...]"),
    ("jax_jit[dtype]", "write settings as key=value"),
    ("jax_jitt[dtype=float32]", "unknown mode 'jax_jitt[dtype=float32]'"),
])
def test_bad_mode_variants_are_one_line(capsys, no_mode_runs, modes_arg, needle):
    assert needle in _refused(capsys, *f"--modes={modes_arg}".split())
