"""What `gptjax bench` refuses before any mode runs: options that would be ignored, calls whose batches and results
cannot fit in host memory, and an --out that cannot be written (found now, not when the results are lost)."""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

from gptjax import writes
from gptjax.bench import modes, report
from gptjax.bench.timing import n_calls
from gptjax.config import Config, TrainConfig
from gptjax.errors import UserError

if TYPE_CHECKING:
    from gptjax.bench.runner import Options

# Host bytes each call needs, counted as a floor so that only what cannot fit is refused: per batch token, as
# evaluate.check_memory counts a batch (sampled indices, gathered tokens, the int32 copies), and per call a loss handle
# and its list entries in the mode's process (JAX's two batch buffers per call take ~10 KiB more on a CPU).
BATCH_TOKEN_BYTES = 16
CALL_BYTES = 256
ROUND_CALL_BYTES = 32  # the runner keeps every round's losses (a float and its list slot per call) until the last
COUNTS = ("steps", "eager_steps", "warmup", "repeats", "rounds")  # the options that multiply what is kept


def calls_per_mode(o: Options) -> int:
    """Calls, each on a batch of its own, of the mode that makes the most: a mode's steps_option counts its calls
    per repeat (--eager_steps for jax_eager)."""
    return n_calls(getattr(o, _steps_option(o)), o.warmup, o.repeats)


def _steps_option(o: Options) -> str:
    """The option that counts the most calls per repeat among o's modes: steps, unless another counts more."""
    return max(("steps", *(modes.get(m).steps_option for m in o.modes)), key=lambda k: getattr(o, k))


def host_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo, as train's memory check reads it (without starting a JAX backend here)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def memory_needed(config: Config, o: Options) -> int:
    """Host bytes the batches and per-call results of one point need: a mode's process holds every call's batch and
    loss; the runner holds each round's losses of every mode."""
    t, c = config.train, config.model
    n = calls_per_mode(o)
    tokens = t.gradient_accumulation_steps * t.batch_size * (c.block_size + 1)
    kept = o.rounds * len(o.modes) * len(o.samplers) * n * ROUND_CALL_BYTES
    return n * (tokens * BATCH_TOKEN_BYTES + CALL_BYTES) + kept


def check_memory(config: Config, o: Options) -> None:
    """Refuse --steps, --eager_steps, --warmup, --repeats or --rounds so large that memory_needed exceeds the host's
    available memory, naming the option whose lowering to its default helps most."""
    host, need = host_available_bytes(), memory_needed(config, o)
    if host is None or need <= host:
        return
    default = type(o)()
    key = min(COUNTS, key=lambda k: memory_needed(config, dataclasses.replace(
        o, **{k: min(getattr(o, k), getattr(default, k))})))
    t, c = config.train, config.model
    rows = t.gradient_accumulation_steps * t.batch_size
    steps = _steps_option(o)
    raise UserError(
        f"out of memory: --{key}={getattr(o, key)} makes {calls_per_mode(o):,} calls per mode (1 + --warmup + "
        f"--repeats x --{steps}) over {o.rounds:,} round(s), each on a batch of {rows:,} x {c.block_size + 1} tokens; "
        f"their batches and results need {_size(need)} of host memory and {_size(host)} is available: lower --{key}")


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:,.1f} GiB" if n_bytes >= 2**30 / 10 else f"{n_bytes / 2**20:,.1f} MiB"


def check_mesh(config: Config, o: Options) -> None:
    """--mesh and --step_impl lay out a data-parallel mode's train step (jax_jit_dp's): refuse them where no such step
    runs, not ignore them."""
    t, default = config.train, TrainConfig()
    takers = [name for name, m in modes.MODES.items() if m.data_parallel]
    for key in ("mesh", "step_impl"):
        value = getattr(t, key)
        if value == getattr(default, key):
            continue
        if not set(takers) & {modes.base_name(m) for m in o.modes}:
            raise UserError(f"--{key}={value} applies to the {' / '.join(takers)} mode only: add it to --modes")
        if o.workload != "train":
            raise UserError(f"--{key}={value} applies to --workload=train only (forward and generate split the "
                            "batch over every device)")


def check_variants(config: Config, o: Options) -> None:
    """A mode's own settings (jax_jit_dp[mesh=...]) are checked as the command's are, before any mode runs: their
    values, and mesh / step_impl only where a train step is laid out."""
    for name in o.modes:
        extra = modes.settings(name)
        modes.with_settings(config, name)  # a UserError for a value the config refuses
        for key in ("mesh", "step_impl"):
            if key in extra and o.workload != "train":
                raise UserError(f"--modes: {name}: {key} applies to --workload=train only (forward and generate "
                                "split the batch over every device)")


def check_out(out: str) -> None:
    """--out must be a directory that is, or can be made, writable, with its results files writable: missing
    directories are made, a probe file of a fresh name is created and removed in it, then every directory made for
    the probe is removed again, so the check leaves nothing behind (report.write makes them at the end). Files
    already there are not changed: results files are opened to append, nothing written."""
    if not out:
        return
    path = os.path.abspath(out)
    for name in report.FILES:
        p = os.path.join(path, name)
        if os.path.lexists(p) and not os.path.isfile(p):
            raise UserError(f"--out={out}: {p} is not a regular file, so the results cannot be written there; "
                            "move it or name another directory")
    try:
        for name in report.FILES:
            if os.path.exists(os.path.join(path, name)):
                open(os.path.join(path, name), "a").close()
        writes.probe(path)
    except NotADirectoryError as e:
        raise UserError(f"--out={out} is a file: name a directory for {', '.join(report.FILES)}" if e.filename == path
                        else f"--out={out}: {e.filename} is a file, so the directory cannot be made; name another "
                        "directory") from None
    except OSError as e:
        raise UserError(f"--out={out}: cannot write there ({e.strerror or e}): name a directory you can write to"
                        ) from None
