"""The table of bench modes, by name: every family's modes, in the order `gptjax bench` lists them."""

from __future__ import annotations

from gptjax.bench import jax_modes, torch_modes
from gptjax.bench.protocol import Mode

# A new mode is one entry in its family's MODES; a new family is a module with a Mode subclass and one entry here.
MODES: dict[str, Mode] = {m.name: m for m in (*jax_modes.MODES, *torch_modes.MODES)}
BASELINE = "jax_jit"  # runs first: every other mode's losses and throughput are compared with its
