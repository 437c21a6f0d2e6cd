"""gptjax: GPT language models in JAX/Flax, from the bigram to nanoGPT's GPT, trained by a jitted pure step."""

from gptjax.gpu import skip_absent_gpu as _skip_absent_gpu

__version__ = "0.1.0"

# Before jax starts (every gptjax module imports this first): with jax's CUDA plugin installed on a machine with no
# NVIDIA driver, jax starts on the CPU at once instead of printing the plugin's failed start. See skip_absent_gpu.
_skip_absent_gpu()
