"""Why `torch_fast` (torch.compile + F.scaled_dot_product_attention) is the slowest bench mode in bfloat16 on a CPU:
the PyTorch twin's forward + backward under autocast, with SDPA or the explicit attention, eager or compiled, and
the ops that take the time (torch.profiler, self CPU time).

    python experiments/torch_sdpa_bf16.py [--config=shakespeare_char_cpu] [--steps=5]

Prints a markdown section; nothing is written.
"""

from __future__ import annotations

import dataclasses
import sys
import time

from gptjax.args import Option, options


def main() -> None:
    import torch

    from gptjax.config import load_config
    from gptjax.parallel import cores
    from gptjax.reference.nanogpt import GPT

    args = options(sys.argv[1:], {"config": Option("NAME", "shakespeare_char_cpu", "the preset"),
                                  "steps": Option("N", 10, "profiled forward + backward calls", None)},
                   "torch_sdpa_bf16.py", __doc__)
    config = load_config(args.config)
    c = dataclasses.replace(config.model, vocab_size=config.model.vocab_size or 65, dropout=0.0)
    torch.set_num_threads(cores())
    x = torch.randint(0, c.vocab_size, (config.train.batch_size, c.block_size))
    lines = [f"`python experiments/torch_sdpa_bf16.py --config={args.config} --steps={args.steps}` "
             f"(torch {torch.__version__}, {cores()} threads)", "",
             "| attention | compiled | dtype | ms per forward + backward | attention's own ops, ms a step (the "
             "slowest op: ms a call) |",
             "| --- | --- | --- | --- | --- |"]
    for sdpa, compiled, dtype in ((False, False, "float32"), (True, False, "float32"), (False, False, "bfloat16"),
                                  (True, False, "bfloat16"), (True, True, "bfloat16")):
        torch.manual_seed(0)
        model = GPT(c, sdpa=sdpa)
        net = torch.compile(model) if compiled else model

        def step(net=net, dtype=dtype):
            with torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bfloat16"):
                _, loss = net(x, x)
            loss.backward()

        for _ in range(5):
            step()
        with torch.profiler.profile() as prof:
            tick = time.perf_counter()
            for _ in range(args.steps):
                step()
            ms = (time.perf_counter() - tick) / args.steps * 1e3
        attn = [e for e in prof.key_averages()
                if "scaled_dot_product" in e.key or e.key in ("aten::bmm", "aten::baddbmm")]
        total = sum(e.self_cpu_time_total for e in attn) / args.steps / 1e3
        top = max(attn, key=lambda e: e.self_cpu_time_total / e.count)
        lines.append(f"| {'SDPA' if sdpa else 'explicit'} | {'yes' if compiled else 'no'} | {dtype} | {ms:.1f} | "
                     f"{total:.1f} (`{top.key}`: {top.self_cpu_time_total / top.count / 1e3:.2f}) |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
