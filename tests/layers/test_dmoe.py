"""dMoE against a naive per-expert loop: output and the gradients of x, router, w1, v1, w2, bias.

Every mlp_type × implementation (block-sparse, grouped GEMM with each backend) runs at hostile
shapes: H and F not multiples of the block, one token, empty experts, top_k = E, every token's
first choice on one expert, and no tokens at all. The reference (tests/layers/moe_reference.py)
computes in fp32 on the CPU from the layer's own parameters.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from megablocks.layers import mlp as mlp_module
from megablocks.layers.activation_fn import fused_name
from megablocks.layers.dmoe import dMoE
from megablocks.layers.losses import MoELossCollector
from megablocks.layers.moe import MoE
from megablocks.ops.activation import clamped_swiglu
from tests.conftest import DEVICE, FLOAT_DTYPES
from tests.layers.moe_reference import (
    BIAS_GRAD_NAMES,
    GRAD_NAMES,
    IMPLS,
    check_against_reference,
    layer_grads,
    make_args,
    randomize_bias,
    randomize_expert_biases,
    route_all_to,
    skip_unavailable,
)
from tests.utils import assert_close, assert_equal

# (T, lead dims of x, H, F, E, K, routing)
SHAPES = [
    pytest.param((16, (8, 2), 40, 24, 4, 2, "random"), id="H,F-not-multiples-of-block"),
    pytest.param((1, (1, 1), 48, 40, 4, 1, "random"), id="one-token-empty-experts"),
    pytest.param((6, (6,), 40, 24, 3, 3, "random"), id="topk=E-2d-input"),
    pytest.param((8, (2, 2, 2), 40, 24, 4, 2, "one"), id="all-on-one-expert-4d-input"),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mlp_type", ["mlp", "glu"])
def test_dmoe_matches_reference(mlp_type, impl, shape):
    skip_unavailable(impl, torch.float32)
    T, lead, H, Fs, E, K, routing = shape
    layer = dMoE(make_args(impl, hidden_size=H, ffn_hidden_size=Fs, moe_num_experts=E, moe_top_k=K, mlp_type=mlp_type))
    randomize_bias(layer)
    if routing == "one":
        route_all_to(layer, 2)
        x = (torch.rand(*lead, H, device=DEVICE) + 0.5).requires_grad_(True)
    else:
        x = torch.randn(*lead, H, device=DEVICE, requires_grad=True)
    top_experts = check_against_reference(layer, x)
    if routing == "one":
        assert bool((top_experts[:, 0] == 2).all()), "the routing did not put every first choice on expert 2"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [d for d in FLOAT_DTYPES if d != torch.float32])
def test_dmoe_low_precision(dtype, impl):
    skip_unavailable(impl, dtype)
    layer = dMoE(make_args(impl, dtype, mlp_type="glu", moe_normalize_expert_weights=1))
    randomize_bias(layer)
    x = torch.randn(8, 2, 40, device=DEVICE, dtype=dtype, requires_grad=True)
    check_against_reference(layer, x, dtype=dtype, top_experts_from_layer=True)


@pytest.mark.parametrize("mlp_type", ["mlp", "glu"])
def test_sparse_equals_grouped(mlp_type):
    sparse = dMoE(make_args("sparse", mlp_type=mlp_type, moe_top_k=3))
    grouped = dMoE(make_args("triton", mlp_type=mlp_type, moe_top_k=3))
    randomize_bias(sparse)
    grouped.load_state_dict(sparse.state_dict())
    x = torch.randn(12, 40, device=DEVICE)
    outs, grads = [], []
    for layer in (sparse, grouped):
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        out.backward(torch.ones_like(out))
        outs.append(out)
        grads.append(layer_grads(layer, xi))
    assert_close("out", outs[1], outs[0])
    for name in GRAD_NAMES:
        if grads[0][name] is not None:
            assert_close(f"grad {name}", grads[1][name], grads[0][name])


@pytest.mark.parametrize("kind", ["sparse", "triton", "moe"])
def test_no_tokens(kind):
    args = make_args("sparse" if kind == "sparse" else "triton", moe_capacity_factor=0)
    layer = MoE(args) if kind == "moe" else dMoE(args)
    x = torch.randn(0, 3, 40, device=DEVICE, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert_equal("grad w1", layer.experts.mlp.w1.grad, torch.zeros_like(layer.experts.mlp.w1))
    assert_equal("tokens_per_expert", layer.experts.tokens_per_expert.cpu(), torch.zeros(4, dtype=torch.int32))


def test_custom_activation_and_normalized_weights():
    layer = dMoE(make_args("sparse", activation_fn=F.silu, moe_normalize_expert_weights=2.0, moe_top_k=3))
    randomize_bias(layer)
    check_against_reference(layer, torch.randn(5, 2, 40, device=DEVICE, requires_grad=True))


def test_bias_and_return_bias():
    layer = dMoE(make_args("torch", return_bias=True))
    randomize_bias(layer)
    x = torch.randn(4, 3, 40, device=DEVICE)
    out, bias = layer(x)
    assert bias is layer.experts.bias
    added = dMoE(make_args("torch", return_bias=False))
    added.load_state_dict(layer.state_dict())
    assert_close("out + bias", added(x), out + bias)

    no_bias = dMoE(make_args("torch", bias=False, return_bias=True))
    assert no_bias.experts.bias is None
    assert "experts.bias" not in no_bias.state_dict()
    assert isinstance(no_bias(x), torch.Tensor)


@pytest.mark.parametrize("impl", ["sparse", "triton"])
def test_autocast_with_fp32_parameters(impl):
    # Parameters stay fp32; inputs and weights are cast to the autocast dtype for the experts.
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    layer = dMoE(make_args(impl, mlp_type="glu"))
    randomize_bias(layer)
    x = torch.randn(6, 2, 40, device=DEVICE, requires_grad=True)
    seen_dtype = {}

    def record(module, inputs):
        seen_dtype["x"] = inputs[0].dtype

    layer.experts.mlp.register_forward_pre_hook(record)
    check_against_reference(layer, x, dtype=dtype, top_experts_from_layer=True, autocast=dtype)
    assert seen_dtype["x"] == dtype
    assert layer.experts.mlp.w1.grad.dtype == torch.float32


@pytest.mark.parametrize("impl, mlp_type, gpt_oss", [("sparse", "mlp", False), ("triton", "glu", False),
                                                     ("triton", "glu", True)])
def test_compiles_fullgraph(impl, mlp_type, gpt_oss):
    # No graph break anywhere in the layer, losses included (aot_eager: no C compiler needed);
    # gpt-oss's experts (biases, the clamped SwiGLU, a router bias) too.
    kw = dict(moe_expert_bias=True, moe_router_bias=True, activation_fn=clamped_swiglu) if gpt_oss else {}
    args = make_args(impl, mlp_type=mlp_type, moe_loss_weight=0.1, moe_zloss_weight=0.01,
                     loss_collector=MoELossCollector(), memory_optimized_mlp=True, **kw)
    layer = dMoE(args)
    if gpt_oss:
        randomize_expert_biases(layer)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(7, 40, device=DEVICE)
    results = []
    for module in (layer, compiled):
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        out = module(xi)
        (out.sum() + layer.load_balancing_loss + layer.router_zloss).backward()
        results.append((out, layer_grads(layer, xi)))
    assert_close("out", results[1][0], results[0][0])
    for name in GRAD_NAMES + BIAS_GRAD_NAMES:
        if results[0][1][name] is not None:
            assert_close(f"grad {name}", results[1][1][name], results[0][1][name])
    assert len(args.loss_collector.load_balancing) == 2


# ------------------------------------------------------------------------------------------------
# memory_optimized_mlp: identical gradients; the activation is not kept between forward and backward


MEMORY_CASES = [
    pytest.param(dMoE, "sparse", "glu", F.gelu, id="dmoe-sparse-glu"),
    pytest.param(dMoE, "sparse", "glu", torch.tanh, id="dmoe-sparse-glu-unfused"),
    pytest.param(dMoE, "sparse", "mlp", F.relu, id="dmoe-sparse-mlp-relu"),
    pytest.param(dMoE, "triton", "mlp", F.gelu, id="dmoe-grouped-mlp"),
    pytest.param(MoE, "torch", "glu", F.silu, id="moe-glu"),
]


@pytest.mark.parametrize("cls, impl, mlp_type, act", MEMORY_CASES)
def test_memory_optimized_mlp_identical_gradients(cls, impl, mlp_type, act, monkeypatch):
    kw = dict(mlp_type=mlp_type, activation_fn=act, moe_capacity_factor=0)
    plain = cls(make_args(impl, **kw))
    optimized = cls(make_args(impl, memory_optimized_mlp=True, **kw))
    optimized.load_state_dict(plain.state_dict())

    contexts = []

    class Recording(mlp_module._RecomputeSaved):
        def __exit__(self, *exc):
            self.recorded = list(self._slots)  # the slots are resolved in place by __exit__
            contexts.append(self)
            return super().__exit__(*exc)

    monkeypatch.setattr(mlp_module, "_RecomputeSaved", Recording)
    x = torch.randn(10, 40, device=DEVICE)
    results = []
    for layer in (plain, optimized):
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        slots = [s for ctx in contexts for s in ctx.recorded]
        out.backward(torch.randn(out.shape, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(1)))
        results.append((out, layer_grads(layer, xi), slots))
    assert len(contexts) == 1, "only the memory-optimized layer should install the saved-tensor hooks"
    recomputed = [s for s in results[1][2] if s[1] is not None]
    # The down projection keeps the activation (GLU: the product; on the unfused GLU path the
    # multiply keeps the activation too, while the fused op keeps only h1 and h2).
    unfused_glu = mlp_type == "glu" and fused_name(act) is None
    assert len(recomputed) >= (2 if unfused_glu else 1), f"{len(recomputed)} saved tensors recomputed"
    assert_equal("out", results[1][0], results[0][0])
    for name in GRAD_NAMES:
        if results[0][1][name] is not None:
            assert_equal(f"grad {name}", results[1][1][name], results[0][1][name])


@pytest.mark.skipif(DEVICE != "cuda", reason="peak memory is measured on CUDA")
@pytest.mark.skipif(os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") == "1",
                    reason="the allocator statistics need the caching allocator")
@pytest.mark.parametrize("impl", ["sparse", "triton"])
def test_memory_optimized_mlp_lowers_peak_memory(impl):
    # Four stacked layers: the activations each keeps for its backward dominate the peak.
    args = dict(hidden_size=1024, ffn_hidden_size=1408, moe_num_experts=8, moe_top_k=2, moe_block_size=128,
                mlp_type="glu", bias=False)
    peaks, kept = {}, {}
    x = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16)
    for optimized in (False, True):
        torch.manual_seed(0)
        layers = [dMoE(make_args(impl, torch.bfloat16, memory_optimized_mlp=optimized, **args)) for _ in range(4)]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        h = x.clone().requires_grad_(True)
        for layer in layers:
            h = layer(h)
        kept[optimized] = torch.cuda.memory_allocated() - base
        h.float().sum().backward()
        torch.cuda.synchronize()
        peaks[optimized] = torch.cuda.max_memory_allocated() - base
        del layers, h
        torch.cuda.empty_cache()
    print(f"\n{impl}: peak {peaks[False] / 2**20:.1f} MiB -> {peaks[True] / 2**20:.1f} MiB with memory_optimized_mlp; "
          f"kept after forward {kept[False] / 2**20:.1f} MiB -> {kept[True] / 2**20:.1f} MiB")
    assert kept[True] < kept[False]
    assert peaks[True] < peaks[False]


# ------------------------------------------------------------------------------------------------
# gpt-oss's experts: per-expert biases (moe_expert_bias), the clamped SwiGLU, a router bias. The
# reference adds the biases and computes transformers' clamped SwiGLU per expert; the biases are
# random (std 4), so that some gate and up values pass the clamps' limits of ±7.

# (activation, mlp_type): the default GELU MLP and GLU, and gpt-oss's clamped SwiGLU.
BIAS_EXPERTS = [
    pytest.param(F.gelu, "mlp", id="mlp"),
    pytest.param(F.silu, "glu", id="glu-silu"),
    pytest.param(clamped_swiglu, "glu", id="glu-clamped_swiglu"),
]


def _bias_layer(impl, dtype=torch.float32, cls=dMoE, **kw):
    layer = cls(make_args(impl, dtype, moe_expert_bias=True, moe_router_bias=True, **kw))
    randomize_bias(layer)
    randomize_expert_biases(layer)
    return layer


def _clamps_active(layer, x):
    """Whether some of the routed rows' gate (above 7) and up (outside ±7) values are clamped."""
    mlp = layer.experts.mlp
    E, H = layer.args.moe_num_experts, layer.args.hidden_size
    x_TH = x.detach().reshape(-1, H).float()
    gate = torch.einsum("th,efh->tef", x_TH, mlp.w1.detach().float().view(E, -1, H)) + mlp.w1_bias.detach().float()
    up = torch.einsum("th,efh->tef", x_TH, mlp.v1.detach().float().view(E, -1, H)) + mlp.v1_bias.detach().float()
    return bool((gate > 7).any()) and bool((up.abs() > 7).any())


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], SHAPES[3]])
@pytest.mark.parametrize("impl", [i for i in IMPLS if i in ("sparse", "triton", "torch")])
@pytest.mark.parametrize("activation, mlp_type", BIAS_EXPERTS)
def test_dmoe_expert_biases_match_reference(activation, mlp_type, impl, shape):
    """Every path (block-sparse; grouped, GLU reading the token rows through the maps) with the
    experts' and router's biases: output and the gradients of x, router weight and bias, w1, v1,
    w2, their biases and the output bias, at hostile shapes."""
    skip_unavailable(impl, torch.float32)
    T, lead, H, Fs, E, K, routing = shape
    layer = _bias_layer(impl, hidden_size=H, ffn_hidden_size=Fs, moe_num_experts=E, moe_top_k=K, mlp_type=mlp_type,
                        activation_fn=activation, moe_normalize_expert_weights=1 if K > 1 else None)
    if routing == "one":
        route_all_to(layer, 2)
        with torch.no_grad():
            layer.router.layer.bias.zero_()
        x = (torch.rand(*lead, H, device=DEVICE) + 0.5).requires_grad_(True)
    else:
        x = torch.randn(*lead, H, device=DEVICE, requires_grad=True)
    check_against_reference(layer, x)
    if activation is clamped_swiglu and T > 1:
        assert _clamps_active(layer, x), "the test should reach the clamped SwiGLU's limits"


@pytest.mark.parametrize("impl", ["sparse", "triton"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_dmoe_expert_biases_dtypes_and_unfused_paths(dtype, impl):
    """The clamped SwiGLU with biases in every float dtype; the grouped GLU also without the
    policy's fused gather and shared-input products (x gathered first, two up products)."""
    skip_unavailable(impl, dtype)
    for policy in ({}, dict(fused_gather=False, fused_glu_input_grad=False)):
        if impl == "sparse" and policy:
            continue
        layer = _bias_layer(impl, dtype, mlp_type="glu", activation_fn=clamped_swiglu, moe_normalize_expert_weights=1,
                            kernel_policy=policy)
        x = torch.randn(9, 40, device=DEVICE, dtype=dtype, requires_grad=True)
        check_against_reference(layer, x, dtype=dtype, top_experts_from_layer=dtype != torch.float32)


@pytest.mark.parametrize("impl, mlp_type", [("sparse", "glu"), ("triton", "glu"), ("triton", "mlp")])
def test_dmoe_expert_biases_memory_optimized(impl, mlp_type):
    """memory_optimized_mlp with the experts' biases (and the clamped SwiGLU): bitwise the
    gradients of the plain layer."""
    kw = dict(mlp_type=mlp_type, activation_fn=clamped_swiglu if mlp_type == "glu" else F.gelu)
    plain = _bias_layer(impl, **kw)
    optimized = dMoE(make_args(impl, moe_expert_bias=True, moe_router_bias=True, memory_optimized_mlp=True, **kw))
    optimized.load_state_dict(plain.state_dict())
    x = torch.randn(10, 40, device=DEVICE)
    results = []
    for layer in (plain, optimized):
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        out.backward(torch.randn(out.shape, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(1)))
        results.append((out, layer_grads(layer, xi)))
    assert_equal("out", results[1][0], results[0][0])
    for name in GRAD_NAMES + BIAS_GRAD_NAMES:
        if results[0][1][name] is not None:
            assert_equal(f"grad {name}", results[1][1][name], results[0][1][name])
    optimized.zero_grad()
    check_against_reference(optimized, x.clone().requires_grad_(True))


@pytest.mark.parametrize("mlp_type", ["mlp", "glu"])
def test_moe_expert_biases_with_drops(mlp_type):
    """MoE (capacity) with the experts' biases: dropped assignments add nothing, kept ones their
    expert's biases."""
    activation = clamped_swiglu if mlp_type == "glu" else F.gelu
    layer = _bias_layer("torch", cls=MoE, mlp_type=mlp_type, activation_fn=activation, moe_capacity_factor=0.5)
    x = torch.randn(12, 40, device=DEVICE, requires_grad=True)
    capacity = int(0.5 * layer.args.moe_top_k * 12 / layer.args.moe_num_experts)
    check_against_reference(layer, x, capacity=capacity)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # GELU's saturated tanh
def test_expert_biases_parameters_and_state_dict():
    """The biases' shapes, zero initialisation and state-dict keys on every expert MLP; the same
    values move between the sparse and grouped layers, which then compute the same."""
    sparse = dMoE(make_args("sparse", mlp_type="glu", moe_expert_bias=True, moe_router_bias=True))
    shapes = {n: tuple(p.shape) for n, p in sparse.named_parameters() if n.endswith("bias")}
    assert shapes == {"router.layer.bias": (4,), "experts.bias": (40,), "experts.mlp.w1_bias": (4, 24),
                      "experts.mlp.v1_bias": (4, 24), "experts.mlp.w2_bias": (4, 40)}, shapes
    for name in shapes:
        if name != "experts.bias":
            assert not sparse.get_parameter(name).any(), f"{name}: expected zeros at initialisation"
    assert not hasattr(sparse.experts.mlp.w1_bias, "allreduce"), "not sharded without expert parallelism"
    plain = dMoE(make_args("sparse", mlp_type="glu"))
    assert plain.experts.mlp.w1_bias is None and plain.router.layer.bias is None
    assert not any(k.endswith(("w1_bias", "v1_bias", "w2_bias", "layer.bias")) for k in plain.state_dict())
    randomize_bias(sparse)
    randomize_expert_biases(sparse)
    grouped = dMoE(make_args("triton", mlp_type="glu", moe_expert_bias=True, moe_router_bias=True))
    grouped.load_state_dict(sparse.state_dict())
    x = torch.randn(7, 40, device=DEVICE)
    assert_close("grouped vs sparse", grouped(x), sparse(x), family="layer")
    mlp = MoE(make_args("torch", moe_expert_bias=True)).experts.mlp
    assert tuple(mlp.w1_bias.shape) == (4, 24) and tuple(mlp.w2_bias.shape) == (4, 40) and mlp._v1_bias() is None


# ------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input():
    layer = dMoE(make_args("torch"))
    with pytest.raises(ValueError, match=r"x: expected shape \[\.\.\., hidden_size=40\]"):
        layer(torch.randn(4, 41, device=DEVICE))
    with pytest.raises(TypeError, match="x: expected dtype torch.float32"):
        layer(torch.randn(4, 40, device=DEVICE, dtype=torch.float16))
    with pytest.raises(TypeError, match="x: expected a floating-point tensor"):
        layer(torch.ones(4, 40, device=DEVICE, dtype=torch.int32))
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        layer([[0.0] * 40])
    with pytest.raises(ValueError, match="x: expected a tensor on"):
        layer(torch.empty(4, 40, device="meta"))


# ------------------------------------------------------------------------------------------------
# The kernel policy fields small_routing and fused_glu_input_grad (megablocks.policy.KernelPolicy):
# the one-launch routing metadata and the grouped GLU's accumulating input gradient give the
# reference's output and every gradient whether on or off.


@pytest.mark.parametrize("on", [True, False], ids=["on", "off"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", [i for i in IMPLS if i in ("sparse", "triton", "torch")])
def test_dmoe_with_policy_fields(impl, shape, on, monkeypatch):
    """`small_routing` and `fused_glu_input_grad` on and off (the layer's kernel policy)."""
    from megablocks.layers import mlp as mlp_module

    calls = []
    for name in ("gmm_shared_input", "gmm_shared_input_gathered"):
        op = getattr(mlp_module, name)
        monkeypatch.setattr(mlp_module, name, lambda *a, _op=op, **k: calls.append(1) or _op(*a, **k))
    skip_unavailable(impl, torch.float32)
    T, lead, H, Fs, E, K, routing = shape
    # The composed ops' choice (the one-node experts, bitwise the same: test_one_node_experts.py).
    policy = dict(small_routing=on, fused_glu_input_grad=on, one_node_experts=False)
    layer = dMoE(make_args(impl, hidden_size=H, ffn_hidden_size=Fs, moe_num_experts=E, moe_top_k=K, mlp_type="glu",
                           kernel_policy=policy))
    randomize_bias(layer)
    if routing == "one":
        route_all_to(layer, 2)
        x = (torch.rand(*lead, H, device=DEVICE) + 0.5).requires_grad_(True)
    else:
        x = torch.randn(*lead, H, device=DEVICE, requires_grad=True)
    check_against_reference(layer, x)
    assert bool(calls) == (on and impl != "sparse"), "the shared-input GLU taken iff the policy says so"


def test_fused_glu_input_grad_bound(monkeypatch):
    """The accumulating GLU input gradient is taken only up to `fused_glu_input_grad_max_ffn`."""
    from megablocks.layers import mlp as mlp_module

    skip_unavailable("triton", torch.float32)
    calls = []
    for name in ("gmm_shared_input", "gmm_shared_input_gathered"):
        op = getattr(mlp_module, name)
        monkeypatch.setattr(mlp_module, name, lambda *a, _op=op, **k: calls.append(1) or _op(*a, **k))
    layer = dMoE(make_args("triton", hidden_size=16, ffn_hidden_size=24, moe_num_experts=2, moe_top_k=1, mlp_type="glu"))
    x = torch.randn(8, 16, device=DEVICE, requires_grad=True)
    # The composed ops' choice (the one-node experts, bitwise the same: test_one_node_experts.py).
    layer.args.kernel_policy = layer.args.kernel_policy.replace(fused_glu_input_grad_max_ffn=24,
                                                                one_node_experts=False)
    layer(x)[0].sum().backward()
    assert calls, "F <= the bound: the shared-input GLU should be taken"
    calls.clear()
    layer.args.kernel_policy = layer.args.kernel_policy.replace(fused_glu_input_grad_max_ffn=23)
    layer(x)[0].sum().backward()
    assert not calls, "F > the bound: the shared-input GLU should not be taken"


@pytest.mark.parametrize("impl", ["sparse", "triton"])
def test_routing_past_one_program_equals_the_general_path(impl, monkeypatch):
    """Past one routing program's rows (4096; lowered to 16 here, to stay small under the
    interpreter) the layer routes by `padded_row_maps` (sparse) or `row_maps` (grouped): output,
    loss counts and every gradient bitwise those of the metadata-and-`route` path. (The routings
    themselves are compared past 4096 rows in tests/ops/test_routing.py.)"""
    import megablocks.layers.dmoe as dmoe_module
    import megablocks.layers.moe as moe_module  # `routed_rows` and `padded_routed_rows`: the routings

    monkeypatch.setattr(moe_module, "SMALL_ROUTING_MAX_ROWS", 16)
    taken = []
    for name in ("padded_row_maps", "row_maps"):
        fn = getattr(moe_module, name)
        monkeypatch.setattr(moe_module, name, lambda *a, fn=fn, name=name: taken.append(name) or fn(*a))
    T, K = 40, 2  # 80 routed rows
    layer = dMoE(make_args(impl, hidden_size=8, ffn_hidden_size=16, moe_num_experts=4, moe_top_k=K))
    x = torch.randn(T, 8, device=DEVICE)
    runs = []
    for general in (False, True):
        if general:  # the layer's other branch: as under torch.compile
            for module in (dmoe_module, moe_module):
                monkeypatch.setattr(module, "use_triton", lambda t: False)
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.ones_like(out))
        runs.append((out, layer.experts.tokens_per_expert.clone(), layer_grads(layer, xi)))
    assert taken == ["padded_row_maps" if impl == "sparse" else "row_maps"], taken
    (out, counts, grads), (want, want_counts, want_grads) = runs
    assert_equal("out", out, want)
    assert_equal("tokens_per_expert", counts, want_counts)
    for name in grads:
        if grads[name] is not None:
            assert_equal(f"grad {name}", grads[name], want_grads[name])
