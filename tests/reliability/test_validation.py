"""Every public entry point against bad input, extreme sizes, NaN/Inf and zero tokens.

Four kinds of check, one test each (docs/RELIABILITY.md tabulates the results):

- refused: wrong rank, dtype, device, top_k, or a size whose int32 index arithmetic would
  overflow → TypeError/ValueError naming the argument. Sizes past int32 are built as stride-0
  expanded views, so no memory is allocated;
- accepted: non-contiguous inputs give the result of their contiguous copies;
- NaN/Inf: a poisoned token row comes out as NaN/Inf in that token's output only, no exception;
- zero tokens: T = 0 gives empty outputs and (empty or zero) gradients.
"""

import pytest
import torch

from megablocks import ops
from megablocks.ops import fp8
from megablocks.integrations.inference import fused_moe
from megablocks.layers.dmoe import dMoE
from megablocks.layers.moe import MoE
from tests.conftest import DEVICE
from tests.layers.moe_reference import make_args
from tests.utils import assert_close, assert_equal

T, K, E, H, F, B = 5, 2, 3, 8, 20, 16
BIG = 2**31  # one past the int32 range


def _huge(*shape, dtype=torch.float32):
    """A tensor of `shape` (numel past int32) that allocates one element."""
    return torch.zeros((1,) * len(shape), dtype=dtype, device=DEVICE).expand(*shape)


def _routing(tokens=T, top_k=K, experts=E, block=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    top = torch.rand(tokens, experts, generator=g).topk(top_k, dim=-1).indices.to(torch.int32).to(DEVICE)
    return top, ops.routing_metadata(top, experts, block)


def _x(rows, cols=H, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g).to(dtype).to(DEVICE)


def _topology(meta, tokens=T, top_k=K, experts=E):
    rows = ops.padded_rows_bound(tokens * top_k, experts, B)
    return rows, ops.make_topology(meta.padded_bins, block_size=B, num_block_rows=rows // B, ffn_hidden_size=F,
                                   dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# Refused input: (entry point, what is wrong) → exception type and message.


def _refusals():
    top, m = _routing()
    idx, bid, bins, pbins = m.indices, m.bin_ids, m.bins, m.padded_bins
    x = _x(T)
    rows, topo = _topology(m)
    xp, w1 = _x(rows), _x(E * F)
    h = ops.sdd(xp, w1.t(), topo)
    a, b, bs = _x(6, 4), _x(2 * 4, 3).view(2, 4, 3), torch.tensor([2, 4], device=DEVICE)
    hs, fw1, fw2, go = _x(T), _x(E * 12, H).view(E, 12, H), _x(E * H, 6).view(E, H, 6), _x(T, E)
    meta = torch.empty(T, H, device="meta")
    # FP8 operands: 6 rows of 200 columns in two groups, two experts' 96 x 200 weights.
    xf, fbs = _x(6, 200), torch.tensor([2, 4], device=DEVICE)
    xq, xs = fp8.quantize_rows(xf)
    wq, ws = fp8.quantize_blocks(_x(2 * 96, 200).view(2, 96, 200))
    cq, cs = fp8.quantize_cols_grouped(xf, fbs)
    cases = [
        # routing metadata
        ("sort", "rank", lambda: ops.sort(top, 2), ValueError, r"x: expected a 1-D tensor"),
        ("sort", "dtype", lambda: ops.sort(top.flatten().float(), 2), TypeError, r"x: expected dtype in \(int16"),
        ("sort", "end_bit", lambda: ops.sort(top.flatten(), 33), ValueError, r"end_bit: expected an int <= 32"),
        ("sort", "values past end_bit", lambda: ops.sort(top.flatten() + 4, 2), ValueError, r"x: expected values in \[0, 4\)"),
        ("sort", "int32 overflow", lambda: ops.sort(_huge(BIG, dtype=torch.int32), 8), ValueError, r"x: 2147483648 elements exceed"),
        ("sort", "int16 too short", lambda: ops.sort(_huge(2**15 + 1, dtype=torch.int16)), ValueError, r"x: 32769 elements cannot be indexed by int16"),
        ("histogram", "rank", lambda: ops.histogram(top[None], E), ValueError, r"x: expected a 1-D or 2-D tensor"),
        ("histogram", "dtype", lambda: ops.histogram(top.float(), E), TypeError, r"x: expected dtype"),
        ("histogram", "max_val", lambda: ops.histogram(top.flatten(), 0), ValueError, r"max_val: expected an int >= 1"),
        ("histogram", "ids out of range", lambda: ops.histogram(top.flatten(), 1), ValueError, r"x: expected values in \[0, 1\)"),
        ("histogram", "int32 overflow", lambda: ops.histogram(_huge(BIG, dtype=torch.int32), E), ValueError, r"x: 2147483648 elements"),
        ("inclusive_cumsum", "scalar", lambda: ops.inclusive_cumsum(torch.tensor(3), 0), ValueError, r"x: expected a tensor of at least 1"),
        ("inclusive_cumsum", "dim", lambda: ops.inclusive_cumsum(bins, 1), ValueError, r"dim: expected an int <= 0"),
        ("exclusive_cumsum", "dtype", lambda: ops.exclusive_cumsum(bins.float(), 0), TypeError, r"x: expected dtype"),
        ("round_up", "dtype", lambda: ops.round_up(bins.float(), 4), TypeError, r"x: expected dtype"),
        ("round_up", "value", lambda: ops.round_up(bins, 0), ValueError, r"value: expected an int >= 1"),
        ("round_up", "value past dtype", lambda: ops.round_up(bins, 2**31), ValueError, r"value: expected an int <= 2147483647"),
        ("round_up", "value past int16", lambda: ops.round_up(bins.short(), 2**15), ValueError, r"value: expected an int <= 32767"),
        ("round_up", "int32 overflow", lambda: ops.round_up(_huge(BIG, dtype=torch.int32), 4), ValueError, r"x: 2147483648 elements"),
        ("routing_metadata", "top_k ids >= E", lambda: ops.routing_metadata(top, 2, B), ValueError, r"top_experts_TK: expected values in \[0, 2\)"),
        ("routing_metadata", "int32 overflow", lambda: ops.routing_metadata(_huge(BIG, dtype=torch.int32), E, B), ValueError, r"top_experts_TK: 2147483648"),
        ("padded_rows_bound", "negative", lambda: ops.padded_rows_bound(-1, E, B), ValueError, r"num_rows: expected an int >= 0"),
        # gather / scatter family
        ("gather", "rank", lambda: ops.gather(x[None], idx, bid, bins, K), ValueError, r"x: expected a 2-D tensor"),
        ("gather", "dtype", lambda: ops.gather(x.int(), idx, bid, bins, K), TypeError, r"x: expected dtype in \(float32"),
        ("gather", "index dtype", lambda: ops.gather(x, idx.float(), bid, bins, K), TypeError, r"indices: expected dtype in \(int32"),
        ("gather", "device", lambda: ops.gather(meta, idx, bid, bins, K), ValueError, r"indices: expected a tensor on meta"),
        ("gather", "top_k", lambda: ops.gather(x, idx, bid, bins, 0), ValueError, r"top_k: expected an int >= 1"),
        ("gather", "top_k not dividing N", lambda: ops.gather(x, idx, bid, bins, 3), ValueError, r"indices: expected a multiple of top_k=3"),
        ("gather", "rows", lambda: ops.gather(x[:-1], idx, bid, bins, K), ValueError, r"x: expected 5 rows"),
        ("gather", "index values", lambda: ops.gather(x, idx + 100, bid, bins, K), ValueError, r"indices: expected values in \[0, 10\)"),
        ("gather", "int32 overflow (H)", lambda: ops.gather(_huge(T, BIG), idx, bid, bins, K), ValueError, r"x.shape\[-1\]: 2147483648 exceeds"),
        ("scatter", "weights size", lambda: ops.scatter(_x(T * K), idx, bid, _x(1, 3)[0], bins, K), ValueError, r"weights: expected 10 elements"),
        ("scatter", "weights dtype", lambda: ops.scatter(_x(T * K), idx, bid, idx, bins, K), TypeError, r"weights: expected dtype in \(float32"),
        ("scatter", "bin_ids values", lambda: ops.scatter(_x(T * K), idx, bid + E, None, bins, K), ValueError, r"bin_ids: expected values in \[0, 3\)"),
        ("padded_gather", "padded_bins size", lambda: ops.padded_gather(x, idx, bid, bins, pbins[:-1], K), ValueError, r"padded_bins: expected 3 elements"),
        ("padded_gather", "int32 overflow (rows)", lambda: ops.padded_gather(x, idx, bid, bins, pbins, K, block_size=2**30), ValueError, r"padded rows: \d+ exceeds"),
        ("padded_scatter", "padded_bins past x", lambda: ops.padded_scatter(_x(2), idx, bid, None, bins, pbins, K), ValueError, r"padded_bins: expected values in \[0, 3\)"),
        ("binned_gather", "bin_size", lambda: ops.binned_gather(x, idx, bins, -1, K), ValueError, r"bin_size: expected an int >= 0"),
        ("binned_gather", "int32 overflow (E·C)", lambda: ops.binned_gather(x, idx, bins, 2**30, K), ValueError, r"number of experts × bin_size: 3221225472"),
        ("binned_scatter", "rank", lambda: ops.binned_scatter(_x(E * 4), idx, None, bins, K), ValueError, r"x: expected a 3-D tensor"),
        ("binned_scatter", "experts", lambda: ops.binned_scatter(_x(8).view(2, 4, H), idx, None, bins, K), ValueError, r"x: expected 3 rows \(E"),
        # topology
        ("make_topology", "block_size", lambda: ops.make_topology(pbins, block_size=48, num_block_rows=4, ffn_hidden_size=F, dtype=torch.float32), ValueError, r"block_size: expected one of"),
        ("make_topology", "padded_bins rank", lambda: ops.make_topology(pbins[None], block_size=B, num_block_rows=4, ffn_hidden_size=F, dtype=torch.float32), ValueError, r"padded_bins: expected a 1-D tensor"),
        ("make_topology", "padded_bins values", lambda: ops.make_topology(pbins + 1, block_size=B, num_block_rows=4, ffn_hidden_size=F, dtype=torch.float32), ValueError, r"padded_bins: expected non-decreasing multiples"),
        ("make_topology", "dtype", lambda: ops.make_topology(pbins, block_size=B, num_block_rows=4, ffn_hidden_size=F, dtype="fp32"), TypeError, r"dtype: expected a torch.dtype"),
        ("make_topology", "int32 overflow (rows)", lambda: ops.make_topology(pbins, block_size=128, num_block_rows=2**24, ffn_hidden_size=F, dtype=torch.float32), ValueError, r"num_block_rows \* block_size \(rows\): 2147483648"),
        ("make_topology", "int32 overflow (columns)", lambda: ops.make_topology(pbins, block_size=128, num_block_rows=1, ffn_hidden_size=2**30, dtype=torch.float32), ValueError, r"\(columns\): 3221225472 exceeds"),
        ("topology", "int32 overflow (slots)", lambda: ops.topology(pbins[:1], 16, 2**26, 2**6), ValueError, r"block slots exceed the int32 index range"),
        # block-sparse products
        ("sdd", "rank", lambda: ops.sdd(xp[None], w1.t(), topo), ValueError, r"a: expected a 2-D tensor"),
        ("sdd", "dtype mix", lambda: ops.sdd(xp, w1.t().half(), topo), TypeError, r"b: expected dtype float32"),
        ("sdd", "rows", lambda: ops.sdd(xp[:-1], w1.t(), topo), ValueError, r"a: expected rows \(the topology's rows\) 48, got 47"),
        ("sdd", "transposed topology", lambda: ops.sdd(xp, w1.t(), topo.t()), ValueError, r"topo: expected a non-transposed"),
        ("sdd", "topology type", lambda: ops.sdd(xp, w1.t(), xp), TypeError, r"topo: expected an stk.Matrix"),
        ("sdd", "device", lambda: ops.sdd(torch.empty(rows, H, device="meta"), w1.t(), topo), ValueError, r"on meta|device"),
        ("dsd", "not a matrix", lambda: ops.dsd(h.data, w1), TypeError, r"a: expected an stk.Matrix"),
        ("dsd", "dtype", lambda: ops.dsd(h, w1.half()), TypeError, r"b: expected dtype float32"),
        ("dds", "dtype", lambda: ops.dds(_x(2, rows).int(), h), TypeError, r"a: expected dtype in \(float32"),
        ("dds", "columns", lambda: ops.dds(_x(2, rows + 1), h), ValueError, r"a"),
        # grouped GEMM
        ("gmm", "rank", lambda: ops.gmm(a[None], b, bs, backend="triton"), ValueError, r"a: expected a 2-D tensor"),
        ("gmm", "dtype mix", lambda: ops.gmm(a, b.half(), bs, backend="triton"), TypeError, r"b: expected dtype in|b: expected the dtype of a"),
        ("gmm", "batch_sizes dtype", lambda: ops.gmm(a, b, bs.float(), backend="triton"), TypeError, r"batch_sizes: expected dtype in \(int32"),
        ("gmm", "batch_sizes sum", lambda: ops.gmm(a, b, bs - 1, backend="triton"), ValueError, r"batch_sizes: expected non-negative sizes summing to 6"),
        ("gmm", "groups", lambda: ops.gmm(a, b, bs[:1], backend="triton"), ValueError, r"batch_sizes: expected 2 entries"),
        ("gmm", "backend", lambda: ops.gmm(a, b, bs, backend="cutlass"), ValueError, r"backend: expected one of"),
        ("gmm", "device", lambda: ops.gmm(a, b.to("meta"), bs, backend="triton"), ValueError, r"b: expected a tensor on"),
        ("gmm", "int32 overflow (K)", lambda: ops.gmm(_huge(2, 2**24), _huge(1, 2**24, 1), torch.tensor([2]), backend="triton"), ValueError, r"a: 256 times its columns \(K\)"),
        # FP8 products and quantizers: batch sizes past the rows or negative would drop rows or
        # read another group's (rows past the groups' total are allowed: zeros, or left unset)
        ("gmm_fp8", "batch_sizes past M", lambda: fp8.gmm_fp8(xq, xs, wq, ws, fbs + 1), ValueError, r"batch_sizes: expected non-negative sizes summing to at most 6 \(the rows of x_q\), got min 3, sum 8"),
        ("gmm_fp8", "negative batch size", lambda: fp8.gmm_fp8(xq, xs, wq, ws, torch.tensor([7, -1], device=DEVICE)), ValueError, r"got min -1, sum 6"),
        ("gmm_fp8", "scales", lambda: fp8.gmm_fp8(xq, xs[:, :1], wq, ws, fbs), ValueError, r"x_s: expected \[M, ceil\(K/128\)\] = \(6, 2\)"),
        ("quantize_cols_grouped", "batch_sizes past M", lambda: fp8.quantize_cols_grouped(xf, fbs + 1), ValueError, r"summing to at most 6 \(the rows of x\), got min 3, sum 8"),
        ("quantize_rows_and_cols", "negative batch size", lambda: fp8.quantize_rows_and_cols(xf, torch.tensor([7, -1], device=DEVICE)), ValueError, r"summing to at most 6 \(the rows of x\), got min -1"),
        ("gather_quantize_cols", "batch_sizes past N", lambda: fp8.gather_quantize_cols(xf, torch.arange(12, device=DEVICE), 2, torch.tensor([10, 3], device=DEVICE)), ValueError, r"summing to at most 12 \(the routed rows, T \* top_k\)"),
        ("gmm_fp8_wgrad", "batch_sizes past M", lambda: fp8.gmm_fp8_wgrad(cq, cs, cq, cs, fbs + 1), ValueError, r"summing to at most 6 \(the rows of a_q\)"),
        ("dequantize_rows", "scales", lambda: fp8.dequantize_rows(xq, xs[:1]), ValueError, r"s: expected \[M, ceil\(K/128\)\] = \(6, 2\) scales of q \(6, 200\), got \(1, 2\)"),
        ("dequantize_blocks", "scales", lambda: fp8.dequantize_blocks(wq, ws[:1]), ValueError, r"s: expected \[E, ceil\(N/128\), ceil\(K/128\)\] = \(2, 1, 2\)"),
        ("dequantize_cols_grouped", "scales", lambda: fp8.dequantize_cols_grouped(cq, cs[:1], fbs), ValueError, r"s: expected \[ceil\(M/128\) \+ E, K\] = \(3, 200\)"),
        # replicate
        ("replicate", "bins dtype", lambda: ops.replicate(_x(2, 3), torch.ones(3), 3), TypeError, r"bins: expected dtype in \(int32"),
        ("replicate", "bins size", lambda: ops.replicate(_x(2, 3), bins[:2], 3), ValueError, r"bins: expected one entry per column"),
        ("replicate", "bins decreasing", lambda: ops.replicate(_x(2, 3), torch.tensor([3, 1, 3], device=DEVICE), 3), ValueError, r"bins: expected non-negative, non-decreasing"),
        ("replicate", "int32 overflow", lambda: ops.replicate(_x(2, 3), bins, BIG), ValueError, r"num_outputs: expected an int <= 2147483647"),
        # inference API
        ("fused_moe", "topk > E", lambda: fused_moe(hs, fw1, fw2, go, E + 1, True), ValueError, r"topk: expected an int <= 3"),
        ("fused_moe", "rank", lambda: fused_moe(hs[None], fw1, fw2, go, K, True), ValueError, r"hidden_states: expected a 2-D tensor"),
        ("fused_moe", "dtype mix", lambda: fused_moe(hs, fw1.half(), fw2, go, K, True), TypeError, r"w1: expected dtype in \(float32\)"),
        ("fused_moe", "gating shape", lambda: fused_moe(hs, fw1, fw2, go[:, :2], K, True), ValueError, r"gating_output: expected shape \(5, 3\)"),
        ("fused_moe", "device", lambda: fused_moe(hs, fw1, fw2, go.to("meta"), K, True), ValueError, r"gating_output: expected a tensor on"),
        # layers
        ("dMoE", "top_k > E", lambda: dMoE(make_args("triton", moe_top_k=5)), ValueError, r"moe_top_k: expected at most moe_num_experts=4"),
        ("dMoE", "hidden size", lambda: dMoE(make_args("triton"))(_x(T, 41)), ValueError, r"x: expected shape \[\.\.\., hidden_size=40\]"),
        ("dMoE", "dtype", lambda: dMoE(make_args("triton"))(_x(T, 40).half()), TypeError, r"x: expected dtype torch.float32"),
        ("dMoE", "device", lambda: dMoE(make_args("triton"))(torch.empty(T, 40, device="meta")), ValueError, r"x: expected a tensor on"),
        ("MoE", "dtype", lambda: MoE(make_args("triton"))(_x(T, 40).int()), TypeError, r"x: expected a floating-point tensor"),
    ]
    return cases


REFUSALS = _refusals()


@pytest.mark.parametrize("case", REFUSALS, ids=[f"{c[0]}-{c[1]}" for c in REFUSALS])
def test_refused(case, monkeypatch):
    # Value checks run on CUDA tensors only when asked for (they would cost a host sync).
    monkeypatch.setenv("MEGABLOCKS_CHECK_VALUES", "1")
    _, _, fn, exc, match = case
    with pytest.raises(exc, match=match):
        fn()


# --------------------------------------------------------------------------------------------------
# Accepted: non-contiguous inputs are handled (same result as their contiguous copy).


def _non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """A non-contiguous view with t's values (the transpose of a transposed copy)."""
    if t.dim() == 1:
        out = torch.stack([t, t], dim=1)[:, 0]
    else:
        out = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not out.is_contiguous() or t.numel() <= 1
    return out


def test_non_contiguous_accepted():
    top, m = _routing()
    idx, bid, bins, pbins = m.indices, m.bin_ids, m.bins, m.padded_bins
    nc = _non_contiguous
    x, w = _x(T), _x(1, T * K)[0]
    assert_equal("routing_metadata", torch.stack(ops.routing_metadata(nc(top), E, B)[:2]),
                 torch.stack(m[:2]))
    assert_equal("histogram", ops.histogram(nc(top.flatten()), E), m.tokens_per_expert)
    assert_equal("sort", ops.sort(nc(top.flatten()), 2)[1], ops.sort(top.flatten(), 2)[1])
    assert_equal("gather", ops.gather(nc(x), nc(idx), nc(bid), nc(bins), K), ops.gather(x, idx, bid, bins, K))
    xn = _x(T * K)
    assert_equal("scatter", ops.scatter(nc(xn), nc(idx), bid, nc(w), bins, K), ops.scatter(xn, idx, bid, w, bins, K))
    assert_equal("padded_gather", ops.padded_gather(nc(x), idx, bid, bins, nc(pbins), K, block_size=B),
                 ops.padded_gather(x, idx, bid, bins, pbins, K, block_size=B))
    rows, topo = _topology(m)
    xp = _x(rows)
    assert_equal("padded_scatter", ops.padded_scatter(nc(xp), idx, bid, w, bins, pbins, K),
                 ops.padded_scatter(xp, idx, bid, w, bins, pbins, K))
    xb = _x(E * 4).view(E, 4, H)
    assert_equal("binned_scatter", ops.binned_scatter(nc(xb), idx, w, bins, K), ops.binned_scatter(xb, idx, w, bins, K))
    w1 = _x(E * F)
    h = ops.sdd(xp, w1.t(), topo)
    assert_close("sdd", ops.sdd(nc(xp), nc(w1.t().contiguous()), topo).data, h.data)
    assert_close("dsd", ops.dsd(h, nc(w1)), ops.dsd(h, w1))
    a, b, bs = _x(6, 4), _x(8, 3).view(2, 4, 3), torch.tensor([2, 4], device=DEVICE)
    assert_close("gmm", ops.gmm(nc(a), nc(b), bs, backend="triton"), ops.gmm(a, b, bs, backend="triton"))
    assert_equal("replicate", ops.replicate(nc(_x(2, E)), nc(bins), 6), ops.replicate(_x(2, E), bins, 6))
    hs, fw1, fw2, go = _x(T), _x(E * 12, H).view(E, 12, H), _x(E * H, 6).view(E, H, 6), _x(T, E)
    assert_close("fused_moe", fused_moe(nc(hs), nc(fw1), nc(fw2), nc(go), K, True, path="grouped"),
                 fused_moe(hs, fw1, fw2, go, K, True, path="grouped"))
    layer = dMoE(make_args("sparse"))
    x40 = _x(T, 40)
    assert_close("dMoE", layer(nc(x40)), layer(x40))


# --------------------------------------------------------------------------------------------------
# NaN and Inf propagate as values: the poisoned token's outputs only, never an exception.


def _check_poisoned_rows(name, out, bad_rows):
    out = out.detach().cpu()
    bad = ~torch.isfinite(out).all(dim=-1)
    expected = torch.zeros(out.shape[0], dtype=torch.bool)
    expected[bad_rows] = True
    assert_equal(f"{name}: rows with NaN/Inf", bad, expected)


def test_nan_inf_propagate():
    top, m = _routing()
    idx, bid, bins, pbins = m.indices, m.bin_ids, m.bins, m.padded_bins
    x = _x(T)
    x[1, 2], x[3, 0] = float("nan"), float("inf")
    pos = torch.argsort(idx.long().cpu())  # sorted position of each assignment
    bad_sorted = sorted(int(pos[t * K + k]) for t in (1, 3) for k in range(K))
    _check_poisoned_rows("gather", ops.gather(x, idx, bid, bins, K), bad_sorted)
    _check_poisoned_rows("scatter", ops.scatter(ops.gather(x, idx, bid, bins, K), idx, bid, None, bins, K), [1, 3])
    xp = ops.padded_gather(x, idx, bid, bins, pbins, K, block_size=B)
    _check_poisoned_rows("padded_scatter", ops.padded_scatter(xp, idx, bid, None, bins, pbins, K), [1, 3])
    rows, topo = _topology(m)
    w1 = _x(E * F)
    y = ops.dsd(ops.sdd(xp, w1.t(), topo), w1)
    _check_poisoned_rows("sdd+dsd", ops.padded_scatter(y, idx, bid, None, bins, pbins, K), [1, 3])
    a, b, bs = _x(6, 4), _x(8, 3).view(2, 4, 3), torch.tensor([2, 4], device=DEVICE)
    a[4, 1] = float("nan")
    _check_poisoned_rows("gmm", ops.gmm(a, b, bs, backend="triton"), [4])
    hs, fw1, fw2, go = _x(T), _x(E * 12, H).view(E, 12, H), _x(E * H, 6).view(E, H, 6), _x(T, E)
    hs[2, 0] = float("inf")
    go[0, 1] = float("nan")  # a NaN router logit: that token's weights are NaN
    for path in ("grouped", "gather"):
        _check_poisoned_rows(f"fused_moe {path}", fused_moe(hs, fw1, fw2, go, K, True, path=path), [0, 2])
    for impl in ("sparse", "triton", "torch"):
        layer = dMoE(make_args(impl))
        x40 = _x(T, 40).requires_grad_(True)
        with torch.no_grad():
            x40[1, 3], x40[4, 0] = float("nan"), float("-inf")
        out = layer(x40)
        _check_poisoned_rows(f"dMoE {impl}", out, [1, 4])
        out.sum().backward()  # the backward runs through the poisoned rows without an error
    layer = MoE(make_args("triton", moe_capacity_factor=4))
    x40 = _x(T, 40)
    x40[2, 5] = float("nan")
    _check_poisoned_rows("MoE", layer(x40), [2])


# --------------------------------------------------------------------------------------------------
# T = 0: empty outputs, empty or zero gradients.


def test_zero_tokens():
    top, m = _routing(tokens=0)
    idx, bid, bins, pbins = m.indices, m.bin_ids, m.bins, m.padded_bins
    assert_equal("tokens_per_expert", m.tokens_per_expert, torch.zeros(E, dtype=torch.int32, device=DEVICE))
    assert_equal("padded_bins", pbins, torch.zeros(E, dtype=torch.int32, device=DEVICE))
    assert ops.sort(top.flatten(), 2)[0].numel() == 0
    assert ops.inclusive_cumsum(top.flatten(), 0).numel() == 0
    x = _x(0).requires_grad_(True)
    w = _x(1, 0)[0].requires_grad_(True)
    for name, out in [
        ("gather", ops.gather(x, idx, bid, bins, K)),
        ("scatter", ops.scatter(ops.gather(x, idx, bid, bins, K), idx, bid, w, bins, K)),
        ("padded_gather", ops.padded_gather(x, idx, bid, bins, pbins, K, block_size=B)),
        ("binned_gather", ops.binned_gather(x, idx, bins, 4, K)),
    ]:
        out.float().sum().backward()
        if name == "padded_gather":
            assert_equal(f"{name} out", out, torch.zeros(ops.padded_rows_bound(0, E, B), H, device=DEVICE))
        elif name == "binned_gather":
            assert_equal(f"{name} out", out, torch.zeros(E, 4, H, device=DEVICE))
        else:
            assert out.shape[0] == 0, name
    assert x.grad.shape == (0, H) and w.grad.shape == (0,)
    rows, topo = _topology(m, tokens=0)
    xp = _x(rows).requires_grad_(True)
    w1 = _x(E * F).requires_grad_(True)
    y = ops.dsd(ops.sdd(xp, w1.t(), topo), w1)
    assert_equal("sdd+dsd out", y, torch.zeros(rows, H, device=DEVICE))
    y.sum().backward()
    assert_equal("sdd+dsd grad w1", w1.grad, torch.zeros_like(w1))
    a = _x(0, 4).requires_grad_(True)
    b = _x(8, 3).view(2, 4, 3).requires_grad_(True)
    out = ops.gmm(a, b, torch.zeros(2, dtype=torch.int32, device=DEVICE), backend="triton")
    out.sum().backward()
    assert out.shape == (0, 3) and a.grad.shape == (0, 4)
    assert_equal("gmm grad b", b.grad, torch.zeros_like(b))
    fw1, fw2 = _x(E * 12, H).view(E, 12, H), _x(E * H, 6).view(E, H, 6)
    for path in ("grouped", "gather"):
        assert fused_moe(_x(0), fw1, fw2, _x(0, E), K, True, path=path).shape == (0, H)
    assert ops.replicate(_x(0, E), bins, 4).shape == (0, 4)


def test_round_up_has_no_intermediate_overflow():
    """Regression: round_up computed x + value - 1 first, which wrapped although the result fits
    (int16 [32766, 7] rounded up to 32767 gave [-32767, -32767]); a value past the dtype wrapped or
    raised a RuntimeError/OverflowError instead of a ValueError (now refused, see REFUSALS)."""
    x = torch.tensor([2**31 - 5, 2**31 - 4, 0, 1, -5], dtype=torch.int32, device=DEVICE)
    assert_equal("round_up", ops.round_up(x, 4),
                 torch.tensor([2**31 - 4, 2**31 - 4, 0, 4, -4], dtype=torch.int32, device=DEVICE))
    x16 = torch.tensor([32766, 7], dtype=torch.int16, device=DEVICE)
    assert_equal("round_up int16", ops.round_up(x16, 32767), torch.tensor([32767, 32767], dtype=torch.int16,
                                                                          device=DEVICE))
