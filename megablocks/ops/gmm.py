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
`megablocks.ops.route`):

    gmm_gathered(x_TH, b, batch_sizes, maps)                  == gmm(gather_routed(x_TH, maps), b, ...)
    gmm_shared_input_gathered(x_TH, b1, b2, batch_sizes, maps) == gmm_shared_input(gather_routed(...), ...)

The 'triton' backend reads x's rows through the map inside the kernels, in the forward and in the
weight gradient, so the gathered `[N, H]` rows are neither written nor kept for the backward. The
gradient of x is `gather_routed`'s: the gradient of the gathered rows (a grouped GEMM), summed
over each token's top_k rows in fp32, k in order (deterministic). The other backends gather
explicitly and call the plain products (same results).

All four public functions are one op, `torch.ops.megablocks.gmm` (optional token-row maps,
optional second weight for the GLU pair), with one backward; the products the forward and the
backward run are one more op without autograd, `torch.ops.megablocks.gmm_product` (see below).
"""

from typing import List, Optional, Tuple

import torch

from megablocks import _checks
from megablocks.backend import gmm as gmm_backend
from megablocks.backend import permute as permute_kernels
from megablocks.backend import use_triton
from megablocks.ops._eager import custom_op
from megablocks.ops.permute import _check_rows, _scatter_rows, gather_rows_reference
from megablocks.ops.routing import RowMaps


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


# --------------------------------------------------------------------------------------------
# One grouped-GEMM op with one backward, over one product op without autograd.
#
#   _grouped_mm(a, b, b2, batch_sizes, row_assignment, assignment_row, top_k, trans_b, backend)
#       -> [a' @ b] or [a' @ b, a' @ b2]       (b^T with trans_b), a' = a, or with row maps the
#                                              token rows a[row_assignment // top_k] (zeros at -1)
#   _product(...)   every form the forward and the backward take (see `_product_impl`)
#
# The backward: the rows' gradient g1 @ b^T (+ g2 @ b2^T in the same accumulating pass), summed
# over each token's top_k rows with maps (`gather_routed`'s backward); each weight's gradient the
# variable-K product of its input rows (read through the maps in the kernel) and its output's
# gradient, computed in the weight's own layout.


def _explicit_rows(x, row_assignment, assignment_row, top_k: int) -> torch.Tensor:
    """x's rows through the maps, copied (`gather_routed`'s forward, no autograd): for the
    backends without an in-kernel row map."""
    if use_triton(x):
        return permute_kernels.gather_rows(x, assignment_row, row_assignment, None, top_k)
    return gather_rows_reference(x, row_assignment, None, top_k)


def _in_kernel_map(x: torch.Tensor, backend_name: str) -> bool:
    return backend_name == "triton" and use_triton(x)


def _plain_product(a, b, batch_sizes, trans_a: bool, trans_b: bool, backend_name: str) -> torch.Tensor:
    if backend_name == "triton" and not use_triton(a):
        return gmm_reference(a, b, batch_sizes, trans_a, trans_b)
    return gmm_backend.run_gmm(a, b, batch_sizes, trans_a, trans_b, backend_name)


def _product_impl(a, b, batch_sizes, a2, b2, row_assignment, assignment_row, top_k: int, rows_of_b: bool,
                  trans_a: bool, trans_b: bool, backend_name: str) -> torch.Tensor:
    """The product forms (arguments checked by the caller):

        no maps, no a2:   gmm(a, b)                       forward forms, or variable-K with trans_a
        a2, b2:           gmm(a, b) + gmm(a2, b2)         forward forms (the second added in the
                                                          first's epilogue with 'triton')
        maps, forward:    gmm(a[map], b)                  a the [T, K] token rows
        maps, trans_a:    gmm(a[map], b, trans_a)         or, with rows_of_b, gmm(a, b[map], trans_a)

    where `x[map]` is `gather_routed(x, RowMaps(assignment_row, row_assignment, top_k))`, read
    through the map inside the kernels with 'triton' (no gathered copy).
    """
    if row_assignment is None:
        if a2 is None:
            return _plain_product(a, b, batch_sizes, trans_a, trans_b, backend_name)
        if backend_name == "triton" and not use_triton(a):
            return (gmm_reference(a, b, batch_sizes, False, trans_b)
                    + gmm_reference(a2, b2, batch_sizes, False, trans_b))
        return gmm_backend.gmm_sum(a, b, a2, b2, batch_sizes, trans_b, backend_name)
    mapped = b if rows_of_b else a
    if not _in_kernel_map(mapped, backend_name):
        rows = _explicit_rows(mapped, row_assignment, assignment_row, top_k)
        a, b = (a, rows) if rows_of_b else (rows, b)
        return _plain_product(a, b, batch_sizes, trans_a, trans_b, backend_name)
    M = row_assignment.shape[0]
    if trans_a:
        E, K, N = batch_sizes.shape[0], a.shape[1], b.shape[1]
        if M == 0 or E * K * N == 0:
            return a.new_zeros((E, K, N))
    else:
        N = b.shape[1] if trans_b else b.shape[2]
        if M * N == 0 or b.shape[0] * a.shape[1] == 0:
            return a.new_zeros((M, N))
    maps = dict(b_rows=row_assignment) if rows_of_b else dict(a_rows=row_assignment)
    return gmm_backend.triton_gmm(a, b, batch_sizes, trans_a, trans_b, rows_top_k=top_k, **maps)


@custom_op("gmm_product")
def _product(
    a: torch.Tensor, b: torch.Tensor, batch_sizes: torch.Tensor, a2: Optional[torch.Tensor],
    b2: Optional[torch.Tensor], row_assignment: Optional[torch.Tensor], assignment_row: Optional[torch.Tensor],
    top_k: int, rows_of_b: bool, trans_a: bool, trans_b: bool, backend_name: str,
) -> torch.Tensor:
    return _product_impl(a, b, batch_sizes, a2, b2, row_assignment, assignment_row, top_k, rows_of_b,
                         trans_a, trans_b, backend_name)


@_product.register_fake
def _(a, b, batch_sizes, a2, b2, row_assignment, assignment_row, top_k, rows_of_b, trans_a, trans_b, backend_name):
    if trans_a:
        return a.new_empty((batch_sizes.shape[0], a.shape[1], b.shape[1]))
    rows = a.shape[0] if row_assignment is None else row_assignment.shape[0]
    return a.new_empty((rows, b.shape[1] if trans_b else b.shape[2]))


def _grouped_mm_impl(a, b, b2, batch_sizes, row_assignment, assignment_row, top_k, trans_b, backend_name):
    args = (batch_sizes, None, None, row_assignment, assignment_row, top_k, False, False, trans_b, backend_name)
    if row_assignment is not None and b2 is not None and not _in_kernel_map(a, backend_name):
        a = _explicit_rows(a, row_assignment, assignment_row, top_k)  # gathered once for both
        args = (batch_sizes, None, None, None, None, 1, False, False, trans_b, backend_name)
    outs = [_product_impl(a, b, *args)]
    if b2 is not None:
        outs.append(_product_impl(a, b2, *args))
    return outs


@custom_op("gmm")
def _grouped_mm(
    a: torch.Tensor, b: torch.Tensor, b2: Optional[torch.Tensor], batch_sizes: torch.Tensor,
    row_assignment: Optional[torch.Tensor], assignment_row: Optional[torch.Tensor], top_k: int, trans_b: bool,
    backend_name: str,
) -> List[torch.Tensor]:
    return _grouped_mm_impl(a, b, b2, batch_sizes, row_assignment, assignment_row, top_k, trans_b, backend_name)


@_grouped_mm.register_fake
def _(a, b, b2, batch_sizes, row_assignment, assignment_row, top_k, trans_b, backend_name):
    rows = a.shape[0] if row_assignment is None else row_assignment.shape[0]
    n = b.shape[1] if trans_b else b.shape[2]
    return [a.new_empty((rows, n)) for _ in range(1 if b2 is None else 2)]


def _setup_context(ctx, inputs, output):
    a, b, b2, batch_sizes, row_assignment, assignment_row, top_k, trans_b, backend_name = inputs
    ctx.save_for_backward(a, b, b2, batch_sizes, row_assignment, assignment_row)
    ctx.top_k, ctx.trans_b, ctx.backend_name = top_k, trans_b, backend_name


def _output_grads(grads, pair: bool):
    """The outputs' gradients, contiguous (a broadcast one, e.g. of `out.sum()`, has zero strides,
    which grouped_mm rejects); with a pair, an unused output's (None) as zeros."""
    grads = [g if g is None else g.contiguous() for g in grads]
    if pair and (grads[0] is None or grads[1] is None):
        present = 0 if grads[1] is None else 1
        grads[1 - present] = torch.zeros_like(grads[present])
    return grads


def _weight_grad(a, grad, batch_sizes, row_assignment, assignment_row, top_k, trans_b, name):
    """The gradient of b in `gmm(a', b, trans_b)` from the output's gradient, in b's layout:
    per group `a'_e^T @ grad_e` ([E, K, N]) or, with trans_b, `grad_e^T @ a'_e` ([E, N, K])."""
    lhs, rhs = (grad, a) if trans_b else (a, grad)
    return _product(lhs, rhs, batch_sizes, None, None, row_assignment, assignment_row, top_k, trans_b, True,
                    False, name)


def _add_weight_grad(acc, a, grad, batch_sizes, row_assignment, assignment_row, top_k: int, trans_b: bool,
                     name: str) -> None:
    """`acc += _weight_grad(...)`, acc a contiguous fp32 tensor of b's shape: with 'triton', added
    in the variable-K kernel's epilogue (the weight gradient is never written in a's dtype)."""
    lhs, rhs = (grad, a) if trans_b else (a, grad)
    if not _in_kernel_map(lhs, name):  # (both operands on one device)
        acc.add_(_weight_grad(a, grad, batch_sizes, row_assignment, assignment_row, top_k, trans_b, name))
        return
    rows = lhs.shape[0] if row_assignment is None else row_assignment.shape[0]
    if rows == 0 or acc.numel() == 0:
        return
    maps = {}
    if row_assignment is not None:
        maps = dict(b_rows=row_assignment) if trans_b else dict(a_rows=row_assignment)
    gmm_backend.triton_gmm(lhs, rhs, batch_sizes, True, False, rows_top_k=top_k, accumulate_into=acc, **maps)


class _WeightGradInto(torch.autograd.Function):
    """`out` unchanged; the backward adds the gradient of the weight of the product that made
    `out` into `acc` (see `weight_grad_into`) and passes `out`'s gradient on."""

    @staticmethod
    def forward(ctx, out, a, b, acc, batch_sizes, row_assignment, assignment_row, top_k, trans_b, backend_name):
        ctx.save_for_backward(a, batch_sizes, row_assignment, assignment_row)
        # The accumulator is not saved: its values change between this forward and the backward
        # (other micro-batches' gradients), which is what it is for.
        ctx.acc, ctx.top_k, ctx.trans_b, ctx.backend_name = acc, top_k, trans_b, backend_name
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        a, batch_sizes, row_assignment, assignment_row = ctx.saved_tensors
        _add_weight_grad(ctx.acc, a, grad.contiguous(), batch_sizes, row_assignment, assignment_row, ctx.top_k,
                         ctx.trans_b, ctx.backend_name)
        return grad, None, None, None, None, None, None, None, None, None


def weight_grad_into(
    out: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    acc: torch.Tensor,
    batch_sizes: torch.Tensor,
    maps: Optional[RowMaps] = None,
    trans_b: bool = False,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Gradient-accumulation fusion: `out` (= `gmm(a, b.detach(), ...)`, or `gmm_gathered` with
    `maps`) returned unchanged, and in the backward the gradient of `b` added into `acc` (b's
    own `.grad` is left alone: b is an input only so that `out` requires grad where b does).

    For a weight `b` whose gradient is summed over micro-batches in fp32 (`main_grad`, as
    `megablocks.optim.MainWeightsAdamW.fuse_grad_accumulation` keeps it), the product is taken with
    `b.detach()` and its result passed through here: the 'triton' backend then adds each
    micro-batch's weight gradient to the fp32 accumulator in the kernel's epilogue (8 bytes an
    element read and written) instead of writing it in b's dtype for a later pass to add (12).
    Other backends compute the gradient and add it (the same values; no bytes saved).

    Args:
        out: the product's result `[M, N]` (requires grad through `a`, or not at all).
        a, b, batch_sizes, maps, trans_b, backend: the product's arguments, as given to `gmm` /
            `gmm_gathered` (`a` is the token rows `[T, K]` with `maps`; `b` not detached).
        acc: float32, contiguous, of b's shape (`[E, K, N]`, or `[E, N, K]` with `trans_b`), on a's
            device.

    Returns:
        `out`'s values (a view) whose backward adds `b`'s gradient to `acc`.

    Raises:
        TypeError / ValueError: an `acc` that is not such a tensor, or shapes that do not fit.
    """
    if backend is None and isinstance(a, torch.Tensor):
        backend = gmm_backend.default_backend(a)
    _checks.check_tensor("acc", acc, dtypes=(torch.float32,), numel_int32=False)
    _checks.check_tensor("out", out, ndim=2, dtypes=_checks.FLOAT_DTYPES, numel_int32=False)
    _checks.check_tensor("a", a, ndim=2, dtypes=(out.dtype,), numel_int32=False)
    _checks.check_tensor("b", b, ndim=3, dtypes=(out.dtype,), numel_int32=False)
    want = (b.shape[0], out.shape[1], a.shape[1]) if trans_b else (b.shape[0], a.shape[1], out.shape[1])
    if tuple(b.shape) != want:
        raise ValueError(f"b: expected shape {want} (from a and out, trans_b={trans_b}), got {tuple(b.shape)}")
    if tuple(acc.shape) != want or not acc.is_contiguous() or acc.device != a.device:
        raise ValueError(f"acc: expected a contiguous float32 tensor of b's shape {want} on {a.device}, got "
                         f"{tuple(acc.shape)} on {acc.device} (contiguous={acc.is_contiguous()})")
    rows = out.shape[0]
    if maps is None:
        _check_rows("a", a.shape[0], rows, "the rows of out")
        row_assignment = assignment_row = None
        top_k = 1
    else:
        if not isinstance(maps, RowMaps):
            raise TypeError(f"maps: expected a RowMaps (megablocks.ops.permute.route), got {type(maps).__name__}")
        _check_rows("maps.row_assignment", maps.row_assignment.shape[0], rows, "the rows of out")
        row_assignment, assignment_row, top_k = maps.row_assignment, maps.assignment_row, maps.top_k
    if not torch.is_grad_enabled():
        return out
    return _WeightGradInto.apply(out, a, b, acc, batch_sizes, row_assignment, assignment_row, top_k, trans_b,
                                 backend)


def _backward(ctx, grads):
    a, b, b2, batch_sizes, row_assignment, assignment_row = ctx.saved_tensors
    name, trans_b, top_k = ctx.backend_name, ctx.trans_b, ctx.top_k
    pair = b2 is not None
    grads = _output_grads(grads, pair)
    d_a = d_b = d_b2 = None
    if ctx.needs_input_grad[0]:
        g2, w2 = (grads[1], b2) if pair else (None, None)
        d_rows = _product(grads[0], b, batch_sizes, g2, w2, None, None, 1, False, False, not trans_b, name)
        if row_assignment is None:
            d_a = d_rows
        else:  # gather_routed's backward: each token's top_k rows summed in fp32, k in order
            d_a = _scatter_rows(d_rows, assignment_row, row_assignment, None, top_k)
    if ctx.needs_input_grad[1]:
        d_b = _weight_grad(a, grads[0], batch_sizes, row_assignment, assignment_row, top_k, trans_b, name)
    if pair and ctx.needs_input_grad[2]:
        d_b2 = _weight_grad(a, grads[1], batch_sizes, row_assignment, assignment_row, top_k, trans_b, name)
    return d_a, d_b, d_b2, None, None, None, None, None, None


_grouped_mm.register_autograd(_backward, setup_context=_setup_context)


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
    _checks.check_batch_size_values(batch_sizes, a.shape[0])
    out1, out2 = _grouped_mm(a, b1, b2, batch_sizes, None, None, 1, trans_b, backend)
    return out1, out2


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
    _checks.check_batch_size_values(batch_sizes, a.shape[0])
    return _grouped_mm(a, b, None, batch_sizes, None, None, 1, trans_b, backend)[0]


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
    _checks.check_batch_size_values(batch_sizes, rows, "the rows of maps")


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
    return _grouped_mm(x, b, None, batch_sizes, maps.row_assignment, maps.assignment_row, maps.top_k, trans_b,
                       backend)[0]


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
    out1, out2 = _grouped_mm(x, b1, b2, batch_sizes, maps.row_assignment, maps.assignment_row, maps.top_k,
                             trans_b, backend)
    return out1, out2
