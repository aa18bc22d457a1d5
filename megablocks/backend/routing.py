"""Histogram of integer ids on the device, for routing metadata.

    counts_MV[m, v] = #{i : x_MN[m, i] == v}   for v in [0, V)

Legend: M rows of independent histograms (1 for the usual flat case), N ids per row, V bins
(`max_val`, the number of experts). Ids outside [0, V) are ignored, never used as an address.

Why a kernel and not a torch op: `torch.bincount` reads the maximum on the host (a sync), and
`scatter_add_`/`index_add_` with an id out of range is a device-side assert. `torch.histc` on the
ids cast to float is sync-free but refuses to run under `torch.use_deterministic_algorithms(True)`
on CUDA and counts in float. This kernel counts in int32 with integer atomics, so it is exact and
deterministic; benchmarks/bench_topology.py times it against histc.
"""

import torch
import triton
import triton.language as tl

from megablocks.backend import cdiv, next_power_of_2
from megablocks.backend.launch import pdl_launch, pdl_start

# Bins per program-local histogram at most. Up to this, each program reduces its ids with
# `tl.histogram` (log2(bins) warp ballots per id) and adds one count per bin to global memory; above
# it, the per-thread bin work outgrows the atomics' contention, so each id gets its own atomic
# (benchmarks/RESULTS.md, "Measurements behind the kernels' defaults").
LOCAL_HISTOGRAM_MAX_BINS = 512


# x_MN: ids (any integer dtype), rows `stride_xm` apart; counts_MV: int32, zero on entry.
# Program (n-block, m) counts BLOCK ids of row m.
@triton.jit
def _histogram_kernel(
    x_ptr,
    counts_ptr,
    num_ids,
    max_val,
    stride_xm,
    BLOCK: tl.constexpr,
    NUM_BINS: tl.constexpr,
    LOCAL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs = pid_n * BLOCK + tl.arange(0, BLOCK)
    in_row = offs < num_ids
    ids = tl.load(x_ptr + pid_m.to(tl.int64) * stride_xm + offs, mask=in_row, other=-1)
    # Compare in the ids' own dtype before narrowing, so a wide id cannot wrap into range.
    valid = in_row & (ids >= 0) & (ids < max_val)
    row_counts = counts_ptr + pid_m.to(tl.int64) * max_val
    if LOCAL:
        # Invalid ids go to bin `max_val`, a spare bin that is never written back:
        # tl.histogram reads only the low log2(NUM_BINS) bits of each id.
        binned = tl.where(valid, ids, max_val).to(tl.int32)
        local = tl.histogram(binned, NUM_BINS)
        bins = tl.arange(0, NUM_BINS)
        tl.atomic_add(row_counts + bins, local, mask=(bins < max_val) & (local > 0), sem="relaxed")
    else:
        safe = tl.where(valid, ids, 0).to(tl.int32)
        tl.atomic_add(row_counts + safe, tl.full([BLOCK], 1, tl.int32), mask=valid, sem="relaxed")


def histogram(x_MN: torch.Tensor, max_val: int, *, local=None) -> torch.Tensor:
    """Counts of each id in [0, max_val) per row of `x_MN` (int32 `[M, max_val]`).

    No autograd, no validation beyond what the launch needs: the op in `megablocks.ops.routing`
    checks its inputs. `local` forces the program-local histogram on or off (for benchmarks);
    by default it is used when `next_power_of_2(max_val + 1) <= LOCAL_HISTOGRAM_MAX_BINS`.
    """
    x_MN = x_MN.contiguous()
    num_rows, num_ids = x_MN.shape
    counts_MV = torch.zeros((num_rows, max_val), dtype=torch.int32, device=x_MN.device)
    if num_ids == 0 or num_rows == 0 or max_val == 0:
        return counts_MV
    num_bins = next_power_of_2(max_val + 1)  # one spare bin for invalid ids
    if local is None:
        local = num_bins <= LOCAL_HISTOGRAM_MAX_BINS
    block = 4096 if local else 1024
    grid = (cdiv(num_ids, block), num_rows)
    _histogram_kernel[grid](
        x_MN, counts_MV, num_ids, max_val, x_MN.stride(0),
        BLOCK=block, NUM_BINS=num_bins, LOCAL=bool(local), num_warps=4,
    )
    return counts_MV


# ------------------------------------------------------------------------------------------------
# All of `routing_metadata` in one program, for the small N of decoding.
#
#   key_N      = x_N where 0 <= x_N < E, else E           (an id out of range sorts after all)
#   packed_N   = key_N << ID_BITS | n                     (ties in input order: a stable sort)
#   sorted     = sort(packed_N)
#   indices_N  = sorted & (2**ID_BITS - 1),  bin_ids_N = sorted >> ID_BITS
#   counts_E   = histogram(key_N),  bins_E = cumsum(counts),  padded_bins_E = cumsum(round_up(counts, B))
#
# One launch instead of the sort, histogram, cumsums and round-up of the general path (whose
# host-side cost dominates at decode sizes). The whole block of N ids lives in one program.
# With MAPS it also writes the plain layout's row maps for K ids per token:
#   assignment_row_N[indices_N[r]] = r                the row of each assignment (the inverse)
#   row_assignment_N[r] = indices_N[r]                the assignment of each row (token // K)

SMALL_ROUTING_MAX_ROWS = 4096
SMALL_ROUTING_MAX_EXPERTS = 1022  # E + 2 keys fit 1024 histogram bins
_ID_BITS = 12  # log2(SMALL_ROUTING_MAX_ROWS)


@triton.jit
def _small_routing_kernel(
    x_ptr, indices_ptr, bin_ids_ptr, counts_ptr, bins_ptr, padded_bins_ptr,
    assignment_row_ptr, row_assignment_ptr,
    num_ids, num_experts, block_size,
    BLOCK_N: tl.constexpr, NUM_BINS: tl.constexpr, ID_BITS: tl.constexpr, MAPS: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_start(PDL)
    n = tl.arange(0, BLOCK_N)
    present = n < num_ids
    ids = tl.load(x_ptr + n, mask=present, other=0)
    # Compare in the ids' own dtype before narrowing, so a wide id cannot wrap into range.
    key = tl.where((ids >= 0) & (ids < num_experts), ids, num_experts).to(tl.int32)
    # Lanes past N sort after every id (key num_experts + 1) and are never stored.
    key = tl.where(present, key, num_experts + 1)
    packed = tl.sort((key << ID_BITS) | n)
    tl.store(indices_ptr + n, packed & ((1 << ID_BITS) - 1), mask=present)
    tl.store(bin_ids_ptr + n, packed >> ID_BITS, mask=present)
    if MAPS:
        assignment = packed & ((1 << ID_BITS) - 1)
        tl.store(assignment_row_ptr + assignment, n, mask=present)
        tl.store(row_assignment_ptr + n, assignment, mask=present)

    counts = tl.histogram(key, NUM_BINS)  # bins num_experts, num_experts + 1 are never stored
    e = tl.arange(0, NUM_BINS)
    expert = e < num_experts
    counts = tl.where(expert, counts, 0)
    padded = (counts + block_size - 1) // block_size * block_size
    tl.store(counts_ptr + e, counts, mask=expert)
    tl.store(bins_ptr + e, tl.cumsum(counts, 0), mask=expert)
    tl.store(padded_bins_ptr + e, tl.cumsum(padded, 0), mask=expert)


def small_routing(x_N: torch.Tensor, num_experts: int, block_size: int):
    """`(indices, bin_ids, tokens_per_expert, bins, padded_bins)`, int32, for N <= 4096 ids and
    E <= 1022 experts, in one launch (see above). Validation is the caller's."""
    x_N = x_N.contiguous()
    n = x_N.numel()
    out_n = [torch.empty(n, dtype=torch.int32, device=x_N.device) for _ in range(2)]
    out_e = [torch.empty(num_experts, dtype=torch.int32, device=x_N.device) for _ in range(3)]
    if n == 0:
        for t in out_e:
            t.zero_()
        return (*out_n, *out_e)
    _launch_small_routing(x_N, out_n, out_e, num_experts, block_size, None)
    return (*out_n, *out_e)


def _launch_small_routing(x_N, out_n, out_e, num_experts, block_size, maps):
    _small_routing_kernel[(1,)](
        x_N, *out_n, *out_e, *(maps if maps is not None else out_n), x_N.numel(), num_experts, block_size,
        BLOCK_N=max(16, next_power_of_2(x_N.numel())),
        NUM_BINS=max(16, next_power_of_2(num_experts + 2)),
        ID_BITS=_ID_BITS, MAPS=maps is not None, num_warps=4 if x_N.numel() <= 1024 else 8, **pdl_launch(x_N),
    )


def small_routing_maps(x_N: torch.Tensor, num_experts: int):
    """`(tokens_per_expert_E, assignment_row_N, row_assignment_N)`, int32, in one launch: the
    expert counts of the ids and the plain layout's row maps (see above; `x_N` the flattened
    `[T, top_k]` ids, N <= 4096, E <= 1022). Rows in expert order, an
    expert's rows in assignment order; ids outside [0, E) take the rows after all experts'
    (counted by no expert). Validation is the caller's."""
    x_N = x_N.contiguous()
    n = x_N.numel()
    # One allocation (host time at decode sizes): indices, bin_ids, the two maps, three [E] rows.
    buf = torch.empty(4 * n + 3 * num_experts, dtype=torch.int32, device=x_N.device)
    views = buf.split([n, n, n, n, num_experts, num_experts, num_experts])
    out_n, out_e = list(views[:4]), list(views[4:])
    if n == 0:
        return out_e[0].zero_(), out_n[2], out_n[3]
    _launch_small_routing(x_N, out_n[:2], out_e, num_experts, 1, out_n[2:])
    return out_e[0], out_n[2], out_n[3]


# ------------------------------------------------------------------------------------------------
# The same counts and row maps for any N, in three launches (past one program's N):
#
#   key_N              = x_N where 0 <= x_N < E, else E     one kernel, in the narrowest key dtype
#   keys, order_N      = stable sort of key_N               torch.sort (a radix sort on CUDA)
#   assignment_row_N[order[r]] = r,  row_assignment_N[r] = order[r]
#   counts_E[e]        = lower_bound(keys, e + 1) - lower_bound(keys, e)   a binary search per expert
#
# The last line and the maps are one launch: its first programs write the maps, the rest count.
# Against the general path's sort, casts, histogram, cumsums and route (about ten launches, whose
# host time is most of an eager prefill-sized call's), three; no zero-fill, no atomics.

_MAPS_BLOCK = 1024
_COUNTS_BLOCK = 128


def sort_key_dtype(end_bit: int) -> torch.dtype:
    """The narrowest dtype holding non-negative keys below 2**end_bit. torch.sort is a radix sort
    on CUDA whose passes grow with the key width (benchmarks/RESULTS.md, "Measurements behind
    the kernels' defaults")."""
    if end_bit <= 8:
        return torch.uint8
    if end_bit <= 15:
        return torch.int16
    return torch.int32 if end_bit <= 31 else torch.int64


@triton.jit
def _routing_keys_kernel(x_ptr, keys_ptr, num_ids, num_experts, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    present = offs < num_ids
    ids = tl.load(x_ptr + offs, mask=present, other=0)
    # Compare in the ids' own dtype before narrowing, so a wide id cannot wrap into range.
    key = tl.where((ids >= 0) & (ids < num_experts), ids, num_experts)
    tl.store(keys_ptr + offs, key.to(keys_ptr.dtype.element_ty), mask=present)


@triton.jit
def _lower_bound(keys_ptr, target, num_ids, SEARCH_STEPS: tl.constexpr):
    """Per lane, the first position of the sorted keys [0, num_ids) whose key is >= target."""
    lo = tl.zeros(target.shape, dtype=tl.int32)
    hi = tl.zeros(target.shape, dtype=tl.int32) + num_ids
    for _ in tl.static_range(SEARCH_STEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        below = tl.load(keys_ptr + mid, mask=active, other=0).to(tl.int32) < target
        lo = tl.where(active & below, mid + 1, lo)
        hi = tl.where(active & ~below, mid, hi)
    return lo


@triton.jit
def _sorted_maps_kernel(
    keys_ptr, order_ptr, counts_ptr, assignment_row_ptr, row_assignment_ptr,
    num_ids, num_experts, map_programs,
    BLOCK: tl.constexpr, BLOCK_E: tl.constexpr, SEARCH_STEPS: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < map_programs:
        r = pid * BLOCK + tl.arange(0, BLOCK)
        present = r < num_ids
        assignment = tl.load(order_ptr + r, mask=present, other=0).to(tl.int32)
        tl.store(assignment_row_ptr + assignment, r, mask=present)
        tl.store(row_assignment_ptr + r, assignment, mask=present)
    else:
        e = (pid - map_programs) * BLOCK_E + tl.arange(0, BLOCK_E)
        first = _lower_bound(keys_ptr, e, num_ids, SEARCH_STEPS)
        past = _lower_bound(keys_ptr, e + 1, num_ids, SEARCH_STEPS)
        tl.store(counts_ptr + e, past - first, mask=e < num_experts)


def sorted_routing_maps(x_N: torch.Tensor, num_experts: int):
    """`(tokens_per_expert_E, assignment_row_N, row_assignment_N)`, int32: what `small_routing_maps`
    computes (the same values), for any N and E, in three launches (see above): a key kernel,
    `torch.sort` and one kernel for the maps and counts. Validation is the caller's."""
    x_N = x_N.contiguous()
    n = x_N.numel()
    buf = torch.empty(2 * n + num_experts, dtype=torch.int32, device=x_N.device)
    counts_E, assignment_row_N, row_assignment_N = buf.split([num_experts, n, n])
    if n == 0:
        return counts_E.zero_(), assignment_row_N, row_assignment_N
    keys_N = torch.empty(n, dtype=sort_key_dtype(num_experts.bit_length()), device=x_N.device)  # keys <= E
    map_programs = cdiv(n, _MAPS_BLOCK)
    _routing_keys_kernel[(map_programs,)](x_N, keys_N, n, num_experts, BLOCK=_MAPS_BLOCK, num_warps=4)
    keys_N, order_N = torch.sort(keys_N, stable=True)
    _sorted_maps_kernel[(map_programs + cdiv(num_experts, _COUNTS_BLOCK),)](
        keys_N, order_N, counts_E, assignment_row_N, row_assignment_N, n, num_experts, map_programs,
        BLOCK=_MAPS_BLOCK, BLOCK_E=_COUNTS_BLOCK, SEARCH_STEPS=(n + 1).bit_length(), num_warps=4,
    )
    return counts_E, assignment_row_N, row_assignment_N


# ------------------------------------------------------------------------------------------------
# The padded layout's counts, bins and row maps (the block-sparse path's routing) past one
# program's N, in five launches: the key kernel and the stable sort as above, then
#
#   counts_E, padded_bins_E   one program: each expert's count by binary search, rounded up to the
#                             block, and their inclusive cumsum; offset_E = padded start - start
#   row_assignment_P = -1     (a fill: padding rows)
#   row r (sorted) of expert e = keys[r]:  padded row r + offset[e]; both maps written from it
#
# against the general path's sort, casts, histogram, round-up and cumsums and `route` (about
# twelve launches). Ids outside [0, E) are counted by none and routed nowhere (assignment_row -1).

PADDED_MAPS_MAX_EXPERTS = 1024  # the experts one program counts


@triton.jit
def _padded_counts_kernel(keys_ptr, counts_ptr, padded_bins_ptr, offsets_ptr, num_ids, num_experts, block_size,
                          BLOCK_E: tl.constexpr, SEARCH_STEPS: tl.constexpr):
    e = tl.arange(0, BLOCK_E)
    valid = e < num_experts
    first = _lower_bound(keys_ptr, e, num_ids, SEARCH_STEPS)
    past = _lower_bound(keys_ptr, e + 1, num_ids, SEARCH_STEPS)
    counts = tl.where(valid, past - first, 0)
    padded = (counts + block_size - 1) // block_size * block_size
    padded_end = tl.cumsum(padded, 0)
    tl.store(counts_ptr + e, counts, mask=valid)
    tl.store(padded_bins_ptr + e, padded_end, mask=valid)
    tl.store(offsets_ptr + e, padded_end - padded - first, mask=valid)


@triton.jit
def _padded_maps_kernel(keys_ptr, order_ptr, offsets_ptr, assignment_row_ptr, row_assignment_ptr, num_ids,
                        num_experts, BLOCK: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    present = r < num_ids
    key = tl.load(keys_ptr + r, mask=present, other=0).to(tl.int32)
    assignment = tl.load(order_ptr + r, mask=present, other=0).to(tl.int32)
    routed = present & (key < num_experts)
    row = r + tl.load(offsets_ptr + key, mask=routed, other=0)
    tl.store(assignment_row_ptr + assignment, tl.where(routed, row, -1), mask=present)
    tl.store(row_assignment_ptr + row, assignment, mask=routed)


def padded_routing_maps(x_N: torch.Tensor, num_experts: int, block_size: int, num_rows: int):
    """`(tokens_per_expert_E, padded_bins_E, assignment_row_N, row_assignment_P)`, int32, of the ids
    `x_N` (the flattened `[T, top_k]`) in the padded layout of `block_size`-row blocks: P =
    `num_rows` rows (the caller's `padded_rows_bound(N, E, block_size)`), expert e's rows from
    `padded_bins[e-1]` on, in assignment order, padding rows -1 in `row_assignment`. Ids outside
    [0, E) are counted by none and take no row (assignment_row -1). E <= PADDED_MAPS_MAX_EXPERTS.
    Validation is the caller's."""
    x_N = x_N.contiguous()
    n = x_N.numel()
    buf = torch.empty(3 * num_experts + n, dtype=torch.int32, device=x_N.device)
    counts_E, padded_bins_E, offsets_E, assignment_row_N = buf.split([num_experts, num_experts, num_experts, n])
    row_assignment_P = torch.full((num_rows,), -1, dtype=torch.int32, device=x_N.device)
    if n == 0:
        return counts_E.zero_(), padded_bins_E.zero_(), assignment_row_N, row_assignment_P
    keys_N = torch.empty(n, dtype=sort_key_dtype(num_experts.bit_length()), device=x_N.device)  # keys <= E
    programs = cdiv(n, _MAPS_BLOCK)
    _routing_keys_kernel[(programs,)](x_N, keys_N, n, num_experts, BLOCK=_MAPS_BLOCK, num_warps=4)
    keys_N, order_N = torch.sort(keys_N, stable=True)
    _padded_counts_kernel[(1,)](
        keys_N, counts_E, padded_bins_E, offsets_E, n, num_experts, block_size,
        BLOCK_E=max(16, next_power_of_2(num_experts)), SEARCH_STEPS=(n + 1).bit_length(), num_warps=4,
    )
    _padded_maps_kernel[(programs,)](
        keys_N, order_N, offsets_E, assignment_row_N, row_assignment_P, n, num_experts, BLOCK=_MAPS_BLOCK,
        num_warps=4,
    )
    return counts_E, padded_bins_E, assignment_row_N, row_assignment_P


def routing_maps(x_N: torch.Tensor, num_experts: int):
    """`(tokens_per_expert_E, assignment_row_N, row_assignment_N)`, int32, of the ids `x_N` (the
    flattened `[T, top_k]`): one program (`small_routing_maps`) where N <= 4096 and E <= 1022,
    else `sorted_routing_maps`. Rows in expert order, an expert's rows in assignment order; ids
    outside [0, E) take the rows after all experts' (counted by none). Validation is the caller's."""
    if x_N.numel() <= SMALL_ROUTING_MAX_ROWS and num_experts <= SMALL_ROUTING_MAX_EXPERTS:
        return small_routing_maps(x_N, num_experts)
    return sorted_routing_maps(x_N, num_experts)
