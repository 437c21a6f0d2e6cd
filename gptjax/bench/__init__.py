"""The XLA-vs-eager, JAX-vs-PyTorch harness behind `gptjax bench`: same model, weights, batches and optimizer in
every mode, each mode in its own process. protocol: what a mode is (Mode, Result); jax_modes / torch_modes: the
families and their timed loops; modes: the table of modes by name; runner: options and orchestration; preflight:
what is refused first; worker: the subprocess entry; timing: the timing protocol; flops: MFU; report: json, markdown,
chart."""

from gptjax.bench.runner import MODES, SWEEP_KEYS, WORKLOADS, Options, parse_options, run

__all__ = ["MODES", "SWEEP_KEYS", "WORKLOADS", "Options", "parse_options", "run"]
