"""Runs a test body in W processes joined by a process group, bounded by a timeout.

`run(target, world_size, *args)` spawns W processes; each initialises torch.distributed (gloo,
through a store file of a fresh temporary folder: no port to pick, so no race with another run
taking the same one), imports `target` ("module:function") and calls `function(rank, world_size,
*args)`. The call fails with every rank's traceback when a rank raises, and fails (after
killing the ranks) when they do not finish within `timeout` seconds: a hang is a failure.

`interpret` sets TRITON_INTERPRET in the ranks before megablocks is imported there: "0" runs
the plain-torch references (fast), "1" the Triton kernels through the interpreter. With CUDA
the ranks use NCCL, one GPU each (rank r on cuda:r).
"""

import importlib
import os
import shutil
import tempfile
import time
import traceback
from datetime import timedelta

import torch.multiprocessing as mp


def _entry(rank, world_size, store, interpret, target, args, errors, cpu_only=False):
    os.environ["TRITON_INTERPRET"] = interpret
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        backend = "gloo"
        if torch.cuda.is_available() and not cpu_only:
            torch.cuda.set_device(rank)
            backend = "nccl"
        dist.init_process_group(
            backend, init_method=f"file://{store}", rank=rank, world_size=world_size,
            timeout=timedelta(seconds=60),
        )
        module, name = target.split(":")
        getattr(importlib.import_module(module), name)(rank, world_size, *args)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise SystemExit(1)


def run(target: str, world_size: int, *args, interpret: str = "0", timeout: float = 120.0,
        cpu_only: bool = False) -> None:
    """Runs `target` on `world_size` ranks: gloo on CPU, or NCCL with one GPU per rank when CUDA is
    available (skipped when fewer GPUs are visible). `cpu_only` keeps gloo even where CUDA is."""
    import pytest
    import torch

    if torch.cuda.is_available() and not cpu_only and torch.cuda.device_count() < world_size:
        pytest.skip(f"{world_size} ranks need {world_size} GPUs, {torch.cuda.device_count()} visible")
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    # A TCP port picked free here could be taken by another run before rank 0 listened on it (seen
    # as EADDRINUSE with parallel test workers); a store file in a folder of its own cannot.
    folder = tempfile.mkdtemp(prefix="megablocks-ranks-")
    store = os.path.join(folder, "store")
    procs = [
        ctx.Process(target=_entry, args=(rank, world_size, store, interpret, target, args, errors, cpu_only),
                    daemon=True)
        for rank in range(world_size)
    ]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    if failures:
        report = "\n".join(f"--- rank {rank} ---\n{tb}" for rank, tb in sorted(failures))
        raise AssertionError(f"{target}: {len(failures)} of {world_size} ranks failed\n{report}")
    if hung:
        raise AssertionError(f"{target}: ranks {hung} did not finish within {timeout} s (a hang)")
    bad = [(rank, p.exitcode) for rank, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise AssertionError(f"{target}: ranks exited with codes {bad}")
