"""A GPT with nanoGPT's structure, parameter names, initialisation, optimizer groups and schedule, in PyTorch.

Written against gptjax's ModelConfig / TrainConfig so one config builds both twins; `tie_weights=False`
(which nanoGPT lacks) gives the LM head its own matrix. Opt-in, for the benchmark's fast path: `GPT(c, sdpa=True)`
attends through F.scaled_dot_product_attention (nanoGPT's flash path), and `GPT.generate_kv` samples with a KV
cache. The defaults (explicit attention, `generate`'s re-forward) are what the parity suite compares.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptjax.config import ModelConfig, TrainConfig
from gptjax.weights.nanogpt import get_lr  # nanoGPT's schedule, in Python floats


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (eps 1e-5)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


def rope(x, pos: int):
    """Rotary position embedding of x [B, nh, T, hs] at positions pos..pos+T-1: gptjax.model.rope's rotate-half."""
    T, K = x.size(2), x.size(3)
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, K, 2, dtype=torch.float32, device=x.device) / K)
    angle = (pos + torch.arange(T, dtype=torch.float32, device=x.device))[:, None] * inv_freq[None, :]
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, c: ModelConfig, sdpa: bool = False):
        super().__init__()
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd, bias=c.bias)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)
        self.attn_dropout = nn.Dropout(c.dropout)
        self.resid_dropout = nn.Dropout(c.dropout)
        self.n_head, self.n_embd, self.block_size, self.dropout = c.n_head, c.n_embd, c.block_size, c.dropout
        self.sdpa = sdpa  # F.scaled_dot_product_attention (fused kernels) instead of the explicit softmax
        self.rope = c.pos_encoding == "rope"

    def _qkv(self, x, pos: int = 0):
        B, T, C = x.size()
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
                   for t in self.c_attn(x).split(self.n_embd, dim=2))
        return (rope(q, pos), rope(k, pos), v) if self.rope else (q, k, v)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self._qkv(x)
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            att = F.softmax(att.masked_fill(~mask, float("-inf")), dim=-1)
            y = self.attn_dropout(att) @ v
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))

    def decode(self, x, cache, pos: int):
        """x holds the tokens at positions pos..pos+T-1: their keys and values go into cache = (k, v), each
        [B, nh, block_size, hs] (None: allocate one), and each query attends to the cached positions up to its
        own. Returns (y, cache). No dropout: this is for sampling."""
        B, T, C = x.size()
        q, k, v = self._qkv(x, pos)
        if cache is None:
            cache = tuple(t.new_zeros(B, self.n_head, self.block_size, C // self.n_head) for t in (k, v))
        k_cache, v_cache = cache
        k_cache[:, :, pos:pos + T] = k
        v_cache[:, :, pos:pos + T] = v
        k, v = k_cache[:, :, :pos + T], v_cache[:, :, :pos + T]
        mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(diagonal=pos)
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            y = F.softmax(att.masked_fill(~mask, float("-inf")), dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)), cache


class MLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(c.n_embd, 4 * c.n_embd, bias=c.bias)
        self.gelu = nn.GELU(approximate="tanh" if c.activation == "gelu_tanh" else "none")
        self.c_proj = nn.Linear(4 * c.n_embd, c.n_embd, bias=c.bias)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, c: ModelConfig, sdpa: bool = False):
        super().__init__()
        self.ln_1 = LayerNorm(c.n_embd, bias=c.bias)
        self.attn = CausalSelfAttention(c, sdpa)
        self.ln_2 = LayerNorm(c.n_embd, bias=c.bias)
        self.mlp = MLP(c)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def decode(self, x, cache, pos: int):
        a, cache = self.attn.decode(self.ln_1(x), cache, pos)
        x = x + a
        return x + self.mlp(self.ln_2(x)), cache


class GPT(nn.Module):
    def __init__(self, c: ModelConfig, sdpa: bool = False):
        super().__init__()
        assert c.vocab_size > 0 and c.n_embd % c.n_head == 0
        self.config = c
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.vocab_size, c.n_embd),
            **({"wpe": nn.Embedding(c.block_size, c.n_embd)} if c.pos_encoding == "learned" else {}),
            drop=nn.Dropout(c.dropout),
            h=nn.ModuleList([Block(c, sdpa) for _ in range(c.n_layer)]),
            ln_f=LayerNorm(c.n_embd, bias=c.bias),
        ))
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_weights:
            self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)

    def _embed(self, idx, pos: int):
        x = self.transformer.wte(idx)
        if "wpe" in self.transformer:  # learned positions; with rope, attention turns queries and keys instead
            x = x + self.transformer.wpe(torch.arange(pos, pos + idx.size(1), dtype=torch.long, device=idx.device))
        return self.transformer.drop(x)

    def forward(self, idx, targets=None):
        """(logits for every position, mean cross-entropy or None)."""
        T = idx.size(1)
        assert T <= self.config.block_size, f"sequence length {T} exceeds block_size {self.config.block_size}"
        x = self._embed(idx, 0)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None):
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size:]
            logits, _ = self(idx_cond)
            probs = next_token_probs(logits[:, -1, :], temperature, top_k)
            idx = torch.cat((idx, torch.multinomial(probs, num_samples=1, generator=generator)), dim=1)
        return idx

    def decode(self, idx, caches, pos: int):
        """Last-position logits [B, 1, V] for the tokens idx at positions pos..pos+T-1 (pos + T <= block_size),
        attending to the cached earlier positions, and the caches with their keys and values written in.

        caches: one (k, v) per layer, or None to start (a prefill: decode(prompt, None, 0)). In eval mode."""
        T = idx.size(1)
        assert pos + T <= self.config.block_size, f"positions up to {pos + T} exceed block_size"
        x = self._embed(idx, pos)
        new = []
        for block, cache in zip(self.transformer.h, caches or [None] * len(self.transformer.h)):
            x, cache = block.decode(x, cache, pos)
            new.append(cache)
        return self.lm_head(self.transformer.ln_f(x[:, [-1], :])), new

    @torch.no_grad()
    def generate_kv(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                    generator: torch.Generator | None = None, decode=None, forward=None):
        """generate's tokens with a KV cache: the prompt in one pass, then one token per step, while the text
        fits in block_size; past it, generate's crop to the last block_size tokens and re-forward, per token.

        decode / forward (e.g. compiled) run in place of self.decode / self."""
        decode = self.decode if decode is None else decode
        forward = self if forward is None else forward
        S, caches = self.config.block_size, None
        for _ in range(max_new_tokens):
            T = idx.size(1)
            if T > S:  # the window slides: every cached key is at the wrong position
                logits, _ = forward(idx[:, -S:])
            elif caches is None:
                logits, caches = decode(idx, None, 0)
            else:
                logits, caches = decode(idx[:, -1:], caches, T - 1)
            probs = next_token_probs(logits[:, -1, :], temperature, top_k)
            idx = torch.cat((idx, torch.multinomial(probs, num_samples=1, generator=generator)), dim=1)
        return idx


def next_token_probs(logits, temperature: float, top_k: int | None):
    """nanoGPT's sampling distribution: logits / temperature, all but the top_k set to -inf, softmax."""
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    return F.softmax(logits, dim=-1)


def configure_optimizers(model: nn.Module, t: TrainConfig, foreach: bool | None = False,
                         fused: bool | None = None) -> torch.optim.AdamW:
    """nanoGPT's groups: weight decay on every >= 2-D parameter (matrices and embeddings), none on the rest.

    foreach=False (the parity suite's) updates one tensor at a time; None picks PyTorch's default.
    """
    params = [p for p in model.parameters() if p.requires_grad]  # parameters() yields a tied matrix once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.beta1, t.beta2), eps=1e-8, foreach=foreach,
                             fused=fused)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x_ABT, y_ABT, it: int, t: TrainConfig,
               forward: nn.Module | None = None) -> torch.Tensor:
    """One optimizer step as nanoGPT's loop takes it: set the lr, accumulate A micro-batches, clip, step.

    forward (e.g. torch.compile(model)) runs the micro-batches in model's place. Returns the mean micro-batch
    loss as a tensor, so that the caller decides when to wait for it.
    """
    forward = model if forward is None else forward
    lr = get_lr(it, t)
    for group in optimizer.param_groups:
        group["lr"] = lr
    A = x_ABT.shape[0]
    total = torch.zeros((), device=x_ABT.device)
    for a in range(A):
        _, loss = forward(x_ABT[a], y_ABT[a])
        (loss / A).backward()
        total += loss.detach()
    if t.grad_clip != 0.0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / A
