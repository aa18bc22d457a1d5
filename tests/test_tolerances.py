"""The limits of `tests.utils.assert_close` against the errors they must tell apart.

A correct fp32 product (fp32 inputs, fp32 accumulation) passes; the same product from inputs
rounded to TF32 (mantissa cut to 10 bits) or accumulated in fp16 fails, at the K of the CPU
tests (40) and of the GPU tests (1024). For fp16 inputs, a product accumulated in fp32 and
rounded once passes and one accumulated in fp16 fails from K = 40 (at K = 16 the two differ by
about one rounding and cannot be told apart: see tests/utils.py).
"""

import pytest
import torch

from tests.conftest import DEVICE
from tests.utils import TF32

# These tests prove the fp32 limits with TF32 off; under MEGABLOCKS_TEST_TF32 (the GPU script's
# tf32 item, which runs tests/ops and tests/layers) the limits are the TF32 ones by design.
pytestmark = pytest.mark.skipif(TF32, reason="proves the fp32 limits, which MEGABLOCKS_TEST_TF32 replaces")
from tests.utils import TF32Products, assert_close, fp8_tolerance, relative_errors, round_to_tf32, tolerance


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 with the low 13 of its 23 mantissa bits cleared: TF32 inputs, truncated."""
    return (x.contiguous().view(torch.int32) & ~0x1FFF).view(torch.float32)


def _fp16_accumulated(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with the running sum rounded to fp16 after every one of the K steps."""
    acc = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float16)
    for k in range(a.shape[1]):
        acc = (acc.float() + a[:, k : k + 1].float() * b[k : k + 1].float()).half()
    return acc


def _operands(K, dtype=torch.float32):
    g = torch.Generator().manual_seed(K)
    a = torch.randn(64, K, generator=g).to(dtype)
    b = (torch.randn(K, 48, generator=g) / K**0.5).to(dtype)
    return a, b


def _rejects(name, actual, expected, dtype):
    with pytest.raises(AssertionError, match=name):
        assert_close(name, actual, expected, dtype)


@pytest.mark.parametrize("K", [40, 1024])
def test_fp32_limit_rejects_tf32_and_fp16_accumulation(K):
    a, b = _operands(K)
    ref = a.double() @ b.double()
    assert_close("fp32", a @ b, ref, torch.float32)
    _rejects("tf32 inputs", _tf32(a) @ _tf32(b), ref, torch.float32)
    _rejects("fp16 accumulation", _fp16_accumulated(a, b).float(), ref, torch.float32)
    # Not only rejected: far outside (at least 20 times the rms limit).
    assert relative_errors(_tf32(a) @ _tf32(b), ref)[1] > 20 * tolerance(torch.float32)[1]


@pytest.mark.parametrize("K", [40, 1024])
def test_fp16_limit_rejects_fp16_accumulation(K):
    a, b = _operands(K, torch.float16)
    ref = a.double() @ b.double()
    assert_close("fp32 accumulation", (a.float() @ b.float()).half(), ref, torch.float16)
    _rejects("fp16 accumulation", _fp16_accumulated(a, b), ref, torch.float16)


def test_fp16_accumulation_at_k16_is_within_one_rounding():
    """Documents the limit of the fp16 check: at K = 16 fp16 accumulation errs about as much as
    one rounding of the output, so no limit that passes correct kernels can reject it."""
    a, b = _operands(16, torch.float16)
    ref = a.double() @ b.double()
    correct = relative_errors((a.float() @ b.float()).half(), ref)
    accumulated = relative_errors(_fp16_accumulated(a, b), ref)
    assert accumulated[1] < 3 * correct[1]


def test_layer_limits_are_looser_and_unknown_family_refused():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        op, layer = tolerance(dtype), tolerance(dtype, "layer")
        assert op[0] <= layer[0] and op[1] <= layer[1]
    with pytest.raises(ValueError, match="family: expected one of"):
        tolerance(torch.float32, "matmul")
    a, b = _operands(1024)
    ref = a.double() @ b.double()
    with pytest.raises(AssertionError, match="layer"):
        assert_close("tf32 inputs", _tf32(a) @ _tf32(b), ref, torch.float32, family="layer")


def test_fp32_matmul_precision_is_pinned_to_highest():
    assert torch.get_float32_matmul_precision() == "highest"
    if DEVICE == "cuda":
        assert not torch.backends.cuda.matmul.allow_tf32


@pytest.mark.skipif(DEVICE != "cuda", reason="TF32 exists on CUDA only")
def test_fp32_limit_catches_tf32_in_the_kernels(monkeypatch):
    """With TF32 allowed, the fp32 gmm and sdd run their products in TF32; the fp32 limit must
    catch it (and pass them at 'highest', the suite's setting)."""
    from megablocks.ops.gmm import gmm, gmm_reference

    K = 1024
    g = torch.Generator().manual_seed(0)
    a = torch.randn(512, K, generator=g).cuda()
    b = (torch.randn(4, K, 256, generator=g) / K**0.5).cuda()
    sizes = torch.tensor([100, 0, 300, 112])
    ref = gmm_reference(a.double(), b.double(), sizes)
    assert_close("gmm fp32", gmm(a, b, sizes.cuda(), backend="triton"), ref, torch.float32)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    try:
        out = gmm(a, b, sizes.cuda(), backend="triton")
    finally:
        torch.set_float32_matmul_precision("highest")
    _rejects("gmm tf32", out, ref, torch.float32)


def test_round_to_tf32_rounds_to_nearest_even_and_passes_gradients():
    """TF32 keeps 10 of fp32's 23 mantissa bits; `round_to_tf32` rounds the other 13 away to the
    nearest value, ties to even, keeps infinities and NaN, and lets the gradient through."""
    u = 2.0**-10  # TF32's unit in the last place at 1
    x = torch.tensor([1.0, 1 + u / 2, 1 + u / 2 + 2**-20, 1 + 3 * u / 2, -(1 + 3 * u / 2), 1 + u / 4,
                      float("inf"), float("-inf"), 0.0], requires_grad=True)
    expected = [1.0, 1.0, 1 + u, 1 + 2 * u, -(1 + 2 * u), 1.0, float("inf"), float("-inf"), 0.0]
    r = round_to_tf32(x)
    assert r.tolist() == expected
    assert round_to_tf32(torch.tensor([float("nan")])).isnan().all()
    r.sum().backward()
    assert x.grad.tolist() == [1.0] * x.numel()


def test_tf32_products_model_tf32_error_and_the_layer_allowance():
    """Inside `TF32Products` a product's error is TF32's (the fp32 limit rejects it; the TF32 limit
    passes it); outside, the same product is plain fp32 again."""
    a, b = _operands(1024)
    ref = a.double() @ b.double()
    with TF32Products():
        rounded = a @ b
        linear = torch.nn.functional.linear(a, b.t())
    assert torch.equal(rounded, round_to_tf32(a) @ round_to_tf32(b))
    assert torch.equal(linear, rounded)
    _rejects("tf32 products", rounded, ref, torch.float32)
    assert relative_errors(rounded, ref)[1] < 2e-3  # the TF32 'op' rms limit of tests/utils.py
    assert_close("fp32", a @ b, ref, torch.float32)


@pytest.mark.skipif(DEVICE != "cuda", reason="TF32 exists on CUDA only")
def test_tf32_products_match_the_tensor_cores():
    """A cuBLAS TF32 product equals the fp32 product of the rounded operands within fp32's own
    summation error (the tensor cores read TF32 and accumulate in fp32)."""
    a, b = _operands(1024)
    a, b = a.cuda(), b.cuda()
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        tensor_cores = a @ b
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    model = (round_to_tf32(a).double() @ round_to_tf32(b).double())
    assert relative_errors(tensor_cores, model)[1] < 1e-5
    assert relative_errors(a @ b, model)[1] > 1e-4  # and plain fp32 is not that


def test_one_unit_in_the_last_place_of_a_tiny_16_bit_result_passes():
    """Two correctly rounded fp16 values of nearly the same number may sit one unit apart; on a
    one-element tensor that is ~1e-3 relative, above the rms limit, and must still pass. Two
    units apart must not."""
    from tests.utils import assert_close

    e = torch.tensor([0.972656], dtype=torch.float16)
    unit = 2.0**-11  # fp16's spacing in [0.5, 1)
    one, two = (e.double() + unit).half(), (e.double() + 2 * unit).half()
    assert (one.double() - e.double()).item() == unit and (two.double() - e.double()).item() == 2 * unit
    assert_close("one unit", one, e)
    with pytest.raises(AssertionError):
        assert_close("two units", two, e)


def test_a_tiny_fp32_result_is_held_to_the_max_limit_and_tf32_still_fails():
    """On a result of at most RMS_MIN_ELEMENTS elements the rms is the max: a one-element fp32
    dot product that cancels, some units in the last place off, passes at the max limit; the same
    product from TF32-rounded inputs fails. Over more elements the rms limit holds as before."""
    from tests.utils import RMS_MIN_ELEMENTS

    max_tol, rms_tol = tolerance(torch.float32)
    assert rms_tol < max_tol
    e = torch.tensor([0.00745278], dtype=torch.float64)
    off = (e * (1 + 0.75 * max_tol)).float()  # between the rms and the max limit
    assert rms_tol < relative_errors(off, e)[1] < max_tol
    assert_close("one element", off, e, torch.float32)
    with pytest.raises(AssertionError):
        assert_close("many elements", off.expand(RMS_MIN_ELEMENTS + 1), e.expand(RMS_MIN_ELEMENTS + 1),
                     torch.float32)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(1, 6, generator=g), torch.randn(6, 1, generator=g)
    ref = (a.double() @ b.double()).flatten()
    _rejects("tf32 one element", (_tf32(a) @ _tf32(b)).flatten(), ref, torch.float32)


def _hopper_fp8_accumulated(a: torch.Tensor, b: torch.Tensor, promote: int) -> torch.Tensor:
    """a @ b of e4m3 values as Hopper's FP8 tensor cores accumulate it: each 32-deep step's sum added
    to a chain whose mantissa is truncated to 14 bits; every `promote` terms (0: never) the chain is
    added to an exact accumulator and restarted."""
    def truncate(x):
        m, e = torch.frexp(x)
        return torch.ldexp(torch.trunc(m * 2.0**14) / 2.0**14, e)

    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float64)
    chain = torch.zeros_like(out)
    for k in range(0, a.shape[1], 32):
        chain = truncate(chain + a[:, k:k + 32] @ b[k:k + 32])
        if promote and (k + 32) % promote == 0:
            out, chain = out + chain, torch.zeros_like(out)
    return (out + chain).float()


@pytest.mark.parametrize("K", [256, 4096])
def test_fp8_limit_passes_promoted_hopper_accumulation_only(K):
    """The fp32 limit of an FP8 product on the GPU (tests/utils.py, measured 1.3e-4 rms on an H200)
    passes the tensor cores' accumulation promoted every 128 terms (this model of it gives 1.1e-4)
    and fails an fp32 output rounded to bf16, and, at K = 4096, a chain never promoted."""
    g = torch.Generator().manual_seed(K)
    a = torch.randn(64, K, generator=g).to(torch.float8_e4m3fn).double()
    b = torch.randn(K, 48, generator=g).to(torch.float8_e4m3fn).double()
    exact = a @ b
    max_tol, rms_tol = fp8_tolerance(torch.float32, "cuda")
    assert (max_tol, rms_tol) > tolerance(torch.float32) and fp8_tolerance(torch.float32, "cpu") == tolerance(torch.float32)
    max_err, rms = relative_errors(_hopper_fp8_accumulated(a, b, promote=128), exact)
    assert max_err <= max_tol and rms <= rms_tol and rms > 2 * tolerance(torch.float32)[1], (max_err, rms)
    max_err, rms = relative_errors(exact.bfloat16(), exact)
    assert max_err > max_tol or rms > rms_tol, (max_err, rms)
    if K >= 4096:
        max_err, rms = relative_errors(_hopper_fp8_accumulated(a, b, promote=0), exact)
        assert max_err > max_tol or rms > rms_tol, (max_err, rms)
