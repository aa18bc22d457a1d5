"""Gather and scatter of token rows between token order and expert order.

Legend: T tokens, H hidden, K top-k, N = T·K routed assignments, E experts, R rows of the
expert-ordered buffer (N plain, P padded, E·C binned with C rows per expert).

An assignment `a` is a position in the flattened `[T, K]` routing (token `a // K`, choice `a % K`).
The routing metadata (`indices_N`, `bin_ids_N`, `bins_E`, `padded_bins_E`, see docs/CONTRACTS.md)
is first turned into two small maps by `route`:

    assignment_row_N[a] = the buffer row that holds assignment a, or -1 (dropped)
    row_assignment_R[r] = the assignment held in buffer row r, or -1 (padding / empty slot)

for one of three buffer layouts, sorted row i of expert e = bin_ids[i] going to
    'plain':  row i
    'padded': row padded_bins[e-1] + (i - bins[e-1])
    'binned': row e·C + (i - bins[e-1]) if i - bins[e-1] < C, else dropped
(with bins[-1] and padded_bins[-1] read as 0). The row kernels then only follow the maps:

    gather_rows:  out_RH[assignment_row[a]] = w[a] · x_TH[a // K];  0 in rows that hold none
    scatter_rows: out_TH[t] = Σ_k w[a] · x_RH[assignment_row[a]],  a = t·K + k, k in order
    weight_grad:  out_N[a]  = <x_RH[assignment_row[a]], y_TH[a // K]>  (0 if dropped)

Both row kernels walk tokens: gather reads each token row once and writes its K copies, scatter
reads the K rows of a token and writes their sum once; the bytes moved are the minimum. Each output
row is written exactly once (gather zero-fills the rows that hold no assignment in the same grid),
without atomics, so every result is deterministic. Products and sums are taken in fp32:
with `enable_fp_fusion=False` a weighted sum rounds exactly like `acc = acc + w * x` in torch, k in
order. Indices are compared in their own dtype, then handled as int32; row offsets are int64.
Every index read from memory is bounds-checked before it is used as an address.
"""

from dataclasses import dataclass, replace
from typing import Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from megablocks import _checks
from megablocks.backend import cdiv, next_power_of_2
from megablocks.backend.launch import pdl_launch, pdl_start, programs_to_fill, with_overrides

LAYOUTS = ("plain", "padded", "binned")

# Routing positions handled by one program of the route kernel.
_ROUTE_BLOCK = 1024
# Row tiles that one zero-filling program of the gather kernel checks.
_ZERO_TILES = 16


@dataclass(frozen=True)
class Tile:
    """The settings of one row-kernel launch: `rows` rows × `cols` hidden elements per step,
    `num_warps` (`default_tile` picks them; the launchers' `tile=` overrides them, see
    `megablocks.backend.launch`)."""

    rows: int
    cols: int
    num_warps: int


def default_tile(hidden: int) -> Tile:
    """The tile the row kernels use for hidden size `hidden`: about 2048 elements per step
    (up to 1024 of a row, the rest as more rows), 4 warps: the best of the tiles
    `benchmarks/bench_permute.py --sweep` tried (benchmarks/RESULTS.md, "Permutation kernels")."""
    cols = min(next_power_of_2(max(hidden, 1)), 1024)
    return Tile(max(1, 2048 // cols), cols, 4)


@triton.jit
def _expert_of(bins_ptr, i, E, SEARCH_STEPS):
    """First e in [0, E) with bins[e] > i (E where none): an upper-bound binary search."""
    lo = tl.zeros_like(i)
    hi = tl.zeros_like(i) + E
    for _ in range(SEARCH_STEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        end = tl.load(bins_ptr + mid, mask=active, other=0).to(tl.int32)
        right = end <= i
        lo = tl.where(active & right, mid + 1, lo)
        hi = tl.where(active & ~right, mid, hi)
    return lo


# indices_N, bin_ids_N: int32/int64 (bin_ids unused unless HAS_BIN_IDS); bins_E, padded_bins_E:
# int32/int64 (padded_bins read only for the padded layout); assignment_row_N, row_assignment_R:
# int32, -1 on entry (row_assignment_R need not be for the plain layout with R <= N: its rows are
# the sorted positions, each written, -1 where the index is not valid). Program p handles sorted
# positions [p·BLOCK, (p+1)·BLOCK).
@triton.jit
def _route_kernel(
    indices_ptr,
    bin_ids_ptr,
    bins_ptr,
    padded_bins_ptr,
    assignment_row_ptr,
    row_assignment_ptr,
    N,
    E,
    R,
    BIN_SIZE,
    SEARCH_STEPS,
    LAYOUT: tl.constexpr,
    HAS_BIN_IDS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = i < N
    a_raw = tl.load(indices_ptr + i, mask=in_range, other=-1)
    ok = in_range & (a_raw >= 0) & (a_raw < N)
    a = tl.where(ok, a_raw, 0).to(tl.int32)
    if LAYOUT == 0:
        row = i
    else:
        if HAS_BIN_IDS:
            e_raw = tl.load(bin_ids_ptr + i, mask=in_range, other=-1)
            ok = ok & (e_raw >= 0) & (e_raw < E)
            e = tl.where(ok, e_raw, 0).to(tl.int32)
        else:
            e = _expert_of(bins_ptr, i, E, SEARCH_STEPS)
            ok = ok & (e < E)
            e = tl.where(ok, e, 0)
        has_prev = ok & (e > 0)
        j = i - tl.load(bins_ptr + e - 1, mask=has_prev, other=0).to(tl.int32)
        if LAYOUT == 1:
            row = tl.load(padded_bins_ptr + e - 1, mask=has_prev, other=0).to(tl.int32) + j
        else:
            row = e * BIN_SIZE + j
            ok = ok & (j < BIN_SIZE)
        ok = ok & (j >= 0)
    ok = ok & (row >= 0) & (row < R)
    tl.store(assignment_row_ptr + a, row, mask=ok)
    if LAYOUT == 0:
        tl.store(row_assignment_ptr + i, tl.where(ok, a, -1), mask=in_range & (i < R))
    else:
        tl.store(row_assignment_ptr + row, a, mask=ok)


# x_TH (last dim contiguous, rows stride_x apart), assignment_row_N, row_assignment_R int32,
# weights_N any float (read only if HAS_WEIGHTS) -> out_RH (x's dtype). Two parts in one grid:
# program p < cdiv(T, BLOCK_T) reads tokens [p·BLOCK_T, (p+1)·BLOCK_T) once and writes each to its
# K rows; each program after those writes zeros to the rows, among BLOCK_T·ZERO_TILES, that hold
# no assignment (most hold one, so these programs mostly only read the map).
@triton.jit
def _gather_kernel(
    x_ptr,
    assignment_row_ptr,
    row_assignment_ptr,
    weights_ptr,
    out_ptr,
    T,
    R,
    H,
    stride_x,
    stride_out,
    TOP_K: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    ZERO_TILES: tl.constexpr,
):
    pid = tl.program_id(0)
    token_programs = tl.cdiv(T, BLOCK_T)
    if pid < token_programs:
        tokens = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        in_range = tokens < T
        src = x_ptr + tokens.to(tl.int64)[:, None] * stride_x
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            in_cols = cols < H
            v = tl.load(src + cols[None, :], mask=in_range[:, None] & in_cols[None, :], other=0.0)
            for k in tl.static_range(TOP_K):
                a = tokens * TOP_K + k
                row = tl.load(assignment_row_ptr + a, mask=in_range, other=-1)
                present = in_range & (row >= 0) & (row < R)
                dst = out_ptr + tl.where(present, row, 0).to(tl.int64)[:, None] * stride_out
                if HAS_WEIGHTS:
                    w = tl.load(weights_ptr + a, mask=present, other=0.0).to(tl.float32)
                    out = (v.to(tl.float32) * w[:, None]).to(out_ptr.dtype.element_ty)
                else:
                    out = v.to(out_ptr.dtype.element_ty)
                tl.store(dst + cols[None, :], out, mask=present[:, None] & in_cols[None, :])
    else:
        zeros = tl.zeros((BLOCK_T, BLOCK_H), dtype=out_ptr.dtype.element_ty)
        first = (pid - token_programs) * (BLOCK_T * ZERO_TILES)
        for r0 in range(first, first + BLOCK_T * ZERO_TILES, BLOCK_T):
            rows = r0 + tl.arange(0, BLOCK_T)
            in_range = rows < R
            a = tl.load(row_assignment_ptr + rows, mask=in_range, other=0)
            empty = in_range & ((a < 0) | (a >= T * TOP_K))
            dst = out_ptr + rows.to(tl.int64)[:, None] * stride_out
            for h0 in range(0, H, BLOCK_H):
                cols = h0 + tl.arange(0, BLOCK_H)
                tl.store(dst + cols[None, :], zeros, mask=empty[:, None] & (cols < H)[None, :])


# x_RH (last dim contiguous), assignment_row_N int32, weights_N any float (read only if
# HAS_WEIGHTS) -> out_TH (x's dtype). Program (p, c) writes tokens [p·BLOCK_T, (p+1)·BLOCK_T), the
# BLOCK_H-column chunks c, c + C, ... of them (C = the grid's second dim: 1 but for few tokens).
@triton.jit
def _scatter_kernel(
    x_ptr,
    assignment_row_ptr,
    weights_ptr,
    out_ptr,
    T,
    R,
    H,
    stride_x,
    stride_out,
    TOP_K: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    ROUND_TERMS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_start(PDL)
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_range = tokens < T
    dst = out_ptr + tokens.to(tl.int64)[:, None] * stride_out
    for h0 in range(tl.program_id(1) * BLOCK_H, H, tl.num_programs(1) * BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        in_cols = cols < H
        acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
        for k in tl.static_range(TOP_K):
            a = tokens * TOP_K + k
            row = tl.load(assignment_row_ptr + a, mask=in_range, other=-1)
            present = in_range & (row >= 0) & (row < R)
            src = x_ptr + tl.where(present, row, 0).to(tl.int64)[:, None] * stride_x
            v = tl.load(src + cols[None, :], mask=present[:, None] & in_cols[None, :], other=0.0)
            v = v.to(tl.float32)
            if HAS_WEIGHTS:
                w = tl.load(weights_ptr + a, mask=present, other=0.0).to(tl.float32)
                v = v * w[:, None]
            if ROUND_TERMS:  # each weighted row rounded to the output dtype first
                v = v.to(out_ptr.dtype.element_ty).to(tl.float32)
            acc = acc + v
        out = acc.to(out_ptr.dtype.element_ty)
        tl.store(dst + cols[None, :], out, mask=in_range[:, None] & in_cols[None, :])


# x_RH, y_TH (last dims contiguous), assignment_row_N int32 -> out_N fp32.
# Program p handles assignments [p·BLOCK_A, (p+1)·BLOCK_A).
@triton.jit
def _weight_grad_kernel(
    x_ptr,
    y_ptr,
    assignment_row_ptr,
    out_ptr,
    N,
    R,
    H,
    stride_x,
    stride_y,
    TOP_K: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # One assignment at a time, its sum a scalar: a vector of sums would reach the store through a
    # layout conversion in shared memory whose replicated writes racecheck reports as hazards.
    # `out_ptr` is zero-filled, so dropped assignments are skipped.
    for r in tl.static_range(BLOCK_A):
        a = tl.program_id(0) * BLOCK_A + r
        if a < N:
            row = tl.load(assignment_row_ptr + a)
            if (row >= 0) & (row < R):
                x_row = x_ptr + row.to(tl.int64) * stride_x
                y_row = y_ptr + (a // TOP_K).to(tl.int64) * stride_y
                acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
                for h0 in range(0, H, BLOCK_H):
                    cols = h0 + tl.arange(0, BLOCK_H)
                    xv = tl.load(x_row + cols, mask=cols < H, other=0.0).to(tl.float32)
                    yv = tl.load(y_row + cols, mask=cols < H, other=0.0).to(tl.float32)
                    acc += xv * yv
                tl.store(out_ptr + a, tl.sum(acc, axis=0))


def _rows_contiguous(name: str, t: torch.Tensor) -> torch.Tensor:
    _checks.check_tensor(name, t, ndim=2, dtypes=_checks.FLOAT_DTYPES, numel_int32=False)
    _checks.check_int32_range(f"{name}.shape[0]", t.shape[0])
    _checks.check_int32_range(f"{name}.shape[1]", t.shape[1])
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


def _check_top_k(top_k: int, n: int) -> None:
    _checks.check_int("top_k", top_k, min_value=1)
    if n % top_k:
        raise ValueError(f"top_k: the {n} assignments are not a multiple of top_k={top_k}")


def route(
    indices_N: torch.Tensor,
    bins_E: torch.Tensor,
    *,
    layout: str,
    num_rows: int,
    bin_ids_N: Optional[torch.Tensor] = None,
    padded_bins_E: Optional[torch.Tensor] = None,
    bin_size: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The maps `(assignment_row_N, row_assignment_R)` (int32, R = `num_rows`) of one layout.

    `layout` is 'plain', 'padded' (needs `bin_ids_N` and `padded_bins_E`) or 'binned' (uses
    `bin_size` rows per expert; the expert of each sorted row is found from `bins_E`).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    named = (("indices", indices_N), ("bins", bins_E), ("bin_ids", bin_ids_N), ("padded_bins", padded_bins_E))
    for name, t in named:
        if t is not None:
            _checks.check_tensor(name, t, ndim=1, dtypes=_checks.INDEX_DTYPES)
    if layout == "padded" and (bin_ids_N is None or padded_bins_E is None):
        raise ValueError("layout: 'padded' needs bin_ids and padded_bins")
    _checks.check_int("num_rows", num_rows, min_value=0, max_value=_checks.INT32_MAX)
    _checks.check_int("bin_size", bin_size, min_value=0)
    _checks.check_int32_range("number of experts × bin_size", bins_E.numel() * bin_size)
    indices_N, bins_E = indices_N.contiguous(), bins_E.contiguous()
    bin_ids_N = bin_ids_N.contiguous() if bin_ids_N is not None else None
    padded_bins_E = padded_bins_E.contiguous() if padded_bins_E is not None else None
    n, num_experts = indices_N.numel(), bins_E.numel()
    device = indices_N.device
    assignment_row = torch.full((n,), -1, dtype=torch.int32, device=device)
    if layout == "plain" and 0 < num_rows <= n:  # the kernel writes every row (one launch less)
        row_assignment = torch.empty((num_rows,), dtype=torch.int32, device=device)
    else:
        row_assignment = torch.full((num_rows,), -1, dtype=torch.int32, device=device)
    if n == 0 or num_rows == 0:
        return assignment_row, row_assignment
    has_bin_ids = layout != "binned"
    _route_kernel[(cdiv(n, _ROUTE_BLOCK),)](
        indices_N,
        bin_ids_N if has_bin_ids and bin_ids_N is not None else indices_N,
        bins_E,
        padded_bins_E if padded_bins_E is not None else bins_E,
        assignment_row,
        row_assignment,
        n,
        num_experts,
        num_rows,
        bin_size,
        num_experts.bit_length(),
        LAYOUT=LAYOUTS.index(layout),
        HAS_BIN_IDS=has_bin_ids,
        BLOCK=_ROUTE_BLOCK,
        num_warps=4,
    )
    return assignment_row, row_assignment


def gather_rows(
    x_TH: torch.Tensor,
    assignment_row_N: torch.Tensor,
    row_assignment_R: torch.Tensor,
    weights_N: Optional[torch.Tensor],
    top_k: int,
    *,
    tile: Optional[Union[Tile, dict]] = None,
) -> torch.Tensor:
    """`out_RH[assignment_row_N[a]] = weights[a] · x_TH[a // top_k]`; rows that hold no assignment
    (row_assignment_R[r] = -1) are zero. `weights_N=None` means 1. R = row_assignment_R.numel()."""
    x_TH = _rows_contiguous("x", x_TH)
    n = assignment_row_N.numel()
    _check_top_k(top_k, n)
    if x_TH.shape[0] != n // top_k:
        raise ValueError(f"x: expected {n // top_k} rows (N // top_k), got {x_TH.shape[0]}")
    weights_N = weights_N.contiguous() if weights_N is not None else None
    num_rows, tokens, hidden = row_assignment_R.numel(), x_TH.shape[0], x_TH.shape[1]
    out = torch.empty(num_rows, hidden, dtype=x_TH.dtype, device=x_TH.device)
    if out.numel() == 0:
        return out
    tile = with_overrides(default_tile(hidden), tile)
    grid = (cdiv(tokens, tile.rows) + cdiv(num_rows, tile.rows * _ZERO_TILES),)
    _gather_kernel[grid](
        x_TH,
        assignment_row_N,
        row_assignment_R,
        weights_N if weights_N is not None else x_TH,
        out,
        tokens,
        num_rows,
        hidden,
        x_TH.stride(0),
        out.stride(0),
        TOP_K=top_k,
        HAS_WEIGHTS=weights_N is not None,
        BLOCK_T=tile.rows,
        BLOCK_H=tile.cols,
        ZERO_TILES=_ZERO_TILES,
        num_warps=tile.num_warps,
        enable_fp_fusion=False,
    )
    return out


def scatter_rows(
    x_RH: torch.Tensor,
    assignment_row_N: torch.Tensor,
    weights_N: Optional[torch.Tensor],
    top_k: int,
    *,
    round_terms: bool = False,
    tile: Optional[Union[Tile, dict]] = None,
) -> torch.Tensor:
    """`out_TH[t] = Σ_k weights[a] · x_RH[assignment_row_N[a]]`, a = t·top_k + k (fp32, k in order).

    Dropped assignments (row -1) add nothing; `weights_N=None` means 1. T = N // top_k.
    `round_terms`: each weighted row is rounded to x's dtype before the sum (MegaBlocks' results).
    """
    x_RH = _rows_contiguous("x", x_RH)
    n = assignment_row_N.numel()
    _check_top_k(top_k, n)
    weights_N = weights_N.contiguous() if weights_N is not None else None
    tokens, hidden = n // top_k, x_RH.shape[1]
    out = torch.empty(tokens, hidden, dtype=x_RH.dtype, device=x_RH.device)
    if out.numel() == 0:
        return out
    tile = with_overrides(default_tile(hidden), tile)
    # Few tokens (decode): each program one column chunk, so that the grid fills the SMs (OLMoE's
    # 64 tokens: 32 programs two chunks each otherwise; benchmarks/RESULTS.md, "Decode's
    # latency-bound launches split").
    row_tiles = cdiv(tokens, tile.rows)
    chunks = cdiv(hidden, tile.cols) if row_tiles < programs_to_fill(x_RH.device) else 1
    _scatter_kernel[(row_tiles, chunks)](
        x_RH,
        assignment_row_N,
        weights_N if weights_N is not None else x_RH,
        out,
        tokens,
        x_RH.shape[0],
        hidden,
        x_RH.stride(0),
        out.stride(0),
        TOP_K=top_k,
        HAS_WEIGHTS=weights_N is not None,
        ROUND_TERMS=round_terms,
        BLOCK_T=tile.rows,
        BLOCK_H=tile.cols,
        num_warps=tile.num_warps,
        enable_fp_fusion=False,
        **pdl_launch(x_RH),
    )
    return out


# The weight-gradient kernel unrolls its loop over a program's assignments (BLOCK_A copies of the
# body); compiling it takes time that grows faster than BLOCK_A (for sm_90: 1.3 s at 16, 6.8 s at
# 64, 20 s at 128, minutes at the 512 rows the permutation tile gives hidden sizes below 4), so a
# program takes at most this many assignments.
WEIGHT_GRAD_MAX_ROWS = 16


def weight_grad_tile(hidden: int, tile: Optional[Union[Tile, dict]] = None) -> Tile:
    """The permutation tile for `hidden` (with `tile`'s overrides), at most WEIGHT_GRAD_MAX_ROWS rows."""
    tile = with_overrides(default_tile(hidden), tile)
    return tile if tile.rows <= WEIGHT_GRAD_MAX_ROWS else replace(tile, rows=WEIGHT_GRAD_MAX_ROWS)


def weight_grad(
    x_RH: torch.Tensor,
    y_TH: torch.Tensor,
    assignment_row_N: torch.Tensor,
    top_k: int,
    *,
    tile: Optional[Union[Tile, dict]] = None,
) -> torch.Tensor:
    """`out_N[a] = <x_RH[assignment_row_N[a]], y_TH[a // top_k]>` in fp32 (0 for dropped a)."""
    x_RH = _rows_contiguous("x", x_RH)
    y_TH = _rows_contiguous("y", y_TH)
    n = assignment_row_N.numel()
    _check_top_k(top_k, n)
    if y_TH.shape != (n // top_k, x_RH.shape[1]):
        raise ValueError(f"y: expected shape {(n // top_k, x_RH.shape[1])}, got {tuple(y_TH.shape)}")
    out = torch.zeros(n, dtype=torch.float32, device=x_RH.device)
    if n == 0 or x_RH.shape[1] == 0:
        return out
    tile = weight_grad_tile(x_RH.shape[1], tile)
    _weight_grad_kernel[(cdiv(n, tile.rows),)](
        x_RH,
        y_TH,
        assignment_row_N,
        out,
        n,
        x_RH.shape[0],
        x_RH.shape[1],
        x_RH.stride(0),
        y_TH.stride(0),
        TOP_K=top_k,
        BLOCK_A=tile.rows,
        BLOCK_H=tile.cols,
        num_warps=tile.num_warps,
    )
    return out
