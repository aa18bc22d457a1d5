"""Grouped GEMM over variable-size groups of rows: Triton kernels, their launchers, and the other
backends behind one entry point (no autograd here; see `megablocks.ops.gmm`).

Legend: M rows (routed tokens in expert order), K inner size, N output size, E groups (experts).
The rows of `a` are split into E consecutive groups of `batch_sizes[e]` rows each.

    gmm(a_MK, b_EKN, batch_sizes_E)                -> out_MN   out[rows of e] = a[rows of e] @ b[e]
    gmm(a_MK, b_ENK, batch_sizes_E, trans_b=True)  -> out_MN   out[rows of e] = a[rows of e] @ b[e]^T
    gmm(a_MK, b_MN, batch_sizes_E, trans_a=True)   -> out_EKN  out[e] = a[rows of e]^T @ b[rows of e]

The last ("variable-K") form is the weight gradient of the first two.

Row maps (the 'triton' backend, `triton_gmm(..., a_rows=, b_rows=)`): logical row i of `a` (or,
in the variable-K form, of `b`) is physical row `rows[i] // rows_top_k` of a `[T, K]` (`[T, N]`)
tensor, so that rows gathered into expert order are read in place instead of being copied first
(a map of routed assignments, `rows_top_k` = top_k: the row of their token). M is then
the length of the map. Such an operand is read by masked pointer loads (TMA cannot gather rows);
the other keeps its TMA path. A map on `b` runs as one on `a` of the transposed product, whose
tiles are stored transposed. Map entries are clamped to at most T - 1, and a negative entry
(or any entry when T = 0) reads as a row of zeros: no access outside the tensor is possible.

Backends:
- 'triton': the kernels below. They read `batch_sizes` on the device: each program computes
  the prefix sums of the groups' rows and row tiles, finds the group of every tile it takes,
  and loops only up to the device-side tile count. The grid is static: one program per SM
  (persistent), or one per tile of the bound sum_e ceil(m_e / BLOCK_M) <= ceil(M / BLOCK_M) + E.
  No host synchronisation; groups of zero rows are allowed.
- 'torch': `torch.nn.functional.grouped_mm` (CPU and CUDA; int32 offsets on the device).
- 'gg': the `grouped_gemm` package (`pip install megablocks[gg]`). It takes the batch sizes on
  the host, so a device-side `batch_sizes` is copied to the CPU: a host-device sync, by design.

Contract: sum(batch_sizes) == M. The Triton kernels stay in bounds for any values: negative sizes
count as 0, groups are clipped at row M, and rows past the groups' total are written as zeros
(forward form) or not read (variable-K form).
"""

from dataclasses import dataclass
from typing import Optional, Union

import torch
import triton
import triton.language as tl

from megablocks._checks import INDEX_DTYPES, check_int32_range, check_tensor
from megablocks.backend import cdiv, next_power_of_2
from megablocks.backend.activation import ACTIVATIONS as _GLU_ACTIVATIONS
from megablocks.backend.activation import _act, _up
from megablocks.backend.launch import (
    dot_precision,
    interpreted,
    pdl_launch,
    pdl_start,
    persistent_programs,
    prepare_tma,
    tma_ok,
    with_overrides,
)

BACKENDS = ("triton", "torch", "gg")

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _group_table(sizes_ptr, E, M, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Per group, as BLOCK_E-vectors: its first and end row (clipped to [0, M]), and its first row
    tile and number of row tiles of BLOCK_M rows. Entries past E are empty groups."""
    e = tl.arange(0, BLOCK_E)
    sizes = tl.load(sizes_ptr + e, mask=e < E, other=0).to(tl.int64)
    sizes = tl.minimum(tl.maximum(sizes, 0), M)
    cum = tl.cumsum(sizes, 0)
    starts = tl.minimum(cum - sizes, M).to(tl.int32)
    ends = tl.minimum(cum, M).to(tl.int32)
    tiles = tl.cdiv(ends - starts, BLOCK_M)
    tile_starts = tl.cumsum(tiles, 0) - tiles
    return e, starts, ends, tile_starts, tiles


@triton.jit
def _row_tile(tile_m, e, starts, ends, tile_starts, tiles, real_m_tiles, rows_total, M, BLOCK_M: tl.constexpr):
    """Row tile `tile_m` of the `_group_table` vectors: (its group, first row, end row, whether it
    is a group's tile). Tiles past the groups' `real_m_tiles` cover the leftover rows after
    `rows_total` (group 0, `real` False)."""
    mine = (tile_starts <= tile_m) & (tile_m < tile_starts + tiles)
    # Per group, were the tile its own: group << 40 | first row << 9 | rows in the tile
    # (<= 256); one reduction over the tile's group finds all three.
    first = starts + (tile_m - tile_starts) * BLOCK_M
    packed = (
        (e.to(tl.int64) << 40) | (first.to(tl.int64) << 9)
        | tl.minimum(ends - first, BLOCK_M).to(tl.int64)
    )
    info = tl.sum(tl.where(mine, packed, 0), 0)
    real = tile_m < real_m_tiles
    rest_row0 = rows_total + (tile_m - real_m_tiles) * BLOCK_M
    group = (info >> 40).to(tl.int32)
    row0 = tl.where(real, ((info >> 9) & 0x7FFFFFFF).to(tl.int32), rest_row0)
    row_end = row0 + tl.where(real, (info & 0x1FF).to(tl.int32), tl.minimum(M - rest_row0, BLOCK_M))
    return group, row0, row_end, real


@triton.jit
def _mapped_rows(rows_ptr, offs, valid, T, rows_top_k):
    """The physical rows of logical rows `offs` (where `valid`) through the map `rows_ptr`
    (entry // rows_top_k), clamped to at most T - 1, and whether each is a real row (entry >= 0,
    T > 0)."""
    src = tl.load(rows_ptr + offs, mask=valid, other=-1)
    src = tl.where(src >= 0, src // rows_top_k, -1)
    src = tl.minimum(src, T - 1)
    return tl.maximum(src, 0), valid & (src >= 0)


@triton.jit
def _swizzle(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """Tile index -> (row tile, column tile), GROUP_M row tiles at a time for L2 reuse."""
    width = GROUP_M * num_n
    first_m = (tile // width) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % width) % rows, (tile % width) // rows


# One [BLOCK_K, BLOCK_N] tile of b[group] at (k, column n0): by its descriptor, or through the
# pointers `b_ptrs` (tile columns `offs_n`, masked to the first N columns and K rows).
@triton.jit
def _b_tile(b_desc, b_ptrs, group, n0, k, offs_k, offs_n, K, N,
            USE_TMA: tl.constexpr, B_K_MAJOR: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    if USE_TMA:
        if B_K_MAJOR:
            b = tl.trans(b_desc.load([group, n0, k]).reshape(BLOCK_N, BLOCK_K))
        else:
            b = b_desc.load([group, k, n0]).reshape(BLOCK_K, BLOCK_N)
    else:
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < K - k) & (offs_n[None, :] < N), other=0.0)
    return b


# out_MN[rows of e] = a_MK[rows of e] @ b[e], b given as its logical [E, K, N] strides.
# Row tiles are counted over all groups (a group's last tile may be partial); tiles past the
# groups' total cover the leftover rows, which are written as zeros. Programs loop over tiles
# with a stride of `num_programs` (one tile each when the grid covers the bound). With
# TMA_STORE, full tiles are stored by TMA (asynchronous: the next tile's loads start at once);
# a group's partial last tile by a masked store. With GATHER_A, row i of `a` is row a_rows[i] of
# a [T, K] tensor, read by masked pointer loads (b keeps its TMA path). With GLU (an activation
# name), b holds the gate's N columns and bu (same strides) the up projection's: each tile
# accumulates both and stores GLU(gate)·up (fp32 math, rounded once), an [M, N] result. With
# HAS_BIAS, row e of bias [E, N] (and of bias_up, the same strides, with GLU) is added to the
# accumulator of group e's rows first (the experts' biases; fp32 math).
@triton.jit
def _gmm_kernel(
    a_ptr, b_ptr, bu_ptr, out_ptr, sizes_ptr, a_rows_ptr, bias_ptr, bias_up_ptr,
    M, N, K, E, T, rows_top_k, num_programs,
    stride_am, stride_be, stride_bk, stride_bn, stride_om, stride_bias_e,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr, GROUP_M: tl.constexpr,
    USE_TMA: tl.constexpr, B_K_MAJOR: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, TMA_STORE: tl.constexpr, ACCUMULATE: tl.constexpr,
    GATHER_A: tl.constexpr, GLU: tl.constexpr, HAS_BIAS: tl.constexpr, PDL: tl.constexpr = False,
):
    pdl_start(PDL)
    e, starts, ends, tile_starts, tiles = _group_table(sizes_ptr, E, M, BLOCK_M, BLOCK_E)
    rows_total = tl.max(ends, 0)
    real_m_tiles = tl.sum(tiles, 0)
    num_m_tiles = real_m_tiles + tl.cdiv(M - rows_total, BLOCK_M)
    num_n_tiles = tl.cdiv(N, BLOCK_N)

    if USE_TMA:
        if not GATHER_A:
            a_desc = tl.make_tensor_descriptor(a_ptr, [M, K], [stride_am, 1], [BLOCK_M, BLOCK_K])
        if B_K_MAJOR:
            b_desc = tl.make_tensor_descriptor(b_ptr, [E, N, K], [stride_be, stride_bn, 1], [1, BLOCK_N, BLOCK_K])
            if GLU != "none":
                bu_desc = tl.make_tensor_descriptor(
                    bu_ptr, [E, N, K], [stride_be, stride_bn, 1], [1, BLOCK_N, BLOCK_K]
                )
        else:
            b_desc = tl.make_tensor_descriptor(b_ptr, [E, K, N], [stride_be, stride_bk, 1], [1, BLOCK_K, BLOCK_N])
            if GLU != "none":
                bu_desc = tl.make_tensor_descriptor(
                    bu_ptr, [E, K, N], [stride_be, stride_bk, 1], [1, BLOCK_K, BLOCK_N]
                )

    if TMA_STORE:
        out_desc = tl.make_tensor_descriptor(out_ptr, [M, N], [stride_om, 1], [BLOCK_M, BLOCK_N])

    for tile in range(tl.program_id(0), num_m_tiles * num_n_tiles, num_programs):
        tile_m, tile_n = _swizzle(tile, num_m_tiles, num_n_tiles, GROUP_M)
        group, row0, row_end, real = _row_tile(tile_m, e, starts, ends, tile_starts, tiles, real_m_tiles,
                                               rows_total, M, BLOCK_M)

        offs_m = row0 + tl.arange(0, BLOCK_M)
        offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        if GATHER_A:
            src_m, a_row_ok = _mapped_rows(a_rows_ptr, offs_m, offs_m < row_end, T, rows_top_k)
            a_ptrs = a_ptr + src_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
        elif not USE_TMA:
            a_row_ok = offs_m < row_end
            a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
        if USE_TMA:
            b_ptrs = b_ptr  # unused
            bu_ptrs = bu_ptr
        else:
            b_desc = b_ptr  # unused
            bu_desc = bu_ptr
            b_offs = (
                group.to(tl.int64) * stride_be
                + offs_k[:, None].to(tl.int64) * stride_bk
                + offs_n[None, :].to(tl.int64) * stride_bn
            )
            b_ptrs = b_ptr + b_offs
            bu_ptrs = bu_ptr + b_offs
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if GLU != "none":
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            if USE_TMA and not GATHER_A:
                a = a_desc.load([row0, k])
            else:
                a = tl.load(a_ptrs, mask=a_row_ok[:, None] & (offs_k[None, :] < K - k), other=0.0)
                a_ptrs += BLOCK_K
            b = _b_tile(b_desc, b_ptrs, group, tile_n * BLOCK_N, k, offs_k, offs_n, K, N,
                        USE_TMA, B_K_MAJOR, BLOCK_N, BLOCK_K)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            if GLU != "none":  # the same tile of the up projection
                b_up = _b_tile(bu_desc, bu_ptrs, group, tile_n * BLOCK_N, k, offs_k, offs_n, K, N,
                               USE_TMA, B_K_MAJOR, BLOCK_N, BLOCK_K)
                if UPCAST:
                    b_up = b_up.to(tl.float32)
                acc_up = tl.dot(a, b_up, acc_up, input_precision=PRECISION)
            if not USE_TMA:
                b_ptrs += BLOCK_K * stride_bk
                bu_ptrs += BLOCK_K * stride_bk
        if HAS_BIAS:
            bias_offs = group.to(tl.int64) * stride_bias_e + offs_n
            acc += tl.load(bias_ptr + bias_offs, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
            if GLU != "none":
                acc_up += tl.load(bias_up_ptr + bias_offs, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        if GLU != "none":
            gate, _ = _act(acc, GLU)
            up, _ = _up(acc_up, GLU)
            acc = gate * up
        # Leftover rows (past the groups' total) are zeros, whatever `a` holds there.
        acc = tl.where(real, acc, 0.0)
        if ACCUMULATE:
            # out += a @ b: the tile's current values are read first (leftover rows keep theirs).
            prev_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
            prev = tl.load(prev_ptrs, mask=(offs_m[:, None] < row_end) & (offs_n[None, :] < N), other=0.0)
            acc += prev.to(tl.float32)

        out = acc.to(out_ptr.dtype.element_ty)
        if TMA_STORE and row_end - row0 == BLOCK_M:
            out_desc.store([row0, tile_n * BLOCK_N], out)
        else:
            out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
            tl.store(out_ptrs, out, mask=(offs_m[:, None] < row_end) & (offs_n[None, :] < N))


# out_EKN[e] = a_MK[rows of e]^T @ b_MN[rows of e]. Tiles (group, K tile, N tile), group-major;
# programs loop over them with a stride of `num_programs`; each tile loops over its group's rows
# (none: it writes zeros). With TMA, each tile's descriptors end at its group's last row, so a
# neighbouring group's rows are never read; without, loads are masked. With GATHER_A, row i of
# `a` is row a_rows[i] of a [T, K] tensor, read by masked pointer loads through the map, whose
# next BLOCK_R entries are read a step ahead, so that no load waits on the result of another in
# the same step (benchmarks/RESULTS.md, "Measurements behind the kernels' defaults"). With
# TRANS_OUT the result is stored transposed, into an [E, N, K] tensor.
@triton.jit
def _gmm_var_k_kernel(
    a_ptr, b_ptr, out_ptr, sizes_ptr, a_rows_ptr,
    M, K, N, E, T, rows_top_k, num_programs,
    stride_am, stride_bm, stride_oe, stride_o1,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr, GROUP_M: tl.constexpr,
    USE_TMA: tl.constexpr, TMA_STORE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    GATHER_A: tl.constexpr, TRANS_OUT: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    num_k_tiles = tl.cdiv(K, BLOCK_K)
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    tiles_per_group = num_k_tiles * num_n_tiles
    e, starts, ends, _, _ = _group_table(sizes_ptr, E, M, BLOCK_R, BLOCK_E)
    # Per group: first row << 32 | rows, so that one reduction finds both.
    packed = (starts.to(tl.int64) << 32) | (ends - starts).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    if TMA_STORE:
        if TRANS_OUT:
            out_desc = tl.make_tensor_descriptor(
                out_ptr, [E, N, K], [stride_oe, stride_o1, 1], [1, BLOCK_N, BLOCK_K]
            )
        else:
            out_desc = tl.make_tensor_descriptor(
                out_ptr, [E, K, N], [stride_oe, stride_o1, 1], [1, BLOCK_K, BLOCK_N]
            )

    for tile in range(tl.program_id(0), E * tiles_per_group, num_programs):
        group = tile // tiles_per_group
        tile_k, tile_n = _swizzle(tile % tiles_per_group, num_k_tiles, num_n_tiles, GROUP_M)
        info = tl.sum(tl.where(e == group, packed, 0), 0)
        row0 = (info >> 32).to(tl.int32)
        rows = (info & 0xFFFFFFFF).to(tl.int32)
        offs_k = tile_k * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if USE_TMA:
            if not GATHER_A:
                a_desc = tl.make_tensor_descriptor(
                    a_ptr + row0.to(tl.int64) * stride_am, [tl.maximum(rows, 1), K], [stride_am, 1],
                    [BLOCK_R, BLOCK_K],
                )
            b_desc = tl.make_tensor_descriptor(
                b_ptr + row0.to(tl.int64) * stride_bm, [tl.maximum(rows, 1), N], [stride_bm, 1],
                [BLOCK_R, BLOCK_N],
            )
        else:
            if not GATHER_A:
                a_ptrs = a_ptr + (row0 + offs_r)[:, None].to(tl.int64) * stride_am + offs_k[None, :]
            b_ptrs = b_ptr + (row0 + offs_r)[:, None].to(tl.int64) * stride_bm + offs_n[None, :]
        if GATHER_A:
            next_src, next_ok = _mapped_rows(a_rows_ptr, row0 + offs_r, offs_r < rows, T, rows_top_k)

        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for r in range(0, rows, BLOCK_R):
            r_mask = offs_r < rows - r
            if GATHER_A:
                src, src_ok = next_src, next_ok
                next_src, next_ok = _mapped_rows(
                    a_rows_ptr, row0 + r + BLOCK_R + offs_r, offs_r < rows - r - BLOCK_R, T, rows_top_k
                )
                a = tl.load(
                    a_ptr + src.to(tl.int64)[:, None] * stride_am + offs_k[None, :],
                    mask=src_ok[:, None] & (offs_k[None, :] < K), other=0.0,
                )
            elif USE_TMA:
                a = a_desc.load([r, tile_k * BLOCK_K])
            else:
                a = tl.load(a_ptrs, mask=r_mask[:, None] & (offs_k[None, :] < K), other=0.0)
                a_ptrs += BLOCK_R * stride_am
            if USE_TMA:
                b = b_desc.load([r, tile_n * BLOCK_N])
            else:
                b = tl.load(b_ptrs, mask=r_mask[:, None] & (offs_n[None, :] < N), other=0.0)
                b_ptrs += BLOCK_R * stride_bm
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)

        if TRANS_OUT:
            out_ptrs = (
                out_ptr + group.to(tl.int64) * stride_oe
                + offs_n[None, :].to(tl.int64) * stride_o1 + offs_k[:, None]
            )
        else:
            out_ptrs = (
                out_ptr + group.to(tl.int64) * stride_oe
                + offs_k[:, None].to(tl.int64) * stride_o1 + offs_n[None, :]
            )
        out_mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
        if ACCUMULATE:
            # out += the product (a weight gradient added to its fp32 accumulator): the tile's
            # current values are read first; a group without rows leaves them as they are.
            acc += tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32)
        out = acc.to(out_ptr.dtype.element_ty)
        if TMA_STORE:
            if TRANS_OUT:
                out_desc.store([group, tile_n * BLOCK_N, tile_k * BLOCK_K], tl.trans(out).reshape(1, BLOCK_N, BLOCK_K))
            else:
                out_desc.store([group, tile_k * BLOCK_K, tile_n * BLOCK_N], out.reshape(1, BLOCK_K, BLOCK_N))
        else:
            tl.store(out_ptrs, out, mask=out_mask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GmmConfig:
    """The settings of one grouped-GEMM launch (`default_config` picks them; `triton_gmm`'s
    `config=` overrides them, see `megablocks.backend.launch`).

    `block_m` x `block_n` is the output tile (for the variable-K form: a tile of K x N),
    `block_k` the reduction step (over K, or over a group's rows), `group_m` the row tiles per
    swizzle group (L2 reuse). `persistent` launches one program per SM that loops over tiles;
    `tma_store` stores tiles by TMA where the output's strides allow (and the inputs are read by
    TMA); `tma_loads` False reads the inputs by masked pointer loads whatever their strides.
    """

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    persistent: bool
    tma_store: bool
    tma_loads: bool = True


def default_config(a: torch.Tensor, rows_per_group: Optional[float] = None, glu: bool = False,
                   weight_grad: bool = False) -> GmmConfig:
    """The launch settings for operand `a` (its device and dtype). `rows_per_group` (M / E) picks
    the decode tiles of the forward forms and, with `weight_grad` (the variable-K form), the
    small-K tiles; `glu` (two accumulators per tile) narrows them."""
    if a.device.type == "cpu":  # the interpreter: small tiles keep the tests fast
        return GmmConfig(32, 32, 32, group_m=4, num_warps=4, num_stages=1, persistent=False, tma_store=False)
    if a.dtype == torch.float32:
        return GmmConfig(128, 128, 32, group_m=8, num_warps=8, num_stages=3, persistent=False, tma_store=False)
    if weight_grad:
        if rows_per_group is not None and rows_per_group <= WEIGHT_GRAD_SMALL_MAX_ROWS_PER_GROUP:
            # A handful of rows per group (T = 64): the product writes E·K·N outputs from a few
            # rows, one step per tile, and building a tile's two TMA descriptors on the device
            # cost more than its loads. 16-row steps by masked pointer loads, pointer stores:
            # 0.479 -> 0.348 ms on mixtral's, 0.220 -> 0.161 ms on qwen3moe's (H200,
            # benchmarks/sweep_var_k.py; a fill of the output takes 0.280 / 0.123).
            return GmmConfig(128, 256, 16, group_m=8, num_warps=8, num_stages=2, persistent=True,
                             tma_store=False, tma_loads=False)
        rows_per_group = None  # the main tiles below
    if rows_per_group is not None and rows_per_group <= DECODE_MAX_ROWS_PER_GROUP:
        # Decode: a few rows per expert; the time is reading each expert's weights once. 16-row
        # tiles, 128-deep K steps, 4 stages, 4 warps: 4-10% faster than the tiles below at T = 64
        # (benchmarks/RESULTS.md, "Decode inference"). With the GLU epilogue (two accumulators)
        # the tile is half as wide: the same bytes a step.
        return GmmConfig(16, 64 if glu else 128, 128, group_m=8, num_warps=4, num_stages=4, persistent=True,
                         tma_store=False)
    # 16-bit inputs on Hopper: 128x256 tiles, 64-deep K steps, 8 warps (two warpgroups),
    # persistent programs and TMA stores: the fastest of the tiles benchmarks/bench_gmm.py
    # sweeps (benchmarks/RESULTS.md, "Grouped GEMM"). With the GLU epilogue, 128x128: two
    # 128x256 accumulators and their b stages would not fit.
    return GmmConfig(128, 128 if glu else 256, 64, group_m=8, num_warps=8, num_stages=3, persistent=True,
                     tma_store=True)


# Forward forms with at most this many rows per group (M / E) take the decode tiles of
# `default_config` (measured up to 16: mixtral and qwen3moe at T = 64).
DECODE_MAX_ROWS_PER_GROUP = 16
# Weight gradients (the variable-K form) with at most this many rows per group take its small-K
# tiles (measured at 4 and 16: qwen3moe and mixtral at T = 64).
WEIGHT_GRAD_SMALL_MAX_ROWS_PER_GROUP = 16


def _num_programs(a: torch.Tensor, num_tiles: int, cfg: GmmConfig) -> int:
    """A program per tile, or with `persistent` one per SM."""
    return persistent_programs(a.device, num_tiles) if cfg.persistent else num_tiles


def triton_gmm(
    a: torch.Tensor,
    b: torch.Tensor,
    batch_sizes: torch.Tensor,
    trans_a: bool = False,
    trans_b: bool = False,
    *,
    use_tma: Optional[bool] = None,
    config: Optional[Union[GmmConfig, dict]] = None,
    accumulate_into: Optional[torch.Tensor] = None,
    a_rows: Optional[torch.Tensor] = None,
    b_rows: Optional[torch.Tensor] = None,
    rows_top_k: int = 1,
    glu: Optional[str] = None,
    b_up: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    bias_up: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The Triton kernels. Inputs are validated by `gmm`; see the module docstring for the forms.

    `use_tma` (default: where the strides allow) picks TMA tensor descriptors over masked
    pointer loads; `config` (a `GmmConfig`, or a dict of its fields) overrides
    `default_config`. Both are for tuning and tests.
    `accumulate_into` makes the kernel add its product to that tensor's values in its epilogue
    (in fp32) and return it: for the forward forms a contiguous `[M, N]` tensor of a's dtype; for
    the variable-K form a contiguous `[E, K, N]` tensor (`[E, N, K]` with `b_rows`) of a's dtype
    or float32, e.g. an fp32 weight-gradient accumulator.
    `a_rows` (`[M]` int32 on a's device): logical row i of `a` is physical row `a_rows[i]` of the
    given `a` (`[T, K]`, any T); the result has M rows (forward forms) or sums over M rows
    (variable-K form). `b_rows`, the variable-K form only and not with `a_rows`: the same for `b`
    (`[T, N]`), whose M logical rows are then those of `a`. Entries are clamped to at most T - 1;
    negative ones (and any with T = 0) read as rows of zeros. With `rows_top_k` > 1 the map's
    entries are routed assignments (token · top_k + choice, `RowMaps.row_assignment`) and the
    physical row is `entry // rows_top_k`. Sizes are validated by the caller.
    `glu` (forward forms only, an activation of `megablocks.backend.activation.ACTIVATIONS`): `b`
    holds 2N columns, the gate's then the up projection's, and the result is the `[M, N]`
    `act(a @ b[:, :N]) * (a @ b[:, N:])` of each group, in fp32 from the accumulators. With
    `b_up` (a tensor of b's shape, dtype and device, read with the same `trans_b`) `b` holds the
    gate's N columns and `b_up` the up projection's: `act(a @ b) * (a @ b_up)` (with
    'clamped_swiglu' the up branch is clamped and shifted as `megablocks.backend.activation` says).
    `bias` (forward forms only, without `accumulate_into`: `[E, N]`, any float dtype, on a's
    device; `[E, 2N]`, the gate's then the up projection's, with `glu` and no `b_up`): row e is
    added to the product of group e's rows in the fp32 accumulator, before the GLU; `bias_up`
    (with `b_up` and `bias`: `[E, N]`) is the up projection's.
    """
    if glu is not None and (glu not in _GLU_ACTIVATIONS or trans_a or accumulate_into is not None):
        raise ValueError(f"glu: expected one of {_GLU_ACTIVATIONS} on a forward form without "
                         f"accumulate_into, got {glu!r}")
    if b_up is not None and (glu is None or b_up.shape != b.shape or b_up.dtype != b.dtype
                             or b_up.device != b.device):
        raise ValueError(f"b_up: expected glu and a tensor of b's shape {tuple(b.shape)}, {b.dtype} on "
                         f"{b.device}, got {tuple(b_up.shape)}, {b_up.dtype} on {b_up.device} (glu={glu!r})")
    if bias is not None and (trans_a or accumulate_into is not None or bias.dim() != 2
                             or not bias.is_floating_point() or bias.device != b.device):
        raise ValueError(f"bias: expected a 2-D float tensor on {b.device} on a forward form without "
                         f"accumulate_into, got {tuple(bias.shape)}, {bias.dtype} on {bias.device}")
    if (bias_up is not None) != (b_up is not None and bias is not None) or (
            bias_up is not None and (bias_up.shape != bias.shape or bias_up.device != bias.device)):
        raise ValueError("bias_up: expected a tensor of bias's shape exactly where b_up and bias are given, got "
                         f"{None if bias_up is None else tuple(bias_up.shape)} (b_up given: {b_up is not None}, "
                         f"bias given: {bias is not None})")
    if a_rows is not None and b_rows is not None:
        raise ValueError("a_rows, b_rows: at most one row map per product")
    if b_rows is not None and not trans_a:
        raise ValueError("b_rows: a row map of b is for the variable-K form (trans_a=True) only")
    for name, rows in (("a_rows", a_rows), ("b_rows", b_rows)):
        if rows is not None and (rows.dtype != torch.int32 or rows.dim() != 1 or rows.device != a.device):
            raise ValueError(
                f"{name}: expected a 1-D int32 tensor on {a.device}, got {rows.dtype} "
                f"{tuple(rows.shape)} on {rows.device}"
            )
    if not isinstance(rows_top_k, int) or rows_top_k < 1:
        raise ValueError(f"rows_top_k: expected an int >= 1, got {rows_top_k!r}")
    trans_out = b_rows is not None
    if trans_out:
        # a^T @ b[map] = (b[map]^T @ a)^T: the kernel reads the mapped operand as its `a` and
        # stores the tile transposed: faster than a map on its `b`, whose tile is the wider one
        # (benchmarks/RESULTS.md, "Measurements behind the kernels' defaults").
        a, b, a_rows, b_rows = b, a, b_rows, None
    if a_rows is not None:
        a_rows = a_rows.contiguous()
    batch_sizes = batch_sizes.to(a.device, non_blocking=True)
    E = batch_sizes.shape[0]
    K = a.shape[1]
    M = a_rows.shape[0] if a_rows is not None else a.shape[0]
    T = a.shape[0]
    cfg = with_overrides(default_config(a, M / max(E, 1), glu is not None, weight_grad=trans_a), config)
    launch = dict(
        BLOCK_E=max(next_power_of_2(E), 128),  # one compiled variant up to 128 groups
        UPCAST=interpreted(a) and a.dtype == torch.bfloat16,
        PRECISION=dot_precision(a.dtype),
        GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if a.stride(1) != 1:
        a = a.contiguous()
    prepare_tma(a.device)

    if trans_a:
        N = b.shape[1]
        if b.stride(1) != 1:
            b = b.contiguous()
        shape = (E, N, K) if trans_out else (E, K, N)
        if accumulate_into is None:
            out = torch.empty(shape, dtype=a.dtype, device=a.device)
        else:
            _check_accumulator(accumulate_into, shape, a.device, (a.dtype, torch.float32))
            out = accumulate_into
        if a_rows is not None and T == 0:  # every mapped row reads as zeros
            return out if accumulate_into is not None else out.zero_()
        if use_tma is None:  # a mapped `a` is read by pointer loads, whatever its strides
            use_tma = cfg.tma_loads and (tma_ok(b) if a_rows is not None else tma_ok(a, b))
        num_tiles = E * cdiv(K, cfg.block_m) * cdiv(N, cfg.block_n)
        num_programs = _num_programs(a, num_tiles, cfg)
        _gmm_var_k_kernel[(num_programs,)](
            a, b, out, batch_sizes, a_rows if a_rows is not None else batch_sizes,
            M, K, N, E, T, rows_top_k, num_programs,
            a.stride(0), b.stride(0), out.stride(0), out.stride(1),
            BLOCK_K=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=cfg.block_k,
            USE_TMA=use_tma,
            # An fp32 accumulator's tile staged for a TMA store would not fit beside the 16-bit
            # pipeline stages of the 128x256 tiles (278 KB of shared memory): stored by pointers.
            TMA_STORE=cfg.tma_store and use_tma and tma_ok(out) and out.dtype == a.dtype,
            GATHER_A=a_rows is not None, TRANS_OUT=trans_out, ACCUMULATE=accumulate_into is not None, **launch,
        )
        return out

    b_ekn = b.transpose(1, 2) if trans_b else b
    bu_ekn = None if b_up is None else (b_up.transpose(1, 2) if trans_b else b_up)
    if (b_ekn.stride(1) != 1 and b_ekn.stride(2) != 1) or (bu_ekn is not None and bu_ekn.stride() != b_ekn.stride()):
        # The kernel reads both with one set of strides, one of them unit.
        b_ekn = b_ekn.contiguous()
        bu_ekn = None if bu_ekn is None else bu_ekn.contiguous()
    b_k_major = b_ekn.stride(1) == 1 and b_ekn.stride(2) != 1
    N = b_ekn.shape[2]
    if bias is not None and tuple(bias.shape) != (E, N):
        raise ValueError(f"bias: expected shape {(E, N)} (E, the product's columns), got {tuple(bias.shape)}")
    if glu is not None and bu_ekn is None:
        if N % 2:
            raise ValueError(f"b: expected an even number of columns (gate, up) with glu, got {N}")
        N //= 2
        b_ekn, bu_ekn = b_ekn[:, :, :N], b_ekn[:, :, N:]
        if bias is not None:
            bias, bias_up = bias[:, :N], bias[:, N:]
    if bias is not None and (bias.stride(1) != 1 or bias_up is not None and bias_up.stride() != bias.stride()):
        # The kernel reads both with one row stride and unit column strides.
        bias = bias.contiguous()
        bias_up = None if bias_up is None else bias_up.contiguous()
    if accumulate_into is None:
        out = torch.empty((M, N), dtype=a.dtype, device=a.device)
    else:
        out = accumulate_into
    if a_rows is not None and T == 0 and bias is None:  # every mapped row reads as zeros: the product is zero
        return out if accumulate_into is not None else out.zero_()
    if use_tma is None:  # with a_rows, a is read by pointer loads whatever its strides
        b_tma = [t.transpose(1, 2) if b_k_major else t for t in (b_ekn, bu_ekn) if t is not None]
        use_tma = cfg.tma_loads and (tma_ok(*b_tma) if a_rows is not None else tma_ok(a, *b_tma))
    num_tiles = (cdiv(M, cfg.block_m) + E + 1) * cdiv(N, cfg.block_n)
    num_programs = _num_programs(a, num_tiles, cfg)
    bias_args = (b_ekn, b_ekn, 0) if bias is None else (bias, bias if bias_up is None else bias_up, bias.stride(0))
    _gmm_kernel[(num_programs,)](
        a, b_ekn, b_ekn if bu_ekn is None else bu_ekn, out, batch_sizes, a_rows if a_rows is not None else batch_sizes,
        *bias_args[:2],
        M, N, K, E, T, rows_top_k, num_programs,
        a.stride(0), b_ekn.stride(0), b_ekn.stride(1), b_ekn.stride(2), out.stride(0), bias_args[2],
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        USE_TMA=use_tma, B_K_MAJOR=b_k_major,
        TMA_STORE=cfg.tma_store and use_tma and tma_ok(out), ACCUMULATE=accumulate_into is not None,
        GATHER_A=a_rows is not None, GLU=glu or "none", HAS_BIAS=bias is not None, **launch, **pdl_launch(a),
    )
    return out


def _check_accumulator(acc: torch.Tensor, shape: tuple, device: torch.device, dtypes, what: str = "") -> None:
    """`accumulate_into` of a weight-gradient product (the variable-K form's, the FP8 one's): a
    tensor of `dtypes` (TypeError), contiguous, of the product's `shape` (named by `what`), on
    `device` (ValueError)."""
    check_tensor("accumulate_into", acc, dtypes=tuple(dict.fromkeys(dtypes)), numel_int32=False)
    if tuple(acc.shape) != tuple(shape) or not acc.is_contiguous() or acc.device != device:
        raise ValueError(f"accumulate_into: expected a contiguous {what}{tuple(shape)} tensor on {device}, got "
                         f"{tuple(acc.shape)} on {acc.device}, contiguous={acc.is_contiguous()}")


# --------------------------------------------------------------------------------------------
# The other backends
# --------------------------------------------------------------------------------------------


def _pad_to(t: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    extra = -t.shape[dim] % multiple
    if extra == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [0, extra]
    return torch.nn.functional.pad(t, pad)


def _aligned(a: torch.Tensor, b: torch.Tensor) -> tuple:
    """Contiguous operands whose inner sizes are zero-padded to 16 bytes, as the library
    backends need (a copy only where a size is not a multiple of 16 bytes, or not contiguous)."""
    m = 16 // a.element_size()
    a = _pad_to(a, 1, m).contiguous()
    b = _pad_to(b, 1, m) if b.dim() == 2 else _pad_to(_pad_to(b, 1, m), 2, m)
    return a, b.contiguous()


def _crop(out: torch.Tensor, trans_a: bool, K: int, N: int) -> torch.Tensor:
    if trans_a:
        return out if out.shape[1:] == (K, N) else out[:, :K, :N].contiguous()
    return out if out.shape[1] == N else out[:, :N].contiguous()


def _out_sizes(a, b, trans_a, trans_b) -> tuple:
    if trans_a:
        return a.shape[1], b.shape[1]
    return a.shape[1], b.shape[1] if trans_b else b.shape[2]


def torch_gmm(
    a: torch.Tensor, b: torch.Tensor, batch_sizes: torch.Tensor, trans_a: bool = False, trans_b: bool = False
) -> torch.Tensor:
    """`torch.nn.functional.grouped_mm`; offsets are int32 cumulative sizes on the device."""
    offs = torch.cumsum(batch_sizes.to(a.device, non_blocking=True), 0, dtype=torch.int32)
    K, N = _out_sizes(a, b, trans_a, trans_b)
    a_p, b_p = _aligned(a, b)
    if trans_a:
        out = torch.nn.functional.grouped_mm(a_p.t(), b_p, offs=offs)
    else:
        out = torch.nn.functional.grouped_mm(a_p, b_p.transpose(1, 2) if trans_b else b_p, offs=offs)
    return _crop(out, trans_a, K, N)


def gg_gmm(
    a: torch.Tensor, b: torch.Tensor, batch_sizes: torch.Tensor, trans_a: bool = False, trans_b: bool = False
) -> torch.Tensor:
    """The `grouped_gemm` package. Its batch sizes live on the host: a CUDA `batch_sizes` is
    copied to the CPU here (a host-device sync)."""
    try:
        from grouped_gemm import backend as gg_backend
    except ImportError as err:
        raise ImportError(
            "gmm(backend='gg') needs the grouped_gemm package: pip install megablocks[gg]"
        ) from err
    K, N = _out_sizes(a, b, trans_a, trans_b)
    a_p, b_p = _aligned(a, b)  # its CUTLASS kernels fault on unaligned rows
    sizes = batch_sizes.to("cpu", torch.int64)
    return _crop(gg_backend.gmm(a_p, b_p, sizes, trans_a=trans_a, trans_b=trans_b), trans_a, K, N)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def gmm_sum(
    a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor, batch_sizes: torch.Tensor,
    trans_b: bool = False, backend: Optional[str] = None,
) -> torch.Tensor:
    """`gmm(a1, b1) + gmm(a2, b2)` over the same groups (forward forms, the same trans_b).

    The 'triton' backend adds the second product to the first in its epilogue (no separate sum
    over `[M, N]`); the others add the two results. Inputs are validated by the caller
    (`check_gmm_args` on each pair).
    """
    if backend is None:
        backend = default_backend(a1)
    out = run_gmm(a1, b1, batch_sizes, False, trans_b, backend)
    if _empty_result(a2, b2, batch_sizes, False, trans_b) is not None:
        return out  # the second product is zero
    if backend == "triton" and out.is_contiguous() and (a2.device.type == "cuda" or interpreted(a2)):
        return triton_gmm(a2, b2, batch_sizes, False, trans_b, accumulate_into=out)
    return out.add_(run_gmm(a2, b2, batch_sizes, False, trans_b, backend))



def default_backend(a: torch.Tensor) -> str:
    """'triton' where the kernels run (CUDA, or the interpreter on CPU), else 'torch'."""
    if a.device.type == "cuda":
        return "triton"
    return "triton" if interpreted(a) else "torch"


def check_gmm_args(a, b, batch_sizes, trans_a: bool, trans_b: bool, backend: str) -> None:
    """Validates shapes, dtypes and devices (never values) for `gmm` and its op."""
    if not isinstance(trans_a, bool) or not isinstance(trans_b, bool):
        raise TypeError(f"trans_a, trans_b: expected bools, got {type(trans_a).__name__}, {type(trans_b).__name__}")
    if trans_a and trans_b:
        raise ValueError("trans_a, trans_b: at most one may be True")
    check_tensor("a", a, ndim=2, dtypes=_FLOAT_DTYPES, numel_int32=False)
    check_tensor("b", b, ndim=2 if trans_a else 3, dtypes=_FLOAT_DTYPES, numel_int32=False)
    check_tensor("batch_sizes", batch_sizes, ndim=1, dtypes=INDEX_DTYPES)
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r}")
    if b.dtype != a.dtype:
        raise TypeError(f"b: expected the dtype of a ({a.dtype}), got {b.dtype}")
    if b.device != a.device:
        raise ValueError(f"b: expected a tensor on {a.device} (the device of a), got one on {b.device}")
    if batch_sizes.device != a.device and batch_sizes.device.type != "cpu":
        raise ValueError(
            f"batch_sizes: expected a tensor on {a.device} (the device of a) or on the CPU, "
            f"got one on {batch_sizes.device}"
        )
    M, K = a.shape
    if trans_a:
        if b.shape[0] != M:
            raise ValueError(f"b: expected {M} rows (the rows of a) with trans_a, got shape {tuple(b.shape)}")
        N = b.shape[1]
    else:
        E, bk = b.shape[0], b.shape[2 if trans_b else 1]
        if bk != K:
            where = "b.shape[2] (trans_b=True)" if trans_b else "b.shape[1]"
            raise ValueError(f"b: expected {where} == {K} (the columns of a), got shape {tuple(b.shape)}")
        if batch_sizes.shape[0] != E:
            raise ValueError(
                f"batch_sizes: expected {E} entries (b.shape[0]), got {batch_sizes.shape[0]}"
            )
        N = b.shape[1 if trans_b else 2]
        check_int32_range("b: one group's K*N", K * N)
    check_int32_range("a: rows", M)
    # Row strides advance by up to 256 rows in int32 arithmetic.
    check_int32_range("a: 256 times its columns (K)", 256 * K)
    check_int32_range("256 times the columns of the result (N)", 256 * N)
    if batch_sizes.shape[0] > 4096:
        raise ValueError(f"batch_sizes: at most 4096 groups are supported, got {batch_sizes.shape[0]}")
    dev = a.device
    if backend == "gg" and (dev.type != "cuda" or a.dtype != torch.bfloat16):
        raise TypeError(f"a: backend='gg' (grouped_gemm) takes bfloat16 CUDA tensors, got {a.dtype} on {dev}")


def _empty_result(a, b, batch_sizes, trans_a, trans_b) -> Optional[torch.Tensor]:
    """The result of a product with nothing to compute (no rows, no groups, K or N of 0)."""
    M, K = a.shape
    if trans_a:
        E, N = batch_sizes.shape[0], b.shape[1]
        if M == 0 or E * K * N == 0:
            return torch.zeros((E, K, N), dtype=a.dtype, device=a.device)
        return None
    E, N = b.shape[0], b.shape[1 if trans_b else 2]
    if M * N == 0 or E * K == 0:
        return torch.zeros((M, N), dtype=a.dtype, device=a.device)
    return None


def gmm(
    a: torch.Tensor,
    b: torch.Tensor,
    batch_sizes: torch.Tensor,
    trans_a: bool = False,
    trans_b: bool = False,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Grouped GEMM, no autograd (see `megablocks.ops.gmm` for the differentiable op).

    Args:
        a: `[M, K]` float32/float16/bfloat16; its rows are grouped by `batch_sizes`.
        b: `[E, K, N]`, or `[E, N, K]` with `trans_b`, or `[M, N]` with `trans_a`; dtype of `a`.
        batch_sizes: `[E]` int32/int64 rows per group, on the device of `a` or on the CPU;
            sum(batch_sizes) must be M.
        trans_a: the variable-K form: `out[e] = a[rows of e]^T @ b[rows of e]`, `[E, K, N]`.
        trans_b: use `b[e]^T`.
        backend: 'triton', 'torch', 'gg' or None (`default_backend(a)`).

    Returns:
        `[M, N]` (or `[E, K, N]` with `trans_a`) in the dtype of `a`, accumulated in float32.

    Raises:
        TypeError / ValueError: on dtypes, shapes or devices that do not fit, or a backend that
            does not take the dtype; ImportError: backend='gg' without grouped_gemm installed.
    """
    if backend is None and isinstance(a, torch.Tensor):
        backend = default_backend(a)
    check_gmm_args(a, b, batch_sizes, trans_a, trans_b, backend)
    if backend == "triton" and a.device.type != "cuda" and not interpreted(a):
        raise ValueError(
            f"a: backend='triton' runs on CUDA tensors, or on CPU ones under TRITON_INTERPRET=1; "
            f"got a tensor on {a.device}"
        )
    return run_gmm(a, b, batch_sizes, trans_a, trans_b, backend)


def run_gmm(a: torch.Tensor, b: torch.Tensor, batch_sizes: torch.Tensor, trans_a: bool, trans_b: bool,
            backend: str) -> torch.Tensor:
    """`gmm` on arguments its caller has validated (`check_gmm_args`; the autograd ops check once,
    where a product enters, not again at each level below): the empty cases, then the backend."""
    empty = _empty_result(a, b, batch_sizes, trans_a, trans_b)
    if empty is not None:
        return empty
    if backend == "triton":
        return triton_gmm(a, b, batch_sizes, trans_a, trans_b)
    if backend == "torch":
        return torch_gmm(a, b, batch_sizes, trans_a, trans_b)
    return gg_gmm(a, b, batch_sizes, trans_a, trans_b)
