"""The transformers modes: Hugging Face's own GPT2LMHeadModel (gptjax/reference/hf_gpt2.py) with nanoGPT's loop,
eager (hf_eager) or wrapped in torch.compile (hf_compile), its attention transformers' default (SDPA). A third
implementation of the same model beside gptjax and the PyTorch twin; it runs as the torch_* modes do (torch_modes'
loop, threads and autocast), only the module differs. Not in --modes' default: name them."""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any, ClassVar

from gptjax.bench.torch_modes import TorchMode
from gptjax.errors import UserError

if TYPE_CHECKING:
    from gptjax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class HFMode(TorchMode):
    """transformers' GPT-2 with nanoGPT's loop."""

    framework: ClassVar[str] = "hf"
    package: ClassVar[str] = "transformers"
    missing: ClassVar[str] = ("the hf_* modes need transformers: pip install 'gptjax[hf]', or leave them out of "
                              "--modes")
    label: ClassVar[str] = "transformers GPT2LMHeadModel"

    def prepare(self, c: ModelConfig, params: Any, tmp: str) -> dict[str, str]:
        """The initial weights by transformers' names and layouts (hf.pt)."""
        import numpy as np
        import torch

        from gptjax.reference import hf_gpt2
        from gptjax.weights import hf

        hf_gpt2.check(c)
        path = os.path.join(tmp, "hf.pt")
        torch.save({k: torch.from_numpy(np.array(v)) for k, v in hf.tensors_from_params(params, c).items()}, path)
        return {"hf_state": path}

    def build(self, c: ModelConfig, spec: dict):
        import torch

        from gptjax.reference.hf_gpt2 import HFGPT

        if spec["workload"] == "generate" and spec.get("sampler") == "kv":
            raise UserError(f"{self.name} samples by re-running the window (--sampler=reforward): its KV cache is "
                            "transformers' generate, not nanoGPT's loop")
        return HFGPT(c).load({k: t.numpy() for k, t in torch.load(spec["hf_state"], weights_only=True).items()})


MODES = (
    HFMode("hf_eager", note="transformers' GPT2LMHeadModel (SDPA attention)", sdpa=True, default=False),
    HFMode("hf_compile", note="transformers' GPT2LMHeadModel under torch.compile", compiled=True, sdpa=True,
           default=False),
)
