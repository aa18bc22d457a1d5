"""dMoE's inference form (`KernelPolicy.inference_form`, `megablocks.ops.glu_experts`):
the grouped GLU path's forward without autograd, against the naive reference and against the
layer's own autograd forward, at hostile shapes; where it is taken and where it is not; and the
op itself against its per-token loop.
"""

import functools

import pytest
import torch
import torch.nn.functional as F

from megablocks.backend import routing as backend_routing
from megablocks.layers import dmoe as dmoe_module
from megablocks.layers.dmoe import dMoE
from megablocks.ops import experts as experts_module
from megablocks.ops.activation import clamped_swiglu
from megablocks.ops.experts import glu_experts, glu_experts_reference
from tests.conftest import DEVICE, FLOAT_DTYPES
from tests.layers.moe_reference import (
    capture_routing,
    layer_params,
    make_args,
    randomize_bias,
    randomize_expert_biases,
    reference_moe,
    route_all_to,
)
from tests.utils import assert_close, assert_equal

# (lead dims of x, H, F, E, K, routing)
SHAPES = [
    pytest.param(((8, 2), 40, 24, 4, 2, "random"), id="H,F-not-multiples-of-tiles"),
    pytest.param(((1, 1), 48, 40, 4, 1, "random"), id="one-token-empty-experts"),
    pytest.param(((6,), 40, 24, 3, 3, "random"), id="topk=E-2d-input"),
    pytest.param(((2, 2, 2), 40, 24, 4, 2, "one"), id="all-on-one-expert-4d-input"),
]

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu": torch.nn.ReLU(),
}


@pytest.fixture
def spy(monkeypatch):
    """Counts the layer's calls of `glu_experts` (the inference form)."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return glu_experts(*args, **kwargs)

    monkeypatch.setattr(dmoe_module, "glu_experts", counted)
    return calls


def _glu_layer(dtype=torch.float32, impl="triton", **kw) -> dMoE:
    layer = dMoE(make_args(impl, dtype, mlp_type="glu", **kw))
    randomize_bias(layer)
    return layer


def _reference(layer, x):
    p = layer_params(layer)
    args = layer.args
    with torch.no_grad():
        out, top_experts, counts = reference_moe(
            x.detach().float().cpu(), p["router"], p["w1"], p["v1"], p["w2"], p["bias"], top_k=args.moe_top_k,
            activation_fn=args.activation_fn, normalize=args.moe_normalize_expert_weights,
            router_bias=p["router_bias"], w1_bias=p["w1_bias"], v1_bias=p["v1_bias"], w2_bias=p["w2_bias"],
        )
    return out, top_experts, counts


@pytest.mark.parametrize("impl", ["triton", "sparse"])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("shape", SHAPES)
def test_inference_form_matches_reference(shape, activation, impl, spy):
    """Both dMoE paths (the same parameters) take the inference form without autograd."""
    lead, H, Fs, E, K, routing = shape
    layer = _glu_layer(impl=impl, hidden_size=H, ffn_hidden_size=Fs, moe_num_experts=E, moe_top_k=K,
                       activation_fn=ACTIVATIONS[activation])
    if routing == "one":
        route_all_to(layer, 2)
        x = torch.rand(*lead, H, device=DEVICE) + 0.5
    else:
        x = torch.randn(*lead, H, device=DEVICE)
    seen = capture_routing(layer)
    with torch.no_grad():
        out = layer(x)
    assert len(spy) == 1, "the forward without autograd did not take the inference form"
    ref, top_experts, counts = _reference(layer, x)
    assert_equal("top_experts", seen["top_experts"].cpu(), top_experts)
    assert_equal("tokens_per_expert", layer.experts.tokens_per_expert.cpu().long(), counts)
    assert layer.experts.tokens_per_expert.dtype == torch.int32
    assert_close("out", out, ref)
    # The same layer with autograd: the training path, the same values.
    trained = layer(x.clone().requires_grad_(True))
    assert len(spy) == 1, "a forward that records a gradient must not take the inference form"
    assert_close("out against the autograd forward", out, trained)


@pytest.mark.parametrize("dtype", [d for d in FLOAT_DTYPES if d != torch.float32])
def test_inference_form_low_precision(dtype, spy):
    layer = _glu_layer(dtype, moe_normalize_expert_weights=1, moe_num_experts=8, moe_top_k=3)
    x = torch.randn(9, 3, 40, device=DEVICE, dtype=dtype)
    with torch.inference_mode():
        out = layer(x)
    assert len(spy) == 1 and out.dtype == dtype
    assert_close("out", out, _reference(layer, x)[0], dtype=dtype)


def test_inference_form_past_one_routing_program(monkeypatch, spy):
    """Past the one-program routing's sizes: the sorted routing (key kernel, sort, maps kernel),
    the same result."""
    layer = _glu_layer(moe_num_experts=5, moe_top_k=2)
    x = torch.randn(13, 40, device=DEVICE)
    with torch.no_grad():
        small = layer(x)
    monkeypatch.setattr(backend_routing, "SMALL_ROUTING_MAX_ROWS", 8)
    with torch.no_grad():
        routed = layer(x)
    assert len(spy) == 2
    assert_equal("out", routed, small)
    assert_close("out against the reference", routed, _reference(layer, x)[0])
    layer.args.moe_top_k = layer.experts.top_k = 1  # K = 1: the row map is the token map
    with torch.no_grad():
        out = layer(x)
    assert_close("out (K = 1)", out, _reference(layer, x)[0])


def test_inference_form_with_bias_options_and_shared_expert(spy):
    for kw in (dict(return_bias=True), dict(bias=False), dict(shared_expert=True, shared_expert_hidden_size=16)):
        layer = dMoE(make_args("triton", mlp_type="glu", **kw))
        if layer.experts.bias is not None:
            randomize_bias(layer)
        x = torch.randn(5, 2, 40, device=DEVICE)
        with torch.no_grad():
            out = layer(x)
        expected = layer(x.clone().requires_grad_(True))
        if isinstance(out, tuple):
            assert out[1] is layer.experts.bias
            out, expected = out[0], expected[0]
        assert_close(f"out {kw}", out, expected)
    assert len(spy) == 3


def test_where_the_inference_form_is_not_taken(monkeypatch, spy):
    x = torch.randn(6, 40, device=DEVICE)
    # Gradients to record: eval mode alone changes nothing.
    layer = _glu_layer().eval()
    layer(x).sum().backward()
    assert layer.experts.mlp.w1.grad is not None
    # An activation the fused kernels do not implement; MLP experts (either path); the torch backend.
    cases = [
        _glu_layer(activation_fn=torch.tanh),
        _glu_layer(impl="sparse", activation_fn=torch.tanh),
        dMoE(make_args("triton", mlp_type="mlp")),
        dMoE(make_args("sparse", mlp_type="mlp")),
    ]
    if DEVICE == "cpu":
        cases.append(dMoE(make_args("torch", mlp_type="glu")))
    for other in cases:
        with torch.no_grad():
            other(x)
    assert not spy
    policy = layer.args.kernel_policy
    layer.args.kernel_policy = policy.replace(inference_form=False)
    with torch.no_grad():
        off = layer(x)
    assert not spy
    layer.args.kernel_policy = policy.replace(inference_form=True)
    with torch.no_grad():
        on = layer(x)
    assert len(spy) == 1
    assert_close("on against off", on, off)
    # No tokens: the general path (which handles T = 0).
    with torch.no_grad():
        empty = layer(torch.randn(0, 2, 40, device=DEVICE))
    assert empty.shape == (0, 2, 40) and len(spy) == 1


@pytest.mark.parametrize("impl", ["triton", "sparse"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], SHAPES[3]])
def test_inference_form_with_expert_biases(shape, impl, spy):
    """gpt-oss's experts in the inference form: the experts' biases added in the GEMMs'
    epilogues, the clamped SwiGLU in the first one's (clamps active), a router bias; against the
    reference and the layer's autograd forward (the training path)."""
    lead, H, Fs, E, K, routing = shape
    layer = _glu_layer(impl=impl, hidden_size=H, ffn_hidden_size=Fs, moe_num_experts=E, moe_top_k=K,
                       activation_fn=clamped_swiglu, moe_expert_bias=True, moe_router_bias=True,
                       moe_normalize_expert_weights=1)
    randomize_expert_biases(layer)
    if routing == "one":
        route_all_to(layer, 2)
        with torch.no_grad():
            layer.router.layer.bias.zero_()
        x = torch.rand(*lead, H, device=DEVICE) + 0.5
    else:
        x = torch.randn(*lead, H, device=DEVICE)
    with torch.no_grad():
        out = layer(x)
    assert len(spy) == 1, "the forward without autograd did not take the inference form"
    ref, _, counts = _reference(layer, x)
    assert_equal("tokens_per_expert", layer.experts.tokens_per_expert.cpu().long(), counts)
    assert_close("out", out, ref, family="layer")
    trained = layer(x.clone().requires_grad_(True))
    assert len(spy) == 1, "a forward that records a gradient must not take the inference form"
    assert_close("out against the autograd forward", out, trained, family="layer")
    for name, p in layer.named_parameters():  # a bias alone that needs a gradient keeps autograd
        p.requires_grad_(name == "experts.mlp.w1_bias")
    layer(x)
    assert len(spy) == 1, "a bias needing a gradient must keep the training path"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_glu_experts_with_biases_against_its_loop(dtype, device):
    T, H, Fs, E, K = 11, 40, 24, 6, 3
    x = torch.randn(T, H, device=device).to(dtype)
    w1, v1, w2 = ((torch.randn(E, Fs, H, device=device) / H**0.5).to(dtype) for _ in range(3))
    biases = tuple((4 * torch.randn(E, n, device=device)).to(dtype) for n in (Fs, Fs, H))
    ids = torch.stack([torch.randperm(E - 1, device=device)[:K] for _ in range(T)])  # the last expert empty
    weights = torch.rand(T, K, device=device)
    out, _ = glu_experts(x, w1, v1, w2, ids, weights, "clamped_swiglu", biases=biases)
    expected = glu_experts_reference(x, w1, v1, w2, ids, weights, clamped_swiglu, biases)
    assert_close("out", out, expected, dtype=dtype, family="layer")


def test_inference_form_compiles_fullgraph(spy):
    layer = _glu_layer()
    x = torch.randn(7, 40, device=DEVICE)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        eager, traced = layer(x), compiled(x)
    assert_close("compiled against eager", traced, eager)


# ------------------------------------------------------------------------------------------------
# The op


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T, H, Fs, E, K", [(1, 16, 8, 3, 1), (11, 40, 24, 6, 6), (33, 24, 40, 9, 2)])
def test_glu_experts_against_its_loop(T, H, Fs, E, K, dtype, device):
    x = torch.randn(T, H, device=device).to(dtype)
    w1, v1, w2 = ((torch.randn(E, Fs, H, device=device) / H**0.5).to(dtype) for _ in range(3))
    ids = torch.stack([torch.randperm(E, device=device)[:K] for _ in range(T)])
    weights = torch.rand(T, K, device=device)
    out, counts = glu_experts(x, w1, v1, w2, ids, weights, "silu")
    assert_equal("counts", counts.cpu().long(), torch.bincount(ids.flatten().cpu(), minlength=E))
    # Two products, the GLU between them and the weighted sum: a whole layer's roundings.
    assert_close("out", out, glu_experts_reference(x, w1, v1, w2, ids, weights, F.silu), dtype=dtype,
                 family="layer")


def test_glu_experts_gathered_rows(monkeypatch, device):
    """Wide experts with many rows per expert read a gathered copy of the token rows: the same
    result as through the row map, with the one-program and the sorted routing."""
    T, H, Fs, E, K = 37, 24, 40, 5, 3
    x = torch.randn(T, H, device=device)
    w1, v1, w2 = (torch.randn(E, Fs, H, device=device) / H**0.5 for _ in range(3))
    ids = torch.stack([torch.randperm(E, device=device)[:K] for _ in range(T)])
    weights = torch.rand(T, K, device=device)
    through_map = glu_experts(x, w1, v1, w2, ids, weights, "gelu")[0]
    taken = []
    gather = experts_module.gather_rows
    monkeypatch.setattr(experts_module, "gather_rows", lambda *a: taken.append(1) or gather(*a))
    wide = dict(gather_min_ffn=Fs - 1, gather_min_rows_per_expert=T * K // E)
    gathered = glu_experts(x, w1, v1, w2, ids, weights, "gelu", **wide)[0]
    monkeypatch.setattr(backend_routing, "SMALL_ROUTING_MAX_ROWS", 8)
    gathered_sorted = glu_experts(x, w1, v1, w2, ids, weights, "gelu", **wide)[0]
    assert taken == [1, 1], "the gathered copy was not taken"
    assert_equal("gathered rows", gathered, through_map)
    assert_equal("gathered rows, sorted routing", gathered_sorted, through_map)
    glu_experts(x, w1, v1, w2, ids, weights, "gelu", gather_min_ffn=Fs,  # F not wider: through the map
                gather_min_rows_per_expert=T * K // E)
    assert taken == [1, 1]
