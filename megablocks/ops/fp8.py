"""FP8 experts, DeepSeek-V3's blockwise layout: quantizers and the FP8 grouped GEMM.

    x_q, x_s = quantize_rows(x_MK)                  # 1 x 128 tiles, e4m3 + fp32 scales
    w_q, w_s = quantize_blocks(w_ENK)               # 128 x 128 blocks of [E, N, K] (out x in)
    out_MN = gmm_fp8(x_q, x_s, w_q, w_s, batch_sizes_E)   # bf16 out, fp32 accumulation

`gmm_fp8_reference` is the plain-torch definition (dequantize both operands, multiply in fp32).
The kernels and the layout are in `megablocks.backend.fp8`; this is the forward product (the
serving and inference form). The training products (the two backward forms) and the dMoE
recipe option are not here yet.
"""

from megablocks.backend.fp8 import (
    E4M3_MAX,
    FP8_DTYPE,
    Q,
    dequantize_blocks,
    dequantize_rows,
    gmm_fp8,
    gmm_fp8_reference,
    quantize_blocks,
    quantize_rows,
    quantize_rows_reference,
)

__all__ = [
    "E4M3_MAX", "FP8_DTYPE", "Q", "dequantize_blocks", "dequantize_rows", "gmm_fp8", "gmm_fp8_reference",
    "quantize_blocks", "quantize_rows", "quantize_rows_reference",
]
