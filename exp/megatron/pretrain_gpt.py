"""Pretrain a megatron-core GPT whose MLPs are megablocks dMoE layers (or megatron-core's own MoE).

    torchrun --nproc_per_node 8 exp/megatron/pretrain_gpt.py --config dmoe_46m \\
        --data-path data/pile_text_document --save runs/mcore_dmoe_46m

`--config` takes a JSON file or the name of one in `exp/megatron/configs/`; a config's `bf16`
key sets the precision unless `--bf16` / `--no-bf16` is given.

Everything but the MLP is megatron-core: GPTModel on the local layer spec (no Transformer
Engine needed), its GPTDataset over Megatron-format `.bin/.idx` data (`python -m
exp.data.preprocess` writes it), its DistributedDataParallel, optimizer (Adam, fp32 main weights
under bf16, gradient clipping over the whole model) and its no-pipelining forward-backward
schedule, which scales the MoE auxiliary losses for the micro-batches. `--moe-impl megablocks`
(default) puts `megablocks.integrations.megatron.MegablocksMLP` in every layer; `--moe-impl
megatron` builds megatron-core's own MoE layer (grouped GEMM with `--moe-grouped-gemm`) for
comparison. Expert parallelism: `--expert-model-parallel-size W` (W divides the world size and
the number of experts).

Every `--log-interval` steps rank 0 prints the step, the language-model loss, the load-balancing
loss, the learning rate and tokens/s (all ranks' tokens over the wall time of those steps); at
the end a JSON line `{"final": ...}` with the first/last losses and the mean tokens/s of the
steps after the first `--log-interval`; every `--eval-interval` steps (0: never) the validation
loss over `--eval-iters` batches. Checkpoints: per-rank `torch.save` of the model and
optimizer state under `--save` (megatron-core's distributed checkpointing is not used).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CONFIG_DIR = os.path.join(HERE, "configs")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DEFAULTS = {
    "seq_length": 1024, "vocab_size": 51200, "split": "969,30,1", "micro_batch_size": 8, "global_batch_size": 0,
    "lr": 6e-4, "min_lr": 6e-5, "lr_warmup_fraction": 0.01, "lr_decay_style": "cosine", "clip_grad": 1.0,
    "init_method_std": 0.02, "weight_decay": 0.01, "adam_beta1": 0.9, "adam_beta2": 0.999, "train_iters": 1000,
    "eval_interval": 0, "eval_iters": 10, "log_interval": 10, "save_interval": 0, "num_layers": 2,
    "hidden_size": 256, "num_attention_heads": 4, "ffn_hidden_size": 0, "moe_num_experts": 8, "moe_top_k": 1,
    "moe_loss_weight": 0.1, "seed": 1234,
}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="JSON of defaults (the keys below, with underscores, and bf16), or the name "
                                    f"of one in {CONFIG_DIR}; flags win")
    p.add_argument("--data-path", help="prefix of the .bin/.idx pair (omit with --mock-data)")
    p.add_argument("--mock-data", action="store_true", help="megatron-core's MockGPTDataset (benchmarks)")
    p.add_argument("--save", default=None)
    p.add_argument("--moe-impl", choices=["megablocks", "megatron"], default="megablocks")
    p.add_argument("--mlp-impl", choices=["sparse", "grouped"], default="sparse", help="megablocks dMoE path")
    p.add_argument("--moe-grouped-gemm", action="store_true", help="megatron-core MoE: grouped GEMM experts")
    p.add_argument("--expert-model-parallel-size", type=int, default=1)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 parameters and compute (default: the config's bf16, else fp32)")
    p.add_argument("--swiglu", action="store_true")
    p.add_argument("--cache-dir", default=None, help="where GPTDataset caches its indices")
    for key, value in DEFAULTS.items():
        kind = type(value) if value is not None else str
        p.add_argument("--" + key.replace("_", "-"), type=kind, default=None)
    args = p.parse_args(argv)
    merged = dict(DEFAULTS)
    from_file = {}
    if args.config:
        from exp.config import config_path

        with open(config_path(args.config, CONFIG_DIR)) as f:
            from_file = json.load(f)
        merged.update({k: v for k, v in from_file.items() if k in DEFAULTS})
    if args.bf16 is None:
        args.bf16 = bool(from_file.get("bf16", False))
    for key in DEFAULTS:
        if getattr(args, key) is not None:
            merged[key] = getattr(args, key)
    for key, value in merged.items():
        setattr(args, key, value)
    if not args.ffn_hidden_size:
        args.ffn_hidden_size = 4 * args.hidden_size
    if not args.mock_data and not args.data_path:
        p.error("--data-path is required unless --mock-data")
    return args


def init_distributed(args) -> int:
    """torchrun's environment -> process group, CUDA device, megatron-core's parallel state."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if not torch.cuda.is_available():
        raise RuntimeError("pretrain_gpt.py needs CUDA (megatron-core's attention runs on GPUs)")
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    if world % args.expert_model_parallel_size or args.moe_num_experts % args.expert_model_parallel_size:
        raise ValueError(
            f"--expert-model-parallel-size: expected a divisor of the world size {world} and of "
            f"--moe-num-experts {args.moe_num_experts}, got {args.expert_model_parallel_size}"
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        expert_model_parallel_size=args.expert_model_parallel_size,
    )
    torch.manual_seed(args.seed)
    model_parallel_cuda_manual_seed(args.seed)
    return world


def transformer_config(args):
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    return TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size, init_method_std=args.init_method_std,
        hidden_dropout=0.0, attention_dropout=0.0, add_bias_linear=False,
        gated_linear_unit=args.swiglu, activation_func=F.silu if args.swiglu else F.gelu,
        bf16=args.bf16, params_dtype=dtype, pipeline_dtype=dtype, autocast_dtype=dtype,
        num_moe_experts=args.moe_num_experts, moe_router_topk=args.moe_top_k,
        moe_router_pre_softmax=args.moe_top_k == 1, moe_aux_loss_coeff=args.moe_loss_weight,
        moe_router_load_balancing_type="aux_loss", moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=args.moe_grouped_gemm, moe_ffn_hidden_size=args.ffn_hidden_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        moe_router_dtype="fp32",
    )


def build_model(args, config):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    if args.moe_impl == "megablocks":
        from megablocks.integrations.megatron import megablocks_layer_spec

        spec = megablocks_layer_spec(mlp_impl=args.mlp_impl)
    else:
        spec = get_gpt_layer_local_spec(num_experts=args.moe_num_experts, moe_grouped_gemm=args.moe_grouped_gemm)
    model = GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=args.vocab_size,
        max_sequence_length=args.seq_length, position_embedding_type="rope",
        share_embeddings_and_output_weights=True,
    )
    model.cuda(torch.cuda.current_device())
    if args.bf16:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(config, model)
    return model


class ByteLevelTokenizer:
    """What GPTDataset needs of a tokenizer: the vocabulary size and the end-of-document id
    (exp.data.preprocess's byte tokenizer: 257 ids, 256 ends a document)."""

    def __init__(self, vocab_size: int, eod: int):
        self.vocab_size = vocab_size
        self.eod = eod
        self.pad = -1
        self.unique_identifiers = {"class": type(self).__name__, "vocab_size": vocab_size, "eod": eod}


def build_datasets(args, steps: int, global_batch: int):
    """megatron-core GPTDatasets (train, valid, test) over `args.data_path`, or mock ones."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    eod = 256 if args.vocab_size <= 257 else 50256
    config = GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length,
        blend=None if args.mock_data else ([args.data_path], None), split=args.split,
        path_to_cache=args.cache_dir, tokenizer=ByteLevelTokenizer(args.vocab_size, eod),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        mid_level_dataset_surplus=0.005,
    )
    evals = (steps // args.eval_interval + 1) * args.eval_iters if args.eval_interval else args.eval_iters
    sizes = [steps * global_batch, evals * global_batch, args.eval_iters * global_batch]
    cls = MockGPTDataset if args.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config).build()


def batches(dataset, args, dp_rank: int, dp_size: int):
    """This data-parallel rank's micro-batches, forever (the dataset repeats)."""
    mb = args.micro_batch_size
    index = dp_rank * mb
    while True:
        items = [dataset[(index + i) % len(dataset)] for i in range(mb)]
        index += dp_size * mb
        yield {k: torch.stack([torch.as_tensor(it[k]) for it in items]).cuda(non_blocking=True)
               for k in ("tokens", "labels", "loss_mask", "position_ids")}


def aux_loss_value(model) -> float:
    """The mean over megablocks layers of the unweighted load-balancing loss of the last forward
    (1 at a uniform routing); NaN for megatron-core's own MoE or a zero coefficient."""
    from megablocks.integrations.megatron import MegablocksMLP

    values = []
    for m in model.modules():
        if isinstance(m, MegablocksMLP) and "load_balancing_loss" in m.aux_losses():
            values.append(m.aux_losses()["load_balancing_loss"].detach().float() / m.args.moe_loss_weight)
    return float(torch.stack(values).mean()) if values else float("nan")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    world = init_distributed(args)
    rank = dist.get_rank()

    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func

    dp_size = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    global_batch = args.global_batch_size or args.micro_batch_size * dp_size
    if global_batch % (args.micro_batch_size * dp_size):
        raise ValueError(
            f"--global-batch-size: expected a multiple of micro batch {args.micro_batch_size} x data-parallel "
            f"size {dp_size}, got {global_batch}"
        )
    num_microbatches = global_batch // (args.micro_batch_size * dp_size)

    config = transformer_config(args)
    model = build_model(args, config)
    model = DistributedDataParallel(
        config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                              use_distributed_optimizer=False), module=model,
    )
    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
                        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, clip_grad=args.clip_grad,
                        bf16=args.bf16, params_dtype=config.params_dtype),
        [model],
    )
    warmup = int(args.lr_warmup_fraction * args.train_iters)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=args.train_iters, lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay,
        end_wd=args.weight_decay, wd_incr_steps=args.train_iters, wd_incr_style="constant",
    )
    train_ds, valid_ds, _ = build_datasets(args, args.train_iters, global_batch)
    train_iter = batches(train_ds, args, dp_rank, dp_size)
    valid_iter = batches(valid_ds, args, dp_rank, dp_size) if valid_ds is not None else None
    forward_backward = get_forward_backward_func()

    def loss_func(loss_mask, output_tensor):
        losses = output_tensor.float().view(-1)
        mask = loss_mask.view(-1).float()
        loss = torch.sum(losses * mask)
        num_tokens = mask.sum().to(torch.int)
        reported = torch.cat([loss.detach().view(1), num_tokens.view(1).float()])
        return loss, num_tokens, {"lm loss": reported}

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, lambda out: loss_func(batch["loss_mask"], out)

    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        print(json.dumps({"world": world, "ep": args.expert_model_parallel_size, "moe_impl": args.moe_impl,
                          "params_on_rank0": params, "num_microbatches": num_microbatches}), flush=True)

    def run(data_iterator, forward_only):
        losses = forward_backward(
            forward_step_func=forward_step, data_iterator=data_iterator, model=model,
            num_microbatches=num_microbatches, seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size, forward_only=forward_only,
        )
        total = torch.stack([d["lm loss"] for d in losses]).sum(dim=0)
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
        return float(total[0] / total[1])

    def evaluate(step):
        model.eval()
        with torch.no_grad():
            loss = sum(run(valid_iter, True) for _ in range(args.eval_iters)) / args.eval_iters
        model.train()
        if rank == 0:
            print(json.dumps({"step": step, "val_loss": round(loss, 4)}), flush=True)

    history, window_tps = [], []
    window_start, window_tokens = time.perf_counter(), 0
    tokens_per_step = global_batch * args.seq_length
    for step in range(1, args.train_iters + 1):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        lm_loss = run(train_iter, False)
        _, grad_norm, _ = optimizer.step()
        scheduler.step(increment=1)
        history.append(lm_loss)
        window_tokens += tokens_per_step
        if step % args.log_interval == 0 or step == args.train_iters:
            torch.cuda.synchronize()
            now = time.perf_counter()
            tps = window_tokens / (now - window_start)
            if rank == 0:
                print(json.dumps({"step": step, "lm_loss": round(lm_loss, 4),
                                  "lbl": round(aux_loss_value(model), 4), "grad_norm": float(grad_norm or 0),
                                  "lr": optimizer.param_groups[0]["lr"], "tokens_per_s": round(tps)}), flush=True)
            if step > args.log_interval:  # the first window holds the warm-up
                window_tps.append(tps)
            window_start, window_tokens = now, 0
        if valid_iter is not None and args.eval_interval and step % args.eval_interval == 0:
            evaluate(step)
            window_start = time.perf_counter()  # keep evaluation out of tokens/s
        if args.save and args.save_interval and step % args.save_interval == 0:
            save(args, model, optimizer, step, rank)
    if args.save:
        save(args, model, optimizer, args.train_iters, rank)
    if rank == 0:
        tps = window_tps
        k = max(1, min(5, len(history) // 5))
        print(json.dumps({"final": {
            "first_loss": sum(history[:k]) / k, "last_loss": sum(history[-k:]) / k,
            "tokens_per_s": sum(tps) / len(tps) if tps else None, "moe_impl": args.moe_impl,
            "world": world, "ep": args.expert_model_parallel_size,
        }}), flush=True)
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return 0


def save(args, model, optimizer, step: int, rank: int) -> None:
    os.makedirs(args.save, exist_ok=True)
    torch.save({"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict()},
               os.path.join(args.save, f"step{step}_rank{rank}.pt"))


if __name__ == "__main__":
    sys.exit(main())
