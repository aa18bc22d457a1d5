"""The options of a training run: `TrainConfig`, the command line, config files and named configs.

A run is described by a `TrainConfig` (data, schedule, outputs) and an `exp.model.GPTConfig`
(the model, its MoE layers' `Arguments` fields in `GPTConfig.moe`). Both come from flat option
values: the keys of a `--config` JSON file (option names with underscores), then the command line,
which wins. `--config` takes a path or the name of a file in `exp/configs/` (`dmoe_125m`).

Every field of `megablocks.layers.arguments.Arguments` is an option (`--moe-num-experts`,
`--moe-top-k`, ...), except those the model sets: see `exp.model.SHARED_FIELDS` /
`MODEL_SET_FIELDS`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import typing
from typing import Any, Dict, List, Optional, Sequence

from exp.model import MODEL_SET_FIELDS, SHARED_FIELDS, GPTConfig

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


PRECISIONS = ("auto", "bf16", "bf16-params", "fp32")


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
    iterations (and at the end); checkpoint False writes none at all (runs that only measure).
    exit_iteration: stop (with a checkpoint) after this iteration, keeping the schedule of
    train_iters. exit_duration_s: stop (with a validation and a checkpoint) after the first step
    that ends past this many seconds of training time (the `train_s` column:
    the steps' wall time in this process, evaluations and checkpoints left out), keeping the
    schedule of train_iters; runs compared at equal training time use it with
    lr_decay_style 'constant'. precision: 'auto' ('bf16-params' in one GPU process,
    measured the faster with the same loss curve; 'bf16' with several processes; fp32 on CPU),
    'bf16' (autocast: fp32 parameters cast to bf16 in every forward), 'bf16-params' (bf16
    parameters for compute, fp32 main weights and Adam states in `megablocks.optim.MainWeightsAdamW`,
    gradient accumulation over micro-batches in fp32: Megatron's scheme, no cast of the weights per
    forward) or 'fp32'; with several micro-batches a step in one process, grad_accumulation_fusion
    has the grouped experts' kernels add their weight gradients straight into the fp32
    accumulators (`MainWeightsAdamW.fuse_grad_accumulation`). device: 'auto', 'cpu' or 'cuda'. expert_parallel_size: ranks that split the
    experts of every MoE layer among them (1: none; see `exp.parallel`). fsdp: shard the
    parameters with torch's FSDP2 (`fully_shard`) instead of replicating them in DDP: shared
    parameters over all processes, expert shards over their expert-data-parallel ranks
    (`exp.parallel.apply_fsdp`; precision 'bf16' or 'fp32'). Every train.csv row
    carries the step's ms, tokens/s, model TFLOP/s per GPU and MFU (`exp.throughput`);
    phase_times adds the forward, backward, clipping and optimizer ms (synchronizing the device
    at each boundary). peak_tflops: the GPU's dense bf16 peak for MFU where its name does not
    give it.
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
    checkpoint: bool = True
    save: Optional[str] = None
    load: Optional[str] = None
    exit_iteration: Optional[int] = None
    exit_duration_s: Optional[float] = None
    precision: str = "auto"
    device: str = "auto"
    progress: bool = True
    tensorboard: bool = True
    plot: bool = True
    name: Optional[str] = None
    expert_parallel_size: int = 1
    fsdp: bool = False
    phase_times: bool = False
    peak_tflops: Optional[float] = None
    grad_accumulation_fusion: bool = True

    def __post_init__(self):
        if isinstance(self.expert_parallel_size, bool) or not isinstance(self.expert_parallel_size, int):
            raise TypeError(f"expert_parallel_size: expected an int, got {type(self.expert_parallel_size).__name__}")
        for k in ("micro_batch_size", "train_iters", "eval_interval", "log_interval", "make_vocab_size_divisible_by",
                  "expert_parallel_size"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k}: expected >= 1, got {getattr(self, k)}")
        if self.exit_duration_s is not None and not self.exit_duration_s > 0:
            raise ValueError(f"exit_duration_s: expected seconds > 0, got {self.exit_duration_s}")
        if self.eval_iters < 0:
            raise ValueError(f"eval_iters: expected >= 0, got {self.eval_iters}")
        if self.lr_decay_style not in ("cosine", "linear", "constant"):
            raise ValueError(f"lr_decay_style: expected 'cosine', 'linear' or 'constant', got {self.lr_decay_style!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {PRECISIONS}, got {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device: expected 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.fsdp and self.precision == "bf16-params":
            raise ValueError("precision: 'bf16-params' keeps its fp32 main weights outside the parameters, which "
                             "FSDP shards; with fsdp use 'bf16' (autocast) or 'fp32'")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr: expected a value in [0, lr={self.lr}], got {self.min_lr}")


def resolve_precision(precision: str, device_type: str, world: int, fsdp: bool = False) -> str:
    """What 'auto' means on this device ('cuda' or 'cpu') with `world` processes; other values
    as they are. One GPU process: 'bf16-params' (benchmarks/RESULTS.md, "The exp/ trainer": 9-47%
    more tokens/s than autocast, the same loss curve); several: 'bf16' autocast (its fp32
    gradients are what data and expert parallelism reduce), and with `fsdp`; CPU: 'fp32'."""
    if precision != "auto":
        return precision
    if device_type != "cuda":
        return "fp32"
    return "bf16-params" if world == 1 and not fsdp else "bf16"


def global_batch_size(cfg: TrainConfig, world: int) -> int:
    """Samples per step over all processes: global_batch_size, or one micro-batch per process."""
    return cfg.global_batch_size or cfg.micro_batch_size * world


def padded_vocab_size(tcfg: TrainConfig) -> int:
    """The tokenizer's vocabulary rounded up to a multiple of make_vocab_size_divisible_by."""
    from exp.data.preprocess import build_tokenizer

    tok = build_tokenizer(tcfg.tokenizer, tcfg.tokenizer_name_or_path)
    m = tcfg.make_vocab_size_divisible_by
    return ((tok.vocab_size + m - 1) // m) * m


# --------------------------------------------------------------------------------------------
# Named configs


def config_names(directory: str = CONFIG_DIR) -> List[str]:
    """The names of the configs in `directory`: its `.json` files without the suffix, sorted."""
    return sorted(n[:-5] for n in os.listdir(directory) if n.endswith(".json"))


def config_path(config: str, directory: str = CONFIG_DIR) -> str:
    """The JSON file `config` stands for: a path to a file, or the name of one in `directory`.

    A name is a file name without a directory, with or without `.json` (`dmoe_125m`); a file at
    that path wins over the name.

    Raises:
        FileNotFoundError: neither a file nor a name in `directory`; the message lists the names.
    """
    if os.path.isfile(config):
        return config
    if os.path.basename(config) == config:
        path = os.path.join(directory, config if config.endswith(".json") else config + ".json")
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"config: expected a JSON file or a name in {directory} ({', '.join(config_names(directory))}), "
        f"got {config!r}"
    )


# --------------------------------------------------------------------------------------------
# Command line


def _arguments_fields():
    from megablocks.layers.arguments import Arguments

    hints = typing.get_type_hints(Arguments)
    skip = set(SHARED_FIELDS) | set(MODEL_SET_FIELDS) | {"expert_parallel_group", "moe_aux_loss_group", "fc_cls",
                                                         "fc_kwargs", "kernel_policy"}
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
        prog="python -m exp.train", description="Train the GPT of `exp.model` on Megatron-format data.",
    )
    p.add_argument("--config", default=None,
                   help=f"a JSON file of option values, or the name of one in {CONFIG_DIR} (e.g. dmoe_125m)")
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
    module, _, attr = path.rpartition(".")
    if not module:
        raise ValueError(f"fc_cls: expected a dotted path like 'torch.nn.Linear', got {path!r}")
    return getattr(importlib.import_module(module), attr)


def parse_config(argv: Optional[Sequence[str]] = None):
    """(TrainConfig, GPTConfig) from `--config FILE|NAME` (if given) overridden by the other options.

    Raises:
        FileNotFoundError: `--config` is neither a file nor a name in `exp/configs/`.
        ValueError: the config file holds an unknown option, or a value is out of range.
    """
    parser, groups = build_parser()
    first, _ = parser.parse_known_args(argv)
    values: Dict[str, Any] = {}
    if first.config:
        path = config_path(first.config)
        with open(path) as f:
            values = json.load(f)
        known = set(groups["train"]) | set(groups["model"]) | set(groups["moe"])
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: unknown options {unknown}")
        if "name" not in values:
            values["name"] = os.path.splitext(os.path.basename(path))[0]
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
