"""Where a train step spends its time, by category, in either framework:

    python -m gptjax.bench.profile --framework=jax|torch [--config=NAME|FILE.py] [--key=value ...] [--steps=N]

jax: the data-parallel jitted step as `gptjax train` runs it, traced with jax.profiler; each XLA thunk is put in a
category by the functions on the stack that emitted its HLO (LayerNorm.__call__, MLP.__call__, the optimizer...).
torch: nanoGPT's loop on the twin under torch.profiler, by aten op. Prints a markdown table per framework.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import sys
import tempfile
import time

OPTIMIZER_FUNCS = ("scale_by_adam", "tree_update_moment", "add_decayed", "apply_updates", "clip_by_global_norm",
                   "global_norm", "masked", "scale_by_learning_rate", "scale_by_schedule", "safe_increment",
                   "lr_schedule", "chain", "adamw")
TORCH_CATEGORIES = {
    "matmul": ("aten::mm", "aten::bmm", "aten::addmm"),
    "LayerNorm": ("aten::native_layer_norm", "aten::native_layer_norm_backward"),
    "GELU": ("aten::gelu", "aten::gelu_backward"),
    "attention softmax / mask": ("aten::_softmax", "aten::_softmax_backward_data", "aten::masked_fill_", "aten::tril",
                                 "aten::ones"),
    "cross-entropy": ("aten::_log_softmax", "aten::_log_softmax_backward_data", "aten::nll_loss_forward",
                      "aten::nll_loss_backward"),
    "AdamW update": ("aten::_foreach_lerp_", "aten::_foreach_mul_", "aten::_foreach_addcmul_", "aten::_foreach_sqrt",
                     "aten::_foreach_div_", "aten::_foreach_add_", "aten::_foreach_addcdiv_", "aten::_foreach_div",
                     "aten::_foreach_sqrt_", "aten::_foreach_add", "aten::_foreach_mul", "aten::lerp_",
                     "aten::addcmul_", "aten::addcdiv_", "aten::sqrt", "aten::div", "aten::mul_", "aten::add_"),
    "grad clipping": ("aten::linalg_vector_norm", "aten::_foreach_norm", "aten::stack", "aten::clamp",
                      "aten::reciprocal"),
    "copies (contiguous / cat / copy_)": ("aten::copy_", "aten::cat", "aten::clone"),
    "embedding": ("aten::index_select", "aten::embedding_dense_backward", "aten::embedding", "aten::index_add_",
                  "aten::index_put_", "aten::_index_put_impl_"),
}


def _table(title: str, ms: collections.Counter, steps: int, note: str) -> str:
    total = sum(ms.values())
    rows = [f"**{title}** ({note})", "", "| category | ms / step | share |", "| --- | --- | --- |"]
    rows += [f"| {k} | {v / steps:.2f} | {v / total:.0%} |" for k, v in ms.most_common()]
    rows.append(f"| **total** | **{total / steps:.2f}** | |")
    return "\n".join(rows)


def _hlo_tables(hlo: str) -> tuple[dict, dict]:
    """instruction name -> (opcode, [function names on its stack]) from the compiled HLO's stack-frame tables."""
    def section(name):
        m = re.search(rf"\n{name}\n(.*?)\n\n", hlo, re.S)
        return {int(k): v for k, v in (ln.split(" ", 1) for ln in m.group(1).splitlines())} if m else {}

    funcs = {k: v.strip('"') for k, v in section("FunctionNames").items()}
    locs = {k: dict(re.findall(r"(\w+)=(\d+)", v)) for k, v in section("FileLocations").items()}
    frames = {k: dict(re.findall(r"(\w+)=(\d+)", v)) for k, v in section("StackFrames").items()}

    def stack(fid: int) -> list[str]:
        out, seen = [], set()
        while fid and fid in frames and fid not in seen:
            seen.add(fid)
            out.append(funcs.get(int(locs[int(frames[fid]["file_location_id"])]["function_name_id"]), ""))
            fid = int(frames[fid]["parent_frame_id"])
        return out

    inst = {}
    for m in re.finditer(r"^\s+(?:ROOT )?%?([\w.\-]+) = \S+?\s*([\w\-]+)\((.*)$", hlo, re.M):
        name, op, rest = m.groups()
        sf = re.search(r"stack_frame_id=(\d+)", rest)
        inst.setdefault(name, (op, stack(int(sf.group(1))) if sf else []))
    return inst, funcs


def _jax_category(name: str, inst: dict) -> str:
    if name.startswith(("all-reduce", "all-gather", "reduce-scatter")):
        return "all-reduce (incl. waiting for the other device)"
    op, fns = inst.get(name, ("", []))
    if name.startswith("ffi_call"):  # jax.ffi calls: gptjax's only one is the kernel
        return "matmul (the oneMKL kernel)"
    if name.startswith("ynn_fusion") or op == "dot" or name.startswith("dot"):
        return "matmul (XLA)"
    if any(f.startswith(OPTIMIZER_FUNCS) for f in fns):
        return "AdamW + clipping"
    for key, cat in (("cross_entropy", "cross-entropy"), ("LayerNorm", "LayerNorm"), ("layer_norm", "LayerNorm"),
                     ("gelu", "GELU (MLP elementwise)"), ("MLP", "GELU (MLP elementwise)"),
                     ("CausalSelfAttention", "attention softmax / mask / reshapes"), ("Embedding", "embedding"),
                     ("Block", "residual adds")):
        if any(key in f for f in fns):
            return cat
    return "transposes / copies" if re.match(r"(transpose|copy)", name) else "other"


def profile_jax(config, steps: int) -> str:
    import jax

    from gptjax import data, parallel
    from gptjax.evaluate import setup
    from gptjax.optim import init_state
    from gptjax.train import make_train_step

    config, prep, graphdef, params, tx = setup(config)
    t, T = config.train, config.model.block_size
    A, B = t.gradient_accumulation_steps, t.batch_size
    mesh = parallel.data_mesh(B)
    step_fn = make_train_step(graphdef, tx, t, mesh)
    state = jax.device_put(init_state(params, tx), parallel.replicated(mesh))
    batches = [tuple(jax.device_put(a.reshape(A, B, T), parallel.batch_sharding(mesh))
                     for a in data.get_batch(prep.tokens("train"), A * B, T, t.seed, i)) for i in range(steps + 10)]
    key = jax.random.PRNGKey(t.seed)
    for x, y in batches[:10]:
        state, _ = step_fn(state, x, y, key)
    jax.block_until_ready(state)
    with tempfile.TemporaryDirectory() as tmp:
        tick = time.perf_counter()
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for x, y in batches[10:]:
                state, _ = step_fn(state, x, y, key)
            jax.block_until_ready(state)
        wall = (time.perf_counter() - tick) / steps * 1e3
        with gzip.open(glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True)[0]) as f:
            events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    inst, _ = _hlo_tables(step_fn.lower(state, *batches[0], key).compile().as_text())
    ms = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e and (e["name"] in inst or e["name"].startswith("all-reduce")):
            ms[_jax_category(e["name"], inst)] += e["dur"] / 1e3
    return _table(f"JAX, jitted train step over {mesh.size} XLA {jax.devices()[0].platform} device(s)", ms, steps,
                  f"XLA thunk time summed over the devices; {wall:.1f} ms/step wall while traced")


def profile_torch(config, steps: int) -> str:
    import numpy as np
    import torch

    from gptjax import data
    from gptjax.evaluate import setup
    from gptjax.parallel import cores
    from gptjax.reference.nanogpt import GPT, configure_optimizers, train_step

    torch.set_num_threads(cores())
    config, prep, _, _, _ = setup(config)
    c, t = config.model, config.train
    twin = GPT(c)
    opt = configure_optimizers(twin, t, foreach=None)
    A, B, T = t.gradient_accumulation_steps, t.batch_size, c.block_size
    batches = [tuple(torch.from_numpy(a.astype(np.int64).reshape(A, B, T)) for a in data.get_batch(
        prep.tokens("train"), A * B, T, t.seed, i)) for i in range(steps + 10)]
    for i, (x, y) in enumerate(batches[:10]):
        train_step(twin, opt, x, y, i, t)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        tick = time.perf_counter()
        for i, (x, y) in enumerate(batches[10:], 10):
            train_step(twin, opt, x, y, i, t)
        wall = (time.perf_counter() - tick) / steps * 1e3
    ms = collections.Counter()
    for e in prof.key_averages():
        cat = next((k for k, ops in TORCH_CATEGORIES.items() if e.key in ops), "other (views, adds, framework)")
        ms[cat] += e.self_cpu_time_total / 1e3
    return _table(f"PyTorch eager, nanoGPT's loop, {torch.get_num_threads()} threads", ms, steps,
                  f"self CPU time of the ops; {wall:.1f} ms/step wall while profiled")


def main(argv: list[str]) -> int:
    from gptjax import parallel
    from gptjax.args import Option, parse, take
    from gptjax.config import load_config
    from gptjax.errors import UserError
    from gptjax.options import CONFIG_OPTION

    parallel.process_settings()
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    table = {**CONFIG_OPTION, "framework": Option("jax|torch", "jax", "the framework whose step is profiled"),
             "steps": Option("N", 20, "profiled steps")}
    try:
        opts, _ = parse(argv)
        framework, steps = take(opts, "framework", table["framework"]), take(opts, "steps", table["steps"])
        if framework not in ("jax", "torch"):
            raise UserError(f"--framework={framework}: use jax or torch")
        config = load_config(take(opts, "config", table["config"]), opts)  # the rest of opts: config overrides
    except UserError as e:
        print(f"gptjax.bench.profile: error: {e}", file=sys.stderr)
        return 2
    print(profile_jax(config, steps) if framework == "jax" else profile_torch(config, steps))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
