"""The table of bench modes, by name: every family's modes, in the order `gptjax bench` lists them.

A mode may carry settings of its own, written after its name in brackets: `jax_jit_dp[matmul=xla]`,
`torch_compile[dtype=bfloat16]`. Such a variant runs its mode with those train settings in place of the command's,
so one run can put several settings of each framework side by side (each framework's best against the other's).
"""

from __future__ import annotations

import dataclasses
import re

from gptjax.bench import hf_modes, jax_modes, torch_modes
from gptjax.bench.protocol import Mode
from gptjax.errors import UserError

# A new mode is one entry in its family's MODES; a new family is a module with a Mode subclass and one entry here.
MODES: dict[str, Mode] = {m.name: m for m in (*jax_modes.MODES, *torch_modes.MODES, *hf_modes.MODES)}
BASELINE = "jax_jit"  # runs first: every other mode's losses and throughput are compared with its
# The train settings a variant may set, per framework: how the step runs, never what it computes.
VARIANT_KEYS = {"jax": ("dtype", "matmul", "attention", "step_impl", "mesh", "scan_layers", "remat"),
                "torch": ("dtype",), "hf": ("dtype",)}
_VARIANT = re.compile(r"(\w+)(?:\[([^\[\]]*)\])?")


def split_names(text: str) -> list[str]:
    """--modes' comma-separated names; commas inside a variant's brackets stay with it."""
    names, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            names.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [n for n in [*names, cur.strip()] if n]


def parse(name: str) -> tuple[Mode, dict[str, str]]:
    """(the table's mode, the variant's settings) of a name such as `jax_jit_dp[matmul=xla,dtype=bfloat16]`."""
    from gptjax.config import CHOICES, check_choice

    m = _VARIANT.fullmatch(name.strip())
    if not m or m.group(1) not in MODES:
        raise UserError(f"--modes: unknown mode {name!r}; use a comma-separated list of {', '.join(MODES)}, each "
                        "optionally with settings, e.g. jax_jit_dp[matmul=xla]")
    mode, settings = MODES[m.group(1)], {}
    # settings split at the commas that start another key=, so a mesh keeps its own: [mesh=dp:2,fsdp:2,dtype=...]
    for part in filter(None, (p.strip() for p in re.split(r",(?=\s*\w+=)", m.group(2) or ""))):
        key, eq, value = part.partition("=")
        allowed = VARIANT_KEYS[mode.framework]
        if not eq or key not in allowed:
            raise UserError(f"--modes: {name}: write settings as key=value, keys of {mode.name}: {', '.join(allowed)}")
        if key in ("mesh", "step_impl") and not mode.data_parallel:
            raise UserError(f"--modes: {name}: {key} lays out a data-parallel step: jax_jit_dp[{key}=...]")
        if key in CHOICES:
            check_choice(key, value)
        settings[key] = value
    return mode, settings


def get(name: str) -> Mode:
    return parse(name)[0]


def settings(name: str) -> dict[str, str]:
    return parse(name)[1]


def base_name(name: str) -> str:
    return get(name).name


def with_settings(config, name: str):
    """config with the variant's settings in place of the command's (config itself for a plain mode)."""
    from gptjax.config import override, validate

    extra = settings(name)
    if not extra:
        return config
    out = override(config, extra)
    validate(out)
    return dataclasses.replace(out, model=config.model)
