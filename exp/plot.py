"""Loss curves of one or more runs (their train.csv / valid.csv) in one PNG.

    python -m exp.plot runs/dense runs/dmoe --out loss.png [--x time]

`--x time` plots against the training seconds (`train_s`: the steps' wall time, evaluations and
checkpoints left out) instead of the iteration, and prints when each run first reached the
final validation loss of the others (`time_to_reach`).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional, Sequence

from exp.log import read_csv


def _smooth(values: List[float], alpha: float = 0.9) -> List[float]:
    out, avg = [], None
    for v in values:
        avg = v if avg is None else alpha * avg + (1 - alpha) * v
        out.append(avg)
    return out


def time_to_reach(valid_rows: Sequence[Dict[str, float]], loss: float) -> Optional[float]:
    """The training seconds at which a run's validation loss first reached `loss`.

    Linear in time between the two evaluations around the crossing; None if it never did.
    `valid_rows` are valid.csv's rows (`read_csv`) in order, each with `train_s` and `valid_loss`.
    """
    prev = None
    for r in valid_rows:
        if "train_s" not in r:
            raise ValueError("valid.csv has no train_s column: it was written before the trainer recorded it")
        t, v = r["train_s"], r["valid_loss"]
        if v <= loss:
            if prev is None or prev[1] == v:
                return t
            (t0, v0) = prev
            return t0 + (t - t0) * (v0 - loss) / (v0 - v)
        prev = (t, v)
    return None


def plot_runs(runs: Dict[str, str], out_png: str, title: Optional[str] = None, x: str = "iteration") -> Optional[str]:
    """Plots train loss (smoothed) and validation loss of each `name -> run directory`, against
    the iteration or (`x='time'`) the training seconds.

    Returns the PNG's path, or None when matplotlib is not installed.
    """
    if x not in ("iteration", "time"):
        raise ValueError(f"x: expected 'iteration' or 'time', got {x!r}")
    key = "iteration" if x == "iteration" else "train_s"
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
            rows = [r for r in rows if key in r]
            it = [r[key] for r in rows]
            loss = [r["lm_loss"] for r in rows]
            ax_t.plot(it, loss, color=color, alpha=0.25, linewidth=0.8)
            smooth = _smooth(loss)
            ax_t.plot(it, smooth, color=color, label=name)
            if len(smooth) >= 20:
                top = max(top or 0.0, smooth[len(smooth) // 20])
        if os.path.isfile(valid_csv):
            rows = [r for r in read_csv(valid_csv) if key in r]
            if rows:
                ax_v.plot([r[key] for r in rows], [r["valid_loss"] for r in rows], "o-", color=color,
                          markersize=3, label=name)
    if top is not None:
        ax_t.set_ylim(top=top * 1.05)
    xlabel = "iteration" if x == "iteration" else "training time (s)"
    ax_t.set(title="train loss (LM)", xlabel=xlabel, ylabel="cross-entropy (nats/token)")
    ax_v.set(title="validation loss", xlabel=xlabel, ylabel="cross-entropy (nats/token)")
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


def time_table(runs: Dict[str, str]) -> str:
    """For each run: its final validation loss and training time, and when every other run first
    reached that loss (the time-to-quality comparison)."""
    valid = {n: read_csv(os.path.join(r, "valid.csv")) for n, r in runs.items()}
    lines = []
    for n, rows in valid.items():
        if not rows:
            lines.append(f"{n}: no validation rows")
            continue
        final = rows[-1]
        lines.append(f"{n}: final validation loss {final['valid_loss']:.4f} after {final.get('train_s', float('nan')):.1f} s "
                     f"of training, {int(final['iteration'])} iterations")
        for m, other in valid.items():
            if m == n or not other:
                continue
            t = time_to_reach(other, final["valid_loss"])
            when = f"at {t:.1f} s ({t / final['train_s']:.2f}x {n}'s time)" if t is not None else "never"
            lines.append(f"    {m} reached it {when}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories (with train.csv / valid.csv)")
    p.add_argument("--out", default="loss.png")
    p.add_argument("--x", choices=["iteration", "time"], default="iteration",
                   help="the horizontal axis: iteration, or training seconds (train_s)")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    runs = {os.path.basename(os.path.normpath(r)): r for r in args.runs}
    if args.x == "time":
        print(time_table(runs))
    out = plot_runs(runs, args.out, title=args.title, x=args.x)
    if out is None:
        print("error: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
