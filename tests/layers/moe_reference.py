"""A naive per-expert MoE written from the definitions, and helpers to compare a layer with it.

Legend: T tokens, H hidden, E experts, F ffn per expert, K top-k.

The reference routes with the layer's formulas (softmax or sigmoid scores, top-k, optional p-norm
renormalisation), then loops over experts: the rows of expert e are the (token, k) pairs that
chose it, in flattened-assignment order, cut to `capacity` when given (MoE's drop rule), each
through `act(x W1_e^T) [* x V1_e^T] W2_e`, weighted and summed into their token's output.
Weights are taken in the per-expert layout [E, F, H] for w1, v1 and w2. With per-expert biases
(gpt-oss): `act(x W1_e^T + b1_e) [* (x V1_e^T + bv1_e)] W2_e + b2_e`, a GLU activation (the
clamped SwiGLU) taking both branches; a router bias is added to the logits.
"""

from functools import partial

import pytest
import torch

from megablocks.layers.activation_fn import gated_product
from megablocks.layers.arguments import Arguments
from megablocks.layers.dmoe import dMoE
from tests.conftest import DEVICE
from tests.utils import TF32, TF32Products, assert_close, assert_equal, relative_errors, tolerance

GRAD_NAMES = ("x", "router", "w1", "v1", "w2", "bias")
# The biases of gpt-oss's experts (`moe_router_bias`, `moe_expert_bias`): None where the layer has none.
BIAS_GRAD_NAMES = ("router_bias", "w1_bias", "v1_bias", "w2_bias")


def reference_moe(x, router_w, w1_EFH, v1_EFH, w2_EFH, bias, *, top_k, activation_fn,
                  normalize=None, score_function="softmax", capacity=None, top_experts=None,
                  router_bias=None, w1_bias=None, v1_bias=None, w2_bias=None):
    """Returns (out shaped like x, top_experts_TK, tokens_per_expert_E)."""
    hidden = x.shape[-1]
    x_TH = x.reshape(-1, hidden)
    logits = x_TH @ router_w.t()
    if router_bias is not None:
        logits = logits + router_bias
    scores = torch.sigmoid(logits) if score_function == "sigmoid" else logits.softmax(dim=-1)
    if top_experts is None:
        top_experts = torch.topk(scores, top_k, dim=-1).indices
    weights = scores.gather(1, top_experts)
    if normalize:
        weights = weights / weights.norm(p=normalize, dim=-1, keepdim=True)
    out = torch.zeros_like(x_TH)
    num_experts = router_w.shape[0]
    counts = torch.zeros(num_experts, dtype=torch.int64)
    for e in range(num_experts):
        t_idx, k_idx = (top_experts == e).nonzero(as_tuple=True)
        counts[e] = t_idx.numel()
        if capacity is not None:
            t_idx, k_idx = t_idx[:capacity], k_idx[:capacity]
        xs = x_TH[t_idx]
        h = xs @ w1_EFH[e].t()
        if w1_bias is not None:
            h = h + w1_bias[e]
        if v1_EFH is not None:
            u = xs @ v1_EFH[e].t()
            if v1_bias is not None:
                u = u + v1_bias[e]
            h = gated_product(activation_fn, h, u)
        else:
            h = activation_fn(h)
        y = h @ w2_EFH[e]
        if w2_bias is not None:
            y = y + w2_bias[e]
        out = out.index_add(0, t_idx, y * weights[t_idx, k_idx, None])
    out = out.view(x.shape)
    if bias is not None:
        out = out + bias
    return out, top_experts, counts


def layer_params(layer):
    """The layer's parameters by reference name, in the per-expert layout, as fp32 CPU leaves."""
    E = layer.args.moe_num_experts
    H = layer.args.hidden_size
    mlp = layer.experts.mlp
    dropless = isinstance(layer, dMoE)

    def per_expert(w, transposed):
        if w is None:
            return None
        w = w.detach().float().cpu()
        w = w.view(E, -1, H) if dropless else (w.transpose(1, 2) if transposed else w)
        return w.clone().requires_grad_(True)

    def leaf(t):
        return None if t is None else t.detach().float().cpu().clone().requires_grad_(True)

    return {
        "router": leaf(layer.router.layer.weight),
        "w1": per_expert(mlp.w1, True),
        "v1": per_expert(getattr(mlp, "v1", None), True),
        "w2": per_expert(mlp.w2, False),
        "bias": leaf(layer.experts.bias),
        "router_bias": leaf(layer.router.layer.bias),
        **{name: leaf(getattr(mlp, name, None)) for name in ("w1_bias", "v1_bias", "w2_bias")},
    }


def layer_grads(layer, x):
    """The layer's gradients by reference name, mapped to the per-expert layout (fp32)."""
    E = layer.args.moe_num_experts
    H = layer.args.hidden_size
    mlp = layer.experts.mlp
    dropless = isinstance(layer, dMoE)

    def per_expert(w, transposed):
        if w is None:
            return None
        g = w.grad.float()
        return g.view(E, -1, H) if dropless else (g.transpose(1, 2) if transposed else g)

    def grad(t):
        return None if t is None else t.grad.float()

    return {
        "x": x.grad.float(),
        "router": layer.router.layer.weight.grad.float(),
        "w1": per_expert(mlp.w1, True),
        "v1": per_expert(getattr(mlp, "v1", None), True),
        "w2": per_expert(mlp.w2, False),
        "bias": grad(layer.experts.bias),
        "router_bias": grad(layer.router.layer.bias),
        **{name: grad(getattr(mlp, name, None)) for name in ("w1_bias", "v1_bias", "w2_bias")},
    }


def capture_routing(layer):
    """Records the router's outputs of the next forward in a dict (key 'top_experts')."""
    seen = {}

    def hook(module, inputs, outputs):
        seen["scores"], seen["weights"], seen["top_experts"] = outputs

    layer.router.register_forward_hook(hook)
    return seen


# 'sparse' is the block-sparse path; the others name the grouped-GEMM backend.
IMPLS = ["sparse", "triton", "torch", "gg"]
BLOCK = 16


def skip_unavailable(impl: str, dtype: torch.dtype) -> None:
    if impl == "gg":
        pytest.importorskip("grouped_gemm")
        if DEVICE != "cuda" or dtype != torch.bfloat16:
            pytest.skip("the grouped_gemm package runs bfloat16 on CUDA only")
    if impl == "torch" and DEVICE == "cuda" and dtype != torch.bfloat16:
        pytest.skip("torch's grouped_mm takes bfloat16 only on CUDA")


def make_args(impl: str = "torch", dtype: torch.dtype = torch.float32, **kw) -> Arguments:
    if impl == "torch" and DEVICE == "cuda" and dtype != torch.bfloat16:
        impl = "triton"
    base = dict(
        hidden_size=40,
        ffn_hidden_size=24,
        moe_num_experts=4,
        moe_top_k=2,
        fp16=dtype == torch.float16,
        bf16=dtype == torch.bfloat16,
        device=DEVICE,
        moe_block_size=BLOCK,
        mlp_impl="sparse" if impl == "sparse" else "grouped",
        gmm_backend="auto" if impl == "sparse" else impl,
        bias=True,
        return_bias=False,
        moe_loss_weight=0.0,
        init_method=partial(torch.nn.init.normal_, mean=0.0, std=0.1),
        output_layer_init_method=partial(torch.nn.init.normal_, mean=0.0, std=0.1),
    )
    base.update(kw)
    return Arguments(**base)


def randomize_bias(layer) -> None:
    with torch.no_grad():
        layer.experts.bias.normal_()


def randomize_expert_biases(layer) -> None:
    """Random router and per-expert biases (zero-initialised in the layer).

    The up projections' biases are small (|b| <= 3) but every fifth, which is ±12: with the
    products of these tests (|x w| of 2 at most) the clamped SwiGLU's inputs are clamped where
    the bias is large (gate above 7, up beyond ±7) and stay 2 or more away from its limits
    everywhere, so that 16-bit rounding never moves an input across a limit, where the gradient
    jumps.
    """
    mlp = layer.experts.mlp
    with torch.no_grad():
        if layer.router.layer.bias is not None:
            layer.router.layer.bias.normal_(0.0, 1.0)
        mlp.w2_bias.normal_(0.0, 1.0)
        for t in (mlp.w1_bias, getattr(mlp, "v1_bias", None)):
            if t is not None:
                t.normal_(0.0, 1.0).clamp_(-3.0, 3.0)
                large = t.view(-1)[::5]
                large.copy_(torch.where(large >= 0, 12.0, -12.0))


def route_all_to(layer, expert: int) -> None:
    """Makes `expert` every token's first choice for inputs in [0.5, 1.5] (router logit gap ~4)."""
    with torch.no_grad():
        w = layer.router.layer.weight
        w.copy_(0.01 * torch.randn_like(w) - 0.05)
        w[expert] += 0.1


def check_against_reference(layer, x, *, capacity=None, dtype=torch.float32, top_experts_from_layer=False,
                            autocast=None):
    """Runs layer and reference on x with a random output gradient; compares out and every grad.

    `autocast`: a dtype to run the layer's forward under autocast with (the reference runs outside).
    """
    args = layer.args
    seen = capture_routing(layer)
    with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
        out = layer(x)
    grad_out = torch.randn_like(out)
    (out * grad_out).sum().backward()

    p = layer_params(layer)
    forced = seen["top_experts"].cpu() if top_experts_from_layer else None
    kw = dict(top_k=args.moe_top_k, activation_fn=args.activation_fn, normalize=args.moe_normalize_expert_weights,
              capacity=capacity)
    names = ("router", "w1", "v1", "w2", "bias", "router_bias", "w1_bias", "v1_bias", "w2_bias")

    def reference(xr, q, top):
        return reference_moe(xr, q["router"], q["w1"], q["v1"], q["w2"], q["bias"], top_experts=top,
                             router_bias=q["router_bias"], w1_bias=q["w1_bias"], v1_bias=q["v1_bias"],
                             w2_bias=q["w2_bias"], **kw)

    # The reference twice: in fp32 (its routing is what the layer must choose; checked below) and
    # in float64 along that routing (the exact values). Where a result is ill-conditioned (a sum
    # that cancels, e.g. one token through one FFN column) fp32 is far off the exact value, and
    # `assert_close` allows the layer a few times the fp32 reference's own error there.
    xr32 = x.detach().float().cpu().requires_grad_(True)
    ref32, top_experts, counts = reference(xr32, p, forced)
    (ref32 * grad_out.float().cpu()).sum().backward()
    q = {k: None if p[k] is None else p[k].detach().double().requires_grad_(True) for k in names}
    xr = x.detach().double().cpu().requires_grad_(True)
    ref, _, _ = reference(xr, q, top_experts)
    (ref * grad_out.double().cpu()).sum().backward()
    assert_equal("top_experts", seen["top_experts"].cpu(), top_experts)
    assert_equal("tokens_per_expert", layer.experts.tokens_per_expert.cpu().long(), counts)
    plain_out, plain_params, xp = ref32, p, xr32
    if TF32 and dtype == torch.float32:
        # Under MEGABLOCKS_TEST_TF32 the layer's products round their inputs to TF32, so the plain
        # computation that measures how ill-conditioned a result is rounds them too (`TF32Products`:
        # the reference in fp32 with every product's operands rounded to TF32), along the same routing.
        plain_params = {k: None if p[k] is None else p[k].detach().float().cpu().requires_grad_(True) for k in names}
        xp = x.detach().float().cpu().requires_grad_(True)
        with TF32Products():
            plain_out, _, _ = reference(xp, plain_params, top_experts)
        (plain_out * grad_out.float().cpu()).sum().backward()
    assert_close("out", out, ref, dtype=dtype, family="layer", plain=plain_out)
    grads = layer_grads(layer, x)
    names = GRAD_NAMES + BIAS_GRAD_NAMES
    expected = {"x": xr.grad, **{k: None if q[k] is None else q[k].grad for k in names if k != "x"}}
    plain = {"x": xp.grad, **{k: None if plain_params[k] is None else plain_params[k].grad for k in names if k != "x"}}
    for name in names:
        if expected[name] is None:
            assert grads[name] is None, f"{name}: the layer has a parameter the reference lacks"
        elif name == "router_bias" and dtype in (torch.float16, torch.bfloat16):
            _assert_max_close(f"grad {name}", grads[name], expected[name], dtype)
        else:
            assert_close(f"grad {name}", grads[name], expected[name], dtype=dtype, family="layer", plain=plain[name])
    return top_experts


def _assert_max_close(name, actual, expected, dtype):
    """The router bias's gradient in 16 bits, by its max error alone: a vector of one sum per
    expert over the tokens' router-logit gradients, which torch's own 16-bit router computes and
    which cancel, so one or two units of the last place of a sum are most of its size; over a
    handful of elements the rms averages nothing (measured on the H200 in bf16: 9.5e-3 max,
    1.03e-2 rms against the layer limits of 2e-2 / 1e-2)."""
    max_tol, _ = tolerance(dtype, "layer")
    max_err, _ = relative_errors(actual.detach().double().cpu(), expected.detach().double().cpu())
    assert actual.shape == expected.shape and max_err <= max_tol, (
        f"{name}: rel max err {max_err:.3e} (tol {max_tol:.1e}) [layer, max only]")
