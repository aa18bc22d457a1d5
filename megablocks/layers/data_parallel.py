"""Data parallelism for models with expert-parallel MoE layers.

With D data-parallel ranks split into expert-parallel groups of W ranks, every shared
parameter (attention, embeddings, routers, `experts.bias`, ...) is replicated on all D ranks,
while an expert parameter shard (marked `expert_model_parallel = True` by the layers) is
replicated only on the D / W ranks with the same expert-parallel rank: its expert-data-parallel
group. After the backward:

    shared gradient  <- mean over the D data-parallel ranks
    expert gradient  <- mean over the D / W ranks of its expert-data-parallel group

The expert layers already scale an expert gradient by 1 / W (it sums the W ranks' batches, see
`mpu.expert_gradient_scale`), so both end up as the gradient of the mean of the D ranks' losses:
one optimizer step equals single-process training on the union of the batches (equal batch
sizes, each rank's loss a mean over its batch).

Use `DistributedGroupedDataParallel(model)` and call `allreduce_gradients()` after the backward
(then `clip_grad_norm_` for the norm of the whole, sharded model, if clipping);
or keep torch DDP for the shared parameters: `ignore_expert_parameters_in_ddp(model)` before
wrapping in DDP, and `DistributedGroupedDataParallel(model, reduce_shared=False)` beside it.
"""

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megablocks.layers import mpu


def expert_parallel_groups(expert_parallel_size: int) -> Tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """Builds the expert-parallel and expert-data-parallel groups of the default group.

    The expert-parallel groups are blocks of `expert_parallel_size` consecutive ranks (one node's
    GPUs for the all_to_all); the expert-data-parallel groups hold the ranks with the same
    position in their block. Every rank must call this (it creates all groups collectively).

    Returns:
        `(expert_parallel_group, expert_data_parallel_group)` of this rank.

    Raises:
        ValueError: the world size is not a multiple of `expert_parallel_size`.
    """
    world_size = dist.get_world_size()
    if isinstance(expert_parallel_size, bool) or not isinstance(expert_parallel_size, int):
        raise TypeError(f"expert_parallel_size: expected an int, got {type(expert_parallel_size).__name__}")
    if expert_parallel_size < 1 or world_size % expert_parallel_size != 0:
        raise ValueError(
            f"expert_parallel_size: expected a divisor of the world size {world_size}, got {expert_parallel_size}"
        )
    rank = dist.get_rank()
    replicas = world_size // expert_parallel_size
    ep_group = edp_group = None
    for i in range(replicas):
        ranks = list(range(i * expert_parallel_size, (i + 1) * expert_parallel_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            ep_group = group
    for j in range(expert_parallel_size):
        ranks = list(range(j, world_size, expert_parallel_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            edp_group = group
    return ep_group, edp_group


def expert_parameter_names(module: torch.nn.Module) -> List[str]:
    """Names of the parameters of `module` sharded over an expert-parallel group."""
    return [name for name, p in module.named_parameters() if mpu.param_is_expert_model_parallel(p)]


def ignore_expert_parameters_in_ddp(module: torch.nn.Module) -> None:
    """Makes a later `torch.nn.parallel.DistributedDataParallel(module)` skip the expert shards
    (they must not be averaged over every rank); reduce them with
    `DistributedGroupedDataParallel(module, reduce_shared=False)`."""
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        module, expert_parameter_names(module)
    )


class DistributedGroupedDataParallel(torch.nn.Module):
    """Wraps a model with expert-parallel MoE layers; reduces gradients in the right groups.

    Args:
        module: the model; `forward` is passed through.
        data_parallel_group: the D ranks that replicate the shared parameters (None: default).
        expert_data_parallel_group: the ranks that replicate this rank's expert shards (None:
            none do, i.e. the expert-parallel group spans the data-parallel ranks).
        reduce_shared: also reduce the shared parameters (False when torch DDP does it).
        broadcast: copy the parameters from the first rank of their group when built.

    Call `allreduce_gradients()` after each backward (and before the optimizer step).

    Raises:
        TypeError: module is not a torch.nn.Module.
        ValueError: D is not (expert-parallel size) x (expert-data-parallel size) for an
            expert-parallel layer of the model.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        data_parallel_group: Optional[dist.ProcessGroup] = None,
        expert_data_parallel_group: Optional[dist.ProcessGroup] = None,
        reduce_shared: bool = True,
        broadcast: bool = True,
    ):
        super().__init__()
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
        self.module = module
        self.data_parallel_group = data_parallel_group
        self.expert_data_parallel_group = expert_data_parallel_group
        self.reduce_shared = reduce_shared
        self._check_groups()
        if broadcast:
            self.broadcast_parameters()

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _groups(self) -> Dict[str, Tuple[Optional[dist.ProcessGroup], List[torch.nn.Parameter]]]:
        shared, expert = [], []
        for p in self.module.parameters():
            (expert if mpu.param_is_expert_model_parallel(p) else shared).append(p)
        groups = {"expert": (self.expert_data_parallel_group, expert)}
        if self.reduce_shared:
            groups["shared"] = (self.data_parallel_group, shared)
        return groups

    def _check_groups(self) -> None:
        dp = dist.get_world_size(self.data_parallel_group)
        edp = 1 if self.expert_data_parallel_group is None else dist.get_world_size(self.expert_data_parallel_group)
        for name, sub in self.module.named_modules():
            args = getattr(sub, "args", None)
            if args is None or not getattr(args, "moe_expert_model_parallelism", False):
                continue
            ep = mpu.get_expert_parallel_world_size(args)
            if ep * edp != dp:
                raise ValueError(
                    f"expert_data_parallel_group: expected {dp} data-parallel ranks = expert-parallel size {ep} "
                    f"(layer {name or 'module'}) x expert-data-parallel size, got an expert-data-parallel size of {edp}"
                )

    @torch.no_grad()
    def broadcast_parameters(self) -> None:
        """Copies every parameter from the first rank of the group that replicates it."""
        for kind, (group, params) in self._groups().items():
            if kind == "expert" and group is None:
                continue
            src = 0 if group is None else dist.get_global_rank(group, 0)
            for p in params:
                dist.broadcast(p.data, src=src, group=group)

    @torch.no_grad()
    def allreduce_gradients(self) -> None:
        """Averages the gradients: shared ones over the data-parallel group, expert ones over the
        expert-data-parallel group. A parameter without a gradient on this rank counts as zero
        (every rank then takes part in the same collectives)."""
        for kind, (group, params) in self._groups().items():
            if kind == "expert" and group is None:
                continue
            size = dist.get_world_size(group)
            if size == 1:
                continue
            by_dtype: Dict[torch.dtype, List[torch.nn.Parameter]] = {}
            for p in params:
                if p.requires_grad:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    by_dtype.setdefault(p.grad.dtype, []).append(p)
            for dtype in sorted(by_dtype, key=str):
                grads = [p.grad for p in by_dtype[dtype]]
                flat = torch.cat([g.reshape(-1) for g in grads])
                dist.all_reduce(flat, group=group)
                flat.div_(size)
                offset = 0
                for g in grads:
                    g.copy_(flat[offset:offset + g.numel()].view_as(g))
                    offset += g.numel()

    def _expert_parallel_groups(self) -> list:
        """The expert_parallel_group of the model's expert-parallel layers (one, or none)."""
        groups = []
        for sub in self.module.modules():
            args = getattr(sub, "args", None)
            if args is not None and getattr(args, "moe_expert_model_parallelism", False):
                if not any(args.expert_parallel_group is g for g in groups):
                    groups.append(args.expert_parallel_group)
        if len(groups) > 1:
            raise ValueError(
                f"module: expected every expert-parallel layer to use the same expert_parallel_group, got {len(groups)}"
            )
        return groups

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """`torch.nn.utils.clip_grad_norm_` over the whole model, expert shards included.

        The norm is that of the single-process model's gradient: the shared gradients (equal on
        every rank after `allreduce_gradients`) plus the expert shards of the whole
        expert-parallel group (summed over it). Call after `allreduce_gradients`; every rank gets
        the same norm and scales the same way. Returns the total norm (float32 tensor).
        """
        if norm_type != 2.0:
            raise ValueError(f"norm_type: expected 2.0 (the sharded sum of squares), got {norm_type}")
        shared, expert = [], []
        for p in self.module.parameters():
            if p.grad is not None:
                (expert if mpu.param_is_expert_model_parallel(p) else shared).append(p.grad)
        device = next(self.module.parameters()).device
        sq = torch.zeros(2, dtype=torch.float32, device=device)
        for i, grads in enumerate((shared, expert)):
            for g in grads:
                sq[i] += g.detach().float().pow(2).sum()
        expert_sq = sq[1:].clone()
        for group in self._expert_parallel_groups():
            dist.all_reduce(expert_sq, group=group)
        total = (sq[0] + expert_sq[0]).sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in shared + expert:
            g.mul_(coef.to(g.dtype))
        return total

