"""The lecture's ladder: how much does each step of "Let's build GPT" lower the validation loss at a fixed budget?

Eight rungs, trained alike (n_embd 32, block 8, batch 32, AdamW lr 1e-3 constant, as the lecture's intermediate
scripts): (1) the bigram table, (2) token embeddings of n_embd -> LM head, plus position embeddings, (3) one causal
self-attention head, (4) four heads of 8, (5) + a feed-forward layer, (6) 3 blocks with residual connections and
projections, (7) + pre-norm LayerNorm and a final ln_f, (8) + dropout and scaled up (the lecture's 6 x 6 x 384 model
on a GPU; a smaller one that fits on a CPU). Each rung: exact whole-split val loss, mean ± std over seeds.

    python experiments/lecture_ladder.py --input=../shared/data/tinyshakespeare/input.txt   # the recorded run
    python experiments/lecture_ladder.py --quick | --smoke                                  # smaller | a few steps
"""
import dataclasses
import functools
import math
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax import model, research
from gptjax.errors import UserError
from gptjax.model import Embedding, LayerNorm, Linear
from gptjax.ops import dropout


@dataclasses.dataclass(frozen=True)
class Rung:
    """One step of the lecture; the widths, heads, layers and dropout come from the run's ModelConfig."""

    label: str
    lecture: float | None  # the val loss the lecture reports for it (None: it reports none)
    pos: bool = True  # position embeddings added to the token embeddings
    attn: bool = False  # causal self-attention, config.n_head heads of n_embd // n_head
    ffwd: bool = False  # a feed-forward layer after the attention
    residual: bool = False  # config.n_layer blocks, x + proj(sa(x)), x + ffwd(x) with a 4x inner layer
    norm: bool = False  # pre-norm LayerNorm in each block and a final ln_f


STEPS = (5000, 1000, 5)  # full, quick, smoke: rungs 1-7 alike
BIG_STEPS = (2000, 400, 5)  # rung 8 on a CPU (on a GPU the full run takes the lecture's 5000)
# Rung 8 on a CPU: a scaled-up model whose 3 seeds fit this 2-core machine's budget (lr 1e-3, batch 32, dropout 0.2).
CPU_BIG = dict(n_embd=64, n_head=4, n_layer=4, block_size=32)
SMOKE_BIG = dict(n_embd=16, n_head=2, n_layer=1, block_size=8)

RUNGS = [  # rung 1 is gptjax's built-in bigram (a V x V table), the seeds' model
    Rung("bigram", 2.5, pos=False),
    Rung("+ position", None),
    Rung("one head", 2.4, attn=True),
    Rung("multi-head (4 x 8)", 2.28, attn=True),
    Rung("+ feed-forward", 2.24, attn=True, ffwd=True),
    Rung("+ residual (3 blocks)", 2.08, attn=True, ffwd=True, residual=True),
    Rung("+ LayerNorm", 2.06, attn=True, ffwd=True, residual=True, norm=True),
    Rung("+ dropout, scaled up", 1.48, attn=True, ffwd=True, residual=True, norm=True),
]


def torch_linear(d_in, d_out, bias, rngs):
    """nn.Linear's initial variance (its uniform bound 1/sqrt(d_in)) as a normal; biases start at zero."""
    return Linear(d_in, d_out, bias, 1 / math.sqrt(3 * d_in), rngs)


def norm(ln, x_BTD):
    return x_BTD if ln is None else ln(x_BTD)


class Layer(nnx.Module):
    """Attention then feed-forward: plain (rungs 3-5) or a residual block with projections (rungs 6-8)."""

    def __init__(self, r: Rung, c, rngs: nnx.Rngs):
        D = c.n_embd
        self.r, self.n_head, self.rate = r, c.n_head, c.dropout
        self.c_attn = torch_linear(D, 3 * D, False, rngs)  # every head's key, query and value
        self.c_proj = torch_linear(D, D, True, rngs) if r.residual else None
        width = 4 * D if r.residual else D
        self.c_fc = torch_linear(D, width, True, rngs) if r.ffwd else None
        self.c_fc_proj = torch_linear(width, D, True, rngs) if r.residual else None
        self.ln_1, self.ln_2 = (LayerNorm(D, True), LayerNorm(D, True)) if r.norm else (None, None)

    def attend(self, x_BTD, key):
        B, T, D = x_BTD.shape
        H = self.n_head
        q_BTHK, k_BTHK, v_BTHK = jnp.split(self.c_attn(x_BTD).reshape(B, T, 3 * H, D // H), 3, axis=2)
        att_BHTT = jnp.einsum("bthk,bshk->bhts", q_BTHK, k_BTHK) / math.sqrt(D // H)
        att_BHTT = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((T, T), bool)), att_BHTT, -jnp.inf), axis=-1)
        att_BHTT = dropout(att_BHTT, self.rate, key)
        return jnp.einsum("bhts,bshk->bthk", att_BHTT, v_BTHK).reshape(B, T, D)

    def feed_forward(self, x_BTD, key):
        h_BTF = jax.nn.relu(self.c_fc(x_BTD))
        return h_BTF if self.c_fc_proj is None else dropout(self.c_fc_proj(h_BTF), self.rate, key)

    def __call__(self, x_BTD, key=None):
        k1, k2, k3 = jax.random.split(key, 3) if key is not None else (None, None, None)
        if not self.r.residual:
            x_BTD = self.attend(x_BTD, k1)
            return self.feed_forward(x_BTD, k3) if self.c_fc is not None else x_BTD
        x_BTD = x_BTD + dropout(self.c_proj(self.attend(norm(self.ln_1, x_BTD), k1)), self.rate, k2)
        return x_BTD + self.feed_forward(norm(self.ln_2, x_BTD), k3)


class Ladder(nnx.Module):
    """Token (+ position) embeddings of n_embd, the rung's layers, (ln_f), a linear LM head."""

    def __init__(self, r: Rung, c, rngs: nnx.Rngs):
        self.wte = Embedding(c.vocab_size, c.n_embd, 1.0, rngs)  # nn.Embedding's N(0, 1)
        self.wpe = Embedding(c.block_size, c.n_embd, 1.0, rngs) if r.pos else None
        n = (c.n_layer if r.residual else 1) if r.attn else 0
        self.h = nnx.List([Layer(r, c, rngs) for _ in range(n)])
        self.ln_f = LayerNorm(c.n_embd, True) if r.norm else None
        self.lm_head = torch_linear(c.n_embd, c.vocab_size, True, rngs)

    def __call__(self, idx_BT, key=None):
        T = idx_BT.shape[1]
        x_BTD = self.wte(idx_BT) + (self.wpe(jnp.arange(T)) if self.wpe is not None else 0.0)
        keys = jax.random.split(key, len(self.h)) if key is not None and len(self.h) else [None] * len(self.h)
        for layer, k in zip(self.h, keys):
            x_BTD = layer(x_BTD, k)
        return self.lm_head(norm(self.ln_f, x_BTD))  # logits [B, T, V]


def build(r: Rung, c, rngs: nnx.Rngs) -> Ladder:
    """The rung's model, initialised in one compiled call (eagerly, each parameter shape compiles its own)."""
    return nnx.jit(lambda rngs: Ladder(r, c, rngs))(rngs)


for _i, _r in enumerate(RUNGS[1:], start=2):
    model.register(f"ladder{_i}", functools.partial(build, _r))


def configs(opts, steps: int, big_steps: int, on_gpu: bool) -> list:
    """One config per rung; rungs 1-7 share the lecture's intermediate settings, rung 8 is scaled up."""

    def loop(n):  # n steps, five loss estimates after step 0 (one in smoke mode); each costs 2 x eval_iters batches
        return dict(max_iters=n, eval_interval=n if opts.mode == "smoke" else max(1, n // 5),
                    log_interval=max(1, n // 10), eval_iters=opts.pick(200, 200, 2))

    shapes = {2: dict(n_layer=1, n_head=1), 3: dict(n_layer=1, n_head=1), 4: dict(n_layer=1, n_head=4),
              5: dict(n_layer=1, n_head=4), 6: dict(n_layer=3, n_head=4), 7: dict(n_layer=3, n_head=4)}
    small = dict(n_embd=opts.pick(32, 32, 16), block_size=8, **loop(steps))
    out = [research.make_config(opts, "bigram", **small)]
    out += [research.make_config(opts, "bigram", **small, model=f"ladder{i}", **shapes[i]) for i in range(2, 8)]
    if on_gpu:  # the lecture's gpt.py: 6 x 6 x 384, block 256, batch 64, dropout 0.2, lr 3e-4
        big = research.make_config(opts, "lecture", model="ladder8", **loop(opts.pick(5000, 1000, big_steps)))
    else:
        big = research.make_config(opts, "bigram", model="ladder8", dropout=0.2, **loop(big_steps),
                                   **opts.pick(CPU_BIG, CPU_BIG, SMOKE_BIG))
    return out + [big]


def shape_of(i: int, cfg) -> str:
    m, t = cfg.model, cfg.train
    layers = "" if i < 3 else f"{m.n_head} head(s) of {m.n_embd // m.n_head}, {m.n_layer} layer(s), "
    width = "V x V table" if i == 1 else f"n_embd {m.n_embd}"
    return (f"{m.model}: {width}, {layers}block {m.block_size}, dropout {m.dropout}, batch {t.batch_size}, "
            f"lr {t.learning_rate:g} constant, {t.max_iters} steps")


def run(argv):
    opts = research.options(argv, "lecture_ladder", seeds=(3, 3, 1), extra={"steps": 0, "big_steps": 0, "rungs": ""})
    steps = opts.extra["steps"] or opts.pick(*STEPS)
    big_steps = opts.extra["big_steps"] or opts.pick(*BIG_STEPS)
    on_gpu = jax.default_backend() == "gpu"
    chosen = [int(s) for s in opts.extra["rungs"].split(",")] if opts.extra["rungs"] else \
        opts.pick(list(range(1, 9)), list(range(1, 9)), [5, 8])
    if not set(chosen) <= set(range(1, 9)):
        raise UserError(f"--rungs={opts.extra['rungs']}: rungs are 1 to 8")
    seeds = opts.seeds
    page = research.Page(opts, "The lecture's ladder: val loss per step of \"Let's build GPT\"")
    cfgs = configs(opts, steps, big_steps, on_gpu)
    results = {}
    for i in chosen:
        results[i] = research.train_seeds(cfgs[i - 1], seeds)
        print(f"rung {i} {RUNGS[i - 1].label}: exact val {research.pm(r['loss'] for r in results[i])}, "
              f"{sum(r['wall_s'] for r in results[i]):.1f} s", flush=True)
    write_page(page, opts, cfgs, results, seeds, on_gpu)


def write_page(page, opts, cfgs, results, seeds, on_gpu):
    page.text("## Question", QUESTION)
    page.text("## Setup", f"Seeds {', '.join(map(str, seeds))} per rung. Rungs 1-7: the lecture's intermediate "
              "settings (AdamW at a constant rate, torch's defaults: weight decay 0.01, betas 0.9/0.999, no clipping; "
              f"estimated losses over {cfgs[0].train.eval_iters} batches every {cfgs[0].train.eval_interval} steps). "
              "Layers start from PyTorch's default variance (embeddings N(0, 1), linear weights of variance "
              "1/(3·fan_in), biases zero); attention scores are scaled by 1/sqrt(head size); ReLU feed-forward, as in "
              "the lecture. Rung 1 is gptjax's built-in bigram (`model=bigram`), rungs 2-8 one NNX class with "
              "switches registered as `ladder2`..`ladder8`.")
    page.code("\n".join(f"{i}. {RUNGS[i - 1].label}: {shape_of(i, cfgs[i - 1])}" for i in results))
    if not on_gpu:
        big, small = cfgs[7].train.max_iters, cfgs[0].train.max_iters
        ratio = cfgs[7].model.block_size // cfgs[6].model.block_size
        page.text("Rung 8 is not the lecture's model: its 6 layers x 6 heads x 384, block 256, dropout 0.2, lr 3e-4 "
                  "(the `lecture` preset) does not fit this 2-core CPU's budget; the script trains it when JAX's "
                  f"backend is a GPU. Here rung 8 is the scaled-up model above, trained {big} steps (the other rungs "
                  f"{small}) so that its seeds fit the budget: each of its steps sees {ratio}x "
                  "the tokens of a rung-7 step. The lecture preset's val loss: not measured: no GPU in this run.")
    page.text("## Results", "Exact val loss: the final parameters over every next-token prediction of the whole val "
              "split (consecutive windows of the rung's block size), mean ± std over seeds. Estimated: the loop's "
              f"estimate at the last step ({cfgs[0].train.eval_iters} random batches). The drop over the last fifth "
              "of the steps says how far from converged each rung stopped. Lecture: the figure quoted in the video "
              "(see Sources).")
    rows = []
    for i, runs in results.items():
        r = RUNGS[i - 1]
        lecture = "—" if r.lecture is None else (f"{r.lecture:.2f}" if i < 8 or on_gpu else f"{r.lecture:.2f} (GPU)")
        rows.append([i, r.label, research.pm(x["loss"] for x in runs), research.pm(x["bits_per_char"] for x in runs),
                     research.pm(x["history"][-1]["val_loss"] for x in runs),
                     research.pm(x["history"][-1]["train_loss"] for x in runs), still_falling(runs), lecture,
                     f"{sum(x['wall_s'] for x in runs) / len(runs):.1f}"])
    page.table(["rung", "model", "exact val loss", "val bits/char", "estimated val loss (end)",
                "estimated train loss (end)", "est. val drop, last 20% of steps", "lecture", "wall s / seed"], rows)
    page.figure(bar_chart(results, on_gpu), "ladder.png", "Exact val loss per rung (mean ± std over seeds) beside "
                "the lecture's figures")
    page.figure(curves(results), "curves.png", "Estimated val loss during training, mean over seeds, per rung")
    page.text("## Finding", *finding(results, on_gpu, cfgs[0].train.eval_iters))
    page.text("## Sources of the lecture's figures", SOURCES)
    page.write()


QUESTION = ("The lecture builds its GPT one idea at a time and quotes a validation loss after each: bigram, one "
            "attention head, multi-head attention, feed-forward, residual blocks, LayerNorm, then dropout and a bigger "
            "model. Trained alike at a fixed budget, how much does each rung lower the exact val loss, how much of "
            "that is above the seed-to-seed noise, and how do the figures compare with the lecture's?")

SOURCES = ("The figures in the lecture column (about 2.5, 2.4, 2.28, 2.24, 2.08, 2.06 and 1.48) are the val losses "
           "Karpathy quotes in the video \"Let's build GPT: from scratch, in code, spelled out\" (estimated over 200 "
           "batches at the end of training; the bigram with lr 1e-2 and 3000 steps, the others with lr 1e-3 and 5000 "
           "steps, the last on a GPU with the `lecture` preset's settings). None of them is in the seed notebooks: "
           "seed 001 trains only the bigram (batch 32, AdamW lr 1e-3, 10,000 steps) and prints its last training "
           "batch's loss, 2.38; seed 000 does the same and prints 2.39 at step 9999; seed 002 prints 2.56 after "
           "10,000 steps of Adam; seed 004 sets up a 2-layer 32-wide GPT on BPE tokens without reporting a loss. "
           "Those seed figures are single-batch training losses, not val losses, so the rung-1 row compares with "
           "them only loosely; the attention rungs have no seed figure at all.")


def last_drops(runs) -> list[float]:
    """Per seed, how much the estimated val loss fell over the last eval interval (a fifth of the run)."""
    return [r["history"][-2]["val_loss"] - r["history"][-1]["val_loss"] for r in runs if len(r["history"]) > 2]


def still_falling(runs) -> str:
    return research.pm(last_drops(runs), 3) if last_drops(runs) else "—"


def bar_chart(results, on_gpu):
    plt = research.pyplot()
    fig, ax = plt.subplots(figsize=(10, 4.5))
    xs = list(results)
    means = [research.mean_std(r["loss"] for r in results[i]) for i in xs]
    ax.bar([x - 0.2 for x in xs], [m for m, _ in means], 0.4, yerr=[s for _, s in means], capsize=4,
           label="this run: exact val loss", color="tab:blue")
    lect = [(i, RUNGS[i - 1].lecture) for i in xs if RUNGS[i - 1].lecture is not None]
    ax.bar([i + 0.2 for i, _ in lect], [v for _, v in lect], 0.4, label="lecture (rung 8: its GPU model)"
           if not on_gpu else "lecture", color="tab:gray", hatch="//", alpha=0.7)
    ax.set_xticks(xs, [f"{i}\n{RUNGS[i - 1].label}" for i in xs], fontsize=8)
    ax.set_ylim(1.0, max(max(m for m, _ in means), 2.6) + 0.15)
    ax.set_ylabel("val loss (nats/token)")
    ax.legend()
    return fig


def curves(results):
    plt = research.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, runs in results.items():
        steps = [row["step"] for row in runs[0]["history"]]
        mean = [sum(r["history"][k]["val_loss"] for r in runs) / len(runs) for k in range(len(steps))]
        ax.plot(steps, mean, label=f"{i} {RUNGS[i - 1].label}")
    ax.set_xlabel("step")
    ax.set_ylabel("estimated val loss")
    ax.set_ylim(top=min(4.5, ax.get_ylim()[1]))
    ax.legend(fontsize=8)
    return fig


def finding(results, on_gpu, eval_iters: int) -> list[str]:
    """Sentences built from the numbers: each rung's change, whether it clears the seed noise, the lecture gaps."""
    stats = {i: research.mean_std(r["loss"] for r in runs) for i, runs in results.items()}
    xs = list(stats)
    steps = []
    for a, b in zip(xs, xs[1:]):
        (ma, sa), (mb, sb) = stats[a], stats[b]
        noise = 2 * math.hypot(sa, sb)
        verdict = "" if len(results[a]) < 2 else \
            f", {'beyond' if abs(mb - ma) > noise else 'within'} 2x the seeds' combined std ({noise:.3f})"
        steps.append(f"{a}->{b} ({RUNGS[b - 1].label}) {mb - ma:+.3f}{verdict}")
    text = [f"Exact val loss per rung change: {'; '.join(steps)}." if steps else "Only one rung ran."]
    if len(xs) > 1:
        best = min(xs, key=lambda i: stats[i][0])
        drop = stats[xs[0]][0] - stats[xs[-1]][0]
        text.append(f"From rung {xs[0]} ({stats[xs[0]][0]:.3f}) to rung {xs[-1]} ({stats[xs[-1]][0]:.3f}) the loss "
                    f"{'falls' if drop > 0 else 'rises'} by {abs(drop):.3f} nats; the lowest is rung {best} "
                    f"({RUNGS[best - 1].label}, {stats[best][0]:.3f}).")
    drops = {i: research.mean_std(last_drops(runs))[0] for i, runs in results.items() if last_drops(runs)}
    slow = [f"rung {i} ({d:.3f})" for i, d in drops.items() if d > 0.02]
    if slow:
        text.append("Still falling by more than 0.02 nats over the last fifth of their steps (so further from "
                    f"converged, and their gaps budget-bound): {', '.join(slow)}.")
    gaps = [f"{i}: {stats[i][0] - RUNGS[i - 1].lecture:+.3f}" for i in xs
            if RUNGS[i - 1].lecture is not None and (i < 8 or on_gpu)]
    if gaps:
        off = max(abs(r["history"][-1]["val_loss"] - r["loss"]) for runs in results.values() for r in runs)
        text.append("This run's exact val loss minus the lecture's figure (rung 8 only on a GPU): " + ", ".join(gaps)
                    + f". For scale, this run's own {eval_iters}-batch estimates differ from the exact loss by up to "
                    f"{off:.3f}.")
    return text


if __name__ == "__main__":
    sys.exit(research.main(run))
