"""The FP8 grouped GEMM's launch configs against the bf16 grouped GEMM (CUDA).

    python benchmarks/sweep_fp8.py --out DIR [--configs mixtral olmoe]
    python benchmarks/sweep_fp8.py --out DIR --tokens 64 --variants 128x128x128_w8_s4 \
        16x128x128_w4_s4_swap 32x128x128_w4_s4_swap 64x128x128_w4_s4_swap    # decode tiles
    python benchmarks/sweep_fp8.py --out DIR --variants 128x128x128_w8_s4_tma_pers_ws \
        128x128x128_w8_s4_wgmma 128x128x128_w8_s5_wgmma                        # the Gluon form

Per config, three products of the expert MLP in the layer's forms: `up` (x · w1[e]^T, weights
[E, F, H] read K-major), `down` (h · w2[e]^T, [E, H, F]) and `dgrad` (the up projection's input
gradient dy · w1[e], the same [E, F, H] weights read N-major: `trans_b=False`). Each is timed in
bf16 (`gmm`, the 'triton' backend, its default tiles) and in FP8 (`gmm_fp8`, operands quantized
beforehand) at every variant of `VARIANTS`, and each FP8 result is checked against the first
variant's: equal bit for bit where both compute the same products in the same order
(`equal_to_first`); `max_rel_to_first` (the largest difference over the largest value) for the
`swap_ab` variants, whose tensor-core products sum in another order.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_fp8  # noqa: E402
from common import CONFIGS, environment, print_table, timed, write_csv  # noqa: E402

from megablocks.backend import gmm as gb  # noqa: E402
from megablocks.ops import fp8  # noqa: E402


def _variant(m, n, k, warps, stages, tma=False, persistent=False, warp_specialize=False, swap_ab=False, wgmma=False,
             xs_t=False, group_m=8, tma_store=True):
    """(name, gmm_fp8 config); `xs_t` (not a config key: the sweep's own) stores the rows' scales
    column by column ([KB, M] storage of the [M, KB] scales, each step's scales contiguous)."""
    name = f"{m}x{n}x{k}_w{warps}_s{stages}" + ("_tma" if tma else "") + ("_pers" if persistent else "")
    name += ("_ws" if warp_specialize else "") + ("_swap" if swap_ab else "") + ("_wgmma" if wgmma else "")
    name += ("_xsT" if xs_t else "") + (f"_g{group_m}" if group_m != 8 else "") + ("" if tma_store else "_stores")
    return name, dict(block_m=m, block_n=n, block_k=k, num_warps=warps, num_stages=stages, tma=tma,
                      persistent=persistent, warp_specialize=warp_specialize, swap_ab=swap_ab, wgmma=wgmma,
                      xs_t=xs_t, group_m=group_m, tma_store=tma_store)


# Pointer loads (the default until measured otherwise), then TMA loads at several depths, one
# program per SM, and 64-row tiles; the decode tiles (swap_ab) and the Gluon form (wgmma).
VARIANTS = dict(_variant(*v[:5], **v[5]) for v in [
    (128, 128, 128, 8, 4, {}),
    (128, 128, 128, 8, 4, dict(tma=True)),
    (128, 128, 128, 8, 3, dict(tma=True)),
    (128, 128, 128, 8, 5, dict(tma=True)),
    (128, 128, 128, 8, 4, dict(tma=True, persistent=True)),
    (128, 128, 128, 8, 3, dict(tma=True, persistent=True)),
    (64, 128, 128, 4, 4, dict(tma=True)),
    (64, 128, 128, 4, 6, dict(tma=True)),
    (128, 64, 128, 4, 4, dict(tma=True)),
    (128, 128, 64, 8, 6, dict(tma=True)),
    (128, 128, 128, 8, 3, dict(tma=True, persistent=True, warp_specialize=True)),
    (128, 128, 128, 8, 4, dict(tma=True, persistent=True, warp_specialize=True)),
    (128, 128, 128, 8, 3, dict(tma=True, warp_specialize=True)),
    (128, 128, 128, 4, 4, dict(tma=True, warp_specialize=True)),
    (16, 128, 128, 4, 4, dict(swap_ab=True)),
    (32, 128, 128, 4, 4, dict(swap_ab=True)),
    (64, 128, 128, 4, 4, dict(swap_ab=True)),
    (16, 128, 128, 4, 3, dict(swap_ab=True)),
    (16, 128, 128, 4, 6, dict(swap_ab=True)),
    (16, 128, 128, 8, 4, dict(swap_ab=True)),
    (16, 128, 64, 4, 8, dict(swap_ab=True)),
    (16, 64, 128, 4, 4, dict(swap_ab=True)),
    (16, 64, 128, 2, 4, dict(swap_ab=True)),
    (16, 256, 128, 4, 4, dict(swap_ab=True)),
    (16, 256, 128, 4, 3, dict(swap_ab=True)),
    (16, 256, 128, 8, 4, dict(swap_ab=True)),
    (32, 256, 128, 8, 4, dict(swap_ab=True)),
    (128, 128, 128, 8, 4, dict(wgmma=True)),
    (128, 128, 128, 8, 5, dict(wgmma=True)),
    (128, 128, 128, 8, 6, dict(wgmma=True)),
    (128, 128, 128, 8, 4, dict(tma=True, persistent=True, warp_specialize=True, xs_t=True)),
    (128, 128, 128, 8, 3, dict(tma=True, persistent=True, warp_specialize=True, xs_t=True)),
    (128, 128, 128, 8, 4, dict(wgmma=True, xs_t=True)),
    (128, 128, 128, 8, 4, dict(xs_t=True)),
    (128, 128, 128, 8, 4, dict(warp_specialize=True, wgmma=True)),
    (128, 128, 128, 8, 5, dict(warp_specialize=True, wgmma=True)),
    (128, 128, 128, 8, 6, dict(warp_specialize=True, wgmma=True)),
    (192, 128, 128, 4, 4, dict(warp_specialize=True, wgmma=True)),
    (192, 128, 128, 4, 5, dict(warp_specialize=True, wgmma=True)),
    (192, 128, 128, 4, 4, dict(warp_specialize=True, wgmma=True, group_m=1)),
    (192, 128, 128, 4, 4, dict(warp_specialize=True, wgmma=True, group_m=4)),
    (192, 128, 128, 4, 4, dict(warp_specialize=True, wgmma=True, group_m=16)),
    (192, 128, 128, 4, 4, dict(warp_specialize=True, wgmma=True, group_m=32)),
    (128, 128, 128, 4, 4, dict(warp_specialize=True, wgmma=True, group_m=16)),
    (192, 128, 128, 4, 4, dict(warp_specialize=True, wgmma=True, tma_store=False)),
    (128, 128, 128, 8, 4, dict(warp_specialize=True, wgmma=True, tma_store=False)),
    # The warp-specialized forms with the rows' scales stored column by column (each step's
    # scales of a consumer's 64 rows one contiguous 256-byte run instead of 64 lines).
    (128, 128, 128, 4, 4, dict(warp_specialize=True, wgmma=True)),
    (128, 128, 128, 4, 4, dict(warp_specialize=True, wgmma=True, xs_t=True)),
    (192, 128, 128, 4, 4, dict(warp_specialize=True, wgmma=True, xs_t=True)),
    # 256 x 128 tiles: two consumers of 128 rows (two 64-row pieces, one product in flight each).
    (256, 128, 128, 4, 4, dict(warp_specialize=True, wgmma=True)),
    (256, 128, 128, 4, 3, dict(warp_specialize=True, wgmma=True)),
    (256, 128, 128, 4, 4, dict(warp_specialize=True, wgmma=True, group_m=4)),
])


def products(T, H, F, E, k):
    """(name, x [M, K] bf16, w bf16, trans_b, batch_sizes) of the three products: bench_fp8's two
    forward products, and the up projection's input gradient over the same weights."""
    (_, x, w1, bs), (_, h, w2, _) = bench_fp8.products(T, H, F, E, k, "cuda")
    return [("up", x, w1, True, bs), ("down", h, w2, True, bs), ("dgrad", h, w1, False, bs)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=".")
    p.add_argument("--configs", nargs="*", default=["mixtral", "olmoe"], choices=list(CONFIGS))
    p.add_argument("--tokens", type=int, default=0, help="tokens per step (e.g. 64: decode); 0: each config's own")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="the first is the one the others are checked against")
    args = p.parse_args()
    env = environment()
    rows = []
    for name in args.configs:
        T, H, F, E, k = CONFIGS[name]
        for proj, x, w, trans_b, bs in products(args.tokens or T, H, F, E, k):
            x_q, x_s = fp8.quantize_rows(x)
            # 128 x 128 blocks: the same values and scales serve either form (trans_b=False reads
            # w1's [E, F, H] storage as [E, K, N]).
            w_q, w_s = fp8.quantize_blocks(w)
            M, K = x.shape
            N = w.shape[1] if trans_b else w.shape[2]
            ms_bf16 = timed(lambda: gb.gmm(x, w, bs, trans_b=trans_b, backend="triton"))[0]
            first = None
            for variant in args.variants:
                cfg = dict(VARIANTS[variant])
                xs = x_s.t().contiguous().t() if cfg.pop("xs_t") else x_s
                try:
                    out = fp8.gmm_fp8(x_q, xs, w_q, w_s, bs, trans_b=trans_b, config=cfg)
                    ms = timed(lambda: fp8.gmm_fp8(x_q, xs, w_q, w_s, bs, trans_b=trans_b, config=cfg))[0]
                except Exception as err:  # a variant that does not compile or fit on this GPU
                    print(f"{name} {proj} {variant}: failed: {type(err).__name__}: {str(err)[:200]}", flush=True)
                    continue
                if first is None:
                    first = out
                rows.append(dict(config=name, product=proj, M=M, K=K, N=N, variant=variant, bf16_ms=ms_bf16,
                                 fp8_ms=ms, speedup=ms_bf16 / ms, fp8_tflops=2 * M * K * N / ms / 1e9,
                                 equal_to_first=bool(torch.equal(out, first)),
                                 max_rel_to_first=((out.float() - first.float()).abs().max()
                                                   / first.float().abs().max().clamp_min(1e-30)).item(), **env))
    print_table(rows, ["config", "product", "variant", "bf16_ms", "fp8_ms", "speedup", "fp8_tflops",
                       "equal_to_first", "max_rel_to_first"])
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "sweep_fp8.csv"), rows)


if __name__ == "__main__":
    main()
