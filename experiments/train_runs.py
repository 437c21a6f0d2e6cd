"""Run `gptjax train` for a preset several times, as a user would, and record wall/compile time, loss and a sample.

    python experiments/train_runs.py --config=shakespeare_char_cpu --input=PATH [--runs=3] [--out=results/NAME.md]

Each run is a fresh `gptjax train` process (imports, data cache check, compilation and evaluation included in
the wall time). The table gives every run and the median; the sample is the first run's.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

from gptjax.args import Option, options
from gptjax.options import CONFIG_OPTION

HERE = os.path.dirname(os.path.abspath(__file__))


def one_run(config: str, extra: list[str], out_dir: str) -> dict:
    cmd = [sys.executable, "-m", "gptjax", "train", f"--config={config}", f"--out_dir={out_dir}", "--force", *extra]
    tick = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - tick
    if r.returncode != 0:
        sys.exit(f"run failed:\n{r.stderr[-3000:]}")
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    compile_s = float(re.search(r"compiled the train step in ([\d.]+) s", r.stdout + r.stderr).group(1))
    sample = r.stdout.split("sample:\n", 1)[1].strip()
    rates = [row["tokens_per_sec"] for row in rows if row["tokens_per_sec"] > 0]
    return {"wall_s": wall, "compile_s": compile_s, "val_loss": rows[-1]["val_loss"],
            "best_val_loss": min(row["val_loss"] for row in rows),
            "tokens_per_sec": statistics.median(rates), "sample": sample, "steps": rows[-1]["step"]}


def main(argv: list[str]) -> None:
    args = options(argv, {**CONFIG_OPTION, "runs": Option("N", 3, "fresh `gptjax train` processes", None),
                          "out": Option("PATH", "", "the report; default: experiments/results/CONFIG_runs.md")},
                   "train_runs.py", __doc__, rest=True)  # the rest: passed on to gptjax train
    config, runs = args.config, args.runs
    out = args.out or os.path.join(HERE, "results", f"{config}_runs.md")
    extra = [f"--{k}={v}" for k, v in args.rest.items()]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(runs):
            results.append(one_run(config, extra, os.path.join(tmp, "run")))
            r = results[-1]
            print(f"run {i + 1}: {r['wall_s']:.1f} s wall, compile {r['compile_s']:.1f} s, "
                  f"{r['tokens_per_sec']:,.0f} tokens/s, val loss {r['val_loss']:.4f}", flush=True)
    import jax

    med = {k: statistics.median(r[k] for r in results) for k in ("wall_s", "compile_s", "tokens_per_sec")}
    command = " ".join(["python experiments/train_runs.py", f"--config={config}", f"--runs={runs}", *extra])
    lines = [
        f"# `gptjax train --config={config}`: {runs} runs",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}; "
        f"jax {jax.__version__}; {time.strftime('%Y-%m-%d')}.",
        "",
        "| run | wall (s) | compile + first step (s) | tokens/s (median over evals) | final val loss | best val loss |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for i, r in enumerate(results, 1):
        lines.append(f"| {i} | {r['wall_s']:.1f} | {r['compile_s']:.1f} | {r['tokens_per_sec']:,.0f} | "
                     f"{r['val_loss']:.4f} | {r['best_val_loss']:.4f} |")
    lines.append(f"| median | {med['wall_s']:.1f} | {med['compile_s']:.1f} | {med['tokens_per_sec']:,.0f} | | |")
    lines += ["", "Sample (run 1, 300 tokens, temperature 0.8, top-k 200, seed 1337):", "", "```",
              results[0]["sample"], "```", ""]
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
