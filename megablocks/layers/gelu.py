"""MegaBlocks' `layers.gelu`: the tanh-approximated GELU on a block-sparse `stk.Matrix`'s blocks.

    gelu(x)                 stk.Matrix with x's topology, blocks GELU_tanh(x.data)
    gelu_backward_(g, x)    g *= GELU_tanh'(x), in place (stk.Matrix or tensor), returned

GELU_tanh(x) = x/2 · (1 + tanh(u)), u = √(2/π)·(x + 0.044715·x³), so

    GELU_tanh'(x) = (1 + tanh(u))/2 + x/2 · (1 − tanh²(u)) · √(2/π)·(1 + 3·0.044715·x²).

The layers here fuse their activations into kernels (`megablocks.ops.activation`); these keep code
written against MegaBlocks' module running. Math in fp32, results in the input's dtype.
"""

import math

import stk
import torch
import torch.nn.functional as F

from megablocks.ops.topology import ExpertTopology

_C = math.sqrt(2.0 / math.pi)
_A = 0.044715


def _gelu_grad(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    t = torch.tanh(_C * (x + _A * x * x * x))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _C * (1.0 + 3.0 * _A * x * x)


def _with_data(m: stk.Matrix, data: torch.Tensor) -> stk.Matrix:
    """A matrix with m's topology (and expert layout, if it carries one) and these blocks."""
    meta = (m.row_indices, m.column_indices, m.offsets, m.column_indices_t, m.offsets_t, m.block_offsets_t)
    if isinstance(m, ExpertTopology):
        out = ExpertTopology(m.size(), data, *meta, num_experts=m.num_experts, ffn_hidden_size=m.ffn_hidden_size)
    else:
        out = stk.Matrix(m.size(), data, *meta)
    out._transposed = m._transposed  # a transposed view stays one
    return out


def gelu(x: stk.Matrix) -> stk.Matrix:
    """The tanh-approximated GELU of every block of `x`, as a matrix with x's topology."""
    if not isinstance(x, stk.Matrix):
        raise TypeError(f"x: expected an stk.Matrix, got {type(x).__name__}")
    return _with_data(x, F.gelu(x.data, approximate="tanh"))


def gelu_backward_(grad, x):
    """`grad *= GELU_tanh'(x)` in place; `grad` and `x` both `stk.Matrix` of one topology (the
    result takes x's), or both tensors of one shape."""
    if isinstance(grad, stk.Matrix) and isinstance(x, stk.Matrix):
        if grad.data.shape != x.data.shape:
            raise ValueError(f"grad, x: expected blocks of one shape, got {tuple(grad.data.shape)} "
                             f"and {tuple(x.data.shape)}")
        grad.data.mul_(_gelu_grad(x.data).to(grad.data.dtype))
        return _with_data(x, grad.data)
    if not (isinstance(grad, torch.Tensor) and isinstance(x, torch.Tensor)):
        raise TypeError(f"grad, x: expected two stk.Matrix or two tensors, got {type(grad).__name__} "
                        f"and {type(x).__name__}")
    if grad.shape != x.shape:
        raise ValueError(f"grad, x: expected one shape, got {tuple(grad.shape)} and {tuple(x.shape)}")
    return grad.mul_(_gelu_grad(x).to(grad.dtype))
