"""The FP8 grouped GEMM (`megablocks.ops.fp8`) against our bf16 grouped GEMM on the forward
expert products of the target configs (`common.CONFIGS`), and the quantizers' bandwidth.

    python benchmarks/bench_fp8.py --out DIR        # CUDA: CSV + table
    python benchmarks/bench_fp8.py --smoke          # CPU: tiny shapes, checks only

Per config (T tokens, hidden H, ffn F, E experts, top-k), M = T·k routed rows grouped by a random
router's counts; the two forward products of an expert MLP, `x_MH · w1[e]^T` (H -> F) and
`h_MF · w2[e]^T` (F -> H, w2 in the checkpoints' [E, H, F] layout here), in bf16 (`gmm`, the
'triton' backend) and in FP8 (`gmm_fp8`, operands quantized beforehand: weights once per step,
activations by the layer); `quantize_rows` is timed on the same activations, against the copy
bandwidth measured in the same run. The target (issue "FP8 experts on Hopper"): FP8 >= 1.6x bf16
on the mixtral products.
"""

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gmm import routed_counts  # noqa: E402
from common import CONFIGS, copy_bandwidth_gbs, environment, print_table, timed, write_csv  # noqa: E402

from megablocks.backend import gmm as gb  # noqa: E402
from megablocks.ops import fp8  # noqa: E402


def products(T, H, F, E, k, device):
    """(name, x_MK bf16, w_ENK bf16, batch_sizes) of the two forward products."""
    M = T * k
    bs = routed_counts(M, E, device)
    torch.manual_seed(0)
    x = torch.randn(M, H, dtype=torch.bfloat16, device=device)
    h = torch.randn(M, F, dtype=torch.bfloat16, device=device)
    w1 = (torch.randn(E, F, H, device=device) / H**0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, H, F, device=device) / F**0.5).to(torch.bfloat16)
    return [("up", x, w1, bs), ("down", h, w2, bs)]


def bench(args):
    env = environment()
    bw = copy_bandwidth_gbs(1 << 30)
    rows = []
    for name in args.configs:
        T, H, F, E, k = CONFIGS[name]
        for proj, x, w, bs in products(T, H, F, E, k, "cuda"):
            M, K = x.shape
            N = w.shape[1]
            x_q, x_s = fp8.quantize_rows(x)
            w_q, w_s = fp8.quantize_blocks(w)
            ms_bf16 = timed(lambda: gb.gmm(x, w, bs, trans_b=True, backend="triton"))[0]
            ms_fp8 = timed(lambda: fp8.gmm_fp8(x_q, x_s, w_q, w_s, bs))[0]
            ms_q = timed(lambda: fp8.quantize_rows(x))[0]
            ref = gb.gmm(x, w, bs, trans_b=True, backend="triton").float()
            out = fp8.gmm_fp8(x_q, x_s, w_q, w_s, bs).float()
            flops = 2 * M * K * N
            rows.append(dict(
                config=name, product=proj, M=M, K=K, N=N, bf16_ms=ms_bf16, fp8_ms=ms_fp8,
                speedup=ms_bf16 / ms_fp8, bf16_tflops=flops / ms_bf16 / 1e9, fp8_tflops=flops / ms_fp8 / 1e9,
                quantize_ms=ms_q, quantize_gbs=(M * K * 2 + M * K + M * K // 32) / ms_q / 1e6, copy_gbs=bw,
                rel_rms_vs_bf16=((out - ref).norm() / ref.norm()).item(), **env,
            ))
    print_table(rows, ["config", "product", "M", "K", "N", "bf16_ms", "fp8_ms", "speedup", "fp8_tflops",
                       "quantize_ms", "quantize_gbs", "copy_gbs", "rel_rms_vs_bf16"])
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "bench_fp8.csv"), rows)


def smoke():
    """CPU: a tiny config through the quantizers and the FP8 GEMM; returns each product's
    relative error against the unquantized product (checked: < 6%)."""
    errors = {}
    for proj, x, w, bs in products(16, 64, 96, 4, 2, "cpu"):
        x, w = x.float(), w.float()
        out = fp8.gmm_fp8(*fp8.quantize_rows(x), *fp8.quantize_blocks(w), bs, out_dtype=torch.float32)
        ref = gb.gmm(x, w, bs, trans_b=True, backend="torch")
        errors[proj] = ((out - ref).norm() / ref.norm()).item()
        assert errors[proj] < 0.06, (proj, errors[proj])
    print("bench_fp8 smoke: ok", errors)
    return errors


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=".")
    p.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    if args.smoke or not torch.cuda.is_available():
        smoke()
        return
    bench(args)


if __name__ == "__main__":
    main()
