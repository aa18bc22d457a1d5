"""Every parameter's gradient leaves the layer in that parameter's layout.

`torch.autograd.grad` returns a gradient as the backward computed it; `.backward()` then copies a
gradient whose strides differ from its parameter's into the parameter's layout (AccumulateGrad),
one strided pass over the weight per step. So each path's gradients are taken with
`torch.autograd.grad` and checked for the parameter's shape and strides (`assert_grads_in_layout`):
dMoE on the block-sparse path and on the grouped path with each backend, MLP and GLU, with and
without `memory_optimized_mlp` and the grouped path's fused forms, the FP8 recipe's forms, the
capacity-bounded `MoE`, the shared expert, and the weights cast to the input's dtype (autocast, on
the GPU). The expert-parallel
layer is checked in tests/parallel/ep_workers.py, the transformers and Megatron adapters in
tests/integrations.
"""

import pytest
import torch

from megablocks.layers.dmoe import dMoE
from megablocks.layers.moe import MoE
from megablocks.policy import KernelPolicy
from tests.conftest import DEVICE, FLOAT_DTYPES
from tests.layers.moe_reference import IMPLS, make_args, skip_unavailable
from tests.utils import assert_close, assert_grads_in_layout


def _check(where: str, layer: torch.nn.Module, x: torch.Tensor, retain: bool = True) -> None:
    """`retain` False: a forward for each of the two backwards (a graph that runs backward once)."""
    params = {n: p for n, p in layer.named_parameters() if p.requires_grad}
    out = layer(x)
    out = out[0] if isinstance(out, tuple) else out
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(params.values()), grad_out, retain_graph=retain)
    if not retain:
        out = layer(x)
        out = out[0] if isinstance(out, tuple) else out
    assert_grads_in_layout(where, params, grads)
    # The same gradients reach .grad with .backward() (no copy changes them).
    out.backward(grad_out)
    for (name, p), g in zip(params.items(), grads):
        assert_close(f"{where} .grad {name}", p.grad, g)


# (T, H, F, E, K): F and H not multiples of the block, more than one block of rows.
SHAPE = dict(hidden_size=40, ffn_hidden_size=24, moe_num_experts=4, moe_top_k=2)


@pytest.mark.parametrize("memory_optimized", [False, True], ids=["plain", "memory-optimized"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mlp_type", ["mlp", "glu"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_dmoe(dtype, mlp_type, impl, memory_optimized):
    skip_unavailable(impl, dtype)
    layer = dMoE(make_args(impl, dtype, mlp_type=mlp_type, memory_optimized_mlp=memory_optimized, **SHAPE))
    x = torch.randn(18, 40, device=DEVICE, dtype=dtype, requires_grad=True)
    _check(f"dMoE {impl} {mlp_type} {dtype}", layer, x)


@pytest.mark.parametrize("fused_gather", [False, True])
@pytest.mark.parametrize("fused_glu_input_grad", [False, True])
def test_dmoe_grouped_forms(fused_glu_input_grad, fused_gather):
    """The grouped GLU with and without the shared-input pair and the in-kernel row gather."""
    policy = KernelPolicy(fused_glu_input_grad=fused_glu_input_grad, fused_gather=fused_gather)
    layer = dMoE(make_args("triton", mlp_type="glu", kernel_policy=policy, **SHAPE))
    _check("dMoE grouped glu", layer, torch.randn(18, 40, device=DEVICE, requires_grad=True))


@pytest.mark.parametrize("form", ["node", "node-fp8-wgrad", "composed", "memory-optimized"])
@pytest.mark.parametrize("mlp_type", ["mlp", "glu"])
def test_dmoe_fp8(mlp_type, form):
    """`fp8='blockwise'`: the FP8 one-node form (its graph runs backward once, so each backward
    takes its own forward), with its weight gradients in FP8 too, and the composed FP8 ops."""
    policy = KernelPolicy(one_node_experts=form.startswith("node"), fp8_weight_grad=form == "node-fp8-wgrad")
    layer = dMoE(make_args("triton", mlp_type=mlp_type, fp8="blockwise", kernel_policy=policy,
                           memory_optimized_mlp=form == "memory-optimized", **SHAPE))
    _check(f"dMoE fp8 {mlp_type} {form}", layer, torch.randn(18, 40, device=DEVICE, requires_grad=True),
           retain=not form.startswith("node"))


@pytest.mark.parametrize("impl", ["sparse", "triton"])
def test_dmoe_shared_expert(impl):
    layer = dMoE(make_args(impl, mlp_type="glu", shared_expert=True, shared_expert_hidden_size=20, **SHAPE))
    names = {n for n, _ in layer.named_parameters()}
    assert any("shared_expert" in n for n in names), names
    _check(f"dMoE {impl} with a shared expert", layer, torch.randn(18, 40, device=DEVICE, requires_grad=True))


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("mlp_type", ["mlp", "glu"])
def test_moe_with_capacity(mlp_type, impl):
    layer = MoE(make_args(impl, mlp_type=mlp_type, moe_capacity_factor=1.5, **SHAPE))
    _check(f"MoE {mlp_type}", layer, torch.randn(18, 40, device=DEVICE, requires_grad=True))


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 autocast over fp32 weights: Triton's interpreter mishandles bf16")
@pytest.mark.parametrize("impl", ["sparse", "triton"])
def test_dmoe_autocast(impl):
    """fp32 parameters, bf16 compute: the gradients come back fp32 in the parameters' layout."""
    layer = dMoE(make_args(impl, mlp_type="glu", **SHAPE))
    x = torch.randn(18, 40, device=DEVICE, requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _check(f"dMoE {impl} under autocast", layer, x)
