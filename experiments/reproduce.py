"""Does gptjax reproduce its anchor numbers? The seeds' bigram, nanoGPT's CPU run and (on a GPU) the lecture's
gpt.py and nanoGPT's shakespeare_char, each over seeds, against the loss each source reports.

    python experiments/reproduce.py --input=PATH/input.txt [--quick | --smoke] [--seeds=3] [--out=DIR]

Each anchor is its gptjax preset trained once per seed; we record the best estimated val loss (the figure nanoGPT
and the lecture print: the mean of eval_iters random val batches) and the exact loss of the final weights over the
whole val split (nats/token and bits/char). The GPU anchors run only when jax's default backend is a GPU.
"""

import sys

import jax
import numpy as np

from gptjax import data, research

TOLERANCE = 0.02  # nats: a point reference counts as reproduced when our mean lies within this of it


# name, preset, reference (a value, or a (low, high) range), its source, needs a GPU
ANCHORS = [
    ("seeds' bigram", "bigram", (2.45, 2.55),
     "the seed notebooks' bigram (batch 32, block 8, AdamW 1e-3, 10,000 steps); its loss ends ≈ 2.45-2.55", False),
    ("nanoGPT shakespeare_char, CPU", "shakespeare_char_cpu", 1.88,
     "nanoGPT README, the CPU run (4 x 4 x 128, block 64, 2,000 iters): val loss 1.88", False),
    ("lecture gpt.py", "lecture", 1.48,
     "Karpathy's \"Let's build GPT\" lecture, final gpt.py (6 x 6 x 384, 5,000 steps): val loss ≈ 1.48", True),
    ("nanoGPT shakespeare_char", "shakespeare_char", 1.4697,
     "nanoGPT README, train_shakespeare_char.py (6 x 6 x 384, 5,000 iters): best val loss 1.4697", True),
]
# Our own recorded run of the CPU anchor (experiments/results/shakespeare_char_cpu_runs.md): a determinism check.
RECORDED_CPU = 1.8902


def steps_for(opts, preset: str) -> dict:
    """Overrides that shorten a preset for --quick / --smoke (the schedule squeezed to the shorter run)."""
    if opts.mode == "full":
        return {}
    if preset == "bigram":
        return opts.pick({}, dict(max_iters=5000, eval_interval=500),
                         dict(max_iters=20, eval_interval=20, eval_iters=2, batch_size=256))
    quick = dict(max_iters=500, lr_decay_iters=500, eval_interval=100)
    smoke = dict(max_iters=10, lr_decay_iters=10, warmup_iters=2, eval_interval=10, eval_iters=2,
                 n_layer=1, n_embd=32, n_head=2, batch_size=32, block_size=64)
    if preset != "shakespeare_char_cpu":  # the GPU anchors in a short run
        quick = dict(max_iters=1000, lr_decay_iters=1000, eval_interval=250)
    return opts.pick({}, quick, smoke)


def measure(opts, seeds, preset: str, vocab: int) -> tuple[list[dict], object]:
    config = research.make_config(opts, preset, vocab_size=vocab, **steps_for(opts, preset))
    print(f"{preset}: {config.train.max_iters} steps x {len(seeds)} seeds", flush=True)
    return research.train_seeds(config, seeds), config


def verdict(ref, est: float, spread: float) -> str:
    """Whether our mean estimated val loss reproduces the reference, and by how much."""
    if isinstance(ref, tuple):
        lo, hi = ref
        inside = lo <= est <= hi
        return (f"reproduced: {est:.4f} lies inside {lo}-{hi}" if inside else
                f"not reproduced: {est:.4f} lies {min(abs(est - lo), abs(est - hi)):.4f} outside {lo}-{hi}")
    gap = est - ref
    ok = abs(gap) <= TOLERANCE
    return (f"{'reproduced' if ok else 'not reproduced'}: {est:.4f} is {abs(gap):.4f} nats "
            f"({abs(gap) / ref:.1%}) {'above' if gap > 0 else 'below'} {ref} (tolerance {TOLERANCE}; "
            f"seed spread ± {spread:.4f})")


def plot(results: dict):
    plt = research.pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (name, (runs, ref, _)) in zip(axes[0], results.items()):
        for r in runs:
            steps = [row["step"] for row in r["history"]]
            line, = ax.plot(steps, [row["val_loss"] for row in r["history"]], marker=".", label=f"seed {r['seed']}")
            ax.plot([steps[-1]], [r["loss"]], "x", color=line.get_color(), markersize=9)
        if isinstance(ref, tuple):
            ax.axhspan(*ref, color="gray", alpha=0.2, label=f"reference {ref[0]}-{ref[1]}")
        else:
            ax.axhline(ref, color="gray", linestyle="--", label=f"reference {ref}")
        ax.set(title=name, xlabel="step", ylabel="val loss (nats/token)")
        ax.set_ylim(min(min(row["val_loss"] for r in runs for row in r["history"]),
                        ref[0] if isinstance(ref, tuple) else ref) - 0.1,
                    float(np.percentile([row["val_loss"] for r in runs for row in r["history"]], 90)) + 0.1)
        ax.legend(fontsize=8)
    return fig


def run(argv):
    opts = research.options(argv, "reproduce", seeds=(3, 2, 1))
    page = research.Page(opts, "Reproducing the anchor numbers")
    seeds = opts.seeds
    vocab = data.prepare(research.make_config(opts, "bigram").data).meta["vocab_size"]
    on_gpu = jax.default_backend() == "gpu"
    results, configs, rows = {}, {}, []
    for name, preset, ref, source, gpu_only in ANCHORS:
        if gpu_only and not on_gpu:
            rows.append([name, ref, source, *["not measured: no GPU in this run"] * 4])
            continue
        runs, config = measure(opts, seeds, preset, vocab)
        results[name], configs[name] = (runs, ref, source), config
        est, exact = [r["best_val_loss"] for r in runs], [r["loss"] for r in runs]
        rows.append([name, f"{ref[0]}-{ref[1]}" if isinstance(ref, tuple) else ref, source,
                     research.pm(est), research.pm(exact), research.pm([r["bits_per_char"] for r in runs]),
                     f"{research.pm([r['wall_s'] for r in runs], 1)} s"])

    page.text("**Question.** Does gptjax, trained with each anchor's settings, land where the source says: the "
              "seed notebooks' bigram, nanoGPT's CPU run of shakespeare_char, and (on a GPU) the lecture's final "
              "gpt.py and nanoGPT's shakespeare_char? How far apart are the seeds?")
    if opts.mode != "full":
        page.text(f"**This is a {opts.mode} run**: fewer steps than the anchors (and, in smoke mode, a smaller "
                  "model), so the losses are not comparable with the references and the verdicts below are not "
                  "meaningful. The recorded figures come from the full run.")
    setup = [[name, c.model.model, f"{c.model.n_layer} x {c.model.n_head} x {c.model.n_embd}"
              if c.model.model == "gpt" else f"{c.model.vocab_size} x {c.model.vocab_size} table",
              c.model.block_size, c.train.batch_size, c.train.max_iters,
              f"{c.train.learning_rate:g}" + (f" -> {c.train.min_lr:g} cosine" if c.train.decay_lr else " constant"),
              c.model.dropout, c.train.eval_iters, ", ".join(map(str, seeds))] for name, c in configs.items()]
    page.text("**Setup.** Each anchor is its gptjax preset (`gptjax/config.py`), trained by `gptjax train`'s loop "
              "once per seed (`research.train_seeds`; the seed sets the initial weights, the batches and the "
              "dropout masks). *Estimated* val loss: the best of the run's periodic estimates, each the mean over "
              "eval_iters random val batches, which is what nanoGPT and the lecture print. *Exact* val loss: the "
              "final weights over every next-token prediction of the whole val split; bits/char is the same sum "
              "in bits over the split's characters. Wall: the whole train call (compile, evaluations and "
              "checkpoints included), not the exact evaluation.")
    page.table(["anchor", "model", "shape", "block", "batch", "steps", "lr", "dropout", "eval_iters", "seeds"],
               setup)
    page.table(["anchor", "reference", "source", "ours: best estimated val (mean ± std)",
                "ours: exact val, whole split", "bits/char (exact)", "wall per run"], rows)
    per_seed = [[name, r["seed"], f"{r['best_val_loss']:.4f}", f"{r['loss']:.4f}", f"{r['bits_per_char']:.4f}",
                 f"{r['wall_s']:.1f}", f"{r['compile_s']:.1f}"]
                for name, (runs, _, _) in results.items() for r in runs]
    page.table(["anchor", "seed", "best estimated val", "exact val", "bits/char", "wall (s)", "compile (s)"], per_seed)
    page.figure(plot(results), "val_curves.png", "Estimated val loss per seed during training (dots: the periodic "
                "estimates; x: the exact whole-split loss of the final weights); gray: the reference.")
    page.text("**Finding.** " + " ".join(finding(results, opts, on_gpu)))
    page.write()


def finding(results: dict, opts, on_gpu: bool) -> list[str]:
    out = []
    for name, (runs, ref, _) in results.items():
        est, spread = research.mean_std(r["best_val_loss"] for r in runs)
        exact = research.mean_std(r["loss"] for r in runs)[0]
        out.append(f"{name}: {verdict(ref, est, spread)}; the exact whole-split loss is {exact:.4f} "
                   f"({exact - est:+.4f} from the estimate).")
    cpu = results.get("nanoGPT shakespeare_char, CPU")
    if cpu and opts.mode == "full":
        first = next((r for r in cpu[0] if r["seed"] == 1337), None)
        if first is not None:
            same = round(first["best_val_loss"], 4) == RECORDED_CPU
            out.append(f"Seed 1337's best estimate, {first['best_val_loss']:.4f}, "
                       f"{'matches' if same else 'differs from'} our earlier recorded run's {RECORDED_CPU}.")
    if not on_gpu:
        out.append("The lecture and nanoGPT's GPU shakespeare_char were not measured: no GPU in this run.")
    if opts.mode != "full":
        out.append(f"({opts.mode} run: shortened training, so these verdicts do not speak for the anchors.)")
    return out


if __name__ == "__main__":
    sys.exit(research.main(run))
