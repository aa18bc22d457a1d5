"""Compiled CUDA histogram (csrc/) against the always-present path of `megablocks.ops.histogram`.

    python benchmarks/bench_csrc.py --out DIR

The compiled op stays in the package only if it is faster here; the README says which.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, print_table, timed, write_csv  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=".")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    from megablocks.backend import csrc
    from megablocks.ops.routing import histogram

    env = environment()
    mod = csrc.load()
    if not torch.cuda.is_available() or mod is None:
        print("bench_csrc: needs CUDA and a built megablocks._csrc (scripts/gpu_check.sh --csrc); skipped")
        return
    rows = []
    for n, e in [(16384, 8), (131072, 64), (131072, 128), (1048576, 64)]:
        x = torch.randint(0, e, (n,), dtype=torch.int32, device="cuda")
        ref = histogram(x, e)
        assert torch.equal(mod.histogram(x, e), ref), "compiled histogram disagrees with the ops path"
        t_ops = timed(lambda: histogram(x, e))
        t_cu = timed(lambda: mod.histogram(x, e))
        rows.append({"n": n, "experts": e, "ops_ms": t_ops[0], "csrc_ms": t_cu[0],
                     "speedup": t_ops[0] / t_cu[0], **env})
    write_csv(os.path.join(args.out, "bench_csrc.csv"), rows)
    print_table(rows, ["n", "experts", "ops_ms", "csrc_ms", "speedup"])


if __name__ == "__main__":
    main()
