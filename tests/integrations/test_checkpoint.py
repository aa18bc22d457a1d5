"""Expert-weight layout conversions: each against the meaning of the layouts, and round trips."""

import pytest
import torch
import torch.nn.functional as F

from megablocks.integrations import checkpoint as ckpt
from tests.utils import assert_close, assert_equal

E, H, FF = 3, 10, 6


def fused():
    return torch.randn(E, 2 * FF, H), torch.randn(E, H, FF)


def expert_outputs_fused(x, gate_up, down, e):
    g, u = (x @ gate_up[e].t()).chunk(2, dim=-1)
    return (F.silu(g) * u) @ down[e].t()


def expert_outputs_dmoe(x, w1, v1, w2, e):
    rows = slice(e * FF, (e + 1) * FF)
    return (F.silu(x @ w1[rows].t()) * (x @ v1[rows].t())) @ w2[rows]


def test_fused_dmoe_meaning_and_round_trip():
    gate_up, down = fused()
    w1, v1, w2 = ckpt.fused_to_dmoe(gate_up, down)
    assert w1.shape == v1.shape == w2.shape == (E * FF, H)
    x = torch.randn(5, H)
    for e in range(E):
        assert_close(f"expert {e}", expert_outputs_dmoe(x, w1, v1, w2, e), expert_outputs_fused(x, gate_up, down, e))
    back = ckpt.dmoe_to_fused(w1, v1, w2, E)
    assert_equal("gate_up_proj", back[0], gate_up)
    assert_equal("down_proj", back[1], down)
    w1.add_(1.0)  # results are copies, not views of the inputs
    assert_equal("gate_up_proj untouched", ckpt.dmoe_to_fused(*ckpt.fused_to_dmoe(gate_up, down), E)[0], gate_up)


def test_gpt_oss_dmoe_meaning_and_round_trip():
    """gpt-oss's experts (gate/up interleaved in [E, H, 2F] and [E, 2F], down [E, F, H] with a
    bias [E, H]) against dMoE's w1, v1, w2 and their biases: the same expert outputs by
    transformers' formula, and back bitwise."""
    gate_up, gate_up_bias = torch.randn(E, H, 2 * FF), 4 * torch.randn(E, 2 * FF)
    down, down_bias = torch.randn(E, FF, H), torch.randn(E, H)
    w1, v1, w2, w1_bias, v1_bias, w2_bias = ckpt.gpt_oss_to_dmoe(gate_up, gate_up_bias, down, down_bias)
    assert w1.shape == v1.shape == w2.shape == (E * FF, H)
    assert w1_bias.shape == v1_bias.shape == (E, FF) and w2_bias.shape == (E, H)
    x = torch.randn(5, H)
    for e in range(E):
        h = x @ gate_up[e] + gate_up_bias[e]
        gate, up = h[:, ::2].clamp(max=7.0), h[:, 1::2].clamp(-7.0, 7.0)
        expected = ((up + 1) * gate * torch.sigmoid(1.702 * gate)) @ down[e] + down_bias[e]
        rows = slice(e * FF, (e + 1) * FF)
        gate, up = (x @ w1[rows].t() + w1_bias[e]).clamp(max=7.0), (x @ v1[rows].t() + v1_bias[e]).clamp(-7.0, 7.0)
        got = ((up + 1) * gate * torch.sigmoid(1.702 * gate)) @ w2[rows] + w2_bias[e]
        assert_close(f"expert {e}", got, expected)
    back = ckpt.dmoe_to_gpt_oss(w1, v1, w2, w1_bias, v1_bias, w2_bias, E)
    for name, got, want in zip(("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"), back,
                               (gate_up, gate_up_bias, down, down_bias)):
        assert_equal(name, got, want)
    with pytest.raises(ValueError, match=r"down_proj: expected shape \(3, 6, 10\)"):
        ckpt.gpt_oss_to_dmoe(gate_up, gate_up_bias, down.transpose(1, 2), down_bias)
    with pytest.raises(ValueError, match="even last dimension"):
        ckpt.gpt_oss_to_dmoe(gate_up[..., 1:], gate_up_bias, down, down_bias)
    with pytest.raises(ValueError, match=r"w2_bias: expected shape \(3, 10\)"):
        ckpt.dmoe_to_gpt_oss(w1, v1, w2, w1_bias, v1_bias, w2_bias[:, 1:], E)


@pytest.mark.parametrize("gated", [True, False])
def test_per_expert_round_trip(gated):
    gate = [torch.randn(FF, H) for _ in range(E)]
    up = [torch.randn(FF, H) for _ in range(E)] if gated else None
    down = [torch.randn(H, FF) for _ in range(E)]
    w1, v1, w2 = ckpt.per_expert_to_dmoe(gate, up, down)
    assert (v1 is None) != gated
    x = torch.randn(4, H)
    e = 1
    rows = slice(e * FF, (e + 1) * FF)
    assert_close("down of expert 1", F.silu(x @ w1[rows].t()) @ w2[rows], F.silu(x @ gate[e].t()) @ down[e].t())
    g2, u2, d2 = ckpt.dmoe_to_per_expert(w1, v1, w2, E)
    for i in range(E):
        assert_equal(f"gate {i}", g2[i], gate[i])
        assert_equal(f"down {i}", d2[i], down[i])
        if gated:
            assert_equal(f"up {i}", u2[i], up[i])


def test_moe_dmoe_round_trip():
    w1, v1, w2 = torch.randn(E, H, FF), torch.randn(E, H, FF), torch.randn(E, FF, H)
    d1, dv, d2 = ckpt.moe_to_dmoe(w1, w2, v1)
    x = torch.randn(4, H)
    rows = slice(2 * FF, 3 * FF)
    assert_close("expert 2", (F.gelu(x @ d1[rows].t()) * (x @ dv[rows].t())) @ d2[rows],
                 (F.gelu(x @ w1[2]) * (x @ v1[2])) @ w2[2])
    b1, bv, b2 = ckpt.dmoe_to_moe(d1, d2, E, v1=dv)
    assert_equal("w1", b1, w1)
    assert_equal("v1", bv, v1)
    assert_equal("w2", b2, w2)
    assert ckpt.moe_to_dmoe(w1, w2)[1] is None


@pytest.mark.parametrize("style", ["fused", "mixtral", "qwen"])
def test_state_dict_round_trip(style):
    gate_up, down = fused()
    router = torch.randn(E, H)
    sd = {"model.layers.0.mlp.gate.weight": router, "model.layers.0.mlp.experts.gate_up_proj": gate_up,
          "model.layers.0.mlp.experts.down_proj": down, "model.norm.weight": torch.randn(H),
          "model.layers.1.mlp.shared_expert.gate_proj.weight": torch.randn(FF, H)}
    ours = ckpt.hf_to_megablocks_state_dict(sd)
    assert set(ours) == {"model.layers.0.mlp.moe.router.layer.weight", "model.layers.0.mlp.moe.experts.mlp.w1",
                         "model.layers.0.mlp.moe.experts.mlp.v1", "model.layers.0.mlp.moe.experts.mlp.w2",
                         "model.norm.weight", "model.layers.1.mlp.shared_expert.gate_proj.weight"}
    hf_sd = ckpt.megablocks_to_hf_state_dict(ours, E, style=style)
    if style == "fused":
        assert set(hf_sd) == set(sd)
        for k in sd:
            assert_equal(k, hf_sd[k], sd[k])
    else:
        gate_name, up_name, down_name = ckpt.PER_EXPERT_NAMES[style]
        assert_equal("expert 2 down", hf_sd[f"model.layers.0.mlp.experts.2.{down_name}.weight"], down[2])
        assert_equal("expert 1 up", hf_sd[f"model.layers.0.mlp.experts.1.{up_name}.weight"], gate_up[1, FF:])
        again = ckpt.hf_to_megablocks_state_dict(hf_sd)  # per-expert keys read back
        assert set(again) == set(ours)
        for k in ours:
            assert_equal(k, again[k], ours[k])


def test_bad_input():
    gate_up, down = fused()
    with pytest.raises(ValueError, match="down_proj"):
        ckpt.fused_to_dmoe(gate_up, down.transpose(1, 2))
    with pytest.raises(ValueError, match="gate_up_proj"):
        ckpt.fused_to_dmoe(gate_up[:, 1:], down)
    with pytest.raises(TypeError, match="gate_up_proj"):
        ckpt.fused_to_dmoe(gate_up.tolist(), down)
    w1, v1, w2 = ckpt.fused_to_dmoe(gate_up, down)
    with pytest.raises(ValueError, match="E·F rows"):
        ckpt.dmoe_to_fused(w1, v1, w2, 4)
    with pytest.raises(ValueError, match="v1"):
        ckpt.dmoe_to_fused(w1, v1[1:], w2, E)
    with pytest.raises(ValueError, match="style"):
        ckpt.megablocks_to_hf_state_dict({}, E, style="deepseek")
    with pytest.raises(ValueError, match="experts 0..2"):
        ckpt.hf_to_megablocks_state_dict({f"b.experts.{i}.{n}.weight": torch.randn(FF, H)
                                          for i in (0, 2) for n in ("w1", "w2", "w3")})
