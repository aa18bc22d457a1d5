"""Routing metadata (sort, histogram, cumsums) and the dMoE topology, timed on the device.

    python benchmarks/bench_topology.py --out DIR     # CUDA: N=131072, E=64, B=128
    python benchmarks/bench_topology.py --smoke       # CPU: tiny shapes, one call each, no timing claims

These ops are launch-bound at dMoE sizes, so the ceiling measured in the same run is the time of
one tiny kernel launch (`floor_ms`); each row reports its time in launches. Baselines run in the
same process: `torch.histc` on float ids for the histogram, the torch reference for the topology,
and torch.sort on int32, int16 and uint8 keys for the sort (the key width sets the radix passes).
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, print_table, timed, write_csv  # noqa: E402

from megablocks.backend import routing as backend_routing  # noqa: E402
from megablocks.ops import routing  # noqa: E402
from megablocks.ops.topology import make_topology, topology_reference  # noqa: E402


def cases(n, num_experts, block_size, ffn, device):
    top_experts = torch.randint(0, num_experts, (n,), dtype=torch.int32, device=device)
    keys16 = top_experts.to(torch.int16)
    keys8 = top_experts.to(torch.uint8)  # wraps for E > 256: timing only
    meta = routing.routing_metadata(top_experts, num_experts, block_size)
    num_block_rows = routing.padded_rows_bound(n, num_experts, block_size) // block_size
    block_columns = -(-ffn // block_size)
    end_bit = max(1, (num_experts - 1).bit_length())
    ids_f = top_experts.float()
    kernel = routing.use_triton(top_experts)  # the launcher itself needs CUDA or the interpreter
    fns = {
        "sort": lambda: routing.sort(top_experts, end_bit),
        "torch_sort_int32_keys": lambda: torch.sort(top_experts, stable=True),
        "torch_sort_int16_keys": lambda: torch.sort(keys16, stable=True),
        "torch_sort_uint8_keys": lambda: torch.sort(keys8, stable=True),
        "histogram": lambda: routing.histogram(top_experts, num_experts),
        "histogram_histc": lambda: torch.histc(ids_f, num_experts, -0.5, num_experts - 0.5),
        "inclusive_cumsum": lambda: routing.inclusive_cumsum(meta.tokens_per_expert, 0),
        "round_up": lambda: routing.round_up(meta.tokens_per_expert, block_size),
        "routing_metadata": lambda: routing.routing_metadata(top_experts, num_experts, block_size),
        "make_topology": lambda: make_topology(meta.padded_bins, block_size=block_size,
                                               num_block_rows=num_block_rows, ffn_hidden_size=ffn,
                                               dtype=torch.bfloat16),
        "topology_torch_reference": lambda: topology_reference(meta.padded_bins, block_size,
                                                               num_block_rows, block_columns),
    }
    if kernel:
        for local in (True, False):
            fns[f"histogram_kernel_{'local' if local else 'atomic'}"] = (
                lambda local=local: backend_routing.histogram(top_experts.view(1, -1), num_experts,
                                                              local=local)
            )
    return fns


def check_agreement(n, num_experts, block_size, ffn, device):
    """The kernel paths and their baselines agree on these inputs before anything is timed."""
    top_experts = torch.randint(0, num_experts, (n,), dtype=torch.int32, device=device)
    meta = routing.routing_metadata(top_experts, num_experts, block_size)
    histc = torch.histc(top_experts.float(), num_experts, -0.5, num_experts - 0.5).to(torch.int32)
    assert torch.equal(meta.tokens_per_expert, histc), "histogram disagrees with torch.histc"
    for local in (True, False) if routing.use_triton(top_experts) else ():
        got = backend_routing.histogram(top_experts.view(1, -1), num_experts, local=local)[0]
        assert torch.equal(got, histc), f"histogram kernel (local={local}) disagrees with torch.histc"
    num_block_rows = routing.padded_rows_bound(n, num_experts, block_size) // block_size
    topo = make_topology(meta.padded_bins, block_size=block_size, num_block_rows=num_block_rows,
                         ffn_hidden_size=ffn, dtype=torch.bfloat16)
    ref = topology_reference(meta.padded_bins, block_size, num_block_rows, -(-ffn // block_size))
    got = (topo.row_indices, topo.column_indices, topo.offsets, topo.column_indices_t, topo.offsets_t,
           topo.block_offsets_t)
    for g, r in zip(got, ref):
        assert torch.equal(g, r), "topology kernel disagrees with the torch reference"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None, help="directory for bench_topology.csv")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, one call each")
    args = p.parse_args()
    env = environment()
    rows = []
    if args.smoke:
        device = "cpu"
        shapes = [(4096, 8, 16, 200)]
    else:
        if not torch.cuda.is_available():
            print("bench_topology: needs CUDA (or --smoke)")
            return
        device = "cuda"
        shapes = [(131072, 64, 128, 1024), (131072, 64, 128, 14336), (131072, 256, 128, 2048),
                  (131072, 1024, 128, 512)]
    if device == "cuda":
        tiny = torch.zeros(1, device=device)
        floor_ms = timed(lambda: tiny.add_(1))[0]
    for n, num_experts, block_size, ffn in shapes:
        check_agreement(n, num_experts, block_size, ffn, device)
        for name, fn in cases(n, num_experts, block_size, ffn, device).items():
            row = {"op": name, "n": n, "experts": num_experts, "block": block_size, "ffn": ffn}
            if device == "cuda":
                try:
                    med, p20, p80 = timed(fn)
                except Exception as exc:  # e.g. a forced variant that does not compile at this size
                    rows.append({**row, "error": f"{type(exc).__name__}: {str(exc)[:200]}", **env})
                    print(f"{name} n={n} E={num_experts}: {type(exc).__name__}: {str(exc)[:200]}")
                    continue
                row.update(ms=med, p20_ms=p20, p80_ms=p80, floor_ms=floor_ms, launches=med / floor_ms)
            else:
                start = time.perf_counter()
                fn()
                row.update(ms=(time.perf_counter() - start) * 1e3)
            rows.append({**row, **env})
    print_table(rows, ["op", "n", "experts", "ffn", "ms", "p20_ms", "p80_ms", "launches"])
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        write_csv(os.path.join(args.out, "bench_topology.csv"), rows)


if __name__ == "__main__":
    main()
