"""Elementwise activations of the expert MLPs: on block-sparse activations, and recognising the
activations that the fused GLU op (`megablocks.ops.glu`) implements.

A GLU activation (`megablocks.ops.activation.clamped_swiglu`, gpt-oss's clamped SwiGLU) takes the
gate and the linear branch together, `fn(gate, up)`; the others take the gate, `fn(gate) * up`
(`gated_product` computes either).
"""

import functools
from typing import Callable, Optional

import stk
import torch
import torch.nn.functional as F

from megablocks.ops.activation import GELU_APPROXIMATIONS, clamped_swiglu, gated_product, is_gated

__all__ = ["act_fn", "fused_name", "gated_product", "is_gated", "with_data"]


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


# Activation callables the fused GLU op implements, by identity.
_FUSED_FUNCTIONS = ((F.silu, "silu"), (F.relu, "relu"), (torch.relu, "relu"), (F.gelu, "gelu"),
                    (clamped_swiglu, "clamped_swiglu"))


def fused_name(fn: Callable) -> Optional[str]:
    """The `megablocks.ops.glu` activation name computing what `fn` computes, else None.

    Recognised: `F.silu`, `F.relu`, `torch.relu`, `F.gelu`, `functools.partial(F.gelu,
    approximate='none'|'tanh')` (the default `Arguments.activation_fn`),
    `megablocks.ops.activation.clamped_swiglu` ('clamped_swiglu', a GLU activation), and modules
    `torch.nn.SiLU()`, `torch.nn.ReLU()`, `torch.nn.GELU(approximate=...)`. Anything else (other
    partials, lambdas, subclasses, modules with forward hooks) is None: the caller keeps its torch
    path.
    """
    for function, name in _FUSED_FUNCTIONS:
        if fn is function:
            return name
    if isinstance(fn, functools.partial) and fn.func is F.gelu and not fn.args:
        approximate = fn.keywords.get("approximate", "none")
        if set(fn.keywords) <= {"approximate"} and isinstance(approximate, str):
            return GELU_APPROXIMATIONS.get(approximate)
        return None
    if isinstance(fn, torch.nn.Module) and (fn._forward_hooks or fn._forward_pre_hooks):
        return None  # the fused op would skip the hooks
    if type(fn) is torch.nn.SiLU:
        return "silu"
    if type(fn) is torch.nn.ReLU:
        return "relu"
    if type(fn) is torch.nn.GELU:
        return GELU_APPROXIMATIONS.get(fn.approximate)
    return None
