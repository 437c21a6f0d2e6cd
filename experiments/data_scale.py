"""How `gptjax prepare` scales with the corpus: time, tokens/s, MB/s and peak memory at each size and tokenizer,
against tiktoken's own single-thread rate measured beside each run, against an older gptjax (one that read the
whole corpus at once: --old=CHECKOUT) at the sizes it survives, and what a second start costs on a prepared corpus.

The corpora are tiny Shakespeare repeated to each size (in --work, deleted afterwards): one text file, and JSON Lines
of documents of OpenWebText's length distribution (gpt2 only: documents need its end-of-text token). Each prepare is a
fresh `python -m gptjax prepare` process into a fresh cache; its peak memory is the resident set of the process and its
workers, summed, sampled every 20 ms.

    python experiments/data_scale.py --input=../shared/data/tinyshakespeare/input.txt [--quick | --smoke]
        [--sizes=100,1000,4000] [--tokenizers=char,gpt2] [--kinds=text,jsonl] [--old=PATH/TO/OLD/CHECKOUT]
        [--work=DIR]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from gptjax import data, research, tokenizers

MB = 1_000_000
OPENWEBTEXT_BYTES = 40e9  # nanoGPT's OpenWebText: about 40 GB of text (8M documents, about 9B GPT-2 tokens)


def settings(opts: research.Options) -> dict:
    return opts.pick(dict(sizes="100,1000,4000", old_max_mb=1000, raw_mb=10),
                     dict(sizes="100,300", old_max_mb=300, raw_mb=10),
                     dict(sizes="2", old_max_mb=2, raw_mb=1))


def _tree_rss(pid: int, field: str = "VmRSS") -> int:
    """Resident bytes of pid and its descendants now (0 once gone); field RssAnon: anonymous memory only, without
    the pages of mapped files (which the kernel may drop at will)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith(f"{field}:"))
            with open(f"/proc/{p}/task/{p}/children") as f:
                stack += [int(c) for c in f.read().split()]
        except (OSError, StopIteration, ValueError):
            pass
    return total


def run_measured(cmd: list[str], cwd: str | None = None, env: dict | None = None) -> dict:
    """Run cmd: wall seconds, CPU seconds (it and its children), peak summed RSS (and anonymous RSS) of its process
    tree, its output."""
    before = os.times()
    tick = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, anon, done = [0], [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            anon[0] = max(anon[0], _tree_rss(proc.pid, "RssAnon"))
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - tick
    done.set()
    sampler.join()
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return {"code": proc.returncode, "wall": wall, "cpu": cpu, "peak_rss": peak[0], "peak_anon": anon[0], "out": out,
            "err": err}


def make_corpus(work: str, shakespeare_text: str, mb: int, kind: str) -> str:
    """tiny Shakespeare repeated to about mb MB: one text file, or JSON Lines of documents of OpenWebText's shape
    (lengths log-normal around a median of 3 KB, mean about 4.7 KB as OpenWebText's 38 GB over 8M documents, cut
    at line breaks)."""
    if kind == "text":
        path = os.path.join(work, f"shakespeare-{mb}MB.txt")
        reps = max(1, round(mb * MB / len(shakespeare_text.encode())))
        with open(path, "w", encoding="utf-8") as f:
            for _ in range(reps):
                f.write(shakespeare_text)
        return path
    import numpy as np

    path = os.path.join(work, f"shakespeare-{mb}MB.jsonl")
    rng, pos, written = np.random.default_rng(0), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < mb * MB:
            n = int(min(rng.lognormal(np.log(3000), 0.9), 200_000))
            end = shakespeare_text.find("\n", pos + n)
            end = len(shakespeare_text) if end < 0 else end + 1
            line = json.dumps({"text": shakespeare_text[pos:end]}) + "\n"
            f.write(line)
            written += len(line)
            pos = 0 if end >= len(shakespeare_text) else end
    return path


def raw_rate(text: str) -> float:
    """tiktoken's GPT-2 encode_ordinary on one thread, bytes/s: the best of two passes over text."""
    enc = tokenizers.gpt2().encoding
    best = float("inf")
    for _ in range(2):
        tick = time.perf_counter()
        enc.encode_ordinary(text)
        best = min(best, time.perf_counter() - tick)
    return len(text.encode()) / best


def threads_vs_processes(text: str, mb: int, cores: int, rounds: int = 3) -> dict:
    """MB/s of GPT-2 encoding mb MB in 1 MB blocks: on one thread, on a thread per core, on a (spawned) process per
    core; the median of `rounds` rounds, the three taken in turn within each round."""
    import concurrent.futures as cf
    import functools
    import multiprocessing
    import statistics

    from gptjax import corpora

    blocks = [text[i:i + MB] for i in range(0, mb * MB, MB)]
    tok = tokenizers.gpt2()
    rates: dict[str, list[float]] = {"1 thread": [], f"{cores} threads": [], f"{cores} processes": []}
    in_worker = functools.partial(corpora._encode_in_worker, dtype="uint32")  # what prepare's workers run
    with cf.ThreadPoolExecutor(cores) as threads, cf.ProcessPoolExecutor(
            cores, mp_context=multiprocessing.get_context("spawn"), initializer=corpora._start_worker,
            initargs=(tok.to_json(),)) as procs:
        list(procs.map(in_worker, blocks[:cores]))  # started and warm
        for _ in range(rounds):
            for name, run in (("1 thread", lambda: [tok.encode_array(b) for b in blocks]),
                              (f"{cores} threads", lambda: list(threads.map(tok.encode_array, blocks))),
                              (f"{cores} processes", lambda: list(procs.map(in_worker, blocks)))):
                tick = time.perf_counter()
                run()
                rates[name].append(mb / (time.perf_counter() - tick))
    return {k: statistics.median(v) for k, v in rates.items()}


def prepare_cmd(corpus: str, spec: str, data_dir: str) -> list[str]:
    return [sys.executable, "-m", "gptjax", "prepare", f"--input={corpus}", f"--tokenizer={spec}",
            f"--data_dir={data_dir}"]


SECOND_START = ("import json, sys, time; tick = time.perf_counter(); from gptjax import data; "
                "from gptjax.config import DataConfig; p = data.prepare(DataConfig(input=sys.argv[1], "
                "tokenizer=sys.argv[2], data_dir=sys.argv[3])); x = p.tokens('train'); n = len(x); "
                "print(json.dumps({'seconds': time.perf_counter() - tick, 'tokens': n}))")


def measure(opts, s, work: str, text: str) -> list[dict]:
    rows = []
    cores = len(os.sched_getaffinity(0))
    raw_text = (text * (s["raw_mb"] * MB // len(text) + 1))[: s["raw_mb"] * MB]
    for kind, mb in [(k, int(x)) for k in str(opts.extra["kinds"]).split(",")
                     for x in str(opts.extra["sizes"]).split(",")]:
        corpus = make_corpus(work, text, mb, kind)
        size = os.path.getsize(corpus)
        for spec in str(opts.extra["tokenizers"]).split(","):
            if kind == "jsonl" and spec != "gpt2":
                continue  # documents need an end-of-text token
            impls = [("streaming", None)]
            if opts.extra["old"] and mb <= s["old_max_mb"] and kind == "text":
                impls.append(("whole text (old)", opts.extra["old"]))
            for impl, cwd in impls:
                raw_before = raw_rate(raw_text) if spec == "gpt2" else None
                cache = tempfile.mkdtemp(dir=work)
                r = run_measured(prepare_cmd(corpus, spec, cache), cwd=cwd)
                raw_after = raw_rate(raw_text) if spec == "gpt2" else None
                raw = (raw_before + raw_after) / 2 if spec == "gpt2" else None
                row = {"impl": impl, "kind": kind, "mb": size / MB, "spec": spec, "wall": r["wall"], "cpu": r["cpu"],
                       "peak_rss": r["peak_rss"], "raw": raw, "raw_before": raw_before, "raw_after": raw_after,
                       "code": r["code"]}
                if r["code"] == 0:
                    meta = json.loads(r["out"][: r["out"].rindex("}") + 1])
                    row["tokens"] = meta["train_tokens"] + meta["val_tokens"]
                    if impl == "streaming":
                        second = run_measured([sys.executable, "-c", SECOND_START, corpus, spec, cache])
                        row["second_start"] = json.loads(second["out"])["seconds"]
                else:
                    row["error"] = (r["err"].strip().splitlines() or ["?"])[-1][:200]
                shutil.rmtree(cache, ignore_errors=True)
                rows.append(row)
                print(json.dumps(row), flush=True)
        os.remove(corpus)
    for row in rows:
        row["cores"] = cores
    return rows


def table(page, rows) -> None:
    out = []
    for r in rows:
        if r["code"]:
            out.append([r["kind"], f"{r['mb']:,.0f}", r["spec"], r["impl"], "failed: " + r.get("error", ""), "", "", "",
                        "", "", ""])
            continue
        rate = r["mb"] / r["wall"]
        vs_raw = f"{rate * MB / (r['raw'] * r['cores']):.2f}" if r["raw"] else ""
        raw = f"{r['raw'] / MB:.2f}" if r["raw"] else ""
        out.append([r["kind"], f"{r['mb']:,.0f}", r["spec"], r["impl"], f"{r['wall']:.1f}", f"{r['cpu']:.1f}",
                    f"{rate:.1f}",
                    f"{r['tokens'] / r['wall'] / 1e6:.2f}", f"{r['peak_rss'] / 2**20:,.0f}",
                    f"{r['peak_rss'] / (r['mb'] * MB):.2f}", raw + (f" ({vs_raw})" if vs_raw else ""),
                    f"{r['second_start']:.2f}" if "second_start" in r else ""])
    page.table(["input", "corpus MB", "tokenizer", "implementation", "wall s", "CPU s", "MB/s", "M tokens/s",
                "peak RSS MiB", "RSS per input byte", "tiktoken 1-thread MB/s (ratio to it x cores)",
                "second start s"], out)


def plot(page, rows) -> None:
    plt = research.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for impl, marker in (("streaming", "o"), ("whole text (old)", "s")):
        for spec, style in (("char", "-"), ("gpt2", "--")):
            pts = [(r["mb"], r["peak_rss"] / 2**20) for r in rows if r["impl"] == impl and r["spec"] == spec
                   and not r["code"] and r["kind"] == "text"]
            if pts:
                ax.plot(*zip(*pts), style, marker=marker, label=f"{impl}, {spec}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("corpus size (MB)")
    ax.set_ylabel("peak resident memory (MiB)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    page.figure(fig, "rss.png", "Peak resident memory of `gptjax prepare` (process and workers) against corpus size")


def extrapolate(page, rows) -> None:
    best = max((r for r in rows if r["impl"] == "streaming" and r["spec"] == "gpt2" and not r["code"]
                and r["kind"] == "jsonl"),
               key=lambda r: r["mb"], default=None)
    if best is None:
        return
    rate = best["mb"] * MB / best["wall"]
    efficiency = rate / (best["raw"] * best["cores"])
    hours_here = OPENWEBTEXT_BYTES / rate / 3600
    hours_32 = OPENWEBTEXT_BYTES / (best["raw"] * 32 * efficiency) / 3600
    page.text("## OpenWebText, extrapolated (not measured)",
              f"At the {best['mb']:,.0f} MB JSON Lines gpt2 run's rate ({rate / MB:.1f} MB/s on {best['cores']} cores, "
              f"{efficiency:.2f} of tiktoken's one-thread rate times the cores), nanoGPT's ~40 GB OpenWebText would "
              f"take about {hours_here:.1f} h here. A 32-core host at the same per-core rate and efficiency: about "
              f"{hours_32 * 60:.0f} min. Both assume the rate stays flat in corpus size (the table shows whether it "
              "does up to the largest size measured) and a disk that keeps up (40 GB read twice: once to hash and "
              "count, once to encode).")


def run(argv: list[str]) -> None:
    opts = research.options(argv, "data_scale", seeds=1,
                            extra={"sizes": "", "tokenizers": "char,gpt2", "kinds": "text,jsonl", "old": "",
                                   "work": ""})
    s = settings(opts)
    if not opts.extra["sizes"]:
        opts = research.Options(**{**opts.__dict__, "extra": {**opts.extra, "sizes": s["sizes"]}})
    text = data.read_text(data.corpus_path(research.make_config(opts, "shakespeare_char_cpu").data))
    page = research.Page(opts, "Preparing corpora of every size: time, throughput and memory")
    work = tempfile.mkdtemp(prefix="gptjax-data-scale-", dir=opts.extra["work"] or None)
    try:
        rows = measure(opts, s, work, text)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    page.text("Each row: one `python -m gptjax prepare --input=CORPUS --tokenizer=T --data_dir=FRESH` process. "
              "\"streaming\" is this checkout; \"whole text (old)\" is the checkout given by --old, run from its "
              "own directory. The tiktoken column is GPT-2's `encode_ordinary` on one thread over "
              f"{s['raw_mb']} MB of the same text, measured just before and just after that row's run and averaged "
              "(the host's rate drifts: both are in rows.json); the ratio in brackets is the row's MB/s over that "
              "rate times the cores. \"Second start\" is a new "
              "process finding the prepared cache and opening its token file: imports, fingerprint, index, checks.")
    table(page, rows)
    cores = len(os.sched_getaffinity(0))
    tvp = threads_vs_processes(text * (s["raw_mb"] * MB // len(text) + 1), s["raw_mb"], cores)
    page.text("## Encoding on threads or processes",
              f"GPT-2's encoding (`encode_to_numpy`, as the workers call it) of {s['raw_mb']} MB in 1 MB blocks, "
              "median of 3 rounds, the three ways taken in turn in each round. tiktoken keeps part of its work under "
              "the GIL, so `prepare` encodes in processes.")
    page.table(["how", "MB/s", "x one thread"], [[k, f"{v:.2f}", f"{v / tvp['1 thread']:.2f}"] for k, v in tvp.items()])
    plot(page, rows)
    extrapolate(page, rows)
    page.write()
    with open(os.path.join(opts.figures_dir, "rows.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    sys.exit(research.main(run))
