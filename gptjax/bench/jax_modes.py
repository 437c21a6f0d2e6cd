"""The JAX modes: jax_jit (train's jitted step on one device), jax_jit_dp (split over every device, as `train`
runs it on a CPU host) and jax_eager (the same functions op by op under jax.disable_jit())."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING, ClassVar

from gptjax.bench.protocol import Mode, Result
from gptjax.bench.timing import n_calls, time_calls

if TYPE_CHECKING:
    from gptjax.compute import Compute


@dataclasses.dataclass(frozen=True)
class JaxMode(Mode):
    """gptjax's own functions under JAX: train's step, the eval loss, sample.generate."""

    jit: bool = True  # False: op by op under jax.disable_jit()

    framework: ClassVar[str] = "jax"

    def run(self, spec: dict) -> Result:
        return _run(self, spec)


MODES = (
    JaxMode("jax_jit", one_device=True),
    JaxMode("jax_jit_dp", data_parallel=True),
    JaxMode("jax_eager", one_device=True, jit=False, steps_option="eager_steps"),  # hundreds of times slower
)


def load_params(c, path: str, compute: Compute):
    """The initial weights the runner saved (nanoGPT names -> arrays), as gptjax's parameter pytree, and the
    graphdef that runs them as `compute` (parameters are float32 and per-layer whatever it is)."""
    import jax.numpy as jnp
    import numpy as np

    from gptjax import model

    like = model.abstract_params(c)
    with np.load(path) as f:
        named = {k: jnp.asarray(f[k]) for k in f.files}
    return model.graphdef_for(c, compute), model.params_from_names(like, named)


def _run(mode: JaxMode, spec: dict) -> Result:
    # The framework is imported in the mode's own process only: the runner reads the table without starting it.
    from importlib import metadata, util

    import jax
    import jax.numpy as jnp
    import numpy as np

    from gptjax import evaluate, kernels, optim, parallel, sample, train
    from gptjax.compute import Compute, compute_of
    from gptjax.config import Config

    config = Config.from_dict(spec["config"])
    c, t = config.model, config.train
    workload, sampler = spec["workload"], spec.get("sampler")
    eager = not mode.jit
    devices = jax.devices() if mode.data_parallel else jax.devices()[:1]
    compute = compute_of(config) if c.model == "gpt" else Compute()
    graphdef, params = load_params(c, spec["params"], compute)
    n = n_calls(spec["steps"], spec["warmup"], spec["repeats"])
    x_NABT, y_NABT = np.load(spec["x"])[:n], np.load(spec["y"])[:n]
    A, B, T = x_NABT.shape[1:]
    pending, param_bytes = {}, None

    impl = t.step_impl if mode.data_parallel else "sharded"
    if workload == "train":
        # jax_jit_dp: train's --mesh and --step_impl; jax_jit: one device
        mesh = None if eager else parallel.make_mesh(t.mesh if mode.data_parallel else "", B, devices)
        tx = optim.make_optimizer(t, params)
        state = optim.init_state(params, tx)
        if mesh is None:
            step_fn = train.make_train_step(graphdef, tx, t)
            xs, ys = jax.device_put(list(x_NABT), devices[0]), jax.device_put(list(y_NABT), devices[0])
        else:
            layout = parallel.Layout(mesh, impl)
            step_fn = train.make_train_step(graphdef, tx, t, mesh, impl, state)
            state = layout.place(jax.device_put(state, parallel.state_sharding(mesh, state)))
            pairs = [layout.batch(x.shape, lambda lo, hi, x=x, y=y: (x[:, lo:hi], y[:, lo:hi]))
                     for x, y in zip(x_NABT, y_NABT)]
            xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
            param_bytes = parallel.param_bytes_per_device(state.params)  # pmap: a whole copy per device
        key = jax.random.fold_in(jax.random.PRNGKey(t.seed), 1)  # train's dropout key
        pending["state"] = state

        def call(i):
            pending["state"], metrics = step_fn(pending["state"], xs[i], ys[i], key)
            pending["out"] = metrics["loss"]
            return metrics["loss"]

        tokens_per_call = A * B * T
    elif workload == "forward":
        mesh = None if eager else parallel.data_mesh(B, devices)

        def forward(p, x_BT, y_BT):
            with kernels.split_over(mesh):  # the matmul kernel splits over the devices as XLA's dots do
                return evaluate.loss_fn(graphdef, p, x_BT, y_BT)

        if mesh is None:
            fwd, place = jax.jit(forward), devices[0]
        else:
            place, rep = parallel.batch_sharding(mesh, 0), parallel.replicated(mesh)
            fwd = jax.jit(forward, in_shardings=(rep, place, place), out_shardings=rep)
            params = jax.device_put(params, rep)
        xs, ys = jax.device_put(list(x_NABT[:, 0]), place), jax.device_put(list(y_NABT[:, 0]), place)

        def call(i):
            pending["out"] = fwd(params, xs[i], ys[i])
            return pending["out"]

        tokens_per_call = B * T
    else:  # generate: B sequences of max_new_tokens from each batch row's first token
        L = spec["max_new_tokens"]
        mesh = parallel.data_mesh(B, devices)
        prompt_NP = jax.device_put(x_NABT[0, 0, :, :1], parallel.batch_sharding(mesh, 0))
        params = jax.device_put(params, parallel.replicated(mesh))
        base = jax.random.PRNGKey(spec["seed"])

        def call(i):
            with kernels.split_over(mesh):  # read when generate is traced, at the first call
                pending["out"] = sample.generate(graphdef, c.block_size, L, None, params, prompt_NP,
                                                 jax.random.fold_in(base, i), jnp.float32(1.0),
                                                 kv_cache=sampler == "kv")
            return None

        tokens_per_call = B * L

    def sync():
        jax.block_until_ready(pending)

    with jax.disable_jit() if eager else contextlib.nullcontext():
        first, runs, outs = time_calls(call, sync, spec["steps"], spec["warmup"], spec["repeats"],
                                         sync_each=workload != "train")
    dev = jax.devices()[0]
    stats = [d.memory_stats() or {} for d in devices]
    peak = max((s.get("peak_bytes_in_use", 0) for s in stats), default=0) or None
    return Result(
        first_call_s=first, step_s_runs=runs, tokens_per_call=tokens_per_call,
        losses=None if workload == "generate" else [float(np.ravel(o)[0]) for o in outs],  # pmap: per device
        device=dev.device_kind if dev.platform != "cpu" else "cpu", platform=dev.platform,
        devices=1 if mesh is None else mesh.size,  # the devices that divide the batch, as train splits it
        mesh=None if mesh is None else parallel.describe_mesh(mesh), step_impl=impl if mesh is not None else None,
        param_bytes_per_device=param_bytes,
        dtype=compute.dtype, matmul=compute.matmul, peak_mem_bytes=peak,
        peak_mem_source="jax memory_stats peak_bytes_in_use" if peak else None,
        versions={p: metadata.version(p) for p in ("jax", "jaxlib", "flax", "optax", "numpy")} | (
            {"mkl": metadata.version("mkl")} if compute.matmul == "mkl" and util.find_spec("mkl") else {}),
        threads=None, detail=describe(eager, compute if c.model == "gpt" else None, workload, sampler, impl)
        + (f", mesh {parallel.describe_mesh(mesh)}" if mesh is not None and mode.data_parallel else ""),
    )


def describe(eager: bool, compute: Compute | None, workload: str, sampler: str | None,
             impl: str = "sharded") -> str:
    """The record's detail: how the mode ran; compute None for the bigram."""
    parts = ["jax.disable_jit()" if eager else "jax.jit" if impl == "sharded" else f"jax.{impl}"]
    if compute is not None:
        parts.append(f"{compute.attention} attention")
        parts += ["scan over layers"] * compute.scan + ["remat per block"] * compute.remat
    if workload == "generate":
        parts.append("re-forward of the window per token (the bigram has no KV cache)" if compute is None
                     else "KV cache: prefill, then one token per step" if sampler == "kv"
                     else "re-forward of the block_size window per token")
    return ", ".join(parts)
