"""How a model runs (not what it computes): matmul dtype, attention kernel, scan, remat, resolved per device."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gptjax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Compute:
    """How the forward pass runs; static (part of the graphdef), so each setting compiles its own program.

    dtype: the dtype of matmul inputs and their outputs, the LM head's logits and attention's scores included, as
    under torch.autocast. LayerNorm statistics, softmax, the residual stream and the loss stay float32 (the loss
    reads the logits in float32); parameters are float32 whatever it is.
    attention: "einsum" (explicit scores, the only path with attention dropout), "xla" or "cudnn" (both through
    jax.nn.dot_product_attention; cudnn is the fused flash kernel and needs a GPU and bfloat16).
    scan: run the blocks with lax.scan over their parameters stacked at call time (compile time flat in depth).
    remat: recompute each block's activations in the backward pass instead of storing them.
    matmul: "xla" (XLA's dots) or "mkl" (the linear layers' products through gptjax.kernels' oneMKL kernel, on a
    CPU; attention's own products stay XLA's).
    """

    dtype: str = "float32"
    attention: str = "einsum"
    scan: bool = False
    remat: bool = False
    matmul: str = "xla"

    @property
    def jdtype(self):
        return jnp.dtype(self.dtype)


def supports_bfloat16(device=None, matmul: str = "xla") -> bool:
    """bfloat16 matmuls faster than float32: a TPU, an NVIDIA GPU of compute capability 8.0 (Ampere) or later, or
    a CPU with AMX (amx_bf16) when the products run on the kernel (XLA's own CPU dots are slower in bfloat16 on
    every CPU measured, and so are oneMKL's on AVX-512 BF16 without AMX: experiments/results/xla_vs_eager_cpu.md)."""
    device = device or jax.devices()[0]
    if device.platform == "tpu":
        return True
    if device.platform == "gpu":
        try:
            return float(getattr(device, "compute_capability", "0")) >= 8.0
        except ValueError:
            return False
    if device.platform == "cpu" and matmul == "mkl":
        from gptjax import host

        return "amx_bf16" in host.cpu()["flags"]
    return False


def resolve_matmul(matmul: str = "auto", device=None) -> str:
    """auto: the oneMKL kernel on an Intel CPU where it loads (built, or buildable: a compiler and oneMKL), XLA's
    dots elsewhere (other backends, other CPUs: unmeasured there). mkl where it cannot run is a UserError."""
    from gptjax import host, kernels

    device = device or jax.devices()[0]
    if matmul == "xla" or (matmul == "auto" and (device.platform != "cpu" or host.cpu()["vendor"] != "GenuineIntel")):
        return "xla"
    if device.platform != "cpu":
        raise UserError(f"--matmul=mkl runs on a CPU (this is a {device.platform}): use --matmul=auto")
    ok, why = kernels.load()
    if ok:
        return "mkl"
    if matmul == "mkl":
        raise UserError(f"--matmul=mkl: the kernel cannot run here: {why}; or use --matmul=xla")
    return "xla"


def describe_matmul(c: Compute) -> str:
    """How the linear layers' products run, in words, with the reason the kernel is not used where it could be."""
    from gptjax import kernels

    if c.matmul == "mkl":
        return f"matmuls on the oneMKL kernel ({kernels.load()[1]})"
    tried = kernels.status()  # set where --matmul=auto asked for the kernel and it did not load
    return "XLA's matmuls" + ("" if tried is None or tried[0] else f" (no kernel: {tried[1]})")


def resolve_compute(dtype: str = "auto", attention: str = "auto", scan: bool = False, remat: str = "none",
                    attention_dropout: float = 0.0, device=None, matmul: str = "xla") -> Compute:
    """The Compute for the command-line choices on `device` (default: JAX's first device).

    auto matmul: see resolve_matmul. auto dtype: bfloat16 where the device runs it faster (supports_bfloat16),
    float32 elsewhere. auto attention: cudnn on a GPU in bfloat16 without attention dropout, the einsum path
    otherwise. A choice the device or the settings cannot run is a UserError naming it and the fix.
    """
    device = device or jax.devices()[0]
    matmul = resolve_matmul(matmul, device)
    dtype = ("bfloat16" if supports_bfloat16(device, matmul) else "float32") if dtype == "auto" else dtype
    if attention == "auto":
        attention = "cudnn" if (device.platform == "gpu" and dtype == "bfloat16" and attention_dropout == 0.0) \
            else "einsum"
    if attention == "cudnn" and device.platform != "gpu":
        raise UserError(f"--attention=cudnn needs an NVIDIA GPU (this is a {device.platform}): use --attention=auto")
    if attention == "cudnn" and dtype != "bfloat16":
        raise UserError("--attention=cudnn runs in bfloat16 only: add --dtype=bfloat16, or use --attention=xla")
    if attention in ("xla", "cudnn") and attention_dropout > 0.0:
        raise UserError(f"--attention={attention} has no attention dropout and --dropout={attention_dropout}: use "
                        "--attention=einsum (or auto), or --dropout=0")
    return Compute(dtype=dtype, attention=attention, scan=scan, remat=remat == "block", matmul=matmul)


def compute_of(config, training: bool = True, device=None, **changes) -> Compute:
    """How this config's model runs on `device` (default: JAX's first device): the train settings dtype, attention,
    scan_layers, remat and matmul, resolved (auto -> a choice); `changes` override them (e.g. dtype="float32" for
    eval). Without training there is no dropout, so every attention path is open."""
    t = dataclasses.replace(config.train, **changes)
    return resolve_compute(t.dtype, t.attention, t.scan_layers, t.remat,
                           config.model.dropout if training else 0.0, device=device, matmul=t.matmul)

