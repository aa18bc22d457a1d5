"""FP8 (e4m3) block quantization and the FP8 grouped GEMM: Triton kernels, launchers and their
plain-torch references (no autograd here; see `megablocks.ops.fp8`).

Legend: M rows (routed tokens in expert order), K inner size, N output size, E groups (experts),
Q = 128 the quantization block; KB = ceil(K / Q), NB = ceil(N / Q).

The layout is DeepSeek-V3's: activations in 1 x Q tiles (one scale per row and Q columns),
weights in Q x Q blocks (one scale per block of a [N, K] matrix, out x in), e4m3 values, fp32
accumulation promoted to fp32 once per Q-deep step:

    quantize_rows(x_MK)       -> (x_q_MK e4m3, x_s_MKB fp32)     x ~ x_q * x_s (per 1 x Q tile)
    quantize_blocks(w_ENK)    -> (w_q_ENK e4m3, w_s_ENBKB fp32)  w ~ w_q * w_s (per Q x Q block)
    gmm_fp8(x_q, x_s, w_q, w_s, batch_sizes_E) -> out_MN          out[rows of e] = x[rows of e] @ w[e]^T

and, for the serving path, the quantizer fused with the pass before it: `gather_quantize_rows`
(the routed rows, each token's tiles quantized once) and `glu_quantize_rows` (the GLU between the
expert products, from the up projection's two halves in place).

Scales. Any fp32 scales are read by `gmm_fp8` (checkpoints ship them as `weight_scale_inv`).
The quantizers here produce powers of two: the smallest 2^k with amax(tile) / 2^k <= 448 (the
largest e4m3 value). Dividing by a power of two is exact, so the kernels, the references and any
GPU agree bit for bit (no division or reciprocal whose rounding differs between them), at the
cost of at most one bit of the e4m3 range (DeepSeek-V3.1's UE8M0 scales make the same choice).
Values are rounded to nearest, ties to even; tiles of zeros get the scale 2^-126; a tile with an
inf or NaN gets the scale NaN, so that it dequantizes (and multiplies) to NaN rather than to a
finite wrong value (values are not checked on the host: that would synchronize).

Contract of `gmm_fp8`: non-negative batch sizes summing to at most M, rows past the groups' total
written as zeros; sizes that break it are refused where values are checked (CPU tensors, or
MEGABLOCKS_CHECK_VALUES=1: `megablocks._checks`), and elsewhere the kernel stays in bounds
(negative sizes count as 0, groups are clipped at row M).

Floating-point contraction. Every launch here (and in `fp8_wgmma`) passes `enable_fp_fusion=True`
rather than relying on Triton's default, which is to change to off: each promotion
`acc + product * scale` is then one FFMA a value, as it was measured and tested. Unfused, the
products' promoting loops compile to an FMUL and an FADD a value (twice the instructions on the
consumers' path, compiled for sm_90a) and round twice; the GLU and the activations' math rounds
differently.
"""

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from megablocks._checks import INDEX_DTYPES, check_batch_size_values, check_tensor
from megablocks.backend import cdiv, fp8_wgmma, next_power_of_2
from megablocks.backend.activation import ACTIVATIONS, _act, _up
from megablocks.backend.gmm import _check_accumulator, _group_table, _row_tile, _swizzle
from megablocks.backend.launch import (interpreted, pdl_launch, pdl_start, persistent_programs, prepare_tma,
                                       programs_to_fill, tma_ok)

Q = 128  # the quantization block (DeepSeek-V3: 1 x 128 activation tiles, 128 x 128 weight blocks)
E4M3_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_IN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _pow2_scale(amax):
    """(2^k, 2^-k) for the smallest k with amax / 2^k <= 448, from amax's bits (exact); amax 0
    gives 2^-126, a non-finite amax the scale NaN (the tile dequantizes to NaN). 448 = 1.75 * 2^8:
    k is amax's exponent - 8, one more when its mantissa > 1.75."""
    bits = amax.to(tl.int32, bitcast=True)
    exp = ((bits >> 23) & 0xFF) - 127
    k = exp - 8 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)
    k = tl.minimum(tl.maximum(k, -126), 126)
    scale = ((k + 127) << 23).to(tl.float32, bitcast=True)
    scale = tl.where(exp == 128, float("nan"), scale)
    inv = ((127 - k) << 23).to(tl.float32, bitcast=True)
    return scale, inv


@triton.jit
def _round_e4m3(v):
    """v (fp32, |v| <= 448) rounded to the nearest e4m3 value, ties to even, as fp32: the cast
    to e4m3 that follows is then exact everywhere. Normal e4m3 values keep 3 mantissa bits (drop
    20 of fp32's, with the carry into the exponent); below 2^-6 the spacing is 2^-9."""
    bits = v.to(tl.int32, bitcast=True)
    sign = bits & -2147483648
    mag_bits = bits & 0x7FFFFFFF
    lsb = (mag_bits >> 20) & 1
    normal = ((mag_bits + 0x7FFFF + lsb) & -1048576).to(tl.float32, bitcast=True)
    mag = mag_bits.to(tl.float32, bitcast=True)
    sub = ((mag * 512.0 + 12582912.0) - 12582912.0) * 0.001953125  # 1.5 * 2^23 rounds to an integer
    r = tl.minimum(tl.where(mag < 0.015625, sub, normal), 448.0)
    # A NaN stays NaN (e4m3's 0x7F once cast), as the hardware's cast keeps it: the carry above
    # turned the GPU's NaN (0x7FFFFFFF) into -0.
    return tl.where(v != v, float("nan"), (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True))


# Scaled values y (within +-448 but for NaN and inf) as they go to the e4m3 cast: with CAST (CUDA)
# as they are, the cast rounding them (the hardware's round to nearest even, saturating: an inf to
# 448, a NaN to NaN); else rounded first by `_round_e4m3` (17 integer and float operations an
# element), to the same values.
@triton.jit
def _e4m3_values(y, CAST: tl.constexpr):
    if CAST:
        return y
    return _round_e4m3(y)


# x_MK (any float dtype, last dim contiguous) -> q_MK e4m3, s_MKB fp32. Program (i, j) quantizes
# rows [i*BLOCK_M, (i+1)*BLOCK_M) of the j-th Q columns.
@triton.jit
def _quantize_rows_kernel(
    x_ptr, q_ptr, s_ptr,
    M, K,
    stride_xm, stride_qm, stride_sm,
    BLOCK_M: tl.constexpr, QB: tl.constexpr, CAST: tl.constexpr = False,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * QB + tl.arange(0, QB)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :], mask=mask, other=0.0)
    _store_row_tiles(x.to(tl.float32), rows, cols, mask, M, q_ptr, s_ptr, stride_qm, stride_sm, CAST)


# x: a [BLOCK_M, QB] fp32 tile (0 where masked), 1 x QB tiles of its rows -> (the values for the
# e4m3 cast, `_e4m3_values`, one power-of-two scale per row). AXIS 0: x is such a tile transposed
# ([QB, BLOCK_M], a column per row; the values come back in that layout).
@triton.jit
def _row_tiles(x, CAST: tl.constexpr = False, AXIS: tl.constexpr = 1):
    scale, inv = _pow2_scale(tl.max(tl.abs(x), axis=AXIS))
    scale = tl.where(tl.max((x != x).to(tl.int32), axis=AXIS) > 0, float("nan"), scale)  # max() skips NaN
    if AXIS == 0:
        y = x * inv[None, :]
    else:
        y = x * inv[:, None]
    return _e4m3_values(y, CAST), scale


# x as `_row_tiles`, of rows `rows` and the program_id(1)-th Q columns `cols`: stored.
@triton.jit
def _store_row_tiles(x, rows, cols, mask, M, q_ptr, s_ptr, stride_qm, stride_sm, CAST: tl.constexpr = False):
    q, scale = _row_tiles(x, CAST)
    tl.store(q_ptr + rows[:, None].to(tl.int64) * stride_qm + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + rows.to(tl.int64) * stride_sm + tl.program_id(1), scale, mask=rows < M)


# The gather of the routed rows, quantized as it is made: token t's tiles of x_TK (last dim
# contiguous) are quantized once and written to the rows assignment_row[t*TOP_K + k] of q_RK and
# s_RKB (rows outside [0, R) are skipped). HAS_WEIGHTS: row a is token t's row times w_N[a],
# rounded to x's dtype (the weighted gather's row), and quantized each; WRITE_ROWS: those 16-bit
# rows are also written to rows_RK. Program (i, j): tokens [i*BLOCK_T, (i+1)*BLOCK_T), the j-th Q
# columns.
@triton.jit
def _gather_quantize_rows_kernel(
    x_ptr, assignment_row_ptr, w_ptr, q_ptr, s_ptr, rows_ptr,
    T, R, K,
    stride_x, stride_qm, stride_sm, stride_rm,
    TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, QB: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr = False, WRITE_ROWS: tl.constexpr = False, PDL: tl.constexpr = False,
    CAST: tl.constexpr = False,
):
    pdl_start(PDL)
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * QB + tl.arange(0, QB)
    in_range = tokens < T
    in_cols = cols < K
    x = tl.load(x_ptr + tokens[:, None].to(tl.int64) * stride_x + cols[None, :],
                mask=in_range[:, None] & in_cols[None, :], other=0.0)
    if not HAS_WEIGHTS:
        q, scale = _row_tiles(x.to(tl.float32), CAST)
        q = q.to(q_ptr.dtype.element_ty)
    for k in tl.static_range(TOP_K):
        a = tokens * TOP_K + k
        row = tl.load(assignment_row_ptr + a, mask=in_range, other=-1)
        present = in_range & (row >= 0) & (row < R)
        row = tl.where(present, row, 0).to(tl.int64)
        v = x
        if HAS_WEIGHTS:
            w = tl.load(w_ptr + a, mask=present, other=0.0).to(tl.float32)
            v = (x.to(tl.float32) * w[:, None]).to(x_ptr.dtype.element_ty)
            q, scale = _row_tiles(v.to(tl.float32), CAST)
            q = q.to(q_ptr.dtype.element_ty)
        if WRITE_ROWS:
            tl.store(rows_ptr + row[:, None] * stride_rm + cols[None, :], v, mask=present[:, None] & in_cols[None, :])
        tl.store(q_ptr + row[:, None] * stride_qm + cols[None, :], q, mask=present[:, None] & in_cols[None, :])
        tl.store(s_ptr + row * stride_sm + tl.program_id(1), scale, mask=present)


# The GLU between the expert products, quantized as it is made: h1_MK, h2_MK (the gate and up
# halves, any row strides, last dim contiguous) -> q_MK, s_MKB of `act(h1) * up(h2)` rounded to
# h1's dtype first (equal to `glu` then `quantize_rows`, without reading the GLU back); WRITE_A:
# that 16-bit product also written to a_MK (row stride stride_am).
@triton.jit
def _glu_quantize_rows_kernel(
    h1_ptr, h2_ptr, q_ptr, s_ptr, a_ptr,
    M, K,
    stride_h1, stride_h2, stride_qm, stride_sm, stride_am,
    ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr, QB: tl.constexpr, PDL: tl.constexpr = False,
    WRITE_A: tl.constexpr = False, CAST: tl.constexpr = False, GATED: tl.constexpr = True,
    QUANTIZE: tl.constexpr = True,
):
    pdl_start(PDL)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * QB + tl.arange(0, QB)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    h1 = tl.load(h1_ptr + rows[:, None].to(tl.int64) * stride_h1 + cols[None, :], mask=mask, other=0.0)
    if GATED:
        h2 = tl.load(h2_ptr + rows[:, None].to(tl.int64) * stride_h2 + cols[None, :], mask=mask, other=0.0)
    a, _ = _act(h1.to(tl.float32), ACTIVATION)
    if GATED:
        u, _ = _up(h2.to(tl.float32), ACTIVATION)
        product = (a * u).to(h1_ptr.dtype.element_ty)
    else:  # the MLP experts' activation alone (h2_ptr not read)
        product = a.to(h1_ptr.dtype.element_ty)
    if WRITE_A:
        tl.store(a_ptr + rows[:, None].to(tl.int64) * stride_am + cols[None, :], product, mask=mask)
    if QUANTIZE:  # False: the product written alone (q_ptr, s_ptr not used)
        x = tl.where(mask, product.to(tl.float32), 0.0)
        _store_row_tiles(x, rows, cols, mask, M, q_ptr, s_ptr, stride_qm, stride_sm, CAST)


# The GLU's backward, quantized as it is made: grad_MK, h1_MK, h2_MK in (any row strides, last
# dim contiguous); grad_h1 = grad * up(h2) * act'(h1) and grad_h2 = grad * act(h1) * up'(h2),
# rounded to h1's dtype, written over h1 and h2 and quantized in 1 x QB tiles into (q1, s1),
# (q2, s2) (any row strides: e.g. the two halves of one [M, 2K] operand). `glu_backward` then
# `quantize_rows` of each, without reading the gradients back.
@triton.jit
def _glu_backward_quantize_rows_kernel(
    g_ptr, h1_ptr, h2_ptr, q1_ptr, s1_ptr, q2_ptr, s2_ptr,
    M, K,
    stride_g, stride_h1, stride_h2, stride_q1, stride_s1, stride_q2, stride_s2,
    ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr, QB: tl.constexpr, CAST: tl.constexpr = False,
    GATED: tl.constexpr = True, QUANTIZE: tl.constexpr = True,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * QB + tl.arange(0, QB)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    r64 = rows[:, None].to(tl.int64)
    g = tl.load(g_ptr + r64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    p1 = h1_ptr + r64 * stride_h1 + cols[None, :]
    if GATED:
        p2 = h2_ptr + r64 * stride_h2 + cols[None, :]
    h1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    if GATED:
        h2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
        a, da = _act(h1, ACTIVATION)
        u, du = _up(h2, ACTIVATION)
        d1 = (g * u * da).to(h1_ptr.dtype.element_ty)
        d2 = (g * a * du).to(h1_ptr.dtype.element_ty)
        tl.store(p1, d1, mask=mask)
        tl.store(p2, d2, mask=mask)
        _store_row_tiles(tl.where(mask, d1.to(tl.float32), 0.0), rows, cols, mask, M, q1_ptr, s1_ptr, stride_q1,
                         stride_s1, CAST)
        _store_row_tiles(tl.where(mask, d2.to(tl.float32), 0.0), rows, cols, mask, M, q2_ptr, s2_ptr, stride_q2,
                         stride_s2, CAST)
    else:  # the MLP experts' activation: grad * act'(h1) over h1 and into (q1, s1) (h2, q2, s2 not used;
        # QUANTIZE False: over h1 alone, q1 and s1 not used either)
        _, da = _act(h1, ACTIVATION)
        d1 = (g * da).to(h1_ptr.dtype.element_ty)
        tl.store(p1, d1, mask=mask)
        if QUANTIZE:
            _store_row_tiles(tl.where(mask, d1.to(tl.float32), 0.0), rows, cols, mask, M, q1_ptr, s1_ptr,
                             stride_q1, stride_s1, CAST)


@triton.jit
def _e4m3_bits(r):
    """The e4m3 byte (as int32, 0..255) of r, an fp32 value that e4m3 holds exactly (`_round_e4m3`'s
    results), by integer arithmetic on r's bits: no e4m3 value is ever held in registers. Normal
    values keep their exponent (re-biased by 127 - 7) and the top 3 mantissa bits; below 2^-6 the
    byte is the multiple of 2^-9; NaN gives 0x7F (the sign bit kept, as the cast does)."""
    bits = r.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    mag_bits = bits & 0x7FFFFFFF
    normal = (((mag_bits >> 23) - 120) << 3) | ((mag_bits >> 20) & 7)
    small = mag_bits < 0x3C800000  # below 2^-6
    sub = (tl.where(small, mag_bits, 0).to(tl.float32, bitcast=True) * 512.0).to(tl.int32)
    byte = tl.where(small, sub, normal)
    return tl.where(mag_bits > 0x7F800000, 0x7F, byte) | sign


# w_ENK (any float dtype, last dim contiguous) -> q_ENK e4m3, s [E, NB, KB] fp32. Program
# (nb, kb, e) quantizes block (nb, kb) of expert e: Q x Q values, one scale. Every store writes
# bytes into uint8 views. With CAST (CUDA) the bytes are the hardware's round-to-nearest-even cast
# (NaN written as 0x7F with its sign, as the integer form writes it); without (the interpreter,
# whose cast does not round e4m3's subnormals as the GPU does) `_round_e4m3` and `_e4m3_bits`
# assemble them by integer arithmetic. With TRANSPOSED the values are also stored the other way,
# into t_EKN, from the row-major bytes read back after the block's own store (a barrier between):
# Triton 3.6 on the H200 stored wrong values where the e4m3 cast's bytes, widened to int32 (as
# here), fed a tile of another layout (benchmarks/RESULTS.md, "FP8 on the H200" and "The weight
# quantizer with the hardware's e4m3 cast"), while bytes read from memory transpose correctly (as
# does the e4m3 tile itself, `_store_cols_k_major`). With PACKED (N a multiple of 4) the bytes of
# four consecutive rows are packed into one int32 word and the word tile is transposed and stored
# into t's int32 view ([E, K, N / 4]); else the int32 byte tile is transposed and stored byte by
# byte (1.7x the time on mixtral's weights).
@triton.jit
def _quantize_blocks_kernel(
    w_ptr, q_ptr, s_ptr, t_ptr,
    N, K,
    stride_we, stride_wn, stride_qe, stride_qn, stride_se, stride_sn, stride_te, stride_tk,
    QB: tl.constexpr, TRANSPOSED: tl.constexpr, PACKED: tl.constexpr, CAST: tl.constexpr,
):
    e = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * QB + tl.arange(0, QB)
    cols = tl.program_id(1) * QB + tl.arange(0, QB)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    w = tl.load(w_ptr + e * stride_we + rows[:, None].to(tl.int64) * stride_wn + cols[None, :], mask=mask, other=0.0)
    w = w.to(tl.float32)
    scale, inv = _pow2_scale(tl.max(tl.max(tl.abs(w), axis=1), axis=0))
    scale = tl.where(tl.max(tl.max((w != w).to(tl.int32), axis=1), axis=0) > 0, float("nan"), scale)
    r = w * inv  # within +-448 but for NaN and inf (the block's scale NaN)
    if CAST:
        b = r.to(tl.float8e4nv).to(tl.uint8, bitcast=True).to(tl.int32)
        b = tl.where(r != r, 0x7F | ((r.to(tl.int32, bitcast=True) >> 24) & 0x80), b)
    else:
        b = _e4m3_bits(_round_e4m3(r))
    q_ptrs = q_ptr + e * stride_qe + rows[:, None].to(tl.int64) * stride_qn + cols[None, :]
    tl.store(q_ptrs, b.to(tl.uint8), mask=mask)
    if TRANSPOSED:
        if CAST:  # the block's bytes as stored (every thread's stores done, read past L1)
            tl.debug_barrier()
            b = tl.load(q_ptrs, mask=mask, other=0, cache_modifier=".cg").to(tl.int32)
        if PACKED:  # little-endian: row 4i + j is byte j of word i
            shifts = tl.arange(0, 4) * 8
            words = tl.sum(tl.reshape(b, (QB // 4, 4, QB)) << shifts[None, :, None], axis=1)
            wcols = tl.program_id(0) * (QB // 4) + tl.arange(0, QB // 4)
            tl.store(t_ptr + e * stride_te + cols[:, None].to(tl.int64) * stride_tk + wcols[None, :],
                     tl.trans(words), mask=(cols < K)[:, None] & (wcols < N // 4)[None, :])
        else:
            tl.store(t_ptr + e * stride_te + cols[:, None].to(tl.int64) * stride_tk + rows[None, :],
                     tl.trans(b).to(tl.uint8), mask=(cols < K)[:, None] & (rows < N)[None, :])
    tl.store(s_ptr + e * stride_se + tl.program_id(0) * stride_sn + tl.program_id(1), scale)


# The K loop of a transposed (SWAP_AB) tile: acc_t [BLOCK_N, BLOCK_M] = w_tile @ x_tile^T, each
# BLOCK_K-deep step promoted to fp32 with the rows' scales (xs_ptrs, per row) and the weight's
# (ws_ptr_n: the tile's block row, one scale a step; or, BLOCK_N > QB, each column's block from
# ws_ptr_e, the expert's scales). With TWO, a second tile of the weight's rows W2_OFF rows further
# on (its scales WS2_OFF block rows further on: W2_OFF a multiple of QB) is computed from the
# same row loads into a second accumulator (else the second result is the first). With QUANTIZE
# (BLOCK_K = QB) x_ptrs point at 16-bit rows, each step's tile quantized in 1 x QB tiles as
# `quantize_rows` does (`_row_tiles`, CAST as there; xs_ptrs not read).
@triton.jit
def _swap_ab_tiles(x_ptrs, xs_ptrs, w_ptrs, ws_ptr_n, ws_ptr_e, w2_off, ws2_off, offs_n, row_ok, N, K,
                   stride_xsk, stride_wk, stride_wsn, stride_wsk,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, QB: tl.constexpr,
                   TWO: tl.constexpr, QUANTIZE: tl.constexpr = False, CAST: tl.constexpr = False):
    offs_k = tl.arange(0, BLOCK_K)
    acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc2_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    ws_cols = ws_ptr_e + (offs_n // QB) * stride_wsn
    for k in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if QUANTIZE:
            q, sa = _row_tiles(a.to(tl.float32), CAST)
            a = q.to(tl.float8e4nv)
        b_t = tl.load(w_ptrs, mask=(offs_n < N)[:, None] & k_ok[None, :], other=0.0)
        part_t = tl.dot(b_t, tl.trans(a), out_dtype=tl.float32)
        if not QUANTIZE:
            sa = tl.load(xs_ptrs + (k // QB) * stride_xsk, mask=row_ok, other=0.0)
        if BLOCK_N > QB:  # the tile spans blocks: each column's scale
            sb = tl.load(ws_cols + (k // QB) * stride_wsk, mask=offs_n < N, other=0.0)
            acc_t += part_t * (sb[:, None] * sa[None, :])
        else:
            sb = tl.load(ws_ptr_n + (k // QB) * stride_wsk)
            acc_t += part_t * (sa[None, :] * sb)
        if TWO:
            b2_t = tl.load(w_ptrs + w2_off, mask=k_ok[None, :], other=0.0)
            part2_t = tl.dot(b2_t, tl.trans(a), out_dtype=tl.float32)
            sb2 = tl.load(ws_ptr_n + ws2_off + (k // QB) * stride_wsk)
            acc2_t += part2_t * (sa[None, :] * sb2)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    if not TWO:
        acc2_t = acc_t
    return acc_t, acc2_t


# out_MN[rows of e] = (x_q * x_s)[rows of e] @ (w_q[e] * w_s[e])^T; x_q [M, K], x_s [M, KB],
# w_q as its logical [E, N, K] strides (any layout: [E, K, N] storage is the trans_b=False form),
# w_s as its logical [E, NB, KB] strides. Row tiles over all groups as in `gmm._gmm_kernel` (leftover
# rows written as zeros); programs loop over tiles with a stride of `num_programs`. Each
# BLOCK_K-deep step (BLOCK_K divides Q) is one FP8 product into a fresh fp32 tile, scaled by the
# rows' and the block's scales and added to the fp32 accumulator: no FP8 accumulation spans
# more than BLOCK_K (DeepSeek-V3's promotion). BLOCK_N divides Q (a tile's columns share a
# block), or with SWAP_AB may be a multiple of Q (each column's block scale read).
# With USE_TMA the operands are read by TMA through descriptors built once per program (x as
# [M, K]: a tile's rows past its group are read but never stored; w per expert as [E, N, K]
# (W_K_MAJOR, unit K stride) or [E, K, N], so that no step reads another expert's weights).
# With SWAP_AB (pointer loads) each step computes the transposed tile, w_tile @ x_tile^T: the
# weight's BLOCK_N columns fill the tensor cores' wide side and a few rows (decode) the narrow one.
@triton.jit
def _gmm_fp8_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, out_ptr, sizes_ptr,
    M, N, K, E, num_programs,
    stride_xm, stride_xsm, stride_xsk, stride_we, stride_wn, stride_wk, stride_wse, stride_wsn, stride_wsk,
    stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, QB: tl.constexpr,
    BLOCK_E: tl.constexpr, GROUP_M: tl.constexpr, USE_TMA: tl.constexpr = False, W_K_MAJOR: tl.constexpr = True,
    WARP_SPECIALIZE: tl.constexpr = False, SWAP_AB: tl.constexpr = False, PDL: tl.constexpr = False,
):
    pdl_start(PDL)
    e, starts, ends, tile_starts, tiles = _group_table(sizes_ptr, E, M, BLOCK_M, BLOCK_E)
    rows_total = tl.max(ends, 0)
    real_m_tiles = tl.sum(tiles, 0)
    num_m_tiles = real_m_tiles + tl.cdiv(M - rows_total, BLOCK_M)
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    if USE_TMA:
        x_desc = tl.make_tensor_descriptor(x_ptr, [M, K], [stride_xm, 1], [BLOCK_M, BLOCK_K])
        if W_K_MAJOR:
            w_desc = tl.make_tensor_descriptor(w_ptr, [E, N, K], [stride_we, stride_wn, 1], [1, BLOCK_N, BLOCK_K])
        else:
            w_desc = tl.make_tensor_descriptor(w_ptr, [E, K, N], [stride_we, stride_wk, 1], [1, BLOCK_K, BLOCK_N])
    for tile in range(tl.program_id(0), num_m_tiles * num_n_tiles, num_programs):
        tile_m, tile_n = _swizzle(tile, num_m_tiles, num_n_tiles, GROUP_M)
        group, row0, row_end, real = _row_tile(tile_m, e, starts, ends, tile_starts, tiles, real_m_tiles,
                                               rows_total, M, BLOCK_M)

        offs_m = row0 + tl.arange(0, BLOCK_M)
        n0 = tile_n * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        row_ok = offs_m < row_end
        x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
        xs_ptrs = xs_ptr + offs_m.to(tl.int64) * stride_xsm
        ws_ptr_n = ws_ptr + group.to(tl.int64) * stride_wse + (n0 // QB) * stride_wsn
        if SWAP_AB:  # w tiles [BLOCK_N, BLOCK_K], the accumulator transposed: [BLOCK_N, BLOCK_M]
            w_ptrs = (w_ptr + group.to(tl.int64) * stride_we + offs_n[:, None].to(tl.int64) * stride_wn
                      + offs_k[None, :].to(tl.int64) * stride_wk)
            acc_t, _ = _swap_ab_tiles(x_ptrs, xs_ptrs, w_ptrs, ws_ptr_n, ws_ptr + group.to(tl.int64) * stride_wse,
                                      0, 0, offs_n, row_ok, N, K, stride_xsk, stride_wk, stride_wsn, stride_wsk,
                                      BLOCK_M, BLOCK_N, BLOCK_K, QB, False)
            acc_t = tl.where(real, acc_t, 0.0)
            out_ptrs_t = out_ptr + offs_m[None, :].to(tl.int64) * stride_om + offs_n[:, None]
            tl.store(out_ptrs_t, acc_t.to(out_ptr.dtype.element_ty),
                     mask=(offs_m[None, :] < row_end) & (offs_n[:, None] < N))
        else:
            w_ptrs = (w_ptr + group.to(tl.int64) * stride_we + offs_n[None, :].to(tl.int64) * stride_wn
                      + offs_k[:, None].to(tl.int64) * stride_wk)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in tl.range(0, K, BLOCK_K, warp_specialize=WARP_SPECIALIZE):
                if USE_TMA:
                    a = x_desc.load([row0, k])
                    if W_K_MAJOR:
                        b = tl.trans(w_desc.load([group, n0, k]).reshape(BLOCK_N, BLOCK_K))
                    else:
                        b = w_desc.load([group, k, n0]).reshape(BLOCK_K, BLOCK_N)
                else:
                    k_ok = offs_k < K - k
                    a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                    b = tl.load(w_ptrs, mask=k_ok[:, None] & (offs_n < N)[None, :], other=0.0)
                part = tl.dot(a, b, out_dtype=tl.float32)
                sa = tl.load(xs_ptrs + (k // QB) * stride_xsk, mask=row_ok, other=0.0)
                sb = tl.load(ws_ptr_n + (k // QB) * stride_wsk)
                acc += part * (sa[:, None] * sb)
                x_ptrs += BLOCK_K
                w_ptrs += BLOCK_K * stride_wk
            acc = tl.where(real, acc, 0.0)
            out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < row_end) & (offs_n[None, :] < N))


# The decode up product with the GLU and its quantizer in the epilogue: x_q [M, K] (scales x_s)
# times w1 as its logical [E, 2F, K] (gate rows [0, F), up rows [F, 2F); F a multiple of QB) ->
# q_MF e4m3 and s_MFB of `act(h1) * up(h2)`, where h = x @ w1[e]^T is rounded to H_DTYPE as
# `gmm_fp8` writes it: bit for bit `gmm_fp8` over the same transposed tile, then
# `glu_quantize_rows`, with h never written nor read back. Program (tile_m, f) computes the
# transposed tiles of both halves' QB columns [f*QB, (f+1)*QB) from the same row loads; each
# row's QB columns are then exactly one 1 x QB tile of the quantizer (no program recomputes
# another's). Rows past the groups' total come out as the zeros' tiles, as h's zero rows do there.
# GATHER: x_ptr is the token rows x_TK (16-bit) and row r of the product token
# row_assignment[r] // TOP_K's (an assignment outside [0, n_assign): zeros), quantized in the K
# loop (`_swap_ab_tiles`' QUANTIZE): bit for bit `gather_quantize_rows` first, without its launch
# or its rows written (xs_ptr not read).
@triton.jit
def _gmm_fp8_glu_decode_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, q_ptr, s_ptr, sizes_ptr, row_assignment_ptr,
    M, F, K, E, n_assign,
    stride_xm, stride_xsm, stride_xsk, stride_we, stride_wn, stride_wk, stride_wse, stride_wsn, stride_wsk,
    stride_qm, stride_sm,
    ACTIVATION: tl.constexpr, H_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    QB: tl.constexpr, BLOCK_E: tl.constexpr, PDL: tl.constexpr = False, CAST: tl.constexpr = False,
    GATHER: tl.constexpr = False, TOP_K: tl.constexpr = 1,
):
    pdl_start(PDL)
    e, starts, ends, tile_starts, tiles = _group_table(sizes_ptr, E, M, BLOCK_M, BLOCK_E)
    rows_total = tl.max(ends, 0)
    real_m_tiles = tl.sum(tiles, 0)
    tile_m = tl.program_id(0)
    if tile_m >= real_m_tiles + tl.cdiv(M - rows_total, BLOCK_M):  # the grid covers any sizes' tiles
        return
    group, row0, row_end, real = _row_tile(tile_m, e, starts, ends, tile_starts, tiles, real_m_tiles, rows_total,
                                           M, BLOCK_M)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_f = tl.program_id(1) * QB + tl.arange(0, QB)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_m < row_end
    if GATHER:
        assignment = tl.load(row_assignment_ptr + offs_m, mask=row_ok, other=-1)
        x_ok = row_ok & (assignment >= 0) & (assignment < n_assign)
        x_rows = tl.where(x_ok, assignment // TOP_K, 0)
    else:
        x_ok = row_ok
        x_rows = offs_m
    x_ptrs = x_ptr + x_rows[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    xs_ptrs = xs_ptr + offs_m.to(tl.int64) * stride_xsm
    ws_e = ws_ptr + group.to(tl.int64) * stride_wse
    w_ptrs = (w_ptr + group.to(tl.int64) * stride_we + offs_f[:, None].to(tl.int64) * stride_wn
              + offs_k[None, :].to(tl.int64) * stride_wk)
    acc1_t, acc2_t = _swap_ab_tiles(x_ptrs, xs_ptrs, w_ptrs, ws_e + tl.program_id(1) * stride_wsn, ws_e,
                                    F.to(tl.int64) * stride_wn, (F // QB) * stride_wsn, offs_f, x_ok, F, K,
                                    stride_xsk, stride_wk, stride_wsn, stride_wsk, BLOCK_M, QB, BLOCK_K, QB, True,
                                    GATHER, CAST)
    h1 = tl.where(real, acc1_t, 0.0).to(H_DTYPE).to(tl.float32)
    h2 = tl.where(real, acc2_t, 0.0).to(H_DTYPE).to(tl.float32)
    a, _ = _act(h1, ACTIVATION)
    u, _ = _up(h2, ACTIVATION)
    q_t, scale = _row_tiles((a * u).to(H_DTYPE).to(tl.float32), CAST, 0)
    tl.store(q_ptr + offs_m[None, :].to(tl.int64) * stride_qm + offs_f[:, None], q_t.to(q_ptr.dtype.element_ty),
             mask=row_ok[None, :])
    tl.store(s_ptr + offs_m.to(tl.int64) * stride_sm + tl.program_id(1), scale, mask=row_ok)



# Block b of `_group_table`'s Q-row blocks: (its first row, its end row, whether b is a block).
@triton.jit
def _col_block(b, sizes_ptr, E, M, QB: tl.constexpr, BLOCK_E: tl.constexpr):
    e, starts, ends, block_starts, blocks = _group_table(sizes_ptr, E, M, QB, BLOCK_E)
    mine = (block_starts <= b) & (b < block_starts + blocks)
    row0 = tl.sum(tl.where(mine, starts + (b - block_starts) * QB, 0), 0)
    row_end = tl.sum(tl.where(mine, ends, 0), 0)
    return row0, row_end, tl.sum(mine.to(tl.int32), 0) > 0


# x [R, C] quantized with its columns' inverse scales inv, stored K-major: q_c[cols, slots]
# (cols -1: not stored). With CAST (CUDA) rounded by the e4m3 cast (`_e4m3_values`): its results
# transpose correctly (checked bit for bit against the integer rounding and torch's cast on the
# H200, Triton 3.6), at 2x the integer form's rate (benchmarks/RESULTS.md, "The column
# quantizers' hardware cast").
@triton.jit
def _store_cols_k_major(x, inv, cols, slots, q_ptr, stride_q, CAST: tl.constexpr = False):
    q = _e4m3_values(x * inv[None, :], CAST)
    tl.store(q_ptr + cols[:, None].to(tl.int64) * stride_q + slots[None, :], tl.trans(q).to(q_ptr.dtype.element_ty),
             mask=(cols >= 0)[:, None])


# x: a [QB, BLOCK_K] fp32 tile (0 where masked) of block b's rows `rows` and columns `cols` (-1:
# past K, not stored), quantized in QB x 1 tiles down its columns: scale row b of s, and q
# row-major at `rows` (where `mask`), or (TRANSPOSED) K-major in columns [b*QB, (b+1)*QB) of
# q_KP (all QB slots: rows past the group 0).
@triton.jit
def _store_col_tiles(x, b, rows, cols, mask, q_ptr, s_ptr, stride_qm, stride_sb, TRANSPOSED: tl.constexpr,
                     CAST: tl.constexpr = False):
    scale, inv = _pow2_scale(tl.max(tl.abs(x), axis=0))
    scale = tl.where(tl.max((x != x).to(tl.int32), axis=0) > 0, float("nan"), scale)
    if TRANSPOSED:
        slots = b.to(tl.int64) * x.shape[0] + tl.arange(0, x.shape[0])
        _store_cols_k_major(x, inv, cols, slots, q_ptr, stride_qm, CAST)
    else:
        q = _e4m3_values(x * inv[None, :], CAST)
        tl.store(q_ptr + rows[:, None].to(tl.int64) * stride_qm + cols[None, :], q.to(q_ptr.dtype.element_ty),
                 mask=mask)
    tl.store(s_ptr + b.to(tl.int64) * stride_sb + cols, scale, mask=cols >= 0)


# x_MK -> q_MK e4m3, s_SK fp32 (S = ceil(M/Q) + E): 128 x 1 tiles down the columns, each group's
# rows in blocks of Q from the group's first row (block b of the whole is block b - tile_start[e]
# of its group e). Program (b, j) quantizes block b in columns [j*BLOCK_K, (j+1)*BLOCK_K);
# blocks past the groups' total do nothing.
@triton.jit
def _quantize_cols_grouped_kernel(
    x_ptr, q_ptr, s_ptr, sizes_ptr,
    M, K, E,
    stride_xm, stride_qm, stride_sb,
    QB: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, TRANSPOSED: tl.constexpr = False,
    CAST: tl.constexpr = False,
):
    b = tl.program_id(0)
    row0, row_end, real = _col_block(b, sizes_ptr, E, M, QB, BLOCK_E)
    if not real:
        return
    rows = row0 + tl.arange(0, QB)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows < row_end)[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :], mask=mask, other=0.0)
    cols = tl.where(cols < K, cols, -1)
    _store_col_tiles(x.to(tl.float32), b, rows, cols, mask, q_ptr, s_ptr, stride_qm, stride_sb, TRANSPOSED, CAST)


# The transposed column tiles of `quantize_cols_grouped` (q [K, P], s [S, K]) coarsened to one
# scale per block of Q rows and Q columns, in place: program (b, c) takes block b's Q slots of q's
# rows [c*Q, (c+1)*Q) (the operand's columns), stores the largest of their Q scales as the block's
# (t[b, c]) and multiplies each row's values by its scale over the block's, a power of two <= 1 made
# from the exponents (no division), rounded to e4m3 as the quantizers round. A NaN scale (a
# non-finite tile) makes the block's scale NaN and its values 0. Blocks past the groups' total do
# nothing.
@triton.jit
def _cols_to_blocks_kernel(
    q_ptr, s_ptr, t_ptr, sizes_ptr,
    M, K, E,
    stride_q, stride_s, stride_t,
    QB: tl.constexpr, BLOCK_E: tl.constexpr, CAST: tl.constexpr = False,
):
    b = tl.program_id(0)
    c = tl.program_id(1)
    _, _, real = _col_block(b, sizes_ptr, E, M, QB, BLOCK_E)
    if not real:
        return
    ks = c * QB + tl.arange(0, QB)
    k_ok = ks < K
    s = tl.load(s_ptr + b.to(tl.int64) * stride_s + ks, mask=k_ok, other=0.0)
    nan = tl.max((s != s).to(tl.int32), axis=0) > 0
    t = tl.max(s, axis=0)
    tl.store(t_ptr + b.to(tl.int64) * stride_t + c, tl.where(nan, float("nan"), t))
    # Powers of two: 2^(e_s - e_t) from the biased exponents (both normal, e_s <= e_t).
    e_s = (s.to(tl.int32, bitcast=True) >> 23) & 0xFF
    e_t = (t.to(tl.int32, bitcast=True) >> 23) & 0xFF
    ratio = (tl.maximum(e_s - e_t + 127, 1) << 23).to(tl.float32, bitcast=True)
    slots = b.to(tl.int64) * QB + tl.arange(0, QB)
    ptrs = q_ptr + ks[:, None].to(tl.int64) * stride_q + slots[None, :]
    v = tl.load(ptrs, mask=k_ok[:, None], other=0.0).to(tl.float32) * ratio[:, None]
    v = tl.where(nan, 0.0, v)  # the block's NaN scale carries the NaN
    tl.store(ptrs, _e4m3_values(v, CAST).to(q_ptr.dtype.element_ty), mask=k_ok[:, None])


# CH rows `rows` (those < row_end are the block's) and columns `cols` (< K) of what
# `_quantize_cols_fused_kernel` quantizes, as fp32 tiles (x, x2), 0 outside: x2 is the GLU's second
# input gradient in 'glu_backward' (else x again). 'gather' reads zeros for an assignment outside
# [0, M) (M = N rows: its token would lie past x's T).
@triton.jit
def _fused_rows(x_ptr, h2_ptr, g_ptr, assignment_ptr, rows, cols, row_end, M, K, stride_x, stride_h2, stride_g,
                MODE: tl.constexpr, ACTIVATION: tl.constexpr, TOP_K: tl.constexpr):
    in_rows = rows < row_end
    mask = in_rows[:, None] & (cols < K)[None, :]
    r64 = rows[:, None].to(tl.int64)
    if MODE == "gather":
        a = tl.load(assignment_ptr + rows, mask=in_rows, other=-1)
        ok = in_rows & (a >= 0) & (a < M)  # an assignment past N = T * TOP_K would name a token past T
        src = tl.where(ok, a // TOP_K, 0).to(tl.int64)
        x = tl.load(x_ptr + src[:, None] * stride_x + cols[None, :], mask=ok[:, None] & (cols < K)[None, :],
                    other=0.0).to(tl.float32)
    else:
        x = tl.load(x_ptr + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = x
    if MODE == "glu":
        h2 = tl.load(h2_ptr + r64 * stride_h2 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        a, _ = _act(x, ACTIVATION)
        u, _ = _up(h2, ACTIVATION)
        x = tl.where(mask, (a * u).to(x_ptr.dtype.element_ty).to(tl.float32), 0.0)
        x2 = x
    if MODE == "glu_backward":
        h2 = tl.load(h2_ptr + r64 * stride_h2 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + r64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        a, da = _act(x, ACTIVATION)
        u, du = _up(h2, ACTIVATION)
        x = tl.where(mask, (g * u * da).to(x_ptr.dtype.element_ty).to(tl.float32), 0.0)
        x2 = tl.where(mask, (g * a * du).to(x_ptr.dtype.element_ty).to(tl.float32), 0.0)
    return x, x2


# Each column's amax (max() skips NaN) and NaN count of x [CH, QB], folded into (amax, nans).
@triton.jit
def _col_amax(amax, nans, x):
    return tl.maximum(amax, tl.max(tl.abs(x), axis=0)), nans + tl.sum((x != x).to(tl.int32), axis=0)


# A QB x QB block's scale from its columns' amax and NaN counts, stored at sc[b, program_id(1)]:
# the block's largest column scale (`_pow2_scale` rises with amax), NaN where the block holds a NaN
# or an infinity. Returns (its inverse for each column, bad): a bad block's values are stored as 0,
# as `_cols_to_blocks_kernel` stores them.
@triton.jit
def _block_scale(amax, nans, b, sc_ptr, stride_sc):
    scale, inv = _pow2_scale(tl.max(amax, axis=0))
    bad = (tl.sum(nans, axis=0) > 0) | (scale != scale)
    tl.store(sc_ptr + b.to(tl.int64) * stride_sc + tl.program_id(1), tl.where(bad, float("nan"), scale))
    return tl.zeros_like(amax) + inv, bad


# The FP8 weight gradient's operands made in the pass that already reads what they come from, in
# `quantize_cols_grouped`'s transposed layout (q_c [K, P], s_c [S, K]); program (b, j): block b's
# rows, columns [j*QB, (j+1)*QB). MODE 'rows': x_MK itself, also quantized in 1 x QB row tiles into
# (q1, s1) (the input gradient's operand); 'cols': x_MK itself, no row tiles; 'gather': row r is
# x_TK[row_assignment[r] // TOP_K] (0 where -1); 'glu': glu(h1 = x, h2) rounded to x's dtype;
# 'glu_backward': the GLU's two input gradients from (g, h1 = x, h2), rounded to x's dtype, the
# second's columns at OFF2 (rows of q_c, columns of s_c), each also in row tiles into (q1, s1) and
# (q2, s2) (those modes take BK = QB). BLOCKS ('rows', 'cols', 'gather'; BK = QB): one scale per
# QB x QB block in s_c [S, ceil(K/QB)] instead of one per column.
# CH = QB reads the block's BK columns once, whole; a smaller CH reads them in CH-row pieces twice
# (fewer registers a thread; the second read from L2): for its columns' amax and the row tiles,
# then to quantize and store its columns.
@triton.jit
def _quantize_cols_fused_kernel(
    x_ptr, h2_ptr, g_ptr, assignment_ptr, sizes_ptr, qc_ptr, sc_ptr, q1_ptr, s1_ptr, q2_ptr, s2_ptr,
    M, K, E, OFF2,
    stride_x, stride_h2, stride_g, stride_qc, stride_sc, stride_q1, stride_s1, stride_q2, stride_s2,
    MODE: tl.constexpr, ACTIVATION: tl.constexpr, TOP_K: tl.constexpr, QB: tl.constexpr, CH: tl.constexpr,
    BK: tl.constexpr, BLOCK_E: tl.constexpr, CAST: tl.constexpr = False, BLOCKS: tl.constexpr = False,
):
    b = tl.program_id(0)
    row0, row_end, real = _col_block(b, sizes_ptr, E, M, QB, BLOCK_E)
    if not real:
        return
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    store_cols = tl.where(cols < K, cols, -1)
    amax = tl.zeros([BK], dtype=tl.float32)
    amax2 = tl.zeros([BK], dtype=tl.float32)
    nans = tl.zeros([BK], dtype=tl.int32)
    nans2 = tl.zeros([BK], dtype=tl.int32)
    if CH == QB:  # the whole block at once, read once (BK = QB where row tiles are made)
        rows = row0 + tl.arange(0, QB)
        x, x2 = _fused_rows(x_ptr, h2_ptr, g_ptr, assignment_ptr, rows, cols, row_end, M, K, stride_x, stride_h2,
                            stride_g, MODE, ACTIVATION, TOP_K)
        mask = (rows < row_end)[:, None] & (cols < K)[None, :]
        if BLOCKS:  # one scale for the whole QB x QB block (BK = QB), in sc's column program_id(1)
            amax, nans = _col_amax(amax, nans, x)
            inv, bad = _block_scale(amax, nans, b, sc_ptr, stride_sc)
            _store_cols_k_major(tl.where(bad, 0.0, x), inv, store_cols, b.to(tl.int64) * QB + tl.arange(0, QB),
                                qc_ptr, stride_qc, CAST)
        else:
            _store_col_tiles(x, b, rows, store_cols, mask, qc_ptr, sc_ptr, stride_qc, stride_sc, True, CAST)
        if MODE == "rows" or MODE == "glu_backward":
            _store_row_tiles(x, rows, cols, mask, row_end, q1_ptr, s1_ptr, stride_q1, stride_s1, CAST)
        if MODE == "glu_backward":
            _store_col_tiles(x2, b, rows, tl.where(cols < K, cols + OFF2, -1), mask, qc_ptr, sc_ptr, stride_qc,
                             stride_sc, True, CAST)
            _store_row_tiles(x2, rows, cols, mask, row_end, q2_ptr, s2_ptr, stride_q2, stride_s2, CAST)
        return
    for c in range(0, QB, CH):
        rows = row0 + c + tl.arange(0, CH)
        x, x2 = _fused_rows(x_ptr, h2_ptr, g_ptr, assignment_ptr, rows, cols, row_end, M, K, stride_x, stride_h2,
                            stride_g, MODE, ACTIVATION, TOP_K)
        amax, nans = _col_amax(amax, nans, x)
        mask = (rows < row_end)[:, None] & (cols < K)[None, :]
        if MODE == "rows" or MODE == "glu_backward":
            _store_row_tiles(x, rows, cols, mask, row_end, q1_ptr, s1_ptr, stride_q1, stride_s1, CAST)
        if MODE == "glu_backward":
            amax2, nans2 = _col_amax(amax2, nans2, x2)
            _store_row_tiles(x2, rows, cols, mask, row_end, q2_ptr, s2_ptr, stride_q2, stride_s2, CAST)
    if BLOCKS:  # one scale for the whole QB x QB block (BK = QB), in sc's column program_id(1)
        inv, bad = _block_scale(amax, nans, b, sc_ptr, stride_sc)
    else:
        scale, inv = _pow2_scale(amax)
        scale = tl.where(nans > 0, float("nan"), scale)
        tl.store(sc_ptr + b.to(tl.int64) * stride_sc + cols, scale, mask=cols < K)
    scale2, inv2 = _pow2_scale(amax2)
    scale2 = tl.where(nans2 > 0, float("nan"), scale2)
    if MODE == "glu_backward":
        tl.store(sc_ptr + b.to(tl.int64) * stride_sc + OFF2 + cols, scale2, mask=cols < K)
    for c in range(0, QB, CH):
        rows = row0 + c + tl.arange(0, CH)
        x, x2 = _fused_rows(x_ptr, h2_ptr, g_ptr, assignment_ptr, rows, cols, row_end, M, K, stride_x, stride_h2,
                            stride_g, MODE, ACTIVATION, TOP_K)
        slots = b.to(tl.int64) * QB + c + tl.arange(0, CH)
        if BLOCKS:
            x = tl.where(bad, 0.0, x)  # a block with a non-finite value: its values 0
        _store_cols_k_major(x, inv, store_cols, slots, qc_ptr, stride_qc, CAST)
        if MODE == "glu_backward":
            _store_cols_k_major(x2, inv2, tl.where(cols < K, cols + OFF2, -1), slots, qc_ptr, stride_qc, CAST)


# A weight-gradient tile [BLOCK_N, BLOCK_K] of expert g written in out's dtype, or with ACCUMULATE
# added into the fp32 out (gradient-accumulation fusion: one fp32 addition an element, as the
# variable-K kernel's epilogue does).
@triton.jit
def _wgrad_epilogue(out_ptr, acc, g, offs_n, offs_k, N, K, stride_oe, stride_on, ACCUMULATE: tl.constexpr):
    out_ptrs = out_ptr + g.to(tl.int64) * stride_oe + offs_n[:, None].to(tl.int64) * stride_on + offs_k[None, :]
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=mask, other=0.0)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# out_ENK[e] = Σ over group e's Q-row blocks of (a_q * a_s)[blk]^T (b_q * b_s)[blk]: the weight
# gradient (variable K = the group's rows) in FP8, each block's product promoted to fp32 and scaled
# by the outer product of the two operands' column scales. Program (e, tile) owns one
# BLOCK_N x BLOCK_K tile of expert e's gradient; an empty group writes zeros.
@triton.jit
def _gmm_fp8_wgrad_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, out_ptr, sizes_ptr,
    M, N, K, E,
    stride_am, stride_asb, stride_bm, stride_bsb, stride_oe, stride_on,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, QB: tl.constexpr, BLOCK_E: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):
    g = tl.program_id(0)
    tiles_k = tl.cdiv(K, BLOCK_K)
    n0 = (tl.program_id(1) // tiles_k) * BLOCK_N
    k0 = (tl.program_id(1) % tiles_k) * BLOCK_K
    e, starts, ends, block_starts, blocks = _group_table(sizes_ptr, E, M, QB, BLOCK_E)
    mine = e == g
    row0 = tl.sum(tl.where(mine, starts, 0), 0)
    row_end = tl.sum(tl.where(mine, ends, 0), 0)
    blk0 = tl.sum(tl.where(mine, block_starts, 0), 0)
    nblocks = tl.sum(tl.where(mine, blocks, 0), 0)
    offs_r = tl.arange(0, QB)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for j in range(0, nblocks):
        rows = row0 + j * QB + offs_r
        row_ok = rows < row_end
        a = tl.load(a_ptr + rows[:, None].to(tl.int64) * stride_am + offs_n[None, :],
                    mask=row_ok[:, None] & (offs_n < N)[None, :], other=0.0)
        b = tl.load(b_ptr + rows[:, None].to(tl.int64) * stride_bm + offs_k[None, :],
                    mask=row_ok[:, None] & (offs_k < K)[None, :], other=0.0)
        part = tl.dot(tl.trans(a), b, out_dtype=tl.float32)
        blk = (blk0 + j).to(tl.int64)
        sa = tl.load(as_ptr + blk * stride_asb + offs_n, mask=offs_n < N, other=0.0)
        sb = tl.load(bs_ptr + blk * stride_bsb + offs_k, mask=offs_k < K, other=0.0)
        acc += part * (sa[:, None] * sb[None, :])
    _wgrad_epilogue(out_ptr, acc, g, offs_n, offs_k, N, K, stride_oe, stride_on, ACCUMULATE)


# The same product from K-major operands (`quantize_cols_grouped(..., transposed=True)`): a_NP,
# b_KP, block blk of the groups in columns [blk*QB, (blk+1)*QB), its rows past the group zeros.
# Each step is one 128-deep FP8 product of two K-major tiles (the tensor cores' FP8 form; the
# kernel above transposes a tile in registers each step). Programs (tile, expert): an expert's
# tiles run together, reading its blocks from L2.
@triton.jit
def _gmm_fp8_wgrad_kmajor_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, out_ptr, sizes_ptr,
    M, N, K, E, P,
    stride_an, stride_asb, stride_bk, stride_bsb, stride_oe, stride_on,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, QB: tl.constexpr, BLOCK_E: tl.constexpr,
    USE_TMA: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    g = tl.program_id(1)
    tiles_k = tl.cdiv(K, BLOCK_K)
    n0 = (tl.program_id(0) // tiles_k) * BLOCK_N
    k0 = (tl.program_id(0) % tiles_k) * BLOCK_K
    e, starts, ends, block_starts, blocks = _group_table(sizes_ptr, E, M, QB, BLOCK_E)
    mine = e == g
    blk0 = tl.sum(tl.where(mine, block_starts, 0), 0)
    nblocks = tl.sum(tl.where(mine, blocks, 0), 0)
    offs_r = tl.arange(0, QB)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    if USE_TMA:
        a_desc = tl.make_tensor_descriptor(a_ptr, [N, P], [stride_an, 1], [BLOCK_N, QB])
        b_desc = tl.make_tensor_descriptor(b_ptr, [K, P], [stride_bk, 1], [BLOCK_K, QB])
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for j in range(0, nblocks):
        blk = blk0 + j
        col = blk * QB
        if USE_TMA:
            a = a_desc.load([n0, col])
            b = b_desc.load([k0, col])
        else:
            a = tl.load(a_ptr + offs_n[:, None].to(tl.int64) * stride_an + (col + offs_r)[None, :],
                        mask=(offs_n < N)[:, None], other=0.0)
            b = tl.load(b_ptr + offs_k[:, None].to(tl.int64) * stride_bk + (col + offs_r)[None, :],
                        mask=(offs_k < K)[:, None], other=0.0)
        part = tl.dot(a, tl.trans(b), out_dtype=tl.float32)
        sa = tl.load(as_ptr + blk.to(tl.int64) * stride_asb + offs_n, mask=offs_n < N, other=0.0)
        sb = tl.load(bs_ptr + blk.to(tl.int64) * stride_bsb + offs_k, mask=offs_k < K, other=0.0)
        acc += part * (sa[:, None] * sb[None, :])
    _wgrad_epilogue(out_ptr, acc, g, offs_n, offs_k, N, K, stride_oe, stride_on, ACCUMULATE)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _hardware_cast(t: torch.Tensor) -> bool:
    """Whether the quantizers on `t` round by the hardware's e4m3 cast (the CAST of `_e4m3_values`
    and `_quantize_blocks_kernel`): on CUDA, not under the interpreter (whose cast rounds e4m3's
    subnormals otherwise; there `_round_e4m3`'s integer arithmetic gives the same bytes). The row
    quantizers measured 1.19-1.29x faster so, the GLU backward's 1.03x, the column quantizers up
    to 2x (H200, `bench_fp8.py --rounding`, `benchmarks/cast_transposed.py`, benchmarks/RESULTS.md)."""
    return t.device.type == "cuda" and not interpreted(t)


def quantize_rows(x_MK: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """1 x Q tiles of a [M, K] float tensor (last dim contiguous) -> (q [M, K] e4m3,
    s [M, KB] fp32 powers of two), x ~ q * s tile by tile. Triton on CUDA (and under the
    interpreter), else `quantize_rows_reference`."""
    check_tensor("x", x_MK, ndim=2, dtypes=_IN_DTYPES)
    if x_MK.stride(-1) != 1 and x_MK.numel():
        raise ValueError(f"x: expected a contiguous last dim, got strides {tuple(x_MK.stride())}")
    M, K = x_MK.shape
    if x_MK.device.type != "cuda" and not interpreted(x_MK):
        return quantize_rows_reference(x_MK)
    q = torch.empty((M, K), dtype=FP8_DTYPE, device=x_MK.device)
    s = torch.empty((M, cdiv(K, Q)), dtype=torch.float32, device=x_MK.device)
    if M and K:
        block_m = 16 if interpreted(x_MK) else 32
        _quantize_rows_kernel[(cdiv(M, block_m), cdiv(K, Q))](
            x_MK, q, s, M, K, x_MK.stride(0), q.stride(0), s.stride(0), BLOCK_M=block_m, QB=Q,
            CAST=_hardware_cast(x_MK), num_warps=4,
            enable_fp_fusion=True,
        )
    return q, s


def _check_activation_operands(first: Tuple[str, torch.Tensor], *others: Tuple[str, torch.Tensor]) -> None:
    """The activation quantizers' operands: (name, tensor) pairs of [M, K] floats, the others of
    the first's shape, dtype and device, each with a contiguous last dim (ValueError / TypeError)."""
    name0, t0 = first
    check_tensor(name0, t0, ndim=2, dtypes=_IN_DTYPES)
    for name, t in others:
        check_tensor(name, t, ndim=2, dtypes=_IN_DTYPES)
        if t.dtype != t0.dtype or t.shape != t0.shape or t.device != t0.device:
            raise ValueError(f"{name}: expected {name0}'s shape, dtype and device {tuple(t0.shape)} {t0.dtype} "
                             f"{t0.device}, got {tuple(t.shape)} {t.dtype} {t.device}")
    for name, t in (first, *others):
        if t.stride(-1) != 1 and t.numel():
            raise ValueError(f"{name}: expected a contiguous last dim, got strides {tuple(t.stride())}")


def _check_glu_operands(activation: str, first: Tuple[str, torch.Tensor], *others: Tuple[str, torch.Tensor]) -> None:
    """`_check_activation_operands`, and `activation` a name of `ACTIVATIONS` (ValueError)."""
    _check_activation_operands(first, *others)
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")


# `_glu_quantize_rows_kernel`'s launch: rows a program (block_m; each program one Q-wide column
# tile) and warps, quantizing only ("plain": serving, and training with `memory_optimized_mlp`)
# and with the 16-bit product written too ("product": training). Measured on the H200 (`bench_fp8.py
# --glu-quantize`, benchmarks/RESULTS.md): 8 warps over 32 rows, against 4, 0.2367 -> 0.2265 ms
# writing mixtral's product at T = 4096, 0.2747 -> 0.2694 olmoe's in training, 0.209 -> 0.1995
# qwen3moe's; quantizing only, 1-2% (0.1848 -> 0.1827 mixtral's prefill); 64 and 128 rows slower.
GLU_QUANTIZE_LAUNCH = {
    "plain": dict(block_m=32, num_warps=8),
    "product": dict(block_m=32, num_warps=8),
}


def glu_quantize_rows(h1_MK: torch.Tensor, h2_MK: torch.Tensor, activation: str, *,
                      return_product: bool = False) -> Tuple[torch.Tensor, ...]:
    """`quantize_rows(glu(h1, h2, activation))` in one pass: the gated activation of the GLU
    experts (`megablocks.ops.activation.glu`: fp32 math, rounded to h1's dtype) quantized in 1 x Q
    tiles as it is made, contiguous halves never written. h1, h2: `[M, K]` of one float dtype, any
    row strides (e.g. the two halves of the up projection's `[M, 2K]` output), last dim contiguous.
    Returns (q, s), equal bit for bit to the two passes; with `return_product`, (q, s, the product
    `[M, K]` in h1's dtype, contiguous), the product written in the same pass (the FP8 experts'
    node keeps it for w2's unquantized weight gradient, as the bf16 node keeps its product)."""
    _check_glu_operands(activation, ("h1", h1_MK), ("h2", h2_MK))
    if not isinstance(return_product, bool):
        raise TypeError(f"return_product: expected a bool, got {type(return_product).__name__}")
    if h1_MK.device.type != "cuda" and not interpreted(h1_MK):
        from megablocks.ops.activation import glu_reference

        a = glu_reference(h1_MK, h2_MK, activation)
        return (*quantize_rows_reference(a), a.contiguous()) if return_product else quantize_rows_reference(a)
    return _activation_quantize(h1_MK, h2_MK, activation, return_product, gated=True)


def _activation_quantize(h1_MK, h2_MK, activation: str, return_product: bool, gated: bool, quantize: bool = True):
    """`_glu_quantize_rows_kernel`'s launch for `glu_quantize_rows` (`gated`) and
    `act_quantize_rows` (h2 not read): (q, s), and the product where `return_product`; with
    `quantize` False (`act_rows`), the product alone."""
    M, K = h1_MK.shape
    a = torch.empty((M, K), dtype=h1_MK.dtype, device=h1_MK.device) if return_product else None
    if quantize:
        q = torch.empty((M, K), dtype=FP8_DTYPE, device=h1_MK.device)
        s = torch.empty((M, cdiv(K, Q)), dtype=torch.float32, device=h1_MK.device)
    else:  # the product alone: q and s stand in for the pointers the kernel does not touch
        q = s = a
    if M and K:
        launch = GLU_QUANTIZE_LAUNCH["product" if return_product else "plain"]
        block_m = 16 if interpreted(h1_MK) else launch["block_m"]
        _glu_quantize_rows_kernel[(cdiv(M, block_m), cdiv(K, Q))](
            h1_MK, h2_MK, q, s, a if return_product else q, M, K, h1_MK.stride(0), h2_MK.stride(0), q.stride(0),
            s.stride(0), a.stride(0) if return_product else 0,
            ACTIVATION=activation, BLOCK_M=block_m, QB=Q, num_warps=launch["num_warps"], WRITE_A=return_product,
            CAST=_hardware_cast(h1_MK), GATED=gated, QUANTIZE=quantize, **pdl_launch(h1_MK),
            enable_fp_fusion=True,
        )
    if not quantize:
        return a
    return (q, s, a) if return_product else (q, s)


def _glu_grad_rows_out(M: int, K: int, device, out):
    """The GLU backward quantizers' row-tile outputs: `out` = (q1, s1, q2, s2) checked ([M, K]
    e4m3 and [M, ceil(K/Q)] fp32 on `device`, unit last stride), or new tensors (ValueError)."""
    shapes = [((M, K), FP8_DTYPE), ((M, cdiv(K, Q)), torch.float32)] * 2
    if out is None:
        return tuple(torch.empty(shape, dtype=dtype, device=device) for shape, dtype in shapes)
    if (not isinstance(out, (tuple, list)) or len(out) != 4
            or any(not isinstance(o, torch.Tensor) or tuple(o.shape) != shape or o.dtype != dtype
                   or o.device != device or (o.numel() and o.stride(-1) != 1)
                   for o, (shape, dtype) in zip(out, shapes))):
        raise ValueError(f"out: expected (q1, s1, q2, s2) of shapes and dtypes {shapes} on {device} with a "
                         f"unit last stride, got {out!r:.300}")
    return tuple(out)


def _rows_reference_into(*pairs) -> None:
    """((q, s), v) pairs: `quantize_rows_reference(v)` copied into q and s."""
    for (q, s), v in pairs:
        rq, rs = quantize_rows_reference(v)
        q.copy_(rq)
        s.copy_(rs)


# `_glu_backward_quantize_rows_kernel`'s launch: rows a program (each program one Q-wide column tile)
# and warps. On the H200 (`bench_fp8.py --glu-backward-quantize`, benchmarks/RESULTS.md) every form
# from 8 rows over 2 warps to 32 over 8 ran within 1% (mixtral's 0.870-0.880 ms); 64 rows slower.
GLU_BACKWARD_QUANTIZE_LAUNCH = dict(block_m=32, num_warps=4)


def glu_backward_quantize_rows_(grad_MK: torch.Tensor, h1_MK: torch.Tensor, h2_MK: torch.Tensor, activation: str,
                                out: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = None):
    """The GLU's backward with its two gradients quantized as they are made: `glu_backward(grad,
    h1, h2)` (`megablocks.backend.activation`: fp32 math, rounded to h1's dtype) written over h1
    and h2, and `quantize_rows` of each -> ((q1, s1), (q2, s2)), without reading them back. The
    quantized values are `quantize_rows` of the written gradients bit for bit; the gradients are
    `glu_backward`'s math compiled in another kernel (on the H200, fp32 gelu differed by a few
    units of the last place where the compiler contracts it otherwise; bf16 and fp16 round that
    away but for a rare tie). `out` = (q1, s1, q2, s2) of [M, K] e4m3 and [M, ceil(K/Q)]
    fp32 (any row strides, unit last stride: e.g. the halves of one [M, 2K] operand's values and
    scales, K a multiple of Q) is written instead of new tensors. grad, h1, h2: [M, K] of one
    float dtype, any row strides, last dim contiguous."""
    _check_glu_operands(activation, ("grad", grad_MK), ("h1", h1_MK), ("h2", h2_MK))
    M, K = h1_MK.shape
    q1, s1, q2, s2 = _glu_grad_rows_out(M, K, h1_MK.device, out)
    if h1_MK.device.type != "cuda" and not interpreted(h1_MK):
        from megablocks.ops.activation import glu_backward_reference

        d1, d2 = glu_backward_reference(grad_MK, h1_MK, h2_MK, activation)
        h1_MK.copy_(d1)
        h2_MK.copy_(d2)
        _rows_reference_into(((q1, s1), h1_MK), ((q2, s2), h2_MK))
        return (q1, s1), (q2, s2)
    _activation_backward_quantize(grad_MK, h1_MK, h2_MK, (q1, s1, q2, s2), activation, gated=True)
    return (q1, s1), (q2, s2)


def _activation_backward_quantize(grad_MK, h1_MK, h2_MK, out, activation: str, gated: bool) -> None:
    """`_glu_backward_quantize_rows_kernel`'s launch for `glu_backward_quantize_rows_` (`gated`)
    and `act_backward_quantize_rows_` (h2, q2, s2 not used): the gradients written over h1 (and
    h2), quantized into out = (q1, s1, q2, s2); with `out` None (`act_backward_rows_`, not
    `gated`), written alone."""
    M, K = h1_MK.shape
    q1, s1, q2, s2 = (h1_MK,) * 4 if out is None else out
    if M and K:
        launch = GLU_BACKWARD_QUANTIZE_LAUNCH
        block_m = 16 if interpreted(h1_MK) else launch["block_m"]
        _glu_backward_quantize_rows_kernel[(cdiv(M, block_m), cdiv(K, Q))](
            grad_MK, h1_MK, h2_MK, q1, s1, q2, s2, M, K, grad_MK.stride(0), h1_MK.stride(0), h2_MK.stride(0),
            q1.stride(0), s1.stride(0), q2.stride(0), s2.stride(0),
            ACTIVATION=activation, BLOCK_M=block_m, QB=Q, CAST=_hardware_cast(h1_MK), num_warps=launch["num_warps"],
            GATED=gated, QUANTIZE=out is not None,
            enable_fp_fusion=True,
        )


def _check_mlp_activation(activation: str) -> None:
    """`activation`: a name of `ACTIVATIONS` that acts on h alone (not a GLU activation; ValueError)."""
    from megablocks.ops.activation import GATED_ACTIVATIONS

    names = tuple(a for a in ACTIVATIONS if a not in GATED_ACTIVATIONS)
    if not isinstance(activation, str) or activation not in names:
        raise ValueError(f"activation: expected one of {names} (the MLP experts' activations), got {activation!r}")


def act_quantize_rows(h_MK: torch.Tensor, activation: str, *,
                      return_product: bool = False) -> Tuple[torch.Tensor, ...]:
    """`quantize_rows(act(h))` in one pass: the MLP experts' activation (fp32 math, rounded to h's
    dtype, as `glu_quantize_rows` makes the GLU's) quantized in 1 x Q tiles as it is made, not
    written. h: `[M, K]` float, any row stride, last dim contiguous; `activation` one of the
    non-gated `ACTIVATIONS`. Returns (q, s), equal bit for bit to `quantize_rows` of the activation
    made apart; with `return_product`, (q, s, act(h) `[M, K]` in h's dtype, contiguous), written in
    the same pass (the FP8 MLP experts' node keeps it for w2's unquantized weight gradient)."""
    _check_activation_operands(("h", h_MK))
    _check_mlp_activation(activation)
    if not isinstance(return_product, bool):
        raise TypeError(f"return_product: expected a bool, got {type(return_product).__name__}")
    if h_MK.device.type != "cuda" and not interpreted(h_MK):
        from megablocks.ops.activation import act_reference

        a = act_reference(h_MK, activation)
        return (*quantize_rows_reference(a), a) if return_product else quantize_rows_reference(a)
    return _activation_quantize(h_MK, h_MK, activation, return_product, gated=False)


def act_backward_quantize_rows_(grad_MK: torch.Tensor, h_MK: torch.Tensor,
                                activation: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """The MLP experts' activation backward with its gradient quantized as it is made: `grad *
    act'(h)` (fp32 math, rounded to h's dtype) written over h, and `quantize_rows` of it -> (q, s),
    without reading it back (bit for bit `quantize_rows` of the written gradient). grad, h:
    `[M, K]` of one float dtype, any row strides, last dim contiguous; `activation` one of the
    non-gated `ACTIVATIONS`."""
    _check_activation_operands(("grad", grad_MK), ("h", h_MK))
    _check_mlp_activation(activation)
    M, K = h_MK.shape
    q = torch.empty((M, K), dtype=FP8_DTYPE, device=h_MK.device)
    s = torch.empty((M, cdiv(K, Q)), dtype=torch.float32, device=h_MK.device)
    if h_MK.device.type != "cuda" and not interpreted(h_MK):
        from megablocks.ops.activation import act_backward_reference

        h_MK.copy_(act_backward_reference(grad_MK, h_MK, activation))
        _rows_reference_into(((q, s), h_MK))
        return q, s
    _activation_backward_quantize(grad_MK, h_MK, h_MK, (q, s, q, s), activation, gated=False)
    return q, s


def act_rows(h_MK: torch.Tensor, activation: str) -> torch.Tensor:
    """The MLP experts' activation alone, by `act_quantize_rows`' kernel with no quantization:
    `act(h)` `[M, K]` in h's dtype, contiguous, bit for bit the 16-bit activation that
    `act_quantize_rows(h, activation, return_product=True)` writes (the FP8 MLP node makes it
    again this way for w2's gradient under `memory_optimized_mlp`). h and `activation` as there."""
    _check_activation_operands(("h", h_MK))
    _check_mlp_activation(activation)
    if h_MK.device.type != "cuda" and not interpreted(h_MK):
        from megablocks.ops.activation import act_reference

        return act_reference(h_MK, activation)
    return _activation_quantize(h_MK, h_MK, activation, True, gated=False, quantize=False)


def act_backward_rows_(grad_MK: torch.Tensor, h_MK: torch.Tensor, activation: str) -> torch.Tensor:
    """`act_backward_quantize_rows_` without the quantization: `grad * act'(h)` written over h
    (bit for bit what that writes), and h returned (the FP8 MLP node, where no input gradient is
    wanted and nothing reads the quantized gradient). Operands as there."""
    _check_activation_operands(("grad", grad_MK), ("h", h_MK))
    _check_mlp_activation(activation)
    if h_MK.device.type != "cuda" and not interpreted(h_MK):
        from megablocks.ops.activation import act_backward_reference

        return h_MK.copy_(act_backward_reference(grad_MK, h_MK, activation))
    _activation_backward_quantize(grad_MK, h_MK, h_MK, None, activation, gated=False)
    return h_MK


# `_gather_quantize_rows_kernel`'s launch: tokens a program (block_t) and warps, for the plain
# gather (the forward's and serving's rows) and for the weighted one that also writes the 16-bit
# rows (the combine's backward: 8 tiles quantized a token at top-k 8). Measured on the H200
# (`bench_fp8.py --gather-quantize`, benchmarks/RESULTS.md): the weighted form 0.467 -> 0.391 ms
# on olmoe's backward at 16 tokens (0.118 -> 0.094 on mixtral); the plain form within 3% at any.
GATHER_QUANTIZE_LAUNCH = {
    "plain": dict(block_t=32, num_warps=4),
    "weighted": dict(block_t=16, num_warps=4),
}


def gather_quantize_rows(x_TK: torch.Tensor, assignment_row_N: torch.Tensor, top_k: int,
                         weights_N: Optional[torch.Tensor] = None, *, return_rows: bool = False):
    """`quantize_rows` of the routed rows in one pass: row `assignment_row[t * top_k + k]` of the
    result is token t's row of `x_TK`, quantized in 1 x Q tiles (each token's tiles once, written
    to its top_k rows; the e4m3 bytes then move instead of x's). The plain layout
    (`megablocks.ops.permute.route`, `megablocks.ops.routing.row_maps`) names every one of the
    N = T * top_k rows once: equal bit for bit to `quantize_rows(gather_routed(x, maps))`.

    With `weights_N`, row a is token t's row times `weights_N[a]` (in fp32, rounded to x's dtype:
    the weighted gather's row, as the combine's backward makes it), quantized on its own: equal bit
    for bit to `quantize_rows(gather_rows(x, maps, weights_N))`. `return_rows`: those 16-bit rows
    are also returned, written in the same pass (the gather's result, for a product that reads
    them unquantized).

    Args:
        x_TK: [T, K] float32/float16/bfloat16, last dim contiguous.
        assignment_row_N: [T * top_k] integer, the row of each assignment, a permutation of
            [0, N) (rows outside it are skipped, and a row no assignment names is left unwritten).
        top_k: the assignments per token.
        weights_N: None, or [T * top_k] float32/float16/bfloat16, each assignment's weight.
        return_rows: also return the gathered rows, [N, K] in x's dtype.

    Returns:
        (q [N, K] e4m3, s [N, ceil(K / Q)] fp32 powers of two), and the rows if `return_rows`.
    """
    check_tensor("x", x_TK, ndim=2, dtypes=_IN_DTYPES)
    check_tensor("assignment_row_N", assignment_row_N, ndim=1, dtypes=INDEX_DTYPES)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"top_k: expected an int >= 1, got {top_k!r}")
    T, K = x_TK.shape
    n = assignment_row_N.numel()
    if n != T * top_k:
        raise ValueError(f"assignment_row_N: expected T * top_k = {T * top_k} elements, got {n}")
    if assignment_row_N.device != x_TK.device:
        raise ValueError(f"assignment_row_N: expected x's device {x_TK.device}, got {assignment_row_N.device}")
    if weights_N is not None:
        check_tensor("weights_N", weights_N, ndim=1, dtypes=_IN_DTYPES)
        if weights_N.numel() != n:
            raise ValueError(f"weights_N: expected T * top_k = {n} elements, got {weights_N.numel()}")
        if weights_N.device != x_TK.device:
            raise ValueError(f"weights_N: expected x's device {x_TK.device}, got {weights_N.device}")
        weights_N = weights_N.contiguous()
    if x_TK.stride(-1) != 1 and x_TK.numel():
        raise ValueError(f"x: expected a contiguous last dim, got strides {tuple(x_TK.stride())}")
    q = torch.empty((n, K), dtype=FP8_DTYPE, device=x_TK.device)
    s = torch.empty((n, cdiv(K, Q)), dtype=torch.float32, device=x_TK.device)
    rows_NK = torch.empty((n, K), dtype=x_TK.dtype, device=x_TK.device) if return_rows else None
    result = (q, s, rows_NK) if return_rows else (q, s)
    if not (n and K):
        return result
    if x_TK.device.type != "cuda" and not interpreted(x_TK):
        rows = assignment_row_N.long()
        keep = (rows >= 0) & (rows < n)
        y = x_TK[torch.arange(n, device=x_TK.device)[keep] // top_k]
        if weights_N is not None:
            y = (y.float() * weights_N[keep].float()[:, None]).to(x_TK.dtype)
        q_y, s_y = quantize_rows_reference(y)
        q.view(torch.uint8)[rows[keep]] = q_y.view(torch.uint8)
        s[rows[keep]] = s_y
        if return_rows:
            rows_NK[rows[keep]] = y
        return result
    launch = GATHER_QUANTIZE_LAUNCH["weighted" if weights_N is not None or return_rows else "plain"]
    block_t = 16 if interpreted(x_TK) else launch["block_t"]
    # Few tokens (decode): smaller token tiles, down to 8, until the grid fills the SMs (OLMoE's 64
    # tokens: 32 programs of 32 otherwise; benchmarks/RESULTS.md, "Decode's latency-bound launches
    # split").
    while block_t > 8 and cdiv(T, block_t) * cdiv(K, Q) < programs_to_fill(x_TK.device):
        block_t //= 2
    _gather_quantize_rows_kernel[(cdiv(T, block_t), cdiv(K, Q))](
        x_TK, assignment_row_N, weights_N if weights_N is not None else x_TK, q, s,
        rows_NK if return_rows else q, T, n, K, x_TK.stride(0), q.stride(0), s.stride(0),
        rows_NK.stride(0) if return_rows else 0,
        TOP_K=top_k, BLOCK_T=block_t, QB=Q, HAS_WEIGHTS=weights_N is not None, WRITE_ROWS=return_rows,
        CAST=_hardware_cast(x_TK), num_warps=launch["num_warps"], **pdl_launch(x_TK),
        enable_fp_fusion=True,
    )
    return result


def _pow2_scales(amax: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The torch form of `_pow2_scale`: (2^k, 2^-k) per amax (fp32)."""
    bits = amax.float().contiguous().view(torch.int32)
    exp = ((bits >> 23) & 0xFF) - 127
    k = (exp - 8 + ((bits & 0x7FFFFF) > 0x600000).to(torch.int32)).clamp(-126, 126)
    scale = ((k + 127) << 23).view(torch.float32).masked_fill(exp == 128, float("nan"))
    return scale, ((127 - k) << 23).view(torch.float32)


def _to_e4m3(v: torch.Tensor) -> torch.Tensor:
    """torch's cast, round to nearest even, of values already within +-448."""
    return v.clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)


def quantize_rows_reference(x_MK: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain torch `quantize_rows` (the same powers of two and rounding: equal bit for bit)."""
    M, K = x_MK.shape
    KB = cdiv(K, Q)
    x = torch.nn.functional.pad(x_MK.float(), (0, KB * Q - K)).view(M, KB, Q)
    scale, inv = _pow2_scales(x.abs().amax(dim=2))
    q = _to_e4m3(x * inv[:, :, None]).view(M, KB * Q)[:, :K].contiguous()
    return q, scale


def quantize_blocks(w_ENK: torch.Tensor, transposed: bool = False, out: Optional[Tuple[torch.Tensor, ...]] = None):
    """Q x Q blocks of [E, N, K] weights (out x in, each expert's as a checkpoint stores it) ->
    (q [E, N, K] e4m3, s [E, NB, KB] fp32 powers of two), w ~ q * s block by block; with
    `transposed` also t = q stored the other way ([E, K, N] contiguous, equal to
    `q.transpose(1, 2).contiguous()` byte for byte: the K-major operand of the products that read
    w as [E, K, N]), written by the same pass (3.6x faster than torch's copy after it on
    mixtral's weights). One Triton pass over the weights on CUDA (and under the interpreter),
    else `quantize_blocks_reference` (the same values bit for bit). `out`: (q, s[, t]) of those
    shapes and dtypes, any strides but a unit last one, written instead of new tensors (e.g.
    slices of a larger weight's: two experts' projections stacked along N)."""
    check_tensor("w", w_ENK, ndim=3, dtypes=_IN_DTYPES)
    if not isinstance(transposed, bool):
        raise TypeError(f"transposed: expected a bool, got {type(transposed).__name__}")
    E, N, K = w_ENK.shape
    if out is not None:
        shapes = [((E, N, K), FP8_DTYPE), ((E, cdiv(N, Q), cdiv(K, Q)), torch.float32)] + (
            [((E, K, N), FP8_DTYPE)] if transposed else [])
        if (not isinstance(out, (tuple, list)) or len(out) != len(shapes)
                or any(not isinstance(o, torch.Tensor) or tuple(o.shape) != shape or o.dtype != dtype
                       or o.device != w_ENK.device or (o.numel() and o.stride(-1) != 1)
                       for o, (shape, dtype) in zip(out, shapes))):
            raise ValueError(f"out: expected {len(shapes)} tensors of shapes and dtypes {shapes} on {w_ENK.device} "
                             f"with a unit last stride, got {out!r:.300}")
    if w_ENK.device.type != "cuda" and not interpreted(w_ENK):
        q, s = quantize_blocks_reference(w_ENK)
        made = (q, s, q.transpose(1, 2).contiguous()) if transposed else (q, s)
        if out is None:
            return made
        for o, m in zip(out, made):
            o.copy_(m)
        return tuple(out)
    if w_ENK.numel() and w_ENK.stride(2) != 1:
        w_ENK = w_ENK.contiguous()
    if out is not None:
        q, s, t = out if transposed else (*out, out[0])
    else:
        q = torch.empty((E, N, K), dtype=FP8_DTYPE, device=w_ENK.device)
        s = torch.empty((E, cdiv(N, Q), cdiv(K, Q)), dtype=torch.float32, device=w_ENK.device)
        t = torch.empty((E, K, N), dtype=FP8_DTYPE, device=w_ENK.device) if transposed else q
    packed = transposed and N % 4 == 0 and t.stride(1) % 4 == 0 and t.storage_offset() % 4 == 0
    if w_ENK.numel():
        # Every store takes integer bytes (uint8 views; t's as int32 words when packed).
        q_out = q.view(torch.uint8)
        t_out = t.view(torch.int32) if packed else t.view(torch.uint8)
        _quantize_blocks_kernel[(cdiv(N, Q), cdiv(K, Q), E)](
            w_ENK, q_out, s, t_out, N, K, w_ENK.stride(0), w_ENK.stride(1), q.stride(0), q.stride(1), s.stride(0),
            s.stride(1), t_out.stride(0), t_out.stride(1), QB=Q, TRANSPOSED=transposed, PACKED=packed,
            CAST=_hardware_cast(w_ENK),
            # 8 warps, 16 with the transposed copy: mixtral's weight 0.489 / 0.869 ms (integer
            # bytes), against 0.578 / 1.194 with 4 warps and 0.501 / 0.902 with the other (H200).
            num_warps=16 if transposed else 8,
            enable_fp_fusion=True,
        )
    return (q, s, t) if transposed else (q, s)


def quantize_blocks_reference(w_ENK: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain torch `quantize_blocks` (the same powers of two and rounding: equal bit for bit)."""
    check_tensor("w", w_ENK, ndim=3, dtypes=_IN_DTYPES)
    E, N, K = w_ENK.shape
    NB, KB = cdiv(N, Q), cdiv(K, Q)
    w = torch.nn.functional.pad(w_ENK.float(), (0, KB * Q - K, 0, NB * Q - N)).view(E, NB, Q, KB, Q)
    scale, inv = _pow2_scales(w.abs().amax(dim=(2, 4)))
    q = _to_e4m3(w * inv[:, :, None, :, None]).view(E, NB * Q, KB * Q)[:, :N, :K].contiguous()
    return q, scale


def _check_scales(s: torch.Tensor, shape, layout: str, q: torch.Tensor) -> None:
    """A dequantizer's scales `s` of the values q: `shape`, named by `layout`."""
    check_tensor("s", s, ndim=len(shape))
    if tuple(s.shape) != tuple(shape):
        raise ValueError(f"s: expected {layout} = {tuple(shape)} scales of q {tuple(q.shape)}, got {tuple(s.shape)}")


def dequantize_rows(q_MK: torch.Tensor, s_MKB: torch.Tensor) -> torch.Tensor:
    """fp32 [M, K]: q * s tile by tile (the reference's view of quantized activations)."""
    check_tensor("q", q_MK, ndim=2)
    M, K = q_MK.shape
    _check_scales(s_MKB, (M, cdiv(K, Q)), f"[M, ceil(K/{Q})]", q_MK)
    return q_MK.float() * s_MKB.float().repeat_interleave(Q, dim=1)[:, :K]


def dequantize_blocks(q_ENK: torch.Tensor, s_ENBKB: torch.Tensor) -> torch.Tensor:
    """fp32 [E, N, K]: q * s block by block."""
    check_tensor("q", q_ENK, ndim=3)
    E, N, K = q_ENK.shape
    _check_scales(s_ENBKB, (E, cdiv(N, Q), cdiv(K, Q)), f"[E, ceil(N/{Q}), ceil(K/{Q})]", q_ENK)
    s = s_ENBKB.float().repeat_interleave(Q, dim=1).repeat_interleave(Q, dim=2)[:, :N, :K]
    return q_ENK.float() * s


def gmm_fp8_reference(x_q: torch.Tensor, x_s: torch.Tensor, w_q: torch.Tensor, w_s: torch.Tensor,
                      batch_sizes: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Plain torch `gmm_fp8`: dequantize both operands, multiply each group in fp32."""
    x, w = dequantize_rows(x_q, x_s), dequantize_blocks(w_q, w_s)
    out = torch.zeros((x.shape[0], w.shape[1]), dtype=torch.float32, device=x.device)
    start = 0
    for e, m in enumerate(batch_sizes.tolist()):
        out[start:start + m] = x[start:start + m] @ w[e].t()
        start += m
    return out.to(out_dtype)


def check_gmm_fp8_args(x_q, x_s, w_q, w_s, batch_sizes, out_dtype, trans_b: bool = True) -> None:
    """Shapes, dtypes and devices of `gmm_fp8`'s arguments (ValueError / TypeError)."""
    check_tensor("x_q", x_q, ndim=2, dtypes=(FP8_DTYPE,))
    check_tensor("x_s", x_s, ndim=2, dtypes=(torch.float32,))
    M, K = x_q.shape
    _check_fp8_weights(w_q, w_s, batch_sizes, out_dtype, K, trans_b, "x_q")
    if tuple(x_s.shape) != (M, cdiv(K, Q)):
        raise ValueError(f"x_s: expected [M, ceil(K/{Q})] = {(M, cdiv(K, Q))} scales, got {tuple(x_s.shape)}")
    devices = {t.device for t in (x_q, x_s, w_q, w_s)}
    if len(devices) != 1:
        raise ValueError(f"x_q, x_s, w_q, w_s: expected one device, got {sorted(map(str, devices))}")
    if x_q.numel() and x_q.stride(-1) != 1:
        raise ValueError(f"x_q: expected a contiguous last dim, got strides {tuple(x_q.stride())}")
    check_batch_size_values(batch_sizes, M, "the rows of x_q", exact=False)


def _check_fp8_weights(w_q, w_s, batch_sizes, out_dtype, K: int, trans_b: bool, x_name: str) -> None:
    """An FP8 product's weight (e4m3 `[E, N, K]`, or `[E, K, N]` with trans_b=False), its block
    scales, one batch size per expert and the output dtype, for rows of K columns (`x_name`'s)."""
    check_tensor("w_q", w_q, ndim=3, dtypes=(FP8_DTYPE,))
    check_tensor("w_s", w_s, ndim=3, dtypes=(torch.float32,))
    check_tensor("batch_sizes", batch_sizes, ndim=1, dtypes=INDEX_DTYPES)
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"out_dtype: expected one of {_OUT_DTYPES}, got {out_dtype}")
    if trans_b:
        E, N, Kw = w_q.shape
        if Kw != K:
            raise ValueError(f"w_q: expected [E, N, K={K}] (out x in, K as {x_name}'s), got {tuple(w_q.shape)}")
        blocks = (E, cdiv(N, Q), cdiv(K, Q))
        if tuple(w_s.shape) != blocks:
            raise ValueError(f"w_s: expected [E, ceil(N/{Q}), ceil(K/{Q})] = {blocks} scales, got {tuple(w_s.shape)}")
    else:
        E, Kw, N = w_q.shape
        if Kw != K:
            raise ValueError(f"w_q: expected [E, K={K}, N] (trans_b=False: in x out), got {tuple(w_q.shape)}")
        blocks = (E, cdiv(K, Q), cdiv(N, Q))
        if tuple(w_s.shape) != blocks:
            raise ValueError(f"w_s: expected [E, ceil(K/{Q}), ceil(N/{Q})] = {blocks} scales (trans_b=False), "
                             f"got {tuple(w_s.shape)}")
    if batch_sizes.numel() != E:
        raise ValueError(f"batch_sizes: expected {E} entries (one per expert of w_q), got {batch_sizes.numel()}")


# The launches of products with few rows per expert (decode): (at most this many rows per expert
# on average, M / E; launch), the first that holds; past the last, the persistent TMA form. One
# program per tile, masked pointer loads, 4 stages; up to 32 rows per expert each tile is computed
# transposed (`swap_ab`: the weight's 128 columns on the tensor cores' wide side) over 16- or
# 32-row tiles. Measured at T = 64 (H200, sweep_fp8.py --tokens 64; benchmarks/RESULTS.md, "The
# decode tiles"), ms for the up / down products against 128-row tiles: qwen3moe (4 rows per
# expert) 0.064 / 0.064 at 16 rows against 0.088 / 0.114; olmoe (8) 0.049 / 0.048 against
# 0.062 / 0.072; mixtral (16) 0.134 / 0.128 at 32 rows against 0.167 / 0.159. 128-row tiles
# there: 0.52 ms for mixtral's fused_moe against 0.99 with the persistent TMA form ("FP8 on the
# H200").
FP8_DECODE_CONFIGS = [
    (8, dict(block_m=16, block_n=128, block_k=128, num_warps=4, num_stages=4, tma=False, persistent=False,
             swap_ab=True)),
    (32, dict(block_m=32, block_n=128, block_k=128, num_warps=4, num_stages=4, tma=False, persistent=False,
              swap_ab=True)),
    (128, dict(block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=4, tma=False, persistent=False)),
]


_GMM_FP8_CONFIG_KEYS = ("block_m", "block_n", "block_k", "num_warps", "num_stages", "tma", "persistent", "copy_n_major",
                        "warp_specialize", "swap_ab", "wgmma", "group_m", "tma_store")


# How much the Gluon form's 192 x 128 tiles may pad the rows per expert past 128-row tiles' and
# still be taken over them: not at all. On full tiles both forms run within a few per cent of
# each other; where 192-row tiles pad more, 128-row ones won (H200, `bench_fp8.py
# --tile-gains-configs`, three interleaved rounds, medians): mixtral's prefill at T = 4096 (1024
# rows per expert, 1152 padded) 3.64 -> 3.42-3.56 ms replayed in each PDL mode; its training
# products (2048 rows, 2112 padded) 2.030 / 2.013 -> 2.002 / 1.987 ms; olmoe's up product 0.586 ->
# 0.518, its down 0.629 -> 0.643 (benchmarks/RESULTS.md, "128-row tiles wherever 192-row ones pad more").
_GLUON_TILE_GAIN = 1.0


def _rows_padded(rows: float, block: int) -> int:
    """Rows of `block`-row tiles that cover `rows` rows of one expert."""
    return -(-math.ceil(rows) // block) * block


def gmm_fp8_launch(M: int, E: int, interpret: bool = False, decode: bool = True, gluon: bool = True) -> dict:
    """`gmm_fp8`'s default launch settings for M rows over E experts (every key of `config`);
    `decode=False` leaves out the few-rows-per-expert tiles (`FP8_DECODE_CONFIGS`), `gluon=False`
    the Gluon form past them (the Triton kernel's launch instead)."""
    cfg = dict(copy_n_major=True, warp_specialize=False, swap_ab=False, wgmma=False, group_m=8, tma_store=True)
    if interpret:
        cfg.update(block_m=32, block_n=32, block_k=32, num_warps=4, num_stages=1, tma=False, persistent=False)
    elif decode and M <= FP8_DECODE_CONFIGS[-1][0] * E:
        cfg.update(next(launch for rows, launch in FP8_DECODE_CONFIGS if M <= rows * E))
    elif gluon and fp8_wgmma.available():
        # Hopper, where Gluon is: the warp-specialized Gluon form (a loader warp, 64-row consumer
        # warpgroups, 4 stages), 4-16% faster than the Triton kernel below on mixtral's, olmoe's
        # and qwen3moe's six products (mixtral's 2.449 / 2.353 ms -> 2.162 / 2.009;
        # benchmarks/RESULTS.md, "`fused_moe` on FP8 experts"): over 192 x 128 tiles (three
        # consumers) where the rows per expert pad to no more rows than 128-row tiles, else over
        # 128 x 128 (two consumers, steps in pairs; within a few per cent of the 192-row form
        # where both fill their tiles, "The paired two-consumer form"). qwen3moe's prefill, 256
        # rows per expert: 384 rows of 192-row tiles against 256, measured 8% slower. `gmm_fp8`
        # takes the Triton kernel's launch where the operands do not allow this form.
        block_m = 192 if _rows_padded(M / E, 192) <= _GLUON_TILE_GAIN * _rows_padded(M / E, 128) else 128
        cfg.update(block_m=block_m, block_n=128, block_k=128, num_warps=4, num_stages=4, tma=True, persistent=True,
                   warp_specialize=True, wgmma=True)
    else:
        # The Triton kernel: 128 x 128 output tiles and 128-deep K steps (one scale step each),
        # operands by TMA, one program per SM, the K loop warp-specialized (loads and products in
        # separate warps), 4 stages: the fastest of benchmarks/sweep_fp8.py's Triton variants over
        # mixtral's and olmoe's forward products (pointer loads 5.08 / 1.81 ms for the two, TMA
        # and 3 stages 4.93 / 1.66, these 4.72 / 1.63; benchmarks/RESULTS.md, "FP8 on the H200").
        cfg.update(block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=4, tma=True, persistent=True,
                   warp_specialize=True)
    return cfg


def gmm_fp8(x_q: torch.Tensor, x_s: torch.Tensor, w_q: torch.Tensor, w_s: torch.Tensor,
            batch_sizes: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16, trans_b: bool = True,
            config: Optional[dict] = None) -> torch.Tensor:
    """The FP8 grouped GEMM (see the module docstring). With `trans_b` (default) `w_q` is
    `[E, N, K]` (out x in) with `[E, NB, KB]` scales and out = x @ w[e]^T; with trans_b=False it
    is `[E, K, N]` with `[E, KB, NB]` scales and out = x @ w[e] (the same quantized weight serves
    a layer's forward and its input gradient). `config` ({'block_m', 'block_n', 'block_k',
    'num_warps', 'num_stages', 'tma', 'persistent', 'copy_n_major', 'warp_specialize', 'swap_ab', 'wgmma',
    'group_m', 'tma_store'}) overrides the launch, for tuning and tests (keys left out take
    `gmm_fp8_launch`'s defaults, those for many rows per expert unless `config` names `swap_ab`, the
    Triton kernel's unless it names `wgmma`; without a config, past the decode sizes, the
    warp-specialized Gluon form where it applies):
    `group_m` is the row tiles per group of the tile order (default 8: a group's row tiles run
    down each column of tiles before the next, for L2 reuse), `tma_store` (default True) lets the
    warp-specialized Gluon form store a 16-bit output's full 64-row pieces by TMA,
    `tma` reads the operands by TMA where their strides allow, `persistent` launches one program
    per SM that loops over tiles, `copy_n_major` (default True) copies a weight whose K stride is
    not 1 (the trans_b=False form of a contiguous `[E, K, N]`) K-major before the product,
    `warp_specialize` (with TMA loads) runs the K loop's loads and products in separate warps,
    `swap_ab` (pointer loads) computes each tile transposed, weights times rows (for a few rows per
    expert: `block_m` as small as 16 then fills the tensor cores' narrow side; `block_n` may then
    also be a multiple of 128, tiles spanning weight blocks: measured no faster), `wgmma` takes the
    Gluon form (`fp8_wgmma`: 128 x 128 x 128 tiles, each step's product in flight while the one
    before it is promoted; `num_stages`, `num_warps`; with `warp_specialize` a loader warp and
    consumer warpgroups over `fp8_wgmma.WS_TILES`: 128 x 128 or 192 x 128 in 64-row consumers,
    256 x 128 in 128-row ones) on sm_90 where its operands allow TMA."""
    check_gmm_fp8_args(x_q, x_s, w_q, w_s, batch_sizes, out_dtype, trans_b)
    if config is not None and (not isinstance(config, dict) or set(config) - set(_GMM_FP8_CONFIG_KEYS)):
        raise ValueError(f"config: expected a dict with keys among {_GMM_FP8_CONFIG_KEYS}, got {config!r}")
    if not trans_b:  # the kernel reads any strides: the logical [E, N, K] view of the same storage
        w_q, w_s = w_q.transpose(1, 2), w_s.transpose(1, 2)
    M, K = x_q.shape
    E, N, _ = w_q.shape
    if x_q.device.type != "cuda" and not interpreted(x_q):
        return gmm_fp8_reference(x_q, x_s, w_q, w_s, batch_sizes.cpu(), out_dtype)
    out = torch.empty((M, N), dtype=out_dtype, device=x_q.device)
    if M == 0 or N == 0:
        return out
    if K == 0 or E == 0:
        return out.zero_()
    sizes = batch_sizes.to(device=x_q.device, dtype=torch.int32)
    # A config that does not name swap_ab overrides the full-size launch: its keys (tma, wgmma,
    # tiles) are not silently dropped by a decode tile that computes the product transposed. A
    # config tunes the Triton kernel's launch unless it names wgmma.
    base = gmm_fp8_launch(M, E, interpreted(x_q), decode=config is None or "swap_ab" in config, gluon=config is None)
    cfg = dict(base, **(config or {}))
    if isinstance(cfg["group_m"], bool) or not isinstance(cfg["group_m"], int) or cfg["group_m"] < 1:
        raise ValueError(f"config: group_m must be an int >= 1, got {cfg['group_m']!r}")
    wide = cfg["swap_ab"] and cfg["block_n"] % Q == 0  # transposed tiles may span blocks of columns
    if ((Q % cfg["block_n"] and not wide) or Q % cfg["block_k"]) and not cfg["wgmma"]:  # the Gluon forms': below
        raise ValueError(f"config: block_n and block_k must divide {Q} (block_n may be a multiple of it with "
                         f"swap_ab), got {cfg}")
    if cfg["copy_n_major"] and w_q.stride(2) != 1 and w_q.numel():
        # The tensor cores' FP8 products read their second operand K-major; read N-major in
        # place, the product ran at a quarter of the K-major rate (mixtral's input gradient
        # 11.5 ms against 2.5; H200, sweep_fp8.py). A K-major copy costs one pass over the e4m3
        # weight.
        w_q = w_q.contiguous()
    if cfg["wgmma"]:
        # Its tiles: config's, else the default launch's, else 128.
        chosen = dict(base if config is None else {}, **(config or {}))
        tile = tuple(chosen.get(key, fp8_wgmma.BLOCK) for key in ("block_m", "block_n", "block_k"))
        tiles = fp8_wgmma.WS_TILES if cfg["warp_specialize"] else {(fp8_wgmma.BLOCK, fp8_wgmma.BLOCK): None}
        if tile[:2] not in tiles or tile[2] != fp8_wgmma.BLOCK or cfg["swap_ab"]:
            raise ValueError(f"config: wgmma takes (block_m, block_n) among {tuple(tiles)}, block_k "
                             f"{fp8_wgmma.BLOCK} and no swap_ab, got {config}")
        if fp8_wgmma.usable(x_q, w_q):
            num_tiles = (cdiv(M, tile[0]) + E) * cdiv(N, tile[1])
            return fp8_wgmma.gmm_fp8_wgmma(x_q, x_s, w_q, w_s, sizes, out, persistent_programs(x_q.device, num_tiles),
                                           stages=cfg["num_stages"], num_warps=cfg["num_warps"],
                                           group_m=cfg["group_m"], warp_specialize=bool(cfg["warp_specialize"]),
                                           block_m=tile[0], tma_store=bool(cfg["tma_store"]))
        # Where this form does not apply: the Triton kernel's default launch, or, for a config
        # that asked for the form, its keys over the Triton kernel's 128 x 128 tiles.
        if config is None:
            cfg = gmm_fp8_launch(M, E, decode=False, gluon=False)
        else:
            cfg.update(block_m=fp8_wgmma.BLOCK, block_n=fp8_wgmma.BLOCK)
    w_k_major = w_q.stride(2) == 1
    use_tma = bool(cfg["tma"]) and not cfg["swap_ab"] and tma_ok(x_q, w_q if w_k_major else w_q.transpose(1, 2))
    if use_tma:
        prepare_tma(x_q.device)
    num_tiles = (cdiv(M, cfg["block_m"]) + E) * cdiv(N, cfg["block_n"])
    programs = persistent_programs(x_q.device, num_tiles) if cfg["persistent"] else num_tiles
    _gmm_fp8_kernel[(programs,)](
        x_q, x_s, w_q, w_s, out, sizes,
        M, N, K, E, programs,
        x_q.stride(0), x_s.stride(0), x_s.stride(1), w_q.stride(0), w_q.stride(1), w_q.stride(2), w_s.stride(0),
        w_s.stride(1), w_s.stride(2), out.stride(0),
        BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"], QB=Q,
        BLOCK_E=max(2, next_power_of_2(E)), GROUP_M=cfg["group_m"], USE_TMA=use_tma, W_K_MAJOR=w_k_major,
        WARP_SPECIALIZE=bool(cfg["warp_specialize"]) and use_tma, SWAP_AB=bool(cfg["swap_ab"]),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl_launch(x_q),
        enable_fp_fusion=True,
    )
    return out


_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
# `_gmm_fp8_glu_decode_kernel`'s pipeline stages. Each stage holds two 128 x 128 weight tiles (the
# gate's and the up half's) and the rows' tile: at 4 stages (the plain decode product's) 139 KB of
# shared memory, one program an SM, against three of the plain product's 74 KB; at 3 stages 104 KB,
# two programs an SM, 128 KB of weight tiles in flight against its 144 (16-row tiles; sm_90
# compiled on the CPU, ptxas: 158 registers, no spills). Not yet measured on a GPU
# (`bench_fp8.py --decode-glu` times 2, 3 and 4).
GLU_DECODE_STAGES = 3


def glu_decode_fits(M: int, E: int, two_f: int) -> bool:
    """Whether `gmm_fp8_glu_quantize` runs its one kernel for M rows over E experts and an up
    projection of 2F = `two_f` outputs: at the sizes of the transposed decode tiles (M at most
    32 rows per expert on average, `FP8_DECODE_CONFIGS`) with F a multiple of Q (each 128 columns
    of the GLU one 1 x Q tile, the gate's and the up half's blocks aligned)."""
    swap_rows = max(rows for rows, launch in FP8_DECODE_CONFIGS if launch.get("swap_ab"))
    return E > 0 and M <= swap_rows * E and two_f > 0 and two_f % (2 * Q) == 0


def gmm_fp8_glu_quantize(x_q: torch.Tensor, x_s: torch.Tensor, w1_q: torch.Tensor, w1_s: torch.Tensor,
                         batch_sizes: torch.Tensor, activation: str = "silu", out_dtype: torch.dtype = torch.bfloat16,
                         block_m: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """`glu_quantize_rows` of the halves of `gmm_fp8(x_q, x_s, w1_q, w1_s, batch_sizes, out_dtype)`:
    the up projection of GLU experts (w1_q `[E, 2F, K]` e4m3, gate rows then up rows, scales
    `[E, 2F/Q, KB]`), its gated activation, quantized in 1 x Q tiles -> (q `[M, F]` e4m3, s
    `[M, F/Q]` fp32), h rounded to `out_dtype` between them as `gmm_fp8` writes it. Where
    `glu_decode_fits` (decode sizes, F a multiple of Q) on CUDA or under the interpreter, one
    kernel: the decode product's transposed tiles for both halves' same 128 columns, the GLU and
    its quantizer in the epilogue, h never written; bit for bit the two launches with `gmm_fp8`'s
    decode tile (`block_m` rows: that of `gmm_fp8_launch` unless given, 16 or 32). Elsewhere the
    two launches themselves."""
    check_gmm_fp8_args(x_q, x_s, w1_q, w1_s, batch_sizes, out_dtype, True)
    _check_glu_decode_options(w1_q, activation, block_m)
    M, K = x_q.shape
    E, two_f, _ = w1_q.shape
    f = two_f // 2
    on_device = x_q.device.type == "cuda" or interpreted(x_q)
    if not (on_device and glu_decode_fits(M, E, two_f)) or M == 0 or K == 0:
        h = gmm_fp8(x_q, x_s, w1_q, w1_s, batch_sizes, out_dtype=out_dtype)
        return glu_quantize_rows(h[:, :f], h[:, f:], activation)
    return _glu_decode(x_q, x_s, None, 1, M, w1_q, w1_s, batch_sizes, activation, out_dtype, block_m)


def _check_glu_decode_options(w1_q, activation: str, block_m: Optional[int]) -> None:
    """The GLU decode launchers' own arguments: gate and up rows in w1_q, a known activation, a
    decode row tile (ValueError)."""
    if w1_q.shape[1] % 2:
        raise ValueError(f"w1_q: expected [E, 2F, K] (the gate's and the up half's rows), got {tuple(w1_q.shape)}")
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    if block_m not in (None, 16, 32):
        raise ValueError(f"block_m: expected None, 16 or 32, got {block_m!r}")


def _glu_decode(x, x_s, row_assignment, top_k: int, M: int, w1_q, w1_s, batch_sizes, activation: str,
                out_dtype: torch.dtype, block_m: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """`_gmm_fp8_glu_decode_kernel`'s launch over M rows: of x_q (x e4m3, x_s its scales), or with
    `row_assignment` the routed rows of the token rows x (GATHER)."""
    E, two_f, K = w1_q.shape
    f = two_f // 2
    launch = dict(gmm_fp8_launch(M, E), num_stages=GLU_DECODE_STAGES)
    if interpreted(x):
        launch = dict(FP8_DECODE_CONFIGS[0][1], num_stages=1)
    block_m = block_m or launch["block_m"]
    q = torch.empty((M, f), dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((M, f // Q), dtype=torch.float32, device=x.device)
    sizes = batch_sizes.to(device=x.device, dtype=torch.int32)
    gather = row_assignment is not None
    if not gather:
        row_assignment = sizes  # (not read)
    _gmm_fp8_glu_decode_kernel[(cdiv(M, block_m) + E, f // Q)](
        x, x_s, w1_q, w1_s, q, s, sizes, row_assignment,
        M, f, K, E, x.shape[0] * top_k,
        x.stride(0), x_s.stride(0), x_s.stride(1), w1_q.stride(0), w1_q.stride(1), w1_q.stride(2), w1_s.stride(0),
        w1_s.stride(1), w1_s.stride(2), q.stride(0), s.stride(0),
        ACTIVATION=activation, H_DTYPE=_TL_DTYPES[out_dtype], BLOCK_M=block_m, BLOCK_K=Q, QB=Q,
        BLOCK_E=max(2, next_power_of_2(E)), CAST=_hardware_cast(x), GATHER=gather, TOP_K=top_k,
        num_warps=launch["num_warps"], num_stages=launch["num_stages"], **pdl_launch(x),
        enable_fp_fusion=True,
    )
    return q, s


def gather_gmm_fp8_glu_quantize(x_TK: torch.Tensor, assignment_row_N: torch.Tensor, row_assignment_N: torch.Tensor,
                                top_k: int, w1_q: torch.Tensor, w1_s: torch.Tensor, batch_sizes: torch.Tensor,
                                activation: str = "silu", out_dtype: torch.dtype = torch.bfloat16,
                                block_m: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """`gmm_fp8_glu_quantize(*gather_quantize_rows(x_TK, assignment_row_N, top_k), w1_q, w1_s, ...)`:
    the routed rows of the token rows x_TK ([T, K] float, last dim contiguous) through the up
    projection, its GLU quantized. assignment_row_N and row_assignment_N: the plain layout's maps
    both ways (`megablocks.ops.routing.RowMaps`), N = T * top_k. Where `glu_decode_fits`, on CUDA
    or under the interpreter, one kernel that also gathers the rows (through row_assignment_N) and
    quantizes them in its K loop: no `gather_quantize_rows` launch, no e4m3 rows written; bit for
    bit the launches it replaces. Elsewhere those launches. Returns (q [N, F] e4m3, s [N, F/Q])."""
    check_tensor("x", x_TK, ndim=2, dtypes=_IN_DTYPES)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"top_k: expected an int >= 1, got {top_k!r}")
    T, K = x_TK.shape
    for name, t in (("assignment_row_N", assignment_row_N), ("row_assignment_N", row_assignment_N)):
        check_tensor(name, t, ndim=1, dtypes=INDEX_DTYPES)
        if t.numel() != T * top_k:
            raise ValueError(f"{name}: expected T * top_k = {T * top_k} elements, got {t.numel()}")
        if t.device != x_TK.device:
            raise ValueError(f"{name}: expected x's device {x_TK.device}, got {t.device}")
    _check_fp8_weights(w1_q, w1_s, batch_sizes, out_dtype, K, True, "x")
    check_batch_size_values(batch_sizes, T * top_k, "the routed rows, T * top_k", exact=False)
    if w1_q.device != x_TK.device or w1_s.device != x_TK.device:
        raise ValueError(f"w1_q, w1_s: expected x's device {x_TK.device}, got {w1_q.device} and {w1_s.device}")
    on_device = x_TK.device.type == "cuda" or interpreted(x_TK)
    E, two_f, _ = w1_q.shape
    if not (on_device and glu_decode_fits(T * top_k, E, two_f)) or T == 0 or K == 0:
        x_q, x_s = gather_quantize_rows(x_TK, assignment_row_N, top_k)
        return gmm_fp8_glu_quantize(x_q, x_s, w1_q, w1_s, batch_sizes, activation, out_dtype, block_m)
    _check_glu_decode_options(w1_q, activation, block_m)
    if x_TK.stride(-1) != 1:
        raise ValueError(f"x: expected a contiguous last dim, got strides {tuple(x_TK.stride())}")
    no_scales = torch.empty((0, 1), dtype=torch.float32, device=x_TK.device)  # (not read)
    return _glu_decode(x_TK, no_scales, row_assignment_N.contiguous(), top_k, T * top_k, w1_q, w1_s, batch_sizes,
                       activation, out_dtype, block_m)


def _check_sizes(batch_sizes: torch.Tensor, device, rows: int, what: str) -> torch.Tensor:
    """The group sizes of an operand quantized down its columns (`rows` rows, `what`), as int32
    on `device`: non-negative and summing to at most `rows` where values are checked (rows past
    the groups' total are left unset)."""
    check_tensor("batch_sizes", batch_sizes, ndim=1, dtypes=INDEX_DTYPES)
    check_batch_size_values(batch_sizes, rows, what, exact=False)
    return batch_sizes.to(device=device, dtype=torch.int32)


def quantize_cols_grouped(x_MK: torch.Tensor, batch_sizes: torch.Tensor, transposed: bool = False,
                          blocks: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Q x 1 tiles down the columns of each group of rows (group e: the next `batch_sizes[e]`
    rows; blocks of Q rows from the group's first row, the last one shorter) -> (q [M, K] e4m3,
    s [ceil(M/Q) + E, K] fp32 powers of two): block j of group e has scale row
    Σ_{f<e} ceil(size_f / Q) + j. The operands of the FP8 weight gradient (`gmm_fp8_wgrad`),
    whose reduction runs down the rows. Rows past the groups' total, and scale rows past their
    blocks, are left unset. With `transposed`, q is stored K-major by blocks instead, as the
    tensor cores' FP8 products read it: [K, (ceil(M/Q) + E) * Q], block b (the scale row's index)
    in columns [b*Q, (b+1)*Q), a group's last block padded with zeros; columns of blocks past the
    groups' left unset. `blocks` (with `transposed`): one scale per block of Q rows and Q columns
    instead, s [S, ceil(K/Q)], made in the same one pass (`quantize_blocks_grouped_reference`;
    `quantize_rows_and_cols`'s `blocks`). Triton on CUDA and under the interpreter, else the torch
    form."""
    check_tensor("x", x_MK, ndim=2, dtypes=_IN_DTYPES)
    if x_MK.stride(-1) != 1 and x_MK.numel():
        raise ValueError(f"x: expected a contiguous last dim, got strides {tuple(x_MK.stride())}")
    if not isinstance(transposed, bool):
        raise TypeError(f"transposed: expected a bool, got {type(transposed).__name__}")
    _check_blocks_flag(blocks)
    if blocks and not transposed:
        raise ValueError("blocks: the 128 x 128 blocks are made in the transposed layout only (transposed=True)")
    M, K = x_MK.shape
    sizes = _check_sizes(batch_sizes, x_MK.device, M, "the rows of x")
    E = sizes.numel()
    if x_MK.device.type != "cuda" and not interpreted(x_MK):
        if blocks:
            return _cols_reference(x_MK, sizes, blocks=True)
        q, s = quantize_cols_grouped_reference(x_MK, sizes)
        return (_blocks_k_major(q, sizes), s) if transposed else (q, s)
    if blocks:  # each program one whole block, x read as it is
        return _cols_fused("cols", x_MK, sizes, M, K, blocks=True)
    S = cdiv(M, Q) + E
    q = torch.empty((K, S * Q) if transposed else (M, K), dtype=FP8_DTYPE, device=x_MK.device)
    s = torch.empty((S, K), dtype=torch.float32, device=x_MK.device)
    if M and K and E:
        block_k = 32 if interpreted(x_MK) else 64
        _quantize_cols_grouped_kernel[(s.shape[0], cdiv(K, block_k))](
            x_MK, q, s, sizes, M, K, E, x_MK.stride(0), q.stride(0), s.stride(0),
            QB=Q, BLOCK_K=block_k, BLOCK_E=max(2, next_power_of_2(E)), TRANSPOSED=transposed,
            CAST=_hardware_cast(x_MK), num_warps=4,
            enable_fp_fusion=True,
        )
    return q, s


def cols_to_blocks_(q_KP: torch.Tensor, s_SK: torch.Tensor, batch_sizes: torch.Tensor,
                    rows: int) -> torch.Tensor:
    """The column tiles of `quantize_cols_grouped(x, batch_sizes, transposed=True)` over `rows` rows
    (q [K, P], s [S, K]) coarsened in place to one power-of-two scale per block of Q rows and Q
    columns: returns the blocks' scales t [S, ceil(K/Q)] (each the largest of its Q column scales;
    rows past the groups' blocks unset) and rescales q's values to them. The weight gradient
    (`gmm_fp8_wgrad`) promotes such a b operand with one scale a row, as the forward does, where
    column tiles take the outer product of two scale vectors.

    The values do not change: with power-of-two scales e4m3 rounds the same at any scale, and a
    value times its column's scale over the block's (a power of two <= 1) is exact while it stays
    a normal e4m3 number. Only a value that falls below 2^-6 so (more than about 2^14.8 under its
    block's largest) loses mantissa bits: rounded to the nearest subnormal, ties to even. A NaN
    scale (a tile with a non-finite value) makes its block's scale NaN (its values 0): the whole
    block dequantizes to NaN. The library's quantizers make such blocks in their own pass
    (`blocks=True`); this two-pass form is the definition their scales are tested against."""
    check_tensor("q", q_KP, ndim=2, dtypes=(FP8_DTYPE,))
    check_tensor("s", s_SK, ndim=2, dtypes=(torch.float32,))
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
        raise TypeError(f"rows: expected a non-negative int, got {rows!r}")
    K, P = q_KP.shape
    sizes = _check_sizes(batch_sizes, q_KP.device, rows, "rows")
    S = cdiv(rows, Q) + sizes.numel()
    if P != S * Q:
        raise ValueError(f"q: expected [K, (ceil(rows/{Q}) + E) * {Q}] = [K, {S * Q}] (the transposed layout), "
                         f"got {tuple(q_KP.shape)}")
    if tuple(s_SK.shape) != (S, K):
        raise ValueError(f"s: expected [ceil(rows/{Q}) + E, K] = {(S, K)} column scales, got {tuple(s_SK.shape)}")
    for name, t in (("q", q_KP), ("s", s_SK)):
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name}: expected a contiguous last dim, got strides {tuple(t.stride())}")
    if q_KP.device.type != "cuda" and not interpreted(q_KP):
        q, t = cols_to_blocks_reference(q_KP, s_SK, sizes, rows)
        q_KP.copy_(q)
        return t
    t = torch.empty((S, cdiv(K, Q)), dtype=torch.float32, device=q_KP.device)
    if S and K:
        _cols_to_blocks_kernel[(S, cdiv(K, Q))](
            q_KP, s_SK, t, sizes, rows, K, sizes.numel(), q_KP.stride(0), s_SK.stride(0), t.stride(0),
            QB=Q, BLOCK_E=max(2, next_power_of_2(sizes.numel())), CAST=_hardware_cast(q_KP), num_warps=4,
            enable_fp_fusion=True,
        )
    return t


def cols_to_blocks_reference(q_KP: torch.Tensor, s_SK: torch.Tensor, batch_sizes: torch.Tensor,
                             rows: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain torch `cols_to_blocks_`, out of place: (q, t), the blocks past the groups' as q and s
    hold them (t: their scales' maxima)."""
    K, P = q_KP.shape
    S = P // Q
    KB = cdiv(K, Q)
    s = torch.nn.functional.pad(s_SK.float(), (0, KB * Q - K), value=0.0)
    t = s.view(S, KB, Q).amax(dim=2)  # NaN propagates
    t_cols = t.repeat_interleave(Q, dim=1)[:, :K]
    ratio = s_SK.float() / t_cols  # powers of two: exact
    v = q_KP.float().view(K, S, Q) * ratio.t()[:, :, None]
    v = v.masked_fill(t_cols.isnan().t()[:, :, None], 0.0)
    blocks = sum(cdiv(n, Q) for _, n, _ in _group_blocks(batch_sizes.cpu(), rows))
    q = q_KP.clone()
    q[:, :blocks * Q] = _to_e4m3(v.view(K, P)[:, :blocks * Q])
    return q, t


# `_quantize_cols_fused_kernel`'s launch per mode: rows a piece (ch; Q: the whole block at once),
# columns a program (bk; Q where row tiles are made), warps, software-pipelined stages. The
# fastest of eight forms summed over mixtral's and olmoe's operands (H200, `bench_fp8.py --cols`;
# benchmarks/RESULTS.md).
COLS_FUSED_LAUNCH = {
    "rows": dict(ch=Q, bk=Q, num_warps=4, num_stages=1),
    "gather": dict(ch=Q, bk=32, num_warps=2, num_stages=1),
    "glu": dict(ch=Q, bk=32, num_warps=4, num_stages=1),
    "glu_backward": dict(ch=Q, bk=Q, num_warps=8, num_stages=1),
}


def _cols_fused(mode: str, x: torch.Tensor, sizes: torch.Tensor, M: int, K: int, h2=None, grad=None,
                row_assignment=None, top_k: int = 1, activation: str = "silu", rows_out=None, halves: int = 1,
                blocks: bool = False):
    """`_quantize_cols_fused_kernel`'s launch: (q_c [halves * K, P], s_c [S, halves * K]) in
    `quantize_cols_grouped`'s transposed layout over M rows in groups `sizes` (int32, x's device);
    `rows_out` (q1, s1[, q2, s2]) the row tiles' outputs of 'rows' / 'glu_backward'. `blocks`
    ('rows', 'gather', 'cols'): one scale per block of Q rows and Q columns instead, s_c [S, ceil(K/Q)]
    (`quantize_blocks_grouped_reference`), each program one whole block (its launch
    `COLS_BLOCKS_LAUNCH`)."""
    E = sizes.numel()
    S = cdiv(M, Q) + E
    q_c = torch.empty((halves * K, S * Q), dtype=FP8_DTYPE, device=x.device)
    s_c = torch.empty((S, cdiv(K, Q) if blocks else halves * K), dtype=torch.float32, device=x.device)
    if not (M and K and E):
        return q_c, s_c
    rows_out = tuple(rows_out or ())
    rows_out += (q_c, s_c, q_c, s_c)[len(rows_out):]  # unused slots: not read
    h2 = x if h2 is None else h2
    grad = x if grad is None else grad
    row_assignment = sizes if row_assignment is None else row_assignment
    launch = COLS_BLOCKS_LAUNCH[mode] if blocks else COLS_FUSED_LAUNCH[mode]
    bk = Q if mode in ("rows", "glu_backward") or blocks else launch["bk"]
    ch = launch["ch"]
    if interpreted(x):  # the same form, in small pieces
        ch = Q if ch == Q else 8
    _quantize_cols_fused_kernel[(S, cdiv(K, bk))](
        x, h2, grad, row_assignment, sizes, q_c, s_c, *rows_out, M, K, E, K,
        x.stride(0), h2.stride(0), grad.stride(0), q_c.stride(0), s_c.stride(0),
        rows_out[0].stride(0), rows_out[1].stride(0), rows_out[2].stride(0), rows_out[3].stride(0),
        MODE=mode, ACTIVATION=activation, TOP_K=top_k, QB=Q, CH=ch, BK=bk,
        BLOCK_E=max(2, next_power_of_2(E)), CAST=_hardware_cast(x), BLOCKS=blocks, num_warps=launch["num_warps"],
        num_stages=launch["num_stages"],
        enable_fp_fusion=True,
    )
    return q_c, s_c


# `_cols_fused`'s launch where each program quantizes one whole Q x Q block (`blocks`): the block
# read once, whole, by 4 warps; the fastest of four forms (whole with 4 or 8 warps, in 32- or
# 64-row pieces) on mixtral's and olmoe's token rows and output gradients but one, within 3%
# (H100, `bench_fp8.py --b-blocks`: olmoe's token rows 0.407 ms against 0.542 quantized in column
# tiles and coarsened after; benchmarks/RESULTS.md).
COLS_BLOCKS_LAUNCH = {
    "rows": dict(COLS_FUSED_LAUNCH["rows"]),
    "cols": dict(COLS_FUSED_LAUNCH["rows"]),
    "gather": dict(ch=Q, bk=Q, num_warps=4, num_stages=1),
}


def _cols_reference(v: torch.Tensor, sizes: torch.Tensor, blocks: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """The torch form of `_cols_fused`'s output for the rows v (transposed layout)."""
    q, s = (quantize_blocks_grouped_reference if blocks else quantize_cols_grouped_reference)(v, sizes)
    return _blocks_k_major(q, sizes), s


def _check_blocks_flag(blocks) -> None:
    if not isinstance(blocks, bool):
        raise TypeError(f"blocks: expected a bool, got {blocks!r}")


def quantize_rows_and_cols(x_MK: torch.Tensor, batch_sizes: torch.Tensor, blocks: bool = False):
    """`quantize_rows(x)` and `quantize_cols_grouped(x, batch_sizes, transposed=True)` in one
    pass over x (the output gradient of the down projection, operand of its input gradient and of
    its weight gradient) -> ((q [M, K], s [M, KB]), (q_c [K, P], s_c [S, K])), bit for bit the two
    calls' values (the row-major outputs' rows past the groups' total are left unset). `blocks`:
    the second pair with one scale per block of Q rows and Q columns instead, s_c [S, KB]
    (`quantize_blocks_grouped_reference`; the scales `cols_to_blocks_` gives the column tiles, the
    values rounded once: the weight gradient's b operand without that second pass)."""
    check_tensor("x", x_MK, ndim=2, dtypes=_IN_DTYPES)
    _check_blocks_flag(blocks)
    if x_MK.stride(-1) != 1 and x_MK.numel():
        raise ValueError(f"x: expected a contiguous last dim, got strides {tuple(x_MK.stride())}")
    M, K = x_MK.shape
    sizes = _check_sizes(batch_sizes, x_MK.device, M, "the rows of x")
    if x_MK.device.type != "cuda" and not interpreted(x_MK):
        return quantize_rows_reference(x_MK), _cols_reference(x_MK, sizes, blocks)
    q = torch.empty((M, K), dtype=FP8_DTYPE, device=x_MK.device)
    s = torch.empty((M, cdiv(K, Q)), dtype=torch.float32, device=x_MK.device)
    return (q, s), _cols_fused("rows", x_MK, sizes, M, K, rows_out=(q, s), blocks=blocks)


def gather_quantize_cols(x_TK: torch.Tensor, row_assignment_N: torch.Tensor, top_k: int,
                         batch_sizes: torch.Tensor, blocks: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """`quantize_cols_grouped(rows, batch_sizes, transposed=True)` of the routed rows (row r is
    token `row_assignment[r] // top_k`'s row of x_TK; zeros where the assignment is -1 or past
    N = T * top_k, row_assignment's length) without making them: the up projection's
    weight-gradient operand read through the maps. `blocks`: one scale per block of Q rows and Q
    columns instead (s [S, ceil(K/Q)], as `quantize_rows_and_cols`'s)."""
    check_tensor("x", x_TK, ndim=2, dtypes=_IN_DTYPES)
    _check_blocks_flag(blocks)
    check_tensor("row_assignment_N", row_assignment_N, ndim=1, dtypes=INDEX_DTYPES)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"top_k: expected an int >= 1, got {top_k!r}")
    if x_TK.stride(-1) != 1 and x_TK.numel():
        raise ValueError(f"x: expected a contiguous last dim, got strides {tuple(x_TK.stride())}")
    if row_assignment_N.device != x_TK.device:
        raise ValueError(f"row_assignment_N: expected x's device {x_TK.device}, got {row_assignment_N.device}")
    T, K = x_TK.shape
    N = row_assignment_N.numel()
    if N != T * top_k:
        raise ValueError(f"row_assignment_N: expected T * top_k = {T * top_k} elements, got {N}")
    sizes = _check_sizes(batch_sizes, x_TK.device, N, "the routed rows, T * top_k")
    if x_TK.device.type != "cuda" and not interpreted(x_TK):
        a = row_assignment_N.long()
        present = (a >= 0) & (a < N)
        rows = torch.where(present[:, None], x_TK[torch.where(present, a, 0) // top_k],
                           torch.zeros((), dtype=x_TK.dtype, device=x_TK.device))
        return _cols_reference(rows, sizes, blocks)
    return _cols_fused("gather", x_TK, sizes, N, K, row_assignment=row_assignment_N, top_k=top_k, blocks=blocks)


def glu_quantize_cols(h1_MK: torch.Tensor, h2_MK: torch.Tensor, activation: str,
                      batch_sizes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """`quantize_cols_grouped(glu(h1, h2, activation), batch_sizes, transposed=True)` in one
    pass, the GLU product not written: the down projection's weight-gradient operand made again
    from the saved halves."""
    _check_glu_operands(activation, ("h1", h1_MK), ("h2", h2_MK))
    M, K = h1_MK.shape
    sizes = _check_sizes(batch_sizes, h1_MK.device, M, "the rows of h1")
    if h1_MK.device.type != "cuda" and not interpreted(h1_MK):
        from megablocks.ops.activation import glu_reference

        return _cols_reference(glu_reference(h1_MK, h2_MK, activation), sizes)
    return _cols_fused("glu", h1_MK, sizes, M, K, h2=h2_MK, activation=activation)


def glu_backward_quantize_rows_cols(grad_MK: torch.Tensor, h1_MK: torch.Tensor, h2_MK: torch.Tensor,
                                    activation: str, batch_sizes: torch.Tensor,
                                    out: Optional[Tuple[torch.Tensor, ...]] = None):
    """The GLU's backward quantized both ways as it is made, neither gradient written: `quantize_rows`
    of each (the input gradient's operands, into `out` = (q1, s1, q2, s2) as
    `glu_backward_quantize_rows_` takes it, or new tensors) and `quantize_cols_grouped(...,
    transposed=True)` of the two side by side ([grad_h1 | grad_h2], the up projections' weight
    gradient operand) -> ((q1, s1), (q2, s2), (q_c [2K, P], s_c [S, 2K])). Values equal bit for bit
    to `glu_backward_quantize_rows_` and `quantize_cols_grouped` of its gradients."""
    _check_glu_operands(activation, ("grad", grad_MK), ("h1", h1_MK), ("h2", h2_MK))
    M, K = h1_MK.shape
    sizes = _check_sizes(batch_sizes, h1_MK.device, M, "the rows of h1")
    q1, s1, q2, s2 = out = _glu_grad_rows_out(M, K, h1_MK.device, out)
    if h1_MK.device.type != "cuda" and not interpreted(h1_MK):
        from megablocks.ops.activation import glu_backward_reference

        d1, d2 = glu_backward_reference(grad_MK, h1_MK, h2_MK, activation)
        _rows_reference_into(((q1, s1), d1), ((q2, s2), d2))
        return (q1, s1), (q2, s2), _cols_reference(torch.cat([d1, d2], dim=1), sizes)
    cols = _cols_fused("glu_backward", h1_MK, sizes, M, K, h2=h2_MK, grad=grad_MK, activation=activation,
                       rows_out=out, halves=2)
    return (q1, s1), (q2, s2), cols


def _blocks_k_major(q_MK: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """The transposed layout of `quantize_cols_grouped` from its row-major q (reference path)."""
    M, K = q_MK.shape
    out = torch.zeros((K, (cdiv(M, Q) + sizes.numel()) * Q), dtype=q_MK.dtype, device=q_MK.device)
    for first, n, block in _group_blocks(sizes.cpu(), M):
        for j in range(cdiv(n, Q)):
            rows = q_MK[first + j * Q:first + min(n, (j + 1) * Q)]
            out[:, (block + j) * Q:(block + j) * Q + rows.shape[0]] = rows.t()
    return out


def _blocks_row_major(q_KP: torch.Tensor, sizes: torch.Tensor, M: int) -> torch.Tensor:
    """The row-major q [M, K] of `quantize_cols_grouped`'s transposed layout (reference path)."""
    out = torch.zeros((M, q_KP.shape[0]), dtype=q_KP.dtype, device=q_KP.device)
    for first, n, block in _group_blocks(sizes.cpu(), M):
        for j in range(cdiv(n, Q)):
            m = min(n, (j + 1) * Q) - j * Q
            out[first + j * Q:first + j * Q + m] = q_KP[:, (block + j) * Q:(block + j) * Q + m].t()
    return out


def _group_blocks(sizes: torch.Tensor, M: int):
    """Per group (host lists): first row, rows, first scale row, as `_group_table` clips them."""
    sizes = sizes.clamp(0, M).tolist()
    first, block = 0, 0
    out = []
    for n in sizes:
        n = min(n, M - first)
        out.append((first, n, block))
        first += n
        block += cdiv(n, Q)
    return out


def quantize_cols_grouped_reference(x_MK: torch.Tensor, batch_sizes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain torch `quantize_cols_grouped` (unset rows and scale rows zero here)."""
    M, K = x_MK.shape
    q = torch.zeros((M, K), dtype=FP8_DTYPE, device=x_MK.device)
    s = torch.zeros((cdiv(M, Q) + batch_sizes.numel(), K), dtype=torch.float32, device=x_MK.device)
    for first, n, block in _group_blocks(batch_sizes.cpu(), M):
        for j in range(cdiv(n, Q)):
            rows = slice(first + j * Q, first + min(n, (j + 1) * Q))
            scale, inv = _pow2_scales(x_MK[rows].float().abs().amax(dim=0))
            q[rows] = _to_e4m3(x_MK[rows].float() * inv)
            s[block + j] = scale
    return q, s


def quantize_blocks_grouped_reference(x_MK: torch.Tensor,
                                      batch_sizes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: each group's rows in blocks of Q from its first row, and each block's columns
    in blocks of Q, quantized with one power-of-two scale per Q x Q block (its largest magnitude's,
    as `quantize_blocks`) -> (q [M, K] row-major, s [S, ceil(K/Q)]; unset rows and scale rows
    zero). A block with a NaN or an infinity: its scale NaN, its values 0. The same scales as
    `cols_to_blocks_` gives the column tiles (each the largest of its columns'), the values
    rounded once."""
    M, K = x_MK.shape
    q = torch.zeros((M, K), dtype=FP8_DTYPE, device=x_MK.device)
    s = torch.zeros((cdiv(M, Q) + batch_sizes.numel(), cdiv(K, Q)), dtype=torch.float32, device=x_MK.device)
    for first, n, block in _group_blocks(batch_sizes.cpu(), M):
        for j in range(cdiv(n, Q)):
            rows = slice(first + j * Q, first + min(n, (j + 1) * Q))
            q_b, s_b = quantize_blocks_reference(x_MK[rows][None])  # one row of blocks
            bad = s_b[0, 0].isnan().repeat_interleave(Q)[:K]
            q[rows] = q_b[0].view(torch.uint8).masked_fill(bad[None, :], 0).view(FP8_DTYPE)
            s[block + j] = s_b[0, 0]
    return q, s


def dequantize_cols_grouped(q_MK: torch.Tensor, s_SK: torch.Tensor, batch_sizes: torch.Tensor) -> torch.Tensor:
    """fp32 [M, K]: q * s block by block (rows past the groups' total: 0)."""
    check_tensor("q", q_MK, ndim=2)
    check_tensor("batch_sizes", batch_sizes, ndim=1, dtypes=INDEX_DTYPES)
    M, K = q_MK.shape
    _check_scales(s_SK, (cdiv(M, Q) + batch_sizes.numel(), K), f"[ceil(M/{Q}) + E, K]", q_MK)
    check_batch_size_values(batch_sizes, M, "the rows of q", exact=False)
    out = torch.zeros(q_MK.shape, dtype=torch.float32, device=q_MK.device)
    for first, n, block in _group_blocks(batch_sizes.cpu(), M):
        for j in range(cdiv(n, Q)):
            rows = slice(first + j * Q, first + min(n, (j + 1) * Q))
            out[rows] = q_MK[rows].float() * s_SK[block + j].float()
    return out


def gmm_fp8_wgrad_reference(a_q, a_s, b_q, b_s, batch_sizes, out_dtype=torch.float32) -> torch.Tensor:
    """Plain torch `gmm_fp8_wgrad`: dequantize both operands, a[g]^T b[g] per group in fp32."""
    a = dequantize_cols_grouped(a_q, a_s, batch_sizes)
    b = dequantize_cols_grouped(b_q, b_s, batch_sizes)
    out = torch.zeros((batch_sizes.numel(), a.shape[1], b.shape[1]), dtype=torch.float32, device=a.device)
    for e, (first, n, _) in enumerate(_group_blocks(batch_sizes.cpu(), a.shape[0])):
        out[e] = a[first:first + n].t() @ b[first:first + n]
    return out.to(out_dtype)


# `gmm_fp8_wgrad`'s launch on the transposed layout: the Gluon form where it applies (128 x 128
# tiles, two consumer warpgroups, 4 stages), 14-21% faster than the Triton kernel on mixtral's,
# olmoe's and qwen3moe's up-projection gradients (3.19 / 0.99 / 0.93 ms against 3.71 / 1.17 /
# 1.13; H200, benchmarks/RESULTS.md). Over 192-row tiles (three consumers) its promotion spills
# (the column scales' 32 registers beside the product and the accumulator): 1.3-1.5x slower.
# `overlap_epilogue` (each tile stored while the next tile's first product runs, the same bits)
# measured 2.2% and 0.7% faster on mixtral's and qwen3moe's products (2.718 -> 2.657 ms, 0.730 ->
# 0.725), against the 5-15% predicted, and 4% on mixtral's on an H100 (2.862 -> 2.746); with b in
# 128 x 128 blocks (a cheaper promotion, so the epilogue's share grows) the training steps with
# the weights cached ran 20.31 -> 20.16 ms (mixtral) and 8.32 -> 8.15 (olmoe) on the H200: on by
# default since (benchmarks/RESULTS.md).
_WGRAD_LAUNCH = dict(wgmma=True, num_stages=4, tma_store=True, overlap_epilogue=True)


def gmm_fp8_wgrad(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor,
                  batch_sizes: torch.Tensor, out_dtype: torch.dtype = torch.float32,
                  rows: Optional[int] = None, config: Optional[dict] = None,
                  accumulate_into: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The FP8 weight gradient: `out[e] = a[g_e]^T b[g_e]` [E, N, K] over each group's rows, the
    operands from `quantize_cols_grouped` (a [M, N], b [M, K], their scales [ceil(M/Q) + E, ·]);
    each Q-row block's FP8 product is promoted to fp32 and scaled before it is added. With
    `rows` = M the operands are in `quantize_cols_grouped`'s transposed layout (a [N, P], b [K, P],
    P = (ceil(M/Q) + E) * Q), each step one FP8 product of two K-major tiles, read by TMA on Hopper:
    there, by default, by the warp-specialized Gluon form (`fp8_wgmma.gmm_fp8_wgrad_ws`), else by
    the Triton kernel. `config` ({'wgmma', 'num_stages', 'tma_store', 'overlap_epilogue'};
    transposed layout only) overrides that launch, for tuning and tests: `wgmma=False` takes the
    Triton kernel, `num_stages` tunes the Gluon form, `tma_store=False` has it write with masked
    stores, `overlap_epilogue=True` has it store each tile while the next tile's first product
    runs (the same bits). `accumulate_into`: a contiguous float32 [E, N, K] tensor on the operands'
    device into which the gradient is added by the kernel's epilogue (gradient-accumulation fusion:
    `main_grad`), and which is returned (`out_dtype` unused); the same values as adding the fp32
    gradient to it afterwards. `b_s` may also hold one scale per block of Q rows and Q columns of b
    ([ceil(M/Q) + E, ceil(K/Q)], from the quantizers' `blocks=True` or `cols_to_blocks_`): the
    Gluon form then promotes each step with one scale a row (the block's times the row's of a), as
    the forward does, instead of the outer product of two scale vectors; the other forms read the
    block's scale for each of its columns."""
    check_tensor("a_q", a_q, ndim=2, dtypes=(FP8_DTYPE,))
    check_tensor("b_q", b_q, ndim=2, dtypes=(FP8_DTYPE,))
    check_tensor("a_s", a_s, ndim=2, dtypes=(torch.float32,))
    check_tensor("b_s", b_s, ndim=2, dtypes=(torch.float32,))
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"out_dtype: expected one of {_OUT_DTYPES}, got {out_dtype}")
    check_tensor("batch_sizes", batch_sizes, ndim=1, dtypes=INDEX_DTYPES)
    E = batch_sizes.numel()
    if rows is None:
        if config is not None:
            raise ValueError(f"config: tunes the transposed layout's launch (rows=M), got {config!r} without rows")
        M, N = a_q.shape
        K = b_q.shape[1]
        if b_q.shape[0] != M:
            raise ValueError(f"b_q: expected {M} rows (a_q's), got {tuple(b_q.shape)}")
    else:
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
            raise TypeError(f"rows: expected a non-negative int, got {rows!r}")
        M, (N, K) = rows, (a_q.shape[0], b_q.shape[0])
        if config is not None and (not isinstance(config, dict) or set(config) - set(_WGRAD_LAUNCH)):
            raise ValueError(f"config: expected a dict with keys among {tuple(_WGRAD_LAUNCH)}, got {config!r}")
        cfg = dict(_WGRAD_LAUNCH, **(config or {}))
        P = (cdiv(M, Q) + E) * Q
        for name, t in (("a_q", a_q), ("b_q", b_q)):
            if t.shape[1] != P:
                raise ValueError(f"{name}: expected [·, (ceil(rows/{Q}) + E) * {Q}] = [·, {P}] (the transposed "
                                 f"layout), got {tuple(t.shape)}")
    sizes = _check_sizes(batch_sizes, a_q.device, M, "the rows of a_q" if rows is None else "rows")
    if accumulate_into is not None:
        _check_accumulator(accumulate_into, (E, N, K), a_q.device, (torch.float32,), "[E, N, K] = ")
    S = cdiv(M, Q) + E
    if tuple(a_s.shape) != (S, N):
        raise ValueError(f"a_s: expected [ceil(M/{Q}) + E, {N}] = {(S, N)} scales, got {tuple(a_s.shape)}")
    if tuple(b_s.shape) not in ((S, K), (S, cdiv(K, Q))):
        raise ValueError(f"b_s: expected [ceil(M/{Q}) + E, {K}] = {(S, K)} column scales or [ceil(M/{Q}) + E, "
                         f"ceil({K}/{Q})] = {(S, cdiv(K, Q))} block scales (`cols_to_blocks_`), got {tuple(b_s.shape)}")
    b_blocks = b_s.shape[1] != K  # (K = 1: the two forms are one)
    for name, t in (("a_q", a_q), ("b_q", b_q), ("a_s", a_s), ("b_s", b_s)):
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name}: expected a contiguous last dim, got strides {tuple(t.stride())}")
    gluon = (rows is not None and a_q.device.type == "cuda" and not interpreted(a_q) and cfg["wgmma"]
             and fp8_wgmma.wgrad_usable(a_q, b_q))
    if b_blocks and not gluon:  # the other forms read a scale per column: each block's repeated
        b_s = b_s.repeat_interleave(Q, dim=1)[:, :K]
    if a_q.device.type != "cuda" and not interpreted(a_q):
        if rows is not None:
            a_q, b_q = _blocks_row_major(a_q, sizes, M), _blocks_row_major(b_q, sizes, M)
        if accumulate_into is not None:
            return accumulate_into.add_(gmm_fp8_wgrad_reference(a_q, a_s, b_q, b_s, sizes.cpu(), torch.float32))
        return gmm_fp8_wgrad_reference(a_q, a_s, b_q, b_s, sizes.cpu(), out_dtype)
    accumulate = accumulate_into is not None
    out = accumulate_into if accumulate else torch.empty((E, N, K), dtype=out_dtype, device=a_q.device)
    if out.numel() == 0:
        return out
    block = 32 if interpreted(a_q) else 128
    if gluon:
        num_tiles = E * cdiv(N, fp8_wgmma.BLOCK) * cdiv(K, fp8_wgmma.BLOCK)
        return fp8_wgmma.gmm_fp8_wgrad_ws(a_q, a_s, b_q, b_s, sizes, out, M, persistent_programs(a_q.device, num_tiles),
                                          stages=cfg["num_stages"], tma_store=bool(cfg["tma_store"]),
                                          overlap=bool(cfg["overlap_epilogue"]), accumulate=accumulate,
                                          b_blocks=b_blocks)
    if rows is not None:
        use_tma = not interpreted(a_q) and tma_ok(a_q) and tma_ok(b_q)
        if use_tma:
            prepare_tma(a_q.device)
        _gmm_fp8_wgrad_kmajor_kernel[(cdiv(N, block) * cdiv(K, block), E)](
            a_q, a_s, b_q, b_s, out, sizes, M, N, K, E, a_q.shape[1],
            a_q.stride(0), a_s.stride(0), b_q.stride(0), b_s.stride(0), out.stride(0), out.stride(1),
            BLOCK_N=block, BLOCK_K=block, QB=Q, BLOCK_E=max(2, next_power_of_2(E)), USE_TMA=use_tma,
            ACCUMULATE=accumulate, num_warps=8 if block == 128 else 4, num_stages=4 if block == 128 else 1,
            enable_fp_fusion=True,
        )
        return out
    _gmm_fp8_wgrad_kernel[(E, cdiv(N, block) * cdiv(K, block))](
        a_q, a_s, b_q, b_s, out, sizes, M, N, K, E,
        a_q.stride(0), a_s.stride(0), b_q.stride(0), b_s.stride(0), out.stride(0), out.stride(1),
        BLOCK_N=block, BLOCK_K=block, QB=Q, BLOCK_E=max(2, next_power_of_2(E)), ACCUMULATE=accumulate,
        num_warps=8 if block == 128 else 4, num_stages=3,
        enable_fp_fusion=True,
    )
    return out


__all__ = [
    "E4M3_MAX", "FP8_DTYPE", "Q", "act_backward_quantize_rows_", "act_quantize_rows", "check_gmm_fp8_args",
    "cols_to_blocks_", "cols_to_blocks_reference", "dequantize_blocks", "dequantize_cols_grouped",
    "dequantize_rows", "gather_quantize_cols", "gather_quantize_rows", "glu_backward_quantize_rows_",
    "glu_backward_quantize_rows_cols", "glu_quantize_cols", "glu_quantize_rows", "gmm_fp8",
    "gmm_fp8_reference", "gmm_fp8_wgrad", "gmm_fp8_wgrad_reference", "quantize_blocks",
    "quantize_cols_grouped", "quantize_cols_grouped_reference", "quantize_rows", "quantize_rows_and_cols",
    "quantize_rows_reference",
]
