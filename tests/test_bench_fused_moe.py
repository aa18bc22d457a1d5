"""benchmarks/bench_fused_moe.py: its torch `grouped_mm` baseline and every method it times
compute the MoE's function (against the per-token loop), and its fused and unfused methods run
with the kernel policy they name."""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_fused_moe  # noqa: E402

from megablocks.integrations import inference  # noqa: E402
from tests.conftest import DEVICE  # noqa: E402


def test_methods_agree_with_the_reference():
    bench_fused_moe.smoke()


def test_fused_and_unfused_methods_take_their_policy(monkeypatch):
    seen = []
    monkeypatch.setattr(inference, "_routed_moe_impl", lambda *a: seen.append(a[7:]) or a[0])
    x, w1, w2, gating = bench_fused_moe.make(3, 16, 12, 4, torch.float32, DEVICE)
    fns = bench_fused_moe.methods(x, w1, w2, gating, 2)
    fns["ours_fused"]()
    policy = inference.KernelPolicy()
    assert seen == [(policy.route_max_work, policy.gather_min_ffn, policy.gather_min_rows_per_expert)]
    fns["ours_grouped"]()
    assert len(seen) == 1, "the unfused method took the routed form"
