"""benchmarks/bench_fp8.py: the products it times compute the bf16 product's function within
FP8's error (its smoke run, on the device the suite runs on)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_fp8  # noqa: E402


def test_smoke_agrees_with_the_bf16_product():
    errors = bench_fp8.smoke()
    assert set(errors) == {"up", "down", "serving", "layer_out", "layer_x_grad", "layer_w_grad_fp8", "dmoe_inference",
                           "layer_main_grad", "layer_mlp_out"}
    # FP8's error, and not zero: the products and the layer ran quantized.
    assert all(1e-3 < errors[k] < 0.06 for k in ("up", "down")), errors
    assert all(1e-3 < errors[k] < 0.08 for k in ("serving", "layer_out", "layer_x_grad", "layer_w_grad_fp8",
                                              "layer_main_grad", "layer_mlp_out")), errors
