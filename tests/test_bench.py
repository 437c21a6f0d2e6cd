"""The benchmark harness: every mode trains the same model on the same batches, the records, sweeps, bad input.

No test here asserts a time: the figures are benchmarks, recorded by commands, not checked by tests.
"""

import json
import os
import sys

import pytest
from conftest import run_cli

from gptjax import cli
from gptjax.bench import flops, report
from gptjax.config import ModelConfig

# torch_fast: test_bfloat16_modes_compute_in_it; hf_eager: transformers' GPT-2, its biases held at zero (tiny has none)
ALL = "jax_jit,jax_jit_dp,jax_eager,torch_eager,torch_compile,hf_eager"
STEPS = ("--steps=2", "--eager_steps=2", "--warmup=1", "--repeats=2")  # every_mode's calls: 6 train steps


def _bench(out, shakespeare, *args):
    r = run_cli("bench", "--config=tiny", f"--input={shakespeare}", f"--out={out}", *args)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    with open(os.path.join(out, "results.json")) as f:
        return r.stdout, json.load(f)


@pytest.fixture(scope="module")
def every_mode(tmp_path_factory, shakespeare):
    out = str(tmp_path_factory.mktemp("bench-all"))
    stdout, results = _bench(out, shakespeare, f"--modes={ALL}", *STEPS)
    return out, stdout, results


def test_every_mode_trains_the_same_model(every_mode):
    _, stdout, results = every_mode
    records = results["records"]
    assert [r["mode"] for r in records] == ALL.split(",")
    assert all(r["error"] is None for r in records), [r["error"] for r in records]
    # 6 train steps from the same weights on the same batches: the same losses in every mode and framework.
    base = records[0]
    assert base["loss_diff"] is None and 3.0 < base["loss"] < 4.5
    for r in records[1:]:
        assert r["loss_diff"] is not None and r["loss_diff"] < 1e-5, (r["mode"], r["loss_diff"])
        assert abs(r["loss"] - base["loss"]) < 1e-5 and not r["loss_flag"]
    assert {r["mode"]: r["devices"] for r in records}["jax_jit_dp"] == 2  # the tiny batch of 8 over both cores
    detail = {r["mode"]: r["detail"] for r in records}
    assert detail["torch_compile"].startswith("torch.compile (inductor")
    assert detail["hf_eager"] == "transformers GPT2LMHeadModel, eager, SDPA attention"
    for mode in ALL.split(","):  # one line per mode as it finished
        assert sum(line.startswith(mode + " ") for line in stdout.splitlines()) == 1, mode


def test_results_json_schema(every_mode):
    out, _, results = every_mode
    assert set(results) == {"command", "fields", "records"} and results["fields"] == report.FIELDS
    for r in results["records"]:
        assert set(r) == set(report.FIELDS), set(r) ^ set(report.FIELDS)
        ms = r["step_ms"]
        assert 0 < ms["min"] <= ms["median"] <= ms["max"] and len(ms["runs"]) == r["repeats"] == 2
        assert r["tokens_per_step"] == 8 * 16 and r["tokens_per_sec"] == pytest.approx(128 / (ms["median"] / 1e3))
        assert r["first_call_s"] > 0 and r["peak_mem_bytes"] > 10 * 2**20 and r["mfu"] is None  # none on a CPU
        assert r["flops_per_token"] == flops.flops_per_token(ModelConfig(**r["config"]["model"]), r["params"])
        # --dtype=auto on a CPU is float32; train records have no sampler
        assert r["shape"]["batch_size"] == 8 and r["dtype"] == "float32" and r["host"]["cores"] >= 1
        assert r["sampler"] is None
        assert r["steps"] == 2 and r["warmup"] == 1 and "python" in r["versions"]
        # every mode's process gets the malloc settings every gptjax command applies
        assert r["malloc"] == ("reuse_freed_memory" if sys.platform.startswith("linux") else "default")
    torch_rec = results["records"][3]
    assert torch_rec["threads"]["intra_op"] == torch_rec["host"]["cores"]  # torch threads = cores
    with open(os.path.join(out, "results.md")) as f:
        md = f.read()
    assert md.count("| train |") == 6 and "vs jax_jit" in md and "1.00×" in md
    assert "Host malloc: reuse_freed_memory" in md or not sys.platform.startswith("linux")
    with open(os.path.join(out, "results.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_bfloat16_modes_compute_in_it(every_mode, tmp_path, shakespeare):
    # every_mode's 6 train steps again, with bfloat16 matmuls: JAX's Compute, torch.compile + SDPA + autocast.
    stdout, results = _bench(str(tmp_path), shakespeare, "--modes=jax_jit,torch_fast", "--dtype=bfloat16", *STEPS)
    fp32 = {r["mode"]: r for r in every_mode[2]["records"]}
    records = results["records"]
    assert [r["mode"] for r in records] == ["jax_jit", "torch_fast"]
    for r, same_framework in zip(records, ("jax_jit", "torch_compile")):
        assert r["error"] is None and r["dtype"] == "bfloat16" and r["config"]["train"]["dtype"] == "bfloat16"
        # The float32 modes agree to 1e-5 (test_every_mode_trains_the_same_model): bfloat16 rounding moves the
        # loss further than that, yet not far.
        assert 1e-5 < abs(r["loss"] - fp32[same_framework]["loss"]) < 0.02, (r["mode"], r["loss"])
    fast = records[1]
    assert fast["detail"] == "torch.compile (inductor, mode=default), SDPA attention, autocast bfloat16"
    assert fast["loss_diff"] < report.BF16_LOSS_TOLERANCE and not fast["loss_flag"]
    with open(tmp_path / "results.md") as f:
        assert "; bfloat16; " in f.read()


def test_record_reports_the_modes_dtype_and_its_mfu():
    from gptjax.bench import runner
    from gptjax.bench.protocol import Result
    from gptjax.config import load_config

    config = load_config("tiny", {"dtype": "auto", "vocab_size": 65})
    c, n = config.model, 26_816
    res = {"step_s_runs": [0.01, 0.02, 0.03], "tokens_per_call": 128, "detail": "jax.jit", "dtype": "bfloat16",
           "device": "NVIDIA H100 80GB HBM3", "devices": 1, "threads": None, "versions": {}, "first_call_s": 1.0,
           "peak_mem_bytes": 1, "peak_mem_source": "x", "losses": [3.0]}
    rec = runner._record("jax_jit", None, runner.Options(), {}, config, n, Result(**res), None, None, {}, 20)
    assert rec["dtype"] == "bfloat16"  # as the mode resolved --dtype=auto on its device, not the config's "auto"
    assert rec["mfu"] == pytest.approx(flops.flops_per_token(c, n) * 128 / 0.02 / 989.4e12)  # bfloat16's peak
    failed = runner._record("jax_jit", None, runner.Options(), {}, config, n, None, "boom", None, {}, 20)
    assert failed["dtype"] == "auto" and failed["mfu"] is None


def test_mfu_uses_nanogpts_formula():
    c = ModelConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    n = 123_653_376  # nanoGPT's GPT-2 124M with vocab 50304, without position embeddings
    assert flops.flops_per_token(c, n) == 6 * n + 12 * 12 * 12 * 64 * 1024
    assert flops.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4e12
    assert flops.peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert flops.peak_flops("NVIDIA A100-SXM4-40GB", "float32") == 156e12
    assert flops.peak_flops("cpu", "float32") is None
    tps = 100_000.0
    assert flops.mfu("train", c, n, tps, "NVIDIA H100 80GB HBM3", "bfloat16") == pytest.approx(
        (6 * n + 12 * 12 * 12 * 64 * 1024) * tps / 989.4e12)
    assert flops.mfu("forward", c, n, tps, "NVIDIA H100 80GB HBM3", "bfloat16") == pytest.approx(
        (6 * n + 12 * 12 * 12 * 64 * 1024) / 3 * tps / 989.4e12)
    assert flops.mfu("train", c, n, tps, "cpu") is None


@pytest.mark.parametrize("args, needle", [
    (("--modes=jax_jit,torch_slow",), "torch_slow"),
    (("--modes=",), "--modes"),
    (("--workload=backward",), "--workload=backward"),
    (("--sweep=dropout:0,1",), "--sweep=dropout:0,1"),
    (("--sweep=batch_size:1,x",), "integers"),
    (("--sweep=batch_size:0,4",), "at least 1"),
    (("--steps=0",), "--steps=0"),
    (("--steps=-1",), "--steps=-1"),
    (("--repeats=two",), "--repeats=two"),
    (("--sweep=n_embd:32,33",), "n_embd=33 is not divisible"),
    (("--workload=generate", "--sampler=kv,beam"), "beam"),
    (("--workload=generate", "--sampler=",), "--sampler"),
    (("--sampler=kv",), "--workload=generate"),
    (("--dtype=float16",), "--dtype=float16"),
    # found by the mode's own process, on the device it runs on: still one line and status 2
    (("--modes=jax_jit", "--attention=cudnn", "--steps=1", "--repeats=1", "--warmup=0"), "--attention=cudnn needs"),
    (("--modes=hf_eager", "--workload=generate", "--sampler=kv", "--steps=1", "--repeats=1", "--warmup=0"),
     "hf_eager samples by re-running the window"),
    (("--modes=hf_eager", "--pos_encoding=rope"), "a GPT with learned positions"),
])
def test_bad_bench_input_is_one_line(capsys, shakespeare, args, needle):
    code = cli.main(["bench", "--config=tiny", f"--input={shakespeare}", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("gptjax: error:") and "\n" not in err and needle in err, err


def test_without_torch_the_default_modes_are_jax_only(monkeypatch):
    from gptjax.bench import runner
    from gptjax.errors import UserError

    assert runner.parse_options({}).modes == runner.MODES  # with torch: every mode, torch_fast among them
    assert "torch_fast" in runner.MODES and "hf_eager" not in runner.MODES  # transformers' modes when named
    monkeypatch.setattr(runner.util, "find_spec", lambda name: None)
    assert runner.parse_options({}).modes == ("jax_jit", "jax_jit_dp", "jax_eager")
    with pytest.raises(UserError, match="need PyTorch"):
        runner.parse_options({"modes": "jax_jit,torch_eager"})
