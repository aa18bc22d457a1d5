"""The weight-gradient (variable-K) grouped GEMM at few rows per expert: launch configs (CUDA).

    python benchmarks/sweep_var_k.py --out DIR

At T = 64 each expert's weight gradient sums a handful of rows: the product writes E·F·H
outputs from a few bytes of input, so its floor is the output's bytes at the copy bandwidth.
Times each config of `CONFIGS` (keys of megablocks.backend.gmm._config) on the up and down
weight gradients of mixtral and qwen3moe at T = 64, against that floor (device copy in the same
run), and checks each result against the default config's.
"""

import argparse
import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gmm import routed_counts  # noqa: E402
from common import CONFIGS, environment, print_table, write_csv  # noqa: E402

from megablocks.backend import gmm as gb  # noqa: E402

CONFIGS_TRIED = {
    "default": None,
    "t128x256_r64_w8_s3_pers": dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3,
                                    PERSISTENT=True, TMA_STORE=True),
    "t128x128_r32_w4_s2": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=4, num_stages=2,
                               PERSISTENT=False, TMA_STORE=True),
    "t128x128_r16_w4_s2": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=16, num_warps=4, num_stages=2,
                               PERSISTENT=False, TMA_STORE=True),
    "t128x128_r16_w4_s1": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=16, num_warps=4, num_stages=1,
                               PERSISTENT=False, TMA_STORE=True),
    "t64x128_r16_w4_s2": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=16, num_warps=4, num_stages=2,
                              PERSISTENT=False, TMA_STORE=True),
    "t128x256_r16_w8_s2": dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=16, num_warps=8, num_stages=2,
                               PERSISTENT=False, TMA_STORE=True),
    "t128x128_r32_w4_s2_nostore": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=4, num_stages=2,
                                       PERSISTENT=False, TMA_STORE=False),
    "t128x128_r16_w4_s2_pers": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=16, num_warps=4, num_stages=2,
                                    PERSISTENT=True, TMA_STORE=True),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=".")
    p.add_argument("--tokens", type=int, default=64)
    args = p.parse_args()
    env = environment()
    copy_src = torch.empty(2**30 // 2, dtype=torch.bfloat16, device="cuda")
    copy_dst = torch.empty_like(copy_src)
    copy_ms = triton.testing.do_bench(lambda: copy_dst.copy_(copy_src), rep=200)
    copy_gbs = 2 * copy_src.numel() * 2 / copy_ms / 1e6
    print(f"device copy: {copy_gbs:.0f} GB/s")
    rows = []
    for name in ("mixtral", "qwen3moe"):
        _, H, F, E, k = CONFIGS[name]
        M = args.tokens * k
        bs = routed_counts(M, E, "cuda")
        torch.manual_seed(0)
        x = torch.randn(M, H, dtype=torch.bfloat16, device="cuda")
        dy = torch.randn(M, F, dtype=torch.bfloat16, device="cuda")
        for proj, a, b in (("up", dy, x), ("down", dy, x)):
            if proj == "down":
                a, b = torch.randn(M, F, dtype=torch.bfloat16, device="cuda"), torch.randn(M, H, dtype=torch.bfloat16, device="cuda")
            expected = gb.triton_gmm(a, b, bs, True, False)
            out_bytes = expected.numel() * expected.element_size()
            floor_ms = out_bytes / (copy_gbs / 2) / 1e6  # writes only: half a copy's traffic
            for cname, cfg in CONFIGS_TRIED.items():
                fn = lambda: gb.triton_gmm(a, b, bs, True, False, config=cfg)  # noqa: E731
                try:
                    got = fn()
                    ok = torch.equal(got, expected) or (got.float() - expected.float()).abs().max().item() < 1e-2
                    ms = triton.testing.do_bench(fn, rep=200)
                except Exception as err:
                    print(f"{name} {proj} {cname}: failed: {type(err).__name__}: {str(err)[:120]}")
                    continue
                rows.append({"config": name, "proj": proj, "M": M, "K": a.shape[1], "N": b.shape[1], "E": E,
                             "variant": cname, "ms": ms, "floor_ms": floor_ms, "x_floor": ms / floor_ms,
                             "match": "ok" if ok else "MISMATCH", **env})
                print(f"{name} {proj} {cname}: {ms:.3f} ms ({ms / floor_ms:.2f}x floor {floor_ms:.3f}) {rows[-1]['match']}",
                      flush=True)
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "sweep_var_k.csv"), rows)
    print_table(rows, ["config", "proj", "variant", "ms", "floor_ms", "x_floor", "match"])


if __name__ == "__main__":
    main()
