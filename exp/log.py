"""What a training run writes as it goes: CSV rows, TensorBoard events, a progress bar, messages.

`train.csv` gets one row per iteration (`TRAIN_COLUMNS`), `valid.csv` one per evaluation
(`VALID_COLUMNS`); TensorBoard events go to `tensorboard/` when `tensorboard` is installed, the
progress bar to the terminal when `tqdm` is.
"""

from __future__ import annotations

import csv
import math
import os
from typing import Any, Dict, List, Optional

TRAIN_COLUMNS = ["iteration", "consumed_samples", "lr", "loss", "lm_loss", "lbl_loss", "zloss", "grad_norm", "elapsed_s",
                 "train_s", "step_ms", "tokens_per_s", "tflops_per_gpu", "mfu", "fwd_ms", "bwd_ms", "clip_ms", "optim_ms"]
# The columns that measure time (they differ from run to run; the others are determined by the seed).
TIMING_COLUMNS = ("elapsed_s", "train_s", "step_ms", "tokens_per_s", "tflops_per_gpu", "mfu", "fwd_ms", "bwd_ms", "clip_ms",
                  "optim_ms")
_SCALARS = ("loss", "lm_loss", "lbl_loss", "zloss", "lr", "grad_norm", "step_ms", "tokens_per_s", "tflops_per_gpu",
            "mfu", "fwd_ms", "bwd_ms", "clip_ms", "optim_ms")
VALID_COLUMNS = ["iteration", "consumed_samples", "valid_loss", "valid_ppl", "train_s"]


class CSVLog:
    """Appends rows to a CSV; on resume keeps only rows up to the checkpoint's iteration."""

    def __init__(self, path: str, columns: List[str], resume_iteration: Optional[int]):
        self.path, self.columns = path, columns
        rows = []
        if resume_iteration is not None and os.path.isfile(path):
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["iteration"]) <= resume_iteration]
        self.kept = rows
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, columns)
            w.writeheader()
            w.writerows(rows)

    def write(self, row: Dict[str, Any]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow(row)


def read_csv(path: str) -> List[Dict[str, float]]:
    """The rows of a CSV the trainer wrote, every value a float (empty cells left out)."""
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def _progress(total: int, start: int, name: Optional[str]):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=start, desc=name or "train", unit="it", dynamic_ncols=True)


def _tensorboard(save: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(os.path.join(save, "tensorboard"))


def _speed(row: Dict[str, Any]) -> Dict[str, str]:
    """The throughput fields of a row, formatted for the progress bar and the log line."""
    out = {}
    if row.get("tokens_per_s") is not None:
        out["tok/s"] = f"{row['tokens_per_s']:.4g}"
    if row.get("step_ms") is not None:
        out["ms"] = f"{row['step_ms']:.1f}"
    if row.get("tflops_per_gpu") is not None:
        out["TFLOP/s"] = f"{row['tflops_per_gpu']:.3g}"
    if row.get("mfu") is not None:
        out["MFU"] = f"{100 * row['mfu']:.1f}%"
    return out


class RunLog:
    """The outputs of one run in `save`; every method does nothing unless `enabled` (rank 0).

    Args:
        save: the run directory.
        train_iters, log_interval: the schedule's length and how often a line (or the bar's
            postfix) shows the losses.
        start: the first iteration of this process (a resume's checkpoint iteration, else 0);
            rows after it are dropped from the CSVs.
        name: the progress bar's label.
        progress, tensorboard: show a progress bar, write TensorBoard events (when installed).
    """

    def __init__(self, save: str, train_iters: int, log_interval: int, start: int, name: Optional[str] = None,
                 progress: bool = True, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.train_iters, self.log_interval = train_iters, log_interval
        self.valid_loss: Optional[float] = None
        self.resumed_train_s = 0.0  # the training seconds a resumed run had behind it (rank 0)
        self.train_csv = self.valid_csv = self.tb = self.bar = None
        if not enabled:
            return
        resumed = start if start else None
        self.train_csv = CSVLog(os.path.join(save, "train.csv"), TRAIN_COLUMNS, resumed)
        kept = [r["train_s"] for r in self.train_csv.kept if r.get("train_s")]
        self.resumed_train_s = float(kept[-1]) if kept else 0.0
        self.valid_csv = CSVLog(os.path.join(save, "valid.csv"), VALID_COLUMNS, resumed)
        self.tb = _tensorboard(save) if tensorboard else None
        self.bar = _progress(train_iters, start, name) if progress else None

    def message(self, msg: str) -> None:
        """Prints a line (above the progress bar when there is one)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def train_step(self, row: Dict[str, Any]) -> None:
        """Records one iteration: a row of `TRAIN_COLUMNS`."""
        if not self.enabled:
            return
        done = row["iteration"]
        self.train_csv.write(row)
        if self.tb is not None:
            for k in _SCALARS:
                if row.get(k) is not None:
                    self.tb.add_scalar(f"train/{k}", row[k], done)
        speed = _speed(row)
        if self.bar is not None:
            self.bar.update(1)
            if done % self.log_interval == 0:
                valid = f"{self.valid_loss:.4f}" if self.valid_loss else "-"
                self.bar.set_postfix(loss=f"{row['lm_loss']:.4f}", lr=f"{row['lr']:.2e}", valid=valid, **speed)
        elif done % self.log_interval == 0:
            extra = "".join(f" {k} {v}" for k, v in speed.items())
            self.message(f"iteration {done}/{self.train_iters} lm_loss {row['lm_loss']:.4f} lbl {row['lbl_loss']:.4f} "
                         f"lr {row['lr']:.3e} grad_norm {row['grad_norm']:.3f}{extra}")

    def validation(self, iteration: int, consumed_samples: int, valid_loss: float,
                   train_s: Optional[float] = None) -> None:
        """Records one evaluation's mean validation loss (and the training seconds behind it)."""
        self.valid_loss = valid_loss
        if not self.enabled:
            return
        self.valid_csv.write(dict(iteration=iteration, consumed_samples=consumed_samples, valid_loss=valid_loss,
                                  valid_ppl=math.exp(min(valid_loss, 50.0)), train_s=train_s))
        if self.tb is not None:
            self.tb.add_scalar("valid/loss", valid_loss, iteration)
        self.message(f"iteration {iteration}: validation loss {valid_loss:.4f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
