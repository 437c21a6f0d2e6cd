"""gptjax.weights without PyTorch: importing it (and the CLI, and training) loads no torch, nanoGPT's layout and AdamW
state round-trip bit for bit in arrays, and the formats table is what export and import offer."""

import subprocess
import sys
import textwrap

from gptjax import cli, weights


def _python(code: str) -> subprocess.CompletedProcess:
    """code in a fresh interpreter, where `import torch` fails as it does where torch is not installed."""
    blocked = "import sys\nsys.modules['torch'] = None  # import torch: ImportError\n"
    return subprocess.run([sys.executable, "-c", blocked + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=600)


def test_nanogpt_checkpoint_round_trips_without_torch():
    """gptjax.weights, cli and train import no torch; a trained-looking state (AdamW moments, step, best loss; biases
    and a tied head) through nanoGPT's ckpt.pt contents and back is bit-exact, with torch unimportable."""
    r = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import sys
        import gptjax.cli, gptjax.train, gptjax.weights, gptjax.weights.files, gptjax.weights.nanogpt
        assert "torch" not in sys.modules, "imported torch"
        sys.modules["torch"] = None  # from here on, import torch: ImportError
        import jax, jax.numpy as jnp, numpy as np, optax
        from gptjax import model, optim
        from gptjax.config import Config, DataConfig, ModelConfig, TrainConfig
        from gptjax.weights import nanogpt

        c = ModelConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, bias=True)
        config = Config(model=c, data=DataConfig(), train=TrainConfig())
        params = model.split(model.create(c, 0))[1]
        tx = optim.make_optimizer(config.train, params)
        state = optim.init_state(params, tx)
        key = jax.random.PRNGKey(1)
        for i in range(3):
            grads = jax.tree.map(lambda x: jax.random.normal(jax.random.fold_in(key, i), x.shape), params)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            state = state._replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                   opt_state=opt_state, best_val_loss=jnp.asarray(2.5, jnp.float32))
        ckpt = nanogpt.to_checkpoint(config, state)
        assert ckpt["model"]["lm_head.weight"] is ckpt["model"]["transformer.wte.weight"]
        assert ckpt["model"]["transformer.h.0.attn.c_attn.weight"].shape == (24, 8)  # PyTorch's [out, in]
        assert [len(g["params"]) for g in ckpt["optimizer"]["param_groups"]] == [10, 18]
        back = nanogpt.from_checkpoint(ckpt, config)
        assert jax.tree.structure(back) == jax.tree.structure(state)
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
            assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
        print("ok")
    """)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_without_torch_export_and_import_say_what_to_install(tmp_path):
    r = _python(f"""
        from gptjax import cli
        assert cli.main(["export", "--out_dir={tmp_path / 'run'}", "--to=nanogpt", "{tmp_path / 'ckpt.pt'}"]) == 2
        assert cli.main(["import", "--from=nanogpt", "{tmp_path / 'ckpt.pt'}", "--out_dir={tmp_path / 'new'}"]) == 2
    """)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert lines == ["gptjax: error: nanoGPT checkpoints need PyTorch: pip install 'gptjax[torch]'"] * 2, lines


def test_export_and_import_offer_the_formats_table(capsys):
    names = "|".join(weights.FORMATS)
    for command, option in (("export", "to"), ("import", "from")):
        assert cli.main([command, "--help"]) == 0
        assert f"{option}={names}" in capsys.readouterr().out
        assert f"--{option}={names} " in cli.USAGE
