"""Where the exp/ trainer's model spends a micro-batch (CUDA): host against device, forward and backward.

    python benchmarks/trainer_profile.py --config dmoe_125m --mlp-impl grouped
    python benchmarks/trainer_profile.py --config gpt2_125m

Builds the config's model in bf16 (the trainer's 'bf16-params' compute), and for one micro-batch
(`--micro-batch-size`, default 16 x seq_length tokens) measures: the wall time of the forward and of
the backward (device synchronized), the host time to issue each (from an idle device), the device
time of their kernels and their number (torch.profiler), and the host functions with the most time
of their own in the forward (cProfile), and the host-device synchronizations of one forward and
backward (`torch.cuda.set_sync_debug_mode`: each one stops the host from running ahead). A forward
whose host time is near its wall time, and whose kernels take much less, is bound by the host.
Other `exp.train` options pass through.
"""

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
import warnings

import torch

from exp.config import parse_config
from exp.model import GPT


def _timed(fn, reps):
    """(median wall ms, median host ms to issue) of fn over reps calls from an idle device."""
    walls, hosts = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        hosts.append((t1 - t0) * 1e3)
        walls.append((t2 - t0) * 1e3)
    return statistics.median(walls), statistics.median(hosts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--top", type=int, default=35)
    args, rest = p.parse_known_args(argv)
    _, mcfg = parse_config(rest + ["--device", "cuda"])
    tcfg, _ = parse_config(rest + ["--device", "cuda"])
    model = GPT(mcfg, device=torch.device("cuda")).to(torch.bfloat16)
    model.train()
    shape = (tcfg.micro_batch_size, mcfg.seq_length)
    tokens = torch.randint(0, mcfg.vocab_size, shape, device="cuda")
    labels = torch.randint(0, mcfg.vocab_size, shape, device="cuda")
    state = {}

    def forward():
        state["loss"] = model(tokens, labels)["loss"]

    def backward():
        state["loss"].backward()

    def step():
        forward()
        backward()
        for q in model.parameters():
            q.grad = None

    for _ in range(3):
        step()
    fwd = _timed(forward, args.reps)
    backward()
    bwd = []
    for _ in range(args.reps):
        forward()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        backward()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        bwd.append(((time.perf_counter() - t0) * 1e3, (t1 - t0) * 1e3))
        for q in model.parameters():
            q.grad = None
    bwd = (statistics.median(b[0] for b in bwd), statistics.median(b[1] for b in bwd))

    kernels = {}
    for phase, fn in (("forward", forward), ("backward", backward)):
        if phase == "backward":
            forward()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        rows = [r for r in prof.key_averages() if getattr(r, "self_device_time_total", 0) > 0]
        kernels[phase] = (sum(r.count for r in rows), sum(r.self_device_time_total for r in rows) / 1e3)
        if phase == "backward":
            for q in model.parameters():
                q.grad = None

    syncs = {}
    for phase, fn in (("forward", forward), ("backward", backward)):
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        # Each synchronizing call warns; the mode's own notice ("... is a prototype feature") is not one.
        syncs[phase] = [str(w.message).splitlines()[0] for w in caught
                        if "synchroniz" in str(w.message) and "prototype" not in str(w.message)]
    for q in model.parameters():
        q.grad = None

    print(f"config: {' '.join(rest)}  micro-batch {shape[0]} x {shape[1]} tokens  {torch.cuda.get_device_name()}")
    for phase, (wall, host) in (("forward", fwd), ("backward", bwd)):
        n, dev = kernels[phase]
        print(f"{phase:9s} wall {wall:7.2f} ms  host to issue {host:7.2f} ms  kernels {n:5d}, device {dev:7.2f} ms"
              f"  host syncs {len(syncs[phase])}")
        for msg in sorted(set(syncs[phase])):
            print(f"    sync x{syncs[phase].count(msg)}: {msg}")

    profiler = cProfile.Profile()
    torch.cuda.synchronize()
    profiler.enable()
    for _ in range(3):
        forward()
    profiler.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(args.top)
    stats.sort_stats("cumulative").print_stats(args.top)
    print("cProfile of 3 forwards:")
    print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
