"""Expert-parallel bookkeeping with MegaBlocks' names.

Without `moe_expert_model_parallelism` the world is one process: world size 1, rank 0, every
expert local. With it, sizes come from `torch.distributed` on `args.expert_parallel_group`; the
layers do not dispatch across processes yet and refuse a world size above 1 when built.
"""

import torch


def is_moe_param(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "expert_model_parallel")


def get_expert_parallel_world_size(args) -> int:
    if not args.moe_expert_model_parallelism:
        return 1
    return torch.distributed.get_world_size(args.expert_parallel_group)


def get_expert_parallel_rank(args) -> int:
    if not args.moe_expert_model_parallelism:
        return 0
    return torch.distributed.get_rank(args.expert_parallel_group)


def set_expert_model_parallel_attributes(tensor: torch.Tensor, is_parallel: bool) -> None:
    """Marks `tensor` as an expert parameter (sharded over the expert-parallel group or not)."""
    setattr(tensor, "expert_model_parallel", is_parallel)


def param_is_expert_model_parallel(param: torch.Tensor) -> bool:
    return getattr(param, "expert_model_parallel", False)


def copy_expert_model_parallel_attributes(destination_tensor: torch.Tensor, source_tensor: torch.Tensor) -> None:
    if hasattr(source_tensor, "expert_model_parallel"):
        destination_tensor.expert_model_parallel = source_tensor.expert_model_parallel


def expert_sharding_degree(args) -> int:
    """How many ways the experts are split (at most the number of experts)."""
    esd = min(get_expert_parallel_world_size(args), args.moe_num_experts)
    if args.moe_num_experts % esd != 0:
        raise ValueError(f"moe_num_experts: {args.moe_num_experts} experts cannot be split {esd} ways")
    return esd


def hidden_sharding_degree(args) -> int:
    """How many ways each expert's FFN dimension is split (when ranks outnumber experts)."""
    world_size = get_expert_parallel_world_size(args)
    esd = expert_sharding_degree(args)
    hsd = world_size // esd
    if args.ffn_hidden_size % hsd != 0:
        raise ValueError(f"ffn_hidden_size: {args.ffn_hidden_size} features cannot be split {hsd} ways")
    if esd * hsd != world_size:
        raise ValueError(
            f"expert_parallel_group: {esd} expert shards x {hsd} hidden shards != world size {world_size}"
        )
    return hsd


def experts_per_rank(args) -> int:
    return args.moe_num_experts // expert_sharding_degree(args)


def features_per_rank(args) -> int:
    return args.ffn_hidden_size // hidden_sharding_degree(args)


def check_single_process(args) -> None:
    """Refuses an expert-parallel world larger than one process (not dispatched yet)."""
    world_size = get_expert_parallel_world_size(args)
    if world_size != 1:
        raise NotImplementedError(
            f"moe_expert_model_parallelism: expert-parallel dispatch over {world_size} processes is not "
            "available in these layers; expected a world size of 1"
        )
