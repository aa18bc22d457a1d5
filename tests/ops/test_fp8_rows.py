"""`gmm_fp8_rows`: the FP8 grouped GEMM of rows quantized inside the product (decode sizes),
bit for bit against quantizing first (`quantize_rows`, `gather_quantize_rows`'s bits through the
row map, `glu_quantize_rows`) and then `gmm_fp8` on the same launch, and within fp32 rounding of
the plain-torch definition; at sizes that do not divide the 128-wide blocks, with empty experts,
an outlier row, padding entries in the map; and its checks.
"""

import pytest
import torch

from megablocks.backend import fp8
from tests.conftest import DEVICE, FLOAT_DTYPES
from tests.utils import relative_errors

# The launch both sides take: under the interpreter the product's own (128-deep steps); on the
# GPU the decode launch that gmm_fp8 takes by default at these sizes.
_LAUNCH = (dict(block_m=16, block_n=32, block_k=128, swap_ab=True, num_stages=1, tma=False, persistent=False)
           if DEVICE != "cuda" else None)


def _case(e, n, k, sizes, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(e, n, k, generator=g) / k**0.5
    q, s = fp8.quantize_blocks(w.to(DEVICE))
    return g, q, s, torch.tensor(sizes, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("form", ["plain", "rows", "glu", "glu_gelu"])
@pytest.mark.parametrize("e, n, k, sizes", [
    (3, 136, 200, [5, 0, 8]),     # N, K not multiples of 128; an empty expert
    (2, 256, 256, [16, 3]),       # whole blocks
    (4, 72, 40, [0, 1, 0, 2]),    # smaller than one block
])
def test_gmm_fp8_rows_equals_quantize_then_product(e, n, k, sizes, form, dtype):
    g, w_q, w_s, batch_sizes = _case(e, n, k, sizes, seed=e * 13 + n + k)
    m = sum(sizes)
    if form == "rows":  # 9 tokens, top_k 2: a permutation of the assignments, the map's last entry a padding row
        t = max(9, m)
        x = torch.randn(t, k, generator=g).to(dtype).to(DEVICE)
        x[0] *= 1000.0  # an outlier token
        rows = torch.randperm(2 * t, generator=g)[:m].to(torch.int32).to(DEVICE)
        if m:
            rows[-1] = -1
        out = fp8.gmm_fp8_rows(x, w_q, w_s, batch_sizes, rows=rows, top_k=2)
        src = x[(rows.long() // 2).clamp(min=0)] * (rows >= 0)[:, None]
        x_q, x_s = fp8.quantize_rows(src)
    elif form.startswith("glu"):
        act = "silu" if form == "glu" else "gelu"
        x = torch.randn(m, 2 * k, generator=g).to(dtype).to(DEVICE)
        out = fp8.gmm_fp8_rows(x, w_q, w_s, batch_sizes, glu=act)
        x_q, x_s = fp8.glu_quantize_rows(x[:, :k], x[:, k:], act)
    else:
        x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
        x[-1] *= 1000.0
        out = fp8.gmm_fp8_rows(x, w_q, w_s, batch_sizes)
        x_q, x_s = fp8.quantize_rows(x)
    want = fp8.gmm_fp8(x_q, x_s, w_q, w_s, batch_sizes, out_dtype=dtype, config=_LAUNCH)
    assert out.dtype == dtype and out.shape == (m, n)
    assert torch.equal(out, want)
    # The definition on the same quantized rows (whose quantizers are checked against theirs).
    ref = fp8.gmm_fp8_reference(x_q, x_s, w_q, w_s, batch_sizes.cpu(), torch.float32)
    max_err, rms = relative_errors(out.float(), ref)
    assert max_err <= 1e-2 and rms <= 4e-3, (max_err, rms)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows_per_expert", [4, 16, 32])
def test_gmm_fp8_rows_weight_by_tma_same_bits(rows_per_expert):
    """The weight read by TMA instead of pointer loads: the same product, bit for bit."""
    e, n, k = 8, 384, 512
    g, w_q, w_s, batch_sizes = _case(e, n, k, [rows_per_expert] * e, seed=rows_per_expert)
    x = torch.randn(rows_per_expert * e, 2 * k, generator=g).to(torch.bfloat16).to(DEVICE)
    plain = fp8.gmm_fp8_rows(x, w_q, w_s, batch_sizes, glu="silu")
    tma = fp8.gmm_fp8_rows(x, w_q, w_s, batch_sizes, glu="silu", config={"tma": True})
    assert torch.equal(plain, tma)


def test_gmm_fp8_rows_checks():
    g, w_q, w_s, batch_sizes = _case(2, 64, 64, [2, 2], seed=5)
    x = torch.randn(4, 64, generator=g).to(DEVICE)
    rows = torch.arange(4, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="not both"):
        fp8.gmm_fp8_rows(torch.randn(4, 128, device=DEVICE), w_q, w_s, batch_sizes, rows=rows, glu="silu")
    with pytest.raises(ValueError, match="glu: expected one of"):
        fp8.gmm_fp8_rows(torch.randn(4, 128, device=DEVICE), w_q, w_s, batch_sizes, glu="swish")
    with pytest.raises(ValueError, match="2K, the GLU halves"):
        fp8.gmm_fp8_rows(x, w_q, w_s, batch_sizes, glu="silu")
    with pytest.raises(ValueError, match="columns"):
        fp8.gmm_fp8_rows(x[:, :32], w_q, w_s, batch_sizes)
    with pytest.raises(ValueError, match="w_s: expected"):
        fp8.gmm_fp8_rows(x, w_q, w_s[:, :, :0], batch_sizes)
    with pytest.raises(TypeError):
        fp8.gmm_fp8_rows(x, w_q, w_s, batch_sizes, rows=rows.long())
    with pytest.raises(ValueError, match="top_k"):
        fp8.gmm_fp8_rows(x, w_q, w_s, batch_sizes, rows=rows, top_k=0)
    with pytest.raises(TypeError, match="out_dtype"):
        fp8.gmm_fp8_rows(x, w_q, w_s, batch_sizes, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="batch_sizes"):
        fp8.gmm_fp8_rows(x, w_q, w_s, batch_sizes[:1])
    big = torch.randn(65, 64, device=DEVICE)  # 65 rows over 2 experts: past 32 a expert
    with pytest.raises(ValueError, match="past the decode launches"):
        fp8.gmm_fp8_rows(big, w_q, w_s, torch.tensor([33, 32], dtype=torch.int32, device=DEVICE))
    assert fp8.rows_quantized_in_product(64, 2) and not fp8.rows_quantized_in_product(65, 2)
    assert not fp8.rows_quantized_in_product(0, 0)
    assert fp8.gmm_fp8_rows(x[:0], w_q, w_s, torch.zeros(2, dtype=torch.int32, device=DEVICE)).shape == (0, 64)
