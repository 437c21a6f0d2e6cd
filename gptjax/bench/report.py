"""Benchmark records: one printed line each, results.json, results.md (ratios to the baseline, jax_jit) and a PNG
chart."""

from __future__ import annotations

import json
import os

from gptjax import writes
from gptjax.bench.modes import BASELINE, MODES
from gptjax.errors import UserError

# results.json is {"command", "fields", "records"}; every record has exactly these fields.
FIELDS = {
    "mode": " | ".join(m.name + (f" ({m.note})" if m.note else "") for m in MODES.values()),
    "detail": "how the mode ran: jax.jit or jax.disable_jit() and the attention; eager or torch.compile (backend, "
              "mode), SDPA, autocast; for generate, how the sampler ran",
    "workload": "train (forward + backward + AdamW) | forward (eval logits and loss) | generate (sampling)",
    "sampler": "generate: kv (KV cache: prefill, then one token per step) | reforward (the whole window re-run per "
               "token); null for train and forward",
    "point": "the swept setting of this record, e.g. {'batch_size': 16}; {} without --sweep",
    "config": "the whole run configuration (model / data / train), as config.json holds it",
    "shape": "n_layer, n_head, n_embd, block_size, vocab_size, batch_size, gradient_accumulation_steps",
    "params": "parameter count without position embeddings (nanoGPT's get_num_params)",
    "device": "device kind ('cpu' on a CPU host: see host.cpu)",
    "devices": "devices the mode ran on (the batch split over them)",
    "mesh": "jax_jit_dp: the mesh it ran on, dp:N x fsdp:M (train's --mesh); null for the other modes",
    "step_impl": "jax_jit_dp: sharded (jit with shardings) | shard_map | pmap (train's --step_impl); null otherwise",
    "param_bytes_per_device": "jax_jit_dp train: the most parameter bytes one device holds (FSDP shards them)",
    "dtype": "compute dtype (--dtype, auto resolved on the mode's device): float32, or bfloat16 matmuls with "
             "float32 parameters and optimizer (JAX's Compute; torch.autocast in the torch modes)",
    "matmul": "JAX modes: xla (XLA's dots) or mkl (the oneMKL kernel, gptjax/kernels), --matmul resolved in the "
              "mode's process; null for PyTorch",
    "host": "cpu model and flags, cores",
    "versions": "python and the framework packages the mode imported",
    "malloc": "reuse_freed_memory (glibc keeps freed step buffers, as every gptjax command does) or default",
    "xla_flags": "the mode's XLA_FLAGS, with the GPU flags every gptjax command adds (gptjax.gpu.GPU_XLA_FLAGS)",
    "threads": "PyTorch's intra-op and inter-op threads; null for JAX",
    "steps": "timed calls per repeat",
    "warmup": "untimed calls after the first",
    "repeats": "timed repeats (over all rounds: with --rounds=R the modes ran R times in turn, repeats pooled)",
    "step_ms": "milliseconds per call: median, min and max over the repeats, and every repeat's figure (runs)",
    "tokens_per_step": "tokens one call processes (train: A x B x T; forward: B x T; generate: B x max_new_tokens)",
    "tokens_per_sec": "tokens_per_step / median step time",
    "first_call_s": "seconds of the first call: compilation (if any) plus one step",
    "flops_per_token": "training FLOPs per token, 6N + 12*L*H*Q*T",
    "mfu": "model FLOPs utilisation against the device's peak for dtype; null on a CPU or for generate",
    "peak_mem_bytes": "peak memory of the mode (see peak_mem_source)",
    "peak_mem_source": "JAX memory_stats, torch.cuda.max_memory_allocated, or the process's peak RSS on a CPU",
    "loss": "loss of the last timed call (null for generate)",
    "loss_diff": f"max |loss - {BASELINE}'s loss| over the calls both ran; null where not comparable",
    "loss_flag": "true when loss_diff > 1e-3 (float32) or 5e-2 (bfloat16): fast but wrong",
    "error": "null, or why the mode failed",
}
FILES = ("results.json", "results.md", "results.png")  # what --out receives; nothing else there is touched
LOSS_TOLERANCE = 1e-3  # float32: the frameworks agree to ~1e-6
BF16_LOSS_TOLERANCE = 5e-2  # bfloat16: two frameworks round differently (8-bit mantissa), so losses drift apart


def loss_tolerance(dtype: str | None) -> float:
    return BF16_LOSS_TOLERANCE if dtype == "bfloat16" else LOSS_TOLERANCE


def _point(r: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in r["point"].items())


def _workload(r: dict) -> str:
    return r["workload"] + (f" ({r['sampler']})" if r.get("sampler") else "")


def _label(r: dict) -> str:
    return r["mode"] + (f" ({r['sampler']})" if r.get("sampler") else "")


def line(r: dict) -> str:
    """One line per record, printed as the mode finishes."""
    head = f"{r['mode']:<13} {_workload(r):<8} {_point(r) + ' ' if r['point'] else ''}"
    if r["error"]:
        return f"{head}FAILED: {r['error']}"
    ms = r["step_ms"]
    mfu = f" | MFU {r['mfu']:.1%}" if r["mfu"] is not None else ""
    loss = f" | loss {r['loss']:.4f}" if r["loss"] is not None else ""
    if r["loss_diff"] is not None:
        loss += f" (Δ {BASELINE} {r['loss_diff']:.1e})"
    flag = f"\n!!! {r['mode']}: loss differs from {BASELINE}'s by {r['loss_diff']:.2e} > " \
        f"{loss_tolerance(r['dtype']):g} — fast but wrong? !!!" if r["loss_flag"] else ""
    return (f"{head}| {r['devices']} x {r['device']} | first call {r['first_call_s']:.2f} s | "
            f"{ms['median']:.2f} ms/step (min {ms['min']:.2f}, max {ms['max']:.2f}) | "
            f"{r['tokens_per_sec']:,.0f} tokens/s{mfu} | peak mem {r['peak_mem_bytes'] / 2**20:,.0f} MiB{loss}{flag}")


def _ratio(r: dict, records: list[dict]) -> str:
    """Throughput against the baseline's at the same point, workload and sampler: each at its best, side by side."""
    base = [b for b in records if b["mode"] == BASELINE and b["point"] == r["point"]
            and b["workload"] == r["workload"] and b.get("sampler") == r.get("sampler") and not b["error"]]
    if not base or r["error"]:
        return "–"
    ratio = r["tokens_per_sec"] / base[0]["tokens_per_sec"]
    return f"{ratio:.2f}×" if ratio >= 0.1 else f"{ratio:.2g}×"


def best(records: list[dict]) -> list[str]:
    """Per point, workload and sampler where both frameworks ran: each one's fastest mode among those run (its
    settings in the mode's name), and the ratio of their throughputs."""
    from gptjax.bench.modes import get

    out = []
    ok = [r for r in records if not r["error"]]
    for key in dict.fromkeys((_point(r), _workload(r)) for r in ok):
        group = [r for r in ok if (_point(r), _workload(r)) == key]
        top = {}
        for r in group:
            fw = get(r["mode"]).framework
            if fw not in top or r["tokens_per_sec"] > top[fw]["tokens_per_sec"]:
                top[fw] = r
        if len(top) == 2:
            j, t = top["jax"], top["torch"]
            out.append(f"best of each framework{' at ' + key[0] if key[0] else ''} ({key[1]}): {j['mode']} "
                       f"({j['dtype']}, {j['matmul']}) {j['step_ms']['median']:.2f} ms/step against {t['mode']} "
                       f"({t['dtype']}) {t['step_ms']['median']:.2f}: gptjax "
                       f"{j['tokens_per_sec'] / t['tokens_per_sec']:.2f}× PyTorch's best")
    return out


def markdown(records: list[dict], command: str) -> str:
    rows = ["| mode | workload | point | devices | first call | ms/step median (min–max) | tokens/s | "
            f"vs {BASELINE} | MFU | peak mem | loss (Δ {BASELINE}) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        if r["error"]:
            rows.append(f"| {r['mode']} | {_workload(r)} | {_point(r)} | | | failed: {r['error']} | | | | | |")
            continue
        ms = r["step_ms"]
        loss = "–" if r["loss"] is None else f"{r['loss']:.4f}"
        if r["loss_diff"] is not None:
            loss += f" ({r['loss_diff']:.1e}{' **MISMATCH**' if r['loss_flag'] else ''})"
        rows.append(
            f"| {r['mode']} | {_workload(r)} | {_point(r) or '–'} | {r['devices']} × {r['device']} | "
            f"{r['first_call_s']:.2f} s | {ms['median']:.2f} ({ms['min']:.2f}–{ms['max']:.2f}) | "
            f"{r['tokens_per_sec']:,.0f} | {_ratio(r, records)} | "
            f"{'–' if r['mfu'] is None else format(r['mfu'], '.1%')} | "
            f"{r['peak_mem_bytes'] / 2**20:,.0f} MiB | {loss} |")
    ok = [r for r in records if not r["error"]]
    head = ok[0] if ok else records[0]
    s = head["shape"]
    notes = [f"`{command}`", "",
             f"Model {s['n_layer']} layers × {s['n_head']} heads × {s['n_embd']}, block {s['block_size']}, "
             f"vocab {s['vocab_size']}, batch {s['batch_size']} × {s['gradient_accumulation_steps']} accumulated; "
             f"{head['params']:,} parameters; {head['dtype']}; "
             f"{head['flops_per_token']:,} training FLOPs per token (6N + 12·L·H·Q·T).",
             f"Host: {head['host']['cpu']} ({head['host']['cores']} cores; {head['host']['flags']}).",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(
                 {k: v for r in ok for k, v in r["versions"].items()}.items())) + ".",
             f"Each mode ran in its own process: a first call, {head['warmup']} warm-up call(s), then "
             f"{head['repeats']} repeats of the timed calls (steps per repeat in results.json); "
             f"'vs {BASELINE}' is the throughput ratio to {BASELINE} at the same point and sampler; loss is the "
             f"last call's (jax_eager makes fewer calls), Δ the largest difference from {BASELINE} over the calls "
             "both made.",
             ""]
    mallocs = sorted({r["malloc"] for r in ok if r.get("malloc")})
    if mallocs:
        notes.insert(-1, f"Host malloc: {', '.join(mallocs)} (see gptjax.parallel.reuse_freed_memory).")
    xla_flags = sorted({r["xla_flags"] for r in ok if r.get("xla_flags")})
    if xla_flags:
        notes.insert(-1, "XLA_FLAGS: " + "; ".join(f"`{f}`" for f in xla_flags) + ".")
    threads = [r["threads"] for r in ok if r["threads"]]
    if threads:
        notes.insert(-1, f"PyTorch threads: {threads[0]['intra_op']} intra-op, {threads[0]['inter_op']} inter-op.")
    tops = best(records)
    return "\n".join(notes + rows + ([""] + [f"- {b}" for b in tops] if tops else [])) + "\n"


def chart(records: list[dict], path) -> None:
    """A sweep: log-log ms/step against tokens per step (or the swept size), one line per mode (and sampler).
    No sweep: ms/step per mode (and sampler) as bars with the min-max range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if not r["error"]]
    modes = list(dict.fromkeys(_label(r) for r in ok))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if ok and ok[0]["point"]:
        key = next(iter(ok[0]["point"]))
        by_tokens = len({r["tokens_per_step"] for r in ok}) > 1
        for mode in modes:
            rs = sorted((r for r in ok if _label(r) == mode), key=lambda r: r["point"][key])
            xs = [r["tokens_per_step"] if by_tokens else r["point"][key] for r in rs]
            ax.plot(xs, [r["step_ms"]["median"] for r in rs], marker="o", label=mode)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens per step" if by_tokens else key)
        ax.set_title(f"{ok[0]['workload']}: sweep over {key} (flat = overhead-bound, slope 1 = compute-bound)",
                     fontsize=9)
    else:
        med = [next(r for r in ok if _label(r) == m)["step_ms"] for m in modes]
        ax.barh(modes, [m["median"] for m in med],
                xerr=[[m["median"] - m["min"] for m in med], [m["max"] - m["median"] for m in med]])
        ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_xlabel("ms per step (median, min–max)")
        if ok:
            ax.set_title(f"{ok[0]['workload']} on {ok[0]['device']}", fontsize=9)
    ax.set_ylabel("ms per step" if ok and ok[0]["point"] else "")
    ax.grid(alpha=0.3, which="both")
    if ok and ok[0]["point"]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def write(records: list[dict], out_dir: str, command: str) -> list[str]:
    """results.json, .md and .png in out_dir, each through a temporary file beside it, renamed into place once all
    three are complete: a failed write (a full disk) keeps the results there, a link is replaced, not written through,
    and an OSError is one line naming the file."""
    paths = [os.path.join(out_dir, f) for f in FILES]
    contents = [lambda f: f.write(json.dumps({"command": command, "fields": FIELDS, "records": records},
                                             indent=1).encode()),
                lambda f: f.write(markdown(records, command).encode()),
                lambda f: chart(records, f)]
    temps, path = {}, out_dir
    try:
        os.makedirs(out_dir, exist_ok=True)
        for path, content in zip(paths, contents):
            fd, temps[path] = writes.temp_beside(path)
            with os.fdopen(fd, "wb") as f:
                content(f)
        for path in paths:
            os.replace(temps.pop(path), path)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror or e}); the files already in {out_dir} are kept: free some "
                        "space or name another --out, and run the benchmark again") from None
    finally:
        for tmp in temps.values():
            try:
                os.remove(tmp)
            except OSError:
                pass
    return paths
