"""replicate (forward and gradient) against a loop; MegaBlocks' repeat and sum helpers."""


import pytest
import torch

from megablocks.ops.replicate import repeat, replicate, sum as mb_sum
from tests.conftest import FLOAT_DTYPES
from tests.utils import assert_close, assert_equal


def loop_replicate(x, bins, num_outputs):
    out = torch.zeros(x.shape[0], num_outputs, dtype=x.dtype)
    start = 0
    for e, end in enumerate(bins.tolist()):
        for i in range(start, min(end, num_outputs)):
            out[:, i] = x[:, e]
        start = end
    return out


def loop_replicate_grad(grad, bins):
    out = torch.zeros(grad.shape[0], len(bins), dtype=torch.float64)
    start = 0
    for e, end in enumerate(bins.tolist()):
        for i in range(start, min(end, grad.shape[1])):
            out[:, e] += grad[:, i].double()
        start = end
    return out


BINS = {
    "random": [3, 3, 9, 10, 17],  # an empty bin in the middle
    "empty_first_last": [0, 4, 4, 11, 11],
    "all_in_one": [0, 0, 13, 13, 13],
    "single": [6],
    "all_empty": [0, 0, 0],
}


@pytest.mark.parametrize("case", list(BINS))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_replicate(case, dtype, device):
    bins = torch.tensor(BINS[case], dtype=torch.int32)
    num_outputs = int(bins[-1])
    x = torch.randn(5, len(bins), dtype=dtype, device=device, requires_grad=True)
    out = replicate(x, bins.to(device), num_outputs)
    assert_equal("out", out.detach().cpu(), loop_replicate(x.detach().cpu(), bins, num_outputs))
    grad = torch.randn(5, num_outputs, dtype=dtype, device=device)
    out.backward(grad)
    want = loop_replicate_grad(grad.cpu(), bins)
    assert_close("x.grad", x.grad, want.to(dtype), dtype=dtype)
    # Integer-valued gradients sum exactly in any order: the bin sums must match bitwise.
    x.grad = None
    grad_int = torch.randint(-8, 8, (5, num_outputs), device=device).to(dtype)
    replicate(x, bins.to(device), num_outputs).backward(grad_int)
    assert_equal("x.grad (exact)", x.grad.cpu(), loop_replicate_grad(grad_int.cpu(), bins).to(dtype))


def test_replicate_outputs_past_last_bin_are_zero(device):
    bins = torch.tensor([2, 5], device=device)
    x = torch.full((3, 2), float("nan"), device=device)
    x[:, 0] = 1.5
    x[:, 1] = -2.0
    x.requires_grad_(True)
    out = replicate(x, bins, 8)
    assert_equal("out", out.detach().cpu(), loop_replicate(x.detach().cpu(), bins.cpu(), 8))
    out.backward(torch.ones_like(out))  # ones on the 3 padding columns must not land anywhere
    assert_equal("x.grad", x.grad.cpu(), torch.tensor([[2.0, 3.0]] * 3))


def test_replicate_integer_ids(device):
    x = torch.randint(0, 100, (1, 4), dtype=torch.int32, device=device)
    bins = torch.tensor([1, 1, 4, 6], dtype=torch.int64, device=device)
    assert_equal("out", replicate(x, bins, 6).cpu(), loop_replicate(x.cpu(), bins.cpu(), 6))


def test_replicate_bad_inputs():
    x = torch.randn(2, 3)
    bins = torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="bins: expected one entry per column of x"):
        replicate(x, bins[:2], 3)
    with pytest.raises(TypeError, match="bins: expected dtype"):
        replicate(x, bins.float(), 3)
    with pytest.raises(ValueError, match="x: expected a 2-D tensor"):
        replicate(x[0], bins, 3)
    with pytest.raises(ValueError, match="num_outputs: expected an int >= 0"):
        replicate(x, bins, -1)
    with pytest.raises(ValueError, match="bins: expected non-negative, non-decreasing"):
        replicate(x, torch.tensor([2, 1, 3]), 3)
    with pytest.raises(ValueError, match="bins: expected non-negative, non-decreasing"):
        replicate(x, torch.tensor([-1, 1, 3]), 3)


def test_replicate_compile_fullgraph():
    bins = torch.tensor([3, 3, 9, 10, 17])
    x = torch.randn(4, 5, requires_grad=True)
    out = torch.compile(lambda x, b: replicate(x, b, 17), fullgraph=True, backend="aot_eager")(x, bins)
    assert_equal("out", out.detach(), loop_replicate(x.detach(), bins, 17))
    out.backward(torch.ones_like(out))
    assert_equal("x.grad", x.grad, loop_replicate_grad(torch.ones(4, 17), bins).float())


def test_repeat_and_sum(device):
    x = torch.randn(3, 4, device=device)
    assert repeat(x, (1, 1)) is x
    assert_equal("repeat", repeat(x, (2, 3)), torch.cat([torch.cat([x] * 3, 1)] * 2, 0))
    y = torch.randn(1, 5, device=device)
    assert_equal("sum size 1", mb_sum(y, 0), y[0])
    want = x[0] + x[1] + x[2]
    assert_close("sum", mb_sum(x, 0), want)
    assert_close("sum dim 1", mb_sum(x, 1), x[:, 0] + x[:, 1] + x[:, 2] + x[:, 3])
