"""Whether the hardware's e4m3 cast stores right bytes when its results are written transposed (a
column quantizer's K-major store), and how fast each rounding runs, on CUDA.

Each variant quantizes 128 x 1 tiles down the columns of x [M, K] (bf16) and stores them K-major
(q [K, M]): 0 rounds by `backend.fp8._round_e4m3`'s integer arithmetic (the interpreter's form),
1 casts and transposes the e4m3 tile, 2 transposes the fp32 tile and casts, 3 casts to e4m3 and
back to fp32, transposes and casts again. Every variant's bytes are compared with variant 0's and,
where M is a multiple of 128, with torch's cast of the same scaled values.

    python benchmarks/cast_transposed.py > cast_transposed.txt
"""

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from megablocks.backend import fp8 as F

SHAPES = ((16384, 14336), (131072, 1024), (1000, 300))  # mixtral's and olmoe's [M, F]; a ragged one
LAUNCHES = ((128, 8), (32, 4), (32, 2))  # (columns a program, warps)


@triton.jit
def _cols_transposed_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_x, stride_q, V: tl.constexpr, BK: tl.constexpr,
                            QB: tl.constexpr):
    b = tl.program_id(0)
    rows = b * QB + tl.arange(0, QB)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    scale, inv = F._pow2_scale(tl.max(tl.abs(x), axis=0))
    tl.store(s_ptr + b * K + cols, scale, mask=cols < K)
    y = x * inv[None, :]
    dst = q_ptr + cols[:, None].to(tl.int64) * stride_q + rows[None, :]
    tmask = (cols < K)[:, None] & (rows < M)[None, :]
    if V == 0:
        tl.store(dst, tl.trans(F._round_e4m3(y)).to(q_ptr.dtype.element_ty), mask=tmask)
    elif V == 1:
        tl.store(dst, tl.trans(y.to(q_ptr.dtype.element_ty)), mask=tmask)
    elif V == 2:
        tl.store(dst, tl.trans(y).to(q_ptr.dtype.element_ty), mask=tmask)
    else:
        r = y.to(q_ptr.dtype.element_ty).to(tl.float32)
        tl.store(dst, tl.trans(r).to(q_ptr.dtype.element_ty), mask=tmask)


def run(M, K, block_k, warps):
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16) * torch.rand(1, K, device="cuda").bfloat16() * 100
    out = {}
    for variant in range(4):
        q = torch.empty(K, M, device="cuda", dtype=torch.float8_e4m3fn)
        s = torch.empty(triton.cdiv(M, 128), K, device="cuda")

        def launch():
            _cols_transposed_kernel[(triton.cdiv(M, 128), triton.cdiv(K, block_k))](
                x, q, s, M, K, x.stride(0), q.stride(0), V=variant, BK=block_k, QB=128, num_warps=warps)

        launch()
        out[variant] = (q.view(torch.uint8).clone(), do_bench(launch), s)
    for variant, (q, ms, s) in out.items():
        ref = None
        if M % 128 == 0:
            scaled = x.float().view(-1, 128, K) / s.view(-1, 1, K)
            ref = torch.equal(q, scaled.reshape(M, K).to(torch.float8_e4m3fn).t().contiguous().view(torch.uint8))
        print(f"M={M} K={K} BK={block_k} w={warps} V={variant}: {ms * 1e3:.1f} us, "
              f"same_as_int={torch.equal(q, out[0][0])}, same_as_torch={ref}", flush=True)


if __name__ == "__main__":
    for M, K in SHAPES:
        for block_k, warps in LAUNCHES:
            run(M, K, block_k, warps)
