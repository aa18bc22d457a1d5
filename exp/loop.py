"""The training loop: setup, one step, evaluation, and the loop over steps.

bf16 autocast on GPUs (float32 on CPU), AdamW, linear warmup then cosine (or linear, or constant)
decay to `min_lr`, gradient clipping, the MoE load-balancing and z losses added to the loss,
periodic validation on a fixed set of held-out samples. Processes and expert parallelism are
`exp.parallel`'s, checkpoints `exp.checkpoint`'s, outputs `exp.log`'s; the options
`exp.config`'s. `exp.train` is the command line. Tested end to end by tests/exp/test_trainer.py
and tests/exp/test_trainer_ep.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import random
import time
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from exp.checkpoint import latest_iteration, load_checkpoint, save_checkpoint
from exp.config import TrainConfig, global_batch_size, resolve_precision
from exp.data.gpt_dataset import build_datasets
from exp.log import RunLog, read_csv
from exp.model import GPT, GPTConfig
from exp.parallel import (Dist, apply_fsdp, clip_sharded_grad_norm_, num_parameters, resolve_device,
                          setup_expert_parallel, wrap_data_parallel)
from exp.plot import plot_runs
from exp.throughput import PhaseTimer, flops_per_token, peak_tflops, throughput
from megablocks.layers.router import update_expert_biases
from megablocks.optim import MainWeightsAdamW

LOSSES = ("loss", "lm_loss", "lbl_loss", "zloss")


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


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, fused: bool) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (biases and norms excluded, as Megatron): torch's
    (fused on CUDA), or with precision 'bf16-params' `MainWeightsAdamW` (fp32 main weights)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    hyper = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    if cfg.precision == "bf16-params":
        return MainWeightsAdamW(groups, **hyper)
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, **hyper, **kwargs)


def _batch(dataset, indices, device):
    samples = [dataset[int(i)] for i in indices]
    tokens = torch.stack([s["tokens"] for s in samples]).to(device, non_blocking=True)
    labels = torch.stack([s["labels"] for s in samples]).to(device, non_blocking=True)
    return tokens, labels


@torch.no_grad()
def evaluate(model, dataset, cfg: TrainConfig, d: Dist, device, autocast) -> float:
    """Mean loss over the first eval_iters global batches of `dataset` (the same every time)."""
    was_training = model.training
    model.eval()
    gbs = global_batch_size(cfg, d.world)
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


# --------------------------------------------------------------------------------------------
# Setup


@dataclasses.dataclass
class Run:
    """What one process of a run holds from setup to the end.

    `model` is this rank's GPT (its expert shard with expert parallelism), `ddp` the module the
    step calls (the model itself in one process), `experts` the expert shards' gradient reducer
    (None without expert parallelism). Iterations [start, last_iteration) are this run's.
    """

    tcfg: TrainConfig
    mcfg: GPTConfig
    device: torch.device
    d: Dist
    model: GPT
    ddp: torch.nn.Module
    experts: Optional[Any]
    optimizer: torch.optim.Optimizer
    train_ds: Any
    valid_ds: Any
    save: str
    start: int
    last_iteration: int
    global_batch: int
    accum: int
    use_bf16: bool
    log: RunLog
    flops_per_token: float = 0.0
    peak_tflops: Optional[float] = None
    timer: Optional[PhaseTimer] = None
    num_parameters: Tuple[int, int] = (0, 0)  # (all, active), counted before any sharding

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16)


def _batch_sizes(tcfg: TrainConfig, d: Dist) -> Tuple[int, int]:
    """(global batch, accumulation steps per iteration)."""
    gbs = global_batch_size(tcfg, d.world)
    if gbs % (tcfg.micro_batch_size * d.world):
        raise ValueError(
            f"global_batch_size: expected a multiple of micro_batch_size · world size = "
            f"{tcfg.micro_batch_size} · {d.world}, got {gbs}"
        )
    return gbs, gbs // (tcfg.micro_batch_size * d.world)


def _resume_or_seed(load: str, model, optimizer, tcfg: TrainConfig, device, d: Dist) -> int:
    """The first iteration: the newest checkpoint's in `load` (loaded), else 0 (RNGs seeded per rank)."""
    start = latest_iteration(load)
    if start is not None:
        load_checkpoint(load, start, model, optimizer, tcfg, device, d)
        return start
    # Per-rank streams for dropout and router jitter, after the shared initialisation.
    torch.manual_seed(tcfg.seed + 1 + d.rank)
    random.seed(tcfg.seed + 1 + d.rank)
    np.random.seed(tcfg.seed + 1 + d.rank)
    return 0


def setup(tcfg: TrainConfig, mcfg: GPTConfig, device: torch.device, d: Dist) -> Run:
    """Builds the model, optimizer, data, parallel wrappers and outputs; resumes from a checkpoint."""
    tcfg = dataclasses.replace(tcfg, precision=resolve_precision(tcfg.precision, device.type, d.world, tcfg.fsdp))
    gbs, accum = _batch_sizes(tcfg, d)
    save = tcfg.save or os.path.join("runs", tcfg.name or mcfg.mlp)
    if d.rank == 0:
        os.makedirs(save, exist_ok=True)
    d.barrier()
    model_cfg = setup_expert_parallel(tcfg, mcfg, d)
    torch.manual_seed(tcfg.seed)  # identical initial weights on every rank (expert shards: their slice)
    model = GPT(model_cfg, device=device)
    if tcfg.precision == "bf16-params":
        model.to(torch.bfloat16)  # the fp32 initial values become the optimizer's main weights
    counts = (num_parameters(model, d), num_parameters(model, d, active=True))  # before sharding
    if tcfg.fsdp:
        apply_fsdp(model, d, device)  # the optimizer holds the sharded parameters
    optimizer = build_optimizer(model, tcfg, fused=device.type == "cuda")
    train_ds, valid_ds, _ = build_datasets(
        tcfg.data_path, mcfg.seq_length, tcfg.split, (tcfg.train_iters * gbs, tcfg.eval_iters * gbs, 0),
        tcfg.seed, mcfg.vocab_size,
    )
    start = _resume_or_seed(tcfg.load or save, model, optimizer, tcfg, device, d)
    ddp, experts = (model, None) if tcfg.fsdp else wrap_data_parallel(model, d, device)
    log = RunLog(save, tcfg.train_iters, tcfg.log_interval, start, name=tcfg.name, progress=tcfg.progress,
                 tensorboard=tcfg.tensorboard, enabled=d.rank == 0)
    last = tcfg.train_iters if tcfg.exit_iteration is None else min(tcfg.train_iters, tcfg.exit_iteration)
    # Autocast for 'bf16'; 'bf16-params' computes in its bf16 parameters ('auto' is one of them by now).
    use_bf16 = tcfg.precision == "bf16"
    run = Run(tcfg, mcfg, device, d, model, ddp, experts, optimizer, train_ds, valid_ds, save, start, last, gbs,
              accum, use_bf16, log, num_parameters=counts)
    position = model.pos.weight.numel() if hasattr(model, "pos") else 0  # global size under FSDP too
    run.flops_per_token = flops_per_token(counts[1], position, mcfg.num_layers, mcfg.hidden_size, mcfg.seq_length)
    run.peak_tflops = peak_tflops(device, tcfg.peak_tflops)
    run.timer = PhaseTimer(device, tcfg.phase_times)
    if tcfg.grad_accumulation_fusion and _fp32_accumulation(run):
        optimizer.fuse_grad_accumulation()
    _announce(run)
    return run


def _precision_text(run: Run) -> str:
    if run.tcfg.precision == "bf16-params":
        return "bf16 parameters with fp32 main weights"
    return "bf16 autocast" if run.use_bf16 else "fp32"


def _announce(run: Run) -> None:
    if not run.log.enabled:
        return
    tcfg, d = run.tcfg, run.d
    n, na = run.num_parameters
    ep = f" (expert parallel {d.ep_size})" if d.ep_size > 1 else ""
    ep += ", FSDP" if tcfg.fsdp else ""
    run.log.message(
        f"{run.mcfg.mlp} GPT: {n / 1e6:.2f}M parameters ({na / 1e6:.2f}M active), {d.world} process(es){ep} on "
        f"{run.device.type}, {_precision_text(run)}, global batch {run.global_batch} "
        f"({run.accum} accumulation step(s)), {len(run.train_ds)} train samples of {run.mcfg.seq_length} tokens"
        + (f", resuming at iteration {run.start}" if run.start else "")
    )
    peak = f", peak {run.peak_tflops:g} TFLOP/s for MFU" if run.peak_tflops else ", no peak known (MFU blank)"
    run.log.message(f"model FLOPs per token {run.flops_per_token / 1e9:.4g} GFLOP (6·N active + 12·L·H·S){peak}")
    if run.valid_ds is None and tcfg.eval_iters:
        run.log.message(f"no validation: the split {tcfg.split!r} leaves no validation documents")


# --------------------------------------------------------------------------------------------
# Steps


def _fp32_accumulation(run: Run) -> bool:
    """Whether micro-batches' gradients are summed in fp32 by the optimizer (one process,
    `MainWeightsAdamW`, several micro-batches a step)."""
    return isinstance(run.optimizer, MainWeightsAdamW) and run.accum > 1 and not run.d.enabled


def train_step(run: Run, it: int) -> Dict[str, float]:
    """One optimizer step of (0-based) iteration `it` over this rank's part of the global batch.

    Returns the learning rate, the losses averaged over all ranks, and the gradient norm (before
    clipping).

    Raises:
        FloatingPointError: the loss is not finite.
    """
    tcfg, d = run.tcfg, run.d
    lr = lr_at(tcfg, it)
    for g in run.optimizer.param_groups:
        g["lr"] = lr
    run.optimizer.zero_grad(set_to_none=True)
    # fp32 accumulation over micro-batches in one process; with DDP the bf16 .grad accumulates
    # (its reducer all-reduces the .grad it holds at the last micro-batch).
    main_grads = _fp32_accumulation(run)
    timer = run.timer or PhaseTimer(run.device, False)
    timer.start()
    sums = torch.zeros(len(LOSSES), dtype=torch.float64, device=run.device)
    per_rank = run.global_batch // d.world
    for m in range(run.accum):
        base = it * run.global_batch + d.rank * per_rank + m * tcfg.micro_batch_size
        tokens, labels = _batch(run.train_ds, range(base, base + tcfg.micro_batch_size), run.device)
        sync = m == run.accum - 1 or not d.enabled
        if tcfg.fsdp:  # reduce-scatter the gradients at the last micro-batch only
            run.model.set_requires_gradient_sync(sync)
        with contextlib.nullcontext() if sync or tcfg.fsdp else run.ddp.no_sync():
            with run.autocast():
                out = run.ddp(tokens, labels)
            timer.lap("fwd")
            (out["loss"] / run.accum).backward()
            if main_grads:
                run.optimizer.accumulate_grads()
            timer.lap("bwd")
        sums += torch.stack([out[k].detach().double() for k in LOSSES])
    max_norm = tcfg.clip_grad if tcfg.clip_grad > 0 else float("inf")
    if tcfg.fsdp:
        grad_norm = clip_sharded_grad_norm_(run.model.parameters(), max_norm, d)
    elif run.experts is not None:
        run.experts.allreduce_gradients()
        grad_norm = run.experts.clip_grad_norm_(max_norm)  # the norm of the whole, sharded model
    elif isinstance(run.optimizer, MainWeightsAdamW):
        grad_norm = run.optimizer.clip_grad_norm_(max_norm)  # applied inside the step: one read
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), max_norm)
    timer.lap("clip")
    run.optimizer.step()
    # Aux-loss-free balancing: each router's expert bias from this step's counts over all ranks.
    update_expert_biases(run.model, group=dist.group.WORLD if d.enabled else None)
    timer.lap("optim")
    losses = dict(zip(LOSSES, (float(x) for x in d.mean(sums / run.accum))))
    if not math.isfinite(losses["loss"]):
        raise FloatingPointError(
            f"iteration {it + 1}: loss is {losses['loss']}; lower the learning rate or check the data"
        )
    return dict(lr=lr, **losses, grad_norm=float(grad_norm), **timer.columns())


def _loop(run: Run) -> None:
    tcfg, gbs = run.tcfg, run.global_batch
    t0 = time.time()
    train_s = run.log.resumed_train_s  # the steps' wall time: evaluations and checkpoints left out
    run.ddp.train()
    tokens_per_step = gbs * run.mcfg.seq_length
    for it in range(run.start, run.last_iteration):
        step_t0 = time.perf_counter()
        stats = train_step(run, it)  # ends on host reads of the losses: the step's work is done
        step_s = time.perf_counter() - step_t0
        train_s += step_s
        speed = throughput(step_s, tokens_per_step, run.flops_per_token, run.d.world, run.peak_tflops)
        done = it + 1
        run.log.train_step(dict(iteration=done, consumed_samples=done * gbs, **stats,
                                elapsed_s=round(time.time() - t0, 3), train_s=round(train_s, 3), **speed))
        out_of_time = tcfg.exit_duration_s is not None and run.d.any_true(train_s >= tcfg.exit_duration_s)
        if out_of_time and done < run.last_iteration:
            run.log.message(f"iteration {done}: {train_s:.1f} s of training reached exit_duration_s "
                            f"{tcfg.exit_duration_s:g}; stopping")
            run.last_iteration = done
        if run.valid_ds is not None and (done % tcfg.eval_interval == 0 or done == tcfg.train_iters
                                         or (out_of_time and done == run.last_iteration)):
            valid_loss = evaluate(run.ddp, run.valid_ds, tcfg, run.d, run.device, run.autocast)
            run.log.validation(done, done * gbs, valid_loss, train_s=round(train_s, 3))
        if tcfg.checkpoint and ((tcfg.save_interval and done % tcfg.save_interval == 0) or done == run.last_iteration):
            save_checkpoint(run.save, done, run.model, run.optimizer, tcfg, run.mcfg, run.device, run.d)
        if done == run.last_iteration:
            break


def _result(run: Run) -> Dict[str, Any]:
    result = {"save": run.save, "start_iteration": run.start, "iterations": run.last_iteration,
              "parameters": num_parameters(run.model, run.d),
              "active_parameters": num_parameters(run.model, run.d, active=True)}
    if run.log.enabled:
        result["train"] = read_csv(os.path.join(run.save, "train.csv"))
        result["valid"] = read_csv(os.path.join(run.save, "valid.csv"))
        if run.tcfg.plot:
            png = plot_runs({run.tcfg.name or run.mcfg.mlp: run.save}, os.path.join(run.save, "loss.png"))
            if png:
                result["plot"] = png
    return result


def train(tcfg: TrainConfig, mcfg: GPTConfig) -> Dict[str, Any]:
    """Runs (or resumes) training.

    Returns {'save': run directory, 'start_iteration', 'iterations' (the last one run),
    'parameters', 'active_parameters'}, and on rank 0 also 'train' and 'valid' (the CSVs' rows)
    and 'plot' (the loss PNG, when plotted).

    Raises:
        ValueError: no data_path, a global batch that the processes' micro-batches do not divide,
            a bad expert-parallel setup, or a checkpoint that does not fit this run.
    """
    if not tcfg.data_path:
        raise ValueError("data_path: expected the prefix of a .bin/.idx pair, got none")
    device = resolve_device(tcfg, int(os.environ.get("LOCAL_RANK", "0")))
    d = Dist(device.type)
    run = None
    try:
        run = setup(tcfg, mcfg, device, d)
        try:
            _loop(run)
        finally:
            run.log.close()
        return _result(run)
    finally:
        # The model (DDP's reducer holds the process group) goes before the group is destroyed,
        # so that the group's last reference is dropped by destroy_process_group, whose binding
        # releases the GIL while gloo's worker threads are joined. Dropped by the reducer after
        # it, the group's destructor joined them holding the GIL, while a worker thread waited
        # for the GIL to free a finished collective's tensors: a hang at exit.
        run = None
        gc.collect()
        d.close()
