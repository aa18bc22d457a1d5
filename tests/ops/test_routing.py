"""Routing metadata ops (sort, histogram, cumsums, round_up, routing_metadata), bitwise."""

import os

import pytest
import torch

from megablocks.backend import routing as backend_routing
from megablocks.ops import routing
from megablocks.ops.routing import (
    _histogram_reference,
    exclusive_cumsum,
    histogram,
    inclusive_cumsum,
    padded_row_maps,
    padded_rows_bound,
    round_up,
    routing_metadata,
    row_maps,
    sort,
)
from tests.utils import assert_equal

INT_DTYPES = [torch.int16, torch.int32, torch.int64]


def loop_histogram(values, max_val):
    counts = [0] * max_val
    for v in values:
        if 0 <= v < max_val:
            counts[v] += 1
    return counts


# ---------------------------------------------------------------- sort


@pytest.mark.parametrize("dtype", INT_DTYPES)
@pytest.mark.parametrize("n,high", [(0, 4), (1, 4), (1000, 3), (5000, 130), (3000, 4096), (2000, 70000),
                                    (500, 2**40)])
def test_sort(dtype, n, high, device):
    """Every key width the sort narrows to (uint8, int16, int32, int64) against Python's stable sort."""
    high = min(high, torch.iinfo(dtype).max)
    x = torch.randint(0, high, (n,), dtype=dtype, device=device)
    end_bit = max(1, (high - 1).bit_length())
    values, indices = sort(x, end_bit)
    xs = x.cpu().tolist()
    want_idx = sorted(range(n), key=lambda i: xs[i])  # Python's sort is stable
    assert_equal("indices", indices.cpu(), torch.tensor(want_idx, dtype=dtype))
    assert_equal("values", values.cpu(), torch.tensor([xs[i] for i in want_idx], dtype=dtype))
    values_all, indices_all = sort(x)  # end_bit=None: all bits
    assert_equal("indices (all bits)", indices_all.cpu(), torch.tensor(want_idx, dtype=dtype))
    assert_equal("values (all bits)", values_all.cpu(), values.cpu())


def test_sort_negative_without_end_bit():
    x = torch.tensor([3, -7, 0, -7, 2**40], dtype=torch.int64)
    values, indices = sort(x)
    assert_equal("indices", indices, torch.tensor([1, 3, 2, 0, 4]))
    assert_equal("values", values, torch.tensor([-7, -7, 0, 3, 2**40]))


def test_sort_bad_inputs():
    x = torch.randint(0, 8, (10,), dtype=torch.int32)
    with pytest.raises(ValueError, match="end_bit: expected an int >= 1"):
        sort(x, 0)
    with pytest.raises(ValueError, match="end_bit: expected an int <= 32"):
        sort(x, 33)
    with pytest.raises(TypeError, match="end_bit: expected an int"):
        sort(x, 3.0)
    with pytest.raises(TypeError, match="x: expected dtype"):
        sort(x.float())
    with pytest.raises(ValueError, match="x: expected a 1-D tensor"):
        sort(x.view(2, 5))
    with pytest.raises(ValueError, match=r"x: expected values in \[0, 4\)"):
        sort(x.clamp(min=4), 2)
    with pytest.raises(ValueError, match="x: 40000 elements cannot be indexed by int16"):
        sort(torch.zeros(40000, dtype=torch.int16))


# ---------------------------------------------------------------- histogram


@pytest.mark.parametrize("dtype", INT_DTYPES)
@pytest.mark.parametrize("n,max_val", [(0, 4), (1, 1), (1000, 3), (5000, 64), (3000, 300), (2000, 1000)])
def test_histogram(dtype, n, max_val, device):
    high = min(max_val, torch.iinfo(dtype).max)
    x = torch.randint(0, high, (n,), dtype=dtype, device=device)
    want = torch.tensor(loop_histogram(x.cpu().tolist(), max_val), dtype=torch.int32)
    assert_equal("counts", histogram(x, max_val).cpu(), want)
    assert_equal("counts (reference)", _histogram_reference(x.view(1, -1).cpu(), max_val)[0], want)


def test_histogram_batched(device):
    x = torch.randint(0, 20, (3, 777), device=device)
    want = torch.tensor([loop_histogram(r, 20) for r in x.cpu().tolist()], dtype=torch.int32)
    assert_equal("counts", histogram(x, 20).cpu(), want)
    assert_equal("counts (reference)", _histogram_reference(x.cpu(), 20), want)


def test_histogram_one_expert_takes_all(device):
    x = torch.full((4099,), 5, dtype=torch.int32, device=device)
    want = torch.zeros(8, dtype=torch.int32)
    want[5] = 4099
    assert_equal("counts", histogram(x, 8).cpu(), want)


@pytest.mark.parametrize("local", [True, False])
def test_histogram_kernel_ignores_out_of_range(local, device):
    """What CUDA does with bad ids (CPU rejects them in the op): they are neither counted nor
    used as an address, including int64 ids that would wrap into range as int32."""
    if not routing.use_triton(torch.empty(0, device=device)):
        pytest.skip("kernel runs on CUDA or under TRITON_INTERPRET=1")
    good = torch.randint(0, 10, (2, 3000), device=device)
    bad = torch.tensor([-1, 10, 11, 2**32 + 3, -(2**32) + 3, 2**40, 10**6], device=device)
    x = torch.cat([good, bad.expand(2, -1)], dim=1)[:, torch.randperm(3007, device=device)]
    want = torch.tensor([loop_histogram(r, 10) for r in good.cpu().tolist()], dtype=torch.int32)
    assert_equal("counts", backend_routing.histogram(x, 10, local=local).cpu(), want)


def test_histogram_bad_inputs():
    x = torch.randint(0, 8, (10,))
    with pytest.raises(ValueError, match=r"x: expected values in \[0, 4\)"):
        histogram(x.clamp(min=4), 4)
    with pytest.raises(ValueError, match=r"x: expected values in \[0, 4\)"):
        histogram(torch.tensor([-1, 0]), 4)
    with pytest.raises(ValueError, match="max_val: expected an int >= 1"):
        histogram(x, 0)
    with pytest.raises(TypeError, match="x: expected dtype"):
        histogram(x.float(), 8)
    with pytest.raises(ValueError, match="x: expected a 1-D or 2-D tensor"):
        histogram(x.view(1, 2, 5), 8)


# ---------------------------------------------------------------- cumsums, round_up


@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_cumsums(dtype, device):
    x = torch.randint(0, 50, (4, 37), dtype=dtype, device=device)
    rows = x.cpu().tolist()
    for dim in (0, 1, -1):
        d = dim % 2
        inc = [[0] * 37 for _ in range(4)]
        exc = [[0] * 37 for _ in range(4)]
        for i in range(4):
            for j in range(37):
                prev_i, prev_j = (i - 1, j) if d == 0 else (i, j - 1)
                exc[i][j] = (inc[prev_i][prev_j] if (prev_i >= 0 and prev_j >= 0) else 0)
                inc[i][j] = exc[i][j] + rows[i][j]
        assert_equal(f"inclusive dim={dim}", inclusive_cumsum(x, dim).cpu(), torch.tensor(inc, dtype=dtype))
        assert_equal(f"exclusive dim={dim}", exclusive_cumsum(x, dim).cpu(), torch.tensor(exc, dtype=dtype))
    empty = torch.zeros(0, dtype=dtype, device=device)
    assert_equal("inclusive empty", inclusive_cumsum(empty, 0).cpu(), empty.cpu())
    assert_equal("exclusive empty", exclusive_cumsum(empty, 0).cpu(), empty.cpu())


def test_cumsum_bad_inputs():
    x = torch.randint(0, 5, (6,), dtype=torch.int32)
    with pytest.raises(ValueError, match="dim: expected an int <= 0"):
        inclusive_cumsum(x, 1)
    with pytest.raises(ValueError, match="dim: expected an int >= -1"):
        exclusive_cumsum(x, -2)
    with pytest.raises(TypeError, match="x: expected dtype"):
        inclusive_cumsum(x.float(), 0)
    with pytest.raises(ValueError, match="x: expected a tensor of at least 1 dimension"):
        exclusive_cumsum(x[0], 0)


@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_round_up(dtype, device):
    x = torch.tensor([0, 1, 15, 16, 17, 127, 128, 129, 1000], dtype=dtype, device=device)
    for value in (1, 16, 128):
        want = [-(-v // value) * value for v in x.cpu().tolist()]
        assert_equal(f"round_up {value}", round_up(x, value).cpu(), torch.tensor(want, dtype=dtype))
    with pytest.raises(ValueError, match="value: expected an int >= 1"):
        round_up(x, 0)
    with pytest.raises(TypeError, match="value: expected an int"):
        round_up(x, 16.0)


def test_padded_rows_bound():
    gen = torch.Generator().manual_seed(1)
    for num_experts, block_size in [(1, 16), (3, 64), (8, 128)]:
        for n in (0, 1, 7, 500):
            bound = padded_rows_bound(n, num_experts, block_size)
            assert bound % block_size == 0
            worst = 0
            for _ in range(20):
                experts = torch.randint(0, num_experts, (n,), generator=gen)
                counts = torch.bincount(experts, minlength=num_experts)
                worst = max(worst, int(((counts + block_size - 1) // block_size * block_size).sum()))
            assert worst <= bound
    # Attained: each of E experts gets one row (padded to B each).
    assert padded_rows_bound(8, 8, 128) == 8 * 128
    assert padded_rows_bound(0, 3, 64) == 128


# ---------------------------------------------------------------- routing_metadata


def loop_metadata(top_experts, num_experts, block_size):
    flat = top_experts.flatten().tolist()
    indices = sorted(range(len(flat)), key=lambda i: flat[i])
    counts = loop_histogram(flat, num_experts)
    bins, padded, acc, acc_p = [], [], 0, 0
    for c in counts:
        acc += c
        acc_p += -(-c // block_size) * block_size
        bins.append(acc)
        padded.append(acc_p)
    i32 = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    return i32(indices), i32([flat[i] for i in indices]), i32(counts), i32(bins), i32(padded)


ROUTINGS = {
    "random_top2": lambda: torch.randint(0, 8, (301, 2)),
    "one_expert_e1": lambda: torch.zeros(50, 1, dtype=torch.int64),
    "all_on_one": lambda: torch.full((97, 1), 2, dtype=torch.int32),
    "empty_experts": lambda: torch.randint(1, 3, (64, 1)) * 2,  # experts 0, 1, 3, 5.. empty
    "topk_eq_e": lambda: torch.stack([torch.randperm(4) for _ in range(33)]),
    "no_tokens": lambda: torch.zeros(0, 2, dtype=torch.int64),
    "one_token": lambda: torch.tensor([[5, 1]]),
}


@pytest.mark.parametrize("small", [False, True])
@pytest.mark.parametrize("case", list(ROUTINGS))
def test_routing_metadata(case, small, device):
    top_experts = ROUTINGS[case]().to(device)
    num_experts = 8 if case != "one_expert_e1" else 1
    num_experts = 4 if case == "topk_eq_e" else num_experts
    got = routing_metadata(top_experts, num_experts, 16, small_routing=small)
    want = loop_metadata(top_experts.cpu(), num_experts, 16)
    for name, g, w in zip(routing.RoutingMetadata._fields, got, want):
        assert_equal(name, g.cpu(), w)
    assert int(got.padded_bins[-1]) <= padded_rows_bound(top_experts.numel(), num_experts, 16)


def test_routing_metadata_bad_inputs():
    with pytest.raises(ValueError, match=r"top_experts_TK: expected values in \[0, 4\)"):
        routing_metadata(torch.tensor([[0, 4]]), 4, 16)
    with pytest.raises(ValueError, match="num_experts: expected an int >= 1"):
        routing_metadata(torch.tensor([[0]]), 0, 16)
    with pytest.raises(TypeError, match="top_experts_TK: expected dtype"):
        routing_metadata(torch.tensor([[0.0]]), 4, 16)


def test_routing_metadata_compile_fullgraph():
    """The whole metadata step traces into one graph (the histogram kernel is a custom op)."""
    top_experts = torch.randint(0, 8, (100, 2))
    got = torch.compile(routing_metadata, fullgraph=True)(top_experts, 8, 16)
    for name, g, w in zip(routing.RoutingMetadata._fields, got, loop_metadata(top_experts, 8, 16)):
        assert_equal(name, g, w)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_cuda():
    top_experts = torch.randint(0, 64, (4096, 2), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = routing_metadata(top_experts, 64, 128)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for name, g, w in zip(routing.RoutingMetadata._fields, got, loop_metadata(top_experts.cpu(), 64, 128)):
        assert_equal(name, g.cpu(), w)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled ops run on CUDA")
@pytest.mark.parametrize("n,e", [(1, 1), (4097, 8), (131072, 64), (65536, 12288), (1000, 12289)])
def test_compiled_histogram_when_built(n, e):
    """With megablocks._csrc built (scripts/gpu_check.sh --csrc), histogram takes the compiled op
    where it applies; the counts equal the Triton kernel's, ids out of range ignored."""
    from megablocks.backend import csrc
    from megablocks.backend import routing as kernels
    from megablocks.ops import routing

    if csrc.load() is None:
        pytest.skip("megablocks._csrc not built")
    x = torch.randint(-2, e + 2, (n,), device="cuda", dtype=torch.int32)
    expected = kernels.histogram(x.view(1, -1), e)[0]
    assert (routing._compiled_histogram(x.view(1, -1), e) is not None) == (e <= 12288)
    assert torch.equal(routing.histogram(x, e), expected)
    assert torch.equal(routing.histogram(x.long(), e), expected)


# ---------------------------------------------------------------- the one-launch path (N <= 4096)


@pytest.mark.parametrize("n,e,block", [(1, 1, 1), (7, 3, 128), (511, 128, 16), (4096, 64, 128),
                                       (4097, 64, 128), (600, 1022, 64), (300, 1023, 16)])
def test_small_and_general_paths_agree(n, e, block, device):
    """With small_routing, up to 4096 rows and 1022 experts one kernel computes the metadata;
    above, the general path runs. Both equal the per-row loop (a stable sort by expert), on either side of each limit."""
    from megablocks.backend import routing as kernels

    g = torch.Generator().manual_seed(n + e)
    top = torch.randint(0, e, (n,), generator=g)
    top[: n // 3] = e - 1  # a crowded expert, and (for large E) many empty ones
    got = routing_metadata(top.to(device), e, block, small_routing=True)
    want = loop_metadata(top, e, block)
    for name, a, b in zip(routing.RoutingMetadata._fields, got, want):
        assert_equal(name, a.cpu(), b)
    small = n <= kernels.SMALL_ROUTING_MAX_ROWS and e <= kernels.SMALL_ROUTING_MAX_EXPERTS
    if device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        direct = kernels.small_routing(top.to(device), e, block) if small else None
        if direct is not None:
            for name, a, b in zip(routing.RoutingMetadata._fields, direct, want):
                assert_equal(f"small_routing {name}", a.cpu(), b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="ids out of range raise on CPU")
def test_small_routing_ids_out_of_range():
    """On CUDA an id outside [0, E) is not counted and sorts after the valid ones; indices stay a
    permutation, so nothing downstream reads out of bounds."""
    top = torch.tensor([3, -1, 0, 9, 3, 1], device="cuda")
    meta = routing_metadata(top, 4, 16, small_routing=True)
    assert sorted(meta.indices.tolist()) == list(range(6))
    assert meta.indices[:4].tolist() == [2, 5, 0, 4]
    assert meta.tokens_per_expert.tolist() == [1, 1, 0, 2]
    assert meta.bins.tolist() == [1, 2, 2, 4]


# --------------------------------------------------------------------------------------------------
# small_routing_maps: the counts and the plain layout's row maps of K ids per token, one program.


@pytest.mark.parametrize("t,k,e", [(0, 2, 4), (1, 1, 4), (9, 2, 5), (33, 4, 8), (7, 3, 3), (512, 8, 128),
                                   (1, 1, 1022)])
def test_small_routing_maps(t, k, e, device):
    """Bitwise against a stable sort; ids repeat within a token and some are out of range (-1, E):
    those take the rows after every expert's and are counted by none."""
    ids = torch.randint(-1, e + 1, (t, k), device=device)
    check_routing_maps(ids, e, backend_routing.small_routing_maps(ids.flatten(), e))


def check_routing_maps(ids, e, maps):
    """`(counts, assignment_row, row_assignment)` bitwise against a stable sort of the ids, where
    ids outside [0, E) sort after every expert's and are counted by none."""
    counts, assignment_row, row_assignment = maps
    assert counts.dtype == assignment_row.dtype == row_assignment.dtype == torch.int32
    flat = ids.flatten().cpu()
    valid = (flat >= 0) & (flat < e)
    order = torch.sort(torch.where(valid, flat, e), stable=True).indices
    assert_equal("tokens per expert", counts.cpu().long(), torch.bincount(flat[valid], minlength=e))
    assert_equal("row of each assignment", assignment_row.cpu().long(), torch.argsort(order))
    assert_equal("assignment of each row", row_assignment.cpu().long(), order)


# sorted_routing_maps: the same counts and maps for any N and E (key kernel, torch.sort, one kernel).


@pytest.mark.parametrize("t,k,e", [(0, 2, 4), (1, 1, 4), (9, 2, 5), (600, 8, 128), (5000, 1, 3), (700, 4, 300),
                                   (3, 2, 40000), (1100, 4, 1)])
def test_sorted_routing_maps(t, k, e, device):
    """Bitwise against a stable sort, with uint8, int16 and int32 keys (E up to 255, 32767, more),
    N past one program's 4096 rows, ids repeating and out of range (-1, E: the rows after every
    expert's, counted by none); where one program also runs, both routings agree bitwise."""
    ids = torch.randint(-1, e + 1, (t, k), device=device)
    ids[: t // 3] = e - 1  # a crowded expert, and many empty ones
    got = backend_routing.sorted_routing_maps(ids.flatten(), e)
    check_routing_maps(ids, e, got)
    if t * k <= backend_routing.SMALL_ROUTING_MAX_ROWS and e <= backend_routing.SMALL_ROUTING_MAX_EXPERTS:
        for name, a, b in zip(("counts", "assignment_row", "row_assignment"), got,
                              backend_routing.small_routing_maps(ids.flatten(), e)):
            assert_equal(f"{name} against small_routing_maps", a, b)


def test_routing_maps_picks_by_size(monkeypatch, device):
    """One program up to its rows and experts, the sorted routing past either limit."""
    taken = []
    for name in ("small_routing_maps", "sorted_routing_maps"):
        fn = getattr(backend_routing, name)
        monkeypatch.setattr(backend_routing, name, lambda *a, fn=fn, name=name: taken.append(name) or fn(*a))
    ids = torch.randint(0, 8, (4096,), device=device)
    backend_routing.routing_maps(ids, 8)
    backend_routing.routing_maps(torch.cat([ids, ids[:1]]), 8)
    backend_routing.routing_maps(ids[:10], 1023)
    assert taken == ["small_routing_maps", "sorted_routing_maps", "sorted_routing_maps"]


@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_sorted_routing_maps_id_dtypes(dtype, device):
    """Any integer id dtype; a wide id that would wrap into range when narrowed stays out of range."""
    ids = torch.randint(0, 300, (900, 5), device=device)
    ids[0, 0] = -1
    if dtype != torch.int16:
        ids[1, 1] = 2**16 + 7  # 7 once narrowed to 16 bits
    want = backend_routing.sorted_routing_maps(ids.flatten(), 300)
    got = backend_routing.sorted_routing_maps(ids.to(dtype).flatten(), 300)
    for name, a, b in zip(("counts", "assignment_row", "row_assignment"), got, want):
        assert_equal(name, a, b)
    assert got[0].sum().item() == ids.numel() - (1 if dtype == torch.int16 else 2)


@pytest.mark.parametrize("t,k,e", [(0, 2, 4), (100, 3, 6), (3000, 2, 8), (5000, 1, 64)])
def test_row_maps_equal_route_of_the_metadata(t, k, e, device):
    """The grouped dMoE's routing (`row_maps`, three launches) gives bitwise the counts and maps of
    `routing_metadata` then `route` (its form under torch.compile and without the kernels)."""
    from megablocks.ops.permute import route

    ids = torch.randint(0, e, (t, k), device=device, dtype=torch.int32)
    meta = routing_metadata(ids, e, 1, small_routing=False)
    want = route(meta.indices, meta.bin_ids, meta.bins, k)
    counts, got = row_maps(ids, e)
    assert_equal("tokens per expert", counts, meta.tokens_per_expert)
    assert_equal("row of each assignment", got.assignment_row, want.assignment_row)
    assert_equal("assignment of each row", got.row_assignment, want.row_assignment)
    assert got.top_k == want.top_k == k


@pytest.mark.parametrize("t,k,e,b", [(0, 2, 4, 16), (50, 2, 7, 16), (4100, 1, 64, 128), (3000, 3, 3, 64),
                                     (2300, 2, 300, 16), (5000, 1, 1, 128)])
def test_padded_row_maps_equal_route_of_the_metadata(t, k, e, b, device):
    """The block-sparse dMoE's routing past one program's rows (`padded_row_maps`, five launches):
    bitwise the counts, padded bins and padded-layout maps of `routing_metadata` then `route`, with
    a crowded expert and empty ones."""
    from megablocks.ops.permute import route

    ids = torch.randint(0, e, (t, k), device=device, dtype=torch.int32)
    ids[: t // 3] = e - 1
    meta = routing_metadata(ids, e, b, small_routing=False)
    want = route(meta.indices, meta.bin_ids, meta.bins, k, meta.padded_bins, block_size=b)
    counts, padded_bins, got = padded_row_maps(ids, e, b)
    assert_equal("tokens per expert", counts, meta.tokens_per_expert)
    assert_equal("padded bins", padded_bins, meta.padded_bins)
    assert_equal("row of each assignment", got.assignment_row, want.assignment_row)
    assert_equal("assignment of each row", got.row_assignment, want.row_assignment)
    assert got.top_k == want.top_k == k


def test_padded_row_maps_route_ids_out_of_range_nowhere(device):
    """Ids outside [0, E) are counted by no expert and take no row; the others keep theirs."""
    e, b = 5, 16
    ids = torch.randint(0, e, (300,), device=device, dtype=torch.int32)
    bad = torch.tensor([0, 7, 100, 299])
    ids[bad[:2]], ids[bad[2:]] = -1, e
    counts, padded_bins, maps = padded_row_maps(ids, e, b)
    good = torch.ones(300, dtype=torch.bool)
    good[bad] = False
    assert_equal("counts", counts.cpu().long(), torch.bincount(ids.cpu()[good].long(), minlength=e))
    assert (maps.assignment_row.cpu()[bad] == -1).all()
    rows = maps.assignment_row.cpu()[good].long()
    assert_equal("rows of the routed ones", maps.row_assignment.cpu()[rows].long(), torch.nonzero(good).flatten())
    assert int((maps.row_assignment >= 0).sum()) == int(good.sum()), "no row for an id out of range"
