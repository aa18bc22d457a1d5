"""Gradient-accumulation fusion: `weight_grad_into` and the variable-K kernel's `accumulate_into`.

The weight gradient of a grouped GEMM is added into an fp32 accumulator (a parameter's
`main_grad`) instead of coming back as `.grad`. Checked against float64 references on fresh random
inputs over two micro-batches: the accumulator holds its start values plus both gradients at the
fp32 limits whatever the inputs' dtype (a gradient rounded to 16 bits on its way would fail them),
the weight's own `.grad` stays None, and the input's gradient is bitwise that of the plain product.
"""

import pytest
import torch

from megablocks.backend import gmm as gmm_backend
from megablocks.ops.gmm import gmm, gmm_gathered, gmm_reference, gmm_shared_input, weight_grad_into
from tests.conftest import FLOAT_DTYPES
from tests.ops.test_gmm_gathered import CASES, _expected, _setup
from tests.utils import assert_close, assert_equal


def _product(x, b, counts, maps, token_of_row, trans_b, backend, gathered):
    """(out, a): the product with b detached and the `a` weight_grad_into takes for it."""
    if gathered:
        return gmm_gathered(x, b.detach(), counts, maps, trans_b=trans_b, backend=backend), x
    rows = x[token_of_row.to(x.device)]
    return gmm(rows, b.detach(), counts, trans_b=trans_b, backend=backend), rows


# Every routing case once with the in-kernel row map and once with explicit rows; dtypes and
# trans_b rotate over the cases so that each meets both.
PARAMS = [(case, gathered, FLOAT_DTYPES[i % len(FLOAT_DTYPES)], bool(i % 2))
          for i, case in enumerate(CASES) for gathered in (True, False)]


@pytest.mark.parametrize("case,gathered,dtype,trans_b", PARAMS)
def test_weight_grad_accumulates_in_fp32(case, gathered, dtype, trans_b, device):
    x, (b,), counts, maps, token_of_row = _setup(case, dtype, device, trans_b)
    x.requires_grad_()
    b.requires_grad_()
    start = torch.randn(b.shape, device=device)
    acc = start.clone()
    want_acc, want_dx = start.double().cpu(), torch.zeros(x.shape, dtype=torch.float64)
    for _ in range(2):  # two micro-batches
        x.grad = None
        out, a = _product(x, b, counts, maps, token_of_row, trans_b, "triton", gathered)
        out = weight_grad_into(out, a, b, acc, counts, maps if gathered else None, trans_b=trans_b, backend="triton")
        d_out = torch.randn_like(out)
        out.backward(d_out)
        (ref,), d_x, (d_b,) = _expected(x, [b], counts, token_of_row, trans_b, [d_out])
        assert_close("out", out, ref, dtype)
        assert_close("d_x", x.grad, d_x, dtype)
        want_acc = want_acc + d_b
    assert b.grad is None, "the weight's gradient went to the accumulator, not .grad"
    assert acc.dtype == torch.float32
    assert_close("acc", acc, want_acc, torch.float32)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_input_gradient_and_values_equal_the_plain_product(backend, device):
    """Against gmm with autograd on the weight: x's gradient bitwise equal, the accumulator's
    increment equal to `.grad` (fp32 inputs; the 'torch' backend adds the computed gradient)."""
    x, (b,), counts, maps, token_of_row = _setup("unaligned", torch.float32, device, True)
    acc = torch.zeros(b.shape, device=device)
    x1 = x.clone().requires_grad_()
    b1 = b.clone().requires_grad_()
    out = weight_grad_into(gmm_gathered(x1, b1.detach(), counts, maps, trans_b=True, backend=backend), x1, b1, acc,
                           counts, maps, trans_b=True, backend=backend)
    d_out = torch.randn_like(out)
    out.backward(d_out)
    x2 = x.clone().requires_grad_()
    b2 = b.clone().requires_grad_()
    gmm_gathered(x2, b2, counts, maps, trans_b=True, backend=backend).backward(d_out)
    assert_equal("d_x", x1.grad, x2.grad)
    assert_close("acc", acc, b2.grad, torch.float32)
    assert b1.grad is None


def test_shared_input_pair_and_no_input_gradient(device):
    """Both outputs of a shared-input pair, with x not requiring grad: the weights' gradients still
    reach their accumulators (b keeps the graph connected)."""
    x, (b1, b2), counts, maps, token_of_row = _setup("empty_experts", torch.float16, device, True, num_b=2)
    rows = x[token_of_row.to(device)]
    b1.requires_grad_()
    b2.requires_grad_()
    acc1, acc2 = (torch.zeros(b1.shape, device=device) for _ in range(2))
    h1, h2 = gmm_shared_input(rows, b1.detach(), b2.detach(), counts, trans_b=True, backend="triton")
    h1 = weight_grad_into(h1, rows, b1, acc1, counts, trans_b=True, backend="triton")
    h2 = weight_grad_into(h2, rows, b2, acc2, counts, trans_b=True, backend="triton")
    assert h1.requires_grad and h2.requires_grad
    d1, d2 = torch.randn_like(h1), torch.randn_like(h2)
    torch.autograd.backward([h1, h2], [d1, d2])
    for name, acc, d in (("acc1", acc1, d1), ("acc2", acc2, d2)):
        want = gmm_reference(d.double(), rows.double(), counts.cpu(), trans_a=True)
        assert_close(name, acc, want, torch.float32)


def test_without_autograd_nothing_is_added(device):
    x, (b,), counts, _, token_of_row = _setup("unaligned", torch.float32, device, False)
    rows = x[token_of_row.to(device)]
    acc = torch.zeros(b.shape, device=device)
    with torch.no_grad():
        out = gmm(rows, b, counts)
        assert weight_grad_into(out, rows, b.requires_grad_(), acc, counts) is out
    assert not acc.any()


def test_variable_k_accumulate_into_kernel(device):
    """The kernel form directly: fp32 accumulator over 16-bit inputs, empty groups left as they were."""
    sizes = [5, 0, 9, 3]
    K, N = 37, 45
    counts = torch.tensor(sizes, dtype=torch.int32, device=device)
    a = torch.randn(sum(sizes), K, device=device, dtype=torch.float16)
    g = torch.randn(sum(sizes), N, device=device, dtype=torch.float16)
    start = torch.randn(len(sizes), K, N, device=device)
    acc = start.clone()
    assert gmm_backend.triton_gmm(a, g, counts, trans_a=True, accumulate_into=acc) is acc
    want = start.double().cpu() + gmm_reference(a.double().cpu(), g.double().cpu(), counts.cpu(), trans_a=True)
    assert_close("acc", acc, want, torch.float32)
    assert torch.equal(acc[1], start[1]), "a group without rows adds nothing"


def test_bad_arguments(device):
    x, (b,), counts, maps, token_of_row = _setup("unaligned", torch.float32, device, True)
    rows = x[token_of_row.to(device)]
    out = gmm(rows, b, counts, trans_b=True)
    good = torch.zeros(b.shape, device=device)
    with pytest.raises(TypeError, match="acc"):
        weight_grad_into(out, rows, b, good.half(), counts, trans_b=True)
    with pytest.raises(ValueError, match="acc: expected a contiguous float32 tensor of b's shape"):
        weight_grad_into(out, rows, b, good[:, :-1], counts, trans_b=True)
    with pytest.raises(ValueError, match="acc: expected a contiguous"):
        weight_grad_into(out, rows, b, good.transpose(1, 2).contiguous().transpose(1, 2), counts, trans_b=True)
    with pytest.raises(ValueError, match="b: expected shape"):
        weight_grad_into(out, rows, b, good, counts, trans_b=False)
    with pytest.raises(ValueError, match="a: expected"):
        weight_grad_into(out, rows[:-1], b, good, counts, trans_b=True)
    with pytest.raises(TypeError, match="maps"):
        weight_grad_into(out, rows, b, good, counts, maps=(1, 2), trans_b=True)
    with pytest.raises(ValueError, match="accumulate_into"):
        gmm_backend.triton_gmm(rows, out, counts, trans_a=True, accumulate_into=good)  # [E, F, H] for [E, H, F]
