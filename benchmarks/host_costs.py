"""Where a dMoE training step's wall time goes beyond its kernels (CUDA): the host's side.

    python benchmarks/host_costs.py --configs qwen3_t64,mb_paper --contenders grouped_triton,sparse
    python benchmarks/host_costs.py --configs mixtral --profile     # also kernel gaps and cProfile
    python benchmarks/host_costs.py --serving qwen3moe,mixtral --profile   # fused_moe, bf16 and FP8
    python benchmarks/host_costs.py --fp8-layers dmoe_125m,mb_paper,mixtral  # bf16 and FP8 layer steps

First what one Triton launch, one allocation, one torch launch and one autograd Function call cost
the host. Then, for each (config, contender) of bench_dmoe, the fwdbwd step (`.grad` None,
`.backward()`): the host time to issue it (from an idle device, into None or existing `.grad`,
forward and backward apart), whether it syncs with the device (sync debug mode; host time with
the device held busy by queued work; new allocator segments). With `--profile` (or
HOST_PROFILE=1): the step's wall and kernel time, the largest idle gaps between kernels with
the kernels on either side, and the host functions with the most time of their own (cProfile).

`--fp8-layers`: the bf16 grouped layer's training step against the same layer in FP8
(`fp8='blockwise'`, the weights cached, and quantized again each step as after an optimizer
step): the host's µs to issue each step back to back behind a busy device, against the device's
own kernel time a step. Where the first is the larger, an eager loop of such steps waits on the
host, not the device, and FP8's faster products cannot show. `dmoe_125m` is the exp/ trainer's
expert layer (16 x 1024 tokens a micro-batch, 64 experts of 768 x 3072, top-1, gelu).
"""

import argparse
import cProfile
import io
import os
import pstats
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


def queued_host_ms(fn, samples: int = 5) -> float:
    """Median ms the host spends issuing `fn()` behind ~50 ms of queued device work: where it stays
    the host time from an idle device, nothing in it waits for the device; where it grows by the
    queued work, an operation blocks (a sync that the debug mode does not flag, e.g. an allocator
    call)."""
    times = []
    for _ in range(samples):
        torch.cuda.synchronize()
        torch.cuda._sleep(100_000_000)
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
        torch.cuda.synchronize()
    return statistics.median(times)


def issue_us(fn, calls: int = 20) -> float:
    """µs per call the host spends issuing `calls` calls of fn back to back behind a long queued
    sleep (the device busy throughout, so nothing waits on it: what an eager loop pays for each
    call on the host); nan where the device finished first (an operation blocked, or the launches
    filled the queue: fewer calls then)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(1_000_000_000)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    seconds = time.perf_counter() - start
    busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    return seconds / calls * 1e6 if busy else float("nan")


def print_host_profile(fn, calls: int = 20, orders=("tottime", "cumulative"), lines: int = 40) -> None:
    """cProfile of `calls` calls of fn: the host functions by each of `orders` (own time first,
    then the call tree's heavy branches)."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    prof.disable()
    for order in orders:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats(order).print_stats(lines)
        print(out.getvalue())


def kernel_profile(step, repeats: int = 3):
    """(kernel ms per step, the 8 largest idle gaps between consecutive kernels)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            step()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA), key=lambda e: e.time_range.start)
    gaps = sorted(((b.time_range.start - a.time_range.end, a.name[:50], b.name[:50])
                   for a, b in zip(events, events[1:]) if b.time_range.start > a.time_range.end), reverse=True)
    return sum(e.time_range.elapsed_us() for e in events) / repeats / 1e3, gaps[:8]


def step_report(layer, name, profile: bool):
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

    def host(fn):
        return bench_dmoe.host_ms(fn, "cuda", samples=20)

    def backward_only(accumulate):
        samples = []
        for _ in range(20):
            if not accumulate:
                bench_dmoe.clear_grads(inputs)
            out = module(x)
            torch.cuda.synchronize()
            start = time.perf_counter()
            out.backward(g)
            samples.append((time.perf_counter() - start) * 1e3)
            torch.cuda.synchronize()
        return statistics.median(samples)

    def accumulate_step():
        module(x).backward(g)

    segments = torch.cuda.memory_stats().get("segment.all.allocated", 0)
    step_ms = host(step)
    segments = torch.cuda.memory_stats().get("segment.all.allocated", 0) - segments
    fwd_ms = host(lambda: module(x))
    print(f"{layer.name} {name}: host ms: step {step_ms:.3f} (new segments {segments}), step into existing .grad "
          f"{host(accumulate_step):.3f}, forward {fwd_ms:.3f}, backward into None {backward_only(False):.3f}, "
          f"backward into existing {backward_only(True):.3f}; syncs in a step: {len(syncs)} {syncs[:3]}")
    # Host time of a step issued behind queued device work (`queued_host_ms`).
    outs = []
    print(f"    behind queued work: step {queued_host_ms(step):.3f} ms, forward "
          f"{queued_host_ms(lambda: outs.append(module(x))):.3f} ms, "
          f"backward {queued_host_ms(lambda: outs.pop().backward(g)):.3f} ms")
    if profile:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) * 100
        gpu, gaps = kernel_profile(step)
        print(f"    wall {wall:.3f} ms, kernels {gpu:.3f} ms per step")
        for gap, before, after in gaps:
            print(f"    gap {gap:8.1f} us  after {before}  before {after}")
        print_host_profile(step)


def serving_report(name: str, tokens: int, profile: bool):
    """The host's side of one `fused_moe` call (bf16 experts, then their FP8 copy) at `tokens`
    tokens of bench_fp8's config `name`: µs to issue it from an idle device, behind queued
    work and back to back (`issue_us`), and (`profile`) the host functions with the most time of
    their own over 20 calls; for FP8, also each piece of the call issued alone (the quantizers, the
    two products, the combine)."""
    import bench_fp8
    from common import CONFIGS

    from megablocks.integrations.inference import fused_moe
    from megablocks.ops import fp8

    _, H, F, E, k = CONFIGS[name]
    x, w1, w2, gating, q1, s1, q2, s2 = bench_fp8.serving_inputs(H, F, E, tokens, "cuda", torch.bfloat16)
    calls = dict(bf16=lambda: fused_moe(x, w1, w2, gating, k, True),
                 fp8=lambda: fused_moe(x, q1, q2, gating, k, True, w1_scale=s1, w2_scale=s2))

    def idle_us(fn):
        return bench_dmoe.host_ms(fn, "cuda", samples=20) * 1e3

    for kind, call in calls.items():
        for _ in range(5):
            call()
        print(f"{name} T={tokens} {kind}: host us per call from an idle device {idle_us(call):.1f}, "
              f"behind queued work {queued_host_ms(call) * 1e3:.1f}, issued back to back {issue_us(call):.1f}")
        if kind == "fp8":
            from megablocks.ops.routing import row_maps

            counts, maps = row_maps(torch.topk(gating, k, dim=1).indices, E)
            x_q, x_s = fp8.gather_quantize_rows(x, maps.assignment_row, k)
            h = fp8.gmm_fp8(x_q, x_s, q1, s1, counts, out_dtype=x.dtype)
            a_q, a_s = fp8.glu_quantize_rows(h[:, :F], h[:, F:], "silu")
            pieces = {"gather_quantize_rows": lambda: fp8.gather_quantize_rows(x, maps.assignment_row, k),
                      "gmm_fp8 up": lambda: fp8.gmm_fp8(x_q, x_s, q1, s1, counts, out_dtype=x.dtype),
                      "glu_quantize_rows": lambda: fp8.glu_quantize_rows(h[:, :F], h[:, F:], "silu"),
                      "gmm_fp8 down": lambda: fp8.gmm_fp8(a_q, a_s, q2, s2, counts, out_dtype=x.dtype)}
            for piece, fn in pieces.items():
                print(f"    {piece}: host us from an idle device {idle_us(fn):.1f}, "
                      f"issued back to back {issue_us(fn):.1f}")
        if profile:
            print_host_profile(call, orders=("tottime",), lines=30)


# The exp/ trainer's dmoe_125m expert layer (exp/configs/dmoe_125m.json at scripts/fp8_train_gpu.sh's
# micro-batch of 16 x 1024 tokens): T, H, F, E, top_k, mlp_type, activation.
TRAINER_LAYERS = {"dmoe_125m": (16 * 1024, 768, 3072, 64, 1, "mlp", "gelu_tanh")}


def fp8_layer_report(name: str, profile: bool) -> dict:
    """The host's and the device's time a training step (forward and `.backward()` into `.grad`) of
    layer `name` in bf16 and in FP8 (weights cached; quantized each step; cached on the composed
    FP8 ops instead of the one-node form, `one_node_experts=False`): µs to issue a step
    back to back behind a busy device (`issue_us`), and the kernels' ms a step (`kernel_profile`);
    `host_bound` where the first exceeds the second."""
    import dataclasses

    import bench_fp8

    layers = bench_dmoe.all_layers(False)
    if name in TRAINER_LAYERS:
        T, H, F, E, k, mlp, act = TRAINER_LAYERS[name]
        layer = bench_dmoe.Layer(name, T, H, F, E, k, mlp, act, False)
    elif name in layers:
        layer = layers[name]
    else:
        raise ValueError(f"--fp8-layers: expected names from {sorted([*layers, *TRAINER_LAYERS])}, got {name!r}")
    _, bf16, fp8_layer = bench_fp8.build_pair(layer, "cuda")
    x = torch.randn(layer.T, layer.H, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    g = torch.randn(layer.T, layer.H, dtype=torch.bfloat16, device="cuda")
    inputs = [x, *bf16.parameters()]
    cached, _ = bench_dmoe.steps(fp8_layer, "fwdbwd", False, x, g, inputs)

    def quantizing():  # the weights quantized again, as after an optimizer step
        cache = fp8_layer.experts.mlp.__dict__.get("_fp8_weights")
        if cache is not None:
            cache.clear()
        cached()

    def composed():  # the composed FP8 ops (no one-node form), weights cached
        policy = fp8_layer.args.kernel_policy
        fp8_layer.args.kernel_policy = dataclasses.replace(policy, one_node_experts=False)
        try:
            cached()
        finally:
            fp8_layer.args.kernel_policy = policy

    forms = {"bf16": bench_dmoe.steps(bf16, "fwdbwd", False, x, g, inputs)[0], "fp8_cached": cached,
             "fp8_quantizing": quantizing, "fp8_composed_cached": composed}
    row = {"layer": name}
    for label, step in forms.items():
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        issue = issue_us(step, calls=10)
        kernels_ms, _ = kernel_profile(step)
        row[f"{label}_issue_ms"] = issue / 1e3
        row[f"{label}_kernels_ms"] = kernels_ms
        row[f"{label}_host_bound"] = issue / 1e3 > kernels_ms
        print(f"{name} {label}: host issues a step in {issue / 1e3:.3f} ms (back to back, device busy); "
              f"its kernels take {kernels_ms:.3f} ms{' -> HOST-BOUND' if issue / 1e3 > kernels_ms else ''}")
        if profile:
            print_host_profile(step, orders=("tottime",), lines=30)
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--configs", default="qwen3_t64,mb_paper")
    p.add_argument("--contenders", default="grouped_triton,sparse,torch_grouped_mm")
    p.add_argument("--profile", action="store_true", default=bool(os.environ.get("HOST_PROFILE")),
                   help="also the kernel gaps and a cProfile of each step")
    p.add_argument("--fp8-layers", default="",
                   help="bench_dmoe layers (comma-separated; also dmoe_125m, the exp/ trainer's) whose bf16 and "
                        "FP8 training steps' host and kernel times are reported instead of the contenders'")
    p.add_argument("--serving", default="",
                   help="bench_fp8 configs (comma-separated) whose fused_moe calls, bf16 and FP8 at T = 64 and "
                        "4096, are reported instead of the training steps")
    args = p.parse_args()
    micro()
    if args.serving:
        for config in args.serving.split(","):
            for tokens in (64, 4096):
                serving_report(config, tokens, args.profile)
        return
    if args.fp8_layers:
        for config in args.fp8_layers.split(","):
            fp8_layer_report(config, args.profile)
        return
    layers = bench_dmoe.all_layers(False)
    for config in args.configs.split(","):
        for name in args.contenders.split(","):
            step_report(layers[config], name, args.profile)


if __name__ == "__main__":
    main()
