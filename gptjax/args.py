"""Command-line words: --key=value options and positional arguments, for the CLI and the module entry points."""

from __future__ import annotations

from gptjax.errors import UserError


def parse(argv: list[str]) -> tuple[dict, list[str]]:
    """--key=value pairs (a bare --flag is True) and positional arguments."""
    opts, pos = {}, []
    for arg in argv:
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not key:
                raise UserError(f"malformed argument {arg!r}: write --key=value")
            opts[key] = value if eq else "true"
        else:
            pos.append(arg)
    return opts, pos
