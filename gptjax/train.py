"""The jitted train step, loss estimates and exact evaluation, and the training loop (optimizer: optim.py; the run
directory: rundir.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import shutil
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gptjax import checkpoint, data, model, optim, parallel, rundir
from gptjax.compute import compute_of
from gptjax.config import Config, TrainConfig, check_range, expand_path, resumed
from gptjax.errors import Stopped, UserError


def loss_fn(graphdef, params, x_BT, y_BT, key=None):
    return model.cross_entropy(model.apply(graphdef, params, x_BT, key), y_BT)


def make_train_step(graphdef, tx: optax.GradientTransformation, t: TrainConfig, mesh=None, impl: str = "sharded",
                    state_like=None):
    """train_step(state, x_ABT, y_ABT, key) -> (state, metrics), A = gradient accumulation micro-batches.

    Without a mesh: jit on the default device. With one, as --step_impl runs it (parallel.compile_step): `sharded`
    (jit with the state laid out as parallel.state_sharding(mesh, state_like); replicated if state_like is None),
    `shard_map` or `pmap` (per-device gradients, pmean over the data axes; pmap's state and batches carry a leading
    device axis, see parallel.Layout).
    """
    schedule = optim.lr_schedule(t)
    grad_fn = jax.value_and_grad(lambda p, x, y, k: loss_fn(graphdef, p, x, y, k))

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


def make_estimate_loss(graphdef, mesh=None, params_like=None):
    """jit(params, x_NBT, y_NBT) -> mean loss over N batches, in one device call; with a mesh, the batches split
    over its data axes and the params laid out as parallel.state_sharding (replicated if params_like is None)."""

    def estimate(params, x_NBT, y_NBT):
        return jax.lax.map(lambda xy: loss_fn(graphdef, params, *xy), (x_NBT, y_NBT)).mean()

    if mesh is None:
        return jax.jit(estimate)
    rep, batch = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    params_sh = rep if params_like is None else parallel.state_sharding(mesh, params_like)
    return jax.jit(estimate, in_shardings=(params_sh, batch, batch), out_shardings=rep)


def eval_batches(tokens, t: TrainConfig, block_size: int, split: str, eval_index: int, layout=None):
    """The eval_iters batches of one loss estimate: fresh random windows each eval, reproducible by seed.

    numpy [N, B, T] arrays; with a parallel.Layout, global arrays of which this process reads only its own rows."""
    stream = 1 + data.SPLITS.index(split)
    starts = data.batch_starts(tokens, t.eval_iters * t.batch_size, block_size, t.seed, eval_index, stream)
    starts = starts.reshape(t.eval_iters, t.batch_size)
    if layout is None:
        return data.windows(tokens, starts, block_size)
    return layout.batch(starts.shape + (block_size,), lambda lo, hi: data.windows(tokens, starts[:, lo:hi], block_size))


def exact_loss(graphdef, params, tokens: np.ndarray, block_size: int, batch_size: int,
               mesh=None) -> tuple[float, int]:
    """Summed nats over every next-token prediction of `tokens`, in consecutive windows of block_size; (nats, n).

    With a mesh, each batch splits over its data axes and the params are laid out as parallel.state_sharding."""

    def nll_sum(params, x_BT, y_BT, mask_BT):
        logits = model.apply(graphdef, params, x_BT).astype(jnp.float32)
        nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y_BT[..., None], -1)[..., 0]
        return (nll * mask_BT).sum()

    if mesh is None:
        nll_sum = jax.jit(nll_sum)
    else:
        params_sh, rows = parallel.state_sharding(mesh, params), parallel.batch_sharding(mesh, 0)
        params = jax.device_put(params, params_sh)
        nll_sum = jax.jit(nll_sum, in_shardings=(params_sh, rows, rows, rows), out_shardings=parallel.replicated(mesh))

    n = len(tokens) - 1
    windows = -(-n // block_size)
    pad = windows * block_size - n
    x = np.concatenate([np.asarray(tokens[:-1], np.int32), np.zeros(pad, np.int32)]).reshape(windows, block_size)
    y = np.concatenate([np.asarray(tokens[1:], np.int32), np.zeros(pad, np.int32)]).reshape(windows, block_size)
    mask = (np.arange(windows * block_size) < n).astype(np.float32).reshape(windows, block_size)
    total = 0.0
    for i in range(0, windows, batch_size):
        sl = slice(i, i + batch_size)
        bx, by, bm = x[sl], y[sl], mask[sl]
        if len(bx) < batch_size:  # pad the last batch so one compiled shape serves all
            extra = batch_size - len(bx)
            bx, by = (np.concatenate([a, np.zeros((extra, block_size), np.int32)]) for a in (bx, by))
            bm = np.concatenate([bm, np.zeros((extra, block_size), np.float32)])
        total += float(nll_sum(params, bx, by, bm))
    return total, n


def resume_config(overrides: dict, default_out_dir: str) -> tuple[Config, list[str]]:
    """--init_from=resume: the saved config of the run in --out_dir, with only `overrides` changed.

    Returns the config and one "key: old -> new" line per setting the overrides changed.
    """
    out = expand_path(overrides.get("out_dir", default_out_dir))
    rundir.check_out_dir(out)
    config, changes = resumed(_run_to_resume(out), {**overrides, "out_dir": out, "init_from": "resume"}, where=out)
    return config, [c for c in changes if not c.startswith(("out_dir:", "init_from:"))]


def _run_to_resume(out: str) -> Config:
    saved = rundir.saved_config(out)
    if saved is None:
        raise UserError(f"--init_from=resume: {out} holds no run to resume; train there from scratch first")
    return saved


def _prepare_out_dir(config: Config, force: bool) -> Config | None:
    """Check out_dir before anything is written; for resume, return the saved config."""
    out = config.train.out_dir
    rundir.check_out_dir(out)
    checkpoint.check_root(out)
    rundir.check_replaceable(out)
    if config.train.init_from == "resume":
        rundir.read_metrics(os.path.join(out, "metrics.jsonl"))  # a line that is not a row: refused before any work
        return _run_to_resume(out)
    rundir.claim_out_dir(out, force, "continue it with --init_from=resume, pick another --out_dir, or pass --force "
                  "to replace it", remove=False)
    return None


class _StopOnSignal:
    """SIGINT/SIGTERM ask the loop to stop after the step in flight (it saves, then exits 130/143).

    The first signal puts the default handlers back, so a second one ends the process at once, even inside a long
    device call. Installed only in the main thread (signal handlers live nowhere else); elsewhere it does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self.previous = {}

    def _handle(self, signum, frame):
        self.signum = signum
        for s in self.SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        print(f"\ngptjax: {signal.Signals(signum).name}: saving after the step in flight (send it again to exit "
              "now, without saving)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def _expected_failure(e: BaseException, out: str) -> UserError | None:
    """A UserError for a failure of the machine rather than of gptjax: memory (host or device) or writing the run.
    (A UserError or Stopped already says what it is.)"""
    if isinstance(e, (UserError, Stopped)):
        return None
    if isinstance(e, MemoryError) or (isinstance(e, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(e)):
        return UserError("out of memory: lower --batch_size (or raise --gradient_accumulation_steps to keep the "
                         "tokens per step), --block_size, --n_embd or --n_layer")
    write = _write_error(e)
    if write is not None:
        return UserError(f"cannot write the run in {out}: {write.strerror} ({write.filename or out}); free space or "
                         "pick another --out_dir, then continue with --init_from=resume")
    return None


def _write_error(e: BaseException | None) -> OSError | None:
    """The OSError of a failed write behind e: e itself, its cause or context (orbax re-raises in its own types),
    or one named only in a message ("[Errno 28] No space left on device: 'PATH'")."""
    import re

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            return e
        m = re.search(r"\[Errno (\d+)\] ([^:'\]]+)(?::\s*'([^']*)')?", str(e))
        if m and int(m.group(1)) in WRITE_ERRNOS:
            return OSError(int(m.group(1)), m.group(2).strip(), m.group(3))
        # tensorstore's form: '... local file "PATH" ...: No space left on device ... [os_error_code='28'] ...'
        m = re.search(r"\[os_error_code='(\d+)'\]", str(e))
        if m and int(m.group(1)) in WRITE_ERRNOS:
            where = re.search(r'local file "([^"]+)"', str(e))
            return OSError(int(m.group(1)), os.strerror(int(m.group(1))), where.group(1) if where else None)
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return None


WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


def setup(config: Config):
    """Data, model and optimizer for a config: (config with vocab_size, prepared data, graphdef, params, tx)."""
    prep = data.prepare(config.data)
    vocab = config.model.vocab_size or prep.meta["vocab_size"]
    if vocab < prep.meta["vocab_size"]:
        raise UserError(f"vocab_size={vocab} (--vocab_size, or a resumed run's own) is smaller than the tokenizer's "
                        f"{prep.meta['vocab_size']}: pass a larger --vocab_size, or 0 to take the tokenizer's")
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=vocab))
    for split in data.SPLITS:
        data.check_fits(prep.tokens(split), config.model.block_size, split)
    check_memory(config)
    graphdef, params = model.split(model.create(config.model, config.train.seed, compute_of(config)))
    return config, prep, graphdef, params, optim.make_optimizer(config.train, params)


def _available_bytes() -> tuple[int | None, int | None]:
    """(device memory limit, host memory available) in bytes; None where it cannot be read."""
    stats = jax.local_devices()[0].memory_stats() or {}
    host = None
    try:
        with open("/proc/meminfo") as f:
            host = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    return stats.get("bytes_limit") or host, host


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 1024**3:.1f} GiB" if n_bytes >= 1024**3 / 10 else f"{n_bytes / 1024**2:.1f} MiB"


def refuse_unless_fits(need: int, what: str, lower: str) -> None:
    """A UserError, before allocating, when `need` bytes (`what` needs them) exceed the device's memory limit (the
    host's available memory on a CPU): `lower` names the options to lower."""
    device, host = _available_bytes()
    limit = device if device is not None else host
    if limit is not None and need > limit:
        raise UserError(f"out of memory: {what}: about {_size(need)} needed, {_size(limit)} available; "
                        f"lower {lower}")


def check_memory(config: Config, n_devices: int = 0) -> None:
    """Refuse, before allocating, a model or a batch that cannot fit: a clear line instead of an allocator's
    failure (or, on a host that overcommits, the kernel's OOM killer).

    A device holds its shards of what --mesh's fsdp axis splits (parallel.fsdp_spec) and all of the rest; n_devices
    (default: every device) is what the mesh is laid over."""
    m, t = config.model, config.train
    shapes = jax.eval_shape(lambda: model.split(model.create(m, t.seed))[1])
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    fsdp = parallel.parse_mesh(t.mesh, n_devices or len(jax.devices()))["fsdp"]
    held = sum(math.prod(x.shape) // (fsdp if len(parallel.fsdp_spec(x.shape, fsdp)) else 1)
               for x in jax.tree.leaves(shapes))
    device, host = _available_bytes()
    if device is not None and 16 * held > device:  # float32 weights, gradients and AdamW's two moments
        where = f"a device's shards of them (fsdp:{fsdp})" if fsdp > 1 else "they"
        raise UserError(f"out of memory: the model has {n:,} parameters; {where} need {_size(16 * held)} for "
                        f"weights, gradients and AdamW state, and {_size(device)} is available: lower --n_embd, "
                        "--n_layer or --vocab_size, or shard them over several devices (--mesh=fsdp:N)")
    rows = max(t.gradient_accumulation_steps * t.batch_size, t.eval_iters * t.batch_size)
    batch = rows * (m.block_size + 1) * 16  # sampled indices, gathered tokens and the int32 copies
    if host is not None and batch > host:
        raise UserError(f"out of memory: a batch of {rows:,} x {m.block_size + 1} tokens (--batch_size x "
                        f"--gradient_accumulation_steps or --eval_iters) needs {_size(batch)} of host memory; "
                        f"{_size(host)} is available: lower --batch_size or --eval_iters")


def train(config: Config, force: bool = False, progress: bool = True) -> dict:
    """Train as the config says, writing config.json, metrics.jsonl, checkpoints and loss.png to out_dir.

    Every check of the input comes before anything is written. The run directory is locked while it trains.
    SIGINT/SIGTERM save the step reached and raise Stopped; a non-finite loss stops with a UserError, the last
    good checkpoint kept. A fresh run that fails before its first checkpoint leaves no run files behind.
    """
    t0 = time.perf_counter()
    saved = _prepare_out_dir(config, force)  # every process checks; only process 0 writes (after all have checked)
    parallel.sync("gptjax-out-dir-checked")
    lead = parallel.is_lead()
    out = config.train.out_dir
    made_dir = not os.path.exists(out)
    begun = []  # set once the new run writes its files: until then an old run that --force replaces is untouched
    aside = []  # the replaced run's moves (rundir.set_aside), until the new run has saved a checkpoint
    with rundir.run_lock(out) if lead else contextlib.nullcontext():
        try:
            return _train(config, saved, t0, progress and lead, replace=saved is None and force, begun=begun,
                          aside=aside)
        except BaseException as e:
            if lead and saved is None and not checkpoint.steps(out):  # a fresh run with nothing worth keeping
                if begun:
                    rundir.remove_run_files(out)
                if aside:  # the run --force was to replace comes back as it was
                    with contextlib.suppress(OSError):
                        rundir.put_back(aside)
                if made_dir:
                    shutil.rmtree(out, ignore_errors=True)
            expected = _expected_failure(e, out)
            if expected is not None:
                raise expected from None
            raise


def _train(config: Config, saved: Config | None, t0: float, progress: bool, replace: bool = False,
           begun: list | None = None, aside: list | None = None) -> dict:
    """train()'s work. replace: move the old run's files in out_dir aside (into `aside`), once every check has passed
    and just before the new run writes its own (`begun` gets an entry then); they are deleted when the new run has
    saved its first checkpoint, or when it ends."""
    aside = [] if aside is None else aside

    def drop_aside():
        if aside:
            rundir.drop_aside(aside)
            aside.clear()
    from tqdm import tqdm

    if saved is not None:  # resume: the run's own model and data (or --input's copy of it); this invocation's training
        data_config = dataclasses.replace(saved.data, input=config.data.input) if config.data.input else saved.data
        config = dataclasses.replace(saved, data=data_config, train=config.train)
        rundir.check_corpus(config.train.out_dir, data.prepare(config.data))
    config, prep, graphdef, params, tx = setup(config)
    if saved is not None:
        rundir.check_tokenizer(config.train.out_dir, prep)
    t, m = config.train, config.model
    out = t.out_dir
    layout = parallel.Layout(parallel.make_mesh(t.mesh, t.batch_size), t.step_impl)
    mesh, lead = layout.mesh, parallel.is_lead()
    state = optim.init_state(params, tx)
    state = jax.device_put(state, parallel.state_sharding(mesh, state))  # checkpoints restore into this layout
    if saved is not None and checkpoint.exists(out, "latest"):
        state = checkpoint.restore(out, "latest", state)
        if int(state.step) > t.max_iters:
            raise UserError(f"--max_iters={t.max_iters} is below {out}'s step {int(state.step)}: pass a larger "
                            "--max_iters to train further")
    elif saved is not None:  # stopped before its first checkpoint: nothing to keep but the settings
        if lead:
            print(f"resume: {out} has no checkpoint yet; starting its run over from step 0 with its saved settings")
    start = int(state.step)
    if lead:
        if replace:
            aside.extend(rundir.set_aside(out))
        if begun is not None:
            begun.append(True)
        rundir.keep_metrics_before(os.path.join(out, "metrics.jsonl"), start)
        rundir.write_json(os.path.join(out, "config.json"), config.to_dict())
        rundir.atomic_write(os.path.join(out, "tokenizer.json"),
                            open(os.path.join(prep.dir, "tokenizer.json")).read())
        rundir.write_json(os.path.join(out, "data.json"), prep.meta)

    train_tokens, val_tokens = prep.tokens("train"), prep.tokens("val")
    train_step = make_train_step(graphdef, tx, t, mesh, t.step_impl, state)
    estimate = make_estimate_loss(graphdef, mesh, state.params)
    eval_layout = parallel.Layout(mesh)  # estimates run the sharded jit on the global-form state, for every backend
    state = layout.place(state)
    dropout_key = jax.random.fold_in(jax.random.PRNGKey(t.seed), 1)
    A, B, T = t.gradient_accumulation_steps, t.batch_size, m.block_size
    tokens_per_step = A * B * T

    def batch(step):
        """Step's batch, sent to this process's devices at once (its own rows only): the copies overlap the step in
        flight."""
        starts = data.batch_starts(train_tokens, A * B, T, t.seed, step).reshape(A, B)
        return layout.batch((A, B, T), lambda lo, hi: data.windows(train_tokens, starts[:, lo:hi], T))

    def diverged(step: int, what: str) -> UserError:
        kept = checkpoint.resolve(out, "latest")
        keep = f"the last good checkpoint, {kept}, is kept" if kept else "no checkpoint was saved"
        return UserError(f"step {step}: {what} is not finite, so training stopped; {keep}. Lower --learning_rate "
                         "(or set --grad_clip) and train again")

    compute = compute_of(config)
    say = print if lead else (lambda *a, **k: None)  # only process 0 prints
    say(f"{m.model}: {model.num_params(params) / 1e6:.2f}M parameters, vocab {m.vocab_size}, "
          f"{prep.meta['train_tokens']:,} train / {prep.meta['val_tokens']:,} val tokens; "
          f"{t.step_impl} step on {parallel.describe_devices(mesh)}" + (
              f"; {compute.dtype}, {compute.attention} attention, layers "
              f"{'scanned' if compute.scan else 'unrolled'}{', remat per block' if compute.remat else ''}"
              if m.model == "gpt" else ""))
    saved_step = start  # the step of the newest checkpoint this process can rely on
    history = []
    compile_s = None
    bar = tqdm(total=t.max_iters, initial=start, disable=not progress, dynamic_ncols=True, mininterval=0.5)
    write = bar.write if lead else say
    prev = None  # last step's metrics: fetched a step late so the host never waits on the step just queued
    interval_start, interval_steps = time.perf_counter(), 0
    try:
        x, y = batch(start)
        with _StopOnSignal() as stop:
            for step in range(start, t.max_iters + 1):
                if stop.signum is not None:
                    jax.block_until_ready(state)
                    if step > saved_step:
                        checkpoint.save(out, step, layout.canonical(state), keep=t.keep_checkpoints)
                        drop_aside()
                    where = checkpoint.resolve(out, "latest") or "nothing (no step finished)"
                    raise Stopped(f"{signal.Signals(stop.signum).name} at step {step}: saved {where}; continue with "
                                  f"gptjax train --init_from=resume --out_dir={out}", 128 + stop.signum)
                if step % t.eval_interval == 0 or step == t.max_iters:
                    jax.block_until_ready(state)
                    elapsed = time.perf_counter() - interval_start
                    tps = interval_steps * tokens_per_step / elapsed if interval_steps else 0.0
                    canon = layout.canonical(state)
                    losses = {s: float(estimate(canon.params, *eval_batches(tok, t, T, s, step, eval_layout)))
                              for s, tok in (("train", train_tokens), ("val", val_tokens))}
                    for s, v in losses.items():
                        if not math.isfinite(v):
                            raise diverged(step, f"the estimated {s} loss ({v})")
                    row = {"step": step, "train_loss": losses["train"], "val_loss": losses["val"],
                           "lr": float(optim.lr_schedule(t)(step)), "tokens_per_sec": tps,
                           "elapsed_s": time.perf_counter() - t0}
                    history.append(row)
                    if lead:
                        with open(os.path.join(out, "metrics.jsonl"), "a") as f:
                            f.write(json.dumps(row) + "\n")
                    write(f"step {step}: train loss {row['train_loss']:.4f}, val loss {row['val_loss']:.4f}, "
                              f"{tps:,.0f} tokens/s")
                    if step > start:
                        improved = losses["val"] < float(canon.best_val_loss)
                        if improved:
                            # Placed like the old value: an array committed elsewhere would recompile the step.
                            best = jax.device_put(np.float32(losses["val"]), canon.best_val_loss.sharding)
                            canon = canon._replace(best_val_loss=best)
                            state = layout.place(canon)
                        checkpoint.save(out, step, canon, keep=t.keep_checkpoints, best=improved)
                        drop_aside()
                        saved_step = step
                    interval_start, interval_steps = time.perf_counter(), 0
                if step == t.max_iters:
                    break
                if compile_s is None:
                    tick = time.perf_counter()
                    state, metrics = train_step(state, x, y, dropout_key)
                    jax.block_until_ready(metrics)
                    compile_s = time.perf_counter() - tick
                    write(f"compiled the train step in {compile_s:.1f} s (first call, including one step)")
                    interval_start = time.perf_counter()
                else:
                    state, metrics = train_step(state, x, y, dropout_key)
                    interval_steps += 1
                x, y = batch(step + 1)  # sampled on the host while the device works
                if prev is not None:
                    loss, norm = parallel.first(prev["loss"]), parallel.first(prev["grad_norm"])
                    for what, v in (("the loss", loss), ("the gradient norm", norm)):
                        if not math.isfinite(v):
                            raise diverged(step - 1, f"{what} ({v})")
                    if step % t.log_interval == 0:
                        rate = interval_steps * tokens_per_step / max(time.perf_counter() - interval_start, 1e-9)
                        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}", refresh=False)
                prev = metrics
                bar.update(1)
    finally:
        bar.close()
    jax.block_until_ready(state)
    drop_aside()
    wall = time.perf_counter() - t0
    if lead:
        rundir.plot_metrics(os.path.join(out, "metrics.jsonl"), os.path.join(out, "loss.png"))
    summary = {"steps": t.max_iters - start, "wall_s": wall, "compile_s": compile_s, "last": history[-1],
               "best_val_loss": parallel.first(layout.canonical(state).best_val_loss), "out_dir": out}
    say(f"done: {summary['steps']} steps in {wall:.1f} s wall; val loss {history[-1]['val_loss']:.4f} "
          f"(best {summary['best_val_loss']:.4f}); checkpoints in {checkpoint.root(out)}")
    return summary


def evaluate(out_dir: str, split: str = "val", batch_size: int = 0, input_path: str = "",
             which: str | int = "best", dtype: str = "float32", mesh: str = "") -> dict:
    """Exact loss of a run's checkpoint `which` (best by default) over a whole split, in nats/token and bits/char.

    input_path replaces the run's corpus file (e.g. for a run imported without one). dtype float32 (default) gives
    the figure to report; bfloat16 (or auto) runs the matmuls as a bfloat16 run trains. mesh: as train's --mesh
    (the batches split over its data axes, the parameters sharded over fsdp); default every device on dp.
    """
    check_range("eval_batch_size", batch_size, "batch_size")
    config, graphdef, params = rundir.load_run(out_dir, which, dtype=dtype, attention="auto", scan_layers=True)
    data_config = dataclasses.replace(config.data, input=input_path) if input_path else config.data
    prep = data.prepare(data_config)
    if not input_path:
        rundir.check_corpus(out_dir, prep)
    rundir.check_tokenizer(out_dir, prep)
    tokens = prep.tokens(split)
    m, windows = config.model, -(-(len(tokens) - 1) // config.model.block_size)
    n = jax.device_count()  # more rows than windows would be padding: cap it, still dividing over the devices
    batch_size = min(batch_size or config.train.batch_size, -(-windows // n) * n)
    # The split's inputs, targets and mask, and one batch's logits, log-sum-exp and activations, in float32.
    refuse_unless_fits(12 * len(tokens) + 4 * batch_size * m.block_size * (3 * m.vocab_size + 16 * m.n_embd),
                       f"eval over {len(tokens):,} tokens in batches of {batch_size:,} x {m.block_size}",
                       "--batch_size")
    mesh = parallel.make_mesh(mesh, batch_size)
    nats, n = exact_loss(graphdef, params, tokens, config.model.block_size, batch_size, mesh)
    tok = prep.tokenizer()
    chars = prep.meta[f"{split}_chars"] - len(tok.decode([int(tokens[0])]))  # the first token is never predicted
    return {"split": split, "tokens": n, "loss": nats / n, "bits_per_char": nats / math.log(2) / chars,
            "chars": chars, "batch_size": batch_size, "mesh": parallel.describe_devices(mesh)}

