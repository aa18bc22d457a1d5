"""`moefy`: turn a dense transformer's MLPs into dropless MoE layers in one call (sparse upcycling).

Legend: H hidden, F ffn, E experts, K top-k.

Every expert of a converted layer starts as a copy of the dense MLP it replaces and the top-k
routing weights are renormalised to sum to one, so at step 0 the converted model computes what
the dense model computed (up to float rounding): Σ_k w_k · MLP(x) = MLP(x). Training then lets
the experts drift apart through the (randomly initialised) router.

    import megablocks.integrations.moefy as moefy
    model = moefy.moefy(model, num_experts=8, top_k=2)
    loss = task_loss + moefy.moe_aux_loss(model)       # load-balancing (+ z) losses, per step

Recognised dense MLPs (by structure, so close relatives of these models work too):
    gated    `gate_proj`, `up_proj`, `down_proj` Linear and `act_fn`          (Llama, Mistral, Qwen)
    GPT-2    `c_fc`, `c_proj` Conv1D ([in, out] weights), `act`, `dropout`
    exp/ GPT `fc1`, optional `gate`, `fc2` Linear and `act`                   (exp/model.py DenseMLP)

Biases: the output bias becomes the dMoE's `experts.bias`. An input-projection bias of a
non-gated MLP (GPT-2's `c_fc.bias`) is kept as one [F] bias added before the activation and
shared by all experts (dMoE has no per-expert input bias); this needs mlp_impl='grouped'.
A bias on a gated MLP's gate or up projection is not supported (ValueError).
"""

from typing import Callable, List, Optional, Tuple

import torch

from megablocks.integrations.hf import activation_function
from megablocks.layers.arguments import Arguments
from megablocks.layers.dmoe import dMoE
from megablocks.layers.losses import MoELossCollector


class BiasedActivation(torch.nn.Module):
    """`act(h + bias)` with a learned [F] bias: a dense MLP's input bias, shared by all experts.

    Takes h [..., F] (the grouped path's [N, F] rows)."""

    def __init__(self, act: Callable, bias: torch.Tensor):
        super().__init__()
        self.act = act
        self.bias = torch.nn.Parameter(bias.detach().clone())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.act(h + self.bias.to(h.dtype))


class MoefiedMLP(torch.nn.Module):
    """A dense MLP replaced by a `dMoE` (`.moe`); `forward(x [..., H])` returns `dropout(dMoE(x))`.

    `input_bias_act` is the `BiasedActivation` holding the shared input bias, when there is one.
    """

    def __init__(self, moe: dMoE, dropout: Optional[torch.nn.Module] = None,
                 input_bias_act: Optional[BiasedActivation] = None):
        super().__init__()
        self.moe = moe
        self.dropout = dropout
        self.input_bias_act = input_bias_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.moe(x)
        return out if self.dropout is None else self.dropout(out)


class DenseMLPWeights:
    """The weights of one recognised dense MLP, in the dMoE orientation of one expert:
    `w1`, `v1` (None unless gated), `w2` [F, H] (`y = act(x w1^T) [* x v1^T] @ w2`), the input
    bias `b1` [F] and output bias `b2` [H] (or None), the activation and the output dropout."""

    def __init__(self, w1, v1, w2, b1, b2, act, dropout):
        self.w1, self.v1, self.w2 = w1, v1, w2  # [F, H] each (w2: y = act(h) @ w2)
        self.b1, self.b2 = b1, b2  # [F] input bias of the activation, [H] output bias
        self.act, self.dropout = act, dropout


def _bias(linear) -> Optional[torch.Tensor]:
    return getattr(linear, "bias", None)


def dense_mlp_weights(module: torch.nn.Module) -> Optional[DenseMLPWeights]:
    """The weights of `module` when it is a recognised dense MLP, else None.

    Raises:
        ValueError: a gated MLP with a bias on its gate or up projection.
    """
    linear = torch.nn.Linear
    if all(isinstance(getattr(module, n, None), linear) for n in ("gate_proj", "up_proj", "down_proj")) and hasattr(
        module, "act_fn"
    ):
        if _bias(module.gate_proj) is not None or _bias(module.up_proj) is not None:
            raise ValueError(f"module: {type(module).__name__} has gate/up biases, which dMoE experts do not take")
        return DenseMLPWeights(module.gate_proj.weight, module.up_proj.weight, module.down_proj.weight.t(), None,
                      _bias(module.down_proj), module.act_fn, None)
    c_fc, c_proj = getattr(module, "c_fc", None), getattr(module, "c_proj", None)
    if type(c_fc).__name__ == "Conv1D" and type(c_proj).__name__ == "Conv1D" and hasattr(module, "act"):
        return DenseMLPWeights(c_fc.weight.t(), None, c_proj.weight, c_fc.bias, c_proj.bias, module.act,
                      getattr(module, "dropout", None))
    fc1, fc2 = getattr(module, "fc1", None), getattr(module, "fc2", None)
    if isinstance(fc1, linear) and isinstance(fc2, linear) and hasattr(module, "act") and hasattr(module, "gate"):
        gate = module.gate
        if gate is not None and (not isinstance(gate, linear) or _bias(gate) is not None):
            raise ValueError(f"module: {type(module).__name__}'s gate must be a bias-free Linear for dMoE experts")
        return DenseMLPWeights(fc1.weight, None if gate is None else gate.weight, fc2.weight.t(), _bias(fc1), _bias(fc2),
                      module.act, None)
    return None


def _keep(t: torch.Tensor) -> torch.Tensor:
    return t


def upcycle(dense: DenseMLPWeights, num_experts: int, top_k: int, num_layers: int, collector: MoELossCollector,
            router_init_std: float, **overrides) -> MoefiedMLP:
    """A `MoefiedMLP` whose `num_experts` experts are copies of `dense` (see `moefy`)."""
    f, h = dense.w1.shape
    act = activation_function(dense.act)  # transformers' activation modules as the torch functions the fused paths know
    input_bias_act = None
    if dense.b1 is not None:
        input_bias_act = BiasedActivation(act, dense.b1)
        act = input_bias_act
    param = dense.w1
    kwargs = dict(
        hidden_size=h,
        ffn_hidden_size=f,
        num_layers=num_layers,
        moe_num_experts=num_experts,
        moe_top_k=top_k,
        moe_normalize_expert_weights=1,
        moe_loss_weight=0.01,
        mlp_type="mlp" if dense.v1 is None else "glu",
        mlp_impl="grouped",
        activation_fn=act,
        bias=dense.b2 is not None,
        return_bias=False,
        fp16=param.dtype == torch.float16,
        bf16=param.dtype == torch.bfloat16,
        device=param.device,
        init_method=_keep,
        output_layer_init_method=_keep,
        loss_collector=collector,
    )
    kwargs.update(overrides)
    args = Arguments(**kwargs)
    if input_bias_act is not None and args.mlp_impl != "grouped":
        raise ValueError("mlp_impl: an MLP with an input bias (e.g. GPT-2's c_fc) is upcycled on 'grouped' only, "
                         f"got {args.mlp_impl!r}")
    if args.moe_normalize_expert_weights != 1:
        raise ValueError("moe_normalize_expert_weights: expected 1 (weights summing to one keep the dense output), "
                         f"got {args.moe_normalize_expert_weights}")
    moe = dMoE(args)
    with torch.no_grad():
        torch.nn.init.normal_(moe.router.layer.weight, mean=0.0, std=router_init_std)
        moe.experts.mlp.w1.copy_(dense.w1.detach().repeat(num_experts, 1))
        moe.experts.mlp.w2.copy_(dense.w2.detach().repeat(num_experts, 1))
        if dense.v1 is not None:
            moe.experts.mlp.v1.copy_(dense.v1.detach().repeat(num_experts, 1))
        if dense.b2 is not None:
            moe.experts.bias.copy_(dense.b2.detach())
    return MoefiedMLP(moe, dense.dropout, input_bias_act)


def moefy(model: torch.nn.Module, num_experts: int, top_k: int = 2, *, router_init_std: float = 0.02,
          first_k_dense: int = 0, **overrides) -> torch.nn.Module:
    """Replaces, in place, every recognised dense MLP of `model` by an upcycled `MoefiedMLP`.

    Args:
        model: a transformer (e.g. transformers' Llama or GPT-2, or exp/'s GPT with mlp='dense').
        num_experts: E >= 1 experts per layer, each a copy of the dense MLP.
        top_k: K experts per token (1 <= K <= E); the K weights are renormalised to sum to one.
        router_init_std: std of the routers' normal initialisation.
        first_k_dense: leave the first k dense MLPs (in module order: the first layers) dense, as
            DeepSeek-V3 and GLM-4.5 do (`first_k_dense_replace`).
        overrides: other `Arguments` fields (e.g. mlp_impl='sparse', moe_loss_weight=0.0,
            moe_zloss_weight=1e-3, gmm_backend='torch'). Defaults: mlp_impl='grouped',
            moe_loss_weight=0.01, the dense MLP's activation, dtype and device.

    Returns:
        `model`. Its MoE layers share one `MoELossCollector` (`model.moe_loss_collector`); add
        `moe_aux_loss(model)` to the training loss each step.

    Raises:
        ValueError: no dense MLP found, or invalid arguments (see `upcycle`).
    """
    found: List[Tuple[str, DenseMLPWeights]] = []
    skip: List[str] = []  # converted layers (already MoE) and the dense MLPs found: not inside them
    for name, module in model.named_modules():
        if any(name.startswith(n + ".") for n in skip):
            continue
        if isinstance(module, MoefiedMLP):
            skip.append(name)
            continue
        dense = dense_mlp_weights(module)
        if dense is not None:
            found.append((name, dense))
            skip.append(name)
    if not found:
        raise ValueError(f"model: expected dense MLPs to convert, found none in {type(model).__name__}")
    if isinstance(first_k_dense, bool) or not isinstance(first_k_dense, int) or not 0 <= first_k_dense < len(found):
        raise ValueError(f"first_k_dense: expected an int in [0, {len(found)}) (the model has {len(found)} dense "
                         f"MLPs), got {first_k_dense!r}")
    found = found[first_k_dense:]
    collector = MoELossCollector()
    for name, dense in found:
        layer = upcycle(dense, num_experts, top_k, len(found), collector, router_init_std, **overrides)
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, layer)
    model.moe_loss_collector = collector
    return model


def moe_aux_loss(model: torch.nn.Module) -> torch.Tensor:
    """The sum of the last training forward's load-balancing losses and router z-losses of the
    model's `MoefiedMLP` layers (0 when there are none, e.g. in eval); clears the model's collector."""
    total = None
    for module in model.modules():
        if isinstance(module, MoefiedMLP):
            for loss in (module.moe.load_balancing_loss, module.moe.router_zloss):
                if loss is not None:
                    total = loss if total is None else total + loss
    collector = getattr(model, "moe_loss_collector", None)
    if collector is not None:
        collector.clear()
    if total is None:
        return torch.zeros((), device=next(model.parameters()).device)
    return total
