"""Host-side costs on this machine (CUDA): what one launch, one allocation and one autograd
Function call cost the host, and whether a dMoE training step syncs with the device.

    python benchmarks/host_costs.py --configs qwen3_t64,mb_paper --contenders grouped_triton,sparse
"""

import argparse
import os
import statistics
import sys
import time
import warnings

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_dmoe  # noqa: E402


@triton.jit
def _empty_kernel(a, b, c, d, n0, n1, n2, n3, s0, s1, s2, s3, s4, s5, BLOCK: tl.constexpr):
    pass


def per_call_us(fn, n=2000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / n * 1e6


class _New(torch.autograd.Function):
    @staticmethod
    def forward(a, b):
        return a + b

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g, g


class _Old(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        return a + b

    @staticmethod
    def backward(ctx, g):
        return g, g


def micro():
    a = torch.randn(64, 64, device="cuda")
    b = torch.randn(64, 64, device="cuda", requires_grad=True)
    args = (a, a, a, a, 64, 64, 64, 64, 1, 1, 1, 1, 1, 1)
    print(f"empty Triton launch, 14 args: {per_call_us(lambda: _empty_kernel[(1,)](*args, BLOCK=16)):.1f} us")
    print(f"torch.empty(64, 64):          {per_call_us(lambda: torch.empty(64, 64, device='cuda')):.1f} us")
    print(f"a + a (one launch):           {per_call_us(lambda: a + a):.1f} us")
    print(f"Function.apply, setup_context:{per_call_us(lambda: _New.apply(a, b)):.1f} us")
    print(f"Function.apply, ctx forward:  {per_call_us(lambda: _Old.apply(a, b)):.1f} us")


def step_report(layer, name):
    modules = bench_dmoe.build_contenders(layer, [name], torch.bfloat16, "cuda")
    params = bench_dmoe.parameters(modules)
    x = torch.randn(layer.T, layer.H, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    g = torch.randn(layer.T, layer.H, dtype=torch.bfloat16, device="cuda")
    inputs = [x, *params.values()]
    step, _ = bench_dmoe.steps(modules[name], "fwdbwd", False, x, g, inputs)
    module = modules[name]
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step()
    torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message)[:100] for w in caught if "synchron" in str(w.message).lower()]

    def host(fn, n=20):
        samples = []
        for _ in range(n):
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
            torch.cuda.synchronize()
        return statistics.median(samples)

    outs = []
    fwd_ms = host(lambda: outs.append(module(x)))
    bwd_ms = host(lambda: outs.pop().backward(g))
    print(f"{layer.name} {name}: host ms forward {fwd_ms:.3f}, backward {bwd_ms:.3f}; syncs in a step: {len(syncs)} {syncs[:3]}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--configs", default="qwen3_t64,mb_paper")
    p.add_argument("--contenders", default="grouped_triton,sparse,torch_grouped_mm")
    args = p.parse_args()
    micro()
    layers = bench_dmoe.all_layers(False)
    for config in args.configs.split(","):
        for name in args.contenders.split(","):
            step_report(layers[config], name)


if __name__ == "__main__":
    main()
