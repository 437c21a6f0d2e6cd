"""The one command-line parser: --key=value words to typed values by a table of Options, for every entry point."""

from __future__ import annotations

import difflib
import sys
import types
from typing import Any, NamedTuple

from gptjax.config import CHOICES, INT_MAX, PATH_KEYS, RANGES, SECTIONS, check_range, expand_path, field_types
from gptjax.errors import UserError

PATH_OPTIONS = (*PATH_KEYS, "out", "meta")  # ~ expanded, as in config keys


class Option(NamedTuple):
    """One --name=METAVAR option: its default, one-line help and, when it is numeric, its range."""
    metavar: str
    default: Any
    help: str
    range: str | None = ""  # its key in config.RANGES where that is not its own name; None: no range
    type: type | None = None  # where the default does not say (a default of None: str)
    required: bool = False  # a script's option that has no default

    @property
    def kind(self) -> type:
        if self.type is not None:
            return self.type
        return bool if isinstance(self.default, bool) else type(self.default) if self.default is not None else str


Table = dict[str, Option]


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


def value(key: str, raw: str, typ: type):
    """The command line's word `raw` for --key as a `typ` (bool: true or false, any case; a path: ~ expanded)."""
    if typ is str:
        return expand_path(raw) if key in PATH_OPTIONS else raw
    try:
        return typ(raw) if typ is not bool else {"true": True, "false": False}[raw.lower()]
    except (ValueError, KeyError):
        raise UserError(f"--{key}={raw} is not a valid {typ.__name__}") from None


def range_key(name: str, option: Option) -> str:
    """The option's key in config.RANGES, or "" for an option without a range."""
    if option.range is None:
        return ""
    key = option.range or name
    return key if key in RANGES else ""


def take(opts: dict, name: str, option: Option):
    """Pop --name from opts as its typed value (range-checked when given), or the option's default."""
    if name not in opts:
        return option.default
    v = value(name, opts.pop(name), option.kind)
    if range_key(name, option) and option.kind in (int, float):
        check_range(range_key(name, option), v, name)
    return v


def refuse_unknown(opts: dict, allowed, who: str) -> None:
    """A UserError for the first option not in `allowed`, naming the closest allowed ones."""
    for key in opts:
        if key not in allowed:
            close = difflib.get_close_matches(key, list(allowed), n=2, cutoff=0.5)
            hint = f"; did you mean {' or '.join('--' + c for c in close)}?" if close else ""
            raise UserError(f"{who} takes no --{key}{hint}")


def help_lines(table: Table) -> list[str]:
    """One line per option: --name=METAVAR, its help, then [default, range or choices] as config keys show them."""
    lines = []
    for name, o in table.items():
        key = range_key(name, o) or (name if o.range is not None else "")  # its range or choices, if any
        facts = describe_value(key, o.kind, o.default) if key in RANGES or o.default is not None else "[str]"
        for typ in ("bool", "str", "int", "float"):  # an option's type shows in its metavar
            facts = facts.replace(f"[{typ}, ", "[")
        lines.append(help_line(f"{name}={o.metavar}" if o.metavar else name, o.help, facts))
    return lines


def options(argv: list[str], table: Table, prog: str, doc: str = "", rest: bool = False) -> types.SimpleNamespace:
    """A script's whole command line by its table, as attributes; --help prints `doc` and the options and exits 0,
    a bad command line prints one line and exits 2. rest: options not in the table are kept, as strings, in .rest
    (config overrides, say) rather than refused."""
    if "--help" in argv or "-h" in argv:
        print("\n".join([doc.rstrip(), "", "options:", *help_lines(table)]).lstrip("\n"))
        sys.exit(0)
    try:
        opts, pos = parse(argv)
        if pos:
            raise UserError(f"unexpected argument {pos[0]!r}: options are written --key=value")
        if not rest:
            refuse_unknown(opts, table, prog)
        missing = [f"--{k}={o.metavar}" for k, o in table.items() if o.required and k not in opts]
        if missing:
            raise UserError(f"{prog} needs {' '.join(missing)}")
        values = {k: take(opts, k, o) for k, o in table.items()}
        return types.SimpleNamespace(**values, **({"rest": opts} if rest else {}))
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)


def field_notes(cls) -> dict[str, str]:
    """A dataclass's field -> the one-line comment it carries in the source: the help text."""
    import inspect
    import re

    return {m.group(1): m.group(2).strip() for m in (re.match(r"\s+(\w+): [^=]+=.*?  # (.*)$", line)
                                                      for line in inspect.getsource(cls).splitlines()) if m}


def from_fields(cls, metavars: dict[str, str]) -> Table:
    """Options for the fields of a frozen dataclass: its defaults, its field comments as help."""
    import dataclasses

    notes, defaults = field_notes(cls), cls()
    return {f.name: Option(metavars[f.name], getattr(defaults, f.name), notes[f.name])
            for f in dataclasses.fields(cls)}


def descriptions() -> dict[str, str]:
    """Every config key -> the one-line comment its dataclass field carries."""
    return {key: note for cls in SECTIONS.values() for key, note in field_notes(cls).items()}


def describe_value(key: str, typ: type, default) -> str:
    """`[TYPE, default D, range or choices]` as help shows it (the range from RANGES, the choices from CHOICES)."""
    facts = [typ.__name__, f"default {default!r}" if isinstance(default, str) else f"default {default}"]
    if key in RANGES and not _in_range(key, default):
        facts[1] = "unset by default"  # a sentinel: the option is not in use unless given
    if key in RANGES:
        lo, hi, lo_open, hi_open = RANGES[key]
        bounds = [f"{'>' if lo_open else '>='} {lo}"] if lo is not None else []
        bounds += [f"{'<' if hi_open else '<='} {hi}"] if hi not in (None, INT_MAX, 2**32 - 1) else []
        facts += [" and ".join(bounds)] if bounds else []
    if key in CHOICES:
        facts.append("one of " + "|".join(CHOICES[key]))
    return f"[{', '.join(facts)}]"


def _in_range(key: str, value) -> bool:
    try:
        check_range(key, value)
    except (UserError, TypeError):
        return False
    return True


def help_line(name: str, note: str, facts: str) -> str:
    return f"  --{name:<32} {note} {facts}".rstrip()


def help_text(config, preset: str) -> str:
    """Every config key by section: its field's comment, type, its value in `config` (the preset's), range or
    choices."""
    import dataclasses

    notes, types = descriptions(), field_types()
    lines = [f"config keys, --key=value (defaults: {preset}):"]
    for section in SECTIONS:
        lines.append(f" {section}:")
        for f in dataclasses.fields(getattr(config, section)):
            value = getattr(getattr(config, section), f.name)
            lines.append(help_line(f.name, notes.get(f.name, ""), describe_value(f.name, types[f.name][1], value)))
    return "\n".join(lines)
