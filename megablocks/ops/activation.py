"""The gated activation of the GLU experts, `act(h1) * h2`, as one fused, differentiable op.

gpt-oss's clamped SwiGLU ('clamped_swiglu') also transforms the linear branch:
`act(h1) * (clamp(h2, -limit, limit) + 1)` with `act(x) = c·σ(α·c)`, `c = min(x, limit)`, limit 7
and α 1.702 (`SWIGLU_LIMIT`, `SWIGLU_ALPHA`: gpt-oss's values, fixed with the name).

Legend: N routed rows, F ffn per expert (`h1_NF = x @ w1^T`, `h2_NF = x @ v1^T`); the op is
elementwise, so any shape works.

Unfused, `act(h1) * h2` runs an activation kernel and a multiply forward, and three kernels
backward, and keeps `act(h1)` for the backward next to h1 and h2. `glu` runs one Triton kernel
each way (megablocks/backend/activation.py) and keeps h1 and h2 only, recomputing `act(h1)` in the
backward. Math in fp32, rounded once to the input dtype.

The kernels run on CUDA tensors and on CPU tensors under TRITON_INTERPRET=1; otherwise the
plain-torch reference in this file (`glu_reference`).
"""

import functools
from typing import Callable, Tuple

import torch
import torch.nn.functional as F

from megablocks import _checks
from megablocks.backend import activation as kernels
from megablocks.backend import use_triton
from megablocks.backend.activation import ACTIVATIONS, SWIGLU_ALPHA, SWIGLU_LIMIT
from megablocks.ops._eager import custom_op

__all__ = ["ACTIVATIONS", "ACTIVATION_FUNCTIONS", "GATED_ACTIVATIONS", "GELU_APPROXIMATIONS", "SWIGLU_ALPHA",
           "SWIGLU_LIMIT", "act_backward_reference", "act_reference", "clamped_swiglu", "gated_product", "glu",
           "glu_reference", "glu_torch", "is_gated"]


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU of the gate and the linear branch, in plain torch (as transformers'
    `GptOssExperts` computes it): `(clamp(up, -7, 7) + 1) · g · σ(1.702·g)` with `g = min(gate, 7)`.

    A GLU activation: it takes both branches (`Arguments(activation_fn=clamped_swiglu,
    mlp_type='glu')`), where the others take the gate alone. Gradients are zero where a clamp is
    active (torch's clamp).
    """
    gate = gate.clamp(max=SWIGLU_LIMIT)
    up = up.clamp(min=-SWIGLU_LIMIT, max=SWIGLU_LIMIT)
    return (up + 1) * (gate * torch.sigmoid(gate * SWIGLU_ALPHA))


# The one table of activations by name: what torch computes for each name the fused kernels take
# (`ACTIVATIONS`, in the same order): `fn(gate)`, the GLU being `fn(gate) * up`, or for the names
# of GATED_ACTIVATIONS `fn(gate, up)`, the whole GLU (`glu_torch` computes either). The
# references, `fused_moe` and the benchmarks read it.
ACTIVATION_FUNCTIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "clamped_swiglu": clamped_swiglu,
}
assert tuple(ACTIVATION_FUNCTIONS) == ACTIVATIONS
# The names whose function takes the gate and the linear branch (GLU experts only).
GATED_ACTIVATIONS = ("clamped_swiglu",)


def is_gated(fn: Callable) -> bool:
    """Whether `fn` is a GLU activation function, `fn(gate, up)`: the table's function of a name
    in GATED_ACTIVATIONS (`clamped_swiglu`)."""
    return any(fn is ACTIVATION_FUNCTIONS[name] for name in GATED_ACTIVATIONS)


def gated_product(fn: Callable, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The GLU of the activation function `fn` in torch: `fn(gate, up)` for a GLU activation
    (`is_gated`), else `fn(gate) * up`. Differentiable, in the inputs' dtype."""
    return fn(gate, up) if is_gated(fn) else fn(gate) * up


def glu_torch(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """`gated_product` of the activation named `activation` (a name of the table)."""
    return gated_product(ACTIVATION_FUNCTIONS[activation], gate, up)


# The name of torch's GELU (`F.gelu`, `torch.nn.GELU`) for each of its `approximate` settings.
GELU_APPROXIMATIONS = {"none": "gelu", "tanh": "gelu_tanh"}


# --------------------------------------------------------------------------------------------------
# References (plain torch, fp32 math). CPU tensors run these when the interpreter is off.


def _act_reference(x: torch.Tensor, activation: str) -> torch.Tensor:
    return ACTIVATION_FUNCTIONS[activation](x)


def _act_backward_reference(grad: torch.Tensor, x: torch.Tensor, activation: str) -> torch.Tensor:
    """`grad * act'(x)` by the derivative formulas torch's own autograd uses."""
    if activation == "silu":
        return torch.ops.aten.silu_backward(grad, x)
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(grad, x)
    if activation == "gelu_tanh":
        return torch.ops.aten.gelu_backward(grad, x, approximate="tanh")
    return torch.ops.aten.threshold_backward(grad, x, 0)


def act_reference(h: torch.Tensor, activation: str) -> torch.Tensor:
    """The MLP experts' activation `act(h)` (the table's function of a non-gated name) in fp32,
    rounded to h's dtype, contiguous (what `backend.fp8.act_quantize_rows` makes, in plain torch)."""
    return _act_reference(h.float(), activation).to(h.dtype).contiguous()


def act_backward_reference(grad: torch.Tensor, h: torch.Tensor, activation: str) -> torch.Tensor:
    """`grad * act'(h)` in fp32 (torch's own derivative formulas), rounded to h's dtype."""
    return _act_backward_reference(grad.float(), h.float(), activation).to(h.dtype)


def glu_reference(h1: torch.Tensor, h2: torch.Tensor, activation: str) -> torch.Tensor:
    """`act(h1) * h2` (`glu_torch`) in fp32, rounded to h1's dtype (what `glu` computes, in plain
    torch)."""
    return glu_torch(h1.float(), h2.float(), activation).to(h1.dtype)


def glu_backward_reference(
    grad: torch.Tensor, h1: torch.Tensor, h2: torch.Tensor, activation: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    """`(grad * h2 * act'(h1), grad * act(h1))` in fp32, each rounded to h1's dtype (for
    GATED_ACTIVATIONS: torch's autograd of their function)."""
    if activation in GATED_ACTIVATIONS:
        with torch.enable_grad():
            x = h1.detach().float().requires_grad_(True)
            u = h2.detach().float().requires_grad_(True)
            grad_h1, grad_h2 = torch.autograd.grad(glu_torch(x, u, activation), (x, u), grad.float())
        return grad_h1.to(h1.dtype), grad_h2.to(h1.dtype)
    g, x = grad.float(), h1.float()
    grad_h1 = _act_backward_reference(g * h2.float(), x, activation)
    grad_h2 = g * _act_reference(x, activation)
    return grad_h1.to(h1.dtype), grad_h2.to(h1.dtype)


# --------------------------------------------------------------------------------------------------
# Custom ops: forward, and backward returning both gradients.


@custom_op("glu")
def _glu(h1: torch.Tensor, h2: torch.Tensor, activation: str) -> torch.Tensor:
    if use_triton(h1):
        return kernels.glu_forward(h1, h2, activation)
    return glu_reference(h1, h2, activation)


@_glu.register_fake
def _(h1, h2, activation):
    return h1.new_empty(h1.shape)


@custom_op("glu_backward")
def _glu_backward(
    grad: torch.Tensor, h1: torch.Tensor, h2: torch.Tensor, activation: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    if use_triton(h1):
        return kernels.glu_backward(grad, h1, h2, activation)
    return glu_backward_reference(grad, h1, h2, activation)


@_glu_backward.register_fake
def _(grad, h1, h2, activation):
    return h1.new_empty(h1.shape), h1.new_empty(h1.shape)


def _setup_context(ctx, inputs, output):
    h1, h2, activation = inputs
    ctx.activation = activation
    ctx.save_for_backward(h1, h2)


def _backward(ctx, grad):
    h1, h2 = ctx.saved_tensors
    grad_h1, grad_h2 = _glu_backward(grad, h1, h2, ctx.activation)
    return grad_h1, grad_h2, None


_glu.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# Public op.


def glu(h1: torch.Tensor, h2: torch.Tensor, activation: str) -> torch.Tensor:
    """`act(h1) * h2` elementwise, fused: the gate of a GLU expert (SwiGLU with 'silu', GeGLU with
    'gelu' or 'gelu_tanh', ReGLU with 'relu', gpt-oss's clamped SwiGLU with 'clamped_swiglu':
    `clamped_swiglu(h1, h2)`).

    Args:
        h1: the pre-activation (e.g. `x @ w1^T`, `[N, F]`), any shape, float32/float16/bfloat16.
        h2: the linear branch (e.g. `x @ v1^T`), same shape, dtype and device as h1.
        activation: one of `ACTIVATIONS`: 'silu', 'gelu' (exact, erf), 'gelu_tanh' (the tanh
            approximation), 'relu', 'clamped_swiglu'.

    Returns:
        A new contiguous tensor of h1's shape and dtype. Math in fp32, rounded once. Differentiable
        in h1 and h2 (once: the backward has no gradient of its own); the backward keeps h1 and h2
        and recomputes `act(h1)`. Non-contiguous inputs are accepted and copied to contiguous ones
        by the kernels.

    Raises:
        TypeError: a non-tensor or a non-float dtype, h1 and h2 of different dtypes, or an
            activation that is not a str.
        ValueError: h1 and h2 of different shapes or devices, or an unknown activation.
    """
    _checks.check_tensor("h1", h1, dtypes=_checks.FLOAT_DTYPES, numel_int32=False)
    _checks.check_tensor("h2", h2, dtypes=_checks.FLOAT_DTYPES, numel_int32=False)
    if h2.dtype != h1.dtype:
        want, got = (str(d).replace("torch.", "") for d in (h1.dtype, h2.dtype))
        raise TypeError(f"h2: expected the dtype of h1 ({want}), got {got}")
    if h2.shape != h1.shape:
        raise ValueError(f"h2: expected the shape of h1 {tuple(h1.shape)}, got {tuple(h2.shape)}")
    _checks.check_same_device(h1=h1, h2=h2)
    if not isinstance(activation, str):
        raise TypeError(f"activation: expected a str, got {type(activation).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    return _glu(h1, h2, activation)
