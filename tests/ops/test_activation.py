"""glu (fused `act(h1) * h2`): forward and both gradients against fp64 autograd of plain torch.

The expected values are `act(h1) * h2` (gpt-oss's clamped SwiGLU: its formula written out here,
clamps included) and its autograd gradients computed in float64 by torch's own activations, from
the same inputs; the kernels (CUDA, or CPU through the interpreter) and the library's torch
reference are both compared with them.
"""

import functools

import pytest
import torch
import torch.nn.functional as F

from megablocks.layers import mlp as mlp_module
from megablocks.layers.activation_fn import fused_name, gated_product
from megablocks.layers.arguments import DEFAULT_ACTIVATION_FN
from megablocks.ops import glu
from megablocks.ops.activation import ACTIVATIONS, clamped_swiglu, glu_backward_reference, glu_reference
from tests.conftest import DEVICE, FLOAT_DTYPES
from tests.utils import assert_close, assert_equal

TORCH_ACTS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}
GATE_ACTIVATIONS = tuple(TORCH_ACTS)  # the activations of the gate alone


def gpt_oss_glu(gate, up, limit=7.0, alpha=1.702):
    """transformers' `GptOssExperts._apply_gate` on separate gate and up tensors."""
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def torch_glu(h1, h2, activation):
    if activation == "clamped_swiglu":
        return gpt_oss_glu(h1, h2)
    return TORCH_ACTS[activation](h1) * h2

# Triton's interpreter warns when exp overflows to inf in a saturated sigmoid; the result is exact.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

# 1 element, one past a block (4096), a 2-D shape whose rows do not divide the block, empty, 3-D.
SHAPES = [(1,), (4097,), (37, 130), (0, 7), (2, 3, 5)]


def make_inputs(shape, dtype, device, scale=3.0):
    g = torch.Generator().manual_seed(hash(shape) % 2**31)
    h1, h2, grad = (torch.randn(shape, generator=g) * scale for _ in range(3))
    return [t.to(device=device, dtype=dtype) for t in (h1, h2, grad)]


def expected(h1, h2, grad, activation):
    """(out, grad_h1, grad_h2) by float64 autograd of torch's activation times h2."""
    h1d = h1.detach().double().requires_grad_(True)
    h2d = h2.detach().double().requires_grad_(True)
    out = torch_glu(h1d, h2d, activation)
    grad_h1, grad_h2 = torch.autograd.grad(out, (h1d, h2d), grad.double()) if out.numel() else (h1d, h2d)
    return out.detach(), grad_h1, grad_h2


def run_glu(h1, h2, grad, activation):
    h1 = h1.detach().clone().requires_grad_(True)
    h2 = h2.detach().clone().requires_grad_(True)
    out = glu(h1, h2, activation)
    out.backward(grad)
    return out, h1.grad, h2.grad


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_glu_matches_autograd(activation, dtype, shape):
    h1, h2, grad = make_inputs(shape, dtype, DEVICE)
    out, grad_h1, grad_h2 = run_glu(h1, h2, grad, activation)
    want = expected(h1, h2, grad, activation)
    for name, got, ref in zip(("out", "grad_h1", "grad_h2"), (out, grad_h1, grad_h2), want):
        assert got.dtype == dtype and got.shape == h1.shape, f"{name}: {got.dtype} {tuple(got.shape)}"
        assert_close(name, got, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_matches_autograd(activation, dtype):
    h1, h2, grad = make_inputs((37, 130), dtype, "cpu")
    got = (glu_reference(h1, h2, activation), *glu_backward_reference(grad, h1, h2, activation))
    for name, g, ref in zip(("out", "grad_h1", "grad_h2"), got, expected(h1, h2, grad, activation)):
        assert g.dtype == dtype, f"{name}: {g.dtype}"
        assert_close(name, g, ref, dtype)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_cpu_without_interpreter_runs_reference(activation, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    h1, h2, grad = make_inputs((9, 33), torch.float32, "cpu")
    out, grad_h1, grad_h2 = run_glu(h1, h2, grad, activation)
    assert_equal("out", out, glu_reference(h1, h2, activation))
    want_h1, want_h2 = glu_backward_reference(grad, h1, h2, activation)
    assert_equal("grad_h1", grad_h1, want_h1)
    assert_equal("grad_h2", grad_h2, want_h2)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_extreme_values(activation):
    # Saturated sigmoid / erf / tanh tails, exact zeros (relu's derivative there is 0, as torch's),
    # the clamped SwiGLU's limits and both sides of them.
    values = [-100.0, -30.0, -8.0, -7.0, -1e-3, -0.0, 0.0, 1e-3, 6.999, 7.0, 7.001, 8.0, 30.0, 100.0]
    h1 = torch.tensor(values, device=DEVICE)
    for h2 in (torch.linspace(-2, 2, len(values), device=DEVICE), h1.flip(0)):  # h2 past the limits too
        grad = torch.linspace(1, 3, len(values), device=DEVICE)
        out, grad_h1, grad_h2 = run_glu(h1, h2, grad, activation)
        want = expected(h1, h2, grad, activation)
        for name, got, ref in zip(("out", "grad_h1", "grad_h2"), (out, grad_h1, grad_h2), want):
            assert torch.isfinite(got).all(), f"{name}: {got}"
            torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_nan_propagates_as_torch(activation):
    """A NaN in either branch gives NaN out, as torch's own functions (relu's max once dropped it)."""
    nan = float("nan")
    h1 = torch.tensor([nan, 1.0, -1.0, 2.0], device=DEVICE)
    h2 = torch.tensor([1.0, nan, 1.0, 0.5], device=DEVICE)
    out = glu(h1, h2, activation)
    torch.testing.assert_close(out, glu_reference(h1, h2, activation), equal_nan=True)
    assert out[:2].isnan().all() and not out[2:].isnan().any()


def test_clamped_swiglu_clamps():
    """gpt-oss's clamped SwiGLU: the gate clamped above at 7, the linear branch at ±7 and shifted
    by one; no gradient where a clamp is active, the gradient at the limits themselves (torch's
    clamp), and the library's torch function is transformers' formula."""
    gate = torch.tensor([-9.0, -7.0, 0.5, 6.5, 7.0, 7.5, 20.0], device=DEVICE)
    up = torch.tensor([-20.0, -7.0, -7.5, 0.5, 7.0, 7.5, 3.0], device=DEVICE)
    grad = torch.ones_like(gate)
    out, grad_gate, grad_up = run_glu(gate, up, grad, "clamped_swiglu")
    g = gate.clamp(max=7.0)
    assert_close("out", out, (up.clamp(-7.0, 7.0) + 1) * g * torch.sigmoid(1.702 * g))
    assert_equal("grad_gate where clamped", grad_gate[5:], torch.zeros(2, device=DEVICE))
    assert bool((grad_gate[:5] != 0).all()), grad_gate
    assert_equal("grad_up where clamped", grad_up[[0, 2, 5]], torch.zeros(3, device=DEVICE))
    assert bool((grad_up[[1, 3, 4, 6]] != 0).all()), grad_up
    assert_equal("clamped_swiglu", clamped_swiglu(gate, up), gpt_oss_glu(gate, up))


def test_non_contiguous_inputs():
    h1, h2, grad = make_inputs((24, 40), torch.float32, DEVICE)
    h1_nc, h2_nc = h1.t(), h2[:, ::2].repeat_interleave(2, dim=1).t()  # [40, 24] views, strided
    grad_nc = grad.t()
    out, grad_h1, grad_h2 = run_glu(h1_nc, h2_nc, grad_nc, "silu")
    want = run_glu(h1_nc.contiguous(), h2_nc.contiguous(), grad_nc.contiguous(), "silu")
    for name, got, ref in zip(("out", "grad_h1", "grad_h2"), (out, grad_h1, grad_h2), want):
        assert_equal(name, got, ref)


def test_backward_keeps_only_h1_and_h2():
    h1, h2, _ = make_inputs((16, 24), torch.float32, DEVICE)
    h1.requires_grad_(True)
    h2.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        glu(h1, h2, "gelu")
    assert len(saved) == 2, f"{len(saved)} tensors saved for the backward"
    assert {t.data_ptr() for t in saved} == {h1.data_ptr(), h2.data_ptr()}


def test_compile_fullgraph():
    h1, h2, grad = make_inputs((16, 24), torch.float32, DEVICE)
    fn = torch.compile(lambda a, b: glu(a, b, "gelu_tanh"), fullgraph=True, backend="aot_eager")
    h1c, h2c = h1.clone().requires_grad_(True), h2.clone().requires_grad_(True)
    out = fn(h1c, h2c)
    out.backward(grad)
    want = run_glu(h1, h2, grad, "gelu_tanh")
    for name, got, ref in zip(("out", "grad_h1", "grad_h2"), (out, h1c.grad, h2c.grad), want):
        assert_equal(name, got, ref)


# --------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input():
    h = torch.randn(4, 6, device=DEVICE)
    cases = [
        ((h, h[:, :5], "silu"), ValueError, r"h2: expected the shape of h1 \(4, 6\), got \(4, 5\)"),
        ((h, h.half(), "silu"), TypeError, "h2: expected the dtype of h1"),
        ((h.int(), h.int(), "silu"), TypeError, r"h1: expected dtype in \(float32, float16, bfloat16\), got int32"),
        ((h.tolist(), h, "silu"), TypeError, "h1: expected a torch.Tensor, got list"),
        ((h, h, "swish"), ValueError,
         r"activation: expected one of \('silu', 'gelu', 'gelu_tanh', 'relu', 'clamped_swiglu'\), got 'sw"),
        ((h, h, F.silu), TypeError, "activation: expected a str, got function"),
    ]
    for args, error, match in cases:
        with pytest.raises(error, match=match):
            glu(*args)
    if DEVICE == "cuda":
        with pytest.raises(ValueError, match="h2: expected a tensor on"):
            glu(h, h.cpu(), "silu")


# --------------------------------------------------------------------------------------------------
# The expert MLP: which activations take the fused op, and that it computes what they compute.

RECOGNISED = [
    (F.silu, "silu"),
    (F.relu, "relu"),
    (torch.relu, "relu"),
    (F.gelu, "gelu"),
    (functools.partial(F.gelu, approximate="none"), "gelu"),
    (functools.partial(F.gelu, approximate="tanh"), "gelu_tanh"),
    (DEFAULT_ACTIVATION_FN, "gelu_tanh"),
    (torch.nn.SiLU(), "silu"),
    (torch.nn.ReLU(), "relu"),
    (torch.nn.GELU(), "gelu"),
    (torch.nn.GELU(approximate="tanh"), "gelu_tanh"),
    (clamped_swiglu, "clamped_swiglu"),
]
UNRECOGNISED = [
    torch.tanh,
    lambda x: F.silu(x),
    functools.partial(F.gelu, approximate="bogus"),
    functools.partial(F.silu, inplace=False),
    torch.nn.Tanh(),
    lambda gate, up: clamped_swiglu(gate, up),
]


@pytest.mark.parametrize("fn, name", RECOGNISED, ids=[n for _, n in RECOGNISED])
def test_fused_name_recognises(fn, name):
    assert fused_name(fn) == name
    h1, h2, _ = make_inputs((8, 12), torch.float32, DEVICE)
    assert_close(f"glu {name} vs {fn}", glu(h1, h2, name), gated_product(fn, h1, h2))


def test_fused_name_refuses_others():
    for fn in UNRECOGNISED:
        assert fused_name(fn) is None, fn
    hooked = torch.nn.SiLU()
    hooked.register_forward_hook(lambda *args: None)
    assert fused_name(hooked) is None


@pytest.mark.parametrize("memory_optimized", [False, True])
@pytest.mark.parametrize("activation", GATE_ACTIVATIONS)
def test_expert_ffn_fused_matches_unfused(activation, memory_optimized, monkeypatch):
    calls = []
    monkeypatch.setattr(mlp_module, "glu", lambda *a: calls.append(a[2]) or glu(*a))
    x, w1, v1, w2 = (torch.randn(n, 16, device=DEVICE) for n in (10, 24, 24, 24))
    results = []
    for fn in (TORCH_ACTS[activation], lambda t: TORCH_ACTS[activation](t)):  # fused, then unfused
        leaves = [t.clone().requires_grad_(True) for t in (x, w1, v1, w2)]
        out = mlp_module.expert_ffn(
            *leaves, up=lambda a, w: a @ w.t(), down=lambda a, w: a @ w,
            activation_fn=fn, memory_optimized=memory_optimized,
        )
        out.backward(torch.ones_like(out))
        results.append((out, *(t.grad for t in leaves)))
    assert calls and set(calls) == {activation}, calls
    for name, fused, unfused in zip(("out", "grad x", "grad w1", "grad v1", "grad w2"), *results):
        assert_close(name, fused, unfused)


@pytest.mark.parametrize("memory_optimized", [False, True])
def test_expert_ffn_clamped_swiglu(memory_optimized, monkeypatch):
    """The clamped SwiGLU (a GLU activation, fused only) in the expert MLP, with biases added to
    both up projections and the down projection, against the plain product in float64: forward
    and every gradient."""
    calls = []
    monkeypatch.setattr(mlp_module, "glu", lambda *a: calls.append(a[2]) or glu(*a))
    x, w1, v1, w2 = (torch.randn(n, 16, device=DEVICE) for n in (10, 24, 24, 24))
    b1, bv1, b2 = (4 * torch.randn(n, device=DEVICE) for n in (24, 24, 16))  # clamps active
    leaves = [t.clone().requires_grad_(True) for t in (x, w1, v1, w2, b1, bv1, b2)]
    out = mlp_module.expert_ffn(
        *leaves[:4], up=lambda a, w: a @ w.t(), down=lambda a, w: a @ w, activation_fn=clamped_swiglu,
        memory_optimized=memory_optimized, biases=leaves[4:], up_bias=lambda h, b: h + b, down_bias=lambda y, b: y + b,
    )
    grad = torch.randn_like(out)
    out.backward(grad)
    assert calls and set(calls) == {"clamped_swiglu"}, calls  # the fused op (recomputed when memory-optimized)
    ref_leaves = [t.double().requires_grad_(True) for t in (x, w1, v1, w2, b1, bv1, b2)]
    rx, rw1, rv1, rw2, rb1, rbv1, rb2 = ref_leaves
    ref = gpt_oss_glu(rx @ rw1.t() + rb1, rx @ rv1.t() + rbv1) @ rw2 + rb2
    ref.backward(grad.double())
    assert_close("out", out, ref)
    for name, leaf, ref_leaf in zip(("x", "w1", "v1", "w2", "b1", "bv1", "b2"), leaves, ref_leaves):
        assert_close(f"grad {name}", leaf.grad, ref_leaf.grad)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [d for d in FLOAT_DTYPES if d != torch.bfloat16 or DEVICE == "cuda"], ids=str)
@pytest.mark.parametrize("rows, cols, pad", [(37, 136, 0), (5, 1, 3), (0, 8, 0), (300, 24, 8)])
def test_glu_halves_in_place(activation, dtype, rows, cols, pad):
    """The halves of one [R, 2C] buffer (row stride 2C + pad): the forward bitwise `glu_forward` of
    the two halves, the backward bitwise `glu_backward`, written over the buffer and nothing else."""
    from megablocks.backend import activation as kernels

    gen = torch.Generator().manual_seed(rows * 7 + cols)
    base = (torch.randn(rows, 2 * cols + pad, generator=gen) * 3).to(DEVICE, dtype)
    base[:, :1] = float("nan") if rows else 0.0
    h = base[:, :2 * cols]
    grad = torch.randn(rows, cols, generator=gen).to(DEVICE, dtype)
    h1, h2 = h[:, :cols].contiguous(), h[:, cols:].contiguous()
    assert_equal("halves forward", kernels.glu_halves_forward(h, activation), kernels.glu_forward(h1, h2, activation))
    want_h1, want_h2 = kernels.glu_backward(grad, h1, h2, activation)
    tail = base[:, 2 * cols:].clone()
    out = kernels.glu_halves_backward_(grad, h, activation)
    assert out.data_ptr() == h.data_ptr()
    assert_equal("halves grad h1", h[:, :cols], want_h1)
    assert_equal("halves grad h2", h[:, cols:], want_h2)
    assert_equal("untouched padding", base[:, 2 * cols:], tail)
