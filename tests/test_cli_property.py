"""Random option names, values and config files thrown at every command: exit 0 or 2, never a traceback, and no file
that existed before is changed."""

import shutil

import pytest
from conftest import digest, error_line, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptjax import cli
from gptjax.config import field_types

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


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, shakespeare):
    """A directory holding a trained run, its nanoGPT export and a copy of the corpus."""
    w = tmp_path_factory.mktemp("prop")
    shutil.copy(shakespeare, w / "input.txt")
    r = run_cli("train", "--config=tiny", f"--input={w / 'input.txt'}", f"--out_dir={w / 'run'}", "--max_iters=4",
                "--eval_interval=2", "--eval_iters=1")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("export", f"--out_dir={w / 'run'}", "--to=nanogpt", str(w / "nano" / "ckpt.pt"))
    assert r.returncode == 0, r.stderr[-2000:]
    return w


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(list(TAKES)), data=st.data())
def test_random_command_lines_exit_0_or_2_and_change_nothing(workspace, monkeypatch, capsys, command, data):
    """Mostly options the command takes, with values valid and not; sometimes ones it does not take, a config file
    of random lines, or a stray positional argument."""
    key = st.one_of(st.sampled_from(TAKES[command]), st.sampled_from(TAKES[command]), st.sampled_from(TAKES[command]),
                    st.sampled_from(GARBAGE_KEYS))
    options = data.draw(st.lists(st.tuples(key, VALUE), max_size=4), label="options")
    config = data.draw(st.none() | st.lists(config_line, max_size=4), label="config") \
        if command in ("prepare", "train", "bench") else None
    positional = data.draw(st.sampled_from([None, "nano/ckpt.pt", "new.pt", "input.txt", "nope"]), label="positional") \
        if command in ("export", "import") else data.draw(st.sampled_from([None] * 9 + ["stray"]), label="positional")
    w = workspace
    monkeypatch.chdir(w)
    n = data.draw(st.integers(0, 10**9), label="example id")
    new_out = f"new-{n}"
    base = {"prepare": ["--config=tiny", "--input=input.txt", f"--data_dir=data-{n}"],
            "train": ["--config=tiny", "--input=input.txt", f"--out_dir={new_out}", "--max_iters=3",
                      "--eval_interval=2", "--eval_iters=1"],
            "sample": ["--out_dir=run", "--max_new_tokens=3"],
            "eval": ["--out_dir=run"],
            "bench": ["--config=tiny", "--input=input.txt", "--modes=jax_jit", "--steps=1", "--warmup=0",
                      "--repeats=1", "--rounds=1", "--eager_steps=1", f"--out=bench-{n}"],
            "export": ["--out_dir=run", "--to=nanogpt"],
            "import": ["--from=nanogpt", f"--out_dir={new_out}"]}[command]
    argv = [command, *base]
    if config is not None:
        path = w / f"cfg-{n}.py"
        path.write_text("\n".join(config) + "\n")
        argv.append(f"--config={path}")
    for key, value in options:
        argv.append(f"--{key}" if value is None else f"--{key}={value}")
    if positional is not None:
        argv.append(positional if positional != "new.pt" else f"new-{n}.pt")
    before = digest(w)
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code in (0, 2), (argv, err[-3000:])
    assert "Traceback" not in err, (argv, err[-3000:])
    if code == 2:
        error_line(err)
    after = digest(w)
    changed = [k for k in before if after.get(k) != before[k]]
    assert not changed, (argv, changed)
