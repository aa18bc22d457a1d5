"""dMoE without host syncs: sync-debug mode, CUDA-graph capture and torch.compile(fullgraph=True).

Legend: T tokens, H hidden, F ffn per expert, E experts, K top-k.

Three properties of a training step (forward, `(out * grad_out).sum()` plus the load-balancing
loss, backward) on the sparse path and the grouped path (gmm backends 'triton' and 'torch'):

1. CUDA: no host-device synchronisation, checked by `torch.cuda.set_sync_debug_mode("error")`
   (every sync raises) after one warm-up step outside the mode (Triton compiles kernels there).
   The step inside the mode (its routing leaves experts without rows; also with
   `memory_optimized_mlp`) is compared with the per-expert reference of moe_reference.py; the
   batched load-balancing loss of the step's collector is computed inside the mode too.
2. CUDA: the step captured in a CUDA graph replays on fresh inputs (and on a changed routing,
   written in place into the router weight) with the output and every gradient of an eager step.
   Gradients are set to None before the capture, so the captured backward allocates them from
   the graph's pool and each replay overwrites them (no accumulation).
3. torch.compile(fullgraph=True) of Linear -> dMoE -> Linear matches eager, output and gradients
   ('aot_eager' on CPU, where the kernels run in Triton's interpreter; Inductor on CUDA), and a
   second call with another routing does not recompile.
"""

import pytest
import torch

from megablocks.layers.dmoe import dMoE
from megablocks.layers.losses import MoELossCollector
from tests.conftest import DEVICE
from megablocks.ops.activation import clamped_swiglu
from tests.layers.moe_reference import (
    BIAS_GRAD_NAMES,
    GRAD_NAMES,
    capture_routing,
    layer_grads,
    layer_params,
    make_args,
    randomize_bias,
    randomize_expert_biases,
    reference_moe,
    route_all_to,
    skip_unavailable,
)
from tests.utils import assert_close, assert_equal

needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")

H, F, E = 40, 24, 8
LOSS_WEIGHT = 0.1


def _layer(impl, dtype, mlp_type, top_k, **kw):
    skip_unavailable(impl, dtype)
    args = make_args(
        impl, dtype, hidden_size=H, ffn_hidden_size=F, moe_num_experts=E, moe_top_k=top_k,
        mlp_type=mlp_type, moe_loss_weight=LOSS_WEIGHT, loss_collector=MoELossCollector(), **kw,
    )
    layer = dMoE(args)
    randomize_bias(layer)
    return layer


def _step(layer, x, grad_out):
    """One training step: output, loss `(out * grad_out).sum() + load_balancing_loss`, backward."""
    out = layer(x)
    loss = (out * grad_out).sum() + layer.load_balancing_loss
    loss.backward()
    return out


def _clear_grads(layer, *tensors):
    for p in layer.parameters():
        p.grad = None
    for t in tensors:
        t.grad = None


def _skewed_input(layer, tokens, dtype):
    """Inputs whose first choice is expert 2 for every token: most experts get no rows."""
    route_all_to(layer, 2)
    return (torch.rand(tokens, H, device=DEVICE) + 0.5).to(dtype)


def _check_step_against_reference(layer, x, grad_out, out, top_experts, dtype):
    """Output and every gradient of `_step` against the fp32 per-expert reference (CPU)."""
    p = layer_params(layer)
    xr = x.detach().float().cpu().requires_grad_(True)
    ref, _, counts = reference_moe(
        xr, p["router"], p["w1"], p["v1"], p["w2"], p["bias"], top_k=layer.args.moe_top_k,
        activation_fn=layer.args.activation_fn, top_experts=top_experts.cpu(), router_bias=p["router_bias"],
        w1_bias=p["w1_bias"], v1_bias=p["v1_bias"], w2_bias=p["w2_bias"],
    )
    logits = xr @ p["router"].t()
    scores = (logits if p["router_bias"] is None else logits + p["router_bias"]).softmax(dim=-1)
    T, K = xr.shape[0], layer.args.moe_top_k
    lbl = LOSS_WEIGHT * E / (T * K) * torch.dot(counts.float(), scores.mean(dim=0))
    ((ref * grad_out.float().cpu()).sum() + lbl).backward()
    assert_equal("tokens_per_expert", layer.experts.tokens_per_expert.cpu().long(), counts)
    assert_close("out", out, ref, dtype=dtype, family="layer")
    assert_close("load_balancing_loss", layer.load_balancing_loss.reshape(1), lbl.reshape(1), dtype=dtype,
                 family="layer")
    grads = layer_grads(layer, x)
    names = GRAD_NAMES + BIAS_GRAD_NAMES
    expected = {"x": xr.grad, **{k: None if p[k] is None else p[k].grad for k in names if k != "x"}}
    for name in names:
        if expected[name] is not None:
            assert_close(f"grad {name}", grads[name], expected[name], dtype=dtype, family="layer")
    return counts


# ------------------------------------------------------------------------------------------------
# 1. No host sync, forward and backward


def _check_step_has_no_host_sync(layer, dtype):
    T = 24
    warm_x = torch.randn(T, H, device=DEVICE, dtype=dtype, requires_grad=True)
    _step(layer, warm_x, torch.randn(T, H, device=DEVICE, dtype=dtype))  # Triton compiles here
    _clear_grads(layer)
    layer.args.loss_collector.clear()
    x = _skewed_input(layer, T, dtype).requires_grad_(True)
    grad_out = torch.randn(T, H, device=DEVICE, dtype=dtype)
    seen = capture_routing(layer)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = _step(layer, x, grad_out)
        batched = layer.args.loss_collector.batched_load_balancing_loss(layer.args)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    counts = _check_step_against_reference(layer, x, grad_out, out, seen["top_experts"], dtype)
    assert_close("batched_load_balancing_loss", batched.reshape(1), layer.load_balancing_loss.reshape(1), dtype=dtype)
    assert bool((counts == 0).any()), f"expected experts without rows, got counts {counts.tolist()}"


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("mlp_type", ["mlp", "glu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["sparse", "triton", "torch"])
def test_step_has_no_host_sync(impl, dtype, mlp_type, top_k, monkeypatch):
    monkeypatch.delenv("MEGABLOCKS_CHECK_VALUES", raising=False)
    _check_step_has_no_host_sync(_layer(impl, dtype, mlp_type, top_k), dtype)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["sparse", "triton", "torch"])
def test_memory_optimized_step_has_no_host_sync(impl, dtype, monkeypatch):
    # The saved-tensor hooks that recompute the activation in the backward.
    monkeypatch.delenv("MEGABLOCKS_CHECK_VALUES", raising=False)
    layer = _layer(impl, dtype, "glu", 2, memory_optimized_mlp=True)
    _check_step_has_no_host_sync(layer, dtype)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("memory_optimized", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["sparse", "triton"])
def test_gpt_oss_experts_step_has_no_host_sync(impl, dtype, memory_optimized, monkeypatch):
    # gpt-oss's experts: per-expert biases (indexed by the rows' experts on the device), the
    # clamped SwiGLU, a router bias (zero here: the skewed routing is the router weight's).
    monkeypatch.delenv("MEGABLOCKS_CHECK_VALUES", raising=False)
    layer = _layer(impl, dtype, "glu", 2, moe_expert_bias=True, moe_router_bias=True, activation_fn=clamped_swiglu,
                   memory_optimized_mlp=memory_optimized)
    randomize_expert_biases(layer)
    with torch.no_grad():
        layer.router.layer.bias.zero_()
    _check_step_has_no_host_sync(layer, dtype)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("impl", ["sparse", "triton"])
def test_value_checks_sync_when_asked(impl, monkeypatch):
    # The control: MEGABLOCKS_CHECK_VALUES=1 reads index values on the host, which the mode catches.
    layer = _layer(impl, torch.float32, "mlp", 2)
    x = torch.randn(16, H, device=DEVICE, requires_grad=True)
    grad_out = torch.randn(16, H, device=DEVICE)
    _step(layer, x, grad_out)
    monkeypatch.setenv("MEGABLOCKS_CHECK_VALUES", "1")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            layer(x)
    finally:
        torch.cuda.set_sync_debug_mode(0)


# ------------------------------------------------------------------------------------------------
# 2. CUDA-graph capture of a training step


def _assert_same(name, actual, expected, dtype):
    if dtype == torch.float32:
        # The same kernels on the same inputs: only library-chosen algorithms (cuBLAS in the
        # router) may differ between capture and eager.
        err = (actual.double() - expected.double()).abs().max().item()
        scale = expected.double().abs().max().item() or 1.0
        assert err <= 1e-5 * scale, f"{name}: max abs err {err:.3e} (scale {scale:.3e})"
    else:
        assert_close(name, actual, expected, dtype=dtype, family="layer")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mlp_type", ["mlp", "glu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["sparse", "triton", "torch"])
def test_cuda_graph_replays_training_step(impl, dtype, mlp_type):
    layer = _layer(impl, dtype, mlp_type, 2)
    T = 32
    static_x = torch.randn(T, H, device=DEVICE, dtype=dtype, requires_grad=True)
    static_grad_out = torch.randn(T, H, device=DEVICE, dtype=dtype)

    # Warm-up on a side stream (kernels compiled, autograd's streams set up), as torch documents.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            _clear_grads(layer, static_x)
            _step(layer, static_x, static_grad_out)
    torch.cuda.current_stream().wait_stream(side)

    _clear_grads(layer, static_x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = _step(layer, static_x, static_grad_out)
    static_loss = layer.load_balancing_loss
    static_counts = layer.experts.tokens_per_expert
    static_grads = {n: p.grad for n, p in layer.named_parameters()}
    static_grads["x"] = static_x.grad
    assert all(g is not None for g in static_grads.values())

    def replay_and_compare(x_new, grad_out_new):
        with torch.no_grad():
            static_x.copy_(x_new)
            static_grad_out.copy_(grad_out_new)
        graph.replay()
        replayed = {n: g.clone() for n, g in static_grads.items()}
        replayed_out, replayed_counts = static_out.clone(), static_counts.clone()
        replayed_loss = static_loss.reshape(1).clone()

        x = x_new.clone().requires_grad_(True)
        _clear_grads(layer)
        out = _step(layer, x, grad_out_new)
        assert_equal("tokens_per_expert", replayed_counts, layer.experts.tokens_per_expert)
        _assert_same("out", replayed_out, out, dtype)
        _assert_same("load_balancing_loss", replayed_loss, layer.load_balancing_loss.reshape(1), dtype)
        _assert_same("grad x", replayed["x"], x.grad, dtype)
        for n, p in layer.named_parameters():
            _assert_same(f"grad {n}", replayed[n], p.grad, dtype)
        return replayed_counts

    def randn():
        return torch.randn(T, H, device=DEVICE, dtype=dtype)

    replay_and_compare(randn(), randn())
    # A new routing (written in place into the captured router weight): most experts get no rows.
    skewed = _skewed_input(layer, T, dtype)
    counts = replay_and_compare(skewed, randn())
    assert int(counts[2]) == T and bool((counts == 0).any()), f"routing not skewed: {counts.tolist()}"


# ------------------------------------------------------------------------------------------------
# 3. torch.compile(fullgraph=True)


class _Model(torch.nn.Module):
    """Linear -> dMoE -> Linear."""

    def __init__(self, moe: dMoE):
        super().__init__()
        dtype, device = moe.router.layer.weight.dtype, moe.router.layer.weight.device
        self.up = torch.nn.Linear(H, H, dtype=dtype, device=device)
        self.moe = moe
        self.down = torch.nn.Linear(H, H, dtype=dtype, device=device)

    def forward(self, x):
        out = self.down(self.moe(self.up(x)))
        return out, self.moe.load_balancing_loss


COMPILE_CASES = [
    pytest.param("sparse", "mlp", 2, id="sparse-mlp-top2"),
    pytest.param("sparse", "glu", 1, id="sparse-glu-top1"),
    pytest.param("triton", "glu", 2, id="grouped-triton-glu-top2"),
    pytest.param("torch", "mlp", 2, id="grouped-torch-mlp-top2"),
]


@pytest.mark.parametrize("impl, mlp_type, top_k", COMPILE_CASES)
def test_compile_fullgraph_matches_eager(impl, mlp_type, top_k):
    # grouped_mm takes bfloat16 only on CUDA; the CPU interpreter mishandles bfloat16.
    dtype = torch.bfloat16 if DEVICE == "cuda" and impl == "torch" else torch.float32
    # fp32 router math: Inductor's fused softmax must not flip near-tied bf16 top-k choices.
    model = _Model(_layer(impl, dtype, mlp_type, top_k, moe_router_fp32=dtype != torch.float32))
    torch._dynamo.reset()
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    T = 16

    def run(module, x, grad_out):
        _clear_grads(model)
        model.moe.args.loss_collector.clear()  # once per step, as in training (the list is guarded)
        xi = x.clone().requires_grad_(True)
        out, lbl = module(xi)
        ((out * grad_out).sum() + lbl).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        grads["x"] = xi.grad
        return out.detach(), lbl.detach(), grads

    inputs = [torch.randn(T, H, device=DEVICE, dtype=dtype)]
    try:
        for i in range(2):
            x, grad_out = inputs[i], torch.randn(T, H, device=DEVICE, dtype=dtype)
            expected = run(model, x, grad_out)
            eager_counts = model.moe.experts.tokens_per_expert.clone()
            with torch._dynamo.config.patch(error_on_recompile=i > 0):
                got = run(compiled, x, grad_out)
            assert_equal("tokens_per_expert", model.moe.experts.tokens_per_expert, eager_counts)
            assert_close("out", got[0], expected[0], dtype=dtype, family="layer")
            assert_close("load_balancing_loss", got[1].reshape(1), expected[1].reshape(1), dtype=dtype, family="layer")
            for name, g in expected[2].items():
                assert_close(f"grad {name}", got[2][name], g, dtype=dtype, family="layer")
            if i == 0:
                # Second call: a routing that leaves most experts empty, same shapes (no recompile).
                with torch.no_grad():
                    model.up.weight.copy_(torch.eye(H, dtype=dtype, device=DEVICE))
                    model.up.bias.zero_()
                inputs.append(_skewed_input(model.moe, T, dtype))
        assert int(eager_counts[2]) == T, f"routing not skewed: {eager_counts.tolist()}"
    finally:
        torch._dynamo.reset()
