"""XLA against eager, JAX against PyTorch, on one model: the standard set of `gptjax bench` runs, the whole
training process against nanoGPT's own eager loop, and where each framework spends its train step.

    python experiments/xla_vs_eager.py --input=../shared/data/tinyshakespeare/input.txt \
        [--nanogpt=PATH/TO/nanoGPT] [--config=shakespeare_char_cpu] [--name=NAME] [--runs=2] [--quick]

Writes experiments/results/xla_vs_eager_NAME.md and the bench outputs under experiments/results/xla_vs_eager_NAME/.
--nanogpt names a checkout of karpathy/nanoGPT with data/shakespeare_char prepared; its train.py runs with the
README's CPU settings beside `gptjax train` with the same ones (fresh processes, alternating, wall clock).
The "what was tried" section comes from xla_vs_eager_NAME_levers.md beside the report, written by hand from the
measurements it quotes, and is carried over on every rerun.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

from gptjax.args import Option, options
from gptjax.options import CONFIG_OPTION

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
ALL_MODES = "jax_jit,jax_jit_dp,jax_eager,torch_eager,torch_compile"
# nanoGPT README's CPU run of train_shakespeare_char.py, and the same settings as gptjax's preset.
NANOGPT_CPU = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
               "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
               "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]


def sh(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def bench(args, out: str, *extra: str) -> tuple[str, list[dict]]:
    cmd = ["gptjax", "bench", f"--config={args.config}", f"--input={args.input}", f"--out={out}", *extra]
    print("$", sh(cmd), flush=True)
    r = subprocess.run([sys.executable, "-m", "gptjax", *cmd[1:]], text=True, stdout=subprocess.PIPE)
    print(r.stdout, flush=True)
    if r.returncode != 0:
        sys.exit(f"bench failed: {sh(cmd)}")
    with open(os.path.join(out, "results.json")) as f:
        return sh(cmd), json.load(f)["records"]


def _ratio(records, a: str, b: str) -> str:
    by = {r["mode"]: r for r in records if not r["error"]}
    if a not in by or b not in by:
        return "–"
    return f"{by[a]['tokens_per_sec'] / by[b]['tokens_per_sec']:.2f}×"


def whole_process(args, runs: int) -> dict:
    """Wall seconds of `gptjax train` and of nanoGPT's train.py, same settings, fresh processes, alternating."""
    gptjax_cmd = ["gptjax", "train", f"--config={args.config}", f"--input={args.input}", "--force"]
    nano_cmd = [sys.executable, "train.py", *NANOGPT_CPU]
    times = {"gptjax": [], "nanogpt": []}
    losses = {"gptjax": [], "nanogpt": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(runs):
            tick = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "gptjax", *gptjax_cmd[1:], f"--out_dir={tmp}/g"],
                               capture_output=True, text=True)
            times["gptjax"].append(time.perf_counter() - tick)
            assert r.returncode == 0, r.stderr[-2000:]
            losses["gptjax"].append(float(re.findall(r"val loss ([\d.]+)", r.stdout + r.stderr)[-1]))
            tick = time.perf_counter()
            r = subprocess.run([*nano_cmd, f"--out_dir={tmp}/n"], capture_output=True, text=True, cwd=args.nanogpt)
            times["nanogpt"].append(time.perf_counter() - tick)
            assert r.returncode == 0, r.stderr[-2000:]
            losses["nanogpt"].append(float(re.findall(r"val loss ([\d.]+)", r.stdout)[-1]))
    head = subprocess.run(["git", "-C", args.nanogpt, "log", "-1", "--format=%H %cs"], capture_output=True, text=True)
    return {"times": times, "losses": losses, "gptjax_cmd": sh(gptjax_cmd + ["--out_dir=DIR"]),
            "nano_commit": head.stdout.strip() if head.returncode == 0 else "unknown (not a git checkout)",
            "nano_cmd": "cd nanoGPT && python " + sh(["train.py", *NANOGPT_CPU, "--out_dir=DIR"])}


def profile(args, framework: str) -> str:
    cmd = [sys.executable, "-m", "gptjax.bench.profile", f"--framework={framework}", f"--config={args.config}",
           f"--input={args.input}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return f"(profile failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode})"
    return r.stdout.strip()


def main() -> None:
    args = options(sys.argv[1:], {
        "input": Option("PATH", None, "tiny Shakespeare's input.txt", required=True), **CONFIG_OPTION,
        "name": Option("NAME", "", "results go to experiments/results/xla_vs_eager_NAME*; default cpu_VENDOR_MODEL "
                                   "(e.g. cpu_amd_2, cpu_intel_207: one page per machine kind, gathered by hand in "
                                   "xla_vs_eager_cpu.md)"),
        "nanogpt": Option("PATH", "", "a karpathy/nanoGPT checkout: its train.py beside `gptjax train`"),
        "runs": Option("N", 2, "whole-process runs of each", None),
        "quick": Option("true|false", False, "fewer steps and repeats, no sweep: a smoke run")},
        "xla_vs_eager.py", __doc__)
    if not args.name:
        from gptjax import host

        cpu = host.cpu()
        model = re.search(r"model (\w+)", cpu["name"])
        vendor = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(cpu["vendor"], "other")
        args.name = f"cpu_{vendor}_{model.group(1) if model else 'unknown'}"
    out = os.path.relpath(os.path.join(RESULTS, f"xla_vs_eager_{args.name}"))
    steps = ["--steps=5", "--repeats=2"] if args.quick else ["--steps=50", "--repeats=5", "--rounds=2"]
    sections = []
    _, train = bench(args, os.path.join(out, "train"), f"--modes={ALL_MODES}", *steps, "--eager_steps=2")
    bench(args, os.path.join(out, "forward"), f"--modes={ALL_MODES}", "--workload=forward", *steps,
                         "--eager_steps=2")
    bench(args, os.path.join(out, "generate"), f"--modes={ALL_MODES}", "--workload=generate",
                         "--max_new_tokens=64", "--steps=2", "--eager_steps=1", "--repeats=3")
    for title, path in (("Train step", "train"), ("Forward (eval logits and loss)", "forward"),
                        ("Generate", "generate")):
        with open(os.path.join(out, path, "results.md")) as f:
            sections.append(f"## {title}\n\n{f.read()}")
    goals = (f"- `jax_jit_dp` / `torch_eager`: **{_ratio(train, 'jax_jit_dp', 'torch_eager')}** (goal ≥ 1.5×)\n"
             f"- `jax_jit_dp` / `torch_compile`: **{_ratio(train, 'jax_jit_dp', 'torch_compile')}** (goal ≥ 1.0×)\n"
             f"- `jax_jit` / `jax_eager`: **{_ratio(train, 'jax_jit', 'jax_eager')}** (goal ≥ 10×)\n"
             f"- `jax_jit` / `torch_eager` (one device against PyTorch's {train[0]['host']['cores']} threads): "
             f"{_ratio(train, 'jax_jit', 'torch_eager')}\n")
    if not args.quick:
        bench(args, os.path.join(out, "sweep"), "--modes=jax_jit,jax_jit_dp,torch_eager,torch_compile",
                             "--sweep=batch_size:1,4,16,64", "--steps=20", "--repeats=3")
        with open(os.path.join(out, "sweep", "results.md")) as f:
            sections.append(f"## Sweep over batch size\n\n![sweep](xla_vs_eager_{args.name}/sweep/results.png)\n\n"
                            + f.read())
    if args.nanogpt and args.config == CONFIG_OPTION["config"].default:  # the settings NANOGPT_CPU gives nanoGPT
        w = whole_process(args, 1 if args.quick else args.runs)
        g, n = statistics.median(w["times"]["gptjax"]), statistics.median(w["times"]["nanogpt"])
        goals += (f"- whole process, {args.config}: `gptjax train` {g:.1f} s vs nanoGPT's `train.py` {n:.1f} s "
                  f"(median of {len(w['times']['gptjax'])}): **{n / g:.2f}×** (goal ≥ 1.0×)\n")
        sections.append(
            "## The whole training process\n\nFresh processes, alternating, wall clock (imports, data, compilation, "
            f"evaluation, checkpoints and the closing sample included); nanoGPT at commit {w['nano_commit']}:\n\n"
            f"- `{w['gptjax_cmd']}`: {', '.join(f'{t:.1f}' for t in w['times']['gptjax'])} s; final val loss "
            f"{', '.join(f'{v:.4f}' for v in w['losses']['gptjax'])}\n"
            f"- `{w['nano_cmd']}`: {', '.join(f'{t:.1f}' for t in w['times']['nanogpt'])} s; final val loss "
            f"{', '.join(f'{v:.4f}' for v in w['losses']['nanogpt'])}\n")
    sections.append("## Where the train step goes\n\n`python -m gptjax.bench.profile --framework=jax|torch "
                    f"--config={args.config} --input=...`\n\n" + profile(args, "jax") + "\n\n" + profile(args, "torch"))
    levers = os.path.join(RESULTS, f"xla_vs_eager_{args.name}_levers.md")
    if os.path.exists(levers):
        with open(levers) as f:
            sections.append(f.read().strip())
    cmd = "python experiments/xla_vs_eager.py " + sh(sys.argv[1:])
    where = train[0]["host"]["cpu"] if train[0]["device"] == "cpu" else train[0]["device"]
    report = (f"# XLA against eager, JAX against PyTorch: {args.config} on {where}\n\n"
              f"`{cmd}` ({time.strftime('%Y-%m-%d')})\n\n## Goals\n\n{goals}\n" + "\n\n".join(sections) + "\n")
    path = os.path.join(RESULTS, f"xla_vs_eager_{args.name}.md")
    with open(path, "w") as f:
        f.write(report)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
