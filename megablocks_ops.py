"""MegaBlocks 0.10's compiled extension module, `megablocks_ops`, by name: the same functions with
the same out-argument signatures, computed by this package's ops (no compiler needed).

Code that imports `megablocks_ops` directly (MegaBlocks' own tests do) runs unchanged. Each
function writes its result into the tensor it is handed, as the extension did, and checks that
tensor's shape; new code should call `megablocks.ops` instead.
"""

import torch

from megablocks import _checks
from megablocks import ops as _ops
from megablocks.ops.replicate import _replicate_backward_op

__all__ = [
    "exclusive_cumsum",
    "histogram",
    "inclusive_cumsum",
    "indices",
    "replicate_backward",
    "replicate_forward",
    "sort",
]


def _write(name: str, out, result: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor to write the result into, got {type(out).__name__}")
    if out.numel() != result.numel():
        raise ValueError(f"{name}: expected an output of {tuple(result.shape)}, got {tuple(out.shape)}")
    out.copy_(result.reshape(out.shape))


def exclusive_cumsum(x: torch.Tensor, dim: int, out: torch.Tensor) -> None:
    """`out = exclusive cumsum of x along dim` (x 2-D int16/int32/int64)."""
    _write("exclusive_cumsum", out, _ops.exclusive_cumsum(x, dim))


def inclusive_cumsum(x: torch.Tensor, dim: int, out: torch.Tensor) -> None:
    """`out = inclusive cumsum of x along dim` (x 2-D int16/int32/int64)."""
    _write("inclusive_cumsum", out, _ops.inclusive_cumsum(x, dim))


def histogram(x: torch.Tensor, num_bins: int) -> torch.Tensor:
    """int32 counts of each id in [0, num_bins), per row of a 2-D `x` or of a 1-D one."""
    return _ops.histogram(x, num_bins).to(torch.int32)


def indices(padded_bins: torch.Tensor, block_size: int, output_block_rows: int,
            output_block_columns: int, out: torch.Tensor) -> None:
    """`out` (`[rows·columns]`) = the block column index of every block of the dMoE topology."""
    _write("indices", out, _ops.topology(padded_bins, block_size, output_block_rows, output_block_columns))


def replicate_forward(x: torch.Tensor, bins: torch.Tensor, out: torch.Tensor) -> None:
    """`out[:, i] = x[:, e]` for the bin e holding column i (`out` is `[R, bins[-1]]` or wider)."""
    _write("replicate_forward", out, _ops.replicate(x, bins, out.shape[-1]))


def replicate_backward(grad: torch.Tensor, bins: torch.Tensor, out: torch.Tensor) -> None:
    """`out[:, e] = sum of grad[:, i] over bin e's columns` (`out` is `[R, E]`): the backward op
    of `megablocks.ops.replicate`."""
    _checks.check_tensor("grad", grad, ndim=2)
    _checks.check_tensor("bins", bins, ndim=1, dtypes=_checks.INDEX_DTYPES)
    _write("replicate_backward", out, _replicate_backward_op(grad.contiguous(), bins.contiguous()))


def sort(x: torch.Tensor, end_bit: int, x_out: torch.Tensor, iota_out: torch.Tensor) -> None:
    """Stable sort of the 1-D ids `x` by their low `end_bit` bits: values into `x_out`, the
    permutation into `iota_out`."""
    values, order = _ops.sort(x, end_bit)
    _write("sort", x_out, values)
    _write("sort", iota_out, order)
