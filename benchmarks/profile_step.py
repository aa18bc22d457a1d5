"""Where a dMoE training step's wall time goes that its kernels do not explain (CUDA).

    python benchmarks/profile_step.py --configs mixtral_t64,mixtral --contenders sparse,grouped_triton

For each (config, contender) of bench_dmoe, the fwdbwd step (`.grad` None, `.backward()`):
    wall_ms      median wall time of a step, synchronized
    host_ms      median time the host spends issuing one step (no synchronization inside the step;
                 where it reaches wall_ms, the step is bound by the host or syncs)
    gpu_ms       sum of the step's kernel times (torch.profiler)
    idle gaps    the largest gaps between consecutive kernels, with the kernels on either side
    cProfile     the host functions with the most time of their own over 20 steps
"""

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_dmoe  # noqa: E402


def _median_ms(fn, n=30, sync=True):
    samples = []
    for _ in range(n):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _kernels(step, repeats=3):
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            step()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    return events


def profile_one(layer, name, dtype, top):
    modules = bench_dmoe.build_contenders(layer, [name], dtype, "cuda")
    params = bench_dmoe.parameters(modules)
    torch.manual_seed(1)
    x = torch.randn(layer.T, layer.H, dtype=dtype, device="cuda", requires_grad=True)
    grad_out = torch.randn(layer.T, layer.H, dtype=dtype, device="cuda")
    inputs = [x, *params.values()]
    step, _ = bench_dmoe.steps(modules[name], "fwdbwd", False, x, grad_out, inputs)
    for _ in range(5):
        step()
    wall = _median_ms(step)
    host = _median_ms(step, sync=False)
    events = _kernels(step)
    gpu = sum(e.time_range.elapsed_us() for e in events) / 3 / 1e3
    gaps = []
    for a, b in zip(events, events[1:]):
        gap = b.time_range.start - a.time_range.end
        if gap > 0:
            gaps.append((gap, a.name[:50], b.name[:50]))
    gaps.sort(reverse=True)
    print(f"\n=== {layer.name} {name}: wall {wall:.3f} ms, host {host:.3f} ms, gpu {gpu:.3f} ms, "
          f"kernels per step {len(events) / 3:.0f}")
    for gap, a, b in gaps[:8]:
        print(f"  gap {gap:8.1f} us  after {a}  before {b}")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    print("\n".join(out.getvalue().splitlines()[:top + 12]))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="mixtral_t64,qwen3_t64")
    p.add_argument("--contenders", default="grouped_triton,sparse")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    layers = bench_dmoe.all_layers(False)
    for config in args.configs.split(","):
        for name in args.contenders.split(","):
            profile_one(layers[config], name, torch.bfloat16, args.top)


if __name__ == "__main__":
    main()
