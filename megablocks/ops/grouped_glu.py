"""The grouped path's GLU experts in training as one autograd node.

Legend: T tokens, H hidden, E experts, F ffn per expert, K top-k, N = T·K routed rows.

    h1_NF, h2_NF = x[rows] @ w1_e^T, x[rows] @ v1_e^T     the shared-input pair reading the token
                                                          rows through the maps (`gmm_shared_input_gathered`)
    a_NF   = act(h1) * h2                                 the fused GLU (`glu`)
    y_NH   = a @ w2_e                                     the down grouped GEMM (`gmm`)

Composed from those ops, a training step records three autograd nodes and three views of the
weights (their `[E·F, H]` parameters as `[E, F, H]`), each with its Python on the way in and its
node in the backward: at small steps, where the host issues the step slower than the GPU runs
it, that is time the step waits for. `grouped_glu_experts` runs the same kernels, in the same
order, with the same arguments, as one `autograd.Function`: its results and every gradient are
bitwise those of the composed ops (tests/layers/test_one_node_experts.py), and the backward computes each
weight's gradient in its parameter's layout, as they do.

`GroupedMLP.forward` takes it (the module is still called, so its hooks, e.g. FSDP's, run) in plain
eager mode with the Triton kernels only (`one_node_applies`); elsewhere (torch.compile, tracing,
other backends, FP8, biases, fused gradient accumulation) it composes the ops.
"""

from typing import Optional

import torch

from megablocks.backend import activation as activation_kernels
from megablocks.backend import use_triton
from megablocks.ops._eager import _plain_eager
from megablocks.ops.gmm import _grouped_mm_impl, _product_impl
from megablocks.ops.permute import _scatter_rows
from megablocks.ops.routing import RowMaps

_TRITON = "triton"


def one_node_applies(x_TH: torch.Tensor, *tensors: Optional[torch.Tensor]) -> bool:
    """Whether `grouped_glu_experts` may run for these inputs: plain eager tensors (no compile,
    trace or dispatch mode), the Triton kernels in use for x, and a gradient to record."""
    if not torch.is_grad_enabled() or not use_triton(x_TH):
        return False
    present = [t for t in (x_TH, *tensors) if t is not None]
    return _plain_eager(present) and any(t.requires_grad for t in present)


class _GroupedGluExperts(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x_TH, w1, v1, w2, counts_E, row_assignment, assignment_row, top_k: int, activation: str,
                keep_product: bool):
        E, H = counts_E.shape[0], x_TH.shape[1]
        shape = (E, -1, H)
        h1, h2 = _grouped_mm_impl(x_TH, w1.view(shape), v1.view(shape), counts_E, row_assignment, assignment_row,
                                  top_k, True, _TRITON)
        a = activation_kernels.glu_forward(h1, h2, activation)
        y = _product_impl(a, w2.view(shape), counts_E, None, None, None, None, 1, False, False, False, _TRITON)
        ctx.save_for_backward(x_TH, w1, v1, w2, counts_E, row_assignment, assignment_row, h1, h2,
                              a if keep_product else None)
        ctx.top_k, ctx.activation = top_k, activation
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x_TH, w1, v1, w2, counts_E, row_assignment, assignment_row, h1, h2, a = ctx.saved_tensors
        top_k, activation = ctx.top_k, ctx.activation
        need_x, need_w1, need_v1, need_w2 = ctx.needs_input_grad[:4]
        E, H = counts_E.shape[0], x_TH.shape[1]
        shape = (E, -1, H)
        grad_y = grad_y.contiguous()
        # The down GEMM's: its input's gradient, then its weight's ([E, F, H]: w2's layout).
        grad_a = _product_impl(grad_y, w2.view(shape), counts_E, None, None, None, None, 1, False, False, True,
                               _TRITON)
        grad_w2 = None
        if need_w2:
            if a is None:  # memory-optimized: the product recomputed from the kept h1, h2
                a = activation_kernels.glu_forward(h1, h2, activation)
            grad_w2 = _product_impl(a, grad_y, counts_E, None, None, None, None, 1, False, True, False,
                                    _TRITON).view(w2.shape)
        del a
        grad_h1, grad_h2 = activation_kernels.glu_backward(grad_a, h1, h2, activation)
        del grad_a
        # The pair's: the rows' gradient in one accumulating pass, summed over each token's top_k
        # rows in fp32; each weight's gradient reads the token rows through the maps.
        grad_x = grad_w1 = grad_v1 = None
        if need_x:
            grad_rows = _product_impl(grad_h1, w1.view(shape), counts_E, grad_h2, v1.view(shape), None, None, 1,
                                      False, False, False, _TRITON)
            grad_x = _scatter_rows._impl(grad_rows, assignment_row, row_assignment, None, top_k)
        if need_w1:
            grad_w1 = _product_impl(grad_h1, x_TH, counts_E, None, None, row_assignment, assignment_row, top_k,
                                    True, True, False, _TRITON).view(w1.shape)
        if need_v1:
            grad_v1 = _product_impl(grad_h2, x_TH, counts_E, None, None, row_assignment, assignment_row, top_k,
                                    True, True, False, _TRITON).view(v1.shape)
        return grad_x, grad_w1, grad_v1, grad_w2, None, None, None, None, None, None


def grouped_glu_experts(x_TH: torch.Tensor, w1: torch.Tensor, v1: torch.Tensor, w2: torch.Tensor,
                        counts_E: torch.Tensor, maps: RowMaps, activation: str, keep_product: bool = True
                        ) -> torch.Tensor:
    """`gmm(glu(*gmm_shared_input_gathered(x_TH, w1_e^T, v1_e^T, counts_E, maps), activation), w2_e,
    counts_E)`, the expert-ordered rows `[N, H]`, as one autograd node (module docstring).

    No validation: the caller's (`GroupedMLP.forward`, whose arguments the layer builds itself).
    `w1`, `v1`, `w2`: `[E·F, H]` in x's dtype (dMoE's layout); `counts_E` the rows of each expert
    (on x's device); `maps` the `RowMaps` of the routing; `activation` a name of
    `megablocks.backend.activation.ACTIVATIONS`; `keep_product` False keeps h1 and h2 only for
    the backward and recomputes the GLU product there (`memory_optimized_mlp`).
    """
    return _GroupedGluExperts.apply(x_TH, w1, v1, w2, counts_E, maps.row_assignment, maps.assignment_row, maps.top_k,
                                    activation, keep_product)
