"""benchmarks/bench_fused_moe.py: its torch `grouped_mm` baseline and every method it times
compute the MoE's function (against the per-token loop), including the FUSED_FORMS switch it
turns on for one method and restores after."""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_fused_moe  # noqa: E402

from megablocks.integrations import inference  # noqa: E402
from tests.conftest import DEVICE  # noqa: E402


def test_methods_agree_with_the_reference():
    bench_fused_moe.smoke()


def test_fused_method_switches_and_restores(monkeypatch):
    monkeypatch.setattr(inference, "FUSED_FORMS", False)
    seen = []
    monkeypatch.setattr(inference, "_routed_moe_impl", lambda *a: seen.append(inference.FUSED_FORMS) or a[0])
    x, w1, w2, gating = bench_fused_moe.make(3, 16, 12, 4, torch.float32, DEVICE)
    fns = bench_fused_moe.methods(x, w1, w2, gating, 2)
    fns["ours_fused"]()
    assert seen == [True] and inference.FUSED_FORMS is False
    fns["ours_grouped"]()
    assert seen == [True]
