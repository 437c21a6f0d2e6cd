"""Shared fixtures: the data directory (GPTJAX_TEST_DATA), a per-session token cache, tiny configs."""

import hashlib
import json
import os
import re
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _test_data() -> str | None:
    env = os.environ.get("GPTJAX_TEST_DATA")
    if env:
        return os.path.abspath(env)
    default = os.path.join(ROOT, "..", "shared", "data")
    return os.path.abspath(default) if os.path.isdir(default) else None


TEST_DATA = _test_data()
if TEST_DATA and os.path.isdir(os.path.join(TEST_DATA, "tiktoken")):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(TEST_DATA, "tiktoken"))


@pytest.fixture(scope="session", autouse=True)
def _data_cache(tmp_path_factory):
    """Every test prepares into one throwaway cache, and compiles into another, never the user's ~/.cache/gptjax."""
    path = str(tmp_path_factory.mktemp("gptjax-data"))
    old = {k: os.environ.get(k) for k in ("GPTJAX_DATA_DIR", "GPTJAX_CACHE_DIR")}
    os.environ["GPTJAX_DATA_DIR"] = path
    os.environ["GPTJAX_CACHE_DIR"] = str(tmp_path_factory.mktemp("gptjax-xla"))
    yield path
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def data_dir() -> str:
    if os.environ.get("GPTJAX_TEST_DATA") and not os.path.isdir(TEST_DATA):
        pytest.fail(f"GPTJAX_TEST_DATA={os.environ['GPTJAX_TEST_DATA']} does not exist: point it at the shared data")
    if TEST_DATA is None:
        pytest.skip("no test data: set GPTJAX_TEST_DATA to the shared data directory")
    return TEST_DATA


@pytest.fixture(scope="session")
def shakespeare(data_dir) -> str:
    path = os.path.join(data_dir, "tinyshakespeare", "input.txt")
    if not os.path.isfile(path):
        pytest.fail(f"{path} is missing from GPTJAX_TEST_DATA")
    return path


@pytest.fixture(scope="session")
def shakespeare_text(shakespeare) -> str:
    with open(shakespeare, encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="session")
def tiny_config(shakespeare):
    from gptjax.config import load_config

    return load_config("tiny", {"input": shakespeare})


def cli_run(*args):
    """gptjax in this process, as run_cli's result (returncode, stdout, stderr), without a new process's start-up
    (seconds of imports each): for the tests that only need a run made, not a fresh interpreter."""
    import contextlib
    import io
    import subprocess

    from gptjax import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    return subprocess.CompletedProcess(["gptjax", *args], code, out.getvalue(), err.getvalue())


def run_cli(*args, env=None, cwd=None, timeout=600):
    """gptjax in a subprocess, as a user runs it."""
    import subprocess

    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "gptjax", *args], capture_output=True, text=True, env=full_env,
                          cwd=cwd, timeout=timeout)


BAR = re.compile(r"\|.*\d+/\d+ \[")  # a tqdm progress line


def error_line(err: str) -> str:
    """The one line a failed command printed: stderr, progress bars aside, must be exactly one `gptjax: error: ...`
    line with no traceback."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and not BAR.search(line)]
    assert len(lines) == 1 and lines[0].startswith("gptjax: error: ") and "Traceback" not in err, err[-3000:]
    return lines[0]


def user_error(capsys, *argv) -> str:
    """Run the CLI in this process: it must exit 2 with one error line (error_line), which is returned."""
    from gptjax import cli

    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, (code, err[-3000:])
    return error_line(err)


def digest(root) -> dict[str, str]:
    """Every directory, file and link under root (the run lock aside) with its sha256 or link target: equal before
    and after a command means it changed nothing there."""
    out = {}
    for base, dirs, names in os.walk(root):
        for name in dirs + names:
            p = os.path.join(base, name)
            rel = os.path.relpath(p, root)
            if name == ".gptjax.lock":
                continue
            if os.path.islink(p):
                out[rel] = "link -> " + os.readlink(p)
            elif os.path.isdir(p):
                out[rel] = "directory"
            elif os.path.isfile(p):
                with open(p, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


def damage_run(out, what):
    """Damage the run in out as RUN_DAMAGE's `what` names."""
    if what == "config_list":
        (out / "config.json").write_text("[1, 2]")
    elif what == "config_type":
        c = json.loads((out / "config.json").read_text())
        c["model"]["n_layer"] = "abc"
        (out / "config.json").write_text(json.dumps(c))
    elif what == "config_shape":
        c = json.loads((out / "config.json").read_text())
        c["model"]["n_embd"] = 64
        (out / "config.json").write_text(json.dumps(c))
    elif what == "metrics_row":
        (out / "metrics.jsonl").write_text((out / "metrics.jsonl").read_text() + "[1, 2]\n")
    elif what == "tokenizer_missing":
        os.remove(out / "tokenizer.json")
    elif what == "tokenizer_corrupt":
        (out / "tokenizer.json").write_text("{garbage")
    elif what == "checkpoints_dangling":
        shutil.rmtree(out / "checkpoints")
        os.symlink(out.parent / "not-mounted", out / "checkpoints")


ALL = ("sample", "eval", "export", "resume")
DAMAGE = {  # what is damaged -> the commands that read it, and what their one line names
    "config_list": dict.fromkeys(ALL, "config.json is not a readable gptjax run config"),
    "config_type": dict.fromkeys(ALL, "model.n_layer is 'abc', not an int"),
    "config_shape": dict.fromkeys(ALL, "holds another model than the run's config.json describes"),
    "metrics_row": {"resume": "metrics.jsonl line 4 is not a metrics row"},
    "tokenizer_missing": dict.fromkeys(("sample", "export"), "tokenizer.json is missing"),  # eval, resume: prep's
    "tokenizer_corrupt": dict.fromkeys(ALL, "tokenizer.json is not a gptjax tokenizer"),
    "checkpoints_dangling": dict.fromkeys(ALL, "which does not exist (a disk not mounted?)"),
}


CACHE_DAMAGE = {
    "train.bin truncated": lambda d: os.truncate(d / "train.bin", os.path.getsize(d / "train.bin") // 2),
    "train.bin an odd number of bytes": lambda d: os.truncate(d / "train.bin", os.path.getsize(d / "train.bin") - 1),
    "train.bin deleted": lambda d: os.remove(d / "train.bin"),
    "meta.json corrupt": lambda d: (d / "meta.json").write_text("{nope"),
    "meta.json not an object": lambda d: (d / "meta.json").write_text("[1]"),
    "tokenizer.json deleted": lambda d: os.remove(d / "tokenizer.json"),
}


def jaxpr_eqns(jaxpr):
    """Every equation of a jaxpr and of its sub-jaxprs (custom_vjp, scan, shard_map, ...), depth first."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from jaxpr_eqns(inner)
