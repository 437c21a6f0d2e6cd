"""The PyTorch modes: the twin in gptjax/reference/ with nanoGPT's loop, eager (torch_eager) or wrapped in
torch.compile (torch_compile: inductor, default mode)."""

from __future__ import annotations

from importlib import metadata

import numpy as np
import torch

from gptjax.bench.worker import n_calls, time_calls
from gptjax.config import Config
from gptjax.parallel import cores
from gptjax.reference.nanogpt import GPT, configure_optimizers, next_token_probs, train_step

COMPILE_MODE = "inductor, mode=default"


@torch.no_grad()
def generate(forward, idx, max_new_tokens: int, block_size: int, generator: torch.Generator):
    """nanoGPT's GPT.generate (crop to block_size, re-run the window, sample) through `forward`, which may be the
    compiled module: nanoGPT's own generate would call the uncompiled one."""
    for _ in range(max_new_tokens):
        logits, _ = forward(idx[:, -block_size:])
        probs = next_token_probs(logits[:, -1, :], 1.0, None)
        idx = torch.cat((idx, torch.multinomial(probs, num_samples=1, generator=generator)), dim=1)
    return idx


def run(spec: dict) -> dict:
    config = Config.from_dict(spec["config"])
    c, t = config.model, config.train
    torch.set_num_threads(cores())
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:  # as nanoGPT's train.py: TF32 matmuls and convolutions
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    twin = GPT(c)
    twin.load_state_dict(torch.load(spec["torch_state"], weights_only=True))
    twin.to(device)
    net = torch.compile(twin) if spec["mode"] == "torch_compile" else twin
    n = n_calls(spec["steps"], spec["warmup"], spec["repeats"])
    x_NABT = torch.from_numpy(np.load(spec["x"])[:n].astype(np.int64)).to(device)
    y_NABT = torch.from_numpy(np.load(spec["y"])[:n].astype(np.int64)).to(device)
    A, B, T = x_NABT.shape[1:]
    workload = spec["workload"]
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

        def call(i):
            gen.manual_seed(spec["seed"] + i)
            pending["out"] = generate(net, prompt, L, c.block_size, gen)
            return None

        tokens_per_call = B * L

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    first, runs, outs = time_calls(call, sync, spec["steps"], spec["warmup"], spec["repeats"],
                                         sync_each=workload != "train")
    return {
        "first_call_s": first, "step_s_runs": runs, "tokens_per_call": tokens_per_call,
        "losses": None if workload == "generate" else [float(o) for o in outs],
        "device": torch.cuda.get_device_name() if cuda else "cpu", "platform": device.type, "devices": 1,
        "peak_mem_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "peak_mem_source": "torch.cuda.max_memory_allocated" if cuda else None,
        "versions": {p: metadata.version(p) for p in ("torch", "numpy")},
        "threads": {"intra_op": torch.get_num_threads(), "inter_op": torch.get_num_interop_threads()},
        "detail": f"torch.compile ({COMPILE_MODE})" if spec["mode"] == "torch_compile" else "eager",
    }
