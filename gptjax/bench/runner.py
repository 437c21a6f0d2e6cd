"""`gptjax bench`: options, the shared setup of each point (initial weights, batches), one subprocess per mode."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from importlib import util

import numpy as np

from gptjax.args import take
from gptjax.bench import flops, modes, preflight, report
from gptjax.bench.protocol import Mode, Result
from gptjax.bench.worker import USER_ERROR
from gptjax.config import Config, override, validate
from gptjax.errors import UserError
from gptjax.options import OPTIONS
from gptjax.parallel import HOST_DEVICES_FLAG, cores

MODES = tuple(n for n, m in modes.MODES.items() if m.default)  # the default's names, in the table's order
WORKLOADS = ("train", "forward", "generate")
SAMPLERS = ("kv", "reforward")  # generate: KV-cache decode, or the whole window re-run per token
SWEEP_KEYS = ("batch_size", "block_size", "n_layer", "n_embd")
_O = OPTIONS["bench"]  # the options' defaults and ranges, which `gptjax bench --help` shows


@dataclasses.dataclass(frozen=True)
class Options:
    modes: tuple[str, ...] = MODES
    workload: str = _O["workload"].default
    # Every call has a batch of its own and keeps its loss: steps, eager_steps, warmup, repeats and rounds so large
    # that these cannot fit in the host's available memory are refused up front (preflight.check_memory).
    steps: int = _O["steps"].default  # timed calls per repeat
    eager_steps: int = _O["eager_steps"].default  # timed calls per repeat for jax_eager, hundreds of times slower
    warmup: int = _O["warmup"].default  # untimed calls after the first
    repeats: int = _O["repeats"].default
    sweep_key: str = ""
    sweep_values: tuple[int, ...] = ()
    out: str = _O["out"].default  # directory for results.json / results.md / results.png; empty: print only
    max_new_tokens: int = _O["max_new_tokens"].default  # generate: new tokens per sequence
    rounds: int = _O["rounds"].default  # the modes run this many times in turn (A B C A B C ...), repeats pooled
    samplers: tuple[str | None, ...] = (None,)  # generate: each mode runs once per sampler; None for the others


def parse_options(opts: dict) -> Options:
    """Take bench's own options out of opts (the rest are config overrides); bad values are UserErrors."""
    table, given = modes.MODES, set(opts)
    installed = {m.package: util.find_spec(m.package) is not None for m in table.values() if m.package}
    # The default leaves out the modes whose package is missing; naming one of them is refused.
    default = ",".join(n for n, m in table.items() if m.default and installed.get(m.package, True))
    names = tuple(modes.split_names(opts.pop("modes", default)))
    if not names:
        raise UserError(f"--modes: unknown mode '(none)'; use a comma-separated list of {', '.join(table)}")
    missing = [modes.get(n) for n in names if not installed.get(modes.get(n).package, True)]
    if missing:
        raise UserError(missing[0].missing)
    workload = take(opts, "workload", _O["workload"])
    if workload not in WORKLOADS:
        raise UserError(f"--workload={workload}: use one of {', '.join(WORKLOADS)}")
    samplers: tuple[str | None, ...] = (None,)
    if workload == "generate":
        samplers = tuple(dict.fromkeys(s.strip() for s in take(opts, "sampler", _O["sampler"]).split(",")
                                       if s.strip()))
        bad = [s for s in samplers if s not in SAMPLERS]
        if bad or not samplers:
            raise UserError(f"--sampler: unknown sampler {bad[0] if bad else '(none)'!r}; use a comma-separated "
                            f"list of {', '.join(SAMPLERS)}")
    elif "sampler" in opts:
        raise UserError(f"--sampler={opts['sampler']} applies to --workload=generate only")
    sweep_key, values = "", ()
    if "sweep" in opts:
        raw = opts.pop("sweep")
        sweep_key, _, vals = raw.partition(":")
        if sweep_key not in SWEEP_KEYS:
            raise UserError(f"--sweep={raw}: sweep one of {', '.join(SWEEP_KEYS)}, e.g. --sweep=batch_size:1,4,16,64")
        try:
            values = tuple(int(v) for v in vals.split(","))
        except ValueError:
            raise UserError(f"--sweep={raw}: values must be integers, e.g. --sweep={sweep_key}:1,4,16") from None
        if any(v < 1 for v in values) or len(set(values)) != len(values):
            raise UserError(f"--sweep={raw}: values must be distinct and at least 1")
    counts = {k: take(opts, k, _O[k]) for k in ("steps", "eager_steps", "warmup", "repeats", "max_new_tokens",
                                                 "rounds")}  # range-checked when given
    if "eager_steps" not in given:
        counts["eager_steps"] = min(counts["steps"], counts["eager_steps"])
    return Options(modes=tuple(dict.fromkeys(names)), workload=workload, sweep_key=sweep_key, sweep_values=values,
                   out=take(opts, "out", _O["out"]), samplers=samplers, **counts)


def host_info() -> dict:
    from gptjax import host

    return {"cpu": host.cpu()["name"], "flags": host.isa(), "cores": cores(), "machine": platform.machine()}


def _points(config: Config, o: Options) -> list[tuple[dict, Config]]:
    if not o.sweep_key:
        return [({}, config)]
    points = []
    for v in o.sweep_values:
        c = override(config, {o.sweep_key: v})
        validate(c)
        points.append(({o.sweep_key: v}, c))
    return points


def _env(mode: Mode, tmp: str) -> dict:
    """The mode's own variables; one XLA CPU device for a one_device mode, else one per core (or XLA_FLAGS' own
    count)."""
    env = dict(os.environ)
    env.update(mode.env(tmp))
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(HOST_DEVICES_FLAG)]
    if mode.one_device:
        flags.append(f"{HOST_DEVICES_FLAG}=1")
    elif HOST_DEVICES_FLAG not in env.get("XLA_FLAGS", ""):
        flags.append(f"{HOST_DEVICES_FLAG}={cores()}")
    else:
        flags = env["XLA_FLAGS"].split()
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def _prepare_point(config: Config, o: Options, names, tmp: str, n: int) -> tuple[Config, dict, int]:
    """Initial weights (saved by nanoGPT's names, plus what each framework's prepare makes of them) and the batches
    of n calls, shared by all modes (each takes the first of them that it needs)."""
    import jax

    try:  # set up on the host, so that a GPU's memory stays free for the modes
        jax.config.update("jax_platforms", "cpu")
    except RuntimeError:  # a backend already started in this process (a caller's own jax work)
        pass
    from gptjax import data, model
    from gptjax.evaluate import setup

    # How the modes compute is resolved in each mode's process, on its own devices: this host-side setup only
    # makes the weights, so it asks for nothing this process could refuse (--attention=cudnn, or a --mesh laid
    # over the worker's devices, not this process's).
    host_train = dataclasses.replace(config.train, dtype="float32", attention="einsum", mesh="")
    prepared, prep, graphdef, params, _ = setup(dataclasses.replace(config, train=host_train))
    config = dataclasses.replace(config, model=prepared.model)
    c, t = config.model, config.train
    x, y = data.get_batch(prep.tokens("train"), n * t.gradient_accumulation_steps * t.batch_size, c.block_size,
                          t.seed, 0)
    shape = (n, t.gradient_accumulation_steps, t.batch_size, c.block_size)
    files = {"x": os.path.join(tmp, "x.npy"), "y": os.path.join(tmp, "y.npy"),
             "params": os.path.join(tmp, "params.npz")}
    np.save(files["x"], x.reshape(shape))
    np.save(files["y"], y.reshape(shape))
    np.savez(files["params"], **{k: np.asarray(v) for k, v in model.param_names(params).items()})
    for mode in {modes.get(m).framework: modes.get(m) for m in names}.values():  # once per framework
        files.update(mode.prepare(c, params, tmp))
    return config, files, model.num_params(params)


def _run_mode(mode: str, spec: dict, tmp: str) -> tuple[dict | None, str | None]:
    """The mode's result (a Result's fields, as its worker wrote them), or its error line; a bad option the mode's
    process found (worker.USER_ERROR) is the whole bench's UserError."""
    name = re.sub(r"\W", "_", mode) + (f"-{spec['sampler']}" if spec.get("sampler") else "")
    spec_path, result_path = os.path.join(tmp, f"{name}.spec.json"), os.path.join(tmp, f"{name}.result.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    proc = subprocess.run([sys.executable, "-m", "gptjax.bench.worker", spec_path, result_path],
                          env=_env(modes.get(mode), tmp), capture_output=True, text=True)
    if proc.returncode == USER_ERROR and os.path.exists(result_path):
        with open(result_path) as f:
            raise UserError(json.load(f)["user_error"])
    if proc.returncode != 0 or not os.path.exists(result_path):
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        fatal = [ln for ln in lines if re.match(r"(F\d{4} |\w*Error\b|Check failed)", ln)]
        return None, ((fatal or lines or [f"exit status {proc.returncode}"])[-1])[:300]
    with open(result_path) as f:
        return json.load(f), None


def _pool(rounds: list[tuple[dict | None, str | None]]) -> tuple[Result | None, str | None]:
    """One result from a mode's rounds: every repeat's time pooled, the median first call; any failure fails it."""
    errors = [e for _, e in rounds if e]
    if errors:
        return None, errors[0]
    return dataclasses.replace(
        Result(**rounds[0][0]), step_s_runs=[s for r, _ in rounds for s in r["step_s_runs"]],
        first_call_s=statistics.median(r["first_call_s"] for r, _ in rounds),
        peak_mem_bytes=max(r["peak_mem_bytes"] for r, _ in rounds)), None


def _record(mode: str, sampler: str | None, o: Options, point: dict, config: Config, n_params: int,
            res: Result | None, error: str | None, base: Result | None, host: dict, steps: int) -> dict:
    """The record of report.FIELDS; base is the baseline mode's result, whose losses this mode's compare with."""
    c, t = config.model, config.train
    rec = {k: None for k in report.FIELDS}
    # dtype: the config's (perhaps "auto") until the mode's process reports what it resolved on its device
    rec.update(mode=mode, workload=o.workload, sampler=sampler, point=point, config=config.to_dict(), params=n_params,
               shape={"n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "block_size": c.block_size,
                      "vocab_size": c.vocab_size, "batch_size": t.batch_size,
                      "gradient_accumulation_steps": t.gradient_accumulation_steps},
               dtype=t.dtype, host=host, steps=steps, warmup=o.warmup, repeats=o.repeats * o.rounds,
               flops_per_token=flops.flops_per_token(c, n_params), error=error, loss_flag=False,
               versions={"python": platform.python_version()})
    if res is None:
        return rec
    runs_ms = [s * 1e3 for s in res.step_s_runs]
    median = statistics.median(runs_ms)
    tps = res.tokens_per_call / (median / 1e3)
    rec.update(detail=res.detail, dtype=res.dtype, device=res.device, devices=res.devices,
               threads=res.threads, malloc=res.malloc, xla_flags=res.xla_flags,
               versions={**rec["versions"], **res.versions},
               step_ms={"median": median, "min": min(runs_ms), "max": max(runs_ms), "runs": runs_ms},
               tokens_per_step=res.tokens_per_call, tokens_per_sec=tps, first_call_s=res.first_call_s,
               mfu=flops.mfu(o.workload, c, n_params, tps, res.device, res.dtype),
               peak_mem_bytes=res.peak_mem_bytes, peak_mem_source=res.peak_mem_source,
               loss=res.losses[-1] if res.losses else None, mesh=res.mesh,
               step_impl=res.step_impl, param_bytes_per_device=res.param_bytes_per_device, matmul=res.matmul)
    # Under dropout only one framework's modes draw the same masks, so only their losses are comparable.
    same_rng = modes.get(mode).framework == modes.MODES[modes.BASELINE].framework
    if base is not None and res.losses and base.losses and (c.dropout == 0.0 or same_rng):
        k = min(len(res.losses), len(base.losses))
        rec["loss_diff"] = float(np.max(np.abs(np.subtract(res.losses[:k], base.losses[:k]))))
        rec["loss_flag"] = rec["loss_diff"] > report.loss_tolerance(rec["dtype"])
    return rec


def _point_text(point: dict) -> str:
    return "".join(f"{k}={v}: " for k, v in point.items())


def run(config: Config, o: Options, command: str = "") -> list[dict]:
    """Every (point, mode, sampler): a record, printed as it finishes; the files in o.out when it is set.

    Options that would be ignored, calls that cannot fit in memory and an --out that cannot be written are refused
    (UserError) before any mode runs."""
    command = command or "gptjax bench " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    points = _points(config, o)
    preflight.check_mesh(config, o)
    preflight.check_variants(config, o)
    for _, pconfig in points:
        preflight.check_memory(pconfig, o)
    preflight.check_out(o.out)
    n = preflight.calls_per_mode(o)
    names = sorted(o.modes, key=lambda m: m != modes.BASELINE)  # first: the others' losses compare to it
    host = host_info()
    slow = ", ".join(name for name, m in modes.MODES.items() if m.steps_option == "eager_steps")
    samplers = "" if o.samplers == (None,) else f" (samplers {', '.join(o.samplers)})"
    print(f"gptjax bench: {o.workload}{samplers}, modes {', '.join(names)}; {host['cpu']} ({host['cores']} cores, "
          f"{host['flags']}); first call + {o.warmup} warm-up + {o.repeats} x {o.steps} timed calls "
          f"({o.eager_steps} for {slow})" + (f", {o.rounds} rounds in turn" if o.rounds > 1 else ""), flush=True)
    units = [(m, s) for m in names for s in o.samplers]  # generate: each mode once per sampler
    records = []
    for point, pconfig in points:
        with tempfile.TemporaryDirectory(prefix="gptjax-bench-") as tmp:
            pconfig, files, n_params = _prepare_point(pconfig, o, names, tmp, n)
            c = pconfig.model
            print(f"{_point_text(point)}model: {c.n_layer} x {c.n_head} x {c.n_embd}, block {c.block_size}, "
                  f"vocab {c.vocab_size}, {n_params:,} params; {flops.flops_per_token(c, n_params):,} train "
                  "FLOPs/token (6N + 12*L*H*Q*T)", flush=True)
            base, results = None, {u: [] for u in units}
            for r in range(o.rounds):
                for mode, sampler in units:
                    steps = getattr(o, modes.get(mode).steps_option)
                    spec = {"mode": modes.base_name(mode), "workload": o.workload, "sampler": sampler,
                            "config": modes.with_settings(pconfig, mode).to_dict(),
                            "steps": steps, "warmup": o.warmup, "repeats": o.repeats,
                            "max_new_tokens": o.max_new_tokens, "seed": pconfig.train.seed, **files}
                    results[mode, sampler].append(_run_mode(mode, spec, tmp))
                    if r + 1 < o.rounds:
                        res, error = results[mode, sampler][-1]
                        print(f"  round {r + 1}/{o.rounds} {mode}{' ' + sampler if sampler else ''}: " + (
                            f"{statistics.median(res['step_s_runs']) * 1e3:.2f} ms/step" if res else error),
                            flush=True)
                        continue
                    # The last round: the mode's record, from every round, printed as soon as it finishes.
                    res, error = _pool(results[mode, sampler])
                    if mode == modes.BASELINE and res is not None:
                        base = res
                    rec = _record(mode, sampler, o, point, pconfig, n_params, res, error,
                                  base if mode != modes.BASELINE else None, host, steps)
                    records.append(rec)
                    print(report.line(rec), flush=True)
    for line in report.best(records):
        print(line)
    if o.out:
        paths = report.write(records, o.out, command)
        print(f"wrote {', '.join(paths)}")
    return records
