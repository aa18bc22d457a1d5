"""Hugging Face transformers (>= 5) integration: a "megablocks" experts implementation, and a
conversion of MoE blocks to `dMoE`.

Legend: T tokens, H hidden, E experts, F ffn per expert, K top-k, N = T·K routed rows.

1. `megablocks_experts_forward` is registered in transformers' experts interface
   (`transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS`) under the name "megablocks" when this
   module is imported. Models whose experts use `@use_experts_implementation` (Mixtral, Qwen2-MoE,
   Qwen3-MoE, OLMoE, ...) then run our routed grouped GEMMs on their own parameters:

       import megablocks.integrations.hf
       model = AutoModelForCausalLM.from_pretrained(name, experts_implementation="megablocks")
       # or: model.set_experts_implementation("megablocks")

   The model, its router, its parameters and its state dict are untouched; only the experts'
   computation changes: x_NH = gather(x_TH), h = gmm(x_NH, gate_up_proj^T), act(gate) * up,
   y = gmm(h, down_proj^T), out_TH = scatter(y, weights). Without autograd (generation), with
   the kernel policy's `fused_forms` on (the default), experts with transformers' default gate
   (`act(gate) * up` on concatenated [gate; up] weights, a SiLU/GELU/ReLU activation, no biases)
   take the routed form instead (`inference.experts_from_ids`): four launches per layer at decode
   sizes. `register(name, policy=KernelPolicy(...))` registers the same forward under another
   name with other kernel choices (`megablocks.policy.KernelPolicy`).

   FP8 checkpoints (transformers' fine-grained FP8: `FP8Experts` with e4m3 `gate_up_proj` /
   `down_proj` and fp32 `*_scale_inv` per 128 x 128 block) get `megablocks_fp8_experts_forward`
   under the same name in transformers' `FP8ExpertsInterface`: the routed rows quantized per
   1 x 128 tile and multiplied by megablocks' FP8 grouped GEMM (`inference.fp8_experts_from_ids`).

2. `convert_model(model)` replaces each sparse-MoE block by a `MegaBlocksMoeBlock` holding a
   `megablocks.layers.dmoe.dMoE` (`.moe`): the router weight is the same Parameter as the HF
   router's, the expert weights are converted to the dMoE layout [E·F, H] (a copy; the HF experts
   are dropped). Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3 and GLM-4.5 (sigmoid scores,
   the expert-score bias as dMoE's `expert_bias`, group-limited top-k, the routed scaling factor);
   the shared experts (Qwen2-MoE's gated one, DeepSeek-V3's) are kept as they were. gpt-oss
   (`GptOssMLP`): the router's weight and bias are the same Parameters (`moe_router_bias`; its
   softmax over the k chosen logits is dMoE's renormalised softmax), the down projection's bias
   is the same Parameter as `w2_bias` and its weight shares storage with `w2` ([E, F, H] is the
   dMoE layout), the interleaved gate/up weight and bias are de-interleaved into `w1`, `v1`,
   `w1_bias`, `v1_bias` (copies; `moe_expert_bias`), the activation is `clamped_swiglu` (gpt-oss's
   limit 7 and alpha 1.702; other values are refused). FP8 experts (transformers' `FP8Experts`)
   become a dMoE with `fp8='blockwise'`: its parameters the dequantized checkpoint (bf16), its
   FP8 weight cache seeded with the checkpoint's own values and scales (exact where the expert
   FFN is a multiple of 128; else the gate and up halves are quantized again), so it serves the
   checkpoint's FP8 products until the weights change. A block dMoE cannot reproduce gets an
   error that names what it lacks. The model then trains with
   dMoE's kernels and losses (`dMoE.load_balancing_loss` when `moe_loss_weight > 0`). The router
   logits are no longer recorded for `output_router_logits`; use the dMoE losses instead.
"""

from typing import Optional

import torch

from megablocks.integrations import inference
from megablocks.integrations.checkpoint import dequantize_fp8, fused_to_dmoe, gpt_oss_to_dmoe
from megablocks.layers import mpu
from megablocks.layers.arguments import Arguments
from megablocks.layers.dmoe import dMoE
from megablocks.ops.activation import (ACTIVATION_FUNCTIONS, GELU_APPROXIMATIONS, SWIGLU_ALPHA, SWIGLU_LIMIT,
                                       clamped_swiglu)
from megablocks.ops.gmm import gmm
from megablocks.ops.permute import gather, scatter
from megablocks.ops.routing import routing_metadata
from megablocks.policy import KernelPolicy, as_policy

IMPLEMENTATION_NAME = "megablocks"


def megablocks_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
    policy: Optional[KernelPolicy] = None,
) -> torch.Tensor:
    """The forward of a transformers experts module (`@use_experts_implementation`) on megablocks ops.

    Args:
        self: the experts module: `gate_up_proj` [E, 2F, H] (or `up_proj` [E, F, H] when not
            gated; [E, H, ·] when `is_transposed`), `down_proj` [E, H, F], optional biases
            `*_proj_bias` [E, ·], `act_fn` / `_apply_gate`, `num_experts`.
        hidden_states: [T, H].
        top_k_index: [T, K] int expert ids.
        top_k_weights: [T, K] routing weights.
        policy: the kernel choices (`megablocks.policy.KernelPolicy`); None: the defaults.

    Returns:
        [T, H] in hidden_states' dtype: `Σ_k weight_tk · expert_{id_tk}(x_t)`, differentiable in
        the inputs, the weights and the expert parameters.

    Raises:
        NotImplementedError: the module is expert-parallel (transformers' sentinel routing).
    """
    if getattr(self, "_is_expert_parallel", False):
        raise NotImplementedError("experts_implementation='megablocks' does not take transformers' expert parallelism; "
                                  "use megablocks' own (Arguments.moe_expert_model_parallelism)")
    policy = as_policy(policy, "policy")
    top_k = top_k_index.shape[-1]
    up_weight = self.gate_up_proj if self.has_gate else self.up_proj
    x_TH = hidden_states.to(up_weight.dtype)
    activation = _inference_activation(self)
    if activation is not None and not (torch.is_grad_enabled() and any(
            t.requires_grad for t in (x_TH, top_k_weights, up_weight, self.down_proj))):
        out = inference.experts_from_ids(x_TH, up_weight, self.down_proj, top_k_index, top_k_weights, activation,
                                         trans_b=not self.is_transposed, policy=policy)
        if out is not None:
            return out.to(hidden_states.dtype)
    with torch.no_grad():
        meta = routing_metadata(top_k_index, self.num_experts, 1, small_routing=policy.small_routing)
    x_NH = gather(x_TH, meta.indices, meta.bin_ids, meta.bins, top_k)
    trans_b = not self.is_transposed
    h = gmm(x_NH, up_weight, meta.tokens_per_expert, trans_b=trans_b)
    if self.has_bias:
        h = h + (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias)[meta.bin_ids.long()]
    h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
    y = gmm(h, self.down_proj, meta.tokens_per_expert, trans_b=trans_b)
    if self.has_bias:
        y = y + self.down_proj_bias[meta.bin_ids.long()]
    if getattr(self, "has_post_expert_norm", False):  # transformers releases that have one
        y = self.post_expert_norm(y)
    out = scatter(y, meta.indices, meta.bin_ids, top_k_weights.reshape(-1), meta.bins, top_k)
    return out.to(hidden_states.dtype)


# The activations the routed form's GEMM epilogue computes, by transformers' and torch's names
# (`transformers.activations.ACT2FN`: 'silu', 'swish', 'gelu', 'gelu_pytorch_tanh', 'gelu_new', 'relu').
_ACTIVATIONS = {
    ("transformers.activations", "SiLUActivation"): "silu",
    ("torch.nn.modules.activation", "SiLU"): "silu",
    ("transformers.activations", "GELUActivation"): "gelu",
    ("transformers.activations", "GELUTanh"): "gelu_tanh",
    ("transformers.activations", "PytorchGELUTanh"): "gelu_tanh",
    ("transformers.activations", "NewGELUActivation"): "gelu_tanh",
    ("torch.nn.modules.activation", "ReLU"): "relu",
}
_FUNCTIONAL_ACTIVATIONS = {torch.nn.functional.silu: "silu", torch.nn.functional.gelu: "gelu",
                           torch.nn.functional.relu: "relu"}


def _inference_activation(experts: torch.nn.Module) -> Optional[str]:
    """The GLU activation of an experts module the routed form computes exactly as transformers
    does (its default `_apply_gate`: `act(gate) * up` on concatenated [gate; up] weights, no
    biases, no post-expert norm), else None."""
    if not experts.has_gate or experts.has_bias or getattr(experts, "has_post_expert_norm", False):
        return None
    if not getattr(experts, "is_concatenated", True):
        return None
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:
        return None
    if getattr(type(experts), "_apply_gate", None) is not _default_apply_gate:
        return None
    return _activation_name(experts.act_fn)


def _activation_name(act) -> Optional[str]:
    """Our name of a transformers / torch activation module or function, None where unknown."""
    if isinstance(act, torch.nn.GELU):
        return GELU_APPROXIMATIONS.get(act.approximate)
    if isinstance(act, torch.nn.Module):
        return _ACTIVATIONS.get((type(act).__module__, type(act).__name__))
    return _FUNCTIONAL_ACTIVATIONS.get(act)


def activation_function(act):
    """The dMoE `activation_fn` for a transformers module's activation (`act_fn`): the torch
    function the fused kernels know by name (`_activation_name`; transformers' `SiLUActivation`,
    say, is F.silu), so that a dMoE built from the module takes its fused paths (an activation
    module they do not recognise sends it down the composed torch ops); `act` itself where unknown
    or hooked."""
    name = _activation_name(act)
    if name is None or (isinstance(act, torch.nn.Module) and (act._forward_hooks or act._forward_pre_hooks)):
        return act
    return ACTIVATION_FUNCTIONS[name]


def register(name: str = IMPLEMENTATION_NAME, policy: Optional[KernelPolicy] = None) -> None:
    """Registers `megablocks_experts_forward` in transformers' experts interface under `name`,
    running with `policy` (a `megablocks.policy.KernelPolicy` or a dict of its fields; None: the
    defaults).

    Idempotent; done with the default name and policy when this module is imported.
    """
    from transformers.integrations.moe import ExpertsInterface

    try:  # transformers' fine-grained FP8 experts (FP8 checkpoints) have their own interface
        from transformers.integrations.finegrained_fp8 import FP8ExpertsInterface
    except ImportError:
        FP8ExpertsInterface = None
    if policy is None:
        ExpertsInterface.register(name, megablocks_experts_forward)
        if FP8ExpertsInterface is not None:
            FP8ExpertsInterface.register(name, megablocks_fp8_experts_forward)
        return
    policy = as_policy(policy, "policy")

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return megablocks_experts_forward(self, hidden_states, top_k_index, top_k_weights, policy)

    def fp8_forward(self, hidden_states, top_k_index, top_k_weights):
        return megablocks_fp8_experts_forward(self, hidden_states, top_k_index, top_k_weights, policy)

    ExpertsInterface.register(name, forward)
    if FP8ExpertsInterface is not None:
        FP8ExpertsInterface.register(name, fp8_forward)


def fp8_unsupported_reason(experts: torch.nn.Module) -> Optional[str]:
    """Why `megablocks_fp8_experts_forward` cannot run a transformers `FP8Experts` module (None: it can)."""
    if getattr(experts, "_is_expert_parallel", False):
        return "transformers' expert parallelism"
    if not getattr(experts, "has_gate", False) or getattr(experts, "has_bias", False):
        return "experts without a gate or with biases"
    if tuple(getattr(experts, "block_size", None) or ()) != (128, 128):
        return f"block size {getattr(experts, 'block_size', None)} (128 x 128 is supported)"
    if getattr(experts, "activation_scheme", "dynamic") != "dynamic":
        return "static activation scales"
    if experts.gate_up_proj.dtype != torch.float8_e4m3fn or experts.down_proj.dtype != torch.float8_e4m3fn:
        return f"weights in {experts.gate_up_proj.dtype} (float8_e4m3fn is supported)"
    if experts.gate_up_proj_scale_inv.dtype != torch.float32 or experts.down_proj_scale_inv.dtype != torch.float32:
        return "scales not in float32"
    if any(getattr(experts, a, None) is not None for a in ("swiglu_alpha", "limit", "gate_softcap", "up_softcap")):
        return "a clamped or softcapped gate"
    if _activation_name(experts.act_fn) is None:
        return f"the activation {experts.act_fn!r}"
    return None


def megablocks_fp8_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
    policy: Optional[KernelPolicy] = None,
) -> torch.Tensor:
    """The forward of transformers' fine-grained FP8 experts (`FP8Experts`: `gate_up_proj`
    [E, 2F, H] and `down_proj` [E, H, F] in float8_e4m3fn with `*_scale_inv` per 128 x 128
    block, dynamic activation scales) on megablocks' FP8 grouped GEMM
    (`inference.fp8_experts_from_ids`), registered as "megablocks" in transformers'
    `FP8ExpertsInterface`. Without gradients (FP8 checkpoints serve). A module it does not cover
    (`fp8_unsupported_reason`: other block sizes, static scales, clamped gates, ...) runs
    transformers' own eager FP8 forward.
    """
    policy = as_policy(policy, "policy")
    needs_grad = torch.is_grad_enabled() and (hidden_states.requires_grad or top_k_weights.requires_grad)
    if fp8_unsupported_reason(self) is None and not needs_grad:
        out = inference.fp8_experts_from_ids(hidden_states, self.gate_up_proj, self.gate_up_proj_scale_inv,
                                             self.down_proj, self.down_proj_scale_inv, top_k_index, top_k_weights,
                                             _activation_name(self.act_fn), policy)
        return out.to(hidden_states.dtype)
    import inspect

    return inspect.unwrap(type(self).forward)(self, hidden_states, top_k_index, top_k_weights)


class MegaBlocksMoeBlock(torch.nn.Module):
    """A transformers sparse-MoE block on a `dMoE` (`.moe`), with Qwen2-MoE's gated shared expert.

    `forward(hidden_states [..., H])` returns the same shape:
    `dMoE(x) + sigmoid(shared_expert_gate(x)) * shared_expert(x)` (the shared term only when the
    original block had one); with `returns_pair` (gpt-oss's `GptOssMLP`, whose decoder layer
    unpacks two values) the pair `(output, None)`: the router scores are not returned. State-dict
    keys: `moe.router.layer.weight` (and `.bias`), `moe.experts.mlp.{w1,v1,w2}` (and their
    `*_bias`), and the original `shared_expert.*`, `shared_expert_gate.weight`.
    """

    def __init__(self, moe: dMoE, shared_expert: Optional[torch.nn.Module] = None,
                 shared_expert_gate: Optional[torch.nn.Module] = None, shared_name: str = "shared_expert",
                 returns_pair: bool = False):
        super().__init__()
        self.moe = moe
        # The shared expert keeps its model's attribute name (Qwen2-MoE's `shared_expert`,
        # DeepSeek-V3's and GLM-4.5's `shared_experts`), so its state-dict keys stay the model's.
        self._shared_name = shared_name
        setattr(self, shared_name, shared_expert)
        self.shared_expert_gate = shared_expert_gate
        self.returns_pair = returns_pair

    def forward(self, hidden_states: torch.Tensor):
        out = self.moe(hidden_states)
        shared_expert = getattr(self, self._shared_name)
        if shared_expert is not None:
            shared = shared_expert(hidden_states)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(hidden_states)) * shared
            out = out + shared
        return (out, None) if self.returns_pair else out


def _keep(t: torch.Tensor) -> torch.Tensor:
    return t


def _normalizes_top_k(block: torch.nn.Module) -> bool:
    # Mixtral's router always renormalises the top-k weights; the others follow norm_topk_prob.
    return bool(getattr(block.gate, "norm_topk_prob", True))


# Routers whose semantics dMoE's router reproduces: softmax over the logits, top-k, optionally
# renormalised; and DeepSeek-V3's (GLM-4.5's the same): sigmoid scores, the expert-score bias for
# choosing, group-limited top-k, renormalised, times the routed scaling factor.
SOFTMAX_ROUTERS = ("MixtralTopKRouter", "Qwen2MoeTopKRouter", "Qwen3MoeTopKRouter", "OlmoeTopKRouter")
GROUPED_SIGMOID_ROUTERS = ("DeepseekV3TopkRouter", "Glm4MoeTopkRouter")
# gpt-oss's: a Linear with a bias, top-k of the logits, softmax over the k chosen.
GPT_OSS_ROUTERS = ("GptOssTopKRouter",)
SUPPORTED_ROUTERS = SOFTMAX_ROUTERS + GROUPED_SIGMOID_ROUTERS + GPT_OSS_ROUTERS
_GPT_OSS_EXPERT_PARAMS = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")


def is_gpt_oss_block(module: torch.nn.Module) -> bool:
    """Whether `module` is a gpt-oss MoE block `convert_model` converts: a `router` of
    GPT_OSS_ROUTERS (`weight` [E, H], `bias` [E]) and experts with gpt-oss's parameters
    (`gate_up_proj` [E, H, 2F] interleaved, `gate_up_proj_bias`, `down_proj` [E, F, H],
    `down_proj_bias`) and its clamped SwiGLU's limit 7 and alpha 1.702."""
    router, experts = getattr(module, "router", None), getattr(module, "experts", None)
    return (
        type(router).__name__ in GPT_OSS_ROUTERS
        and isinstance(getattr(router, "weight", None), torch.Tensor)
        and isinstance(getattr(router, "bias", None), torch.Tensor)
        and hasattr(router, "top_k")
        and all(isinstance(getattr(experts, name, None), torch.Tensor) for name in _GPT_OSS_EXPERT_PARAMS)
        and getattr(experts, "limit", None) == SWIGLU_LIMIT
        and getattr(experts, "alpha", None) == SWIGLU_ALPHA
    )


def is_sparse_moe_block(module: torch.nn.Module) -> bool:
    """Whether `module` is a block `convert_model` converts: a router `gate` of SUPPORTED_ROUTERS
    (`weight` [E, H]) and gated, bias-free, non-transposed fused experts (`gate_up_proj`,
    `down_proj`), or a gpt-oss block (`is_gpt_oss_block`)."""
    if is_gpt_oss_block(module):
        return True
    gate, experts = getattr(module, "gate", None), getattr(module, "experts", None)
    return (
        type(gate).__name__ in SOFTMAX_ROUTERS + GROUPED_SIGMOID_ROUTERS
        and isinstance(getattr(gate, "weight", None), torch.Tensor)
        and hasattr(gate, "top_k")
        and isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor)
        and isinstance(getattr(experts, "down_proj", None), torch.Tensor)
        and getattr(experts, "has_gate", True)
        and not getattr(experts, "has_bias", False)
        and not getattr(experts, "is_transposed", False)
        and not getattr(experts, "has_post_expert_norm", False)
    )


def unsupported_reason(module: torch.nn.Module) -> Optional[str]:
    """Why a transformers MoE block (a router and fused experts) is not one `convert_model`
    converts, naming the missing feature; None for a convertible block or any other module."""
    experts = getattr(module, "experts", None)
    router = getattr(module, "gate", None) or getattr(module, "router", None)
    if not isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor) or not hasattr(router, "top_k"):
        return None
    if is_sparse_moe_block(module):
        return None
    kind = type(module).__name__
    if type(router).__name__ in GPT_OSS_ROUTERS:
        limit, alpha = getattr(experts, "limit", None), getattr(experts, "alpha", None)
        if (limit, alpha) != (SWIGLU_LIMIT, SWIGLU_ALPHA):
            return (f"{kind}: a clamped SwiGLU with swiglu_limit={limit}, swiglu_alpha={alpha}; dMoE's "
                    f"'clamped_swiglu' is gpt-oss's, limit {SWIGLU_LIMIT} and alpha {SWIGLU_ALPHA}")
        return f"{kind}: expected gpt-oss's parameters ({', '.join(_GPT_OSS_EXPERT_PARAMS)}, a router bias)"
    if getattr(experts, "has_bias", False) or isinstance(getattr(experts, "gate_up_proj_bias", None), torch.Tensor):
        return (f"{kind}: per-expert biases are converted in gpt-oss's layout only (router "
                f"{', '.join(GPT_OSS_ROUTERS)}, interleaved gate/up), got router {type(router).__name__}")
    if getattr(experts, "is_transposed", False):
        return f"{kind}: transposed expert weights are not supported"
    if not getattr(experts, "has_gate", True):
        return f"{kind}: ungated experts are not supported"
    if getattr(experts, "has_post_expert_norm", False):
        return f"{kind}: a norm after the experts is not supported"
    return f"{kind}: its router {type(router).__name__} is not one dMoE reproduces ({', '.join(SUPPORTED_ROUTERS)})"


def dmoe_from_block(block: torch.nn.Module, **overrides) -> MegaBlocksMoeBlock:
    """A `MegaBlocksMoeBlock` computing what the transformers sparse-MoE `block` computes.

    Args:
        block: a Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE / DeepSeek-V3 / GLM-4.5 / gpt-oss
            sparse-MoE block (see `is_sparse_moe_block`).
        overrides: `Arguments` fields to set (e.g. mlp_impl='sparse', moe_loss_weight=0.01,
            gmm_backend='torch'); defaults: mlp_impl='grouped', moe_loss_weight=0, no bias.

    Mixtral's `router_jitter_noise` becomes `moe_jitter_eps`; note that dMoE jitters the router
    input only, where Mixtral also jitters the experts' input (training only; 0 by default).

    Raises:
        TypeError: `block` is not a supported sparse-MoE block.
        ValueError: invalid overrides, or expert weights of an unsupported dtype.
    """
    if not is_sparse_moe_block(block):
        raise TypeError(f"block: expected a transformers sparse-MoE block, got {type(block).__name__}")
    if is_gpt_oss_block(block):
        return _dmoe_from_gpt_oss_block(block, **overrides)
    weight = block.experts.gate_up_proj
    num_experts, two_f, hidden = weight.shape
    fp8_experts = weight.dtype == torch.float8_e4m3fn
    if fp8_experts:  # transformers' fine-grained FP8 experts: computed in FP8 by the dMoE too
        reason = fp8_unsupported_reason(block.experts)
        if reason is not None:
            raise ValueError(f"{type(block).__name__}: FP8 experts with {reason} cannot be converted")
        gate_up = dequantize_fp8(weight.detach(), block.experts.gate_up_proj_scale_inv.detach())
        down = dequantize_fp8(block.experts.down_proj.detach(), block.experts.down_proj_scale_inv.detach())
        weight = gate_up
    kwargs = _common_arguments(weight, hidden, two_f // 2, num_experts, block.gate.top_k)
    if fp8_experts:
        kwargs["fp8"] = "blockwise"
    kwargs.update(
        moe_normalize_expert_weights=1 if _normalizes_top_k(block) else None,
        moe_jitter_eps=getattr(block, "jitter_noise", 0.0) or None,
        activation_fn=activation_function(block.experts.act_fn),
    )
    if type(block.gate).__name__ in GROUPED_SIGMOID_ROUTERS:
        kwargs.update(_grouped_sigmoid_routing(block.gate))
    kwargs.update(overrides)
    args = Arguments(**kwargs)
    moe = dMoE(args)
    moe.router.layer.weight = block.gate.weight
    if args.moe_router_enable_expert_bias:  # the same buffer: the model's state dict keeps it
        moe.router.expert_bias = block.gate.e_score_correction_bias
    if fp8_experts:
        w1, v1, w2 = fused_to_dmoe(gate_up, down)
    else:
        w1, v1, w2 = fused_to_dmoe(block.experts.gate_up_proj.detach(), block.experts.down_proj.detach())
    with torch.no_grad():
        moe.experts.mlp.w1.copy_(w1)
        moe.experts.mlp.v1.copy_(v1)
        moe.experts.mlp.w2.copy_(w2)
    if fp8_experts and args.fp8 == "blockwise" and args.mlp_impl == "grouped":
        _seed_fp8_cache(moe.experts.mlp, block.experts, num_experts, two_f // 2, hidden)
    name = "shared_experts" if getattr(block, "shared_experts", None) is not None else "shared_expert"
    return MegaBlocksMoeBlock(moe, getattr(block, name, None), getattr(block, "shared_expert_gate", None), name)


def _seed_fp8_cache(mlp: torch.nn.Module, experts: torch.nn.Module, num_experts: int, ffn: int, hidden: int) -> None:
    """The dMoE's FP8 weight cache starts from the checkpoint's own values and scales, so that
    serving multiplies exactly the checkpoint's FP8 experts: the down projection as stored (in x
    out, the form of w2 the forward reads; held, not copied), and, where F is a multiple of 128,
    the gate and up projections in the layout the layer multiplies (`fp8_stacks_up_weights`: the
    checkpoint's fused tensor held as it is; else each half copied). Elsewhere a block spans both
    halves, and they are quantized again from the dequantized values."""
    from megablocks.ops.fp8 import Fp8WeightCache

    cache = mlp.__dict__.setdefault("_fp8_weights", Fp8WeightCache(transposed=True))
    shape = (num_experts, -1, hidden)
    cache.seed(mlp.w2, (experts.down_proj.detach().contiguous(), experts.down_proj_scale_inv.detach().contiguous()),
               shape, transposed=True)
    if ffn % 128:
        return
    q, s = experts.gate_up_proj.detach().contiguous(), experts.gate_up_proj_scale_inv.detach().contiguous()
    if mlp.fp8_stacks_up_weights():
        cache.seed_pair(mlp.w1, mlp.v1, (q, s), shape)
    else:
        cache.seed(mlp.w1, (q[:, :ffn].contiguous(), s[:, :ffn // 128].contiguous()), shape)
        cache.seed(mlp.v1, (q[:, ffn:].contiguous(), s[:, ffn // 128:].contiguous()), shape)


def _common_arguments(weight: torch.Tensor, hidden: int, ffn: int, num_experts: int, top_k: int) -> dict:
    """The `Arguments` every conversion starts from: GLU experts on the grouped path, the expert
    weights' dtype and device, the weights kept as converted (no initialisation), fp32 router
    math, no load-balancing loss and no output bias.

    Raises:
        ValueError: expert weights of a dtype other than float16, bfloat16 or the default one.
    """
    if weight.dtype not in (torch.float16, torch.bfloat16, torch.get_default_dtype()):
        raise ValueError(f"block: expected expert weights in float16, bfloat16 or the default dtype, got {weight.dtype}")
    return dict(
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        moe_num_experts=num_experts,
        moe_top_k=top_k,
        moe_loss_weight=0.0,
        moe_router_fp32=True,
        mlp_type="glu",
        mlp_impl="grouped",
        bias=False,
        return_bias=False,
        fp16=weight.dtype == torch.float16,
        bf16=weight.dtype == torch.bfloat16,
        device=weight.device,
        init_method=_keep,
        output_layer_init_method=_keep,
    )


def _dmoe_from_gpt_oss_block(block: torch.nn.Module, **overrides) -> MegaBlocksMoeBlock:
    """gpt-oss's `GptOssMLP` as a dMoE: `moe_router_bias` (the router's weight and bias are the
    same Parameters), softmax weights renormalised over the top-k (= its softmax over the k
    chosen logits), `moe_expert_bias` with the clamped SwiGLU. `w2_bias` is the same Parameter
    as `down_proj_bias` and `w2` shares `down_proj`'s storage ([E, F, H] viewed as [E·F, H]); the
    interleaved `gate_up_proj` and its bias are de-interleaved into copies (`gpt_oss_to_dmoe`).
    The block returns `(output, None)`, as the decoder layer unpacks two values."""
    router, experts = block.router, block.experts
    num_experts, hidden, two_f = experts.gate_up_proj.shape
    kwargs = _common_arguments(experts.gate_up_proj, hidden, two_f // 2, num_experts, router.top_k)
    kwargs.update(moe_normalize_expert_weights=1, moe_router_bias=True, moe_expert_bias=True,
                  activation_fn=clamped_swiglu)
    kwargs.update(overrides)
    args = Arguments(**kwargs)
    moe = dMoE(args)
    moe.router.layer.weight = router.weight
    moe.router.layer.bias = router.bias
    mlp = moe.experts.mlp
    w1, v1, _, w1_bias, v1_bias, _ = gpt_oss_to_dmoe(*(getattr(experts, n).detach() for n in _GPT_OSS_EXPERT_PARAMS))
    with torch.no_grad():
        for name, value in (("w1", w1), ("v1", v1), ("w1_bias", w1_bias), ("v1_bias", v1_bias)):
            getattr(mlp, name).copy_(value)
    down = experts.down_proj
    if tuple(mlp.w2.shape) == (down.shape[0] * down.shape[1], down.shape[2]) and mlp.w2.dtype == down.dtype:
        w2 = torch.nn.Parameter(down.detach().view(mlp.w2.shape), requires_grad=down.requires_grad)
        mpu.copy_expert_model_parallel_attributes(w2, mlp.w2)
        mlp.w2 = w2
    else:  # another dtype or layout asked for by the overrides
        with torch.no_grad():
            mlp.w2.copy_(down.reshape(mlp.w2.shape))
    bias = experts.down_proj_bias
    if tuple(mlp.w2_bias.shape) == tuple(bias.shape) and mlp.w2_bias.dtype == bias.dtype:
        mpu.set_expert_model_parallel_attributes(bias, args.moe_expert_model_parallelism)
        mlp.w2_bias = bias
    else:
        with torch.no_grad():
            mlp.w2_bias.copy_(bias)
    return MegaBlocksMoeBlock(moe, returns_pair=True)


def _grouped_sigmoid_routing(gate: torch.nn.Module) -> dict:
    """The `Arguments` of DeepSeek-V3's router (and GLM-4.5's): sigmoid scores, the expert-score
    correction bias to choose (updated by `megablocks.layers.router.update_expert_biases`),
    group-limited top-k over groups scored by their best two, renormalised weights times the
    routed scaling factor."""
    groups = gate.num_group
    return dict(
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_num_groups=groups,
        moe_router_group_topk=gate.topk_group,
        moe_router_group_score_topk=min(2, gate.num_experts // groups),
        moe_normalize_expert_weights=1 if gate.norm_topk_prob else None,
        moe_router_topk_scaling_factor=float(gate.routed_scaling_factor),
    )


def convert_model(model: torch.nn.Module, **overrides) -> torch.nn.Module:
    """Replaces, in place, every sparse-MoE block of a transformers model by a `MegaBlocksMoeBlock`.

    Args:
        model: e.g. a `MixtralForCausalLM`, `Qwen2MoeForCausalLM`, `Qwen3MoeForCausalLM`,
            `OlmoeForCausalLM`, `DeepseekV3ForCausalLM`, `Glm4MoeForCausalLM` or
            `GptOssForCausalLM` (dense layers of mixed models are left alone).
        overrides: `Arguments` fields for every dMoE, as in `dmoe_from_block`.

    Returns:
        `model` (converted in place). The converted model's state dict keys are those of
        `megablocks.integrations.checkpoint.hf_to_megablocks_state_dict`.

    Raises:
        ValueError: no sparse-MoE block was found.
    """
    targets = [(name, module) for name, module in model.named_modules() if is_sparse_moe_block(module)]
    if not targets:
        reasons = sorted({r for r in (unsupported_reason(m) for m in model.modules()) if r})
        if reasons:
            raise ValueError(f"model: its MoE blocks cannot be converted to dMoE: {'; '.join(reasons)}")
        raise ValueError(f"model: expected transformers sparse-MoE blocks, found none in {type(model).__name__}")
    for name, block in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, dmoe_from_block(block, **overrides))
    return model


register()
