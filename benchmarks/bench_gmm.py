"""Grouped GEMM backends on the expert products of the target layer configs (`common.CONFIGS`),
next to a dense GEMM of the same FLOPs timed in the same run.

    python benchmarks/bench_gmm.py --out DIR            # CUDA, bf16: CSV + PNG + table
    python benchmarks/bench_gmm.py --out DIR --sweep    # also time tile configs of the kernels
    python benchmarks/bench_gmm.py --smoke              # CPU: tiny shapes, checks only

Per config (T tokens, hidden H, ffn F, E experts, top-k) the M = T·k routed rows are grouped by
a random router's counts. Each expert projection has three products, in dMoE's layouts
(`w1`, `w2` as `[E, F, H]`):
    up   (w1, v1: H -> F):  fwd x_MH·w1[e]^T, grad-input dy_MF·w1[e], grad-weight dy^T·x per group
    down (w2: F -> H):      fwd h_MF·w2[e],   grad-input dy_MH·w2[e]^T, grad-weight h^T·dy per group
The dense baseline is one torch matmul of the same M, K, N (and operand layouts).
"""

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CONFIGS, environment, print_table, write_csv  # noqa: E402

from megablocks.backend import gmm as gb  # noqa: E402
from megablocks.ops.gmm import gmm_reference  # noqa: E402


# Launch configs tried by --sweep (16-bit inputs on the H100): keys of backend.gmm._config,
# plus `use_tma`; each is compared with the default config in the same run.
_T256 = dict(block_m=128, block_n=256, block_k=64, group_m=8, num_warps=8, num_stages=3)
SWEEP_FIXED_K = {
    "pers_no_tma_store": dict(_T256, persistent=True, tma_store=False),
    "tile_each_no_tma_store": dict(_T256, persistent=False, tma_store=False),
    "pers_s4_no_tma_store": dict(_T256, persistent=True, tma_store=False, num_stages=4),
}
SWEEP_VAR_K = {
    "pers_no_tma_store": dict(_T256, persistent=True, tma_store=False),
    "tile_each": dict(_T256, persistent=False, tma_store=True),
    "tile_each_no_tma_store": dict(_T256, persistent=False, tma_store=False),
}


def _sweep_fn(a, b, bs, ta, tb, cfg):
    cfg = dict(cfg)
    use_tma = cfg.pop("use_tma", None)
    return lambda: gb.triton_gmm(a, b, bs, ta, tb, use_tma=use_tma, config=cfg)


def measure(fns, rounds=3, rep=60):
    """{name: (median, p20, p80) ms}: each fn timed `rounds` times, interleaved with the others
    so that clock and power changes fall on all of them alike; percentiles over all samples."""
    import triton.testing

    for name in list(fns):
        try:
            fns[name]()
        except Exception as err:  # a config that does not compile here is reported, not fatal
            print(f"  {name}: failed: {type(err).__name__}: {str(err)[:200]}")
            del fns[name]
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name] += triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="all")
    out = {}
    for name, xs in samples.items():
        t = torch.tensor(xs)
        out[name] = tuple(torch.quantile(t, q).item() for q in (0.5, 0.2, 0.8))
    return out


def warm_up_gpu(seconds=3.0):
    """Brings the clocks up before the first measurement."""
    x = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    while True:
        for _ in range(10):
            x @ x
        end.record()
        end.synchronize()
        if start.elapsed_time(end) > seconds * 1e3:
            return


def routed_counts(rows: int, experts: int, device) -> torch.Tensor:
    """Rows per expert from a uniform random router (seeded)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, experts, (rows,), generator=g)
    return torch.bincount(ids, minlength=experts).to(device, torch.int32)


def products(T, H, F, E, k, dtype, device):
    """(projection, product, M, K, N, {backend name: fn(backend)}, dense fn) per expert product."""
    M = T * k
    bs = routed_counts(M, E, device)
    torch.manual_seed(0)
    x = torch.randn(M, H, dtype=dtype, device=device)
    h = torch.randn(M, F, dtype=dtype, device=device)
    dy_up = torch.randn(M, F, dtype=dtype, device=device)
    dy_down = torch.randn(M, H, dtype=dtype, device=device)
    w = torch.randn(E, F, H, dtype=dtype, device=device) / H**0.5
    w0 = w[0]
    # (projection, product, (a, b, trans_a, trans_b), dense thunk)
    return bs, [
        ("up", "fwd", (x, w, False, True), lambda: x @ w0.t()),
        ("up", "grad_input", (dy_up, w, False, False), lambda: dy_up @ w0),
        ("up", "grad_weight", (dy_up, x, True, False), lambda: dy_up.t() @ x),
        ("down", "fwd", (h, w, False, False), lambda: h @ w0),
        ("down", "grad_input", (dy_down, w, False, True), lambda: dy_down @ w0.t()),
        ("down", "grad_weight", (h, dy_down, True, False), lambda: h.t() @ dy_down),
    ]


def mkn(a, b, trans_a, trans_b):
    if trans_a:
        return a.shape[0], a.shape[1], b.shape[1]
    return a.shape[0], a.shape[1], b.shape[1] if trans_b else b.shape[2]


def rel_err(a, b, bs, trans_a, trans_b, backend):
    """Relative (Frobenius) error of one backend's result against the reference loop."""
    out = gb.gmm(a, b, bs, trans_a, trans_b, backend=backend).float()
    ref = gmm_reference(a, b, bs.cpu(), trans_a, trans_b).float()
    return ((out - ref).norm() / ref.norm()).item()


def bench(args):
    env = environment()
    device, dtype = "cuda", torch.bfloat16
    backends = ["triton", "torch"]
    try:
        import grouped_gemm  # noqa: F401

        backends.append("gg")
    except ImportError:
        print("grouped_gemm not installed: backend 'gg' skipped")
    warm_up_gpu()
    rows, sweep_rows = [], []
    for name in args.configs:
        T, H, F, E, k = CONFIGS[name]
        bs, prods = products(T, H, F, E, k, dtype, device)
        bs_host = bs.cpu().long()
        for proj, prod, (a, b, ta, tb), dense in prods:
            M, K, N = mkn(a, b, ta, tb)
            flops = 2 * M * K * N
            fns = {"dense": dense}
            for be in backends:
                sizes = bs_host if be == "gg" else bs
                fns[be] = lambda be=be, sizes=sizes: gb.gmm(a, b, sizes, ta, tb, backend=be)
            if args.sweep:
                variants = SWEEP_VAR_K if ta else SWEEP_FIXED_K
                for vname, cfg in variants.items():
                    fns[f"sweep:{vname}"] = _sweep_fn(a, b, bs, ta, tb, cfg)
            times = measure(fns, rounds=args.rounds)
            row = {"config": name, "proj": proj, "product": prod, "M": M, "K": K, "N": N, "E": E}
            for be in ["dense"] + backends:
                med, p20, p80 = times.get(be, (float("nan"),) * 3)
                row.update({f"{be}_ms": med, f"{be}_p20_ms": p20, f"{be}_p80_ms": p80,
                            f"{be}_tflops": flops / med / 1e9})
                if be != "dense":
                    row[f"{be}_pct_dense"] = 100 * times["dense"][0] / med
            row["triton_rel_err"] = rel_err(a, b, bs, ta, tb, "triton") if "triton" in times else float("nan")
            rows.append({**row, **env})
            for vname in [n for n in times if n.startswith("sweep:")]:
                sweep_rows.append({"config": name, "proj": proj, "product": prod, "variant": vname[6:],
                                   "ms": times[vname][0], "pct_dense": 100 * times["dense"][0] / times[vname][0]})
                print(f"  {vname[6:]:>20}: {times[vname][0]:.3f} ms, {sweep_rows[-1]['pct_dense']:.1f}% of dense")
            print(f"{name} {proj} {prod}: dense {row['dense_tflops']:.0f} TFLOP/s; " + ", ".join(
                f"{be} {row[f'{be}_tflops']:.0f} ({row[f'{be}_pct_dense']:.0f}%)" for be in backends)
                + f"; triton rel err {row['triton_rel_err']:.1e}", flush=True)
        del prods, bs
        torch.cuda.empty_cache()

    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "bench_gmm.csv"), rows)
    if sweep_rows:
        write_csv(os.path.join(args.out, "bench_gmm_sweep.csv"), sweep_rows)
    _plot(rows, backends, os.path.join(args.out, "bench_gmm.png"))
    print(env)
    cols = ["config", "proj", "product", "M", "K", "N", "dense_tflops"]
    for be in backends:
        cols += [f"{be}_tflops", f"{be}_pct_dense"]
    print_table(rows, cols)


def _plot(rows, backends, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG")
        return
    labels = [f"{r['config']}\n{r['proj']} {r['product']}" for r in rows]
    xs = range(len(rows))
    width = 0.8 / (len(backends) + 1)
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.9), 5))
    for i, be in enumerate(["dense"] + backends):
        ax.bar([x + i * width for x in xs], [r[f"{be}_tflops"] for r in rows], width, label=be)
    ax.set_xticks([x + 0.4 for x in xs])
    ax.set_xticklabels(labels, fontsize=6, rotation=90)
    ax.set_ylabel("TFLOP/s (bf16)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def smoke():
    """CPU: every product of a tiny config through every backend there, against the reference."""
    bs, prods = products(16, 32, 48, 4, 2, torch.float32, "cpu")
    for proj, prod, (a, b, ta, tb), _ in prods:
        for be in ("triton", "torch"):
            err = rel_err(a, b, bs, ta, tb, be)
            assert err < 1e-4, (proj, prod, be, err)
    print("bench_gmm smoke: ok")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=".")
    p.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per product")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    if args.smoke or not torch.cuda.is_available():
        smoke()
        return
    bench(args)


if __name__ == "__main__":
    main()
