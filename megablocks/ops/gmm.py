"""Grouped GEMM with autograd: `gmm(a, b, batch_sizes, trans_b=False, backend=None)`.

Legend: M rows (routed tokens in expert order), K inner size, N output size, E experts.
The rows of `a_MK` are split into E consecutive groups of `batch_sizes_E[e]` rows; group e is
multiplied by expert e's matrix `b[e]` (`[K, N]`, or `[N, K]` with `trans_b`). This is the
`grouped_gemm` package's `ops.gmm`, with a choice of backends (see `megablocks.backend.gmm`):
'triton' (ours, no host sync), 'torch' (`torch.nn.functional.grouped_mm`) and 'gg'
(`grouped_gemm`, whose host-side batch sizes are a documented sync).

Gradients: d_a = gmm(d_out, b, trans_b=not trans_b); d_b is the variable-K product
(`trans_a=True`: per group a^T @ d_out, or d_out^T @ a with trans_b), summed over each group's rows.

Products of gathered token rows (legend: T tokens, H = K, N routed rows, `maps` a `RowMaps` of
`megablocks.ops.permute.route`):

    gmm_gathered(x_TH, b, batch_sizes, maps)                  == gmm(gather_routed(x_TH, maps), b, ...)
    gmm_shared_input_gathered(x_TH, b1, b2, batch_sizes, maps) == gmm_shared_input(gather_routed(...), ...)

The 'triton' backend reads x's rows through the map inside the kernels, in the forward and in the
weight gradient, so the gathered `[N, H]` rows are neither written nor kept for the backward. The
gradient of x is `gather_routed`'s: the gradient of the gathered rows (a grouped GEMM), summed
over each token's top_k rows in fp32, k in order (deterministic). The other backends gather
explicitly and call the plain products (same results).
"""

from typing import Optional, Tuple

import torch

from megablocks import _checks
from megablocks._checks import values_checked
from megablocks.backend import gmm as gmm_backend
from megablocks.backend import permute as permute_kernels
from megablocks.backend import use_triton
from megablocks.ops._eager import custom_op
from megablocks.ops.permute import RowMaps, _check_rows, _scatter_rows, gather_rows_reference


def gmm_reference(
    a: torch.Tensor,
    b: torch.Tensor,
    batch_sizes: torch.Tensor,
    trans_a: bool = False,
    trans_b: bool = False,
) -> torch.Tensor:
    """The per-group loop every backend is checked against; computes in float32 (float64 for
    float64 inputs) and returns the dtype of `a`. Forms as in `megablocks.backend.gmm.gmm`."""
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    sizes = [int(s) for s in batch_sizes.tolist()]
    starts = [sum(sizes[:e]) for e in range(len(sizes))]
    if trans_a:
        out = [a[s : s + m].to(acc).t() @ b[s : s + m].to(acc) for s, m in zip(starts, sizes)]
        if not out:
            return a.new_zeros((0, a.shape[1], b.shape[1]))
        return torch.stack(out).to(a.dtype)
    out = a.new_zeros((a.shape[0], b.shape[1] if trans_b else b.shape[2]), dtype=acc)
    for e, (s, m) in enumerate(zip(starts, sizes)):
        w = b[e].to(acc)
        out[s : s + m] = a[s : s + m].to(acc) @ (w.t() if trans_b else w)
    return out.to(a.dtype)


def _gmm_impl(a, b, batch_sizes, trans_a: bool, trans_b: bool, backend_name: str) -> torch.Tensor:
    if backend_name == "triton" and not use_triton(a):
        return gmm_reference(a, b, batch_sizes, trans_a, trans_b)
    return gmm_backend.run_gmm(a, b, batch_sizes, trans_a, trans_b, backend_name)


@custom_op("gmm")
def _gmm(
    a: torch.Tensor, b: torch.Tensor, batch_sizes: torch.Tensor, trans_a: bool, trans_b: bool, backend_name: str
) -> torch.Tensor:
    return _gmm_impl(a, b, batch_sizes, trans_a, trans_b, backend_name)


@_gmm.register_fake
def _(a, b, batch_sizes, trans_a, trans_b, backend_name):
    if trans_a:
        return a.new_empty((batch_sizes.shape[0], a.shape[1], b.shape[1]))
    return a.new_empty((a.shape[0], b.shape[1] if trans_b else b.shape[2]))


def _setup_context(ctx, inputs, output):
    a, b, batch_sizes, trans_a, trans_b, backend_name = inputs
    ctx.save_for_backward(a, b, batch_sizes)
    ctx.trans_a, ctx.trans_b, ctx.backend_name = trans_a, trans_b, backend_name


def _backward(ctx, grad):
    a, b, batch_sizes = ctx.saved_tensors
    # A broadcast gradient (e.g. of `out.sum()`) has zero strides, which grouped_mm rejects.
    grad = grad.contiguous()
    name = ctx.backend_name
    d_a = d_b = None
    if ctx.trans_a:
        # out[e] = a_e^T b_e: d_a_e = b_e grad[e]^T, d_b_e = a_e grad[e].
        if ctx.needs_input_grad[0]:
            d_a = _gmm(b, grad, batch_sizes, False, True, name)
        if ctx.needs_input_grad[1]:
            d_b = _gmm(a, grad, batch_sizes, False, False, name)
    else:
        if ctx.needs_input_grad[0]:
            d_a = _gmm(grad, b, batch_sizes, False, not ctx.trans_b, name)
        if ctx.needs_input_grad[1]:
            lhs, rhs = (grad, a) if ctx.trans_b else (a, grad)
            d_b = _gmm(lhs, rhs, batch_sizes, True, False, name)
    return d_a, d_b, None, None, None, None


_gmm.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Two products of one input (the GLU's up projections): its gradient in one accumulating pass.


@custom_op("gmm_sum")
def _gmm_sum(
    a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor, batch_sizes: torch.Tensor,
    trans_b: bool, backend_name: str,
) -> torch.Tensor:
    if backend_name == "triton" and not use_triton(a1):
        return gmm_reference(a1, b1, batch_sizes, False, trans_b) + gmm_reference(a2, b2, batch_sizes, False, trans_b)
    return gmm_backend.gmm_sum(a1, b1, a2, b2, batch_sizes, trans_b, backend_name)


@_gmm_sum.register_fake
def _(a1, b1, a2, b2, batch_sizes, trans_b, backend_name):
    return a1.new_empty((a1.shape[0], b1.shape[1] if trans_b else b1.shape[2]))


@custom_op("gmm_shared_input")
def _gmm_shared_input(
    a: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor, batch_sizes: torch.Tensor, trans_b: bool,
    backend_name: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return (_gmm_impl(a, b1, batch_sizes, False, trans_b, backend_name),
            _gmm_impl(a, b2, batch_sizes, False, trans_b, backend_name))


@_gmm_shared_input.register_fake
def _(a, b1, b2, batch_sizes, trans_b, backend_name):
    n = b1.shape[1] if trans_b else b1.shape[2]
    return a.new_empty((a.shape[0], n)), a.new_empty((a.shape[0], n))


def _shared_setup_context(ctx, inputs, output):
    a, b1, b2, batch_sizes, trans_b, backend_name = inputs
    ctx.save_for_backward(a, b1, b2, batch_sizes)
    ctx.trans_b, ctx.backend_name = trans_b, backend_name


def _both_grads(grad1, grad2):
    """The two outputs' gradients, contiguous; an unused output's (None) as zeros."""
    grads = [g if g is None else g.contiguous() for g in (grad1, grad2)]
    if grads[0] is None or grads[1] is None:  # one output unused: a plain product for the other
        present = 0 if grads[1] is None else 1
        grads[1 - present] = torch.zeros_like(grads[present])
    return grads


def _shared_backward(ctx, grad1, grad2):
    a, b1, b2, batch_sizes = ctx.saved_tensors
    name, trans_b = ctx.backend_name, ctx.trans_b
    g1, g2 = _both_grads(grad1, grad2)
    d_a = d_b1 = d_b2 = None
    if ctx.needs_input_grad[0]:
        d_a = _gmm_sum(g1, b1, g2, b2, batch_sizes, not trans_b, name)
    if ctx.needs_input_grad[1]:
        d_b1 = _gmm(*((g1, a) if trans_b else (a, g1)), batch_sizes, True, False, name)
    if ctx.needs_input_grad[2]:
        d_b2 = _gmm(*((g2, a) if trans_b else (a, g2)), batch_sizes, True, False, name)
    return d_a, d_b1, d_b2, None, None, None


_gmm_shared_input.register_autograd(_shared_backward, setup_context=_shared_setup_context)


def gmm_shared_input(
    a: torch.Tensor,
    b1: torch.Tensor,
    b2: torch.Tensor,
    batch_sizes: torch.Tensor,
    trans_b: bool = False,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """`(gmm(a, b1, ...), gmm(a, b2, ...))`: two grouped GEMMs of one input, e.g. a GLU's up
    projections `x @ w1^T` and `x @ v1^T`.

    Same forward as two `gmm` calls. The backward computes the gradient of `a`,
    `d1 @ b1^T + d2 @ b2^T`, in one pass: the 'triton' backend adds the second product in the
    first's epilogue instead of summing two `[M, K]` results afterwards. Arguments, dtypes and
    errors as `gmm`; `b1` and `b2` have the same shape.
    """
    if backend is None and isinstance(a, torch.Tensor):
        backend = gmm_backend.default_backend(a)
    gmm_backend.check_gmm_args(a, b1, batch_sizes, False, trans_b, backend)
    _check_second_weight(b1, b2)
    if values_checked(batch_sizes):
        _check_batch_sizes(batch_sizes, a.shape[0])
    return _gmm_shared_input(a, b1, b2, batch_sizes, trans_b, backend)


def gmm(
    a: torch.Tensor,
    b: torch.Tensor,
    batch_sizes: torch.Tensor,
    trans_b: bool = False,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Grouped GEMM, differentiable in `a` and `b`.

    Args:
        a: `[M, K]` float32/float16/bfloat16, rows in group order.
        b: `[E, K, N]`, or `[E, N, K]` with `trans_b`; the dtype and device of `a`.
        batch_sizes: `[E]` int32/int64 rows per group (zeros allowed), summing to M; on the
            device of `a` (no host sync with 'triton' and 'torch') or on the CPU.
        trans_b: multiply by `b[e]^T`.
        backend: 'triton' (the kernels; CUDA, or CPU under TRITON_INTERPRET=1, else the
            reference loop), 'torch' (`torch.nn.functional.grouped_mm`; CPU float32/float16/bfloat16,
            CUDA bfloat16), 'gg' (`grouped_gemm`, CUDA bfloat16; copies `batch_sizes` to the host)
            or None: 'triton' on CUDA and under the interpreter, 'torch' on CPU otherwise.

    Returns:
        `[M, N]` in the dtype of `a`: `out[rows of e] = a[rows of e] @ b[e]` (or `@ b[e]^T`).

    Raises:
        TypeError: non-tensor inputs, dtypes that differ or that the backend does not take.
        ValueError: ranks or sizes that do not fit; batch sizes that are negative or do not sum
            to M (checked where values are checked: CPU, or MEGABLOCKS_CHECK_VALUES=1).
        ImportError: backend='gg' without the grouped_gemm package.
    """
    if backend is None and isinstance(a, torch.Tensor):
        backend = gmm_backend.default_backend(a)
    gmm_backend.check_gmm_args(a, b, batch_sizes, False, trans_b, backend)
    if values_checked(batch_sizes):
        _check_batch_sizes(batch_sizes, a.shape[0])
    return _gmm(a, b, batch_sizes, False, trans_b, backend)


def _check_second_weight(b1: torch.Tensor, b2) -> None:
    """`b2` of a shared-input pair: a tensor of b1's shape, dtype and device."""
    if not isinstance(b2, torch.Tensor):
        raise TypeError(f"b2: expected a torch.Tensor, got {type(b2).__name__}")
    if b2.shape != b1.shape:
        raise ValueError(f"b2: expected the shape of b1 {tuple(b1.shape)}, got {tuple(b2.shape)}")
    if b2.dtype != b1.dtype:
        raise TypeError(f"b2: expected the dtype of b1 ({b1.dtype}), got {b2.dtype}")
    if b2.device != b1.device:
        raise ValueError(f"b2: expected a tensor on {b1.device} (the device of b1), got one on {b2.device}")


def _check_batch_sizes(batch_sizes: torch.Tensor, rows: int) -> None:
    if batch_sizes.numel() == 0:
        if rows:
            raise ValueError(f"batch_sizes: expected sizes summing to {rows} (the rows of a), got none")
        return
    lo, total = int(batch_sizes.min()), int(batch_sizes.sum())
    if lo < 0 or total != rows:
        raise ValueError(
            f"batch_sizes: expected non-negative sizes summing to {rows} (the rows of a), "
            f"got min {lo}, sum {total}"
        )


# --------------------------------------------------------------------------------------------
# Products of token rows gathered through the routing's row maps (see the module docstring).
# Arguments of the ops: x [T, K]; row_assignment [N] and assignment_row [N] int32 and top_k of a
# `RowMaps`; row r of the gathered operand is x[row_assignment[r] // top_k] (zeros where -1).


def _token_rows(row_assignment: torch.Tensor, top_k: int) -> torch.Tensor:
    """The token of each routed row, int32 (-1 where the row holds no assignment)."""
    if top_k == 1:
        return row_assignment
    return torch.div(row_assignment, top_k, rounding_mode="floor")


def _in_kernel_map(x: torch.Tensor, backend_name: str) -> bool:
    return backend_name == "triton" and use_triton(x)


def _gather_explicit(x, row_assignment, assignment_row, top_k: int) -> torch.Tensor:
    """`gather_routed`'s forward (no autograd): the backends without an in-kernel row map."""
    if use_triton(x):
        return permute_kernels.gather_rows(x, assignment_row, row_assignment, None, top_k)
    return gather_rows_reference(x, row_assignment, None, top_k)


def _gathered_product(x, b, batch_sizes, token_rows, row_assignment, assignment_row, top_k: int,
                      trans_b: bool, backend_name: str) -> torch.Tensor:
    """`gmm(x[token_rows], b)` (forward form); token_rows is None unless the map is in-kernel."""
    if token_rows is None:
        a = _gather_explicit(x, row_assignment, assignment_row, top_k)
        return _gmm_impl(a, b, batch_sizes, False, trans_b, backend_name)
    M, N = row_assignment.shape[0], b.shape[1] if trans_b else b.shape[2]
    if M * N == 0 or b.shape[0] * x.shape[1] == 0:
        return x.new_zeros((M, N))
    return gmm_backend.triton_gmm(x, b, batch_sizes, False, trans_b, a_rows=token_rows)


@custom_op("gmm_gathered")
def _gmm_gathered(
    x: torch.Tensor, b: torch.Tensor, batch_sizes: torch.Tensor, row_assignment: torch.Tensor,
    assignment_row: torch.Tensor, top_k: int, trans_b: bool, backend_name: str,
) -> torch.Tensor:
    rows = _token_rows(row_assignment, top_k) if _in_kernel_map(x, backend_name) else None
    return _gathered_product(x, b, batch_sizes, rows, row_assignment, assignment_row, top_k, trans_b, backend_name)


@_gmm_gathered.register_fake
def _(x, b, batch_sizes, row_assignment, assignment_row, top_k, trans_b, backend_name):
    return x.new_empty((row_assignment.shape[0], b.shape[1] if trans_b else b.shape[2]))


@custom_op("gmm_gathered_weight_grad")
def _gmm_gathered_weight_grad(
    x: torch.Tensor, grad: torch.Tensor, batch_sizes: torch.Tensor, row_assignment: torch.Tensor,
    assignment_row: torch.Tensor, top_k: int, trans_b: bool, backend_name: str,
) -> torch.Tensor:
    """The gradient of `b` in `gmm(x[map], b, trans_b)` given the output's gradient `grad` [N, N']:
    per group `x_e^T @ grad_e` ([E, K, N']) or, with trans_b, `grad_e^T @ x_e` ([E, N', K])."""
    if not _in_kernel_map(x, backend_name):
        a = _gather_explicit(x, row_assignment, assignment_row, top_k)
        lhs, rhs = (grad, a) if trans_b else (a, grad)
        return _gmm_impl(lhs, rhs, batch_sizes, True, False, backend_name)
    E, K, N = batch_sizes.shape[0], x.shape[1], grad.shape[1]
    if grad.shape[0] == 0 or E * K * N == 0:
        return x.new_zeros((E, N, K) if trans_b else (E, K, N))
    rows = _token_rows(row_assignment, top_k)
    if trans_b:  # the operands in the order of the unfused product: grad^T @ x[map]
        return gmm_backend.triton_gmm(grad, x, batch_sizes, True, False, b_rows=rows)
    return gmm_backend.triton_gmm(x, grad, batch_sizes, True, False, a_rows=rows)


@_gmm_gathered_weight_grad.register_fake
def _(x, grad, batch_sizes, row_assignment, assignment_row, top_k, trans_b, backend_name):
    E, K, N = batch_sizes.shape[0], x.shape[1], grad.shape[1]
    return x.new_empty((E, N, K) if trans_b else (E, K, N))


def _gathered_setup_context(ctx, inputs, output):
    x, *bs, batch_sizes, row_assignment, assignment_row, top_k, trans_b, backend_name = inputs
    ctx.save_for_backward(x, *bs, batch_sizes, row_assignment, assignment_row)
    ctx.top_k, ctx.trans_b, ctx.backend_name = top_k, trans_b, backend_name


def _input_grad(ctx, d_rows, row_assignment, assignment_row) -> torch.Tensor:
    """x's gradient from its gathered rows' gradient: `gather_routed`'s backward (the sum over
    each token's top_k rows in fp32, k in order)."""
    return _scatter_rows(d_rows, assignment_row, row_assignment, None, ctx.top_k)


def _gathered_backward(ctx, grad):
    x, b, batch_sizes, row_assignment, assignment_row = ctx.saved_tensors
    grad = grad.contiguous()
    name, trans_b = ctx.backend_name, ctx.trans_b
    d_x = d_b = None
    if ctx.needs_input_grad[0]:
        d_rows = _gmm(grad, b, batch_sizes, False, not trans_b, name)
        d_x = _input_grad(ctx, d_rows, row_assignment, assignment_row)
    if ctx.needs_input_grad[1]:
        d_b = _gmm_gathered_weight_grad(x, grad, batch_sizes, row_assignment, assignment_row, ctx.top_k, trans_b, name)
    return d_x, d_b, None, None, None, None, None, None


_gmm_gathered.register_autograd(_gathered_backward, setup_context=_gathered_setup_context)


@custom_op("gmm_shared_input_gathered")
def _gmm_shared_input_gathered(
    x: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor, batch_sizes: torch.Tensor, row_assignment: torch.Tensor,
    assignment_row: torch.Tensor, top_k: int, trans_b: bool, backend_name: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    args = (row_assignment, assignment_row, top_k, trans_b, backend_name)
    if _in_kernel_map(x, backend_name):
        rows = _token_rows(row_assignment, top_k)
        return (_gathered_product(x, b1, batch_sizes, rows, *args),
                _gathered_product(x, b2, batch_sizes, rows, *args))
    a = _gather_explicit(x, row_assignment, assignment_row, top_k)
    return (_gmm_impl(a, b1, batch_sizes, False, trans_b, backend_name),
            _gmm_impl(a, b2, batch_sizes, False, trans_b, backend_name))


@_gmm_shared_input_gathered.register_fake
def _(x, b1, b2, batch_sizes, row_assignment, assignment_row, top_k, trans_b, backend_name):
    n = b1.shape[1] if trans_b else b1.shape[2]
    return x.new_empty((row_assignment.shape[0], n)), x.new_empty((row_assignment.shape[0], n))


def _shared_gathered_backward(ctx, grad1, grad2):
    x, b1, b2, batch_sizes, row_assignment, assignment_row = ctx.saved_tensors
    name, trans_b, top_k = ctx.backend_name, ctx.trans_b, ctx.top_k
    g1, g2 = _both_grads(grad1, grad2)
    d_x = d_b1 = d_b2 = None
    if ctx.needs_input_grad[0]:
        d_rows = _gmm_sum(g1, b1, g2, b2, batch_sizes, not trans_b, name)
        d_x = _input_grad(ctx, d_rows, row_assignment, assignment_row)
    if ctx.needs_input_grad[1]:
        d_b1 = _gmm_gathered_weight_grad(x, g1, batch_sizes, row_assignment, assignment_row, top_k, trans_b, name)
    if ctx.needs_input_grad[2]:
        d_b2 = _gmm_gathered_weight_grad(x, g2, batch_sizes, row_assignment, assignment_row, top_k, trans_b, name)
    return d_x, d_b1, d_b2, None, None, None, None, None, None


_gmm_shared_input_gathered.register_autograd(_shared_gathered_backward, setup_context=_gathered_setup_context)


def _check_gathered(x, b, batch_sizes, maps, trans_b, backend) -> None:
    """Shapes, dtypes and devices of the gathered products (values of batch_sizes where checked)."""
    _checks.check_tensor("x", x, ndim=2, dtypes=_checks.FLOAT_DTYPES, numel_int32=False)
    if not isinstance(maps, RowMaps):
        raise TypeError(f"maps: expected a RowMaps (megablocks.ops.permute.route), got {type(maps).__name__}")
    top_k = _checks.check_int("maps.top_k", maps.top_k, min_value=1)
    for name in ("row_assignment", "assignment_row"):
        _checks.check_tensor(f"maps.{name}", getattr(maps, name), ndim=1, dtypes=(torch.int32,))
        if getattr(maps, name).device != x.device:
            raise ValueError(
                f"maps.{name}: expected a tensor on {x.device} (the device of x), got one on {getattr(maps, name).device}"
            )
    n = maps.assignment_row.numel()
    if n % top_k:
        raise ValueError(f"maps.assignment_row: expected a multiple of top_k={top_k} elements, got {n}")
    _check_rows("x", x.shape[0], n // top_k, "T = assignments // top_k")
    # The rest as for gmm(x[rows], b): x's columns are the inner size.
    gmm_backend.check_gmm_args(x, b, batch_sizes, False, trans_b, backend)
    rows = maps.row_assignment.numel()
    _checks.check_int32_range("maps: routed rows", rows)
    if values_checked(batch_sizes):
        _check_batch_sizes(batch_sizes, rows)


def gmm_gathered(
    x: torch.Tensor,
    b: torch.Tensor,
    batch_sizes: torch.Tensor,
    maps: RowMaps,
    trans_b: bool = False,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """`gmm(gather_routed(x, maps), b, batch_sizes, trans_b, backend)` without the gathered copy.

    Args:
        x: `[T, K]` float32/float16/bfloat16 token rows (any strides).
        b: `[E, K, N]`, or `[E, N, K]` with `trans_b`; the dtype and device of `x`.
        batch_sizes: `[E]` int32/int64 routed rows per expert, summing to the rows of `maps`.
        maps: the `RowMaps` of `megablocks.ops.permute.route` (T = maps' assignments // top_k):
            routed row r is token `maps.row_assignment[r] // top_k`.
        trans_b, backend: as in `gmm`. 'triton' reads x through the map inside its kernels
            (forward and the gradient of b); the others gather explicitly first.

    Returns:
        `[R, N]` in the dtype of x, R = `maps.row_assignment.numel()`. Differentiable in x (the
        gradient of the gathered rows summed over each token's top_k rows, fp32, k in order:
        deterministic) and b.

    Raises:
        TypeError / ValueError: as `gmm` (x in the place of a), plus maps that are not a `RowMaps`
            of int32 tensors on x's device, or whose assignments do not match x's rows.
    """
    if backend is None and isinstance(x, torch.Tensor):
        backend = gmm_backend.default_backend(x)
    _check_gathered(x, b, batch_sizes, maps, trans_b, backend)
    return _gmm_gathered(x, b, batch_sizes, maps.row_assignment, maps.assignment_row, maps.top_k, trans_b, backend)


def gmm_shared_input_gathered(
    x: torch.Tensor,
    b1: torch.Tensor,
    b2: torch.Tensor,
    batch_sizes: torch.Tensor,
    maps: RowMaps,
    trans_b: bool = False,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """`gmm_shared_input(gather_routed(x, maps), b1, b2, batch_sizes, trans_b, backend)` without
    the gathered copy: a GLU's two up projections of the routed token rows.

    Arguments, results and errors as `gmm_gathered`, with `b2` of b1's shape, dtype and device.
    The gradient of x takes the gathered rows' gradient `d1 @ b1^T + d2 @ b2^T` in one
    accumulating pass (as `gmm_shared_input`), then sums it over each token's top_k rows.
    """
    if backend is None and isinstance(x, torch.Tensor):
        backend = gmm_backend.default_backend(x)
    _check_gathered(x, b1, batch_sizes, maps, trans_b, backend)
    _check_second_weight(b1, b2)
    return _gmm_shared_input_gathered(
        x, b1, b2, batch_sizes, maps.row_assignment, maps.assignment_row, maps.top_k, trans_b, backend
    )
