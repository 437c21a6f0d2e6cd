"""Char vs GPT-2 BPE vs a BPE trained on the corpus: which gives the CPU GPT the lowest val bits/char per FLOP?

Part 1 measures each tokenizer (vocabulary, tokens per character, encode speed, exact round trip, BPE fit time).
Part 2 trains the `shakespeare_char_cpu` model (4 layers, 4 heads, 128 wide, block 64 tokens, batch 12) once per
tokenizer for the same training FLOPs (nanoGPT's 6N + 12·L·T·D per token, N counting the tied embedding/LM head)
and measures the exact val bits per character. Part 3 shows why seed 001's "bigram tokens" (a vocabulary of
character pairs) cannot encode unseen text.

    python experiments/tokenizers.py --input=../shared/data/tinyshakespeare/input.txt [--quick | --smoke]
        [--seeds=N] [--char_steps=S]
"""

from __future__ import annotations

import math
import statistics
import sys
import tempfile
import time
from collections import Counter

from gptjax import data, model, research, tokenizers
from gptjax.bench import flops

PRESET = "shakespeare_char_cpu"
WARMUP_FRACTION = 100 / 2000  # the preset's warmup_iters / max_iters, kept for every step count


def settings(opts: research.Options) -> dict:
    """This mode's tokenizers, model shape and the char model's step budget."""
    return opts.pick(
        dict(specs=("char", "bpe:256", "bpe:512", "bpe:1024", "bpe:2048", "bpe:4096", "gpt2"),
             whole_fit=("bpe:2048", "bpe:4096"), char_steps=500, eval_points=5, eval_iters=8, shape={}, encode_runs=5),
        dict(specs=("char", "bpe:256", "bpe:1024", "gpt2"), whole_fit=("bpe:1024",), char_steps=160, eval_points=3,
             eval_iters=4, shape={}, encode_runs=3),
        dict(specs=("char", "bpe:260"), whole_fit=(), char_steps=6, eval_points=2, eval_iters=2, encode_runs=2,
             shape=dict(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=32, vocab_size=260)),
    )


def read_splits(opts: research.Options) -> tuple[str, str, str]:
    """(whole text, train, val): the library's 90/10 split of the characters."""
    text = data.read_text(data.corpus_path(research.make_config(opts, PRESET).data))
    parts = data.split_text(text)
    return text, parts["train"], parts["val"]


# ---- Part 1: the tokenizers themselves


def measure_tokenizer(spec: str, text: str, train: str, val: str, runs: int) -> dict:
    """Fit as the library does (char: on the whole corpus; BPE: on the train split), then tokens/char, encode
    speed and round trips."""
    tick = time.perf_counter()
    tok = tokenizers.build(spec, train if spec.startswith("bpe:") else text)
    fit_s = time.perf_counter() - tick
    ids = {"train": tok.encode(train), "val": tok.encode(val)}
    speeds = []
    for _ in range(runs):
        tick = time.perf_counter()
        tok.encode(val)
        speeds.append(len(val) / (time.perf_counter() - tick))
    row = {"spec": spec, "vocab": tok.vocab_size, "fit_s": fit_s if spec != "gpt2" else None,
           "tpc_train": len(ids["train"]) / len(train), "tpc_val": len(ids["val"]) / len(val),
           "chars_per_s": statistics.median(speeds), "used": len(set(ids["train"])),
           "exact": all(tok.decode(ids[s]) == t for s, t in (("train", train), ("val", val)))}
    if spec.startswith("bpe:"):  # the merges learned from train and val together: what would fitting on val give?
        row["whole_fit"] = tokenizers.build(spec, text)
        row["tpc_val_wholefit"] = len(row["whole_fit"].encode(val)) / len(val)
    return row


def part1(page: research.Page, rows: list[dict], runs: int) -> None:
    page.text("## Part 1: the tokenizers",
              "Each tokenizer is fitted as `gptjax prepare` fits it: the char vocabulary comes from the whole corpus, "
              "as nanoGPT's `prepare.py` builds it, and the BPE merges from the train split only. Tokens per "
              "character are counted on the library's 90/10 split. Encode speed: the val split's text, median of "
              f"{runs} runs, in this process, wall clock on a 2-core machine shared with other jobs (the char "
              "tokenizer is a Python dict look-up; tiktoken's encoders run "
              "in Rust). Round trip: `decode(encode(split)) == split` for both splits. The last column refits each "
              "BPE on the whole corpus, val included, and counts its tokens per val character, to show what "
              "fitting on val would be worth.")
    page.table(["tokenizer", "vocab size", "ids used in train", "tokens/char train", "tokens/char val",
                "chars/token val", "encode (M chars/s)", "round trip exact", "fit time (s)",
                "tokens/char val, BPE fitted on train + val"],
               [[r["spec"], f"{r['vocab']:,}", f"{r['used']:,}", f"{r['tpc_train']:.4f}", f"{r['tpc_val']:.4f}",
                 f"{1 / r['tpc_val']:.2f}", f"{r['chars_per_s'] / 1e6:.2f}", "yes" if r["exact"] else "NO",
                 "— (pretrained)" if r["fit_s"] is None else f"{r['fit_s']:.2f}",
                 f"{r['tpc_val_wholefit']:.4f}" if "tpc_val_wholefit" in r else "—"] for r in rows])


def finding_part1(rows: list[dict]) -> str:
    compression = ", ".join(f"{r['spec']} {1 / r['tpc_val']:.2f}" for r in rows)
    exact = "exact" if all(r["exact"] for r in rows) else "NOT exact for " + ", ".join(
        r["spec"] for r in rows if not r["exact"])
    out = f"Compression on val: {compression} chars/token; round trips: {exact}."
    bpe = [r for r in rows if "tpc_val_wholefit" in r]
    if bpe:
        leak = max(abs(r["tpc_val_wholefit"] - r["tpc_val"]) / r["tpc_val"] for r in bpe)
        out += f" Refitting the BPEs on train and val together changes their val tokens/char by at most {leak:.2%}."
    b = next((r for r in rows if r["spec"] == "bpe:256"), None)
    if b is not None and b["tpc_val"] == 1.0:
        out += (f" bpe:256 has no merges: one byte per token, on this ASCII text one character per token, with "
                f"{b['vocab'] - b['used']} of its {b['vocab']} ids never used in train.")
    return out


# ---- Part 2: val bits/char at equal training FLOPs


def flops_per_token(config) -> tuple[int, float]:
    """(N, FLOPs per token): N counts every parameter but the position table, the tied wte/LM head included."""
    n = model.num_params(model.abstract_params(config.model))
    return n, flops.flops_per_token(config.model, n)


def prepare_fit_on_whole(opts: research.Options, spec: str, tok: tokenizers.Tokenizer, root: str) -> str:
    """A data_dir under root whose prepared `spec` data uses a BPE fitted on the whole corpus, val included (the
    leak this page measures; gptjax prepare fits on train only)."""
    data.prepare_with(research.make_config(opts, PRESET, tokenizer=spec, data_dir=root).data, tok)
    return root


def equal_flops_configs(opts: research.Options, s: dict, char_steps: int, fits: dict, scratch: str) -> list[dict]:
    """Per tokenizer: its config with the step count that spends the char model's training FLOPs."""
    variants, budget = [], None
    todo = [(spec, spec, {}) for spec in s["specs"]]
    todo += [(f"{spec}, fit on train+val", spec, {"data_dir": prepare_fit_on_whole(opts, spec, fits[spec], scratch)})
             for spec in s["whole_fit"]]
    for label, spec, where in todo:
        base = research.make_config(opts, PRESET, tokenizer=spec, **where, **s["shape"])
        meta = data.prepare(base.data).meta
        base = research.make_config(opts, PRESET, tokenizer=spec, **where,
                                    **{"vocab_size": meta["vocab_size"], **s["shape"]})
        n, fpt = flops_per_token(base)
        tokens_per_step = base.train.batch_size * base.model.block_size
        if budget is None:
            assert spec == "char", "the first tokenizer is char: its steps set the budget"
            budget = char_steps * tokens_per_step * fpt
        steps = max(2, round(budget / (tokens_per_step * fpt)))
        config = research.make_config(
            opts, PRESET, tokenizer=spec, **where, **s["shape"], max_iters=steps, lr_decay_iters=steps,
            warmup_iters=max(1, round(WARMUP_FRACTION * steps)), eval_interval=max(1, steps // (s["eval_points"] - 1)),
            eval_iters=s["eval_iters"], keep_checkpoints=1)
        variants.append({"spec": label, "config": config, "meta": meta, "n": n, "fpt": fpt, "steps": steps,
                         "flops": steps * tokens_per_step * fpt, "tokens": steps * tokens_per_step,
                         "val_tpc": meta["val_tokens"] / meta["val_chars"]})
    return variants


def train_all(opts: research.Options, variants: list[dict]) -> None:
    for v in variants:
        tick, cpu = time.perf_counter(), time.process_time()
        v["runs"] = research.train_seeds(v["config"], opts.seeds)
        v["wall_s"] = time.perf_counter() - tick
        print(f"{v['spec']}: {v['steps']} steps, bits/char {research.pm(r['bits_per_char'] for r in v['runs'])}, "
              f"{v['wall_s']:.0f} s wall ({sum(r['wall_s'] for r in v['runs']):.0f} s training, compile "
              f"{sum(r['compile_s'] for r in v['runs']):.1f} s), {time.process_time() - cpu:.0f} s CPU", flush=True)


def part2(page: research.Page, opts: research.Options, s: dict, char_steps: int, fits: dict) -> list[dict]:
    with tempfile.TemporaryDirectory() as scratch:
        variants = equal_flops_configs(opts, s, char_steps, fits, scratch)
        train_all(opts, variants)
    c = variants[0]["config"]
    m, t = c.model, c.train
    page.text("## Part 2: val bits per character at equal training FLOPs",
              f"Model: the `{PRESET}` preset's GPT, {m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, "
              f"block {m.block_size} tokens, batch {t.batch_size}, dropout {m.dropout}, weights tied, AdamW lr "
              f"{t.learning_rate:g} (cosine to {t.min_lr:g} at the last step, warmup "
              f"{WARMUP_FRACTION:.0%} of the steps), beta2 {t.beta2}, weight decay {t.weight_decay}, grad clip "
              f"{t.grad_clip}. Seeds: {', '.join(map(str, opts.seeds))} ({len(opts.seeds)} per tokenizer).",
              "FLOPs per token = 6N + 12·L·T·D (nanoGPT's estimate, T = block in tokens), N counting every "
              "parameter except the position table: the tied token embedding is counted once, because as the LM "
              "head its matmul costs 2·V·D FLOPs per token forward. Budget: the char model's "
              f"{char_steps} steps, **{variants[0]['flops']:.3e} FLOPs**; every other tokenizer gets "
              "round(budget / (FLOPs per token × tokens per step)) steps. The block stays "
              f"{m.block_size} tokens, so a BPE window covers more characters (block × chars/token in the table) "
              "and a BPE model sees more characters for the same tokens.",
              "A row marked \"fit on train+val\" uses the same BPE fitted on the whole corpus, val included "
              "(Part 1's last column), prepared by this script in a scratch data_dir: the leak gptjax prepare avoids "
              "by fitting on the train split only.",
              "Bits per character: the exact loss of the final parameters over every next-token prediction of the "
              "whole val split (consecutive block-sized windows), in nats, / ln 2 / the val characters predicted: "
              "comparable across tokenizers, unlike nats per token.")
    if "vocab_size" in s["shape"]:
        page.text(f"(This mode pads every model's embedding table to {s['shape']['vocab_size']} ids, so that one "
                  "compiled shape serves every tokenizer.)")
    best = min(variants, key=lambda v: statistics.fmean(r["bits_per_char"] for r in v["runs"]))
    page.table(["tokenizer", "vocab", "N (params, wte incl.)", "FLOPs/token", "steps", "tokens seen",
                "chars seen (approx.)", "window (chars)", "train FLOPs", "val loss (nats/token)", "val bits/char",
                "wall (s, all seeds)"],
               [[("**" + v["spec"] + "**") if v is best else v["spec"], f"{v['meta']['vocab_size']:,}",
                 f"{v['n']:,}", f"{v['fpt'] / 1e6:.2f}M", v["steps"], f"{v['tokens']:,}",
                 f"{v['tokens'] / v['val_tpc']:,.0f}", f"{m.block_size / v['val_tpc']:.0f}", f"{v['flops']:.3e}",
                 research.pm(r["loss"] for r in v["runs"]), research.pm(r["bits_per_char"] for r in v["runs"]),
                 f"{v['wall_s']:.0f}"] for v in variants])
    page.text("Chars seen and window use the val split's chars per token. Wall includes compiles, the loss "
              "estimates along the way and the exact evaluation.")
    return variants


def plot_part2(page: research.Page, variants: list[dict]) -> None:
    plt = research.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    names = [v["spec"] for v in variants]
    means = [statistics.fmean(r["bits_per_char"] for r in v["runs"]) for v in variants]
    ax1.bar(names, means, color="tab:blue")
    for i, v in enumerate(variants):
        ax1.scatter([i] * len(v["runs"]), [r["bits_per_char"] for r in v["runs"]], color="black", s=12, zorder=3)
        ax1.text(i, means[i], f"{means[i]:.3f}", ha="center", va="bottom")
    ax1.set_ylim(min(means) * 0.9, max(means) * 1.05)
    ax1.tick_params(axis="x", labelrotation=30)
    ax1.set_ylabel("val bits / char (exact, whole split)")
    ax1.set_title(f"equal training FLOPs ({variants[0]['flops']:.2e})")
    for v in variants:
        tokens_per_step = v["config"].train.batch_size * v["config"].model.block_size
        for k, r in enumerate(v["runs"]):
            h = [row for row in r["history"] if row["step"] > 0]  # at step 0 every model guesses uniformly
            ax2.plot([row["step"] * tokens_per_step * v["fpt"] for row in h],
                     [row["val_loss"] / math.log(2) * v["val_tpc"] for row in h], marker=".",
                     color=f"C{variants.index(v)}", label=v["spec"] if k == 0 else None)
    ax2.set_xlabel("training FLOPs")
    ax2.set_ylabel("estimated val bits / char")
    ax2.set_title("val loss along the way (nats/token x val tokens/char / ln 2)")
    ax2.legend()
    ax2.grid(alpha=0.3)
    page.figure(fig, "bits_per_char.png", "Left: exact val bits/char per tokenizer at equal training FLOPs (dots: "
                "seeds). Right: the loop's estimated val loss (a few random batches, so noisy), converted to "
                "bits/char, against training FLOPs, from the first estimate after step 0.")


def finding_part2(variants: list[dict]) -> str:
    ranked = sorted(variants, key=lambda v: statistics.fmean(r["bits_per_char"] for r in v["runs"]))
    mean = {v["spec"]: statistics.fmean(r["bits_per_char"] for r in v["runs"]) for v in variants}
    order = " < ".join(f"{v['spec']} ({research.pm((r['bits_per_char'] for r in v['runs']), 3)})" for v in ranked)
    char = next(v for v in variants if v["spec"] == "char")
    parts = [f"At {char['flops']:.2e} training FLOPs (the char model's {char['steps']} steps) the val bits/char "
             f"rank {order}."]
    gpt2 = next((v for v in variants if v["spec"] == "gpt2"), None)
    if gpt2 is not None:
        wte = gpt2["meta"]["vocab_size"] * gpt2["config"].model.n_embd
        parts.append(f"GPT-2's vocabulary makes the tied embedding {wte:,} of the model's {gpt2['n']:,} counted "
                     f"parameters, so a token costs {gpt2['fpt'] / char['fpt']:.1f}x a char token's FLOPs and the "
                     f"budget buys it {gpt2['steps']} steps.")
    merged = [v for v in variants if v["spec"].startswith("bpe:") and v["meta"]["vocab_size"] > 256]
    gains = [mean["char"] - mean[v["spec"]] for v in merged]
    if gains and min(gains) > 0:
        parts.append(f"Every BPE with merges (vocab > 256, either fit) beats char, by {min(gains):.3f} to "
                     f"{max(gains):.3f} bits/char.")
    if "bpe:256" in mean:
        b256 = next(v for v in variants if v["spec"] == "bpe:256")
        spread = max(research.mean_std(r["bits_per_char"] for r in v["runs"])[1] for v in (char, b256))
        parts.append(f"char and bpe:256 split the text identically (one token per character); bpe:256 differs by "
                     f"{b256['meta']['vocab_size'] - char['meta']['vocab_size']} more ids in its softmax and "
                     f"{char['steps'] - b256['steps']} fewer steps, and lands "
                     f"{mean['bpe:256'] - mean['char']:+.3f} bits/char from char"
                     + (f" (seed-to-seed std at most {spread:.3f})." if len(char["runs"]) > 1 else " (one seed)."))
    for v in variants:
        if v["spec"].endswith(", fit on train+val"):
            spec = v["spec"].split(",")[0]
            parts.append(f"Fitting {spec} on train and val together (a leak) would move its val bits/char from "
                         f"{mean[spec]:.3f} to {mean[v['spec']]:.3f} ({mean[v['spec']] - mean[spec]:+.3f}): "
                         "merges fitted on the val text flatter the val loss.")
    held_out = [v for v in ranked if not v["spec"].endswith("train+val")]
    parts.append(f"Among the tokenizers fitted without the val text, the lowest val bits/char is "
                 f"{held_out[0]['spec']}'s ({mean[held_out[0]['spec']]:.3f}).")
    return " ".join(parts)


# ---- Part 3: seed 001's bigram tokens


def part3(page: research.Page, train: str, val: str) -> dict:
    vocab = {train[i:i + 2] for i in range(len(train) - 1)}  # every pair that occurs in train, at any offset
    aligned = [val[i:i + 2] for i in range(0, len(val) - 1, 2)]  # what an encoder of pairs reads: 2 chars a token
    overlapping = [val[i:i + 2] for i in range(len(val) - 1)]
    rows = []
    for name, pairs in (("non-overlapping (offset 0, stride 2)", aligned), ("every offset (stride 1)", overlapping)):
        miss = Counter(p for p in pairs if p not in vocab)
        rows.append([name, f"{len(pairs):,}", f"{len(set(pairs)):,}", f"{sum(miss.values()):,}",
                     f"{sum(miss.values()) / len(pairs):.3%}", f"{len(miss):,}"])
    miss = Counter(p for p in aligned if p not in vocab)
    chars = sorted(set(train))
    page.text("## Part 3: seed 001's bigram tokens",
              f"A vocabulary of character pairs, built from every pair that occurs in the train split (any offset): "
              f"{len(vocab):,} pairs out of the {len(chars)}² = {len(chars) ** 2:,} its characters allow. An encoder "
              "that reads two characters per token (the alignment a pair vocabulary implies, so that decoding "
              "concatenates back to the text) must find each val pair in it:")
    page.table(["val pairs read", "pairs", "distinct", "not in the train vocabulary", "share", "distinct missing"],
               rows)
    examples = []
    for pair, count in miss.most_common(8):
        i = next(2 * k for k, p in enumerate(aligned) if p == pair)
        examples.append([f"`{pair!r}`", count, f"`{val[max(0, i - 15):i + 17]!r}`"])
    page.text("The most frequent val pairs (non-overlapping reading) that no train text contains, with a val "
              "context:")
    page.table(["pair", "times in val", "context"], examples)
    word = "First"
    joined = "".join(word[i:i + 2] for i in range(len(word) - 1))
    page.text(f"Read at every offset instead (as seed 001's encoder does), the ids overlap and decoding by "
              f"joining their pairs does not give the text back: `{word!r}` -> "
              f"{[word[i:i + 2] for i in range(len(word) - 1)]} -> `{joined!r}`.")
    seed_pair = " !"
    page.text(f"The seed's own test string `'Hello there !'` needs the pair `' !'`, which "
              f"{'does' if seed_pair in vocab else 'does not'} occur in train. A char or byte-level BPE tokenizer "
              "encodes any string of its characters (byte-level BPE: any string at all), so this failure is "
              "particular to a closed vocabulary of multi-character units with no fallback to smaller ones.")
    return {"vocab": len(vocab), "missing": sum(miss.values()), "pairs": len(aligned), "distinct_missing": len(miss)}


# ---- the page


def run(argv):
    opts = research.options(argv, "tokenizers", seeds=(2, 2, 1), extra={"char_steps": 0})
    s = settings(opts)
    char_steps = opts.extra["char_steps"] or s["char_steps"]
    page = research.Page(opts, "Tokenizers: char vs GPT-2 BPE vs a BPE trained on tiny Shakespeare")
    page.text("Question: the lecture tokenizes by character; GPT-2 and seed 004 use byte-pair encodings. What does "
              "each tokenizer cost and give (vocabulary, compression, speed, round trip), and, for a fixed "
              "training-compute budget, which one gives the CPU GPT the lowest val bits per character? And why "
              "does seed 001's vocabulary of character pairs fail?")
    text, train, val = read_splits(opts)
    page.text(f"Corpus: tiny Shakespeare, {len(text):,} characters; train = the first {len(train):,}, val = the "
              f"last {len(val):,}.")
    rows = [measure_tokenizer(spec, text, train, val, s["encode_runs"]) for spec in s["specs"]]
    part1(page, rows, s["encode_runs"])
    variants = part2(page, opts, s, char_steps, {r["spec"]: r["whole_fit"] for r in rows if "whole_fit" in r})
    plot_part2(page, variants)
    pairs = part3(page, train, val)
    page.text("## Finding", finding_part2(variants), finding_part1(rows)
              + f" The pair vocabulary of Part 3 cannot encode {pairs['missing']:,} of the {pairs['pairs']:,} val "
                f"pairs ({pairs['missing'] / pairs['pairs']:.2%}, {pairs['distinct_missing']} distinct).",
              f"This is one budget on one small CPU model with a fixed {variants[0]['config'].model.block_size}-token "
              "block; a larger budget or a different block could rank the tokenizers differently.")
    page.write()


if __name__ == "__main__":
    sys.exit(research.main(run))
