"""Train your own model with gptjax's data, loop, evaluation, checkpoints, metrics and sampling."""
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax import evaluate, model, research, sample, train


@model.register("one_head")  # now --model=one_head builds it; factory(config: ModelConfig, rngs) -> nnx.Module
class OneHead(nnx.Module):
    """Token + position embeddings, one causal self-attention head, a linear head: the lecture's third rung."""

    def __init__(self, c, rngs: nnx.Rngs):
        self.tok, self.pos = nnx.Embed(c.vocab_size, c.n_embd, rngs=rngs), nnx.Embed(c.block_size, c.n_embd, rngs=rngs)
        self.qkv = nnx.Linear(c.n_embd, 3 * c.n_embd, use_bias=False, rngs=rngs)
        self.lm_head = nnx.Linear(c.n_embd, c.vocab_size, rngs=rngs)
        self.rate = c.dropout

    def __call__(self, idx_BT, key=None):  # key: a PRNG key while training, None when evaluating or sampling
        T = idx_BT.shape[1]
        x_BTD = self.tok(idx_BT) + self.pos(jnp.arange(T))
        q, k, v = jnp.split(self.qkv(x_BTD), 3, axis=-1)
        att_BTT = jnp.where(jnp.tril(jnp.ones((T, T), bool)), q @ k.swapaxes(1, 2) / q.shape[-1] ** 0.5, -jnp.inf)
        att_BTT = jax.nn.softmax(att_BTT, axis=-1)
        if key is not None and self.rate:
            att_BTT = jnp.where(jax.random.bernoulli(key, 1 - self.rate, att_BTT.shape), att_BTT / (1 - self.rate), 0)
        return self.lm_head(att_BTT @ v)  # logits [B, T, V]


def run(argv):
    opts = research.options(argv, "custom_model", seeds=1)
    config = research.make_config(opts, "bigram", model="one_head", n_embd=32, dropout=0.1, out_dir="out-one-head",
                                  max_iters=opts.pick(5000, 2000, 20), eval_interval=opts.pick(500, 500, 10))
    train.train(config, force=True)  # config.json, metrics.jsonl, checkpoints/, loss.png in out-one-head
    print(evaluate.evaluate(config.train.out_dir))  # exact loss over the whole val split, in nats and bits/char
    print(sample.sample(config.train.out_dir, max_new_tokens=200)[0])


if __name__ == "__main__":
    sys.exit(research.main(run))
