"""`make demo`: a tiny dense GPT against a tiny dMoE GPT with the same active parameters.

    python -m exp.demo [--out runs/demo] [--iters 300] [--device auto]

1. Builds a Megatron-format dataset (`.bin`/`.idx`, byte-level tokens) from a corpus that ships
   with Python itself: the source of the standard library's top-level modules, cut into
   top-level blocks (functions, classes, import groups), laid out in a seeded order. The corpus
   is fixed by the Python release; its SHA-256 is printed.
2. Trains a dense GPT whose MLP has width F and a dMoE GPT with 8 experts of width F, top-1: the
   same parameters touched per token (plus a tiny router), eight times the MLP parameters in total.
   Same data, same seed, same steps, same schedule. GPU when present, else CPU.
3. Prints a table of the validation losses and writes the loss plot.

The dMoE reaches the lower validation loss: with the same compute per token, its extra expert
parameters store more of the corpus (MegaBlocks' central claim, at toy scale).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import sysconfig
import time
from typing import Dict, List, Tuple


from exp.data.pycorpus import write_byte_corpus

CORPUS_SEED = 20240101


def stdlib_blocks() -> Tuple[List[str], str]:
    """Top-level blocks of the standard library's top-level modules, and the corpus' SHA-256.

    A block starts at an unindented line that follows a blank line and runs to the next one.
    """
    lib = sysconfig.get_paths()["stdlib"]
    names = sorted(n for n in os.listdir(lib) if n.endswith(".py"))
    if not names:
        raise FileNotFoundError(f"{lib}: no standard library sources (.py) to build the demo corpus from")
    digest = hashlib.sha256()
    blocks: List[str] = []
    for name in names:
        with open(os.path.join(lib, name), "rb") as f:
            raw = f.read()
        digest.update(name.encode() + b"\0" + raw)
        text = raw.decode("utf-8", errors="replace")
        cur: List[str] = []
        prev_blank = True
        for line in text.splitlines(keepends=True):
            starts_block = prev_blank and line[:1] not in ("", " ", "\t", "\n", "\r", "#")
            if starts_block and cur:
                blocks.append("".join(cur))
                cur = []
            cur.append(line)
            prev_blank = not line.strip()
        if cur:
            blocks.append("".join(cur))
    return blocks, digest.hexdigest()


def build_corpus(out_prefix: str) -> Dict[str, object]:
    """Writes the demo dataset `out_prefix`.{bin,idx}; returns its statistics."""
    blocks, sha = stdlib_blocks()
    tokens = write_byte_corpus(out_prefix, [b.encode("utf-8") for b in blocks], CORPUS_SEED)
    return {"documents": len(blocks), "tokens": tokens, "sha256": sha}


# The toy models: the dense MLP is as wide as one expert, so both touch the same parameters per
# token. Sizes, steps and learning rate are chosen to finish in a few minutes on two CPU cores.
COMMON = dict(
    seq_length=128, num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
    make_vocab_size_divisible_by=64, split="969,30,1", micro_batch_size=32, train_iters=2000,
    lr=3e-3, min_lr=3e-4, lr_warmup_iters=30, weight_decay=0.1, init_method_std=0.02,
    eval_interval=250, eval_iters=8, log_interval=25, seed=1234,
)
DENSE = dict(mlp="dense")
DMOE = dict(mlp="dmoe", moe_num_experts=8, moe_top_k=1, moe_loss_weight=0.01)


def run(out: str, iters: int = None, device: str = "auto", progress: bool = True) -> Dict[str, object]:
    """Builds the data, trains both models, writes the plot; returns the results."""
    import shutil

    from exp.config import configs_from_dict
    from exp.loop import train
    from exp.plot import plot_runs

    t0 = time.time()
    prefix = os.path.join(out, "data", "stdlib_text_document")
    stats = build_corpus(prefix)
    print(
        f"corpus: {stats['documents']} blocks of Python {sys.version_info.major}.{sys.version_info.minor} "
        f"standard library source, {stats['tokens']:,} byte tokens, sha256 {stats['sha256'][:16]}... "
        f"-> {prefix}.bin/.idx",
        flush=True,
    )
    common = dict(COMMON, data_path=prefix, device=device, progress=progress, tensorboard=False, plot=False)
    if iters:
        common.update(train_iters=iters, eval_interval=max(1, min(COMMON["eval_interval"], iters)))
    import torch

    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    # The sparse (block-sparse) expert path on GPUs; on CPU the grouped path's torch reference is faster.
    dmoe = dict(DMOE, mlp_impl="sparse" if on_gpu else "grouped")
    results = {}
    for name, extra in (("dense", DENSE), ("dmoe", dmoe)):
        save = os.path.join(out, name)
        shutil.rmtree(save, ignore_errors=True)  # a fresh run, not a resume of an older one
        tcfg, mcfg = configs_from_dict(dict(common, name=name, save=save, **extra))
        t = time.time()
        r = train(tcfg, mcfg)
        r["seconds"] = time.time() - t
        results[name] = r
    png = plot_runs({n: r["save"] for n, r in results.items()}, os.path.join(out, "loss.png"),
                    title="dense vs dMoE (8 experts, top-1), same active parameters")
    return {"corpus": stats, "results": results, "plot": png, "seconds": time.time() - t0}


def table(results: Dict[str, dict]) -> str:
    """The validation losses of both runs at each evaluation, as a text table."""
    names = list(results)
    iters = sorted({int(r["iteration"]) for res in results.values() for r in res["valid"]})
    by = {n: {int(r["iteration"]): r["valid_loss"] for r in results[n]["valid"]} for n in names}
    head = f"{'iteration':>9} | " + " | ".join(f"{n:>8}" for n in names)
    lines = [head, "-" * len(head)]
    for it in iters:
        lines.append(f"{it:>9} | " + " | ".join(f"{by[n].get(it, float('nan')):8.4f}" for n in names))
    lines.append("")
    for n in names:
        r = results[n]
        lines.append(
            f"{n:>5}: {r['parameters'] / 1e6:.3f}M parameters, {r['active_parameters'] / 1e6:.3f}M active per "
            f"token, {r['seconds']:.0f} s"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("runs", "demo"), help="output directory")
    p.add_argument("--iters", type=int, default=None, help=f"training steps (default {COMMON['train_iters']})")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("note: TRITON_INTERPRET=1 runs the kernels in Triton's interpreter; the demo will be slow",
              file=sys.stderr)
    out = run(args.out, args.iters, args.device, args.progress)
    res = out["results"]
    print()
    print(table(res))
    dense, dmoe = res["dense"]["valid"][-1]["valid_loss"], res["dmoe"]["valid"][-1]["valid_loss"]
    gap = f"dMoE lower by {dense - dmoe:.4f}" if dmoe < dense else f"dMoE higher by {dmoe - dense:.4f}"
    print(f"\nfinal validation loss: dense {dense:.4f}, dMoE {dmoe:.4f} ({gap})")
    if out["plot"]:
        print(f"loss plot: {out['plot']}")
    print(f"total time {out['seconds']:.0f} s")
    if not dmoe < dense:
        print("the dMoE did not reach a lower validation loss than the dense model", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
