"""A training run's life in its directory: checked and claimed, locked, resumed (its saved config read once and merged),
its files written, metrics logged, checkpoints saved (keep-N and best), stopped by a signal, and cleaned up if a fresh
run fails. The files themselves: rundir.py; the checkpoints: checkpoint.py; the loop that drives a Run: train.py."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Iterator

import jax
import numpy as np

from gptjax import checkpoint, data, distributed, rundir, sinks, writes
from gptjax.config import Config, expand_path, resumed
from gptjax.errors import Stopped, UserError


class Run:
    """One `train` call's run directory, from Run.open to the end of its with-block. Only process 0 writes."""

    def __init__(self, config: Config, resume: bool, force: bool):
        self.config = config  # on a resume, the saved model and data with this call's training settings
        self.out = config.train.out_dir
        self.resume = resume
        self.replace = force and not resume  # a run already in out_dir is moved aside, then deleted
        self.lead = distributed.is_lead()
        self.made_dir = not os.path.exists(self.out)
        self.begun = False  # the run's files are being written: until then an old run --force replaces is untouched
        self.aside: list[tuple[str, str]] = []  # the replaced run's moves, until the new run saves a checkpoint
        self.start = self.saved_step = 0  # the step the run goes on from; that of its newest checkpoint
        self.sinks: list = []

    @classmethod
    @contextlib.contextmanager
    def open(cls, config: Config, force: bool = False) -> Iterator[Run]:
        """Check out_dir on every process before anything is written, then hold its lock (process 0) for the block.

        A failure inside the block leaves a fresh run's directory as it was (a run --force was replacing is put
        back), and a failure of the machine (memory, a full or read-only disk) becomes one UserError."""
        saved = _check(config, force)
        distributed.sync("gptjax-out-dir-checked")
        if saved is not None:  # the run's own model and data (or --input's copy of it); this call's training
            data_config = dataclasses.replace(saved.data, input=config.data.input) if config.data.input else saved.data
            train = config.train
            if saved.train.init_from not in ("scratch", "resume") and not checkpoint.exists(train.out_dir, "latest"):
                train = dataclasses.replace(train, init_from=saved.train.init_from)  # start over from its weights
            config = dataclasses.replace(saved, data=data_config, train=train)
        run = cls(config, saved is not None, force)
        with rundir.run_lock(run.out) if run.lead else contextlib.nullcontext():
            try:
                yield run
            except BaseException as e:
                run.close_sinks(failed=True)  # before the clean-up removes their files; never raises
                run._clean_up()
                expected = _expected_failure(e, run.out)
                if expected is not None:
                    raise expected from None
                raise

    def check_data(self, prep: data.Prepared) -> None:
        """A resumed run must go on with the corpus and the tokenizer it was trained on."""
        if self.resume:
            rundir.check_corpus(self.out, prep)
            rundir.check_tokenizer(self.out, prep)

    def begin(self, config: Config, prep: data.Prepared, state):
        """Restore a resumed run's latest checkpoint into `state`'s layout; then write the run's files: config.json
        (`config`, its vocab_size resolved), tokenizer.json, data.json, metrics.jsonl cut back to the step it goes on
        from; then open the metrics sinks (sinks.py). Returns the state to train."""
        self.config, out, t = config, self.out, config.train
        if self.resume and checkpoint.exists(out, "latest"):
            state = checkpoint.restore(out, "latest", state)
            if int(state.step) > t.max_iters:
                raise UserError(f"--max_iters={t.max_iters} is below {out}'s step {int(state.step)}: pass a larger "
                                "--max_iters to train further")
        elif self.resume and self.lead:  # stopped before its first checkpoint: nothing to keep but the settings
            print(f"resume: {out} has no checkpoint yet; starting its run over from step 0 with its saved settings")
        self.start = self.saved_step = int(state.step)
        if self.lead:
            if self.replace:
                self.aside = rundir.set_aside(out)
            self.begun = True
            rundir.keep_metrics_before(os.path.join(out, "metrics.jsonl"), self.start)
            rundir.write_json(os.path.join(out, "config.json"), config.to_dict())
            with open(os.path.join(prep.dir, "tokenizer.json")) as f:
                writes.atomic_write(os.path.join(out, "tokenizer.json"), f.read())
            rundir.write_json(os.path.join(out, "data.json"), prep.meta)
            self.sinks = sinks.open_sinks(config, out, self.resume)
        return state

    def log(self, row: dict) -> None:
        """One evaluation's row to each sink: metrics.jsonl, and TensorBoard or W&B if asked for (process 0)."""
        for sink in self.sinks:
            sink.write(row)

    def save(self, step: int, state, val_loss: float | None = None):
        """Checkpoint `state` (the canonical, global form) at `step`, keeping the newest keep_checkpoints; with
        val_loss, as the best one too if it beats the best so far. Returns the state, its best_val_loss updated."""
        best = val_loss is not None and val_loss < float(state.best_val_loss)
        if best:  # placed like the old value: an array committed elsewhere would recompile the step
            state = state._replace(best_val_loss=jax.device_put(np.float32(val_loss), state.best_val_loss.sharding))
        checkpoint.save(self.out, step, state, keep=self.config.train.keep_checkpoints, best=best)
        self._drop_aside()
        self.saved_step = step
        return state

    def stopped(self, signum: int, step: int, state) -> Stopped:
        """A signal asked the run to stop at `step`: save it (unless saved already) and say how to go on."""
        jax.block_until_ready(state)
        if step > self.saved_step:
            checkpoint.save(self.out, step, state, keep=self.config.train.keep_checkpoints)
            self._drop_aside()
        where = checkpoint.resolve(self.out, "latest") or "nothing (no step finished)"
        return Stopped(f"{signal.Signals(signum).name} at step {step}: saved {where}; continue with "
                       f"gptjax train --init_from=resume --out_dir={self.out}", 128 + signum)

    def diverged(self, step: int, what: str) -> UserError:
        kept = checkpoint.resolve(self.out, "latest")
        keep = f"the last good checkpoint, {kept}, is kept" if kept else "no checkpoint was saved"
        return UserError(f"step {step}: {what} is not finite, so training stopped; {keep}. Lower --learning_rate "
                         "(or set --grad_clip) and train again")

    def finish(self) -> None:
        """Training reached max_iters: close the sinks, drop a replaced run, plot the losses to loss.png."""
        self.close_sinks()
        self._drop_aside()
        if self.lead:
            rundir.plot_metrics(os.path.join(self.out, "metrics.jsonl"), os.path.join(self.out, "loss.png"))

    def close_sinks(self, failed: bool = False) -> None:
        open_, self.sinks = self.sinks, []
        sinks.close_sinks(open_, failed)

    def _drop_aside(self) -> None:
        if self.aside:
            rundir.drop_aside(self.aside)
            self.aside = []

    def _clean_up(self) -> None:
        """A fresh run that failed with no checkpoint leaves nothing behind, and the run it replaced comes back."""
        if not self.lead or self.resume or checkpoint.steps(self.out):
            return
        if self.begun:
            rundir.remove_run_files(self.out)
        if self.aside:
            with contextlib.suppress(OSError):
                rundir.put_back(self.aside)
        if self.made_dir:
            shutil.rmtree(self.out, ignore_errors=True)


def resume_config(overrides: dict, default_out_dir: str) -> tuple[Config, list[str]]:
    """--init_from=resume: the saved config of the run in --out_dir, with only `overrides` changed.

    Returns the config and one "key: old -> new" line per setting the overrides changed.
    """
    out = expand_path(overrides.get("out_dir", default_out_dir))
    rundir.check_out_dir(out)
    config, changes = resumed(_saved(out), {**overrides, "out_dir": out, "init_from": "resume"}, where=out)
    return config, [c for c in changes if not c.startswith(("out_dir:", "init_from:"))]


def _saved(out: str) -> Config:
    saved = rundir.saved_config(out)
    if saved is None:
        raise UserError(f"--init_from=resume: {out} holds no run to resume; train there from scratch first")
    return saved


def _check(config: Config, force: bool) -> Config | None:
    """Check out_dir before anything is written; for a resume, return the saved config."""
    out = config.train.out_dir
    sinks.check(config.train)
    rundir.check_writable(out)
    if config.train.init_from == "resume":
        rundir.read_metrics(os.path.join(out, "metrics.jsonl"))  # a line that is not a row: refused before any work
        return _saved(out)
    rundir.claim_out_dir(out, force, "continue it with --init_from=resume, pick another --out_dir, or pass --force "
                         "to replace it", remove=False)
    return None


class StopOnSignal:
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
    write = write_error(e)
    if write is not None:
        return UserError(f"cannot write the run in {out}: {write.strerror} ({write.filename or out}); free space or "
                         "pick another --out_dir, then continue with --init_from=resume")
    return None


WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


def write_error(e: BaseException | None) -> OSError | None:
    """The OSError of a failed write behind e: e itself, its cause or context (orbax re-raises in its own types),
    or one named only in a message ("[Errno 28] No space left on device: 'PATH'")."""
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
