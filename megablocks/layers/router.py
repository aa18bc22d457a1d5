"""The learned top-k router, Sinkhorn balancing, and MegaBlocks' router z-loss functions.

Legend: T tokens, H hidden, E experts, K top-k.

    logits_TE = x_TH @ W_EH^T [+ b_E]         (`router.layer`, a Linear [E, H], its bias [E] with
                                              `moe_router_bias`)
    scores_TE = softmax(logits_TE)            (or sigmoid)
    top_experts_TK = top-k of scores_TE       (+ expert_bias, or Sinkhorn-balanced, for choosing only;
                                              within each token's best expert groups if asked)
    expert_weights_TK = scores_TE at those experts, divided by their p-norm if asked, times the
                        routed scaling factor if set

A softmax over all experts renormalised over the chosen k (`moe_normalize_expert_weights=1`) is
the softmax over the k chosen logits (gpt-oss's, Mixtral's routers): the common factor cancels.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from megablocks.layers import common
from megablocks.layers.arguments import Arguments
from megablocks.layers.losses import collector_for, default_collector, router_zloss


def clear_router_zloss() -> None:
    """Clears the router logits recorded in the process-wide collector (MegaBlocks' API)."""
    default_collector().clear_router_zloss()


def batched_router_zloss(args: Arguments) -> torch.Tensor:
    """`moe_zloss_weight * [z-loss of each router]` over the routers recorded for `args`.

    Reads `args.loss_collector` (or the process-wide collector). Returns an [R] tensor, one entry
    per router that ran a training forward since the last clear, or 0 with a warning when
    `moe_zloss_weight` is 0 (MegaBlocks' behaviour).
    """
    return collector_for(args).batched_router_zloss(args)


def sinkhorn(logits_TE: torch.Tensor, iterations: int) -> torch.Tensor:
    """Sinkhorn-balanced assignment probabilities of `logits_TE`, in float32.

    Alternately normalises the columns (experts) and the rows (tokens) of `exp(logits)` in the log
    domain for a fixed number of iterations (no convergence test, so no host sync). Each row of
    the result sums to one and the column sums approach T / E: choosing the top-k of a row gives
    a balanced routing (S-BASE). Returns [T, E] float32.
    """
    log_p = logits_TE.float()
    if log_p.shape[0] == 0:
        return log_p
    for _ in range(iterations):
        log_p = log_p - torch.logsumexp(log_p, dim=0, keepdim=True)
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True)
    return log_p.exp()


def group_limited_choice(choice_TE: torch.Tensor, num_groups: int, group_topk: int, top_k: int,
                         group_score_topk: Optional[int] = None) -> torch.Tensor:
    """DeepSeek-V3's group-limited routing: the choice scores with every expert outside each
    token's `group_topk` best groups set to -inf, so that its top-k falls within those groups.

    The E experts form `num_groups` consecutive groups; a group's score is the sum of its best
    `group_score_topk` choice scores (None: max(1, top_k // group_topk), Megatron-Core's rule; the
    best two for DeepSeek-V3 either way: top-8 in 4 of 8 groups), ties broken toward the lower
    group index as `torch.topk` breaks them. Returns [T, E] float32.
    """
    tokens, experts = choice_TE.shape
    per_group = group_score_topk or max(1, top_k // group_topk)
    grouped = choice_TE.float().view(tokens, num_groups, experts // num_groups)
    group_scores = grouped.topk(per_group, dim=-1).values.sum(dim=-1)
    best_groups = group_scores.topk(group_topk, dim=-1).indices
    keep = torch.zeros(tokens, num_groups, dtype=torch.bool, device=choice_TE.device)
    keep.scatter_(1, best_groups, True)
    return grouped.masked_fill(~keep[:, :, None], float("-inf")).view(tokens, experts)


def update_expert_biases(model: torch.nn.Module, group=None) -> int:
    """The one hook a trainer calls after each optimizer step for aux-loss-free balancing:
    `update_expert_bias(group)` on every router of `model` built with
    `moe_router_enable_expert_bias` (the exp/ trainer calls it). Returns how many it updated."""
    routers = [m for m in model.modules() if isinstance(m, LearnedRouter) and m.args.moe_router_enable_expert_bias]
    for router in routers:
        router.update_expert_bias(group)
    return len(routers)


class LearnedRouter(torch.nn.Module):
    """MegaBlocks' learned router: a Linear [E, H] scoring each token for each expert, bias-free
    (MegaBlocks) or with a zero-initialised bias [E] (`moe_router_bias`, gpt-oss).

    `forward(x)` takes x [..., H] and returns `(scores_TE, expert_weights_TK, top_experts_TK)`
    with T the product of the leading dimensions. Scores are softmax (default) or sigmoid of the
    logits; in training the input is jittered when `moe_jitter_eps` is set; weights are the
    scores of the chosen experts, p-norm renormalised when `moe_normalize_expert_weights` is set.
    With `moe_router_fp32` the logits, scores and weights are float32 whatever the input dtype.

    After a training forward, `self.zloss` holds this router's weighted z-loss
    (`moe_zloss_weight * mean_t logsumexp(logits)^2`; None when the weight is 0 or in eval), and
    the logits are recorded for `batched_router_zloss`.

    With `moe_router_enable_expert_bias`, buffer `expert_bias` [E] (float32, saved in the
    state_dict) is added to the scores to choose experts, and training forwards count the tokens
    each expert received in buffer `local_tokens_per_expert` (not saved) for
    `update_expert_bias()`.
    """

    def __init__(self, args: Arguments):
        super().__init__()
        self.args = args
        self.layer = torch.nn.Linear(
            args.hidden_size,
            args.moe_num_experts,
            bias=args.moe_router_bias,
            dtype=common.dtype(args),
            device=common.device(args),
        )
        args.init_method(self.layer.weight)
        if self.layer.bias is not None:
            with torch.no_grad():
                self.layer.bias.zero_()
        self.zloss: Optional[torch.Tensor] = None
        if args.moe_router_enable_expert_bias:
            device = self.layer.weight.device
            self.register_buffer("expert_bias", torch.zeros(args.moe_num_experts, dtype=torch.float32, device=device))
            self.register_buffer(
                "local_tokens_per_expert",
                torch.zeros(args.moe_num_experts, dtype=torch.float32, device=device),
                persistent=False,
            )

    def jitter(self, x: torch.Tensor) -> torch.Tensor:
        """Uniform multiplicative noise in [1 - eps, 1 + eps], shaped like `x`."""
        low = 1.0 - self.args.moe_jitter_eps
        high = 1.0 + self.args.moe_jitter_eps
        noise = torch.rand(x.size(), dtype=x.dtype, device=x.device)
        return low + noise * (high - low)

    def _logits(self, x_TH: torch.Tensor) -> torch.Tensor:
        if not self.args.moe_router_fp32:
            return self.layer(x_TH)
        bias = self.layer.bias
        with torch.autocast(x_TH.device.type, enabled=False):
            return F.linear(x_TH.float(), self.layer.weight.float(), None if bias is None else bias.float())

    def _scores(self, logits_TE: torch.Tensor) -> torch.Tensor:
        if self.args.moe_router_score_function == "sigmoid":
            return torch.sigmoid(logits_TE)
        return logits_TE.softmax(dim=-1)

    def forward(self, x: torch.Tensor):
        args = self.args
        x_TH = x.reshape(-1, x.shape[-1])
        if self.training and args.moe_jitter_eps is not None:
            x_TH = x_TH * self.jitter(x_TH)

        logits_TE = self._logits(x_TH)
        self.zloss = None
        if self.training and args.moe_zloss_weight > 0:
            collector_for(args).save_router_logits(logits_TE)
            z_logits = logits_TE.float() if args.moe_zloss_in_fp32 else logits_TE
            self.zloss = args.moe_zloss_weight * router_zloss(z_logits)

        scores_TE = self._scores(logits_TE)
        with torch.no_grad():
            if args.moe_router_sinkhorn and self.training:
                choice_TE = sinkhorn(logits_TE, args.moe_router_sinkhorn_iterations)
            elif args.moe_router_enable_expert_bias:
                choice_TE = scores_TE.float() + self.expert_bias
            else:
                choice_TE = scores_TE
            if args.moe_router_num_groups is not None:
                choice_TE = group_limited_choice(choice_TE, args.moe_router_num_groups, args.moe_router_group_topk,
                                                 args.moe_top_k, args.moe_router_group_score_topk)
            top_experts_TK = torch.topk(choice_TE, args.moe_top_k, dim=-1).indices
        expert_weights_TK = scores_TE.gather(1, top_experts_TK)
        if args.moe_normalize_expert_weights:
            expert_weights_TK = expert_weights_TK / torch.norm(
                expert_weights_TK, p=args.moe_normalize_expert_weights, dim=-1, keepdim=True
            )
        if args.moe_router_topk_scaling_factor is not None:
            expert_weights_TK = expert_weights_TK * args.moe_router_topk_scaling_factor
        if args.uniform_expert_assignment:
            assignments = torch.arange(top_experts_TK.numel(), device=x.device, dtype=top_experts_TK.dtype)
            top_experts_TK = torch.remainder(assignments, args.moe_num_experts).view(top_experts_TK.shape)
        if args.moe_router_enable_expert_bias and self.training:
            with torch.no_grad():
                ones = torch.ones(top_experts_TK.numel(), dtype=torch.float32, device=x.device)
                self.local_tokens_per_expert.index_add_(0, top_experts_TK.flatten(), ones)
        return scores_TE, expert_weights_TK, top_experts_TK

    @torch.no_grad()
    def update_expert_bias(self, group=None) -> None:
        """Aux-loss-free balancing step: `expert_bias += rate * sign(mean load - load)`.

        Uses the tokens counted since the last update (summed over `group` with an all-reduce
        when given, e.g. the data-parallel group), then resets the count. Call it once per
        optimizer step.

        Raises:
            ValueError: when the router was built without `moe_router_enable_expert_bias`.
        """
        if not self.args.moe_router_enable_expert_bias:
            raise ValueError("update_expert_bias: expected a router built with moe_router_enable_expert_bias=True")
        counts = self.local_tokens_per_expert
        if group is not None:
            torch.distributed.all_reduce(counts, group=group)
        self.expert_bias += self.args.moe_router_bias_update_rate * torch.sign(counts.mean() - counts)
        counts.zero_()
