"""The processes of a run: device, process group, data and expert parallelism.

One process per device; with WORLD_SIZE > 1 (torchrun) the model is wrapped in DDP (NCCL on
GPUs, gloo on CPU), every process reading its own part of each global batch.

Expert parallelism (`--expert-parallel-size N`, MoE/dMoE models under torchrun): the W processes
form W / N expert-parallel groups of N consecutive ranks
(`megablocks.layers.data_parallel.expert_parallel_groups`); each rank of a group holds E / N of
the E experts of every layer (or, when N > E, a 1 / (N / E) slice of the FFN of one expert), and
the tokens travel to their experts by all_to_all. Every rank still reads its own part of the
batch. Shared parameters are averaged over all W ranks (torch DDP), expert shards over the W / N
ranks holding the same shard (`DistributedGroupedDataParallel`); the gradient norm is that of
the whole model. N must divide W and either divide E or be a multiple of it; N = 1 (default) is
plain data parallelism. For a dMoE, a step equals a single-process step on the union of the
ranks' batches (each rank's batch one micro-batch of it): same losses, gradients and weights.
Initial weights do not depend on N: each rank holds the slice of the single-process weights.

FSDP (`--fsdp`): instead of DDP's replicas, torch's FSDP2 (`fully_shard`) shards every shared
parameter over all W ranks and every expert shard over its W / N expert-data-parallel ranks
(torchtitan's layout: the expert modules on the expert-data-parallel mesh, each transformer block
and the root on the data-parallel mesh). FSDP2 averages each gradient over its mesh; with the
expert layers' 1 / N scaling that is again the gradient of the mean of the W ranks' losses, so a
step equals the DDP step and the single-process step on the union of the batches. The gradient
norm sums the squares of every rank's gradient shards over all W ranks (each rank holds a
distinct piece of the whole model).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from exp.config import TrainConfig
from exp.model import GPT, GPTConfig, moe_arguments


class Dist:
    """The processes of the run: torchrun's environment, or a process group set up by the caller."""

    def __init__(self, device_kind: str):
        self.owns_group = False
        if dist.is_available() and dist.is_initialized():
            self.world, self.rank = dist.get_world_size(), dist.get_rank()
        else:
            self.world = int(os.environ.get("WORLD_SIZE", "1"))
            self.rank = int(os.environ.get("RANK", "0"))
            if self.world > 1:
                dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
                self.owns_group = True
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        # Expert parallelism (set by `setup_expert_parallel`): N, this rank's index in its group, groups.
        self.ep_size, self.ep_rank = 1, 0
        self.ep_group = self.edp_group = None

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(values)
            values = values / self.world
        return values

    def any_true(self, flag: bool) -> bool:
        """Whether `flag` is True on any rank (an all-reduce; every rank must call it)."""
        if not self.enabled:
            return flag
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def close(self):
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(cfg: TrainConfig, local_rank: int) -> torch.device:
    """The device of this process: `cfg.device`, with 'auto' the GPU of `local_rank` when there is one.

    Raises:
        ValueError: 'cuda' asked for without a CUDA device.
    """
    kind = cfg.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device: 'cuda' asked for, but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup_expert_parallel(tcfg: TrainConfig, mcfg: GPTConfig, d: Dist) -> GPTConfig:
    """Checks `expert_parallel_size`, builds the groups (into `d`) and returns the config of the
    model to build: `mcfg` itself, or with its MoE layers expert-parallel over this rank's group.

    Every check depends only on the configuration and the world size, so every rank raises the
    same error before any collective.
    """
    n = tcfg.expert_parallel_size
    if mcfg.moe.get("moe_expert_model_parallelism") and n == 1:
        raise ValueError(
            "moe_expert_model_parallelism: set by the trainer from expert_parallel_size; "
            "use --expert-parallel-size N instead"
        )
    if n == 1:
        return mcfg
    if mcfg.mlp == "dense":
        raise ValueError(f"expert_parallel_size: expected 1 for a dense model (mlp='dense'), got {n}")
    if d.world % n:
        raise ValueError(f"expert_parallel_size: expected a divisor of the world size {d.world}, got {n}")
    args = moe_arguments(mcfg)
    experts, ffn = args.moe_num_experts, args.ffn_hidden_size
    if experts % n and n % experts:
        raise ValueError(
            f"expert_parallel_size: expected a divisor of moe_num_experts={experts} (or a multiple of it, "
            f"splitting each expert's FFN), got {n}"
        )
    if n > experts and ffn % (n // experts):
        raise ValueError(
            f"expert_parallel_size: {n} ranks split each of the {experts} experts' FFN {n // experts} ways; "
            f"expected ffn_hidden_size to be a multiple of {n // experts}, got {ffn}"
        )
    from megablocks.layers.data_parallel import expert_parallel_groups

    d.ep_group, d.edp_group = expert_parallel_groups(n)
    d.ep_size, d.ep_rank = n, dist.get_rank(d.ep_group)
    moe = {**mcfg.moe, "moe_expert_model_parallelism": True, "expert_parallel_group": d.ep_group}
    return dataclasses.replace(mcfg, moe=moe)


def _expert_modules(model: torch.nn.Module):
    """The modules whose own parameters are expert shards (all of them: a module mixing expert and
    shared parameters cannot live on one mesh and raises ValueError)."""
    from megablocks.layers import mpu

    found = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        marks = [mpu.param_is_expert_model_parallel(p) for p in own]
        if any(marks) and not all(marks):
            raise ValueError(f"fsdp: module {name!r} holds both expert-parallel and shared parameters")
        if own and all(marks):
            found.append(module)
    return found


def apply_fsdp(model: GPT, d: Dist, device: torch.device) -> None:
    """Shards `model` in place with FSDP2: expert modules over the expert-data-parallel ranks,
    then each transformer block and the root over all ranks (see the module docstring). Every
    rank calls it; the optimizer is built afterwards, on the sharded parameters."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.fsdp import fully_shard

    kind = device.type
    if d.enabled:
        dp_mesh = init_device_mesh(kind, (d.world,))
    else:  # one process: a mesh of the default group of one
        if not dist.is_initialized():
            raise ValueError("fsdp: expected a process group (torchrun, or one set up by the caller)")
        dp_mesh = init_device_mesh(kind, (1,))
    from megablocks.layers import mpu

    edp_mesh = DeviceMesh.from_group(d.edp_group, kind) if d.ep_size > 1 else None
    experts = _expert_modules(model) if edp_mesh is not None else []
    # fully_shard makes new Parameters: the expert marks are carried over by name (checkpoints and
    # parameter counts read them).
    marks = {n: mpu.param_is_expert_model_parallel(p) for n, p in model.named_parameters() if mpu.is_moe_param(p)}
    for module in experts:
        fully_shard(module, mesh=edp_mesh)
    for block in model.blocks:
        fully_shard(block, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
    for name, p in model.named_parameters():
        if name in marks:
            mpu.set_expert_model_parallel_attributes(p, marks[name])


@torch.no_grad()
def clip_sharded_grad_norm_(parameters, max_norm: float, d: Dist) -> torch.Tensor:
    """`clip_grad_norm_` for FSDP-sharded parameters: the 2-norm of the whole model's gradient
    (each rank's local shards squared, summed over all ranks), every shard scaled by
    min(1, max_norm / (norm + 1e-6)). Returns the norm before clipping."""
    grads = [p.grad for p in parameters if p.grad is not None]
    local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    device = local[0].device if local else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float32, device=device)
    for g in local:
        total += g.detach().float().pow(2).sum()
    if d.enabled:
        dist.all_reduce(total)
    norm = total.sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    if local:
        torch._foreach_mul_(local, coef.to(local[0].dtype))
    return norm


def wrap_data_parallel(model: GPT, d: Dist, device: torch.device) -> Tuple[torch.nn.Module, Optional[object]]:
    """(the module to call, the expert shards' gradient reducer or None) for this run's processes.

    One process: the model itself and None. Several: the model in DDP; with expert parallelism
    also a `DistributedGroupedDataParallel` that the step calls after the backward.
    """
    if not d.enabled:
        return model, None
    experts = None
    ids = [device.index] if device.type == "cuda" else None
    if d.ep_size > 1:
        # DDP averages the shared parameters over all ranks (overlapped with the backward); the
        # expert shards are averaged over the ranks holding the same shard, after the backward.
        from megablocks.layers.data_parallel import DistributedGroupedDataParallel, ignore_expert_parameters_in_ddp

        ignore_expert_parameters_in_ddp(model)
        experts = DistributedGroupedDataParallel(
            model, expert_data_parallel_group=d.edp_group if d.world > d.ep_size else None, reduce_shared=False,
        )
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids), experts


def num_parameters(model: GPT, d: Dist, active: bool = False) -> int:
    """The whole model's parameters (each expert shard counted for the N ranks that split it)."""
    if d.ep_size == 1:
        return model.num_parameters(active=active)
    from megablocks.layers import mpu

    args = model.moe_args
    total = 0
    for name, p in model.named_parameters():
        n = p.numel() * (d.ep_size if mpu.param_is_expert_model_parallel(p) else 1)
        if active and ".experts.mlp." in name:
            n = n * args.moe_top_k // args.moe_num_experts
        total += n
    return total
