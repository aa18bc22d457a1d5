"""dMoE's grouped path with `KernelPolicy.fused_gather`: the up projection(s) read the
token rows through the routing's row maps instead of a gathered copy.

With it on, the layer must give the per-expert reference's output and every gradient
(x, router, w1, v1, w2, bias) at the hostile shapes of tests/layers/test_dmoe.py, and the same
values as with it off: MLP and GLU, with and without `memory_optimized_mlp`, with
`fused_glu_input_grad` on and off. The gathered copy must not be made (no `gather_routed` call).
"""

import pytest
import torch

from megablocks.layers import dmoe as dmoe_module
from megablocks.layers import mlp as mlp_module
from megablocks.layers.dmoe import dMoE
from megablocks.policy import KernelPolicy
from tests.conftest import DEVICE, FLOAT_DTYPES
from tests.layers.moe_reference import (
    GRAD_NAMES,
    check_against_reference,
    layer_grads,
    make_args,
    randomize_bias,
    route_all_to,
    skip_unavailable,
)
from tests.layers.test_dmoe import SHAPES
from tests.utils import assert_close

GROUPED_IMPLS = ["triton", "torch"]


def _count_calls(monkeypatch):
    """Counts the gathered products and the explicit gathers of the grouped path."""
    calls = {"gathered": 0, "gather_routed": 0}

    def counted(module, name, key):
        fn = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    counted(mlp_module, "gmm_gathered", "gathered")
    counted(mlp_module, "gmm_shared_input_gathered", "gathered")
    counted(dmoe_module, "gather_routed", "gather_routed")
    return calls


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", GROUPED_IMPLS)
@pytest.mark.parametrize("mlp_type", ["mlp", "glu"])
def test_fused_gather_matches_reference(mlp_type, impl, shape, monkeypatch):
    skip_unavailable(impl, torch.float32)
    # The layer takes the token rows only where it pays (`reads_token_rows`); the MLP's and the
    # unpaired GLU's mapped forms are kept correct all the same.
    monkeypatch.setattr(mlp_module.GroupedMLP, "reads_token_rows", lambda self: True)
    calls = _count_calls(monkeypatch)
    T, lead, H, Fs, E, K, routing = shape
    # The composed ops (the one-node experts, bitwise the same: test_one_node_experts.py).
    layer = dMoE(make_args(impl, hidden_size=H, ffn_hidden_size=Fs, moe_num_experts=E, moe_top_k=K, mlp_type=mlp_type,
                           kernel_policy=KernelPolicy(fused_gather=True, one_node_experts=False)))
    randomize_bias(layer)
    if routing == "one":
        route_all_to(layer, 2)
        x = (torch.rand(*lead, H, device=DEVICE) + 0.5).requires_grad_(True)
    else:
        x = torch.randn(*lead, H, device=DEVICE, requires_grad=True)
    check_against_reference(layer, x)
    assert calls["gathered"] == 1 and calls["gather_routed"] == 0, calls


def _run(layer, x, grad_out):
    xi = x.clone().requires_grad_(True)
    layer.zero_grad()
    out = layer(xi)
    out.backward(grad_out)
    return out, layer_grads(layer, xi)


@pytest.mark.parametrize("memory_optimized", [False, True], ids=["plain", "memory_optimized"])
@pytest.mark.parametrize(
    "mlp_type, glu_input_grad",
    [("mlp", True), ("glu", True), ("glu", False)],  # fused_glu_input_grad applies to the GLU only
    ids=["mlp", "glu-glu_input_grad_on", "glu-glu_input_grad_off"],
)
def test_fused_gather_equals_unfused(mlp_type, glu_input_grad, memory_optimized, monkeypatch):
    """On and off: the same output and gradients (one layer, the same weights and inputs)."""
    monkeypatch.setattr(mlp_module.GroupedMLP, "reads_token_rows", lambda self: self.args.kernel_policy.fused_gather)
    policy = KernelPolicy(fused_glu_input_grad=glu_input_grad)
    layer = dMoE(make_args("triton", mlp_type=mlp_type, moe_top_k=3, memory_optimized_mlp=memory_optimized,
                           kernel_policy=policy))
    randomize_bias(layer)
    x = torch.randn(3, 5, 40, device=DEVICE)
    grad_out = torch.randn(3, 5, 40, device=DEVICE)
    results = {}
    for on in (False, True):
        layer.args.kernel_policy = policy.replace(fused_gather=on)
        results[on] = _run(layer, x, grad_out)
    assert_close("out", results[True][0], results[False][0])
    for name in GRAD_NAMES:
        if results[False][1][name] is not None:
            assert_close(f"grad {name}", results[True][1][name], results[False][1][name])


def test_where_the_layer_reads_token_rows():
    """The fused gather is taken by GLU experts on the shared-input pair (F up to
    `fused_glu_input_grad_max_ffn`) and nowhere else; by default up to F = 4096."""
    def reads(mlp_type, ffn=48, **policy):
        args = make_args("triton", mlp_type=mlp_type, ffn_hidden_size=ffn, kernel_policy=policy or None)
        return dMoE(args).experts.mlp.reads_token_rows()

    small = dict(fused_glu_input_grad_max_ffn=48)
    assert reads("glu", **small) and not reads("mlp", **small) and not reads("glu", ffn=56, **small)
    assert not reads("glu", fused_glu_input_grad=False, **small)
    assert not reads("glu", fused_gather=False, **small)
    assert reads("glu", ffn=4096) and not reads("glu", ffn=4097)


@pytest.mark.parametrize("dtype", [d for d in FLOAT_DTYPES if d != torch.float32])
def test_fused_gather_low_precision(dtype):
    layer = dMoE(make_args("triton", dtype, mlp_type="glu", moe_normalize_expert_weights=1,
                           kernel_policy=KernelPolicy(fused_gather=True)))
    randomize_bias(layer)
    x = torch.randn(8, 2, 40, device=DEVICE, dtype=dtype, requires_grad=True)
    check_against_reference(layer, x, dtype=dtype, top_experts_from_layer=True)


def test_fused_gather_no_tokens():
    layer = dMoE(make_args("triton", mlp_type="glu", kernel_policy=KernelPolicy(fused_gather=True)))
    x = torch.randn(0, 3, 40, device=DEVICE, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert layer.experts.mlp.w1.grad.abs().max() == 0


@pytest.mark.parametrize("mlp_type", ["mlp", "glu"])
def test_received_rows_path(mlp_type, monkeypatch):
    """The expert-parallel path computes received rows with top_k = 1 and no weights through
    `permute_and_compute`: the same result with the fused gather on and off."""
    monkeypatch.setattr(mlp_module.GroupedMLP, "reads_token_rows", lambda self: self.args.kernel_policy.fused_gather)
    layer = dMoE(make_args("triton", mlp_type=mlp_type))
    experts = layer.experts
    x = torch.randn(9, 40, device=DEVICE)
    local_experts = torch.randint(0, 4, (9,), device=DEVICE, dtype=torch.int32)
    local_experts[:3] = 1
    results = {}
    for on in (False, True):
        layer.args.kernel_policy = KernelPolicy(fused_gather=on)
        xi = x.clone().requires_grad_(True)
        experts.zero_grad()
        out, counts = experts.permute_and_compute(xi, None, local_experts, 4, 1)
        out.backward(torch.ones_like(out))
        results[on] = (out, xi.grad, experts.mlp.w1.grad.clone(), counts)
    for i, name in enumerate(["out", "grad x", "grad w1"]):
        assert_close(name, results[True][i], results[False][i])
    assert torch.equal(results[True][3], results[False][3])


def test_compiles_fullgraph():
    """The fused gather under torch.compile(fullgraph=True): no graph break, eager's values."""
    layer = dMoE(make_args("triton", mlp_type="glu", memory_optimized_mlp=True,
                           kernel_policy=KernelPolicy(fused_gather=True)))
    randomize_bias(layer)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(7, 40, device=DEVICE)
    grad_out = torch.randn(7, 40, device=DEVICE)
    eager_out, eager_grads = _run(layer, x, grad_out)
    xi = x.clone().requires_grad_(True)
    layer.zero_grad()
    out = compiled(xi)
    out.backward(grad_out)
    assert_close("out", out, eager_out)
    grads = layer_grads(layer, xi)
    for name in GRAD_NAMES:
        if eager_grads[name] is not None:
            assert_close(f"grad {name}", grads[name], eager_grads[name])
