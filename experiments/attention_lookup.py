"""Attention as a dictionary look-up: one-hot q·Kᵀ·V, then softmax, then the 1/sqrt(d) scale, then learned projections.

    python experiments/attention_lookup.py --input=../shared/data/tinyshakespeare/input.txt [--quick | --smoke]

Question: with an Italian-to-English word list as keys and values, is q·Kᵀ·V with one-hot vectors an exact look-up;
how do softmax(q·Kᵀ) and softmax(q·Kᵀ/sqrt(d)) blur it; and can one head learn W_q, W_k, W_v that do the look-up
from dense random embeddings? Writes experiments/results/attention_lookup.md and its heatmaps under
experiments/results/attention_lookup/. --input is accepted for uniformity; the toy uses no corpus.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gptjax import research

DICTIONARY = {"il": "the", "la": "the", "gatto": "cat", "cane": "dog", "mangia": "eats", "vede": "sees",
              "torta": "cake", "pesce": "fish", "sotto": "under", "tavolo": "table"}
SENTENCE = "il gatto mangia la torta sotto il tavolo"
KEYS = list(DICTIONARY)  # the memory's rows, in the dictionary's order
VOCAB_IN, VOCAB_OUT = sorted(DICTIONARY), sorted(set(DICTIONARY.values()))
VALUE_ID = np.array([VOCAB_OUT.index(DICTIONARY[k]) for k in KEYS])  # memory row -> output word
EMBD, HEAD = 8, 8  # dense embedding width (fewer than the 10 input words) and head size


# --- stages 1-3: one-hot vectors, numpy ---

def one_hot(words, vocab):
    return np.eye(len(vocab))[[vocab.index(w) for w in words]]


def softmax(w, axis=-1):
    e = np.exp(w - w.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def decode(out_QV):
    return [VOCAB_OUT[i] for i in np.asarray(out_QV).argmax(-1)]


def grid(mat, rows, cols, digits: int = 2) -> str:
    """A small labelled matrix, rounded, one row per line."""
    mat = np.asarray(mat)
    whole = np.all(np.abs(mat - np.round(mat)) < 1e-9)  # one-hot and selection matrices print as 0 / 1
    width = max(digits + 3, *(len(c) for c in cols))
    lead = max(len(r) for r in rows)
    lines = [" " * lead + " " + " ".join(c.rjust(width) for c in cols)]
    for r, row in zip(rows, mat):
        cells = [(str(int(round(v))) if whole else f"{v:.{digits}f}").rjust(width) for v in row]
        lines.append(r.rjust(lead) + " " + " ".join(cells))
    return "\n".join(lines)


def stage_stats(att_QM, out_QV, words) -> dict:
    """Weight on the right key, on any key with the right translation ('il' and 'la' share one), the largest weight
    on a wrong key, the decoded words and how many are right."""
    right_QM = np.array([[k == w for k in KEYS] for w in words])
    same_QM = np.array([[DICTIONARY[k] == DICTIONARY[w] for k in KEYS] for w in words])
    att = np.asarray(att_QM)
    got = decode(out_QV)
    return {"right": att[right_QM].mean(), "same": (att * same_QM).sum(-1).mean(),
            "wrong": np.where(right_QM, -np.inf, att).max(),
            "words": got, "correct": sum(g == DICTIONARY[w] for g, w in zip(got, words))}


# --- stage 4: a head with learned projections on dense embeddings, jax ---

def head(params, xq_QD, xk_MD, xv_MD):
    q_QH, k_MH, v_MD = xq_QD @ params["query"], xk_MD @ params["key"], xv_MD @ params["value"]
    att_QM = jax.nn.softmax(q_QH @ k_MH.T / HEAD ** 0.5, axis=-1)
    return att_QM, att_QM @ v_MD


def init_params(key):
    kq, kk, kv = jax.random.split(key, 3)
    return {"query": jax.random.normal(kq, (EMBD, HEAD)) / EMBD ** 0.5,
            "key": jax.random.normal(kk, (EMBD, HEAD)) / EMBD ** 0.5,
            "value": jax.random.normal(kv, (EMBD, EMBD)) / EMBD ** 0.5}


def make_task(emb_in_ND, emb_out_VD, slots: int, batch: int):
    """Episodes: a memory of `slots` random dictionary rows (keys embedded as input words, values as their
    translations) and one query word from it; the answer is read out by dot product with the output embeddings."""
    emb_k_ND, emb_v_ND = emb_in_ND[np.array([VOCAB_IN.index(k) for k in KEYS])], emb_out_VD[VALUE_ID]
    value_id = jnp.asarray(VALUE_ID)

    def logits(params, rows_Q, memory_M):
        att_QM, out_QD = head(params, emb_k_ND[rows_Q], emb_k_ND[memory_M], emb_v_ND[memory_M])
        return att_QM, out_QD @ emb_out_VD.T

    def episode(key):
        kp, kq = jax.random.split(key)
        memory_M = jax.random.permutation(kp, len(KEYS))[:slots]
        return memory_M, memory_M[jax.random.randint(kq, (1,), 0, slots)]

    def loss_fn(params, key):
        memory_BM, rows_B1 = jax.vmap(episode)(jax.random.split(key, batch))
        _, logits_B1V = jax.vmap(lambda r, m: logits(params, r, m))(rows_B1, memory_BM)
        target_B1 = value_id[rows_B1]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits_B1V, target_B1).mean()
        return loss, (logits_B1V.argmax(-1) == target_B1).mean()

    return logits, loss_fn


def train(loss_fn, logits, params, steps: int, lr: float, eval_every: int):
    """Adam on the episodes; every eval_every steps, accuracy with the whole dictionary as memory."""
    opt = optax.adam(lr)
    all_rows = jnp.arange(len(KEYS))

    @jax.jit
    def train_step(params, opt_state, key):
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, key)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss, "acc": acc}

    def full_accuracy(params):
        _, logits_QV = logits(params, all_rows, all_rows)
        return (logits_QV.argmax(-1) == jnp.asarray(VALUE_ID)).mean()

    opt_state, key, history = opt.init(params), jax.random.key(0), []
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            history.append({"step": step, "full_acc": float(full_accuracy(params))})
        if step == steps:
            break
        params, opt_state, m = train_step(params, opt_state, jax.random.fold_in(key, step))
        if history[-1]["step"] == step:
            history[-1].update(loss=float(m["loss"]), acc=float(m["acc"]))
    return params, history


# --- figures ---

def heatmap(plt, panels, name_rows):
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 0.45 * len(name_rows[0]) + 2.2))
    for ax, (title, att, rows) in zip(np.atleast_1d(axes), panels):
        att = np.asarray(att)
        ax.imshow(att, cmap="viridis", vmin=0, vmax=1)
        for (i, j), v in np.ndenumerate(att):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6.5, color="w" if v < 0.6 else "k")
        ax.set_xticks(range(len(KEYS)), KEYS, rotation=60, fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        ax.set(title=title, xlabel="key (memory row)", ylabel="query word")
    return fig


def run(argv):
    opts = research.options(argv, "attention_lookup", seeds=1)
    plt = research.pyplot()
    steps, batch, slots, lr = opts.pick(400, 300, 40), 64, 5, 0.02
    words = SENTENCE.split()
    d = len(VOCAB_IN)
    page = research.Page(opts, "Attention as a dictionary look-up")
    page.text("## Question",
              "Seed 004 reads attention as a dictionary: with one-hot queries, keys and values, q·Kᵀ picks a key "
              "and q·Kᵀ·V returns its value. Here the dictionary is Italian to English. Is the one-hot version an "
              "exact look-up; what do softmax(q·Kᵀ) and softmax(q·Kᵀ/sqrt(d)) do to it; and can one attention head "
              "learn W_q, W_k, W_v that perform the look-up when the words are dense random vectors instead?")
    page.text("## Setup",
              f"Dictionary ({len(KEYS)} keys, {len(VOCAB_OUT)} distinct values: 'il' and 'la' both give 'the'): "
              + ", ".join(f"{k} → {v}" for k, v in DICTIONARY.items()) + f". Sentence: \"{SENTENCE}\". "
              f"Stages 1-3: one-hot vectors over the {d} input and {len(VOCAB_OUT)} output words; K holds the keys "
              "in the dictionary's order, V their translations; a result is decoded by its largest entry. "
              f"Stage 4: every word is a fixed N(0, 1) vector of width {EMBD} (fewer dimensions than words, so no "
              f"set of them is orthogonal); one head with W_q, W_k ({EMBD}×{HEAD}) and W_v ({EMBD}×{EMBD}), "
              f"softmax(q·kᵀ/sqrt({HEAD})), its output read out by dot product with the output words' vectors and "
              f"trained by cross-entropy with optax.adam(lr={lr}), {steps} jitted steps of {batch} episodes; an "
              f"episode is a memory of {slots} random dictionary rows and one query word from it. Evaluated with "
              f"the whole dictionary ({len(KEYS)} rows) as memory. Seed 0 for weights and episodes, 1337 for the "
              "embeddings, 99 for the evaluation episodes.")

    # Stage 1: one-hot, exact.
    E_out = one_hot(VOCAB_OUT, VOCAB_OUT)
    K_MD, V_MV = one_hot(KEYS, VOCAB_IN), E_out[VALUE_ID]
    Q_QD = one_hot(words, VOCAB_IN)
    q = one_hot(["sotto"], VOCAB_IN)
    typo = 0.95 * one_hot(["tavolo"], VOCAB_IN)  # "tavoli": close to a key, not equal to it
    sel_QM = Q_QD @ K_MD.T
    one = "\n\n".join([
        "one query, 'sotto':", grid(q, ["q"], VOCAB_IN, 0), grid(q @ K_MD.T, ["q·Kᵀ"], KEYS, 0),
        grid(q @ K_MD.T @ V_MV, ["q·Kᵀ·V"], VOCAB_OUT, 0),
        "a near miss, 'tavoli' = 0.95 · E[tavolo]:", grid(typo @ K_MD.T @ V_MV, ["q·Kᵀ·V"], VOCAB_OUT, 2),
        "K (one row per key):", grid(K_MD, KEYS, VOCAB_IN, 0), "V (the keys' translations):",
        grid(V_MV, KEYS, VOCAB_OUT, 0),
        "Q·Kᵀ for the sentence:", grid(sel_QM, words, KEYS, 0), "Q·Kᵀ·V:", grid(sel_QM @ V_MV, words, VOCAB_OUT, 0)])
    s1 = stage_stats(sel_QM, sel_QM @ V_MV, words)
    print(one)
    page.text("## Stage 1: one-hot q·Kᵀ·V, an exact look-up",
              "Rows are the query words, columns the memory's keys (Q·Kᵀ) or the output words (Q·Kᵀ·V).")
    page.code(one)
    page.text(f"Decoded: \"{' '.join(s1['words'])}\" ({s1['correct']}/{len(words)} words right).")
    page.figure(heatmap(plt, [("Q·Kᵀ (one-hot)", sel_QM, words)], [words]), "stage1_exact.png",
                "Stage 1: Q·Kᵀ with one-hot vectors; each query selects exactly its key.")

    # Stages 2 and 3: softmax, then scaled softmax.
    stats = {"1 one-hot Q·Kᵀ·V": s1}
    for title, label, scale, name in (
            ("Stage 2: softmax(Q·Kᵀ)·V, a soft look-up", "2 softmax(Q·Kᵀ)·V", 1.0, "stage2_softmax.png"),
            (f"Stage 3: softmax(Q·Kᵀ / sqrt(d))·V, d = {d}", "3 softmax(Q·Kᵀ/sqrt(d))·V", d ** -0.5,
             "stage3_scaled.png")):
        att_QM = softmax(scale * sel_QM)
        out_QV = att_QM @ V_MV
        st = stage_stats(att_QM, out_QV, words)
        stats[label] = st
        text = "\n\n".join([f"attention weights (scale {scale:.3f}):", grid(att_QM, words, KEYS, 3),
                            "weights · V:", grid(out_QV, words, VOCAB_OUT, 3),
                            "'tavoli' = 0.95 · E[tavolo]:",
                            grid(softmax(scale * typo @ K_MD.T), ["weights"], KEYS, 3)])
        print(text)
        page.text(f"## {title}")
        page.code(text)
        page.text(f"Weight on the right key {st['right']:.3f}, largest on a wrong key {st['wrong']:.3f}. Decoded: "
                  f"\"{' '.join(st['words'])}\" ({st['correct']}/{len(words)} words right).")
        page.figure(heatmap(plt, [(title.split(": ")[1], att_QM, words)], [words]), name,
                    f"{title.split(':')[0]}: attention weights of the sentence's words over the {len(KEYS)} keys.")
    page.figure(sharpness_figure(plt, sel_QM, V_MV, words, d), "scale_sweep.png",
                "Softmax(β·Q·Kᵀ) for one-hot vectors as the logit scale β varies: weight on the right key and "
                "words decoded right; β = 1 is stage 2, β = 1/sqrt(d) stage 3.")

    # Stage 4: learned projections on dense embeddings.
    rng = np.random.default_rng(1337)
    emb_in = jnp.asarray(rng.standard_normal((len(VOCAB_IN), EMBD)), jnp.float32)
    emb_out = jnp.asarray(rng.standard_normal((len(VOCAB_OUT), EMBD)), jnp.float32)
    logits, loss_fn = make_task(emb_in, emb_out, slots, batch)
    logits = jax.jit(logits)  # always called with the whole dictionary as queries and memory: one compile
    params0 = init_params(jax.random.key(0))
    rows_all, rows_sent = jnp.arange(len(KEYS)), np.array([KEYS.index(w) for w in words])
    params, history = train(loss_fn, logits, params0, steps, lr, eval_every=max(1, steps // 20))
    (att0_dict, logit0_dict), (att_dict, logit_dict) = (logits(p, rows_all, rows_all) for p in (params0, params))
    att0, att1 = np.asarray(att0_dict)[rows_sent], np.asarray(att_dict)[rows_sent]
    before = stage_stats(att0, np.asarray(logit0_dict)[rows_sent], words)
    after = stage_stats(att1, np.asarray(logit_dict)[rows_sent], words)
    stats["4 learned head, before training"], stats["4 learned head, after training"] = before, after
    eval_acc = jax.jit(lambda p: make_task(emb_in, emb_out, slots, 2048)[1](p, jax.random.key(99))[1])
    held_out = [float(eval_acc(p)) for p in (params0, params)]
    dict_acc = float((np.asarray(logit_dict).argmax(-1) == VALUE_ID).mean())
    text = "\n\n".join(["the first input words' vectors:", grid(emb_in[:4], VOCAB_IN[:4],
                                                                  [f"e{i}" for i in range(EMBD)], 2),
                        "learned attention, every dictionary word as the query:", grid(att_dict, KEYS, KEYS, 2),
                        "learned attention, the sentence:", grid(att1, words, KEYS, 2)])
    print(text)
    page.text("## Stage 4: learned W_q, W_k, W_v on dense embeddings")
    page.code(text)
    last = history[-1]
    page.text(f"Training: loss {history[0]['loss']:.3f} → {history[-2]['loss']:.3f} (step {history[-2]['step']}), "
              f"whole-dictionary accuracy {history[0]['full_acc']:.2f} → {last['full_acc']:.2f}. On 2048 newly drawn "
              f"{slots}-row episodes: accuracy {held_out[0]:.3f} before, {held_out[1]:.3f} after. The sentence "
              f"before training: \"{' '.join(before['words'])}\" ({before['correct']}/{len(words)}); after: "
              f"\"{' '.join(after['words'])}\" ({after['correct']}/{len(words)}).")
    page.figure(heatmap(plt, [("before training", att0, words), ("after training", att1, words)], [words]),
                "stage4_learned.png", "Stage 4: the head's attention weights for the sentence's words over the "
                "dictionary's keys, before and after training.")
    page.figure(training_figure(plt, history), "stage4_training.png",
                "Stage 4: training loss and accuracy on the sampled episodes, and accuracy with the whole dictionary "
                "as memory.")

    page.text("## All stages")
    page.text("Means over the sentence's words. A key with the right translation is the right key, or for 'il' "
              "and 'la' either of the two.")
    page.table(["stage", "weight on the right key", "weight on keys with the right translation",
                "largest weight on a wrong key", "words right", "decoded sentence"],
               [[k, f"{s['right']:.3f}", f"{s['same']:.3f}", f"{s['wrong']:.3f}", f"{s['correct']}/{len(words)}",
                 " ".join(s["words"])] for k, s in stats.items()])
    page.text("## Finding", finding(stats, d, len(words), dict_acc, held_out, slots))
    page.write()


def sharpness_figure(plt, sel_QM, V_MV, words, d):
    betas = np.logspace(-1.5, 1.5, 61)
    right, correct = [], []
    for b in betas:
        att = softmax(b * sel_QM)
        st = stage_stats(att, att @ V_MV, words)
        right.append(st["right"])
        correct.append(st["correct"])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(betas, right, label="mean weight on the right key")
    ax.plot(betas, np.array(correct) / len(words), label="fraction of words decoded right")
    for b, name in ((1.0, "β = 1"), (d ** -0.5, "β = 1/sqrt(d)")):
        ax.axvline(b, color="gray", ls=":", lw=1)
        ax.text(b, 1.02, name, ha="center", fontsize=8)
    ax.set(xscale="log", xlabel="logit scale β", ylim=(0, 1.08), title="softmax(β·Q·Kᵀ)·V, one-hot")
    ax.legend()
    return fig


def training_figure(plt, history):
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    rows = [h for h in history if "loss" in h]
    a.plot([h["step"] for h in rows], [h["loss"] for h in rows])
    a.set(xlabel="step", ylabel="cross-entropy (nats)", title="training loss")
    b.plot([h["step"] for h in rows], [h["acc"] for h in rows], label="training batch")
    b.plot([h["step"] for h in history], [h["full_acc"] for h in history], label="whole dictionary as memory")
    b.set(xlabel="step", ylabel="accuracy", ylim=(0, 1.05), title="accuracy")
    b.legend()
    return fig


def finding(stats, d, n, dict_acc, held_out, slots) -> str:
    s1, s2, s3, s4a, s4b = stats.values()
    why = (" The scale is meant for dot products whose variance grows with d; a one-hot q·k is at most 1 whatever "
           "d is, so dividing it only flattens the softmax")
    if s3["correct"] < s2["correct"]:
        why += ", and the words whose key shares no translation lose to 'the', which collects two keys' weight."
    else:
        why += "."
    return (
        f"One-hot q·Kᵀ·V is an exact look-up: {s1['correct']}/{n} words come back, with weight {s1['right']:.3f} on "
        f"the right key and at most {s1['wrong']:.3f} on any other. softmax(Q·Kᵀ) blurs it: the right key keeps "
        f"{s2['right']:.3f} of the weight and a wrong key gets up to {s2['wrong']:.3f}; {s2['correct']}/{n} words "
        f"still decode. Dividing by sqrt(d) = {d ** 0.5:.2f} gives {s3['right']:.3f} against {s3['wrong']:.3f} and "
        f"{s3['correct']}/{n} words." + why +
        f" A head with learned W_q, W_k, W_v on dense random {EMBD}-wide vectors goes from {held_out[0]:.3f} to "
        f"{held_out[1]:.3f} accuracy on newly drawn {slots}-row episodes and gets "
        f"{dict_acc * len(KEYS):.0f}/{len(KEYS)} dictionary words right with the whole dictionary as memory; "
        "for the sentence's words it puts "
        f"{s4b['same']:.3f} of its weight on keys with the right translation ({s4a['same']:.3f} before training) "
        f"and {s4b['right']:.3f} on the right key itself, and decodes {s4b['correct']}/{n} words.")


if __name__ == "__main__":
    sys.exit(research.main(run))
