"""Gradient-accumulation fusion in the dMoE's grouped experts and in `MainWeightsAdamW`.

With an fp32 `main_grad` on the expert weights (`MainWeightsAdamW.fuse_grad_accumulation`), the
grouped path's weight-gradient products add into it over micro-batches instead of returning a
16-bit `.grad`. Checked against a copy of the layer without it, on fresh inputs: the outputs and
every other gradient bitwise equal, each `main_grad` its start values plus the copy's gradients
summed (at the 16-bit limits: the copy's gradients are rounded, the accumulator's are not), and
the weights' own `.grad` None. Then whole optimizer steps with and without the fusion.
"""

import copy

import pytest
import torch

from megablocks.layers.dmoe import dMoE
from megablocks.optim import MainWeightsAdamW
from megablocks.policy import KernelPolicy
from tests.conftest import DEVICE, FLOAT_DTYPES
from tests.layers.moe_reference import make_args, skip_unavailable
from tests.utils import assert_close, assert_equal

SHAPE = dict(hidden_size=40, ffn_hidden_size=24, moe_num_experts=4, moe_top_k=2)
DTYPE = FLOAT_DTYPES[-1]  # fp16 under the interpreter, bf16 on the GPU
EXPERT_WEIGHTS = ("w1", "v1", "w2")

FORMS = {
    "mlp": dict(mlp_type="mlp"),
    "glu": dict(mlp_type="glu", kernel_policy=KernelPolicy(fused_glu_input_grad=False, fused_gather=False)),
    "glu-pair": dict(mlp_type="glu", kernel_policy=KernelPolicy(fused_glu_input_grad=True, fused_gather=False)),
    "glu-pair-gathered": dict(mlp_type="glu", kernel_policy=KernelPolicy(fused_glu_input_grad=True,
                                                                         fused_gather=True)),
}


def _out(layer, x):
    out = layer(x)
    return out[0] if isinstance(out, tuple) else out


def _is_expert_weight(name: str) -> bool:
    return name.split(".")[-1] in EXPERT_WEIGHTS


# Every form on the kernels; the memory-optimized recompute and the 'torch' backend (which adds the
# computed gradient) on two of them.
CASES = [("triton", form, False) for form in FORMS] + [("triton", "mlp", True), ("triton", "glu-pair-gathered", True),
                                                      ("torch", "mlp", False), ("torch", "glu-pair", True)]


@pytest.mark.parametrize("impl,form,memory_optimized", CASES)
def test_dmoe_weight_grads_go_to_main_grad(impl, form, memory_optimized):
    skip_unavailable(impl, DTYPE)
    torch.manual_seed(0)
    _check_main_grads(dMoE(make_args(impl, DTYPE, memory_optimized_mlp=memory_optimized, **FORMS[form], **SHAPE)),
                      3 if FORMS[form]["mlp_type"] == "glu" else 2)


# FP8 (`Arguments.fp8`): the composed products' weight gradients (unquantized products) go to
# main_grad (the experts take the composed products without the policy's one-node form), and so
# do the MLP experts' node's (`fp8_grouped_mlp_experts`). With the policy's `fp8_weight_grad` and
# `fp8_weight_grad_composed` the composed products' weight gradients are FP8 products (MLP experts
# take the composed products then), added into main_grad by that product's epilogue.
COMPOSED_FP8_WGRAD = KernelPolicy(fp8_weight_grad=True, fp8_weight_grad_composed=True)
FP8_FORMS = {
    "mlp": dict(mlp_type="mlp", kernel_policy=KernelPolicy(one_node_experts=False)),
    "mlp-node": dict(mlp_type="mlp"),
    "glu": dict(mlp_type="glu", kernel_policy=KernelPolicy(one_node_experts=False)),
    "mlp-fp8-weight-grad": dict(mlp_type="mlp", kernel_policy=COMPOSED_FP8_WGRAD),
    "glu-fp8-weight-grad": dict(mlp_type="glu", kernel_policy=COMPOSED_FP8_WGRAD.replace(one_node_experts=False)),
}


@pytest.mark.parametrize("form", list(FP8_FORMS))
def test_fp8_dmoe_weight_grads_go_to_main_grad(form, monkeypatch):
    skip_unavailable("triton", DTYPE)
    from megablocks.ops import fp8 as fp8_ops

    torch.manual_seed(0)
    layer = dMoE(make_args("triton", DTYPE, fp8="blockwise", **FP8_FORMS[form], **SHAPE))
    assert not layer.experts.mlp._fp8_node() or form == "mlp-node"
    calls = []  # the FP8 weight-gradient products: into main_grad (in their epilogue) or not
    real = fp8_ops.gmm_fp8_wgrad
    monkeypatch.setattr(fp8_ops, "gmm_fp8_wgrad",
                        lambda *a, **k: calls.append(k.get("accumulate_into") is not None) or real(*a, **k))
    n = 3 if FP8_FORMS[form]["mlp_type"] == "glu" else 2
    _check_main_grads(layer, n)
    # Each of two micro-batches: the layer's n into main_grad, then its copy's n into .grad.
    composed_fp8 = layer.args.kernel_policy.fp8_weight_grad and layer.args.kernel_policy.fp8_weight_grad_composed
    assert calls == (([True] * n + [False] * n) * 2 if composed_fp8 else []), calls


# The FP8 one-node form (GLU experts): w1 and v1 apart, stacked (F a multiple of 128), with its
# weight gradients in FP8 (the default: added into main_grad by the FP8 weight-gradient product's
# epilogue) and unquantized (`fp8_weight_grad=False`: by the variable-K product's).
UNQUANTIZED = KernelPolicy(fp8_weight_grad=False)
FP8_NODE_FORMS = {
    "apart": dict(SHAPE, kernel_policy=UNQUANTIZED),
    "stacked": dict(SHAPE, ffn_hidden_size=128, kernel_policy=UNQUANTIZED),
    "fp8-weight-grad": dict(SHAPE),
    "fp8-weight-grad-stacked": dict(SHAPE, ffn_hidden_size=128),
}


@pytest.mark.parametrize("form", list(FP8_NODE_FORMS))
def test_fp8_node_weight_grads_go_to_main_grad(form, monkeypatch):
    skip_unavailable("triton", DTYPE)
    from megablocks.ops import grouped_glu

    torch.manual_seed(0)
    layer = dMoE(make_args("triton", DTYPE, fp8="blockwise", mlp_type="glu", **FP8_NODE_FORMS[form]))
    assert layer.experts.mlp._fp8_node()
    calls = []  # the FP8 weight-gradient products: into main_grad (in their epilogue) or not
    real = grouped_glu.gmm_fp8_wgrad
    monkeypatch.setattr(grouped_glu, "gmm_fp8_wgrad",
                        lambda *a, **k: calls.append(k.get("accumulate_into") is not None) or real(*a, **k))
    _check_main_grads(layer, 3)
    fp8_wgrad = layer.args.kernel_policy.fp8_weight_grad
    # Each of two micro-batches: the layer's three into main_grad, then its copy's three into .grad.
    assert calls == (([True] * 3 + [False] * 3) * 2 if fp8_wgrad else []), calls


def _check_main_grads(layer, num_experts_weights: int):
    ref = copy.deepcopy(layer)
    experts = {n: p for n, p in layer.named_parameters() if _is_expert_weight(n)}
    assert len(experts) == num_experts_weights
    start = {}
    for n, p in experts.items():
        p.main_grad = torch.randn(p.shape, device=DEVICE) * 1e-2
        start[n] = p.main_grad.clone()
    summed = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in experts.items()}
    for _ in range(2):  # two micro-batches
        x = torch.randn(18, 40, device=DEVICE, dtype=DTYPE)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, want = _out(layer, x1), _out(ref, x2)
        assert_equal("out", out, want)
        grad_out = torch.randn_like(out)
        out.backward(grad_out)
        want.backward(grad_out)
        assert_equal("x.grad", x1.grad, x2.grad)
        for n, p in ref.named_parameters():
            if _is_expert_weight(n):
                summed[n] += p.grad.double().cpu()
                p.grad = None
    params = dict(layer.named_parameters())
    for n, p in ref.named_parameters():
        if _is_expert_weight(n):
            assert params[n].grad is None, f"{n}: its gradient belongs in main_grad"
            assert_close(f"{n}.main_grad", params[n].main_grad, start[n].double().cpu() + summed[n], DTYPE)
        else:  # the router and the biases: .grad as without the fusion
            assert_equal(f"{n}.grad", params[n].grad, p.grad)


def test_sparse_path_and_cast_weights_keep_grad():
    """Where the kernels cannot add into main_grad (the block-sparse path) the gradient comes back
    as .grad, main_grad untouched."""
    layer = dMoE(make_args("sparse", DTYPE, **SHAPE))
    for n, p in layer.named_parameters():
        if _is_expert_weight(n):
            p.main_grad = torch.zeros(p.shape, device=DEVICE)
    _out(layer, torch.randn(18, 40, device=DEVICE, dtype=DTYPE, requires_grad=True)).sum().backward()
    for n, p in layer.named_parameters():
        if _is_expert_weight(n):
            assert p.grad is not None and not p.main_grad.any(), n


def test_main_grad_of_the_wrong_kind_is_refused():
    layer = dMoE(make_args("triton", DTYPE, **SHAPE))
    layer.experts.mlp.w1.main_grad = torch.zeros(layer.experts.mlp.w1.shape, device=DEVICE, dtype=DTYPE)
    with pytest.raises(ValueError, match="main_grad: expected a contiguous float32 tensor"):
        _out(layer, torch.randn(18, 40, device=DEVICE, dtype=DTYPE))


def _micro_batches(layer, opt, batches) -> None:
    opt.zero_grad()
    for x, g in batches:
        (_out(layer, x) * g).sum().backward()
        opt.accumulate_grads()


def test_optimizer_steps_with_and_without_fusion():
    """Steps of two micro-batches: the gradients the optimizer takes equal the unfused ones within
    the 16-bit rounding those take; given the same gradients, the step is bitwise the unfused one;
    the next step's gradient norms agree; the buffers are not state and are zeroed by zero_grad; fp32
    and frozen parameters get none; `fuse_grad_accumulation(False)` removes them."""
    torch.manual_seed(1)
    layer = dMoE(make_args("triton", DTYPE, mlp_type="glu", **SHAPE))
    other = copy.deepcopy(layer)
    fp32 = torch.nn.Parameter(torch.zeros(3, device=DEVICE))  # an fp32 parameter among 16-bit ones
    frozen = torch.nn.Parameter(torch.zeros(3, device=DEVICE, dtype=DTYPE), requires_grad=False)
    opt = MainWeightsAdamW(list(layer.parameters()) + [fp32, frozen], lr=1e-2, weight_decay=0.1)
    opt.fuse_grad_accumulation()
    ref = MainWeightsAdamW(other.parameters(), lr=1e-2, weight_decay=0.1)
    pairs = list(zip(layer.parameters(), other.parameters()))
    fused = [p for p in layer.parameters() if hasattr(p, "main_grad")]
    assert fused and all(p.dtype == DTYPE for p in fused)
    assert not hasattr(fp32, "main_grad"), "fp32 parameters keep .grad"
    assert not hasattr(frozen, "main_grad"), "nor is a frozen parameter given a buffer (it would be stepped)"
    for step in range(2):
        batches = [(torch.randn(18, 40, device=DEVICE, dtype=DTYPE), torch.randn(18, 40, device=DEVICE, dtype=DTYPE))
                   for _ in range(2)]
        _micro_batches(layer, opt, batches)
        _micro_batches(other, ref, batches)
        if step == 0:
            for (name, p), (_, q) in zip(layer.named_parameters(), other.named_parameters()):
                assert_close(f"{name} gradient", opt._gradient(p), ref._gradient(q), DTYPE)
                if hasattr(p, "main_grad"):
                    assert p.grad is None and opt._gradient(p) is p.main_grad
                    ref.state[q]["grad_acc"] = p.main_grad.clone()  # the same gradients for both steps
        assert_close(f"step {step} grad norm", opt.clip_grad_norm_(1.0), ref.clip_grad_norm_(1.0), DTYPE,
                     family="layer")
        opt.step()
        ref.step()
        if step == 0:
            for p, q in pairs:
                assert_equal("main weights after the same gradients", opt.state[p]["main"], ref.state[q]["main"])
    assert all(p.main_grad.any() for p in fused), "the last step's gradients stay in the buffers"
    for group in opt.state_dict()["state"].values():
        assert set(group) == {"step", "main", "exp_avg", "exp_avg_sq"}, "no gradient buffer in the state"
    opt.zero_grad()
    assert not any(p.main_grad.any() for p in fused)
    opt.fuse_grad_accumulation(False)
    assert not any(hasattr(p, "main_grad") for p in layer.parameters())
