"""The jitted train step and the training loop (the run's directory and bookkeeping: run.py; losses, evaluation and
setup: evaluate.py; the optimizer: optim.py)."""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import optax

from gptjax import checkpoint, data, evaluate, model, optim, parallel
from gptjax.compute import compute_of, describe_matmul
from gptjax.config import Config, TrainConfig
from gptjax.run import Run, StopOnSignal
from gptjax.weights import hf


def make_train_step(graphdef, tx: optax.GradientTransformation, t: TrainConfig, mesh=None, impl: str = "sharded",
                    state_like=None):
    """train_step(state, x_ABT, y_ABT, key) -> (state, metrics), A = gradient accumulation micro-batches.

    Without a mesh: jit on the default device. With one, as --step_impl runs it (parallel.compile_step): `sharded`
    (jit with the state laid out as parallel.state_sharding(mesh, state_like); replicated if state_like is None),
    `shard_map` or `pmap` (per-device gradients, pmean over the data axes; pmap's state and batches carry a leading
    device axis, see parallel.Layout).
    """
    schedule = optim.lr_schedule(t)
    grad_fn = jax.value_and_grad(lambda p, x, y, k: evaluate.loss_fn(graphdef, p, x, y, k))

    def train_step(state: optim.TrainState, x_ABT, y_ABT, key, reduce):
        keys = jax.random.split(jax.random.fold_in(key, state.step), x_ABT.shape[0])
        if x_ABT.shape[0] == 1:
            loss, grads = grad_fn(state.params, x_ABT[0], y_ABT[0], keys[0])
        else:
            def micro(acc, xyk):
                loss, grads = grad_fn(state.params, *xyk)
                return jax.tree.map(jnp.add, acc, (loss, grads)), None

            zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
            (loss, grads), _ = jax.lax.scan(micro, zero, (x_ABT, y_ABT, keys))
            loss, grads = jax.tree.map(lambda a: a / x_ABT.shape[0], (loss, grads))
        loss, grads = reduce(loss, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optim.global_norm(grads), "lr": schedule(state.step)}
        return state._replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return parallel.compile_step(train_step, mesh, impl, state_like)



def train(config: Config, force: bool = False, progress: bool = True) -> dict:
    """Train as the config says, writing config.json, metrics.jsonl, checkpoints and loss.png to out_dir.

    Every check of the input comes before anything is written. The run directory is locked while it trains.
    SIGINT/SIGTERM save the step reached and raise Stopped; a non-finite loss stops with a UserError, the last
    good checkpoint kept. A fresh run that fails before its first checkpoint leaves no run files behind.
    """
    t0 = time.perf_counter()
    if hf.is_pretrained(config.train.init_from):  # the model (and tokenizer) its files hold
        config = hf.pretrained_config(config)
    with Run.open(config, force) as run:
        prep = data.prepare(run.config.data)
        run.check_data(prep)
        config, prep, graphdef, params, tx = evaluate.setup(run.config, prep)
        t = config.train
        layout = parallel.Layout(parallel.make_mesh(t.mesh, t.batch_size), t.step_impl)
        state = optim.init_state(params, tx)
        state = jax.device_put(state, parallel.state_sharding(layout.mesh, state))  # checkpoints restore into this
        state = run.begin(config, prep, state)
        return _loop(run, prep, graphdef, tx, layout, state, t0, progress and run.lead)


def _loop(run: Run, prep: data.Prepared, graphdef, tx, layout: parallel.Layout, state, t0: float,
          progress: bool) -> dict:
    """Train from run.start to max_iters: a loss estimate, a metrics row and a checkpoint every eval_interval steps;
    each step's metrics read a step late, so the host never waits on the step just queued."""
    from tqdm import tqdm

    config, out = run.config, run.out
    t, m, mesh = config.train, config.model, layout.mesh
    train_tokens, val_tokens = prep.tokens("train"), prep.tokens("val")
    train_step = make_train_step(graphdef, tx, t, mesh, t.step_impl, state)
    estimate = evaluate.make_estimate(config, mesh, state.params)
    eval_layout = parallel.Layout(mesh)  # estimates run the sharded jit on the global-form state, for every backend
    say = print if run.lead else (lambda *a, **k: None)  # only process 0 prints
    say(_describe(config, prep, state.params, mesh))
    state = layout.place(state)
    dropout_key = jax.random.fold_in(jax.random.PRNGKey(t.seed), 1)
    A, B, T = t.gradient_accumulation_steps, t.batch_size, m.block_size

    def batch(step):
        """Step's batch, sent to this process's devices at once (its own rows only): the copies overlap the step in
        flight."""
        starts = data.batch_starts(train_tokens, A * B, T, t.seed, step).reshape(A, B)
        return layout.batch((A, B, T), lambda lo, hi: data.windows(train_tokens, starts[:, lo:hi], T))

    def evaluate_and_save(step, state, tokens_per_sec):
        """Estimate both losses, log the row; past the start, checkpoint (as the best too if val improved)."""
        canon = layout.canonical(state)
        losses = {s: float(estimate(canon.params, *evaluate.eval_batches(tok, t, T, s, step, eval_layout)))
                  for s, tok in (("train", train_tokens), ("val", val_tokens))}
        for s, v in losses.items():
            if not math.isfinite(v):
                raise run.diverged(step, f"the estimated {s} loss ({v})")
        row = {"step": step, "train_loss": losses["train"], "val_loss": losses["val"],
               "lr": float(optim.lr_schedule(t)(step)), "tokens_per_sec": tokens_per_sec,
               "elapsed_s": time.perf_counter() - t0}
        run.log(row)
        write(f"step {step}: train loss {row['train_loss']:.4f}, val loss {row['val_loss']:.4f}, "
              f"{tokens_per_sec:,.0f} tokens/s")
        if step > run.start:
            saved = run.save(step, canon, losses["val"])
            state = state if saved is canon else layout.place(saved)
        return state, row

    row, compile_s, prev = None, None, None  # prev: last step's metrics, fetched a step late
    bar = tqdm(total=t.max_iters, initial=run.start, disable=not progress, dynamic_ncols=True, mininterval=0.5)
    write = bar.write if run.lead else say
    interval_start, interval_steps = time.perf_counter(), 0
    try:
        x, y = batch(run.start)
        with StopOnSignal() as stop:
            for step in range(run.start, t.max_iters + 1):
                if stop.signum is not None:
                    raise run.stopped(stop.signum, step, layout.canonical(state))
                if step % t.eval_interval == 0 or step == t.max_iters:
                    jax.block_until_ready(state)
                    elapsed = time.perf_counter() - interval_start
                    state, row = evaluate_and_save(step, state, interval_steps * A * B * T / elapsed
                                                   if interval_steps else 0.0)
                    interval_start, interval_steps = time.perf_counter(), 0
                if step == t.max_iters:
                    break
                tick = time.perf_counter()
                state, metrics = train_step(state, x, y, dropout_key)
                if compile_s is None:
                    jax.block_until_ready(metrics)
                    compile_s = time.perf_counter() - tick
                    write(f"compiled the train step in {compile_s:.1f} s (first call, including one step)")
                    interval_start = time.perf_counter()
                else:
                    interval_steps += 1
                x, y = batch(step + 1)  # sampled on the host while the device works
                if prev is not None:
                    loss, norm = parallel.first(prev["loss"]), parallel.first(prev["grad_norm"])
                    for what, v in (("the loss", loss), ("the gradient norm", norm)):
                        if not math.isfinite(v):
                            raise run.diverged(step - 1, f"{what} ({v})")
                    if step % t.log_interval == 0:
                        rate = interval_steps * A * B * T / max(time.perf_counter() - interval_start, 1e-9)
                        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}", refresh=False)
                prev = metrics
                bar.update(1)
    finally:
        bar.close()
    jax.block_until_ready(state)
    run.finish()
    wall = time.perf_counter() - t0
    summary = {"steps": t.max_iters - run.start, "wall_s": wall, "compile_s": compile_s, "last": row,
               "best_val_loss": parallel.first(layout.canonical(state).best_val_loss), "out_dir": out}
    say(f"done: {summary['steps']} steps in {wall:.1f} s wall; val loss {row['val_loss']:.4f} "
        f"(best {summary['best_val_loss']:.4f}); checkpoints in {checkpoint.root(out)}")
    return summary


def _describe(config: Config, prep: data.Prepared, params, mesh) -> str:
    """The opening line: the model, the data, and how the step runs."""
    m, t = config.model, config.train
    compute = compute_of(config)
    return (f"{m.model}: {model.num_params(params) / 1e6:.2f}M parameters, vocab {m.vocab_size}, "
            f"{prep.meta['train_tokens']:,} train / {prep.meta['val_tokens']:,} val tokens; "
            f"{t.step_impl} step on {parallel.describe_devices(mesh)}" + (
                f"; {compute.dtype}, {compute.attention} attention, layers "
                f"{'scanned' if compute.scan else 'unrolled'}{', remat per block' if compute.remat else ''}, "
                f"{describe_matmul(compute)}"
                if m.model == "gpt" else ""))
