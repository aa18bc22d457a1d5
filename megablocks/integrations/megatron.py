"""Megatron-Core integration: our `dMoE` (or `MoE`) where megatron-core's GPT has its MLP.

Legend: S sequence, B micro-batch, H hidden, E experts, K top-k.

Three ways in, all built on `MegablocksMLP`, a `MegatronModule` with the interface of
megatron-core's MLP (`forward(hidden_states_SBH, **kwargs) -> (output_SBH, bias_H or None)`):

    # 1. a layer spec: the MLP submodule of a TransformerLayer spec replaced by ours
    config = TransformerConfig(..., num_moe_experts=64, moe_router_topk=1, moe_router_pre_softmax=True)
    spec = megablocks_layer_spec(mlp_impl="sparse")     # default base: the local GPT layer spec
    model = GPTModel(config=config, transformer_layer_spec=spec, ...)

    # 2. the MLP submodule alone, for a spec you build yourself
    layer_spec.submodules.mlp = megablocks_mlp_spec(moe_num_experts=64)

    # 3. one call on a built model: every TransformerLayer's `mlp` replaced (fresh weights)
    moefy_megatron(model, moe_num_experts=64, moe_top_k=1)

The layer's `Arguments` come from the model's `TransformerConfig` through
`Arguments.from_megatron(config, **overrides)`; the overrides (our field names) win. Megatron's
`num_moe_experts`, `moe_router_topk`, `moe_aux_loss_coeff`, ... are read when the config has them,
so a config built for megatron-core's own MoE (`--num-experts 64 --moe-router-topk 1 ...`) works
as it is. `dMoE` unless `moe_capacity_factor > 0` (Megatron's `moe_expert_capacity_factor`),
which builds the capacity-bounded `MoE`.

Losses, the way megatron-core's own MoE layers do it: after a training forward the layer's
load-balancing loss (and router z-loss, when enabled) is attached to the layer's output with
megatron-core's `MoEAuxLossAutoScaler`, which leaves the forward value unchanged and feeds the
loss a gradient of `main_loss_backward_scale` (set by megatron-core's pipeline schedules to the
loss scale / number of micro-batches) in the backward; each loss is also recorded for logging
under "load_balancing_loss" / "z_loss" with `save_to_aux_losses_tracker`. As in megatron-core,
the coefficient applies per layer: the attached loss is `moe_loss_weight * E / (T*K) *
dot(f_E, mean_t scores_TE)` for each layer (MegaBlocks' batched loss divides by num_layers;
this one does not). megatron-core's schedules set that scale only when the config has
`num_moe_experts`: set it (to the number of experts) in the model's config. With
`calculate_per_token_loss` the attached loss is multiplied by the layer's token count, as
megatron-core's router does.

Parallelism: expert parallelism uses megatron-core's expert-model-parallel group
(`parallel_state.get_expert_model_parallel_group()`, or `pg_collection.ep` when the layer is
given one) as `expert_parallel_group` whenever `expert_model_parallel_size > 1`. Expert weight
shards carry `allreduce = False`, megatron-core's mark, so its DistributedDataParallel reduces
them over the expert-data-parallel group; since megatron-core scales those gradients by
1 / data-parallel size itself, the layer undoes our layers' own 1 / W expert-gradient scale with
a gradient hook (W = expert-parallel size), so the result equals megatron-core's MoE. Data and
pipeline parallelism are megatron-core's; tensor parallelism, sequence parallelism and context
parallelism are not supported by this layer (ValueError).

Not covered: megatron-core's distributed checkpointing (`sharded_state_dict`) of expert-parallel
shards (save per rank with `torch.save(model.state_dict())`), and the `padding_mask` argument
(accepted; padded tokens still count in the load-balancing loss).
"""

import copy
import dataclasses
from typing import Any, Optional, Tuple

import torch

from megablocks.layers import mpu
from megablocks.layers.arguments import Arguments
from megablocks.layers.dmoe import dMoE
from megablocks.layers.losses import MoELossCollector
from megablocks.layers.moe import MoE

try:
    from megatron.core import parallel_state
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, save_to_aux_losses_tracker
    from megatron.core.transformer.spec_utils import ModuleSpec
except ImportError as error:  # pragma: no cover - exercised only without megatron-core
    raise ImportError(
        "megablocks.integrations.megatron needs megatron-core (pip install megatron-core)"
    ) from error


def arguments_from_config(config: Any, pg_collection: Any = None, **overrides) -> Arguments:
    """Our `Arguments` for a megatron-core `TransformerConfig` (plus `overrides`, our names).

    Sets `expert_parallel_group` to megatron-core's expert-model-parallel group when
    `expert_model_parallel_size > 1` (`pg_collection.ep` if given, else parallel_state's), and
    `return_bias=True` (megatron-core's MLP contract: the bias is returned, not added).

    Raises:
        ValueError: tensor, sequence or context parallelism is on, or an expert-tensor-parallel
            size other than 1 is asked for (this layer does not shard over those).
        TypeError, ValueError: from `Arguments` on invalid fields.
    """
    for name in ("tensor_model_parallel_size", "context_parallel_size", "expert_tensor_parallel_size"):
        size = getattr(config, name, None)
        if size is not None and size != 1:
            raise ValueError(f"config.{name}: expected 1 (not supported by the megablocks MLP), got {size}")
    if getattr(config, "sequence_parallel", False):
        raise ValueError("config.sequence_parallel: expected False (not supported by the megablocks MLP), got True")
    kwargs = {"return_bias": True}
    ep_size = getattr(config, "expert_model_parallel_size", 1) or 1
    if ep_size > 1 and "expert_parallel_group" not in overrides:
        group = getattr(pg_collection, "ep", None) if pg_collection is not None else None
        kwargs["expert_parallel_group"] = group if group is not None else parallel_state.get_expert_model_parallel_group()
    kwargs.update(overrides)
    return Arguments.from_megatron(config, **kwargs)


# Keyword arguments megatron-core's TransformerLayer gives the MLP it builds (beyond config and
# pg_collection); MegablocksMLP accepts and ignores them.
MEGATRON_BUILD_KWARGS = frozenset({"is_mtp_layer", "name", "is_expert", "input_size", "tp_group", "layer_number"})


class MegablocksMLP(MegatronModule):
    """Our `dMoE`/`MoE` with megatron-core's MLP interface (the `mlp` of a TransformerLayer).

    Args:
        config: the model's megatron-core `TransformerConfig`.
        pg_collection: megatron-core's process-group collection, if the caller has one (its `ep`
            group is used for expert parallelism).
        **overrides: `Arguments` fields that replace what `Arguments.from_megatron(config)` gives.

    Attributes:
        moe: the wrapped `dMoE` (or `MoE`); its parameters are `moe.router.layer.weight`,
            `moe.experts.mlp.{w1,v1,w2}`, `moe.experts.bias`.
        args: its `Arguments`.
        layer_number: set by the TransformerLayer (`set_layer_number`), 1-based; names the layer
            in megatron-core's aux-loss logging.
    """

    def __init__(self, config: Any, pg_collection: Any = None, **overrides):
        super().__init__(config=config)
        self.collector = MoELossCollector()
        # What a TransformerLayer passes to every MLP it builds; nothing here depends on it.
        overrides = {k: v for k, v in overrides.items() if k not in MEGATRON_BUILD_KWARGS}
        overrides.setdefault("loss_collector", self.collector)
        self.args = arguments_from_config(config, pg_collection=pg_collection, **overrides)
        layer_cls = MoE if self.args.moe_capacity_factor > 0 else dMoE
        self.moe = layer_cls(self.args)
        self.layer_number: Optional[int] = None
        _undo_expert_gradient_scale(self.moe, self.args)

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number

    def forward(self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor] = None, **kwargs
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """`(output_SBH, bias_H or None)` for `hidden_states` [S, B, H] (any [..., H] works).

        `padding_mask` and other keyword arguments megatron-core passes to its MLPs are accepted
        and ignored. In training the output carries this layer's auxiliary losses for the
        backward (see the module docstring); its value is the layer's output.
        """
        self.collector.clear()
        out = self.moe(hidden_states)
        output, bias = out if isinstance(out, tuple) else (out, None)
        if self.training:
            output = self._attach_aux_losses(output, num_tokens=hidden_states.numel() // hidden_states.shape[-1])
        return output, bias

    def aux_losses(self) -> dict:
        """The losses the last training forward attached: name -> 0-d tensor (weighted)."""
        losses = {}
        lbl = self.moe.load_balancing_loss
        if lbl is not None:
            # dMoE keeps moe_loss_weight / num_layers * loss; megatron-core's coefficient is per layer.
            losses["load_balancing_loss"] = lbl * self.args.num_layers
        if self.moe.router_zloss is not None:
            losses["z_loss"] = self.moe.router_zloss
        return losses

    def _attach_aux_losses(self, output: torch.Tensor, num_tokens: int) -> torch.Tensor:
        coefficients = {"load_balancing_loss": self.args.moe_loss_weight, "z_loss": self.args.moe_zloss_weight}
        num_layers = self.config.num_layers + (getattr(self.config, "mtp_num_layers", None) or 0)
        for name, loss in self.aux_losses().items():
            if self.layer_number is not None:
                save_to_aux_losses_tracker(name, loss.detach() / coefficients[name], self.layer_number, num_layers)
            if getattr(self.config, "calculate_per_token_loss", False):
                # megatron-core then divides every gradient by the token count; so does its MoE.
                loss = loss * num_tokens
            output = MoEAuxLossAutoScaler.apply(output, loss)
        return output


def _undo_expert_gradient_scale(module: torch.nn.Module, args: Arguments) -> None:
    """Multiplies the expert weights' gradients by W, cancelling our layers' 1 / W scale (see
    `mpu.expert_gradient_scale`): megatron-core's DDP applies its own expert-gradient scaling."""
    world_size = mpu.get_expert_parallel_world_size(args)
    if world_size == 1:
        return
    for param in module.parameters():
        if mpu.param_is_expert_model_parallel(param):
            param.register_hook(lambda grad, w=float(world_size): grad * w)


def megablocks_mlp_spec(**overrides) -> ModuleSpec:
    """A `ModuleSpec` of `MegablocksMLP` (the `mlp` submodule of a TransformerLayer spec);
    `overrides` are `Arguments` fields passed to every layer built from it."""
    return ModuleSpec(module=MegablocksMLP, params=dict(overrides))


def megablocks_layer_spec(base_spec: Optional[ModuleSpec] = None, **overrides) -> ModuleSpec:
    """A TransformerLayer spec whose MLP is `MegablocksMLP`.

    Args:
        base_spec: the spec to start from (not modified); None: megatron-core's local GPT layer
            spec (`get_gpt_layer_local_spec()`), which needs no Transformer Engine.
        **overrides: `Arguments` fields for the MoE layers.

    Raises:
        ValueError: `base_spec` fuses the pre-MLP layer norm into its MLP (Transformer Engine's
            dense spec): our MLP needs a separate `pre_mlp_layernorm`.
    """
    if base_spec is None:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        base_spec = get_gpt_layer_local_spec()
    submodules = base_spec.submodules
    if not hasattr(submodules, "mlp") or not hasattr(submodules, "pre_mlp_layernorm"):
        raise ValueError("base_spec: expected a TransformerLayer spec with mlp and pre_mlp_layernorm submodules")
    norm = submodules.pre_mlp_layernorm
    norm_module = getattr(norm, "module", norm)
    if getattr(norm_module, "__name__", "") == "IdentityOp":
        raise ValueError(
            "base_spec: its pre_mlp_layernorm is IdentityOp (the norm is fused into the dense MLP); "
            "use a spec with a separate norm, e.g. the local spec or the Transformer Engine spec "
            "built with num_experts set"
        )
    spec = copy.copy(base_spec)
    spec.submodules = dataclasses.replace(submodules, mlp=megablocks_mlp_spec(**overrides))
    return spec


def moefy_megatron(model: torch.nn.Module, first_k_dense: int = 0, **overrides) -> torch.nn.Module:
    """Replaces the `mlp` of every megatron-core TransformerLayer in `model` by `MegablocksMLP`.

    The new layers are freshly initialised (nothing is copied from the replaced MLPs), built from
    each layer's own `config` and numbered like the layer. Returns `model` (changed in place).
    Build the model with a separate pre-MLP norm (the local spec, or any MoE spec). Layers numbered
    up to `first_k_dense` keep their dense MLP (DeepSeek-V3's and GLM-4.5's dense first layers).

    Raises:
        ValueError: no TransformerLayer found, or one whose pre-MLP norm is fused into its MLP;
            first_k_dense not an int in [0, number of layers).
    """
    from megatron.core.transformer.transformer_layer import TransformerLayer

    layers = [m for m in model.modules() if isinstance(m, TransformerLayer)]
    if not layers:
        raise ValueError("model: expected a megatron-core model with TransformerLayer modules, found none")
    if isinstance(first_k_dense, bool) or not isinstance(first_k_dense, int) or not 0 <= first_k_dense < len(layers):
        raise ValueError(f"first_k_dense: expected an int in [0, {len(layers)}), got {first_k_dense!r}")
    layers = [layer for layer in layers if layer.layer_number > first_k_dense]
    for layer in layers:
        if type(layer.pre_mlp_layernorm).__name__ == "IdentityOp":
            raise ValueError(
                f"model: layer {layer.layer_number} fuses its pre-MLP norm into its MLP (IdentityOp "
                "pre_mlp_layernorm); build it with the local spec or an MoE spec"
            )
        mlp = MegablocksMLP(layer.config, **overrides)
        mlp.set_layer_number(layer.layer_number)
        layer.mlp = mlp
        layer.is_moe_layer = False
    return model
