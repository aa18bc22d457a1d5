"""Where a `fused_moe` call's device time goes: its kernels' busy time against its span (CUDA).

    python benchmarks/serving_timeline.py [--configs mixtral qwen3moe] [--tokens 4096] > timeline.txt

Per config and expert kind (bf16 experts, their FP8 block-quantized copy): the call timed by
`do_bench` eager and replayed from a CUDA graph, and 20 calls back to back (no cache flush
between them); then five calls of each under torch.profiler, eager and replayed: the span from
the first kernel's start to the last one's end, the time some kernel runs (the union of the
kernels' intervals), the idle gaps between them by the pair of kernels around each, and the
kernels' own times, all per call. A kernel launched early by programmatic dependent launch
counts from its start, so overlapping kernels are counted once in the busy time, not twice.
"""

import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_fp8  # noqa: E402
from common import CONFIGS, graphed, timed  # noqa: E402

from megablocks.integrations.inference import fused_moe  # noqa: E402


def trace(fn, calls):
    """The device events (kernels, memsets, copies) of `calls` calls of fn, by start time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    events = [e for e in events if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")]
    return sorted(events, key=lambda e: e["ts"])


def summarize(events, calls, label):
    """Prints span, busy time and gaps per call, the largest gaps and kernels."""
    start, end = events[0]["ts"], max(e["ts"] + e["dur"] for e in events)
    busy, run_start, run_end, gaps, prev = 0.0, None, None, {}, None
    for e in events:
        s, t = e["ts"], e["ts"] + e["dur"]
        if run_end is None or s > run_end:
            if run_end is not None:
                busy += run_end - run_start
                pair = (prev["name"][:40], e["name"][:40])
                gaps[pair] = gaps.get(pair, 0.0) + s - run_end
            run_start, run_end = s, t
        else:
            run_end = max(run_end, t)
        prev = e
    busy += run_end - run_start
    print(f"  {label}: span/call {(end - start) / calls:.1f} us, busy/call {busy / calls:.1f} us, "
          f"gaps/call {sum(gaps.values()) / calls:.1f} us")
    for (a, b), gap in sorted(gaps.items(), key=lambda kv: -kv[1])[:8]:
        print(f"    gap    {gap / calls:8.1f} us/call  {a} -> {b}")
    own = {}
    for e in events:
        own[e["name"][:50]] = own.get(e["name"][:50], 0.0) + e["dur"]
    for name, us in sorted(own.items(), key=lambda kv: -kv[1])[:6]:
        print(f"    kernel {us / calls:8.1f} us/call  {name}")


def back_to_back_ms(fn, calls=20):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="*", default=["mixtral", "qwen3moe"], choices=list(CONFIGS))
    p.add_argument("--tokens", type=int, default=4096)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("serving_timeline.py profiles the GPU; none here")
    for name in args.configs:
        _, H, F, E, k = CONFIGS[name]
        x, w1, w2, gating, q1, s1, q2, s2 = bench_fp8.serving_inputs(H, F, E, args.tokens, "cuda", torch.bfloat16)
        calls = dict(bf16=lambda: fused_moe(x, w1, w2, gating, k, True),
                     fp8=lambda: fused_moe(x, q1, q2, gating, k, True, w1_scale=s1, w2_scale=s2))
        for kind, call in calls.items():
            for _ in range(5):
                call()
            replay, _graph, _ = graphed(call)
            print(f"== {name} T={args.tokens} {kind}: do_bench eager {timed(call)[0]:.4f} ms, back-to-back eager "
                  f"{back_to_back_ms(call):.4f}, graph do_bench {timed(replay)[0]:.4f}, graph back-to-back "
                  f"{back_to_back_ms(replay):.4f}", flush=True)
            summarize(trace(call, 5), 5, "eager")
            summarize(trace(replay, 5), 5, "graph")


if __name__ == "__main__":
    main()
