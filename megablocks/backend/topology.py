"""Block-sparse topology of the dMoE expert layer, built on the device in one kernel.

Legend: E experts, B block size, C block columns per expert, R_max block rows (the static
`num_block_rows`), nnz = R_max·C block slots. `padded_bins_E` ends expert e's padded rows
(a multiple of B); expert e owns block rows [pb[e-1]/B, pb[e]/B) and block columns [e·C, (e+1)·C).
R = pb[E-1]/B block rows are in use; the rest of the R_max rows are padding.

Outputs (all int32; docs/CONTRACTS.md gives the contract):
    row_indices_S      [nnz]        i // C
    column_indices_S   [nnz]        e(i // C)·C + i % C   (e clamped to E−1 on padding rows)
    offsets_R1         [R_max + 1]  min(r, R)·C
    column_indices_t_S [nnz]        block row of the i-th block in column-major order, 0 if unused
    offsets_t_EC1      [E·C + 1]    start of block column c in column-major order
    block_offsets_t_S  [nnz]        slot in `data` of the i-th block in column-major order, 0 if unused

Every `padded_bins` value is clamped into [0, R_max·B] when loaded and every output is in range
whatever `padded_bins` holds, so a bad routing can never become an out-of-bounds address.
"""

import torch
import triton
import triton.language as tl

from megablocks.backend import cdiv

# Slots per program. The launcher needs every slot index below cdiv(slots, SLOT_TILE)·SLOT_TILE
# to fit in int32, so the op refuses more than INT32_MAX − SLOT_TILE slots.
SLOT_TILE = 1024


@triton.jit
def _bin_end(padded_bins_ptr, e, mask, max_rows, BLOCK_SIZE: tl.constexpr):
    """Block row that ends expert e's bin (padded_bins[e] / B), clamped to [0, max_rows / B]."""
    end = tl.load(padded_bins_ptr + e, mask=mask, other=0)
    end = tl.minimum(tl.maximum(end, 0), max_rows).to(tl.int32)
    return end // BLOCK_SIZE


@triton.jit
def _count_ends_at_most(padded_bins_ptr, key, mask, num_experts, scale, max_rows,
                        BLOCK_SIZE: tl.constexpr, SEARCH_STEPS: tl.constexpr):
    """#{e : bin_end(e)·scale <= key} per lane, by binary search over the sorted bin ends."""
    lo = tl.zeros_like(key)
    hi = tl.zeros_like(key) + num_experts
    for _ in tl.static_range(SEARCH_STEPS):
        open_ = mask & (lo < hi)
        mid = (lo + hi) // 2
        end = _bin_end(padded_bins_ptr, mid, open_, max_rows, BLOCK_SIZE)
        right = open_ & (end * scale <= key)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(open_ & ~right, mid, hi)
    return lo


# padded_bins_E: int32/int64 [E]; outputs as in the module docstring. Program p fills slots
# [p·BLOCK, (p+1)·BLOCK) of every output array that long (the arrays differ in length).
@triton.jit
def _topology_kernel(
    padded_bins_ptr,
    row_indices_ptr,
    column_indices_ptr,
    offsets_ptr,
    column_indices_t_ptr,
    offsets_t_ptr,
    block_offsets_t_ptr,
    num_experts,
    num_block_rows,
    block_columns,
    BLOCK_SIZE: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    slot = pid * BLOCK + tl.arange(0, BLOCK)
    nnz = num_block_rows * block_columns
    max_rows = num_block_rows * BLOCK_SIZE
    last = tl.load(padded_bins_ptr + (num_experts - 1))
    rows_used = tl.minimum(tl.maximum(last, 0), max_rows).to(tl.int32) // BLOCK_SIZE

    # Row-major (CSR): slot i is block (i // C, i % C) of the expert that owns block row i // C.
    in_blocks = slot < nnz
    row = slot // block_columns
    col = slot - row * block_columns
    expert = _count_ends_at_most(padded_bins_ptr, row, in_blocks, num_experts, 1, max_rows,
                                 BLOCK_SIZE, SEARCH_STEPS)
    expert = tl.minimum(expert, num_experts - 1)
    tl.store(row_indices_ptr + slot, row, mask=in_blocks)
    tl.store(column_indices_ptr + slot, expert * block_columns + col, mask=in_blocks)

    in_offsets = slot <= num_block_rows
    tl.store(offsets_ptr + slot, tl.minimum(slot, rows_used) * block_columns, mask=in_offsets)

    # Column-major (transpose): expert e's blocks fill slots [start_e·C, end_e·C), one block column
    # after another, each holding the expert's n_e = end_e − start_e block rows in order.
    expert_t = _count_ends_at_most(padded_bins_ptr, slot, in_blocks, num_experts, block_columns,
                                   max_rows, BLOCK_SIZE, SEARCH_STEPS)
    expert_t = tl.minimum(expert_t, num_experts - 1)
    start = _bin_end(padded_bins_ptr, expert_t - 1, in_blocks & (expert_t > 0), max_rows, BLOCK_SIZE)
    end = _bin_end(padded_bins_ptr, expert_t, in_blocks, max_rows, BLOCK_SIZE)
    rows_e = tl.maximum(end - start, 1)
    local = tl.maximum(slot - start * block_columns, 0)
    col_t = local // rows_e
    row_t = start + local - col_t * rows_e
    used = in_blocks & (slot < rows_used * block_columns)
    row_t = tl.minimum(row_t, num_block_rows - 1)
    col_t = tl.minimum(col_t, block_columns - 1)
    tl.store(column_indices_t_ptr + slot, tl.where(used, row_t, 0), mask=in_blocks)
    tl.store(block_offsets_t_ptr + slot, tl.where(used, row_t * block_columns + col_t, 0),
             mask=in_blocks)

    # offsets_t[c] for c = e·C + j: start_e·C + j·n_e; c = E·C closes the last column.
    in_offsets_t = slot <= num_experts * block_columns
    expert_c = slot // block_columns
    col_c = slot - expert_c * block_columns
    start_c = _bin_end(padded_bins_ptr, expert_c - 1, in_offsets_t & (expert_c > 0), max_rows,
                       BLOCK_SIZE)
    end_c = _bin_end(padded_bins_ptr, expert_c, in_offsets_t & (expert_c < num_experts), max_rows,
                     BLOCK_SIZE)
    end_c = tl.where(expert_c < num_experts, end_c, start_c)
    rows_c = tl.maximum(end_c - start_c, 0)
    tl.store(offsets_t_ptr + slot, start_c * block_columns + col_c * rows_c, mask=in_offsets_t)


def topology(padded_bins_E: torch.Tensor, block_size: int, num_block_rows: int, block_columns: int):
    """Launches the topology kernel; returns the six int32 arrays of the module docstring.

    No autograd and no validation: `megablocks.ops.topology` checks its inputs, including that
    `num_block_rows·block_size`, `num_block_rows·block_columns` and `E·block_columns·block_size`
    fit in int32.
    """
    device = padded_bins_E.device
    num_experts = padded_bins_E.numel()
    nnz = num_block_rows * block_columns
    row_indices = torch.empty(nnz, dtype=torch.int32, device=device)
    column_indices = torch.empty(nnz, dtype=torch.int32, device=device)
    offsets = torch.empty(num_block_rows + 1, dtype=torch.int32, device=device)
    column_indices_t = torch.empty(nnz, dtype=torch.int32, device=device)
    offsets_t = torch.empty(num_experts * block_columns + 1, dtype=torch.int32, device=device)
    block_offsets_t = torch.empty(nnz, dtype=torch.int32, device=device)
    slots = max(nnz, num_block_rows + 1, num_experts * block_columns + 1)
    _topology_kernel[(cdiv(slots, SLOT_TILE),)](
        padded_bins_E.contiguous(),
        row_indices, column_indices, offsets, column_indices_t, offsets_t, block_offsets_t,
        num_experts, num_block_rows, block_columns,
        BLOCK_SIZE=block_size, SEARCH_STEPS=num_experts.bit_length(), BLOCK=SLOT_TILE, num_warps=4,
    )
    return row_indices, column_indices, offsets, column_indices_t, offsets_t, block_offsets_t
