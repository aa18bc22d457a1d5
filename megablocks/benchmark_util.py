"""MegaBlocks' `benchmark_util`: time a callable and print the result in MegaBlocks' format.

The repository's benchmarks (benchmarks/) measure with `triton.testing.do_bench` and write CSVs;
these two helpers keep scripts written against MegaBlocks running.
"""

import time
from typing import Callable, Dict, Tuple

import numpy as np
import torch


def log_benchmark(name: str, arguments: Dict, time_ms: float, std_ms: float) -> None:
    """Prints a benchmark's name, its parameters and its mean and standard deviation (ms)."""
    rule = "=" * 60
    lines = [rule, f"{name} Benchmark", "Benchmark Parameters:"]
    lines += [f"{key} = {value}" for key, value in arguments.items()]
    lines += ["Results:", f"mean time = {time_ms:.3f}ms, std time = {std_ms:.3f}ms", rule]
    print("\n".join(lines))


def benchmark_function(fn: Callable[[], object], iterations: int = 100, warmup: int = 10) -> Tuple[float, float]:
    """`(mean, std)` in ms of `iterations` calls of `fn` after `warmup` untimed ones: CUDA events
    around each call where CUDA is available (each call synchronized), wall time otherwise."""
    for _ in range(warmup):
        fn()
    times = []
    cuda = torch.cuda.is_available()
    for _ in range(iterations):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return float(np.mean(times)), float(np.std(times))
