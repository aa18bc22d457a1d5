"""Property-based tests: random shapes, dtypes and routings against the plain-torch references.

Hypothesis draws tiny problems (the kernels run in Triton's interpreter on CPU) with adversarial
routings: every assignment on one expert, experts left empty, ties in router scores (equal scores,
where `torch.topk` picks), zero tokens. Each test compares the forward output and every gradient
with the reference by name. The examples come from a seed drawn from the commit under test
(tests/conftest.py; printed in the report header, reproduced with `--hypothesis-seed=N` or
`HYPOTHESIS_SEED=N`), so each commit draws new cases (322 per run); `HYPOTHESIS_PROFILE=
megablocks-explore` draws 4x as many. A failure found here is kept below as an explicit `@example`.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from megablocks import ops
from megablocks.integrations.inference import fused_moe, fused_moe_reference, softmax_topk, softmax_topk_reference
from megablocks.layers.dmoe import dMoE
from megablocks.layers.moe import MoE
from megablocks.ops.activation import glu_torch
from megablocks.ops import permute as P
from megablocks.ops.gmm import gmm_reference
from megablocks.ops.sparse import _like, dds_reference, dsd_reference, sdd_reference
from megablocks.ops.topology import ExpertTopology, topology_reference
from tests.conftest import DEVICE
from tests.layers.moe_reference import check_against_reference, make_args, randomize_bias, route_all_to
from tests.utils import assert_close, assert_equal

settings.register_profile(
    "megablocks-ci",
    deadline=None,
    derandomize=False,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "megablocks-explore",
    deadline=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "megablocks-ci")
settings.load_profile(_PROFILE)
# The number of examples each test draws in CI (sum: 320, plus the explicit examples); the explore profile draws 4x as many.
_SCALE = 4 if _PROFILE == "megablocks-explore" else 1
# MEGABLOCKS_PROPERTY_REACH=N (the GPU script sets 8) multiplies every drawn size bound by N, so
# that on a GPU the examples span several tiles of each kernel; on a GPU bf16 is drawn as well.
_REACH = int(os.environ.get("MEGABLOCKS_PROPERTY_REACH", "1"))
FLOATS = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _size(lo: int, hi: int):
    """A size in [lo, hi·reach]."""
    return st.integers(lo, hi * _REACH)
_META = ("row_indices", "column_indices", "offsets", "column_indices_t", "offsets_t", "block_offsets_t")
ROUTINGS = ["random", "one", "empty", "ties"]


def _examples(n: int, at_reach: int = None):
    """n examples (4n in the explore profile); `at_reach`: the number under MEGABLOCKS_PROPERTY_REACH
    > 1, for the two tests whose examples take longest on the GPU (test_dmoe_layer: up to 23 s an
    example at reach 8 on the H200, each compiling kernels for its own sizes), so that the GPU
    script's run ends in minutes."""
    if _REACH > 1 and at_reach is not None:
        n = at_reach
    return settings(max_examples=n * _SCALE)


def _top_experts(routing: str, T: int, E: int, K: int, seed: int) -> torch.Tensor:
    """[T, K] int32 expert ids, K distinct per token, drawn by the named adversarial rule."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(T, E, generator=g)
    if routing == "one":  # every token's first choice on one expert
        scores[:, E // 2] = 2.0
    elif routing == "empty":  # odd experts never chosen while K allows it
        scores[:, 1::2] -= 2.0
    elif routing == "ties":  # equal scores: ids come from topk's tie-breaking
        scores = torch.zeros(T, E)
    return torch.topk(scores, K, dim=-1).indices.to(torch.int32).to(DEVICE)


@st.composite
def routings(draw, max_tokens=10, max_experts=6):
    E = draw(st.integers(1, max_experts))
    K = draw(st.integers(1, min(E, 3)))
    T = draw(_size(0, max_tokens))
    routing = draw(st.sampled_from(ROUTINGS))
    seed = draw(st.integers(0, 2**16))
    return T, E, K, routing, seed


# --------------------------------------------------------------------------------------------------
# Routing metadata.


@_examples(60)
@given(routings(max_tokens=40, max_experts=9), st.sampled_from([1, 2, 16, 128]))
def test_routing_metadata(case, block):
    T, E, K, routing, seed = case
    top = _top_experts(routing, T, E, K, seed)
    meta = ops.routing_metadata(top, E, block)
    flat = top.reshape(-1).long().cpu()
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=E)
    assert_equal("indices", meta.indices.cpu(), order.int())
    assert_equal("bin_ids", meta.bin_ids.cpu(), flat[order].int())
    assert_equal("tokens_per_expert", meta.tokens_per_expert.cpu(), counts.int())
    assert_equal("bins", meta.bins.cpu(), counts.cumsum(0).int())
    padded = ((counts + block - 1) // block * block).cumsum(0).int()
    assert_equal("padded_bins", meta.padded_bins.cpu(), padded)
    assert int(padded[-1]) <= ops.padded_rows_bound(T * K, E, block)
    # The single ops agree with the fused call.
    assert_equal("histogram", ops.histogram(flat.to(DEVICE), E).cpu(), counts.int())
    values, idx = ops.sort(flat.to(DEVICE), max(1, (E - 1).bit_length()))
    assert_equal("sort indices", idx.cpu(), order)
    assert_equal("sort values", values.cpu(), flat[order])


# --------------------------------------------------------------------------------------------------
# The gather/scatter family, forward and gradients, with NaN in the padding rows of the inputs.


def _grads(fn, *inputs, reference=False, grad_dtype=None, absolute=False):
    """(output, gradient of each input) for a seeded random output gradient (`absolute`: its
    magnitudes). An op's output must stay connected to its inputs even when empty (T = 0); a
    reference's need not (its gradients are zeros then)."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*leaves)
    if not out.requires_grad:
        assert reference, "the op's output is not connected to its inputs"
        return out, [torch.zeros_like(t) if t.requires_grad else None for t in leaves]
    # The output gradient at `grad_dtype` (the op's output dtype for a widened reference run).
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(grad_dtype or out.dtype)
    g = g.to(out.dtype).to(out.device)
    if absolute:
        g = g.abs()
    (out.float() * g.float()).sum().backward()
    return out, [t.grad for t in leaves]


def _REF(fn, *inputs, sum_bounds=False):
    """The reference's output at the inputs' dtype (compared exactly or by dtype limits), and its
    gradients from float64 inputs, rounded once to each input's dtype: the reference gradient
    carries no rounding of its own beyond the final one. Also, for fp32 comparisons, the exact
    (float64) output and the plain fp32 run's gradients: where a result is ill-conditioned (a
    sum that cancels, at sizes of one or two) `assert_close` allows a few times fp32's own error
    there (`plain=`). `sum_bounds` (ops linear in each input, whose gradients are sums of
    products: the permutations): per gradient element fp32's own error bound for that sum in any
    order, n·eps·Σ|terms| (n: the output's elements, at least the terms; Σ|terms| the float64
    gradient at |inputs| and |output gradient|), plus the exact gradient's rounding to fp32."""
    out, plain_grads = _grads(fn, *inputs, reference=True)
    wide = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    # The output gradient rounded as the op's (whose output has its first input's dtype).
    exact, grads = _grads(fn, *wide, reference=True, grad_dtype=inputs[0].dtype)
    rounded = [None if g is None else g.to(t.dtype) for g, t in zip(grads, inputs)]
    if not sum_bounds:
        return out, rounded, exact, plain_grads
    magnitudes = [t.detach().double().abs().requires_grad_(t.requires_grad) for t in inputs]
    _, sums = _grads(fn, *magnitudes, reference=True, grad_dtype=inputs[0].dtype, absolute=True)
    eps = torch.finfo(torch.float32).eps
    bounds = [None if m is None else (max(exact.numel(), 1) * eps * m + eps * g.abs(), g)
              for m, g in zip(sums, grads)]
    return out, rounded, exact, plain_grads, bounds


def _compare(kind, name, actual, expected, family="op", plain_16bit=False, out_bound=None):
    """`plain_16bit`: the 16-bit gradients too are allowed a little more than the plain run's own
    error in the dtype (`assert_close`'s `plain=`), for ops whose design rounds partial results to
    the dtype as the plain torch computation does (a sum of two products that cancels).
    `out_bound`: for a product, n·eps·(|a| @ |b|) per output element (float64; n terms summed,
    eps fp32's): an fp32 output within it of the exact one passes. That is fp32's own error bound
    for a sum in any order; where the sum cancels, the plain run's error (`plain=`) can be far
    below it by the luck of its order (dds, hidden = ffn = 1: 3.2e-5 against a plain run's
    < 1.8e-6), while TF32 or 16-bit accumulation still exceed it a hundredfold."""
    out, grads = actual
    ref, ref_grads, exact, plain_grads = expected[:4]
    sum_bounds = expected[4] if len(expected) > 4 else [None] * len(grads)
    fp32 = out.dtype == torch.float32
    if kind == "exact":
        assert_equal(f"{name} out", out, ref)
    elif fp32 and out_bound is not None and bool(
            ((out.detach().double().cpu() - exact.detach().double().cpu()).abs() <= out_bound.cpu()).all()):
        pass
    elif fp32:
        assert_close(f"{name} out", out, exact, family=family, plain=ref)
    else:
        assert_close(f"{name} out", out, ref, family=family)
    for i, (g, r, p, bound) in enumerate(zip(grads, ref_grads, plain_grads, sum_bounds)):
        if r is None:
            assert g is None, f"{name}: grad {i} present, reference has none"
        elif g.dtype == torch.float32 and bound is not None and bool(
                ((g.detach().double().cpu() - bound[1].cpu()).abs() <= bound[0].cpu()).all()):
            pass  # within fp32's own error for its sum, whatever the order (`_REF`'s sum_bounds)
        else:
            assert_close(f"{name} grad {i}", g, r, family=family,
                         plain=p if g.dtype == torch.float32 or plain_16bit else None)


@_examples(60, at_reach=15)
@given(routings(), _size(1, 20), st.sampled_from(FLOATS), st.sampled_from([2, 4, 16]),
       st.integers(0, 6), st.booleans())
@example(case=(0, 3, 2, "random", 0), hidden=5, dtype=torch.float32, block=4, bin_size=0, weighted=True)
@example(case=(7, 4, 4, "ties", 3), hidden=3, dtype=torch.float16, block=2, bin_size=1, weighted=True)
def test_permute_family(case, hidden, dtype, block, bin_size, weighted):
    T, E, K, routing, seed = case
    top = _top_experts(routing, T, E, K, seed)
    meta = ops.routing_metadata(top, E, block)
    g = torch.Generator().manual_seed(seed)
    x_TH = torch.randn(T, hidden, generator=g).to(dtype).to(DEVICE).requires_grad_(True)
    w_N = (torch.rand(T * K, generator=g) + 0.5).to(dtype).to(DEVICE).requires_grad_(weighted)
    w = w_N if weighted else None
    idx, bid, bins, pbins = meta.indices, meta.bin_ids, meta.bins, meta.padded_bins

    _compare("exact", "gather", _grads(lambda x: ops.gather(x, idx, bid, bins, K), x_TH),
             _REF(lambda x: P.gather_reference(x, idx, bid, bins, K), x_TH))
    x_NH = torch.randn(T * K, hidden, generator=g).to(dtype).to(DEVICE).requires_grad_(True)
    ins = (x_NH, w_N) if weighted else (x_NH,)
    _compare("exact", "scatter",
             _grads(lambda x, *ww: ops.scatter(x, idx, bid, ww[0] if ww else None, bins, K), *ins),
             _REF(lambda x, *ww: P.scatter_reference(x, idx, bid, ww[0] if ww else None, bins, K), *ins,
                  sum_bounds=True))

    _compare("exact", "padded_gather",
             _grads(lambda x: ops.padded_gather(x, idx, bid, bins, pbins, K, block_size=block), x_TH),
             _REF(lambda x: P.padded_gather_reference(x, idx, bid, bins, pbins, K, block_size=block), x_TH))
    # padded_scatter must never read padding rows: poison them with NaN.
    rows = ops.padded_rows_bound(T * K, E, block)
    _, row_assignment = P.route_reference(idx, bins, layout="padded", num_rows=rows, bin_ids_N=bid,
                                          padded_bins_E=pbins)
    x_PH = torch.randn(rows, hidden, generator=g).to(dtype).to(DEVICE)
    x_PH = x_PH.masked_fill((row_assignment < 0)[:, None], float("nan")).requires_grad_(True)
    ins = (x_PH, w_N) if weighted else (x_PH,)
    res = _grads(lambda x, *ww: ops.padded_scatter(x, idx, bid, ww[0] if ww else None, bins, pbins, K), *ins)
    assert not res[0].isnan().any(), "padded_scatter read a padding row"
    _compare("exact", "padded_scatter", res,
             _REF(lambda x, *ww: P.padded_scatter_reference(x, idx, bid, ww[0] if ww else None, bins, pbins, K),
                  *ins, sum_bounds=True))

    _compare("exact", "binned_gather",
             _grads(lambda x: ops.binned_gather(x, idx, bins, bin_size, K), x_TH),
             _REF(lambda x: P.binned_gather_reference(x, idx, bins, bin_size, K), x_TH))
    x_ECH = torch.randn(E, bin_size, hidden, generator=g).to(dtype).to(DEVICE).requires_grad_(True)
    ins = (x_ECH, w_N) if weighted else (x_ECH,)
    _compare("exact", "binned_scatter",
             _grads(lambda x, *ww: ops.binned_scatter(x, idx, ww[0] if ww else None, bins, K), *ins),
             _REF(lambda x, *ww: P.binned_scatter_reference(x, idx, ww[0] if ww else None, bins, K), *ins,
                  sum_bounds=True))


# --------------------------------------------------------------------------------------------------
# Topology: the kernel against the reference and against the definition.


@_examples(80)
@given(routings(max_tokens=40, max_experts=8), st.sampled_from([16, 32, 64]), _size(1, 150))
def test_topology(case, block, ffn):
    T, E, K, routing, seed = case
    top = _top_experts(routing, T, E, K, seed)
    meta = ops.routing_metadata(top, E, block)
    rows = ops.padded_rows_bound(T * K, E, block) // block
    topo = ops.make_topology(meta.padded_bins, block_size=block, num_block_rows=rows, ffn_hidden_size=ffn,
                             dtype=torch.float32)
    C = -(-ffn // block)
    ref = topology_reference(meta.padded_bins, block, rows, C)
    names = ("row_indices", "column_indices", "offsets", "column_indices_t", "offsets_t", "block_offsets_t")
    for name, want in zip(names, ref):
        assert_equal(name, getattr(topo, name).cpu(), want.cpu())
    # The definition: block row r belongs to the expert whose padded bin holds it.
    ends = (meta.padded_bins.long().cpu() // block).tolist()
    used = ends[-1] * C
    assert int(topo.offsets[-1]) == used
    for slot in range(used):
        r, j = divmod(slot, C)
        e = next(i for i, end in enumerate(ends) if r < end)
        assert int(topo.column_indices[slot]) == e * C + j, f"slot {slot}"


# --------------------------------------------------------------------------------------------------
# Grouped GEMM.


@_examples(40)
@given(st.lists(_size(0, 9), min_size=1, max_size=5), _size(1, 24), _size(1, 24),
       st.booleans(), st.sampled_from(FLOATS), st.sampled_from(["spread", "one"]), st.integers(0, 2**16))
def test_gmm(sizes, k, n, trans_b, dtype, shape, seed):
    if shape == "one":  # every row in one group, the others empty
        sizes = [0] * (len(sizes) - 1) + [sum(sizes)]
    E, M = len(sizes), sum(sizes)
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(M, k, generator=g).to(dtype).to(DEVICE).requires_grad_(True)
    b = torch.randn(E, *((n, k) if trans_b else (k, n)), generator=g).to(dtype).to(DEVICE).requires_grad_(True)
    bs = torch.tensor(sizes, dtype=torch.int32, device=DEVICE)
    _compare("close", "gmm", _grads(lambda a_, b_: ops.gmm(a_, b_, bs, trans_b=trans_b, backend="triton"), a, b),
             _REF(lambda a_, b_: gmm_reference(a_.float(), b_.float(), bs, trans_b=trans_b), a, b))


# --------------------------------------------------------------------------------------------------
# Block-sparse SDD and DSD on dMoE topologies.


@_examples(30)
@given(routings(max_tokens=8, max_experts=4), _size(1, 40), _size(1, 24), st.sampled_from(FLOATS))
def test_sdd_dsd(case, ffn, hidden, dtype):
    T, E, K, routing, seed = case
    block = 16
    top = _top_experts(routing, T, E, K, seed)
    meta = ops.routing_metadata(top, E, block)
    rows = ops.padded_rows_bound(T * K, E, block)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=g).to(dtype).to(DEVICE).requires_grad_(True)
    w1 = torch.randn(E * ffn, hidden, generator=g).to(dtype).to(DEVICE).requires_grad_(True)
    w2 = torch.randn(E * ffn, hidden, generator=g).to(dtype).to(DEVICE).requires_grad_(True)
    topo = ops.make_topology(meta.padded_bins, block_size=block, num_block_rows=rows // block,
                             ffn_hidden_size=ffn, dtype=dtype)

    def run(sdd, dsd, round_h=False):
        def f(x_, w1_, w2_):
            h = sdd(x_, w1_.t(), topo)
            if round_h:  # the op stores its intermediate in the dtype: the reference rounds there too
                h = ExpertTopology(h.size(), h.data.to(dtype).to(h.data.dtype),
                                   *(getattr(h, n) for n in _META), num_experts=E, ffn_hidden_size=ffn)
            return dsd(h, w2_)
        return f

    def h_only(sdd):
        return lambda x_, w1_: sdd(x_, w1_.t(), topo).data

    _compare("close", "sdd", _grads(h_only(ops.sdd), x, w1), _REF(h_only(sdd_reference), x, w1))
    _compare("close", "sdd+dsd", _grads(run(ops.sdd, ops.dsd), x, w1, w2),
             _REF(run(sdd_reference, dsd_reference, round_h=True), x, w1, w2))


# --------------------------------------------------------------------------------------------------
# The dMoE layer against the naive per-expert loop.


@_examples(50, at_reach=12)
@given(routings(max_tokens=6, max_experts=4), st.sampled_from(["sparse", "triton", "torch"]),
       st.sampled_from(["mlp", "glu"]), _size(1, 20), _size(1, 20))
def test_dmoe_layer(case, impl, mlp_type, hidden, ffn):
    T, E, K, routing, seed = case
    torch.manual_seed(seed)
    layer = dMoE(make_args(impl, hidden_size=hidden, ffn_hidden_size=ffn, moe_num_experts=E, moe_top_k=K,
                           mlp_type=mlp_type))
    randomize_bias(layer)
    x = torch.rand(T, hidden, device=DEVICE) + 0.5
    if routing == "one":
        route_all_to(layer, E // 2)
    elif routing == "ties":
        with torch.no_grad():
            layer.router.layer.weight.zero_()
    elif routing == "empty" and E > 1:
        with torch.no_grad():
            layer.router.layer.weight[1::2] = -1.0
    check_against_reference(layer, x.requires_grad_(True), top_experts_from_layer=routing == "ties")


# --------------------------------------------------------------------------------------------------
# The other op families: dds, the gathered and shared-input GEMMs, glu, softmax_topk, fused_moe and
# the capacity MoE, each against its plain reference.


@_examples(20)
@given(routings(max_tokens=8, max_experts=4), _size(1, 40), _size(1, 24), st.sampled_from(FLOATS))
def test_dds(case, ffn, hidden, dtype):
    """a @ S and a @ S^T on dMoE topologies (the weight gradients of the sparse path)."""
    T, E, K, routing, seed = case
    block = 16
    top = _top_experts(routing, T, E, K, seed)
    meta = ops.routing_metadata(top, E, block)
    rows = ops.padded_rows_bound(T * K, E, block)
    g = torch.Generator().manual_seed(seed)
    topo = ops.make_topology(meta.padded_bins, block_size=block, num_block_rows=rows // block,
                             ffn_hidden_size=ffn, dtype=dtype)
    x = torch.randn(rows, hidden, generator=g).to(dtype).to(DEVICE)
    w1 = torch.randn(E * ffn, hidden, generator=g).to(dtype).to(DEVICE)
    h = ops.sdd(x, w1.t(), topo)  # a sparse operand with the topology's real blocks
    a = torch.randn(hidden, rows, generator=g).to(dtype).to(DEVICE).requires_grad_(True)
    a_t = torch.randn(hidden, E * ffn, generator=g).to(dtype).to(DEVICE).requires_grad_(True)
    # fp32's error bound for each output's sum: n terms, |a| @ |S| (`_compare`'s out_bound).
    h_abs = _like(h, h.data.detach().abs().double())
    eps = torch.finfo(torch.float32).eps
    bound = rows * eps * dds_reference(a.detach().abs().double(), h_abs)
    bound_t = E * ffn * eps * dds_reference(a_t.detach().abs().double(), h_abs.t())
    _compare("close", "dds", _grads(lambda a_: ops.dds(a_, h), a), _REF(lambda a_: dds_reference(a_, h), a),
             out_bound=bound)
    _compare("close", "dds (S^T)", _grads(lambda a_: ops.dds(a_, h.t()), a_t),
             _REF(lambda a_: dds_reference(a_, h.t()), a_t), out_bound=bound_t)


@_examples(30)
@given(routings(max_tokens=12, max_experts=5), _size(1, 24), _size(1, 24), st.sampled_from(FLOATS),
       st.booleans(), st.booleans())
def test_gathered_and_shared_input_gmm(case, hidden, ffn, dtype, trans_b, pair):
    """gmm_gathered / gmm_shared_input_gathered (token rows read through the row maps) against the
    reference product of the gathered rows, forward and every gradient."""
    T, E, K, routing, seed = case
    top = _top_experts(routing, T, E, K, seed)
    meta = ops.routing_metadata(top, E, 16)
    maps = ops.route(meta.indices, meta.bin_ids, meta.bins, K)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, hidden, generator=g).to(dtype).to(DEVICE).requires_grad_(True)
    shape = (E, ffn, hidden) if trans_b else (E, hidden, ffn)
    b1 = torch.randn(*shape, generator=g).to(dtype).to(DEVICE).requires_grad_(True)
    b2 = torch.randn(*shape, generator=g).to(dtype).to(DEVICE).requires_grad_(True)
    counts = meta.tokens_per_expert
    token_of_row = (meta.indices.long() // K).to(DEVICE)

    if pair:
        def ours(x_, b1_, b2_):
            h1, h2 = ops.gmm_shared_input_gathered(x_, b1_, b2_, counts, maps, trans_b=trans_b, backend="triton")
            return torch.cat([h1, h2], dim=1)

        def ref(x_, b1_, b2_):
            rows = x_[token_of_row]
            return torch.cat([gmm_reference(rows, b, counts.cpu(), trans_b=trans_b) for b in (b1_, b2_)], dim=1)

        # x's gradient is a product rounded to the dtype, then summed over each token's rows: two
        # roundings. The pair's is the first product rounded to the dtype and the second added to it,
        # as the plain torch backward rounds each product: where the two cancel, both are off by a
        # rounding at the products' scale (seen: one token, hidden 1, fp16, 3.6e-3 against 3e-3).
        _compare("close", "gmm_shared_input_gathered", _grads(ours, x, b1, b2), _REF(ref, x, b1, b2), family="layer",
                 plain_16bit=True)
    else:
        _compare("close", "gmm_gathered",
                 _grads(lambda x_, b_: ops.gmm_gathered(x_, b_, counts, maps, trans_b=trans_b, backend="triton"),
                        x, b1),
                 _REF(lambda x_, b_: gmm_reference(x_[token_of_row], b_, counts.cpu(), trans_b=trans_b), x, b1),
                 family="layer")


@_examples(30)
@given(_size(0, 50), _size(1, 40), st.sampled_from(FLOATS),
       st.sampled_from(["silu", "gelu", "gelu_tanh", "relu"]), st.integers(0, 2**16))
def test_glu(rows, cols, dtype, activation, seed):
    g = torch.Generator().manual_seed(seed)
    h1 = (torch.randn(rows, cols, generator=g) * 3).to(dtype).to(DEVICE).requires_grad_(True)
    h2 = torch.randn(rows, cols, generator=g).to(dtype).to(DEVICE).requires_grad_(True)
    def reference(a, b):  # torch's functions in fp32, and in float64 for the exact run
        wide = torch.float64 if a.dtype == torch.float64 else torch.float32
        return glu_torch(a.to(wide), b.to(wide), activation).to(a.dtype)

    _compare("close", f"glu {activation}", _grads(lambda a, b: ops.glu(a, b, activation), h1, h2),
             _REF(reference, h1, h2))


@_examples(30)
@given(_size(0, 40), st.integers(1, 40), st.data(), st.booleans(), st.sampled_from(FLOATS),
       st.sampled_from(["random", "ties"]), st.integers(0, 2**16))
def test_softmax_topk(tokens, experts, data, renormalize, dtype, kind, seed):
    topk = data.draw(st.integers(1, experts))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=g) * 3
    if kind == "ties":  # equal scores where torch.topk picks
        logits = logits.round()
    logits = logits.to(dtype).to(DEVICE)
    weights, ids = softmax_topk(logits, topk, renormalize)
    want_w, want_ids = softmax_topk_reference(logits, topk, renormalize)
    # Ties are common (rounded logits, and 16-bit ones): among equal scores either pick is a top-k.
    # The chosen scores must be the K largest in descending order, each expert once per token
    # (which tied one is the kernel's documented rule, tested in tests/ops/test_topk.py).
    scores = logits.float().softmax(-1).cpu()
    chosen = scores.gather(1, ids.cpu().long())
    assert_equal("chosen scores", chosen, scores.topk(topk, dim=-1).values)
    assert all(len(set(row)) == topk for row in ids.cpu().tolist()), "an expert chosen twice"
    untied = [t for t in range(tokens) if len(set(scores[t].tolist())) == experts]
    assert_equal("ids of tokens without ties", ids.cpu()[untied], want_ids.cpu()[untied])
    assert_close("weights", weights, want_w, torch.float32)


@_examples(20)
@given(_size(0, 12), _size(1, 24), _size(1, 20), st.integers(1, 6), st.data(),
       st.booleans(), st.sampled_from(["silu", "gelu", "relu"]), st.integers(0, 2**16))
def test_fused_moe(tokens, hidden, ffn, experts, data, renormalize, activation, seed):
    """vLLM's fused_moe (the default path and the grouped path) against the per-token loop."""
    topk = data.draw(st.integers(1, experts))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).to(DEVICE)
    w1 = (torch.randn(experts, 2 * ffn, hidden, generator=g) / hidden**0.5).to(DEVICE)
    w2 = (torch.randn(experts, hidden, ffn, generator=g) / ffn**0.5).to(DEVICE)
    gating = torch.randn(tokens, experts, generator=g).to(DEVICE)
    want = fused_moe_reference(x, w1, w2, gating, topk, renormalize, activation)
    for path in ("auto", "grouped"):
        got = fused_moe(x, w1, w2, gating, topk, renormalize, activation=activation, path=path)
        assert_close(f"fused_moe ({path})", got, want, torch.float32, family="layer")


@_examples(20)
@given(routings(max_tokens=8, max_experts=4), st.sampled_from(["mlp", "glu"]), st.sampled_from([0.5, 1.0, 2.0]))
def test_capacity_moe(case, mlp_type, factor):
    """The MoE with a capacity factor (assignments past an expert's capacity dropped, in token
    order) against the naive loop with the same drop rule, forward and every gradient."""
    T, E, K, routing, seed = case
    torch.manual_seed(seed)
    layer = MoE(make_args(hidden_size=12, ffn_hidden_size=10, moe_num_experts=E, moe_top_k=K,
                          mlp_type=mlp_type, moe_capacity_factor=factor))
    randomize_bias(layer)
    if routing == "one":
        route_all_to(layer, E // 2)
    x = (torch.rand(max(T, 1), 12, device=DEVICE) + 0.5).requires_grad_(True)
    # A capacity that rounds to 0 means the largest expert's count (MegaBlocks' rule): no drop.
    check_against_reference(layer, x, capacity=layer.experts.expert_capacity(x.shape[0]) or None)
