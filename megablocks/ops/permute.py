"""Gather token rows into expert order and scatter them back (MegaBlocks' permute ops).

Legend: T tokens, H hidden, K top-k, N = T·K routed assignments, E experts, P padded rows,
C rows per expert (capacity) in the binned layout. Routing metadata as in docs/CONTRACTS.md:
`indices_N[i]` is the flattened assignment (token `indices_N[i] // K`) at sorted position i,
`bin_ids_N[i]` its expert, `bins_E` / `padded_bins_E` the inclusive ends of each expert's rows.

Three layouts of the expert-ordered rows, each with a gather (token order → expert order) and a
scatter (expert order → token order, weighted sum over the K choices of each token):

    gather / scatter                 [N, H]      sorted row i at row i
    padded_gather / padded_scatter   [P, H]      at padded_bins[e-1] + (i - bins[e-1]); P static
    binned_gather / binned_scatter   [E, C, H]   at [e, i - bins[e-1]] if that is < C, else dropped

Both directions are differentiable in `x` and, for the scatters, in `weights`. Every result is
deterministic; a scatter sums the K weighted rows of a token in fp32, k in order
(`acc = acc + w · x`), then rounds once to x's dtype, exactly like the references below.

Each op runs a Triton kernel (megablocks/backend/permute.py) on CUDA tensors and on CPU tensors
under TRITON_INTERPRET=1; otherwise the plain-torch reference in this file.
"""

from typing import Optional, Tuple

import torch

from megablocks import _checks
from megablocks.backend import permute as kernels
from megablocks.backend import use_triton
from megablocks.ops._eager import custom_op
from megablocks.ops.routing import RowMaps, padded_rows_bound

__all__ = [
    "binned_gather",
    "binned_scatter",
    "gather",
    "padded_gather",
    "padded_scatter",
    "scatter",
]


# --------------------------------------------------------------------------------------------------
# References (plain torch). CPU tensors run these when the interpreter is off.


def _exclusive_starts(ends_E: torch.Tensor) -> torch.Tensor:
    return torch.cat([ends_E.new_zeros(1), ends_E[:-1]]).long()


def route_reference(
    indices_N: torch.Tensor,
    bins_E: torch.Tensor,
    *,
    layout: str,
    num_rows: int,
    bin_ids_N: Optional[torch.Tensor] = None,
    padded_bins_E: Optional[torch.Tensor] = None,
    bin_size: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """`(assignment_row_N, row_assignment_R)`: the buffer row of each assignment and the
    assignment of each buffer row (int32, -1 where none), as in megablocks/backend/permute.py."""
    n = indices_N.numel()
    i = torch.arange(n, device=indices_N.device)
    if layout == "plain":
        row = i
    else:
        if bin_ids_N is not None:
            e = bin_ids_N.long()
        else:
            e = torch.searchsorted(bins_E.long(), i, right=True)
        j = i - _exclusive_starts(bins_E)[e]
        if layout == "padded":
            row = _exclusive_starts(padded_bins_E)[e] + j
        else:
            row = torch.where(j < bin_size, e * bin_size + j, -1)
    assignment_row = torch.full((n,), -1, dtype=torch.int32, device=indices_N.device)
    assignment_row[indices_N.long()] = row.int()
    # Dropped assignments are written to a spare last row, which is cut off.
    row_assignment = torch.full((num_rows + 1,), -1, dtype=torch.int32, device=indices_N.device)
    row_assignment[torch.where(row >= 0, row, num_rows)] = indices_N.int()
    return assignment_row, row_assignment[:num_rows].clone()


def gather_rows_reference(
    x_TH: torch.Tensor, row_assignment_R: torch.Tensor, weights_N: Optional[torch.Tensor], top_k: int
) -> torch.Tensor:
    """`out[r] = weights[a] · x[a // top_k]` (product in fp32) for a = row_assignment[r]; 0 where a = -1."""
    filled = row_assignment_R >= 0
    if x_TH.shape[0] == 0:
        return x_TH.new_zeros(row_assignment_R.numel(), x_TH.shape[1])
    a = row_assignment_R.long().clamp(min=0)
    out = x_TH[a // top_k]
    if weights_N is not None:
        out = (out.float() * weights_N.float()[a, None]).to(x_TH.dtype)
    return out.masked_fill(~filled[:, None], 0)


def scatter_rows_reference(
    x_RH: torch.Tensor, assignment_row_N: torch.Tensor, weights_N: Optional[torch.Tensor], top_k: int,
    round_terms: bool = False,
) -> torch.Tensor:
    """`out[t] = Σ_k weights[a] · x[assignment_row[a]]`, a = t·top_k + k, summed in fp32, k in order
    (with `round_terms`, each weighted row rounded to x's dtype first)."""
    tokens = assignment_row_N.numel() // top_k
    rows_TK = assignment_row_N.long().view(tokens, top_k)
    acc = torch.zeros(tokens, x_RH.shape[1], dtype=torch.float32, device=x_RH.device)
    if x_RH.shape[0] == 0:
        return acc.to(x_RH.dtype)
    for k in range(top_k):
        present = rows_TK[:, k] >= 0
        v = x_RH[rows_TK[:, k].clamp(min=0)].float()
        if weights_N is not None:
            v = v * weights_N.view(tokens, top_k)[:, k, None].float()
        if round_terms:
            v = v.to(x_RH.dtype).float()
        acc = acc + v.masked_fill(~present[:, None], 0)
    return acc.to(x_RH.dtype)


def weight_grad_reference(
    x_RH: torch.Tensor, y_TH: torch.Tensor, assignment_row_N: torch.Tensor, top_k: int
) -> torch.Tensor:
    """`out[a] = <x[assignment_row[a]], y[a // top_k]>` in fp32; 0 for dropped assignments."""
    n = assignment_row_N.numel()
    if x_RH.shape[0] == 0:
        return torch.zeros(n, dtype=torch.float32, device=x_RH.device)
    present = assignment_row_N >= 0
    tokens = torch.arange(n, device=x_RH.device) // top_k
    dots = (x_RH[assignment_row_N.long().clamp(min=0)].float() * y_TH[tokens].float()).sum(-1)
    return dots.masked_fill(~present, 0)


# --------------------------------------------------------------------------------------------------
# Custom ops: route (no gradient), gather rows, scatter rows, weight gradient.


@custom_op("permute_route")
def _route(
    indices: torch.Tensor,
    bin_ids: Optional[torch.Tensor],
    bins: torch.Tensor,
    padded_bins: Optional[torch.Tensor],
    layout: str,
    num_rows: int,
    bin_size: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    args = dict(layout=layout, num_rows=num_rows, bin_size=bin_size)
    if use_triton(indices):
        return kernels.route(indices, bins, bin_ids_N=bin_ids, padded_bins_E=padded_bins, **args)
    return route_reference(indices, bins, bin_ids_N=bin_ids, padded_bins_E=padded_bins, **args)


@_route.register_fake
def _(indices, bin_ids, bins, padded_bins, layout, num_rows, bin_size):
    return (
        indices.new_empty(indices.shape[0], dtype=torch.int32),
        indices.new_empty(num_rows, dtype=torch.int32),
    )


@custom_op("permute_gather")
def _gather_rows(
    x: torch.Tensor,
    row_assignment: torch.Tensor,
    assignment_row: torch.Tensor,
    weights: Optional[torch.Tensor],
    top_k: int,
) -> torch.Tensor:
    if use_triton(x):
        return kernels.gather_rows(x, assignment_row, row_assignment, weights, top_k)
    return gather_rows_reference(x, row_assignment, weights, top_k)


@_gather_rows.register_fake
def _(x, row_assignment, assignment_row, weights, top_k):
    return x.new_empty(row_assignment.shape[0], x.shape[1])


@custom_op("permute_scatter")
def _scatter_rows(
    x: torch.Tensor,
    assignment_row: torch.Tensor,
    row_assignment: torch.Tensor,
    weights: Optional[torch.Tensor],
    top_k: int,
    round_terms: bool = False,
) -> torch.Tensor:
    if use_triton(x):
        return kernels.scatter_rows(x, assignment_row, weights, top_k, round_terms=round_terms)
    return scatter_rows_reference(x, assignment_row, weights, top_k, round_terms)


@_scatter_rows.register_fake
def _(x, assignment_row, row_assignment, weights, top_k, round_terms=False):
    return x.new_empty(assignment_row.shape[0] // top_k, x.shape[1])


@custom_op("permute_weight_grad")
def _weight_grad(x: torch.Tensor, y: torch.Tensor, assignment_row: torch.Tensor, top_k: int) -> torch.Tensor:
    if use_triton(x):
        return kernels.weight_grad(x, y, assignment_row, top_k)
    return weight_grad_reference(x, y, assignment_row, top_k)


@_weight_grad.register_fake
def _(x, y, assignment_row, top_k):
    return x.new_empty(assignment_row.shape[0], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    # Same input order for both row ops: (x, map, other map, weights, top_k).
    x, map_a, map_b, weights, top_k = inputs[:5]
    ctx.top_k = top_k
    wants_weight_grad = weights is not None and weights.requires_grad
    ctx.save_for_backward(x if wants_weight_grad else None, map_a, map_b, weights)


def _gather_backward(ctx, grad):
    x, row_assignment, assignment_row, weights = ctx.saved_tensors
    grad_x = grad_weights = None
    if ctx.needs_input_grad[0]:
        grad_x = _scatter_rows(grad, assignment_row, row_assignment, weights, ctx.top_k)
    if weights is not None and ctx.needs_input_grad[3]:
        grad_weights = _weight_grad(grad, x, assignment_row, ctx.top_k).to(weights.dtype)
    return grad_x, None, None, grad_weights, None


def _scatter_backward(ctx, grad):
    x, assignment_row, row_assignment, weights = ctx.saved_tensors
    grad_x = grad_weights = None
    if ctx.needs_input_grad[0]:
        grad_x = _gather_rows(grad, row_assignment, assignment_row, weights, ctx.top_k)
    if weights is not None and ctx.needs_input_grad[3]:
        grad_weights = _weight_grad(x, grad, assignment_row, ctx.top_k).to(weights.dtype)
    return grad_x, None, None, grad_weights, None, None


_gather_rows.register_autograd(_gather_backward, setup_context=_setup_context)
_scatter_rows.register_autograd(_scatter_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# Validation (shapes and dtypes always; index values where that costs no host sync).


def _check_routing(
    x: Optional[torch.Tensor],
    x_ndim: int,
    indices: torch.Tensor,
    bins: torch.Tensor,
    top_k: int,
    *,
    bin_ids: Optional[torch.Tensor] = None,
    padded_bins: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
    has_bin_ids: bool = True,
    has_padded_bins: bool = False,
) -> Tuple[int, int]:
    """Checks the arguments shared by the six ops (x None: the routing alone); returns (N, E)."""
    if x is not None:
        _checks.check_tensor("x", x, ndim=x_ndim, dtypes=_checks.FLOAT_DTYPES, numel_int32=False)
    _checks.check_tensor("indices", indices, ndim=1, dtypes=_checks.INDEX_DTYPES)
    _checks.check_tensor("bins", bins, ndim=1, dtypes=_checks.INDEX_DTYPES)
    if has_bin_ids:
        _checks.check_tensor("bin_ids", bin_ids, ndim=1, dtypes=_checks.INDEX_DTYPES)
    if has_padded_bins:
        _checks.check_tensor("padded_bins", padded_bins, ndim=1, dtypes=_checks.INDEX_DTYPES)
    if weights is not None:
        _checks.check_tensor("weights", weights, ndim=1, dtypes=_checks.FLOAT_DTYPES)
    _checks.check_int("top_k", top_k, min_value=1)
    _checks.check_same_device(
        x=x, indices=indices, bin_ids=bin_ids, bins=bins, padded_bins=padded_bins, weights=weights
    )
    n, num_experts = indices.numel(), bins.numel()
    if n % top_k:
        raise ValueError(f"indices: expected a multiple of top_k={top_k} elements, got {n}")
    if num_experts < 1:
        raise ValueError("bins: expected at least one expert, got an empty tensor")
    if has_bin_ids and bin_ids.numel() != n:
        raise ValueError(f"bin_ids: expected {n} elements (one per index), got {bin_ids.numel()}")
    if has_padded_bins and padded_bins.numel() != num_experts:
        raise ValueError(f"padded_bins: expected {num_experts} elements (as bins), got {padded_bins.numel()}")
    if weights is not None and weights.numel() != n:
        raise ValueError(f"weights: expected {n} elements (one per index), got {weights.numel()}")
    if x is not None:
        _checks.check_int32_range("x.shape[-1]", x.shape[-1])
    _checks.check_index_values("indices", indices, n)
    if has_bin_ids:
        _checks.check_index_values("bin_ids", bin_ids, num_experts)
    _checks.check_index_values("bins", bins, n + 1)
    return n, num_experts


def _check_rows(name: str, actual: int, expected: int, what: str) -> None:
    if actual != expected:
        raise ValueError(f"{name}: expected {expected} rows ({what}), got {actual}")


# --------------------------------------------------------------------------------------------------
# Public functions.


def gather(
    x: torch.Tensor, indices: torch.Tensor, bin_ids: torch.Tensor, bins: torch.Tensor, top_k: int
) -> torch.Tensor:
    """Token rows in sorted (expert) order: `out[i] = x[indices[i] // top_k]`.

    Args:
        x: `[T, H]` float32/float16/bfloat16 token rows.
        indices: `[N]` int32/int64, N = T·top_k: the flattened assignment at each sorted position.
        bin_ids: `[N]` int32/int64 expert of each sorted position (checked, not needed here).
        bins: `[E]` int32/int64 inclusive cumulative row counts per expert.
        top_k: experts per token, >= 1.

    Returns:
        `[N, H]` in x's dtype. Differentiable in x (the gradient sums the K rows of each token).

    Raises:
        TypeError / ValueError: wrong type, dtype, rank, size or device; on CPU (or with
        MEGABLOCKS_CHECK_VALUES=1) also index values out of range.
    """
    n, _ = _check_routing(x, 2, indices, bins, top_k, bin_ids=bin_ids)
    _check_rows("x", x.shape[0], n // top_k, "T = indices.numel() // top_k")
    assignment_row, row_assignment = _route(indices, bin_ids, bins, None, "plain", n, 0)
    return _gather_rows(x, row_assignment, assignment_row, None, top_k)


def scatter(
    x: torch.Tensor,
    indices: torch.Tensor,
    bin_ids: torch.Tensor,
    weights: Optional[torch.Tensor],
    bins: torch.Tensor,
    top_k: int,
) -> torch.Tensor:
    """Sorted rows back to token order, weighted and summed over each token's K choices.

    `out[t] = Σ_k weights[t·K + k] · x[pos(t·K + k)]`, where `pos` inverts `indices`. MegaBlocks'
    results: each weighted row is rounded to x's dtype (as MegaBlocks' kernel stores it), then
    the K of a token are summed in fp32, k in order, and rounded to x's dtype (as its sum does).
    `padded_scatter` and `binned_scatter` sum the same way; the dMoE layers' own scatter
    (`scatter_routed`) skips the first rounding.

    Args:
        x: `[N, H]` float32/float16/bfloat16 rows in sorted order.
        indices, bin_ids, bins, top_k: as in `gather`.
        weights: `[N]` float, indexed by flattened assignment (`expert_weights_TK.flatten()`), or
            None for all ones.

    Returns:
        `[T, H]` in x's dtype. Differentiable in x and weights.

    Raises:
        TypeError / ValueError: as in `gather`.
    """
    n, _ = _check_routing(x, 2, indices, bins, top_k, bin_ids=bin_ids, weights=weights)
    _check_rows("x", x.shape[0], n, "N = indices.numel()")
    assignment_row, row_assignment = _route(indices, bin_ids, bins, None, "plain", n, 0)
    return _scatter_rows(x, assignment_row, row_assignment, weights, top_k, True)


def padded_gather(
    x: torch.Tensor,
    indices: torch.Tensor,
    bin_ids: torch.Tensor,
    bins: torch.Tensor,
    padded_bins: torch.Tensor,
    top_k: int,
    *,
    block_size: Optional[int] = None,
) -> torch.Tensor:
    """Token rows in expert order, each expert's rows starting at its padded bin.

    Sorted row i of expert e = bin_ids[i] goes to row `padded_bins[e-1] + (i - bins[e-1])`
    (bins[-1], padded_bins[-1] read as 0); every other row is zero.

    Args:
        x, indices, bin_ids, bins, top_k: as in `gather`.
        padded_bins: `[E]` int32/int64 inclusive cumulative row counts, each expert's count rounded
            up to a multiple of the block size.
        block_size: None (MegaBlocks' result): `padded_bins[-1]` rows, read on the host (a
            host-device sync on CUDA). An int (the rounding of `padded_bins`, >= 1): the static
            P = `padded_rows_bound(N, E, block_size)` >= padded_bins[-1] rows, rows from
            padded_bins[-1] on zero, no sync (what the layers use).

    Returns:
        `[padded_bins[-1], H]` (or `[P, H]`) in x's dtype. Differentiable in x.

    Raises:
        TypeError / ValueError: as in `gather`, plus padded_bins values above P.
    """
    n, num_experts = _check_routing(
        x, 2, indices, bins, top_k, bin_ids=bin_ids, padded_bins=padded_bins, has_padded_bins=True
    )
    _check_rows("x", x.shape[0], n // top_k, "T = indices.numel() // top_k")
    if block_size is None:
        num_rows = int(padded_bins[-1]) if num_experts else 0  # MegaBlocks' size: a host read
        _checks.check_int32_range("padded rows", num_rows)
        _checks.check_index_values("padded_bins", padded_bins, num_rows + 1)
        assignment_row, row_assignment = _route(indices, bin_ids, bins, padded_bins, "padded", max(num_rows, 0), 0)
    else:
        _checks.check_int("block_size", block_size, min_value=1)
        assignment_row, row_assignment = _padded_route(indices, bin_ids, bins, padded_bins, n, num_experts,
                                                       block_size)
    return _gather_rows(x, row_assignment, assignment_row, None, top_k)


def _padded_route(indices, bin_ids, bins, padded_bins, n: int, num_experts: int, block_size: int):
    """The row maps of the padded layout, `padded_rows_bound(N, E, block_size)` rows (checked args)."""
    num_rows = padded_rows_bound(n, num_experts, block_size)
    _checks.check_int32_range("padded rows", num_rows)
    _checks.check_index_values("padded_bins", padded_bins, num_rows + 1)
    return _route(indices, bin_ids, bins, padded_bins, "padded", num_rows, 0)


def padded_scatter(
    x: torch.Tensor,
    indices: torch.Tensor,
    bin_ids: torch.Tensor,
    weights: Optional[torch.Tensor],
    bins: torch.Tensor,
    padded_bins: torch.Tensor,
    top_k: int,
) -> torch.Tensor:
    """The inverse of `padded_gather`, weighted and summed over each token's K choices.

    `out[t] = Σ_k weights[a] · x[padded_bins[e-1] + (pos(a) - bins[e-1])]`, a = t·K + k,
    e = bin_ids[pos(a)]. Padding rows of x are never read (they may hold anything, NaN included).

    Args:
        x: `[P, H]` float32/float16/bfloat16 with P >= padded_bins[-1] (e.g. padded_gather's output).
        indices, bin_ids, bins, padded_bins, top_k: as in `padded_gather`.
        weights: as in `scatter`.

    Returns:
        `[T, H]` in x's dtype. Differentiable in x (zero gradient on padding rows) and weights.

    Raises:
        TypeError / ValueError: as in `padded_gather`, with values checked against x.shape[0].
    """
    n, _ = _check_routing(
        x, 2, indices, bins, top_k, bin_ids=bin_ids, padded_bins=padded_bins, weights=weights, has_padded_bins=True
    )
    _checks.check_index_values("padded_bins", padded_bins, x.shape[0] + 1)
    assignment_row, row_assignment = _route(indices, bin_ids, bins, padded_bins, "padded", x.shape[0], 0)
    return _scatter_rows(x, assignment_row, row_assignment, weights, top_k, True)


def route(
    indices: torch.Tensor,
    bin_ids: torch.Tensor,
    bins: torch.Tensor,
    top_k: int,
    padded_bins: Optional[torch.Tensor] = None,
    *,
    block_size: int = 128,
) -> RowMaps:
    """The row maps `gather`/`scatter` (padded_bins None) or `padded_gather`/`padded_scatter`
    compute internally, once: `gather_routed(x, maps)` and `scatter_routed(y, maps, weights)` then
    equal those ops. The padded layout has `padded_rows_bound(N, E, block_size)` rows.

    Raises:
        TypeError / ValueError: as `gather` (`padded_gather` with padded_bins).
    """
    padded = padded_bins is not None
    _checks.check_int("top_k", top_k, min_value=1)
    n, num_experts = _check_routing(
        None, 2, indices, bins, top_k, bin_ids=bin_ids, padded_bins=padded_bins, has_padded_bins=padded
    )
    if not padded:
        maps = _route(indices, bin_ids, bins, None, "plain", n, 0)
    else:
        _checks.check_int("block_size", block_size, min_value=1)
        maps = _padded_route(indices, bin_ids, bins, padded_bins, n, num_experts, block_size)
    return RowMaps(maps[0], maps[1], top_k)


def gather_routed(x: torch.Tensor, maps: RowMaps) -> torch.Tensor:
    """`gather` (or `padded_gather`) of the token rows `x` [T, H] by precomputed `maps`."""
    _checks.check_tensor("x", x, ndim=2, dtypes=_checks.FLOAT_DTYPES, numel_int32=False)
    _check_rows("x", x.shape[0], maps.assignment_row.numel() // maps.top_k, "T = assignments // top_k")
    return _gather_rows(x, maps.row_assignment, maps.assignment_row, None, maps.top_k)


def scatter_routed(y: torch.Tensor, maps: RowMaps, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """`scatter` (or `padded_scatter`) of the rows `y` [R, H] by precomputed `maps`: the weighted
    sum over each token's K choices, `[T, H]`."""
    _checks.check_tensor("y", y, ndim=2, dtypes=_checks.FLOAT_DTYPES, numel_int32=False)
    _check_rows("y", y.shape[0], maps.row_assignment.numel(), "the rows of the maps")
    if weights is not None:
        _checks.check_tensor("weights", weights, ndim=1, dtypes=_checks.FLOAT_DTYPES)
        if weights.numel() != maps.assignment_row.numel():
            raise ValueError(
                f"weights: expected {maps.assignment_row.numel()} elements (one per assignment), got {weights.numel()}"
            )
    return _scatter_rows(y, maps.assignment_row, maps.row_assignment, weights, maps.top_k)


def binned_gather(
    x: torch.Tensor, indices: torch.Tensor, bins: torch.Tensor, bin_size: int, top_k: int
) -> torch.Tensor:
    """Token rows in expert order with a fixed capacity of `bin_size` rows per expert.

    `out[e, j] = x[indices[bins[e-1] + j] // top_k]` for j < min(count_e, bin_size); the other rows
    are zero (assignments past an expert's capacity are dropped).

    Args:
        x, indices, bins, top_k: as in `gather`.
        bin_size: rows per expert (the capacity), >= 0.

    Returns:
        `[E, bin_size, H]` in x's dtype. Differentiable in x.

    Raises:
        TypeError / ValueError: as in `gather`, plus E·bin_size beyond the int32 range.
    """
    n, num_experts = _check_routing(x, 2, indices, bins, top_k, has_bin_ids=False)
    _check_rows("x", x.shape[0], n // top_k, "T = indices.numel() // top_k")
    _checks.check_int("bin_size", bin_size, min_value=0)
    _checks.check_int32_range("number of experts × bin_size", num_experts * bin_size)
    num_rows = num_experts * bin_size
    assignment_row, row_assignment = _route(indices, None, bins, None, "binned", num_rows, bin_size)
    out = _gather_rows(x, row_assignment, assignment_row, None, top_k)
    return out.view(num_experts, bin_size, x.shape[1])


def binned_scatter(
    x: torch.Tensor, indices: torch.Tensor, weights: Optional[torch.Tensor], bins: torch.Tensor, top_k: int
) -> torch.Tensor:
    """The inverse of `binned_gather`, weighted and summed over each token's K choices.

    Dropped assignments (past an expert's capacity C = x.shape[1]) contribute zero.

    Args:
        x: `[E, C, H]` float32/float16/bfloat16.
        indices, bins, top_k: as in `gather`; weights as in `scatter`.

    Returns:
        `[T, H]` in x's dtype. Differentiable in x and weights.

    Raises:
        TypeError / ValueError: as in `gather`, plus x.shape[0] != E.
    """
    n, num_experts = _check_routing(x, 3, indices, bins, top_k, weights=weights, has_bin_ids=False)
    _check_rows("x", x.shape[0], num_experts, "E = bins.numel()")
    bin_size = x.shape[1]
    _checks.check_int32_range("number of experts × bin_size", num_experts * bin_size)
    num_rows = num_experts * bin_size
    assignment_row, row_assignment = _route(indices, None, bins, None, "binned", num_rows, bin_size)
    return _scatter_rows(x.reshape(num_rows, x.shape[2]), assignment_row, row_assignment, weights, top_k, True)


# --------------------------------------------------------------------------------------------------
# Whole-op references (what the public functions compute, in plain torch; for tests and debugging).


def gather_reference(x, indices, bin_ids, bins, top_k):
    _, row_assignment = route_reference(indices, bins, layout="plain", num_rows=indices.numel())
    return gather_rows_reference(x, row_assignment, None, top_k)


def scatter_reference(x, indices, bin_ids, weights, bins, top_k):
    assignment_row, _ = route_reference(indices, bins, layout="plain", num_rows=indices.numel())
    return scatter_rows_reference(x, assignment_row, weights, top_k, round_terms=True)


def padded_gather_reference(x, indices, bin_ids, bins, padded_bins, top_k, *, block_size=None):
    if block_size is None:  # MegaBlocks' size
        num_rows = int(padded_bins[-1]) if padded_bins.numel() else 0
    else:
        num_rows = padded_rows_bound(indices.numel(), bins.numel(), block_size)
    _, row_assignment = route_reference(
        indices, bins, layout="padded", num_rows=num_rows, bin_ids_N=bin_ids, padded_bins_E=padded_bins
    )
    return gather_rows_reference(x, row_assignment, None, top_k)


def padded_scatter_reference(x, indices, bin_ids, weights, bins, padded_bins, top_k):
    assignment_row, _ = route_reference(
        indices, bins, layout="padded", num_rows=x.shape[0], bin_ids_N=bin_ids, padded_bins_E=padded_bins
    )
    return scatter_rows_reference(x, assignment_row, weights, top_k, round_terms=True)


def binned_gather_reference(x, indices, bins, bin_size, top_k):
    num_experts = bins.numel()
    _, row_assignment = route_reference(
        indices, bins, layout="binned", num_rows=num_experts * bin_size, bin_size=bin_size
    )
    return gather_rows_reference(x, row_assignment, None, top_k).view(num_experts, bin_size, x.shape[1])


def binned_scatter_reference(x, indices, weights, bins, top_k):
    num_experts, bin_size, hidden = x.shape
    assignment_row, _ = route_reference(
        indices, bins, layout="binned", num_rows=num_experts * bin_size, bin_size=bin_size
    )
    return scatter_rows_reference(x.reshape(-1, hidden), assignment_row, weights, top_k, round_terms=True)
