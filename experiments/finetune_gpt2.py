"""nanoGPT's finetune recipe (config/finetune_shakespeare.py) in gptjax: OpenAI's GPT-2 finetuned on tiny Shakespeare
in GPT-2's tokens. Its settings: gpt2-xl, learning rate 3e-5 constant, batch 1 x 32 accumulated micro-batches, 20
iterations, a loss estimate every 5 (40 batches). The page gives the exact val loss before and after, the curve
and a sample.

    python experiments/finetune_gpt2.py --input=../shared/data/tinyshakespeare/input.txt [--model=gpt2-xl]
        [--quick | --smoke]

--model: gpt2 | gpt2-medium | gpt2-large | gpt2-xl (found in the Hugging Face cache) | a directory of its files |
random (a tiny random GPT-2 saved here first: for the smoke test). Where the weights are not on
disk the script says where it looked and how to get them, and stops (exit 2): it never downloads.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import tempfile

from gptjax import evaluate, research, sample, train
from gptjax.weights import hf

# nanoGPT's config/finetune_shakespeare.py (eval_iters, eval_interval, batch, accumulation, iterations, rate)
RECIPE = dict(eval_interval=5, eval_iters=40, batch_size=1, gradient_accumulation_steps=32, max_iters=20,
              learning_rate=3e-5, decay_lr=False, warmup_iters=0, dropout=0.0)


def random_gpt2(where: str) -> str:
    """A randomly initialised GPT-2 of a tiny shape (GPT-2's vocabulary and GELU, 64 positions) in Hugging Face's
    files, as `gptjax export --to=hf` writes them."""
    from gptjax import model
    from gptjax.config import ModelConfig

    c = ModelConfig(vocab_size=hf.GPT2_VOCAB, block_size=64, n_layer=2, n_head=2, n_embd=32, bias=True,
                    activation="gelu_tanh")
    params = model.split(model.create(c, seed=0))[1]
    path = os.path.join(where, "random-gpt2")
    os.makedirs(path)
    with open(os.path.join(path, hf.CONFIG), "w") as f:
        json.dump(hf.hf_config(c, gpt2_vocab=True), f)
    with open(os.path.join(path, hf.WEIGHTS), "wb") as f:
        hf.write_safetensors(hf.tensors_from_params(params, c), f)
    return path


def run(argv: list[str]) -> None:
    opts = research.options(argv, "finetune_gpt2", seeds=1, extra={"model": "gpt2-xl"})
    page = research.Page(opts, f"Finetuning {opts.extra['model']} on tiny Shakespeare (nanoGPT's recipe)")
    work = tempfile.mkdtemp(prefix="gptjax-finetune-")
    try:
        source = opts.extra["model"]
        if source == "random":
            source = random_gpt2(work)
        files = hf.locate(source, "model")  # one line (exit 2) where the weights are not on disk
        c, _ = hf.read_dir(files, tensors=False)
        block = opts.pick(c.block_size, min(c.block_size, 256), min(c.block_size, 32))
        recipe = {**RECIPE, **opts.pick({}, dict(max_iters=4, eval_interval=2, eval_iters=4,
                                                 gradient_accumulation_steps=4),
                                        dict(max_iters=2, eval_interval=1, eval_iters=1,
                                             gradient_accumulation_steps=2))}
        out = os.path.join(work, "run")
        config = research.make_config(opts, "gpt2", init_from=source, block_size=block, vocab_size=0, out_dir=out,
                                      **recipe)
        with contextlib.redirect_stdout(io.StringIO()):
            batch = opts.pick(8, 8, 64)  # windows per eval call
            before = evaluate.evaluate("", "val", batch, opts.input, init_from=source)
            summary = train.train(config, force=True, progress=False)
            after = evaluate.evaluate(out, "val", batch, which="latest")
            text = sample.sample(out, max_new_tokens=opts.pick(200, 60, 8), checkpoint="latest", seed=1337)[0]
        os.makedirs(opts.figures_dir, exist_ok=True)
        shutil.copy(os.path.join(out, "loss.png"), os.path.join(opts.figures_dir, "loss.png"))  # the run's own plot
    finally:
        shutil.rmtree(work, ignore_errors=True)
    page.text(f"`gptjax train --config=gpt2 --init_from={opts.extra['model']}` with nanoGPT's "
              "finetune_shakespeare.py settings" + ("" if opts.mode == "full" else f" cut down for the {opts.mode} "
                                                    "mode") + ": " + ", ".join(f"{k}={v}" for k, v in recipe.items())
              + f", block_size={block}. The exact val loss (every token of the val split, windows of the model's "
              "block) before and after.")
    page.table(["", "val loss (nats/token)", "bits/char"],
               [["pretrained", f"{before['loss']:.4f}", f"{before['bits_per_char']:.4f}"],
                [f"after {summary['steps']} iterations", f"{after['loss']:.4f}", f"{after['bits_per_char']:.4f}"]])
    page.link("loss.png", "Loss estimates while finetuning (the run's loss.png)")
    page.text("A sample after finetuning (temperature 0.8, top-k 200):")
    page.code(text)
    page.write()


if __name__ == "__main__":
    sys.exit(research.main(run))
