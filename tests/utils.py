"""Helpers shared by the tests: one `assert_close` that reports where, and poisoned buffers."""

import os
from typing import Optional

import torch


def assert_equal(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bitwise equality (NaN equal to NaN), for data movement, sorting, counting and indexing."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.detach().cpu(), expected.detach().cpu()
    if a.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):  # 8-bit floats: compared by their bytes
        a, e = a.view(torch.uint8), e.view(torch.uint8)
    if a.is_floating_point():
        same = (a == e) | (a.isnan() & e.isnan())
    else:
        same = a == e
    if not bool(same.all()):
        bad = (~same).nonzero()
        first = tuple(bad[0].tolist())
        raise AssertionError(
            f"{name}: {bad.shape[0]} of {a.numel()} elements differ; first at {first}: "
            f"{a[first].item()} vs expected {e[first].item()}"
        )


# Relative max-error and RMS-error limits (max |err| / max |ref|, rms err / rms ref) by op family
# and dtype, each just above the error a correct kernel makes against a float64 reference from
# the same inputs. Measured over every `assert_close` call of the suite (the largest value seen),
# on CPU under TRITON_INTERPRET=1 at the CPU shapes (K <= 40) and on an H200 at the GPU shapes
# (K up to 1024, bf16 included), fp32 matmuls at 'highest' precision:
#
#   family  dtype  measured max / rms (CPU)   measured max / rms (GPU)   limit max / rms
#   op      fp32   9.8e-7 / 6.7e-7            1.6e-6 / 8.8e-7            4e-6 / 2e-6
#   op      fp16   7.8e-4 / 3.9e-4            7.8e-4 / 3.8e-4            1.2e-3 / 6e-4
#   op      bf16   -                          5.8e-3 / 3.1e-3            1e-2 / 5e-3
#   layer   fp32   1.7e-5 / 1.6e-5            3.5e-6 / 3.5e-6            1e-4 / 5e-5
#   layer   fp16   1.4e-3 / 1.1e-3            1.0e-3 / 9.3e-4            3e-3 / 2e-3
#   layer   bf16   -                          1.0e-2 / 6.9e-3            2e-2 / 1e-2
#
# "op": one kernel's output or gradient (gmm and its gathered and shared-input forms, sdd, dsd,
# dds, the permute gathers and scatters with weights, glu and the activations, softmax/top-k):
# fp32 accumulation, one rounding to the output dtype (half an ulp: up to 4.9e-4 relative in fp16,
# 3.9e-3 in bf16), and for fp32 the accumulation error, about 2**-24 * sqrt(K) (3e-7 at K = 40,
# 1.6e-6 at K = 1024). "layer": a whole dMoE/MoE layer's output and gradients, where each
# product's rounded output feeds the next (router, two or three products, activation, weighted
# scatter), so two to three roundings compound; a gradient that is a small difference of larger
# terms (the router's through the softmax, every token on one expert) measured 1.7e-5 / 1.6e-5 of
# its own scale in fp32. The margin is 1.4 to 6 times the largest measured; the fp32 layer limit
# still rejects TF32 inputs (below).
#
# The fp32 limits reject a product whose inputs were rounded to TF32 (10-bit mantissa: 3e-4 to
# 8e-4 relative, whatever K) and one accumulated in fp16 (1e-3 at K = 40); the fp16 limits reject
# fp16 accumulation from K of about 32 (rms 9.2e-4 at K = 40, 2.3e-3 at K = 256) but not at K = 16
# (rms 5.1e-4: within one rounding of a correct result). tests/test_tolerances.py checks this.
_TOL = {
    "op": {
        torch.float64: (1e-9, 1e-10),
        torch.float32: (4e-6, 2e-6),
        torch.float16: (1.2e-3, 6e-4),
        torch.bfloat16: (1e-2, 5e-3),
    },
    "layer": {
        torch.float64: (1e-9, 1e-10),
        torch.float32: (1e-4, 5e-5),
        torch.float16: (3e-3, 2e-3),
        torch.bfloat16: (2e-2, 1e-2),
    },
}


# "fp8": an FP8 product (e4m3 operands, fp32 accumulation) against float64 over the same dequantized
# operands. The interpreter's FP8 dot is exact, so on CPU the "op" limits hold. Hopper's FP8 tensor
# cores are not: inside one wgmma chain the accumulator keeps about 14 bits (products aligned to the
# largest exponent and truncated; DeepSeek-V3 report, section 3.3.2). The kernels take each
# 128-deep block as one product into a fresh tile and add it to an fp32 accumulator (the remedy of
# that report, at its interval), so the error is that of one 128-term chain, whatever K. Measured
# on an H200 with fp32 out: 2.7e-4 / 1.3e-4 (gmm_fp8, K up to 1024), 8.8e-4 / 4.4e-4 (the weight
# gradient over 256 rows with 300x outlier rows in one block). Limits 2.5x that; an output rounded
# to bf16 (2e-3 rms) or a K-long imprecise chain still fails. 16-bit outputs keep the "op" limits.
_FP8_CUDA_FP32 = (2e-3, 1e-3)


def fp8_tolerance(dtype: torch.dtype, device) -> tuple:
    """(max, rms) limits for an FP8 product of output `dtype` computed on `device`."""
    return tolerance(dtype, "fp8", device)


# With MEGABLOCKS_TEST_TF32=1 (the GPU reliability script's `tf32` item) the suite runs with fp32
# matmuls at 'high' precision (TF32 tensor cores, in torch and in the kernels alike, see
# tests/conftest.py) and the fp32 limits become these: TF32 rounds each input to a 10-bit mantissa
# (2**-11 relative), so a product is 3e-4 to 8e-4 off in rms whatever K (tests/test_tolerances.py
# measures it) and a float64 reference sees all of it; 2.5x that, and the layer limits as the
# 16-bit ones, where two to three such products compound.
TF32 = os.environ.get("MEGABLOCKS_TEST_TF32") == "1"
_TOL_TF32 = {"op": (4e-3, 2e-3), "layer": (1e-2, 5e-3)}


def tolerance(dtype: torch.dtype, family: str = "op", device=None):
    """(max, rms) relative error limits of `assert_close` for `dtype` and op `family` ("fp8": the
    "op" limits, but fp32 results computed on a CUDA `device` get `_FP8_CUDA_FP32`)."""
    if family == "fp8":
        if dtype == torch.float32 and device is not None and torch.device(device).type == "cuda":
            return _FP8_CUDA_FP32
        family = "op"
    if family not in _TOL:
        raise ValueError(f"family: expected one of {sorted(_TOL) + ['fp8']}, got {family!r}")
    if TF32 and dtype == torch.float32:
        return _TOL_TF32[family]
    return _TOL[family][dtype]


def relative_errors(actual: torch.Tensor, expected: torch.Tensor):
    """(max |a - e| / max |e|, rms(a - e) / rms(e)), in float64 on CPU."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    err = (a - e).abs()
    max_err = err.max().item() / (e.abs().max().item() or 1.0)
    rms = err.pow(2).mean().sqrt().item() / (e.pow(2).mean().sqrt().item() or 1.0)
    return max_err, rms


def round_to_tf32(t: torch.Tensor) -> torch.Tensor:
    """fp32 `t` with each mantissa rounded to TF32's 10 bits (to nearest, ties to even), the value
    a tensor core reads under TF32; the gradient passes through unchanged."""
    bits = t.detach().contiguous().view(torch.int32)
    rounded = ((bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF).view(torch.float32).view_as(t)
    return t + torch.where(torch.isfinite(t), rounded - t.detach(), 0.0)


class TF32Products(torch.overrides.TorchFunctionMode):
    """Inside it, the matrix products of plain torch code round their fp32 operands to TF32 first
    (`round_to_tf32`) and accumulate in fp32, as a tensor core does: the plain computation of a
    result at TF32's precision whatever kernel torch would pick (cuBLAS computes a product with one
    row, e.g. one token, in fp32 without tensor cores, so the GPU's own 'high' precision does not
    model a Triton kernel's `tl.dot` there). The backward's products are not rounded."""

    _PRODUCTS = {torch.matmul, torch.mm, torch.bmm, torch.Tensor.matmul, torch.Tensor.mm, torch.Tensor.bmm,
                 torch.Tensor.__matmul__, torch.Tensor.__rmatmul__, torch.nn.functional.linear}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self._PRODUCTS:
            args = tuple(round_to_tf32(a) if i < 2 and isinstance(a, torch.Tensor) and a.dtype == torch.float32
                         else a for i, a in enumerate(args))
        return func(*args, **(kwargs or {}))


# How far past the plain fp32 computation's own error a result may be (`assert_close`'s `plain`).
CONDITION_FACTOR = 8
# The same for a 16-bit `plain` (the plain run in the dtype, whose error on a well-conditioned
# result is about one rounding, under the limits): twice its error, where that exceeds them.
CONDITION_FACTOR_16BIT = 2
# On an fp32 result of this many elements or fewer the rms limit is the max limit: the rms of
# one error is that error (it averages nothing), and its limit, set to catch a drift spread over
# many elements, would hold one element of an fp32 sum that cancels to a few units in the last
# place (seen: a 6-term scatter weight gradient 3.0e-6 off, against rms 2e-6 and max 4e-6). TF32
# and fp16 accumulation stay ~100x over the max limit (tests/test_tolerances.py).
RMS_MIN_ELEMENTS = 4


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype=None, family: str = "op",
                 plain: Optional[torch.Tensor] = None) -> None:
    """Max and RMS error relative to the reference's scale; reports the worst element.

    `dtype` (default: `actual`'s) and `family` ("op": one kernel; "layer": a whole layer, where
    roundings compound; "fp8": an FP8 tensor-core product, `fp8_tolerance`) pick the limits. `plain`, with an exact (float64) `expected`:
    the same result computed plainly in fp32 (the reference run in fp32). Where the result is
    ill-conditioned (a sum that cancels: one token through one FFN column, a two-expert softmax's
    backward) fp32 itself is far off the exact value relative to the result's scale, and the
    limits grow to CONDITION_FACTOR times the plain computation's error; on well-conditioned
    inputs that error is ~1e-7 and the limits stay as they are (TF32 and fp16 accumulation are
    1000x worse than plain fp32 and still fail). A 16-bit `plain` (the plain run in the dtype)
    widens them to CONDITION_FACTOR_16BIT times its error. An fp32 result of at most
    RMS_MIN_ELEMENTS elements is held to the max limit for both.
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert not a.isnan().any() or e.isnan().any(), f"{name}: NaN in result"
    if a.numel() == 0:
        return
    fp32 = (dtype or actual.dtype) == torch.float32
    max_tol, rms_tol = tolerance(dtype or actual.dtype, family, actual.device)
    if plain is not None:
        plain_max, plain_rms = relative_errors(plain, e)
        factor = CONDITION_FACTOR if fp32 else CONDITION_FACTOR_16BIT
        max_tol, rms_tol = max(max_tol, factor * plain_max), max(rms_tol, factor * plain_rms)
    if fp32 and a.numel() <= RMS_MIN_ELEMENTS:
        rms_tol = max(rms_tol, max_tol)  # 16-bit: `_within_one_ulp` below
    max_err, rms = relative_errors(a, e)
    if not (max_err <= max_tol and rms <= rms_tol) and not _within_one_ulp(a, e, actual.dtype):
        worst = int((a - e).abs().argmax())
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape))
        raise AssertionError(
            f"{name}: rel max err {max_err:.3e} (tol {max_tol:.1e}) at {where}: "
            f"{a[where].item():.6g} vs {e[where].item():.6g}; rel rms err {rms:.3e} (tol {rms_tol:.1e}) "
            f"[{family}]"
        )


def _within_one_ulp(a: torch.Tensor, e: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a 16-bit result differs from its reference by at most one unit in the last place
    of that dtype, element by element: two correctly rounded values of nearly the same real
    number (an fp32 sum in another order that lands across a rounding boundary). On a tensor of a
    few elements one such step exceeds the rms limit; fp16 accumulation and TF32 inputs move
    results by several units, which this does not excuse (tests/test_tolerances.py)."""
    if dtype not in (torch.float16, torch.bfloat16):
        return False
    info = torch.finfo(dtype)
    magnitude = torch.maximum(a.abs(), e.abs()).clamp_min(info.tiny)
    spacing = info.eps * torch.exp2(torch.floor(torch.log2(magnitude)))
    return bool(((a - e).abs() <= spacing).all())


def poisoned(shape, dtype, device) -> torch.Tensor:
    """A buffer full of NaN (or -1 for integers): anything that reads it unintentionally shows."""
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, -1, dtype=dtype, device=device)


def assert_grads_in_layout(where: str, params, grads) -> None:
    """Each gradient `torch.autograd.grad` returned has its parameter's shape and strides.

    A gradient in another layout (e.g. the transposed view a product with `w.t()` gives back) is
    copied into the parameter's layout by AccumulateGrad on `.backward()`: a strided pass over the
    whole weight that training pays on every step. `params` is a dict {name: parameter}, `grads`
    the gradients in the same order.
    """
    bad = []
    for (name, p), g in zip(params.items(), grads):
        if g is None:
            bad.append(f"{name}: no gradient")
        elif g.shape != p.shape or g.stride() != p.stride() or not g.is_contiguous():
            bad.append(f"{name}: shape {tuple(g.shape)} strides {g.stride()}, parameter "
                       f"{tuple(p.shape)} strides {p.stride()}")
    assert not bad, f"{where}: gradients not in their parameters' layout: " + "; ".join(bad)
