"""MegaBlocks 0.10's public modules exist with its names: the per-op modules, grouped_gemm_util,
layers.gelu and benchmark_util, each checked against a plain reference of MegaBlocks' semantics."""

import importlib
import subprocess
import sys

import pytest
import stk
import torch
import torch.nn.functional as F

import megablocks.ops as ops
from megablocks import benchmark_util
from megablocks import grouped_gemm_util as gg
from megablocks.layers import gelu
from megablocks.ops.gmm import gmm_reference
from tests.utils import assert_close, assert_equal

PER_OP = {
    "binned_gather": ["binned_gather"], "binned_scatter": ["binned_scatter"],
    "cumsum": ["exclusive_cumsum", "inclusive_cumsum"], "gather": ["gather"], "histogram": ["histogram"],
    "padded_gather": ["padded_gather"], "padded_scatter": ["padded_scatter"], "repeat": ["repeat"],
    "replicate": ["replicate"], "round_up": ["round_up"], "scatter": ["scatter"], "sort": ["sort"],
    "sum": ["sum"], "topology": ["topology"],
}


@pytest.mark.parametrize("module", sorted(PER_OP))
def test_every_per_op_module_exports_the_op(module):
    mod = importlib.import_module(f"megablocks.ops.{module}")
    for name in PER_OP[module]:
        fn = getattr(mod, name)
        assert callable(fn) and getattr(ops, name) is fn, name


def test_importing_a_per_op_module_leaves_the_package_function():
    """`import megablocks.ops.sort` in a fresh process must not rebind `megablocks.ops.sort`."""
    code = ("import megablocks.ops as o, megablocks.ops.sort, megablocks.ops.sum, megablocks.ops.histogram, "
            "megablocks.ops.topology, megablocks.ops.replicate; "
            "assert all(callable(f) and not hasattr(f, '__path__') and type(f).__name__ == 'function' "
            "for f in (o.sort, o.sum, o.histogram, o.topology, o.replicate))")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cumsum_and_round_up_semantics():
    x = torch.tensor([3, 0, 5, 2], dtype=torch.int32)
    assert_equal("inclusive", ops.inclusive_cumsum(x, 0), torch.tensor([3, 3, 8, 10], dtype=torch.int32))
    assert_equal("exclusive", ops.exclusive_cumsum(x, 0), torch.tensor([0, 3, 3, 8], dtype=torch.int32))
    assert_equal("round_up", ops.round_up(x, 4), torch.tensor([4, 0, 8, 4], dtype=torch.int32))


def test_grouped_gemm_util(device):
    assert gg.grouped_gemm_is_available() == (importlib.util.find_spec("grouped_gemm") is not None)
    if not gg.grouped_gemm_is_available():
        with pytest.raises(AssertionError, match="pip install megablocks"):
            gg.assert_grouped_gemm_is_available()
        # Without the package, gg.ops.gmm / gg.backend.gmm are this library's grouped GEMM.
        a = torch.randn(9, 16, device=device, requires_grad=True)
        b = torch.randn(3, 8, 16, device=device, requires_grad=True)
        sizes = torch.tensor([4, 0, 5])
        out = gg.ops.gmm(a, b, sizes, trans_b=True)
        ref = gmm_reference(a.detach().double(), b.detach().double(), sizes, trans_b=True)
        assert_close("gg.ops.gmm", out, ref, torch.float32)
        out.sum().backward()
        a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
        torch.cat([a64[:4] @ b64[0].t(), a64[4:] @ b64[2].t()]).sum().backward()
        assert_close("gg.ops.gmm d_a", a.grad, a64.grad, torch.float32)
        assert_close("gg.ops.gmm d_b", b.grad, b64.grad, torch.float32)
        c = torch.empty(9, 8, device=device)
        assert gg.backend.gmm(a.detach(), b.detach(), sizes, trans_b=True, c=c) is c
        assert_close("gg.backend.gmm", c, ref, torch.float32)


def _matrix(device, dtype=torch.float32):
    blocks = 3
    data = torch.randn(blocks, 16, 16, device=device, dtype=dtype)
    idx = torch.tensor([0, 1, 1], dtype=torch.int32, device=device)
    cols = torch.tensor([0, 1, 0], dtype=torch.int32, device=device)
    offsets = torch.tensor([0, 2, 3], dtype=torch.int32, device=device)
    return stk.Matrix((32, 32), data, idx, cols, offsets)


def test_gelu_on_blocks_and_its_backward(device):
    x = _matrix(device)
    y = gelu.gelu(x)
    assert isinstance(y, stk.Matrix) and y.size() == x.size() and y.row_indices is x.row_indices
    assert_close("gelu", y.data, F.gelu(x.data.double(), approximate="tanh"), torch.float32)
    g = _matrix(device)
    x64 = x.data.double().requires_grad_()
    F.gelu(x64, approximate="tanh").backward(g.data.double())
    want = x64.grad.clone()
    out = gelu.gelu_backward_(g, x)
    assert isinstance(out, stk.Matrix) and out.data.data_ptr() == g.data.data_ptr(), "in place"
    assert_close("gelu_backward_ (blocks)", out.data, want, torch.float32)
    t_grad, t_x = torch.randn(5, 7, device=device), torch.randn(5, 7, device=device)
    x64 = t_x.double().requires_grad_()
    F.gelu(x64, approximate="tanh").backward(t_grad.double())
    assert_close("gelu_backward_ (tensor)", gelu.gelu_backward_(t_grad, t_x), x64.grad, torch.float32)
    with pytest.raises(TypeError, match="expected an stk.Matrix"):
        gelu.gelu(torch.randn(2, 2))
    with pytest.raises(ValueError, match="one shape"):
        gelu.gelu_backward_(torch.randn(2, 2), torch.randn(2, 3))


def test_benchmark_util(capsys):
    calls = []
    mean, std = benchmark_util.benchmark_function(lambda: calls.append(1), iterations=5, warmup=2)
    assert len(calls) == 7 and mean >= 0 and std >= 0
    benchmark_util.log_benchmark("gmm", {"E": 8}, 1.5, 0.25)
    printed = capsys.readouterr().out
    assert "gmm Benchmark" in printed and "E = 8" in printed and "mean time = 1.500ms, std time = 0.250ms" in printed


def test_megablocks_ops_extension_module(device):
    """`megablocks_ops` (MegaBlocks 0.10's compiled module, by name) writes MegaBlocks' results into
    the tensors it is handed."""
    import megablocks_ops as mo

    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 50, (3, 7), generator=g, dtype=torch.int32).to(device)
    out = torch.empty_like(x)
    mo.exclusive_cumsum(x, 1, out)
    assert_equal("exclusive", out, torch.cumsum(x, 1).to(torch.int32) - x)
    mo.inclusive_cumsum(x, 0, out)
    assert_equal("inclusive", out, torch.cumsum(x, 0).to(torch.int32))

    ids = torch.randint(0, 6, (2, 40), generator=g, dtype=torch.int32).to(device)
    counts = mo.histogram(ids, 6)
    want = torch.stack([torch.bincount(r.long(), minlength=6) for r in ids.cpu()]).to(torch.int32)
    assert counts.dtype == torch.int32
    assert_equal("histogram", counts.cpu(), want)

    flat = ids[0].clone()
    vals, order = torch.empty_like(flat), torch.empty_like(flat)
    mo.sort(flat, 3, vals, order)
    want_vals, want_order = torch.sort(flat.cpu().long(), stable=True)
    assert_equal("sort values", vals.cpu(), want_vals.to(torch.int32))
    assert_equal("sort order", order.cpu(), want_order.to(torch.int32))

    bins = torch.tensor([2, 2, 5, 9], dtype=torch.int32, device=device)  # expert 1 empty
    xr = torch.randn(4, 4, generator=g).to(device)
    rep = torch.empty(4, 9, device=device)
    mo.replicate_forward(xr, bins, rep)
    src = torch.tensor([0, 0, 2, 2, 2, 3, 3, 3, 3])
    assert_equal("replicate_forward", rep.cpu(), xr.cpu()[:, src])
    grad = torch.randn(4, 9, generator=g).to(device)
    back = torch.empty(4, 4, device=device)
    mo.replicate_backward(grad, bins, back)
    want_back = torch.zeros(4, 4).index_add_(1, src, grad.cpu())
    assert_close("replicate_backward", back.cpu(), want_back, torch.float32)

    padded_bins = torch.tensor([128, 128, 384], dtype=torch.int32, device=device)
    cols = torch.empty(4 * 2, dtype=torch.int16, device=device)
    mo.indices(padded_bins, 128, 4, 2, cols)
    # Block rows 0 (expert 0), 1-2 (expert 2), 3 (padding: the last expert); 2 columns each.
    assert cols.cpu().tolist() == [0, 1, 4, 5, 4, 5, 4, 5]

    with pytest.raises(ValueError, match="expected an output of"):
        mo.exclusive_cumsum(x, 1, torch.empty(5, device=device, dtype=torch.int32))
