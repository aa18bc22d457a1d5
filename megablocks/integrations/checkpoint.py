"""Expert-weight conversions between MegaBlocks' layout (ours) and the Hugging Face layouts.

Legend: E experts, F ffn per expert, H hidden.

    dMoE (MegaBlocks and ours)   w1, v1, w2           [E·F, H]   row e·F + f is row f of expert e;
                                                                 h = x @ w1_e^T, y = act(h) @ w2_e
    MoE  (MegaBlocks and ours)   w1, v1 [E, H, F], w2 [E, F, H]  (capacity-bounded layer)
    transformers >= 5 (fused)    gate_up_proj [E, 2F, H]  gate rows first, then up rows
                                 down_proj    [E, H, F]          (also vLLM's w1 / w2)
    gpt-oss (transformers)       gate_up_proj [E, H, 2F]  gate and up columns interleaved
                                 (gate = [..., ::2], up = [..., 1::2]), gate_up_proj_bias [E, 2F]
                                 likewise; down_proj [E, F, H], down_proj_bias [E, H]
    per-expert Linear weights    gate [F, H], up [F, H], down [H, F] for each expert
                                 Mixtral:      block_sparse_moe.experts.{i}.w1 / w3 / w2
                                 Qwen, OLMoE:  mlp.experts.{i}.gate_proj / up_proj / down_proj

`w1` is the gate (the projection that goes through the activation), `v1` the up projection.
Every function returns new contiguous tensors (no views of its inputs) and is exact: a round
trip returns bitwise the same values (`fp8_per_expert_to_fused` with F not a multiple of 128
rounds once more, as it says).

State-dict helpers convert the expert keys of a whole model between the transformers layout and
the one `megablocks.integrations.hf.convert_model` produces (`<block>.moe.router.layer.weight`,
`<block>.moe.experts.mlp.{w1,v1,w2}`); other keys pass through unchanged.

FP8 checkpoints (DeepSeek-V3's layout: e4m3 weights with a `weight_scale_inv` per 128 x 128
block): `fp8_per_expert_to_fused` builds the FP8 operands of `fused_moe`, `dequantize_fp8` the
higher-precision weights (to train from them, or for the layouts above).
"""

import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megablocks.backend import fp8

# Per-expert key names: style -> (gate, up, down).
PER_EXPERT_NAMES = {
    "mixtral": ("w1", "w3", "w2"),
    "qwen": ("gate_proj", "up_proj", "down_proj"),
}


def _check_weight(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")


def fused_to_dmoe(gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """transformers' fused experts (vLLM's w1/w2) -> dMoE `(w1, v1, w2)`, each [E·F, H].

    Args:
        gate_up_proj: [E, 2F, H], the gate rows then the up rows of each expert.
        down_proj: [E, H, F].

    Raises:
        TypeError, ValueError: not tensors, or shapes that do not fit together.
    """
    _check_weight("gate_up_proj", gate_up_proj, 3)
    _check_weight("down_proj", down_proj, 3)
    e, two_f, h = gate_up_proj.shape
    if two_f % 2:
        raise ValueError(f"gate_up_proj: expected an even middle dimension (2F), got shape {tuple(gate_up_proj.shape)}")
    f = two_f // 2
    if tuple(down_proj.shape) != (e, h, f):
        raise ValueError(f"down_proj: expected shape {(e, h, f)} (E, H, F), got {tuple(down_proj.shape)}")
    w1 = gate_up_proj[:, :f].reshape(e * f, h).clone()
    v1 = gate_up_proj[:, f:].reshape(e * f, h).clone()
    w2 = down_proj.transpose(1, 2).reshape(e * f, h).clone()
    return w1, v1, w2


def dmoe_to_fused(w1: torch.Tensor, v1: torch.Tensor, w2: torch.Tensor, num_experts: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """dMoE `(w1, v1, w2)` [E·F, H] -> transformers' `(gate_up_proj [E, 2F, H], down_proj [E, H, F])`.

    Raises:
        TypeError, ValueError: not tensors, mismatched shapes, or rows not divisible by num_experts.
    """
    f, h = _dmoe_shape(num_experts, w1=w1, v1=v1, w2=w2)
    gate_up = torch.cat([w1.view(num_experts, f, h), v1.view(num_experts, f, h)], dim=1).contiguous()
    down = w2.view(num_experts, f, h).transpose(1, 2).contiguous()
    return gate_up, down


def gpt_oss_to_dmoe(gate_up_proj: torch.Tensor, gate_up_proj_bias: torch.Tensor, down_proj: torch.Tensor,
                    down_proj_bias: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """gpt-oss's experts -> dMoE `(w1, v1, w2 [E·F, H], w1_bias, v1_bias [E, F], w2_bias [E, H])`
    (`moe_expert_bias`): the interleaved gate and up columns de-interleaved.

    Args:
        gate_up_proj: [E, H, 2F], column 2f of expert e the gate's feature f, column 2f + 1 the
            up projection's.
        gate_up_proj_bias: [E, 2F], interleaved likewise.
        down_proj: [E, F, H].
        down_proj_bias: [E, H].

    Raises:
        TypeError, ValueError: not tensors, or shapes that do not fit together.
    """
    _check_weight("gate_up_proj", gate_up_proj, 3)
    _check_weight("gate_up_proj_bias", gate_up_proj_bias, 2)
    _check_weight("down_proj", down_proj, 3)
    _check_weight("down_proj_bias", down_proj_bias, 2)
    e, h, two_f = gate_up_proj.shape
    if two_f % 2:
        raise ValueError(f"gate_up_proj: expected an even last dimension (2F), got shape {tuple(gate_up_proj.shape)}")
    f = two_f // 2
    for name, t, shape in (("gate_up_proj_bias", gate_up_proj_bias, (e, two_f)), ("down_proj", down_proj, (e, f, h)),
                           ("down_proj_bias", down_proj_bias, (e, h))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape} (from gate_up_proj {tuple(gate_up_proj.shape)}), "
                             f"got {tuple(t.shape)}")
    w1 = gate_up_proj[..., ::2].transpose(1, 2).reshape(e * f, h).clone()
    v1 = gate_up_proj[..., 1::2].transpose(1, 2).reshape(e * f, h).clone()
    w2 = down_proj.reshape(e * f, h).clone()
    return (w1, v1, w2, gate_up_proj_bias[:, ::2].clone(), gate_up_proj_bias[:, 1::2].clone(),
            down_proj_bias.clone())


def dmoe_to_gpt_oss(w1: torch.Tensor, v1: torch.Tensor, w2: torch.Tensor, w1_bias: torch.Tensor,
                    v1_bias: torch.Tensor, w2_bias: torch.Tensor, num_experts: int) -> Tuple[torch.Tensor, ...]:
    """The inverse of `gpt_oss_to_dmoe`: `(gate_up_proj, gate_up_proj_bias, down_proj,
    down_proj_bias)`.

    Raises:
        TypeError, ValueError: not tensors, mismatched shapes, or rows not divisible by num_experts.
    """
    f, h = _dmoe_shape(num_experts, w1=w1, v1=v1, w2=w2)
    for name, t, shape in (("w1_bias", w1_bias, (num_experts, f)), ("v1_bias", v1_bias, (num_experts, f)),
                           ("w2_bias", w2_bias, (num_experts, h))):
        _check_weight(name, t, 2)
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    gate_up = torch.stack([w1.view(num_experts, f, h), v1.view(num_experts, f, h)], dim=2)  # [E, F, 2, H]
    gate_up = gate_up.reshape(num_experts, 2 * f, h).transpose(1, 2).contiguous()
    gate_up_bias = torch.stack([w1_bias, v1_bias], dim=2).reshape(num_experts, 2 * f).contiguous()
    return gate_up, gate_up_bias, w2.view(num_experts, f, h).clone(), w2_bias.clone()


def _dmoe_shape(num_experts: int, **weights: Optional[torch.Tensor]) -> Tuple[int, int]:
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts: expected a positive int, got {num_experts!r}")
    shape = None
    for name, t in weights.items():
        if t is None:
            continue
        _check_weight(name, t, 2)
        if shape is None:
            shape = tuple(t.shape)
        elif tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape} (as the other dMoE weights), got {tuple(t.shape)}")
    if shape[0] % num_experts:
        raise ValueError(f"w1: expected E·F rows with E={num_experts}, got {shape[0]} rows")
    return shape[0] // num_experts, shape[1]


def per_expert_to_dmoe(
    gate: Sequence[torch.Tensor], up: Optional[Sequence[torch.Tensor]], down: Sequence[torch.Tensor]
) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Per-expert Linear weights -> dMoE `(w1, v1, w2)` [E·F, H] (`v1` None when `up` is None).

    Args:
        gate: E tensors [F, H] (the activation's input projection; Mixtral's `w1`).
        up: E tensors [F, H] (Mixtral's `w3`), or None for a non-gated MLP.
        down: E tensors [H, F] (Mixtral's `w2`).
    """
    if len(gate) == 0 or len(down) != len(gate) or (up is not None and len(up) != len(gate)):
        raise ValueError(
            f"gate, up, down: expected the same positive number of experts, got {len(gate)}, "
            f"{None if up is None else len(up)}, {len(down)}"
        )
    w1 = torch.cat(list(gate), dim=0)
    v1 = None if up is None else torch.cat(list(up), dim=0)
    w2 = torch.cat([d.t() for d in down], dim=0)
    _dmoe_shape(len(gate), w1=w1, v1=v1, w2=w2)
    return w1, v1, w2


def dmoe_to_per_expert(
    w1: torch.Tensor, v1: Optional[torch.Tensor], w2: torch.Tensor, num_experts: int
) -> Tuple[List[torch.Tensor], Optional[List[torch.Tensor]], List[torch.Tensor]]:
    """dMoE `(w1, v1, w2)` -> per-expert lists `(gate [F, H], up [F, H] or None, down [H, F])`."""
    f, h = _dmoe_shape(num_experts, w1=w1, v1=v1, w2=w2)
    gate = [w.clone() for w in w1.view(num_experts, f, h)]
    up = None if v1 is None else [w.clone() for w in v1.view(num_experts, f, h)]
    down = [w.t().contiguous() for w in w2.view(num_experts, f, h)]
    return gate, up, down


def dequantize_fp8(weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                   dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """An FP8 block-quantized weight as `dtype`: `weight` [..., N, K] float8_e4m3fn times its
    `weight_scale_inv` [..., ceil(N/128), ceil(K/128)] block by block (DeepSeek-V3's layout).

    Raises:
        TypeError, ValueError: not an e4m3 weight with fp32 scales of its 128 x 128 blocks.
    """
    _check_fp8(weight, weight_scale_inv, "weight")
    lead = weight.shape[:-2]
    flat = weight.reshape(-1, *weight.shape[-2:])
    scales = weight_scale_inv.reshape(-1, *weight_scale_inv.shape[-2:])
    return fp8.dequantize_blocks(flat, scales).to(dtype).reshape(*lead, *weight.shape[-2:])


def _check_fp8(weight, scale_inv, name: str) -> None:
    if not isinstance(weight, torch.Tensor) or not isinstance(scale_inv, torch.Tensor):
        raise TypeError(f"{name}, {name}_scale_inv: expected torch.Tensors")
    if weight.dtype != fp8.FP8_DTYPE:
        raise TypeError(f"{name}: expected float8_e4m3fn values, got {weight.dtype}")
    if scale_inv.dtype != torch.float32:
        raise TypeError(f"{name}_scale_inv: expected float32 scales, got {scale_inv.dtype}")
    if weight.dim() < 2:
        raise ValueError(f"{name}: expected at least 2 dimensions, got shape {tuple(weight.shape)}")
    blocks = (*weight.shape[:-2], fp8.cdiv(weight.shape[-2], fp8.Q), fp8.cdiv(weight.shape[-1], fp8.Q))
    if tuple(scale_inv.shape) != blocks:
        raise ValueError(f"{name}_scale_inv: expected shape {blocks} (one scale per {fp8.Q} x {fp8.Q} block of "
                         f"{tuple(weight.shape)}), got {tuple(scale_inv.shape)}")


def fp8_per_expert_to_fused(
    gate: Sequence[torch.Tensor], gate_scale_inv: Sequence[torch.Tensor],
    up: Sequence[torch.Tensor], up_scale_inv: Sequence[torch.Tensor],
    down: Sequence[torch.Tensor], down_scale_inv: Sequence[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """FP8 per-expert checkpoint weights (DeepSeek-V3, Qwen3 FP8: `experts.{i}.gate_proj.weight`
    e4m3 [F, H] with `weight_scale_inv` [ceil(F/128), ceil(H/128)], likewise `up_proj`, and
    `down_proj` [H, F]) -> `(w1 [E, 2F, H], w1_scale, w2 [E, H, F], w2_scale)`, the FP8 layout
    `fused_moe(..., w1_scale=, w2_scale=)` takes.

    Exact (the values and scales copied) when F is a multiple of 128. Otherwise the gate's last
    block row and the up projection's first share a block of the fused [2F, H] matrix: both are
    dequantized and the fused matrix quantized again (`megablocks.backend.fp8.quantize_blocks`,
    power-of-two scales; one more e4m3 rounding of w1). w2 is always exact.

    Raises:
        TypeError, ValueError: lists of different lengths, not e4m3 with fp32 block scales, or
            shapes that do not fit together.
    """
    lists = dict(gate=gate, up=up, down=down, gate_scale_inv=gate_scale_inv, up_scale_inv=up_scale_inv,
                 down_scale_inv=down_scale_inv)
    if len({len(v) for v in lists.values()}) != 1 or len(gate) == 0:
        raise ValueError(f"expected the same positive number of experts in every list, got "
                         f"{ {k: len(v) for k, v in lists.items()} }")
    for name, ws, ss in (("gate", gate, gate_scale_inv), ("up", up, up_scale_inv), ("down", down, down_scale_inv)):
        for i, (w, s_) in enumerate(zip(ws, ss)):
            _check_fp8(w, s_, f"{name}[{i}]")
    f, h = gate[0].shape
    for name, ws, shape in (("gate", gate, (f, h)), ("up", up, (f, h)), ("down", down, (h, f))):
        for i, w in enumerate(ws):
            if tuple(w.shape) != shape:
                raise ValueError(f"{name}[{i}]: expected shape {shape}, got {tuple(w.shape)}")
    w2 = torch.stack(list(down)).contiguous()
    w2_scale = torch.stack(list(down_scale_inv)).contiguous()
    if f % fp8.Q == 0:
        w1 = torch.cat([torch.stack(list(gate)), torch.stack(list(up))], dim=1).contiguous()
        w1_scale = torch.cat([torch.stack(list(gate_scale_inv)), torch.stack(list(up_scale_inv))], dim=1).contiguous()
        return w1, w1_scale, w2, w2_scale
    full = torch.cat([fp8.dequantize_blocks(torch.stack(list(gate)), torch.stack(list(gate_scale_inv))),
                      fp8.dequantize_blocks(torch.stack(list(up)), torch.stack(list(up_scale_inv)))], dim=1)
    w1, w1_scale = fp8.quantize_blocks(full)
    return w1, w1_scale, w2, w2_scale


def moe_to_dmoe(w1: torch.Tensor, w2: torch.Tensor, v1: Optional[torch.Tensor] = None):
    """`MoE` experts (w1, v1 [E, H, F], w2 [E, F, H]) -> dMoE `(w1, v1, w2)` [E·F, H]."""
    _check_weight("w1", w1, 3)
    _check_weight("w2", w2, 3)
    e, h, f = w1.shape
    if tuple(w2.shape) != (e, f, h) or (v1 is not None and tuple(v1.shape) != (e, h, f)):
        raise ValueError(f"w2, v1: expected shapes {(e, f, h)} and {(e, h, f)} (from w1), got "
                         f"{tuple(w2.shape)} and {None if v1 is None else tuple(v1.shape)}")
    flat = [None if t is None else t.transpose(1, 2).reshape(e * f, h).clone() for t in (w1, v1)]
    return flat[0], flat[1], w2.reshape(e * f, h).clone()


def dmoe_to_moe(w1: torch.Tensor, w2: torch.Tensor, num_experts: int, v1: Optional[torch.Tensor] = None):
    """dMoE `(w1, v1, w2)` [E·F, H] -> `MoE` experts `(w1 [E, H, F], v1 or None, w2 [E, F, H])`."""
    f, h = _dmoe_shape(num_experts, w1=w1, v1=v1, w2=w2)
    up = [None if t is None else t.view(num_experts, f, h).transpose(1, 2).contiguous() for t in (w1, v1)]
    return up[0], up[1], w2.view(num_experts, f, h).clone()


_FUSED_KEY = re.compile(r"^(?P<block>.*)\.experts\.gate_up_proj$")
_PER_EXPERT_KEY = re.compile(r"^(?P<block>.*)\.experts\.(?P<i>\d+)\.(?P<name>\w+)\.weight$")


def hf_to_megablocks_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A transformers MoE model's state dict -> the keys of its `convert_model` form.

    Reads both the fused layout (`<block>.experts.gate_up_proj`, `.down_proj`) and the per-expert
    layouts (Mixtral `<block>.experts.{i}.w1/w3/w2.weight`, Qwen/OLMoE
    `<block>.experts.{i}.gate_proj/up_proj/down_proj.weight`). For each MoE block the router
    `<block>.gate.weight` becomes `<block>.moe.router.layer.weight` and the experts become
    `<block>.moe.experts.mlp.{w1,v1,w2}`; every other key is kept.

    Raises:
        ValueError: a block whose experts are incomplete (a missing expert index or projection).
    """
    out = dict(state_dict)
    blocks = {}
    for key in state_dict:
        m = _FUSED_KEY.match(key)
        if m:
            block = m.group("block")
            w1, v1, w2 = fused_to_dmoe(out.pop(key), out.pop(f"{block}.experts.down_proj"))
            blocks[block] = (w1, v1, w2)
    per_expert: Dict[str, Dict[str, Dict[int, torch.Tensor]]] = {}
    for key in list(out):
        m = _PER_EXPERT_KEY.match(key)
        if m and any(m.group("name") in names for names in PER_EXPERT_NAMES.values()):
            per_expert.setdefault(m.group("block"), {}).setdefault(m.group("name"), {})[int(m.group("i"))] = out.pop(key)
    for block, by_name in per_expert.items():
        style = next((s for s, names in PER_EXPERT_NAMES.items() if set(by_name) == set(names)), None)
        if style is None:
            raise ValueError(f"state_dict: expected the expert projections of one style under {block}.experts, "
                             f"got {sorted(by_name)}")
        gate_name, up_name, down_name = PER_EXPERT_NAMES[style]
        num_experts = max(by_name[gate_name]) + 1
        for name, tensors in by_name.items():
            if sorted(tensors) != list(range(num_experts)):
                raise ValueError(f"state_dict: expected experts 0..{num_experts - 1} of {block}.experts.*.{name}, "
                                 f"got {sorted(tensors)}")
        ordered = [[by_name[n][i] for i in range(num_experts)] for n in (gate_name, up_name, down_name)]
        blocks[block] = per_expert_to_dmoe(*ordered)
    for block, (w1, v1, w2) in blocks.items():
        gate_key = f"{block}.gate.weight"
        if gate_key in out:
            out[f"{block}.moe.router.layer.weight"] = out.pop(gate_key)
        out[f"{block}.moe.experts.mlp.w1"] = w1
        out[f"{block}.moe.experts.mlp.v1"] = v1
        out[f"{block}.moe.experts.mlp.w2"] = w2
    return out


_DMOE_KEY = re.compile(r"^(?P<block>.*)\.moe\.experts\.mlp\.w1$")


def megablocks_to_hf_state_dict(
    state_dict: Dict[str, torch.Tensor], num_experts: int, style: str = "fused"
) -> Dict[str, torch.Tensor]:
    """The inverse of `hf_to_megablocks_state_dict`.

    Args:
        state_dict: keys as `convert_model` produces them (`<block>.moe.experts.mlp.{w1,v1,w2}`,
            `<block>.moe.router.layer.weight`).
        num_experts: E of every MoE block.
        style: 'fused' (transformers >= 5: `experts.gate_up_proj`, `experts.down_proj`), 'mixtral'
            (`experts.{i}.w1/w3/w2.weight`) or 'qwen' (`experts.{i}.gate_proj/up_proj/down_proj.weight`).

    Raises:
        ValueError: an unknown style, or a block without its `v1` (the HF experts are gated).
    """
    if style != "fused" and style not in PER_EXPERT_NAMES:
        raise ValueError(f"style: expected 'fused' or one of {sorted(PER_EXPERT_NAMES)}, got {style!r}")
    out = dict(state_dict)
    for key in state_dict:
        m = _DMOE_KEY.match(key)
        if not m:
            continue
        block = m.group("block")
        prefix = f"{block}.moe.experts.mlp."
        if prefix + "v1" not in out:
            raise ValueError(f"state_dict: expected {prefix}v1 (the HF experts are gated), found none")
        w1, v1, w2 = out.pop(prefix + "w1"), out.pop(prefix + "v1"), out.pop(prefix + "w2")
        router_key = f"{block}.moe.router.layer.weight"
        if router_key in out:
            out[f"{block}.gate.weight"] = out.pop(router_key)
        if style == "fused":
            gate_up, down = dmoe_to_fused(w1, v1, w2, num_experts)
            out[f"{block}.experts.gate_up_proj"] = gate_up
            out[f"{block}.experts.down_proj"] = down
            continue
        names = PER_EXPERT_NAMES[style]
        for name, tensors in zip(names, dmoe_to_per_expert(w1, v1, w2, num_experts)):
            for i, t in enumerate(tensors):
                out[f"{block}.experts.{i}.{name}.weight"] = t
    return out
