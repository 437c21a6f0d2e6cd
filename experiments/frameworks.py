"""Do gptjax and PyTorch train the same model to the same place, and which is faster? The seeds' bigram and
nanoGPT's CPU GPT, each trained in both frameworks from the same initial weights on the same batches.

    python experiments/frameworks.py --input=PATH/input.txt [--quick | --smoke] [--out=DIR]

gptjax runs its jitted train step (train.make_train_step); PyTorch runs the twin in gptjax/reference (eager, nanoGPT's
loop). The two trainings alternate in chunks of steps inside one process, so both see the same machine load. A third
run, gptjax with every initial weight one ulp away, shows how far rounding alone carries a training (the floor).
"""

import os
import sys
import time

# PyTorch's OpenMP threads spin while they wait; on a shared 2-core machine that spinning starves the process that
# holds the core (measured here under load: a 2-thread eager step over 10x slower). Passive waiting must be set
# before torch loads OpenMP, hence before the import.
TORCH_PREIMPORTED, OMP_SET_HERE = "torch" in sys.modules, "OMP_WAIT_POLICY" not in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from gptjax import data, evaluate, model, optim, research, train  # noqa: E402
from gptjax.reference import convert, parity  # noqa: E402
from gptjax.reference.nanogpt import configure_optimizers  # noqa: E402

CHUNKS = 8  # the trainings alternate this many times, so slow spells of a shared machine hit both


def prepared(opts, preset: str, **overrides):
    """(config with the corpus's vocab, train tokens, val tokens)."""
    prep = data.prepare(research.make_config(opts, preset).data)
    config = research.make_config(opts, preset, vocab_size=prep.meta["vocab_size"], **overrides)
    return config, prep.tokens("train"), prep.tokens("val")


def experiments(opts) -> dict:
    """name -> (config, train tokens, val tokens, the PyTorch optimizer as that experiment builds it)."""
    b_steps, g_steps = opts.pick(10000, 2000, 20), opts.pick(1000, 300, 10)
    bigram = prepared(opts, "bigram", max_iters=b_steps, eval_iters=opts.pick(200, 200, 2))
    gpt = prepared(opts, "shakespeare_char_cpu", max_iters=g_steps, lr_decay_iters=g_steps,
                   warmup_iters=opts.pick(100, 100, 2), eval_iters=opts.pick(20, 20, 2),
                   **opts.pick({}, {}, dict(n_layer=1, n_head=2, n_embd=32)))
    lr = bigram[0].train.learning_rate
    return {"seeds' bigram": (*bigram, lambda m: torch.optim.AdamW(m.parameters(), lr=lr)),  # as the seeds call it
            "CPU GPT": (*gpt, lambda m: configure_optimizers(m, gpt[0].train))}  # nanoGPT's groups


def alternate(config, tokens, step_fn, state, tm, opt, steps: int) -> dict:
    """Both trainings, chunk by chunk; each side's own wall time, its first step (gptjax: the compile) apart."""
    bounds = [0, 1, *sorted({1 + (steps - 1) * i // CHUNKS for i in range(1, CHUNKS + 1)})]
    out = {"loss_jax": [], "loss_torch": [], "norms": [], "jax_s": [], "torch_s": []}
    for start, stop in zip(bounds, bounds[1:]):
        tick = time.perf_counter()
        state, losses, norms = parity.jax_steps(step_fn, state, tokens, config, start, stop - start)
        jax.block_until_ready(state)
        out["jax_s"].append(time.perf_counter() - tick)
        tick = time.perf_counter()
        out["loss_torch"] += parity.torch_steps(tm, opt, tokens, config, start, stop - start)
        out["torch_s"].append(time.perf_counter() - tick)
        out["loss_jax"] += losses
        out["norms"] += norms
    out["state"] = state
    return out


def both(config, tokens, val_tokens, torch_optimizer) -> dict:
    """The same weights and batches in both frameworks, the one-ulp floor, and the val loss each lands on."""
    c, t = config.model, config.train
    assert c.dropout == 0.0, "dropout 0: the frameworks would draw different masks"
    graphdef, params = model.split(model.create(c, t.seed))
    tm = parity.load_twin(params, c)
    nudged = jax.tree.map(lambda x: jnp.nextafter(x, jnp.inf), params)  # before params are donated to the step
    tx = optim.make_optimizer(t, params)
    step_fn = train.make_train_step(graphdef, tx, t)
    r = alternate(config, tokens, step_fn, optim.init_state(params, tx), tm, torch_optimizer(tm), t.max_iters)
    _, r["loss_floor"], _ = parity.jax_steps(step_fn, optim.init_state(nudged, tx), tokens, config, 0, t.max_iters)
    final = convert.to_torch_state_dict(r["state"].params, c)
    r["params_diff"] = max(float((final[k] - p.detach()).abs().max()) for k, p in tm.state_dict().items())
    x, y = evaluate.eval_batches(val_tokens, t, c.block_size, "val", 0)
    r["val_jax"] = float(evaluate.make_estimate_loss(graphdef)(r["state"].params, x, y))
    with torch.no_grad():
        r["val_torch"] = float(np.mean([tm(*(torch.from_numpy(np.asarray(a, np.int64)) for a in xy))[1].item()
                                        for xy in zip(x, y)]))
    r["params"] = model.num_params(r["state"].params)
    return r


def plot(results: dict):
    plt = research.pyplot()
    fig, axes = plt.subplots(2, len(results), figsize=(6.5 * len(results), 7), squeeze=False, sharex="col")
    for col, (name, r) in enumerate(results.items()):
        steps = np.arange(len(r["loss_jax"]))
        top, bottom = axes[0][col], axes[1][col]
        top.plot(steps, r["loss_jax"], lw=1, label="gptjax (jit)")
        top.plot(steps, r["loss_torch"], lw=1, ls="--", label="PyTorch twin (eager)")
        top.set(title=f"{name}: train loss per step", ylabel="loss (nats/token)")
        top.legend()
        tiny = 1e-9  # exact agreement would vanish from a log axis
        for other, label, color in (("loss_torch", "|gptjax - PyTorch|", "C0"),
                                    ("loss_floor", "floor: |gptjax - gptjax, weights 1 ulp away|", "C1")):
            diff = np.abs(np.subtract(r["loss_jax"], r[other])) + tiny
            bottom.semilogy(steps, diff, lw=0.5, alpha=0.35, color=color)
            bottom.semilogy(steps, np.maximum.accumulate(diff), lw=1.5, color=color, label=f"{label}, running max")
        bottom.set(xlabel="step", ylabel="|difference in loss| (+1e-9)")
        bottom.legend(fontsize=8)
    return fig


def run(argv):
    opts = research.options(argv, "frameworks", seeds=1)
    page = research.Page(opts, "gptjax vs PyTorch: the same training in both frameworks")
    load_before = os.getloadavg()[0]
    results, configs = {}, {}
    for name, (config, tokens, val_tokens, torch_optimizer) in experiments(opts).items():
        print(f"{name}: {config.train.max_iters} steps in both frameworks", flush=True)
        results[name], configs[name] = both(config, tokens, val_tokens, torch_optimizer), config
    page.text("**Question.** Trained from the same initial weights on the same batches, do gptjax and its PyTorch "
              "twin follow the same loss curve, and how long does each take for the whole training on this CPU?")
    if opts.mode != "full":
        page.text(f"**This is a {opts.mode} run**: fewer steps than the recorded run"
                  f"{' and a 1-layer 32-wide GPT' if opts.mode == 'smoke' else ''}; the figures below are not the "
                  "recorded ones.")
    load_after = os.getloadavg()[0]
    busy = max(load_before, load_after) > os.cpu_count()
    page.text(setup_text(configs), f"Machine load (1-minute load average, {os.cpu_count()} cores): "
              f"{load_before:.1f} before the trainings, {load_after:.1f} after" + (
                  "; above the core count, so other processes shared the cores and the wall times are inflated."
                  if busy else "."))
    page.table(["experiment", "model", "params", "batch x block", "steps", "optimizer"],
               [[name, shape(c), f"{results[name]['params']:,}", f"{c.train.batch_size} x {c.model.block_size}",
                 c.train.max_iters, optimizer_text(c)] for name, c in configs.items()])
    page.table(["experiment", "max abs diff, train loss (all steps)", "floor (1 ulp, gptjax alone)",
                "max abs diff, final params", "final train loss: gptjax / PyTorch",
                "val loss (eval_iters batches): gptjax / PyTorch", "clipped steps"], [diff_row(n, r, c) for (
                    n, r), c in zip(results.items(), configs.values())])
    page.table(["experiment", "gptjax wall, whole training", "gptjax first step (compile)",
                "gptjax ms/step after", f"PyTorch wall ({torch.get_num_threads()} threads)", "PyTorch first step",
                "PyTorch ms/step after", "PyTorch / gptjax (whole)", "PyTorch / gptjax (after first)"],
               [time_row(n, r) for n, r in results.items()])
    page.figure(plot(results), "loss_curves.png", "Top: train loss per step, gptjax and the PyTorch twin overlaid. "
                "Bottom: |difference in loss| per step (faint) and its running maximum (bold), log scale, against the "
                "floor: gptjax against itself with every initial weight one ulp away.")
    page.text("**Finding.** " + " ".join(finding(results)))
    page.write()


def shape(c) -> str:
    if c.model.model == "bigram":
        return f"bigram, {c.model.vocab_size} x {c.model.vocab_size} table"
    return f"GPT {c.model.n_layer} x {c.model.n_head} x {c.model.n_embd}, no biases, tied head"


def optimizer_text(c) -> str:
    t = c.train
    if not t.decay_lr:
        return f"torch.optim.AdamW(lr={t.learning_rate:g}) defaults / the `bigram` preset; no clipping"
    return (f"AdamW lr {t.learning_rate:g} (warmup {t.warmup_iters}) -> {t.min_lr:g} cosine at step "
            f"{t.lr_decay_iters}, betas ({t.beta1}, {t.beta2}), weight decay {t.weight_decay:g} on >= 2-D, clip "
            f"{t.grad_clip:g}")


def setup_text(configs: dict) -> str:
    return ("**What is compared.** For each experiment one set of initial weights, drawn by gptjax at seed "
            f"{next(iter(configs.values())).train.seed}, is copied into the PyTorch twin "
            "(`gptjax/reference/`: `bigram.py`, `nanogpt.py`, weights through `convert.py`); both then take the "
            "same optimizer steps on the same batches (`data.get_batch`, a pure function of seed and step), built "
            "by the parity suite's `reference.parity.jax_steps` / `torch_steps`. Dropout is 0, so there is no "
            "random-number difference; everything is float32 on the CPU. gptjax: its jitted train step "
            "(`train.make_train_step`) on one XLA CPU device. PyTorch "
            f"{torch.__version__}: eager, {torch.get_num_threads()} intra-op threads, {omp_policy()}, AdamW's "
            "per-tensor loop (PyTorch's default on a CPU). Both read the loss back to the host at every step (to "
            "record the curve), which `gptjax train` avoids by fetching it a step late. The two trainings alternate in "
            f"{CHUNKS} chunks of steps in one process; each side's wall time is the sum of its own chunks. The "
            "val loss is each framework's mean over the same eval_iters validation batches after the last step.")


def omp_policy() -> str:
    if TORCH_PREIMPORTED:
        return "OpenMP wait policy as torch was loaded before this script"
    why = " (set by this script: spinning threads starve each other when the cores are shared)"
    return f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}" + (why if OMP_SET_HERE else "")


def diff_row(name, r, c) -> list:
    curve = float(np.max(np.abs(np.subtract(r["loss_jax"], r["loss_torch"]))))
    floor = float(np.max(np.abs(np.subtract(r["loss_jax"], r["loss_floor"]))))
    clipped = sum(n > c.train.grad_clip for n in r["norms"]) if c.train.grad_clip else "no clipping"
    return [name, f"{curve:.1e}", f"{floor:.1e}", f"{r['params_diff']:.1e}",
            f"{r['loss_jax'][-1]:.4f} / {r['loss_torch'][-1]:.4f}", f"{r['val_jax']:.4f} / {r['val_torch']:.4f}",
            clipped]


def timing(r, side: str) -> tuple[float, float, float]:
    """(whole wall s, first step s, ms per step after the first)."""
    chunks, steps = r[f"{side}_s"], len(r["loss_jax"])
    return sum(chunks), chunks[0], 1e3 * sum(chunks[1:]) / max(steps - 1, 1)


def time_row(name, r) -> list:
    (jw, jf, jm), (tw, tf, tms) = timing(r, "jax"), timing(r, "torch")
    return [name, f"{jw:.1f} s", f"{jf:.2f} s", f"{jm:.2f}", f"{tw:.1f} s", f"{tf:.3f} s", f"{tms:.2f}",
            f"{tw / jw:.2f}x", f"{tms / jm:.2f}x"]


def finding(results: dict) -> list[str]:
    out = []
    for name, r in results.items():
        curve = float(np.max(np.abs(np.subtract(r["loss_jax"], r["loss_torch"]))))
        floor = float(np.max(np.abs(np.subtract(r["loss_jax"], r["loss_floor"]))))
        (jw, _, jm), (tw, _, tms) = timing(r, "jax"), timing(r, "torch")
        where = "within" if curve <= floor else f"{curve / max(floor, 1e-12):.1f}x above"
        faster = "gptjax" if jw < tw else "PyTorch"
        steady = "gptjax" if jm < tms else "PyTorch"
        out.append(f"{name}: over {len(r['loss_jax'])} steps the two loss curves differ by at most {curve:.1e} nats "
                   f"({where} the {floor:.1e} that one ulp on the initial weights causes in gptjax alone); the "
                   f"final parameters differ by at most {r['params_diff']:.1e}, and the val losses are "
                   f"{r['val_jax']:.4f} (gptjax) and {r['val_torch']:.4f} (PyTorch). The whole training took "
                   f"{jw:.1f} s in gptjax ({timing(r, 'jax')[1]:.1f} s of it the first step, which compiles) and "
                   f"{tw:.1f} s in PyTorch: {faster} is {max(jw, tw) / min(jw, tw):.2f}x faster end to end; after "
                   f"the first step {steady} is {max(jm, tms) / min(jm, tms):.2f}x faster per step ({jm:.2f} vs "
                   f"{tms:.2f} ms).")
    return out


if __name__ == "__main__":
    sys.exit(research.main(run))
