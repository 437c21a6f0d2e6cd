"""The PyTorch modes: the twin in gptjax/reference/ with nanoGPT's loop, eager (torch_eager), wrapped in
torch.compile (torch_compile: inductor, default mode), or nanoGPT's fast path (torch_fast: torch.compile with
F.scaled_dot_product_attention). Under bfloat16 every mode runs the forward pass and loss under torch.autocast,
parameters and optimizer in float32, as nanoGPT's train.py does."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import TYPE_CHECKING, Any, ClassVar

from gptjax.bench.protocol import Mode, Result
from gptjax.bench.timing import n_calls, time_calls
from gptjax.errors import UserError

if TYPE_CHECKING:
    from gptjax.config import ModelConfig

COMPILE_MODE = "inductor, mode=default"


@dataclasses.dataclass(frozen=True)
class TorchMode(Mode):
    """The PyTorch twin with nanoGPT's loop."""

    compiled: bool = False  # wrapped in torch.compile (COMPILE_MODE)
    sdpa: bool = False  # attention by F.scaled_dot_product_attention, not the explicit softmax

    framework: ClassVar[str] = "torch"
    package: ClassVar[str] = "torch"
    missing: ClassVar[str] = "the torch_* modes need PyTorch: pip install 'gptjax[torch]', or pass --modes=jax_jit,..."
    label: ClassVar[str] = ""  # the record's detail starts with it: the module, when it is not the twin

    def env(self, tmp: str) -> dict[str, str]:
        # An empty inductor cache for every compiled process, so its first call is a cold compile, as JAX's is.
        return {"TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="inductor-", dir=tmp)} if self.compiled else {}

    def prepare(self, c: ModelConfig, params: Any, tmp: str) -> dict[str, str]:
        """The initial weights as the twin's state dict (twin.pt)."""
        import torch

        from gptjax.reference import convert

        if c.model != "gpt":
            raise UserError("the torch_* modes bench the GPT twin: use --modes=jax_jit,jax_jit_dp,jax_eager for "
                            "the bigram")
        path = os.path.join(tmp, "twin.pt")
        torch.save(convert.to_torch_state_dict(params, c), path)
        return {"torch_state": path}

    def build(self, c: ModelConfig, spec: dict):
        """The module nanoGPT's loop drives, holding the initial weights: the twin."""
        import torch

        from gptjax.reference.nanogpt import GPT

        twin = GPT(c, sdpa=self.sdpa)
        twin.load_state_dict(torch.load(spec["torch_state"], weights_only=True))
        return twin

    def run(self, spec: dict) -> Result:
        return _run(self, spec)


MODES = (
    TorchMode("torch_eager"),
    TorchMode("torch_compile", note="both explicit attention", compiled=True),
    TorchMode("torch_fast", note="torch.compile + F.scaled_dot_product_attention; nanoGPT's fast path",
              compiled=True, sdpa=True),
)


def generate(forward, idx, max_new_tokens: int, block_size: int, generator):
    """nanoGPT's GPT.generate (crop to block_size, re-run the window, sample) through `forward`, which may be the
    compiled module: nanoGPT's own generate would call the uncompiled one."""
    import torch

    from gptjax.reference.nanogpt import next_token_probs

    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits, _ = forward(idx[:, -block_size:])
            probs = next_token_probs(logits[:, -1, :], 1.0, None)
            idx = torch.cat((idx, torch.multinomial(probs, num_samples=1, generator=generator)), dim=1)
    return idx


def resolve_dtype(dtype: str, cuda: bool) -> str:
    """auto: bfloat16 on a GPU that runs it at full speed (compute capability 8.0 or later), as JAX's auto."""
    if dtype != "auto":
        return dtype
    import torch

    return "bfloat16" if cuda and torch.cuda.get_device_capability() >= (8, 0) else "float32"


def autocast(fn, device_type: str, dtype: str):
    """fn run under torch.autocast(device_type, bfloat16) when dtype is bfloat16 (nanoGPT's ctx); else fn."""
    if dtype == "float32":
        return fn
    import torch

    def run(*args, **kwargs):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return fn(*args, **kwargs)

    return run


def describe(mode: TorchMode, dtype: str, workload: str, sampler: str | None) -> str:
    """The record's detail: how the mode ran."""
    parts = [mode.label] if mode.label else []
    parts.append(f"torch.compile ({COMPILE_MODE})" if mode.compiled else "eager")
    if mode.sdpa:
        parts.append("SDPA attention")
    if dtype == "bfloat16":
        parts.append("autocast bfloat16")
    if workload == "generate":
        parts.append("KV cache: prefill, then one token per step" + (
            " (decode step compiled, dynamic=True)" if mode.compiled else "")
            if sampler == "kv" else "re-forward of the window per token")
    return ", ".join(parts)


def _run(mode: TorchMode, spec: dict) -> Result:
    from importlib import metadata

    import numpy as np
    import torch

    from gptjax.config import Config
    from gptjax.parallel import cores
    from gptjax.reference.nanogpt import configure_optimizers, train_step

    config = Config.from_dict(spec["config"])
    c, t = config.model, config.train
    workload, sampler = spec["workload"], spec.get("sampler")
    torch.set_num_threads(cores())
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:  # as nanoGPT's train.py: TF32 matmuls and convolutions
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = resolve_dtype(t.dtype, cuda)
    twin = mode.build(c, spec)
    twin.to(device)
    compiled = mode.compiled
    net = autocast(torch.compile(twin) if compiled else twin, device.type, dtype)
    n = n_calls(spec["steps"], spec["warmup"], spec["repeats"])
    x_NABT = torch.from_numpy(np.load(spec["x"])[:n].astype(np.int64)).to(device)
    y_NABT = torch.from_numpy(np.load(spec["y"])[:n].astype(np.int64)).to(device)
    A, B, T = x_NABT.shape[1:]
    pending = {}

    if workload == "train":
        # nanoGPT's optimizer: fused AdamW on CUDA, PyTorch's default (foreach) implementation on a CPU.
        opt = configure_optimizers(twin, t, foreach=None, fused=cuda)
        twin.train()

        def call(i):
            return train_step(twin, opt, x_NABT[i], y_NABT[i], i, t, forward=net)

        tokens_per_call = A * B * T
    elif workload == "forward":
        twin.eval()

        @torch.no_grad()
        def call(i):
            return net(x_NABT[i, 0], y_NABT[i, 0])[1]

        tokens_per_call = B * T
    else:
        twin.eval()
        L = spec["max_new_tokens"]
        prompt = x_NABT[0, 0, :, :1]
        gen = torch.Generator(device=device)
        if sampler == "kv":
            # dynamic=True: one program for every cache position, not one per position.
            decode = autocast(torch.compile(twin.decode, dynamic=True) if compiled else twin.decode, device.type,
                              dtype)

            def sample_once():
                return twin.generate_kv(prompt, L, 1.0, None, gen, decode=decode, forward=net)
        else:
            def sample_once():
                return generate(net, prompt, L, c.block_size, gen)

        def call(i):
            gen.manual_seed(spec["seed"] + i)
            pending["out"] = sample_once()
            return None

        tokens_per_call = B * L

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    first, runs, outs = time_calls(call, sync, spec["steps"], spec["warmup"], spec["repeats"],
                                   sync_each=workload != "train")
    return Result(
        first_call_s=first, step_s_runs=runs, tokens_per_call=tokens_per_call,
        losses=None if workload == "generate" else [float(o) for o in outs],
        device=torch.cuda.get_device_name() if cuda else "cpu", platform=device.type, devices=1,
        dtype=dtype,
        peak_mem_bytes=torch.cuda.max_memory_allocated() if cuda else None,
        peak_mem_source="torch.cuda.max_memory_allocated" if cuda else None,
        versions={p: metadata.version(p) for p in ("torch", "numpy", *((mode.package,) if mode.package != "torch"
                                                                       else ()))},
        threads={"intra_op": torch.get_num_threads(), "inter_op": torch.get_num_interop_threads()},
        detail=describe(mode, dtype, workload, sampler),
    )
