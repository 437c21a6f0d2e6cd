"""gptjax parameters as the PyTorch twins' state dicts and back: gptjax.weights.nanogpt's layout, in tensors."""

from __future__ import annotations

import torch

from gptjax.config import ModelConfig
from gptjax.weights import nanogpt, torchfile


def to_torch_state_dict(params, c: ModelConfig) -> dict[str, torch.Tensor]:
    """nanoGPT-named float32 tensors (a tied lm_head.weight is the same tensor as transformer.wte.weight).

    Works for any pytree shaped like the parameters, e.g. their gradients.
    """
    return torchfile.to_torch(nanogpt.to_state_dict(params, c))


def from_torch_state_dict(sd: dict, c: ModelConfig):
    """gptjax parameters from a nanoGPT-named state dict; missing, unexpected or misshapen tensors are errors."""
    return nanogpt.from_state_dict(torchfile.from_torch(sd), c)
