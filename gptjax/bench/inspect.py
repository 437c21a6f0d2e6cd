"""The GPU program, read on any machine: the train step (and the loss estimate and the sampler) compiled for an
abstract NVIDIA GPU, and what XLA made of it.

    python -m gptjax.bench.inspect --target=h100|h200|a100 [--config=NAME|FILE.py] [--programs=train,estimate,sample]
                                   [--json=PATH] [--hlo_dir=DIR] [--key=value ...]

The rest of the options override the config, as for `gptjax train` (e.g. --batch_size=16 --dtype=bfloat16). The
step is the one `gptjax train` runs, lowered and compiled by XLA's GPU pipeline for a device described by a target
config (gptjax/bench/gpu_targets/), with no GPU present: jax's CUDA plugin brings the compiler
(`pip install "gptjax[cuda]"`, or `pip install "jax[cuda12]"` at the installed jax's version).

It reports, per program: the compile time (without autotuning, on this machine's CPU), the kernels and library
calls the program launches, every GEMM by operand and result dtype and shape (flagging float32 operands, dimensions
that are not a multiple of 8, and vocabulary-sized ones), scatters, the largest buffers, XLA's memory analysis,
and a roofline bound: each kernel's FLOPs at the device's peak or its bytes at its bandwidth, whichever is
longer, summed. That bound is what the program could at best do on the device, never a measurement. The reading of
the program is gptjax.bench.hlo's.
"""

from __future__ import annotations

import os
import sys

TARGETS = {  # name -> target config file beside this module, and the device's dense peaks (NVIDIA's data sheets)
    "h100": ("h100.txtpb", "NVIDIA H100 80GB HBM3"),
    "h200": ("h200.txtpb", "NVIDIA H200"),
    "a100": ("a100.txtpb", "NVIDIA A100-SXM4-80GB"),
}
PROGRAMS = ("train", "estimate", "sample")
INSTALL = ('the CUDA plugin is not installed: pip install "gptjax[cuda]" (or "jax[cuda12]==<your jax version>"); '
           "it runs on a CPU-only machine too")


def _environment() -> None:
    """Before jax starts: the CPU is the only backend (the GPU is abstract), no autotuning (it needs a GPU), and the
    GPU flags every gptjax command adds (gpu.GPU_XLA_FLAGS), so the program is the one a GPU would run."""
    from gptjax import gpu

    gpu.use_gpu_flags()
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_gpu_autotune_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_autotune_level=0".strip()


# ---- the programs, compiled for the abstract device -------------------------------------------------------------

def _patch_cudnn_checks() -> None:
    """cuDNN attention checks the installed cuDNN and the device's compute capability while tracing; with no device,
    both checks pass whatever the target, so an A100 target is not held to its narrower head-size limits."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    fa.check_cudnn_version = lambda *a, **k: None
    fa.check_compute_capability = lambda *a, **k: True


def topology(target: str):
    """The abstract one-GPU topology of a target ('h100', 'h200', 'a100')."""
    from gptjax import gpu
    from gptjax.errors import UserError

    if target not in TARGETS:
        raise UserError(f"--target={target}: use one of {', '.join(TARGETS)}")
    if not gpu.cuda_plugin_installed():
        raise UserError(INSTALL)
    from jax.experimental import topologies

    path = os.path.join(os.path.dirname(__file__), "gpu_targets", TARGETS[target][0])
    with open(path) as f:
        return topologies.get_topology_desc(platform="cuda", topology="1x1x1", target_config=f.read())


KNOWN_VOCABULARIES = {("shakespeare_char", ""): 65, ("shakespeare_char", "char"): 65,  # as prepare makes them
                      ("shakespeare", ""): 50257}


def with_vocabulary(config):
    """The config with a vocabulary size, as training would resolve it from its data (none is read here)."""
    import dataclasses

    from gptjax.errors import UserError

    if config.model.model != "gpt":
        raise UserError(f"--config: the inspection compiles GPT programs, not {config.model.model}")
    if config.model.vocab_size:
        return config
    d = config.data
    vocab = 50257 if d.tokenizer == "gpt2" else None if d.input else KNOWN_VOCABULARIES.get((d.dataset, d.tokenizer))
    if vocab is None:
        raise UserError("the vocabulary size comes from the data, which the inspection does not read: pass "
                        "--vocab_size=N")
    return dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=vocab))


def compile_programs(config, target: str, programs=PROGRAMS) -> dict:
    """{program: {lowered, compiled, lower_s, compile_s, compute}} for the config's steps on the abstract target."""
    import time

    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from gptjax import evaluate, model, optim, sample, train
    from gptjax.compute import compute_of
    from gptjax.errors import UserError

    _patch_cudnn_checks()
    topo = topology(target)
    device = topo.devices[0]
    rep = NamedSharding(Mesh(topo.devices, ("d",)), P())
    c, t = config.model, config.train

    def abstract(tree):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), tree)

    def arr(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=rep)

    params = model.abstract_params(c)
    key = arr((2,), jnp.uint32)
    A, B, T = t.gradient_accumulation_steps, t.batch_size, c.block_size
    out = {}
    for name in programs:
        compute = compute_of(config, training=name == "train", device=device)
        graphdef = model.graphdef_for(c, compute)
        if name == "train":
            tx = optim.make_optimizer(t, params)
            state = jax.eval_shape(lambda p, tx=tx: optim.init_state(p, tx), params)
            fn, args = train.make_train_step(graphdef, tx, t), (abstract(state), arr((A, B, T), jnp.int32),
                                                               arr((A, B, T), jnp.int32), key)
        elif name == "estimate":
            x = arr((t.eval_iters, B, T), jnp.int32)
            fn, args = evaluate.make_estimate(config, device=device), (abstract(params), x, x)  # as train builds it
        else:
            fn = jax.jit(lambda p, prompt, k, g=graphdef: sample.generate(
                g, c.block_size, 256, None, p, prompt, k, jnp.float32(1.0), kv_cache=True))
            args = (abstract(params), arr((1, 1), jnp.int32), key)
        tick = time.perf_counter()
        try:
            lowered = fn.trace(*args).lower(lowering_platforms=("cuda",))
            lowered_at = time.perf_counter()
            compiled = lowered.compile()
        except (NotImplementedError, jax.errors.JaxRuntimeError) as e:  # cuDNN's limits, XLA's refusals
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"the {name} program cannot be built for {TARGETS[target][1]} with these settings: "
                            f"{first}") from None
        out[name] = {"lowered": lowered, "compiled": compiled, "lower_s": lowered_at - tick,
                     "compile_s": time.perf_counter() - lowered_at, "compute": compute}
    return out


# ---- the report ---------------------------------------------------------------------------------------------------

def _fmt_array(a) -> str:
    return f"{a[0]}[{','.join(map(str, a[1]))}]"


def _padded(v: int) -> int:
    """XLA pads a cuBLAS GEMM's dimensions to a multiple of 8 (16 bytes of bf16)."""
    return -(-v // 8) * 8


def _gemm_flags(g: dict, vocab: int) -> list[str]:
    flags = []
    if "f32" in (g["lhs"][0], g["rhs"][0]):
        flags.append("float32 operands")
    dims = set(g["dims"])  # M, N and K: batch dimensions are not tiled
    if dims & {vocab, _padded(vocab)}:
        flags.append("vocabulary-sized")
    if _padded(vocab) != vocab and _padded(vocab) in dims:
        flags.append(f"vocabulary padded by XLA ({vocab} -> {_padded(vocab)}: a copy a step)")
    if any(d % 8 for d in dims):
        flags.append("dimension not a multiple of 8")
    return flags


def summarize(name: str, entry: dict, config, target: str) -> dict:
    """The numbers of one program's report (also what --json writes)."""
    from gptjax import model
    from gptjax.bench import flops as flops_mod
    from gptjax.bench import hlo

    c, t = config.model, config.train
    compiled, lowered = entry["compiled"], entry["lowered"]
    B, T = t.batch_size, c.block_size
    tokens = {"train": t.gradient_accumulation_steps * B * T, "estimate": t.eval_iters * B * T, "sample": 1}[name]
    a = hlo.analyse(compiled.as_text(), (c.vocab_size, _padded(c.vocab_size)), B * T)
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis() or lowered.cost_analysis() or {}
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    peak = flops_mod.PEAK_TFLOPS[{"h100": "H100", "h200": "H200", "a100": "A100"}[target]]
    dtype = "bfloat16" if entry["compute"].dtype == "bfloat16" else "float32"  # float32: the TF32 peak
    bandwidth = _target_bandwidth(target)
    bound_s = 0.0
    for x in a["launches"]:
        bound_s += x["runs"] * max(x["flops"] / (peak[dtype] * 1e12), x["bytes"] / bandwidth)
    gemm_rows = {}
    for g in a["gemms"]:
        k = (g["where"], _fmt_array(g["lhs"]), _fmt_array(g["rhs"]), _fmt_array(g["out"]))
        row = gemm_rows.setdefault(k, {"where": k[0], "lhs": k[1], "rhs": k[2], "out": k[3], "count": 0,
                                       "gflops": 0.0, "flags": _gemm_flags(g, c.vocab_size)})
        row["count"] += 1
        row["gflops"] += g["flops"] / 1e9
    model_flops = None
    if name == "train":
        n = model.num_params(model.abstract_params(c))
        model_flops = flops_mod.flops_per_token(c, n) * tokens
    largest = sorted(a["launches"], key=lambda x: -x["out_bytes"])[:8]
    return {
        "program": name, "target": target, "device": TARGETS[target][1], "compute": vars(entry["compute"]).copy()
        if hasattr(entry["compute"], "__dict__") else str(entry["compute"]),
        "lower_s": round(entry["lower_s"], 2), "compile_s": round(entry["compile_s"], 2),
        "kernels": sum(a["kernels"].values()), "kernel_kinds": a["kernels"],
        "gemms": sorted(gemm_rows.values(), key=lambda r: -r["gflops"]),
        "f32_gemms": sum(r["count"] for r in gemm_rows.values() if "float32 operands" in r["flags"]),
        "vocab_f32_gemms": sum(r["count"] for r in gemm_rows.values()
                               if {"float32 operands", "vocabulary-sized"} <= set(r["flags"])),
        "unaligned_gemms": sum(r["count"] for r in gemm_rows.values()
                               if "dimension not a multiple of 8" in r["flags"]),
        "scatters": a["scatters"], "logits_sized_f32": a["logits_sized_f32"],
        "largest": [{k: x[k] for k in ("name", "kind", "shape", "out_bytes")} for x in largest],
        "memory": {k: getattr(mem, k) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                                 "alias_size_in_bytes", "temp_size_in_bytes")} if mem else {},
        "xla_cost": {k: cost[k] for k in ("flops", "bytes accessed") if k in cost},
        "gemm_tflops": sum(g["flops"] for g in a["gemms"]) / 1e12,  # each GEMM in the program once
        "run_tflops": sum(x["runs"] * x["flops"] for x in a["launches"]) / 1e12,  # one run, loops' trips included
        "bytes_gb": sum(x["runs"] * x["bytes"] for x in a["launches"]) / 1e9,
        "launches_per_run": sum(x["runs"] for x in a["launches"]),
        "roofline_ms": bound_s * 1e3, "model_tflops": None if model_flops is None else model_flops / 1e12,
        "mfu_ceiling": None if model_flops is None or not bound_s
        else model_flops / bound_s / (peak[dtype] * 1e12), "peak": dtype,
        "tokens": tokens, "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def _target_bandwidth(target: str) -> float:
    import re

    with open(os.path.join(os.path.dirname(__file__), "gpu_targets", TARGETS[target][0])) as f:
        return float(re.search(r"memory_bandwidth: (\d+)", f.read()).group(1))


def render(s: dict) -> str:
    """One program's report in markdown."""
    mib = 1 << 20
    lines = [f"### {s['program']} on {s['device']} (abstract; {s['compute']})", "",
             f"- compile without autotuning: lower {s['lower_s']:.1f} s, compile {s['compile_s']:.1f} s "
             f"(this machine's CPU, {os.cpu_count()} cores; XLA_FLAGS `{s['xla_flags']}`)",
             f"- kernels and library calls launched: {s['kernels']} "
             f"({', '.join(f'{k} {v}' for k, v in sorted(s['kernel_kinds'].items(), key=lambda kv: -kv[1]))})",
             f"- GEMMs in the program (a loop body's once; matrix-vector products XLA turned into reductions are not "
             f"GEMMs): {sum(r['count'] for r in s['gemms'])}, {s['gemm_tflops']:.2f} TFLOP; float32-operand "
             f"GEMMs {s['f32_gemms']} (vocabulary-sized {s['vocab_f32_gemms']}); with a dimension not a multiple of "
             f"8: {s['unaligned_gemms']}",
             f"- scatters: {len(s['scatters'])}"
             + "".join(f"; {_fmt_array(x['out'])} ({x['op_name'][-60:]})" for x in s["scatters"][:4]),
             f"- float32 buffers of at least tokens x vocabulary elements: {len(s['logits_sized_f32'])}"
             + "".join(f"; {x['shape']} ({x['kind']})" for x in s["logits_sized_f32"][:4]),
             "- memory (XLA): " + ", ".join(f"{k.replace('_size_in_bytes', '')} {v / mib:,.0f} MiB"
                                             for k, v in s["memory"].items()),
             f"- XLA's cost analysis: {', '.join(f'{k} {v:.3g}' for k, v in s['xla_cost'].items()) or 'none'}",
             f"- roofline bound (not a measurement): {s['roofline_ms']:.2f} ms a run of the program, kernel by kernel "
             f"the longer of its FLOPs at the {s['peak']} peak and its operands and results at the memory bandwidth: "
             f"{s['run_tflops']:.2f} TFLOP of GEMMs and attention, {s['bytes_gb']:.1f} GB, "
             f"{s['launches_per_run']:,} launches (loops' trips counted)"
             + ("" if s["mfu_ceiling"] is None else
                f"; {s['model_tflops']:.2f} model TFLOP a step, so MFU at most {100 * s['mfu_ceiling']:.0f}%"),
             "", "| GEMM on | lhs | rhs | out | count | GFLOP | flags |", "|---|---|---|---|---:|---:|---|"]
    for r in s["gemms"]:
        lines.append(f"| {r['where']} | {r['lhs']} | {r['rhs']} | {r['out']} | {r['count']} | {r['gflops']:.1f} | "
                     f"{', '.join(r['flags'])} |")
    lines += ["", "| largest buffers | kind | shape | MiB |", "|---|---|---|---:|"]
    lines += [f"| {x['name']} | {x['kind']} | {x['shape']} | {x['out_bytes'] / mib:,.0f} |" for x in s["largest"]]
    return "\n".join(lines) + "\n"


def _check_outputs(json_path: str, hlo_dir: str) -> None:
    from gptjax.errors import UserError

    if json_path and (os.path.isdir(json_path) or not os.path.isdir(os.path.dirname(os.path.abspath(json_path)))):
        raise UserError(f"--json={json_path}: name a file in a directory that exists")
    if hlo_dir:
        try:
            os.makedirs(hlo_dir, exist_ok=True)
        except OSError as e:
            raise UserError(f"--hlo_dir={hlo_dir}: cannot make it ({e.strerror})") from None


def main(argv: list[str]) -> int:
    _environment()
    from gptjax.args import Option, parse, take
    from gptjax.config import load_config
    from gptjax.errors import UserError
    from gptjax.options import CONFIG_OPTION

    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    table = {**CONFIG_OPTION, "target": Option("h100|h200|a100", "h100", "the abstract device"),
             "programs": Option("LIST", ",".join(PROGRAMS), "which of train, estimate, sample"),
             "json": Option("PATH", "", "also write the numbers as JSON"),
             "hlo_dir": Option("DIR", "", "also write each optimized program's HLO text")}
    try:
        opts, _ = parse(argv)
        target, programs = take(opts, "target", table["target"]), take(opts, "programs", table["programs"])
        json_path, hlo_dir = take(opts, "json", table["json"]), take(opts, "hlo_dir", table["hlo_dir"])
        programs = [p for p in programs.split(",") if p]
        bad = [p for p in programs if p not in PROGRAMS]
        if bad or not programs:
            raise UserError(f"--programs={','.join(programs)}: name some of {', '.join(PROGRAMS)}")
        config = with_vocabulary(load_config(take(opts, "config", table["config"]), opts))  # the rest: overrides
        _check_outputs(json_path, hlo_dir)  # before minutes of compiling
        compiled = compile_programs(config, target, programs)
    except UserError as e:
        print(f"gptjax.bench.inspect: error: {e}", file=sys.stderr)
        return 2
    summaries = []
    for name, entry in compiled.items():
        s = summarize(name, entry, config, target)
        summaries.append(s)
        print(render(s))
        if hlo_dir:
            os.makedirs(hlo_dir, exist_ok=True)
            with open(os.path.join(hlo_dir, f"{name}_{target}.hlo.txt"), "w") as f:
                f.write(entry["compiled"].as_text())
    if json_path:
        import json

        with open(json_path, "w") as f:
            json.dump(summaries, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
