"""The dMoE topology (kernel and torch reference) against a dense block mask, bitwise."""

import time

import pytest
import stk
import torch

from megablocks.ops.routing import padded_rows_bound
from megablocks.ops.topology import _topology_op, make_topology, topology, topology_reference
from tests.utils import assert_equal

NAMES = ("row_indices", "column_indices", "offsets", "column_indices_t", "offsets_t", "block_offsets_t")


def dense_reference(counts, block_size, num_block_rows, block_columns):
    """The six arrays derived from a dense [R_max, E·C] mask of existing blocks."""
    E, C = len(counts), block_columns
    mask = torch.zeros(num_block_rows, E * C, dtype=torch.bool)
    row = 0
    for e, n in enumerate(counts):
        rows = -(-n // block_size)
        mask[row:row + rows, e * C:(e + 1) * C] = True
        row += rows
    rows_used = row
    nnz = num_block_rows * C
    real = int(mask.sum())

    coords = mask.nonzero()  # row-major order
    slot_of = torch.full(mask.shape, -1, dtype=torch.int64)
    slot_of[coords[:, 0], coords[:, 1]] = torch.arange(real)
    row_indices = torch.arange(nnz) // C  # padding rows too (contract)
    column_indices = (E - 1) * C + torch.arange(nnz) % C  # padding rows: expert E−1
    column_indices[:real] = coords[:, 1]
    assert torch.equal(row_indices[:real], coords[:, 0])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), mask.sum(1).cumsum(0)])

    coords_t = mask.t().nonzero()  # column-major order: (column, row)
    column_indices_t = torch.zeros(nnz, dtype=torch.int64)
    block_offsets_t = torch.zeros(nnz, dtype=torch.int64)
    column_indices_t[:real] = coords_t[:, 1]
    block_offsets_t[:real] = slot_of[coords_t[:, 1], coords_t[:, 0]]
    offsets_t = torch.cat([torch.zeros(1, dtype=torch.int64), mask.sum(0).cumsum(0)])
    assert rows_used * C == real
    out = (row_indices, column_indices, offsets, column_indices_t, offsets_t, block_offsets_t)
    return tuple(t.to(torch.int32) for t in out)


def padded_bins_of(counts, block_size, dtype=torch.int32):
    padded = [-(-n // block_size) * block_size for n in counts]
    return torch.tensor(padded, dtype=torch.int64).cumsum(0).to(dtype)


def random_counts(num_experts, num_rows, gen):
    experts = torch.randint(0, num_experts, (num_rows,), generator=gen)
    return torch.bincount(experts, minlength=num_experts).tolist()


def check_case(counts, block_size, ffn, extra_rows=0, dtype=torch.int32, device="cpu"):
    C = -(-ffn // block_size)
    E = len(counts)
    num_block_rows = padded_rows_bound(sum(counts), E, block_size) // block_size + extra_rows
    pb = padded_bins_of(counts, block_size, dtype).to(device)
    want = dense_reference(counts, block_size, num_block_rows, C)
    got_op = _topology_op(pb, block_size, num_block_rows, C)  # kernel under the interpreter / on CUDA
    got_ref = topology_reference(pb, block_size, num_block_rows, C)
    for name, g, r, w in zip(NAMES, got_op, got_ref, want):
        assert_equal(f"{name} (op)", g.cpu(), w)
        assert_equal(f"{name} (reference)", r.cpu(), w)
    return num_block_rows, C


CASES = {
    "one_expert": ([37], 16, 40),
    "three_experts": ([5, 0, 33], 16, 16),
    "empty_first_and_last": ([0, 17, 64, 0], 16, 48),
    "all_on_one": ([0, 0, 0, 100, 0, 0, 0, 0], 32, 64),
    "f_not_multiple": ([70, 3, 129, 0, 64, 1, 2, 200], 64, 200),
    "no_tokens": ([0, 0, 0], 16, 40),
    "one_token": ([0, 1, 0], 16, 16),
    "block_128": ([300, 0, 5], 128, 300),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("extra_rows", [0, 3])
def test_topology_hostile(case, extra_rows, device):
    counts, block_size, ffn = CASES[case]
    check_case(counts, block_size, ffn, extra_rows, device=device)


@pytest.mark.parametrize("num_experts", [1, 3, 8])
@pytest.mark.parametrize("pb_dtype", [torch.int32, torch.int64])
def test_topology_random(num_experts, pb_dtype, device):
    gen = torch.Generator().manual_seed(num_experts)
    counts = random_counts(num_experts, 150, gen)
    check_case(counts, 16, 56, extra_rows=2, dtype=pb_dtype, device=device)


def test_topology_beyond_int16_block_rows(device):
    """More than 32767 block rows: int32 indices, no int16 overflow anywhere."""
    counts = [40000 * 16 - 16 * 5, 16 * 3]
    start = time.time()
    num_block_rows, C = check_case(counts, 16, 16, extra_rows=7, device=device)
    assert num_block_rows > 32767
    topo = make_topology(padded_bins_of(counts, 16).to(device), block_size=16,
                         num_block_rows=num_block_rows, ffn_hidden_size=16, dtype=torch.float16)
    assert topo.row_indices.dtype == torch.int32 and int(topo.row_indices.max()) == num_block_rows - 1
    assert time.time() - start < 30


def test_make_topology_matrix(device):
    counts, B, F = [70, 3, 129, 0, 64, 1, 2, 200], 64, 200
    pb = padded_bins_of(counts, B).to(device)
    num_block_rows = padded_rows_bound(sum(counts), len(counts), B) // B
    topo = make_topology(pb, block_size=B, num_block_rows=num_block_rows, ffn_hidden_size=F,
                         dtype=torch.float16)
    C = 4
    assert isinstance(topo, stk.Matrix)
    assert topo.size() == (num_block_rows * B, len(counts) * C * B)
    assert topo.data.device.type == "meta"
    assert topo.data.shape == (num_block_rows * C, B, B) and topo.data.dtype == torch.float16
    assert topo.num_experts == len(counts) and topo.ffn_hidden_size == F
    want = dense_reference(counts, B, num_block_rows, C)
    got = (topo.row_indices, topo.column_indices, topo.offsets, topo.column_indices_t, topo.offsets_t,
           topo.block_offsets_t)
    for name, g, w in zip(NAMES, got, want):
        assert g.device.type == torch.device(device).type, name
        assert_equal(name, g.cpu(), w)
    column_indices = topology(pb, B, num_block_rows, C)
    assert column_indices.dtype == torch.int16, "MegaBlocks' dtype where the block columns fit int16"
    assert_equal("topology()", column_indices.cpu().int(), want[1])


def test_make_topology_device_argument():
    pb = padded_bins_of([3, 20], 16)
    topo = make_topology(pb, block_size=16, num_block_rows=3, ffn_hidden_size=16, dtype=torch.float32,
                         device="cpu")
    assert topo.offsets.device.type == "cpu" and topo.data.dtype == torch.float32


def test_unused_slots_in_range_for_garbage_bins(device):
    """Bins that break the contract (decreasing, unaligned, negative, too large) still give
    in-range indices: nothing downstream can be sent out of bounds."""
    B, num_block_rows, C, E = 16, 9, 3, 5
    bad = [torch.tensor([48, 16, 7, -5, 10**6]), torch.tensor([-16, -16, -16, -16, -16]),
           torch.tensor([2**40, 0, 2**40, 3, 1]), torch.tensor([17, 33, 49, 65, 81])]
    for pb in bad:
        for fn in (_topology_op, topology_reference):
            out = fn(pb.to(device), B, num_block_rows, C)
            rows, cols, offsets, cols_t, offsets_t, blocks_t = (t.cpu() for t in out)
            assert rows.min() >= 0 and rows.max() < num_block_rows
            assert cols.min() >= 0 and cols.max() < E * C
            assert cols_t.min() >= 0 and cols_t.max() < num_block_rows
            assert blocks_t.min() >= 0 and blocks_t.max() < num_block_rows * C
            assert offsets.min() >= 0 and offsets.max() <= num_block_rows * C
            assert offsets_t.min() >= 0 and offsets_t.max() <= num_block_rows * C
            assert bool((offsets[1:] >= offsets[:-1]).all())


def test_zero_block_rows(device):
    pb = torch.zeros(4, dtype=torch.int32, device=device)
    topo = make_topology(pb, block_size=32, num_block_rows=0, ffn_hidden_size=64, dtype=torch.float16)
    assert topo.row_indices.numel() == 0
    assert_equal("offsets", topo.offsets.cpu(), torch.zeros(1, dtype=torch.int32))
    assert_equal("offsets_t", topo.offsets_t.cpu(), torch.zeros(9, dtype=torch.int32))


def test_bad_inputs():
    pb = padded_bins_of([3, 20], 16)
    kw = dict(block_size=16, num_block_rows=3, ffn_hidden_size=16, dtype=torch.float16)
    with pytest.raises(ValueError, match="block_size: expected one of"):
        make_topology(pb, **{**kw, "block_size": 48})
    with pytest.raises(TypeError, match="padded_bins: expected dtype"):
        make_topology(pb.float(), **kw)
    with pytest.raises(ValueError, match="padded_bins: expected a 1-D tensor"):
        make_topology(pb.view(1, 2), **kw)
    with pytest.raises(ValueError, match="padded_bins: expected one entry per expert"):
        make_topology(pb[:0], **kw)
    with pytest.raises(ValueError, match="padded_bins: expected non-decreasing multiples"):
        make_topology(torch.tensor([32, 16], dtype=torch.int32), **kw)
    with pytest.raises(ValueError, match="padded_bins: expected non-decreasing multiples"):
        make_topology(torch.tensor([16, 24], dtype=torch.int32), **kw)
    with pytest.raises(ValueError, match="padded_bins: expected non-decreasing multiples"):
        make_topology(pb, **{**kw, "num_block_rows": 2})  # pb[-1] = 48 > 2·16
    with pytest.raises(ValueError, match="ffn_hidden_size: expected an int >= 1"):
        make_topology(pb, **{**kw, "ffn_hidden_size": 0})
    with pytest.raises(TypeError, match="dtype: expected a torch.dtype"):
        make_topology(pb, **{**kw, "dtype": "float16"})
    with pytest.raises(ValueError, match="num_block_rows: expected an int >= 0"):
        make_topology(pb, **{**kw, "num_block_rows": -1})
    with pytest.raises(ValueError, match=r"num_block_rows \* block_size \(rows\)"):
        make_topology(pb, **{**kw, "num_block_rows": 2**27})
    with pytest.raises(ValueError, match=r"num_block_rows: .* block slots exceed"):
        make_topology(pb, **{**kw, "num_block_rows": 2**20, "ffn_hidden_size": 2**11 * 16})
    with pytest.raises(ValueError, match=r"num_experts \* block_columns \* block_size \(columns\)"):
        make_topology(pb, **{**kw, "ffn_hidden_size": 2**30})
    with pytest.raises(ValueError, match="block_size: expected one of"):
        topology(pb, 100, 3, 1)
    with pytest.raises(ValueError, match="output_block_columns: expected an int >= 1"):
        topology(pb, 16, 3, 0)


def test_compile_fullgraph():
    """torch.compile traces the kernel wrapper (a custom op with a fake implementation)."""
    pb = padded_bins_of([5, 0, 33], 16)

    def build(pb):
        return _topology_op(pb, 16, 5, 2)

    got = torch.compile(build, fullgraph=True)(pb)
    for name, g, w in zip(NAMES, got, dense_reference([5, 0, 33], 16, 5, 2)):
        assert_equal(name, g, w)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_cuda():
    pb = padded_bins_of([70, 3, 129, 0], 64).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        topo = make_topology(pb, block_size=64, num_block_rows=8, ffn_hidden_size=200, dtype=torch.bfloat16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_equal("column_indices", topo.column_indices.cpu(), dense_reference([70, 3, 129, 0], 64, 8, 4)[1])



def test_transposed_view_keeps_expert_layout(device):
    # The sparse products read the per-expert layout from the Matrix; make_topology's
    # ExpertTopology keeps it through `.t()` and `.clone()` (no attribute on any tensor).
    pb = torch.tensor([64, 64, 192], dtype=torch.int32, device=device)
    topo = make_topology(pb, block_size=64, num_block_rows=4, ffn_hidden_size=100, dtype=torch.float32)
    assert (topo.num_experts, topo.ffn_hidden_size) == (3, 100)
    for view in (topo.t(), topo.clone(), topo.t().t()):
        assert (view.num_experts, view.ffn_hidden_size) == (3, 100)
    assert topo.t().is_contiguous() is False and topo.t().t().is_contiguous() is True
    assert not hasattr(topo.offsets, "num_experts")
    assert topo.shape == (256, 3 * 2 * 64)
