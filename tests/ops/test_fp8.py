"""megablocks.ops.fp8: the blockwise e4m3 quantizers and the FP8 grouped GEMM.

The quantizers are checked bit for bit against torch's own round-to-nearest-even cast of the same
scaled values, and their scales against a per-tile loop; the GEMM against the plain definition
(dequantize, multiply in float64) at sizes that do not divide the 128-wide blocks or the tiles,
with empty experts and rows past the groups' total. The interpreter runs FP8 products exactly
(checked below); its own fp32 -> fp8 cast is not used by the kernels (they round first), so the
CPU run checks the same arithmetic as the GPU's.
"""

import pytest
import torch
import triton
import triton.language as tl

from megablocks.backend import fp8 as fp8_backend
from megablocks.backend import fp8_wgmma
from megablocks.backend.fp8 import _e4m3_bits
from megablocks.ops import fp8
from tests.conftest import DEVICE
from tests.utils import assert_close, assert_equal

Q = fp8.Q
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _hostile(M, K, dtype, seed):
    """Normal values, an outlier tile, a tile of zeros, values in e4m3's subnormal range of
    their tile, and exact ties of the rounding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * 3
    if M > 2 and K > 0:
        x[1, : min(K, Q)] *= 100  # one tile of outliers: only its own scale moves
        x[2, : min(K, Q)] = 0.0
    if M > 3 and K > 2:
        x[3, 0] = 448.0
        x[3, 1] = 1e-3  # e4m3 subnormal at this tile's scale
        x[3, 2] = -(1.0 + 2**-4)  # a tie of the 3-bit mantissa: to even
    return x.to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M, K", [(6, 300), (1, 128), (17, 1), (0, 10), (5, 0)])
def test_quantize_rows(M, K, dtype):
    x = _hostile(M, K, dtype, seed=M * 1000 + K)
    q, s = fp8.quantize_rows(x)
    assert q.dtype == fp8.FP8_DTYPE and s.dtype == torch.float32 and q.shape == (M, K)
    assert s.shape == (M, -(-K // Q))
    # Per tile: the smallest power of two that fits the tile's amax into +-448 (a loop).
    xf = x.float().cpu()
    for i in range(M):
        for j in range(s.shape[1]):
            amax = xf[i, j * Q:(j + 1) * Q].abs().max().item()
            want = 2.0 ** -126 if amax == 0 else 2.0 ** max(-126, torch.tensor(amax / 448.0).log2().ceil().item())
            assert s[i, j].item() == want, (i, j, amax, s[i, j].item())
    # The values: torch's round-to-nearest-even cast of x / s (exact: s is a power of two).
    expect = (xf / s.cpu().repeat_interleave(Q, dim=1)[:, :K]).clamp(-448, 448).to(fp8.FP8_DTYPE)
    assert torch.equal(q.cpu().view(torch.uint8), expect.view(torch.uint8))
    ref_q, ref_s = fp8.quantize_rows_reference(x)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(s, ref_s)
    if M > 3 and K > 2:
        assert q[3, 0].float().item() * s[3, 0].item() == 448.0
    # Each element within half a unit of e4m3's last place (3 mantissa bits; subnormal spacing 2^-9).
    err = (fp8.dequantize_rows(q, s).cpu() - xf).abs()
    bound = xf.abs() * 2.0**-4 + s.cpu().repeat_interleave(Q, dim=1)[:, :K] * 2.0**-10
    assert (err <= bound).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu", "clamped_swiglu"])
@pytest.mark.parametrize("M, K", [(6, 300), (1, 128), (17, 1), (0, 10), (5, 0)])
def test_glu_quantize_rows_equals_the_two_passes(M, K, activation, dtype):
    """The GLU quantized as it is made, read from the two halves of one `[M, 2K]` tensor in
    place, equals `glu` then `quantize_rows` bit for bit (values and scales), with outlier,
    zero and NaN tiles; its dequantized values are the GLU's within e4m3's half unit."""
    from megablocks.ops.activation import glu

    h = torch.cat([_hostile(M, K, dtype, seed=M + K), _hostile(M, K, dtype, seed=M + K + 1) / 3], dim=1)
    if M > 4 and K > 5:
        h[4, K + 5] = float("nan")  # in the up half: NaN through every activation
    h1, h2 = h[:, :K], h[:, K:]
    q, s = fp8.glu_quantize_rows(h1, h2, activation)
    a = glu(h1, h2, activation)
    ref_q, ref_s = fp8.quantize_rows(a)
    assert q.shape == (M, K) and s.shape == (M, -(-K // Q))
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))
    assert torch.equal(s.isnan(), ref_s.isnan()) and torch.equal(s.nan_to_num(), ref_s.nan_to_num())
    if M > 4 and K > 5:
        assert s[4, 0].isnan()  # the NaN makes its tile NaN
        if DEVICE == "cuda":  # and stays NaN itself (the interpreter's e4m3 cast makes a NaN 384)
            assert q[4, 5].float().isnan()
    # With the 16-bit product written in the same pass: the same tiles, and the product `glu`'s.
    q2, s2, a2 = fp8.glu_quantize_rows(h1, h2, activation, return_product=True)
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(s2.isnan(), s.isnan()) and torch.equal(s2.nan_to_num(), s.nan_to_num())
    assert a2.dtype == a.dtype and a2.shape == (M, K) and a2.is_contiguous()
    assert torch.equal(a2.isnan(), a.isnan()) and torch.equal(a2.nan_to_num(), a.nan_to_num())
    finite = ~s.isnan().repeat_interleave(Q, dim=1)[:, :K]
    af = a.float()
    err = (fp8.dequantize_rows(q, s) - af).abs()[finite]
    bound = (af.abs() * 2.0**-4 + s.repeat_interleave(Q, dim=1)[:, :K] * 2.0**-10)[finite]
    assert (err <= bound).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T, K, E, top_k", [(7, 300, 5, 2), (1, 128, 4, 4), (33, 130, 3, 1), (0, 64, 2, 2), (9, 1, 3, 3)])
def test_gather_quantize_rows_equals_gather_then_quantize(T, K, E, top_k, dtype):
    """The routed rows quantized as they are gathered equal `quantize_rows(gather_routed(x))` bit
    for bit, through the maps of `route` and of `row_maps` (an empty expert, an id out of range,
    an outlier and a NaN tile)."""
    from megablocks.ops.permute import gather_routed, route
    from megablocks.ops.routing import routing_metadata

    x = _hostile(T, K, dtype, seed=T * 7 + K)
    if T > 4 and K > 1:
        x[4, 1] = float("nan")
    g = torch.Generator().manual_seed(T + K + E)
    ids = torch.randint(0, E - 1, (T, top_k), generator=g).to(DEVICE)  # expert E - 1 gets no row
    meta = routing_metadata(ids, E, 1)
    maps = route(meta.indices, meta.bin_ids, meta.bins, top_k)
    q, s = fp8.gather_quantize_rows(x, maps.assignment_row, top_k)
    ref_q, ref_s = fp8.quantize_rows(gather_routed(x, maps))
    assert q.shape == (T * top_k, K) and s.shape == (T * top_k, -(-K // Q))
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))
    assert torch.equal(s.isnan(), ref_s.isnan()) and torch.equal(s.nan_to_num(), ref_s.nan_to_num())
    if T > 4 and K > 1:
        assert s.isnan().sum() == top_k  # the NaN tile, on each of its token's rows
    if DEVICE == "cuda" and T:
        from megablocks.ops.routing import row_maps

        ids[0, 0] = E + 3  # out of range: a row after all experts'
        _, maps = row_maps(ids, E)
        q, s = fp8.gather_quantize_rows(x, maps.assignment_row, top_k)
        ref_q, ref_s = fp8.quantize_rows(gather_routed(x, maps))
        assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))
        assert torch.equal(s.nan_to_num(), ref_s.nan_to_num())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T, K, E, top_k", [(7, 300, 5, 2), (1, 128, 4, 4), (33, 130, 3, 1), (0, 64, 2, 2), (9, 1, 3, 3)])
def test_gather_quantize_rows_weighted(T, K, E, top_k, dtype):
    """With the routing weights (the combine's backward), each routed row is its token's row times
    its weight, rounded to x's dtype, then quantized: equal bit for bit to `quantize_rows` of the
    weighted gather, and the 16-bit rows written beside them equal that gather, with an empty
    expert, an outlier, a NaN tile, a zero and a negative weight, and a weight past e4m3's range."""
    from megablocks.ops.permute import _gather_rows, route
    from megablocks.ops.routing import routing_metadata

    x = _hostile(T, K, dtype, seed=T * 5 + K + 1)
    if T > 4 and K > 1:
        x[4, 1] = float("nan")
    g = torch.Generator().manual_seed(T + K + E + 1)
    ids = torch.randint(0, E - 1, (T, top_k), generator=g).to(DEVICE)
    meta = routing_metadata(ids, E, 1)
    maps = route(meta.indices, meta.bin_ids, meta.bins, top_k)
    weights = torch.rand(T * top_k, generator=g).to(DEVICE)
    if T * top_k > 3:
        weights[0], weights[1], weights[2] = 0.0, -1.5, 3.0e3
    for w in (weights, weights.to(dtype)):
        ref_rows = _gather_rows(x, maps.row_assignment, maps.assignment_row, w, top_k)
        ref_q, ref_s = fp8.quantize_rows(ref_rows)
        q, s, rows = fp8.gather_quantize_rows(x, maps.assignment_row, top_k, w, return_rows=True)
        assert rows.dtype == dtype and torch.equal(rows.nan_to_num(), ref_rows.nan_to_num())
        assert torch.equal(rows.isnan(), ref_rows.isnan())
        assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))
        assert torch.equal(s.isnan(), ref_s.isnan()) and torch.equal(s.nan_to_num(), ref_s.nan_to_num())
        q2, s2 = fp8.gather_quantize_rows(x, maps.assignment_row, top_k, w)
        assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8)) and torch.equal(s2.nan_to_num(), s.nan_to_num())
    # Unweighted, the rows written too are the plain gather's.
    q, s, rows = fp8.gather_quantize_rows(x, maps.assignment_row, top_k, return_rows=True)
    ref_rows = _gather_rows(x, maps.row_assignment, maps.assignment_row, None, top_k)
    assert torch.equal(rows.nan_to_num(), ref_rows.nan_to_num())
    ref_q, _ = fp8.quantize_rows(ref_rows)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))
    if T * top_k > 3 and K > 1:  # the weights did move the values: not the unweighted rows
        assert not torch.equal(fp8.gather_quantize_rows(x, maps.assignment_row, top_k, weights)[1].nan_to_num(),
                               s.nan_to_num())


def test_fused_quantizers_on_cpu_without_interpreter(monkeypatch):
    """Off the interpreter a CPU tensor takes the torch forms: equal to the kernels' results."""
    from megablocks.ops.permute import gather_routed, route
    from megablocks.ops.routing import routing_metadata

    x = _hostile(9, 300, torch.float32, seed=3).cpu()
    h = _hostile(9, 600, torch.float32, seed=4).cpu()
    ids = torch.randint(0, 4, (9, 2), generator=torch.Generator().manual_seed(0))
    meta = routing_metadata(ids, 5, 1)
    maps = route(meta.indices, meta.bin_ids, meta.bins, 2)
    kernel = fp8.gather_quantize_rows(x, maps.assignment_row, 2), fp8.glu_quantize_rows(h[:, :300], h[:, 300:], "silu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch_form = fp8.gather_quantize_rows(x, maps.assignment_row, 2), fp8.glu_quantize_rows(h[:, :300], h[:, 300:], "silu")
    for (q, s), (q_ref, s_ref) in zip(torch_form, kernel):
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
    assert torch.equal(torch_form[0][0].view(torch.uint8),
                       fp8.quantize_rows_reference(gather_routed(x, maps))[0].view(torch.uint8))
    w = torch.rand(18, generator=torch.Generator().manual_seed(1)) * 4 - 2
    monkeypatch.undo()  # the suite's own setting: the interpreter where it runs the kernels
    kernel = fp8.gather_quantize_rows(x, maps.assignment_row, 2, w, return_rows=True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch_form = fp8.gather_quantize_rows(x, maps.assignment_row, 2, w, return_rows=True)
    assert torch.equal(torch_form[0].view(torch.uint8), kernel[0].view(torch.uint8))
    assert torch.equal(torch_form[1], kernel[1]) and torch.equal(torch_form[2], kernel[2])


def test_gather_quantize_rows_validates():
    x = torch.randn(4, 128, device=DEVICE)
    rows = torch.arange(8, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="expected T \\* top_k = 12 elements"):
        fp8.gather_quantize_rows(x, rows, 3)
    with pytest.raises(ValueError, match="top_k: expected an int"):
        fp8.gather_quantize_rows(x, rows, 0)
    with pytest.raises(ValueError, match="x: expected a contiguous last dim"):
        fp8.gather_quantize_rows(torch.randn(4, 256, device=DEVICE)[:, ::2], rows, 2)
    with pytest.raises(TypeError):
        fp8.gather_quantize_rows(x, rows.float(), 2)
    with pytest.raises(TypeError):
        fp8.gather_quantize_rows(x.long(), rows, 2)
    with pytest.raises(ValueError, match="weights_N: expected T \\* top_k = 8 elements"):
        fp8.gather_quantize_rows(x, rows, 2, torch.ones(7, device=DEVICE))
    with pytest.raises(TypeError):
        fp8.gather_quantize_rows(x, rows, 2, torch.ones(8, dtype=torch.int32, device=DEVICE))


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu", "clamped_swiglu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M, K, stacked", [(37, 300, False), (5, 256, True), (0, 128, True), (33, 1, False)])
def test_glu_backward_quantize_rows_equals_the_passes(M, K, activation, dtype, stacked):
    """The GLU's backward quantized as it is made: the gradients written over h1 and h2 (the two
    halves of one [M, 2K] buffer here) are `glu_backward`'s (the same fp32 math compiled in
    another kernel: on the GPU within a few units of fp32's last place, where the compiler contracts
    it otherwise; measured for gelu), and the quantized values, into `out` views with `stacked` (the
    halves of one [M, 2K] operand), are `quantize_rows` of those gradients bit for bit; outlier,
    zero and NaN tiles."""
    from megablocks.backend import activation as kernels

    h = torch.cat([_hostile(M, K, dtype, seed=M + K + 7), _hostile(M, K, dtype, seed=M + K + 8) / 3], dim=1)
    grad = _hostile(M, K, dtype, seed=M + 2 * K)
    if M > 4 and K > 5:
        grad[4, 5] = float("nan")
    want_h1, want_h2 = kernels.glu_backward(grad, h[:, :K], h[:, K:], activation)
    out = None
    if stacked:
        q = torch.empty(M, 2 * K, dtype=fp8.FP8_DTYPE, device=DEVICE)
        s = torch.empty(M, 2 * (-(-K // Q)), dtype=torch.float32, device=DEVICE)
        kb = -(-K // Q)
        out = (q[:, :K], s[:, :kb], q[:, K:], s[:, kb:])
    (q1, s1), (q2, s2) = fp8.glu_backward_quantize_rows_(grad, h[:, :K], h[:, K:], activation, out=out)
    if DEVICE == "cuda" and dtype == torch.float32:
        # Measured (H200, gelu): 3 of 1280 values off, by at most 4.5e-8 (4.2e-7 relative).
        for got, want in ((h[:, :K], want_h1), (h[:, K:], want_h2)):
            scale = want.nan_to_num(posinf=0.0, neginf=0.0).abs().amax().item() if want.numel() else 0.0
            torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7 * scale, equal_nan=True)
    else:  # the interpreter's arithmetic is the same in both kernels; 16-bit results rounded once
        assert_equal("grad h1 in place", h[:, :K], want_h1)
        assert_equal("grad h2 in place", h[:, K:], want_h2)
    for (qq, ss), mine in (((q1, s1), h[:, :K]), ((q2, s2), h[:, K:])):
        ref_q, ref_s = fp8.quantize_rows(mine.contiguous())
        assert torch.equal(qq.view(torch.uint8), ref_q.view(torch.uint8))
        assert torch.equal(ss.isnan(), ref_s.isnan()) and torch.equal(ss.nan_to_num(), ref_s.nan_to_num())
    if stacked:
        assert q1.data_ptr() == q.data_ptr() and s2.data_ptr() == s[:, kb:].data_ptr()
        whole_q, whole_s = fp8.quantize_rows(h)
        assert torch.equal(q.view(torch.uint8), whole_q.view(torch.uint8))
        assert torch.equal(s.nan_to_num(), whole_s.nan_to_num())


def test_glu_backward_quantize_rows_validates():
    h = torch.randn(4, 256, device=DEVICE)
    g = torch.randn(4, 128, device=DEVICE)
    with pytest.raises(ValueError, match="h2: expected grad's shape"):
        fp8.glu_backward_quantize_rows_(g, h[:, :128], h[:3, 128:], "silu")
    with pytest.raises(ValueError, match="activation: expected one of"):
        fp8.glu_backward_quantize_rows_(g, h[:, :128], h[:, 128:], "swish")
    with pytest.raises(ValueError, match="h1: expected a contiguous last dim"):
        fp8.glu_backward_quantize_rows_(g, h[:, ::2], h[:, 1::2], "silu")
    q, s = fp8.quantize_rows(g)
    with pytest.raises(ValueError, match="out: expected"):
        fp8.glu_backward_quantize_rows_(g, h[:, :128], h[:, 128:], "silu", out=(q, s, q, s.double()))


def test_glu_quantize_rows_validates():
    h = torch.randn(4, 256, device=DEVICE)
    with pytest.raises(ValueError, match="h2: expected h1's shape"):
        fp8.glu_quantize_rows(h[:, :128], h[:3, 128:], "silu")
    with pytest.raises(ValueError, match="h2: expected h1's shape"):
        fp8.glu_quantize_rows(h[:, :128], h[:, 128:].half(), "silu")
    with pytest.raises(ValueError, match="activation: expected one of"):
        fp8.glu_quantize_rows(h[:, :128], h[:, 128:], "swish")
    with pytest.raises(ValueError, match="h1: expected a contiguous last dim"):
        fp8.glu_quantize_rows(h[:, ::2], h[:, 1::2], "silu")
    with pytest.raises(TypeError):
        fp8.glu_quantize_rows(h[:, :128].long(), h[:, 128:].long(), "silu")
    with pytest.raises(TypeError, match="return_product: expected a bool"):
        fp8.glu_quantize_rows(h[:, :128], h[:, 128:], "silu", return_product=1)


def test_rounding_ties_to_even_and_signed_zero():
    x = torch.tensor([[448.0, 1.0 + 2**-4, 1.0 + 3 * 2**-4, -(1.0 + 2**-4), -1e-9, 2**-10, 3 * 2**-10, 0.0]], device=DEVICE)
    x = torch.nn.functional.pad(x, (0, Q - x.shape[1]))
    q, s = fp8.quantize_rows(x)
    assert s.item() == 1.0  # amax 448 fits exactly
    assert q.float().cpu()[0, :8].tolist() == [448.0, 1.0, 1.25, -1.0, -0.0, 0.0, 2.0**-8, 0.0]
    assert torch.signbit(q.float()[0, 4]).item()  # -1e-9 rounds to -0, as torch's cast


def test_non_finite_tiles_get_a_nan_scale():
    x = torch.randn(2, 2 * Q, device=DEVICE)
    x[0, 5] = float("inf")
    x[1, Q + 3] = float("nan")
    _, s = fp8.quantize_rows(x)
    assert s.isnan().cpu().tolist() == [[True, False], [False, True]]
    _, s = fp8.quantize_blocks(x.view(1, 2, 2 * Q))
    assert s.isnan().all()


def test_quantize_blocks():
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(3, 130, 200, generator=g) * 0.05).to(DEVICE)
    w[1, :128, 128:] *= 1e3  # one block of outliers
    w[2] = 0.0  # an expert of zeros
    q, s = fp8.quantize_blocks(w)
    assert q.shape == w.shape and s.shape == (3, 2, 2) and q.dtype == fp8.FP8_DTYPE
    wf = w.cpu().double()
    for e in range(3):
        for nb in range(2):
            for kb in range(2):
                blk = wf[e, nb * Q:(nb + 1) * Q, kb * Q:(kb + 1) * Q]
                amax = blk.abs().max().item()
                want = 2.0 ** -126 if amax == 0 else 2.0 ** max(-126, torch.tensor(amax / 448.0).log2().ceil().item())
                assert s[e, nb, kb].item() == want
                got = q[e, nb * Q:(nb + 1) * Q, kb * Q:(kb + 1) * Q].cpu()
                expect = (blk / want).float().clamp(-448, 448).to(fp8.FP8_DTYPE)
                assert torch.equal(got.view(torch.uint8), expect.view(torch.uint8))
    # Within half a unit of e4m3's last place (3 mantissa bits; the subnormal spacing 2^-9 of each
    # block's scale for its values far below the block's amax, the outlier block's).
    err = (fp8.dequantize_blocks(q, s).cpu() - w.cpu()).abs()
    spacing = s.cpu().repeat_interleave(Q, dim=1).repeat_interleave(Q, dim=2)[:, :130, :200]
    assert (err <= w.cpu().abs() * 2.0**-4 + spacing * 2.0**-10).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 130, 200), (2, 132, 200), (1, 128, 128), (2, 1, 300), (2, 257, 64), (2, 256, 130),
                                   (0, 4, 4), (2, 5, 0)], ids=str)
def test_quantize_blocks_kernel_against_its_torch_form(shape, dtype):
    """The block quantizer's kernel against its torch form, bit for bit (values and scales), with
    outliers, an all-zero block, a NaN in one block (its scale NaN), and a weight read through
    strides (a transposed view); the transposed copy packed four bytes a word (N a multiple of
    4, whole and partial row blocks) and byte by byte."""
    g = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(shape, generator=g) * 0.05
    if w.numel() and shape[1] > 1:
        w[0, :1, :7] *= 1e3
        w[-1, -1:, :] = 0.0
        w[0, -1, -1] = float("nan")
    w = w.to(DEVICE, dtype)
    for x in (w, w.transpose(1, 2).contiguous().transpose(1, 2)):
        q, s = fp8.quantize_blocks(x)
        q_ref, s_ref = fp8.quantize_blocks_reference(x)
        assert q.shape == q_ref.shape and s.shape == s_ref.shape
        assert torch.equal(s.isnan(), s_ref.isnan()) and torch.equal(s.nan_to_num(), s_ref.nan_to_num())
        finite = s_ref.isfinite().repeat_interleave(Q, 1).repeat_interleave(Q, 2)[:, :shape[1], :shape[2]]
        assert torch.equal(q.view(torch.uint8)[finite], q_ref.view(torch.uint8)[finite])
        # With the values also stored the other way.
        q2, s2, t = fp8.quantize_blocks(x, transposed=True)
        assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8)) and torch.equal(s2.nan_to_num(), s.nan_to_num())
        assert t.shape == (shape[0], shape[2], shape[1]) and t.is_contiguous()
        assert torch.equal(t.view(torch.uint8), q.transpose(1, 2).contiguous().view(torch.uint8))


@triton.jit
def _e4m3_bits_probe(v_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, _e4m3_bits(tl.load(v_ptr + offs)).to(tl.uint8))


def test_e4m3_bits_are_the_casts_bytes():
    """The integer assembly of an e4m3 byte (the quantizer's transposed store) against torch's own
    bytes for every one of the 256 e4m3 values, both zeros and subnormals among them; NaN -> 0x7F
    with its sign."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    values = codes.view(fp8.FP8_DTYPE).float().to(DEVICE)
    out = torch.empty(256, dtype=torch.uint8, device=DEVICE)
    _e4m3_bits_probe[(1,)](values, out, BLOCK=256)
    nan = values.isnan().cpu()
    assert nan.sum().item() == 2
    assert torch.equal(out.cpu()[~nan], codes[~nan])
    assert out.cpu()[nan].tolist() == [0x7F | (c & 0x80) for c in codes[nan].tolist()]


if DEVICE == "cuda":
    GMM_CASES = {
        "mixed": ([300, 0, 1, 517, 1024, 0, 129, 700], 1024, 768),
        "unaligned": ([130, 0, 257, 64, 1, 511], 1000, 520),
        "decode": ([8, 0, 3, 1, 0, 4, 16, 0], 4096, 1408),  # 16-row swap_ab tiles by default
        "decode_32": ([40, 0, 17, 31, 60, 5, 33, 2], 1000, 1536),  # 32-row swap_ab tiles by default
    }
else:
    GMM_CASES = {
        "mixed": ([5, 0, 1, 40, 0, 17], 200, 70),
        "one_expert": ([33], 130, 40),
        "all_on_one": ([0, 0, 21, 0], 64, 32),
    }


def _operands(sizes, K, N, extra_rows=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    M = sum(sizes) + extra_rows
    x = torch.randn(M, K, generator=g).to(DEVICE)
    w = (torch.randn(len(sizes), N, K, generator=g) / K**0.5).to(DEVICE)
    return x, w, torch.tensor(sizes, dtype=torch.int32, device=DEVICE)


def _definition(x_q, x_s, w_q, w_s, sizes, trans_b):
    """float64 [M, N] of the dequantized operands, group by group (rows past the groups: zeros);
    w_q as stored, [E, N, K] with trans_b, else [E, K, N]."""
    wd = fp8.dequantize_blocks(w_q, w_s).double().cpu()
    wd = wd if trans_b else wd.transpose(1, 2)
    xd = fp8.dequantize_rows(x_q, x_s).double().cpu()
    ref = torch.zeros(xd.shape[0], wd.shape[1], dtype=torch.float64)
    start = 0
    for e, m in enumerate(sizes):
        ref[start:start + m] = xd[start:start + m] @ wd[e].t()
        start += m
    return ref


@pytest.mark.parametrize("case", list(GMM_CASES))
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("trans_b", [True, False], ids=["w_ENK", "w_EKN"])
def test_gmm_fp8_against_definition(case, out_dtype, trans_b):
    sizes, K, N = GMM_CASES[case]
    x, w, batch_sizes = _operands(sizes, K, N, extra_rows=3)
    x_q, x_s = fp8.quantize_rows(x)
    if trans_b:
        w_q, w_s = fp8.quantize_blocks(w)
    else:  # the same weights stored [E, K, N], quantized in that layout
        w_q, w_s = fp8.quantize_blocks(w.transpose(1, 2).contiguous())
    out = fp8.gmm_fp8(x_q, x_s, w_q, w_s, batch_sizes, out_dtype=out_dtype, trans_b=trans_b)
    assert out.dtype == out_dtype and out.shape == (x.shape[0], N)
    ref = _definition(x_q, x_s, w_q, w_s, sizes, trans_b)
    # FP8 products into fp32: exact in the interpreter, Hopper's accumulation on the GPU (fp8_tolerance).
    assert_close("gmm_fp8", out, ref, dtype=out_dtype, family="fp8")
    assert not out[sum(sizes):].any(), "rows past the groups' total are zeros"
    if trans_b:
        assert_close("reference", fp8.gmm_fp8_reference(x_q, x_s, w_q, w_s, batch_sizes.cpu(), torch.float32), ref,
                     dtype=torch.float32)


# piece_edges: groups that end exactly on 64-row pieces (the Gluon form's consumers): the last
# tile's pieces past the group are skipped, those within it full.
TMA_CASES = dict(GMM_CASES, k_aligned=([5, 0, 40, 17], 96, 70), piece_edges=([64, 128, 256, 1], 128, 72))


@pytest.mark.parametrize("config", [None, dict(swap_ab=True, block_m=16, num_warps=4), dict(wgmma=True),
                                    dict(wgmma=True, warp_specialize=False)],
                         ids=["default", "swap_ab", "wgmma-warp-specialized", "wgmma-one-group"])
def test_gmm_fp8_reads_the_scales_strides(config):
    """The rows' scales stored column by column ([KB, M] storage; each step's scales contiguous)
    give the same product, bit for bit, as row by row (the kernels once read them as unit-stride
    along K whatever their strides); so do the weight scales stored transposed."""
    sizes, K, N = [37, 0, 200, 19], 300, 140
    x, w, batch_sizes = _operands(sizes, K, N, extra_rows=5, seed=21)
    x_q, x_s = fp8.quantize_rows(x)
    w_q, w_s = fp8.quantize_blocks(w)
    out = fp8.gmm_fp8(x_q, x_s, w_q, w_s, batch_sizes, out_dtype=torch.float32, config=config)
    x_s_cols = x_s.t().contiguous().t()
    w_s_t = w_s.transpose(1, 2).contiguous().transpose(1, 2)
    assert x_s_cols.stride() == (1, x_s.shape[0]) and not torch.equal(torch.tensor(x_s_cols.stride()),
                                                                        torch.tensor(x_s.stride()))
    moved = fp8.gmm_fp8(x_q, x_s_cols, w_q, w_s_t, batch_sizes, out_dtype=torch.float32, config=config)
    assert torch.equal(out, moved)
    assert_close("gmm_fp8", out, _definition(x_q, x_s, w_q, w_s, sizes, True), dtype=torch.float32, family="fp8")


@pytest.mark.parametrize("config", [dict(), dict(wgmma=True, warp_specialize=True)], ids=["triton", "gluon"])
def test_gmm_fp8_tile_order_changes_no_bits(config):
    """`group_m` only orders the tiles: every order gives the same output bit for bit (the
    Gluon form where it runs, on the GPU); it must be an int >= 1."""
    if config.get("wgmma") and not (DEVICE == "cuda" and fp8_wgmma.available()):
        pytest.skip("the Gluon form runs on a GPU")
    sizes, K, N = GMM_CASES["mixed"]
    x, w, batch_sizes = _operands(sizes, K, N, extra_rows=3, seed=21)
    x_q, x_s = fp8.quantize_rows(x)
    w_q, w_s = fp8.quantize_blocks(w)
    outs = [fp8.gmm_fp8(x_q, x_s, w_q, w_s, batch_sizes, out_dtype=torch.float32, config=dict(config, group_m=g))
            for g in (1, 3, 8, 64)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert_close("gmm_fp8 group_m", outs[0], _definition(x_q, x_s, w_q, w_s, sizes, True), dtype=torch.float32,
                 family="fp8")
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="group_m"):
            fp8.gmm_fp8(x_q, x_s, w_q, w_s, batch_sizes, config=dict(config, group_m=bad))


@pytest.mark.gpu
@pytest.mark.parametrize("block_m, stages", [(192, 4), (128, 4), (192, 5), (256, 4), (256, 3)])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gmm_fp8_gluon_tma_store_same_bits(block_m, stages, out_dtype):
    """The warp-specialized Gluon form's output stored by TMA (full 64-row pieces of a group; the
    rest, and outputs with no room or no 16-bit type, by masked stores) or all by masked stores:
    the same bits, groups of uneven sizes (pieces that end mid-group, empty groups, rows past the
    total written as zeros), N not a multiple of the tile."""
    if not (DEVICE == "cuda" and fp8_wgmma.available()):
        pytest.skip("the Gluon form runs on a GPU")
    sizes, K, N = [300, 0, 64, 1, 190, 640], 384, 200
    x, w, batch_sizes = _operands(sizes, K, N, extra_rows=70, seed=5)
    x_q, x_s = fp8.quantize_rows(x)
    w_q, w_s = fp8.quantize_blocks(w)
    config = dict(wgmma=True, warp_specialize=True, block_m=block_m, num_stages=stages)
    outs = [fp8.gmm_fp8(x_q, x_s, w_q, w_s, batch_sizes, out_dtype=out_dtype, config=dict(config, tma_store=t))
            for t in (True, False)]
    assert torch.equal(outs[0], outs[1])
    assert not outs[0][sum(sizes):].any(), "rows past the groups' total are zeros"
    assert_close("gmm_fp8 gluon tma store", outs[0].float(), _definition(x_q, x_s, w_q, w_s, sizes, True),
                 dtype=out_dtype, family="fp8")


@pytest.mark.parametrize("case", list(TMA_CASES))
@pytest.mark.parametrize("trans_b", [True, False], ids=["w_ENK", "w_EKN"])
def test_gmm_fp8_tma_loads_and_persistent_programs_equal_pointer_loads(case, trans_b, monkeypatch):
    """TMA loads (descriptors built once per program), one program per SM and the K-major copy of
    an [E, K, N] weight compute the same products in the same order as masked pointer loads:
    equal bit for bit. Where an operand's strides are not 16-byte aligned (K or N not a multiple
    of 16 bytes of e4m3) the launch falls back to pointer loads."""
    from megablocks.backend import fp8 as backend

    sizes, K, N = TMA_CASES[case]
    x, w, batch_sizes = _operands(sizes, K, N, extra_rows=3, seed=5)
    x_q, x_s = fp8.quantize_rows(x)
    w_q, w_s = fp8.quantize_blocks(w if trans_b else w.transpose(1, 2).contiguous())
    plain = fp8.gmm_fp8(x_q, x_s, w_q, w_s, batch_sizes, out_dtype=torch.float32, trans_b=trans_b,
                        config=dict(tma=False, persistent=False, copy_n_major=False))
    descriptors = []
    prepare = backend.prepare_tma
    monkeypatch.setattr(backend, "prepare_tma", lambda device: descriptors.append(device) or prepare(device))
    expected = 0
    for copy in (False, True):  # trans_b=False: [E, K, N] weights read in place, or copied K-major
        for persistent in (False, True):
            out = fp8.gmm_fp8(x_q, x_s, w_q, w_s, batch_sizes, out_dtype=torch.float32, trans_b=trans_b,
                              config=dict(tma=True, persistent=persistent, copy_n_major=copy))
            assert torch.equal(out, plain), (case, trans_b, copy, persistent)
            expected += K % 16 == 0 and (trans_b or copy or N % 16 == 0)
    assert len(descriptors) == expected, (case, trans_b, descriptors)


def test_gmm_fp8_default_launches():
    """The default launch by rows per expert: 16- then 32-row swap_ab tiles, 128-row pointer-load
    tiles, then the persistent TMA form; the interpreter's small tiles."""
    E = 8
    expected = [(8 * E, 16, True, False), (8 * E + 1, 32, True, False), (32 * E, 32, True, False),
                (32 * E + 1, 128, False, False), (128 * E, 128, False, False), (128 * E + 1, 128, False, True)]
    for M, block_m, swap_ab, tma in expected:
        cfg = fp8_backend.gmm_fp8_launch(M, E, gluon=False)
        assert (cfg["block_m"], cfg["swap_ab"], cfg["tma"], cfg["persistent"]) == (block_m, swap_ab, tma, tma), M
        assert set(cfg) == set(fp8_backend._GMM_FP8_CONFIG_KEYS), M
    assert fp8_backend.gmm_fp8_launch(16, E, interpret=True)["block_m"] == 32
    full = fp8_backend.gmm_fp8_launch(8 * E, E, decode=False, gluon=False)
    assert (full["block_m"], full["swap_ab"], full["tma"], full["wgmma"]) == (128, False, True, False)
    # Past the decode sizes, where Gluon is, its 192 x 128 warp-specialized form (1152 rows per
    # expert: 6 tiles of 192 rows, 9 of 128).
    gluon = fp8_backend.gmm_fp8_launch(1152 * E, E, decode=False)
    assert set(gluon) == set(fp8_backend._GMM_FP8_CONFIG_KEYS)
    if fp8_wgmma.available():
        assert (gluon["block_m"], gluon["block_n"], gluon["wgmma"], gluon["warp_specialize"]) == (192, 128, True, True)
    else:
        assert gluon == full
    # 192-row tiles where they pad the rows per expert to no more rows than 128-row ones, else the
    # Gluon form's 128 x 128 tiles: 256 or 200 rows per expert pad to 384 against 256, 300 to 384
    # against 384, 160 to 192 against 256, 1024 to 1152 against 1024, 2048 to 2112 against 2048.
    for rows, wide in ((256, False), (300, True), (1024, False), (2048, False), (160, True), (200, False),
                       (384, True), (1152, True)):
        cfg = fp8_backend.gmm_fp8_launch(rows * 128, 128, decode=False)
        if fp8_wgmma.available():
            assert cfg == dict(gluon, block_m=192 if wide else 128), rows
        else:
            assert cfg == full, rows


@pytest.mark.parametrize("case", list(GMM_CASES))
@pytest.mark.parametrize("trans_b", [True, False], ids=["w_ENK", "w_EKN"])
@pytest.mark.parametrize("block_n", [None, 256], ids=["block_n_default", "block_n_256"])
def test_gmm_fp8_swap_ab_tiles(case, trans_b, block_n):
    """`swap_ab` (each tile computed transposed, weights times rows, 16-row tiles) against the plain
    definition at the FP8 product's tolerance: uneven and empty groups, rows past the groups'
    total (zeros), K and N not multiples of the tiles, [E, K, N] weights copied K-major; and
    tiles two weight blocks wide (each column's block scale)."""
    sizes, K, N = GMM_CASES[case]
    x, w, batch_sizes = _operands(sizes, K, N, extra_rows=3, seed=11)
    x_q, x_s = fp8.quantize_rows(x)
    w_q, w_s = fp8.quantize_blocks(w if trans_b else w.transpose(1, 2).contiguous())
    cfg = dict(swap_ab=True, block_m=16, num_warps=4) if DEVICE == "cuda" else dict(swap_ab=True, block_m=16)
    if block_n is not None:
        cfg.update(block_n=block_n)
    out = fp8.gmm_fp8(x_q, x_s, w_q, w_s, batch_sizes, out_dtype=torch.float32, trans_b=trans_b, config=cfg)
    ref = _definition(x_q, x_s, w_q, w_s, sizes, trans_b)
    assert_close("gmm_fp8 swap_ab", out, ref, dtype=torch.float32, family="fp8")
    assert not out[sum(sizes):].any(), "rows past the groups' total are zeros"


if DEVICE == "cuda":
    GLU_DECODE_CASES = {  # (sizes, K, 2F)
        "decode": ([8, 0, 3, 1, 0, 4, 16, 0], 1000, 512),
        "decode_32": ([40, 0, 17, 31, 60, 5, 33, 2], 520, 768),
    }
else:
    GLU_DECODE_CASES = {
        "mixed": ([5, 0, 1, 9, 0, 3], 200, 256),
        "one_expert": ([7], 130, 512),
    }


def _glu_decode_operands(sizes, K, two_f, dtype, seed):
    """Quantized rows (3 past the groups' total; an outlier row, a NaN row) and w1 [E, 2F, K]."""
    x, w, batch_sizes = _operands(sizes, K, two_f, extra_rows=3, seed=seed)
    x[1] *= 30  # an outlier row (its GLU within fp16's range)
    x[4, 7] = float("nan")  # its row's first tile NaN: h, the GLU and its tiles NaN
    x_q, x_s = fp8.quantize_rows(x.to(dtype))
    w_q, w_s = fp8.quantize_blocks(w)
    return x_q, x_s, w_q, w_s, batch_sizes


def _assert_same_tiles(name, got, want):
    (q, s), (ref_q, ref_s) = got, want
    assert q.shape == ref_q.shape and s.shape == ref_s.shape and q.dtype == fp8.FP8_DTYPE, name
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)), name
    assert torch.equal(s.isnan(), ref_s.isnan()) and torch.equal(s.nan_to_num(), ref_s.nan_to_num()), name


@pytest.mark.parametrize("case", list(GLU_DECODE_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "clamped_swiglu"])
@pytest.mark.parametrize("block_m", [16, 32])
def test_gmm_fp8_glu_quantize_equals_the_two_launches(case, dtype, activation, block_m):
    """The decode up product with the GLU and its quantizer in the epilogue equals `gmm_fp8` over
    the same transposed tile, then `glu_quantize_rows` of h's halves, bit for bit (values and
    scales): uneven and empty groups, rows past the groups' total, K not a multiple of 128, an
    outlier row and a NaN row; and the tiles dequantize to the GLU of the exact product within
    e4m3's half unit plus h's rounding."""
    from megablocks.ops.activation import glu

    sizes, K, two_f = GLU_DECODE_CASES[case]
    f = two_f // 2
    x_q, x_s, w_q, w_s, batch_sizes = _glu_decode_operands(sizes, K, two_f, dtype, seed=len(sizes) + K)
    M = x_q.shape[0]
    assert fp8_backend.glu_decode_fits(M, len(sizes), two_f)
    cfg = dict(swap_ab=True, block_m=block_m, block_n=Q, block_k=Q)
    if DEVICE == "cuda":
        cfg.update(num_warps=4)
    h = fp8.gmm_fp8(x_q, x_s, w_q, w_s, batch_sizes, out_dtype=dtype, config=cfg)
    want = fp8.glu_quantize_rows(h[:, :f], h[:, f:], activation)
    got = fp8.gmm_fp8_glu_quantize(x_q, x_s, w_q, w_s, batch_sizes, activation, out_dtype=dtype, block_m=block_m)
    _assert_same_tiles("glu epilogue", got, want)
    q, s = got
    assert s[4].isnan().all() and not s[torch.arange(M) != 4].isnan().any()
    assert (q[sum(sizes):].view(torch.uint8) == 0).all(), "rows past the groups' total: the zeros' tiles"
    exact = _definition(x_q, x_s, w_q, w_s, sizes, True)
    a = glu(exact[:, :f].float(), exact[:, f:].float(), activation)
    ok = torch.ones(M, dtype=torch.bool)
    ok[4] = False
    deq = fp8.dequantize_rows(q, s).cpu()[ok]
    a = a[ok]
    scale = s.cpu()[ok].repeat_interleave(Q, dim=1)
    # h's rounding; in fp32 on a GPU, the FP8 tensor cores' accumulator instead (narrower than
    # fp32's: an H200 missed the fp32 step's bound by 1e-4 on values near 1).
    h_step = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10 if dtype == torch.float16 else (
        2.0**-13 if DEVICE == "cuda" else 2.0**-20)
    bound = a.abs() * 2.0**-4 + scale * 2.0**-10 + (8 * h_step + 1e-6) * a.abs().amax(dim=1, keepdim=True)
    assert ((deq - a).abs() <= bound).all(), ((deq - a).abs() - bound).max()


@pytest.mark.parametrize("two_f, sizes", [(2 * 72, [5, 0, 9]), (256, [40, 0, 60])], ids=["f_72", "rows_past_decode"])
def test_gmm_fp8_glu_quantize_elsewhere_the_two_launches(two_f, sizes):
    """Where the epilogue form does not fit (F not a multiple of 128; more than 32 rows per expert)
    the call is the two default launches themselves."""
    assert not fp8_backend.glu_decode_fits(sum(sizes) + 3, len(sizes), two_f)
    x_q, x_s, w_q, w_s, batch_sizes = _glu_decode_operands(sizes, 130, two_f, torch.float32, seed=two_f)
    h = fp8.gmm_fp8(x_q, x_s, w_q, w_s, batch_sizes, out_dtype=torch.float32)
    want = fp8.glu_quantize_rows(h[:, :two_f // 2], h[:, two_f // 2:], "silu")
    got = fp8.gmm_fp8_glu_quantize(x_q, x_s, w_q, w_s, batch_sizes, "silu", out_dtype=torch.float32)
    _assert_same_tiles("two launches", got, want)


def _routed_tokens(T, K, E, top_k, dtype, seed):
    """Token rows [T, K] (an outlier token, a NaN token) and the plain layout's maps of ids with an
    empty expert (1) and one id past E (its row after all experts')."""
    from megablocks.ops.routing import row_maps

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=g)
    x[1] *= 30
    x[2, 5] = float("nan")
    ids = torch.randint(0, E, (T, top_k), generator=g)
    ids[ids == 1] = 0
    ids[3, 0] = E
    counts, maps = row_maps(ids.to(DEVICE), E)
    return x.to(dtype).to(DEVICE), counts, maps


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_m", [16, 32])
def test_gather_gmm_fp8_glu_quantize_equals_the_launches(dtype, block_m):
    """The token rows gathered through the maps and quantized in the GLU decode kernel's K loop
    equal `gather_quantize_rows`, then the kernel on its e4m3 rows, bit for bit: an empty expert,
    an id past E (a row past the groups' total), an outlier token, a NaN token, K not a multiple
    of 128."""
    T, K, two_f, E, top_k = 9, 200, 256, 6, 2
    x, counts, maps = _routed_tokens(T, K, E, top_k, dtype, seed=block_m)
    w_q, w_s = fp8.quantize_blocks((torch.randn(E, two_f, K) / K**0.5).to(DEVICE))
    assert fp8_backend.glu_decode_fits(T * top_k, E, two_f)
    for activation in ("silu", "clamped_swiglu"):
        x_q, x_s = fp8.gather_quantize_rows(x, maps.assignment_row, top_k)
        want = fp8.gmm_fp8_glu_quantize(x_q, x_s, w_q, w_s, counts, activation, out_dtype=dtype, block_m=block_m)
        got = fp8.gather_gmm_fp8_glu_quantize(x, maps.assignment_row, maps.row_assignment, top_k, w_q, w_s, counts,
                                              activation, out_dtype=dtype, block_m=block_m)
        _assert_same_tiles(f"gathered {activation}", got, want)
        assert got[1].isnan().any() and not got[1].isnan().all()  # the NaN token's rows only


def test_gather_gmm_fp8_glu_quantize_validates():
    x, counts, maps = _routed_tokens(5, 128, 3, 2, torch.float32, seed=0)
    w_q, w_s = fp8.quantize_blocks(torch.randn(3, 256, 128, device=DEVICE))
    args = (maps.assignment_row, maps.row_assignment, 2, w_q, w_s, counts)
    with pytest.raises(ValueError, match="row_assignment_N: expected T \\* top_k"):
        fp8.gather_gmm_fp8_glu_quantize(x, maps.assignment_row, maps.row_assignment[:-1], 2, w_q, w_s, counts)
    with pytest.raises(ValueError, match="top_k: expected an int >= 1"):
        fp8.gather_gmm_fp8_glu_quantize(x, maps.assignment_row, maps.row_assignment, 0, w_q, w_s, counts)
    with pytest.raises(ValueError, match=r"w_q: expected \[E, N, K=64\] \(out x in, K as x's\)"):
        fp8.gather_gmm_fp8_glu_quantize(x[:, :64], *args)
    with pytest.raises(ValueError, match="batch_sizes: expected 3 entries"):
        fp8.gather_gmm_fp8_glu_quantize(x, *args[:-1], counts[:2])
    with pytest.raises(ValueError, match="activation: expected one of"):
        fp8.gather_gmm_fp8_glu_quantize(x, *args, "swish")
    with pytest.raises(ValueError, match="block_m: expected None, 16 or 32"):
        fp8.gather_gmm_fp8_glu_quantize(x, *args, block_m=8)
    with pytest.raises(TypeError):
        fp8.gather_gmm_fp8_glu_quantize(x.long(), *args)
    with pytest.raises(ValueError, match="x: expected a contiguous last dim"):
        fp8.gather_gmm_fp8_glu_quantize(torch.randn(128, 5, device=DEVICE).t(), *args)


def test_gmm_fp8_glu_quantize_validates():
    x_q, x_s, w_q, w_s, batch_sizes = _glu_decode_operands([3, 2], 128, 256, torch.float32, seed=0)
    with pytest.raises(ValueError, match="activation: expected one of"):
        fp8.gmm_fp8_glu_quantize(x_q, x_s, w_q, w_s, batch_sizes, "swish")
    with pytest.raises(ValueError, match="block_m: expected None, 16 or 32"):
        fp8.gmm_fp8_glu_quantize(x_q, x_s, w_q, w_s, batch_sizes, block_m=64)
    odd_q, odd_s = fp8.quantize_blocks(torch.randn(2, 255, 128, device=DEVICE))
    with pytest.raises(ValueError, match=r"w1_q: expected \[E, 2F, K\]"):
        fp8.gmm_fp8_glu_quantize(x_q, x_s, odd_q, odd_s, batch_sizes)
    with pytest.raises(ValueError, match="batch_sizes: expected 2 entries"):
        fp8.gmm_fp8_glu_quantize(x_q, x_s, w_q, w_s, batch_sizes[:1])
    with pytest.raises(TypeError):
        fp8.gmm_fp8_glu_quantize(x_q.float(), x_s, w_q, w_s, batch_sizes)
    with pytest.raises(ValueError, match="x_s: expected"):
        fp8.gmm_fp8_glu_quantize(x_q, x_s[:, :0], w_q, w_s, batch_sizes)


@pytest.mark.parametrize("case", list(TMA_CASES))
@pytest.mark.parametrize("trans_b", [True, False], ids=["w_ENK", "w_EKN"])
@pytest.mark.parametrize("form", [dict(warp_specialize=False), dict(warp_specialize=True),
                                  dict(warp_specialize=True, block_m=192), dict(warp_specialize=True, block_m=256)],
                         ids=["one-group", "warp-specialized", "warp-specialized-192x128", "warp-specialized-256x128"])
def test_gmm_fp8_wgmma_form(case, trans_b, form):
    """The Gluon form (`wgmma`: each step's product in flight while the one before it is promoted)
    against the definition at the FP8 product's tolerance and against the Triton kernel's TMA
    form (the same products promoted in the same order: equal bit for bit); all its forms, the
    one group of warps and the loader warp with two or three consumer warpgroups
    (`warp_specialize`) over 128 x 128, 192 x 128 and 256 x 128 tiles. On CPU, and where the
    operands do not allow TMA (K not a multiple of 16), the call takes the Triton kernel."""
    from megablocks.backend import fp8_wgmma

    sizes, K, N = TMA_CASES[case]
    x, w, batch_sizes = _operands(sizes, K, N, extra_rows=130, seed=13)
    x_q, x_s = fp8.quantize_rows(x)
    w_q, w_s = fp8.quantize_blocks(w if trans_b else w.transpose(1, 2).contiguous())
    out = fp8.gmm_fp8(x_q, x_s, w_q, w_s, batch_sizes, out_dtype=torch.float32, trans_b=trans_b,
                      config=dict(wgmma=True, **form))
    assert_close("gmm_fp8 wgmma", out, _definition(x_q, x_s, w_q, w_s, sizes, trans_b), dtype=torch.float32,
                 family="fp8")
    assert not out[sum(sizes):].any(), "rows past the groups' total are zeros"
    if DEVICE == "cuda" and fp8_wgmma.usable(x_q, w_q if trans_b else w_q.transpose(1, 2).contiguous()):
        tma_form = fp8.gmm_fp8(x_q, x_s, w_q, w_s, batch_sizes, out_dtype=torch.float32, trans_b=trans_b,
                               config=dict(block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=4,
                                           tma=True, persistent=True))
        assert torch.equal(out, tma_form), (case, trans_b)
    bf16 = fp8.gmm_fp8(x_q, x_s, w_q, w_s, batch_sizes, out_dtype=torch.bfloat16, trans_b=trans_b,
                       config=dict(wgmma=True, **form))
    assert_close("gmm_fp8 wgmma bf16", bf16, out, dtype=torch.bfloat16)


@pytest.mark.parametrize("K", [256, 200], ids=["k_aligned", "k_unaligned"])
@pytest.mark.parametrize("trans_b", [True, False], ids=["w_ENK", "w_EKN"])
def test_gmm_fp8_default_launch_past_decode(K, trans_b):
    """Past the decode sizes (more than 32 rows per expert) without a config: the 192 x 128 Gluon
    form where its operands allow it (GPU: equal bit for bit to asking for it), else the Triton
    kernel (K = 200 is not a multiple of 16: equal bit for bit to the Triton launch); both against
    the definition. Uneven and empty groups, rows past the groups' total."""
    sizes, N = [150, 0, 97, 300], 200
    x, w, batch_sizes = _operands(sizes, K, N, extra_rows=5, seed=17)
    x_q, x_s = fp8.quantize_rows(x)
    w_q, w_s = fp8.quantize_blocks(w if trans_b else w.transpose(1, 2).contiguous())
    out = fp8.gmm_fp8(x_q, x_s, w_q, w_s, batch_sizes, out_dtype=torch.float32, trans_b=trans_b)
    assert_close("gmm_fp8 default", out, _definition(x_q, x_s, w_q, w_s, sizes, trans_b), dtype=torch.float32,
                 family="fp8")
    assert not out[sum(sizes):].any(), "rows past the groups' total are zeros"
    if DEVICE == "cuda":
        M, E = x.shape[0], len(sizes)
        gluon = K % 16 == 0 and torch.cuda.get_device_capability() == (9, 0)
        same = fp8_backend.gmm_fp8_launch(M, E, decode=False, gluon=gluon)
        assert same["wgmma"] == (gluon and fp8_wgmma.available())  # 138 rows per expert: 192-row tiles
        asked = fp8.gmm_fp8(x_q, x_s, w_q, w_s, batch_sizes, out_dtype=torch.float32, trans_b=trans_b,
                            config=dict(same))
        assert torch.equal(out, asked), (K, trans_b, same)


def test_gmm_fp8_wgmma_validates():
    x_q, x_s = fp8.quantize_rows(torch.randn(8, 128, device=DEVICE))
    w_q, w_s = fp8.quantize_blocks(torch.randn(2, 128, 128, device=DEVICE))
    sizes = torch.tensor([3, 5], dtype=torch.int32, device=DEVICE)
    for bad in (dict(wgmma=True, block_m=64), dict(wgmma=True, swap_ab=True),
                dict(wgmma=True, warp_specialize=False, block_m=192), dict(wgmma=True, block_n=256),
                dict(wgmma=True, block_k=64)):
        with pytest.raises(ValueError, match="wgmma takes"):
            fp8.gmm_fp8(x_q, x_s, w_q, w_s, sizes, config=bad)


def test_gmm_fp8_accuracy_against_unquantized():
    """The whole FP8 path against the fp32 product of the unquantized operands: e4m3's 3-bit
    mantissa gives each input ~2.3% rms relative error (uniform rounding over a binade); products
    of K terms average them. Measured at these shapes: 3.8% mean and 4.7% max relative error per output row."""
    sizes, K, N = [40, 0, 25], 256, 96
    x, w, batch_sizes = _operands(sizes, K, N, seed=3)
    x[7] *= 1e3  # an outlier row: its own tiles' scales absorb it
    out = fp8.gmm_fp8(*fp8.quantize_rows(x), *fp8.quantize_blocks(w), batch_sizes, out_dtype=torch.float32).cpu()
    ref = torch.cat([x[:40].cpu() @ w[0].cpu().t(), x[40:].cpu() @ w[2].cpu().t()])
    rel = ((out - ref).norm(dim=1) / ref.norm(dim=1))
    assert rel.max() < 0.06 and rel.mean() < 0.05, rel


def test_fp8_products_are_exact_in_the_kernels_arithmetic():
    """Two e4m3 operands whose product needs every bit of fp32's accumulator tile: the kernel
    agrees with float64 to fp32 rounding (the interpreter's FP8 dot is exact; on the GPU products
    of one exponent lose nothing to the tensor cores' alignment, see tests/utils.py)."""
    x = torch.full((16, Q), 1.0 + 2**-3, device=DEVICE)
    x[:, ::2] = -(1.0 + 2**-2)
    w = torch.full((1, 32, Q), 1.0 + 2**-3, device=DEVICE)
    out = fp8.gmm_fp8(*fp8.quantize_rows(x), *fp8.quantize_blocks(w), torch.tensor([16], device=DEVICE),
                      out_dtype=torch.float32)
    exact = (64 * (1.125 * 1.125) - 64 * (1.25 * 1.125))
    assert torch.all(out.cpu() == exact), out[0, :4]


def test_gmm_fp8_validates():
    x, w, batch_sizes = _operands([3, 2], 64, 32)
    x_q, x_s = fp8.quantize_rows(x)
    w_q, w_s = fp8.quantize_blocks(w)
    with pytest.raises(TypeError, match="x_q"):
        fp8.gmm_fp8(x, x_s, w_q, w_s, batch_sizes)
    with pytest.raises(ValueError, match="w_q: expected \\[E, N, K=64\\]"):
        fp8.gmm_fp8(x_q, x_s, w_q[:, :, :32].contiguous(), w_s, batch_sizes)
    with pytest.raises(ValueError, match="x_s"):
        fp8.gmm_fp8(x_q, x_s[:4], w_q, w_s, batch_sizes)
    with pytest.raises(ValueError, match="w_s"):
        fp8.gmm_fp8(x_q, x_s, w_q, w_s[:, :, :0], batch_sizes)
    with pytest.raises(ValueError, match="trans_b=False"):
        fp8.gmm_fp8(x_q, x_s, w_q, w_s, batch_sizes, trans_b=False)  # [E, N=32, K=64] read as [E, K, N]
    with pytest.raises(ValueError, match="batch_sizes"):
        fp8.gmm_fp8(x_q, x_s, w_q, w_s, batch_sizes[:1])
    with pytest.raises(TypeError, match="out_dtype"):
        fp8.gmm_fp8(x_q, x_s, w_q, w_s, batch_sizes, out_dtype=torch.int8)
    with pytest.raises(ValueError, match="must divide"):
        fp8.gmm_fp8(x_q, x_s, w_q, w_s, batch_sizes, config=dict(block_n=48))
    with pytest.raises(ValueError, match="must divide"):  # a multiple of 128 only with swap_ab
        fp8.gmm_fp8(x_q, x_s, w_q, w_s, batch_sizes, config=dict(block_n=256, swap_ab=False))
    with pytest.raises(ValueError, match="config: expected a dict with keys among"):
        fp8.gmm_fp8(x_q, x_s, w_q, w_s, batch_sizes, config=dict(warp_specialise=True))  # a misspelt key
    with pytest.raises(TypeError, match="transposed: expected a bool"):
        fp8.quantize_blocks(w, transposed="yes")
    with pytest.raises(TypeError, match="x"):
        fp8.quantize_rows(x.to(torch.int32))
    with pytest.raises(ValueError, match="x"):
        fp8.quantize_rows(x[0])
    with pytest.raises(ValueError, match="contiguous"):
        fp8.quantize_rows(x.t())


@pytest.mark.parametrize("fp8_wgrad", [True, False], ids=["fp8-wgrad", "unquantized-wgrad"])
@pytest.mark.parametrize("trans_b", [True, False], ids=["w_ENK", "w_EKN"])
def test_fp8_gmm_forward_and_gradients(trans_b, fp8_wgrad, monkeypatch):
    sizes, K, N = [9, 0, 30, 1], 150, 40
    x, w, batch_sizes = _operands(sizes, K, N, seed=5)
    w = w if trans_b else w.transpose(1, 2).contiguous()
    x.requires_grad_(True)
    w.requires_grad_(True)
    quantized = []  # each column quantization's (rows, cols, blocks)
    real_cols = fp8.quantize_cols_grouped
    monkeypatch.setattr(fp8, "quantize_cols_grouped",
                        lambda v, bs, transposed=False, blocks=False: quantized.append((*v.shape, blocks))
                        or real_cols(v, bs, transposed=transposed, blocks=blocks))
    out = fp8.fp8_gmm(x, w, batch_sizes, trans_b=trans_b, fp8_wgrad=fp8_wgrad)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    out.backward(grad)
    # With FP8 weight gradients, b (x for w [E, N, K], the output gradient for [E, K, N]) is
    # quantized in 128 x 128 blocks by default (`wgrad_b_blocks`), a (the other) in column tiles.
    M = sum(sizes)
    assert quantized == ([(M, K if trans_b else N, True), (M, N if trans_b else K, False)] if fp8_wgrad else [])
    quantized.clear()
    # The definition, in float64: the quantized operands of each product.
    x_q, x_s = fp8.quantize_rows(x.detach())
    w_q, w_s = fp8.quantize_blocks(w.detach())
    g_q, g_s = fp8.quantize_rows(grad)
    xd, gd = fp8.dequantize_rows(x_q, x_s).double().cpu(), fp8.dequantize_rows(g_q, g_s).double().cpu()
    wd = fp8.dequantize_blocks(w_q, w_s).double().cpu()
    w_nk = wd if trans_b else wd.transpose(1, 2)  # [E, N, K]
    if fp8_wgrad:  # both operands in 128 x 1 tiles down each group's rows
        xf = fp8.dequantize_cols_grouped(*fp8.quantize_cols_grouped(x.detach(), batch_sizes), batch_sizes)
        gf = fp8.dequantize_cols_grouped(*fp8.quantize_cols_grouped(grad, batch_sizes), batch_sizes)
        xf, gf = xf.double().cpu(), gf.double().cpu()
    else:
        xf, gf = x.detach().double().cpu(), grad.double().cpu()
    ref_out, ref_dx = torch.zeros(sum(sizes), N, dtype=torch.float64), torch.zeros(sum(sizes), K, dtype=torch.float64)
    ref_dw = torch.zeros(len(sizes), N, K, dtype=torch.float64)
    start = 0
    for e, m in enumerate(sizes):
        rows = slice(start, start + m)
        ref_out[rows] = xd[rows] @ w_nk[e].t()
        ref_dx[rows] = gd[rows] @ w_nk[e]
        ref_dw[e] = gf[rows].t() @ xf[rows]
        start += m
    assert_close("out", out, ref_out, dtype=torch.float32, family="fp8")
    assert_close("grad x", x.grad, ref_dx, dtype=torch.float32, family="fp8")
    assert_close("grad w", w.grad, ref_dw if trans_b else ref_dw.transpose(1, 2), dtype=torch.float32, family="fp8")
    with pytest.raises(TypeError, match="w: expected a tensor of x's dtype"):
        fp8.fp8_gmm(x, w.detach().half(), batch_sizes, trans_b=trans_b)
    # The weight also given stored the other way (`weights_t`): the products that would read it
    # N-major read that instead, with the same values in the same order: equal bit for bit.
    cache = fp8.Fp8WeightCache()
    x2, w2 = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    out2 = fp8.fp8_gmm(x2, w2, batch_sizes, trans_b=trans_b, fp8_wgrad=fp8_wgrad, weights=cache(w2),
                       weights_t=cache.transposed(w2))
    out2.backward(grad)
    assert torch.equal(out2, out) and torch.equal(x2.grad, x.grad) and torch.equal(w2.grad, w.grad)
    # Gradient-accumulation fusion (`accumulate_into`, as main_grad): w's gradient (the same
    # product) added into an fp32 tensor by the product's epilogue, not returned; x's as before.
    acc = torch.randn(w.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    start = acc.clone()
    x3, w3 = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    out3 = fp8.fp8_gmm(x3, w3, batch_sizes, trans_b=trans_b, fp8_wgrad=fp8_wgrad, accumulate_into=acc)
    out3.backward(grad)
    assert torch.equal(out3, out) and torch.equal(x3.grad, x.grad) and w3.grad is None
    assert_close("accumulate_into", acc, start.double() + w.grad.double(), dtype=torch.float32)
    assert not torch.equal(acc, start)
    with pytest.raises(TypeError, match="accumulate_into"):
        fp8.fp8_gmm(x3, w3, batch_sizes, trans_b=trans_b, accumulate_into=acc.half())
    with pytest.raises(ValueError, match="accumulate_into: expected a contiguous w's shape"):
        fp8.fp8_gmm(x3, w3, batch_sizes, trans_b=trans_b, accumulate_into=acc.transpose(1, 2).contiguous())
    # b in column tiles (`wgrad_b_blocks=False`): the forward and x's gradient unchanged, w's the
    # definition's (the same values but those that fall into e4m3's subnormals in blocks).
    x4, w4 = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    out4 = fp8.fp8_gmm(x4, w4, batch_sizes, trans_b=trans_b, fp8_wgrad=fp8_wgrad, wgrad_b_blocks=False)
    out4.backward(grad)
    assert quantized[-2:] == ([(M, K if trans_b else N, False), (M, N if trans_b else K, False)] if fp8_wgrad else [])
    assert torch.equal(out4, out) and torch.equal(x4.grad, x.grad)
    assert_close("grad w, b in column tiles", w4.grad, ref_dw if trans_b else ref_dw.transpose(1, 2),
                 dtype=torch.float32, family="fp8")
    if not fp8_wgrad:
        assert torch.equal(w4.grad, w.grad)
    with pytest.raises(TypeError, match="wgrad_b_blocks: expected a bool"):
        fp8.fp8_gmm(x4, w4, batch_sizes, trans_b=trans_b, fp8_wgrad=fp8_wgrad, wgrad_b_blocks=1)


def _set_blocks(q_c, s_c, bs, M):
    """The entries `quantize_cols_grouped(..., transposed=True)` sets: its groups' blocks' columns
    of q_c and rows of s_c (the rest is left unset), as uint8 values and scales."""
    blocks = [b + j for first, n, b in fp8_backend._group_blocks(bs.cpu(), M) for j in range(-(-n // Q))]
    cols = torch.tensor([b * Q + i for b in blocks for i in range(Q)], dtype=torch.long, device=q_c.device)
    rows = torch.tensor(blocks, dtype=torch.long, device=s_c.device)
    return q_c.view(torch.uint8).index_select(1, cols), s_c.index_select(0, rows)


def _assert_cols_equal(name, got, want, bs, M):
    (gq, gs), (wq, ws) = _set_blocks(*got, bs, M), _set_blocks(*want, bs, M)
    assert torch.equal(gq, wq), name
    assert torch.equal(gs.isnan(), ws.isnan()) and torch.equal(gs.nan_to_num(), ws.nan_to_num()), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["silu", "gelu"])
@pytest.mark.parametrize("sizes, K", [
    ([130, 0, 1, 257], 200),   # groups over and under 128 rows, an empty one, sizes off the blocks
    ([128, 128], 128),         # whole blocks
    ([0, 0, 0], 136),          # no rows
], ids=["hostile", "whole", "empty"])
@pytest.mark.parametrize("form", ["pieces", "whole"])
def test_weight_gradient_operands_fused(sizes, K, activation, dtype, form, monkeypatch):
    """The FP8 weight gradient's operands made in the pass that reads what they come from
    (`quantize_rows_and_cols`, `gather_quantize_cols`, `glu_quantize_cols`,
    `glu_backward_quantize_rows_cols`): bit for bit the composed quantizers of the same rows in
    every entry those set; outlier, zero and NaN tiles; each block read in pieces or whole (32
    columns a program where no row tiles are made)."""
    from megablocks.backend import activation as kernels

    launch = dict(ch=32, bk=Q, num_warps=4, num_stages=1) if form == "pieces" else dict(ch=Q, bk=32, num_warps=4,
                                                                                          num_stages=1)
    monkeypatch.setattr(fp8_backend, "COLS_FUSED_LAUNCH", {m: dict(launch) for m in fp8_backend.COLS_FUSED_LAUNCH})

    M, top_k = sum(sizes), 2
    bs = torch.tensor(sizes, device=DEVICE)
    x = _hostile(M, K, dtype, seed=M + K)
    h1, h2 = _hostile(M, K, dtype, seed=M + K + 1), _hostile(M, K, dtype, seed=M + K + 2) / 3
    grad = _hostile(M, K, dtype, seed=M + 2 * K)
    if M > 4:
        grad[4, 5] = float("nan")
    # The output gradient: row tiles and column tiles in one pass.
    (q, s), cols = fp8.quantize_rows_and_cols(x, bs)
    ref_q, ref_s = fp8.quantize_rows(x)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(s, ref_s)
    _assert_cols_equal("rows_and_cols", cols, fp8.quantize_cols_grouped(x, bs, transposed=True), bs, M)
    # The token rows through the maps (M = T * top_k rows; a padding row -1 and an assignment past
    # N read zeros, never a token past T).
    g = torch.Generator().manual_seed(M)
    tokens = _hostile(M // top_k, K, dtype, seed=K)  # (every M here a multiple of top_k)
    assignment = torch.randperm(M, generator=g).to(DEVICE)
    if M > 7:
        assignment[6], assignment[7] = -1, M + 5
    present = (assignment >= 0) & (assignment < M)
    rows = torch.where(present[:, None], tokens[torch.where(present, assignment, 0) // top_k], 0).to(dtype)
    _assert_cols_equal("gather", fp8.gather_quantize_cols(tokens, assignment, top_k, bs),
                       fp8.quantize_cols_grouped(rows, bs, transposed=True), bs, M)
    # The GLU product, made again and not written.
    glu = kernels.glu_forward(h1, h2, activation)
    _assert_cols_equal("glu", fp8.glu_quantize_cols(h1, h2, activation, bs),
                       fp8.quantize_cols_grouped(glu, bs, transposed=True), bs, M)
    # The GLU's backward: both halves' row tiles and their column tiles side by side; h untouched.
    kept = (h1.clone(), h2.clone())
    (q1, s1), (q2, s2), cols = fp8.glu_backward_quantize_rows_cols(grad, h1, h2, activation, bs)
    assert torch.equal(h1, kept[0]) and torch.equal(h2, kept[1])
    d1, d2 = kept[0].clone(), kept[1].clone()
    (w1, ws1), (w2, ws2) = fp8.glu_backward_quantize_rows_(grad, d1, d2, activation)
    if DEVICE == "cuda" and dtype == torch.float32:  # the fp32 math compiled in another kernel
        for (gq, gs), (wq, ws) in (((q1, s1), (w1, ws1)), ((q2, s2), (w2, ws2))):
            torch.testing.assert_close(fp8.dequantize_rows(gq, gs), fp8.dequantize_rows(wq, ws), rtol=0.07, atol=0,
                                       equal_nan=True)
        return
    for (gq, gs), (wq, ws) in (((q1, s1), (w1, ws1)), ((q2, s2), (w2, ws2))):
        assert torch.equal(gq.view(torch.uint8), wq.view(torch.uint8))
        assert torch.equal(gs.isnan(), ws.isnan()) and torch.equal(gs.nan_to_num(), ws.nan_to_num())
    _assert_cols_equal("glu_backward", cols, fp8.quantize_cols_grouped(torch.cat([d1, d2], 1), bs, transposed=True),
                       bs, M)


def test_weight_gradient_operands_validate():
    x = torch.randn(4, 256, device=DEVICE)
    bs = torch.tensor([4], device=DEVICE)
    with pytest.raises(ValueError, match="contiguous last dim"):
        fp8.quantize_rows_and_cols(x[:, ::2], bs)
    with pytest.raises(TypeError):
        fp8.quantize_rows_and_cols(x, bs.float())
    with pytest.raises(ValueError, match="top_k"):
        fp8.gather_quantize_cols(x, torch.arange(4, device=DEVICE), 0, bs)
    with pytest.raises(ValueError, match="T \\* top_k"):
        fp8.gather_quantize_cols(x, torch.arange(4, device=DEVICE), 2, bs)
    with pytest.raises(ValueError, match="h2: expected h1's shape"):
        fp8.glu_quantize_cols(x[:, :128], x[:3, 128:], "silu", bs)
    with pytest.raises(ValueError, match="activation: expected one of"):
        fp8.glu_backward_quantize_rows_cols(x[:, :128], x[:, :128], x[:, 128:], "swish", bs)


@pytest.mark.parametrize("sizes, N, K", [
    ([130, 0, 256, 1], 72, 200),  # groups over and under 128 rows, an empty one; sizes off the blocks
    ([3, 2], 40, 33),
    ([0, 0], 16, 16),            # no rows at all: zeros
], ids=["hostile", "small", "empty"])
def test_gmm_fp8_wgrad_against_definition(sizes, N, K):
    """The FP8 weight gradient: `quantize_cols_grouped` bit for bit against its torch form (scales:
    one per column of each 128-row block that starts at a group's first row), and `gmm_fp8_wgrad`
    against a[g]^T b[g] of the dequantized operands in float64; outliers in one block of rows."""
    g = torch.Generator().manual_seed(sum(sizes) + N)
    M = sum(sizes)
    a = torch.randn(M, N, generator=g)
    b = torch.randn(M, K, generator=g)
    if M > 140:
        a[135:140] *= 300  # outliers: only their own block's scales move
    a, b = a.to(DEVICE), b.to(DEVICE)
    bs = torch.tensor(sizes, device=DEVICE)
    a_q, a_s = fp8.quantize_cols_grouped(a, bs)
    b_q, b_s = fp8.quantize_cols_grouped(b, bs)
    ref_q, ref_s = fp8.quantize_cols_grouped_reference(a, bs)
    blocks = sum(-(-n // Q) for n in sizes)
    assert a_s.shape == (-(-M // Q) + len(sizes), N)
    assert torch.equal(a_q.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(a_s[:blocks], ref_s[:blocks])
    out = fp8.gmm_fp8_wgrad(a_q, a_s, b_q, b_s, bs)
    assert out.shape == (len(sizes), N, K) and out.dtype == torch.float32
    ad = fp8.dequantize_cols_grouped(a_q, a_s, bs).double().cpu()
    bd = fp8.dequantize_cols_grouped(b_q, b_s, bs).double().cpu()
    want = torch.zeros(len(sizes), N, K, dtype=torch.float64)
    start = 0
    for e, m in enumerate(sizes):
        want[e] = ad[start:start + m].t() @ bd[start:start + m]
        start += m
    if M:
        assert_close("gmm_fp8_wgrad", out, want, dtype=torch.float32, family="fp8")
        # FP8's error against the unquantized product: e4m3 rounding of both operands.
        exact = torch.stack([a[s:s + m].double().cpu().t() @ b[s:s + m].double().cpu() for s, m in
                             zip([0, *torch.tensor(sizes).cumsum(0)[:-1].tolist()], sizes)])
        rel = ((out.double().cpu() - exact).norm() / exact.norm()).item()
        assert 1e-3 < rel < 0.06, rel
    else:
        assert torch.equal(out.cpu(), want.float())
    with pytest.raises(ValueError, match="a_s: expected"):
        fp8.gmm_fp8_wgrad(a_q, a_s[:1], b_q, b_s, bs)
    with pytest.raises(TypeError, match="a_q"):
        fp8.gmm_fp8_wgrad(a_q.float(), a_s, b_q, b_s, bs)
    with pytest.raises(ValueError, match="contiguous"):
        fp8.quantize_cols_grouped(torch.randn(N, 3, device=DEVICE).t(), bs)


@pytest.mark.parametrize("sizes, N, K", [
    ([130, 0, 256, 1], 72, 200),  # groups over and under 128 rows, an empty one; sizes off the blocks
    ([3, 2], 40, 33),
    ([0, 0], 16, 16),            # no rows at all: zeros
    ([300, 5], 130, 136),        # rows past the groups' total
], ids=["hostile", "small", "empty", "rows-past-groups"])
def test_gmm_fp8_wgrad_k_major(sizes, N, K):
    """The transposed layout (`quantize_cols_grouped(..., transposed=True)`, `gmm_fp8_wgrad(...,
    rows=M)`): each block's columns byte for byte the row-major quantization's rows (padded with
    zeros to Q), the same scales, and the product equal to the row-major kernel's."""
    g = torch.Generator().manual_seed(sum(sizes) * 3 + K)
    M = sum(sizes) + (7 if len(sizes) == 2 and sizes[0] == 300 else 0)
    a = torch.randn(M, N, generator=g)
    b = torch.randn(M, K, generator=g)
    if M > 140:
        a[135:140] *= 300
    a, b = a.to(DEVICE), b.to(DEVICE)
    bs = torch.tensor(sizes, device=DEVICE)
    a_q, a_s = fp8.quantize_cols_grouped(a, bs)
    b_q, b_s = fp8.quantize_cols_grouped(b, bs)
    at_q, at_s = fp8.quantize_cols_grouped(a, bs, transposed=True)
    bt_q, bt_s = fp8.quantize_cols_grouped(b, bs, transposed=True)
    S = -(-M // Q) + len(sizes)
    assert at_q.shape == (N, S * Q) and bt_q.shape == (K, S * Q)
    blocks = sum(-(-n // Q) for n in sizes)
    assert torch.equal(at_s[:blocks], a_s[:blocks]) and torch.equal(bt_s[:blocks], b_s[:blocks])
    first, block = 0, 0
    for n in sizes:  # block j of a group: its rows transposed, then zeros
        for j in range(-(-n // Q)):
            m = min(n, (j + 1) * Q) - j * Q
            cols = at_q[:, (block + j) * Q:(block + j + 1) * Q].view(torch.uint8).cpu()
            assert torch.equal(cols[:, :m], a_q[first + j * Q:first + j * Q + m].view(torch.uint8).cpu().t())
            assert not cols[:, m:].any()
        first, block = first + n, block + -(-n // Q)
    out = fp8.gmm_fp8_wgrad(at_q, at_s, bt_q, bt_s, bs, rows=M)
    row_major = fp8.gmm_fp8_wgrad(a_q, a_s, b_q, b_s, bs)
    assert out.shape == (len(sizes), N, K)
    # The same blocks' products promoted in the same order; the tensor cores may round the
    # in-block sums differently in the two layouts.
    assert_close("gmm_fp8_wgrad k-major", out, row_major, dtype=torch.float32, family="fp8")
    with pytest.raises(ValueError, match="transposed"):
        fp8.gmm_fp8_wgrad(at_q, at_s, bt_q, bt_s, bs, rows=M + Q)
    with pytest.raises(TypeError, match="rows"):
        fp8.gmm_fp8_wgrad(at_q, at_s, bt_q, bt_s, bs, rows=float(M))
    for bad in (dict(block_n=128), dict(tiles=2), [("wgmma", False)]):
        with pytest.raises(ValueError, match="config"):
            fp8.gmm_fp8_wgrad(at_q, at_s, bt_q, bt_s, bs, rows=M, config=bad)
    with pytest.raises(ValueError, match="without rows"):
        fp8.gmm_fp8_wgrad(a_q, a_s, b_q, b_s, bs, config=dict(wgmma=False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sizes, K", [
    ([130, 0, 1, 256], 200),   # groups over and under 128 rows, an empty one, K off the blocks
    ([128, 128], 128),         # whole blocks
    ([5], 64),                 # one short block, K under one block
    ([0, 0, 0], 136),          # no rows
], ids=["hostile", "whole", "short", "empty"])
@pytest.mark.parametrize("form", ["pieces", "whole"])
def test_weight_gradient_b_operands_in_blocks(sizes, K, dtype, form, monkeypatch):
    """`blocks=True` of `quantize_rows_and_cols`, `gather_quantize_cols` and
    `quantize_cols_grouped(..., transposed=True)` (the weight
    gradient's b operand with one scale per 128 x 128 block, made in the quantizing pass): bit for
    bit `quantize_blocks_grouped_reference` of the same rows in every entry they set; the scales
    those `cols_to_blocks_` gives the column tiles, and their values too wherever a value stays a
    normal e4m3 number; a block with a NaN or an infinity: scale NaN, values 0; the row tiles
    unchanged; each block read in 32-row pieces or whole."""
    ch = 32 if form == "pieces" else Q
    monkeypatch.setattr(fp8_backend, "COLS_BLOCKS_LAUNCH",
                        {m: dict(ch=ch, bk=Q, num_warps=4, num_stages=1) for m in fp8_backend.COLS_BLOCKS_LAUNCH})
    M = sum(sizes)
    top_k = next(k for k in (3, 2, 1) if M % k == 0)
    bs = torch.tensor(sizes, device=DEVICE)
    g = torch.Generator().manual_seed(M + K)
    # Columns spread over 2^0..2^26 (some values fall into their block's subnormals), outliers.
    x = (torch.randn(M, K, generator=g) * torch.rand(1, K, generator=g).mul(18).exp()).to(dtype)
    hostile = sizes == [130, 0, 1, 256]
    if hostile:  # the last group's (rows 131..386) blocks 3 and 4: scale NaN, values 0
        x[135, 7] = float("nan")
        x[260, K - 1] = float("inf")
    x = x.to(DEVICE)
    S, KB = -(-M // Q) + len(sizes), -(-K // Q)

    def check(name, got, rows):
        q_c, s_c = got
        assert q_c.shape == (K, S * Q) and s_c.shape == (S, KB) and s_c.dtype == torch.float32, name
        want = fp8_backend._cols_reference(rows.cpu(), bs.cpu(), blocks=True)
        (gq, gs), (wq, ws) = _set_blocks(q_c.cpu(), s_c.cpu(), bs.cpu(), M), _set_blocks(*want, bs.cpu(), M)
        assert_equal(name, gq, wq)
        assert torch.equal(gs.isnan(), ws.isnan()) and torch.equal(gs.nan_to_num(), ws.nan_to_num()), name
        # Against the column tiles coarsened after them: the same scales; the same values where normal.
        tq, ts = fp8.quantize_cols_grouped(rows, bs, transposed=True)
        tt = fp8.cols_to_blocks_(tq, ts, bs, M)
        (cq, cs) = _set_blocks(tq.cpu(), tt.cpu(), bs.cpu(), M)
        assert torch.equal(gs.nan_to_num(-1.0), cs.nan_to_num(-1.0)), name
        if not gs.numel():
            return
        nb = gs.shape[0]
        t_cols = gs.repeat_interleave(Q, dim=1)[:, :K].t()[:, :, None]  # [K, blocks, 1]
        mine = gq.view(torch.float8_e4m3fn).float().view(K, nb, Q) * t_cols
        theirs = cq.view(torch.float8_e4m3fn).float().view(K, nb, Q) * t_cols
        # Where the exact value over its block's scale is a normal e4m3 number, neither rounding
        # left the normals: the same value (elsewhere each rounded to a subnormal, these once).
        exact = fp8_backend._blocks_k_major(rows.float().cpu(), bs.cpu())[:, :nb * Q].reshape(K, nb, Q)
        normal = (exact.abs() >= 2.0 ** -6 * t_cols) & ~t_cols.isnan()
        assert torch.equal(mine[normal], theirs[normal]), name
        raw = gq.view(torch.float8_e4m3fn).float().view(K, nb, Q)
        assert (raw[t_cols.isnan().expand_as(raw)] == 0).all(), name  # a non-finite block's values

    (q, s), cols = fp8.quantize_rows_and_cols(x, bs, blocks=True)
    ref_q, ref_s = fp8.quantize_rows(x)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(s.nan_to_num(), ref_s.nan_to_num())
    check("rows_and_cols", cols, x)
    tokens = x[: M // top_k]
    assignment = torch.randperm(M, generator=g).to(DEVICE)
    if M > 7:
        assignment[6], assignment[7] = -1, M + 5
    present = (assignment >= 0) & (assignment < M)
    rows = torch.where(present[:, None], tokens[torch.where(present, assignment, 0) // top_k], 0).to(dtype)
    check("gather", fp8.gather_quantize_cols(tokens, assignment, top_k, bs, blocks=True), rows)
    check("cols_grouped", fp8.quantize_cols_grouped(x, bs, transposed=True, blocks=True), x)
    if hostile:
        assert cols[1][3, 0].isnan() and cols[1][4, 1].isnan() and cols[1][:5].isnan().sum() == 2
    with pytest.raises(TypeError, match="blocks"):
        fp8.quantize_rows_and_cols(x, bs, blocks=1)
    with pytest.raises(TypeError, match="blocks"):
        fp8.gather_quantize_cols(tokens, assignment, top_k, bs, blocks=None)
    with pytest.raises(TypeError, match="blocks"):
        fp8.quantize_cols_grouped(x, bs, transposed=True, blocks="yes")
    with pytest.raises(ValueError, match="transposed=True"):
        fp8.quantize_cols_grouped(x, bs, blocks=True)


@pytest.mark.parametrize("sizes, K", [
    ([130, 0, 256, 1], 200),   # groups over and under 128 rows, an empty one; K off the blocks
    ([300, 129], 300),         # ragged edges both ways, rows past the groups' total
    ([5], 64),                 # one short block, K under one block
    ([0, 0], 128),             # no rows
])
def test_cols_to_blocks_against_reference(sizes, K):
    """`cols_to_blocks_`: the weight gradient's b operand (transposed column tiles) coarsened in
    place to one scale per 128 x 128 block, bit for bit its torch form; the blocks' scales the
    largest of their columns'; every value the same as before where it stays a normal e4m3 number
    (powers of two: exact), within half a subnormal step of the block's scale where it falls
    below; a non-finite tile's block NaN; bad arguments refused."""
    g = torch.Generator().manual_seed(sum(sizes) + K)
    M = sum(sizes) + 3
    # Columns spread over 2^0..2^26: some blocks' small columns fall into e4m3's subnormals.
    x = torch.randn(M, K, generator=g) * torch.rand(1, K, generator=g).mul(18).exp()
    if M > 140:
        x[135, 7] = float("nan")  # block 1: its scale NaN
    x, bs = x.to(DEVICE), torch.tensor(sizes, device=DEVICE)
    q, s = fp8.quantize_cols_grouped(x, bs, transposed=True)
    S, KB = -(-M // Q) + len(sizes), -(-K // Q)
    blocks = sum(-(-n // Q) for n in sizes)
    ref_q, ref_t = fp8.cols_to_blocks_reference(q.cpu(), s.cpu(), bs.cpu(), M)
    before = q.clone()
    t = fp8.cols_to_blocks_(q, s, bs, M)
    assert t.shape == (S, KB) and t.dtype == torch.float32
    used = slice(0, blocks * Q)
    assert_equal("cols_to_blocks_", q[:, used].view(torch.uint8).cpu(), ref_q[:, used].view(torch.uint8))
    assert torch.equal(t[:blocks].cpu().nan_to_num(-1.0), ref_t[:blocks].nan_to_num(-1.0))
    if not blocks:
        return
    s_pad = torch.nn.functional.pad(s[:blocks].cpu(), (0, KB * Q - K))
    want_t = s_pad.view(blocks, KB, Q).amax(dim=2)
    assert torch.equal(t[:blocks].cpu().nan_to_num(-1.0), want_t.nan_to_num(-1.0))
    old = before[:, used].float().cpu().view(K, blocks, Q) * s[:blocks].cpu().t()[:, :, None]
    new_q = q[:, used].float().cpu().view(K, blocks, Q)
    t_cols = t[:blocks].cpu().repeat_interleave(Q, dim=1)[:, :K].t()[:, :, None]
    new = new_q * t_cols
    finite = ~t_cols.isnan().expand_as(new)
    normal = (old.abs() >= 2.0 ** -6 * t_cols) & finite  # exact before the cast: no rounding
    assert torch.equal(new[normal], old[normal])
    fell = finite & ~normal
    assert fell.any()  # the spread above sends some values into the subnormals
    assert ((new - old).abs() <= 2.0 ** -10 * t_cols.expand_as(new))[fell].all()
    if M > 140:  # row 135's block: its group's block (135 - first) // Q, after the groups before
        first = block = 0
        for n in sizes:
            if first + n > 135:
                break
            first, block = first + n, block + -(-n // Q)
        nan_block = block + (135 - first) // Q
        assert t[nan_block, 0].isnan() and t[:blocks].isnan().sum() == 1
        assert new[:Q, nan_block].isnan().all() and not new[Q:, nan_block].isnan().any()
    with pytest.raises(ValueError, match="s: expected"):
        fp8.cols_to_blocks_(q, s[:, :-1], bs, M)
    with pytest.raises(ValueError, match="transposed layout"):
        fp8.cols_to_blocks_(q, s, bs, M + Q)
    with pytest.raises(TypeError, match="rows"):
        fp8.cols_to_blocks_(q, s, bs, float(M))
    with pytest.raises(TypeError, match="q"):
        fp8.cols_to_blocks_(q.float(), s, bs, M)


@pytest.mark.parametrize("sizes, N, K", [
    ([130, 0, 256, 1], 72, 200),
    ([300, 129], 40, 300),
    pytest.param([700, 0, 1500, 33, 0, 260, 129, 1], 300, 264, marks=pytest.mark.skipif(
        DEVICE != "cuda", reason="tiles past the SMs' count: the Gluon form's persistent loop")),
])
def test_gmm_fp8_wgrad_takes_block_scales(sizes, N, K):
    """`gmm_fp8_wgrad` with b's scales one per 128 x 128 block (`cols_to_blocks_`): where no value
    of b nears the subnormals, bit for bit the product of b's column tiles (the same values;
    with powers of two every scaling is exact), in both layouts' forms and accumulating; the scale
    shapes checked."""
    g = torch.Generator().manual_seed(sum(sizes) * 5 + K)
    M = sum(sizes)
    a = (torch.randn(M, N, generator=g) * torch.rand(1, N, generator=g).mul(6).exp()).to(DEVICE)
    # |b| within [1, 2) times its column's factor (< 2^5 apart): no value of b nears the subnormals.
    sign = torch.randint(0, 2, (M, K), generator=g).mul(2).sub(1)
    b = (sign * (1 + torch.rand(M, K, generator=g)) * torch.rand(1, K, generator=g).mul(3).exp()).to(DEVICE)
    bs = torch.tensor(sizes, device=DEVICE)
    a_c = fp8.quantize_cols_grouped(a, bs, transposed=True)
    b_q, b_s = fp8.quantize_cols_grouped(b, bs, transposed=True)
    cols = fp8.gmm_fp8_wgrad(*a_c, b_q, b_s, bs, rows=M)
    bb_q = b_q.clone()
    b_t = fp8.cols_to_blocks_(bb_q, b_s, bs, M)
    blocks = sum(-(-n // Q) for n in sizes)
    assert not torch.equal(bb_q[:, :blocks * Q].view(torch.uint8), b_q[:, :blocks * Q].view(torch.uint8))
    assert torch.equal(fp8.gmm_fp8_wgrad(*a_c, bb_q, b_t, bs, rows=M), cols)
    for out_dtype in (torch.bfloat16, torch.float32):
        assert torch.equal(fp8.gmm_fp8_wgrad(*a_c, bb_q, b_t, bs, rows=M, out_dtype=out_dtype),
                           fp8.gmm_fp8_wgrad(*a_c, b_q, b_s, bs, rows=M, out_dtype=out_dtype))
    # Each tile stored after its last product, or while the next tile's first runs (the default).
    for overlap in (False, True):
        assert torch.equal(fp8.gmm_fp8_wgrad(*a_c, bb_q, b_t, bs, rows=M, config=dict(overlap_epilogue=overlap)), cols)
    start = torch.randn(len(sizes), N, K, generator=g).to(DEVICE)
    for overlap in (False, True):
        acc = start.clone()
        fp8.gmm_fp8_wgrad(*a_c, bb_q, b_t, bs, rows=M, accumulate_into=acc, config=dict(overlap_epilogue=overlap))
        assert torch.equal(acc, start + cols)
    # The Triton kernel's form (on sm_90 the default is the Gluon one) reads the blocks' scales too.
    assert_close("block scales, Triton form", fp8.gmm_fp8_wgrad(*a_c, bb_q, b_t, bs, rows=M,
                                                                config=dict(wgmma=False)), cols, dtype=torch.float32)
    with pytest.raises(ValueError, match="block scales"):
        fp8.gmm_fp8_wgrad(*a_c, bb_q, b_t[:, :1] if b_t.shape[1] > 1 else b_t[:-1], bs, rows=M)


@pytest.mark.parametrize("layout", ["row-major", "k-major"])
@pytest.mark.parametrize("sizes, N, K", [
    ([130, 0, 256, 1], 72, 200),  # groups over and under 128 rows, an empty one; sizes off the blocks
    ([0, 0], 16, 16),            # no rows at all: the accumulator unchanged
], ids=["hostile", "empty"])
def test_gmm_fp8_wgrad_accumulates_into(sizes, N, K, layout):
    """`accumulate_into` (gradient-accumulation fusion): the gradient added into an fp32
    [E, N, K] tensor by the kernel's epilogue, which is returned: bit for bit the tensor plus the
    fp32 gradient computed apart (one fp32 addition an element either way), in both layouts (on an
    sm_90 GPU the K-major one is the Gluon form, also with its epilogue overlapped); the
    accumulator checked."""
    g = torch.Generator().manual_seed(sum(sizes) + 7 * N)
    M = sum(sizes)
    a = torch.randn(M, N, generator=g).to(DEVICE)
    b = torch.randn(M, K, generator=g).to(DEVICE)
    bs = torch.tensor(sizes, device=DEVICE)
    transposed = layout == "k-major"
    ops = (*fp8.quantize_cols_grouped(a, bs, transposed=transposed),
           *fp8.quantize_cols_grouped(b, bs, transposed=transposed))
    rows = M if transposed else None
    start = torch.randn(len(sizes), N, K, generator=g).to(DEVICE)
    apart = start + fp8.gmm_fp8_wgrad(*ops, bs, out_dtype=torch.float32, rows=rows)
    configs = [None] + ([dict(overlap_epilogue=o) for o in (False, True)] if transposed and DEVICE == "cuda" else [])
    for config in configs:
        acc = start.clone()
        got = fp8.gmm_fp8_wgrad(*ops, bs, rows=rows, config=config, accumulate_into=acc)
        assert got is acc
        assert torch.equal(acc, apart), config
    with pytest.raises(TypeError, match="accumulate_into: expected dtype in \\(float32\\)"):
        fp8.gmm_fp8_wgrad(*ops, bs, rows=rows, accumulate_into=start.half())
    with pytest.raises(ValueError, match="accumulate_into: expected a contiguous \\[E, N, K\\]"):
        fp8.gmm_fp8_wgrad(*ops, bs, rows=rows, accumulate_into=start[:, :, :-1])
    with pytest.raises(ValueError, match="accumulate_into: expected a contiguous"):
        fp8.gmm_fp8_wgrad(*ops, bs, rows=rows, accumulate_into=start.transpose(1, 2).contiguous().transpose(1, 2))


@pytest.mark.skipif(not (DEVICE == "cuda" and fp8_wgmma.available()), reason="the Gluon form runs on a GPU")
@pytest.mark.parametrize("stages", [4, 2])
@pytest.mark.parametrize("sizes, N, K", [
    ([130, 0, 256, 1], 72, 200),                   # a's rows under one tile, b's past one
    ([700, 0, 1500, 33, 0, 260, 129, 1], 300, 264),  # tiles past the SMs: the persistent loop, ragged edges
    ([2048] * 4, 1000, 520),                        # whole blocks, several tiles per expert each way
    ([0, 0, 0], 64, 128),                           # no rows: zeros
], ids=["hostile", "ragged", "whole", "empty"])
def test_gmm_fp8_wgrad_gluon(sizes, N, K, stages):
    """The weight gradient's warp-specialized Gluon form (the default on sm_90) against the Triton
    K-major kernel (`config=dict(wgmma=False)`) and the float64 definition of its dequantized
    operands, and its `overlap_epilogue` form against it bit for bit; experts past the SMs' count
    of tiles, empty experts, sizes off the blocks."""
    g = torch.Generator().manual_seed(sum(sizes) + N + stages)
    M = sum(sizes)
    a = (torch.randn(M, N, generator=g) * torch.rand(M, 1, generator=g).mul(4).exp()).to(DEVICE)
    b = torch.randn(M, K, generator=g).to(DEVICE)
    bs = torch.tensor(sizes, device=DEVICE)
    at_q, at_s = fp8.quantize_cols_grouped(a, bs, transposed=True)
    bt_q, bt_s = fp8.quantize_cols_grouped(b, bs, transposed=True)
    assert fp8_wgmma.wgrad_usable(at_q, bt_q)
    for out_dtype in (torch.float32, torch.bfloat16):
        out = fp8.gmm_fp8_wgrad(at_q, at_s, bt_q, bt_s, bs, out_dtype=out_dtype, rows=M,
                                config=dict(num_stages=stages, overlap_epilogue=False))
        triton_form = fp8.gmm_fp8_wgrad(at_q, at_s, bt_q, bt_s, bs, out_dtype=out_dtype, rows=M,
                                        config=dict(wgmma=False))
        assert out.shape == (len(sizes), N, K) and out.dtype == out_dtype
        # The same 128-deep products promoted in the same order: equal but for the tensor cores'
        # own rounding inside a block.
        assert_close("gmm_fp8_wgrad gluon", out, triton_form, dtype=out_dtype)
        # A 16-bit gradient's full 64-row pieces are stored by TMA: the same bits as masked stores.
        masked = fp8.gmm_fp8_wgrad(at_q, at_s, bt_q, bt_s, bs, out_dtype=out_dtype, rows=M,
                                   config=dict(num_stages=stages, tma_store=False, overlap_epilogue=False))
        assert torch.equal(out, masked)
        # Each tile stored while the next tile's first product runs: the same arithmetic, the same
        # bits (TMA and masked stores; empty experts' zeros stored between tiles).
        for tma_store in (True, False):
            overlapped = fp8.gmm_fp8_wgrad(at_q, at_s, bt_q, bt_s, bs, out_dtype=out_dtype, rows=M,
                                           config=dict(num_stages=stages, tma_store=tma_store, overlap_epilogue=True))
            assert torch.equal(overlapped, out), (out_dtype, tma_store)
    want = fp8.gmm_fp8_wgrad_reference(*fp8.quantize_cols_grouped(a.cpu(), bs.cpu()),
                                       *fp8.quantize_cols_grouped(b.cpu(), bs.cpu()), bs.cpu())
    if M:
        assert_close("gmm_fp8_wgrad gluon vs definition", out.float(), want, dtype=torch.bfloat16, family="fp8")
    else:
        assert not out.any()


def test_weight_cache_quantizes_once_per_step(monkeypatch):
    calls = []
    real = fp8.quantize_blocks
    monkeypatch.setattr(fp8, "quantize_blocks", lambda w, **kw: calls.append(1) or real(w, **kw))
    sizes, K, N = [6, 10], 128, 32
    x, w, batch_sizes = _operands(sizes, K, N, seed=7)
    w = torch.nn.Parameter(w)
    cache = fp8.Fp8WeightCache()
    opt = torch.optim.SGD([w], lr=0.1)
    for _ in range(2):  # two micro-batches of one step: one quantization
        fp8.fp8_gmm(x, w, batch_sizes, weights=cache(w)).square().mean().backward()
    assert len(calls) == 1
    first = cache(w)
    opt.step()  # an in-place update: the next call quantizes again
    second = cache(w)
    assert len(calls) == 2 and not torch.equal(first[0].view(torch.uint8), second[0].view(torch.uint8))
    assert torch.equal(second[0].view(torch.uint8), real(w.detach())[0].view(torch.uint8))
    other = torch.nn.Parameter(w.detach().clone())  # another tensor: its own entry
    cache(other)
    assert len(calls) == 3
    # The copy stored the other way: made from the cached quantization, once per quantization.
    q, s = cache(w)
    t_q, t_s = cache.transposed(w)
    assert t_q.is_contiguous() and torch.equal(t_q.view(torch.uint8), q.transpose(1, 2).contiguous().view(torch.uint8))
    assert torch.equal(t_s, s.transpose(1, 2)) and cache.transposed(w)[0] is t_q and len(calls) == 3
    with torch.no_grad():
        w.mul_(2)  # changed: quantized again, and its transposed copy made again
    t2 = cache.transposed(w)
    assert len(calls) == 4 and t2[0] is not t_q
    assert torch.equal(t2[0].view(torch.uint8), cache(w)[0].transpose(1, 2).contiguous().view(torch.uint8))
    # A cache made with `transposed` makes both with each quantization: the same values.
    both = fp8.Fp8WeightCache(transposed=True)
    t3 = both.transposed(w)
    assert len(calls) == 5 and torch.equal(t3[0].view(torch.uint8), t2[0].view(torch.uint8))
    assert torch.equal(t3[1], t2[1]) and both.transposed(w)[0] is t3[0] and len(calls) == 5


def test_weight_cache_alone_seeds_and_bytes(monkeypatch):
    """`alone` makes and holds only the form asked for; asked for the other later, the cache
    quantizes again in one pass making both (byte for byte what quantizing both gives). A checkpoint
    seeded stored the other way, or stacked, is held as it is (not copied) and serves both forms
    (transposed, not quantized again) and each half, its scales as given (not powers of two);
    `nbytes` counts each storage once; `clear` and a copy of the cache hold nothing."""
    import copy

    calls = []
    real = fp8.quantize_blocks
    monkeypatch.setattr(fp8, "quantize_blocks", lambda w, **kw: calls.append(kw.get("transposed")) or real(w, **kw))

    E, N, K = 2, 256, 200
    shape = (E, -1, K)
    gen = torch.Generator(device=DEVICE).manual_seed(21)
    w = torch.randn(E * N, K, device=DEVICE, generator=gen)
    v = torch.randn(E * N, K, device=DEVICE, generator=gen) * 3
    ref_q, ref_s, ref_t = fp8.quantize_blocks(w.view(E, N, K), transposed=True)
    v_q, v_s = fp8.quantize_blocks(v.view(E, N, K))
    values, scales = E * N * K, 4 * E * (N // 128) * 2
    del calls[:]

    cache = fp8.Fp8WeightCache(transposed=True)
    t, st = cache.transposed(w, shape, alone=True)
    assert_equal("t alone", t, ref_t)
    assert_equal("t scales", st, ref_s.transpose(1, 2))
    assert cache.nbytes() == values + scales and calls == [True]
    q, s = cache(w, shape)  # both made again in one pass
    assert_equal("q after t", q, ref_q)
    assert_equal("s after t", s, ref_s)
    assert_equal("t again", cache.transposed(w, shape)[0], ref_t)
    assert cache.nbytes() == 2 * values + scales and calls == [True, True]
    assert cache(w, shape)[0] is q and len(calls) == 2
    other = fp8.Fp8WeightCache(transposed=True)
    assert_equal("q alone", other(w, shape, alone=True)[0], ref_q)
    assert other.nbytes() == values + scales and calls[2:] == [None]
    assert_equal("t after q", other.transposed(w, shape)[0], ref_t)
    assert other.nbytes() == 2 * values + scales and calls[2:] == [None, True]

    pairs = fp8.Fp8WeightCache(transposed=True)
    del calls[:]
    (pq, ps), pt = pairs.pair(w, v, shape, alone=True)
    assert pt is None and pairs.nbytes() == 2 * (values + scales) and calls == [False, False]
    assert_equal("pair q", pq, torch.cat([ref_q, v_q], 1))
    (pq2, _), (pt, pst) = pairs.pair(w, v, shape)  # both halves again in one pass each, over q and s
    assert pq2 is pq and calls == [False, False, True, True]
    assert_equal("pair q again", pq, torch.cat([ref_q, v_q], 1))
    assert_equal("pair t", pt, torch.cat([ref_q, v_q], 1).transpose(1, 2).contiguous())
    assert pairs.nbytes() == 4 * values + 2 * scales
    assert_equal("half of the pair", pairs(v, shape, alone=True)[0], v_q)
    del calls[:]

    seeded = fp8.Fp8WeightCache(transposed=True)
    ckpt_t, ckpt_st = ref_t.clone(), (ref_s.transpose(1, 2) * 1.5).contiguous()
    seeded.seed(w, (ckpt_t, ckpt_st), shape, transposed=True)
    assert seeded.transposed(w, shape, alone=True)[0] is ckpt_t and seeded.nbytes() == values + scales
    q, s = seeded(w, shape)  # transposed from the checkpoint's values, not quantized
    assert_equal("seeded q from t", q, ref_q)
    assert_equal("seeded s from t", s, ref_s * 1.5)
    assert not calls
    with pytest.raises(ValueError, match="quantized: expected e4m3 values"):
        seeded.seed(w, (ref_q, ref_s), shape, transposed=True)  # stored out x in, not the other way
    with pytest.raises(TypeError, match="a \\(values, scales\\) pair"):
        seeded.seed(w, ckpt_t, shape, transposed=True)
    with pytest.raises(ValueError, match="device"):
        seeded.seed(w, (ckpt_t, ckpt_st.to("meta")), shape, transposed=True)
    stacked = (torch.cat([ref_q, v_q], 1), torch.cat([ref_s, v_s], 1) * 1.5)
    seeded.seed_pair(w, v, stacked, shape)
    assert seeded.pair(w, v, shape, alone=True)[0][0] is stacked[0] and seeded.nbytes() == 2 * (values + scales)
    assert_equal("seeded half", seeded(v, shape)[0], v_q)
    assert_equal("seeded half scales", seeded(v, shape)[1], v_s * 1.5)
    assert_equal("seeded half t", seeded.transposed(v, shape)[0], v_q.transpose(1, 2).contiguous())
    seeded_t = seeded.pair(w, v, shape)[1][0]
    assert_equal("seeded pair t", seeded_t, stacked[0].transpose(1, 2).contiguous())
    assert not calls
    with pytest.raises(ValueError, match="quantized"):
        seeded.seed_pair(w, v, (ref_q, ref_s), shape)
    with pytest.raises(ValueError, match="multiple of 128"):
        seeded.seed_pair(w, v, stacked, (E * 4, -1, K))
    with torch.no_grad():
        v.mul_(2)  # changed: quantized again; w's seeded half kept as it is
    (q, s), _ = seeded.pair(w, v, shape)
    assert_equal("kept half", q[:, :N], ref_q)
    assert_equal("kept half scales", s[:, :N // 128], ref_s * 1.5)
    assert_equal("changed half", q[:, N:], fp8.quantize_blocks(v.view(E, N, K))[0])
    seeded.clear()
    assert seeded.nbytes() == 0
    twin = copy.deepcopy(cache)
    assert twin.nbytes() == 0
    assert_equal("copy", twin.transposed(w, shape)[0], ref_t)


def test_fp8_gmm_trains():
    """A grouped linear regression trained through fp8_gmm reaches the FP8 noise floor: the
    gradients it returns descend."""
    g = torch.Generator().manual_seed(8)
    sizes, K, N = [64, 64], 128, 16
    batch_sizes = torch.tensor(sizes, dtype=torch.int32, device=DEVICE)
    target = (torch.randn(2, N, K, generator=g) / K**0.5).to(DEVICE)
    w = torch.nn.Parameter(torch.zeros(2, N, K, device=DEVICE))
    opt = torch.optim.Adam([w], lr=2e-2)
    cache = fp8.Fp8WeightCache()
    for step in range(60):
        x = torch.randn(sum(sizes), K, generator=g).to(DEVICE)
        y = torch.cat([x[:64] @ target[0].t(), x[64:] @ target[1].t()])
        loss = (fp8.fp8_gmm(x, w, batch_sizes, weights=cache(w)) - y).square().mean()
        if step == 0:
            first = loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.02 * first, (first, loss.item())


def test_fp8_launches_pin_floating_point_contraction():
    """Every FP8 kernel launch passes `enable_fp_fusion=True` (backend/fp8.py's docstring): the
    products' promotions compile to one FFMA a value only with contraction on, and Triton's
    default is to turn it off. The table-building kernels (integers only) are exempt."""
    import ast
    import inspect
    integer_only = {"_row_tiles_kernel", "_group_blocks_kernel"}
    launches, unpinned = [], []
    for module in (fp8_backend, fp8_wgmma):
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id.endswith("_kernel")):
                continue
            name = node.func.value.id
            if name in integer_only:
                continue
            launches.append(name)
            pinned = [k for k in node.keywords if k.arg == "enable_fp_fusion"]
            if not (pinned and isinstance(pinned[0].value, ast.Constant) and pinned[0].value.value is True):
                unpinned.append(f"{module.__name__}.{name} (line {node.lineno})")
    assert {"_gmm_fp8_kernel", "_gmm_fp8_wgrad_kernel", "_gmm_fp8_ws_kernel", "_gmm_fp8_wgrad_ws_kernel",
            "_quantize_rows_kernel", "_glu_quantize_rows_kernel"} <= set(launches), launches
    assert not unpinned, f"FP8 launches without enable_fp_fusion=True: {unpinned}"
