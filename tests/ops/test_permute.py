"""gather / scatter / padded_* / binned_*: forward and gradients against naive loops.

The expected values come from per-row Python loops written from the contract (docs/CONTRACTS.md),
on CPU copies, independent of both the kernels and the library's torch references. Data movement
and the fp32 k-ordered weighted sums are compared bitwise; weight gradients (dot products whose
summation order is free) with `assert_close` against fp64.
"""

import pytest
import torch

from megablocks.backend import permute as kernels
from megablocks.ops import permute as P
from tests.conftest import DEVICE, FLOAT_DTYPES
from tests.utils import assert_close, assert_equal, poisoned

# (T, H, E, K, routing): every T in {0, 1, 7, 33}, H in {1, 5, 96, 130}, E in {1, 4, 9} and
# K in {1, 2, E} appears; 'one' puts every assignment on the last expert, 'empty' leaves the odd
# experts without tokens.
CASES = [
    (0, 5, 4, 2, "random"),
    (1, 1, 1, 1, "random"),
    (1, 130, 9, 9, "random"),
    (7, 5, 4, 4, "random"),
    (7, 96, 9, 2, "empty"),
    (7, 130, 1, 1, "one"),
    (33, 130, 4, 2, "random"),
    (33, 5, 9, 1, "one"),
    (33, 96, 4, 1, "empty"),
    (33, 1, 9, 9, "random"),
]
CASE_IDS = [f"T{t}-H{h}-E{e}-K{k}-{r}" for t, h, e, k, r in CASES]


def make_routing(tokens, num_experts, top_k, routing, block_size, device):
    """Routing metadata as the contract defines it (stable sort by expert, cumulative counts)."""
    if routing == "random" and top_k <= num_experts:
        top_experts = torch.rand(tokens, num_experts).argsort(dim=1)[:, :top_k]
    elif routing == "one":
        top_experts = torch.full((tokens, top_k), num_experts - 1)
    else:  # 'empty': even experts only
        top_experts = torch.randint(0, (num_experts + 1) // 2, (tokens, top_k)) * 2
    flat = top_experts.flatten()
    bin_ids, indices = torch.sort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    bins = counts.cumsum(0)
    padded_bins = ((counts + block_size - 1) // block_size * block_size).cumsum(0)
    to = lambda t, dtype: t.to(device=device, dtype=dtype)  # noqa: E731
    return dict(
        indices=to(indices, torch.int32),
        bin_ids=to(bin_ids, torch.int64),
        bins=to(bins, torch.int32),
        padded_bins=to(padded_bins, torch.int32),
    )


def rows_of_sorted(r, layout, bin_size=0):
    """The buffer row of each sorted position (None where dropped), by a loop over experts."""
    bins, padded_bins = r["bins"].tolist(), r["padded_bins"].tolist()
    rows = []
    for i, e in enumerate(r["bin_ids"].tolist()):
        j = i - (bins[e - 1] if e > 0 else 0)
        if layout == "plain":
            rows.append(i)
        elif layout == "padded":
            rows.append((padded_bins[e - 1] if e > 0 else 0) + j)
        else:
            rows.append(e * bin_size + j if j < bin_size else None)
    return rows


def naive_gather(x, r, rows, num_rows, top_k, weights=None):
    x, indices = x.cpu(), r["indices"].tolist()
    weights = weights.cpu() if weights is not None else None
    out = torch.zeros(num_rows, x.shape[1], dtype=x.dtype)
    for i, row in enumerate(rows):
        if row is None:
            continue
        v = x[indices[i] // top_k]
        if weights is not None:
            v = (v.float() * weights[indices[i]].float()).to(x.dtype)
        out[row] = v
    return out


def naive_scatter(x, r, rows, top_k, weights=None):
    x, indices = x.cpu(), r["indices"].tolist()
    weights = weights.cpu() if weights is not None else None
    pos = {a: i for i, a in enumerate(indices)}
    tokens = len(indices) // top_k
    out = torch.empty(tokens, x.shape[1], dtype=x.dtype)
    for t in range(tokens):
        acc = torch.zeros(x.shape[1], dtype=torch.float32)
        for k in range(top_k):
            a = t * top_k + k
            row = rows[pos[a]]
            if row is None:
                continue
            v = x[row].float()
            if weights is not None:  # MegaBlocks' results: each weighted row rounded first
                v = (v * weights[a].float()).to(x.dtype).float()
            acc = acc + v
        out[t] = acc.to(x.dtype)
    return out


def naive_weight_grad(x_rows, y_tokens, r, rows, top_k):
    x_rows, y_tokens, indices = x_rows.cpu().double(), y_tokens.cpu().double(), r["indices"].tolist()
    out = torch.zeros(len(indices), dtype=torch.float64)
    for i, a in enumerate(indices):
        if rows[i] is not None:
            out[a] = x_rows[rows[i]] @ y_tokens[a // top_k]
    return out


def weights_for(n, dtype, device):
    # Half-precision activations usually come with half-precision expert weights.
    wdtype = torch.float32 if dtype == torch.float32 else dtype
    return torch.rand(n, device=device).add_(0.1).to(wdtype).requires_grad_()


def randn(shape, dtype, device):
    return torch.randn(shape, device=device).to(dtype).requires_grad_()


# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gather_scatter(case, dtype, device):
    tokens, hidden, num_experts, top_k, routing = case
    r = make_routing(tokens, num_experts, top_k, routing, 128, device)
    n = tokens * top_k
    rows = rows_of_sorted(r, "plain")

    x = randn((tokens, hidden), dtype, device)
    y = P.gather(x, r["indices"], r["bin_ids"], r["bins"], top_k)
    assert_equal("gather out", y, naive_gather(x, r, rows, n, top_k).to(device))
    g = torch.randn_like(y)
    y.backward(g)
    assert_equal("gather x.grad", x.grad, naive_scatter(g, r, rows, top_k).to(device))

    xs, w = randn((n, hidden), dtype, device), weights_for(n, dtype, device)
    out = P.scatter(xs, r["indices"], r["bin_ids"], w, r["bins"], top_k)
    assert_equal("scatter out", out, naive_scatter(xs, r, rows, top_k, w).to(device))
    g = torch.randn_like(out)
    out.backward(g)
    assert_equal("scatter x.grad", xs.grad, naive_gather(g, r, rows, n, top_k, w).to(device))
    assert_close("scatter weights.grad", w.grad, naive_weight_grad(xs, g, r, rows, top_k))

    unweighted = P.scatter(xs.detach(), r["indices"], r["bin_ids"], None, r["bins"], top_k)
    assert_equal("scatter out (weights=None)", unweighted, naive_scatter(xs, r, rows, top_k).to(device))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_padded_gather_scatter(case, dtype, device):
    tokens, hidden, num_experts, top_k, routing = case
    block_size = (16, 64, 128)[CASES.index(case) % 3]
    r = make_routing(tokens, num_experts, top_k, routing, block_size, device)
    n = tokens * top_k
    num_rows = P.padded_rows_bound(n, num_experts, block_size)
    rows = rows_of_sorted(r, "padded")
    args = (r["indices"], r["bin_ids"], r["bins"], r["padded_bins"], top_k)

    x = randn((tokens, hidden), dtype, device)
    y = P.padded_gather(x, *args, block_size=block_size)
    assert_equal("padded_gather out", y, naive_gather(x, r, rows, num_rows, top_k).to(device))
    g = torch.randn_like(y)  # padding rows of the gradient hold values too; they must not leak in
    y.backward(g)
    assert_equal("padded_gather x.grad", x.grad, naive_scatter(g, r, rows, top_k).to(device))

    # MegaBlocks' result by default: exactly padded_bins[-1] rows (read on the host).
    used = int(r["padded_bins"][-1])
    x2 = x.detach().clone().requires_grad_()
    y2 = P.padded_gather(x2, *args)
    assert_equal("padded_gather out (MegaBlocks' rows)", y2, naive_gather(x, r, rows, used, top_k).to(device))
    g2 = torch.randn_like(y2)
    y2.backward(g2)
    assert_equal("padded_gather x.grad (MegaBlocks' rows)", x2.grad, naive_scatter(g2, r, rows, top_k).to(device))

    # The input of padded_scatter: real rows random, padding rows NaN.
    real = torch.zeros(num_rows, dtype=torch.bool)
    real[rows] = True
    xp = poisoned((num_rows, hidden), dtype, device)
    xp[real.to(device)] = torch.randn(n, hidden, device=device).to(dtype)
    xp.requires_grad_()
    w = weights_for(n, dtype, device)
    out = P.padded_scatter(xp, r["indices"], r["bin_ids"], w, r["bins"], r["padded_bins"], top_k)
    assert_equal("padded_scatter out", out, naive_scatter(xp, r, rows, top_k, w).to(device))
    assert not out.isnan().any(), "padded_scatter read a padding row"
    g = torch.randn_like(out)
    out.backward(g)
    assert_equal("padded_scatter x.grad", xp.grad, naive_gather(g, r, rows, num_rows, top_k, w).to(device))
    assert_close("padded_scatter weights.grad", w.grad, naive_weight_grad(xp, g, r, rows, top_k))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("capacity", ["tight", "roomy"])
@pytest.mark.parametrize("case", CASES[1::2] + CASES[::4], ids=CASE_IDS[1::2] + CASE_IDS[::4])
def test_binned_gather_scatter(case, capacity, dtype, device):
    tokens, hidden, num_experts, top_k, routing = case
    r = make_routing(tokens, num_experts, top_k, routing, 128, device)
    n = tokens * top_k
    # 'tight' drops about a third of the assignments on a loaded expert; 'roomy' drops none.
    bin_size = max(1, 2 * n // (3 * num_experts)) if capacity == "tight" else n + 3
    rows = rows_of_sorted(r, "binned", bin_size)
    if capacity == "roomy":
        assert None not in rows

    x = randn((tokens, hidden), dtype, device)
    y = P.binned_gather(x, r["indices"], r["bins"], bin_size, top_k)
    expected = naive_gather(x, r, rows, num_experts * bin_size, top_k).view(num_experts, bin_size, hidden)
    assert_equal("binned_gather out", y, expected.to(device))
    g = torch.randn_like(y)
    y.backward(g)
    assert_equal("binned_gather x.grad", x.grad, naive_scatter(g.view(-1, hidden), r, rows, top_k).to(device))

    xb = randn((num_experts, bin_size, hidden), dtype, device)
    w = weights_for(n, dtype, device)
    out = P.binned_scatter(xb, r["indices"], w, r["bins"], top_k)
    assert_equal("binned_scatter out", out, naive_scatter(xb.view(-1, hidden), r, rows, top_k, w).to(device))
    g = torch.randn_like(out)
    out.backward(g)
    expected = naive_gather(g, r, rows, num_experts * bin_size, top_k, w).view(num_experts, bin_size, hidden)
    assert_equal("binned_scatter x.grad", xb.grad, expected.to(device))
    expected = naive_weight_grad(xb.view(-1, hidden), g, r, rows, top_k)
    assert_close("binned_scatter weights.grad", w.grad, expected)


def test_binned_zero_capacity(device):
    r = make_routing(7, 4, 2, "random", 128, device)
    x = randn((7, 5), torch.float32, device)
    y = P.binned_gather(x, r["indices"], r["bins"], 0, 2)
    assert y.shape == (4, 0, 5)
    w = weights_for(14, torch.float32, device)
    out = P.binned_scatter(torch.randn(4, 0, 5, device=device), r["indices"], w, r["bins"], 2)
    assert_equal("binned_scatter out (capacity 0)", out, torch.zeros(7, 5, device=device))


@pytest.mark.parametrize("case", [CASES[2], CASES[4], CASES[6]], ids=[CASE_IDS[2], CASE_IDS[4], CASE_IDS[6]])
def test_torch_references(case, monkeypatch):
    """The plain-torch path that CPU tensors take when the interpreter is off, through the ops."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    tokens, hidden, num_experts, top_k, routing = case
    r = make_routing(tokens, num_experts, top_k, routing, 16, "cpu")
    n = tokens * top_k
    num_rows = P.padded_rows_bound(n, num_experts, 16)
    rows = rows_of_sorted(r, "padded")
    x = randn((tokens, hidden), torch.float16, "cpu")
    y = P.padded_gather(x, r["indices"], r["bin_ids"], r["bins"], r["padded_bins"], top_k, block_size=16)
    assert_equal("padded_gather out", y, naive_gather(x, r, rows, num_rows, top_k))
    w = weights_for(n, torch.float16, "cpu")
    out = P.padded_scatter(y, r["indices"], r["bin_ids"], w, r["bins"], r["padded_bins"], top_k)
    assert_equal("padded_scatter out", out, naive_scatter(y, r, rows, top_k, w))
    g = torch.randn_like(out)
    out.backward(g)
    expected_gy = naive_gather(g, r, rows, num_rows, top_k, w)
    assert_equal("x.grad", x.grad, naive_scatter(expected_gy, r, rows, top_k))
    assert_close("weights.grad", w.grad, naive_weight_grad(y, g, r, rows, top_k))

    bin_size = max(1, n // num_experts)
    brows = rows_of_sorted(r, "binned", bin_size)
    yb = P.binned_gather(x.detach(), r["indices"], r["bins"], bin_size, top_k)
    expected = naive_gather(x, r, brows, num_experts * bin_size, top_k)
    assert_equal("binned_gather out", yb.view(-1, hidden), expected)
    outb = P.binned_scatter(yb, r["indices"], w.detach(), r["bins"], top_k)
    assert_equal("binned_scatter out", outb, naive_scatter(yb.view(-1, hidden), r, brows, top_k, w))


def test_route_masks_bad_metadata(device):
    """Kernels never use an index they cannot trust: out-of-range entries map to -1."""
    indices = torch.tensor([3, 0, 9, 1, -2, 2], device=device)  # 9 and -2 are out of [0, 6)
    bin_ids = torch.tensor([0, 0, 1, 1, 7, 1], device=device)  # 7 is out of [0, 2)
    bins = torch.tensor([2, 6], device=device)
    padded_bins = torch.tensor([4, 8], device=device)
    assignment_row, row_assignment = kernels.route(
        indices, bins, layout="padded", num_rows=8, bin_ids_N=bin_ids, padded_bins_E=padded_bins
    )
    as_int32 = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    assert_equal("assignment_row", assignment_row.cpu(), as_int32([1, 5, 7, 0, -1, -1]))
    assert_equal("row_assignment", row_assignment.cpu(), as_int32([3, 0, -1, -1, -1, 1, -1, 2]))
    # The plain layout writes every row itself (no -1 fill first): the bad indices' rows read -1.
    assignment_row, row_assignment = kernels.route(indices, bins, layout="plain", num_rows=6)
    assert_equal("assignment_row (plain)", assignment_row.cpu(), as_int32([1, 3, 5, 0, -1, -1]))
    assert_equal("row_assignment (plain)", row_assignment.cpu(), as_int32([3, 0, -1, 1, -1, 2]))
    x = torch.randn(6, 3, device=device)
    out = kernels.scatter_rows(x, torch.tensor([0, 99, -5, 5], dtype=torch.int32, device=device), None, 2)
    assert_equal("scatter_rows", out.cpu(), torch.stack([x[0], x[5]]).cpu())


@pytest.mark.parametrize("tokens, hidden, cols", [(3, 100, 32), (64, 2048, 1024), (5, 40, 64), (300, 96, 32)])
def test_scatter_rows_column_chunks(tokens, hidden, cols, device):
    """Few tokens: each program sums one column chunk (the grid's second dim, the decode form),
    a chunk past `hidden` masked; many: one program per token tile loops over them. Both the
    plain definition, weighted and not, with a dropped assignment."""
    top_k = 3
    g = torch.Generator().manual_seed(tokens + hidden)
    x = torch.randn(tokens * top_k, hidden, generator=g).to(device)
    rows = torch.randperm(tokens * top_k, generator=g).to(torch.int32)
    rows[1] = -1
    w = torch.rand(tokens * top_k, generator=g).to(device)
    for weights in (None, w):
        out = kernels.scatter_rows(x, rows.to(device), weights, top_k, tile=dict(cols=cols, rows=2))
        ref = torch.zeros(tokens, hidden, dtype=torch.float64)
        for a, r in enumerate(rows.tolist()):
            if r >= 0:
                ref[a // top_k] += x[r].cpu().double() * (1.0 if weights is None else w[a].item())
        assert_close("scatter_rows", out.cpu(), ref.float())


def test_compile_fullgraph():
    """torch.compile(fullgraph=True) traces padded_gather → padded_scatter, forward and backward.

    The 'aot_eager' backend runs Dynamo and AOTAutograd through the custom ops, their fake
    implementations and autograd formulas (what fullgraph needs); Inductor's C++ code generation
    for the surrounding `y * 2` adds 14-33 s cold on a 2-core CPU and exercises nothing here.
    """
    r = make_routing(7, 4, 2, "random", 16, "cpu")
    x = randn((7, 5), torch.float32, "cpu")
    w = weights_for(14, torch.float32, "cpu")

    def layer(x, w):
        y = P.padded_gather(x, r["indices"], r["bin_ids"], r["bins"], r["padded_bins"], 2, block_size=16)
        return P.padded_scatter(y * 2, r["indices"], r["bin_ids"], w, r["bins"], r["padded_bins"], 2)

    out = torch.compile(layer, fullgraph=True, backend="aot_eager")(x, w)
    out.sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    expected = layer(x, w)
    expected.sum().backward()
    assert_equal("compiled out", out, expected)
    assert_equal("compiled x.grad", gx, x.grad)
    assert_equal("compiled weights.grad", gw, w.grad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_capture():
    """No host sync anywhere: padded_gather → padded_scatter captured once, replayed on new data."""
    r = make_routing(33, 9, 2, "random", 64, "cuda")
    x = torch.randn(33, 96, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(66, device="cuda")
    args = (r["indices"], r["bin_ids"], r["bins"], r["padded_bins"], 2)

    def layer():
        y = P.padded_gather(x, *args, block_size=64)
        return P.padded_scatter(y, r["indices"], r["bin_ids"], w, r["bins"], r["padded_bins"], 2)

    layer()  # compile the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer()
    x.copy_(torch.randn_like(x))
    w.copy_(torch.rand_like(w))
    graph.replay()
    assert_equal("replayed out", out, layer())


def _valid_kwargs(op):
    """Valid keyword arguments of `op` (T=7, K=2, E=4, H=5, block 128) on CPU."""
    r = make_routing(7, 4, 2, "random", 128, "cpu")
    base = dict(indices=r["indices"], bins=r["bins"], top_k=2)
    w = torch.rand(14)
    return {
        "gather": dict(x=torch.randn(7, 5), bin_ids=r["bin_ids"], **base),
        "scatter": dict(x=torch.randn(14, 5), bin_ids=r["bin_ids"], weights=w, **base),
        "padded_gather": dict(
            x=torch.randn(7, 5), bin_ids=r["bin_ids"], padded_bins=r["padded_bins"], **base
        ),
        "padded_scatter": dict(
            x=torch.randn(512, 5), bin_ids=r["bin_ids"], padded_bins=r["padded_bins"], weights=w, **base
        ),
        "binned_gather": dict(x=torch.randn(7, 5), bin_size=3, **base),
        "binned_scatter": dict(x=torch.randn(4, 3, 5), weights=w, **base),
    }[op]


# (op, changed arguments: a value or a function of the valid one, error, message).
BAD_INPUTS = [
    ("gather", {"x": lambda x: x.double()}, TypeError, "x: expected dtype"),
    ("gather", {"x": lambda x: x[0]}, ValueError, "x: expected a 2-D"),
    ("gather", {"x": lambda x: x[:6]}, ValueError, "x: expected 7 rows"),
    ("gather", {"x": [[1.0]]}, TypeError, "x: expected a torch.Tensor"),
    ("gather", {"indices": lambda i: i.float()}, TypeError, "indices: expected dtype"),
    ("gather", {"indices": lambda i: i.view(7, 2)}, ValueError, "indices: expected a 1-D"),
    ("gather", {"bin_ids": lambda b: b[:5]}, ValueError, "bin_ids: expected 14"),
    ("gather", {"top_k": 0}, ValueError, "top_k: expected an int >= 1"),
    ("gather", {"top_k": 3}, ValueError, "multiple of top_k=3"),
    ("gather", {"top_k": 2.0}, TypeError, "top_k: expected an int"),
    ("gather", {"indices": lambda i: i + 1}, ValueError, r"indices: expected values in \[0, 14\)"),
    ("gather", {"bin_ids": lambda b: b + 4}, ValueError, r"bin_ids: expected values in \[0, 4\)"),
    ("gather", {"bins": lambda b: b + 20}, ValueError, r"bins: expected values in \[0, 15\)"),
    ("gather", {"bins": lambda b: b[:0]}, ValueError, "bins: expected at least one"),
    ("gather", {"indices": lambda i: i.to("meta")}, ValueError, "indices: expected a tensor on"),
    ("scatter", {"x": lambda x: x[:7]}, ValueError, "x: expected 14 rows"),
    ("scatter", {"weights": lambda w: w[:3]}, ValueError, "weights: expected 14"),
    ("scatter", {"weights": lambda w: w.long()}, TypeError, "weights: expected dtype"),
    ("padded_gather", {"padded_bins": lambda b: b[:2]}, ValueError, "padded_bins: expected 4"),
    ("padded_gather", {"block_size": 0}, ValueError, "block_size"),
    ("padded_gather", {"padded_bins": lambda b: b * 9, "block_size": 128}, ValueError, "padded_bins: expected values"),
    ("padded_gather", {"padded_bins": lambda b: b - b[-1] - 1}, ValueError, "padded"),
    ("padded_scatter", {"x": lambda x: x[:10]}, ValueError, "padded_bins: expected values"),
    ("binned_gather", {"bin_size": -1}, ValueError, "bin_size"),
    ("binned_scatter", {"x": lambda x: x[:3]}, ValueError, "x: expected 4 rows"),
    ("binned_scatter", {"x": lambda x: x[0]}, ValueError, "x: expected a 3-D"),
]


@pytest.mark.parametrize("op, changes, error, match", BAD_INPUTS, ids=[f"{b[0]}-{b[3]}" for b in BAD_INPUTS])
def test_bad_input(op, changes, error, match):
    # CPU tensors: index values are checked there (on CUDA only with MEGABLOCKS_CHECK_VALUES=1).
    kwargs = _valid_kwargs(op)
    getattr(P, op)(**kwargs)  # the valid call passes
    for name, change in changes.items():
        kwargs[name] = change(kwargs[name]) if callable(change) else change
    with pytest.raises(error, match=match):
        getattr(P, op)(**kwargs)


# ------------------------------------------------------------------------------------------------
# route + gather_routed / scatter_routed: the layers' form, row maps computed once.


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_routed_ops_equal_the_ops(case, padded, device):
    """gather_routed / scatter_routed with `route`'s maps give what gather / scatter (padded_*)
    give, forward and every gradient (x, the rows, the weights)."""
    tokens, hidden, num_experts, top_k, routing = case
    r = make_routing(tokens, num_experts, top_k, routing, 16, device)
    x = torch.randn(tokens, hidden, device=device, requires_grad=True)
    w = torch.rand(tokens * top_k, device=device, requires_grad=True)
    maps = P.route(r["indices"], r["bin_ids"], r["bins"], top_k, r["padded_bins"] if padded else None,
                   block_size=16)
    got = P.gather_routed(x, maps)
    if padded:
        want = P.padded_gather(x, r["indices"], r["bin_ids"], r["bins"], r["padded_bins"], top_k, block_size=16)
    else:
        want = P.gather(x, r["indices"], r["bin_ids"], r["bins"], top_k)
    assert_equal("gather", got, want)
    y = torch.randn_like(got, requires_grad=True)
    out = P.scatter_routed(y, maps, w)
    if padded:
        ref = P.padded_scatter(y, r["indices"], r["bin_ids"], w, r["bins"], r["padded_bins"], top_k)
    else:
        ref = P.scatter(y, r["indices"], r["bin_ids"], w, r["bins"], top_k)
    assert_equal("scatter", out, ref)
    g_out, g_x = torch.randn_like(out), torch.randn_like(got)
    grads = torch.autograd.grad([out, got], [x, y, w], [g_out, g_x], allow_unused=True)
    refs = torch.autograd.grad([ref, want], [x, y, w], [g_out, g_x], allow_unused=True)
    for name, a, b in zip(("x", "y", "weights"), grads, refs):
        assert_equal(f"grad {name}", a, b)


def test_routed_ops_bad_input(device):
    r = make_routing(7, 4, 2, "random", 16, device)
    maps = P.route(r["indices"], r["bin_ids"], r["bins"], 2)
    with pytest.raises(ValueError, match=r"x: expected 7 rows"):
        P.gather_routed(torch.randn(8, 5, device=device), maps)
    with pytest.raises(ValueError, match=r"y: expected 14 rows"):
        P.scatter_routed(torch.randn(13, 5, device=device), maps, None)
    with pytest.raises(ValueError, match=r"weights: expected 14 elements"):
        P.scatter_routed(torch.randn(14, 5, device=device), maps, torch.rand(13, device=device))
    with pytest.raises(TypeError, match=r"x: expected dtype"):
        P.gather_routed(torch.ones(7, 5, dtype=torch.int32, device=device), maps)
    with pytest.raises(ValueError, match="top_k"):
        P.route(r["indices"], r["bin_ids"], r["bins"], 0)


def test_weight_grad_tile_caps_the_unrolled_rows():
    """The weight-gradient kernel unrolls its loop over a program's rows, so its tile takes at most
    WEIGHT_GRAD_MAX_ROWS of them at every hidden size (the permutation tile gives 512 at hidden 3),
    and an override above it is capped too."""
    for hidden in (1, 3, 5, 16, 64, 1000, 4096):
        tile = kernels.weight_grad_tile(hidden)
        assert tile.rows == min(kernels.default_tile(hidden).rows, kernels.WEIGHT_GRAD_MAX_ROWS)
        assert tile.cols == kernels.default_tile(hidden).cols
    assert kernels.weight_grad_tile(3, {"rows": 512}).rows == kernels.WEIGHT_GRAD_MAX_ROWS
    assert kernels.weight_grad_tile(3, {"rows": 2}).rows == 2


@pytest.mark.parametrize("hidden", [1, 3])
def test_weight_grad_at_tiny_hidden_over_several_programs(hidden):
    """Hidden sizes whose permutation tile is hundreds of rows: the weight gradient over 70
    assignments (five programs of 16), dropped ones among them, against the plain sum."""
    g = torch.Generator().manual_seed(hidden)
    top_k, tokens, rows = 2, 35, 50
    x = torch.randn(rows, hidden, generator=g).to(DEVICE)
    y = torch.randn(tokens, hidden, generator=g).to(DEVICE)
    r = torch.randint(-1, rows, (tokens * top_k,), generator=g).to(torch.int32).to(DEVICE)
    out = kernels.weight_grad(x, y, r, top_k)
    keep = (r >= 0).cpu()
    expected = torch.zeros(tokens * top_k, dtype=torch.float64)
    xr = x.double().cpu()[r.long().cpu().clamp_min(0)]
    yr = y.double().cpu().repeat_interleave(top_k, 0)
    expected[keep] = (xr * yr).sum(1)[keep]
    assert_close("weight_grad", out, expected, torch.float32)
