"""Block-sparse × dense products (SDD, DSD, DDS) on a BCSR matrix, in Triton.

Legend: B block size; a sparse matrix S (an `stk.Matrix`) of R block rows and Q block columns,
shape `[R·B, Q·B]`, with `data_SBB` `[nnz, B, B]` and six index arrays (docs/CONTRACTS.md):

    row_indices[s], column_indices[s]   block position of data slot s (row-major order)
    offsets[r] .. offsets[r+1]          slots of block row r; offsets[R] = number of real slots
    offsets_t, column_indices_t,        the same in column-major order: block column q holds the
    block_offsets_t                     block rows column_indices_t[i] at data slots
                                        block_offsets_t[i], i in [offsets_t[q], offsets_t[q+1])

Products (fp32 accumulation, output in the inputs' dtype):

    sdd:  out_SBB[s] = (a_MK @ b_KN)[rows of block s, columns of block s]    s < offsets[R]
          slots at or past offsets[R] (read on the device) are written with zeros.
    dsd:  out = S @ b  or  S.t() @ b      every output row is written (zeros where S has no block)
    dds:  out = a @ S  or  a @ S.t()      computed by the dsd kernel on the transposes:
          (a @ S)^T = S^T @ a^T, with the strides of `a` and of `out` swapped.

Expert column layout. The dMoE topology (E experts, F ffn size, C = ceil(F/B) block columns per
expert) maps block column q = e·C + j to the dense columns e·F + j·B + [0, B), of which only those
with j·B + col < F exist. The launchers take that map as `(group_blocks, group_size)` = (C, F);
`(1, B)` is the identity (plain stk semantics, dense size Q·B). Dense rows or columns of the map
that do not exist are neither read nor written, and sparse entries in them are read as zero.

Indices are loaded in their own dtype (int16 from stk, int32, int64), converted to int32 and
clamped into range before they form an address, so no index array can cause an out-of-bounds
access. Element offsets are int32 (the launchers refuse tensors whose largest offset exceeds it),
except `slot * stride` into `data`, which is int64.
"""

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from megablocks import _checks
from megablocks.backend import cdiv, next_power_of_2
from megablocks.backend.launch import dot_precision, persistent_programs, prepare_tma, tma_ok, with_overrides

# The block sizes B of the block-sparse layout (the topology, the products, `Arguments.moe_block_size`):
# the kernels' tiles are B x B blocks, built and tested for these.
BLOCK_SIZES = (16, 32, 64, 128)


@dataclass(frozen=True)
class SparseConfig:
    """The settings of one sdd or dsd launch (`default_config` picks them; the launchers'
    `config=` overrides them, see `megablocks.backend.launch`).

    `slots` (sdd only): adjacent blocks of one block row computed by one program (its tile is
    B × slots·B); used on expert topologies, 1 elsewhere. `use_tma` (sdd only): on expert
    topologies whose blocks pair up within a row and whose dense columns are whole blocks
    (F a multiple of B), load both operands with TMA tensor descriptors where their strides
    allow (16-byte aligned, one unit stride); dsd takes them too where F is whole blocks, for the
    transposed sparse operand only when its rows hold at least `TMA_MIN_TRANSPOSED_STEPS` blocks
    on average. `persistent`: one program per SM looping over the tiles. `block_n` (dsd only): dense columns per
    program. `block_k`: reduction step. `group_m`: block rows per swizzle group (L2 reuse).
    """

    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    slots: int = 1
    block_n: int = 128
    use_tma: bool = True
    persistent: bool = False


def _round_down_pow2(x: int) -> int:
    return 1 << (max(x, 1).bit_length() - 1)


def default_config(op: str, block_size: int, dtype: torch.dtype, device: torch.device) -> SparseConfig:
    """The settings for `op` ('sdd' or 'dsd'), block size and dtype on `device`.

    On the GPU, 16-bit inputs: a B × 256 output tile (two blocks of one row for sdd), 64-deep
    steps, 8 warps, persistent, TMA loads; sdd 4 stages, groups of 4 block rows; dsd 3 stages,
    groups of 8: the fastest tilings `benchmarks/bench_sparse.py --sweep` found
    (benchmarks/RESULTS.md, "Block-sparse products"). fp32 inputs take 32-deep steps, 2 stages
    and 128-wide tiles to fit shared memory. In Triton's interpreter (CPU): 32-deep steps,
    2 slots and 2 persistent programs, so the tests walk the GPU's code paths (several steps per
    block, paired slots, programs looping over tiles) at small shapes.
    """
    if device.type != "cuda":
        return SparseConfig(block_k=min(block_size, 32), num_warps=4, num_stages=1, slots=2,
                      block_n=min(2 * block_size, 128), persistent=True)
    if dtype == torch.float32:
        return SparseConfig(block_k=min(block_size, 32), num_warps=8, num_stages=2, slots=1,
                      block_n=128)
    block_k = min(block_size, 64)
    if op == "sdd":
        return SparseConfig(block_k=block_k, num_warps=8, num_stages=4, group_m=4,
                      slots=max(1, 256 // block_size), persistent=True)
    return SparseConfig(block_k=block_k, num_warps=8, num_stages=3, group_m=8, block_n=256, persistent=True)


# The transposed sparse operand (weight-gradient products) loads through TMA descriptors only when
# its rows hold at least this many blocks on average: with fewer, pointer loads were faster
# (benchmarks/RESULTS.md, "Block-sparse products").
TMA_MIN_TRANSPOSED_STEPS = 8


# a_MK, b_KN: dense, any strides; out_SBB: [nnz, B, B]; row/column_indices_S: [nnz];
# offsets_R1: [R + 1]. STRUCTURED: every block row r holds the `row_blocks` slots
# r·row_blocks + [0, row_blocks) (the dMoE topology); a tile is then SLOTS adjacent slots of one
# row, tiles grouped GROUP_M block rows at a time. Otherwise tile p is slot p. Program p computes
# tiles p, p + num_programs, ... (one each unless the launch is persistent).
@triton.jit
def _sdd_kernel(
    a_ptr, b_ptr, out_ptr, row_indices_ptr, column_indices_ptr, offsets_ptr,
    K, N, num_block_rows, num_block_cols, nnz, row_blocks, group_blocks, group_size,
    stride_am, stride_ak, stride_bk, stride_bn, stride_os, stride_om, stride_on,
    BLOCK: tl.constexpr, SLOTS: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    STRUCTURED: tl.constexpr, EVEN_K: tl.constexpr, MASK_COLS: tl.constexpr,
    COL_ALIGN: tl.constexpr, PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr = False, B_K_MAJOR: tl.constexpr = False, M=0,
    num_tiles=0, num_programs=1,
):
    BLOCK_N: tl.constexpr = SLOTS * BLOCK
    # Slots at or past offsets[R] are unused: they run no steps and store zeros.
    real = tl.load(offsets_ptr + num_block_rows).to(tl.int32)
    real = tl.minimum(tl.maximum(real, 0), nnz)
    if USE_TMA:
        # The SLOTS blocks of a tile are consecutive block columns of one expert, so their dense
        # columns are the BLOCK_N from the first block's: one descriptor load per operand and
        # step (the K tail is zero-filled by the descriptor).
        a_desc = tl.make_tensor_descriptor(a_ptr, [M, K], [stride_am, 1], [BLOCK, BLOCK_K])
        if B_K_MAJOR:
            b_desc = tl.make_tensor_descriptor(b_ptr, [N, K], [stride_bn, 1], [BLOCK_N, BLOCK_K])
        else:
            b_desc = tl.make_tensor_descriptor(b_ptr, [K, N], [stride_bk, 1], [BLOCK_K, BLOCK_N])
    j = tl.arange(0, BLOCK_N)
    half = j // BLOCK
    within = j % BLOCK
    for tile in range(tl.program_id(0), num_tiles, num_programs):
        if STRUCTURED:
            per_row = tl.cdiv(row_blocks, SLOTS)
            width = GROUP_M * per_row
            first_r = (tile // width) * GROUP_M
            group_rows = tl.minimum(num_block_rows - first_r, GROUP_M)
            r = first_r + (tile % width) % group_rows
            q = (tile % width) // group_rows
            s0 = r * row_blocks + q * SLOTS
            slots_here = tl.minimum(row_blocks - q * SLOTS, SLOTS)
        else:
            s0 = tile
            slots_here = 1
            r = tl.load(row_indices_ptr + s0).to(tl.int32)
            r = tl.minimum(tl.maximum(r, 0), num_block_rows - 1)
        active = s0 < real

        slot_ok = half < slots_here
        c = tl.load(column_indices_ptr + s0 + half, mask=slot_ok, other=0).to(tl.int32)
        c = tl.minimum(tl.maximum(c, 0), num_block_cols - 1)
        first = (c % group_blocks) * BLOCK
        col = (c // group_blocks) * group_size + first + within
        if MASK_COLS:
            col_ok = slot_ok & (first + within < group_size)
            col = tl.minimum(col, N - 1)
        else:
            col_ok = slot_ok
            col = tl.max_contiguous(tl.multiple_of(col, COL_ALIGN), BLOCK)

        acc = tl.zeros((BLOCK, BLOCK_N), dtype=tl.float32)
        k_steps = tl.where(active, tl.cdiv(K, BLOCK_K), 0)
        if USE_TMA:
            c0 = tl.load(column_indices_ptr + s0).to(tl.int32)
            c0 = tl.minimum(tl.maximum(c0, 0), num_block_cols - 1)
            n0 = (c0 // group_blocks) * group_size + (c0 % group_blocks) * BLOCK
            for kt in range(k_steps):
                a = a_desc.load([r * BLOCK, kt * BLOCK_K])
                if B_K_MAJOR:
                    b = tl.trans(b_desc.load([n0, kt * BLOCK_K]))
                else:
                    b = b_desc.load([kt * BLOCK_K, n0])
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
        else:
            rm = r * BLOCK + tl.arange(0, BLOCK)
            rk = tl.arange(0, BLOCK_K)
            a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak
            b_ptrs = b_ptr + rk[:, None] * stride_bk + col[None, :] * stride_bn
            for kt in range(k_steps):
                if EVEN_K:
                    a = tl.load(a_ptrs)
                    b = tl.load(b_ptrs)
                else:
                    k_ok = rk < K - kt * BLOCK_K
                    a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
                    b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
                a_ptrs += BLOCK_K * stride_ak
                b_ptrs += BLOCK_K * stride_bk

        acc = tl.where(col_ok[None, :], acc, 0.0)
        slot = (s0 + half).to(tl.int64)
        out_ptrs = (out_ptr + slot[None, :] * stride_os + tl.arange(0, BLOCK)[:, None] * stride_om
                    + within[None, :] * stride_on)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=slot_ok[None, :])


# data_SBB: [nnz, B, B] read as the sparse left operand (strides of its m and k sides given, so
# the transpose S^T is the same data with the strides swapped); b_KN, out_MN dense, any strides.
# The sparse operand has `num_block_rows` block rows; block row r holds the entries
# [offsets[r], offsets[r+1]): entry i is block column indices[i] at data slot i, or at
# slots[i] when GATHER. Block row r writes out rows map(r, out_blocks, out_size) and reads, for
# block column c, b rows map(c, in_blocks, in_size), map(x, C, F) = (x // C)·F + (x % C)·B + [0, B)
# masked to (x % C)·B + i < F (masks applied only when MASK_OUT / MASK_IN).
# CONTIGUOUS (the dMoE topology, both orientations): the entries of a row are consecutive block
# columns at slots `slot_step` apart, so only the row's first index and slot are loaded; otherwise
# every step loads its entry's index (a dependent load the pipeline cannot hide as well).
@triton.jit
def _dsd_kernel(
    data_ptr, b_ptr, out_ptr, offsets_ptr, indices_ptr, slots_ptr,
    N, num_block_rows, num_block_cols, nnz, out_blocks, out_size, in_blocks, in_size, slot_step,
    stride_ds, stride_dm, stride_dk, stride_bk, stride_bn, stride_om, stride_on,
    BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    GATHER: tl.constexpr, CONTIGUOUS: tl.constexpr, MASK_OUT: tl.constexpr, MASK_IN: tl.constexpr,
    EVEN_N: tl.constexpr, IN_ALIGN: tl.constexpr, PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr = False, A_M_MAJOR: tl.constexpr = False, B_K_MAJOR: tl.constexpr = False,
    K_ROWS=0, num_tiles=0, num_programs=1,
):
    K_STEPS: tl.constexpr = BLOCK // BLOCK_K
    num_pid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_pid_n
    if USE_TMA:
        # Descriptors over the data blocks [nnz, B, B] (its unit-stride side last) and over b
        # [K_ROWS, N] (or [N, K_ROWS] when b's rows are its unit stride); out of range reads are 0.
        if A_M_MAJOR:
            a_desc = tl.make_tensor_descriptor(data_ptr, [nnz, BLOCK, BLOCK], [stride_ds, stride_dk, 1],
                                               [1, BLOCK_K, BLOCK])
        else:
            a_desc = tl.make_tensor_descriptor(data_ptr, [nnz, BLOCK, BLOCK], [stride_ds, stride_dm, 1],
                                               [1, BLOCK, BLOCK_K])
        if B_K_MAJOR:
            b_desc = tl.make_tensor_descriptor(b_ptr, [N, K_ROWS], [stride_bn, 1], [BLOCK_N, BLOCK_K])
        else:
            b_desc = tl.make_tensor_descriptor(b_ptr, [K_ROWS, N], [stride_bk, 1], [BLOCK_K, BLOCK_N])
    for tile in range(tl.program_id(0), num_tiles, num_programs):
        first_r = (tile // width) * GROUP_M
        group_rows = tl.minimum(num_block_rows - first_r, GROUP_M)
        r = first_r + (tile % width) % group_rows
        pid_n = (tile % width) // group_rows

        start = tl.load(offsets_ptr + r).to(tl.int32)
        end = tl.load(offsets_ptr + r + 1).to(tl.int32)
        start = tl.minimum(tl.maximum(start, 0), nnz)
        end = tl.minimum(tl.maximum(end, start), nnz)

        rm = tl.arange(0, BLOCK)
        rk = tl.arange(0, BLOCK_K)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        acc = tl.zeros((BLOCK, BLOCK_N), dtype=tl.float32)
        if CONTIGUOUS:
            c0 = tl.load(indices_ptr + start, mask=start < end, other=0).to(tl.int32)
            if GATHER:
                slot0 = tl.load(slots_ptr + start, mask=start < end, other=0).to(tl.int32)
            else:
                slot0 = start
        for it in range((end - start) * K_STEPS):
            i = start + it // K_STEPS
            kk = (it % K_STEPS) * BLOCK_K
            if CONTIGUOUS:
                c = c0 + (i - start)
                slot = slot0 + (i - start) * slot_step
            else:
                c = tl.load(indices_ptr + i).to(tl.int32)
                if GATHER:
                    slot = tl.load(slots_ptr + i).to(tl.int32)
                else:
                    slot = i
            c = tl.minimum(tl.maximum(c, 0), num_block_cols - 1)
            slot = tl.minimum(tl.maximum(slot, 0), nnz - 1)
            first = (c % in_blocks) * BLOCK + kk
            b_row = tl.multiple_of((c // in_blocks) * in_size + first, IN_ALIGN)
            if USE_TMA:
                if A_M_MAJOR:
                    a = tl.trans(a_desc.load([slot, kk, 0]).reshape(BLOCK_K, BLOCK))
                else:
                    a = a_desc.load([slot, 0, kk]).reshape(BLOCK, BLOCK_K)
                if B_K_MAJOR:
                    b = tl.trans(b_desc.load([pid_n * BLOCK_N, b_row]))
                else:
                    b = b_desc.load([b_row, pid_n * BLOCK_N])
            else:
                a_ptrs = (data_ptr + slot.to(tl.int64) * stride_ds + rm[:, None] * stride_dm
                          + (kk + rk)[None, :] * stride_dk)
                b_ptrs = b_ptr + (b_row + rk)[:, None] * stride_bk + rn[None, :] * stride_bn
                if MASK_IN:
                    k_ok = first + rk < in_size
                    a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
                    if EVEN_N:
                        b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
                    else:
                        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                else:
                    a = tl.load(a_ptrs)
                    if EVEN_N:
                        b = tl.load(b_ptrs)
                    else:
                        b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)

        first_row = (r % out_blocks) * BLOCK
        rows = (r // out_blocks) * out_size + first_row + rm
        out_ptrs = out_ptr + rows[:, None] * stride_om + rn[None, :] * stride_on
        mask = n_ok[None, :]
        if MASK_OUT:
            mask = mask & (first_row + rm < out_size)[:, None]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _check_offsets_int32(name: str, t: torch.Tensor) -> None:
    """Refuses a tensor whose largest element offset does not fit int32 (kernel addressing)."""
    span = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()) if s > 0)
    if span > _checks.INT32_MAX:
        raise ValueError(
            f"{name}: its largest element offset {span} (shape {tuple(t.shape)}, strides "
            f"{tuple(t.stride())}) exceeds the int32 index range ({_checks.INT32_MAX}) that the "
            "kernels address dense operands with"
        )


def _check_launch(num_programs: int) -> None:
    _checks.check_int32_range("number of programs", num_programs)


def sdd(a_MK: torch.Tensor, b_KN: torch.Tensor, row_indices: torch.Tensor,
        column_indices: torch.Tensor, offsets: torch.Tensor, *, block_size: int,
        num_block_cols: int, group_blocks: int, group_size: int, row_blocks: int,
        config: Optional[Union[SparseConfig, dict]] = None) -> torch.Tensor:
    """out_SBB[s] = block s of a_MK @ b_KN (zeros for slots at or past offsets[-1]).

    Shapes are checked by the caller (megablocks/ops/sparse.py): M = R·B; N = Q·B with
    `(group_blocks, group_size) = (1, B)`, or E·F with (C, F) and Q = E·C. `row_blocks` > 0 says
    every block row r holds the slots r·row_blocks + [0, row_blocks) (nnz = R·row_blocks);
    0 means a general BCSR matrix.
    """
    M, K = a_MK.shape
    N = b_KN.shape[1]
    nnz = row_indices.numel()
    num_block_rows = offsets.numel() - 1
    B = block_size
    out = torch.empty((nnz, B, B), dtype=a_MK.dtype, device=a_MK.device)
    if nnz == 0:
        return out
    _check_offsets_int32("a", a_MK)
    _check_offsets_int32("b", b_KN)
    cfg = with_overrides(default_config("sdd", B, a_MK.dtype, a_MK.device), config)
    structured = row_blocks > 0
    slots = min(cfg.slots, _round_down_pow2(row_blocks)) if structured else 1
    if structured:
        grid = num_block_rows * cdiv(row_blocks, slots)
    else:
        grid = nnz
    _check_launch(grid)
    num_programs = grid
    if cfg.persistent:
        num_programs = persistent_programs(a_MK.device, grid)
    block_k = min(cfg.block_k, next_power_of_2(max(K, 16)))
    b_k_major = b_KN.stride(0) == 1 and b_KN.shape[1] > 1
    use_tma = (
        cfg.use_tma
        and structured
        and row_blocks % slots == 0  # every program's SLOTS blocks lie in one row
        and group_size % B == 0  # and their dense columns are contiguous
        and tma_ok(a_MK, b_KN.t() if b_k_major else b_KN)
    )
    if use_tma:
        prepare_tma(a_MK.device)
    _sdd_kernel[(num_programs,)](
        a_MK, b_KN, out, row_indices, column_indices, offsets,
        K, N, num_block_rows, num_block_cols, nnz, row_blocks, group_blocks, group_size,
        a_MK.stride(0), a_MK.stride(1), b_KN.stride(0), b_KN.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        BLOCK=B, SLOTS=slots, BLOCK_K=block_k, GROUP_M=cfg.group_m, STRUCTURED=structured,
        EVEN_K=K % block_k == 0, MASK_COLS=group_size % B != 0,
        COL_ALIGN=math.gcd(group_size, B), PRECISION=dot_precision(a_MK.dtype),
        USE_TMA=use_tma, B_K_MAJOR=b_k_major, M=M, num_tiles=grid, num_programs=num_programs,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def dsd(data_SBB: torch.Tensor, offsets: torch.Tensor, indices: torch.Tensor,
        slots: Optional[torch.Tensor], b_KN: torch.Tensor, out_MN: torch.Tensor, *,
        transposed: bool, num_block_cols: int, out_map: Tuple[int, int],
        in_map: Tuple[int, int], slot_step: int = 0,
        config: Optional[Union[SparseConfig, dict]] = None) -> torch.Tensor:
    """out_MN = S @ b_KN, S read row by row through (offsets, indices[, slots]); fills out_MN.

    `transposed`: S is the transpose of the stored matrix (its data blocks are read transposed;
    the caller passes offsets_t, column_indices_t and block_offsets_t as `slots`).
    `num_block_cols`: block columns of S (block rows of the stored matrix when transposed).
    `out_map` / `in_map`: (C, F) expert maps of S's block rows onto out rows and of S's block
    columns onto b rows; (1, B) for the identity. `out_MN` may be any strided view (the dds
    launcher passes a transposed one). `slot_step` > 0: every row's entries are consecutive
    block columns at data slots `slot_step` apart (the dMoE topology: 1 for S, C for S^T);
    0: a general BCSR matrix.
    """
    N = b_KN.shape[1]
    nnz = data_SBB.shape[0]
    num_block_rows = offsets.numel() - 1
    B = data_SBB.shape[-1]
    if out_MN.numel() == 0:
        return out_MN
    _check_offsets_int32("b", b_KN)
    _check_offsets_int32("out", out_MN)
    cfg = with_overrides(default_config("dsd", B, data_SBB.dtype, data_SBB.device), config)
    block_n = min(cfg.block_n, max(16, next_power_of_2(N)))
    grid = num_block_rows * cdiv(N, block_n)
    _check_launch(grid)
    num_programs = grid
    if cfg.persistent:
        num_programs = persistent_programs(data_SBB.device, grid)
    stride_ds, stride_dm, stride_dk = data_SBB.stride()
    if transposed:
        stride_dm, stride_dk = stride_dk, stride_dm
    block_k = cfg.block_k
    a_m_major = stride_dm == 1 and stride_dk != 1
    b_k_major = b_KN.stride(0) == 1 and N > 1
    use_tma = (
        cfg.use_tma
        and in_map[1] % B == 0  # b's rows of a block column are whole blocks
        and (not transposed or nnz >= TMA_MIN_TRANSPOSED_STEPS * num_block_rows)
        and (stride_dm == 1 or stride_dk == 1)
        and tma_ok(data_SBB if data_SBB.stride(2) == 1 else data_SBB.transpose(1, 2),
                   b_KN.t() if b_k_major else b_KN)
    )
    if use_tma:
        prepare_tma(data_SBB.device)
    _dsd_kernel[(num_programs,)](
        data_SBB, b_KN, out_MN, offsets, indices, slots if slots is not None else indices,
        N, num_block_rows, num_block_cols, nnz, out_map[0], out_map[1], in_map[0], in_map[1],
        slot_step, stride_ds, stride_dm, stride_dk, b_KN.stride(0), b_KN.stride(1),
        out_MN.stride(0), out_MN.stride(1),
        BLOCK=B, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=cfg.group_m, GATHER=slots is not None,
        CONTIGUOUS=slot_step > 0, MASK_OUT=out_map[1] % B != 0, MASK_IN=in_map[1] % B != 0,
        EVEN_N=N % block_n == 0,
        IN_ALIGN=math.gcd(in_map[1], block_k), PRECISION=dot_precision(data_SBB.dtype),
        USE_TMA=use_tma, A_M_MAJOR=a_m_major, B_K_MAJOR=b_k_major, K_ROWS=b_KN.shape[0],
        num_tiles=grid, num_programs=num_programs,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out_MN
