"""nanoGPT checkpoints: a trained run exported with `gptjax export` computes the same logits in the PyTorch twin,
loads the way nanoGPT's sample.py loads it, and comes back through `gptjax import` bit for bit."""

import os
import pickle
import shutil
import stat

import jax
import numpy as np
import pytest
import torch
from conftest import cli_run, digest, user_error

from gptjax import cli, data, evaluate, model, rundir
from gptjax.config import ModelConfig
from gptjax.reference import parity
from gptjax.reference.nanogpt import GPT


@pytest.fixture(scope="module")
def exported(shakespeare, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    run, ckpt = str(root / "run"), str(root / "nano" / "ckpt.pt")
    r = cli_run("train", "--config=tiny", f"--input={shakespeare}", f"--out_dir={run}", "--max_iters=30",
                "--scan_layers=true")  # scanned layers: their checkpoints and exports keep per-layer names
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli_run("export", f"--out_dir={run}", "--to=nanogpt", ckpt)
    assert r.returncode == 0, r.stderr[-2000:]
    return run, ckpt


def _nanogpt_sample_py_load(path):
    """What nanoGPT's sample.py does with a ckpt.pt (weights_only=True, as torch >= 2.6 loads by default)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    gptconf = ModelConfig(**checkpoint["model_args"])  # nanoGPT: GPTConfig(**checkpoint['model_args'])
    state_dict = checkpoint["model"]
    for k in list(state_dict):
        if k.startswith("_orig_mod."):
            state_dict[k[len("_orig_mod."):]] = state_dict.pop(k)
    m = GPT(gptconf)
    m.load_state_dict(state_dict)
    return checkpoint, m.eval()


def test_exported_run_gives_the_same_logits_in_the_twin(exported, shakespeare):
    run, ckpt = exported
    checkpoint, twin = _nanogpt_sample_py_load(ckpt)
    assert set(checkpoint) >= {"model", "optimizer", "model_args", "iter_num", "best_val_loss", "config"}
    groups = checkpoint["optimizer"]["param_groups"]  # nanoGPT's: decayed >= 2-D parameters, then the rest
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0] and len(checkpoint["optimizer"]["state"]) == 15
    assert checkpoint["config"]["dataset"] == "shakespeare_char" and checkpoint["iter_num"] == 30
    config, graphdef, params = rundir.load_run(run)
    val = data.prepare(config.data).tokens("val")
    x, _ = data.get_batch(val, 8, config.model.block_size, 0, 0)
    logits = np.asarray(model.apply(graphdef, params, x))
    with torch.no_grad():
        t_logits = twin(torch.from_numpy(x.astype(np.int64)))[0].numpy()
    assert np.abs(logits - t_logits).max() <= 1e-5
    with open(os.path.join(os.path.dirname(ckpt), "meta.pkl"), "rb") as f:  # nanoGPT's char vocabulary file
        meta = pickle.load(f)
    assert meta["vocab_size"] == 65 and meta["itos"][0] == "\n" and meta["stoi"]["a"] == 39


def test_export_then_import_is_bit_exact(exported, tmp_path, shakespeare):
    run, ckpt = exported
    imported = str(tmp_path / "imported")
    r = cli_run("import", "--from=nanogpt", ckpt, f"--out_dir={imported}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "sample:" in r.stdout
    assert "AdamW state at step 30" in r.stdout
    assert rundir.saved_config(run).train.scan_layers  # a scanned model's export and import
    _, _, a = rundir.load_state(run)
    config, _, b = rundir.load_state(imported)
    assert config.model == rundir.load_run(run)[0].model
    assert jax.tree.structure(a) == jax.tree.structure(b)  # params, AdamW moments, counts, step, best val loss
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
    args = ("--start=ROMEO:", "--max_new_tokens=60", "--seed=7")
    s1, s2 = cli_run("sample", f"--out_dir={run}", *args), cli_run("sample", f"--out_dir={imported}", *args)
    assert s1.returncode == 0 and s1.stdout == s2.stdout
    # the import knows no corpus file: eval takes one, and gives the original run's exact loss
    assert evaluate.evaluate(imported, input_path=shakespeare)["loss"] == evaluate.evaluate(run)["loss"]


def test_imported_run_resumes_like_the_original(exported, tmp_path, shakespeare):
    """export -> import -> gptjax train --init_from=resume: the same 10 further steps as resuming the run itself."""
    run, ckpt = exported
    original, imported = str(tmp_path / "original"), str(tmp_path / "imported")
    shutil.copytree(run, original)
    assert cli_run("import", "--from=nanogpt", ckpt, f"--out_dir={imported}").returncode == 0
    for out in (original, imported):
        r = cli_run("train", "--config=tiny", f"--input={shakespeare}", f"--out_dir={out}", "--init_from=resume",
                    "--max_iters=40")
        assert r.returncode == 0, r.stderr[-2000:]
    a, b = rundir.load_state(original, "latest")[2], rundir.load_state(imported, "latest")[2]
    assert int(a.step) == int(b.step) == 40
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_import_a_checkpoint_made_by_pytorch(tmp_path):
    """A twin trained nowhere but in PyTorch, saved as torch.compile'd nanoGPT saves it, with GPT-2's vocabulary."""
    c = ModelConfig(vocab_size=50304, block_size=16, n_layer=1, n_head=2, n_embd=16, bias=True)
    twin = parity.twin(c)
    path = str(tmp_path / "ckpt.pt")
    torch.save({"model": {"_orig_mod." + k: v for k, v in twin.state_dict().items()},
                "model_args": {k: getattr(c, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "bias",
                                                          "vocab_size", "dropout")},
                "iter_num": 5, "best_val_loss": torch.tensor(3.0), "config": {"dataset": "openwebtext",
                                                                              "batch_size": 12}}, path)
    out = str(tmp_path / "run")
    r = cli_run("import", "--from=nanogpt", path, f"--out_dir={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "tokenizer gpt2" in r.stdout
    config, graphdef, params = rundir.load_run(out)
    assert config.model.bias and config.model.tie_weights and config.train.batch_size == 12
    x = np.random.default_rng(0).integers(0, 50304, (2, 16))
    with torch.no_grad():
        t_logits = twin(torch.from_numpy(x))[0].numpy()
    assert np.abs(np.asarray(model.apply(graphdef, params, x)) - t_logits).max() <= 1e-5


@pytest.fixture
def fails(capsys):
    def run(*args):
        code = cli.main(list(args))
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("gptjax: error:") and "\n" not in err, err
        return err

    return run


def test_bad_exports_and_imports_are_clear_errors_that_keep_what_exists(exported, tmp_path, fails):
    run, ckpt = exported
    before = open(ckpt, "rb").read()
    assert "exists" in fails("export", f"--out_dir={run}", "--to=nanogpt", ckpt)
    assert open(ckpt, "rb").read() == before
    assert "formats are nanogpt, hf" in fails("export", f"--out_dir={run}", "--to=onnx", str(tmp_path / "x.pt"))
    assert "FILE.pt" in fails("export", f"--out_dir={run}", "--to=nanogpt")

    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    out = tmp_path / "new"
    assert "weights_only" in fails("import", "--from=nanogpt", str(junk), f"--out_dir={out}")
    torch.save({"weights": torch.zeros(3)}, str(tmp_path / "other.pt"))
    assert "not a nanoGPT checkpoint" in fails("import", "--from=nanogpt", str(tmp_path / "other.pt"),
                                                f"--out_dir={out}")
    assert not out.exists()

    lone = tmp_path / "lone" / "ckpt.pt"  # a char-level checkpoint without its meta.pkl
    lone.parent.mkdir()
    lone.write_bytes(before)
    assert "--meta=" in fails("import", "--from=nanogpt", str(lone), f"--out_dir={out}")
    assert not out.exists()

    config_before = open(os.path.join(run, "config.json")).read()
    assert "already holds a run" in fails("import", "--from=nanogpt", ckpt, f"--out_dir={run}")
    assert open(os.path.join(run, "config.json")).read() == config_before


def test_a_bigram_run_cannot_become_a_nanogpt_checkpoint(shakespeare, tmp_path, fails):
    run = str(tmp_path / "bigram")
    r = cli_run("train", "--config=bigram", f"--input={shakespeare}", f"--out_dir={run}", "--max_iters=2",
                "--eval_interval=2", "--eval_iters=1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "bigram model" in fails("export", f"--out_dir={run}", "--to=nanogpt", str(tmp_path / "b.pt"))
    assert not (tmp_path / "b.pt").exists()


def test_import_refuses_impossible_fields_before_writing(exported, tmp_path, fails):
    """iter_num=-5 or dropout=1.5 in the file, or a --meta vocabulary the model cannot hold: one line, no run dir."""
    run, ckpt = exported
    original = torch.load(ckpt, weights_only=True)
    out = tmp_path / "new"
    for name, edit, needle in (("neg", {"iter_num": -5}, "iter_num=-5 is not a step count"),
                               ("drop", {"model_args": {**original["model_args"], "dropout": 1.5}}, "--dropout=1.5"),
                               ("beta", {"config": {**original["config"], "beta2": 2.0}}, "--beta2=2.0"),
                               ("loss", {"best_val_loss": float("nan")}, "best_val_loss=nan is not a loss")):
        d = tmp_path / name
        d.mkdir()
        shutil.copy(os.path.join(os.path.dirname(ckpt), "meta.pkl"), d)
        torch.save({**original, **edit}, str(d / "ckpt.pt"))
        assert needle in fails("import", "--from=nanogpt", str(d / "ckpt.pt"), f"--out_dir={out}")
        assert not out.exists()
    meta = tmp_path / "big_meta.pkl"
    with open(meta, "wb") as f:
        pickle.dump({"vocab_size": 80, "itos": {i: chr(200 + i) for i in range(80)},
                     "stoi": {chr(200 + i): i for i in range(80)}}, f)
    assert "80 tokens but the model only 65" in fails("import", "--from=nanogpt", ckpt, f"--meta={meta}",
                                                      f"--out_dir={out}")
    assert not out.exists()


def test_export_leaves_temporary_files_it_did_not_make(exported, tmp_path):
    """A FILE.pt.tmp or meta.pkl.tmp already beside the target is somebody else's: export writes through names of
    its own and leaves those files as they were."""
    run, _ = exported
    target = tmp_path / "ckpt.pt"
    for name in ("ckpt.pt.tmp", "meta.pkl.tmp"):
        (tmp_path / name).write_text("not gptjax's")
    assert cli.main(["export", f"--out_dir={run}", "--to=nanogpt", str(target)]) == 0
    assert all((tmp_path / n).read_text() == "not gptjax's" for n in ("ckpt.pt.tmp", "meta.pkl.tmp"))
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "ckpt.pt.tmp", "meta.pkl", "meta.pkl.tmp"]


def test_exported_files_take_the_umask_mode(exported, tmp_path):
    """ckpt.pt and meta.pkl are made to be shared: they get a new file's mode under the umask (0666 & ~umask), not
    the 0600 of a temporary file, though they are still written through one and renamed."""
    run, _ = exported
    old = os.umask(0o027)
    try:
        assert cli.main(["export", f"--out_dir={run}", "--to=nanogpt", str(tmp_path / "ckpt.pt")]) == 0
    finally:
        os.umask(old)
    assert {n: stat.S_IMODE(os.stat(tmp_path / n).st_mode) for n in os.listdir(tmp_path)} == {
        "ckpt.pt": 0o640, "meta.pkl": 0o640}


def test_export_beside_a_meta_pkl_directory_writes_nothing(exported, tmp_path, capsys):
    """--force replaces files, not a directory where meta.pkl would go: refused before ckpt.pt is written."""
    run, _ = exported
    (tmp_path / "meta.pkl").mkdir()
    before = digest(tmp_path)
    err = user_error(capsys, "export", f"--out_dir={run}", "--to=nanogpt", tmp_path / "ckpt.pt", "--force")
    assert f"{tmp_path / 'meta.pkl'} is a directory, where the vocabulary would go" in err, err
    assert digest(tmp_path) == before
