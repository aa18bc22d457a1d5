"""Fused gated activation of the GLU experts: one pass over memory forward, one backward.

    out   = act(h1) * up(h2)
    grad_h1 = grad_out * up(h2) * act'(h1)
    grad_h2 = grad_out * act(h1) * up'(h2)

`up` is the identity but for gpt-oss's clamped SwiGLU.

Elementwise over any shape (the expert GLU's `h1_NF`, `h2_NF`; N routed rows, F ffn), flattened to
M = numel elements. Math in fp32, results rounded once to the input dtype. The backward recomputes
`act(h1)` from h1, so the forward keeps only h1 and h2 for it (the unfused torch ops also keep
`act(h1)`), and the whole step reads and writes each [N, F] tensor once per direction.

Activations (`ACTIVATIONS`): 'silu' `x·σ(x)`, 'gelu' `x·Φ(x)` (erf), 'gelu_tanh'
`½x(1 + tanh(√(2/π)(x + 0.044715x³)))`, 'relu' `max(x, 0)` (derivative 0 at x = 0, as torch), and
'clamped_swiglu', gpt-oss's: `act(x) = c·σ(α·c)` with `c = min(x, limit)` and
`up(h2) = clamp(h2, -limit, limit) + 1`, limit = SWIGLU_LIMIT = 7 and α = SWIGLU_ALPHA = 1.702
(fixed with the name: gpt-oss's values). Its derivatives are zero where a clamp is active (torch's
clamp: the gradient passes at the limits themselves).
"""

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from megablocks.backend import cdiv

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "clamped_swiglu")

# gpt-oss's clamped SwiGLU ('clamped_swiglu'): the clamp of both branches and the sigmoid's gain.
SWIGLU_LIMIT = 7.0
SWIGLU_ALPHA = 1.702

# Elements per program and warps. An elementwise kernel is bound by memory; 4096 elements over 8
# warps gives each thread 16 elements (bf16: two 16-byte vectors per tensor). Not swept yet:
# benchmarks/bench_activation.py reports the GB/s against the copy ceiling.
BLOCK = 4096
NUM_WARPS = 8

_SQRT_HALF = tl.constexpr(math.sqrt(0.5))
_INV_SQRT_2PI = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))
_SQRT_2_OVER_PI = tl.constexpr(math.sqrt(2.0 / math.pi))
_GELU_TANH_C = tl.constexpr(0.044715)
_SWIGLU_LIMIT = tl.constexpr(SWIGLU_LIMIT)
_SWIGLU_ALPHA = tl.constexpr(SWIGLU_ALPHA)


# x: fp32. Returns (act(x), act'(x)) in fp32 (the forward discards the derivative; the compiler
# drops its arithmetic).
@triton.jit
def _act(x, ACTIVATION: tl.constexpr):
    if ACTIVATION == "silu":
        s = tl.sigmoid(x)
        y = x * s
        dy = s * (1.0 + x * (1.0 - s))
    elif ACTIVATION == "gelu":
        cdf = 0.5 * (1.0 + tl.math.erf(x * _SQRT_HALF))
        y = x * cdf
        dy = cdf + x * tl.exp(-0.5 * x * x) * _INV_SQRT_2PI
    elif ACTIVATION == "gelu_tanh":
        u = _SQRT_2_OVER_PI * (x + _GELU_TANH_C * x * x * x)
        # With s = σ(2u): 1 + tanh(u) = 2s and 1 - tanh(u)² = 4s(1 - s). Written through tanh
        # (t = 2s - 1, then 1 + t) the sum cancels where u is negative: at x = -2.93, 1 + t is
        # 0.0117 and the derivative came out 2.5e-6 off (12x the error of a one-ulp change of x).
        s = tl.sigmoid(2.0 * u)
        y = x * s
        du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_C * x * x)
        dy = s + 2.0 * x * s * (1.0 - s) * du
    elif ACTIVATION == "clamped_swiglu":
        clamped = x > _SWIGLU_LIMIT
        c = tl.where(clamped, _SWIGLU_LIMIT, x)  # a NaN stays NaN, as torch's clamp keeps it
        # tensor * constexpr, not the reverse: the interpreter keeps a constexpr-wrapped tensor.
        s = tl.sigmoid(c * _SWIGLU_ALPHA)
        y = c * s
        dy = tl.where(clamped, 0.0, s * (1.0 + c * _SWIGLU_ALPHA * (1.0 - s)))
    else:  # relu
        y = tl.where(x < 0.0, 0.0, x)  # as torch's relu: NaN stays NaN (tl.maximum gave 0), -0 stays -0
        dy = tl.where(x > 0.0, 1.0, 0.0)
    return y, dy


# x: fp32, the linear branch of the GLU. Returns (up(x), up'(x)) in fp32: the identity (derivative
# 1), but for 'clamped_swiglu' `clamp(x, -limit, limit) + 1`.
@triton.jit
def _up(x, ACTIVATION: tl.constexpr):
    if ACTIVATION == "clamped_swiglu":
        clamped = (x > _SWIGLU_LIMIT) | (x < -_SWIGLU_LIMIT)
        u = tl.where(x > _SWIGLU_LIMIT, _SWIGLU_LIMIT, tl.where(x < -_SWIGLU_LIMIT, -_SWIGLU_LIMIT, x)) + 1.0
        du = tl.where(clamped, 0.0, 1.0)
    else:
        u = x
        du = 1.0
    return u, du


# h1_M, h2_M, out_M: contiguous, any float dtype each (loaded, then cast to fp32 before math).
# Program p handles elements [p·BLOCK, (p+1)·BLOCK) ∩ [0, M); offsets in int64.
@triton.jit
def _glu_forward_kernel(
    h1_ptr,
    h2_ptr,
    out_ptr,
    numel,
    ACTIVATION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    h1 = tl.load(h1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h2 = tl.load(h2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a, _ = _act(h1, ACTIVATION)
    u, _ = _up(h2, ACTIVATION)
    tl.store(out_ptr + offs, (a * u).to(out_ptr.dtype.element_ty), mask=mask)


# grad_M, h1_M, h2_M in; grad_h1_M, grad_h2_M out; all contiguous. Tiling as the forward.
@triton.jit
def _glu_backward_kernel(
    grad_ptr,
    h1_ptr,
    h2_ptr,
    grad_h1_ptr,
    grad_h2_ptr,
    numel,
    ACTIVATION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h1 = tl.load(h1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h2 = tl.load(h2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a, da = _act(h1, ACTIVATION)
    u, du = _up(h2, ACTIVATION)
    tl.store(grad_h1_ptr + offs, (g * u * da).to(grad_h1_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_h2_ptr + offs, (g * a * du).to(grad_h2_ptr.dtype.element_ty), mask=mask)


def glu_forward(h1: torch.Tensor, h2: torch.Tensor, activation: str) -> torch.Tensor:
    """`act(h1) * up(h2)`, contiguous, in h1's dtype and shape.

    No autograd and no validation beyond what the launch needs (`megablocks.ops.activation.glu`
    checks its inputs); non-contiguous inputs are copied to contiguous ones first.
    """
    assert activation in ACTIVATIONS, activation
    h1, h2 = h1.contiguous(), h2.contiguous()
    out = torch.empty(h1.shape, dtype=h1.dtype, device=h1.device)
    numel = h1.numel()
    if numel:
        _glu_forward_kernel[(cdiv(numel, BLOCK),)](
            h1, h2, out, numel, ACTIVATION=activation, BLOCK=BLOCK, num_warps=NUM_WARPS
        )
    return out


def glu_backward(grad: torch.Tensor, h1: torch.Tensor, h2: torch.Tensor, activation: str, in_place: bool = False):
    """`(grad * up(h2) * act'(h1), grad * act(h1) * up'(h2))`, each contiguous in h1's dtype and
    shape; with `in_place` (h1 and h2 contiguous) written over h1 and h2 (each element is read
    before it is written, by the same thread)."""
    assert activation in ACTIVATIONS, activation
    if in_place:
        assert h1.is_contiguous() and h2.is_contiguous() and h1.shape == h2.shape, "in_place: contiguous h1, h2"
        grad_h1, grad_h2 = h1, h2
    else:
        grad_h1 = torch.empty(h1.shape, dtype=h1.dtype, device=h1.device)
        grad_h2 = torch.empty(h2.shape, dtype=h2.dtype, device=h2.device)
    grad, h1, h2 = grad.contiguous(), h1.contiguous(), h2.contiguous()
    numel = h1.numel()
    if numel:
        _glu_backward_kernel[(cdiv(numel, BLOCK),)](
            grad, h1, h2, grad_h1, grad_h2, numel, ACTIVATION=activation, BLOCK=BLOCK, num_warps=NUM_WARPS
        )
    return grad_h1, grad_h2


# The two halves of one [R, 2C] buffer h (row stride stride_h, unit column stride): h1 = h[:, :C],
# h2 = h[:, C:]. Forward: out [R, C] = act(h1) * up(h2). Backward: the two gradients written over
# h1 and h2 (each element read before the same program writes it). The same fp32 math as above.
@triton.jit
def _glu_halves_kernel(
    h_ptr,
    out_ptr,
    grad_ptr,
    rows,
    cols,
    stride_h,
    stride_o,
    stride_g,
    ACTIVATION: tl.constexpr,
    BACKWARD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r[:, None] < rows) & (c[None, :] < cols)
    p1 = h_ptr + r[:, None] * stride_h + c[None, :]
    h1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    h2 = tl.load(p1 + cols, mask=mask, other=0.0).to(tl.float32)
    a, da = _act(h1, ACTIVATION)
    u, du = _up(h2, ACTIVATION)
    if BACKWARD:
        g = tl.load(grad_ptr + r[:, None] * stride_g + c[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(p1, (g * u * da).to(h_ptr.dtype.element_ty), mask=mask)
        tl.store(p1 + cols, (g * a * du).to(h_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + r[:, None] * stride_o + c[None, :], (a * u).to(out_ptr.dtype.element_ty), mask=mask)


_HALVES_BLOCK_R, _HALVES_BLOCK_C = 8, 512


def _glu_halves(h: torch.Tensor, activation: str, grad: Optional[torch.Tensor]) -> torch.Tensor:
    assert activation in ACTIVATIONS, activation
    assert h.dim() == 2 and h.shape[1] % 2 == 0 and h.stride(1) == 1, "h: [R, 2C] with a unit column stride"
    rows, cols = h.shape[0], h.shape[1] // 2
    out = h if grad is not None else torch.empty((rows, cols), dtype=h.dtype, device=h.device)
    if grad is not None:
        assert grad.shape == (rows, cols) and grad.stride(1) == 1, "grad: [R, C] with a unit column stride"
    if rows and cols:
        block_c = min(_HALVES_BLOCK_C, max(16, triton.next_power_of_2(cols)))
        block_r = max(1, _HALVES_BLOCK_R * _HALVES_BLOCK_C // block_c)
        g = grad if grad is not None else out
        _glu_halves_kernel[(cdiv(rows, block_r), cdiv(cols, block_c))](
            h, out, g, rows, cols, h.stride(0), out.stride(0), g.stride(0),
            ACTIVATION=activation, BACKWARD=grad is not None, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=NUM_WARPS,
        )
    return out


def glu_halves_forward(h: torch.Tensor, activation: str) -> torch.Tensor:
    """`glu_forward(h[:, :C], h[:, C:])` of one [R, 2C] buffer (any row stride), read in place:
    [R, C] contiguous, equal bit for bit."""
    return _glu_halves(h, activation, None)


def glu_halves_backward_(grad: torch.Tensor, h: torch.Tensor, activation: str) -> torch.Tensor:
    """`glu_backward(grad, h[:, :C], h[:, C:])` written over h: returns h, now [grad_h1 | grad_h2]
    (equal bit for bit), which the products after it read as one [R, 2C] operand."""
    return _glu_halves(h, activation, grad)
