"""What CPU this is, read once from /proc/cpuinfo: the bench records and the `auto` compute choices use it."""

from __future__ import annotations

import functools
import platform

# The ISA flags that decide a matmul's speed here, in the order records list them.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu() -> dict:
    """{"vendor", "name" (model name with family and model), "flags" (every flag, a frozenset)}; "unknown" parts
    where /proc/cpuinfo is not there (not Linux)."""
    out = {"vendor": "unknown", "name": platform.processor() or platform.machine(), "flags": frozenset()}
    try:
        with open("/proc/cpuinfo") as f:
            first = f.read().split("\n\n")[0]
    except OSError:
        return out
    field = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in first.splitlines())}
    if "model name" in field:
        out["name"] = f"{field['model name']} (family {field.get('cpu family', '?')}, model {field.get('model', '?')})"
    out["vendor"] = field.get("vendor_id", "unknown")
    out["flags"] = frozenset(field.get("flags", "").split())
    return out


def isa() -> str:
    """The ISA_FLAGS this CPU has, space-separated ("unknown" when none could be read)."""
    return " ".join(f for f in ISA_FLAGS if f in cpu()["flags"]) or "unknown"
