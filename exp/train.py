"""Train the GPT of `exp.model` on Megatron-format data.

    python -m exp.train --config exp/configs/tiny_dmoe_cpu.json --data-path data/x_text_document \\
        --save runs/tiny_dmoe
    torchrun --nproc_per_node 8 -m exp.train --config exp/configs/dmoe_46m.json \\
        --data-path data/pile_text_document --save runs/dmoe_46m

One process per device; with WORLD_SIZE > 1 (torchrun) the model is wrapped in DDP (NCCL on
GPUs, gloo on CPU), every process reading its own part of each global batch. bf16 autocast on
GPUs (float32 on CPU), AdamW, linear warmup then cosine (or linear, or constant) decay to
`min_lr`, gradient clipping, the MoE load-balancing and z losses added to the loss, periodic
validation on a fixed set of held-out samples.

Outputs in `--save` (default `runs/<config name>`): `train.csv` (one row per iteration),
`valid.csv`, TensorBoard events when `tensorboard` is installed, `loss.png`, and checkpoints
`iter_XXXXXXX/` with `latest_checkpointed_iteration.txt`. A run whose `--save` (or `--load`)
holds a checkpoint resumes from it: model, optimizer, LR schedule, every RNG and the data
position, so the resumed loss curve is the one an uninterrupted run draws.

Every option can be given on the command line or in a `--config` JSON file (keys are the option
names with underscores; the command line wins). Every field of
`megablocks.layers.arguments.Arguments` is an option (`--moe-num-experts`, `--moe-top-k`, ...),
except those the model sets: see `exp.model.SHARED_FIELDS` / `MODEL_SET_FIELDS`.

Expert parallelism (`--expert-parallel-size N`, MoE/dMoE models under torchrun):

    torchrun --nproc_per_node 8 -m exp.train --config exp/configs/dmoe_46m.json \
        --data-path data/pile_text_document --expert-parallel-size 8

The W processes form W / N expert-parallel groups of N consecutive ranks
(`megablocks.layers.data_parallel.expert_parallel_groups`); each rank of a group holds E / N of
the E experts of every layer (or, when N > E, a 1 / (N / E) slice of the FFN of one expert), and
the tokens travel to their experts by all_to_all. Every rank still reads its own part of the
batch. Shared parameters are averaged over all W ranks (torch DDP), expert shards over the W / N
ranks holding the same shard (`DistributedGroupedDataParallel`); the gradient norm is that of
the whole model. N must divide W and either divide E or be a multiple of it; N = 1 (default) is
plain data parallelism. For a dMoE, a step equals a single-process step on the union of the
ranks' batches (each rank's batch one micro-batch of it): same losses, gradients and weights.
Initial weights do not depend on N: each rank holds the slice of the single-process weights.

Checkpoints with N > 1 are sharded: the ranks of the first expert-parallel group (ranks
0 .. N-1) each write `model_ep{k}.pt` and `optimizer_ep{k}.pt` (shared parameters and expert
shard k, and their optimizer state); no rank ever holds the whole model. A run resumes only with
the same world size and N. `consolidated_state_dict(checkpoint_dir)` merges the shards into the
state dict of the single-process model (for evaluation or export).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import random
import sys
import time
import typing
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from exp.data.gpt_dataset import build_datasets
from exp.model import GPT, MODEL_SET_FIELDS, SHARED_FIELDS, GPTConfig, moe_arguments

LATEST = "latest_checkpointed_iteration.txt"
TRAIN_COLUMNS = ["iteration", "consumed_samples", "lr", "loss", "lm_loss", "lbl_loss", "zloss", "grad_norm", "elapsed_s"]
VALID_COLUMNS = ["iteration", "consumed_samples", "valid_loss", "valid_ppl"]


@dataclasses.dataclass
class TrainConfig:
    """What to train on, how long, and where to write.

    data_path: prefix of the `.bin`/`.idx` pair. split: train/valid/test weights ('969,30,1').
    micro_batch_size: samples per forward per process. global_batch_size: samples per step over
    all processes (a multiple of micro_batch_size · world size; the rest is gradient accumulation).
    lr_warmup_iters (or lr_warmup_fraction of lr_decay_iters), lr_decay_iters (default
    train_iters), lr_decay_style 'cosine' | 'linear' | 'constant', down to min_lr.
    clip_grad: max global grad norm (0: no clipping). eval_interval / eval_iters: validate every so
    many iterations on eval_iters global batches. save_interval: checkpoint every so many
    iterations (and at the end). exit_iteration: stop (with a checkpoint) after this iteration,
    keeping the schedule of train_iters. precision: 'auto' (bf16 autocast on GPU, fp32 on CPU),
    'bf16' or 'fp32'. device: 'auto', 'cpu' or 'cuda'. expert_parallel_size: ranks that split the
    experts of every MoE layer among them (1: none; see the module docstring).
    """

    data_path: Optional[str] = None
    split: str = "969,30,1"
    seed: int = 1234
    tokenizer: str = "byte"
    tokenizer_name_or_path: Optional[str] = None
    make_vocab_size_divisible_by: int = 128
    micro_batch_size: int = 8
    global_batch_size: Optional[int] = None
    train_iters: int = 1000
    lr: float = 6e-4
    min_lr: float = 6e-5
    lr_warmup_iters: Optional[int] = None
    lr_warmup_fraction: float = 0.01
    lr_decay_iters: Optional[int] = None
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    eval_interval: int = 100
    eval_iters: int = 10
    log_interval: int = 10
    save_interval: Optional[int] = None
    save: Optional[str] = None
    load: Optional[str] = None
    exit_iteration: Optional[int] = None
    precision: str = "auto"
    device: str = "auto"
    progress: bool = True
    tensorboard: bool = True
    plot: bool = True
    name: Optional[str] = None
    expert_parallel_size: int = 1

    def __post_init__(self):
        if isinstance(self.expert_parallel_size, bool) or not isinstance(self.expert_parallel_size, int):
            raise TypeError(f"expert_parallel_size: expected an int, got {type(self.expert_parallel_size).__name__}")
        for k in ("micro_batch_size", "train_iters", "eval_interval", "log_interval", "make_vocab_size_divisible_by",
                  "expert_parallel_size"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k}: expected >= 1, got {getattr(self, k)}")
        if self.eval_iters < 0:
            raise ValueError(f"eval_iters: expected >= 0, got {self.eval_iters}")
        if self.lr_decay_style not in ("cosine", "linear", "constant"):
            raise ValueError(f"lr_decay_style: expected 'cosine', 'linear' or 'constant', got {self.lr_decay_style!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision: expected 'auto', 'bf16' or 'fp32', got {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device: expected 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr: expected a value in [0, lr={self.lr}], got {self.min_lr}")


# --------------------------------------------------------------------------------------------
# Command line


def _arguments_fields():
    from megablocks.layers.arguments import Arguments

    hints = typing.get_type_hints(Arguments)
    skip = set(SHARED_FIELDS) | set(MODEL_SET_FIELDS) | {"expert_parallel_group", "fc_cls", "fc_kwargs", "kernel_policy"}
    return [(f, hints[f.name]) for f in dataclasses.fields(Arguments) if f.name not in skip]


def _number(text: str):
    v = float(text)
    return int(v) if v.is_integer() and "." not in text and "e" not in text.lower() else v


def _optional(parse):
    def f(text: str):
        return None if text.lower() == "none" else parse(text)

    f.__name__ = getattr(parse, "__name__", "value")
    return f


def _parser_for(tp):
    """(argparse type, is_bool) for a dataclass field annotation."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    optional = origin is typing.Union and type(None) in args
    inner = [a for a in args if a is not type(None)] if origin is typing.Union else [tp]
    if inner == [bool]:
        return None, True
    if all(a in (int, float) for a in inner):
        parse = int if inner == [int] else (float if inner == [float] else _number)
    elif inner == [str]:
        parse = str
    else:
        return "skip", False
    return (_optional(parse) if optional else parse), False


def _add_dataclass_args(group, fields, skip=()) -> List[str]:
    names = []
    for f, tp in fields:
        if f.name in skip:
            continue
        parse, is_bool = _parser_for(tp)
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = getattr(default, "__name__", default)
        if is_bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=f"(default {shown})")
        elif parse == "skip":
            continue
        else:
            group.add_argument(flag, dest=f.name, type=parse, default=None, metavar=f.name.upper(),
                               help=f"(default {shown})")
        names.append(f.name)
    return names


def build_parser():
    """The argument parser and the option names of each group (train, model, moe)."""
    p = argparse.ArgumentParser(
        prog="python -m exp.train", description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--config", default=None, help="a JSON file of option values")
    g_train = p.add_argument_group("training")
    train_names = _add_dataclass_args(
        g_train, [(f, typing.get_type_hints(TrainConfig)[f.name]) for f in dataclasses.fields(TrainConfig)]
    )
    g_model = p.add_argument_group("model")
    hints = typing.get_type_hints(GPTConfig)
    model_names = _add_dataclass_args(g_model, [(f, hints[f.name]) for f in dataclasses.fields(GPTConfig)], skip=("moe",))
    g_moe = p.add_argument_group("MoE layers (megablocks.layers.arguments.Arguments)")
    moe_names = _add_dataclass_args(g_moe, _arguments_fields())
    g_moe.add_argument("--fc-cls", dest="fc_cls", default=None, help="dotted path of the shared expert's linear class")
    g_moe.add_argument("--fc-kwargs", dest="fc_kwargs", type=json.loads, default=None, help="JSON dict")
    g_moe.add_argument("--kernel-policy", dest="kernel_policy", type=json.loads, default=None,
                       help='JSON dict of megablocks.policy.KernelPolicy fields, e.g. \'{"fused_gather": false}\'')
    moe_names += ["fc_cls", "fc_kwargs", "kernel_policy"]
    return p, {"train": train_names, "model": model_names, "moe": moe_names}


def _import_dotted(path: str):
    import importlib

    module, _, attr = path.rpartition(".")
    if not module:
        raise ValueError(f"fc_cls: expected a dotted path like 'torch.nn.Linear', got {path!r}")
    return getattr(importlib.import_module(module), attr)


def parse_config(argv: Optional[Sequence[str]] = None):
    """(TrainConfig, GPTConfig) from `--config FILE` (if given) overridden by the other options."""
    parser, groups = build_parser()
    first, _ = parser.parse_known_args(argv)
    values: Dict[str, Any] = {}
    if first.config:
        with open(first.config) as f:
            values = json.load(f)
        known = set(groups["train"]) | set(groups["model"]) | set(groups["moe"])
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{first.config}: unknown options {unknown}")
        if "name" not in values:
            values["name"] = os.path.splitext(os.path.basename(first.config))[0]
    ns = parser.parse_args(argv)
    for k, v in vars(ns).items():
        if v is not None and k != "config":
            values[k] = v
    return configs_from_dict(values, groups)


def configs_from_dict(values: Dict[str, Any], groups=None):
    """(TrainConfig, GPTConfig) from flat option values (config-file keys)."""
    if groups is None:
        groups = build_parser()[1]
    train = {k: v for k, v in values.items() if k in groups["train"]}
    model = {k: v for k, v in values.items() if k in groups["model"]}
    moe = {k: v for k, v in values.items() if k in groups["moe"]}
    unknown = sorted(set(values) - set(train) - set(model) - set(moe))
    if unknown:
        raise ValueError(f"unknown options {unknown}")
    if "fc_cls" in moe and isinstance(moe["fc_cls"], str):
        moe["fc_cls"] = _import_dotted(moe["fc_cls"])
    tcfg = TrainConfig(**train)
    if model.get("vocab_size") is None:
        model["vocab_size"] = padded_vocab_size(tcfg)
    return tcfg, GPTConfig(moe=moe, **model)


# --------------------------------------------------------------------------------------------
# Training


def lr_at(cfg: TrainConfig, iteration: int) -> float:
    """Learning rate of (0-based) iteration: linear warmup, then decay to min_lr, then min_lr."""
    decay_iters = cfg.lr_decay_iters or cfg.train_iters
    warmup = cfg.lr_warmup_iters if cfg.lr_warmup_iters is not None else int(cfg.lr_warmup_fraction * decay_iters)
    step = iteration + 1
    if warmup > 0 and step <= warmup:
        return cfg.lr * step / warmup
    if cfg.lr_decay_style == "constant":
        return cfg.lr
    if step > decay_iters:
        return cfg.min_lr
    ratio = (step - warmup) / max(1, decay_iters - warmup)
    if cfg.lr_decay_style == "linear":
        coeff = 1.0 - ratio
    else:
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)


class _Dist:
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
        # Expert parallelism (set by `_expert_parallel`): N, this rank's index in its group, groups.
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

    def close(self):
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _resolve_device(cfg: TrainConfig, local_rank: int) -> torch.device:
    kind = cfg.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device: 'cuda' asked for, but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


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


def _ckpt_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _model_files(d: _Dist):
    """(model, optimizer) file names of this rank's checkpoint part."""
    if d.ep_size > 1:
        return f"model_ep{d.ep_rank}.pt", f"optimizer_ep{d.ep_rank}.pt"
    return "model.pt", "optimizer.pt"


def save_checkpoint(root, iteration, model, optimizer, tcfg, mcfg, device, d: _Dist) -> str:
    path = _ckpt_dir(root, iteration)
    os.makedirs(path, exist_ok=True)
    torch.save(_rng_state(device), os.path.join(path, f"rng_rank{d.rank}.pt"))
    # Rank k < N holds expert shard k (the other expert-parallel groups hold copies of the same).
    if d.rank < d.ep_size:
        model_file, optimizer_file = _model_files(d)
        torch.save(model.state_dict(), os.path.join(path, model_file))
        torch.save({"optimizer": optimizer.state_dict(), "iteration": iteration}, os.path.join(path, optimizer_file))
    if d.rank == 0:
        meta = {
            "iteration": iteration,
            "consumed_samples": iteration * _global_batch(tcfg, d.world),
            "global_batch_size": _global_batch(tcfg, d.world),
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
        with open(os.path.join(path, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
    d.barrier()
    if d.rank == 0:
        tmp = os.path.join(root, LATEST + ".tmp")
        with open(tmp, "w") as f:
            f.write(str(iteration))
        os.replace(tmp, os.path.join(root, LATEST))
    d.barrier()
    return path


def load_checkpoint(root, iteration, model, optimizer, tcfg, device, d: _Dist) -> Dict[str, Any]:
    path = _ckpt_dir(root, iteration)
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    if meta["world_size"] != d.world:
        raise ValueError(
            f"{path}: saved with world size {meta['world_size']}, resumed with {d.world}; the data "
            "order and RNG streams continue exactly only at the same world size"
        )
    if meta["global_batch_size"] != _global_batch(tcfg, d.world):
        raise ValueError(
            f"{path}: saved with global batch size {meta['global_batch_size']}, resumed with "
            f"{_global_batch(tcfg, d.world)}; the data position continues only at the same batch size"
        )
    saved_ep = meta.get("expert_parallel", {}).get("size", 1)
    if saved_ep != d.ep_size:
        raise ValueError(
            f"{path}: saved with expert_parallel_size {saved_ep}, resumed with {d.ep_size}; the expert shards "
            "are stored per expert-parallel rank"
        )
    model_file, optimizer_file = _model_files(d)
    try:
        model.load_state_dict(torch.load(os.path.join(path, model_file), map_location=device, weights_only=True))
    except RuntimeError as e:
        raise ValueError(f"{path}/{model_file} does not fit the configured model: {e}") from None
    opt = torch.load(os.path.join(path, optimizer_file), map_location=device, weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    _set_rng_state(torch.load(os.path.join(path, f"rng_rank{d.rank}.pt"), weights_only=False), device)
    return meta


def _expert_parameter_names(model: torch.nn.Module) -> List[str]:
    from megablocks.layers import mpu

    return [n for n, p in model.named_parameters() if mpu.param_is_expert_model_parallel(p)]


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


def _expert_parallel(tcfg: TrainConfig, mcfg: GPTConfig, d: _Dist) -> GPTConfig:
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


def _num_parameters(model: GPT, d: _Dist, active: bool = False) -> int:
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


def _global_batch(cfg: TrainConfig, world: int) -> int:
    return cfg.global_batch_size or cfg.micro_batch_size * world


def _batch(dataset, indices, device):
    samples = [dataset[int(i)] for i in indices]
    tokens = torch.stack([s["tokens"] for s in samples]).to(device, non_blocking=True)
    labels = torch.stack([s["labels"] for s in samples]).to(device, non_blocking=True)
    return tokens, labels


class _CSV:
    """Appends rows to a CSV; on resume keeps only rows up to the checkpoint's iteration."""

    def __init__(self, path: str, columns: List[str], resume_iteration: Optional[int]):
        self.path, self.columns = path, columns
        rows = []
        if resume_iteration is not None and os.path.isfile(path):
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["iteration"]) <= resume_iteration]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, columns)
            w.writeheader()
            w.writerows(rows)

    def write(self, row: Dict[str, Any]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow(row)


def read_csv(path: str) -> List[Dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def _optimizer(model: torch.nn.Module, cfg: TrainConfig, fused: bool):
    """AdamW with weight decay on matrices only (biases and norms excluded, as Megatron)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, **kwargs)


@torch.no_grad()
def evaluate(model, dataset, cfg: TrainConfig, d: _Dist, device, autocast) -> float:
    """Mean loss over the first eval_iters global batches of `dataset` (the same every time)."""
    was_training = model.training
    model.eval()
    gbs = _global_batch(cfg, d.world)
    per_rank = gbs // d.world
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for it in range(cfg.eval_iters):
        base = it * gbs + d.rank * per_rank
        for m in range(0, per_rank, cfg.micro_batch_size):
            idx = range(base + m, base + min(m + cfg.micro_batch_size, per_rank))
            tokens, labels = _batch(dataset, idx, device)
            with autocast():
                out = model(tokens, labels)
            total[0] += out["lm_loss"].double() * len(idx)
            total[1] += len(idx)
    if d.enabled:
        dist.all_reduce(total)
    model.train(was_training)
    return float(total[0] / total[1])


def padded_vocab_size(tcfg: TrainConfig) -> int:
    """The tokenizer's vocabulary rounded up to a multiple of make_vocab_size_divisible_by."""
    from exp.data.preprocess import build_tokenizer

    tok = build_tokenizer(tcfg.tokenizer, tcfg.tokenizer_name_or_path)
    m = tcfg.make_vocab_size_divisible_by
    return ((tok.vocab_size + m - 1) // m) * m


def train(tcfg: TrainConfig, mcfg: GPTConfig) -> Dict[str, Any]:
    """Runs (or resumes) training; returns {'train': rows, 'valid': rows, 'save': dir, ...}."""
    if not tcfg.data_path:
        raise ValueError("data_path: expected the prefix of a .bin/.idx pair, got none")
    device = _resolve_device(tcfg, int(os.environ.get("LOCAL_RANK", "0")))
    d = _Dist(device.type)
    try:
        return _train(tcfg, mcfg, device, d)
    finally:
        d.close()


def _train(tcfg: TrainConfig, mcfg: GPTConfig, device: torch.device, d: _Dist) -> Dict[str, Any]:
    gbs = _global_batch(tcfg, d.world)
    if gbs % (tcfg.micro_batch_size * d.world):
        raise ValueError(
            f"global_batch_size: expected a multiple of micro_batch_size · world size = "
            f"{tcfg.micro_batch_size} · {d.world}, got {gbs}"
        )
    accum = gbs // (tcfg.micro_batch_size * d.world)
    save = tcfg.save or os.path.join("runs", tcfg.name or mcfg.mlp)
    load = tcfg.load or save
    if d.rank == 0:
        os.makedirs(save, exist_ok=True)
    d.barrier()

    use_bf16 = tcfg.precision == "bf16" or (tcfg.precision == "auto" and device.type == "cuda")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    model_cfg = _expert_parallel(tcfg, mcfg, d)
    torch.manual_seed(tcfg.seed)  # identical initial weights on every rank (expert shards: their slice)
    model = GPT(model_cfg, device=device)
    optimizer = _optimizer(model, tcfg, fused=device.type == "cuda")
    train_ds, valid_ds, _ = build_datasets(
        tcfg.data_path, mcfg.seq_length, tcfg.split, (tcfg.train_iters * gbs, tcfg.eval_iters * gbs, 0),
        tcfg.seed, mcfg.vocab_size,
    )

    start = latest_iteration(load)
    if start is not None:
        load_checkpoint(load, start, model, optimizer, tcfg, device, d)
    else:
        start = 0
        # Per-rank streams for dropout and router jitter, after the shared initialisation.
        torch.manual_seed(tcfg.seed + 1 + d.rank)
        random.seed(tcfg.seed + 1 + d.rank)
        np.random.seed(tcfg.seed + 1 + d.rank)
    resumed = start if start else None

    ddp, experts = model, None
    if d.enabled:
        ids = [device.index] if device.type == "cuda" else None
        if d.ep_size > 1:
            # DDP averages the shared parameters over all ranks (overlapped with the backward); the
            # expert shards are averaged over the ranks holding the same shard, after the backward.
            from megablocks.layers.data_parallel import DistributedGroupedDataParallel, ignore_expert_parameters_in_ddp

            ignore_expert_parameters_in_ddp(model)
            experts = DistributedGroupedDataParallel(
                model, expert_data_parallel_group=d.edp_group if d.world > d.ep_size else None, reduce_shared=False,
            )
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    is_main = d.rank == 0
    train_log = _CSV(os.path.join(save, "train.csv"), TRAIN_COLUMNS, resumed) if is_main else None
    valid_log = _CSV(os.path.join(save, "valid.csv"), VALID_COLUMNS, resumed) if is_main else None
    tb = _tensorboard(save) if is_main and tcfg.tensorboard else None
    bar = _progress(tcfg, start) if is_main and tcfg.progress else None
    if is_main:
        n, na = _num_parameters(model, d), _num_parameters(model, d, active=True)
        ep = f" (expert parallel {d.ep_size})" if d.ep_size > 1 else ""
        _print(
            f"{mcfg.mlp} GPT: {n / 1e6:.2f}M parameters ({na / 1e6:.2f}M active), {d.world} process(es){ep} on "
            f"{device.type}, {'bf16 autocast' if use_bf16 else 'fp32'}, global batch {gbs} "
            f"({accum} accumulation step(s)), {len(train_ds)} train samples of {mcfg.seq_length} tokens"
            + (f", resuming at iteration {start}" if start else ""), bar,
        )
        if valid_ds is None and tcfg.eval_iters:
            _print(f"no validation: the split {tcfg.split!r} leaves no validation documents", bar)

    per_rank = gbs // d.world
    last_iteration = tcfg.train_iters if tcfg.exit_iteration is None else min(tcfg.train_iters, tcfg.exit_iteration)
    t0 = time.time()
    valid_loss = None
    ddp.train()
    for it in range(start, last_iteration):
        lr = lr_at(tcfg, it)
        for g in optimizer.param_groups:
            g["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(4, dtype=torch.float64, device=device)
        for m in range(accum):
            base = it * gbs + d.rank * per_rank + m * tcfg.micro_batch_size
            tokens, labels = _batch(train_ds, range(base, base + tcfg.micro_batch_size), device)
            sync = m == accum - 1 or not d.enabled
            ctx = contextlib.nullcontext() if sync else ddp.no_sync()
            with ctx:
                with autocast():
                    out = ddp(tokens, labels)
                (out["loss"] / accum).backward()
            sums += torch.stack([out[k].detach().double() for k in ("loss", "lm_loss", "lbl_loss", "zloss")])
        max_norm = tcfg.clip_grad if tcfg.clip_grad > 0 else float("inf")
        if experts is not None:
            experts.allreduce_gradients()
            grad_norm = experts.clip_grad_norm_(max_norm)  # the norm of the whole, sharded model
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        sums = d.mean(sums / accum)
        loss, lm_loss, lbl_loss, zloss = (float(x) for x in sums)
        if not math.isfinite(loss):
            raise FloatingPointError(f"iteration {it + 1}: loss is {loss}; lower the learning rate or check the data")
        done = it + 1
        if is_main:
            row = dict(iteration=done, consumed_samples=done * gbs, lr=lr, loss=loss, lm_loss=lm_loss,
                       lbl_loss=lbl_loss, zloss=zloss, grad_norm=float(grad_norm), elapsed_s=round(time.time() - t0, 3))
            train_log.write(row)
            if tb is not None:
                for k in ("loss", "lm_loss", "lbl_loss", "zloss", "lr", "grad_norm"):
                    tb.add_scalar(f"train/{k}", row[k], done)
            if bar is not None:
                bar.update(1)
                if done % tcfg.log_interval == 0:
                    bar.set_postfix(loss=f"{lm_loss:.4f}", lr=f"{lr:.2e}", valid=f"{valid_loss:.4f}" if valid_loss else "-")
            elif done % tcfg.log_interval == 0:
                _print(f"iteration {done}/{tcfg.train_iters} lm_loss {lm_loss:.4f} lbl {lbl_loss:.4f} lr {lr:.3e} "
                       f"grad_norm {float(grad_norm):.3f}", None)
        if valid_ds is not None and (done % tcfg.eval_interval == 0 or done == tcfg.train_iters):
            valid_loss = evaluate(ddp, valid_ds, tcfg, d, device, autocast)
            if is_main:
                valid_log.write(dict(iteration=done, consumed_samples=done * gbs, valid_loss=valid_loss,
                                     valid_ppl=math.exp(min(valid_loss, 50.0))))
                if tb is not None:
                    tb.add_scalar("valid/loss", valid_loss, done)
                _print(f"iteration {done}: validation loss {valid_loss:.4f}", bar)
        if (tcfg.save_interval and done % tcfg.save_interval == 0) or done == last_iteration:
            save_checkpoint(save, done, model, optimizer, tcfg, mcfg, device, d)

    if bar is not None:
        bar.close()
    if tb is not None:
        tb.close()
    result = {"save": save, "start_iteration": start, "iterations": last_iteration,
              "parameters": _num_parameters(model, d), "active_parameters": _num_parameters(model, d, active=True)}
    if is_main:
        result["train"] = read_csv(os.path.join(save, "train.csv"))
        result["valid"] = read_csv(os.path.join(save, "valid.csv"))
        if tcfg.plot:
            from exp.plot import plot_runs

            png = plot_runs({tcfg.name or mcfg.mlp: save}, os.path.join(save, "loss.png"))
            if png:
                result["plot"] = png
    return result


def _print(msg: str, bar) -> None:
    if bar is not None:
        bar.write(msg)
    else:
        print(msg, flush=True)


def _progress(cfg: TrainConfig, start: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=cfg.train_iters, initial=start, desc=cfg.name or "train", unit="it", dynamic_ncols=True)


def _tensorboard(save: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(os.path.join(save, "tensorboard"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        tcfg, mcfg = parse_config(argv)
    except (ValueError, TypeError, FileNotFoundError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = train(tcfg, mcfg)
    if result.get("valid"):
        print(f"final validation loss {result['valid'][-1]['valid_loss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
