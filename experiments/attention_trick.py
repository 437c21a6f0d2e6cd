"""The lecture's averaging trick four ways, what each costs in NumPy, JAX eager and JAX jit, and why attention is
scaled by 1/sqrt(head_size).

    python experiments/attention_trick.py --input=../shared/data/tinyshakespeare/input.txt [--quick | --smoke]

Question: do (v1) Python loops averaging x[b, :t+1], (v2) a lower-triangular averaging matrix times x, (v3) a
masked softmax of zeros times x and (v4) one self-attention head compute the same thing (v4 when q·k is constant),
how fast is each as plain NumPy, JAX op by op and JAX jit, and what does scaling q·k by 1/sqrt(head_size) do to
its variance and to the softmax over T positions?
Writes experiments/results/attention_trick.md and experiments/results/attention_trick/*.png. --input is accepted
for uniformity; the experiment uses random tensors, not the corpus.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import research

SEED_SHAPE = (4, 8, 32)  # B, T, C of the seed's self-attention cell
HEAD_SIZE = 16  # the seed's single head
VERSIONS = ("v1 loops", "v2 tril matmul", "v3 masked softmax", "v4 self-attention")
FRAMEWORKS = ("NumPy", "JAX eager", "JAX jit")


# --- the four versions; xp is numpy or jax.numpy, so one definition serves NumPy, JAX eager and JAX jit ---

def v1_loops(xp, x_BTC):
    """For every b and t, the mean of x[b, :t+1]: B*T Python-level slices and means."""
    B, T, _ = x_BTC.shape
    return xp.stack([xp.stack([x_BTC[b, :t + 1].mean(0) for t in range(T)]) for b in range(B)])


def v1_loop_compiled(x_BTC):
    """v1 under jit: the same (b, t) loop as lax.fori_loop (a Python loop would unroll into B*T slices)."""
    B, T, _ = x_BTC.shape

    def body(i, out_BTC):
        b, t = i // T, i % T
        keep_T1 = (jnp.arange(T) <= t)[:, None]
        return out_BTC.at[b, t].set(jnp.where(keep_T1, x_BTC[b], 0).sum(0) / (t + 1))

    return jax.lax.fori_loop(0, B * T, body, jnp.zeros_like(x_BTC))


def v2_matmul(xp, x_BTC):
    T = x_BTC.shape[1]
    wei_TT = xp.tril(xp.ones((T, T), x_BTC.dtype))
    wei_TT = wei_TT / wei_TT.sum(1, keepdims=True)
    return wei_TT @ x_BTC


def softmax(xp, w):
    e = xp.exp(w - w.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def v3_weights(xp, T, dtype):
    tril_TT = xp.tril(xp.ones((T, T), dtype))
    return softmax(xp, xp.where(tril_TT == 0, -xp.inf, xp.zeros((T, T), dtype)))


def v3_softmax(xp, x_BTC):
    return v3_weights(xp, x_BTC.shape[1], x_BTC.dtype) @ x_BTC


def v4_weights(xp, x_BTC, w):
    """The head's causal attention weights, unscaled as in the seed's cell."""
    T = x_BTC.shape[1]
    q_BTH, k_BTH = x_BTC @ w["query"], x_BTC @ w["key"]
    wei_BTT = q_BTH @ k_BTH.swapaxes(-1, -2)
    return softmax(xp, xp.where(xp.tril(xp.ones((T, T))) == 0, -xp.inf, wei_BTT))


def v4_head(xp, x_BTC, w):
    return v4_weights(xp, x_BTC, w) @ (x_BTC @ w["value"])


def head_weights(rng, C, zero_query=False):
    """nn.Linear's default init, U(-1/sqrt(C), 1/sqrt(C)), for key, query and value (C -> HEAD_SIZE, no bias)."""
    w = {n: rng.uniform(-C ** -0.5, C ** -0.5, (C, HEAD_SIZE)).astype(np.float32) for n in ("key", "query", "value")}
    if zero_query:
        w["query"] = np.zeros_like(w["query"])
    return w


def implementations(w_np):
    """{(version, framework): (fn, needs_compile)} for one set of head weights; fn(x) -> output."""
    w_j = {n: jnp.asarray(a) for n, a in w_np.items()}
    impl = {}
    for v, f in zip(VERSIONS[:3], (v1_loops, v2_matmul, v3_softmax)):
        impl[v, "NumPy"] = lambda x, f=f: f(np, x)
        impl[v, "JAX eager"] = lambda x, f=f: f(jnp, x)
        impl[v, "JAX jit"] = jax.jit(v1_loop_compiled if f is v1_loops else lambda x, f=f: f(jnp, x))
    impl[VERSIONS[3], "NumPy"] = lambda x: v4_head(np, x, w_np)
    impl[VERSIONS[3], "JAX eager"] = lambda x: v4_head(jnp, x, w_j)
    impl[VERSIONS[3], "JAX jit"] = jax.jit(lambda x: v4_head(jnp, x, w_j))
    return impl


# --- measurements ---

def timed(fn, x, n: int = 1) -> tuple[float, object]:
    """Seconds per call over n calls, each blocked until ready, and the last output."""
    tick = time.perf_counter()
    for _ in range(n):
        out = jax.block_until_ready(fn(x))
    return (time.perf_counter() - tick) / n, out


def measure_shape(shape, runs: int, seed: int = 1337) -> dict:
    """Outputs' max abs differences and per-call times of every (version, framework) at one B, T, C.

    Each implementation's first call is timed on its own (eager compiles each op at each new shape there); then
    `runs` rounds time every implementation in turn, ~10 ms of calls each (at least one; a call over 1 s takes
    part in 5 rounds), so the drift of a shared machine falls on all alike; the median round counts."""
    rng = np.random.default_rng(seed)
    x_np = rng.standard_normal(shape).astype(np.float32)
    x_j = jnp.asarray(x_np)
    w_np = head_weights(rng, shape[2])
    res = {"shape": shape, "diff": {}, "time": {}, "spread": {}, "first": {}, "compile": {}}
    ref = {"avg": v1_loops(np, x_np), "head": v4_head(np, x_np, w_np)}
    ready = {}
    for (v, fw), fn in implementations(w_np).items():
        x = x_np if fw == "NumPy" else x_j
        if fw == "JAX jit":
            tick = time.perf_counter()
            fn = fn.lower(x).compile()
            res["compile"][v] = time.perf_counter() - tick
        res["first"][v, fw], out = timed(fn, x)
        res["diff"][v, fw] = float(np.abs(np.asarray(out) - ref["head" if v == VERSIONS[3] else "avg"]).max())
        once = timed(fn, x)[0]
        ready[v, fw] = (fn, x, max(1, min(2000, int(0.01 / max(once, 1e-7)))), once)
    rounds = {k: [] for k in ready}
    for r in range(runs):
        for k, (fn, x, n, once) in ready.items():
            if r < 5 or once < 1.0:
                rounds[k].append(timed(fn, x, n)[0])
    for (v, fw), ts in rounds.items():
        res["time"][v, fw], res["spread"][v, fw] = statistics.median(ts), (min(ts), max(ts))
        print(f"  {shape} {v:18s} {fw:9s} {res['time'][v, fw] * 1e3:10.4f} ms/call ({len(ts)} rounds)", flush=True)
    w0 = head_weights(np.random.default_rng(seed), shape[2], zero_query=True)
    res["zero_query"] = float(np.abs(v4_head(np, x_np, w0) - v2_matmul(np, x_np) @ w0["value"]).max())
    res["zero_query_jit"] = float(np.abs(np.asarray(jax.jit(lambda x: v4_head(jnp, x, w0))(x_j))
                                         - v2_matmul(np, x_np) @ w0["value"]).max())
    res["pairs"] = {p: float(np.abs(a - b).max()) for p, a, b in (
        ("v1 vs v2", ref["avg"], v2_matmul(np, x_np)), ("v1 vs v3", ref["avg"], v3_softmax(np, x_np)),
        ("v2 vs v3", v2_matmul(np, x_np), v3_softmax(np, x_np)))}
    return res


def entropy_and_max(w_RT):
    """Per row of logits: the softmax's entropy (nats, exact via logsumexp) and its largest weight."""
    m_R1 = w_RT.max(-1, keepdims=True)
    e_RT = np.exp(w_RT - m_R1)
    z_R1 = e_RT.sum(-1, keepdims=True)
    p_RT = e_RT / z_R1
    return (m_R1 + np.log(z_R1) - (p_RT * w_RT).sum(-1, keepdims=True))[:, 0], p_RT.max(-1)


def scaling_stats(head_sizes, Ts, rows: int, seed: int = 1337) -> list[dict]:
    """Unit-variance random q and k: var(q·k) and the softmax over T keys, with and without 1/sqrt(head_size)."""
    rng = np.random.default_rng(seed)
    out = []
    for T in Ts:
        for hs in head_sizes:
            B = max(1, rows // T)
            q_BTH, k_BTH = rng.standard_normal((B, T, hs)), rng.standard_normal((B, T, hs))
            wei_BTT = q_BTH @ k_BTH.swapaxes(-1, -2)
            for scaled in (False, True):
                w = wei_BTT * hs ** -0.5 if scaled else wei_BTT
                ent_R, top_R = entropy_and_max(w.reshape(-1, T))
                out.append({"T": T, "hs": hs, "scaled": scaled, "var_q": q_BTH.var(), "var_k": k_BTH.var(),
                            "var": w.var(), "samples": w.size, "entropy": ent_R.mean(), "top": top_R.mean(),
                            "example": np.exp(w[0, 0] - w[0, 0].max()) / np.exp(w[0, 0] - w[0, 0].max()).sum()})
    return out


# --- the page ---

def matrix_text(name: str, a, digits: int) -> str:
    body = np.array2string(np.asarray(a), precision=digits, suppress_small=True, floatmode="fixed",
                           max_line_width=120)
    return f"{name} =\n{body}"


def weights_figure(plt, mats):
    fig, axes = plt.subplots(1, len(mats), figsize=(4.2 * len(mats), 4.0))
    for ax, (title, m) in zip(axes, mats):
        ax.imshow(m, cmap="viridis", vmin=0, vmax=1)
        for (i, j), val in np.ndenumerate(m):
            ax.text(j, i, f"{val:.2f}", ha="center", va="center", fontsize=6, color="w" if val < 0.6 else "k")
        ax.set(title=title, xlabel="key position s", ylabel="query position t")
    return fig


def timing_figure(plt, results):
    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.2))
    for ax, res in zip(np.atleast_1d(axes), results):
        xs = np.arange(len(VERSIONS))
        for i, fw in enumerate(FRAMEWORKS):
            med = np.array([res["time"][v, fw] for v in VERSIONS])
            lo, hi = (np.array([res["spread"][v, fw][j] for v in VERSIONS]) for j in (0, 1))
            ax.bar(xs + (i - 1) * 0.27, med * 1e3, 0.27, label=fw,
                   yerr=np.stack([med - lo, hi - med]) * 1e3, capsize=2, error_kw={"lw": 0.8})
        ax.set_yscale("log")
        ax.set_xticks(xs, [v.replace(" ", "\n", 1) for v in VERSIONS])
        ax.set(title="B, T, C = {}, {}, {}".format(*res["shape"]), ylabel="ms per call (log scale)")
        ax.legend()
    return fig


def scaling_figure(plt, stats, head_sizes, Ts):
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.0))
    for T, ls in zip(Ts, ("-", "--")):
        for scaled, color in ((False, "tab:red"), (True, "tab:blue")):
            rows = [s for s in stats if s["T"] == T and s["scaled"] == scaled]
            label = f"{'scaled' if scaled else 'unscaled'}, T={T}"
            axes[0].plot(head_sizes, [s["var"] for s in rows], ls, color=color, marker="o", label=label)
            axes[1].plot(head_sizes, [s["entropy"] / np.log(T) for s in rows], ls, color=color, marker="o",
                         label=label)
            axes[2].plot(head_sizes, [s["top"] for s in rows], ls, color=color, marker="o", label=label)
    axes[0].plot(head_sizes, head_sizes, ":", color="gray", label="head_size")
    axes[0].set(xscale="log", yscale="log", xlabel="head_size", ylabel="var(q·k)", title="variance of q·k")
    axes[1].set(xscale="log", xlabel="head_size", ylabel="mean entropy / log T", ylim=(0, 1.05),
                title="softmax entropy (1 = uniform)")
    axes[2].set(xscale="log", xlabel="head_size", ylabel="mean max weight", ylim=(0, 1.05),
                title="softmax peakiness")
    for T in Ts:
        axes[2].axhline(1 / T, color="gray", lw=0.8, ls=":")
    example = [s for s in stats if s["T"] == min(Ts) and s["hs"] == max(head_sizes)]
    for i, s in enumerate(example):
        axes[3].bar(np.arange(s["T"]) + (i - 0.5) * 0.4, s["example"], 0.4,
                    color="tab:blue" if s["scaled"] else "tab:red", label="scaled" if s["scaled"] else "unscaled")
    axes[3].set(xlabel="key position", ylabel="softmax weight", title=f"one row, T={min(Ts)}, head_size="
                f"{max(head_sizes)}")
    for ax in axes[:3]:
        ax.set_xticks(head_sizes, [str(h) for h in head_sizes])
        ax.minorticks_off()
    for ax in axes:
        ax.legend(fontsize=7)
    return fig


def fmt_ms(s: float) -> str:
    ms = s * 1e3
    return f"{ms:.4f}" if ms < 0.1 else f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def run(argv):
    opts = research.options(argv, "attention_trick", seeds=1)
    plt = research.pyplot()
    # smoke: the seed's shape only (JAX eager compiles v1's slice and mean once per prefix length of each shape)
    shapes = opts.pick([SEED_SHAPE, (32, 256, 384)], [SEED_SHAPE, (16, 128, 192)], [SEED_SHAPE])
    runs = opts.pick(15, 7, 3)
    head_sizes, Ts = (16, 64, 256), opts.pick((8, 256), (8, 128), (8, 32))
    rows = opts.pick(16384, 4096, 256)
    page = research.Page(opts, "The averaging trick four ways, and why attention is scaled")
    page.text("## Question",
              "The lecture's trick lets token t see the average of tokens 0..t. Do its four versions (v1 Python "
              "loops averaging x[b, :t+1]; v2 a lower-triangular averaging matrix times x; v3 a masked softmax of "
              "zeros times x; v4 a self-attention head) compute the same thing, v4 when q·k is constant? What does "
              "each cost as plain NumPy, JAX op by op (eager) and JAX jit? And what does scaling q·k by "
              "1/sqrt(head_size) do to its variance and to the softmax over T positions?")
    page.text("## Setup",
              "x ~ N(0, 1) in float32. Shapes B, T, C = " + " and ".join(map(str, shapes)) + " (the first is the "
              f"seed's). v4 is one head of head_size {HEAD_SIZE} as in the seed: key, query, value projections "
              "without bias, "
              "initialised U(-1/sqrt(C), 1/sqrt(C)) as nn.Linear is, causal mask, unscaled q·k as in the seed's "
              "cell; its output is wei @ v. One definition of each version serves NumPy and JAX (the array module "
              "is a parameter), except v1 under jit, which is the same (b, t) loop as a `lax.fori_loop` with a "
              "masked mean (tracing the Python loop would unroll B·T slices into the program). Times: after a "
              f"first call and one more, {runs} rounds in which every implementation in turn makes ~10 ms of calls "
              "(at least one; a call over 1 s takes part in 5 rounds only), every call blocked until ready; the "
              "median round's seconds per call; jit's trace + compile (`jit(f).lower(x).compile()`) "
              f"is timed separately. Scaling: q, k ~ N(0, 1) of head_size {head_sizes}, about {rows} query rows "
              f"against T = {Ts} keys each, no mask; numbers are means over rows.")
    print("correctness and timing", flush=True)
    load = os.getloadavg()[0]
    results = [measure_shape(shape, runs) for shape in shapes]
    page.text(f"The machine is shared: its 1-minute load average was {load:.1f} when the timings began and "
              f"{os.getloadavg()[0]:.1f} when they ended, on {os.cpu_count()} cores; small per-call times carry "
              "that noise.")

    page.text("## Four versions, one average")
    T = SEED_SHAPE[1]
    wei2 = np.tril(np.ones((T, T))) / np.tril(np.ones((T, T))).sum(1, keepdims=True)
    wei3 = v3_weights(np, T, np.float32)
    x_np = np.random.default_rng(1337).standard_normal(SEED_SHAPE).astype(np.float32)
    w4 = head_weights(np.random.default_rng(7), SEED_SHAPE[2])
    w4z = {**w4, "query": np.zeros_like(w4["query"])}
    wei4, wei4z = v4_weights(np, x_np, w4)[0], v4_weights(np, x_np, w4z)[0]
    small = (x_np[0, :4, :4], v1_loops(np, x_np)[0, :4, :4])
    text = "\n\n".join([matrix_text("x[0, :4, :4]", small[0], 4), matrix_text("xbow[0, :4, :4] (v1)", small[1], 4),
                        matrix_text("v2 wei = tril / row sums", wei2, 3),
                        matrix_text("v3 wei = softmax(zeros masked to -inf)", wei3, 3),
                        matrix_text("v4 wei[0], random head", wei4, 3),
                        matrix_text("v4 wei[0], query weights zero", wei4z, 3)])
    print(text)
    page.code(text)
    header = ["comparison (max abs difference)", *("B, T, C = {}, {}, {}".format(*r["shape"]) for r in results)]
    tab = [[p, *(f"{r['pairs'][p]:.1e}" for r in results)] for p in results[0]["pairs"]]
    tab += [[f"{v}, {fw} vs NumPy {'v4' if v == VERSIONS[3] else 'v1'}", *(f"{r['diff'][v, fw]:.1e}" for r in results)]
            for v in VERSIONS for fw in FRAMEWORKS if (v, fw) != (VERSIONS[0], "NumPy")]
    tab += [["v4 with W_q = 0 vs v2 @ W_v (NumPy)", *(f"{r['zero_query']:.1e}" for r in results)],
            ["v4 with W_q = 0 vs v2 @ W_v (JAX jit)", *(f"{r['zero_query_jit']:.1e}" for r in results)]]
    page.table(header, tab)
    page.figure(weights_figure(plt, [("v2: tril / row sums", wei2), ("v3: softmax of masked zeros", wei3),
                                     ("v4: random head (batch 0)", wei4), ("v4: W_q = 0 (batch 0)", wei4z)]),
                "weights.png", f"Attention weights at T = {T}: v2 and v3 are the same averaging matrix; a random "
                "head's weights depend on the data; with zero query weights q·k = 0 and v4's weights are v3's.")

    page.text("## What each costs",
              "Milliseconds per call: the median round [the fastest, the slowest round]. One-off seconds, paid "
              "once per shape: for jit the trace + compile; for JAX eager the first call, which compiles every op "
              "at every new shape it meets (v1 meets a new shape at each prefix length t + 1; ops an earlier "
              "version already compiled are not compiled again); for NumPy the first call. All four versions do "
              "O(B·T²·C) work: v1 sums t + 1 rows for each output, v2 and v3 also multiply the zeros above the "
              "diagonal; what differs is how the work reaches the hardware.")
    tab = []
    for v in VERSIONS:
        for fw in FRAMEWORKS:
            one_off = [r["compile"][v] if fw == "JAX jit" else r["first"][v, fw] for r in results]
            tab.append([v, fw, *(f"{fmt_ms(r['time'][v, fw])} [{fmt_ms(r['spread'][v, fw][0])}, "
                                 f"{fmt_ms(r['spread'][v, fw][1])}]" for r in results), *(f"{s:.3f}" for s in one_off)])
    names = ["B,T,C = {},{},{}".format(*r["shape"]) for r in results]
    page.table(["version", "framework", *(f"ms per call, {n}" for n in names), *(f"one-off s, {n}" for n in names)],
               tab)
    page.figure(timing_figure(plt, results), "timing.png", "Milliseconds per call of each version in NumPy, "
                "JAX eager and JAX jit at each shape (log scale): bars the median round, whiskers the fastest and "
                "slowest rounds.")

    print("scaling", flush=True)
    stats = scaling_stats(head_sizes, Ts, rows)
    page.text("## Scaled attention",
              "var(q·k) is measured over every (query, key) pair; entropy is in nats, the uniform softmax's is "
              "log T; max weight is the mean over rows of the largest softmax weight (uniform: 1/T).")
    page.table(["T", "head_size", "q·k", "var(q), var(k)", "var(q·k)", "var(q·k) / (head_size raw, 1 scaled)",
                "mean entropy (nats)",
                "log T", "entropy / log T", "mean max weight", "1/T"],
               [[s["T"], s["hs"], "/ sqrt(head_size)" if s["scaled"] else "raw", f"{s['var_q']:.3f}, "
                 f"{s['var_k']:.3f}", f"{s['var']:.3f}", f"{s['var'] / (1 if s['scaled'] else s['hs']):.3f}",
                 f"{s['entropy']:.3f}",
                 f"{np.log(s['T']):.3f}", f"{s['entropy'] / np.log(s['T']):.3f}", f"{s['top']:.3f}",
                 f"{1 / s['T']:.4f}"] for s in stats])
    page.figure(scaling_figure(plt, stats, head_sizes, Ts), "scaling.png",
                "Left to right: var(q·k) against head_size; mean softmax entropy as a fraction of log T; mean "
                "largest weight; one softmax row with and without the scale.")
    page.text("## Finding", finding(results, stats, head_sizes, Ts))
    page.write()


def than(a: float, b: float) -> str:
    """How a time a compares with a time b, in words."""
    if 0.9 < b / a < 1.1:
        return f"about as fast as ({b / a:.2f}x)"
    return f"{b / a:.1f}x faster than" if a <= b else f"{a / b:.1f}x slower than"


def compare(t: dict, how: str) -> str:
    v1, v2 = VERSIONS[0], VERSIONS[1]
    return (f"{how[0].upper() + how[1:]}, jit v2 is {than(t[v2, 'JAX jit'], t[v2, 'NumPy'])} NumPy v2 and "
            f"{than(t[v2, 'JAX jit'], t[v2, 'JAX eager'])} JAX eager v2; v1's loops take "
            f"{t[v1, 'NumPy'] / t[v2, 'NumPy']:.1f}x (NumPy), {t[v1, 'JAX eager'] / t[v2, 'JAX eager']:.0f}x "
            f"(JAX eager) and {t[v1, 'JAX jit'] / t[v2, 'JAX jit']:.1f}x (JAX jit) the time of their framework's v2.")


def finding(results, stats, head_sizes, Ts) -> str:
    big, t = results[-1], results[-1]["time"]
    worst = max(max(r["pairs"].values()) for r in results)
    worst_impl = max(d for r in results for d in r["diff"].values())
    zq = max(max(r["zero_query"], r["zero_query_jit"]) for r in results)
    fastest, slowest = min(t, key=t.get), max(t, key=t.get)
    noise = [hi / lo for lo, hi in big["spread"].values()]
    raw, scl = [s for s in stats if not s["scaled"]], [s for s in stats if s["scaled"]]
    T, hs = max(Ts), max(head_sizes)
    r_big = next(s for s in raw if s["T"] == T and s["hs"] == hs)
    s_big = next(s for s in scl if s["T"] == T and s["hs"] == hs)
    ratio = {sc: [s["entropy"] / np.log(T) for s in stats if s["T"] == T and s["scaled"] == sc] for sc in (0, 1)}
    v1 = VERSIONS[0]
    shape = ", ".join(map(str, big["shape"]))
    return (
        f"v1, v2 and v3 agree to within {worst:.1e}{' (float32 rounding)' if worst < 1e-5 else ''} at "
        f"{'both shapes' if len(results) > 1 else 'the seed shape'}, and every NumPy / JAX eager / JAX jit "
        f"implementation matches the NumPy reference to within {worst_impl:.1e}; a head with zero query weights "
        f"gives the running average of its values (max difference {zq:.1e}). "
        f"At B, T, C = {shape}, by the median round, the fastest is {' '.join(fastest)} at {fmt_ms(t[fastest])} ms "
        f"per call and the slowest {' '.join(slowest)} at {fmt_ms(t[slowest])} ms, a factor of "
        f"{t[slowest] / t[fastest]:.0f}. " + compare(t, "by the median round") + " "
        + compare({k: lo for k, (lo, _) in big["spread"].items()}, "By the fastest round") + " "
        f"JAX eager's first v1 call took {big['first'][v1, 'JAX eager']:.1f} s. "
        f"On this shared machine an implementation's slowest round took {statistics.median(noise):.1f}x its "
        f"fastest (the median over implementations; up to {max(noise):.1f}x), so time ratios within such factors "
        "are not firm. "
        f"Unscaled, var(q·k) / head_size is {min(s['var'] / s['hs'] for s in raw):.3f} to "
        f"{max(s['var'] / s['hs'] for s in raw):.3f} (var ≈ head_size); scaled, var(q·k) is "
        f"{min(s['var'] for s in scl):.3f} to {max(s['var'] for s in scl):.3f} (≈ 1), as the seeds state. "
        f"At T = {T}, head_size = {hs} the unscaled softmax keeps {r_big['entropy']:.2f} of log T = "
        f"{np.log(T):.2f} nats with a mean max weight of {r_big['top']:.3f}; scaled it keeps "
        f"{s_big['entropy']:.2f} nats with a mean max weight of {s_big['top']:.3f}. At T = {T}, entropy / log T "
        f"for head_size {', '.join(map(str, head_sizes))} is {', '.join(f'{e:.2f}' for e in ratio[0])} unscaled "
        f"and {', '.join(f'{e:.2f}' for e in ratio[1])} scaled (spread {max(ratio[0]) - min(ratio[0]):.2f} "
        f"against {max(ratio[1]) - min(ratio[1]):.2f}).")


if __name__ == "__main__":
    sys.exit(research.main(run))
