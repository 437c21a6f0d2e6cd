"""How well a model does: the loss it trains on, loss estimates on random batches, exact evaluation over a whole
split (`gptjax eval`); and `setup`, the data, model and optimizer of a config, with its memory pre-flight."""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import numpy as np

from gptjax import data, kernels, model, optim, parallel, rundir
from gptjax.compute import compute_of
from gptjax.config import Config, TrainConfig, check_range
from gptjax.errors import UserError
from gptjax.weights import hf


def loss_fn(graphdef, params, x_BT, y_BT, key=None):
    """The training loss of one batch: mean next-token cross-entropy (dropout on, with a key)."""
    return model.cross_entropy(model.apply(graphdef, params, x_BT, key), y_BT)


def make_estimate_loss(graphdef, mesh=None, params_like=None):
    """jit(params, x_NBT, y_NBT) -> mean loss over N batches, in one device call; with a mesh, the batches split
    over its data axes and the params laid out as parallel.state_sharding (replicated if params_like is None)."""

    def estimate(params, x_NBT, y_NBT):
        with kernels.split_over(mesh):
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


class TokenReader:
    """A token file read by pread, a slice at a time: unlike a memmap, the pages read never count in the process's
    resident memory, which stays that of one batch however long the split."""

    def __init__(self, path: str, dtype: str):
        self.dtype = np.dtype(dtype)
        self.fd = os.open(path, os.O_RDONLY)
        self.n = os.fstat(self.fd).st_size // self.dtype.itemsize

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        start, stop, step = i.indices(self.n) if isinstance(i, slice) else (i % self.n, i % self.n + 1, 1)
        assert step == 1, "a TokenReader reads consecutive tokens"
        size = max(stop - start, 0) * self.dtype.itemsize
        out = np.frombuffer(os.pread(self.fd, size, start * self.dtype.itemsize), self.dtype)
        return out if isinstance(i, slice) else out[0]

    def __del__(self):
        os.close(self.fd)


def exact_loss(graphdef, params, tokens: np.ndarray, block_size: int, batch_size: int,
               mesh=None) -> tuple[float, int]:
    """Summed nats over every next-token prediction of `tokens`, in consecutive windows of block_size; (nats, n).
    Memory bounded by one batch, whatever the length of `tokens`.

    With a mesh, each batch splits over its data axes and the params are laid out as parallel.state_sharding."""

    def nll_sum(params, x_BT, y_BT, mask_BT):
        with kernels.split_over(mesh):
            return (model.token_nll(model.apply(graphdef, params, x_BT), y_BT) * mask_BT).sum()

    if mesh is None:
        nll_sum = jax.jit(nll_sum)
    else:
        params_sh, rows = parallel.state_sharding(mesh, params), parallel.batch_sharding(mesh, 0)
        params = jax.device_put(params, params_sh)
        nll_sum = jax.jit(nll_sum, in_shardings=(params_sh, rows, rows, rows), out_shardings=parallel.replicated(mesh))

    n = len(tokens) - 1
    windows = -(-n // block_size)
    total = 0.0
    for i in range(0, windows, batch_size):  # one batch's windows read from the (memory-mapped) tokens at a time
        seg = np.asarray(tokens[i * block_size:(i + batch_size) * block_size + 1], np.int32)
        m = len(seg) - 1  # predictions in this batch; the rest of its rows (the last batch) are padding
        x, y, mask = (np.zeros(batch_size * block_size, dt) for dt in (np.int32, np.int32, np.float32))
        x[:m], y[:m], mask[:m] = seg[:-1], seg[1:], 1.0
        shape = (batch_size, block_size)  # one compiled shape serves every batch
        total += float(nll_sum(params, x.reshape(shape), y.reshape(shape), mask.reshape(shape)))
    return total, n


def estimate_graphdef(config: Config, device=None):
    """The loss estimates' model: the training settings without dropout, which opens the fastest attention to them
    (cuDNN's on a GPU in bfloat16, where training with attention dropout runs the einsum path). On a CPU it is the
    training graphdef's equal. `config.model.vocab_size` resolved (setup's config)."""
    return model.graphdef_for(config.model, compute_of(config, training=False, device=device))


def make_estimate(config: Config, mesh=None, params_like=None, device=None):
    """The loss estimate `train` runs (make_estimate_loss on estimate_graphdef); gptjax.bench.inspect compiles it."""
    return make_estimate_loss(estimate_graphdef(config, device), mesh, params_like)


def setup(config: Config, prep: data.Prepared | None = None):
    """Data, model and optimizer for a config: (config with vocab_size, prepared data, graphdef, params, tx); `prep`:
    its data, if already prepared."""
    prep = prep or data.prepare(config.data)
    vocab = config.model.vocab_size or prep.meta["vocab_size"]
    if vocab < prep.meta["vocab_size"]:
        raise UserError(f"vocab_size={vocab} (--vocab_size, or a resumed run's own) is smaller than the tokenizer's "
                        f"{prep.meta['vocab_size']}: pass a larger --vocab_size, or 0 to take the tokenizer's")
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=vocab))
    for split in data.SPLITS:
        data.check_fits(prep.tokens(split), config.model.block_size, split)
    check_memory(config)
    if hf.is_pretrained(config.train.init_from):  # config is hf.pretrained_config's: the file's model
        graphdef, params = model.graphdef_for(config.model, compute_of(config)), hf.load_params(
            config.train.init_from, config.model)
    else:
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


def evaluate(out_dir: str, split: str = "val", batch_size: int = 0, input_path: str = "",
             which: str | int = "best", dtype: str = "float32", mesh: str = "", init_from: str = "") -> dict:
    """Exact loss of a run's checkpoint `which` (best by default) over a whole split, in nats/token and bits/char.

    input_path replaces the run's corpus file (e.g. for a run imported without one). dtype float32 (default) gives
    the figure to report; bfloat16 (or auto) runs the matmuls as a bfloat16 run trains. mesh: as train's --mesh
    (the batches split over its data axes, the parameters sharded over fsdp); default every device on dp.
    init_from: a pretrained GPT-2 (hf.locate's names) instead of a run, on input_path (default tiny Shakespeare) in
    GPT-2's tokens, in batches of 8 unless batch_size says otherwise.
    """
    check_range("eval_batch_size", batch_size, "batch_size")
    compute = {"dtype": dtype, "attention": "auto", "scan_layers": True}
    if init_from:
        config, graphdef, params, tok = hf.load_model(init_from, **compute)
        if tok.name != "gpt2":
            raise UserError(f"--init_from={init_from} holds a {tok.name} vocabulary, not GPT-2's: import it (gptjax "
                            "import --from=hf) and evaluate that run")
        batch_size = batch_size or 8
    else:
        config, graphdef, params = rundir.load_run(out_dir, which, **compute)
    data_config = dataclasses.replace(config.data, input=input_path) if input_path else config.data
    prep = data.prepare(data_config)
    if not init_from:
        if not input_path:
            rundir.check_corpus(out_dir, prep)
        rundir.check_tokenizer(out_dir, prep)
    tokens = TokenReader(os.path.join(prep.dir, f"{split}.bin"), prep.meta["dtype"])
    m, windows = config.model, -(-(len(tokens) - 1) // config.model.block_size)
    n = jax.device_count()  # more rows than windows would be padding: cap it, still dividing over the devices
    batch_size = min(batch_size or config.train.batch_size, -(-windows // n) * n)
    # One batch's inputs, targets and mask, and its logits, log-sum-exp and activations, in float32: the split itself
    # stays on disk, read a batch at a time.
    refuse_unless_fits(4 * batch_size * m.block_size * (3 + 3 * m.vocab_size + 16 * m.n_embd),
                       f"eval over {len(tokens):,} tokens in batches of {batch_size:,} x {m.block_size}",
                       "--batch_size")
    mesh = parallel.make_mesh(mesh, batch_size)
    nats, n = exact_loss(graphdef, params, tokens, config.model.block_size, batch_size, mesh)
    tok = prep.tokenizer()
    chars = prep.meta[f"{split}_chars"] - len(tok.decode([int(tokens[0])]))  # the first token is never predicted
    return {"split": split, "tokens": n, "loss": nats / n, "bits_per_char": nats / math.log(2) / chars,
            "chars": chars, "batch_size": batch_size, "mesh": parallel.describe_devices(mesh)}

