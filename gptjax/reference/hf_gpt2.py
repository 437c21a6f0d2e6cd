"""transformers' GPT2LMHeadModel as a third implementation of gptjax's GPT: made for a ModelConfig, loaded with gptjax's
parameters (gptjax.weights.hf's names and layouts), and called as the PyTorch twin is, model(idx, targets) ->
(logits, mean cross-entropy or None), so nanoGPT's loop (reference.nanogpt.train_step) drives it unchanged."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import transformers

from gptjax.config import ModelConfig
from gptjax.errors import UserError
from gptjax.weights import hf


def check(c: ModelConfig) -> None:
    """A UserError unless GPT2LMHeadModel computes what gptjax's GPT with c computes."""
    if c.model != "gpt" or c.pos_encoding != "learned":
        raise UserError(f"transformers' GPT-2 is a GPT with learned positions; this config has model={c.model}, "
                        f"pos_encoding={c.pos_encoding}")


class HFGPT(torch.nn.Module):
    """GPT2LMHeadModel for c. Without biases (c.bias False) GPT-2's are held at zero, out of training, so the model
    computes and trains as gptjax's does."""

    def __init__(self, c: ModelConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        check(c)
        self.config = c
        cfg = {k: v for k, v in hf.hf_config(c, gpt2_vocab=False).items() if k != "architectures"}
        self.model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            **cfg, attn_implementation=attn_implementation))
        if not c.bias:
            for name, p in self.model.named_parameters():
                if name.endswith(".bias"):
                    p.requires_grad_(False)

    def load(self, tensors: dict[str, np.ndarray]) -> HFGPT:
        """gptjax's parameters as hf.tensors_from_params gives them (zero biases for a model without)."""
        missing, unexpected = self.model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()},
                                                         strict=False)
        assert not unexpected and set(missing) <= ({"lm_head.weight"} if self.config.tie_weights else set()), \
            (missing, unexpected)
        return self

    def forward(self, idx, targets=None):
        logits = self.model(input_ids=idx, use_cache=False).logits
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def from_params(params, c: ModelConfig, attn_implementation: str = "sdpa") -> HFGPT:
    """An HFGPT holding gptjax parameters `params` of config c."""
    return HFGPT(c, attn_implementation).load(hf.tensors_from_params(params, c))
