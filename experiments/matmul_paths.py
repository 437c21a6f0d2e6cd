"""Every way to run a matmul from JAX on this CPU, at a model's shapes, in float32 and bfloat16: XLA's dots under
each flag that picks a dot library, gptjax's oneMKL kernel (gptjax/kernels), and beside them PyTorch's torch.mm and
oneMKL itself called through ctypes (what the library can do with no framework around it).

    python experiments/matmul_paths.py [--config=shakespeare_char_cpu] [--repeats=5]

The shapes are the config's linear layers at a step's rows (batch x block, and half of them: a device's share
under train's two-way data parallelism), forward (x @ W) and weight gradient (xᵀ @ g), and 2048³. GFLOP/s, the
best of `repeats` timed runs of as many calls as take ~50 ms. Each XLA flag set runs in a process of its own (flags
are read when jax starts); every process uses all cores. Prints a markdown section; nothing is written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from gptjax.args import Option, options

FLAG_SETS = {  # name: XLA_FLAGS
    "XLA (default)": "",
    "XLA --xla_cpu_use_onednn=true": "--xla_cpu_use_onednn=true",
    "XLA oneDNN dot fusion": "--xla_cpu_experimental_onednn_fusion_type=dot",
    "XLA XNNPACK dot fusion": "--xla_cpu_experimental_xnn_fusion_type=dot",
    "XLA YNNPACK dot fusion": "--xla_cpu_experimental_ynn_fusion_type=dot",
    "XLA --xla_cpu_use_xnnpack=false": "--xla_cpu_use_xnnpack=false",
}

WORKER = r"""
import json, os, sys, time
import numpy as np
shapes, repeats, what = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

def best(f):
    f()
    t = time.perf_counter(); f(); one = max(time.perf_counter() - t, 1e-6)
    n = max(3, int(0.05 / one))
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            f()
        runs.append((time.perf_counter() - t) / n)
    return min(runs)

rng = np.random.default_rng(0)
out = {}
for m, k, n in shapes:
    a32, b32 = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32)
    for dtype in ("float32", "bfloat16"):
        key = f"{m}x{k}x{n} {dtype}"
        if what in ("xla", "kernel"):
            import jax, jax.numpy as jnp
            a, b = jnp.asarray(a32, dtype), jnp.asarray(b32, dtype)
            if what == "xla":
                f = jax.jit(lambda a, b: a @ b)
            else:
                from gptjax import kernels
                ok, why = kernels.load()
                if not ok:
                    out["error"] = why
                    break
                f = jax.jit(lambda a, b: kernels.gemm(a, b))
            s = best(lambda: f(a, b).block_until_ready())
        elif what == "torch":
            import torch
            from gptjax.parallel import cores
            torch.set_num_threads(cores())
            a, b = torch.from_numpy(a32).to(getattr(torch, dtype)), torch.from_numpy(b32).to(getattr(torch, dtype))
            s = best(lambda: torch.mm(a, b))
        else:  # oneMKL through ctypes, as many threads as cores
            import ctypes
            from gptjax import kernels
            from gptjax.parallel import cores
            found = kernels.find_mkl()
            rt = [p for p in os.listdir(found[0]) if p.startswith("libmkl_rt.so")] if found else []
            if not rt:
                out["error"] = "no libmkl_rt"
                break
            mkl = ctypes.CDLL(os.path.join(found[0], sorted(rt, key=len)[0]))
            mkl.MKL_Set_Num_Threads(cores())
            c = np.zeros((m, n), np.float32)
            P, F = ctypes.c_void_p, ctypes.c_float
            if dtype == "float32":
                s = best(lambda: mkl.cblas_sgemm(101, 111, 111, m, n, k, F(1), P(a32.ctypes.data), k,
                                                 P(b32.ctypes.data), n, F(0), P(c.ctypes.data), n))
            else:
                ab = (a32.view(np.uint32) >> 16).astype(np.uint16)
                bb = (b32.view(np.uint32) >> 16).astype(np.uint16)
                s = best(lambda: mkl.cblas_gemm_bf16bf16f32(101, 111, 111, m, n, k, F(1), P(ab.ctypes.data), k,
                                                            P(bb.ctypes.data), n, F(0), P(c.ctypes.data), n))
        out[key] = 2 * m * k * n / s / 1e9
print("RESULT " + json.dumps(out))
"""


def shapes_of(config: str) -> list[tuple[int, int, int]]:
    from gptjax.config import load_config

    c = load_config(config)
    rows, d = c.train.batch_size * c.model.block_size, c.model.n_embd
    out = []
    for r in (rows, rows // 2):
        out += [(r, d, 3 * d), (r, d, 4 * d), (r, 4 * d, d)]
    out += [(d, rows, 4 * d), (2048, 2048, 2048)]  # a weight gradient (xᵀ @ g over every row), and a big one
    return list(dict.fromkeys(out))


def run(what: str, shapes, repeats: int, flags: str = "") -> dict:
    env = {**os.environ, "XLA_FLAGS": flags}
    r = subprocess.run([sys.executable, "-c", WORKER, json.dumps(shapes), str(repeats), what], capture_output=True,
                       text=True, env=env)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        return {"error": (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]}
    return json.loads(line[len("RESULT "):])


def onednn_in_jaxlib() -> str:
    import jaxlib

    root = os.path.dirname(jaxlib.__file__)
    for name in sorted(os.listdir(root)):
        if name.endswith(".so"):
            with open(os.path.join(root, name), "rb") as f:
                if b"dnnl_primitive_create" in f.read():
                    return f"yes (oneDNN's symbols are in jaxlib/{name})"
    return "no (no oneDNN symbols in jaxlib's libraries)"


def main() -> None:
    from gptjax import host

    args = options(sys.argv[1:], {"config": Option("NAME", "shakespeare_char_cpu", "the preset whose shapes to time"),
                                  "repeats": Option("N", 5, "timed runs per shape; the best is kept", None)},
                   "matmul_paths.py", __doc__)
    shapes = shapes_of(args.config)
    results = {name: run("xla", shapes, args.repeats, flags) for name, flags in FLAG_SETS.items()}
    results["gptjax kernel (oneMKL, XLA's pool)"] = run("kernel", shapes, args.repeats)
    results["PyTorch torch.mm"] = run("torch", shapes, args.repeats)
    results["oneMKL alone (ctypes)"] = run("mkl", shapes, args.repeats)
    cpu = host.cpu()
    lines = [f"`python experiments/matmul_paths.py --config={args.config} --repeats={args.repeats}`", "",
             f"Host: {cpu['name']}, {os.cpu_count()} cores; {host.isa()}. jaxlib built with oneDNN: "
             f"{onednn_in_jaxlib()}. GFLOP/s, best of {args.repeats}; M×K×N.", ""]
    for dtype in ("float32", "bfloat16"):
        names = list(results)
        lines += [f"**{dtype}**", "", "| path | " + " | ".join(f"{m}×{k}×{n}" for m, k, n in shapes) + " |",
                  "| --- |" + " --- |" * len(shapes)]
        for name in names:
            r = results[name]
            cells = [r["error"][:60] if "error" in r else f"{r.get(f'{m}x{k}x{n} {dtype}', float('nan')):,.0f}"
                     for m, k, n in shapes]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
