"""benchmarks/bench_dmoe.py: its plain-torch peers compute dMoE's function, and the script runs.

The peers (`NaiveMoE`, `TorchGroupedMoE`) are the baselines dMoE is timed against; they must
compute the same output and gradients as dMoE from the same router and weights, or the speed-ups
the benchmark reports compare different things. Float32 on CPU (Triton's interpreter mishandles bf16).
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_dmoe  # noqa: E402

PEERS = ("naive", "torch_grouped_mm")
FP32_TOL = 1e-4


def _layer(name):
    return bench_dmoe.all_layers(smoke=True)[name]


def _inputs(layer, device):
    x = torch.randn(layer.T, layer.H, device=device, requires_grad=True)
    grad_out = torch.randn(layer.T, layer.H, device=device)
    return x, grad_out


@pytest.mark.parametrize("config", ["smoke_glu", "smoke_mlp"])
def test_peers_match_dmoe(config, device):
    layer = _layer(config)
    modules = bench_dmoe.build_contenders(layer, ["grouped_torch", *PEERS], torch.float32, device)
    x, grad_out = _inputs(layer, device)
    errs = bench_dmoe.errors(modules, x, grad_out, reference="grouped_torch")
    params = ["router.layer.weight", "experts.mlp.w1", "experts.mlp.w2"]
    if layer.mlp_type == "glu":
        params.append("experts.mlp.v1")
    expected_keys = {"out", "grad_x", *(f"grad_{p}" for p in params)}
    for peer in PEERS:
        assert set(errs[peer]) == expected_keys, (peer, sorted(errs[peer]))
        for key, err in errs[peer].items():
            assert err <= FP32_TOL, f"{peer} {key}: rel max err {err:.3e} against dMoE (grouped, torch)"


def test_peers_share_parameters(device):
    layer = _layer("smoke_glu")
    modules = bench_dmoe.build_contenders(layer, list(bench_dmoe.CONTENDERS[:3]) + list(PEERS), torch.float32, device)
    source = modules["sparse"]
    assert dict(modules[bench_dmoe.REFERENCE].named_parameters()).keys() == dict(source.named_parameters()).keys()
    for name, module in modules.items():
        assert module.router is source.router, name
        mlp = module.experts.mlp
        for w in ("w1", "v1", "w2"):
            assert getattr(mlp, w) is getattr(source.experts.mlp, w), (name, w)


def test_errors_flags_a_wrong_peer(device):
    layer = _layer("smoke_mlp")
    modules = bench_dmoe.build_contenders(layer, ["naive"], torch.float32, device)
    naive = modules["naive"]
    modules["naive"] = lambda x: naive(x) * 1.01
    x, grad_out = _inputs(layer, device)
    errs = bench_dmoe.errors(modules, x, grad_out)
    assert errs["naive"]["out"] > 5e-3
    assert errs["naive"]["grad_experts.mlp.w2"] > 5e-3


def test_stage_of_kernel_names():
    cases = {
        "_sdd_kernel": "gemm:sdd",
        "_dsd_kernel": "gemm:dsd/dds",
        "_gmm_kernel": "gemm:gmm",
        "_gmm_var_k_kernel": "gemm:gmm_var_k",
        "_gather_kernel": "gather",
        "_scatter_kernel": "scatter",
        "_weight_grad_kernel": "scatter",
        "_route_kernel": "routing",
        "_histogram_kernel": "routing",
        "_topology_kernel": "topology",
        "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, c10::BFloat16>": "routing",
        "void at::native::sbtopk::gatherTopK<c10::BFloat16, unsigned int, 2, false>": "routing",
        "void at::cuda::cub::DeviceRadixSortOnesweepKernel<...>": "routing",
        "void at::native::indexSelectLargeIndex<c10::BFloat16, long, unsigned int, 2, 2, -2, true>": "gather",
        "void at::native::indexFuncLargeIndex<c10::BFloat16, long, unsigned int, 2, 2, -2, true>": "scatter",
        "void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<cutlass::gemm::GroupProblemShape<...>>>":
            "gemm:grouped",
        "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN": "gemm:dense",
        "void at::native::vectorized_elementwise_kernel<4, at::native::silu_kernel(...)>": "activation",
        "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>": "other",
    }
    for kernel, stage in cases.items():
        assert bench_dmoe.stage_of(kernel) == stage, kernel


def test_breakdown_rows_sum_by_stage():
    times_us = {"_sdd_kernel": 300.0, "_dsd_kernel": 150.0, "_gmm_kernel": 0.0, "Memset (Device)": 50.0,
                "void at::native::cunn_SoftMaxBackward<4, float>": 100.0, "_topology_kernel": 400.0}
    rows = bench_dmoe.breakdown_rows(_layer("smoke_glu"), "sparse", times_us)
    by_stage = {r["stage"]: r for r in rows}
    assert set(by_stage) == {"topology", "gemm:sdd", "gemm:dsd/dds", "gemm:gmm", "routing", "other", "total"}
    assert by_stage["topology"]["ms"] == pytest.approx(0.4) and by_stage["topology"]["pct"] == pytest.approx(40)
    assert by_stage["total"]["ms"] == pytest.approx(1.0)
    assert [r["stage"] for r in rows][:2] == ["topology", "gemm:sdd"]  # largest first


def test_smoke_end_to_end(tmp_path):
    contenders = ["sparse", "grouped_triton", "grouped_torch", *PEERS]
    rows = bench_dmoe.main(["--smoke", "--dtype", "float32", "--out", str(tmp_path), "--rep", "1",
                            "--configs", "smoke_glu,smoke_decode", "--contenders", ",".join(contenders)])
    expected = {("smoke_glu", m, c) for m in ("fwd", "fwdbwd") for c in contenders}
    expected |= {("smoke_decode", "fwd", c) for c in contenders}
    assert {(r["config"], r["mode"], r["contender"]) for r in rows} == expected
    for r in rows:
        assert r["match"] == "ok", r
        assert r["out_err"] <= FP32_TOL, r
        if r["config"] == "smoke_glu":
            assert r["grad_err"] <= FP32_TOL, r
        assert r["ms"] > 0 and r["tflops"] > 0, r
        if r["mode"] == "fwdbwd":
            assert r["autograd_grad_ms"] > 0, r
        if r["contender"] == bench_dmoe.REFERENCE:
            assert r["speedup"] == 1.0
    assert (tmp_path / "dmoe.csv").exists()


def test_fwdbwd_step_is_backward_into_grad(device):
    """The timed step starts from `.grad` None and leaves each gradient in `.grad`, equal to the
    one `torch.autograd.grad` returns (the extra column's form)."""
    layer = _layer("smoke_glu")
    modules = bench_dmoe.build_contenders(layer, ["sparse"], torch.float32, device)
    x, grad_out = _inputs(layer, device)
    inputs = [x, *bench_dmoe.parameters(modules).values()]
    step, autograd_step = bench_dmoe.steps(modules["sparse"], "fwdbwd", False, x, grad_out, inputs)
    for t in inputs:
        t.grad = torch.full_like(t, float("nan"))  # a stale gradient the step must not add to
    step()
    expected = torch.autograd.grad(modules["sparse"](x), inputs, grad_out)
    for t, g in zip(inputs, expected):
        assert t.grad is not None and torch.allclose(t.grad, g, rtol=1e-5, atol=1e-6)
    assert autograd_step is not None
    assert bench_dmoe.steps(modules["sparse"], "fwd", False, x, grad_out, inputs)[1] is None


def test_smoke_mismatch_exits_nonzero(tmp_path, monkeypatch):
    forward = bench_dmoe.NaiveMoE.forward
    monkeypatch.setattr(bench_dmoe.NaiveMoE, "forward", lambda self, x: forward(self, x) * 1.01)
    with pytest.raises(SystemExit) as exit_info:
        bench_dmoe.main(["--smoke", "--dtype", "float32", "--out", str(tmp_path), "--rep", "1",
                         "--configs", "smoke_mlp", "--contenders", "naive,torch_grouped_mm", "--modes", "fwd"])
    assert exit_info.value.code == 1
    assert "MISMATCH" in (tmp_path / "dmoe.csv").read_text()
