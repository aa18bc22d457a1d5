"""gmm_gathered / gmm_shared_input_gathered and the kernels' row maps against explicit gathers.

Legend: T tokens, H hidden (the inner size K), F output columns, E experts, K top-k, N = T·K rows.

The expected values gather the token rows by hand from the routing (`x[indices // top_k]`, sorted
positions in expert order) and run the per-group float64 loop of `gmm_reference` on them, with
autograd for the gradients of x and of the weights. Every backend ('triton': the in-kernel map;
'torch': an explicit gather) is checked at awkward shapes: T = 0, one token, empty experts, every
assignment on one expert, top_k 1 and > 1, H and F not multiples of the tiles. The gradient of x
(a deterministic fp32 sum over each token's top_k rows) is also compared bitwise across two runs.
"""

import pytest
import torch

from megablocks.backend import gmm as gmm_backend
from megablocks.ops.gmm import gmm_gathered, gmm_reference, gmm_shared_input_gathered
from megablocks.ops.permute import RowMaps, route
from tests.conftest import DEVICE, FLOAT_DTYPES
from tests.utils import assert_close, assert_equal, poisoned

BACKENDS = ["triton", "torch"]

# (T, H, F, E, K, routing). 'one': every assignment on the last expert; 'empty': odd experts get
# no rows. The tiles under the interpreter are 32 wide, so 37, 45 and 19 leave partial tiles.
if DEVICE == "cuda":
    CASES = {
        "no_tokens": (0, 256, 128, 4, 2, "random"),
        "one_token": (1, 264, 136, 8, 1, "random"),
        "unaligned": (300, 1003, 517, 8, 2, "random"),
        "top_k_is_E": (257, 512, 264, 4, 4, "random"),
        "all_on_one": (200, 520, 264, 4, 2, "one"),
        "empty_experts": (333, 256, 384, 6, 1, "empty"),
    }
else:
    CASES = {
        "no_tokens": (0, 40, 24, 4, 2, "random"),
        "one_token": (1, 37, 19, 4, 1, "random"),
        "unaligned": (9, 37, 45, 4, 2, "random"),
        "top_k_is_E": (8, 40, 24, 4, 4, "random"),
        "all_on_one": (12, 33, 45, 3, 2, "one"),
        "empty_experts": (10, 40, 24, 6, 1, "empty"),
    }


def _routing(T, E, K, routing, device):
    """(indices, bin_ids, bins, tokens_per_expert) as docs/CONTRACTS.md defines them."""
    if routing == "random":
        top = torch.rand(T, E).argsort(dim=1)[:, :K]
    elif routing == "one":
        top = torch.full((T, K), E - 1)
    else:
        top = torch.randint(0, (E + 1) // 2, (T, K)) * 2
    flat = top.flatten()
    bin_ids, indices = torch.sort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E)
    to = lambda t: t.to(device=device, dtype=torch.int32)  # noqa: E731
    return to(indices), to(bin_ids), to(counts.cumsum(0)), to(counts)


def _setup(case, dtype, device, trans_b=True, num_b=1):
    T, H, Fs, E, K, routing = CASES[case]
    indices, bin_ids, bins, counts = _routing(T, E, K, routing, device)
    maps = route(indices, bin_ids, bins, K)
    x = torch.randn(T, H, device=device).to(dtype)
    bs = [((torch.randn(E, Fs, H) if trans_b else torch.randn(E, H, Fs)) / H**0.5).to(device, dtype)
          for _ in range(num_b)]
    token_of_row = indices.long().cpu() // K
    return x, bs, counts, maps, token_of_row


def _expected(x, bs, counts, token_of_row, trans_b, grads):
    """Outputs and gradients (x, each b) of the explicit gather + per-group loop, in float64."""
    x64 = x.detach().cpu().double().requires_grad_()
    b64 = [b.detach().cpu().double().requires_grad_() for b in bs]
    outs = [gmm_reference(x64[token_of_row], b, counts.cpu(), trans_b=trans_b) for b in b64]
    torch.autograd.backward(outs, [g.cpu().double() for g in grads])
    return outs, x64.grad, [b.grad for b in b64]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("trans_b", [True, False])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gmm_gathered_forward_and_grads(backend, dtype, trans_b, case, device):
    x, (b,), counts, maps, token_of_row = _setup(case, dtype, device, trans_b)
    x.requires_grad_()
    b.requires_grad_()
    out = gmm_gathered(x, b, counts, maps, trans_b=trans_b, backend=backend)
    d_out = torch.randn_like(out)
    out.backward(d_out)
    (ref,), d_x, (d_b,) = _expected(x, [b], counts, token_of_row, trans_b, [d_out])
    assert out.dtype == dtype
    assert_close("out", out, ref, dtype)
    assert_close("d_x", x.grad, d_x, dtype)
    assert_close("d_b", b.grad, d_b, dtype)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gmm_shared_input_gathered_forward_and_grads(backend, dtype, case, device):
    """The GLU twin (trans_b, as the layers call it): both outputs and the three gradients."""
    x, (b1, b2), counts, maps, token_of_row = _setup(case, dtype, device, True, num_b=2)
    for t in (x, b1, b2):
        t.requires_grad_()
    out1, out2 = gmm_shared_input_gathered(x, b1, b2, counts, maps, trans_b=True, backend=backend)
    d1, d2 = torch.randn_like(out1), torch.randn_like(out2)
    torch.autograd.backward([out1, out2], [d1, d2])
    (r1, r2), d_x, (d_b1, d_b2) = _expected(x, [b1, b2], counts, token_of_row, True, [d1, d2])
    assert_close("out1", out1, r1, dtype)
    assert_close("out2", out2, r2, dtype)
    assert_close("d_x", x.grad, d_x, dtype)
    assert_close("d_b1", b1.grad, d_b1, dtype)
    assert_close("d_b2", b2.grad, d_b2, dtype)


def test_gmm_shared_input_gathered_trans_b_false_and_one_output_used(device):
    x, (b1, b2), counts, maps, token_of_row = _setup("unaligned", torch.float32, device, False, num_b=2)
    x.requires_grad_()
    b2.requires_grad_()
    out1, out2 = gmm_shared_input_gathered(x, b1, b2, counts, maps)
    d2 = torch.randn_like(out2)
    out2.backward(d2)  # out1 unused: its gradient is zero
    (r1, r2), d_x, (_, d_b2) = _expected(x, [b1, b2], counts, token_of_row, False, [torch.zeros_like(out1), d2])
    assert_close("out1", out1, r1, torch.float32)
    assert_close("out2", out2, r2, torch.float32)
    assert_close("d_x", x.grad, d_x, torch.float32)
    assert_close("d_b2", b2.grad, d_b2, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gathered_equals_explicit_gather(backend, device):
    """The same values as gather_routed followed by the plain products (here even bitwise on the
    CPU: both paths run the same tile arithmetic)."""
    from megablocks.ops.gmm import gmm, gmm_shared_input
    from megablocks.ops.permute import gather_routed

    x, (b1, b2), counts, maps, _ = _setup("unaligned", torch.float32, device, True, num_b=2)
    x_rows = gather_routed(x, maps)
    assert_close("gmm", gmm_gathered(x, b1, counts, maps, True, backend),
                 gmm(x_rows, b1, counts, True, backend), torch.float32)
    pair = gmm_shared_input_gathered(x, b1, b2, counts, maps, True, backend)
    for i, ref in enumerate(gmm_shared_input(x_rows, b1, b2, counts, True, backend)):
        assert_close(f"pair[{i}]", pair[i], ref, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pair", [False, True])
def test_input_gradient_is_deterministic(pair, backend, device):
    """Two backward passes from the same inputs give bitwise the same gradient of x."""
    x, bs, counts, maps, _ = _setup("top_k_is_E", torch.float16, device, True, num_b=2)
    grads = []
    for _ in range(2):
        xi = x.clone().requires_grad_()
        if pair:
            outs = gmm_shared_input_gathered(xi, bs[0], bs[1], counts, maps, True, backend)
        else:
            outs = (gmm_gathered(xi, bs[0], counts, maps, True, backend),)
        g = torch.Generator(device).manual_seed(7)
        torch.autograd.backward(outs, [torch.randn(o.shape, device=device, generator=g).to(o.dtype) for o in outs])
        grads.append(xi.grad)
    assert_equal("d_x", grads[1], grads[0])


@pytest.mark.parametrize("layout", ["column_major", "no_unit_stride", "row_slice"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_x(backend, layout, device):
    """x given as a view: its values are what count (a row slice is read in place)."""
    T, H, Fs, E, K, _ = CASES["unaligned"]
    x0, (b,), counts, maps, token_of_row = _setup("unaligned", torch.float32, device, True)
    if layout == "column_major":
        x = x0.t().contiguous().t()
    elif layout == "no_unit_stride":
        x = torch.stack([x0, torch.randn_like(x0)], dim=2).flatten(1)[:, ::2]
    else:
        x = torch.cat([x0, torch.randn(T, 3, device=device)], dim=1)[:, :H]
    assert not x.is_contiguous() and torch.equal(x, x0)
    x.requires_grad_()
    b.requires_grad_()
    out = gmm_gathered(x, b, counts, maps, trans_b=True, backend=backend)
    d_out = torch.randn_like(out)
    out.backward(d_out)
    (ref,), d_x, (d_b,) = _expected(x, [b], counts, token_of_row, True, [d_out])
    assert_close("out", out, ref, torch.float32)
    assert_close("d_x", x.grad, d_x, torch.float32)
    assert_close("d_b", b.grad, d_b, torch.float32)


# ------------------------------------------------------------------------------------------------
# The kernels' row maps (megablocks.backend.gmm.triton_gmm a_rows / b_rows)

SCHEDULES = {
    "one_tile_each": dict(persistent=False, tma_store=False),
    "persistent_tma_store": dict(persistent=True, tma_store=True),
}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("use_tma", [False, True])
def test_triton_row_maps_on_load_paths(use_tma, schedule, device):
    """A map on `a` (forward and variable-K) and on `b` (variable-K), with `b` (resp. `a`) on
    TMA or pointer loads; persistent programs loop over tiles of several groups."""
    T, K, N = 13, 40, 24  # 16-byte aligned rows: TMA takes the unmapped operand
    sizes = [9, 0, 12, 5]
    M = sum(sizes)
    counts = torch.tensor(sizes, dtype=torch.int32, device=device)
    x = torch.randn(T, K, device=device, dtype=torch.float16)
    rows = torch.randint(0, T, (M,), dtype=torch.int32, device=device)
    gathered = x[rows.long()].double().cpu()
    b = (torch.randn(len(sizes), N, K, device=device) / K**0.5).half()
    g = torch.randn(M, N, device=device, dtype=torch.float16)
    cfg = SCHEDULES[schedule]
    out = gmm_backend.triton_gmm(x, b, counts, trans_b=True, a_rows=rows, use_tma=use_tma, config=cfg)
    assert_close("out", out, gmm_reference(gathered, b.double().cpu(), counts.cpu(), trans_b=True), torch.float16)
    d_b = gmm_backend.triton_gmm(x, g, counts, trans_a=True, a_rows=rows, use_tma=use_tma, config=cfg)
    ref = gmm_reference(gathered, g.double().cpu(), counts.cpu(), trans_a=True)
    assert_close("d_b (a mapped)", d_b, ref, torch.float16)
    d_b = gmm_backend.triton_gmm(g, x, counts, trans_a=True, b_rows=rows, use_tma=use_tma, config=cfg)
    ref = gmm_reference(g.double().cpu(), gathered, counts.cpu(), trans_a=True)
    assert_close("d_b (b mapped)", d_b, ref, torch.float16)


def test_triton_row_maps_stay_in_bounds(device):
    """Entries past T are clamped to T - 1, negative ones read zeros; an empty mapped tensor
    gives zeros, and rows past the groups' total are zero."""
    T, K, N = 7, 37, 19
    sizes = [5, 0, 6]
    M = sum(sizes)
    counts = torch.tensor(sizes, dtype=torch.int32, device=device)
    x = torch.randn(T, K, device=device)
    rows = torch.randint(0, T, (M,), dtype=torch.int32, device=device)
    rows[0], rows[3], rows[7] = -1, T + 100, 2**31 - 1
    source = torch.cat([x, torch.zeros(1, K, device=device)]).cpu()
    gathered = source[torch.where(rows < 0, T, rows.clamp(max=T - 1)).long().cpu()].double()
    b = torch.randn(3, K, N, device=device)
    out = gmm_backend.triton_gmm(x, b, counts, a_rows=rows)
    assert_close("out", out, gmm_reference(gathered, b.double().cpu(), counts.cpu()), torch.float32)
    g = torch.randn(M, N, device=device)
    d_b = gmm_backend.triton_gmm(x, g, counts, trans_a=True, a_rows=rows)
    assert_close("d_b", d_b, gmm_reference(gathered, g.double().cpu(), counts.cpu(), trans_a=True), torch.float32)

    # Map entries past the groups' total rows are never used: those rows are zero.
    extra = torch.cat([rows, torch.full((4,), -5, dtype=torch.int32, device=device)])
    out = gmm_backend.triton_gmm(x, b, counts, a_rows=extra)
    assert out[M:].abs().max() == 0, "rows past the groups' total must be zero"

    empty = x[:0]
    assert gmm_backend.triton_gmm(empty, b, counts, a_rows=rows).abs().max() == 0
    assert gmm_backend.triton_gmm(empty, g, counts, trans_a=True, a_rows=rows).abs().max() == 0
    poison = poisoned((T, K), torch.float32, device)
    out = gmm_backend.triton_gmm(poison, b, counts, a_rows=torch.full((M,), -1, dtype=torch.int32, device=device))
    assert out.abs().max() == 0, "negative map entries must read zeros, never the tensor"

    # Entries as routed assignments (rows_top_k = 3): the row is entry // 3; -1 still reads zeros
    # (not row 0, as truncating division would give), and past 3T - 1 the last row.
    assignments = torch.randint(0, 3 * T, (M,), dtype=torch.int32, device=device)
    assignments[0], assignments[1], assignments[4] = -1, -2, 3 * T + 50
    tokens = torch.where(assignments < 0, T, (assignments // 3).clamp(max=T - 1)).long().cpu()
    out = gmm_backend.triton_gmm(x, b, counts, a_rows=assignments, rows_top_k=3)
    assert_close("out (rows_top_k=3)", out, gmm_reference(source[tokens].double(), b.double().cpu(), counts.cpu()),
                 torch.float32)
    d_b = gmm_backend.triton_gmm(g, x, counts, trans_a=True, b_rows=assignments, rows_top_k=3)
    assert_close("d_b (rows_top_k=3, map on b)", d_b,
                 gmm_reference(g.double().cpu(), source[tokens].double(), counts.cpu(), trans_a=True), torch.float32)


def test_triton_row_map_arguments(device):
    x = torch.randn(4, 8, device=device)
    b = torch.randn(2, 8, 3, device=device)
    counts = torch.tensor([2, 2], dtype=torch.int32, device=device)
    rows = torch.zeros(4, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="b_rows: a row map of b is for the variable-K form"):
        gmm_backend.triton_gmm(x, b, counts, b_rows=rows)
    with pytest.raises(ValueError, match="at most one row map"):
        gmm_backend.triton_gmm(x, x, counts, trans_a=True, a_rows=rows, b_rows=rows)
    with pytest.raises(ValueError, match="expected a 1-D int32 tensor"):
        gmm_backend.triton_gmm(x, b, counts, a_rows=rows.long())
    with pytest.raises(ValueError, match="rows_top_k: expected an int >= 1"):
        gmm_backend.triton_gmm(x, b, counts, a_rows=rows, rows_top_k=0)


# ------------------------------------------------------------------------------------------------
# Registration and bad arguments


def test_opcheck(device):
    """Schema, fake implementation and autograd registration of the custom ops."""
    x, (b1, b2), counts, maps, _ = _setup("unaligned", torch.float32, device, True, num_b=2)
    x.requires_grad_()
    b1.requires_grad_()
    tail = (counts, maps.row_assignment, maps.assignment_row, maps.top_k, True, "triton")
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.megablocks.gmm.default, (x, b1, None, *tail), test_utils=checks)
    torch.library.opcheck(torch.ops.megablocks.gmm.default, (x, b1, b2, *tail), test_utils=checks)
    g = torch.randn(maps.row_assignment.numel(), b1.shape[1], device=device)
    # The weight gradient of the gathered product: grad^T @ x[map], the map on the second operand.
    product = (g, x, counts, None, None, maps.row_assignment, maps.assignment_row, maps.top_k, True, True, False,
               "triton")
    torch.library.opcheck(torch.ops.megablocks.gmm_product.default, product, test_utils=checks)


def test_eager_path_equals_the_custom_op(device):
    """Eager calls skip the dispatcher (megablocks/ops/_eager.py) with the same results."""
    import importlib

    from megablocks.ops._eager import EagerOp

    gmm_ops = importlib.import_module("megablocks.ops.gmm")  # the module, not the function

    for op, has_backward in ((gmm_ops._grouped_mm, True), (gmm_ops._product, False)):
        assert isinstance(op, EagerOp) and op._impl is not None
        assert (op._function is not None) == has_backward
    x, (b, b2), counts, maps, _ = _setup("unaligned", torch.float32, device, True, num_b=2)
    tail = (counts, maps.row_assignment, maps.assignment_row, maps.top_k, True, "triton")
    for second in (None, b2):
        results = []
        for call in (gmm_ops._grouped_mm, torch.ops.megablocks.gmm):
            xi, bi = x.clone().requires_grad_(), b.clone().requires_grad_()
            b2i = None if second is None else second.clone().requires_grad_()
            outs = call(xi, bi, b2i, *tail)
            assert isinstance(outs, list) and len(outs) == (1 if second is None else 2)
            sum(o.sum() for o in outs).backward()
            results.append((*outs, xi.grad, bi.grad) + (() if second is None else (b2i.grad,)))
        names = ("out", "d_x", "d_b") if second is None else ("out1", "out2", "d_x", "d_b1", "d_b2")
        for name, eager_value, op_value in zip(names, *results):
            assert_equal(name, eager_value, op_value)


def test_compiles_in_one_graph(device):
    x, (b1, b2), counts, maps, token_of_row = _setup("unaligned", torch.float32, device, True, num_b=2)
    for t in (x, b1, b2):
        t.requires_grad_()

    def fn(x, b1, b2, counts, row_assignment, assignment_row):
        m = RowMaps(assignment_row, row_assignment, maps.top_k)
        h1, h2 = gmm_shared_input_gathered(x, b1, b2, counts, m, trans_b=True, backend="triton")
        return gmm_gathered(x, b1, counts, m, trans_b=True, backend="triton") + h1 * h2

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    out = compiled(x, b1, b2, counts, maps.row_assignment, maps.assignment_row)
    d_out = torch.randn_like(out)
    out.backward(d_out)
    # The reference: the explicit gather and the per-group products, by autograd in float64.
    x64, b164, b264 = (t.detach().double().requires_grad_() for t in (x, b1, b2))
    rows = x64[token_of_row.cpu()]
    h1 = gmm_reference(rows, b164, counts.cpu(), trans_b=True)
    h2 = gmm_reference(rows, b264, counts.cpu(), trans_b=True)
    ref = h1 + h1 * h2
    ref.backward(d_out.double().to(ref.device))
    assert_close("out", out, ref, torch.float32)
    assert x.grad is not None and x.grad.shape == x.shape
    assert_close("d_x", x.grad, x64.grad, torch.float32)
    assert_close("d_b1", b1.grad, b164.grad, torch.float32)
    assert_close("d_b2", b2.grad, b264.grad, torch.float32)


def test_bad_arguments(device):
    x, (b,), counts, maps, _ = _setup("unaligned", torch.float32, device, True)
    N = maps.row_assignment.numel()
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        gmm_gathered(x.tolist(), b, counts, maps, True)
    with pytest.raises(TypeError, match="x: expected dtype"):
        gmm_gathered(x.double(), b.double(), counts, maps, True)
    with pytest.raises(ValueError, match="x: expected a 2-D tensor"):
        gmm_gathered(x[None], b, counts, maps, True)
    with pytest.raises(TypeError, match="maps: expected a RowMaps"):
        gmm_gathered(x, b, counts, (maps.assignment_row, maps.row_assignment, maps.top_k), True)
    with pytest.raises(TypeError, match="maps.row_assignment: expected dtype"):
        gmm_gathered(x, b, counts, maps._replace(row_assignment=maps.row_assignment.long()), True)
    with pytest.raises(ValueError, match="maps.top_k: expected an int >= 1"):
        gmm_gathered(x, b, counts, maps._replace(top_k=0), True)
    with pytest.raises(ValueError, match=f"maps.assignment_row: expected a multiple of top_k={N + 1}"):
        gmm_gathered(x, b, counts, maps._replace(top_k=N + 1), True)
    with pytest.raises(ValueError, match=r"x: expected \d+ rows \(T = assignments // top_k\)"):
        gmm_gathered(x[:-1], b, counts, maps, True)
    with pytest.raises(TypeError, match="b: expected the dtype of a"):
        gmm_gathered(x, b.half(), counts, maps, True)
    with pytest.raises(ValueError, match=r"b: expected b.shape\[2\] \(trans_b=True\)"):
        gmm_gathered(x, b[:, :, :-1], counts, maps, True)
    with pytest.raises(ValueError, match=f"batch_sizes: expected {counts.numel()} entries"):
        gmm_gathered(x, b, counts[:-1], maps, True)
    with pytest.raises(ValueError, match=f"batch_sizes: expected non-negative sizes summing to {N}"):
        gmm_gathered(x, b, counts.cpu() + 1, maps, True)
    with pytest.raises(ValueError, match="backend: expected one of"):
        gmm_gathered(x, b, counts, maps, True, backend="cutlass")
    with pytest.raises(TypeError, match="backend='gg'"):
        gmm_gathered(x, b, counts, maps, True, backend="gg")
    with pytest.raises(ValueError, match="b2: expected the shape of b1"):
        gmm_shared_input_gathered(x, b, b[:, :-1], counts, maps, True)
    with pytest.raises(TypeError, match="b2: expected the dtype of b1"):
        gmm_shared_input_gathered(x, b, b.half(), counts, maps, True)
    with pytest.raises(TypeError, match="b2: expected a torch.Tensor"):
        gmm_shared_input_gathered(x, b, None, counts, maps, True)
