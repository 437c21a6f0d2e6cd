"""How does the CPU GPT's val loss scale with parameters and with tokens seen on tiny Shakespeare (char tokens)?

    python experiments/scaling.py --input=../shared/data/tinyshakespeare/input.txt [--quick | --smoke] [--seeds=N]

A diagonal of GPT sizes (n_embd x n_layer) trains with the shakespeare_char_cpu preset's optimizer and data shape
(block 64, batch 12, AdamW lr 1e-3 with warmup and cosine decay, dropout 0), every size for the same steps. Each
run's estimated val loss at every eval gives loss against tokens seen; the exact whole-split val loss of the final
parameters is set against the non-embedding parameter count and fitted with L = a*N^-alpha (+ c). On a GPU the
shakespeare_char shape (6 x 384) joins the grid.
"""

import dataclasses
import json
import math
import os
import sys

import jax
import numpy as np

from gptjax import data, model, research

# (n_embd, n_layer, n_head): a diagonal from 1 x 32 to the shakespeare_char_cpu preset's 4 x 128.
SIZES = [(32, 1, 4), (32, 2, 4), (64, 2, 4), (64, 4, 4), (128, 2, 4), (128, 4, 4)]
QUICK_SIZES = [(32, 1, 4), (64, 2, 4), (128, 4, 4)]
SMOKE_SIZES = [(16, 1, 2), (16, 2, 2)]  # one width: their parameter inits share compiles
GPU_SIZE = (384, 6, 6)  # the shakespeare_char preset's shape


def settings(opts) -> dict:
    steps = opts.pick(2000, 600, 4)
    return dict(block_size=64, batch_size=12, dropout=0.0, max_iters=steps, lr_decay_iters=steps,
                warmup_iters=opts.pick(100, 100, 2), eval_interval=opts.pick(125, 50, 2),
                eval_iters=opts.pick(20, 10, 1), keep_checkpoints=1)


def param_counts(config) -> tuple[int, int]:
    """(non-embedding parameters: no wte, no wpe; model.num_params: no wpe, the tied wte/lm_head counted once)."""
    vocab = data.prepare(config.data).meta["vocab_size"]
    params = model.abstract_params(dataclasses.replace(config.model, vocab_size=vocab))
    total = model.num_params(params)
    return total - model.param_names(params)["wte.weight"].size, total


def train_size(opts, size) -> dict:
    n_embd, n_layer, n_head = size
    config = research.make_config(opts, "shakespeare_char_cpu", n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                                  **settings(opts))
    non_emb, total = param_counts(config)
    runs = research.train_seeds(config, opts.seeds)
    tokens_per_step = config.train.batch_size * config.model.block_size
    print(f"{n_layer} x {n_embd}: N={non_emb:,}, exact val loss {research.pm(r['loss'] for r in runs)}, "
          f"{sum(r['wall_s'] for r in runs):.0f} s", flush=True)
    return {"size": size, "config": config, "N": non_emb, "total": total, "runs": runs,
            "tokens_per_step": tokens_per_step, "loss": float(np.mean([r["loss"] for r in runs]))}


def fit_pure(N, L) -> dict:
    """L = a * N^-alpha by least squares in log-log space."""
    slope, intercept = np.polyfit(np.log(N), np.log(L), 1)
    pred = math.exp(intercept) * N ** slope
    return {"a": math.exp(intercept), "alpha": -slope, "c": 0.0, "err": None, "pred": pred}


def fit_offset(N, L) -> dict | None:
    """L = a * N^-alpha + c (least squares in L, c in [0, min L)); None with fewer than 4 points."""
    if len(N) < 4:
        return None
    n0 = float(np.exp(np.log(N).mean()))  # fit in N / n0 so the three parameters have like scales
    x = N / n0
    try:
        from scipy.optimize import curve_fit

        f = lambda x, a, alpha, c: a * x ** -alpha + c  # noqa: E731
        p, cov = curve_fit(f, x, L, p0=[L.mean() - 0.9 * L.min(), 0.2, 0.9 * L.min()],
                           bounds=([0, 0, 0], [np.inf, 5, L.min()]), maxfev=20000)
        err = np.sqrt(np.diag(cov)) if np.all(np.isfinite(cov)) else np.full(3, np.inf)
    except ImportError:  # numpy only: the best c on a grid, a and alpha by log-log least squares for each c
        grid = np.linspace(0, L.min() * 0.999, 2000)
        fits = [np.polyfit(np.log(x), np.log(L - c), 1) for c in grid]
        sse = [np.sum((np.exp(b) * x ** s + c - L) ** 2) for (s, b), c in zip(fits, grid)]
        i = int(np.argmin(sse))
        p, err = np.array([math.exp(fits[i][1]), -fits[i][0], grid[i]]), None
    a, alpha, c = p
    out = {"a": a * n0 ** alpha, "alpha": alpha, "c": c, "pred": a * x ** -alpha + c, "err": None}
    if err is not None:
        out["err"] = {"a": err[0] * n0 ** alpha, "alpha": err[1], "c": err[2]}
    return out


def trust(fit: dict, L) -> str:
    """One sentence on whether the offset fit pins down alpha and c, from its standard errors."""
    n = len(L)
    if fit is None:
        return f"With {n} points the three-parameter fit is not attempted."
    if fit["err"] is None:
        return "No standard errors are available (numpy fallback), so the offset fit is descriptive only."
    lo, hi = fit["c"] - 2 * fit["err"]["c"], fit["c"] + 2 * fit["err"]["c"]
    why = []
    if not lo > 0 or not hi < min(L):
        why.append(f"c ± 2 standard errors ({lo:.2f} to {hi:.2f}) is not inside (0, {min(L):.3f}), the range the "
                   "irreducible loss must lie in")
    if not fit["err"]["alpha"] < 0.25 * fit["alpha"]:
        why.append(f"alpha's standard error ({fit['err']['alpha']:.2g}) is over a quarter of alpha")
    if why:
        return (f"The offset fit is NOT trustworthy: {'; '.join(why)} ({n} points, {n - 3} degrees of freedom, "
                "one run per size). The irreducible term is not identified by these points; read the pure power "
                "law, whose exponent is then only a local slope over this range of N.")
    return (f"The offset fit pins c to {lo:.2f}-{hi:.2f} (±2 standard errors) and alpha within a quarter, but with "
            f"{n} points ({n - 3} degrees of freedom) and one run per size it is a description, not a law.")


def fmt(fit, key, digits=3) -> str:
    if fit is None:
        return "-"
    e = fit["err"][key] if fit["err"] else None
    return f"{fit[key]:.{digits}g}" + (f" ± {e:.2g}" if e is not None else "")


def curves(results) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(label, tokens seen, estimated val loss, estimated train loss) per size, seeds averaged, step 0 dropped."""
    out = []
    for r in results:
        hist = [[row for row in run["history"] if row["step"] > 0] for run in r["runs"]]
        tokens = np.array([row["step"] for row in hist[0]]) * r["tokens_per_step"]
        val = np.mean([[row["val_loss"] for row in h] for h in hist], axis=0)
        tr = np.mean([[row["train_loss"] for row in h] for h in hist], axis=0)
        out.append((label(r), tokens, val, tr))
    return out


def label(r) -> str:
    n_embd, n_layer, _ = r["size"]
    return f"{n_layer}x{n_embd} (N={r['N'] / 1e3:.0f}k)"


def plain_log_ticks(ax):
    from matplotlib.ticker import FormatStrFormatter

    ax.yaxis.set_major_formatter(FormatStrFormatter("%.2f"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2f"))


def plot_params(plt, results, pure, off):
    N = np.array([r["N"] for r in results], float)
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ax.scatter([r["N"]] * len(r["runs"]), [x["loss"] for x in r["runs"]], color="C0", zorder=3)
    grid = np.geomspace(N.min() / 1.5, N.max() * 1.5, 100)
    ax.plot(grid, pure["a"] * grid ** -pure["alpha"], "C1--", label=f"a·N^-α, α={pure['alpha']:.3f}")
    if off is not None:
        ax.plot(grid, off["a"] * grid ** -off["alpha"] + off["c"], "C2:",
                label=f"a·N^-α + c, α={off['alpha']:.3f}, c={off['c']:.3f}")
    ax.set(xscale="log", yscale="log", xlabel="non-embedding parameters N", ylabel="exact val loss (nats/char)")
    plain_log_ticks(ax)
    ax.legend(fontsize=8)
    return fig


def plot_tokens(plt, cs, epoch):
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, tokens, val, _) in enumerate(cs):
        ax.plot(tokens, val, color=f"C{i}", marker=".", label=name)
    if epoch <= cs[0][1][-1]:
        ax.axvline(epoch, color="gray", lw=0.8, ls="--", label="one epoch of train tokens")
    ax.set(xscale="log", yscale="log", xlabel="tokens seen", ylabel="estimated val loss (nats/char)")
    plain_log_ticks(ax)
    ax.legend(fontsize=8)
    return fig


def finding(results, pure, off, cs) -> str:
    L = [r["loss"] for r in results]
    mono = all(b < a for a, b in zip(L, L[1:]))
    order = "falls with every step up in N" if mono else "does not fall monotonically with N"
    s = [f"At a fixed budget of {cs[0][1][-1]:,} tokens, the exact val loss {order}: {L[0]:.3f} at "
         f"N={results[0]['N']:,} to {L[-1]:.3f} at N={results[-1]['N']:,} "
         f"({results[-1]['N'] / results[0]['N']:.0f}x the parameters). The pure power law gives "
         f"alpha = {pure['alpha']:.3f} (max |residual| {np.max(np.abs(np.array(L) - pure['pred'])):.3f} nats)."]
    if off is not None:
        s.append(f"The offset fit gives alpha = {fmt(off, 'alpha')}, c = {fmt(off, 'c')} (max |residual| "
                 f"{np.max(np.abs(np.array(L) - off['pred'])):.3f}).")
    s.append(trust(off, L))
    big = cs[-1]
    k = max(1, len(big[1]) // 4)
    drop, low = big[2][-k - 1] - big[2][-1], big[2].min()
    gaps = [c[2][-1] - c[3][-1] for c in cs]
    grows = all(b > a for a, b in zip(gaps, gaps[1:]))
    if big[2][-1] > low + 0.01:
        state = f"val loss has turned up ({big[2][-1]:.3f} against a low of {low:.3f}): it is data-limited"
    elif drop > 0.01:
        state = (f"val loss was still falling ({drop:.3f} over the last quarter of its tokens), so at "
                 f"{big[1][-1]:,} tokens it is not yet data-limited")
    else:
        state = f"val loss had flattened ({drop:.3f} over the last quarter of its tokens)"
    s.append(f"For the largest model, the {state}; its train-val gap at the end is {gaps[-1]:.3f} (the smallest's is "
             f"{gaps[0]:.3f}{', and it widens with every step up in N' if grows else ''}): the bigger models fit the "
             "training text more closely than the held-out text." if gaps[-1] > gaps[0] + 0.02 else
             f"For the largest model, the {state}; its train-val gap at the end is {gaps[-1]:.3f}.")
    worst = max(abs(c[2][-1] - r["loss"]) for r, c in zip(results, cs))
    s.append(f"The last estimate ({results[0]['config'].train.eval_iters} batches) is within {worst:.3f} nats of "
             "the exact whole-split loss for every size.")
    return " ".join(s)


def doublings(results) -> list[tuple[str, dict, dict]]:
    """(what doubled, smaller, larger) for every pair of sizes that differ by a doubling of depth or of width alone."""
    out = []
    for a in results:
        for b in results:
            (da, la, _), (db, lb, _) = a["size"], b["size"]
            if da == db and lb == 2 * la:
                out.append(("depth", a, b))
            elif la == lb and db == 2 * da:
                out.append(("width", a, b))
    return out


def doubling_text(pairs) -> str:
    """Loss drop per doubling of N, averaged over the width doublings and over the depth doublings."""
    per = {w: np.mean([(a["loss"] - b["loss"]) / math.log2(b["N"] / a["N"]) for what, a, b in pairs if what == w])
           for w in ("width", "depth") if any(what == w for what, _, _ in pairs)}
    if len(per) < 2:
        return ""
    text = (f"Per doubling of N, widening lowered the exact val loss by {per['width']:.3f} nats on average and "
            f"deepening by {per['depth']:.3f}")
    if max(per.values()) > 1.5 * min(per.values()):
        return text + f": at this budget {max(per, key=per.get)} bought more per parameter, a hint " \
                      "that N alone does not set the loss across these shapes (one seed per size: the seed-to-seed " \
                      "spread is not measured)."
    return text + ": about the same, as a law in N alone would have it."


def setup_text(opts, results, cs, epoch) -> str:
    t, m = results[0]["config"].train, results[0]["config"].model
    tokens = cs[0][1][-1]
    return (f"{len(results)} sizes (n_layer x n_embd, n_head as given), each trained for {t.max_iters} steps of batch "
            f"{t.batch_size} x block {m.block_size} = {tokens:,} tokens ({tokens / epoch:.3g} epochs of the "
            f"{epoch:,}-token train split; the same for every size), with the shakespeare_char_cpu preset's "
            f"optimizer: AdamW lr {t.learning_rate:g}, {t.warmup_iters} warmup steps, cosine decay to {t.min_lr:g} "
            f"at step {t.lr_decay_iters}, weight decay {t.weight_decay:g}, betas ({t.beta1:g}, {t.beta2:g}), clip "
            f"{t.grad_clip:g}; dropout {m.dropout:g}, bias {m.bias}, tied embeddings {m.tie_weights}. "
            f"{len(opts.seeds)} seed(s) per size (seeds {', '.join(map(str, opts.seeds))}). The curve is the "
            f"estimated val loss every {t.eval_interval} steps ({t.eval_iters} random batches = "
            f"{t.eval_iters * t.batch_size * m.block_size:,} tokens per estimate). The final loss is exact: the last "
            "parameters on every next-token prediction of the val split (research.train_seeds). N is the "
            "non-embedding parameter count: model.num_params (which leaves out wpe) minus the tied wte/lm_head "
            "matrix; the table gives model.num_params too. The learning rate is the preset's for every size, not "
            "tuned per size.")


def size_rows(results, cs) -> list[list]:
    return [[f"{r['size'][1]} x {r['size'][0]}, {r['size'][2]}", f"{r['N']:,}", f"{r['total']:,}", f"{c[1][-1]:,}",
             research.pm(x["loss"] for x in r["runs"]), research.pm((x["bits_per_char"] for x in r["runs"]), 3),
             f"{c[2][-1]:.4f}", f"{c[3][-1]:.4f}", f"{sum(x['wall_s'] for x in r['runs']):.0f}"]
            for r, c in zip(results, cs)]


def fit_section(page, N, L, pure, off) -> None:
    page.text("## Fits of exact val loss against N")
    page.table(["form", "a", "alpha", "c", "RMS residual"],
               [[name, fmt(f, "a"), fmt(f, "alpha"), "0" if f is pure else fmt(f, "c"),
                 f"{np.sqrt(np.mean((L - f['pred']) ** 2)):.4f}" if f is not None else "-"]
                for name, f in (("L = a·N^-alpha (log-log least squares)", pure), ("L = a·N^-alpha + c", off))])
    page.table(["N", "exact val loss", "residual, pure", "residual, offset"],
               [[f"{int(n):,}", f"{y:.4f}", f"{y - pure['pred'][i]:+.4f}",
                 f"{y - off['pred'][i]:+.4f}" if off is not None else "-"] for i, (n, y) in enumerate(zip(N, L))])
    how = " ± is one standard error from scipy curve_fit's covariance." if off is not None and off["err"] else ""
    page.text(trust(off, L) + how)


def save_curves(opts, results) -> None:
    """Every run's eval rows and exact loss, as JSON beside the figures."""
    rows = [{"n_embd": r["size"][0], "n_layer": r["size"][1], "n_head": r["size"][2], "non_embedding_params": r["N"],
             "num_params": r["total"], "tokens_per_step": r["tokens_per_step"],
             "runs": [{k: x[k] for k in ("seed", "loss", "bits_per_char", "wall_s", "history")} for x in r["runs"]]}
            for r in results]
    os.makedirs(opts.figures_dir, exist_ok=True)
    with open(os.path.join(opts.figures_dir, "runs.json"), "w") as f:
        json.dump(rows, f, indent=1)


def run(argv):
    opts = research.options(argv, "scaling", seeds=1)
    page = research.Page(opts, "Scaling: val loss against parameters and tokens (char GPT, tiny Shakespeare)")
    on_gpu = jax.default_backend() == "gpu"
    sizes = opts.pick(SIZES, QUICK_SIZES, SMOKE_SIZES) + ([GPU_SIZE] if on_gpu and opts.mode != "smoke" else [])
    results = sorted((train_size(opts, s) for s in sizes), key=lambda r: r["N"])
    N, L = np.array([r["N"] for r in results], float), np.array([r["loss"] for r in results])
    pure, off, cs = fit_pure(N, L), fit_offset(N, L), curves(results)
    epoch = data.prepare(results[0]["config"].data).meta["train_tokens"]

    page.text("## Question", "How does a GPT's val loss on tiny Shakespeare (char tokens) fall as the model grows "
              "and as it sees more tokens, on this CPU? Is it a power law, and can the irreducible loss be seen?")
    page.text("## Setup", setup_text(opts, results, cs, epoch))
    page.table(["size (L x D, heads)", "N non-embedding", "model.num_params", "tokens seen", "exact val loss",
                "bits/char", "est. val (last)", "est. train (last)", "train wall (s)"], size_rows(results, cs))
    if not on_gpu:
        page.text(f"The shakespeare_char shape ({GPU_SIZE[1]} x {GPU_SIZE[0]}, {GPU_SIZE[2]} heads) on a GPU: "
                  "not measured: no GPU in this run.")
    pairs = doublings(results)
    if pairs:
        page.text("## What a doubling of depth or of width bought")
        page.table(["doubled", "from", "to", "N ratio", "exact val loss drop", "drop per doubling of N"],
                   [[w, label(a), label(b), f"{b['N'] / a['N']:.2f}", f"{a['loss'] - b['loss']:.4f}",
                     f"{(a['loss'] - b['loss']) / math.log2(b['N'] / a['N']):.4f}"]
                    for w, a, b in pairs])
        page.text(*[t for t in [doubling_text(pairs)] if t])
    fit_section(page, N, L, pure, off)
    plt = research.pyplot()
    page.figure(plot_params(plt, results, pure, off), "loss_vs_params.png",
                "Exact val loss against non-embedding parameters (log-log), with both fits.")
    page.figure(plot_tokens(plt, cs, epoch), "loss_vs_tokens.png",
                "Estimated val loss against tokens seen, one curve per size (log-log). Each curve is one run under "
                "its own cosine schedule, so a point before the end is not what a run stopped there would reach.")
    page.text("## Finding", " ".join(t for t in (finding(results, pure, off, cs), doubling_text(pairs)) if t))
    save_curves(opts, results)
    page.write()


if __name__ == "__main__":
    sys.exit(research.main(run))
