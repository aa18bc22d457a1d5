"""One config's forward product, bf16 and FP8, launched a fixed number of times: a program for a
profiler to attach to (`ncu --launch-skip`), and, with `--seconds`, a sustained loop of either
product for reading the clocks and power it runs at (`nvidia-smi dmon` beside it).

    python benchmarks/profile_fp8_product.py --config mixtral --product up --calls 4
    ncu --clock-control none -k regex:_gmm_fp8_ws --launch-skip 2 --launch-count 1 \
        python benchmarks/profile_fp8_product.py --config mixtral --product up
    python benchmarks/profile_fp8_product.py --config mixtral --seconds 10 --only fp8

Prints each form's time per call (CUDA events over the calls after the first) and TFLOP/s.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_fp8  # noqa: E402
from common import CONFIGS  # noqa: E402

from megablocks.backend import gmm as gb  # noqa: E402
from megablocks.ops import fp8  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="mixtral", choices=list(CONFIGS))
    p.add_argument("--product", default="up", choices=["up", "down"])
    p.add_argument("--calls", type=int, default=4, help="calls of each form")
    p.add_argument("--seconds", type=float, default=0.0, help="run each form back to back this long instead")
    p.add_argument("--only", choices=["bf16", "fp8"], default=None)
    p.add_argument("--config-json", default=None, help="a gmm_fp8 config (JSON) for the FP8 form")
    args = p.parse_args()
    T, H, F, E, k = CONFIGS[args.config]
    prods = {name: rest for name, *rest in bench_fp8.products(T, H, F, E, k, "cuda")}
    x, w, bs = prods[args.product]
    x_q, x_s = fp8.quantize_rows(x)
    w_q, w_s = fp8.quantize_blocks(w)
    cfg = None
    if args.config_json:
        import json
        cfg = json.loads(args.config_json)
    forms = {"bf16": lambda: gb.gmm(x, w, bs, trans_b=True, backend="triton"),
             "fp8": lambda: fp8.gmm_fp8(x_q, x_s, w_q, w_s, bs, config=cfg)}
    flops = 2 * x.shape[0] * x.shape[1] * w.shape[1]
    for name, call in forms.items():
        if args.only and name != args.only:
            continue
        call()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        n = 0
        t_end = time.time() + args.seconds
        start.record()
        while n < max(args.calls - 1, 1) or time.time() < t_end:
            call()
            n += 1
            if args.seconds and n % 50 == 0:
                torch.cuda.synchronize()
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / n
        print(f"{args.config} {args.product} {name}: {ms:.4f} ms, {flops / ms / 1e9:.1f} TFLOP/s over {n} calls",
              flush=True)


if __name__ == "__main__":
    main()
