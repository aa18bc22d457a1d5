"""Train the GPT of `exp.model` on Megatron-format data.

    python -m exp.train --config tiny_dmoe_cpu --data-path data/x_text_document --save runs/tiny_dmoe
    torchrun --nproc_per_node 8 -m exp.train --config dmoe_46m \\
        --data-path data/pile_text_document --save runs/dmoe_46m
    torchrun --nproc_per_node 8 -m exp.train --config exp/configs/dmoe_46m.json \\
        --data-path data/pile_text_document --expert-parallel-size 8

`--config` takes a JSON file or the name of one in `exp/configs/`; every other option overrides
it (`python -m exp.train --help` lists them). Outputs in `--save` (default `runs/<config name>`):
`train.csv` (one row per iteration), `valid.csv`, TensorBoard events when `tensorboard` is
installed, `loss.png`, and checkpoints `iter_XXXXXXX/` with `latest_checkpointed_iteration.txt`.
A run whose `--save` (or `--load`) holds a checkpoint resumes from it: model, optimizer, LR
schedule, every RNG and the data position, so the resumed loss curve is the one an
uninterrupted run draws.

This module is the command line; the parts live in
  exp.config      TrainConfig, the options, config files and named configs
  exp.loop        setup, the step, evaluation, the loop (`train`)
  exp.parallel    device, process group, DDP and expert parallelism
  exp.checkpoint  save, resume, `consolidated_state_dict` of expert-parallel shards
  exp.log         train.csv / valid.csv, TensorBoard, the progress bar
  exp.plot        the loss plot
and the names other code imports from here are re-exported.
"""

from __future__ import annotations

import json
import sys
from typing import Optional, Sequence

from exp.checkpoint import LATEST, consolidated_state_dict, latest_iteration, load_checkpoint, save_checkpoint
from exp.config import TrainConfig, build_parser, configs_from_dict, padded_vocab_size, parse_config
from exp.log import TRAIN_COLUMNS, VALID_COLUMNS, read_csv
from exp.loop import evaluate, lr_at, train

__all__ = [
    "LATEST", "TRAIN_COLUMNS", "VALID_COLUMNS", "TrainConfig", "build_parser", "configs_from_dict",
    "consolidated_state_dict", "evaluate", "latest_iteration", "load_checkpoint", "lr_at", "main",
    "padded_vocab_size", "parse_config", "read_csv", "save_checkpoint", "train",
]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parses the options and trains; 2 (with the error on stderr) when the options are bad."""
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
