"""Replicate columns by bins, and MegaBlocks' small `repeat` / `sum` helpers.

Legend: R rows, E inputs (experts), O outputs; `bins_E` is an inclusive cumsum of E counts.

    replicate(x_RE, bins_E, O)[:, i] = x_RE[:, e]   for bins[e-1] <= i < bins[e]   (0 past bins[-1])

Its gradient sums each bin's columns back into one. Plain torch (`searchsorted`, `index_select`,
`index_add_`), sync-free on CUDA: no value is read on the host, every column index is clamped.
"""

import torch

from megablocks import _checks
from megablocks.ops._eager import custom_op


def _column_inputs(bins_E: torch.Tensor, num_outputs: int):
    """Input column of each output column (clamped into [0, E)) and whether it lies in a bin."""
    cols = torch.arange(num_outputs, device=bins_E.device, dtype=bins_E.dtype)
    src = torch.searchsorted(bins_E, cols, right=True).clamp_(max=bins_E.numel() - 1)
    return src, cols < bins_E[-1]


@custom_op("replicate")
def _replicate_op(x_RE: torch.Tensor, bins_E: torch.Tensor, num_outputs: int) -> torch.Tensor:
    src, in_bin = _column_inputs(bins_E, num_outputs)
    zero = torch.zeros((), dtype=x_RE.dtype, device=x_RE.device)
    return torch.where(in_bin, x_RE.index_select(1, src), zero)


@_replicate_op.register_fake
def _(x_RE, bins_E, num_outputs):
    return x_RE.new_empty((x_RE.shape[0], num_outputs))


@custom_op("replicate_backward")
def _replicate_backward_op(grad_RO: torch.Tensor, bins_E: torch.Tensor) -> torch.Tensor:
    src, in_bin = _column_inputs(bins_E, grad_RO.shape[1])
    # Half-precision sums over a bin accumulate in fp32.
    acc = torch.float32 if grad_RO.dtype in (torch.float16, torch.bfloat16) else grad_RO.dtype
    grad_O = torch.where(in_bin, grad_RO, torch.zeros((), dtype=grad_RO.dtype, device=grad_RO.device))
    out = torch.zeros((grad_RO.shape[0], bins_E.numel()), dtype=acc, device=grad_RO.device)
    return out.index_add_(1, src, grad_O.to(acc)).to(grad_RO.dtype)


@_replicate_backward_op.register_fake
def _(grad_RO, bins_E):
    return grad_RO.new_empty((grad_RO.shape[0], bins_E.shape[0]))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _backward(ctx, grad_RO):
    (bins_E,) = ctx.saved_tensors
    return _replicate_backward_op(grad_RO.contiguous(), bins_E), None, None


_replicate_op.register_autograd(_backward, setup_context=_setup_context)


def replicate(x: torch.Tensor, bins: torch.Tensor, num_outputs: int) -> torch.Tensor:
    """Copies column e of `x` into output columns [bins[e-1], bins[e]).

    Args:
        x: `[R, E]`, any dtype (integer ids or floats).
        bins: int32/int64 `[E]`, non-decreasing and non-negative (an inclusive cumsum of counts;
            checked on CPU).
        num_outputs: O >= 0, usually `bins[-1]` (columns at or past bins[-1] are 0).

    Returns:
        `[R, O]` of x's dtype. Differentiable in x: the gradient of column e is the sum of the
        output gradient over its bin's columns (accumulated in fp32 for fp16/bf16).

    Raises:
        TypeError: x or bins not a tensor; bins not int32/int64; num_outputs not an int.
        ValueError: x not 2-D; bins not 1-D of x.shape[1] entries; different devices;
            on CPU, bins decreasing or negative.
    """
    _checks.check_tensor("x", x, ndim=2)
    _checks.check_tensor("bins", bins, ndim=1, dtypes=_checks.INDEX_DTYPES)
    _checks.check_int("num_outputs", num_outputs, min_value=0, max_value=_checks.INT32_MAX)
    _checks.check_same_device(x=x, bins=bins)
    if bins.numel() != x.shape[1] or bins.numel() == 0:
        raise ValueError(
            f"bins: expected one entry per column of x ({x.shape[1]}, at least 1), got {bins.numel()}"
        )
    if not torch.compiler.is_compiling() and _checks.values_checked(bins):
        if bool((bins < 0).any()) or bool((bins[1:] < bins[:-1]).any()):
            raise ValueError(f"bins: expected non-negative, non-decreasing values, got {bins.tolist()[:16]}")
    return _replicate_op(x, bins.contiguous(), num_outputs)


def repeat(x: torch.Tensor, tiling) -> torch.Tensor:
    """`x.repeat(*tiling)`, or `x` itself when every factor is 1."""
    if all(t == 1 for t in tiling):
        return x
    return x.repeat(*tiling)


def sum(x: torch.Tensor, dim: int = 0) -> torch.Tensor:  # noqa: A001 (MegaBlocks' name)
    """`x.sum(dim)`, or `x.squeeze(dim)` when that dimension has size 1 (no reduction kernel)."""
    if x.shape[dim] == 1:
        return x.squeeze(dim)
    return x.sum(dim=dim)
