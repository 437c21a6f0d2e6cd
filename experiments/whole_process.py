"""The whole `gptjax train` process, not only its steps: where the wall clock goes (interpreter start and imports,
data, compiling the step, loss estimates, checkpoint saves, the closing sample, the steps), beside nanoGPT's eager
train.py with the same settings, fresh processes, alternating.

    python experiments/whole_process.py --input=../shared/data/tinyshakespeare/input.txt \
        [--nanogpt=PATH/TO/nanoGPT] [--max_iters=500] [--runs=3] [--cache=warm|cold]

The breakdown comes from cProfile around `gptjax train` (its cumulative time per phase function; the steps are the
rest of the loop), the totals from separate runs without the profiler. --nanogpt names a karpathy/nanoGPT checkout
with data/shakespeare_char prepared. Prints a markdown section; nothing is written.
"""

from __future__ import annotations

import os
import pstats
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

from xla_vs_eager import NANOGPT_CPU  # nanoGPT README's CPU run; --max_iters below override its 2000

from gptjax.args import Option, options

# phase: the functions whose cumulative time it is (file suffix, function name)
PHASES = {
    "loss estimates": [("gptjax/train.py", "evaluate_and_save")],
    "checkpoint saves": [("gptjax/run.py", "save"), ("gptjax/run.py", "stopped")],
    "closing sample": [("gptjax/sample.py", "sample")],
    "data (prepare, check)": [("gptjax/data.py", "prepare")],
    "setup (model init, restore, run files)": [("gptjax/evaluate.py", "setup"), ("gptjax/run.py", "begin")],
    "the loop": [("gptjax/train.py", "_loop")],
    "cli.main": [("gptjax/cli.py", "main")],
}


def _cum(stats: pstats.Stats, where: list[tuple[str, str]]) -> float:
    return sum(v[3] for (file, _, fn), v in stats.stats.items() for suffix, name in where
               if file.endswith(suffix) and fn == name)


def gptjax_run(cmd: list[str], profile: str | None = None, cache: str | None = None) -> tuple[float, str]:
    """Wall seconds and output of one `gptjax train`; cache: its GPTJAX_CACHE_DIR (None: the user's)."""
    pre = [sys.executable] + (["-m", "cProfile", "-o", profile] if profile else []) + ["-m", "gptjax"]
    env = {**os.environ, **({"GPTJAX_CACHE_DIR": cache} if cache else {})}
    tick = time.perf_counter()
    r = subprocess.run(pre + cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - tick
    if r.returncode != 0:
        sys.exit(f"gptjax train failed: {r.stderr.strip().splitlines()[-1:]}")
    return wall, r.stdout + r.stderr


def main() -> None:
    args = options(sys.argv[1:], {
        "input": Option("PATH", None, "tiny Shakespeare's input.txt", required=True),
        "config": Option("NAME", "shakespeare_char_cpu", "the preset"),
        "max_iters": Option("N", 500, "steps of each run", None),
        "runs": Option("N", 3, "runs of each, alternating", None),
        "cache": Option("warm|cold", "warm", "warm: gptjax's compiled programs cache as a user has it after a first "
                                             "run; cold: an empty cache for every run (a first run)"),
        "nanogpt": Option("PATH", "", "a karpathy/nanoGPT checkout with data/shakespeare_char prepared")},
        "whole_process.py", __doc__)
    n = args.max_iters
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["train", f"--config={args.config}", f"--input={args.input}", f"--max_iters={n}",
               f"--lr_decay_iters={n}", "--force", f"--out_dir={tmp}/g"]
        nano = [sys.executable, "train.py", *NANOGPT_CPU, f"--max_iters={n}", f"--lr_decay_iters={n}",
                f"--out_dir={tmp}/n"]
        times: dict[str, list[float]] = {"gptjax": [], "nanogpt": []}
        if args.cache not in ("warm", "cold"):
            sys.exit(f"--cache={args.cache}: use warm or cold")
        for i in range(args.runs):
            cold = os.path.join(tmp, f"cache{i}") if args.cache == "cold" else None
            times["gptjax"].append(gptjax_run(cmd, cache=cold)[0])
            if args.nanogpt:
                tick = time.perf_counter()
                r = subprocess.run(nano, capture_output=True, text=True, cwd=args.nanogpt)
                if r.returncode != 0:
                    sys.exit(f"nanoGPT failed: {r.stderr.strip().splitlines()[-1:]}")
                times["nanogpt"].append(time.perf_counter() - tick)
        prof = os.path.join(tmp, "train.prof")
        wall, out = gptjax_run(cmd, prof, os.path.join(tmp, "cache-profiled") if args.cache == "cold" else None)
        stats = pstats.Stats(prof)
    cum = {k: _cum(stats, v) for k, v in PHASES.items()}
    compile_s = float(re.findall(r"compiled the train step in ([\d.]+) s", out)[0])
    est_save = cum["loss estimates"]  # evaluate_and_save holds the saves it makes
    rows = [("interpreter start and imports (wall − cli.main)", wall - cum["cli.main"]),
            ("data (prepare, check)", cum["data (prepare, check)"]),
            ("setup (model init, restore, run files)", cum["setup (model init, restore, run files)"]),
            ("compiling the step (its first call, one step included)", compile_s),
            ("loss estimates (their compile included)", est_save - cum["checkpoint saves"]),
            ("checkpoint saves", cum["checkpoint saves"]),
            (f"the other {n - 1} steps and the loop", cum["the loop"] - compile_s - est_save),
            ("closing sample (its compile included)", cum["closing sample"])]
    rows.append(("other (argument parsing, run files, closing)", wall - sum(v for _, v in rows)))
    lines = [f"`gptjax {shlex.join(cmd[:-1])} --out_dir=DIR`, {args.cache} compilation cache, one run under cProfile "
             f"({wall:.1f} s wall):", "",
             "| phase | seconds |", "| --- | --- |"] + [f"| {k} | {v:.2f} |" for k, v in rows]
    g = statistics.median(times["gptjax"])
    lines += ["", f"Without the profiler, {args.runs} runs: gptjax {', '.join(f'{t:.1f}' for t in times['gptjax'])} s "
              f"(median {g:.1f})"]
    if times["nanogpt"]:
        m = statistics.median(times["nanogpt"])
        lines += [f"nanoGPT `cd nanoGPT && python {shlex.join(nano[1:-1])} --out_dir=DIR`: "
                  f"{', '.join(f'{t:.1f}' for t in times['nanogpt'])} s (median {m:.1f}); gptjax is **{m / g:.2f}×** "
                  "as fast end to end"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
