"""Model FLOPs per token (nanoGPT's estimate_mfu formula) and the peak throughput of known accelerators."""

from __future__ import annotations

from gptjax.config import ModelConfig

# Dense peak TFLOP/s. "float32" is the TF32 tensor-core peak: nanoGPT's loop sets allow_tf32 and XLA's default
# matmul precision on these GPUs is TF32 too, so that is the ceiling an fp32 run of either framework works under.
PEAK_TFLOPS = {
    "H100 PCIe": {"bfloat16": 756.0, "float32": 378.0},
    "H100": {"bfloat16": 989.4, "float32": 494.7},
    "H200": {"bfloat16": 989.4, "float32": 494.7},
    "A100": {"bfloat16": 312.0, "float32": 156.0},
}


def flops_per_token(c: ModelConfig, n_params: int) -> int:
    """Training FLOPs per token: 6N + 12·L·H·Q·T (N without position embeddings, Q the head size)."""
    if c.model == "bigram":
        return 6 * n_params
    L, H, Q, T = c.n_layer, c.n_head, c.n_embd // c.n_head, c.block_size
    return 6 * n_params + 12 * L * H * Q * T


def peak_flops(device: str, dtype: str) -> float | None:
    """Peak FLOP/s of a known GPU for dtype, or None (a CPU, or a device not in the table)."""
    for name, peaks in PEAK_TFLOPS.items():  # "H100 PCIe" is checked before "H100"
        if all(word in device for word in name.split()):
            return peaks[dtype] * 1e12
    return None


def mfu(workload: str, c: ModelConfig, n_params: int, tokens_per_sec: float, device: str,
        dtype: str = "float32") -> float | None:
    """Model FLOPs utilisation: train counts 6N + 12LHQT per token, forward a third of it; generate has none."""
    peak = peak_flops(device, dtype)
    if peak is None or workload == "generate":
        return None
    per_token = flops_per_token(c, n_params) / (1 if workload == "train" else 3)
    return per_token * tokens_per_sec / peak
