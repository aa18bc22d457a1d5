"""dMoE with `Arguments(fp8='blockwise')`: the grouped path's expert products in FP8.

Each FP8 product is checked against its definition in tests/ops/test_fp8.py; here the layer's
wiring: the output and every gradient against the same layer without FP8 within FP8's error
(and measurably off it: the FP8 products did run), the gradients in their parameters' layout,
each weight quantized once per optimizer step, and the arguments refused where the recipe does
not run.
"""

import dataclasses
import pytest
import torch
import torch.nn.functional as F

from megablocks.layers.dmoe import dMoE
from megablocks.ops import fp8
from tests.conftest import DEVICE
from tests.layers.moe_reference import make_args

DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _pair(mlp_type, dtype, hidden_size=160, ffn_hidden_size=136, **kw):
    size = dict(hidden_size=hidden_size, ffn_hidden_size=ffn_hidden_size, moe_num_experts=4, moe_top_k=2)
    act = dict(activation_fn=F.silu) if mlp_type == "glu" else {}
    plain = dMoE(make_args("triton", dtype, mlp_type=mlp_type, **size, **act, **kw))
    quant = dMoE(make_args("triton", dtype, mlp_type=mlp_type, fp8="blockwise", **size, **act, **kw))
    quant.load_state_dict(plain.state_dict())
    return plain, quant


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mlp_type, extra", [("mlp", {}), ("glu", {}), ("glu", dict(moe_expert_bias=True)),
                                             ("mlp", dict(memory_optimized_mlp=True))],
                         ids=["mlp", "glu", "glu-biases", "mlp-memory-optimized"])
def test_fp8_dmoe_against_the_unquantized_layer(mlp_type, extra, dtype):
    plain, quant = _pair(mlp_type, dtype, **extra)
    x = torch.randn(2, 23, 160, device=DEVICE, dtype=dtype)
    grad = torch.randn(2, 23, 160, device=DEVICE, dtype=dtype)
    results = []
    for layer in (plain, quant):
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        out.backward(grad)
        params = {n: p.grad for n, p in layer.named_parameters()}
        results.append((out, xi.grad, params))
    (out_p, dx_p, g_p), (out_q, dx_q, g_q) = results
    # e4m3 keeps 3 mantissa bits: ~4% per product (tests/ops/test_fp8.py), two products in a
    # row here (the weight gradient unquantized, fp8_gmm's default). Measured (fp32, CPU): out
    # 5.4% (MLP) / 6.5% (GLU), input gradient 6.1% / 7.2%, weight and bias gradients at most 7.2%
    # relative (Frobenius) error; with fp8_wgrad=True at most 7.1%.
    assert 1e-3 < _rel(out_q, out_p) < 0.09, _rel(out_q, out_p)
    assert 1e-3 < _rel(dx_q, dx_p) < 0.10, _rel(dx_q, dx_p)
    for name, g in g_p.items():
        assert g_q[name] is not None, name
        if g.any():
            assert _rel(g_q[name], g) < 0.10, (name, _rel(g_q[name], g))
        else:  # the output bias's gradient does not pass through the experts: equal
            assert torch.equal(g_q[name], g), name
        p = quant.get_parameter(name)
        assert g_q[name].stride() == p.stride(), (name, g_q[name].stride(), p.stride())


def test_weights_quantized_once_per_step(monkeypatch):
    calls = []
    real = fp8.quantize_blocks
    monkeypatch.setattr(fp8, "quantize_blocks", lambda w, **kw: calls.append(tuple(w.shape)) or real(w, **kw))
    # A small layer: what is counted does not depend on its size (the products' values are
    # checked above).
    _, layer = _pair("glu", torch.float32, hidden_size=48, ffn_hidden_size=40)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for _ in range(2):  # two micro-batches
        layer(torch.randn(1, 9, 48, device=DEVICE)).square().mean().backward()
    assert len(calls) == 3  # w1, v1, w2: once
    opt.step()
    layer(torch.randn(1, 9, 48, device=DEVICE)).square().mean().backward()
    assert len(calls) == 6


@pytest.mark.parametrize("mlp_type, ffn, one_node", [("glu", 128, True), ("glu", 40, True), ("glu", 128, False),
                                                    ("mlp", 40, True)],
                         ids=["node-stacked", "node-apart", "composed", "mlp"])
def test_quantized_in_inference_mode_then_trained(mlp_type, ffn, one_node):
    """Weights first quantized under `torch.inference_mode()` (an evaluation) are cached as
    ordinary tensors: a training step that finds them cached saves them for its backward, and its
    output and gradients equal those of a layer that never ran in inference mode."""
    from megablocks.policy import KernelPolicy

    plain, layer = _pair(mlp_type, torch.float32, hidden_size=48, ffn_hidden_size=ffn)
    fresh = dMoE(layer.args)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(2, 5, 48, device=DEVICE)
    results = []
    for module, evaluate in ((layer, True), (fresh, False)):
        module.args.kernel_policy = KernelPolicy(one_node_experts=one_node)
        if evaluate:
            with torch.inference_mode():
                module(x)
        xg = x.clone().requires_grad_(True)
        out = module(xg)
        out.square().sum().backward()
        results.append((out.detach(), xg.grad, [p.grad for p in module.experts.mlp.parameters()]))
    (out_a, gx_a, gw_a), (out_b, gx_b, gw_b) = results
    assert torch.equal(out_a, out_b) and torch.equal(gx_a, gx_b)
    assert all(torch.equal(a, b) for a, b in zip(gw_a, gw_b))


@pytest.mark.parametrize("mlp_type, ffn, one_node", [("glu", 128, True), ("glu", 40, True), ("glu", 128, False),
                                                    ("mlp", 40, True)],
                         ids=["node-stacked", "node-apart", "composed", "mlp"])
def test_inference_holds_the_forward_forms(mlp_type, ffn, one_node):
    """Without a gradient to record, the weight cache makes and holds only the form of each weight
    that the forward reads (each e4m3 value once, where training holds each stored both ways), and
    the output is bitwise a training forward's; a training step after it makes the other forms,
    its output and gradients bitwise those of a layer that only trained, and the cache then holds
    what that layer's holds."""
    from megablocks.policy import KernelPolicy

    E, H = 4, 48
    _, layer = _pair(mlp_type, torch.float32, hidden_size=H, ffn_hidden_size=ffn)
    trained = dMoE(layer.args)
    trained.load_state_dict(layer.state_dict())
    layer.args.kernel_policy = KernelPolicy(one_node_experts=one_node)
    weights = 3 if mlp_type == "glu" else 2
    values, scales = weights * E * ffn * H, weights * 4 * E * -(-ffn // 128) * -(-H // 128)
    x = torch.randn(2, 5, H, device=DEVICE)
    with torch.no_grad():
        inferred = layer(x)
    cache = layer.experts.mlp._fp8_weights
    assert cache.nbytes() == values + scales, (cache.nbytes(), values, scales)
    results = []
    for module in (layer, trained):
        xg = x.clone().requires_grad_(True)
        out = module(xg)
        out.square().sum().backward()
        results.append((out.detach(), xg.grad, [p.grad for p in module.experts.mlp.parameters()]))
        assert module.experts.mlp._fp8_weights.nbytes() == 2 * values + scales
    (out_a, gx_a, gw_a), (out_b, gx_b, gw_b) = results
    assert torch.equal(inferred, out_b) and torch.equal(out_a, out_b) and torch.equal(gx_a, gx_b)
    assert all(torch.equal(a, b) for a, b in zip(gw_a, gw_b))


@pytest.mark.parametrize("mlp_type", ["glu", "mlp"])
def test_fp8_layer_compiles(mlp_type):
    """Under `torch.compile` (not fullgraph: each FP8 product runs eagerly, a graph break, its
    weight cache being Python state) the FP8 layer computes bitwise what the eager layer computes
    on the same composed FP8 ops, in training (output and every gradient) and in inference."""
    from megablocks.policy import KernelPolicy

    _, layer = _pair(mlp_type, torch.float32, hidden_size=48, ffn_hidden_size=128)
    layer.args.kernel_policy = KernelPolicy(one_node_experts=False)
    x = torch.randn(2, 5, 48, device=DEVICE)
    compiled = torch.compile(layer, backend="aot_eager")
    results = []
    for module in (layer, compiled):
        layer.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        out = module(xg)
        out.square().sum().backward()
        results.append((out.detach(), xg.grad, [p.grad for p in layer.parameters()]))
        with torch.no_grad():
            results[-1] += (module(x),)
    (out_a, gx_a, gw_a, inf_a), (out_b, gx_b, gw_b, inf_b) = results
    assert torch.equal(out_a, out_b) and torch.equal(gx_a, gx_b) and torch.equal(inf_a, inf_b)
    assert all(torch.equal(a, b) for a, b in zip(gw_a, gw_b)) and len(gw_a) > 2


def test_copied_layer_quantizes():
    """A deep copy of an FP8 layer (an EMA or evaluation copy) starts with an empty weight cache of
    the same kind and computes what the layer computes."""
    import copy

    _, layer = _pair("glu", torch.float32, hidden_size=48, ffn_hidden_size=128)
    x = torch.randn(2, 5, 48, device=DEVICE)
    out = layer(x)
    twin = copy.deepcopy(layer)
    assert twin.experts.mlp._fp8_weights.nbytes() == 0
    twin_out = twin(x)
    twin_out.sum().backward()
    assert torch.equal(twin_out, out) and twin.experts.mlp.w1.grad.abs().sum() > 0


def test_fp8_arguments():
    with pytest.raises(ValueError, match="mlp_impl='grouped' \\(or 'auto'\\); the block-sparse path has no FP8"):
        make_args("sparse", fp8="blockwise")
    # 'auto' resolves to the grouped path, which runs FP8.
    auto = dataclasses.replace(make_args("triton"), mlp_impl="auto", fp8="blockwise")
    assert auto.mlp_impl == "grouped" and auto.fp8 == "blockwise"
    with pytest.raises(ValueError, match="fp8"):
        make_args("triton", fp8="tensorwise")
    assert make_args("triton").fp8 is None
