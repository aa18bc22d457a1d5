"""`triton_gmm(..., b_scale=)`: the grouped GEMM on FP8 block-quantized weights dequantized in the
kernel (e4m3 values, fp32 inverse scales per 128 x 128 block; the rows in their own dtype), against
the plain product of the rows and the dequantized weights in float32: with and without the GLU
epilogue and the row map, at sizes that do not divide the blocks, with empty groups, outlier
blocks and an all-zero block; and its checks.
"""

import pytest
import torch
import torch.nn.functional as F

from megablocks.backend import fp8
from megablocks.backend.gmm import triton_gmm
from tests.conftest import DEVICE, FLOAT_DTYPES
from tests.utils import relative_errors


def _weights(e, n, k, g):
    w = torch.randn(e, n, k, generator=g) / k**0.5
    w[0, :min(n, 128), :min(k, 128)] *= 30.0  # an outlier block (its GLU output within fp16)
    w[-1, -1:, :] = 0.0  # part of a block of zeros (the whole block where n, k <= 128)
    q, s = fp8.quantize_blocks(w.to(DEVICE))
    return q, s, fp8.dequantize_blocks(q, s).float()


def _reference(x_rows, wd, sizes, glu):
    out, r0 = [], 0
    for e, m in enumerate(sizes):
        h = x_rows[r0:r0 + m].float() @ wd[e].T
        r0 += m
        if glu:
            n = h.shape[1] // 2
            h = F.silu(h[:, :n]) * h[:, n:]
        out.append(h)
    return torch.cat(out)


def _limits(dtype):
    """(max, rms) relative limits: fp32 under the interpreter is exact up to the sums' order; a
    16-bit output rounds once (2^-8 relative for bf16), and on the GPU fp32 rows multiply as tf32."""
    if dtype == torch.float32 and DEVICE != "cuda":
        return 1e-5, 1e-6
    return 2e-2, 4e-3


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("glu", [None, "silu"])
@pytest.mark.parametrize("mapped", [False, True], ids=["rows", "row_map"])
@pytest.mark.parametrize("e, n, k, sizes", [
    (3, 272, 200, [5, 0, 8]),       # N, K not multiples of 128 (the GLU's up half starts mid-block); an empty group
    (2, 128, 256, [16, 3]),         # whole blocks
    (4, 72, 40, [0, 1, 0, 2]),      # smaller than one block
])
def test_gmm_fp8_weights_against_dequantized(e, n, k, sizes, mapped, glu, dtype):
    g = torch.Generator().manual_seed(e * 31 + n + k)
    q, s, wd = _weights(e, n, k, g)
    m = sum(sizes)
    batch_sizes = torch.tensor(sizes, dtype=torch.int32, device=DEVICE)
    if mapped:  # rows through a map of routed assignments (top_k 2) of 9 tokens
        x = torch.randn(9, k, generator=g).to(dtype).to(DEVICE)
        rows = torch.randint(0, 18, (m,), generator=g, dtype=torch.int32).to(DEVICE)
        out = triton_gmm(x, q, batch_sizes, trans_b=True, a_rows=rows, rows_top_k=2, glu=glu, b_scale=s)
        x_rows = x[rows.long() // 2]
    else:
        x_rows = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
        out = triton_gmm(x_rows, q, batch_sizes, trans_b=True, glu=glu, b_scale=s)
    want = _reference(x_rows, wd, sizes, glu)
    assert out.dtype == dtype and out.shape == want.shape
    max_err, rms = relative_errors(out.double(), want.double())
    max_tol, rms_tol = _limits(dtype)
    assert max_err <= max_tol and rms <= rms_tol, (max_err, rms)


def test_gmm_fp8_weights_checks():
    g = torch.Generator().manual_seed(3)
    q, s, _ = _weights(2, 64, 64, g)
    x = torch.randn(4, 64, generator=g).to(DEVICE)
    sizes = torch.tensor([2, 2], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="b_scale"):
        triton_gmm(x, q, sizes, trans_b=True)  # e4m3 weights without their scales
    with pytest.raises(ValueError, match="b_scale: expected"):
        triton_gmm(x, q, sizes, trans_b=True, b_scale=s[:, :, :0])
    with pytest.raises(TypeError, match="float32 tensor"):
        triton_gmm(x, q, sizes, trans_b=True, b_scale=s.double())
    with pytest.raises(TypeError, match="float8_e4m3fn weights"):
        triton_gmm(x, fp8.dequantize_blocks(q, s).float(), sizes, trans_b=True, b_scale=s)
    with pytest.raises(ValueError, match="trans_b=True"):
        triton_gmm(x, q.transpose(1, 2), sizes, b_scale=s)
    with pytest.raises(ValueError, match="block_k dividing 128"):
        triton_gmm(x, q, sizes, trans_b=True, b_scale=s, config={"block_k": 256})
