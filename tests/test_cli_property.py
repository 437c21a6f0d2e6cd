"""Random option names, values and config files thrown at every command: exit 0 or 2, never a traceback, and no file
that existed before is changed."""

import itertools
import os
import shutil
import typing

import pytest
from conftest import CACHE_DAMAGE, DAMAGE, cli_run, damage_run, digest, error_line
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gptjax import cli
from gptjax.config import DataConfig, field_types

# Values that are valid somewhere and invalid elsewhere. No in-range huge counts (max_iters=2**31-1 would just train
# for a long time, correctly): what is huge here is out of every range, or refused by the memory check.
VALUES = ["-5", "-1", "0", "1", "2", "3", "7", str(2**31), str(2**40), "nan", "inf", "-inf", "0.0", "0.5", "1.5",
          "1e30", "-1e-3", "", "abc", "true", "false", "1e3", "char", "gpt2", "bpe:300", "bpe:x", "resume", "scratch",
          "best", "latest", "ünï", "../up", "gpt", "bigram", "train", "val", "jax_jit", "forward"]
CONFIG_KEYS = sorted(k for k in field_types() if k not in ("data_dir", "input", "out_dir"))
BENCH_KEYS = ["steps", "eager_steps", "warmup", "repeats", "rounds", "workload", "sweep", "modes", "max_new_tokens"]
# The options each command takes (--force left out: replacing what exists is what it asks for).
TAKES = {"prepare": CONFIG_KEYS, "train": CONFIG_KEYS, "bench": CONFIG_KEYS + BENCH_KEYS,
         "sample": ["start", "num_samples", "max_new_tokens", "temperature", "top_k", "seed", "checkpoint"],
         "eval": ["split", "batch_size", "input", "checkpoint"], "export": ["to", "checkpoint"],
         "import": ["from", "meta"]}
GARBAGE_KEYS = ["n_layers", "lr", "", "x", "--", "out-dir", "Max_Iters", "config", "dataset", "tokenizer"]
VALUE = st.one_of(st.sampled_from(VALUES), st.none(), st.text(max_size=6))

config_line = st.one_of(
    st.tuples(st.sampled_from(CONFIG_KEYS + GARBAGE_KEYS[:3]),
              st.sampled_from(["4", "0", "-1", "1e-3", "'fast'", "None", "True", "float('nan')", "[1]"]))
    .map(lambda kv: f"{kv[0] or 'x'} = {kv[1]}"),
    st.sampled_from(["batch_size = (", "raise RuntimeError('no')", "import sys; sys.exit(4)", "base = 'nope'",
                     "1 / 0", "max_iters = 3", "from gptjax.config import Config; config = Config()"]),
)


DAMAGES = [*DAMAGE, *(f"cache: {k}" for k in CACHE_DAMAGE)]


class Case(typing.NamedTuple):
    command: str
    options: list  # (key, value or None for a bare --key)
    config: list | None = None  # lines of a config file
    positional: str | None = None
    damage: str | None = None  # a RUN_DAMAGE kind (on a copy of the run), or "cache: " + a CACHE_DAMAGE kind
    n: int = 0  # names what the example makes


@st.composite
def command_lines(draw) -> Case:
    """Mostly options the command takes, with values valid and not; sometimes ones it does not take, a config file
    of random lines, a stray positional argument, or a damaged run or prepared cache to work on."""
    command = draw(st.sampled_from(list(TAKES)))
    key = st.one_of(st.sampled_from(TAKES[command]), st.sampled_from(TAKES[command]), st.sampled_from(TAKES[command]),
                    st.sampled_from(GARBAGE_KEYS))
    options = draw(st.lists(st.tuples(key, VALUE), max_size=4), label="options")
    config = draw(st.none() | st.lists(config_line, max_size=4), label="config") \
        if command in ("prepare", "train", "bench") else None
    positional = draw(st.sampled_from([None, "nano/ckpt.pt", "new.pt", "input.txt", "nope"]), label="positional") \
        if command in ("export", "import") else draw(st.sampled_from([None] * 9 + ["stray"]), label="positional")
    damage = draw(st.sampled_from([None] * 3 + DAMAGES), label="damage") \
        if command in ("sample", "eval", "export", "train") else None
    return Case(command, options, config, positional, damage, draw(st.integers(0, 10**9), label="example id"))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, shakespeare):
    """A directory holding a trained run, its nanoGPT export, a copy of the corpus and its own prepared cache."""
    w = tmp_path_factory.mktemp("prop")
    shutil.copy(shakespeare, w / "input.txt")
    data_dir = os.environ.get("GPTJAX_DATA_DIR")
    os.environ["GPTJAX_DATA_DIR"] = str(w / "data")
    try:
        r = cli_run("train", "--config=tiny", f"--input={w / 'input.txt'}", f"--out_dir={w / 'run'}",
                    "--max_iters=4", "--eval_interval=2", "--eval_iters=1")
    finally:
        os.environ["GPTJAX_DATA_DIR"] = data_dir
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli_run("export", f"--out_dir={w / 'run'}", "--to=nanogpt", str(w / "nano" / "ckpt.pt"))
    assert r.returncode == 0, r.stderr[-2000:]
    return w


# The inputs issue 20 found mishandled, always tried first: hypothesis did not draw a syntax-error config in 25 runs.
KNOWN = [Case("train", [], ["batch_size = ("]), Case("train", [("model", "json:loads")]),
         Case("train", [("model", "os:getcwd")]), Case("train", [("model", ":f")]),
         Case("train", [("num_processes", "0")]), Case("train", [("coordinator_address", "127.0.0.1:99999")]),
         Case("sample", [("max_new_tokens", "2147483647")]), Case("sample", [("num_samples", "2147483647")]),
         Case("sample", [("seed", "\U0002ecea\x1c\x85L\t")]),  # line breaks in a value the error quotes
         Case("sample", [("temperature", "1e-40")]), Case("eval", [("batch_size", "2147483647")]),
         Case("bench", [("steps", "2147483647")]), Case("bench", [("repeats", "2147483647")]),
         Case("bench", [("mesh", "dp:3")]), Case("bench", [("out", "input.txt/sub")]),
         Case("import", [], None, "run"), Case("import", [("meta", "nano/ckpt.pt")], None, "nano/ckpt.pt"),
         Case("sample", [], damage="config_list"), Case("eval", [], damage="config_type"),
         Case("export", [], None, "new.pt", damage="config_shape"), Case("train", [], damage="metrics_row"),
         Case("sample", [], damage="tokenizer_missing"), Case("eval", [], damage="tokenizer_corrupt"),
         Case("export", [], None, "new.pt", damage="checkpoints_dangling"),
         Case("train", [], damage="cache: train.bin truncated"), Case("eval", [], damage="cache: meta.json corrupt")]


_CALLS = itertools.count()


def _known(test):
    for case in reversed(KNOWN):
        test = example(case=case._replace(n=KNOWN.index(case)))(test)
    return test


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=command_lines())
@_known
def test_random_command_lines_exit_0_or_2_and_change_nothing(workspace, monkeypatch, capsys, case):
    """Exit 0 or 2, never a traceback, an error is one line, and nothing that existed before changes: not the run,
    the export or the corpus. A damaged copy of the run may be resumed; a damaged prepared cache is prepared again."""
    from gptjax import data

    # Names unique to this call: the shrinker replays examples with n drawn again (towards 0), and a second
    # successful run into one --out would rightly replace what the first wrote.
    command, n, w = case.command, f"{case.n}-{next(_CALLS)}", workspace
    monkeypatch.chdir(w)
    monkeypatch.setenv("GPTJAX_DATA_DIR", str(w / "data"))
    run, cache_damage = "run", case.damage if case.damage and case.damage.startswith("cache: ") else None
    if case.damage is not None:  # a copy of the run to damage, or to resume
        run = f"damaged-{n}"
        shutil.rmtree(w / run, ignore_errors=True)
        shutil.copytree(w / "run", w / run, symlinks=True)
        if not cache_damage:
            damage_run(w / run, case.damage)
    new_out = f"new-{n}"
    base = {"prepare": ["--config=tiny", "--input=input.txt", f"--data_dir=data-{n}"],
            "train": ["--config=tiny", "--input=input.txt", f"--out_dir={new_out}", "--max_iters=3",
                      "--eval_interval=2", "--eval_iters=1"] if case.damage is None else
                     ["--init_from=resume", f"--out_dir={run}", "--max_iters=6"],
            "sample": [f"--out_dir={run}", "--max_new_tokens=3"],
            "eval": [f"--out_dir={run}"],
            "bench": ["--config=tiny", "--input=input.txt", "--modes=jax_jit", "--steps=1", "--warmup=0",
                      "--repeats=1", "--rounds=1", "--eager_steps=1", f"--out=bench-{n}"],
            "export": [f"--out_dir={run}", "--to=nanogpt"],
            "import": ["--from=nanogpt", f"--out_dir={new_out}"]}[command]
    argv = [command, *base]
    if case.config is not None:
        path = w / f"cfg-{n}.py"
        path.write_text("\n".join(case.config) + "\n")
        argv.append(f"--config={path}")
    for key, value in case.options:
        argv.append(f"--{key}" if value is None else f"--{key}={value}")
    if case.positional is not None:
        argv.append(case.positional if case.positional != "new.pt" else f"new-{n}.pt")
    caches = [p for p in (w / "data" / "prepared").iterdir() if not p.name.startswith(".") and p.name != "index"]
    if cache_damage:
        CACHE_DAMAGE[cache_damage[len("cache: "):]](caches[0])
    skip = ((f"data{os.sep}",) if cache_damage else ()) + ((run + os.sep,) if run != "run" else ())
    before = {k: v for k, v in digest(w).items() if not k.startswith(skip)}
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code in (0, 2), (argv, err[-3000:])
    assert "Traceback" not in err, (argv, err[-3000:])
    if code == 2:
        error_line(err)
    after = digest(w)
    changed = [k for k in before if after.get(k) != before[k]]
    assert not changed, (argv, changed)
    data.prepare(DataConfig(input=str(w / "input.txt"), data_dir=str(w / "data")))  # a damaged cache, rebuilt
    capsys.readouterr()
    assert [data.cache_problem(str(p)) for p in caches] == [None] * len(caches)
