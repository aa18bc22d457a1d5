"""Fused GLU activation (`megablocks.ops.glu`) against the unfused torch ops `act(h1) * h2`.

    python benchmarks/bench_activation.py --out DIR                    # CUDA, bf16, silu
    python benchmarks/bench_activation.py --out DIR --activations silu gelu gelu_tanh relu

Shapes [N, F]: 16384 × 14336 (Mixtral: T=8192, K=2) and 131072 × 1024 (OLMoE: T=16384, K=8).
Forward and forward+backward of each, in the same process; the backward is timed as training runs
it, `.backward()` into the inputs' `.grad`, which is set to None before each step.
GB/s counts the bytes that must move at least once, for both variants: forward reads h1, h2 and
writes the output (3 tensors); the backward reads h1, h2, grad and writes two gradients (5 more).
The ceiling is `y.copy_(x)` of one [N, F] tensor, measured in the same run. `kept_MiB` is the
memory the forward leaves allocated for the backward (output included). Without a GPU the script
prints a note and exits 0.
"""

import argparse
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import copy_bandwidth_gbs, environment, print_table, timed, write_csv  # noqa: E402

from megablocks.ops.activation import ACTIVATION_FUNCTIONS, ACTIVATIONS, glu, glu_reference  # noqa: E402

SHAPES = [(16384, 14336), (131072, 1024)]

TORCH_ACTS = ACTIVATION_FUNCTIONS  # the unfused torch ops, by name


def kept_mib(fwd, inputs) -> float:
    """MiB the forward leaves allocated for the backward (freed again before returning)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    out = fwd(*inputs)
    kept = torch.cuda.memory_allocated() - base
    del out
    return kept / 2**20


def _step(fwd, inputs, grad):
    """One training step of `fwd`: every `.grad` None, then `.backward()` into them."""
    for t in inputs:
        t.grad = None
    fwd(*inputs).backward(grad)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=".")
    p.add_argument("--activations", nargs="+", default=["silu"], choices=ACTIVATIONS)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_activation: no CUDA device; nothing to time (smoke run OK)")
        return
    os.makedirs(args.out, exist_ok=True)
    dtype = torch.bfloat16
    env = environment()
    torch.manual_seed(0)
    rows = []

    for n, f in SHAPES:
        h1 = torch.randn(n, f, device="cuda", dtype=dtype)
        h2 = torch.randn(n, f, device="cuda", dtype=dtype)
        grad = torch.randn(n, f, device="cuda", dtype=dtype)
        tensor_bytes = h1.numel() * h1.element_size()
        copy_gbs = copy_bandwidth_gbs(tensor_bytes)
        h1_req, h2_req = h1.clone().requires_grad_(True), h2.clone().requires_grad_(True)
        for activation in args.activations:
            act = TORCH_ACTS[activation]
            variants = {
                "fused": lambda a, b: glu(a, b, activation),
                "torch": lambda a, b: act(a) * b,
            }
            # Correctness first: the fused forward against the fp32 reference (one rounding each).
            err = (variants["fused"](h1, h2).float() - glu_reference(h1, h2, activation).float()).abs().max().item()
            scale = glu_reference(h1, h2, activation).float().abs().max().item()
            if err > 1e-2 * scale:
                raise SystemExit(f"bench_activation: glu[{activation}] differs from its reference by {err}")

            base = {}
            for variant, fwd in variants.items():
                for kind, fn, nbytes in (
                    ("fwd", lambda: fwd(h1, h2), 3 * tensor_bytes),
                    ("fwd+bwd", functools.partial(_step, fwd, (h1_req, h2_req), grad), 8 * tensor_bytes),
                ):
                    med, p20, p80 = timed(fn)
                    gbs = nbytes / med / 1e6
                    if variant == "torch":
                        base[kind] = med
                    rows.append({
                        "activation": activation, "variant": variant, "kind": kind, "N": n, "F": f,
                        "ms": med, "p20_ms": p20, "p80_ms": p80, "GB/s": gbs, "pct_copy": 100 * gbs / copy_gbs,
                        "kept_MiB": kept_mib(fwd, (h1_req, h2_req)) if kind == "fwd+bwd" else "",
                        "dtype": "bfloat16", **env,
                    })
            for r in rows:
                if r["activation"] == activation and (r["N"], r["F"]) == (n, f) and r["variant"] == "fused":
                    r["speedup"] = base[r["kind"]] / r["ms"]
        del h1, h2, grad, h1_req, h2_req
        torch.cuda.empty_cache()

    path = os.path.join(args.out, "bench_activation.csv")
    write_csv(path, rows)
    print(f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}")
    print_table(rows, ["activation", "N", "F", "kind", "variant", "ms", "GB/s", "pct_copy", "speedup", "kept_MiB"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
