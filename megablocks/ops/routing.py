"""Routing metadata: sort assignments by expert, count them, and lay the experts' rows out in bins.

Legend: T tokens, K top-k, N = T·K routed rows, E experts, B block size.

    bin_ids_N, indices_N = sort(top_experts_TK.flatten(), end_bit)
    tokens_per_expert_E  = histogram(top_experts_TK.flatten(), E)
    bins_E               = inclusive_cumsum(tokens_per_expert_E, 0)
    padded_bins_E        = inclusive_cumsum(round_up(tokens_per_expert_E, B), 0)

`routing_metadata` computes all of it in one call (docs/CONTRACTS.md gives the meaning). Every op
here is sync-free on CUDA: no value is read on the host and no output shape depends on data.
Value checks (ids in range) run on CPU tensors only, or on CUDA with MEGABLOCKS_CHECK_VALUES=1.
"""

from typing import NamedTuple, Optional, Tuple

import torch

from megablocks import _checks
from megablocks.backend import routing as _backend
from megablocks.backend import csrc, use_triton
from megablocks.ops._eager import custom_op

_INT_DTYPES = (torch.int16, torch.int32, torch.int64)
_BITS = {torch.int16: 16, torch.int32: 32, torch.int64: 64}


def _check_values(name: str, t: torch.Tensor, upper: int) -> None:
    # Reading values would be data-dependent control flow under torch.compile: checks run eagerly.
    if not torch.compiler.is_compiling():
        _checks.check_index_values(name, t, upper)


def sort(x: torch.Tensor, end_bit: Optional[int] = None):
    """Stable ascending sort of the ids `x`.

    Args:
        x: 1-D int16/int32/int64 ids.
        end_bit: the number of significant bits in the ids, in [1, bits of x's dtype]; None means
            all of them (signed order). With `end_bit` given, every id must lie in
            [0, 2**end_bit) (checked on CPU; on CUDA the order of an id outside it is unspecified,
            though `indices` stays a permutation), and the sort runs on the narrowest key dtype
            that holds end_bit bits: uint8, int16, int32 or int64.

    Returns:
        `(values, indices)`, both 1-D of x's dtype: `values = x[indices]`, ascending, ties kept in
        input order (`indices` is the stable permutation).

    Raises:
        TypeError: x not a tensor of an integer dtype listed above; end_bit not an int.
        ValueError: x not 1-D; end_bit out of range; x too long for its dtype to index it;
            ids outside [0, 2**end_bit) on CPU.
    """
    _checks.check_tensor("x", x, ndim=1, dtypes=_INT_DTYPES)
    bits = _BITS[x.dtype]
    if end_bit is not None:
        _checks.check_int("end_bit", end_bit, min_value=1, max_value=bits)
    if x.numel() > torch.iinfo(x.dtype).max + 1:
        raise ValueError(
            f"x: {x.numel()} elements cannot be indexed by {str(x.dtype).replace('torch.', '')} "
            "indices; pass a wider dtype"
        )
    if end_bit is None:
        values, indices = torch.sort(x, stable=True)
        return values, indices.to(x.dtype)
    _check_values("x", x, 2**end_bit)
    order = _stable_argsort(x, end_bit)[1]
    return x[order], order.to(x.dtype)


def _stable_argsort(x: torch.Tensor, end_bit: int):
    """Sorted keys (narrowed to `end_bit` bits' dtype) and the int64 stable permutation."""
    return torch.sort(x.to(_backend.sort_key_dtype(end_bit)), stable=True)


def _histogram_reference(x_MN: torch.Tensor, max_val: int) -> torch.Tensor:
    """Plain-torch histogram per row; ids outside [0, max_val) are ignored."""
    rows = []
    for row in x_MN:
        valid = (row >= 0) & (row < max_val)
        rows.append(torch.bincount(row[valid].long(), minlength=max_val))
    if not rows:
        return torch.zeros((0, max_val), dtype=torch.int32, device=x_MN.device)
    return torch.stack(rows).to(torch.int32)


def _compiled_histogram(x_MN: torch.Tensor, max_val: int):
    """The compiled module (csrc/histogram.cu) where it takes this call, else None.

    When built (`MEGABLOCKS_BUILD_CUDA=1`), it replaces the Triton kernel for one row of int32/int64
    ids on CUDA and up to 12288 bins: same counts (ids out of range ignored, integer atomics), 2-3.5x
    faster (benchmarks/RESULTS.md, "Optional compiled op").
    """
    if not x_MN.is_cuda or x_MN.shape[0] != 1 or max_val > 12288 or x_MN.dtype not in (torch.int32, torch.int64):
        return None
    return csrc.load()


@custom_op("histogram")
def _histogram_op(x_MN: torch.Tensor, max_val: int) -> torch.Tensor:
    compiled = _compiled_histogram(x_MN, max_val)
    if compiled is not None:
        return compiled.histogram(x_MN.reshape(-1), max_val).view(1, max_val)
    if use_triton(x_MN):
        return _backend.histogram(x_MN, max_val)
    return _histogram_reference(x_MN, max_val)


@_histogram_op.register_fake
def _(x_MN, max_val):
    return x_MN.new_empty((x_MN.shape[0], max_val), dtype=torch.int32)


def histogram(x: torch.Tensor, max_val: int) -> torch.Tensor:
    """Counts of each id in [0, max_val).

    Args:
        x: int16/int32/int64 ids, 1-D `[N]`, or 2-D `[M, N]` for M independent histograms
            (M <= 65535).
        max_val: the number of bins (experts), >= 1.

    Returns:
        int32 `[max_val]` (or `[M, max_val]`). On CUDA, ids outside [0, max_val) are not counted
        and never used as an address; on CPU they raise ValueError. Exact and deterministic
        (integer atomics); no host sync.

    Raises:
        TypeError: x not a tensor of an integer dtype listed above; max_val not an int.
        ValueError: x not 1-D or 2-D; M > 65535; max_val < 1; ids out of range on CPU.
    """
    _checks.check_tensor("x", x, dtypes=_INT_DTYPES)
    if x.dim() not in (1, 2):
        raise ValueError(f"x: expected a 1-D or 2-D tensor, got shape {tuple(x.shape)}")
    _checks.check_int("max_val", max_val, min_value=1, max_value=_checks.INT32_MAX)
    if x.dim() == 2 and x.shape[0] > 65535:
        raise ValueError(f"x: expected at most 65535 rows of ids, got {x.shape[0]}")
    _check_values("x", x, max_val)
    if x.dim() == 1:
        return _histogram_op(x.view(1, -1), max_val)[0]
    return _histogram_op(x, max_val)


def _check_cumsum_args(x: torch.Tensor, dim: int) -> None:
    _checks.check_tensor("x", x, dtypes=_INT_DTYPES)
    if x.dim() == 0:
        raise ValueError("x: expected a tensor of at least 1 dimension, got a scalar")
    _checks.check_int("dim", dim, min_value=-x.dim(), max_value=x.dim() - 1)


def inclusive_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """`out[..., i, ...] = sum(x[..., :i + 1, ...])` along `dim`, in x's integer dtype.

    Raises:
        TypeError: x not an int16/int32/int64 tensor; dim not an int.
        ValueError: x a scalar; dim out of range.
    """
    _check_cumsum_args(x, dim)
    return torch.cumsum(x, dim, dtype=x.dtype)


def exclusive_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """`out[..., i, ...] = sum(x[..., :i, ...])` along `dim` (0 first), in x's integer dtype.

    Raises:
        TypeError: x not an int16/int32/int64 tensor; dim not an int.
        ValueError: x a scalar; dim out of range.
    """
    _check_cumsum_args(x, dim)
    return torch.cumsum(x, dim, dtype=x.dtype) - x


def round_up(x: torch.Tensor, value: int) -> torch.Tensor:
    """Each element of `x` rounded up to a multiple of `value` (x's integer dtype).

    The result wraps (like any torch integer arithmetic) only where the rounded value itself does
    not fit x's dtype.

    Raises:
        TypeError: x not an int16/int32/int64 tensor; value not an int.
        ValueError: value < 1, or value beyond the range of x's dtype.
    """
    _checks.check_tensor("x", x, dtypes=_INT_DTYPES)
    _checks.check_int("value", value, min_value=1, max_value=torch.iinfo(x.dtype).max)
    # x + ((-x) mod value), not floor((x + value - 1) / value) · value: no intermediate overflow.
    return x + torch.remainder(-x, value)


def padded_rows_bound(num_rows: int, num_experts: int, block_size: int) -> int:
    """Static upper bound on `padded_bins[-1]`: `((N + E·(B−1)) // B) · B` (a host int).

    Each expert pads its rows to a multiple of B, adding at most B−1 rows, so this bound holds
    whatever the routing; buffers sized with it need no host sync.
    """
    _checks.check_int("num_rows", num_rows, min_value=0)
    _checks.check_int("num_experts", num_experts, min_value=1)
    _checks.check_int("block_size", block_size, min_value=1)
    return (num_rows + num_experts * (block_size - 1)) // block_size * block_size


@custom_op("small_routing")
def _small_routing_op(
    x_N: torch.Tensor, num_experts: int, block_size: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backend.small_routing(x_N, num_experts, block_size)


@_small_routing_op.register_fake
def _(x_N, num_experts, block_size):
    n, e = x_N.shape[0], num_experts
    return tuple(x_N.new_empty(size, dtype=torch.int32) for size in (n, n, e, e, e))


class RowMaps(NamedTuple):
    """Where each routed assignment's row lives, both ways: the one routing-map type of training
    (`megablocks.ops.route`), dMoE's inference form, `fused_moe` and the transformers experts
    path (`row_maps`). Reused by a gather, the grouped GEMMs that read token rows through it and
    the scatter that undoes it, so the routing is computed once per layer instead of per op.
    An assignment `a` is token `a // top_k`'s choice `a % top_k`."""

    assignment_row: torch.Tensor  # [N] int32: the row of assignment a (-1: none)
    row_assignment: torch.Tensor  # [R] int32: the assignment in row r (-1: a padding row)
    top_k: int


class RoutingMetadata(NamedTuple):
    """The binning of N routed rows over E experts (docs/CONTRACTS.md); every field int32."""

    indices: torch.Tensor  # [N] positions in the flattened [T·K] assignments, expert-sorted
    bin_ids: torch.Tensor  # [N] the expert of each sorted row
    tokens_per_expert: torch.Tensor  # [E]
    bins: torch.Tensor  # [E] inclusive cumsum of tokens_per_expert
    padded_bins: torch.Tensor  # [E] inclusive cumsum of tokens_per_expert rounded up to B


def routing_metadata(top_experts_TK: torch.Tensor, num_experts: int, block_size: int, *,
                     small_routing: bool = True) -> RoutingMetadata:
    """Sorts, counts and bins the expert assignments, on the device and without a host sync.

    Args:
        top_experts_TK: int16/int32/int64 expert ids, any shape (flattened row-major to `[N]`),
            each in [0, num_experts) (checked on CPU; on CUDA an id out of range is not counted).
        num_experts: E >= 1.
        block_size: B >= 1, the multiple each expert's rows are padded to.
        small_routing: take the one-kernel form where it applies (`KernelPolicy.small_routing`;
            measured on the H100: qwen3_decode's eager forward 2.01 -> 1.37 ms, no change elsewhere).

    Returns:
        `RoutingMetadata(indices, bin_ids, tokens_per_expert, bins, padded_bins)`, all int32.
        With `small_routing`, up to 4096 routed rows and 1022 experts (decoding sizes) one kernel
        computes all five (`megablocks.backend.routing.small_routing`); otherwise a sort, the
        histogram and cumsums.

    Raises:
        TypeError / ValueError: as for `sort` and `histogram`; ids out of range on CPU.
    """
    _checks.check_tensor("top_experts_TK", top_experts_TK, dtypes=_INT_DTYPES)
    _checks.check_int("num_experts", num_experts, min_value=1, max_value=_checks.INT32_MAX)
    _checks.check_int("block_size", block_size, min_value=1)
    _check_values("top_experts_TK", top_experts_TK, num_experts)
    experts_N = top_experts_TK.reshape(-1)
    if (
        small_routing
        and use_triton(experts_N)
        and experts_N.numel() <= _backend.SMALL_ROUTING_MAX_ROWS
        and num_experts <= _backend.SMALL_ROUTING_MAX_EXPERTS
        and block_size <= _checks.INT32_MAX // _backend.SMALL_ROUTING_MAX_ROWS
    ):
        return RoutingMetadata(*_small_routing_op(experts_N, num_experts, block_size))
    end_bit = max(1, (num_experts - 1).bit_length())
    sorted_keys, order = _stable_argsort(experts_N, end_bit)
    bin_ids, indices = sorted_keys.to(torch.int32), order.to(torch.int32)
    tokens_per_expert = histogram(experts_N, num_experts)
    bins = inclusive_cumsum(tokens_per_expert, 0)
    padded_bins = inclusive_cumsum(round_up(tokens_per_expert, block_size), 0)
    return RoutingMetadata(indices, bin_ids, tokens_per_expert, bins, padded_bins)


def row_maps(top_experts_TK: torch.Tensor, num_experts: int) -> Tuple[torch.Tensor, RowMaps]:
    """`(tokens_per_expert_E, RowMaps)` of the plain layout, by the fewest launches (what the
    inference paths run): one program up to 4096 routed rows and 1022 experts, else three
    (`megablocks.backend.routing.routing_maps`). Rows in expert order, an expert's rows in
    assignment order (as `route` lays them out); ids outside [0, E) take the rows after all
    experts' (counted by none). `top_experts_TK`: `[T, top_k]` integer ids on a device the
    Triton kernels run on; no validation (the caller's)."""
    top_k = top_experts_TK.shape[1] if top_experts_TK.dim() == 2 else 1
    counts_E, assignment_row_N, row_assignment_N = _backend.routing_maps(top_experts_TK.reshape(-1), num_experts)
    return counts_E, RowMaps(assignment_row_N, row_assignment_N, top_k)


def padded_row_maps(top_experts_TK: torch.Tensor, num_experts: int,
                    block_size: int) -> Tuple[torch.Tensor, torch.Tensor, RowMaps]:
    """`(tokens_per_expert_E, padded_bins_E, RowMaps)` of the padded layout (`block_size`-row
    blocks, `padded_rows_bound(N, E, block_size)` rows): what `routing_metadata` then `route` with
    its padded bins give (bitwise, for ids in range), in five launches
    (`megablocks.backend.routing.padded_routing_maps`; E up to `PADDED_MAPS_MAX_EXPERTS`).
    `top_experts_TK`: `[T, top_k]` integer ids on a device the Triton kernels run on; no
    validation (the caller's); ids outside [0, E) are counted by none and take no row."""
    top_k = top_experts_TK.shape[1] if top_experts_TK.dim() == 2 else 1
    num_rows = padded_rows_bound(top_experts_TK.numel(), num_experts, block_size)
    counts_E, padded_bins_E, assignment_row_N, row_assignment_P = _backend.padded_routing_maps(
        top_experts_TK.reshape(-1), num_experts, block_size, num_rows)
    return counts_E, padded_bins_E, RowMaps(assignment_row_N, row_assignment_P, top_k)
