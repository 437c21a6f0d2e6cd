"""The harness's other workloads: a forward sweep over batch sizes, and generate per sampler in rounds (a module of
its own, so that pytest --dist loadscope can run it beside test_bench's all-modes run)."""

import os

from test_bench import _bench


def test_sweep_forward_records_every_point(tmp_path, shakespeare):
    # 50 independent forward calls: with them all in flight at once, XLA:CPU's all-reduce deadlocked jax_jit_dp.
    stdout, results = _bench(str(tmp_path), shakespeare, "--modes=torch_eager,jax_jit,jax_jit_dp", "--workload=forward",
                             "--sweep=batch_size:1,4", "--steps=50", "--warmup=0", "--repeats=2")
    records = results["records"]
    assert [(r["point"]["batch_size"], r["mode"]) for r in records] == [
        (b, m) for b in (1, 4) for m in ("jax_jit", "torch_eager", "jax_jit_dp")]
    for r in records:
        assert r["workload"] == "forward" and r["shape"]["batch_size"] == r["point"]["batch_size"]
        assert r["tokens_per_step"] == r["point"]["batch_size"] * 16
        if r["mode"] != "jax_jit":  # the same weights and batches: the same eval loss
            assert r["loss_diff"] < 1e-5, r
    assert [r["devices"] for r in records if r["mode"] == "jax_jit_dp"] == [1, 2]  # batch 1 cannot be split
    assert os.path.getsize(tmp_path / "results.png") > 1000


def test_generate_workload_per_sampler_in_rounds(tmp_path, shakespeare):
    # 20 new tokens from a 1-token prompt with block_size 16: the kv sampler caches, then re-forwards past the block.
    stdout, results = _bench(str(tmp_path), shakespeare, "--modes=jax_jit,torch_eager", "--workload=generate",
                             "--max_new_tokens=20", "--steps=1", "--warmup=0", "--repeats=2", "--rounds=2")
    records = results["records"]
    units = [(m, s) for m in ("jax_jit", "torch_eager") for s in ("kv", "reforward")]  # the default: both samplers
    assert [(r["mode"], r["sampler"]) for r in records] == units
    for r in records:
        assert r["error"] is None and r["loss"] is None and r["loss_diff"] is None and r["dtype"] == "float32"
        assert r["tokens_per_step"] == 8 * 20 and r["tokens_per_sec"] > 0
        assert r["repeats"] == 4 and len(r["step_ms"]["runs"]) == 4  # two rounds of two repeats, pooled
        assert ("KV cache" in r["detail"]) == (r["sampler"] == "kv"), r["detail"]
    # in turn, A B C D A B C D; each record printed as its last round ends
    order = [line for line in stdout.splitlines() if line.startswith(("  round", "jax_jit ", "torch_eager "))]
    assert [line.split()[2:4] for line in order[:4]] == [[m, s + ":"] for m, s in units]
    assert [line.split(" |")[0].split() for line in order[4:]] == [[m, "generate", f"({s})"] for m, s in units]
    # 'vs jax_jit' compares each sampler with jax_jit's own run of that sampler
    with open(tmp_path / "results.md") as f:
        rows = [row.split(" | ") for row in f.read().splitlines() if row.startswith(("| jax_jit ", "| torch_eager "))]
    tps = {(r["mode"], r["sampler"]): r["tokens_per_sec"] for r in records}
    for row, (mode, sampler) in zip(rows, units):
        assert row[1] == f"generate ({sampler})"
        ratio = tps[mode, sampler] / tps["jax_jit", sampler]
        assert row[7] == (f"{ratio:.2f}×" if ratio >= 0.1 else f"{ratio:.2g}×"), (row, mode, sampler)
