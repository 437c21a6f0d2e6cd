"""Other frameworks' weight formats: the table that `gptjax export --to=` and `gptjax import --from=` choose from."""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType

from gptjax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Format:
    """One row of FORMATS. Its module has export_files(config, state, out_dir, path, force) -> (files, summary)
    and read(path, out_dir, vocab) -> (config, state, tokenizer); see gptjax.weights.files for what calls them."""

    name: str  # the --to= / --from= value
    suffix: str  # an exported file's name ends so
    example: str  # the file name that messages suggest
    module: str  # imported when the format is used, so that choosing from the table imports neither jax nor torch
    needs: str  # the package its files need, imported before any work so that its absence is the one line
    missing: str  # that line
    directory: bool = False  # the files go in a directory, the positional argument, instead of one file

    def load(self) -> ModuleType:
        """The format's module, once the package its files need is known to import."""
        try:
            importlib.import_module(self.needs)
        except ImportError:
            raise UserError(self.missing) from None
        return importlib.import_module(self.module)


FORMATS = {f.name: f for f in (
    Format("nanogpt", ".pt", "ckpt.pt", "gptjax.weights.nanogpt", "torch",
           "nanoGPT checkpoints need PyTorch: pip install 'gptjax[torch]'"),
    Format("hf", "", "gpt2-hf", "gptjax.weights.hf", "numpy", "", directory=True),  # transformers' GPT-2 files
)}


def get(name: str, option: str) -> Format:
    """FORMATS[name]; another name is one line naming --option and the formats there are."""
    if name not in FORMATS:
        there = (f"the only checkpoint format is {next(iter(FORMATS))}" if len(FORMATS) == 1
                 else f"the checkpoint formats are {', '.join(FORMATS)}")
        raise UserError(f"--{option}={name}: {there}")
    return FORMATS[name]
