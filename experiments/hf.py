"""GPT-2 in three implementations: gptjax, its PyTorch twin (gptjax/reference/nanogpt.py) and transformers' own
GPT2LMHeadModel. How far apart their logits and gradients are on GPT-2 small's shape, each against transformers in
float64 (the definition); what ignoring GPT-2's tanh GELU costs (nanoGPT's from_pretrained loads GPT-2 into its exact
GELU); and the harness: the same training steps timed in each (`gptjax bench` with the hf_* modes).

    python experiments/hf.py --input=../shared/data/tinyshakespeare/input.txt [--quick | --smoke]

The weights are gptjax's GPT-2 initialisation (nanoGPT's), seed 1337: no pretrained weights can be downloaded on this
project's machines. Needs torch and transformers (`pip install 'gptjax[hf]'`).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys

import numpy as np

# This script's directory holds experiments/tokenizers.py, which would shadow the tokenizers package transformers
# imports: take the directory off the path (this script imports no sibling).
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

from gptjax import bench, model, research  # noqa: E402
from gptjax.config import ModelConfig  # noqa: E402


def _gptjax(c: ModelConfig, params, x, y):
    """(logits, loss, gradients by transformers' names) of gptjax's GPT."""
    import jax
    import jax.numpy as jnp

    from gptjax import evaluate
    from gptjax.weights import hf

    graphdef = model.graphdef_for(c)
    logits = np.asarray(model.apply(graphdef, params, jnp.asarray(x)))
    loss, grads = jax.value_and_grad(lambda p: evaluate.loss_fn(graphdef, p, jnp.asarray(x), jnp.asarray(y)))(params)
    return logits, float(loss), hf.tensors_from_params(grads, c)


def _torch(net, x, y, names):
    """(logits, loss, gradients renamed by `names`) of a torch module called as module(idx, targets)."""
    import torch

    net.zero_grad()
    logits, loss = net(torch.from_numpy(x), torch.from_numpy(y))
    loss.backward()
    grads = {names(k): p.grad.double().numpy() for k, p in net.named_parameters() if p.grad is not None}
    return logits.detach().double().numpy(), loss.item(), grads


def parity(c: ModelConfig, B: int, T: int) -> tuple[list[list[str]], float, float]:
    """(the table's rows: each implementation's largest logit, loss and gradient difference from transformers in
    float64; the largest logit; the loss)."""
    from gptjax.reference import hf_gpt2
    from gptjax.reference.convert import to_torch_state_dict
    from gptjax.reference.nanogpt import GPT

    params = model.split(model.create(c, seed=1337))[1]
    rng = np.random.RandomState(0)
    x = rng.randint(0, c.vocab_size, (B, T)).astype(np.int64)
    y = np.roll(x, -1, axis=1)
    hf32 = hf_gpt2.from_params(params, c, attn_implementation="eager")
    hf64 = copy.deepcopy(hf32).double()
    strip = lambda k: k.removeprefix("model.")  # noqa: E731  HFGPT's module holds GPT2LMHeadModel as .model
    ref_logits, ref_loss, ref_grads = _torch(hf64, x, y, strip)
    twin = GPT(c)
    twin.load_state_dict(to_torch_state_dict(params, c))
    runs = {
        "gptjax (float32)": _gptjax(c, params, x, y),
        "PyTorch twin (float32)": _twin_grads(twin, x, y, c),
        "transformers (float32)": _torch(hf32, x, y, strip),
        "gptjax with the exact GELU (nanoGPT's from_pretrained)": _gptjax(
            dataclasses.replace(c, activation="gelu"), params, x, y),
    }
    scale = float(np.abs(ref_logits).max())
    rows = []
    for name, (logits, loss, grads) in runs.items():
        d_logits = float(np.abs(logits - ref_logits).max())
        rel = max(float(np.abs(grads[k] - g).max() / np.abs(g).max()) for k, g in ref_grads.items())
        rows.append([name, f"{d_logits:.2e}", f"{d_logits / scale:.1e}", f"{abs(loss - ref_loss):.1e}", f"{rel:.1e}"])
    return rows, scale, ref_loss


def _twin_grads(twin, x, y, c: ModelConfig):
    """The twin's (logits, loss, gradients by transformers' names), its [out, in] weights turned to [in, out]."""
    import torch

    from gptjax.weights import hf, nanogpt

    twin.zero_grad()
    logits, loss = twin(torch.from_numpy(x), torch.from_numpy(y))
    loss.backward()
    sd = {k: p.grad.double().numpy() for k, p in twin.named_parameters()}
    if c.tie_weights:
        sd["lm_head.weight"] = sd["transformer.wte.weight"]
    named = {}  # gptjax name -> gradient in gptjax's layout
    for key, name, transposed in nanogpt.layout(c):
        named[name] = sd[key].T if transposed else sd[key]
    grads = {key: named[name].T if transposed else named[name] for key, name, transposed in hf.layout(c)}
    return logits.detach().double().numpy(), loss.item(), grads


def run(argv: list[str]) -> None:
    opts = research.options(argv, "hf", seeds=1)
    page = research.Page(opts, "GPT-2 in three implementations: gptjax, the PyTorch twin and transformers")
    shape = opts.pick(dict(n_layer=12, n_head=12, n_embd=768), dict(n_layer=12, n_head=12, n_embd=768),
                      dict(n_layer=2, n_head=2, n_embd=32))
    B, T = opts.pick((2, 256), (1, 64), (2, 16))
    c = ModelConfig(vocab_size=50257, block_size=1024 if opts.mode != "smoke" else 64, bias=True, dropout=0.0,
                    activation="gelu_tanh", **shape)
    rows, scale, loss = parity(c, B, T)
    page.text(
        f"GPT-2's shape ({c.n_layer} layers x {c.n_head} heads x {c.n_embd}, vocabulary {c.vocab_size}, biases, "
        f"tied head, GELU in its tanh form), gptjax's initialisation at seed 1337, one batch of {B} x {T} random "
        "tokens, targets the next tokens. Each implementation against transformers' GPT2LMHeadModel in float64 "
        f"(eager attention): the largest logit difference (the largest logit is {scale:.3f}), the loss difference "
        f"(the loss is {loss:.4f}) and, over every parameter, the largest gradient difference as a fraction of that "
        "parameter's largest gradient.")
    page.table(["implementation", "largest logit difference", "relative to the largest logit", "loss difference",
                "largest gradient difference (relative)"], rows)
    steps = opts.pick(10, 4, 2)
    bench_out = os.path.join(opts.figures_dir, "bench")
    argv = {"modes": "jax_jit,torch_eager,torch_compile,hf_eager,hf_compile", "steps": str(steps),
            "eager_steps": "2", "warmup": str(opts.pick(2, 1, 0)), "repeats": str(opts.pick(5, 3, 1)),
            "rounds": str(opts.pick(2, 1, 1)),  # the modes in turn, twice: this host's speed drifts by minutes
            "out": bench_out}
    config = research.make_config(opts, "shakespeare_char_cpu" if opts.mode != "smoke" else "tiny", bias=True,
                                  activation="gelu_tanh")
    bench.run(config, bench.parse_options(argv), command="gptjax bench --config=" + (
        "shakespeare_char_cpu" if opts.mode != "smoke" else "tiny") + " --bias=true --activation=gelu_tanh " +
        " ".join(f"--{k}={v}" for k, v in argv.items() if k != "out"))
    with open(os.path.join(bench_out, "results.md")) as f:
        table = [line for line in f.read().splitlines() if line.startswith("|")]
    m = config.model
    page.text(f"The harness: `gptjax bench` training the `{'shakespeare_char_cpu' if opts.mode != 'smoke' else 'tiny'}"
              f"` model with biases and GPT-2's GELU ({m.n_layer} x {m.n_head} x {m.n_embd}, block {m.block_size}) in "
              "each implementation, each mode in a process of its own, the same initial weights and batches "
              f"(its full page: [{opts.script}/bench/results.md]({opts.script}/bench/results.md)).")
    page.lines += [*table, ""]
    page.text("The modes ran in turn, the rounds' repeats pooled; the min–max ranges show how far this host's speed "
              "moved during the run: differences inside them are not resolved here.")
    page.write()


if __name__ == "__main__":
    sys.exit(research.main(run))
