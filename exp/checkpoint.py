"""Checkpoints of a training run: save, resume, and merge expert-parallel shards.

A checkpoint is the directory `iter_XXXXXXX/` under the run's `--save`, and
`latest_checkpointed_iteration.txt` names the newest complete one. It holds the model, the
optimizer, the iteration, every process's RNG state (`rng_rank{r}.pt`) and `meta.json` (the
configs, world size and global batch), so a resumed run continues the loss curve an
uninterrupted run draws.

With expert parallelism (N > 1) checkpoints are sharded: the ranks of the first expert-parallel
group (ranks 0 .. N-1) each write `model_ep{k}.pt` and `optimizer_ep{k}.pt` (shared parameters
and expert shard k, and their optimizer state); no rank ever holds the whole model. A run
resumes only with the same world size and N. `consolidated_state_dict(checkpoint_dir)` merges the
shards into the state dict of the single-process model (for evaluation or export).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from exp.config import TrainConfig, global_batch_size
from exp.model import GPTConfig, moe_arguments
from exp.parallel import Dist

LATEST = "latest_checkpointed_iteration.txt"


def _rng_state(device: torch.device) -> Dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def _set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def latest_iteration(directory: Optional[str]) -> Optional[int]:
    """The iteration of the newest complete checkpoint in `directory`, or None."""
    if not directory:
        return None
    path = os.path.join(directory, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{path}: expected an iteration number, got {text!r}") from None


def iteration_dir(root: str, iteration: int) -> str:
    """The directory of the checkpoint of `iteration` under the run directory `root`."""
    return os.path.join(root, f"iter_{iteration:07d}")


def _model_files(d: Dist):
    """(model, optimizer) file names of this rank's checkpoint part."""
    if d.ep_size > 1:
        return f"model_ep{d.ep_rank}.pt", f"optimizer_ep{d.ep_rank}.pt"
    return "model.pt", "optimizer.pt"


def _expert_parameter_names(model: torch.nn.Module) -> List[str]:
    from megablocks.layers import mpu

    return [n for n, p in model.named_parameters() if mpu.param_is_expert_model_parallel(p)]


def _meta(iteration: int, model, tcfg: TrainConfig, mcfg: GPTConfig, d: Dist) -> Dict[str, Any]:
    gbs = global_batch_size(tcfg, d.world)
    meta = {
        "iteration": iteration,
        "consumed_samples": iteration * gbs,
        "global_batch_size": gbs,
        "world_size": d.world,
        "train": dataclasses.asdict(tcfg),
        "model": {k: v for k, v in dataclasses.asdict(mcfg).items() if k != "moe"},
        "moe": {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)) for k, v in mcfg.moe.items()},
    }
    if d.ep_size > 1:
        args = moe_arguments(mcfg)
        meta["expert_parallel"] = {
            "size": d.ep_size,
            "num_experts": args.moe_num_experts,
            "ffn_hidden_size": args.ffn_hidden_size,
            "parameters": _expert_parameter_names(model),
        }
    return meta


class CheckpointError(OSError):
    """A checkpoint could not be written; the latest complete one stays the one a resume picks."""


def _write(path: str, write) -> None:
    """`write(tmp)` then an atomic rename to `path`: a file under its final name is complete.

    Raises:
        CheckpointError: naming `path` and the cause (an OSError, or the RuntimeError torch.save
            raises when its writer fails, e.g. on a full disk).
    """
    tmp = path + ".tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        cause = err.strerror if isinstance(err, OSError) and err.strerror else str(err).strip().splitlines()[0]
        raise CheckpointError(f"{path}: {cause}") from err


def _write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    _write(path, write)


def _write_json(path: str, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)

    _write(path, write)


def _states(model, optimizer, tcfg: TrainConfig, d: Dist):
    """(model, optimizer) state dicts of this rank's checkpoint part, or (None, None) where this
    rank writes none. Under FSDP every rank takes part: the shards are gathered (over the mesh of
    each parameter) into the unsharded layout, the model's the same as without FSDP, the
    optimizer's keyed by parameter name (torch.distributed.checkpoint.state_dict)."""
    if tcfg.fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        full = StateDictOptions(full_state_dict=True)
        states = get_model_state_dict(model, options=full), get_optimizer_state_dict(model, optimizer, options=full)
        return states if d.rank < d.ep_size else (None, None)
    if d.rank < d.ep_size:
        return model.state_dict(), optimizer.state_dict()
    return None, None


def _write_rank_files(path, iteration, model, optimizer, tcfg, mcfg, device, d: Dist) -> None:
    model_state, optimizer_state = _states(model, optimizer, tcfg, d)  # collectives first, before any write
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise CheckpointError(f"{path}: {err.strerror or err}") from err
    _write(os.path.join(path, f"rng_rank{d.rank}.pt"), lambda tmp: torch.save(_rng_state(device), tmp))
    # Rank k < N holds expert shard k (the other expert-parallel groups hold copies of the same).
    if model_state is not None:
        model_file, optimizer_file = _model_files(d)
        _write(os.path.join(path, model_file), lambda tmp: torch.save(model_state, tmp))
        state = {"optimizer": optimizer_state, "iteration": iteration}
        _write(os.path.join(path, optimizer_file), lambda tmp: torch.save(state, tmp))
    if d.rank == 0:
        _write_json(os.path.join(path, "meta.json"), _meta(iteration, model, tcfg, mcfg, d))


def save_checkpoint(root, iteration, model, optimizer, tcfg, mcfg, device, d: Dist) -> str:
    """Writes this rank's part of the checkpoint of `iteration`; rank 0 then marks it the latest.

    Every rank calls it (it holds barriers). Each file is written under a temporary name and
    renamed when complete, and `latest_checkpointed_iteration.txt` is rewritten (atomically) only
    after every rank has written its part, so a resume never picks a half-written checkpoint.
    Returns the checkpoint's directory.

    Raises:
        CheckpointError: a write failed on any rank (a full disk, say): the message names the
            path and the cause; the previous checkpoint stays the latest.
    """
    path = iteration_dir(root, iteration)
    error = None
    try:
        _write_rank_files(path, iteration, model, optimizer, tcfg, mcfg, device, d)
    except CheckpointError as err:
        error = err
    if d.any_true(error is not None):  # every rank learns of a failure, none waits on a barrier
        where = f"rank {d.rank}, {error}" if error is not None else "a write failed on another rank"
        raise CheckpointError(
            f"checkpoint of iteration {iteration} not written ({where}); {_latest_text(root)}"
        ) from error
    if d.rank == 0:
        _write_text(os.path.join(root, LATEST), str(iteration))
    d.barrier()
    return path


def _latest_text(root: str) -> str:
    latest = latest_iteration(root)
    return "no complete checkpoint yet" if latest is None else f"the latest complete checkpoint is iteration {latest}"


def load_checkpoint(root, iteration, model, optimizer, tcfg, device, d: Dist) -> Dict[str, Any]:
    """Loads this rank's part of the checkpoint of `iteration` into model, optimizer and the RNGs.

    Returns its meta.json.

    Raises:
        ValueError: the checkpoint was saved with another world size, global batch size or
            expert_parallel_size, or its weights do not fit the model.
    """
    path = iteration_dir(root, iteration)
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    if meta["world_size"] != d.world:
        raise ValueError(
            f"{path}: saved with world size {meta['world_size']}, resumed with {d.world}; the data "
            "order and RNG streams continue exactly only at the same world size"
        )
    gbs = global_batch_size(tcfg, d.world)
    if meta["global_batch_size"] != gbs:
        raise ValueError(
            f"{path}: saved with global batch size {meta['global_batch_size']}, resumed with "
            f"{gbs}; the data position continues only at the same batch size"
        )
    saved_ep = meta.get("expert_parallel", {}).get("size", 1)
    if saved_ep != d.ep_size:
        raise ValueError(
            f"{path}: saved with expert_parallel_size {saved_ep}, resumed with {d.ep_size}; the expert shards "
            "are stored per expert-parallel rank"
        )
    saved_fsdp = bool(meta.get("train", {}).get("fsdp", False))
    if saved_fsdp != tcfg.fsdp:
        raise ValueError(
            f"{path}: saved with fsdp={saved_fsdp}, resumed with fsdp={tcfg.fsdp}; the optimizer state is stored "
            "by parameter name under FSDP and by position without it"
        )
    model_file, optimizer_file = _model_files(d)
    model_state = torch.load(os.path.join(path, model_file), map_location=device, weights_only=True)
    opt = torch.load(os.path.join(path, optimizer_file), map_location=device, weights_only=True)
    try:
        if tcfg.fsdp:  # every rank loads the unsharded part of its expert-parallel rank and keeps its shard
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)

            full = StateDictOptions(full_state_dict=True)
            set_model_state_dict(model, model_state, options=full)
        else:
            model.load_state_dict(model_state)
    except (RuntimeError, KeyError) as e:
        raise ValueError(f"{path}/{model_file} does not fit the configured model: {e}") from None
    if tcfg.fsdp:
        set_optimizer_state_dict(model, optimizer, opt["optimizer"], options=full)
    else:
        optimizer.load_state_dict(opt["optimizer"])
    _set_rng_state(torch.load(os.path.join(path, f"rng_rank{d.rank}.pt"), weights_only=False), device)
    return meta


def consolidated_state_dict(checkpoint_dir: str, map_location="cpu") -> Dict[str, torch.Tensor]:
    """The single-process model's state dict from a checkpoint directory (`.../iter_XXXXXXX`).

    Without expert parallelism this is `model.pt`. With it, the shards `model_ep{k}.pt` are
    merged: rank k of N held experts [(k % esd)·E/esd, ...) and, of each, the FFN rows
    [(k // esd)·F/hsd, ...), with esd = min(N, E), hsd = N / esd (`megablocks.layers.mpu`).

    Raises:
        FileNotFoundError: a file of the checkpoint is missing.
    """
    with open(os.path.join(checkpoint_dir, "meta.json")) as f:
        meta = json.load(f)
    ep = meta.get("expert_parallel")

    def load(name):
        return torch.load(os.path.join(checkpoint_dir, name), map_location=map_location, weights_only=True)

    if ep is None:
        return load("model.pt")
    n, num_experts, ffn = ep["size"], ep["num_experts"], ep["ffn_hidden_size"]
    shards = [load(f"model_ep{k}.pt") for k in range(n)]
    esd = min(n, num_experts)
    hsd = n // esd
    state = dict(shards[0])
    for name in ep["parameters"]:
        parts = [_as_EFH(name, s[name], num_experts // esd, ffn // hsd) for s in shards]
        # parts[j * esd + i]: expert block i, FFN block j.
        full_EFH = torch.cat([torch.cat([parts[j * esd + i] for j in range(hsd)], dim=1) for i in range(esd)], dim=0)
        state[name] = _from_EFH(name, full_EFH, like=shards[0][name])
    return state


def _as_EFH(name: str, w: torch.Tensor, experts: int, ffn: int) -> torch.Tensor:
    """An expert parameter as [E, F, H]: the dMoE's [E·F, H], or MoE's w1 / v1 [E, H, F], w2 [E, F, H]."""
    if w.dim() == 2:
        return w.view(experts, ffn, w.shape[-1])
    return w if name.endswith("w2") else w.transpose(1, 2)


def _from_EFH(name: str, w_EFH: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.dim() == 2:
        return w_EFH.reshape(-1, w_EFH.shape[-1])
    return w_EFH if name.endswith("w2") else w_EFH.transpose(1, 2).contiguous()
