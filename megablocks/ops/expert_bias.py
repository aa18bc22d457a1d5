"""Per-expert biases added to rows that are grouped by expert: the experts' `b1`, `bv1` [E, F] on
their up projections and `b2` [E, H] on their down projection (gpt-oss's experts).

Legend: E experts, F ffn per expert, H hidden, N rows in expert order (the grouped path), B block
size, C = ceil(F / B) block columns per expert, R block rows, nnz = R·C block slots (the sparse
path's `[nnz, B, B]` block values of its `[R·B, E·C·B]` activation).

    add_expert_bias(h_MD, bias_SD, index_M)        h + bias[index]: row m of h gets bias row index[m]
    add_expert_bias(h_MXD, bias_SD, index_M)       the same broadcast over the middle dimension X
                                                   (the rows of a block, the capacity of `MoE`)
    row_experts(tokens_per_expert_E, N)            the expert of each of N rows grouped by expert
    block_column_bias(bias_EF, B)                  [E·C, B]: bias row of each block column (F padded
                                                   with zeros to C·B: the sparse path's columns)
    block_row_experts(column_indices, C)           [R]: the expert of each block row of the dMoE
                                                   topology (E−1 on padding rows)

The add is plain torch (one gather and one add forward); its backward passes the output gradient
through to h unchanged and sums it into the bias in float32, rounded once to the bias' dtype
(16-bit gradients summed over thousands of rows would otherwise lose their low bits), without
float atomics or host reads (`_segment_sums`), so the gradients are bitwise reproducible. Nothing is
read on the host: indices come from device-side counts and the topology, shapes from shapes.
"""

import torch

from megablocks import _checks


class _AddExpertBias(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, bias, index, index_sorted):
        ctx.save_for_backward(index)
        ctx.index_sorted = index_sorted
        ctx.bias_shape, ctx.bias_dtype = bias.shape, bias.dtype
        rows = bias.index_select(0, index)
        rows = rows.view(rows.shape[0], *([1] * (h.dim() - 2)), rows.shape[1])
        return h + rows.to(h.dtype)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        grad_bias = None
        if ctx.needs_input_grad[1]:
            summed = grad.float()
            if summed.dim() > 2:
                summed = summed.sum(dim=tuple(range(1, summed.dim() - 1)))
            grad_bias = _segment_sums(summed, index, ctx.bias_shape[0], ctx.index_sorted).to(ctx.bias_dtype)
        return grad, grad_bias, None, None


def _segment_sums(rows_MD: torch.Tensor, index_M: torch.Tensor, num_segments: int, index_sorted: bool) -> torch.Tensor:
    """`out[s] = Σ rows[m] over index[m] = s` (float32 `[S, D]`), deterministic and sync-free (no
    float atomics, nothing read on the host). Rows grouped by segment (`index_sorted`): the grouped
    GEMM's variable-K product `ones^T @ rows` per segment, which sums each segment in a fixed
    order in fp32. Otherwise (the sparse path's block columns, `[nnz, B]` rows: small) the rows are
    put in index order by a stable sort and each segment is the difference of two entries of
    their float64 running sum."""
    counts = torch.zeros(num_segments, dtype=torch.int64, device=index_M.device)
    counts.index_add_(0, index_M.long(), torch.ones_like(index_M, dtype=torch.int64))  # integers: exact
    if index_sorted and num_segments <= 4096:
        from megablocks.backend.gmm import default_backend
        from megablocks.ops.gmm import _product  # the grouped GEMM's product op (torch.compile-opaque)

        ones = torch.ones(rows_MD.shape[0], 1, dtype=torch.float32, device=rows_MD.device)
        out = _product(ones, rows_MD.float().contiguous(), counts.to(torch.int32), None, None, None, None, 1, False,
                       True, False, default_backend(ones))
        return out[:, 0]
    if not index_sorted:
        order = torch.argsort(index_M, stable=True)
        rows_MD = rows_MD.index_select(0, order)
    running = torch.cumsum(rows_MD.double(), dim=0)
    running = torch.cat([running.new_zeros(1, rows_MD.shape[1]), running])
    ends = counts.cumsum(0)
    return (running.index_select(0, ends) - running.index_select(0, ends - counts)).float()


def add_expert_bias(h: torch.Tensor, bias: torch.Tensor, index: torch.Tensor, *,
                    index_sorted: bool = False) -> torch.Tensor:
    """`h + bias[index]`, broadcast over h's middle dimensions: `out[m, ..., d] = h[m, ..., d] +
    bias[index[m], d]`.

    Args:
        h: `[M, D]` or `[M, X..., D]` float32/float16/bfloat16 (e.g. `[N, F]` rows in expert
            order, `[nnz, B, B]` block values, `[E, C, F]` of `MoE`).
        bias: `[S, D]` float, on h's device (cast to h's dtype for the add).
        index: `[M]` int32/int64 rows of bias, in [0, S) (not checked on the device).
        index_sorted: the caller's promise that `index` is non-decreasing (rows grouped by expert
            in expert order), which saves the backward a sort.

    Returns:
        A new tensor of h's shape and dtype. Differentiable in h (the gradient passes through) and
        bias (summed per bias row in float32, rounded once to bias' dtype).

    Raises:
        TypeError: not tensors, or dtypes not listed.
        ValueError: ranks, sizes or devices that do not fit together.
    """
    _checks.check_tensor("h", h, dtypes=_checks.FLOAT_DTYPES, numel_int32=False)
    _checks.check_tensor("bias", bias, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.check_tensor("index", index, ndim=1, dtypes=(torch.int32, torch.int64))
    _checks.check_same_device(h=h, bias=bias, index=index)
    if h.dim() < 2 or h.shape[0] != index.shape[0] or h.shape[-1] != bias.shape[1]:
        raise ValueError(f"h, bias, index: expected h [M, ..., D] with M = index's {index.shape[0]} rows and "
                         f"D = bias' {bias.shape[1]} columns, got h {tuple(h.shape)}, bias {tuple(bias.shape)}")
    return _AddExpertBias.apply(h, bias, index, index_sorted)


def row_experts(tokens_per_expert: torch.Tensor, num_rows: int) -> torch.Tensor:
    """`[num_rows]` int64: the expert of each row of rows grouped by expert, `tokens_per_expert[e]`
    rows of expert e after those of experts < e. Rows past the counts' sum get expert E−1.

    Sync-free (a cumsum and a `searchsorted` on the device); `num_rows` is a static size.
    """
    bins = tokens_per_expert.long().cumsum(0)
    rows = torch.arange(num_rows, device=tokens_per_expert.device, dtype=bins.dtype)
    return torch.searchsorted(bins, rows, right=True).clamp_(max=max(tokens_per_expert.shape[0] - 1, 0))


def block_column_bias(bias_EF: torch.Tensor, block_size: int) -> torch.Tensor:
    """`[E·C, B]`: row `e·C + j` is `bias[e, j·B:(j+1)·B]`, the columns past F zero, so that block
    column c of the dMoE topology's activation takes row c (`megablocks.ops.topology`)."""
    experts, ffn = bias_EF.shape
    padded = -(-ffn // block_size) * block_size
    return torch.nn.functional.pad(bias_EF, (0, padded - ffn)).view(-1, block_size)


def block_row_experts(column_indices: torch.Tensor, block_columns: int) -> torch.Tensor:
    """`[R]` int64: the expert of each block row of a dMoE topology (`make_topology`) of
    `block_columns` = C block columns per expert, read from its `column_indices` [R·C]: slot
    `r·C + j` holds block column `e(r)·C + j` (E−1 on padding rows)."""
    return column_indices.view(-1, block_columns)[:, 0].long() // block_columns
