"""dMoE's grouped GLU experts in training as one autograd node (`KernelPolicy.one_node_experts`,
megablocks/ops/grouped_glu.py).

The node runs the composed ops' kernels with the same arguments, so with it on the layer must
give bitwise the output and every gradient it gives with it off (x, router, w1, v1, w2, bias),
plain and memory-optimized, at hostile shapes; the per-expert reference must agree too; the
experts module is still called (its hooks run); and the node must be taken exactly where its
conditions hold (one call, one autograd node for the experts), and nowhere else.
"""

import pytest
import torch

from megablocks.layers import mlp as mlp_module
from megablocks.layers.dmoe import dMoE
from megablocks.policy import KernelPolicy
from tests.conftest import DEVICE, FLOAT_DTYPES
from tests.layers.moe_reference import GRAD_NAMES, check_against_reference, layer_grads, make_args, randomize_bias
from tests.layers.test_dmoe import SHAPES
from tests.utils import assert_equal


def _count(monkeypatch, name="grouped_glu_experts"):
    """The grad_fn of each call of the experts module's `name` (the one-node op), as they come."""
    calls = []
    fn = getattr(mlp_module, name)

    def counted(*args, **kwargs):
        out = fn(*args, **kwargs)
        calls.append(out.grad_fn)
        return out

    monkeypatch.setattr(mlp_module, name, counted)
    return calls


def _layer(shape_kw=None, dtype=torch.float32, **kw):
    args = make_args("triton", dtype, mlp_type="glu", **(shape_kw or {}), **kw)
    layer = dMoE(args)
    randomize_bias(layer)
    return layer


def _step(layer, x, grad_out):
    xi = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    out = layer(xi)
    out.backward(grad_out)
    return out.detach(), layer_grads(layer, xi)


@pytest.mark.parametrize("memory_optimized", [False, True], ids=["plain", "memory_optimized"])
@pytest.mark.parametrize("dtype", [d for d in FLOAT_DTYPES if d != torch.bfloat16] + (
    [torch.bfloat16] if DEVICE == "cuda" else []))
@pytest.mark.parametrize("shape", SHAPES)
def test_one_node_is_bitwise_the_composed_ops(shape, dtype, memory_optimized, monkeypatch):
    T, lead, H, Fs, E, K, routing = shape
    layer = _layer(dict(hidden_size=H, ffn_hidden_size=Fs, moe_num_experts=E, moe_top_k=K), dtype,
                   memory_optimized_mlp=memory_optimized, moe_normalize_expert_weights=1 if K > 1 else None)
    gen = torch.Generator(device=DEVICE).manual_seed(T * 131 + H)
    x = torch.randn(*lead, H, device=DEVICE, dtype=dtype, generator=gen)
    grad_out = torch.randn(*lead, H, device=DEVICE, dtype=dtype, generator=gen)
    calls = _count(monkeypatch)
    results = {}
    for on in (False, True):
        layer.args.kernel_policy = KernelPolicy(one_node_experts=on)
        results[on] = _step(layer, x, grad_out)
        assert len(calls) == int(on), f"one_node_experts={on}: {len(calls)} one-node calls"
    assert type(calls[0]).__name__ == "_GroupedGluExpertsBackward", calls[0]
    assert_equal("out", results[True][0], results[False][0])
    for name in GRAD_NAMES:
        if results[False][1][name] is not None:
            assert_equal(f"grad {name}", results[True][1][name], results[False][1][name])


@pytest.mark.parametrize("shape", SHAPES)
def test_one_node_matches_reference(shape, monkeypatch):
    T, lead, H, Fs, E, K, routing = shape
    layer = _layer(dict(hidden_size=H, ffn_hidden_size=Fs, moe_num_experts=E, moe_top_k=K))
    calls = _count(monkeypatch)
    x = torch.randn(*lead, H, device=DEVICE, requires_grad=True)
    check_against_reference(layer, x)
    assert len(calls) == 1, calls


def test_one_node_no_tokens(monkeypatch):
    layer = _layer()
    calls = _count(monkeypatch)
    x = torch.randn(0, 3, 40, device=DEVICE, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    assert len(calls) == 1
    assert x.grad.shape == x.shape
    for p in (layer.experts.mlp.w1, layer.experts.mlp.v1, layer.experts.mlp.w2):
        assert p.grad is not None and p.grad.shape == p.shape and p.grad.abs().max() == 0


def test_frozen_experts_get_no_gradient(monkeypatch):
    """Only the gradients asked for: frozen expert weights get none, x and the router still do."""
    layer = _layer()
    experts = (layer.experts.mlp.w1, layer.experts.mlp.v1, layer.experts.mlp.w2)
    for p in experts:
        p.requires_grad_(False)
    calls = _count(monkeypatch)
    x = torch.randn(4, 2, 40, device=DEVICE)
    grad_out = torch.randn(4, 2, 40, device=DEVICE)
    results = {}
    for on in (True, False):
        layer.args.kernel_policy = KernelPolicy(one_node_experts=on)
        xi = x.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        out = layer(xi)
        out.backward(grad_out)
        assert all(p.grad is None for p in experts)
        results[on] = (out.detach(), xi.grad, layer.router.layer.weight.grad, layer.experts.bias.grad)
    assert len(calls) == 1
    for name, on, off in zip(("out", "grad x", "grad router", "grad bias"), results[True], results[False]):
        assert_equal(name, on, off)


def _takes_one_node(layer, x, monkeypatch, grad=True):
    calls = _count(monkeypatch)
    with torch.set_grad_enabled(grad):
        layer(x)
    monkeypatch.undo()
    return len(calls) == 1


def test_where_the_one_node_is_taken(monkeypatch):
    """GLU experts reading the token rows, a fused activation, the Triton kernels, a gradient to
    record; not with biases, FP8-free paths aside, other backends, the MLP, an unfused activation,
    the policy off, no grad, or fused gradient accumulation (main_grad)."""
    x = torch.randn(4, 2, 40, device=DEVICE, requires_grad=True)
    assert _takes_one_node(_layer(), x, monkeypatch)
    assert not _takes_one_node(_layer(), x, monkeypatch, grad=False)
    assert not _takes_one_node(_layer(kernel_policy=KernelPolicy(one_node_experts=False)), x, monkeypatch)
    assert not _takes_one_node(_layer(kernel_policy=KernelPolicy(fused_gather=False)), x, monkeypatch)
    assert not _takes_one_node(_layer(moe_expert_bias=True), x, monkeypatch)
    assert not _takes_one_node(_layer(activation_fn=lambda t: torch.nn.functional.silu(t)), x, monkeypatch)
    assert not _takes_one_node(dMoE(make_args("triton", mlp_type="mlp")), x, monkeypatch)
    torch_layer = dMoE(make_args("torch", mlp_type="glu"))
    if torch_layer.args.gmm_backend == "torch":
        assert not _takes_one_node(torch_layer, x, monkeypatch)
    fused = _layer()
    for p in (fused.experts.mlp.w1, fused.experts.mlp.v1, fused.experts.mlp.w2):
        p.main_grad = torch.zeros(p.shape, dtype=torch.float32, device=DEVICE)
    assert not _takes_one_node(fused, x, monkeypatch)
    # A frozen layer given an input without grad records nothing: no node.
    frozen = _layer()
    for p in frozen.parameters():
        p.requires_grad_(False)
    assert not _takes_one_node(frozen, x.detach(), monkeypatch)
    # Up to `one_node_experts_max_rows` routed rows (T·K: here 8 tokens, top-2, 16 rows).
    assert _takes_one_node(_layer(kernel_policy=KernelPolicy(one_node_experts_max_rows=16)), x, monkeypatch)
    assert not _takes_one_node(_layer(kernel_policy=KernelPolicy(one_node_experts_max_rows=15)), x, monkeypatch)


def test_one_node_leaves_gradients_in_their_parameters_layout(monkeypatch):
    layer = _layer()
    calls = _count(monkeypatch)
    x = torch.randn(4, 2, 40, device=DEVICE, requires_grad=True)
    grads = torch.autograd.grad(layer(x).sum(), [layer.experts.mlp.w1, layer.experts.mlp.v1, layer.experts.mlp.w2])
    assert len(calls) == 1
    for g, p in zip(grads, (layer.experts.mlp.w1, layer.experts.mlp.v1, layer.experts.mlp.w2)):
        assert g.shape == p.shape and g.stride() == p.stride(), (g.shape, g.stride(), p.stride())



def test_the_experts_module_is_still_called(monkeypatch):
    """Hooks on the experts module (FSDP's unsharding, user hooks) see the call and its output,
    the expert-ordered rows, as on the composed path."""
    layer = _layer(dict(moe_top_k=2))
    seen = []
    layer.experts.mlp.register_forward_pre_hook(lambda module, inputs: seen.append(("pre", inputs[0].shape)))
    layer.experts.mlp.register_forward_hook(lambda module, inputs, out: seen.append(("post", out.shape)))
    calls = _count(monkeypatch)
    x = torch.randn(5, 2, 40, device=DEVICE, requires_grad=True)
    layer(x).sum().backward()
    assert len(calls) == 1
    assert seen == [("pre", (10, 40)), ("post", (20, 40))], seen
