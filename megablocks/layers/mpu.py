"""Expert-parallel bookkeeping with MegaBlocks' names.

Without `moe_expert_model_parallelism` the world is one process: world size 1, rank 0, every
expert local. With it, sizes come from `torch.distributed` on `args.expert_parallel_group`
(None: the default group) of W processes:

    esd = min(W, E)          expert sharding degree: the experts are split esd ways
    hsd = W / esd            hidden sharding degree: each expert's FFN is split hsd ways (W > E)
    rank r holds experts [(r % esd)·E/esd, (r % esd + 1)·E/esd) and, of each of them, the FFN
    rows [(r // esd)·F/hsd, (r // esd + 1)·F/hsd)

Expert parameters carry `expert_model_parallel = True` (and `allreduce = False`, Megatron's
mark) when they are sharded over the group; `megablocks.layers.data_parallel` reduces them over
the ranks that hold the same shard instead of over every rank.
"""

from typing import List

import torch
import torch.distributed as dist


def is_moe_param(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "expert_model_parallel")


def get_expert_parallel_world_size(args) -> int:
    if not args.moe_expert_model_parallelism:
        return 1
    _check_group(args)
    return dist.get_world_size(args.expert_parallel_group)


def get_expert_parallel_rank(args) -> int:
    if not args.moe_expert_model_parallelism:
        return 0
    _check_group(args)
    return dist.get_rank(args.expert_parallel_group)


def expert_parallel_global_ranks(args) -> List[int]:
    """The global ranks of the expert-parallel group, in group-rank order ([0] without EP)."""
    if not args.moe_expert_model_parallelism:
        return [0]
    _check_group(args)
    return dist.get_process_group_ranks(args.expert_parallel_group or dist.group.WORLD)


def _check_group(args) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "moe_expert_model_parallelism: expected torch.distributed to be initialised "
            "(torch.distributed.init_process_group, e.g. under torchrun), got no process group"
        )
    group = args.expert_parallel_group
    # torch.distributed.new_group returns a sentinel (not a ProcessGroup) on ranks outside it.
    outside = group is dist.GroupMember.NON_GROUP_MEMBER or (
        isinstance(group, int) and group == dist.GroupMember.NON_GROUP_MEMBER
    )
    if group is not None and not outside and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"expert_parallel_group: expected None or a ProcessGroup, got {type(group).__name__}")
    if outside or dist.get_rank(group) < 0:
        raise ValueError(
            f"expert_parallel_group: global rank {dist.get_rank()} is not a member of the group it was given"
        )


def set_expert_model_parallel_attributes(tensor: torch.Tensor, is_parallel: bool) -> None:
    """Marks `tensor` as an expert parameter, sharded over the expert-parallel group or not.

    Sharded parameters also get `allreduce = False` (Megatron's mark for "do not average over
    the whole data-parallel world").
    """
    setattr(tensor, "expert_model_parallel", is_parallel)
    if is_parallel:
        setattr(tensor, "allreduce", False)


def param_is_expert_model_parallel(param: torch.Tensor) -> bool:
    return getattr(param, "expert_model_parallel", False)


def copy_expert_model_parallel_attributes(destination_tensor: torch.Tensor, source_tensor: torch.Tensor) -> None:
    if hasattr(source_tensor, "expert_model_parallel"):
        set_expert_model_parallel_attributes(destination_tensor, source_tensor.expert_model_parallel)


def expert_sharding_degree(args) -> int:
    """How many ways the experts are split (at most the number of experts).

    Raises:
        ValueError: the experts cannot be split evenly over the group.
    """
    world_size = get_expert_parallel_world_size(args)
    esd = min(world_size, args.moe_num_experts)
    if args.moe_num_experts % esd != 0:
        raise ValueError(
            f"moe_num_experts: expected a multiple of the expert-parallel world size {world_size} "
            f"(or a divisor of it), got {args.moe_num_experts}"
        )
    return esd


def hidden_sharding_degree(args) -> int:
    """How many ways each expert's FFN dimension is split (when ranks outnumber experts).

    Raises:
        ValueError: the world size is not a multiple of the number of experts, or the FFN size
            is not a multiple of the hidden sharding degree.
    """
    world_size = get_expert_parallel_world_size(args)
    esd = expert_sharding_degree(args)
    hsd = world_size // esd
    if esd * hsd != world_size:
        raise ValueError(
            f"expert_parallel_group: expected a world size that is a multiple of moe_num_experts="
            f"{args.moe_num_experts} when it exceeds it, got {world_size}"
        )
    if args.ffn_hidden_size % hsd != 0:
        raise ValueError(
            f"ffn_hidden_size: expected a multiple of the hidden sharding degree {hsd} "
            f"(world size {world_size} / {esd} expert shards), got {args.ffn_hidden_size}"
        )
    return hsd


def experts_per_rank(args) -> int:
    return args.moe_num_experts // expert_sharding_degree(args)


def features_per_rank(args) -> int:
    return args.ffn_hidden_size // hidden_sharding_degree(args)


def expert_shard_index(args) -> int:
    """Which block of `experts_per_rank` experts this rank holds."""
    return get_expert_parallel_rank(args) % expert_sharding_degree(args)


def hidden_shard_index(args) -> int:
    """Which block of `features_per_rank` FFN rows (of each local expert) this rank holds."""
    return get_expert_parallel_rank(args) // expert_sharding_degree(args)


def expert_gradient_scale(args) -> float:
    """The factor applied to the expert weights' gradients: 1 / W with expert parallelism.

    An expert weight's backward sums the contributions of every rank's tokens (they travel to
    it through the all_to_all), while shared weights see only the local batch and are then
    averaged over the data-parallel ranks. Scaling by 1 / W makes each expert gradient the mean
    over the expert-parallel ranks' batches, so that with a per-rank mean loss every gradient
    equals single-process training on the union of the batches (after the data-parallel
    reduction of `megablocks.layers.data_parallel`).
    """
    return 1.0 / get_expert_parallel_world_size(args)




class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def scale_gradient(tensor: torch.Tensor, scale: float) -> torch.Tensor:
    """`tensor` unchanged in the forward; its gradient multiplied by `scale` in the backward."""
    if scale == 1.0:
        return tensor
    return _ScaleGradient.apply(tensor, scale)


def expert_shard(args, weights_EFH: torch.Tensor) -> torch.Tensor:
    """This rank's part of all experts' weights `[E, F, H]`: `[E/esd, F/hsd, H]` (a view)."""
    if not args.moe_expert_model_parallelism:
        return weights_EFH
    epr, fpr = experts_per_rank(args), features_per_rank(args)
    e0, f0 = expert_shard_index(args) * epr, hidden_shard_index(args) * fpr
    return weights_EFH[e0:e0 + epr, f0:f0 + fpr]
