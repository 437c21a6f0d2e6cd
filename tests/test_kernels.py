"""The oneMKL matmul kernel (gptjax/kernels): the same products as XLA's dots, forward and backward, in both dtypes;
XLA's dots when it cannot load; and the `auto` matmul and dtype choices per host."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import jaxpr_eqns

from gptjax import compute, host, kernels
from gptjax.compute import resolve_compute
from gptjax.config import Config, ModelConfig
from gptjax.errors import UserError
from gptjax.ops import linear

CFG = ModelConfig(vocab_size=37, block_size=16, n_layer=2, n_head=4, n_embd=32, dropout=0.0, bias=True,
                  tie_weights=False)
needs_kernel = pytest.mark.skipif(not kernels.available(), reason=f"kernel not built here: {kernels.load()[1]}")


def _rand(shape, dtype=jnp.float32, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _close(got, want, dtype):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    scale = float(np.abs(want).max()) or 1.0
    # float32: the same sums in another order; bfloat16: one rounding of the output against XLA's (and XLA's
    # own bfloat16 accumulation), a few units of bfloat16's 2^-8 at the largest output
    bound = 2e-6 if dtype == jnp.float32 else 2e-2
    assert np.abs(got - want).max() <= bound * scale, (np.abs(got - want).max(), scale)


@needs_kernel
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("lead", [(1,), (3,), (127,), (2, 3, 127)])
def test_linear_on_the_kernel_equals_xla_forward_and_backward(dtype, lead):
    x, w = _rand((*lead, 48), dtype, 1), _rand((48, 40), dtype, 2)
    g = _rand((*lead, 40), jnp.float32, 3)

    def f(matmul):
        def loss(x, w):
            return jnp.sum(linear(x, w, matmul).astype(jnp.float32) * g)
        return jax.jit(jax.value_and_grad(loss, (0, 1)))(x, w)

    (lx, (dx_x, dw_x)), (lk, (dx_k, dw_k)) = f("xla"), f("mkl")
    assert dx_k.dtype == x.dtype and dw_k.dtype == w.dtype
    _close(lk, lx, dtype)
    _close(dx_k, dx_x, dtype)
    _close(dw_k, dw_x, dtype)
    _close(jax.jit(lambda x, w: linear(x, w, "mkl"))(x, w), x @ w, dtype)
    assert compute.describe_matmul(compute.Compute(matmul="mkl")).startswith("matmuls on the oneMKL kernel (oneMKL")


@needs_kernel
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
def test_gemm_with_batch_dims_and_transposes(dtype, trans_a, trans_b):
    a = _rand((2, 3, 127, 5) if trans_a else (2, 3, 5, 127), dtype, 4)
    b = _rand((2, 3, 33, 127) if trans_b else (2, 3, 127, 33), dtype, 5)
    want = jnp.matmul(jnp.swapaxes(a, -1, -2) if trans_a else a, jnp.swapaxes(b, -1, -2) if trans_b else b,
                      preferred_element_type=jnp.float32)
    got = jax.jit(lambda a, b: kernels.gemm(a, b, trans_a, trans_b))(a, b)
    assert got.shape == (2, 3, 5, 33) and got.dtype == jnp.float32
    _close(got, want, jnp.float32)  # float32 accumulation on both sides, bfloat16 inputs included
    shared = b[0, 0]  # a matrix for every batch entry
    _close(kernels.gemm(a, shared, trans_a, trans_b),
           jnp.matmul(jnp.swapaxes(a, -1, -2) if trans_a else a, shared.T if trans_b else shared,
                      preferred_element_type=jnp.float32), jnp.float32)


@needs_kernel
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("m,n", [(301, 200), (200, 301)])
def test_gemm_split_over_the_thread_pool(dtype, trans_a, trans_b, m, n):
    """Products big enough to be cut into pieces (along M, or N when it is longer), odd sizes so a piece is short."""
    a = _rand((129, m) if trans_a else (m, 129), dtype, 6)
    b = _rand((n, 129) if trans_b else (129, n), dtype, 7)
    want = jnp.matmul(a.T if trans_a else a, b.T if trans_b else b, preferred_element_type=jnp.float32)
    _close(jax.jit(lambda a, b: kernels.gemm(a, b, trans_a, trans_b))(a, b), want, jnp.float32)


@needs_kernel
def test_gemm_of_empty_operands_and_a_shared_matrix_split_over_the_pool():
    """Zero rows, columns or contraction; and a batch of one against a shared B, big enough to be cut. (A zero batch
    never reaches the kernel: XLA drops the call, so gemm.cc's guard for it has no test that could fail.)"""
    f = jax.jit(kernels.gemm)
    assert f(jnp.zeros((0, 4)), jnp.zeros((4, 5))).shape == (0, 5)
    assert f(jnp.zeros((3, 4)), jnp.zeros((4, 0))).shape == (3, 0)
    np.testing.assert_array_equal(f(jnp.ones((3, 0)), jnp.ones((0, 5))), np.zeros((3, 5), np.float32))
    a, b = _rand((1, 301, 129), jnp.float32, 8), _rand((129, 200), jnp.float32, 9)
    _close(f(a, b), jnp.matmul(a, b), jnp.float32)


@needs_kernel
def test_a_gpt_step_on_the_kernel_matches_xla():
    """The whole model: the loss and every gradient of a GPT on the kernel against XLA's dots, float32."""
    from gptjax import evaluate, model

    c = CFG
    x = jnp.asarray(np.random.default_rng(0).integers(0, c.vocab_size, (3, c.block_size)), jnp.int32)

    def grads(matmul):
        m = model.create(c, 0, compute.Compute(matmul=matmul))
        graphdef, params = model.split(m)
        return jax.jit(jax.value_and_grad(lambda p: evaluate.loss_fn(graphdef, p, x, x, None)))(params)

    (lx, gx), (lk, gk) = grads("xla"), grads("mkl")
    assert abs(float(lk) - float(lx)) <= 1e-5 * abs(float(lx))
    for a, b in zip(jax.tree.leaves(gk), jax.tree.leaves(gx)):
        _close(a, b, jnp.float32) if np.abs(np.asarray(b)).max() > 1e-6 else None


@pytest.fixture
def no_mkl(monkeypatch, tmp_path):
    """A machine without oneMKL: nothing on any library path, nothing built in the cache."""
    monkeypatch.setattr(kernels, "_lib_dirs", lambda: [str(tmp_path)])
    monkeypatch.setenv("GPTJAX_KERNEL_DIR", str(tmp_path))
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setattr(host, "cpu", lambda: {"vendor": "GenuineIntel", "name": "test", "flags": frozenset()})


def test_without_the_library_auto_runs_on_xla_and_mkl_is_one_line(no_mkl):
    from gptjax import evaluate, model

    ok, why = kernels.load()
    assert not ok and "oneMKL" in why and "gptjax[mkl]" in why
    c = resolve_compute(device=jax.devices("cpu")[0], matmul="auto")
    assert c.matmul == "xla"
    # train's opening line says which it runs on, and why not the kernel
    assert compute.describe_matmul(c) == f"XLA's matmuls (no kernel: {why})"
    with pytest.raises(UserError, match="--matmul=mkl: the kernel cannot run here: oneMKL") as e:
        resolve_compute(device=jax.devices("cpu")[0], matmul="mkl")
    assert "\n" not in str(e.value)
    c = CFG
    graphdef, params = model.split(model.create(c, 0, compute.compute_of(Config(model=c))))
    x = jnp.zeros((2, c.block_size), jnp.int32)
    assert np.isfinite(float(evaluate.loss_fn(graphdef, params, x, x, None)))


@pytest.mark.parametrize("vendor,flags,loads,want", [
    ("GenuineIntel", {"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}, True, ("mkl", "bfloat16")),
    ("GenuineIntel", {"avx512f", "avx512_bf16"}, True, ("mkl", "float32")),  # AVX-512 BF16 without AMX: slower
    ("GenuineIntel", {"avx512f", "amx_bf16"}, False, ("xla", "float32")),  # no kernel: XLA's bf16 is slower
    ("AuthenticAMD", {"avx512f", "avx512_bf16"}, True, ("xla", "float32")),
])
def test_auto_matmul_and_dtype_per_host(monkeypatch, vendor, flags, loads, want):
    monkeypatch.setattr(host, "cpu", lambda: {"vendor": vendor, "name": "test", "flags": frozenset(flags)})
    monkeypatch.setattr(kernels, "load", lambda: (loads, "test"))
    got = resolve_compute(device=jax.devices("cpu")[0], matmul="auto")
    assert (got.matmul, got.dtype) == want
    # an explicit dtype is kept whatever the host
    assert resolve_compute("float32", device=jax.devices("cpu")[0], matmul="auto").dtype == "float32"


SPLIT_SCRIPT = """
import hashlib, os, re, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from gptjax import kernels
from gptjax.ops import linear
assert kernels.load()[0]
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("dp", "fsdp"))
x = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal((8, 16, 48)), jnp.float32),
                   NamedSharding(mesh, P(("dp", "fsdp"))))
w = jax.device_put(jnp.asarray(np.random.default_rng(1).standard_normal((48, 40)), jnp.float32),
                   NamedSharding(mesh, P("fsdp")))

def loss(x, w, matmul):
    with kernels.split_over(mesh):
        return jnp.sum(jnp.sin(linear(x, w, matmul)))

f = jax.jit(jax.value_and_grad(loss, (0, 1)), static_argnums=2)
for a, b in zip(jax.tree.leaves(f(x, w, "xla")), jax.tree.leaves(f(x, w, "mkl"))):
    np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-6)
text = f.lower(x, w, "mkl").as_text()
compiled = f.lower(x, w, "mkl").compile().as_text()
print("CALLS", sorted(re.findall(r"f32\\[(\\d+,\\d+)\\]\\{1,0\\} custom-call", compiled)))
print("HLO", hashlib.sha256(text.encode()).hexdigest())
"""


@needs_kernel
def test_on_a_mesh_each_device_multiplies_its_rows_and_the_program_is_the_same_in_every_process():
    """Forward, input gradient and weight gradient each on a device's 32 of the 128 rows (not the whole product on
    every device), equal to XLA's; and the lowered program is the same in two processes, so the persistent
    compilation cache can find it (jax's custom_partitioning names a Python object by id(): it never could)."""
    import subprocess
    import sys

    runs = [subprocess.run([sys.executable, "-c", SPLIT_SCRIPT], capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    calls = [ln for ln in runs[0].stdout.splitlines() if ln.startswith("CALLS")]
    assert calls == ["CALLS ['32,40', '32,48', '48,40']"], calls  # y, dx per device; dw from the device's rows
    hlo = [next(ln for ln in r.stdout.splitlines() if ln.startswith("HLO")) for r in runs]
    assert hlo[0] == hlo[1]


@needs_kernel
def test_bfloat16_on_the_kernel_stays_within_its_bound_of_float32():
    """The bf16 bound of test_fast on the kernel's path (--dtype=auto picks it on an AMX CPU): loss within 1% of
    float32's, gradients' direction within 1%, and every linear layer's product (4 a layer and the head) is the
    kernel's; and it rounds (a path that silently stayed float32 would differ by ~1e-7)."""
    from gptjax import evaluate, model

    x = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (3, CFG.block_size)), jnp.int32)
    params = model.split(model.create(CFG, 0))[1]

    def run(c):
        graphdef = model.graphdef_for(CFG, c)
        return jax.jit(jax.value_and_grad(lambda p: evaluate.loss_fn(graphdef, p, x, x, None)))(params), graphdef

    (loss32, g32), _ = run(compute.Compute())
    (loss16, g16), graphdef16 = run(compute.Compute(dtype="bfloat16", matmul="mkl"))
    assert abs(float(loss16) - float(loss32)) <= 0.01 * float(loss32)
    assert abs(float(loss16) - float(loss32)) > 1e-5
    a, b = (jnp.concatenate([v.ravel() for v in jax.tree.leaves(g)]) for g in (g32, g16))
    assert float(a @ b / jnp.linalg.norm(a) / jnp.linalg.norm(b)) >= 0.99
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(g16))
    forward = jax.make_jaxpr(lambda p: model.apply(graphdef16, p, x))(params).jaxpr
    assert sum(eqn.primitive.name == "ffi_call" for eqn in jaxpr_eqns(forward)) == 4 * CFG.n_layer + 1


def test_a_run_trained_on_the_kernel_loads_where_there_is_none(no_mkl, tmp_path):
    """sample and eval read a run's model with the host's own auto matmul, not the run's saved --matmul=mkl."""
    import json

    from gptjax import rundir

    run = tmp_path / "run"
    run.mkdir()
    config = Config(model=CFG)
    config = Config(model=CFG, train=config.train.__class__(matmul="mkl"))
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    loaded, graphdef, _ = rundir._model_of(str(run), {})
    assert loaded.train.matmul == "mkl" and "matmul='xla'" in repr(graphdef)
