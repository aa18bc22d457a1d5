"""A differentiable `all_to_all` of rows with uneven split sizes, on `torch.distributed`.

Legend: R rows sent, S rows received, W ranks of the group, D the trailing dimensions.

    y_SD = all_to_all(x_RD, output_split_sizes, input_split_sizes, group)
    rank r sends rows [Σ in[:d], Σ in[:d+1]) of x to rank d, and receives from rank s the
    rows it sent to r, placed at [Σ out[:s], Σ out[:s+1]) of y.

The backward is the reverse exchange (split sizes swapped). `start_all_to_all` / `wait_all_to_all`
split one exchange in two, forward and backward alike, so that other work runs between them
(the chunked expert-parallel pipeline). Split sizes are host-side lists:
their values are what the expert-parallel layers read from the device (the one documented host
synchronisation of expert parallelism).
"""

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist


def _exchange(x: torch.Tensor, output_split_sizes: List[int], input_split_sizes: List[int], group) -> torch.Tensor:
    out = x.new_empty((sum(output_split_sizes),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes, input_split_sizes, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_split_sizes, input_split_sizes, group):
        ctx.output_split_sizes = output_split_sizes
        ctx.input_split_sizes = input_split_sizes
        ctx.group = group
        return _exchange(x, output_split_sizes, input_split_sizes, group)

    @staticmethod
    def backward(ctx, grad):
        grad_x = _exchange(grad, ctx.input_split_sizes, ctx.output_split_sizes, ctx.group)
        return grad_x, None, None, None


class _Pending:
    """One asynchronous exchange in each direction: the forward's and the backward's."""

    def __init__(self, output_split_sizes, input_split_sizes, group):
        self.output_split_sizes, self.input_split_sizes, self.group = output_split_sizes, input_split_sizes, group
        self.out = self.work = None  # the forward exchange
        self.grad = self.grad_work = None  # the backward's

    @staticmethod
    def issue(x, output_split_sizes, input_split_sizes, group):
        out = x.new_empty((sum(output_split_sizes),) + tuple(x.shape[1:]))
        work = dist.all_to_all_single(out, x.contiguous(), output_split_sizes, input_split_sizes, group=group,
                                      async_op=True)
        return out, work


class _Start(torch.autograd.Function):
    """x -> a token (empty) that `_Wait` turns into the exchanged rows; the backward waits for the
    reverse exchange `_Wait`'s backward started."""

    @staticmethod
    def forward(ctx, x, pending):
        ctx.pending = pending
        pending.out, pending.work = _Pending.issue(x, pending.output_split_sizes, pending.input_split_sizes,
                                                   pending.group)
        return x.new_empty(0)

    @staticmethod
    def backward(ctx, _):
        pending = ctx.pending
        pending.grad_work.wait()
        grad, pending.grad, pending.grad_work = pending.grad, None, None
        return grad, None


class _Wait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token, pending):
        ctx.pending = pending
        pending.work.wait()
        out, pending.out, pending.work = pending.out, None, None
        return out

    @staticmethod
    def backward(ctx, grad):
        pending = ctx.pending
        pending.grad, pending.grad_work = _Pending.issue(grad, pending.input_split_sizes, pending.output_split_sizes,
                                                         pending.group)
        return grad.new_empty(0), None  # the token's (empty) gradient: `_Start`'s backward runs


def start_all_to_all(x: torch.Tensor, output_split_sizes: Sequence[int], input_split_sizes: Sequence[int],
                     group: Optional[dist.ProcessGroup] = None):
    """Starts `all_to_all(x, ...)` without waiting for it: returns a handle for `wait_all_to_all`.

    Differentiable as `all_to_all`: the backward of `wait_all_to_all` starts the reverse exchange
    and the backward of this call waits for it, so the autograd nodes in between (another
    chunk's backward) run while the rows travel. Checks and raises as `all_to_all`."""
    output_split_sizes, input_split_sizes = _check_exchange(x, output_split_sizes, input_split_sizes, group)
    pending = _Pending(output_split_sizes, input_split_sizes, group)
    return _Start.apply(x, pending), pending


def wait_all_to_all(handle) -> torch.Tensor:
    """The rows `start_all_to_all` exchanged: [sum(output_split_sizes), ...]."""
    token, pending = handle
    return _Wait.apply(token, pending)


def _check_splits(name: str, splits, world_size: int) -> List[int]:
    if not isinstance(splits, (list, tuple)) or any(isinstance(s, bool) or not isinstance(s, int) for s in splits):
        raise TypeError(f"{name}: expected a list of ints, got {splits!r}")
    if len(splits) != world_size or any(s < 0 for s in splits):
        raise ValueError(f"{name}: expected {world_size} non-negative sizes (one per rank), got {list(splits)}")
    return list(splits)


def all_to_all(
    x: torch.Tensor,
    output_split_sizes: Sequence[int],
    input_split_sizes: Sequence[int],
    group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """Exchanges row blocks of `x` [R, ...] between the ranks of `group`; differentiable in x.

    Args:
        x: [R, ...] any dtype the backend moves (gloo: CPU tensors; NCCL: CUDA tensors).
        output_split_sizes: W ints, the rows received from each rank (must equal what that rank
            sends here: a mismatch is an error or a hang of the backend, not checked here).
        input_split_sizes: W ints summing to R, the rows sent to each rank.
        group: the process group (None: the default group).

    Returns:
        [sum(output_split_sizes), ...], same dtype and device as x.

    Raises:
        TypeError: x not a tensor, split sizes not lists of ints.
        ValueError: split sizes not one non-negative int per rank, or input sizes not summing to R.
    """
    output_split_sizes, input_split_sizes = _check_exchange(x, output_split_sizes, input_split_sizes, group)
    return _AllToAll.apply(x, output_split_sizes, input_split_sizes, group)


def _check_exchange(x, output_split_sizes, input_split_sizes, group) -> Tuple[List[int], List[int]]:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x: expected at least one dimension (rows), got a scalar")
    world_size = dist.get_world_size(group)
    output_split_sizes = _check_splits("output_split_sizes", output_split_sizes, world_size)
    input_split_sizes = _check_splits("input_split_sizes", input_split_sizes, world_size)
    if sum(input_split_sizes) != x.shape[0]:
        raise ValueError(
            f"input_split_sizes: expected sizes summing to the {x.shape[0]} rows of x, got {input_split_sizes}"
        )
    return output_split_sizes, input_split_sizes
