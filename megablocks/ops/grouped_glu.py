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
other backends, biases, fused gradient accumulation) it composes the ops.

In FP8 (`Arguments.fp8`), `fp8_grouped_glu_experts` is the node, with the quantizers fused with
the work next to them:

    x_q, x_s = gather_quantize_rows(x_TH, maps)          each token's row quantized once, its bytes
                                                          written to its top_k routed rows
    h1_NF, h2_NF = gmm_fp8(x_q, w1_e^T), gmm_fp8(x_q, v1_e^T)
    a_q, a_s, a_NF = glu_quantize_rows(h1, h2)           the GLU quantized as it is made, its 16-bit
                                                          product written in the same pass
    y_NH = gmm_fp8(a_q, w2_e)                            (w2 read stored the other way: K-major)

and in the backward the output gradient quantized in 1 x 128 tiles, the FP8 input-gradient
products (`Fp8WeightCache.transposed` weights), the GLU's gradient written over h1 and h2 (the
node keeps nothing else of the forward but x_TH and the GLU product, as the bf16 node does: no
gathered rows; with `keep_product=False`, `memory_optimized_mlp`, not the product either: it is
made again from h1 and h2 for w2's gradient), and the weight gradients unquantized, reading the
token rows through the maps (experts as wide as the policy's `fp8_gather_wgrad_min_ffn`: a
gathered copy); the GLU's gradient is quantized for the input-gradient products as it is made
(`glu_backward_quantize_rows_`). Its output is bitwise that of the composed FP8 ops (gather,
`fp8_gmm` twice, `glu`, `fp8_gmm`), and so are its gradients in the tests (the fused GLU backward
is the composed ops' fp32 math compiled apart: a compiler that contracts it otherwise moves a
gradient by a few units of fp32's last place before it is rounded). dMoE gives the node the
routing weights too (`weights_N`): it returns the weighted combine of its rows into tokens
(`scatter_routed`'s kernels), so that its backward receives the token rows' gradient and makes
the rows' [N, H] itself, letting go of it once w2's gradient is made (a node's incoming gradient
is held by autograd until the node returns); it gathers, weights and quantizes them in one pass
(`gather_quantize_rows(grad, maps, weights_N, return_rows=True)`: the 16-bit rows w2's gradient
reads are written beside the e4m3 ones, and the gathered rows are not read again to quantize
them). Where F is a multiple of 128, w1 and v1 are quantized stacked (`Fp8WeightCache.pair`):
the up projections are one product into one [N, 2F] buffer, and the input gradient one product
over [grad_h1 | grad_h2] with K = 2F, rounded once (the composed ops round two products and add
them; the rest stays bitwise). The FP8 node's forward also runs where no gradient is recorded (dMoE's
FP8 inference: the same kernels, nothing kept), at decode sizes with the GLU made and quantized in
the stacked up product's epilogue where the policy asks (`fp8_decode_glu_epilogue`).

MLP experts (`act(x W1) W2`) in FP8 run as one node too, `fp8_grouped_mlp_experts`: the same
forward and backward with one up product and the activation alone, quantized as it is made
(`act_quantize_rows`, its 16-bit form written in the same pass for w2's gradient) and its
gradient written over h and quantized as it is made (`act_backward_quantize_rows_`). The composed
FP8 ops gather the rows and then quantize them, run torch's activation and then quantize it (and
in the backward the same for the rows' gradient and the activation's): in each direction two
launches, and two reads of [N, H] or [N, F], that the node does not make. Its results
are the composed ops' bit for bit where the activation is computed alike (relu); silu and the
gelus are torch's fp32 formulas compiled apart, a unit of the last place off here and there.
"""

from typing import Optional, Sequence, Tuple

import torch

from megablocks.backend import activation as activation_kernels
from megablocks.backend import use_triton
from megablocks.backend.fp8 import (FP8_DTYPE, Q, act_backward_quantize_rows_, act_backward_rows_, act_quantize_rows,
                                    act_rows, gather_quantize_cols, gather_quantize_rows,
                                    glu_backward_quantize_rows_, glu_backward_quantize_rows_cols, glu_quantize_cols,
                                    glu_quantize_rows, gmm_fp8, gmm_fp8_glu_quantize, gmm_fp8_wgrad,
                                    quantize_cols_grouped, quantize_rows, quantize_rows_and_cols)
from megablocks.ops._eager import _plain_eager
from megablocks.ops.gmm import _add_weight_grad, _grouped_mm_impl, _product_impl
from megablocks.ops.permute import _gather_rows, _scatter_rows, _weight_grad
from megablocks.ops.routing import RowMaps

_TRITON = "triton"


def one_node_applies(x_TH: torch.Tensor, *tensors: Optional[torch.Tensor], inference: bool = False) -> bool:
    """Whether `grouped_glu_experts` may run for these inputs: plain eager tensors (no compile,
    trace or dispatch mode), the Triton kernels in use for x, and a gradient to record; with
    `inference` (the FP8 node, whose forward also serves inference), with or without one."""
    if not use_triton(x_TH):
        return False
    present = [t for t in (x_TH, *tensors) if t is not None]
    return _plain_eager(present) and (inference or records_gradient(present))


def records_gradient(tensors: Sequence[Optional[torch.Tensor]]) -> bool:
    """Whether autograd records a gradient of an op on `tensors` here."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


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


# The FP8 nodes free what their backward reads as it runs (h written over by the activation's
# gradient): what a second backward through one (`retain_graph=True`) raises.
_SECOND_BACKWARD = ("the FP8 experts' node (KernelPolicy.one_node_experts) frees what its backward reads as it "
                    "runs, so its graph runs backward once: a second backward through it (retain_graph=True) needs "
                    "KernelPolicy(one_node_experts=False), the composed FP8 ops")


def _combine(ctx, y, weights_N, record: bool, row_assignment, assignment_row, top_k: int):
    """An FP8 node's output: its rows y, or with the routing weights `weights_N` their combine
    (`scatter_routed`: each token's rows weighted and summed), y kept on ctx only for the weights'
    gradient, as the combine's own node keeps it (`ctx.combined`, `ctx.y`)."""
    ctx.combined, ctx.y = weights_N is not None, None
    if weights_N is None:
        return y
    if record and weights_N.requires_grad:
        ctx.y = y
    return _scatter_rows._impl(y, assignment_row, row_assignment, weights_N, top_k)


class _Fp8GroupedGluExperts(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x_TH, w1, v1, w2, counts_E, row_assignment, assignment_row, top_k: int, activation: str,
                quantized: Sequence[Tuple[torch.Tensor, torch.Tensor]], gathered_wgrad: bool,
                weights_N: Optional[torch.Tensor], fp8_wgrad: bool, keep_product: bool, record: bool,
                decode_glu_epilogue: bool, accs: Tuple[Optional[torch.Tensor], ...], glu_two_passes: bool,
                wgrad_b_blocks: bool):
        dtype = x_TH.dtype
        stacked = len(quantized) == 4
        x_q, x_s = gather_quantize_rows(x_TH, assignment_row, top_k)
        product, h = None, []
        if stacked and decode_glu_epilogue and not record:
            # Inference: at decode sizes the GLU made and quantized in the up product's epilogue
            # (elsewhere the product and `glu_quantize_rows`, as below).
            a_q, a_s = gmm_fp8_glu_quantize(x_q, x_s, *quantized[0], counts_E, activation, out_dtype=dtype)
            del x_q, x_s
        else:
            if stacked:  # one product over [w1; v1]: h [N, 2F], the halves read in place below
                h = [gmm_fp8(x_q, x_s, *quantized[0], counts_E, out_dtype=dtype)]
                F = h[0].shape[1] // 2
                h1, h2 = h[0][:, :F], h[0][:, F:]
            else:
                h = [gmm_fp8(x_q, x_s, *quantized[0], counts_E, out_dtype=dtype),
                     gmm_fp8(x_q, x_s, *quantized[2], counts_E, out_dtype=dtype)]
                h1, h2 = h
            del x_q, x_s
            # The 16-bit product, for w2's unquantized gradient, written as it is quantized (the
            # FP8 weight gradients read it quantized down the rows instead, made again in the
            # backward).
            if record and keep_product and not fp8_wgrad and ctx.needs_input_grad[3]:
                a_q, a_s, product = glu_quantize_rows(h1, h2, activation, return_product=True)
            else:
                a_q, a_s = glu_quantize_rows(h1, h2, activation)
            del h1, h2
        if not record:  # inference: nothing kept past its use
            h = []
        y = gmm_fp8(a_q, a_s, *quantized[-1], counts_E, out_dtype=dtype)
        del a_q, a_s
        ctx.save_for_backward(x_TH, w1, v1, w2, counts_E, row_assignment, assignment_row, weights_N)
        # Made here, not inputs: kept on ctx so the backward can let go of each when done with it.
        ctx.h, ctx.quantized, ctx.product = h, quantized, product
        ctx.top_k, ctx.activation, ctx.gathered_wgrad, ctx.fp8_wgrad = top_k, activation, gathered_wgrad, fp8_wgrad
        ctx.glu_two_passes, ctx.wgrad_b_blocks = glu_two_passes, wgrad_b_blocks
        ctx.accs = accs
        return _combine(ctx, y, weights_N, record, row_assignment, assignment_row, top_k)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.h is None:  # let go of (and h written over) by a backward that already ran
            raise RuntimeError(_SECOND_BACKWARD)
        x_TH, w1, v1, w2, counts_E, row_assignment, assignment_row, weights_N = ctx.saved_tensors
        h, quantized, y, a = ctx.h, ctx.quantized, ctx.y, ctx.product
        ctx.h = ctx.quantized = ctx.y = ctx.product = None
        top_k, activation, dtype = ctx.top_k, ctx.activation, x_TH.dtype
        need_x, need_w1, need_v1, need_w2 = ctx.needs_input_grad[:4]
        grad_weights = g_q = g_s = None
        if ctx.combined:  # the combine's backward (`scatter_routed`'s): the weights', then the rows'
            if ctx.needs_input_grad[11]:
                grad_weights = _weight_grad._impl(y, grad_out, assignment_row, top_k).to(weights_N.dtype)
            y = None
            # The rows' gradient is made here, so that it goes once used: the node's output
            # gradient (the token rows' here) is held by autograd until the node returns. Unless
            # the weight gradients are FP8 too, it is quantized as it is gathered; its 16-bit rows
            # are written in the same pass only for w2's unquantized gradient.
            if ctx.fp8_wgrad:
                grad_y = _gather_rows._impl(grad_out, row_assignment, assignment_row, weights_N, top_k)
            else:
                grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
                g_q, g_s, *grad_y = gather_quantize_rows(grad_out, assignment_row, top_k, weights_N,
                                                         return_rows=need_w2)
                grad_y = grad_y.pop() if grad_y else None  # no list left holding it
            del grad_out
        else:
            grad_y = grad_out.contiguous()
            del grad_out
        if ctx.fp8_wgrad:  # handed over in a list, so that the helper's del lets go of them
            held = [grad_y, h]
            del grad_y, h
            grads = _fp8_wgrad_backward(ctx, held, quantized, x_TH, w1, v1, w2, counts_E, row_assignment,
                                        assignment_row)
            return (*grads, None, None, None, None, None, None, None, grad_weights, None, None, None, None, None,
                    None, None)
        # With an fp32 accumulator for a weight (gradient-accumulation fusion: `main_grad`), its
        # unquantized gradient is added into it by the product's kernel and not returned.
        E, H = counts_E.shape[0], x_TH.shape[1]
        acc_w1, acc_v1, acc_w2 = (None if acc is None else acc.view(E, -1, H) for acc in ctx.accs)
        # w2's gradient first (from the kept GLU product, or the product made again from h1 and h2),
        # so that the rows' output gradient goes before the GLU product's gradient is made.
        grad_w2 = None
        if need_w2:
            if a is None:
                a = (activation_kernels.glu_halves_forward(h[0], activation) if len(h) == 1
                     else activation_kernels.glu_forward(*h, activation))
            grad_w2 = _weight_grad_or_add(acc_w2, a, grad_y, counts_E, (None, None, 1), False, w2.shape)
        del a
        if g_q is None:
            g_q, g_s = quantize_rows(grad_y)
        del grad_y
        grad_a = gmm_fp8(g_q, g_s, *quantized[-2], counts_E, out_dtype=dtype)
        del g_q, g_s
        # The GLU's gradient written over h1 and h2 and, for the input gradient's products,
        # quantized in the same pass (`glu_backward_quantize_rows_`).
        grad_x = grad_w1 = grad_v1 = None
        if len(h) == 1:  # [grad_h1 | grad_h2] one operand: one product over K = 2F, no sum after it
            grad_h = h[0]
            F = grad_h.shape[1] // 2
            grad_h1, grad_h2 = grad_h[:, :F], grad_h[:, F:]
            if need_x:
                g_q = torch.empty(grad_h.shape, dtype=FP8_DTYPE, device=grad_h.device)
                g_s = torch.empty((grad_h.shape[0], grad_h.shape[1] // Q), dtype=torch.float32, device=grad_h.device)
                glu_backward_quantize_rows_(grad_a, grad_h1, grad_h2, activation,
                                            out=(g_q[:, :F], g_s[:, :F // Q], g_q[:, F:], g_s[:, F // Q:]))
                grad_a = h = None  # let go before the product's output is made
                grad_rows = gmm_fp8(g_q, g_s, *quantized[1], counts_E, out_dtype=dtype)
                del g_q, g_s
            else:
                activation_kernels.glu_halves_backward_(grad_a, grad_h, activation)
        else:
            grad_h1, grad_h2 = h
            if need_x:
                (q1, s1), (q2, s2) = glu_backward_quantize_rows_(grad_a, grad_h1, grad_h2, activation)
                grad_a = h = None
                grad_rows = gmm_fp8(q1, s1, *quantized[1], counts_E, out_dtype=dtype)
                del q1, s1
                grad_rows += gmm_fp8(q2, s2, *quantized[3], counts_E, out_dtype=dtype)
                del q2, s2
            else:
                activation_kernels.glu_backward(grad_a, grad_h1, grad_h2, activation, in_place=True)
        grad_a = h = None
        if need_x:
            grad_x = _scatter_rows._impl(grad_rows, assignment_row, row_assignment, None, top_k)
            del grad_rows
        # The up weights' gradients read the token rows through the maps, or (`gathered_wgrad`) a
        # gathered copy made here for both: wide experts' variable-K products ran slower through
        # the maps (mixtral: 11.1 against 9.0 ms a step; benchmarks/RESULTS.md).
        rows = (x_TH, row_assignment, assignment_row, top_k)
        if (need_w1 or need_v1) and ctx.gathered_wgrad:
            rows = (_gather_rows._impl(x_TH, row_assignment, assignment_row, None, top_k), None, None, 1)
        if need_w1:
            grad_w1 = _weight_grad_or_add(acc_w1, rows[0], grad_h1, counts_E, rows[1:], True, w1.shape)
        del grad_h1  # apart (not stacked), its buffer goes before v1's gradient is made
        if need_v1:
            grad_v1 = _weight_grad_or_add(acc_v1, rows[0], grad_h2, counts_E, rows[1:], True, v1.shape)
        return (grad_x, grad_w1, grad_v1, grad_w2, None, None, None, None, None, None, None, grad_weights, None, None,
                None, None, None, None, None)


def _weight_grad_or_add(acc, a, grad, counts_E, maps, trans_b: bool, shape):
    """The gradient of b in `gmm(a', b, trans_b)` (`ops.gmm._weight_grad`'s product; maps =
    (row_assignment, assignment_row, top_k) where a is read through them) viewed `shape`; or, with
    an fp32 accumulator `acc` of b's shape (gradient-accumulation fusion), added into it by the
    variable-K kernel's epilogue, and None."""
    if acc is not None:
        _add_weight_grad(acc, a, grad, counts_E, *maps, trans_b, _TRITON)
        return None
    lhs, rhs = (grad, a) if trans_b else (a, grad)
    return _product_impl(lhs, rhs, counts_E, None, None, *maps, trans_b, True, False, _TRITON).view(shape)


def _fp8_weight_grad_or_add(acc, a_c, b_c, counts_E, rows: int, w):
    """w's gradient ([E·F, H]) from its operands quantized down each expert's rows (`a_c`, `b_c`:
    (values, scales) in `quantize_cols_grouped`'s transposed layout over `rows` rows); or, with an
    fp32 accumulator `acc` of w's shape (gradient-accumulation fusion: `main_grad`), added into it
    by `gmm_fp8_wgrad`'s epilogue, and None."""
    if acc is not None:
        gmm_fp8_wgrad(*a_c, *b_c, counts_E, rows=rows, accumulate_into=acc.view(counts_E.shape[0], -1, w.shape[1]))
        return None
    return gmm_fp8_wgrad(*a_c, *b_c, counts_E, out_dtype=w.dtype, rows=rows).view(w.shape)


def _fp8_wgrad_backward(ctx, held, quantized, x_TH, w1, v1, w2, counts_E, row_assignment, assignment_row):
    """`_Fp8GroupedGluExperts.backward` with the weight gradients in FP8 too (`gmm_fp8_wgrad`):
    (grad_x, grad_w1, grad_v1, grad_w2). Their operands are quantized down each expert's rows in
    the passes that already read them: the GLU product made again from h1 and h2
    (`glu_quantize_cols`), the output gradient both ways at once (`quantize_rows_and_cols`), the
    GLU's gradient both ways and never written (`glu_backward_quantize_rows_cols`: h goes once it
    has run), and the token rows through the maps (`gather_quantize_cols`). `held`: [the rows'
    output gradient, h], emptied here. A weight with an fp32 accumulator in `ctx.accs` has its
    gradient added into it by the product's epilogue (returned as None)."""
    grad_y, h = held
    held.clear()
    top_k, activation, dtype = ctx.top_k, ctx.activation, x_TH.dtype
    need_x, need_w1, need_v1, need_w2 = ctx.needs_input_grad[:4]
    N = grad_y.shape[0]
    acc_w1, acc_v1, acc_w2 = ctx.accs
    halves = (h[0][:, :h[0].shape[1] // 2], h[0][:, h[0].shape[1] // 2:]) if len(h) == 1 else tuple(h)
    F = halves[0].shape[1]
    grad_x = grad_w1 = grad_v1 = grad_w2 = None
    if need_w2:
        a_c = glu_quantize_cols(*halves, activation, counts_E)
        # w2's b operand: with wgrad_b_blocks one scale per 128 x 128 block, made in the same pass
        (g_q, g_s), g_c = quantize_rows_and_cols(grad_y, counts_E, blocks=ctx.wgrad_b_blocks)
        del grad_y
        grad_w2 = _fp8_weight_grad_or_add(acc_w2, a_c, g_c, counts_E, N, w2)
        del a_c, g_c
    else:
        g_q, g_s = quantize_rows(grad_y)
        del grad_y
    grad_a = gmm_fp8(g_q, g_s, *quantized[-2], counts_E, out_dtype=dtype)
    del g_q, g_s
    # The GLU's gradient quantized in row tiles for the input gradient's products (stacked: the
    # halves of one [N, 2F] operand, one product over K = 2F) and down the rows for the weights'.
    stacked = len(h) == 1
    g_q = g_s = rows_out = None
    if stacked:
        g_q = torch.empty((N, 2 * F), dtype=FP8_DTYPE, device=grad_a.device)
        g_s = torch.empty((N, 2 * F // Q), dtype=torch.float32, device=grad_a.device)
        rows_out = (g_q[:, :F], g_s[:, :F // Q], g_q[:, F:], g_s[:, F // Q:])
    if ctx.glu_two_passes:
        # The gradients written over h with their row tiles, then h's column tiles (stacked: of
        # the [N, 2F] operand at once; apart: of each half): the same values.
        first, second = glu_backward_quantize_rows_(grad_a, *halves, activation, out=rows_out)
        h_c = [quantize_cols_grouped(t, counts_E, transposed=True) for t in h]
    else:
        first, second, h_c = glu_backward_quantize_rows_cols(grad_a, *halves, activation, counts_E, out=rows_out)
        h_c = [h_c]
    if len(h_c) == 1:  # w1's and v1's columns: the halves of one operand
        (h_q, h_s), = h_c
        h_c = [(h_q[:F], h_s[:, :F]), (h_q[F:], h_s[:, F:])]
    grad_a = h = halves = rows_out = None  # h goes: nothing reads it again
    if need_x:
        if stacked:
            grad_rows = gmm_fp8(g_q, g_s, *quantized[1], counts_E, out_dtype=dtype)
        else:
            grad_rows = gmm_fp8(*first, *quantized[1], counts_E, out_dtype=dtype)
            grad_rows += gmm_fp8(*second, *quantized[3], counts_E, out_dtype=dtype)
    del g_q, g_s, first, second  # before the token rows' gradient is made
    if need_x:
        grad_x = _scatter_rows._impl(grad_rows, assignment_row, row_assignment, None, top_k)
        del grad_rows
    if need_w1 or need_v1:
        # w1's and v1's b operand: with wgrad_b_blocks one scale per 128 x 128 block, in the same pass
        x_c = gather_quantize_cols(x_TH, row_assignment, top_k, counts_E, blocks=ctx.wgrad_b_blocks)
        if need_w1:
            grad_w1 = _fp8_weight_grad_or_add(acc_w1, h_c[0], x_c, counts_E, N, w1)
        if need_v1:
            grad_v1 = _fp8_weight_grad_or_add(acc_v1, h_c[1], x_c, counts_E, N, v1)
    return grad_x, grad_w1, grad_v1, grad_w2


class _Fp8GroupedMlpExperts(torch.autograd.Function):
    """The FP8 node of the MLP experts (`fp8_grouped_mlp_experts`): the GLU node's forward and its
    backward with unquantized weight gradients, with one up projection and the activation alone."""

    @staticmethod
    def forward(ctx, x_TH, w1, w2, counts_E, row_assignment, assignment_row, top_k: int, activation: str,
                quantized: Sequence[Tuple[torch.Tensor, torch.Tensor]], gathered_wgrad: bool,
                weights_N: Optional[torch.Tensor], keep_product: bool, record: bool,
                accs: Tuple[Optional[torch.Tensor], ...]):
        dtype = x_TH.dtype
        x_q, x_s = gather_quantize_rows(x_TH, assignment_row, top_k)
        h = gmm_fp8(x_q, x_s, *quantized[0], counts_E, out_dtype=dtype)
        del x_q, x_s
        product = None
        # The 16-bit activation, for w2's unquantized gradient, written as it is quantized.
        if record and keep_product and ctx.needs_input_grad[2]:
            a_q, a_s, product = act_quantize_rows(h, activation, return_product=True)
        else:
            a_q, a_s = act_quantize_rows(h, activation)
        if not record:  # inference: nothing kept past its use
            h = None
        y = gmm_fp8(a_q, a_s, *quantized[-1], counts_E, out_dtype=dtype)
        del a_q, a_s
        ctx.save_for_backward(x_TH, w1, w2, counts_E, row_assignment, assignment_row, weights_N)
        ctx.h, ctx.quantized, ctx.product, ctx.ran = h, quantized, product, False
        ctx.top_k, ctx.activation, ctx.gathered_wgrad, ctx.accs = top_k, activation, gathered_wgrad, accs
        return _combine(ctx, y, weights_N, record, row_assignment, assignment_row, top_k)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.ran:  # h, written over by the backward that ran, and the rest let go of
            raise RuntimeError(_SECOND_BACKWARD)
        ctx.ran = True
        x_TH, w1, w2, counts_E, row_assignment, assignment_row, weights_N = ctx.saved_tensors
        h, quantized, y, a = ctx.h, ctx.quantized, ctx.y, ctx.product
        ctx.h = ctx.quantized = ctx.y = ctx.product = None
        top_k, activation, dtype = ctx.top_k, ctx.activation, x_TH.dtype
        need_x, need_w1, need_w2 = ctx.needs_input_grad[:3]
        grad_weights = g_q = g_s = None
        if ctx.combined:  # the combine's backward, as the GLU node runs it
            if ctx.needs_input_grad[10]:
                grad_weights = _weight_grad._impl(y, grad_out, assignment_row, top_k).to(weights_N.dtype)
            y = None
            grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
            g_q, g_s, *grad_y = gather_quantize_rows(grad_out, assignment_row, top_k, weights_N,
                                                     return_rows=need_w2)
            grad_y = grad_y.pop() if grad_y else None
            del grad_out
        else:
            grad_y = grad_out.contiguous()
            del grad_out
        E, H = counts_E.shape[0], x_TH.shape[1]
        acc_w1, acc_w2 = (None if acc is None else acc.view(E, -1, H) for acc in ctx.accs)
        grad_w2 = None
        if need_w2:
            if a is None:  # `keep_product` False: the activation made again from h
                a = act_rows(h, activation)
            grad_w2 = _weight_grad_or_add(acc_w2, a, grad_y, counts_E, (None, None, 1), False, w2.shape)
        del a
        if g_q is None:
            g_q, g_s = quantize_rows(grad_y)
        del grad_y
        grad_a = gmm_fp8(g_q, g_s, *quantized[-2], counts_E, out_dtype=dtype)
        del g_q, g_s
        # The activation's gradient written over h, and quantized for the input gradient's product
        # where there is one.
        if need_x:
            g_q, g_s = act_backward_quantize_rows_(grad_a, h, activation)
        else:
            act_backward_rows_(grad_a, h, activation)
        grad_h, grad_a, h = h, None, None
        grad_x = grad_w1 = None
        if need_x:
            grad_rows = gmm_fp8(g_q, g_s, *quantized[1], counts_E, out_dtype=dtype)
            del g_q, g_s
            grad_x = _scatter_rows._impl(grad_rows, assignment_row, row_assignment, None, top_k)
            del grad_rows
        g_q = g_s = None
        if need_w1:
            rows = (x_TH, row_assignment, assignment_row, top_k)
            if ctx.gathered_wgrad:
                rows = (_gather_rows._impl(x_TH, row_assignment, assignment_row, None, top_k), None, None, 1)
            grad_w1 = _weight_grad_or_add(acc_w1, rows[0], grad_h, counts_E, rows[1:], True, w1.shape)
        return (grad_x, grad_w1, grad_w2, None, None, None, None, None, None, None, grad_weights, None, None, None)


def fp8_grouped_mlp_experts(x_TH: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, counts_E: torch.Tensor,
                            maps: RowMaps, activation: str, quantized: Sequence[Tuple[torch.Tensor, torch.Tensor]],
                            gathered_wgrad: bool = False, weights_N: Optional[torch.Tensor] = None,
                            keep_product: bool = True,
                            accs: Optional[Sequence[Optional[torch.Tensor]]] = None) -> torch.Tensor:
    """`fp8_grouped_glu_experts` for the MLP experts, `act(x[rows] @ w1_e^T) @ w2_e`, as one
    autograd node: the token rows quantized as they are gathered, one FP8 up product, the
    activation quantized as it is made (`act_quantize_rows`, its 16-bit form written in the same
    pass for w2's gradient unless `keep_product` is False), the FP8 down product and, with
    `weights_N`, the combine; in the backward the rows' output gradient gathered, weighted and
    quantized in one pass, the activation's gradient written over h and quantized as it is made
    (`act_backward_quantize_rows_`), the FP8 input-gradient products and the weight gradients
    unquantized (with `accs`, added into the fp32 accumulators). Its output and gradients are
    bitwise those of the composed FP8 ops wherever the activation is computed alike (relu in the
    tests; silu and the gelus are the same fp32 math compiled apart from torch's).

    No validation: the caller's (`GroupedMLP.forward`). `activation`: a non-gated name of
    `ACTIVATIONS`; `quantized`: (q, s) of w1, w1ᵀ, w2, w2ᵀ viewed [E, F, H] (in inference None
    for the forms the forward does not read); `accs`: for (w1, w2), an fp32 accumulator or None.
    The graph runs backward once, as the GLU node's."""
    record = records_gradient((x_TH, w1, w2, weights_N))
    accs = (None, None) if accs is None else tuple(accs)
    return _Fp8GroupedMlpExperts.apply(x_TH, w1, w2, counts_E, maps.row_assignment, maps.assignment_row, maps.top_k,
                                       activation, tuple(quantized), gathered_wgrad, weights_N, keep_product, record,
                                       accs)


def fp8_grouped_glu_experts(x_TH: torch.Tensor, w1: torch.Tensor, v1: torch.Tensor, w2: torch.Tensor,
                            counts_E: torch.Tensor, maps: RowMaps, activation: str,
                            quantized: Sequence[Tuple[torch.Tensor, torch.Tensor]],
                            gathered_wgrad: bool = False, weights_N: Optional[torch.Tensor] = None,
                            fp8_wgrad: bool = False, keep_product: bool = True,
                            decode_glu_epilogue: bool = False,
                            accs: Optional[Sequence[Optional[torch.Tensor]]] = None,
                            glu_two_passes: bool = False, wgrad_b_blocks: bool = True) -> torch.Tensor:
    """`grouped_glu_experts` with the expert products in FP8 (module docstring), the expert-ordered
    rows `[N, H]`, as one autograd node; with `weights_N`, those rows' combine too
    (`scatter_routed(rows, maps, weights_N)`, the token rows `[T, H]`).

    No validation: the caller's (`GroupedMLP.forward`). `w1`, `v1`, `w2`: `[E·F, H]` in x's dtype,
    the differentiable weights; `quantized`: their blockwise FP8 forms viewed `[E, F, H]`, each
    `(q, s)` then the same stored the other way (`Fp8WeightCache(p, shape)`,
    `Fp8WeightCache.transposed(p, shape)`), in the order w1, w1ᵀ, v1, v1ᵀ, w2, w2ᵀ; or, F a
    multiple of 128, w1 and v1 stacked (`Fp8WeightCache.pair`: [w1; v1], [w1; v1]ᵀ), w2, w2ᵀ: the
    up projections one product into one [N, 2F] buffer, and the input gradient one product over
    K = 2F (rounded once, where the separate form adds two rounded products);
    `gathered_wgrad`: the up weights' gradients read a gathered copy of the rows (made in the
    backward) instead of the token rows through the maps; `fp8_wgrad`: the weight gradients in FP8
    too (`_fp8_wgrad_backward`; `gathered_wgrad` then unused); `weights_N`: the routing weights of the
    combine (one per assignment), whose gradient the node returns as the combine's node does. With
    the combine in the node, the rows' output gradient `[N, H]` is made in its backward and goes
    once used (the composed form's is held by autograd until the node returns: 512 MiB at olmoe's
    backward peak); `keep_product` False (`memory_optimized_mlp`) keeps only h1 and h2 for the
    backward and makes the GLU product again there for w2's gradient, as `grouped_glu_experts`.
    Where no gradient is recorded (inference) the forward keeps nothing past its use; with
    `decode_glu_epilogue` (`KernelPolicy.fp8_decode_glu_epilogue`), w1 and v1 stacked and at decode
    sizes (`fp8.glu_decode_fits`), it makes and quantizes the GLU in the up product's epilogue.
    `accs`: for (w1, v1, w2), an fp32 accumulator of the weight's shape (its `main_grad`) or None
    each: that weight's gradient is added into it (with the unquantized weight gradients, by the
    variable-K product's kernel, as `weight_grad_into` does) and not returned as its `.grad`.
    `glu_two_passes` (`KernelPolicy.fp8_weight_grad_glu_two_passes`), with `fp8_wgrad`: the GLU's
    gradient and its weight-gradient operand made in two passes over h (the gradients written
    over it with their row tiles, then its column tiles), the same values as the one pass that
    writes neither gradient. `wgrad_b_blocks` (`KernelPolicy.fp8_weight_grad_b_blocks`), with
    `fp8_wgrad`: each weight gradient's b operand (the token rows, the output gradient) quantized
    with one scale per 128 x 128 block, in the pass that makes it (`blocks=True` of
    `fp8.gather_quantize_cols` and `fp8.quantize_rows_and_cols`).
    """
    record = records_gradient((x_TH, w1, v1, w2, weights_N))
    accs = (None, None, None) if accs is None else tuple(accs)
    return _Fp8GroupedGluExperts.apply(x_TH, w1, v1, w2, counts_E, maps.row_assignment, maps.assignment_row,
                                       maps.top_k, activation, tuple(quantized), gathered_wgrad, weights_N,
                                       fp8_wgrad, keep_product, record, decode_glu_epilogue, accs, glu_two_passes,
                                       wgrad_b_blocks)
