"""A long run: consecutive dMoE forward+backward steps with random routings, allocated memory
recorded after every step; exits non-zero if it grows after warm-up.

    python tests/reliability/long_run.py --steps 10000 --out LOG_DIR [--impl sparse|triton]

Each step draws a fresh input and perturbs the router, so every step routes differently (empty
experts and skewed loads included). On CUDA, `torch.cuda.memory_allocated()` after each step
must stay within `--slack-mib` of its value at the end of warm-up (the caching allocator's
reserved memory is reported too, not judged). Writes `long_run_<impl>.csv` (step, allocated,
reserved, max tokens on one expert, seconds) and prints a one-line verdict.
"""

import argparse
import csv
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from megablocks.layers.arguments import Arguments  # noqa: E402
from megablocks.layers.dmoe import dMoE  # noqa: E402
from megablocks.layers.moe import batched_load_balancing_loss, clear_load_balancing_loss  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10000)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--impl", choices=["sparse", "triton", "torch"], default="sparse")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--slack-mib", type=float, default=1.0)
    p.add_argument("--out", default=".")
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    args = Arguments(
        hidden_size=a.hidden, ffn_hidden_size=a.ffn, moe_num_experts=a.experts, moe_top_k=a.top_k,
        mlp_impl="sparse" if a.impl == "sparse" else "grouped",
        gmm_backend="auto" if a.impl == "sparse" else a.impl,
        fp16=False, bf16=dtype == torch.bfloat16, device=device, return_bias=False, num_layers=1, moe_block_size=128 if cuda else 16,
    )
    layer = dMoE(args)
    opt = torch.optim.SGD(layer.parameters(), lr=1e-4)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"long_run_{a.impl}.csv")
    baseline = None
    worst = 0.0
    t0 = time.perf_counter()
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "allocated_bytes", "reserved_bytes", "max_tokens_per_expert", "seconds"])
        for step in range(a.steps):
            x = torch.randn(a.tokens, a.hidden, device=device, dtype=dtype, requires_grad=True)
            with torch.no_grad():  # a new routing every step, sometimes very skewed
                layer.router.layer.weight.add_(torch.randn_like(layer.router.layer.weight), alpha=0.05 * (step % 7))
            out = layer(x)
            # A training step as a user writes it: the aux loss is taken and the collector cleared.
            loss = out.float().square().mean() + batched_load_balancing_loss(args)
            loss.backward()
            clear_load_balancing_loss()
            opt.step()
            opt.zero_grad(set_to_none=True)
            load = layer.experts.tokens_per_expert
            if cuda:
                torch.cuda.synchronize()
                allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
            else:
                allocated = reserved = 0
            if not bool(torch.isfinite(out).all()):
                print(f"step {step}: non-finite output", file=sys.stderr)
                return 1
            if step == a.warmup:
                baseline = allocated
            if baseline is not None:
                worst = max(worst, (allocated - baseline) / 2**20)
            if step % 100 == 0 or step == a.steps - 1:
                w.writerow([step, allocated, reserved, int(load.max()), f"{time.perf_counter() - t0:.2f}"])
    flat = worst <= a.slack_mib
    if not cuda:
        print(f"long run {a.impl}: {a.steps} steps in {time.perf_counter() - t0:.0f} s on cpu, every output "
              "finite (memory is measured on CUDA only)")
        return 0
    print(f"long run {a.impl}: {a.steps} steps in {time.perf_counter() - t0:.0f} s on {device}; allocated "
          f"after warm-up {0 if baseline is None else baseline / 2**20:.1f} MiB, largest growth {worst:.3f} MiB "
          f"(slack {a.slack_mib} MiB): {'FLAT' if flat else 'GROWS'}; log {path}")
    return 0 if flat else 1


if __name__ == "__main__":
    sys.exit(main())
