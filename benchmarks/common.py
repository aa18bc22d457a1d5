"""Shared benchmark helpers: timing, ceilings measured in the same run, environment record, CSV."""

import csv
import os
import subprocess
from typing import Callable, Dict, List

import torch


def timed(fn: Callable[[], object], warmup: int = 25, rep: int = 100):
    """(median, p20, p80) milliseconds of `fn` with triton.testing.do_bench (CUDA events)."""
    import triton.testing

    med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return med, p20, p80


def graphed(fn: Callable[[], object]):
    """`fn` captured in a CUDA graph (after a warm-up on a side stream, as the PyTorch docs show):
    returns `(replay, graph, out)`: `replay()` reruns the captured kernels on the same buffers and
    writes `out`, the captured call's output. Raises what capture raises (e.g. on a host sync)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return (lambda: graph.replay()), graph, out


def environment() -> Dict[str, str]:
    """GPU, torch, Triton and the commit ($MEGABLOCKS_COMMIT when set, which a copy of the tree
    without its own git history needs; else `git rev-parse`)."""
    import triton

    if os.environ.get("MEGABLOCKS_COMMIT"):
        commit = os.environ["MEGABLOCKS_COMMIT"]
    else:
        commit = _git_commit()
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": commit or "unknown",
    }


def _git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except OSError:
        commit = ""
    return commit


def copy_bandwidth_gbs(nbytes: int, device="cuda") -> float:
    """Device-to-device copy bandwidth (bytes read + written per second / 1e9) at `nbytes`."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src))[0]
    return 2 * src.numel() * src.element_size() / ms / 1e6


def dense_gemm_tflops(m: int, n: int, k: int, dtype=torch.bfloat16, device="cuda") -> float:
    """TFLOP/s of one dense (m×k)·(k×n) torch.matmul in the same run."""
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    ms = timed(lambda: a @ b)[0]
    return 2 * m * n * k / ms / 1e9


def write_csv(path: str, rows: List[Dict[str, object]]) -> None:
    if not rows:
        return
    keys = list(rows[0].keys())
    for r in rows[1:]:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def print_table(rows: List[Dict[str, object]], columns: List[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# The target MoE layers (Mixtral, OLMoE, Qwen3-MoE, the MegaBlocks paper): name -> (tokens T, hidden H, ffn F, experts E, top-k).
CONFIGS = {
    "mixtral": (8192, 4096, 14336, 8, 2),
    "olmoe": (16384, 2048, 1024, 64, 8),
    "qwen3moe": (16384, 2048, 768, 128, 8),
    "mb_paper": (32768, 1024, 4096, 64, 1),
}
