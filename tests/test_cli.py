import json
import os

import pytest
from conftest import cli_run, run_cli, user_error

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
    for f in ("config.json", "metrics.jsonl", "loss.png", "tokenizer.json", "checkpoints/step_00000020",
              "checkpoints/step_00000030"):
        assert os.path.exists(os.path.join(out, f)), f
    assert len(os.listdir(os.path.join(out, "checkpoints"))) == 3  # the newest 2 (--keep_checkpoints) and the best


def test_sample_eval_cli(tiny_run):
    out, _ = tiny_run
    r1 = cli_run("sample", f"--out_dir={out}", "--start=KING:", "--num_samples=2", "--max_new_tokens=40",
                 "--seed=3", "--top_k=10", "--temperature=0.9")
    r2 = cli_run("sample", f"--out_dir={out}", "--start=KING:", "--num_samples=2", "--max_new_tokens=40",
                 "--seed=3", "--top_k=10", "--temperature=0.9")
    assert r1.returncode == 0, r1.stderr[-2000:]
    assert r1.stdout == r2.stdout and r1.stdout.count("KING:") >= 2
    r = cli_run("eval", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "bits/char" in r.stdout and "111,539 tokens" in r.stdout


def test_sample_cli_passes_every_option_through(tiny_run, capsys):
    """`gptjax sample`'s --temperature, --top_k, --seed, --checkpoint and --start reach the sampler: a temperature
    near 0 and top_k=1 are both greedy and agree; the default sampling differs; each option changes the text."""
    out, _ = tiny_run

    def text(*args):
        assert cli.main(["sample", f"--out_dir={out}", "--start=KING:", "--max_new_tokens=60", *args]) == 0
        return capsys.readouterr().out

    greedy = text("--temperature=0.000001", "--top_k=0")
    assert text("--top_k=1", "--temperature=5") == greedy
    default = text()
    assert default != greedy and default.startswith("KING:")
    assert text("--seed=2") != default and text("--top_k=2") != default and text("--temperature=1.5") != default
    assert text("--checkpoint=20", "--temperature=0.000001", "--top_k=0") != greedy  # an earlier checkpoint
    assert text("--start=QUEEN:").startswith("QUEEN:")


def test_prepare_and_bench(shakespeare):
    r = cli_run("prepare", "--config=tiny", f"--input={shakespeare}")
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads(r.stdout[: r.stdout.rindex("}") + 1])
    assert meta["train_tokens"] == 1_003_854
    r = cli_run("bench", "--config=tiny", f"--input={shakespeare}", "--modes=jax_jit", "--steps=3", "--repeats=2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ms/step" in r.stdout and "tokens/s" in r.stdout


def test_unknown_key_names_the_closest(capsys, shakespeare):
    assert "--learning_rate" in user_error(capsys, "train", "--config=tiny", "--learning_rat=3")
    assert "--n_layer" in user_error(capsys, "train", "--config=tiny", "--nlayer=3")


def test_bad_values(capsys, shakespeare):
    assert "int" in user_error(capsys, "train", "--config=tiny", "--n_layer=two")
    assert "float" in user_error(capsys, "train", "--config=tiny", "--dropout=yes")
    assert "bool" in user_error(capsys, "train", "--config=tiny", "--bias=maybe")
    assert "divisible" in user_error(capsys, "train", "--config=tiny", "--n_embd=33", f"--input={shakespeare}")
    assert "unknown config" in user_error(capsys, "train", "--config=tinyy")
    assert "not found" in user_error(capsys, "train", "--config=nope.py")
    assert "unknown command" in user_error(capsys, "trian")
    assert "temperature" in user_error(capsys, "sample", "--out_dir=x", "--temperature=0")


def test_missing_and_bad_data(capsys, tmp_path):
    assert "no such file" in user_error(capsys, "train", "--config=tiny", f"--input={tmp_path}/none.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "empty" in user_error(capsys, "train", "--config=tiny", f"--input={empty}")
    short = tmp_path / "short.txt"
    short.write_text("abcdefghij" * 3)
    assert "block_size" in user_error(capsys, "train", "--config=tiny", f"--input={short}",
                                       f"--out_dir={tmp_path}/o")


def test_existing_run_is_not_overwritten(capsys, tiny_run):
    out, _ = tiny_run
    before = open(os.path.join(out, "metrics.jsonl")).read()
    err = user_error(capsys, "train", "--config=tiny", f"--out_dir={out}")
    assert "--init_from=resume" in err and "--force" in err
    assert open(os.path.join(out, "metrics.jsonl")).read() == before


def test_runs_that_do_not_exist(capsys, tmp_path):
    assert "no run" in user_error(capsys, "sample", f"--out_dir={tmp_path}/none")
    assert "no run" in user_error(capsys, "eval", f"--out_dir={tmp_path}/none")
    assert "resume" in user_error(capsys, "train", "--config=tiny", "--init_from=resume", f"--out_dir={tmp_path}/n")


def test_unknown_start_character(capsys, tiny_run):
    out, _ = tiny_run
    assert "'é'" in user_error(capsys, "sample", f"--out_dir={out}", "--start=café")
    assert "takes no --top_q; did you mean --top_p or --top_k?" in user_error(capsys, "sample", f"--out_dir={out}",
                                                                               "--top_q=0.9")


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


def test_every_numeric_setting_has_a_range():
    import dataclasses

    from gptjax.config import RANGES, ModelConfig, TrainConfig

    numeric = [f.name for c in (ModelConfig, TrainConfig) for f in dataclasses.fields(c) if f.type in ("int", "float")]
    assert numeric and not [k for k in numeric if k not in RANGES]


@pytest.mark.parametrize("args, needle", [
    (("train", "--learning_rate=nan"), "--learning_rate=nan"),
    (("train", "--learning_rate=Infinity"), "--learning_rate=inf"),
    (("train", "--min_lr=-inf"), "--min_lr=-inf"),
    (("train", "--learning_rate=0"), "--learning_rate=0.0"),
    (("train", "--beta1=-0.1"), "--beta1=-0.1"),
    (("train", "--beta2=2"), "--beta2=2.0"),
    (("train", "--beta2=1"), "--beta2=1.0"),
    (("train", "--grad_clip=-1"), "--grad_clip=-1.0"),
    (("train", "--weight_decay=-0.1"), "--weight_decay=-0.1"),
    (("train", "--min_lr=nan"), "--min_lr=nan"),
    (("train", "--dropout=1.5"), "--dropout=1.5"),
    (("train", "--dropout=1.0"), "--dropout=1.0"),  # every unit dropped: the run would die of a non-finite loss
    (("train", "--distributed", "--num_processes=0"), "--num_processes=0"),
    (("train", "--distributed", "--distributed_timeout=0"), "--distributed_timeout=0"),
    (("sample", "--max_new_tokens=1000001"), "--max_new_tokens=1000001"),
    (("train", "--n_head=0"), "--n_head=0"),
    (("train", "--max_iters=-1"), "--max_iters=-1"),
    (("train", "--eval_interval=4294967296"), "--eval_interval=4294967296"),
    (("train", "--warmup_iters=-5"), "--warmup_iters=-5"),
    (("train", "--seed=-1"), "--seed=-1"),
    (("train", "--vocab_size=-1"), "--vocab_size=-1"),
    (("prepare", "--block_size=0"), "--block_size=0"),
    (("bench", "--eval_iters=0"), "--eval_iters=0"),
    (("bench", "--warmup=-1"), "--warmup=-1"),
    (("bench", "--rounds=0"), "--rounds=0"),
    (("sample", "--temperature=nan"), "--temperature=nan"),
    (("sample", "--temperature=-1"), "--temperature=-1.0"),
    (("sample", "--top_k=-1"), "--top_k=-1"),
    (("sample", "--num_samples=0"), "--num_samples=0"),
    (("sample", "--max_new_tokens=-3"), "--max_new_tokens=-3"),
    (("sample", "--seed=-2"), "--seed=-2"),
    (("eval", "--batch_size=-1"), "--batch_size=-1"),
])
def test_every_numeric_setting_is_range_checked(capsys, tmp_path, shakespeare, args, needle):
    """One line naming the option and its range, exit 2, before anything is written."""
    command, *rest = args
    out = tmp_path / "run"
    extra = ["--config=tiny", f"--input={shakespeare}"] if command in ("train", "prepare", "bench") else []
    data_dir = tmp_path / "data"
    err = user_error(capsys, command, *extra, *rest, f"--out_dir={out}",
                      *([f"--data_dir={data_dir}"] if command in ("train", "prepare") else []))
    assert needle in err and "out of range" in err, err
    assert not out.exists() and not data_dir.exists()


def _train(shakespeare, out, *args):
    r = cli_run("train", "--config=tiny", f"--input={shakespeare}", f"--out_dir={out}", *args)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def test_resume_keeps_the_runs_own_settings(capsys, tmp_path, shakespeare):
    """`--init_from=resume --out_dir=R` continues R with R's settings, not the default preset's; only what is
    passed changes, and what changed is printed; contradicting the saved model is refused."""
    out = tmp_path / "run"
    _train(shakespeare, out, "--max_iters=10", "--learning_rate=0.02", "--eval_interval=5")
    cfg = json.loads((out / "config.json").read_text())
    before = (out / "metrics.jsonl").read_text()
    assert "--n_layer=8 contradicts" in user_error(capsys, "train", "--init_from=resume", f"--out_dir={out}",
                                                    "--n_layer=8")
    assert "--max_iters=5 is below" in user_error(capsys, "train", "--init_from=resume", f"--out_dir={out}",
                                                   "--max_iters=5", f"--input={shakespeare}")
    assert (out / "metrics.jsonl").read_text() == before and json.loads((out / "config.json").read_text()) == cfg
    r = cli_run("train", "--init_from=resume", f"--out_dir={out}", f"--input={shakespeare}", "--max_iters=15")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "changed: max_iters: 10 -> 15" in r.stdout and "learning_rate" not in r.stdout.split("changed:")[1]
    now = json.loads((out / "config.json").read_text())
    assert now["train"] == {**cfg["train"], "max_iters": 15, "init_from": "resume"}
    assert now["model"] == cfg["model"]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 5, 10, 15]


def test_a_run_stopped_before_its_first_checkpoint_can_be_resumed(tmp_path, shakespeare):
    out = tmp_path / "run"
    _train(shakespeare, out, "--max_iters=0")
    assert not (out / "checkpoints").exists()
    r = _train(shakespeare, out, "--init_from=resume", "--max_iters=10")
    assert "starting its run over from step 0" in r.stdout
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 10]
