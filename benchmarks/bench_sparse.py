"""TFLOP/s of the block-sparse products of the dMoE expert MLP next to dense GEMMs of the same FLOPs.

    python benchmarks/bench_sparse.py --out DIR [--configs mixtral,olmoe] [--sweep]

For each target layer config (benchmarks/common.py CONFIGS) (bf16, block 128, random top-k routing) and each product of
one expert projection:

    sdd    x_PH @ w1ᵀ           forward (also dh = dy @ w2ᵀ: same shapes)     dense [P,H]@[H,F]
    dsd    h @ w2               forward (also dx = dx1 @ w1)                  dense [P,F]@[F,H]
    dsdT   dx1ᵀ @ x             grad-weight (also dw2 = hᵀ @ dy), [E·F, H]    dense [F,P]@[P,H]
    dds    xᵀ @ dx1             grad-weight in stk's form, [H, E·F]           dense [H,P]@[P,F]

FLOPs count the real blocks only: 2·P·F·H with P the real padded rows (padded_bins[-1]). The
dense GEMM is one torch.matmul of the same FLOPs (M, N, K as listed), timed in the same run,
interleaved with ours for `--rounds` rounds (medians reported; between runs one kernel moved
by up to ~15% on an H100); `vs_dense` is our TFLOP/s over its. `--sweep` also times candidate
tilings through the launchers, the measurement behind `default_config`.
"""

import argparse
import datetime
import functools
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CONFIGS, environment, print_table, timed, write_csv  # noqa: E402

BLOCK = 128


def _layer(name, dtype=torch.bfloat16, device="cuda"):
    """Random routing, topology and operands of one config; returns a namespace dict."""
    from megablocks.ops.topology import ExpertTopology, make_topology

    T, H, F, E, k = CONFIGS[name]
    g = torch.Generator(device=device).manual_seed(0)
    top = torch.rand(T, E, generator=g, device=device).topk(k, dim=1).indices.flatten()
    tokens = torch.bincount(top, minlength=E)
    padded_bins = torch.cumsum((tokens + BLOCK - 1) // BLOCK * BLOCK, 0).int()
    num_block_rows = (T * k + E * (BLOCK - 1)) // BLOCK
    topo = make_topology(padded_bins, block_size=BLOCK, num_block_rows=num_block_rows,
                         ffn_hidden_size=F, dtype=dtype)
    P = num_block_rows * BLOCK
    real_rows = int(padded_bins[-1])
    nnz = topo.row_indices.numel()

    def randn(*shape):
        return torch.randn(*shape, dtype=dtype, device=device, generator=g) / 8

    h = ExpertTopology(topo.size(), randn(nnz, BLOCK, BLOCK), topo.row_indices, topo.column_indices,
                       topo.offsets, topo.column_indices_t, topo.offsets_t, topo.block_offsets_t,
                       num_experts=E, ffn_hidden_size=F)  # keeps its expert layout through h.t()
    return dict(T=T, H=H, F=F, E=E, k=k, topo=topo, h=h, real_rows=real_rows,
                x=randn(P, H), w1=randn(E * F, H))


def _products(L):
    """name → (public-op callable, launcher-level callable taking a SparseConfig, dense (M, N, K))."""
    from megablocks.backend import sparse as backend
    from megablocks.ops import sparse as sp

    topo, h, x, w1 = L["topo"], L["h"], L["x"], L["w1"]
    E, F, H, P = L["E"], L["F"], L["H"], L["real_rows"]
    C = -(-F // BLOCK)
    Q = E * C
    R = topo.offsets.numel() - 1
    expert_map = (C, F)
    ident = (1, BLOCK)

    def sdd_cfg(cfg):
        return backend.sdd(x, w1.t(), topo.row_indices, topo.column_indices, topo.offsets,
                           block_size=BLOCK, num_block_cols=Q, group_blocks=C, group_size=F,
                           row_blocks=C, config=cfg)

    def dsd_cfg(cfg):
        out = x.new_empty(x.shape)
        return backend.dsd(h.data, topo.offsets, topo.column_indices, None, w1, out,
                           transposed=False, num_block_cols=Q, out_map=ident, in_map=expert_map,
                           slot_step=1, config=cfg)

    def dsdt_cfg(cfg):
        out = w1.new_empty(w1.shape)
        return backend.dsd(h.data, topo.offsets_t, topo.column_indices_t, topo.block_offsets_t,
                           x, out, transposed=True, num_block_cols=R, out_map=expert_map,
                           in_map=ident, slot_step=C, config=cfg)

    def dds_cfg(cfg):
        out = w1.new_empty((H, E * F))
        return backend.dsd(h.data, topo.offsets_t, topo.column_indices_t, topo.block_offsets_t,
                           x, out.t(), transposed=True, num_block_cols=R, out_map=expert_map,
                           in_map=ident, slot_step=C, config=cfg)

    return {
        "sdd": (lambda: sp.sdd(x, w1.t(), topo), sdd_cfg, (P, F, H)),
        "dsd": (lambda: sp.dsd(h, w1), dsd_cfg, (P, H, F)),
        "dsdT": (lambda: sp.dsd(h.t(), x), dsdt_cfg, (F, H, P)),
        "dds": (lambda: sp.dds(x.t(), h), dds_cfg, (H, F, P)),
    }


def _candidates(op):
    """Tilings compared by --sweep (the first is `default_config`'s on an H100, 16-bit inputs)."""
    from megablocks.backend.sparse import SparseConfig

    if op == "sdd":
        return [SparseConfig(block_k=64, num_warps=8, num_stages=s, group_m=g, slots=2, use_tma=t, persistent=p)
                for s, g, t, p in [(4, 4, True, True), (4, 4, True, False), (3, 4, True, True),
                                   (3, 8, True, True), (4, 8, True, True), (4, 4, False, True)]]
    return [SparseConfig(block_k=64, num_warps=8, num_stages=s, group_m=g, block_n=256, use_tma=t, persistent=p)
            for s, g, t, p in [(3, 8, True, False), (3, 8, True, True), (4, 8, True, True),
                               (3, 8, False, True), (3, 8, False, False)]]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=".")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved timings of each contender; medians are reported")
    p.add_argument("--sweep", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_sparse: needs CUDA; skipped")
        return
    os.makedirs(args.out, exist_ok=True)
    env = dict(environment(), date=datetime.date.today().isoformat())
    print(env)
    rows, sweep_rows = [], []
    for name in args.configs.split(","):
        L = _layer(name)
        for op, (fn, by_cfg, (m, n, k)) in _products(L).items():
            flops = 2.0 * m * n * k
            a = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            b = torch.randn(k, n, dtype=torch.bfloat16, device="cuda")
            contenders = {"ours": fn, "dense": lambda: a @ b}
            if args.sweep:
                for cfg in _candidates(op if op == "sdd" else "dsd"):
                    contenders[str(cfg)] = functools.partial(by_cfg, cfg)
            for key, f in list(contenders.items()):
                try:
                    f()
                except Exception as e:  # a tiling that does not fit shared memory
                    print(f"  {key}: {type(e).__name__}: {str(e)[:80]}")
                    del contenders[key]
            times = {key: [] for key in contenders}
            for _ in range(args.rounds):
                for key, f in contenders.items():
                    times[key].append(timed(f)[0])
            ms = {key: statistics.median(v) for key, v in times.items()}
            tf, tf_dense = flops / ms["ours"] / 1e9, flops / ms["dense"] / 1e9
            row = dict(config=name, product=op, M=m, N=n, K=k, ms=ms["ours"],
                       ms_min=min(times["ours"]), ms_max=max(times["ours"]), tflops=tf,
                       dense_ms=ms["dense"], dense_tflops=tf_dense, vs_dense=tf / tf_dense, **env)
            rows.append(row)
            print_table([row], ["config", "product", "M", "N", "K", "ms", "ms_min", "ms_max",
                                "tflops", "dense_tflops", "vs_dense"])
            for key in contenders:
                if key not in ("ours", "dense"):
                    sweep_rows.append(dict(config=name, product=op, cfg=key, ms=ms[key],
                                           tflops=flops / ms[key] / 1e9,
                                           vs_dense=ms["dense"] / ms[key]))
                    print(f"  {key}: {flops / ms[key] / 1e9:.0f} TFLOP/s "
                          f"({ms['dense'] / ms[key]:.3f} of dense)")
        del L
        torch.cuda.empty_cache()
    write_csv(os.path.join(args.out, "bench_sparse.csv"), rows)
    if sweep_rows:
        write_csv(os.path.join(args.out, "bench_sparse_sweep.csv"), sweep_rows)
    print()
    print_table(rows, ["config", "product", "ms", "tflops", "dense_tflops", "vs_dense"])
    _plot(rows, os.path.join(args.out, "bench_sparse.png"))


def _plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG")
        return
    labels = [f"{r['config']}\n{r['product']}" for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.6), 4))
    ax.bar([x - 0.2 for x in xs], [r["tflops"] for r in rows], 0.4, label="sparse (ours)")
    ax.bar([x + 0.2 for x in xs], [r["dense_tflops"] for r in rows], 0.4, label="dense GEMM, same FLOPs")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("TFLOP/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
