"""Does `gptjax eval` hold a split of any size in memory bounded by its batch? The exact loss of a tiny model over the
val and the train split of a corpus of about --mb MB (tiny Shakespeare repeated, char tokens): wall time and the
peak resident memory of the eval process, against the split's size.

    python experiments/eval_memory.py --input=../shared/data/tinyshakespeare/input.txt [--quick | --smoke]
        [--mb=560] [--batch_size=4096] [--work=DIR]
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile

from data_scale import MB, make_corpus, run_measured  # a sibling script: experiments/ is on the path

from gptjax import data, research


def run(argv: list[str]) -> None:
    opts = research.options(argv, "eval_memory", seeds=1, extra={"mb": 0, "batch_size": 4096, "work": ""})
    mb = opts.extra["mb"] or opts.pick(560, 110, 2)  # full: a train split of about 1 GB of uint16 tokens
    text = data.read_text(data.corpus_path(research.make_config(opts, "tiny").data))
    page = research.Page(opts, "Exact evaluation in memory bounded by its batch")
    work = tempfile.mkdtemp(prefix="gptjax-eval-memory-", dir=opts.extra["work"] or None)
    rows = []
    try:
        corpus = make_corpus(work, text, mb, "text")
        out, cache = os.path.join(work, "run"), os.path.join(work, "data")
        gptjax = [sys.executable, "-m", "gptjax"]
        r = run_measured(gptjax + ["train", "--config=tiny", f"--input={corpus}", f"--data_dir={cache}",
                                   f"--out_dir={out}", "--max_iters=2", "--eval_interval=1", "--eval_iters=1"])
        if r["code"]:
            raise SystemExit(f"train failed: {r['err'][-2000:]}")
        prep = data.Prepared(*_prepared(cache))
        for split in ("val", "train"):
            r = run_measured(gptjax + ["eval", f"--out_dir={out}", f"--split={split}",
                                       f"--batch_size={opts.extra['batch_size']}", f"--input={corpus}"],
                             env={**os.environ, "GPTJAX_DATA_DIR": cache})
            if r["code"]:
                raise SystemExit(f"eval failed: {r['err'][-2000:]}")
            tokens = int(prep.meta[f"{split}_tokens"])
            loss = re.search(r"loss ([0-9.]+)", r["out"])
            rows.append([split, f"{tokens:,}", f"{tokens * 2 / MB:,.0f}", f"{r['wall']:.1f}",
                         f"{r['peak_rss'] / 2**20:,.0f}", f"{r['peak_anon'] / 2**20:,.0f}",
                         f"{12 * tokens / 2**30:,.2f}", loss.group(1) if loss else "?"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    page.text(f"A `tiny` model trained 2 steps on a {mb:,} MB corpus, then `gptjax eval --split=S "
              f"--batch_size={opts.extra['batch_size']}` over each split, each a fresh process. Its peak resident "
              "memory is sampled every 20 ms (experiments/data_scale.py's run_measured): all of it, and its anonymous "
              "part, without the pages of mapped files (eval reads the token file with pread, so its pages stay in "
              "the page cache, not in the process). The second-to-last column is what the eval before streaming "
              "built before its first batch (int32 inputs and targets and a float32 mask, 12 bytes a token: its own "
              "memory pre-flight's figure), not measured.")
    page.table(["split", "tokens", "token file MB", "eval wall s", "peak RSS MiB", "of it anonymous MiB",
                "the old eval's arrays GiB", "loss"], rows)
    page.write()


def _prepared(cache: str) -> tuple[str, dict]:
    import json

    root = os.path.join(cache, "prepared")
    (name,) = [n for n in os.listdir(root) if n != "index" and not n.startswith(".")]
    with open(os.path.join(root, name, "meta.json")) as f:
        return os.path.join(root, name), json.load(f)


if __name__ == "__main__":
    sys.exit(research.main(run))
