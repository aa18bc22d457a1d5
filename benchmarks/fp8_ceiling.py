"""cuBLAS's FP8 GEMMs at the configs' expert-product shapes: the ceiling our grouped FP8 GEMM is
read against (CUDA).

    python benchmarks/fp8_ceiling.py --out DIR [--configs mixtral olmoe qwen3moe]

Per config, the up product (M = T·top_k rows, K = H, N = F) and the down product (K = F, N = H)
as one dense GEMM of all M rows (no grouping: what a grouped GEMM of the same FLOPs can at best
reach), timed through `torch._scaled_mm` with e4m3 operands and scales per tensor, per row and
column, and in DeepSeek-V3's blocks (1 x 128 tiles of the rows, 128 x 128 blocks of the weight:
the recipe `gmm_fp8` runs), against the bf16 GEMM (`torch.mm`); and 8192³ for reference. A form
this torch or cuBLAS does not offer is reported as such (`error`), not timed.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CONFIGS, environment, print_table, timed, write_csv  # noqa: E402

FP8 = torch.float8_e4m3fn


def _scales(form: str, M: int, K: int, N: int, device):
    """(scale_a, scale_b) of ones in the layout `torch._scaled_mm` takes for `form`: per tensor,
    per row of a and column of b, or blockwise (a's [M, K/128] stored M-major, b's [K/128, N/128]
    stored K-major)."""
    if form == "tensor":
        return torch.ones((), device=device), torch.ones((), device=device)
    if form == "row":
        return torch.ones(M, 1, device=device), torch.ones(1, N, device=device)
    return torch.ones(K // 128, M, device=device).t(), torch.ones(N // 128, K // 128, device=device).t()


def rows(name: str, M: int, K: int, N: int, product: str, env: dict):
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    flops = 2 * M * N * K
    ms_bf16 = timed(lambda: a @ b.t())[0]
    out = [dict(config=name, product=product, M=M, K=K, N=N, form="bf16", ms=ms_bf16,
                tflops=flops / ms_bf16 / 1e9, vs_bf16=1.0, error="", **env)]
    a8, b8 = a.to(FP8), b.to(FP8)
    for form in ("tensor", "row", "block"):
        sa, sb = _scales(form, M, K, N, a.device)
        call = lambda: torch._scaled_mm(a8, b8.t(), sa, sb, out_dtype=torch.bfloat16)  # noqa: E731
        try:
            call()
            torch.cuda.synchronize()
        except Exception as err:  # a form this build does not offer: recorded, not timed
            out.append(dict(config=name, product=product, M=M, K=K, N=N, form=form, ms=float("nan"),
                            tflops=float("nan"), vs_bf16=float("nan"), error=str(err).splitlines()[0][:160], **env))
            continue
        ms = timed(call)[0]
        out.append(dict(config=name, product=product, M=M, K=K, N=N, form=form, ms=ms, tflops=flops / ms / 1e9,
                        vs_bf16=ms_bf16 / ms, error="", **env))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".")
    p.add_argument("--configs", nargs="*", default=["mixtral", "olmoe", "qwen3moe"], choices=list(CONFIGS))
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("fp8_ceiling.py times cuBLAS on a GPU; none here")
    env = environment()
    table = []
    for name in args.configs:
        T, H, F, _, k = CONFIGS[name]
        table += rows(name, T * k, H, F, "up", env) + rows(name, T * k, F, H, "down", env)
    table += rows("dense", 8192, 8192, 8192, "8192^3", env)
    print_table(table, ["config", "product", "M", "K", "N", "form", "ms", "tflops", "vs_bf16", "error"])
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "fp8_ceiling.csv"), table)


if __name__ == "__main__":
    main()
