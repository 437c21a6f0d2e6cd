"""What research scripts share: their options, training a variant over seeds, and writing a results page.

A script under experiments/ is config, variants, library calls and results; this module holds the rest:

    opts = research.options(argv, "attention_trick")        # --quick | --smoke, --input, --out, --seeds, --help
    runs = research.train_seeds(config, opts.seeds)         # train + exact whole-split val loss, per seed
    page = research.Page(opts, "Title")                     # headed by command, device, versions, date
    page.table(["variant", "val loss"], rows); page.figure(fig, "ladder.png", "caption"); page.write()

Custom models come from gptjax.model.register (see experiments/README.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import statistics
import sys
import tempfile
import time

from gptjax import args
from gptjax import config as config_lib
from gptjax.args import Option
from gptjax.errors import UserError

MODES = ("full", "quick", "smoke")  # the recorded run; <= 3 minutes on a 2-core CPU; a handful of steps (tests)


@dataclasses.dataclass(frozen=True)
class Options:
    script: str  # the script's name: results go to OUT/<script>.md and OUT/<script>/*.png
    mode: str  # full | quick | smoke
    input: str  # the corpus file (tiny Shakespeare); empty: downloaded into data_dir
    data_dir: str  # prepared-token cache; empty: gptjax's default
    out: str  # results directory
    seeds: tuple[int, ...]
    argv: tuple[str, ...]  # as given, for the page's command line
    extra: dict  # the script's own --key=value options

    def pick(self, full, quick, smoke):
        """The setting for this mode."""
        return {"full": full, "quick": quick, "smoke": smoke}[self.mode]

    @property
    def figures_dir(self) -> str:
        return os.path.join(self.out, self.script)


# The options every script takes; a script's own come as `extra` {key: default}.
OPTIONS = {
    "quick": Option("", False, "the quick mode: <= 3 minutes on a 2-core CPU"),
    "smoke": Option("", False, "the smoke mode: a handful of steps (tests)"),
    "input": Option("PATH", "", "the corpus file (tiny Shakespeare); default: downloaded into data_dir"),
    "data_dir": Option("DIR", "", "prepared-token cache; default: gptjax's"),
    "out": Option("DIR", os.path.join("experiments", "results"), "results directory"),
    "seeds": Option("N", 0, "how many seeds; default: the script's own count for the mode"),
}


def options(argv: list[str], script: str, seeds: int | tuple[int, int, int] = 3, extra: dict | None = None) -> Options:
    """Parse a script's command line: --quick, --smoke, --input=PATH, --data_dir=DIR, --out=DIR, --seeds=N, and
    the script's own `extra` {key: default} (values keep the default's type). Unknown options: a UserError;
    --help lists the options and exits 0.

    seeds: how many seeds without --seeds, one number or (full, quick, smoke)."""
    extra = dict(extra or {})
    table = {**OPTIONS, **{k: Option(type(v).__name__.upper(), v, "the script's own", None) for k, v in extra.items()}}
    if "--help" in argv or "-h" in argv:
        print("\n".join([f"usage: python experiments/{script}.py [--key=value ...]", "", "options:",
                         *args.help_lines(table)]))
        raise SystemExit(0)
    opts, pos = args.parse(argv)
    if pos:
        raise UserError(f"unexpected argument {pos[0]!r}: options are written --key=value")
    for key in opts:
        if key not in table:
            arg = next(a for a in argv if a[2:].partition("=")[0] == key)
            known = ["--quick", "--smoke", "--input=PATH", "--data_dir=DIR", "--out=DIR", "--seeds=N",
                     *(f"--{k}=" for k in extra)]
            raise UserError(f"unknown option {arg!r}: {script} takes {' '.join(known)}")
    modes = [k for k in opts if k in ("quick", "smoke")]  # in the order given: the last one counts
    given = {k: args.take(opts, k, o) for k, o in table.items()}
    mode = next((k for k in reversed(modes) if given[k]), "full")
    if given["input"] and not os.path.isfile(given["input"]):
        raise UserError(f"--input={given['input']}: no such file; give the tiny Shakespeare text file")
    n_seeds = given["seeds"] or (seeds if isinstance(seeds, int) else seeds[MODES.index(mode)])
    return Options(script, mode, given["input"], given["data_dir"], given["out"], tuple(range(1337, 1337 + n_seeds)),
                   tuple(argv), {k: given[k] for k in extra})


def data_overrides(opts: Options) -> dict:
    """The config overrides that point a run at the script's corpus and cache."""
    return {k: v for k, v in (("input", opts.input), ("data_dir", opts.data_dir)) if v}


def make_config(opts: Options, preset: str, **overrides) -> config_lib.Config:
    """A preset with the script's data settings and `overrides` (nanoGPT's flat keys), validated."""
    return config_lib.load_config(preset, {**data_overrides(opts), **overrides})


def train_seeds(config: config_lib.Config, seeds, split: str = "val", sample_tokens: int = 0) -> list[dict]:
    """Train `config` once per seed (a temporary out_dir each) and measure each on the whole split.

    Each row: seed, wall_s (the whole train call), compile_s, steps, best estimated val loss, the exact loss of the
    final parameters over every next-token prediction of `split` (nats/token) and its bits per character, the
    metrics rows, and (if sample_tokens) a sample.
    """
    from gptjax import evaluate, sample, train

    rows = []
    for seed in seeds:
        with tempfile.TemporaryDirectory() as out:
            cfg = config_lib.override(config, {"seed": seed, "out_dir": out})
            with contextlib.redirect_stdout(io.StringIO()):
                summary = train.train(cfg, force=True, progress=False)
                exact = evaluate.evaluate(out, split, which="latest")
                text = sample.sample(out, max_new_tokens=sample_tokens, checkpoint="latest")[0] \
                    if sample_tokens else ""
            with open(os.path.join(out, "metrics.jsonl")) as f:
                history = [json.loads(line) for line in f]
        rows.append({"seed": seed, "wall_s": summary["wall_s"], "compile_s": summary["compile_s"],
                     "steps": summary["steps"], "best_val_loss": summary["best_val_loss"],
                     "loss": exact["loss"], "bits_per_char": exact["bits_per_char"], "history": history,
                     "sample": text})
    return rows


def mean_std(xs) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    xs = list(xs)
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def pm(xs, digits: int = 4) -> str:
    """"mean ± std" of xs, or the one value."""
    xs = list(xs)
    m, s = mean_std(xs)
    return f"{m:.{digits}f}" if len(xs) == 1 else f"{m:.{digits}f} ± {s:.{digits}f}"


def versions() -> str:
    import jax

    parts = [f"jax {jax.__version__}"]
    for name in ("flax", "optax", "numpy", "torch", "tiktoken"):
        mod = sys.modules.get(name)
        if mod is not None:
            parts.append(f"{name} {mod.__version__}")
    return ", ".join(parts)


def device() -> str:
    import jax

    d = jax.devices()[0]
    if d.platform == "cpu":
        from gptjax import host

        return f"CPU: {host.cpu()['name']}, {os.cpu_count()} cores (ISA flags: {host.isa()})"
    return f"{d.platform.upper()}: {getattr(d, 'device_kind', d)} x {jax.device_count()}"


class Page:
    """A results page: OUT/<script>.md, headed by the command, device, versions and date; figures in OUT/<script>/."""

    def __init__(self, opts: Options, title: str):
        self.opts, self.started = opts, time.perf_counter()
        command = " ".join(["python", f"experiments/{opts.script}.py", *opts.argv])
        self.lines = [f"# {title}", "", f"Command: `{command}`", "", f"Device: {device()}. Versions: {versions()}. "
                      f"Date: {time.strftime('%Y-%m-%d')}. Mode: {opts.mode}.", ""]

    def text(self, *paragraphs: str) -> None:
        for p in paragraphs:
            self.lines += [p, ""]

    def table(self, header: list[str], rows: list[list]) -> None:
        self.lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        self.lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        self.lines.append("")

    def code(self, text: str) -> None:
        self.lines += ["```", text.rstrip("\n"), "```", ""]

    def figure(self, fig, name: str, caption: str) -> str:
        """Save a matplotlib figure as OUT/<script>/name and link it; returns its path."""
        import matplotlib.pyplot as plt

        os.makedirs(self.opts.figures_dir, exist_ok=True)
        path = os.path.join(self.opts.figures_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        self.link(name, caption)
        return path

    def link(self, name: str, caption: str) -> None:
        """Show OUT/<script>/name, an image already there, with its caption."""
        self.lines += [f"![{caption}]({self.opts.script}/{name})", "", f"*{caption}*", ""]

    def write(self) -> str:
        self.lines.append(f"Run time: {time.perf_counter() - self.started:.0f} s.")
        os.makedirs(self.opts.out, exist_ok=True)
        path = os.path.join(self.opts.out, f"{self.opts.script}.md")
        with open(path, "w") as f:
            f.write("\n".join(self.lines) + "\n")
        print(f"wrote {path}")
        return path


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def main(run, argv: list[str] | None = None) -> int:
    """Run a script's `run(argv)`, turning a UserError into one line and exit status 2, as the CLI does."""
    from gptjax import gpu, parallel

    parallel.use_all_cores()
    gpu.use_gpu_flags()
    parallel.use_compilation_cache()
    try:
        run(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        return 2
    return 0
