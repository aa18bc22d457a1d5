"""Gather / scatter kernels (megablocks/backend/permute.py) against the device copy bandwidth.

    python benchmarks/bench_permute.py --out DIR            # CUDA: T=16384, K=8, E=64, H=2048, bf16
    python benchmarks/bench_permute.py --out DIR --sweep    # also time other tiles of the row kernels
    python benchmarks/bench_permute.py --out DIR --smoke    # tiny shapes; runs on CPU (interpreter)

Every row kernel is timed on its own (maps precomputed), forward and backward, plus each public op
forward+backward (`.backward()` into `.grad` that is None at the step's start) and the plain-torch
reference forward as the in-process baseline.
GB/s counts the bytes that must move at least once: rows read + rows written (+ weights), not the
small index maps. The ceiling is `y.copy_(x)` of the [N, H] buffer, measured in the same run.
"""

import argparse
import functools
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    # Without a GPU the kernels run in Triton's interpreter (set before megablocks is imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import copy_bandwidth_gbs, environment, print_table, write_csv  # noqa: E402

from megablocks.backend import permute as kernels  # noqa: E402
from megablocks.ops import permute as P  # noqa: E402


def timer(device):
    """(median, p20, p80) ms: do_bench on CUDA, wall clock over a few calls on CPU."""
    if device == "cuda":
        from common import timed

        return timed

    def wall(fn, reps=3):
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        ts.sort()
        return ts[len(ts) // 2], ts[0], ts[-1]

    return wall


def make_routing(tokens, experts, top_k, block_size, device):
    top_experts = torch.rand(tokens, experts, device=device).argsort(dim=1)[:, :top_k].int()
    flat = top_experts.flatten()
    bin_ids, indices = torch.sort(flat, stable=True)
    counts = torch.bincount(flat, minlength=experts)
    bins = counts.cumsum(0).int()
    padded_bins = ((counts + block_size - 1) // block_size * block_size).cumsum(0).int()
    return indices.int(), bin_ids.int(), bins, padded_bins, counts


def _backward_step(fwd, inputs, grad):
    """One training step of `fwd`: every `.grad` of `inputs` None, then `.backward()` into them."""
    for t in inputs:
        t.grad = None
    fwd().backward(grad)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=".")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU smoke test)")
    p.add_argument("--sweep", action="store_true", help="also time other tiles of the row kernels")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--capacity-factor", type=float, default=1.0)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke or device == "cpu":
        args.tokens, args.hidden, args.top_k, args.experts, args.block_size = 64, 96, 2, 4, 16
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    T, H, K, E, B = args.tokens, args.hidden, args.top_k, args.experts, args.block_size
    N = T * K
    timed = timer(device)
    env = environment()
    torch.manual_seed(0)

    indices, bin_ids, bins, padded_bins, counts = make_routing(T, E, K, B, device)
    num_padded = P.padded_rows_bound(N, E, B)
    capacity = max(1, int(args.capacity_factor * N / E))
    kept = int(counts.clamp(max=capacity).sum())
    x_TH = torch.randn(T, H, device=device, dtype=dtype)
    w_N = torch.rand(N, device=device, dtype=dtype)
    esize, wsize = x_TH.element_size(), w_N.element_size()

    route_args = dict(bin_ids_N=bin_ids, padded_bins_E=padded_bins)
    # layout: (buffer rows, its maps, rows a scatter reads)
    layouts = {
        "plain": (N, kernels.route(indices, bins, layout="plain", num_rows=N), N),
        "padded": (num_padded, kernels.route(indices, bins, layout="padded", num_rows=num_padded, **route_args), N),
        "binned": (
            E * capacity,
            kernels.route(indices, bins, layout="binned", num_rows=E * capacity, bin_size=capacity),
            kept,
        ),
    }

    copy_gbs = copy_bandwidth_gbs(N * H * esize, device) if device == "cuda" else float("nan")
    rows = []

    def record(name, fn, nbytes, kind="kernel", **extra):
        med, p20, p80 = timed(fn)
        gbs = nbytes / med / 1e6
        rows.append({
            "name": name, "kind": kind, "ms": med, "p20_ms": p20, "p80_ms": p80, "GB/s": gbs,
            "pct_copy": 100 * gbs / copy_gbs, **extra, "T": T, "H": H, "K": K, "E": E,
            "dtype": str(dtype).split(".")[1], **env,
        })

    def host_us(fn, calls=20):
        """Host time per call (launches queue up behind the GPU; it runs ahead unless it is slower)."""
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) / calls * 1e6

    ib = (indices, bin_ids, bins)  # the routing arguments every op takes first

    # Correctness first: each op against its plain-torch reference, bitwise.
    y_pad = P.padded_gather(x_TH, *ib, padded_bins, K, block_size=B)
    checks = {
        "gather": (P.gather(x_TH, *ib, K), P.gather_reference(x_TH, *ib, K)),
        "padded_gather": (y_pad, P.padded_gather_reference(x_TH, *ib, padded_bins, K, block_size=B)),
        "padded_scatter": (
            P.padded_scatter(y_pad, indices, bin_ids, w_N, bins, padded_bins, K),
            P.padded_scatter_reference(y_pad, indices, bin_ids, w_N, bins, padded_bins, K),
        ),
    }
    for name, (got, want) in checks.items():
        if not torch.equal(got, want):
            raise SystemExit(f"bench_permute: {name} disagrees with its reference")

    for layout, (num_rows, (assignment_row, row_assignment), rows_read) in layouts.items():
        idx_bytes = indices.numel() * indices.element_size()
        record(f"route[{layout}]", lambda: kernels.route(
            indices, bins, layout=layout, num_rows=num_rows, bin_size=capacity, **route_args
        ), idx_bytes + 4 * (N + num_rows))
        buf = torch.randn(num_rows, H, device=device).to(dtype)
        g_TH = torch.randn(T, H, device=device).to(dtype)
        gather_bytes = (T + num_rows) * H * esize
        scatter_bytes = (rows_read + T) * H * esize
        maps = (assignment_row, row_assignment)
        record(f"gather_rows[{layout}]", lambda: kernels.gather_rows(x_TH, *maps, None, K), gather_bytes)
        record(f"gather_rows[{layout}]+w", lambda: kernels.gather_rows(x_TH, *maps, w_N, K), gather_bytes + N * wsize)
        record(f"scatter_rows[{layout}]", lambda: kernels.scatter_rows(buf, assignment_row, None, K), scatter_bytes)
        record(f"scatter_rows[{layout}]+w", lambda: kernels.scatter_rows(buf, assignment_row, w_N, K),
               scatter_bytes + N * wsize)
        record(f"weight_grad[{layout}]", lambda: kernels.weight_grad(buf, g_TH, assignment_row, K),
               scatter_bytes + N * 4)

    # Whole ops, forward + backward through autograd (route included), and the torch reference forward.
    x_req = x_TH.clone().requires_grad_()
    w_req = w_N.clone().requires_grad_()
    x_N = torch.randn(N, H, device=device).to(dtype).requires_grad_()
    x_P = y_pad.detach().clone().requires_grad_()
    x_B = torch.randn(E, capacity, H, device=device).to(dtype).requires_grad_()
    row_bytes = H * esize
    # name: (forward, its differentiable inputs, minimal bytes of the forward, torch reference forward)
    ops = {
        "gather": (
            lambda: P.gather(x_req, *ib, K), [x_req], (T + N) * row_bytes,
            lambda: P.gather_reference(x_TH, *ib, K),
        ),
        "scatter": (
            lambda: P.scatter(x_N, indices, bin_ids, w_req, bins, K), [x_N, w_req], (T + N) * row_bytes,
            lambda: P.scatter_reference(x_N.detach(), indices, bin_ids, w_N, bins, K),
        ),
        "padded_gather": (
            lambda: P.padded_gather(x_req, *ib, padded_bins, K, block_size=B), [x_req],
            (T + num_padded) * row_bytes,
            lambda: P.padded_gather_reference(x_TH, *ib, padded_bins, K, block_size=B),
        ),
        "padded_scatter": (
            lambda: P.padded_scatter(x_P, indices, bin_ids, w_req, bins, padded_bins, K), [x_P, w_req],
            (T + N) * row_bytes,
            lambda: P.padded_scatter_reference(x_P.detach(), indices, bin_ids, w_N, bins, padded_bins, K),
        ),
        "binned_gather": (
            lambda: P.binned_gather(x_req, indices, bins, capacity, K), [x_req], (T + E * capacity) * row_bytes,
            lambda: P.binned_gather_reference(x_TH, indices, bins, capacity, K),
        ),
        "binned_scatter": (
            lambda: P.binned_scatter(x_B, indices, w_req, bins, K), [x_B, w_req], (T + kept) * row_bytes,
            lambda: P.binned_scatter_reference(x_B.detach(), indices, w_N, bins, K),
        ),
    }
    for name, (fwd, inputs, nbytes, reference) in ops.items():
        record(f"{name} (torch reference)", reference, nbytes, kind="baseline fwd")
        record(name, fwd, nbytes, kind="op fwd", host_us=host_us(fwd))
        if device == "cuda":
            # The ops never sync with the host, so a forward can be captured and replayed as a CUDA
            # graph: this is its GPU time without the Python dispatch and launch cost.
            with torch.no_grad():
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    fwd()
            record(name, graph.replay, nbytes, kind="op fwd (CUDA graph)")
        g = torch.randn_like(fwd())
        # Forward + backward moves the rows twice (fwd, grad-x), three times with grad-weights.
        # Timed as training runs it: every `.grad` None, then `.backward()` into them.
        step = functools.partial(_backward_step, fwd, inputs, g)
        record(name, step, (1 + len(inputs)) * nbytes, kind="op fwd+bwd", host_us=host_us(step))

    if args.sweep:
        assignment_row, row_assignment = layouts["padded"][1]
        buf = torch.randn(num_padded, H, device=device).to(dtype)
        tiles = [kernels.Tile(r, c, w) for r, c, w in [
            (1, 2048, 4), (1, 2048, 8), (2, 2048, 8), (4, 2048, 8), (2, 2048, 16), (4, 2048, 16),
            (1, 1024, 4), (2, 1024, 4), (4, 1024, 8), (8, 512, 8), (1, 4096, 8), (1, 4096, 16),
        ] if c <= max(H, 16)]
        for tile in tiles:
            tag = f"r{tile.rows}c{tile.cols}w{tile.num_warps}"
            record(f"sweep gather_rows[padded] {tag}",
                   lambda: kernels.gather_rows(x_TH, assignment_row, row_assignment, None, K, tile=tile),
                   (T + num_padded) * H * esize, kind="sweep")
            record(f"sweep scatter_rows[padded]+w {tag}",
                   lambda: kernels.scatter_rows(buf, assignment_row, w_N, K, tile=tile),
                   (N + T) * H * esize + N * wsize, kind="sweep")
            record(f"sweep weight_grad[padded] {tag}",
                   lambda: kernels.weight_grad(buf, x_TH, assignment_row, K, tile=tile),
                   (N + T) * H * esize + N * 4, kind="sweep")

    write_csv(os.path.join(args.out, "bench_permute.csv"), rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        # The route kernel moves kilobytes; its microseconds are in the table, not on the chart.
        shown = [r for r in rows if r["kind"] in ("kernel", "op fwd", "op fwd (CUDA graph)", "baseline fwd")
                 and not r["name"].startswith("route")]
        fig, ax = plt.subplots(figsize=(10, 0.28 * len(shown) + 1.5))
        ax.barh([f"{r['name']} ({r['kind']})" for r in shown], [r["GB/s"] for r in shown])
        if copy_gbs == copy_gbs:
            ax.axvline(copy_gbs, color="k", linestyle="--", label=f"copy {copy_gbs:.0f} GB/s")
            ax.axvline(0.7 * copy_gbs, color="r", linestyle=":", label="70% of copy")
            ax.legend()
        ax.invert_yaxis()
        ax.set_xlabel("GB/s (minimal bytes read + written)")
        ax.set_title(f"permute kernels, T={T} K={K} E={E} H={H} {dtype}, {env['gpu']}")
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "bench_permute.png"), dpi=120)
    except ImportError:
        print("bench_permute: matplotlib not importable; no PNG")

    print(f"# {env['gpu']}  torch {env['torch']}  triton {env['triton']}  commit {env['commit']}")
    print(f"# T={T} K={K} N={N} E={E} H={H} {dtype}  P={num_padded}  capacity={capacity} "
          f"(kept {kept} of {N})")
    print(f"# device copy: {copy_gbs:.0f} GB/s (read + write of {N * H * esize / 1e6:.0f} MB)")
    print_table(rows, ["name", "kind", "ms", "p20_ms", "p80_ms", "GB/s", "pct_copy", "host_us"])


if __name__ == "__main__":
    main()
