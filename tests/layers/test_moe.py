"""MoE (capacity factor) against the naive loop with MoE's drop rule; MoE == dMoE when nothing drops;
the shared expert; MegaBlocks-layout state dicts load unchanged and mean what they meant there."""

import pytest
import torch
import torch.nn.functional as F

from megablocks.layers.dmoe import dMoE
from megablocks.layers.moe import MoE
from tests.conftest import DEVICE
from tests.layers.moe_reference import (
    GRAD_NAMES,
    check_against_reference,
    layer_grads,
    make_args,
    randomize_bias,
    reference_moe,
)
from tests.utils import assert_close, assert_equal


@pytest.mark.parametrize("mlp_type", ["mlp", "glu"])
def test_moe_small_capacity_drops_what_the_rule_drops(mlp_type):
    # T = 16, K = 2, E = 4: capacity int(0.5 * 2 * 16 / 4) = 4 rows per expert, of 8 on average.
    layer = MoE(make_args(mlp_type=mlp_type, moe_capacity_factor=0.5))
    randomize_bias(layer)
    assert layer.experts.expert_capacity(16) == 4
    x = torch.randn(8, 2, 40, device=DEVICE, requires_grad=True)
    check_against_reference(layer, x, capacity=4)
    assert int(layer.experts.tokens_per_expert.max()) > 4, "nothing was dropped: the test would not see the rule"


@pytest.mark.parametrize("capacity_factor", [0, 4])
def test_moe_without_drops_equals_dmoe(capacity_factor):
    # A factor of 0 means "as many rows as the largest expert"; 4 = E leaves room for every row.
    dropless = dMoE(make_args("triton", mlp_type="glu"))
    randomize_bias(dropless)
    moe = MoE(make_args(mlp_type="glu", moe_capacity_factor=capacity_factor))
    E, H = 4, 40
    state = dropless.state_dict()
    for name in ("w1", "v1"):
        state[f"experts.mlp.{name}"] = state[f"experts.mlp.{name}"].view(E, -1, H).transpose(1, 2).contiguous()
    state["experts.mlp.w2"] = state["experts.mlp.w2"].view(E, -1, H)
    moe.load_state_dict(state)
    x = torch.randn(12, 40, device=DEVICE)
    results = []
    for layer in (dropless, moe):
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        out.backward(torch.ones_like(out))
        results.append((out, layer_grads(layer, xi)))
    # Two whole layers (router, two products, activation, weighted scatter each): the layer limits.
    assert_close("out", results[1][0], results[0][0], family="layer")
    for name in GRAD_NAMES:
        assert_close(f"grad {name}", results[1][1][name], results[0][1][name], family="layer")
    # With ample capacity the reference without a capacity holds too.
    moe.zero_grad()
    check_against_reference(moe, x.clone().requires_grad_(True))


def test_moe_capacity_zero_from_few_tokens_means_no_dropping():
    # int(1 * 1 * 3 / 4) = 0: MegaBlocks then uses the largest expert's count.
    layer = MoE(make_args(moe_top_k=1, moe_capacity_factor=1))
    assert layer.experts.expert_capacity(3) == 0
    check_against_reference(layer, torch.randn(3, 40, device=DEVICE, requires_grad=True))


# ------------------------------------------------------------------------------------------------
# Shared expert and MegaBlocks-layout state dicts


def _megablocks_state(kind: str, mlp_type: str, shared: bool, E=4, H=40, Fs=24, S=20):
    """A state dict with MegaBlocks 0.10's keys and shapes (random values)."""
    g = torch.Generator().manual_seed(7)

    def r(*shape):
        return (0.2 * torch.randn(*shape, generator=g)).to(DEVICE)

    state = {"router.layer.weight": r(E, H), "experts.bias": r(H)}
    if kind == "dmoe":
        state.update({"experts.mlp.w1": r(E * Fs, H), "experts.mlp.w2": r(E * Fs, H)})
        if mlp_type == "glu":
            state["experts.mlp.v1"] = r(E * Fs, H)
    else:
        state.update({"experts.mlp.w1": r(E, H, Fs), "experts.mlp.w2": r(E, Fs, H)})
        if mlp_type == "glu":
            state["experts.mlp.v1"] = r(E, H, Fs)
    if shared:
        projections = ("up_proj", "gate_proj") if mlp_type == "glu" else ("up_proj",)
        for name in projections:
            state[f"shared_expert.{name}.weight"] = r(S, H)
            state[f"shared_expert.{name}.bias"] = r(S)
        state["shared_expert.down_proj.weight"] = r(H, S)
        state["shared_expert.down_proj.bias"] = r(H)
    return state


STATE_CASES = [
    pytest.param("dmoe", "sparse", "mlp", False, False, id="dmoe-sparse-mlp"),
    pytest.param("dmoe", "torch", "glu", True, False, id="dmoe-grouped-glu-shared"),
    pytest.param("dmoe", "torch", "mlp", True, True, id="dmoe-grouped-mlp-shared-weighted"),
    pytest.param("moe", "torch", "glu", True, False, id="moe-glu-shared"),
]


@pytest.mark.parametrize("kind, impl, mlp_type, shared, weighted", STATE_CASES)
def test_megablocks_state_dict_round_trips(kind, impl, mlp_type, shared, weighted):
    E, H, Fs, S, K = 4, 40, 24, 20, 2
    args = make_args(impl, mlp_type=mlp_type, shared_expert=shared, shared_expert_hidden_size=S,
                     shared_expert_weighted_sum=weighted, moe_capacity_factor=0)
    layer = (dMoE if kind == "dmoe" else MoE)(args)
    state = _megablocks_state(kind, mlp_type, shared)
    layer.load_state_dict(state)  # strict: same keys, same shapes
    mine = layer.state_dict()
    assert set(mine) == set(state)
    for key, value in state.items():
        assert_equal(key, mine[key], value)

    # The loaded tensors mean what they meant in MegaBlocks: compare with the loop from `state`.
    x = torch.randn(6, 2, H, device=DEVICE)
    out = layer(x)
    cpu = {k: v.float().cpu() for k, v in state.items()}
    if kind == "dmoe":
        w1, w2 = cpu["experts.mlp.w1"].view(E, Fs, H), cpu["experts.mlp.w2"].view(E, Fs, H)
        v1 = cpu["experts.mlp.v1"].view(E, Fs, H) if mlp_type == "glu" else None
    else:
        w1, w2 = cpu["experts.mlp.w1"].transpose(1, 2), cpu["experts.mlp.w2"]
        v1 = cpu["experts.mlp.v1"].transpose(1, 2) if mlp_type == "glu" else None
    xc = x.cpu()
    expected, _, _ = reference_moe(xc, cpu["router.layer.weight"], w1, v1, w2, cpu["experts.bias"],
                                   top_k=K, activation_fn=args.activation_fn)
    if shared:
        def linear(name, t):
            return F.linear(t, cpu[f"shared_expert.{name}.weight"], cpu[f"shared_expert.{name}.bias"])

        hidden = args.activation_fn(linear("gate_proj" if mlp_type == "glu" else "up_proj", xc))
        if mlp_type == "glu":
            hidden = hidden * linear("up_proj", xc)
        shared_out = linear("down_proj", hidden)
        if weighted:  # MegaBlocks weights the experts' output with its bias added
            expected = shared_out / (K + 1) + expected * K / (K + 1)
        else:
            expected = shared_out + expected
    assert_close("out", out, expected)


def test_shared_expert_with_return_bias_keeps_bias_apart():
    args = make_args(shared_expert=True, return_bias=True)
    layer = dMoE(args)
    randomize_bias(layer)
    x = torch.randn(5, 40, device=DEVICE)
    out, bias = layer(x)
    assert bias is layer.experts.bias
    plain = dMoE(make_args(shared_expert=True, return_bias=False))
    plain.load_state_dict(layer.state_dict())
    assert_close("out + bias", plain(x), out + bias)
    assert layer.shared_expert.up_proj.weight.dtype == torch.float32


def test_moe_bad_input():
    layer = MoE(make_args())
    with pytest.raises(ValueError, match=r"hidden_size=40"):
        layer(torch.randn(3, 4, device=DEVICE))
    with pytest.raises(TypeError, match="x: expected dtype torch.float32"):
        layer(torch.randn(3, 40, device=DEVICE, dtype=torch.float16))


@pytest.mark.parametrize("glu, gate", [(True, False), (False, True), (True, True)])
def test_gated_and_glu_shared_expert(glu, gate):
    """The GLU shared expert (`shared_expert_glu`) and its sigmoid gate (`shared_expert_gate`)
    against the formula, forward and every gradient, inside the layer's output."""
    torch.manual_seed(11)
    args = make_args(shared_expert=True, shared_expert_hidden_size=20, shared_expert_glu=glu,
                     shared_expert_gate=gate, moe_capacity_factor=0, bias=False)
    layer = MoE(args)
    x = torch.randn(9, args.hidden_size, device=DEVICE, requires_grad=True)
    out = layer(x)
    shared = layer.shared_expert
    layer.shared_expert = None
    experts_only = layer(x)
    layer.shared_expert = shared

    x64 = x.detach().double().requires_grad_()
    p64 = {n: p.detach().double().requires_grad_() for n, p in shared.named_parameters()}
    up = x64 @ p64["up_proj.weight"].t()
    h = args.activation_fn(x64 @ p64["gate_proj.weight"].t()) * up if glu else args.activation_fn(up)
    want = h @ p64["down_proj.weight"].t()
    if gate:
        want = torch.sigmoid(x64 @ p64["gate.weight"].t()) * want
    assert_close("shared expert output", out - experts_only, want, torch.float32)
    g = torch.randn_like(out)
    (out - experts_only).backward(g)
    want.backward(g.double())
    assert_close("d x (shared part)", x.grad, x64.grad, torch.float32)
    for name, p in shared.named_parameters():
        assert_close(f"d {name}", p.grad, p64[name].grad, torch.float32)
    assert (shared.gate_proj is not None) == glu and (shared.gate is not None) == gate
