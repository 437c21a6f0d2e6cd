"""gptjax: GPT language models in JAX/Flax, from the bigram to nanoGPT's GPT, trained by a jitted pure step."""

__version__ = "0.1.0"
