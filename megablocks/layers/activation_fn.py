"""Elementwise activations on the block-sparse activations of the sparse expert MLPs."""

from typing import Callable

import stk
import torch


def with_data(like: stk.Matrix, data: torch.Tensor) -> stk.Matrix:
    """An `stk.Matrix` with `like`'s topology (and its expert attributes) holding `data`."""
    out = stk.Matrix(
        like.size(),
        data,
        like.row_indices,
        like.column_indices,
        like.offsets,
        like.column_indices_t,
        like.offsets_t,
        like.block_offsets_t,
    )
    for name in ("num_experts", "ffn_hidden_size"):
        if hasattr(like, name):
            setattr(out, name, getattr(like, name))
    return out


def act_fn(x: stk.Matrix, function: Callable, **kwargs) -> stk.Matrix:
    """`function` applied to every stored element of the block-sparse `x` (MegaBlocks' helper).

    The activation is differentiable through `x.data`; block slots the topology does not use hold
    values nothing reads.
    """
    if not isinstance(x, stk.Matrix):
        raise TypeError(f"x: expected an stk.Matrix, got {type(x).__name__}")
    return with_data(x, function(x.data, **kwargs))
