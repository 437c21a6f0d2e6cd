"""The XLA-vs-eager, JAX-vs-PyTorch harness behind `gptjax bench`: same model, weights, batches and optimizer in
every mode, each mode in its own process. runner: options and orchestration; jax_modes / torch_modes: the timed
loops; worker: the subprocess entry and the shared timing protocol; flops: MFU; report: json, markdown, chart."""

from gptjax.bench.runner import MODES, SWEEP_KEYS, WORKLOADS, Options, parse_options, run

__all__ = ["MODES", "SWEEP_KEYS", "WORKLOADS", "Options", "parse_options", "run"]
