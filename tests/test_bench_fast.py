"""The PyTorch twin's fast paths, which the torch_fast mode and the kv sampler bench: SDPA attention computes what
the explicit attention does, the KV-cache generate samples generate's tokens, autocast wraps the forward pass."""

import pytest
import torch

from gptjax.bench import torch_modes
from gptjax.config import ModelConfig
from gptjax.reference.nanogpt import GPT

C = ModelConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


def _twin(sdpa: bool = False, seed: int = 0) -> GPT:
    """A twin with large weights: at nanoGPT's initialisation (std 0.02) attention is almost uniform whatever the
    keys, so wrong keys in a cache would go unseen."""
    torch.manual_seed(seed)
    twin = GPT(C, sdpa=sdpa).eval()
    with torch.no_grad():
        for p in twin.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.5)
    return twin


def test_sdpa_attention_computes_the_explicit_attention():
    twin, fast = _twin(), _twin(sdpa=True, seed=1)
    fast.load_state_dict(twin.state_dict())
    x, y = torch.randint(0, 65, (4, 16)), torch.randint(0, 65, (4, 16))
    logits, loss = twin.train()(x, y)
    fast_logits, fast_loss = fast.train()(x, y)
    torch.testing.assert_close(fast_logits, logits, rtol=0, atol=1e-5)
    loss.backward()
    fast_loss.backward()
    for (name, p), q in zip(twin.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-5, msg=name)
    # causal: the first position's logits do not depend on the later tokens
    x2 = x.clone()
    x2[:, 1:] = (x2[:, 1:] + 1) % 65
    torch.testing.assert_close(fast(x2)[0][:, 0], fast_logits[:, 0], rtol=0, atol=1e-6)


def _calls(fn, log: list):
    def spy(idx, *args):
        log.append((idx.size(1), *args[1:]))
        return fn(idx, *args)

    return spy


@pytest.mark.parametrize("sdpa", [False, True])
@pytest.mark.parametrize("prompt, new, top_k", [
    (3, 13, 1),  # greedy, the text fills block_size exactly
    (3, 13, None),  # seeded sampling from the whole distribution, within block_size
    (5, 30, 5),  # seeded top-k, 19 tokens past block_size: the cache, then crop and re-forward
    (20, 4, None),  # a prompt longer than block_size: re-forward from the start
])
def test_kv_generate_samples_generates_tokens(sdpa, prompt, new, top_k):
    twin = _twin(sdpa)
    idx = torch.randint(0, 65, (4, prompt), generator=torch.Generator().manual_seed(3))
    want = twin.generate(idx, new, 0.9, top_k, torch.Generator().manual_seed(7))
    decodes, forwards = [], []
    got = twin.generate_kv(idx, new, 0.9, top_k, torch.Generator().manual_seed(7),
                           decode=_calls(twin.decode, decodes), forward=_calls(twin, forwards))
    assert got.shape == (4, prompt + new) and torch.equal(got, want)
    # The cache is what ran: one prefill at position 0, then one token per step at its own position, while the
    # text fits; then one re-forward of the last block_size tokens per token.
    S = C.block_size
    fits = max(0, min(new, S - prompt + 1))
    assert decodes == ([(prompt, 0)] + [(1, p) for p in range(prompt, prompt + fits - 1)] if fits else [])
    assert forwards == [(S,)] * (new - fits)


def test_autocast_runs_the_forward_pass_in_bfloat16():
    twin = _twin()
    x = torch.randint(0, 65, (2, 8))
    assert torch_modes.autocast(twin, "cpu", "float32") is twin
    logits, loss = torch_modes.autocast(twin, "cpu", "bfloat16")(x, x)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32  # cross-entropy autocasts to float32
    assert all(p.dtype == torch.float32 for p in twin.parameters())
    assert torch_modes.resolve_dtype("auto", cuda=False) == "float32"
    assert torch_modes.resolve_dtype("bfloat16", cuda=False) == "bfloat16"
