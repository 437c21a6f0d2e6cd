"""The benchmark harness without running a mode: the timing loop on a fake clock, the loss comparison on stubbed mode
results."""

import pytest

from gptjax.bench import runner, worker
from gptjax.config import load_config


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
    first, runs, outs = worker.time_calls(clock.call, clock.sync, steps=4, warmup=2, repeats=3, sync_each=sync_each,
                                          clock=clock)
    n = worker.n_calls(4, 2, 3)
    assert n == 15 and clock.calls == list(range(n)) and outs == [f"loss {i}" for i in range(n)]
    assert first == 1 / 64
    # calls 0, then 1-2 (warm-up, untimed), then 3-6, 7-10 and 11-14: each repeat's seconds over its 4 calls
    assert runs == [(4 + 5 + 6 + 7) / 64 / 4, (8 + 9 + 10 + 11) / 64 / 4, (12 + 13 + 14 + 15) / 64 / 4]
    # ... which the record gives in milliseconds per call
    res = dict(_result("jax_jit", []), step_s_runs=runs, first_call_s=first, tokens_per_call=128)
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
    log = {"losses": {}, "ran": []}

    def prepare(config, o, modes, tmp):
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
