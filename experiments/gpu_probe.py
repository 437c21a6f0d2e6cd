"""Where a jitted train step spends its GPU time: compile time, median step time, and the kernels that take the
most time in a jax.profiler trace of a few steps.

    python experiments/gpu_probe.py --config=shakespeare_char --input=PATH [--key=value ...] [--steps=30] [--top=25]

XLA_FLAGS in the environment apply (e.g. --xla_gpu_enable_triton_gemm=false), so one lever is one run. It does
not use gptjax's persistent compilation cache: every run compiles cold.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import statistics
import sys
import tempfile
import time

import jax

from gptjax import data, evaluate, optim, parallel, train
from gptjax.args import Option, options
from gptjax.compute import compute_of
from gptjax.config import load_config


def main(argv):
    args = options(argv, {"config": Option("NAME|FILE.py", "shakespeare_char", "a preset or a config file"),
                          "steps": Option("N", 30, "timed steps"), "top": Option("N", 25, "kernels listed", None),
                          "mesh": Option("true|false", False, "the step on a data mesh, as gptjax train runs it")},
                   "gpu_probe.py", __doc__, rest=True)  # the rest: config overrides
    steps, top, use_mesh = args.steps, args.top, args.mesh
    config = load_config(args.config, args.rest)
    config, prep, graphdef, params, tx = evaluate.setup(config)
    t, m = config.train, config.model
    compute = compute_of(config)
    mesh = parallel.data_mesh(t.batch_size) if use_mesh else None
    step = train.make_train_step(graphdef, tx, t, mesh)
    state = optim.init_state(params, tx)
    if mesh is not None:
        state = jax.device_put(state, parallel.replicated(mesh))
    tokens = prep.tokens("train")
    A, B, T = t.gradient_accumulation_steps, t.batch_size, m.block_size
    place = parallel.batch_sharding(mesh) if mesh is not None else None
    batches = [jax.device_put(tuple(a.reshape(A, B, T) for a in data.get_batch(tokens, A * B, T, t.seed, i)), place)
               for i in range(steps + 8)]
    key = jax.random.PRNGKey(0)
    tick = time.perf_counter()
    state, metrics = step(state, *batches[0], key)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - tick
    times = []
    for i in range(1, steps + 1):
        tick = time.perf_counter()
        state, metrics = step(state, *batches[i], key)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - tick)
    ms = statistics.median(times) * 1e3
    print(f"{compute}; mesh {use_mesh}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"compile + first step {compile_s:.1f} s; step {ms:.2f} ms (median of {steps}, synced each step); "
          f"{A * B * T / ms * 1e3:,.0f} tokens/s")
    trace_dir = tempfile.mkdtemp()
    with jax.profiler.trace(trace_dir):
        for i in range(5):
            state, metrics = step(state, *batches[steps + 1 + i], key)
        jax.block_until_ready(metrics)
    files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        print("no trace file")
        return 0
    with gzip.open(files[0]) as f:
        trace = json.load(f)
    gpu_pids = {e["pid"] for e in trace["traceEvents"] if e.get("ph") == "M" and e.get("name") == "process_name"
                and "GPU" in str(e.get("args", {}).get("name", ""))}
    if not gpu_pids:
        print("no GPU process in the trace; processes:", sorted({str(e.get("args", {}).get("name")) for e in
                                                                 trace["traceEvents"] if e.get("ph") == "M"})[:20])
    by_name, count = collections.Counter(), collections.Counter()
    for e in trace["traceEvents"]:
        if e.get("ph") == "X" and e.get("pid") in gpu_pids and "dur" in e:
            by_name[e["name"][:90]] += e["dur"] / 1e3 / 5
            count[e["name"][:90]] += 1
    total = sum(by_name.values())
    print(f"GPU events: {sum(count.values()) / 5:.0f} per step, {total:.2f} ms per step in all (streams summed)")
    for name, v in by_name.most_common(top):
        print(f"{v:8.3f} ms/step {count[name] // 5:5d}x  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
