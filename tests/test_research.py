"""The research API: a model of the user's own trains, checkpoints, resumes, evaluates and samples through gptjax."""

import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import user_error
from flax import nnx

from gptjax import checkpoint, cli, evaluate, model, research, rundir, sample, train
from gptjax.config import override
from gptjax.errors import UserError


class TinyLM(nnx.Module):
    """Embeddings, a causal running mean of them, dropout on it, a linear head: not a model gptjax ships."""

    def __init__(self, c, rngs: nnx.Rngs):
        self.emb = nnx.Embed(c.vocab_size, c.n_embd, rngs=rngs)
        self.head = nnx.Linear(c.n_embd, c.vocab_size, rngs=rngs)
        self.rate = c.dropout

    def __call__(self, idx_BT, key=None):
        x_BTD = self.emb(idx_BT)
        x_BTD = jnp.cumsum(x_BTD, axis=1) / jnp.arange(1, idx_BT.shape[1] + 1)[:, None]
        if key is not None:
            x_BTD = jnp.where(jax.random.bernoulli(key, 1 - self.rate, x_BTD.shape), x_BTD / (1 - self.rate), 0)
        return self.head(x_BTD)


model.register("test_tiny_lm", TinyLM)


def _config(tiny_config, out, **over):
    return override(tiny_config, {"model": "test_tiny_lm", "dropout": 0.3, "out_dir": str(out), "max_iters": 8,
                                  "eval_interval": 4, **over})


def _params(out, which="latest"):
    return model.param_names(rundir.load_run(str(out), which)[2])


def test_custom_model_trains_resumes_exactly_evaluates_and_samples(tiny_config, tmp_path):
    straight = train.train(_config(tiny_config, tmp_path / "a"), progress=False)
    with open(tmp_path / "a" / "metrics.jsonl") as f:
        first = json.loads(f.readline())
    assert straight["last"]["step"] == 8 and straight["last"]["train_loss"] < first["train_loss"] - 0.1
    assert set(_params(tmp_path / "a")) == {"emb.embedding", "head.kernel", "head.bias"}

    train.train(_config(tiny_config, tmp_path / "b", max_iters=4), progress=False)
    assert checkpoint.steps(str(tmp_path / "b")) == [4]
    train.train(_config(tiny_config, tmp_path / "b", init_from="resume"), progress=False)
    for name, a in _params(tmp_path / "a").items():  # dropout keys and batches carry over the resume
        np.testing.assert_array_equal(a, _params(tmp_path / "b")[name], err_msg=name)
    with open(tmp_path / "b" / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [0, 4, 8]
    assert os.path.exists(tmp_path / "b" / "loss.png")

    result = evaluate.evaluate(str(tmp_path / "b"), which="latest")
    assert 0 < result["loss"] < 4.17 and result["tokens"] == result["chars"]  # one char per token
    texts = sample.sample(str(tmp_path / "b"), start="ROMEO:", max_new_tokens=30, checkpoint="latest")
    assert texts[0].startswith("ROMEO:") and len(texts[0]) == 6 + 30


def test_a_model_named_by_import_path_samples_from_the_cli(tiny_config, tmp_path, capsys):
    out = tmp_path / "run"
    train.train(_config(tiny_config, out, model="test_research:TinyLM", max_iters=2, eval_interval=2),
                progress=False)
    capsys.readouterr()
    assert cli.main(["sample", f"--out_dir={out}", "--max_new_tokens=12", "--start=A"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()[-1]) >= 1


@pytest.mark.parametrize("name, says", [
    ("no_such_model", "is not a model here"),
    ("no_such_package_xyz:Model", "cannot import no_such_package_xyz"),
    ("test_research:NoSuchClass", "test_research has no NoSuchClass"),
])
def test_an_unknown_model_is_one_line_and_exit_2(name, says, tmp_path, shakespeare, capsys):
    code = cli.main(["train", "--config=tiny", f"--model={name}", f"--input={shakespeare}", f"--out_dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and says in err, err
    assert not os.listdir(tmp_path)


_MODULES = itertools.count()


def _factory_module(tmp_path, monkeypatch, source: str) -> tuple[str, str]:
    """(module name, file) of a new module holding `source`, importable under a name no other test has used."""
    name = f"user_factory_{os.getpid()}_{next(_MODULES)}"
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name, str(tmp_path / f"{name}.py")


RAISES = "def f(c, rngs):\n    return 1 / 0\n"
SYNTAX = "def f(c, rngs)\n    return 3\n"


@pytest.mark.parametrize("source, value, says", [
    (None, "json:loads", "is not a model factory (config, rngs) -> nnx.Module: it takes (s, *"),
    (None, "os:getcwd", "is not a model factory (config, rngs) -> nnx.Module: it takes ()"),
    (None, ":f", "no module before ':'"),
    (RAISES, "{mod}:f", "the factory raised ZeroDivisionError at {file} line 2: division by zero; fix it"),
    ("def f(c, rngs):\n    return None\n", "{mod}:f", "the factory returned None, not an nnx.Module"),
    ("def f(c, rngs):\n    return 3\n", "{mod}:f", "the factory returned 3 (int), not an nnx.Module"),
    (SYNTAX, "{mod}:f", "{file} has a syntax error at line 1: expected ':'; fix it"),
], ids=["json.loads", "os.getcwd", "no-module", "raises", "returns-None", "returns-int", "syntax-error"])
def test_a_bad_model_factory_is_one_line_before_any_run_files(source, value, says, tmp_path, monkeypatch,
                                                              shakespeare, capsys):
    mod, file = _factory_module(tmp_path, monkeypatch, source) if source else ("", "")
    value = value.format(mod=mod)
    line = user_error(capsys, "train", "--config=tiny", f"--input={shakespeare}", f"--out_dir={tmp_path / 'r'}",
                      f"--model={value}")
    assert f"--model={value}" in line and says.format(file=file) in line, line
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("command", ["sample", "eval"])
@pytest.mark.parametrize("source, says", [(RAISES, "the factory raised ZeroDivisionError at {file} line 2"),
                                          (SYNTAX, "{file} has a syntax error at line 1")], ids=["raises", "syntax"])
def test_sample_and_eval_of_a_run_whose_factory_now_fails_are_one_line(command, source, says, tiny_config, tmp_path,
                                                                        monkeypatch, capsys):
    mod, file = _factory_module(tmp_path, monkeypatch, "def f(c, rngs):\n    pass\n")
    out = tmp_path / "run"
    out.mkdir()
    config = override(tiny_config, {"model": f"{mod}:f", "vocab_size": 65, "out_dir": str(out)})
    rundir.write_json(str(out / "config.json"), config.to_dict())  # all a run needs before its model is built
    (tmp_path / f"{mod}.py").write_text(source)  # the factory's module, changed since the run was trained
    line = user_error(capsys, command, f"--out_dir={out}")
    assert f"--model={mod}:f" in line and says.format(file=file) in line, line


def test_register_refuses_builtin_and_odd_names():
    for name in ("gpt", "bigram", "a:b", "", "two words"):
        with pytest.raises(ValueError):
            model.register(name, TinyLM)


def test_research_options_modes_and_errors(tmp_path):
    opts = research.options(["--quick", "--seeds=2", f"--out={tmp_path}", "--width=64"], "demo", extra={"width": 32})
    assert opts.mode == "quick" and opts.seeds == (1337, 1338) and opts.extra["width"] == 64
    assert opts.pick(1, 2, 3) == 2 and opts.figures_dir == os.path.join(str(tmp_path), "demo")
    with pytest.raises(UserError, match="unknown option '--widht=64'"):
        research.options(["--widht=64"], "demo", extra={"width": 32})
    with pytest.raises(UserError, match="no such file"):
        research.options(["--input=/no/such/file.txt"], "demo")
    assert research.pm([1.0, 2.0, 3.0], 2) == "2.00 ± 1.00" and research.pm([2.5]) == "2.5000"
    per_mode = {m: research.options([f"--{m}"] if m != "full" else [], "demo", seeds=(3, 2, 1)).seeds
                for m in research.MODES}
    assert per_mode == {"full": (1337, 1338, 1339), "quick": (1337, 1338), "smoke": (1337,)}
    assert research.options(["--smoke", "--seeds=2"], "demo", seeds=(3, 2, 1)).seeds == (1337, 1338)
    assert research.options(["--smoke", "--quick"], "demo").mode == "quick"  # the last one given counts
    with pytest.raises(UserError, match="--seeds=0 is out of range"):
        research.options(["--seeds=0"], "demo")
    assert research.options(["--steps=0"], "demo", extra={"steps": 7}).extra["steps"] == 0  # no range of bench's


def test_research_options_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as stop:
        research.options(["--help"], "demo", extra={"width": 32})
    out = capsys.readouterr().out
    assert stop.value.code == 0 and out.startswith("usage: python experiments/demo.py")
    assert all(f"--{k}" in out for k in [*research.OPTIONS, "width"]), out
