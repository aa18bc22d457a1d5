"""Weak scaling of the expert-parallel dMoE: tokens/s per GPU and time in all_to_all.

Each rank runs the same per-rank batch (T tokens of the chosen config, default olmoe) through
a dMoE whose E experts are split over the W ranks (W = 1: the layer without expert
parallelism, the baseline). One step is forward + backward; the time in all_to_all is measured
around every exchange (forward and backward, waiting for peers included). Target: at W = 4 the
per-GPU throughput is at least 85% of W = 1's.

`--chunks 1,2,4` runs every W > 1 with each count of `moe_expert_parallel_chunks` (the exchange in
chunks of the local experts, overlapped with their compute): the step time with and without the
overlap. The all_to_all column times the unchunked (blocking) exchanges only; with chunks the
exchanges run asynchronously beside the experts and the step time is the measure.

    # driver: one torchrun per world size, a CSV and a PNG under benchmarks/results/
    python benchmarks/bench_expert_parallel.py --worlds 1,2,4,8
    # one world size by hand
    torchrun --standalone --nproc_per_node=4 benchmarks/bench_expert_parallel.py --worker
    # CPU check of the whole path with gloo, tiny sizes
    python benchmarks/bench_expert_parallel.py --worlds 1,2 --smoke

Timing uses a fixed number of iterations on every rank (do_bench picks its repetition count
from a first measurement, which can differ between ranks and would desynchronise the
collectives), CUDA events on GPUs and a barrier before and after the timed loop; a rank's step
time is the slowest rank's.
"""

import argparse
import os
import subprocess
import sys
import time

# Set before any communicator is created (also in the environment the driver builds).
_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
for _k, _v in _ENV.items():
    os.environ.setdefault(_k, _v)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from benchmarks.common import CONFIGS, environment, print_table, write_csv  # noqa: E402

SMOKE = (64, 32, 16, 8, 2)  # T, H, F, E, K


class _Clock:
    """Wall time on CPU, CUDA events on GPU; `exchange_ms()` sums the timed all_to_alls."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.spans = []
        self.host_ms = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn(*args, **kwargs)
                end.record()
                self.spans.append((start, end))
                return out
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.host_ms += (time.perf_counter() - t0) * 1e3
            return out

        return timed

    def exchange_ms(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return sum(s.elapsed_time(e) for s, e in self.spans)
        return self.host_ms

    def reset(self):
        self.spans, self.host_ms = [], 0.0


def worker(opts) -> None:
    cuda = torch.cuda.is_available() and not opts.smoke
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

    from megablocks.layers import all_to_all as a2a
    from megablocks.layers.arguments import Arguments
    from megablocks.layers.dmoe import dMoE

    clock = _Clock(cuda)
    a2a._exchange = clock.wrap(a2a._exchange)

    T, H, F, E, K = SMOKE if opts.smoke else CONFIGS[opts.config]
    dtype = torch.bfloat16 if cuda else torch.float32
    args = Arguments(
        hidden_size=H, ffn_hidden_size=F, moe_num_experts=E, moe_top_k=K, mlp_type="glu", mlp_impl=opts.impl,
        activation_fn=torch.nn.functional.silu, bias=False, return_bias=False, moe_loss_weight=0.0,
        fp16=False, bf16=dtype == torch.bfloat16, device=device, moe_expert_model_parallelism=world > 1,
        moe_expert_parallel_chunks=int(opts.chunks),
    )
    torch.manual_seed(0)
    layer = dMoE(args)
    gen = torch.Generator(device=device).manual_seed(1 + rank)
    x = torch.randn(T, H, device=device, dtype=dtype, generator=gen).requires_grad_(True)
    grad = torch.randn(T, H, device=device, dtype=dtype, generator=gen)

    def step():  # as training runs it: every .grad None (zero_grad), then .backward() into them
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).backward(grad)

    for _ in range(opts.warmup):
        step()
    dist.barrier()
    if cuda:
        torch.cuda.synchronize()
    clock.reset()
    t0 = time.perf_counter()
    for _ in range(opts.iters):
        step()
    if cuda:
        torch.cuda.synchronize()
    step_ms = (time.perf_counter() - t0) * 1e3 / opts.iters
    a2a_ms = clock.exchange_ms() / opts.iters
    stats = torch.tensor([step_ms, a2a_ms], dtype=torch.float64, device=device)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    step_ms, a2a_ms = stats.tolist()
    if rank == 0:
        row = {
            "config": "smoke" if opts.smoke else opts.config, "impl": opts.impl, "world": world,
            "chunks": layer.experts._exchange.chunks if world > 1 else 1,
            "tokens_per_rank": T, "experts_per_rank": E // min(world, E), "step_ms": step_ms,
            "all_to_all_ms": a2a_ms if world == 1 or layer.experts._exchange.chunks == 1 else float("nan"),
            "tokens_per_s_per_gpu": T / step_ms * 1e3, **environment(),
        }
        write_csv(opts.row_out, [row])
    dist.destroy_process_group()


def driver(opts) -> None:
    worlds = [int(w) for w in opts.worlds.split(",")]
    visible = torch.cuda.device_count() if torch.cuda.is_available() and not opts.smoke else None
    os.makedirs(opts.out_dir, exist_ok=True)
    tag = "smoke" if opts.smoke else opts.config
    rows = []
    chunk_counts = [int(c) for c in opts.chunks.split(",")]
    runs = [(w, c) for w in worlds for c in (chunk_counts if w > 1 else [1])]
    for world, chunks in runs:
        if visible is not None and world > visible:
            print(f"skipping world size {world}: {visible} GPUs visible")
            continue
        row_out = os.path.join(opts.out_dir, f"expert_parallel_{tag}_{opts.impl}_w{world}_c{chunks}.csv")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               os.path.abspath(__file__), "--worker", "--config", opts.config, "--impl", opts.impl,
               "--warmup", str(opts.warmup), "--iters", str(opts.iters), "--row-out", row_out,
               "--chunks", str(chunks)]
        if opts.smoke:
            cmd.append("--smoke")
        env = {**os.environ, **_ENV, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        subprocess.run(cmd, check=True, env=env, timeout=opts.timeout)
        import csv

        with open(row_out) as f:
            rows.extend(csv.DictReader(f))
    if not rows:
        return
    base = float(rows[0]["tokens_per_s_per_gpu"]) if rows[0]["world"] == "1" else None
    for r in rows:
        for key in ("step_ms", "all_to_all_ms", "tokens_per_s_per_gpu", "chunks"):
            r[key] = float(r[key])
        r["efficiency_vs_1"] = r["tokens_per_s_per_gpu"] / base if base else float("nan")
    path = os.path.join(opts.out_dir, f"expert_parallel_{tag}_{opts.impl}.csv")
    write_csv(path, rows)
    print_table(rows, ["world", "chunks", "experts_per_rank", "step_ms", "all_to_all_ms", "tokens_per_s_per_gpu",
                       "efficiency_vs_1", "gpu"])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        for chunks in sorted({r["chunks"] for r in rows}):
            mine = [r for r in rows if r["chunks"] == chunks or r["world"] == "1"]
            ax.plot([int(r["world"]) for r in mine], [r["tokens_per_s_per_gpu"] for r in mine], marker="o",
                    label=f"{int(chunks)} chunk(s)")
        ax.legend()
        ax.set_xlabel("GPUs (experts split across them)")
        ax.set_ylabel("tokens/s per GPU")
        ax.set_title(f"dMoE {tag} ({opts.impl}) weak scaling")
        fig.tight_layout()
        fig.savefig(path.replace(".csv", ".png"))
    except ImportError:
        pass
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help="run as one torchrun rank")
    p.add_argument("--worlds", default="1,2,4,8", help="world sizes the driver launches")
    p.add_argument("--config", default="olmoe", choices=sorted(CONFIGS))
    p.add_argument("--impl", default="grouped", choices=["grouped", "sparse"])
    p.add_argument("--chunks", default="1", help="moe_expert_parallel_chunks values (worker: one int)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, gloo on CPU")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per torchrun launch")
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--row-out", default=None, help="worker: the CSV row rank 0 writes")
    opts = p.parse_args()
    if opts.smoke:
        opts.warmup, opts.iters = min(opts.warmup, 1), min(opts.iters, 2)
    if opts.worker:
        if opts.row_out is None:
            opts.row_out = os.path.join(opts.out_dir, "expert_parallel_row.csv")
        worker(opts)
    else:
        driver(opts)


if __name__ == "__main__":
    main()
