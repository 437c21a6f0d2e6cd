import json
import os

import pytest
from conftest import run_cli

from gptjax import cli


@pytest.fixture(scope="module")
def tiny_run(shakespeare, tmp_path_factory):
    """One real run through the console entry point: train, then everything else reads it."""
    out = str(tmp_path_factory.mktemp("cli") / "run")
    r = run_cli("train", "--config=tiny", f"--input={shakespeare}", f"--out_dir={out}", "--max_iters=30")
    assert r.returncode == 0, r.stderr[-2000:]
    return out, r


def test_train_end_to_end(tiny_run):
    out, r = tiny_run
    assert "step 30: train loss" in r.stderr + r.stdout and "sample:" in r.stdout
    for f in ("config.json", "metrics.jsonl", "loss.png", "tokenizer.json", "checkpoints/best", "checkpoints/latest"):
        assert os.path.exists(os.path.join(out, f)), f


def test_sample_eval_cli(tiny_run):
    out, _ = tiny_run
    r1 = run_cli("sample", f"--out_dir={out}", "--start=KING:", "--num_samples=2", "--max_new_tokens=40",
                 "--seed=3", "--top_k=10", "--temperature=0.9")
    r2 = run_cli("sample", f"--out_dir={out}", "--start=KING:", "--num_samples=2", "--max_new_tokens=40",
                 "--seed=3", "--top_k=10", "--temperature=0.9")
    assert r1.returncode == 0, r1.stderr[-2000:]
    assert r1.stdout == r2.stdout and r1.stdout.count("KING:") >= 2
    r = run_cli("eval", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "bits/char" in r.stdout and "111,539 tokens" in r.stdout


def test_prepare_and_bench(shakespeare):
    r = run_cli("prepare", "--config=tiny", f"--input={shakespeare}")
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads(r.stdout[: r.stdout.rindex("}") + 1])
    assert meta["train_tokens"] == 1_003_854
    r = run_cli("bench", "--config=tiny", f"--input={shakespeare}", "--modes=jax_jit", "--steps=3", "--repeats=2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ms/step" in r.stdout and "tokens/s" in r.stdout


def _user_error(capsys, *args):
    code = cli.main(list(args))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("gptjax: error:") and "\n" not in err and "Traceback" not in err, err
    return err


def test_unknown_key_names_the_closest(capsys, shakespeare):
    assert "--learning_rate" in _user_error(capsys, "train", "--config=tiny", "--learning_rat=3")
    assert "--n_layer" in _user_error(capsys, "train", "--config=tiny", "--nlayer=3")


def test_bad_values(capsys, shakespeare):
    assert "int" in _user_error(capsys, "train", "--config=tiny", "--n_layer=two")
    assert "float" in _user_error(capsys, "train", "--config=tiny", "--dropout=yes")
    assert "bool" in _user_error(capsys, "train", "--config=tiny", "--bias=maybe")
    assert "divisible" in _user_error(capsys, "train", "--config=tiny", "--n_embd=33", f"--input={shakespeare}")
    assert "unknown config" in _user_error(capsys, "train", "--config=tinyy")
    assert "not found" in _user_error(capsys, "train", "--config=nope.py")
    assert "unknown command" in _user_error(capsys, "trian")
    assert "temperature" in _user_error(capsys, "sample", "--out_dir=x", "--temperature=0")


def test_missing_and_bad_data(capsys, tmp_path):
    assert "no such file" in _user_error(capsys, "train", "--config=tiny", f"--input={tmp_path}/none.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "empty" in _user_error(capsys, "train", "--config=tiny", f"--input={empty}")
    short = tmp_path / "short.txt"
    short.write_text("abcdefghij" * 3)
    assert "block_size" in _user_error(capsys, "train", "--config=tiny", f"--input={short}",
                                       f"--out_dir={tmp_path}/o")


def test_existing_run_is_not_overwritten(capsys, tiny_run):
    out, _ = tiny_run
    before = open(os.path.join(out, "metrics.jsonl")).read()
    err = _user_error(capsys, "train", "--config=tiny", f"--out_dir={out}")
    assert "--init_from=resume" in err and "--force" in err
    assert open(os.path.join(out, "metrics.jsonl")).read() == before


def test_runs_that_do_not_exist(capsys, tmp_path):
    assert "no run" in _user_error(capsys, "sample", f"--out_dir={tmp_path}/none")
    assert "no run" in _user_error(capsys, "eval", f"--out_dir={tmp_path}/none")
    assert "resume" in _user_error(capsys, "train", "--config=tiny", "--init_from=resume", f"--out_dir={tmp_path}/n")


def test_unknown_start_character(capsys, tiny_run):
    out, _ = tiny_run
    assert "'é'" in _user_error(capsys, "sample", f"--out_dir={out}", "--start=café")
    assert "takes no --top_p" in _user_error(capsys, "sample", f"--out_dir={out}", "--top_p=0.9")


def test_python_config_file(tmp_path, shakespeare):
    from gptjax.config import load_config

    f = tmp_path / "my.py"
    f.write_text("base = 'tiny'\nn_layer = 3\nlearning_rate = 3e-4\n")
    cfg = load_config(str(f), {"input": shakespeare})
    assert cfg.model.n_layer == 3 and cfg.train.learning_rate == 3e-4 and cfg.model.n_embd == 32
    f.write_text("n_layers = 3\n")
    with pytest.raises(Exception, match="n_layer"):
        load_config(str(f))


def test_error_exits_2_without_traceback_in_a_subprocess(tmp_path):
    r = run_cli("train", "--config=tiny", f"--input={tmp_path}/missing.txt")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
