"""The MoE auxiliary losses: load balancing (MegaBlocks' form) and router z-loss.

Legend: T tokens, E experts, K top-k, L MoE layers on this pipeline stage.

Per layer, with `f_E` the tokens routed to each expert and `p_E` the mean router score:

    load balancing   E / (T * K) * sum_e f_e * p_e          (1 at a perfectly uniform routing)
      per sequence   the same within each sequence, averaged over the sequences ('seq_aux_loss')
      global batch   f_E and T summed over the data-parallel ranks ('global_aux_loss')
    router z-loss    mean_t logsumexp(logits_t)^2

After a training forward each `MoE`/`dMoE` layer keeps its own weighted terms
(`layer.load_balancing_loss`, `layer.router_zloss`), so a model can sum them over its layers.
For MegaBlocks' batched API the layers also record their statistics in a `MoELossCollector`:
the one named by `Arguments.loss_collector`, else a process-wide default collector. That default
collector is this package's only module-level mutable state, kept because MegaBlocks' functions
`save_load_balancing_loss`, `get_load_balancing_loss`, `clear_load_balancing_loss` and
`clear_router_zloss` take no argument that could name another store.
"""

import warnings
from typing import List, Tuple

import torch


def load_balancing_loss(tokens_per_expert_E: torch.Tensor, scores_TE: torch.Tensor, top_k: int) -> torch.Tensor:
    """One layer's unweighted load-balancing loss `E / (T * K) * dot(f_E, mean_t scores_TE)`.

    Args:
        tokens_per_expert_E: [E] int or float, assignments routed to each expert.
        scores_TE: [T, E] float, router scores (probabilities) of each token.
        top_k: K, assignments per token.

    Returns:
        A 0-d tensor of `scores_TE`'s dtype; 0 (still attached to `scores_TE`) when T = 0.
    """
    tokens, num_experts = scores_TE.shape
    if tokens == 0:
        return scores_TE.sum() * 0.0
    scale = num_experts / (tokens * top_k)
    return scale * torch.dot(tokens_per_expert_E.to(scores_TE.dtype), scores_TE.mean(dim=0))


def sequence_load_balancing_loss(top_experts_TK: torch.Tensor, scores_TE: torch.Tensor, num_sequences: int,
                                 seq_dim: int = 0) -> torch.Tensor:
    """The per-sequence load-balancing loss (DeepSeek-V3's sequence-wise auxiliary loss,
    Megatron-Core's 'seq_aux_loss'): the mean over sequences b of
    `E / (S * K) * dot(f_bE, mean_{t in b} scores_TE[t])`, f_bE the assignments of sequence b.

    Args:
        top_experts_TK: [T, K] expert ids, T = S·B tokens of B = `num_sequences` sequences of S.
        scores_TE: [T, E] router scores (probabilities; sigmoid scores normalised per token).
        num_sequences: B; tokens are laid out [S, B] (`seq_dim` 0, Megatron's layout: token t is
            in sequence t % B) or [B, S] (`seq_dim` 1: t // S).

    Returns:
        A 0-d tensor of scores_TE's dtype (0, attached, when T = 0); 1 at a uniform routing.
    """
    tokens, num_experts = scores_TE.shape
    if tokens == 0:
        return scores_TE.sum() * 0.0
    top_k = top_experts_TK.shape[1]
    seq_len = tokens // num_sequences
    t = torch.arange(tokens, device=scores_TE.device)
    seq_of_token = t % num_sequences if seq_dim == 0 else t // seq_len
    counts_BE = torch.zeros(num_sequences, num_experts, dtype=scores_TE.dtype, device=scores_TE.device)
    seq_of_assignment = seq_of_token[:, None].expand_as(top_experts_TK)
    counts_BE.index_put_((seq_of_assignment.reshape(-1), top_experts_TK.reshape(-1)),
                         torch.ones((), dtype=scores_TE.dtype, device=scores_TE.device).expand(top_experts_TK.numel()),
                         accumulate=True)
    mean_scores_BE = torch.zeros_like(counts_BE).index_add_(0, seq_of_token, scores_TE) / seq_len
    per_sequence = (counts_BE * mean_scores_BE).sum(dim=1) * (num_experts / (seq_len * top_k))
    return per_sequence.mean()


def global_load_balancing_loss(tokens_per_expert_E: torch.Tensor, scores_TE: torch.Tensor, top_k: int,
                               group=None) -> torch.Tensor:
    """The global-batch load-balancing loss (Megatron-Core's 'global_aux_loss'):
    `E / (T_g * K) * dot(F_E, mean_t scores_TE)` with F_E the expert counts and T_g the tokens summed
    over the ranks of `group` (one all-reduce, no gradient through it); the scores are this rank's.
    Without torch.distributed running, the local batch's loss (`load_balancing_loss`).
    """
    # Counts travel in float64: exact integers up to 2**53, reduced by every backend.
    counts = torch.cat([tokens_per_expert_E.detach().to(torch.float64),
                        torch.tensor([scores_TE.shape[0]], dtype=torch.float64, device=scores_TE.device)])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts, group=group)
    global_counts, global_tokens = counts[:-1], counts[-1]
    tokens, num_experts = scores_TE.shape
    if tokens == 0:
        return scores_TE.sum() * 0.0
    scale = num_experts / (global_tokens * top_k)
    return scale.to(scores_TE.dtype) * torch.dot(global_counts.to(scores_TE.dtype), scores_TE.mean(dim=0))


def router_zloss(logits_TE: torch.Tensor) -> torch.Tensor:
    """One router's unweighted z-loss `mean_t logsumexp(logits_TE[t])^2` (0 when T = 0)."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0.0
    return torch.logsumexp(logits_TE, dim=1).square().mean()


class MoELossCollector:
    """Records, layer after layer, what the batched losses need during one training forward.

    `load_balancing` holds `(tokens_per_expert_E, scores_TE)` per layer (MegaBlocks' entries) and
    `router_logits` the `[T, E]` logits per router. Clear it after each step (`clear()`), as
    MegaBlocks' global lists are cleared.
    """

    def __init__(self):
        self.load_balancing: List[Tuple[torch.Tensor, torch.Tensor]] = []
        self.router_logits: List[torch.Tensor] = []
        self.layer_losses: List[torch.Tensor] = []

    def save_load_balancing_loss(self, entry: Tuple[torch.Tensor, torch.Tensor]) -> None:
        self.load_balancing.append(entry)

    def save_layer_loss(self, loss: torch.Tensor) -> None:
        """A layer's weighted loss of a type other than MegaBlocks' 'aux_loss' (the batched
        function sums these then)."""
        self.layer_losses.append(loss)

    def save_router_logits(self, logits_TE: torch.Tensor) -> None:
        self.router_logits.append(logits_TE)

    def clear_load_balancing_loss(self) -> None:
        self.load_balancing.clear()
        self.layer_losses.clear()

    def clear_router_zloss(self) -> None:
        self.router_logits.clear()

    def clear(self) -> None:
        self.clear_load_balancing_loss()
        self.clear_router_zloss()

    def batched_load_balancing_loss(self, args) -> torch.Tensor:
        """MegaBlocks' batched load-balancing loss over the recorded layers.

        `loss_weight * E / (num_layers * T * K) * dot(cat_l f_lE, cat_l mean_t scores_lTE)`: the
        sum of every layer's loss, weighted and divided by the model's `num_layers`. Returns 0.0
        (a float) when `moe_loss_weight` is 0.

        Raises:
            ValueError: when the number of recorded layers is not the number of MoE layers this
                pipeline stage holds, or the recorded shapes disagree.
        """
        if args.moe_loss_weight == 0:
            return 0.0
        expected = args.num_layers // args.pipeline_model_parallel_size
        if args.num_layers_per_virtual_pipeline_stage is not None:
            expected = args.num_layers_per_virtual_pipeline_stage
        if getattr(args, "moe_router_load_balancing_type", "aux_loss") != "aux_loss":
            if len(self.layer_losses) != expected:
                raise ValueError(f"batched_load_balancing_loss: expected {expected} recorded layers, "
                                 f"found {len(self.layer_losses)}")
            return torch.stack(self.layer_losses).sum()
        if len(self.load_balancing) != expected:
            raise ValueError(
                f"batched_load_balancing_loss: expected {expected} recorded layers (num_layers="
                f"{args.num_layers}, pipeline_model_parallel_size={args.pipeline_model_parallel_size}, "
                f"num_layers_per_virtual_pipeline_stage={args.num_layers_per_virtual_pipeline_stage}), "
                f"found {len(self.load_balancing)}"
            )
        tokens_per_expert, scores = zip(*self.load_balancing)
        num_experts = args.moe_num_experts
        tokens = scores[0].shape[0]
        for i, (f, s) in enumerate(self.load_balancing):
            if f.shape != (num_experts,) or s.dim() != 2 or s.shape != (tokens, num_experts):
                raise ValueError(
                    f"batched_load_balancing_loss: layer {i} recorded tokens_per_expert of shape "
                    f"{tuple(f.shape)} and scores of shape {tuple(s.shape)}, expected ({num_experts},) "
                    f"and ({tokens}, {num_experts})"
                )
        scores = torch.cat(scores, dim=1)
        if args.moe_lbl_in_fp32:
            scores = scores.float()
        mean_scores = scores.mean(dim=0) if tokens != 0 else scores.sum(dim=0)
        counts = torch.cat(tokens_per_expert).to(mean_scores.dtype)
        if tokens == 0:
            return torch.dot(counts, mean_scores) * 0.0
        scale = num_experts * args.moe_loss_weight / (args.num_layers * tokens * args.moe_top_k)
        return scale * torch.dot(counts, mean_scores)

    def batched_router_zloss(self, args) -> torch.Tensor:
        """MegaBlocks' batched z-loss: `moe_zloss_weight * [z-loss of each recorded router]`.

        Returns an [R] tensor, one entry per recorded router (sum it for the total), or 0 with a
        warning when `moe_zloss_weight` is 0, as MegaBlocks does.
        """
        if args.moe_zloss_weight == 0:
            warnings.warn("batched_router_zloss called with moe_zloss_weight=0")
            return 0
        if not self.router_logits:
            raise ValueError("batched_router_zloss: no router logits were recorded (no training forward?)")
        logits = self.router_logits
        if args.moe_zloss_in_fp32:
            logits = [t.float() for t in logits]
        return args.moe_zloss_weight * torch.stack([router_zloss(t) for t in logits])


_DEFAULT_COLLECTOR = MoELossCollector()


def default_collector() -> MoELossCollector:
    """The process-wide collector used when `Arguments.loss_collector` is None."""
    return _DEFAULT_COLLECTOR


def collector_for(args) -> MoELossCollector:
    """The collector that layers built from `args` record into."""
    return args.loss_collector if args.loss_collector is not None else _DEFAULT_COLLECTOR
