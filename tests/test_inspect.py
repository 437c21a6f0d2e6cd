"""The GPU program, read without a GPU (gptjax.bench.inspect): the bf16 train step compiled for an abstract H100 has
no float32 GEMM, no logits-sized float32 buffer, no scatter of the logits' size and only aligned GEMM dimensions, on
the cuDNN attention path and on the einsum path (attention dropout) alike. Skipped where jax's CUDA plugin is not
installed (`pip install -e ".[cuda]"`; .ci/run installs it)."""

import json
import os
import subprocess
import sys

import pytest

from gptjax import gpu
from gptjax.bench import hlo, inspect
from gptjax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_plugin = pytest.mark.skipif(not gpu.cuda_plugin_installed(),
                                  reason="jax's CUDA plugin is not installed (pip install -e '.[cuda]')")
# GPT-2 small's widths and vocabulary (50304) at a depth of 1: the LM head and loss as the gpt2 preset has them.
SHAPE = ["--config=gpt2", "--n_layer=1", "--batch_size=4", "--gradient_accumulation_steps=1", "--dtype=bfloat16"]


def _inspect(tmp_path, *args) -> list[dict]:
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    p = subprocess.run([sys.executable, "-m", "gptjax.bench.inspect", "--target=h100", *args, f"--json={out}"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "### train on NVIDIA H100 80GB HBM3" in p.stdout
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """The train step with cuDNN attention (no dropout), and with the einsum path (dropout 0.1) with its estimate."""
    tmp = tmp_path_factory.mktemp("inspect")
    cudnn = _inspect(tmp, *SHAPE, "--dropout=0", "--programs=train")
    einsum = _inspect(tmp, *SHAPE, "--dropout=0.1", "--programs=train,estimate")
    return {"cudnn": cudnn[0], "einsum": einsum[0], "estimate": einsum[1]}


@needs_plugin
@pytest.mark.parametrize("path", ["cudnn", "einsum"])
def test_the_bfloat16_step_has_no_float32_gemm_logits_or_scatter(reports, path):
    r = reports[path]
    assert r["compute"]["dtype"] == "bfloat16"
    assert r["compute"]["attention"] == path
    tokens, vocab = 4 * 1024, 50304
    gemms = r["gemms"]
    # Every GEMM is there: per layer 4 forward and 8 backward in the projections, the head's 3; on the einsum path
    # also attention's 2 forward and 4 backward (cuDNN runs those inside its own calls).
    per_layer = 12 + (6 if path == "einsum" else 0)
    assert sum(g["count"] for g in gemms) == per_layer + 3, gemms
    for g in gemms:
        assert g["where"].startswith("__cublas"), g  # gptjax's GPU flags (gpu.GPU_XLA_FLAGS): no Triton GEMMs
        assert "f32" not in (g["lhs"][:3], g["rhs"][:3]), g  # bf16 operands, attention's scores included
        assert "dimension not a multiple of 8" not in g["flags"] and not any("padded" in f for f in g["flags"]), g
    head = [g for g in gemms if "vocabulary-sized" in g["flags"]]
    assert sum(g["count"] for g in head) == 3 and all(g["lhs"].startswith("bf16") for g in head), head
    assert r["logits_sized_f32"] == [], r["logits_sized_f32"]
    big = [s for s in r["scatters"] if _elements(s["out"]) >= tokens * vocab // 2]
    assert big == [], big  # the loss's backward: a select fused with the softmax's, not a scatter
    assert r["kernels"] > 0 and r["roofline_ms"] > 0 and r["compile_s"] > 0


@needs_plugin
def test_the_estimate_runs_cudnn_attention_without_dropout(reports):
    """Training with attention dropout runs the einsum path; its loss estimates, with none, run cuDNN's."""
    r = reports["estimate"]
    assert r["compute"]["attention"] == "cudnn" and r["kernel_kinds"].get("__cudnn$fmhaSoftmax", 0) == 1


def _elements(array) -> int:
    n = 1
    for d in array[1]:
        n *= d
    return n


def test_the_hlo_reader_finds_gemms_scatters_and_buffers():
    """The reader on a hand-written program: a cuBLAS call's operands, a fused dot's FLOPs, a scatter, the
    float32 buffer of tokens x vocabulary elements, the kernels launched (a loop body's, its trip count times), and
    the bytes of an in-place update and of a slice."""
    text = """HloModule m

%fused_dot (p0: bf16[64,32], p1: bf16[32,100]) -> f32[64,100] {
  %p0 = bf16[64,32]{1,0} parameter(0)
  %p1 = bf16[32,100]{1,0} parameter(1)
  ROOT %d = f32[64,100]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_scatter (a: f32[64,100], i: s32[64,1], u: f32[64]) -> f32[64,100] {
  %a = f32[64,100]{1,0} parameter(0)
  %i = s32[64,1]{1,0} parameter(1)
  %u = f32[64]{0} parameter(2)
  ROOT %s = f32[64,100]{1,0} scatter(%a, %i, %u), metadata={op_name="take_along_axis"}
}

%fused_dus (buf: f32[6,64], upd: f32[1,64], k: s32[]) -> f32[6,64] {
  %buf = f32[6,64]{1,0} parameter(0)
  %upd = f32[1,64]{1,0} parameter(1)
  %k = s32[] parameter(2)
  %zero = s32[] constant(0)
  ROOT %put = f32[6,64]{1,0} dynamic-update-slice(%buf, %upd, %k, %zero)
}

%fused_ds (src: f32[6,64], j: s32[]) -> f32[1,64] {
  %src = f32[6,64]{1,0} parameter(0)
  %j = s32[] parameter(1)
  %zero.1 = s32[] constant(0)
  ROOT %take = f32[1,64]{1,0} dynamic-slice(%src, %j, %zero.1), dynamic_slice_sizes={1,64}
}

%body (t: (s32[], bf16[64,32])) -> (s32[], bf16[64,32]) {
  %t = (s32[], bf16[64,32]{1,0}) parameter(0)
  %x = bf16[64,32]{1,0} get-tuple-element(%t), index=1
  %c = bf16[64,32]{1,0} copy(%x)
  %n = s32[] get-tuple-element(%t), index=0
  ROOT %r = (s32[], bf16[64,32]{1,0}) tuple(%n, %c)
}

ENTRY %main (x: bf16[64,32], w: bf16[100,32], w2: bf16[32,100], i: s32[64,1]) -> f32[64,100] {
  %x = bf16[64,32]{1,0} parameter(0)
  %w = bf16[100,32]{1,0} parameter(1)
  %w2 = bf16[32,100]{1,0} parameter(2)
  %i = s32[64,1]{1,0} parameter(3)
  %g = (bf16[64,100]{1,0}, s8[4]{0}) custom-call(%x, %w), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["1"]}}}
  %f = f32[64,100]{1,0} fusion(%x, %w2), kind=kCustom, calls=%fused_dot, backend_config={"fusion_backend_config":{"kind":"__triton_nested_gemm_fusion"}}
  %u = f32[64]{0} parameter(4)
  %s = f32[64,100]{1,0} fusion(%f, %i, %u), kind=kInput, calls=%fused_scatter
  %stack = f32[6,64]{1,0} parameter(5)
  %row = f32[1,64]{1,0} parameter(6)
  %at = s32[] parameter(7)
  %dus = f32[6,64]{1,0} fusion(%stack, %row, %at), kind=kLoop, calls=%fused_dus
  %ds = f32[1,64]{1,0} fusion(%dus, %at), kind=kLoop, calls=%fused_ds
  %z = s32[] constant(0)
  %t = (s32[], bf16[64,32]{1,0}) tuple(%z, %x)
  %l = (s32[], bf16[64,32]{1,0}) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %o = f32[64,100]{1,0} copy(%s)
}
"""  # noqa: E501
    a = hlo.analyse(text, vocab_sizes=(100,), tokens=64)
    gemms = {g["where"]: g for g in a["gemms"]}
    assert gemms["__cublas$lt$matmul"]["lhs"] == ("bf16", (64, 32))
    assert gemms["__cublas$lt$matmul"]["rhs"] == ("bf16", (100, 32))
    assert gemms["__cublas$lt$matmul"]["flops"] == 2 * 64 * 100 * 32
    assert gemms["__triton_nested_gemm_fusion"]["out"] == ("f32", (64, 100))
    assert [s["op_name"] for s in a["scatters"]] == ["take_along_axis"]
    assert a["kernels"] == {"__cublas$lt$matmul": 1, "__triton_nested_gemm_fusion": 1, "kInput": 1, "kLoop": 2,
                            "copy": 2}
    assert {x["name"] for x in a["logits_sized_f32"]} == {"f", "s", "o"}
    assert {x["name"]: x["runs"] for x in a["launches"]} == {"g": 1, "f": 1, "s": 1, "dus": 1, "ds": 1, "o": 1,
                                                              "c": 3}
    moved = {x["name"]: x["bytes"] for x in a["launches"]}
    # an in-place update moves the row (read and written) and its index, not the 6-row buffer; a slice, likewise
    assert moved["dus"] == 256 + 4 + 256 and moved["ds"] == 256 + 4 + 256
    assert moved["c"] == 2 * 64 * 32 * 2 and moved["f"] == 64 * 32 * 2 + 32 * 100 * 2 + 64 * 100 * 4
    assert moved["g"] == 64 * 32 * 2 + 100 * 32 * 2 + 64 * 100 * 2  # cuBLAS's s8 workspace is no traffic
    assert [x["shape"] for x in a["launches"] if x["name"] == "g"] == ["(bf16[64,100], s8[4])"]
    dot_flops = {x["name"]: x["flops"] for x in a["launches"]}
    assert dot_flops["f"] == 2 * 64 * 100 * 32 and dot_flops["g"] == 2 * 64 * 100 * 32 and dot_flops["s"] == 0


def test_bad_options_are_one_line(tmp_path, monkeypatch):
    for args, words in ((["--target=v100"], "--target=v100: use one of h100, h200, a100"),
                        (["--programs=train,backward"], "--programs=train,backward"),
                        (["--config=shakespeare_char", "--input=/x.txt"], "pass --vocab_size=N"),
                        ([f"--json={tmp_path}/no/such/dir/r.json"], "name a file in a directory that exists")):
        p = subprocess.run([sys.executable, "-m", "gptjax.bench.inspect", *args], capture_output=True, text=True,
                           cwd=ROOT, timeout=120)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and words in p.stderr, p.stderr
    monkeypatch.setattr(gpu, "cuda_plugin_installed", lambda: False)
    with pytest.raises(UserError, match=r'pip install "gptjax\[cuda\]"'):
        inspect.topology("h100")


def test_a_vocabulary_xla_pads_is_flagged():
    """A vocabulary that is no multiple of 8 reaches cuBLAS padded by XLA (a copy a step): the flags say so."""
    g = {"lhs": "bf16[16384,768]", "rhs": "bf16[768,50264]", "dims": [16384, 768, 50264]}
    assert inspect._gemm_flags(g, 50257) == ["vocabulary-sized", "vocabulary padded by XLA (50257 -> 50264: a copy "
                                                                 "a step)"]
    assert inspect._gemm_flags(dict(g, dims=[16384, 768, 50304]), 50304) == ["vocabulary-sized"]


def test_an_absent_gpu_starts_jax_on_the_cpu_without_a_traceback():
    """With the CUDA plugin installed and no NVIDIA driver, jax prints the plugin's failed start (a traceback)
    before it falls back to the CPU; importing gptjax first sets JAX_PLATFORMS=cpu, so it starts quietly."""
    if not gpu.cuda_plugin_installed() or gpu.nvidia_driver_present():
        pytest.skip("needs the CUDA plugin installed and no NVIDIA driver")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    code = "import jax; print(jax.devices()[0].platform)"
    bare = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    if "Traceback" not in bare.stderr:
        pytest.skip("this jax starts quietly without a GPU by itself")
    quiet = subprocess.run([sys.executable, "-c", "import gptjax; " + code], capture_output=True, text=True,
                           env=env, timeout=120)
    assert quiet.stdout.strip() == "cpu" and "Traceback" not in quiet.stderr, quiet.stderr
