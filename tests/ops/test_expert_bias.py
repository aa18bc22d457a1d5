"""megablocks.ops.expert_bias: per-expert biases on rows grouped by expert, against plain torch.

`add_expert_bias` is checked on the forward and both gradients against float64 autograd of
`h + bias[index]`; the row and block indices against loops over the definitions (bitwise), at
hostile shapes: an expert with no rows, no rows at all, F not a multiple of the block.
"""

import pytest
import torch

from megablocks.ops.expert_bias import add_expert_bias, block_column_bias, block_row_experts, row_experts
from megablocks.ops.routing import routing_metadata
from megablocks.ops.topology import make_topology
from tests.conftest import FLOAT_DTYPES
from tests.utils import assert_close, assert_equal


def _reference(h, bias, index):
    """(out, grad_h, grad_bias) of sum(out * grad) by float64 autograd."""
    hd = h.detach().double().requires_grad_(True)
    bd = bias.detach().double().requires_grad_(True)
    rows = bd[index.long()]
    out = hd + rows.view(rows.shape[0], *([1] * (h.dim() - 2)), rows.shape[1])
    return out, hd, bd


# (shape of h, rows of bias): rows in expert order [N, D]; block values [nnz, B, B]; MoE's [E, C, D].
SHAPES = [((13, 24), 4), ((0, 24), 4), ((6, 16, 16), 9), ((4, 5, 7), 4)]


@pytest.mark.parametrize("shape, rows", SHAPES, ids=["rows", "no-rows", "blocks", "capacity"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_add_expert_bias_matches_autograd(dtype, index_dtype, shape, rows, device):
    g = torch.Generator().manual_seed(7)
    h = torch.randn(shape, generator=g).to(device, dtype).requires_grad_(True)
    bias = torch.randn(rows, shape[-1], generator=g).to(device, dtype).requires_grad_(True)
    index = torch.randint(0, rows - 1, (shape[0],), generator=g).to(device, index_dtype)  # the last row unused
    grad = torch.randn(shape, generator=g).to(device, dtype)
    out = add_expert_bias(h, bias, index)
    out.backward(grad)
    ref, ref_h, ref_bias = _reference(h, bias, index)
    ref.backward(grad.double())
    assert out.dtype == dtype and out.shape == h.shape
    assert_close("out", out, ref, dtype)
    assert_equal("grad h (passed through)", h.grad, grad)
    assert_close("grad bias", bias.grad, ref_bias.grad, dtype)
    assert_equal("grad bias of the unused row", bias.grad[-1], torch.zeros_like(bias.grad[-1]))


def test_add_expert_bias_sums_in_fp32(device):
    """4096 rows of one expert, each gradient 1 + 2^-9: a float16 running sum would stall at 2048
    (its spacing there exceeds the increment); the float32 sum, rounded once, is exact."""
    h = torch.zeros(4096, 2, device=device, dtype=torch.float16, requires_grad=True)
    bias = torch.zeros(1, 2, device=device, dtype=torch.float16, requires_grad=True)
    index = torch.zeros(4096, dtype=torch.int32, device=device)
    add_expert_bias(h, bias, index).backward(torch.full((4096, 2), 1 + 2**-9, device=device, dtype=torch.float16))
    assert_equal("grad bias", bias.grad, torch.full((1, 2), 4096 * (1 + 2**-9), device=device, dtype=torch.float16))


def test_add_expert_bias_bad_input(device):
    h = torch.randn(4, 6, device=device)
    bias = torch.randn(3, 6, device=device)
    index = torch.zeros(4, dtype=torch.int64, device=device)
    cases = [
        ((h, bias[:, :5], index), ValueError, "D = bias' 5 columns"),
        ((h, bias, index[:3]), ValueError, "M = index's 3 rows"),
        ((h[0], bias, index[:1]), ValueError, r"h \[M, ..., D\]"),
        ((h, bias, index.float()), TypeError, "index: expected dtype in"),
        ((h.int(), bias, index), TypeError, "h: expected dtype in"),
        ((h, bias.view(-1), index), ValueError, "bias: expected a 2-D tensor"),
        ((h.tolist(), bias, index), TypeError, "h: expected a torch.Tensor"),
    ]
    for args, error, match in cases:
        with pytest.raises(error, match=match):
            add_expert_bias(*args)


@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 0], [7], [0, 4]])
def test_row_experts(counts, device):
    tokens_per_expert = torch.tensor(counts, dtype=torch.int32, device=device)
    expected = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    assert_equal("row experts", row_experts(tokens_per_expert, sum(counts)).cpu(), expected)
    # Rows past the counts' total (none on the layers' paths) get the last expert.
    extra = row_experts(tokens_per_expert, sum(counts) + 2).cpu()
    assert_equal("rows past the total", extra[sum(counts):], torch.full((2,), len(counts) - 1))


@pytest.mark.parametrize("ffn", [32, 20, 5])
def test_block_layout_of_the_topology(ffn, device):
    """The bias row of every block slot (from its block column) and the expert of every block row
    (from the block columns) of the dMoE topology, against its definition: expert e owns block
    columns [e·C, (e+1)·C) and the block rows of its padded bin; features past F are zero."""
    block, experts = 16, 4
    top_experts = torch.tensor([[2, 0], [2, 3], [0, 2], [2, 2]], device=device).view(-1)  # expert 1 empty
    meta = routing_metadata(top_experts, experts, block)
    rows_bound = 8 * block
    topo = make_topology(meta.padded_bins, block_size=block, num_block_rows=rows_bound // block,
                         ffn_hidden_size=ffn, dtype=torch.float32)
    C = -(-ffn // block)
    bias = torch.randn(experts, ffn, device=device)
    table = block_column_bias(bias, block)
    assert table.shape == (experts * C, block)
    for e in range(experts):
        for j in range(C):
            want = torch.zeros(block, device=device)
            cols = bias[e, j * block:(j + 1) * block]
            want[:cols.numel()] = cols
            assert_equal(f"block column {e * C + j}", table[e * C + j], want)
    padded_bins = meta.padded_bins.cpu().long()
    expected = torch.searchsorted(padded_bins // block, torch.arange(rows_bound // block), right=True).clamp(max=experts - 1)
    assert_equal("block row experts", block_row_experts(topo.column_indices, C).cpu(), expected)


@pytest.mark.parametrize("index_sorted", [False, True])
def test_add_expert_bias_gradient_is_reproducible(index_sorted, device):
    """The bias gradient is a segmented sum in row order (no float atomics): bitwise the same on
    every run, with the caller's sorted index or without it, and equal to the float64 sum."""
    g = torch.Generator().manual_seed(3)
    index = torch.randint(0, 5, (3000,), generator=g)
    index = index.sort().values if index_sorted else index
    index[index == 2] = 3  # an expert without rows
    h = torch.randn(3000, 33, generator=g).to(device)
    grad = torch.randn(3000, 33, generator=g).to(device)
    bias = torch.zeros(5, 33, device=device, requires_grad=True)
    runs = []
    for _ in range(2):
        bias.grad = None
        add_expert_bias(h, bias, index.to(device), index_sorted=index_sorted).backward(grad)
        runs.append(bias.grad.clone())
    assert_equal("bias.grad, run 2 vs run 1", runs[1], runs[0])
    want = torch.zeros(5, 33, dtype=torch.float64).index_add_(0, index, grad.cpu().double())
    assert_close("bias.grad", runs[0], want.float())
