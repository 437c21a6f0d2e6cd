"""Scaling out (gptjax/parallel.py) on simulated CPU devices: every backend and mesh trains as one device does,
FSDP really shards, checkpoints move between meshes, two real processes train as one, each step compiles once.

The runs go through the CLI (`gptjax train`) in fresh interpreters, because the device count is fixed when jax
starts: one 8-device interpreter runs every 8-device case in turn, a 1-device one the reference, and two 4-device
processes the multi-host case.
"""

import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import cli_run

# tiny's own learning rate (1e-2) amplifies the float reassociation of a split batch (sums in another order) to
# ~6e-4 in the loss by step 20 (measured); at 1e-3 the runs stay within 5e-7 of each other, so 1e-5 tests the
# backends, not the chaos of a large step size.
TRAIN = ["train", "--config=tiny", "--learning_rate=1e-3", "--min_lr=1e-4", "--eval_interval=5", "--max_iters=20"]
CASES = {  # out_dir name: (--step_impl, --mesh)
    "dp8": ("sharded", "dp:8"), "dp4_fsdp2": ("sharded", "dp:4,fsdp:2"), "fsdp8": ("sharded", "fsdp:8"),
    "shard_map_dp8": ("shard_map", "dp:8"), "pmap_dp8": ("pmap", "dp:8"),
}

MESH_ERRORS = {  # run name: (the arguments, the error line's gist), on 8 devices
    "err_batch": (["--mesh=dp:4,fsdp:2", "--batch_size=12"],
                  "--batch_size=12 does not divide over the mesh's 8 batch shards (dp:4 x fsdp:2)"),
    "err_pmap_fsdp": (["--step_impl=pmap", "--mesh=fsdp:8"], "--step_impl=pmap replicates the train state"),
    "err_shard_map_fsdp": (["--step_impl=shard_map", "--mesh=dp:4,fsdp:2"], "use --mesh=dp:8"),
    "err_sizes": (["--mesh=dp:2,fsdp:2"], "dp:2 x fsdp:2 is 4 devices, but there are 8"),
}

DRIVER = textwrap.dedent("""
    import contextlib, io, json, logging, os, re, shutil, sys, traceback
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={sys.argv[1]}"
    import jax
    jax.config.update("jax_log_compiles", True)
    from gptjax import cli, sample

    sample.sample = lambda *a, **k: [""]  # train's closing sample: seconds per run, and not what is tested here
    step_compiles = []

    class CountStepCompiles(logging.Handler):
        def emit(self, record):  # train_step (jit), data_parallel_step (shard_map), _fun (pmap)
            if re.match(r"Compiling jit\\((train_step|data_parallel_step|_fun)\\)", record.getMessage()):
                step_compiles.append(1)

    logging.getLogger("jax").addHandler(CountStepCompiles())
    results = {}
    for name, argv in json.loads(sys.argv[2]).items():
        if argv[0] == "copytree":  # a checkpoint kept as it was at this point, for the 1-device interpreter
            shutil.copytree(argv[1], argv[2])
            continue
        step_compiles.clear()
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                code = cli.main(argv)
            except Exception:  # a crash fails its own test, not every test of the module
                traceback.print_exc()
                code = "crashed"
        sys.stderr.write(err.getvalue())
        results[name] = {"code": code, "step_compiles": len(step_compiles), "stderr": err.getvalue()}
    print("RESULTS " + json.dumps(results))
""")


def _drive(devices: int, runs: dict, env: dict) -> dict:
    r = subprocess.run([sys.executable, "-c", DRIVER, str(devices), json.dumps(runs)], capture_output=True,
                       text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULTS "))
    return json.loads(line[len("RESULTS "):]) | {"_stderr": r.stderr, "_stdout": r.stdout}


def _env(cache: str = "off") -> dict:
    """The drivers' environment: this checkout first, and the compilation cache `cache` (off unless given)."""
    return {**os.environ, "GPTJAX_CACHE_DIR": cache, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}


def _metrics(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _params(out: str, which="latest"):
    import jax

    from gptjax import rundir

    return jax.tree.leaves(rundir.load_run(out, which)[2])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shakespeare):
    """Every backend and mesh for 20 steps on 8 devices; a 10-step dp:4 x fsdp:2 run resumed to 20 on dp:2 x fsdp:4;
    the same on 1 device (the reference, and the 8-device checkpoint resumed there)."""
    root = tmp_path_factory.mktemp("scale-out")
    base = TRAIN + [f"--input={shakespeare}"]
    eight = {name: base + [f"--out_dir={root / name}", f"--step_impl={impl}", f"--mesh={mesh}"]
             for name, (impl, mesh) in CASES.items()}
    eight["half"] = base + [f"--out_dir={root / 'half'}", "--mesh=dp:4,fsdp:2", "--max_iters=10"]
    eight["copy"] = ["copytree", str(root / "half"), str(root / "resumed_on_1")]
    eight["resumed_on_dp2_fsdp4"] = ["train", "--init_from=resume", f"--out_dir={root / 'half'}", "--max_iters=20",
                                     "--mesh=dp:2,fsdp:4"]
    for name, (extra, _) in MESH_ERRORS.items():  # the mistakes that need several devices to make
        eight[name] = base + [f"--out_dir={root / name}", *extra]
    eight["eval_on_mesh"] = ["eval", f"--out_dir={root / 'dp8'}", "--mesh=dp:2,fsdp:4", "--batch_size=16"]
    cache = str(root / "xla-cache")  # the runs' programs that recur (initialisation, estimates) compiled once
    eight = _drive(8, eight, _env(cache))
    one = _drive(1, {"one": base + [f"--out_dir={root / 'one'}"],
                     "resumed_on_1": ["train", "--init_from=resume", f"--out_dir={root / 'resumed_on_1'}",
                                      "--max_iters=20", "--mesh="],  # the saved mesh needs 8 devices
                     "eval": ["eval", f"--out_dir={root / 'dp8'}", "--batch_size=16"]}, _env(cache))
    evals = [re.findall(r"^val: loss .*$|^\(batches of .*$", d["_stdout"], re.M) for d in (eight, one)]
    return root, {**eight, **one, "eight_stdout": eight["_stdout"], "evals": evals}


@pytest.mark.parametrize("name", list(CASES))
def test_every_backend_and_mesh_trains_as_one_device_does(runs, name):
    root, results = runs
    assert results[name]["code"] == 0 and results["one"]["code"] == 0
    ref, got = _metrics(root / "one"), _metrics(root / name)
    assert [r["step"] for r in got] == [r["step"] for r in ref] == [0, 5, 10, 15, 20]
    for a, b in zip(ref, got):
        for key in ("train_loss", "val_loss"):
            assert abs(a[key] - b[key]) <= 1e-5, (name, a["step"], key, a[key], b[key])
    assert got[-1]["train_loss"] < got[0]["train_loss"] - 0.3  # it trained
    # the checkpoint saved from 8 devices restores on this process's device(s)
    for a, b in zip(_params(root / "one"), _params(root / name)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert results[name]["step_compiles"] == 1, results[name]


def test_eval_on_a_mesh_gives_the_one_device_figures(runs):
    _, results = runs
    on_mesh, on_one = results["evals"]
    assert results["eval"]["code"] == results["eval_on_mesh"]["code"] == 0 and len(on_mesh) == len(on_one) == 2
    assert on_mesh[0] == on_one[0]  # loss and bits/char to 4 decimals, over the whole val split
    assert on_mesh[1] == "(batches of 16 on dp:2 x fsdp:4 (8 cpu devices))", on_mesh
    assert on_one[1] == "(batches of 16 on dp:1 x fsdp:1 (1 cpu device))", on_one


def test_a_checkpoint_from_8_devices_resumes_on_1_and_on_another_mesh(runs):
    root, results = runs
    ref = {r["step"]: r for r in _metrics(root / "one")}
    for out in ("half", "resumed_on_1"):  # half went on as resumed_on_dp2_fsdp4
        got = _metrics(root / out)
        assert [r["step"] for r in got] == [0, 5, 10, 15, 20], out
        for r in got:
            for key in ("train_loss", "val_loss"):
                assert abs(r[key] - ref[r["step"]][key]) <= 1e-5, (out, r["step"], key)
    for out in ("half", "resumed_on_1"):
        for a, b in zip(_params(root / "one"), _params(root / out)):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert "sharded step on dp:2 x fsdp:4 (8 cpu devices)" in results["eight_stdout"]


FSDP = textwrap.dedent("""
    import json, os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax
    from gptjax import model, optim, parallel
    from gptjax.config import ModelConfig, TrainConfig

    c = ModelConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32)
    graphdef, params = model.split(model.create(c, 0))
    tx = optim.make_optimizer(TrainConfig(), params)
    placed = parallel.Layout(parallel.make_mesh("dp:2,fsdp:4", 8)).place(optim.init_state(params, tx))
    leaves = [[jax.tree_util.keystr(path), list(leaf.shape), list(leaf.sharding.spec) + [None] * leaf.ndim,
               sorted({s.data.shape for s in leaf.addressable_shards}), len(leaf.addressable_shards)]
              for path, leaf in jax.tree_util.tree_leaves_with_path(placed)]
    print(json.dumps({"leaves": leaves, "per_device": parallel.param_bytes_per_device(placed.params),
                      "total": sum(x.nbytes for x in jax.tree.leaves(placed.params))}))
""")


def test_fsdp_shards_parameters_and_adamw_moments():
    r = subprocess.run([sys.executable, "-c", FSDP], capture_output=True, text=True, timeout=300, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    kinds = set()
    for path, shape, spec, shards, n in got["leaves"]:
        assert n == 8, path
        if len(shape) >= 2:  # split over fsdp (4) along its largest axis that 4 divides; the same on both dp rows
            axis = max((i for i in range(len(shape)) if shape[i] % 4 == 0), key=lambda i: (shape[i], -i))
            assert spec[:len(shape)] == [("fsdp" if i == axis else None) for i in range(len(shape))], (path, spec)
            assert shards == [[d // 4 if i == axis else d for i, d in enumerate(shape)]], (path, shards)
            kinds.add(path.split("[")[0] + ("mu" if ".mu" in path else "nu" if ".nu" in path else ""))
        else:  # LayerNorm gains, counters, the step: whole on every device
            assert spec[:len(shape)] == [None] * len(shape) and shards == [shape], (path, spec, shards)
    assert {".params", ".opt_statemu", ".opt_statenu"} <= kinds  # the weights and both AdamW moments
    wte = next(leaf for leaf in got["leaves"] if leaf[0] == ".params['wte']['weight'].value")
    # 65 does not divide by 4: the 32 splits
    assert [wte[1], wte[2][:2], wte[3]] == [[65, 32], [None, "fsdp"], [[65, 8]]]
    assert got["per_device"] < got["total"] / 3  # the 2-D tensors hold nearly every byte; a device has a quarter


def test_the_memory_check_counts_a_devices_fsdp_shards(monkeypatch):
    """A model whose float32 weights, gradients and AdamW moments overflow one device is refused replicated (dp:8)
    and accepted when fsdp:8 leaves each device an eighth of its matrices."""
    from gptjax import evaluate
    from gptjax.config import load_config
    from gptjax.errors import UserError

    config = load_config("tiny", {"vocab_size": 65, "n_embd": 256})  # 1.6M parameters: 26 MB of state
    monkeypatch.setattr(evaluate, "_available_bytes", lambda: (16 << 20, 1 << 40))  # a 16 MiB device
    REPLICATED = r"1,594,880 parameters; they need 24\.3 MiB .* 16\.0 MiB is available: .* \(--mesh=fsdp:N\)"
    for mesh, fits in (("dp:8", False), ("dp:2,fsdp:4", True), ("fsdp:8", True), ("", False)):
        with_mesh = dataclasses.replace(config, train=dataclasses.replace(config.train, mesh=mesh))
        if fits:
            evaluate.check_memory(with_mesh, n_devices=8)
        else:
            with pytest.raises(UserError, match=REPLICATED):
                evaluate.check_memory(with_mesh, n_devices=8)
    monkeypatch.setattr(evaluate, "_available_bytes", lambda: (2 << 20, 1 << 40))  # 2 MiB: too small even for a shard
    fsdp8 = dataclasses.replace(config, train=dataclasses.replace(config.train, mesh="fsdp:8"))
    with pytest.raises(UserError, match=r"a device's shards of them \(fsdp:8\) need 3\.\d MiB .* 2\.0 MiB is"):
        evaluate.check_memory(fsdp8, n_devices=8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_as_one_process_with_8_devices(runs, tmp_path, shakespeare):
    root, _ = runs
    out = tmp_path / "two"
    port = _free_port()
    env = {**_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    cmd = [sys.executable, "-m", "gptjax", *TRAIN, f"--input={shakespeare}", f"--out_dir={out}", "--mesh=dp:8",
           "--distributed", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
    logs = [(open(tmp_path / f"p{i}.out", "w+"), open(tmp_path / f"p{i}.err", "w+")) for i in range(2)]
    # files, not pipes: an unread pipe that fills up stops its process, and the other then waits at a barrier
    procs = [subprocess.Popen(cmd + [f"--process_id={i}"], env=env, stdout=o, stderr=e, text=True)
             for i, (o, e) in enumerate(logs)]
    try:  # a process that fails leaves the other waiting at a barrier: do not wait out jax's own timeouts
        for p in procs:
            p.wait(timeout=240)
    finally:
        for p in procs:
            p.kill()
    outs = []
    for o, e in logs:
        o.seek(0), e.seek(0)
        outs.append((o.read(), e.read()))
    for p, (_, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]
    assert "8 cpu devices in 2 processes" in outs[0][0] and "done:" in outs[0][0]
    assert outs[1][0] == ""  # only process 0 prints
    ref, got = _metrics(root / "dp8"), _metrics(out)
    assert [r["step"] for r in got] == [0, 5, 10, 15, 20]
    for a, b in zip(ref, got):
        for key in ("train_loss", "val_loss"):
            assert abs(a[key] - b[key]) <= 1e-5, (a["step"], key, a[key], b[key])
    for a, b in zip(_params(root / "dp8"), _params(out)):  # written collectively, restored on one process
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_mesh_and_backend_errors_are_one_line(runs, shakespeare, tmp_path):
    root, results = runs
    for name, (_, message) in MESH_ERRORS.items():  # on 8 devices
        r = results[name]
        assert r["code"] == 2 and message in r["stderr"] and "Traceback" not in r["stderr"], (name, r["stderr"])
        assert len(r["stderr"].strip().splitlines()) == 1, (name, r["stderr"])
        assert not os.path.exists(root / name / "config.json"), name
    base = TRAIN + [f"--input={shakespeare}", f"--out_dir={tmp_path / 'x'}"]
    cases = [  # in this process, whatever its device count
        (["--mesh=dp:-1,fsdp:-1"], "only one axis may be -1"),
        (["--mesh=tp:2"], "over dp and fsdp"),
        (["--mesh=dp:0"], "at least 1"),
        (["--step_impl=tensor"], "--step_impl=tensor: use one of sharded, shard_map, pmap"),
        (["--num_processes=2"], "applies with --distributed only"),
    ]
    for extra, message in cases:
        r = cli_run(*base, *extra)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (extra, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not os.path.exists(tmp_path / "x" / "config.json")
