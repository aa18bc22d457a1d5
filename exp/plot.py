"""Loss curves of one or more runs (their train.csv / valid.csv) in one PNG.

    python -m exp.plot runs/dense runs/dmoe --out loss.png
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional

from exp.log import read_csv


def _smooth(values: List[float], alpha: float = 0.9) -> List[float]:
    out, avg = [], None
    for v in values:
        avg = v if avg is None else alpha * avg + (1 - alpha) * v
        out.append(avg)
    return out


def plot_runs(runs: Dict[str, str], out_png: str, title: Optional[str] = None) -> Optional[str]:
    """Plots train loss (smoothed) and validation loss of each `name -> run directory`.

    Returns the PNG's path, or None when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    top = None  # leave out the first steps' high loss so the later differences show
    for i, (name, run) in enumerate(runs.items()):
        color = f"C{i}"
        train_csv, valid_csv = os.path.join(run, "train.csv"), os.path.join(run, "valid.csv")
        if os.path.isfile(train_csv):
            rows = read_csv(train_csv)
            it = [r["iteration"] for r in rows]
            loss = [r["lm_loss"] for r in rows]
            ax_t.plot(it, loss, color=color, alpha=0.25, linewidth=0.8)
            smooth = _smooth(loss)
            ax_t.plot(it, smooth, color=color, label=name)
            if len(smooth) >= 20:
                top = max(top or 0.0, smooth[len(smooth) // 20])
        if os.path.isfile(valid_csv):
            rows = read_csv(valid_csv)
            if rows:
                ax_v.plot([r["iteration"] for r in rows], [r["valid_loss"] for r in rows], "o-", color=color,
                          markersize=3, label=name)
    if top is not None:
        ax_t.set_ylim(top=top * 1.05)
    ax_t.set(title="train loss (LM)", xlabel="iteration", ylabel="cross-entropy (nats/token)")
    ax_v.set(title="validation loss", xlabel="iteration", ylabel="cross-entropy (nats/token)")
    for ax in (ax_t, ax_v):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if title:
        fig.suptitle(title)
    out_dir = os.path.dirname(out_png)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories (with train.csv / valid.csv)")
    p.add_argument("--out", default="loss.png")
    args = p.parse_args(argv)
    out = plot_runs({os.path.basename(os.path.normpath(r)): r for r in args.runs}, args.out)
    if out is None:
        print("error: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
