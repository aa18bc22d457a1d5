"""`MoE`: top-k experts with a capacity factor, and MegaBlocks' load-balancing loss functions.

Legend: T tokens (the product of the input's leading dimensions), H hidden, E experts, K top-k,
C capacity (rows per expert).

    scores_TE, expert_weights_TK, top_experts_TK = router(x)
    x_ECH = binned_gather(x_TH)          the first C assignments of each expert, in token order
    y_ECH = experts.mlp(x_ECH)           MLP or GLU, batched over experts
    out_TH = binned_scatter(y_ECH)       weighted by expert_weights, summed over K; dropped -> 0

`C = int(moe_capacity_factor * K * T / E)`; when that is 0 (a factor of 0, or few tokens) the
capacity is the largest expert's count, which is read on the host: `MoE` synchronises with the
device once per forward in that case. `dMoE` is the dropless, sync-free layer.

Expert parallelism (`moe_expert_model_parallelism=True`, `expert_parallel_group`): each of the
W ranks holds E/esd experts and F/hsd of their FFN (`mpu`); `ParallelMLP.parallel_forward_once`
sends every assignment to its expert's ranks with `all_to_all` and back (the split sizes are
read on the host once per forward: the documented synchronisation). `MoE`'s capacity is then
that of the union of the ranks' batches, `int(moe_capacity_factor * K * ΣT / E)`, so a rank
keeps and drops exactly the assignments a single process would on the concatenated batches.
Expert weight gradients are scaled by 1 / W (`mpu.expert_gradient_scale`); see
`megablocks.layers.data_parallel` for the reduction that makes training match one process.
"""

from typing import Optional, Tuple

import torch

from megablocks.backend import use_triton
from megablocks.backend.routing import PADDED_MAPS_MAX_EXPERTS, SMALL_ROUTING_MAX_ROWS
from megablocks.layers import common, expert_parallel, glu, mlp, mpu, router, sharedexpert_registry
from megablocks.layers.arguments import MLP_IMPLS, MLP_TYPES, Arguments
from megablocks.layers.losses import collector_for, default_collector
from megablocks.layers.losses import global_load_balancing_loss, sequence_load_balancing_loss
from megablocks.layers.losses import load_balancing_loss as _load_balancing_loss
from megablocks.ops.permute import binned_gather, binned_scatter, gather, route, scatter
from megablocks.ops.routing import inclusive_cumsum, padded_row_maps, routing_metadata, row_maps


def save_load_balancing_loss(loss: Tuple[torch.Tensor, torch.Tensor]) -> None:
    """Appends `(tokens_per_expert_E, scores_TE)` to the process-wide collector (MegaBlocks' API)."""
    default_collector().save_load_balancing_loss(loss)


def get_load_balancing_loss():
    """The `(tokens_per_expert_E, scores_TE)` entries in the process-wide collector (a list)."""
    return default_collector().load_balancing


def clear_load_balancing_loss() -> None:
    """Empties the process-wide collector's load-balancing entries (MegaBlocks' API)."""
    default_collector().clear_load_balancing_loss()


def batched_load_balancing_loss(args: Arguments):
    """MegaBlocks' load-balancing loss over the layers recorded for `args`.

    `moe_loss_weight * E / (num_layers * T * K) * sum_l dot(f_lE, mean_t scores_lTE)` over the
    entries of `args.loss_collector` (or the process-wide collector); 0.0 when the weight is 0.
    Equals the sum of the layers' `load_balancing_loss` attributes.

    Raises:
        ValueError: the recorded layer count is not the number of layers on this pipeline stage.
    """
    return collector_for(args).batched_load_balancing_loss(args)


class ParallelMLP(torch.nn.Module):
    """The experts of `MoE`: routing, the expert MLP (`self.mlp`) and the output bias.

    `forward(x, scores, expert_weights, top_experts)` returns the experts' output shaped like x,
    or `(output, bias)` with `return_bias`, or `output + bias`. After a forward,
    `self.tokens_per_expert` holds the int32 [E] count of this rank's assignments per expert.

    With `moe_expert_model_parallelism` the forward is `parallel_forward_once`: this rank holds
    E/esd experts (and F/hsd of each one's FFN, see `mpu`), tokens travel to their experts'
    ranks and back with `all_to_all`. `bias` is not an expert parameter (replicated).
    """

    def __init__(self, args: Arguments):
        super().__init__()
        mpu.hidden_sharding_degree(args)  # validates the expert-parallel setup on every rank
        self.args = args
        self.num_experts = args.moe_num_experts
        self.top_k = args.moe_top_k
        self.mlp = self._init_mlp(args)
        if args.bias:
            self.bias = torch.nn.Parameter(torch.zeros(args.hidden_size, device=common.device(args), dtype=common.dtype(args)))
        else:
            self.register_parameter("bias", None)
        self.tokens_per_expert: Optional[torch.Tensor] = None
        self._exchange = (
            expert_parallel.TokenExchange(args, self._signature()) if args.moe_expert_model_parallelism else None
        )

    def _init_mlp(self, args: Arguments) -> torch.nn.Module:
        return glu.GLU(args) if args.mlp_type == "glu" else mlp.MLP(args)

    def _signature(self) -> Tuple[int, ...]:
        """What every expert-parallel rank must agree on (compared before the first exchange)."""
        args = self.args
        return (
            args.hidden_size, args.ffn_hidden_size, args.moe_num_experts, args.moe_top_k,
            MLP_TYPES.index(args.mlp_type), MLP_IMPLS.index(args.mlp_impl), args.moe_block_size,
            int(args.moe_capacity_factor * 1_000_000), int(args.memory_optimized_mlp), int(args.moe_expert_bias),
            args.moe_expert_parallel_chunks,
        )

    def expert_capacity(self, tokens: int) -> int:
        """`int(moe_capacity_factor * K * tokens * world_size / E)` (0 means: no dropping)."""
        world_size = mpu.get_expert_parallel_world_size(self.args)
        return int(self.args.moe_capacity_factor * self.top_k * tokens * world_size / self.num_experts)

    def load_balancing_loss(self, tokens_per_expert: torch.Tensor, expert_scores: torch.Tensor) -> torch.Tensor:
        """This layer's unweighted loss `E / (T * K) * dot(tokens_per_expert, mean_t expert_scores)`."""
        return _load_balancing_loss(tokens_per_expert, expert_scores, self.top_k)

    def indices_and_bins(self, top_expert: torch.Tensor, num_experts: Optional[int] = None):
        """`(indices, bin_ids, bins, tokens_per_expert)` of the flattened assignments (int32)."""
        meta = routing_metadata(top_expert, self.num_experts if num_experts is None else num_experts, 1,
                                small_routing=self.args.kernel_policy.small_routing)
        return meta.indices, meta.bin_ids, meta.bins, meta.tokens_per_expert

    def routed_rows(self, top_experts: torch.Tensor, num_experts: int, top_k: int):
        """`(tokens_per_expert_E, RowMaps)` of the plain layout (rows in expert order, an expert's
        rows in assignment order): on the kernels by `row_maps` (one program up to 4096 routed
        rows, else three launches: a key kernel, the stable sort, one kernel for both maps and the
        counts), instead of the metadata's sort, histogram and cumsums and then `route`, which
        remain the form under torch.compile and for the torch references (the same maps)."""
        if use_triton(top_experts) and not torch.compiler.is_compiling():
            return row_maps(top_experts.reshape(-1, top_k), num_experts)
        indices, bin_ids, bins, tokens_per_expert = self.indices_and_bins(top_experts, num_experts)
        return tokens_per_expert, route(indices, bin_ids, bins, top_k)

    def padded_routed_rows(self, top_experts: torch.Tensor, num_experts: int, top_k: int, block_size: int):
        """`(tokens_per_expert_E, padded_bins_E, RowMaps)` of the padded layout (each expert's rows
        padded to a multiple of `block_size`, `padded_rows_bound(N, E, block_size)` rows): past one
        routing program's rows (`SMALL_ROUTING_MAX_ROWS`) on the kernels by `padded_row_maps` (five
        launches), else (and under torch.compile, for the torch references, past
        `PADDED_MAPS_MAX_EXPERTS`) the metadata's sort, histogram and cumsums, then `route`."""
        if (use_triton(top_experts) and not torch.compiler.is_compiling()
                and top_experts.numel() > SMALL_ROUTING_MAX_ROWS and num_experts <= PADDED_MAPS_MAX_EXPERTS):
            return padded_row_maps(top_experts.reshape(-1, top_k), num_experts, block_size)
        meta = routing_metadata(top_experts, num_experts, block_size,
                                small_routing=self.args.kernel_policy.small_routing)
        maps = route(meta.indices, meta.bin_ids, meta.bins, top_k, meta.padded_bins, block_size=block_size)
        return meta.tokens_per_expert, meta.padded_bins, maps

    def permute_and_compute(
        self,
        x_TH: torch.Tensor,
        weights_N: Optional[torch.Tensor],
        top_experts: torch.Tensor,
        num_experts: int,
        top_k: int,
        capacity: Optional[int],
    ):
        """Routes the rows of `x_TH` to `num_experts` local experts and back: `(out_TH, counts_E)`.

        `top_experts` holds T·top_k expert ids; `weights_N` (None: 1) scales each assignment;
        `capacity` rows per expert (None: the largest expert's count, read on the host).
        """
        with torch.no_grad():
            # The expert-sorted assignments are the plain layout's rows' assignments.
            tokens_per_expert, maps = self.routed_rows(top_experts, num_experts, 1)
            indices, bins = maps.row_assignment, inclusive_cumsum(tokens_per_expert, 0)
            if capacity is None:
                # The one host read of the capacity path: the largest expert's count.
                capacity = int(tokens_per_expert.max()) if tokens_per_expert.numel() else 0
        x_ECH = binned_gather(x_TH, indices, bins, capacity, top_k)
        y_ECH = self.mlp(x_ECH)
        out_TH = binned_scatter(y_ECH, indices, weights_N, bins, top_k)
        return out_TH, tokens_per_expert

    def forward_once(self, x: torch.Tensor, expert_weights: torch.Tensor, top_experts: torch.Tensor):
        x_TH = x.reshape(-1, x.shape[-1])
        capacity = self.expert_capacity(x_TH.shape[0]) or None
        return self.permute_and_compute(
            x_TH, expert_weights.flatten(), top_experts, self.num_experts, self.top_k, capacity
        )

    def parallel_forward_once(self, x: torch.Tensor, expert_weights: torch.Tensor, top_experts: torch.Tensor,
                              during_exchange=None):
        """The expert-parallel forward (legend: N = T·K local assignments, R rows received).

            counts exchanged (all ranks' [E] counts, with a signature of the setup)
            x_NH = gather(x_TH)                      in expert order, overlapping the exchange
            x_RH = all_to_all(x_NH tiled hsd times)  rows of this rank's experts, by source rank
            y_RH = local experts (each row weight 1)
            y_NH = Σ over hsd of all_to_all back     the FFN shards' partial outputs summed
            out_TH = scatter(y_NH, expert_weights)

        Reads the exchanged counts on the host once (the split sizes of the all_to_all).
        `during_exchange` (a callable, e.g. the shared expert) runs while the rows travel: after
        the chunked pipeline has started its dispatches, or between the counts' exchange and its
        wait without chunks. Returns `(out_TH, tokens_per_expert, its result or None)`.
        """
        x_TH = x.reshape(-1, x.shape[-1])
        exchange = self._exchange
        with torch.no_grad():
            # With chunks (`moe_expert_parallel_chunks`) the rows are sorted in the exchange's chunked order.
            indices, bin_ids, bins, counts = self.indices_and_bins(exchange.reorder(top_experts))
            tokens_per_expert = exchange.counts_in_expert_order(counts)
        pending = exchange.start(tokens_per_expert, x_TH)
        x_NH = gather(x_TH, indices, bin_ids, bins, self.top_k)
        side = None
        if during_exchange is not None and exchange.chunks == 1:
            side = during_exchange()
        plan = pending.wait()
        # The capacity of the union of the ranks' batches, as one process would compute it.
        capacity = int(self.args.moe_capacity_factor * self.top_k * plan.global_tokens / self.num_experts) or None

        def experts(x_RH, local_experts_R):
            return self.permute_and_compute(x_RH, None, local_experts_R, plan.experts_per_rank, 1, capacity)[0]

        if exchange.chunks > 1:
            y_NH, side = plan.pipeline(x_NH, experts, during_exchange)
        else:
            y_NH = plan.combine(experts(plan.dispatch(x_NH), plan.local_experts_R))
        out_TH = scatter(y_NH, indices, bin_ids, expert_weights.flatten(), bins, self.top_k)
        return out_TH, tokens_per_expert, side

    def forward(self, x: torch.Tensor, scores: torch.Tensor, expert_weights: torch.Tensor, top_experts: torch.Tensor,
                during_exchange=None):
        """`during_exchange`: a callable run while expert parallelism's rows travel (before the
        experts without it); its result is kept in `self.during_exchange_result`."""
        if self._exchange is not None:
            out, self.tokens_per_expert, side = self.parallel_forward_once(x, expert_weights, top_experts,
                                                                           during_exchange)
        else:
            side = during_exchange() if during_exchange is not None else None
            out, self.tokens_per_expert = self.forward_once(x, expert_weights, top_experts)
        self.during_exchange_result = side
        out = out.view(x.shape)
        if self.bias is None:
            return out
        if self.args.return_bias:
            return out, self.bias
        return out + self.bias.to(out.dtype)


class MoE(torch.nn.Module):
    """A mixture-of-experts layer with MegaBlocks' surface: `router`, `experts`, `shared_expert`.

    `forward(x)` takes x [..., H] (MegaBlocks passes [seq, batch, H]) and returns the output of
    the same shape, or `(output, bias)` when `args.bias and args.return_bias` (MegaBlocks'
    defaults). The shared expert, when configured, is added to the output (not to the bias).

    After a training forward the layer keeps its auxiliary losses:
        `load_balancing_loss`: `moe_loss_weight / num_layers * E / (T*K) * dot(f_E, mean scores_E)`
            (summed over the layers this is `batched_load_balancing_loss(args)`), None in eval
            or with a zero weight; with sigmoid scores the scores are normalised per token.
        `router_zloss`: `moe_zloss_weight * mean_t logsumexp(logits_t)^2`, None likewise.
    Both are also recorded for the batched functions in `args.loss_collector` (or the
    process-wide collector).

    Raises:
        TypeError: x not a floating-point tensor, or its dtype differs from the parameters'
            (outside autocast).
        ValueError: x's last dimension is not hidden_size, or x is on another device.
    """

    def __init__(self, args: Arguments):
        super().__init__()
        self.args = args
        self.router = router.LearnedRouter(args)
        self.experts = self._init_experts_mlp(args)
        self.shared_expert = sharedexpert_registry.get(args) if args.shared_expert else None
        self.load_balancing_loss: Optional[torch.Tensor] = None

    def _init_experts_mlp(self, args: Arguments) -> torch.nn.Module:
        return ParallelMLP(args)

    @property
    def router_zloss(self) -> Optional[torch.Tensor]:
        return self.router.zloss

    def _record_load_balancing_loss(self, scores_TE: torch.Tensor, top_experts_TK: torch.Tensor,
                                    x_shape: torch.Size) -> None:
        args = self.args
        self.load_balancing_loss = None
        if not (self.training and args.moe_loss_weight > 0):
            return
        if args.moe_router_score_function == "sigmoid":
            scores_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        tokens_per_expert = self.experts.tokens_per_expert
        collector = collector_for(args)
        collector.save_load_balancing_loss((tokens_per_expert, scores_TE))
        if args.moe_lbl_in_fp32:
            scores_TE = scores_TE.float()
        kind = args.moe_router_load_balancing_type
        if kind == "seq_aux_loss":
            # Sequences along moe_router_seq_dim of a 3-D input ([S, B, H] or [B, S, H]); else one.
            num_sequences = x_shape[1 - args.moe_router_seq_dim] if len(x_shape) == 3 else 1
            loss = sequence_load_balancing_loss(top_experts_TK.reshape(-1, args.moe_top_k), scores_TE,
                                                num_sequences, args.moe_router_seq_dim if len(x_shape) == 3 else 0)
        elif kind == "global_aux_loss":
            loss = global_load_balancing_loss(tokens_per_expert, scores_TE, args.moe_top_k, args.moe_aux_loss_group)
        else:
            loss = _load_balancing_loss(tokens_per_expert, scores_TE, args.moe_top_k)
        self.load_balancing_loss = (args.moe_loss_weight / args.num_layers) * loss
        if kind != "aux_loss":
            collector.save_layer_loss(self.load_balancing_loss)

    def forward(self, x: torch.Tensor):
        common.check_input("x", x, self.args.hidden_size, self.router.layer.weight)
        x = common.cast_if_autocast_enabled(x)
        scores, expert_weights, top_experts = self.router(x)
        if self.shared_expert is None:
            out = self.experts(x, scores, expert_weights, top_experts)
            self._record_load_balancing_loss(scores, top_experts, x.shape)
            return out
        # The shared expert runs while expert parallelism's rows travel.
        out = self.experts(x, scores, expert_weights, top_experts, during_exchange=lambda: self.shared_expert(x))
        shared_out, self.experts.during_exchange_result = self.experts.during_exchange_result, None
        self._record_load_balancing_loss(scores, top_experts, x.shape)
        if isinstance(out, tuple):
            return self.shared_expert.add_experts_sharedexpert(shared_out, out[0]), out[1]
        return self.shared_expert.add_experts_sharedexpert(shared_out, out)
