"""Decode- and prefill-sized `fused_moe` (vLLM layout) against a torch `grouped_mm` MoE, same run.

    python benchmarks/bench_fused_moe.py --out DIR          # CUDA, bf16: CSV + PNG + table
    python benchmarks/bench_fused_moe.py --smoke            # CPU: tiny shapes, checks only

For the mixtral and qwen3moe layers of common.CONFIGS (H, F, E, top-k) and T in {1, 16, 64, 256}
tokens (decode) and {1024, 4096} (prefill), times (forward only, no autograd):
    ours_auto                  megablocks.integrations.inference.fused_moe as the library defaults
    ours_grouped, ours_fused   the grouped path with the policy's fused_forms off and on (the decode form in
                               four launches, the GLU in the first GEMM's epilogue)
    ours_gather                the gather path
    torch_grouped_mm           softmax/top-k, sort, index, F.grouped_mm x2, weighted sum
each two ways: eager (`{method}_ms`: host time included, as a plain Python loop would see it) and
CUDA-graph replay (`{method}_graph_ms`: the call captured once after a warm-up on a side stream,
then the median of replays timed the same way; how serving engines run decode, host time gone);
and `{method}_host_us`, the host time of one call (50 calls enqueued back to back, no sync).
Reports ms, the bandwidth of reading the experts' weights the routing touches (GB/s) against
the device copy bandwidth measured in the same run, and the speed-ups over torch_grouped_mm
(eager against eager, graphed against graphed). `--profile` also prints each method's kernels
(torch.profiler, CUDA time per call).

    python benchmarks/bench_fused_moe.py --out DIR --sweep-tiles   # CUDA: the decode form's GEMMs

times the decode form's two grouped GEMMs (the GLU-epilogue one, through the routing's row map,
and the down projection) under each tile of TILE_CANDIDATES against the library's choice
(`megablocks.backend.gmm._config`), as weight GB/s: `bench_fused_moe_tiles.csv`.
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CONFIGS, copy_bandwidth_gbs, environment, graphed, print_table, timed, write_csv  # noqa: E402

from megablocks.backend.gmm import default_config as gmm_config  # noqa: E402
from megablocks.backend.launch import with_overrides  # noqa: E402
from megablocks.backend.gmm import triton_gmm  # noqa: E402
from megablocks.backend.topk import softmax_topk_route  # noqa: E402
from megablocks.integrations.inference import (  # noqa: E402
    fused_moe,
    fused_moe_reference,
    softmax_topk,
    softmax_topk_reference,
)
from megablocks.policy import KernelPolicy  # noqa: E402

DECODE_CONFIGS = ("mixtral", "qwen3moe")
TOKENS = (1, 16, 64, 256, 1024, 4096)
OURS = ("auto", "grouped", "fused", "gather")


@torch.no_grad()
def torch_grouped_mm_moe(x, w1, w2, gating, topk, renormalize):
    """The baseline: a plain-torch MoE forward on `torch.nn.functional.grouped_mm`, sync-free (the
    expert counts by `scatter_add_`: `torch.bincount` reads its input's maximum on the host), so
    that it can be captured in a CUDA graph like ours."""
    t, h = x.shape
    e, two_f, _ = w1.shape
    f = two_f // 2
    weights, ids = softmax_topk_reference(gating, topk, renormalize)
    flat = ids.flatten()
    order = flat.argsort(stable=True)
    counts = torch.zeros(e, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    offs = counts.cumsum(0).to(torch.int32)
    x_sorted = x[order // topk]
    hid = F.grouped_mm(x_sorted, w1.transpose(1, 2), offs=offs)
    act = F.silu(hid[:, :f]) * hid[:, f:]
    y = F.grouped_mm(act, w2.transpose(1, 2), offs=offs)
    out = torch.zeros(t * topk, h, dtype=torch.float32, device=x.device)
    out[order] = y.float() * weights.flatten()[order, None]
    return out.view(t, topk, h).sum(1).to(x.dtype)


def make(t, h, f, e, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(t, h, dtype=dtype, device=device, generator=g)
    w1 = (torch.randn(e, 2 * f, h, device=device, generator=g) / h**0.5).to(dtype)
    w2 = (torch.randn(e, h, f, device=device, generator=g) / f**0.5).to(dtype)
    gating = torch.randn(t, e, device=device, generator=g)
    return x, w1, w2, gating


# The gather path copies one expert's weights per routed row; past this many bytes it is not run.
GATHER_PATH_MAX_BYTES = 8 << 30


def methods(x, w1, w2, gating, k):
    copied = x.shape[0] * k * (w1[0].numel() + w2[0].numel()) * w1.element_size()

    def call(path, policy=None):
        return lambda: fused_moe(x, w1, w2, gating, k, True, path=path, policy=policy)

    fns = {"ours_auto": call("auto"), "ours_grouped": call("grouped", KernelPolicy(fused_forms=False)),
           "ours_fused": call("grouped", KernelPolicy(fused_forms=True))}
    if copied <= GATHER_PATH_MAX_BYTES:
        fns["ours_gather"] = call("gather")
    fns["torch_grouped_mm"] = lambda: torch_grouped_mm_moe(x, w1, w2, gating, k, True)
    return fns


def host_us(fn, calls=50):
    """Host microseconds per call: `calls` calls enqueued back to back, timed before the sync."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def profile(name, fn):
    """Prints the CUDA kernels of one call of `fn` (mean over 20 calls)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
    print(f"--- {name}: kernels, CUDA us per call")
    for event in sorted(prof.key_averages(), key=lambda ev: -ev.device_time_total):
        if event.device_time_total > 0:
            print(f"    {event.device_time_total / 20:9.1f}  x{event.count // 20:<3d} {event.key[:90]}")


def weight_bytes(w1, w2, gating, k):
    """Bytes of the expert weights the routing touches (each expert read once)."""
    _, ids = softmax_topk(gating, k, True)
    hit = ids.unique().numel()
    return hit * (w1[0].numel() + w2[0].numel()) * w1.element_size()


def bench(args):
    env = environment()
    device, dtype = "cuda", torch.bfloat16
    ceiling = copy_bandwidth_gbs(1 << 30)
    print(f"copy bandwidth {ceiling:.0f} GB/s")
    rows = []
    for name in args.configs:
        _, h, f, e, k = CONFIGS[name]
        for t in args.tokens:
            x, w1, w2, gating = make(t, h, f, e, dtype, device)
            ref = torch_grouped_mm_moe(x, w1, w2, gating, k, True).float()
            nbytes = weight_bytes(w1, w2, gating, k)
            row = {"config": name, "T": t, "H": h, "F": f, "E": e, "k": k, "weight_MB": nbytes / 1e6,
                   "floor_ms": nbytes / ceiling / 1e6, "copy_GBs": ceiling}
            for p in OURS:
                row[f"ours_{p}_ms"] = row[f"ours_{p}_graph_ms"] = float("nan")
            for method, fn in methods(x, w1, w2, gating, k).items():
                med, p20, p80 = timed(fn)
                out = fn().float()
                if args.profile:
                    profile(f"{name} T={t} {method}", fn)
                row.update({f"{method}_ms": med, f"{method}_p20_ms": p20, f"{method}_p80_ms": p80,
                            f"{method}_host_us": host_us(fn),
                            f"{method}_GBs": nbytes / med / 1e6,
                            f"{method}_rel_err": ((out - ref).norm() / ref.norm()).item()})
                try:
                    replay, graph, graph_out = graphed(fn)
                except RuntimeError as err:  # not capturable: report it, time the rest
                    print(f"{name} T={t} {method}: CUDA graph capture failed: {err}", flush=True)
                    row[f"{method}_graph_ms"] = float("nan")
                    continue
                med, p20, p80 = timed(replay)
                torch.cuda.synchronize()
                row.update({f"{method}_graph_ms": med, f"{method}_graph_p20_ms": p20,
                            f"{method}_graph_p80_ms": p80,
                            f"{method}_graph_rel_err": ((graph_out.float() - ref).norm() / ref.norm()).item()})
                del graph, replay, graph_out
            for p in OURS:
                row[f"ours_{p}_speedup"] = row["torch_grouped_mm_ms"] / row[f"ours_{p}_ms"]
                row[f"ours_{p}_graph_speedup"] = row["torch_grouped_mm_graph_ms"] / row[f"ours_{p}_graph_ms"]
            rows.append({**row, **env})
            print(f"{name} T={t}: torch {row['torch_grouped_mm_ms']:.3f} ms "
                  f"(graph {row['torch_grouped_mm_graph_ms']:.3f}); " + ", ".join(
                      f"{p} {row[f'ours_{p}_ms']:.3f} ms ({row[f'ours_{p}_speedup']:.2f}x), "
                      f"graph {row[f'ours_{p}_graph_ms']:.3f} ms ({row[f'ours_{p}_graph_speedup']:.2f}x)"
                      for p in OURS), flush=True)
            del x, w1, w2, gating
            torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "bench_fused_moe.csv"), rows)
    _plot(rows, os.path.join(args.out, "bench_fused_moe.png"))
    print(env)
    print_table(rows, ["config", "T", "weight_MB", "floor_ms", "torch_grouped_mm_ms", "torch_grouped_mm_graph_ms"]
                + [f"ours_{p}_{c}" for p in OURS for c in ("ms", "graph_ms", "speedup", "graph_speedup", "host_us")])


# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages) tried by --sweep-tiles (4 warps, persistent programs);
# BLOCK_N is per half with the GLU epilogue (two accumulators).
TILE_CANDIDATES = {
    "glu": [(m, n, k, st) for m in (16, 32, 64)
            for n, k, st in ((64, 128, 4), (64, 128, 5), (128, 128, 3), (64, 256, 3), (32, 256, 4))],
    "down": [(m, n, k, st) for m in (16, 32, 64)
             for n, k, st in ((128, 128, 4), (128, 128, 5), (256, 64, 4), (64, 256, 4), (128, 256, 3))],
}


def sweep_tiles(args):
    """The decode form's GEMMs at each T under every candidate tile, against the default."""
    env = environment()
    rows = []
    for name in args.configs:
        _, h, f, e, k = CONFIGS[name]
        for t in args.tokens:
            x, w1, w2, gating = make(t, h, f, e, torch.bfloat16, "cuda")
            _, counts, _, row_assignment = softmax_topk_route(gating, k, True)
            hit = int((counts > 0).sum())
            a_NF = torch.randn(t * k, f, dtype=x.dtype, device=x.device)
            gemms = {
                "glu": (lambda cfg: triton_gmm(x, w1, counts, trans_b=True, a_rows=row_assignment, rows_top_k=k,
                                               glu="silu", config=cfg), w1),
                "down": (lambda cfg: triton_gmm(a_NF, w2, counts, trans_b=True, config=cfg), w2),
            }
            for gemm, (fn, w) in gemms.items():
                nbytes = hit * w[0].numel() * w.element_size()
                expected = fn(None).float()
                default = gmm_config(x, t * k / e, gemm == "glu")
                candidates = [None] + [dict(block_m=m, block_n=n, block_k=kk, num_stages=st, num_warps=4,
                                            persistent=True, tma_store=False)
                                       for m, n, kk, st in TILE_CANDIDATES[gemm]]
                for cfg in candidates:
                    try:
                        out = fn(cfg).float()
                        ms = timed(lambda: fn(cfg), warmup=10, rep=50)[0]
                    except Exception as err:  # a tile that does not compile (shared memory)
                        print(f"{name} T={t} {gemm} {cfg}: {type(err).__name__}: {str(err)[:80]}")
                        continue
                    tile = with_overrides(default, cfg)
                    rows.append({"config": name, "T": t, "gemm": gemm, "default": cfg is None,
                                 **{key: getattr(tile, key) for key in ("block_m", "block_n", "block_k", "num_stages")},
                                 "ms": ms, "GBs": nbytes / ms / 1e6,
                                 "max_abs_diff": (out - expected).abs().max().item(), **env})
                best = min((r for r in rows if (r["config"], r["T"], r["gemm"]) == (name, t, gemm)),
                           key=lambda r: r["ms"])
                base = next(r for r in rows if (r["config"], r["T"], r["gemm"], r["default"]) == (name, t, gemm, True))
                print(f"{name} T={t} {gemm}: default {base['ms']:.4f} ms ({base['GBs']:.0f} GB/s), best "
                      f"{best['ms']:.4f} ms ({best['GBs']:.0f} GB/s) at {best['block_m']}x{best['block_n']}"
                      f"x{best['block_k']}/{best['num_stages']}", flush=True)
            del x, w1, w2
            torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "bench_fused_moe_tiles.csv"), rows)


def _plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG")
        return
    names = sorted({r["config"] for r in rows})
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        rs = [r for r in rows if r["config"] == name]
        ts = [r["T"] for r in rs]
        for i, method in enumerate(["torch_grouped_mm"] + [f"ours_{p}" for p in OURS]):
            color = f"C{i}"
            ax.plot(ts, [r[f"{method}_ms"] for r in rs], marker="o", color=color, label=method)
            ax.plot(ts, [r.get(f"{method}_graph_ms", float("nan")) for r in rs], marker="x", linestyle=":",
                    color=color, label=f"{method} (CUDA graph)")
        ax.plot(ts, [r["floor_ms"] for r in rs], "k--", label="weight-read floor")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens T")
        ax.set_ylabel("ms (bf16, forward)")
        ax.set_title(name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def smoke():
    """CPU: every method on tiny shapes of both layer kinds, against the per-token loop."""
    for t in (1, 5, 16):
        for h, f, e, k in ((32, 48, 8, 2), (16, 12, 16, 8)):
            x, w1, w2, gating = make(t, h, f, e, torch.float32, "cpu", seed=t)
            ref = fused_moe_reference(x, w1, w2, gating, k, True).float()
            for method, fn in methods(x, w1, w2, gating, k).items():
                err = ((fn().float() - ref).norm() / ref.norm()).item()
                assert err < 1e-4, (method, t, h, f, e, k, err)
    print("bench_fused_moe smoke: ok")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=".")
    p.add_argument("--configs", nargs="*", default=list(DECODE_CONFIGS), choices=list(CONFIGS))
    p.add_argument("--tokens", nargs="*", type=int, default=list(TOKENS))
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--profile", action="store_true", help="print each method's kernels (CUDA)")
    p.add_argument("--sweep-tiles", action="store_true", help="the decode form's GEMM tiles (CUDA)")
    args = p.parse_args()
    if args.smoke or not torch.cuda.is_available():
        smoke()
        return
    if args.sweep_tiles:
        sweep_tiles(args)
        return
    bench(args)


if __name__ == "__main__":
    main()
