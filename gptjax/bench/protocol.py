"""The contract of a bench mode: a Mode (its name, what its process needs, prepare, run(spec) -> Result) and the
Result its process hands back. A family of modes is a module that subclasses Mode; bench.modes lists its modes.

The runner writes each mode's spec, a JSON object: mode (the name), workload (train | forward | generate), sampler
(generate: kv | reforward, else null), config (Config.to_dict()), steps, warmup, repeats, max_new_tokens, seed, and
the paths x and y (int arrays of shape [calls, accumulation steps, batch, block]), params (the initial weights by
nanoGPT's names, .npz) and whatever the families' prepare made.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from gptjax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Result:
    """What one mode's process measured; the runner makes a record of it (the report.FIELDS each fills in [])."""

    first_call_s: float  # seconds of the first call: compilation (if any) plus one step [first_call_s]
    step_s_runs: list[float]  # seconds per call in each timed repeat [step_ms, tokens_per_sec]
    tokens_per_call: int  # tokens one call processes [tokens_per_step]
    losses: list[float] | None  # every call's loss, in order; None for generate [loss, loss_diff]
    device: str  # device kind, "cpu" on a CPU host [device]
    devices: int  # devices the batch was split over [devices]
    dtype: str  # compute dtype, --dtype resolved on the mode's device [dtype]
    peak_mem_bytes: int | None  # None: the worker puts in the process's peak RSS [peak_mem_bytes]
    peak_mem_source: str | None  # what measured peak_mem_bytes [peak_mem_source]
    versions: dict[str, str]  # the framework packages the mode imported [versions]
    threads: dict[str, int] | None  # intra_op and inter_op threads, for a framework that has them [threads]
    detail: str  # how the mode ran [detail]
    platform: str | None = None  # the framework's platform name (cpu, gpu, cuda...): not recorded
    mesh: str | None = None  # a data-parallel mode's mesh [mesh]
    step_impl: str | None = None  # a data-parallel mode's train step implementation [step_impl]
    param_bytes_per_device: int | None = None  # a data-parallel train step's largest parameter share [same]
    malloc: str | None = None  # the worker's malloc settings [malloc]
    xla_flags: str | None = None  # the worker's XLA_FLAGS, gptjax's GPU flags included [xla_flags]
    matmul: str | None = None  # JAX: how the linear layers' products ran, xla | mkl (Compute.matmul) [matmul]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Mode:
    """One way to run the workload, timed in a process of its own; a family's subclass implements run."""

    name: str
    note: str = ""  # results.json's word on the mode, after its name (report.FIELDS["mode"])
    one_device: bool = False  # its process sees one XLA CPU device; else one per core (or XLA_FLAGS' own count)
    steps_option: str = "steps"  # the option counting its timed calls per repeat: eager_steps for the slowest
    data_parallel: bool = False  # train's --mesh and --step_impl lay out its step: only such modes take them
    default: bool = True  # in --modes' default list (when its package is installed); else run when named

    framework: ClassVar[str] = ""  # "jax" | "torch": dropout masks, so losses under dropout, agree within one only
    package: ClassVar[str] = ""  # a package its process imports that may be missing ("" when always installed)
    missing: ClassVar[str] = ""  # the one line when `package` is not installed

    def env(self, tmp: str) -> dict[str, str]:
        """Environment variables its process gets on top of the runner's; tmp is the point's scratch directory."""
        return {}

    def prepare(self, c: ModelConfig, params: Any, tmp: str) -> dict[str, str]:
        """Files its framework's processes read beyond the weights and batches, made in tmp once per point for
        every mode of the framework: spec key -> path. A UserError refuses the whole bench."""
        return {}

    def run(self, spec: dict) -> Result:
        """Time spec's calls in this process (the framework is imported here, not where the table is read)."""
        raise NotImplementedError(f"{type(self).__name__} has no run")
