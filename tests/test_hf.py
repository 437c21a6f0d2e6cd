"""Hugging Face GPT-2 files in and out (gptjax/weights/hf.py), checked against transformers' own GPT2LMHeadModel:
every name layout loads to its logits and gradients, the hub cache is found by name, export loads in transformers,
import then export is bit-exact, a finetune from its files resumes and samples, and every refusal is one line."""

import copy
import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cli_run, user_error

from gptjax import evaluate, model, rundir
from gptjax.weights import hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

SHAPE = dict(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4)  # GPT-2's vocabulary, tiny otherwise


def _hf_model(seed: int = 0, **over):
    """A random GPT2LMHeadModel whose every tensor (biases and LayerNorms too) is drawn, not left at its init."""
    torch.manual_seed(seed)
    m = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**SHAPE, **over}))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return m.eval()


def _logits(m, idx) -> np.ndarray:
    with torch.no_grad():
        return m(torch.from_numpy(idx)).logits.numpy()


def _agrees(got, m, idx, err_msg=""):
    """gptjax's logits against transformers' in float64 (the definition) to 1e-5, and in float32 (what users run)."""
    ref = _logits(copy.deepcopy(m).double(), idx)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5, err_msg=f"against float64 {err_msg}")
    np.testing.assert_allclose(got, _logits(m, idx), rtol=0, atol=1e-4, err_msg=f"against float32 {err_msg}")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The random model as save_pretrained writes it (tied, gelu_new), and its logits on a batch."""
    d = tmp_path_factory.mktemp("hf") / "saved"
    m = _hf_model()
    m.save_pretrained(d)
    idx = np.random.RandomState(0).randint(0, SHAPE["vocab_size"], (2, 64))
    return d, m, idx


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """Another random model, its LM head its own (an nn.Linear, stored [out, in])."""
    d = tmp_path_factory.mktemp("hf") / "untied"
    m = _hf_model(seed=1, tie_word_embeddings=False)
    m.save_pretrained(d)
    return d, m


def _layouts(saved_dir, root):
    """The saved tensors under the hub's other names: without the transformer. prefix, and with the causal-mask
    buffers older transformers saved (h.N.attn.bias [1, 1, P, P], h.N.attn.masked_bias)."""
    tensors = safetensors_numpy.load_file(os.path.join(saved_dir, "model.safetensors"))
    P = SHAPE["n_positions"]
    buffers = {}
    for i in range(SHAPE["n_layer"]):
        buffers[f"transformer.h.{i}.attn.bias"] = np.tril(np.ones((P, P), np.float32))[None, None]
        buffers[f"transformer.h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    out = {}
    for name, sd in (("no prefix", {k.removeprefix("transformer."): v for k, v in tensors.items()}),
                     ("buffers", {**tensors, **buffers}),
                     ("no prefix, buffers", {k.removeprefix("transformer."): v
                                             for k, v in {**tensors, **buffers}.items()})):
        d = root / name.replace(", ", "-").replace(" ", "_")
        d.mkdir()
        shutil.copy(os.path.join(saved_dir, "config.json"), d)
        safetensors_numpy.save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        out[name] = d
    return {"as saved": saved_dir, **out}


def test_every_name_layout_gives_transformers_logits(saved, untied, tmp_path):
    saved_dir, m, idx = saved
    for name, d in _layouts(saved_dir, tmp_path).items():
        config, graphdef, params, tok = hf.load_model(str(d))
        assert config.model.activation == "gelu_tanh" and config.model.bias and tok.name == "gpt2", name
        _agrees(np.asarray(model.apply(graphdef, params, jnp.asarray(idx))), m, idx, name)
    config, graphdef, params, _ = hf.load_model(str(untied[0]))
    assert not config.model.tie_weights
    _agrees(np.asarray(model.apply(graphdef, params, jnp.asarray(idx))), untied[1], idx, "untied")


def test_gradients_equal_transformers(saved):
    """The loss's gradient for every parameter, against transformers' backward through its own GPT2LMHeadModel."""
    saved_dir, m, idx = saved
    config, graphdef, params, _ = hf.load_model(str(saved_dir))
    x, y = idx[:, :-1], idx[:, 1:]
    m.zero_grad()
    loss_hf = torch.nn.functional.cross_entropy(m(torch.from_numpy(x)).logits.flatten(0, 1),
                                                torch.from_numpy(y).flatten())
    loss_hf.backward()
    loss, grads = jax.value_and_grad(lambda p: evaluate.loss_fn(graphdef, p, jnp.asarray(x), jnp.asarray(y)))(params)
    assert abs(float(loss) - loss_hf.item()) < 1e-5
    hf_grads = {k: p.grad.numpy() for k, p in m.named_parameters()}
    got = hf.tensors_from_params(grads, config.model)
    assert set(got) == set(hf_grads)
    for k, g in got.items():
        # measured within 1.3e-6 of each tensor's largest entry; the exact GELU in place of GPT-2's: 2.7e-4
        np.testing.assert_allclose(g, hf_grads[k], rtol=0, atol=1e-5 * np.abs(hf_grads[k]).max(), err_msg=k)


def test_the_twin_computes_gpt2s_gelu_too(saved):
    """The PyTorch twin built from the same config (activation gelu_tanh) gives the same logits."""
    from gptjax.reference.convert import to_torch_state_dict
    from gptjax.reference.nanogpt import GPT

    saved_dir, m, idx = saved
    config, graphdef, params, _ = hf.load_model(str(saved_dir))
    twin = GPT(config.model).eval()
    twin.load_state_dict(to_torch_state_dict(params, config.model))
    with torch.no_grad():
        got = twin(torch.from_numpy(idx))[0].numpy()
    _agrees(got, m, idx)


def _fake_hub(root, repo, saved_dir, other_dir):
    """A hub cache as huggingface_hub leaves it: blobs, snapshots of links to them, refs/main naming one; another
    snapshot (other_dir's files), newer, that refs/main does not name."""
    base = root / ("models--" + repo.replace("/", "--"))
    (base / "blobs").mkdir(parents=True)
    (base / "refs").mkdir()
    for sha, src in (("0123456789abcdef0123456789abcdef01234567", saved_dir), ("f" * 40, other_dir)):
        (base / "snapshots" / sha).mkdir(parents=True)
        for name in ("config.json", "model.safetensors"):
            shutil.copy(os.path.join(src, name), base / "blobs" / f"{sha}-{name}")
            os.symlink(f"../../blobs/{sha}-{name}", base / "snapshots" / sha / name)
    os.utime(base / "snapshots" / sha, (os.path.getmtime(base) + 100,) * 2)
    (base / "refs" / "main").write_text("0123456789abcdef0123456789abcdef01234567")
    return base / "snapshots" / "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize("repo", ["openai-community/gpt2", "gpt2"])
def test_the_hub_cache_is_found_by_nanogpts_name(saved, untied, tmp_path, monkeypatch, capsys, repo):
    saved_dir, m, idx = saved
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = _fake_hub(tmp_path / "hub", repo, saved_dir, untied[0])
    assert hf.locate("gpt2") == str(snapshot)
    config, graphdef, params, _ = hf.load_model("gpt2")
    _agrees(np.asarray(model.apply(graphdef, params, jnp.asarray(idx))), m, idx)
    r = cli_run("sample", "--init_from=gpt2", "--start=To be", "--max_new_tokens=5", "--seed=3")
    assert r.returncode == 0 and r.stdout.startswith("To be"), r.stderr[-2000:]
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    line = user_error(capsys, "sample", "--init_from=gpt2-xl")
    assert "models--openai-community--gpt2-xl" in line and "huggingface-cli download" in line


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shakespeare):
    """A tiny char run without biases, trained in the exact GELU, and one in GPT-2's, exported to Hugging Face files."""
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for act in ("gelu", "gelu_tanh"):
        out = root / act
        r = cli_run("train", "--config=tiny", f"--input={shakespeare}", f"--activation={act}", "--max_iters=4",
                    "--eval_interval=2", "--eval_iters=1", f"--out_dir={out}")
        assert r.returncode == 0, r.stderr[-2000:]
        r = cli_run("export", f"--out_dir={out}", "--to=hf", root / f"{act}-hf")
        assert r.returncode == 0, r.stderr[-2000:]
        runs[act] = (out, root / f"{act}-hf")
    return root, runs


def test_export_loads_in_transformers_with_the_same_logits(trained):
    _, runs = trained
    idx = np.random.RandomState(1).randint(0, 65, (2, 16))
    for act, (out, exported) in runs.items():
        config, graphdef, params = rundir.load_run(str(out))
        assert not config.model.bias
        m, info = transformers.GPT2LMHeadModel.from_pretrained(exported, output_loading_info=True)
        m.eval()
        assert not any(info.values()), info  # every tensor there, none left over (zero biases for bias=False)
        assert m.config.activation_function == {"gelu": "gelu", "gelu_tanh": "gelu_new"}[act]
        assert m.config.bos_token_id is None  # a char vocabulary has none of GPT-2's token ids
        _agrees(np.asarray(model.apply(graphdef, params, jnp.asarray(idx))), m, idx, act)


def test_import_then_export_is_bit_exact(trained, untied, tmp_path):
    _, runs = trained
    _, exported = runs["gelu_tanh"]
    r = cli_run("import", "--from=hf", exported, f"--out_dir={tmp_path / 'run'}")
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli_run("export", f"--out_dir={tmp_path / 'run'}", "--to=hf", tmp_path / "again")
    assert r.returncode == 0, r.stderr[-2000:]
    for name in os.listdir(exported):
        assert (tmp_path / "again" / name).read_bytes() == (exported / name).read_bytes(), name
    assert rundir.saved_config(str(tmp_path / "run")).model.activation == "gelu_tanh"
    # transformers' own files (untied head, dropout 0.1) through a run and back: every tensor's bits, the settings
    r = cli_run("import", "--from=hf", untied[0], f"--out_dir={tmp_path / 'hf-run'}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert cli_run("export", f"--out_dir={tmp_path / 'hf-run'}", "--to=hf", tmp_path / "hf-again").returncode == 0
    want = safetensors_numpy.load_file(os.path.join(untied[0], "model.safetensors"))
    got = safetensors_numpy.load_file(str(tmp_path / "hf-again" / "model.safetensors"))
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
    cfg, again = (json.loads(open(os.path.join(d, "config.json")).read()) for d in (untied[0], tmp_path / "hf-again"))
    for key in ("resid_pdrop", "tie_word_embeddings", "activation_function", "n_positions", "vocab_size"):
        assert again[key] == cfg[key], key


def test_finetune_from_hf_files_starts_there_resumes_and_samples(saved, tmp_path, shakespeare):
    saved_dir, _, _ = saved
    out = tmp_path / "ft"
    # the gpt2 preset (its vocabulary padded to 50304 from scratch) at a toy batch: the file's 50257 stays
    base = ["--config=gpt2", f"--input={shakespeare}", f"--init_from={saved_dir}", "--block_size=32",
            "--batch_size=2", "--gradient_accumulation_steps=1", "--warmup_iters=0", "--eval_interval=2",
            "--eval_iters=1", f"--out_dir={out}"]
    r = cli_run("train", *base, "--max_iters=0")  # stopped before its first checkpoint
    assert r.returncode == 0 and not (out / "checkpoints").exists(), r.stderr[-2000:]
    r = cli_run("train", "--init_from=resume", f"--out_dir={out}", "--max_iters=2", "--learning_rate=1e-9",
                "--min_lr=1e-10", "--weight_decay=0")  # starts over from the pretrained weights, not at random
    assert r.returncode == 0, r.stderr[-2000:]
    config = rundir.saved_config(str(out))
    assert (config.model.n_embd, config.model.block_size, config.model.vocab_size, config.data.tokenizer,
            config.model.activation) == (32, 32, 50257, "gpt2", "gelu_tanh")
    _, _, pre, _ = hf.load_model(str(saved_dir))
    got = model.param_names(rundir.load_run(str(out), "latest")[2])
    for name, x in model.param_names(pre).items():  # two steps at lr 1e-9: still the pretrained weights
        x = x[:32] if name == "wpe.weight" else x  # cropped to --block_size
        np.testing.assert_allclose(got[name], x, rtol=0, atol=1e-6, err_msg=name)
    r = cli_run("train", "--init_from=resume", f"--out_dir={out}", "--max_iters=4")
    assert r.returncode == 0 and "sample:" in r.stdout, r.stderr[-2000:]
    assert [row["step"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [0, 2, 4]


def test_export_over_another_vocabulary_and_into_runs_is_safe(saved, trained, tmp_path, capsys):
    """--force over an export of a char run: gptjax's tokenizer file goes, or import would read GPT-2's ids with it;
    an export into a run's directory and an import onto its own files are refused."""
    _, runs = trained
    char_run, char_export = runs["gelu"]
    target = tmp_path / "over"
    shutil.copytree(char_export, target)
    assert (target / hf.VOCAB).is_file()
    gpt2_run = tmp_path / "gpt2-run"
    assert cli_run("import", "--from=hf", saved[0], f"--out_dir={gpt2_run}").returncode == 0
    r = cli_run("export", f"--out_dir={gpt2_run}", "--to=hf", target, "--force")
    assert r.returncode == 0 and not (target / hf.VOCAB).exists(), r.stderr[-2000:]
    assert hf.load_model(str(target))[3].name == "gpt2"
    assert "holds a gptjax run" in user_error(capsys, "export", f"--out_dir={gpt2_run}", "--to=hf", char_run,
                                              "--force")
    assert (char_run / "config.json").is_file() and rundir.saved_config(str(char_run)).model.bias is False
    assert "is the directory being imported" in user_error(capsys, "import", "--from=hf", target,
                                                            f"--out_dir={target}", "--force")
    assert (target / "config.json").is_file()


def _config_with(saved_dir, root, **changes):
    d = root / "changed"
    shutil.copytree(saved_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **changes}))
    return d


@pytest.mark.parametrize("changes, says", [
    (dict(model_type="llama"), "model_type is 'llama'; gptjax loads GPT-2 models"),
    (dict(n_inner=100), "n_inner=100 (gptjax's MLP is 4 x n_embd=128)"),
    (dict(layer_norm_epsilon=1e-6), "layer_norm_epsilon=1e-06"),
    (dict(activation_function="relu"), "activation_function='relu'"),
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx=true"),
    (dict(add_cross_attention=True), "add_cross_attention=true"),
    (dict(n_layer=3), "missing transformer.h.2."),
])
def test_what_gptjax_cannot_compute_is_refused_in_one_line(saved, tmp_path, capsys, changes, says):
    d = _config_with(saved[0], tmp_path, **changes)
    for argv in (["sample", f"--init_from={d}"], ["import", "--from=hf", d, f"--out_dir={tmp_path / 'r'}"]):
        assert says in user_error(capsys, *argv)
    assert not (tmp_path / "r").exists()


def test_bad_files_and_options_are_one_line(saved, trained, tmp_path, capsys, shakespeare):
    saved_dir = saved[0]
    cut = tmp_path / "cut"
    shutil.copytree(saved_dir, cut)
    with open(cut / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    assert "is not a readable safetensors file" in user_error(capsys, "sample", f"--init_from={cut}")
    (tmp_path / "empty").mkdir()
    assert "has no config.json or model.safetensors" in user_error(capsys, "sample", f"--init_from={tmp_path}/empty")
    train = ["train", "--config=tiny", f"--input={shakespeare}", f"--init_from={saved_dir}", f"--out_dir={tmp_path}/t"]
    assert "--n_layer: the model comes from" in user_error(capsys, *train, "--n_layer=4")
    assert "--block_size=128 exceeds" in user_error(capsys, *train, "--block_size=128")
    assert "--tokenizer=char" in user_error(capsys, *train, "--tokenizer=char")
    out, char_export = trained[1]["gelu_tanh"]
    for argv in (["train", "--config=tiny", f"--input={shakespeare}", f"--out_dir={tmp_path}/t"],
                 ["eval", f"--input={shakespeare}"]):
        line = user_error(capsys, *argv, f"--init_from={char_export}")
        assert "vocabulary" in line and "GPT-2's" in line and "gptjax import --from=hf" in line
    assert "did you mean --init_from=resume" in user_error(capsys, *train[:-2], "--init_from=resum", f"--out_dir={out}")
    assert "--init_from and --out_dir both name the model" in user_error(capsys, "sample", f"--init_from={saved_dir}",
                                                                         f"--out_dir={out}")
    assert "gptjax bench times a model from a fresh" in user_error(capsys, "bench", "--config=tiny",
                                                                   f"--init_from={saved_dir}")
    assert "activation=gelu_tanh; nanoGPT's MLP computes the exact GELU" in user_error(
        capsys, "export", f"--out_dir={out}", "--to=nanogpt", tmp_path / "x.pt")
    assert "contradicts" in user_error(capsys, "train", "--init_from=resume", f"--out_dir={out}", "--activation=gelu")
    (tmp_path / "afile").write_text("x")
    assert "is a file" in user_error(capsys, "export", f"--out_dir={out}", "--to=hf", tmp_path / "afile")
    assert not (tmp_path / "t").exists() and not (tmp_path / "x.pt").exists()


def test_padding_the_vocabulary_is_asked_for(saved, untied, tmp_path, shakespeare):
    """--vocab_size above the file's adds tokens whose embedding is the mean of the others, so each one's logit is
    the mean of the model's logits (a zero row's 0 would outweigh GPT-2's negative logits); the tokenizer's logits
    are unchanged. The gpt2 preset's 50304 does not apply to pretrained weights unless asked."""
    for d, m in (saved[:2], untied):
        config, _, _, _ = hf.load_model(str(d))
        padded = dataclasses.replace(config.model, vocab_size=50304)
        params = hf.params_from_tensors(hf.read_dir(str(d))[1], padded, str(d))
        logits = np.asarray(model.apply(model.graphdef_for(padded), params, jnp.asarray(saved[2])))
        _agrees(logits[..., :50257], m, saved[2])
        mean = logits[..., :50257].mean(-1, keepdims=True)
        np.testing.assert_allclose(logits[..., 50257:], np.broadcast_to(mean, logits[..., 50257:].shape), atol=1e-5)
    saved_dir = saved[0]
    from gptjax.config import load_config

    cfg = hf.pretrained_config(load_config("gpt2", {"init_from": str(saved_dir), "block_size": 64, "vocab_size": 0}))
    assert cfg.model.vocab_size == 50257 and load_config("gpt2").model.vocab_size == 50304


def test_the_finetune_recipe_runs_and_says_plainly_when_the_weights_are_missing(tmp_path, monkeypatch, capsys,
                                                                                shakespeare):
    import runpy

    from conftest import ROOT

    script = runpy.run_path(os.path.join(ROOT, "experiments", "finetune_gpt2.py"), run_name="smoke_finetune")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    from gptjax import research

    assert research.main(script["run"], [f"--input={shakespeare}", f"--out={tmp_path}"]) == 2
    assert "--model=gpt2-xl: not a directory, and no config.json" in error_line_of(capsys)
    small = tmp_path / "small.txt"  # the exact evaluations before and after: 50257 logits a token, so a short text
    with open(shakespeare, encoding="utf-8") as f:
        small.write_text(f.read(20000), encoding="utf-8")
    script["run"](["--smoke", "--model=random", f"--input={small}", f"--out={tmp_path}"])
    page = (tmp_path / "finetune_gpt2.md").read_text()
    assert "| after 2 iterations |" in page and (tmp_path / "finetune_gpt2" / "loss.png").is_file()


def error_line_of(capsys) -> str:
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    return line
