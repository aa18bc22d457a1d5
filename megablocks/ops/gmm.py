"""Grouped GEMM with autograd: `gmm(a, b, batch_sizes, trans_b=False, backend=None)`.

Legend: M rows (routed tokens in expert order), K inner size, N output size, E experts.
The rows of `a_MK` are split into E consecutive groups of `batch_sizes_E[e]` rows; group e is
multiplied by expert e's matrix `b[e]` (`[K, N]`, or `[N, K]` with `trans_b`). This is the
`grouped_gemm` package's `ops.gmm`, with a choice of backends (see `megablocks.backend.gmm`):
'triton' (ours, no host sync), 'torch' (`torch.nn.functional.grouped_mm`) and 'gg'
(`grouped_gemm`, whose host-side batch sizes are a documented sync).

Gradients: d_a = gmm(d_out, b, trans_b=not trans_b); d_b is the variable-K product
(`trans_a=True`: per group a^T @ d_out, or d_out^T @ a with trans_b), summed over each group's rows.
"""

from typing import Optional, Tuple

import torch

from megablocks._checks import values_checked
from megablocks.backend import gmm as gmm_backend
from megablocks.backend import use_triton
from megablocks.ops._eager import eager


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
    return gmm_backend.gmm(a, b, batch_sizes, trans_a, trans_b, backend_name)


@torch.library.custom_op("megablocks::gmm", mutates_args=())
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

# Eager calls skip the custom-op dispatcher (megablocks/ops/_eager.py).
_gmm = eager(_gmm)


# --------------------------------------------------------------------------------------------
# Two products of one input (the GLU's up projections): its gradient in one accumulating pass.


@torch.library.custom_op("megablocks::gmm_sum", mutates_args=())
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


@torch.library.custom_op("megablocks::gmm_shared_input", mutates_args=())
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


def _shared_backward(ctx, grad1, grad2):
    a, b1, b2, batch_sizes = ctx.saved_tensors
    name, trans_b = ctx.backend_name, ctx.trans_b
    grads = [g if g is None else g.contiguous() for g in (grad1, grad2)]
    if grads[0] is None or grads[1] is None:  # one output unused: a plain product for the other
        present = 0 if grads[1] is None else 1
        grads[1 - present] = torch.zeros_like(grads[present])
    g1, g2 = grads
    d_a = d_b1 = d_b2 = None
    if ctx.needs_input_grad[0]:
        d_a = _gmm_sum(g1, b1, g2, b2, batch_sizes, not trans_b, name)
    if ctx.needs_input_grad[1]:
        d_b1 = _gmm(*((g1, a) if trans_b else (a, g1)), batch_sizes, True, False, name)
    if ctx.needs_input_grad[2]:
        d_b2 = _gmm(*((g2, a) if trans_b else (a, g2)), batch_sizes, True, False, name)
    return d_a, d_b1, d_b2, None, None, None


_gmm_shared_input.register_autograd(_shared_backward, setup_context=_shared_setup_context)
_gmm_sum, _gmm_shared_input = eager(_gmm_sum), eager(_gmm_shared_input)


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
    if not isinstance(b2, torch.Tensor):
        raise TypeError(f"b2: expected a torch.Tensor, got {type(b2).__name__}")
    if b2.shape != b1.shape:
        raise ValueError(f"b2: expected the shape of b1 {tuple(b1.shape)}, got {tuple(b2.shape)}")
    if b2.dtype != b1.dtype:
        raise TypeError(f"b2: expected the dtype of b1 ({b1.dtype}), got {b2.dtype}")
    if b2.device != b1.device:
        raise ValueError(f"b2: expected a tensor on {b1.device} (the device of b1), got one on {b2.device}")
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
