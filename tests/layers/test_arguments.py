"""Arguments: MegaBlocks 0.10's fields and defaults, validation, no CUDA when built, from_megatron."""

import dataclasses
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from megablocks.layers import common
from megablocks.layers.arguments import DEFAULT_ACTIVATION_FN, Arguments, from_megatron
from megablocks.layers.losses import MoELossCollector
from megablocks.layers.moe import MoE

# MegaBlocks 0.10.0's Arguments fields and defaults (device defaulted to the current CUDA device
# there; here None, resolved when a layer is built).
MEGABLOCKS_DEFAULTS = {
    "hidden_size": 1024, "ffn_hidden_size": 4096, "num_layers": 1, "bias": True, "return_bias": True,
    "moe_num_experts": 1, "moe_top_k": 1, "moe_capacity_factor": 1, "moe_normalize_expert_weights": None,
    "moe_loss_weight": 0.1, "moe_jitter_eps": None, "moe_lbl_in_fp32": False,
    "moe_expert_model_parallelism": False, "expert_parallel_group": None, "pipeline_model_parallel_size": 1,
    "num_layers_per_virtual_pipeline_stage": None, "memory_optimized_mlp": False, "mlp_type": "mlp",
    "mlp_impl": "sparse", "fp16": True, "bf16": False, "uniform_expert_assignment": False,
    "shared_expert": False, "fc_cls": torch.nn.Linear, "fc_kwargs": {}, "remat_act_fn": True,
    "shared_expert_hidden_size": 4096, "shared_expert_weighted_sum": False, "moe_zloss_weight": 0,
    "moe_zloss_in_fp32": False,
}


def test_megablocks_fields_and_defaults():
    args = Arguments()
    names = {f.name for f in dataclasses.fields(Arguments)}
    missing = set(MEGABLOCKS_DEFAULTS) | {"activation_fn", "device", "init_method", "output_layer_init_method"}
    assert missing <= names, f"missing MegaBlocks fields: {sorted(missing - names)}"
    for name, value in MEGABLOCKS_DEFAULTS.items():
        assert getattr(args, name) == value, f"{name}: {getattr(args, name)!r} != MegaBlocks' {value!r}"
    assert args.activation_fn is DEFAULT_ACTIVATION_FN
    x = torch.linspace(-3, 3, 13)
    assert torch.equal(args.activation_fn(x), F.gelu(x, approximate="tanh"))
    w = torch.empty(400, 400)
    args.init_method(w)
    assert abs(w.std().item() - 0.02) < 1e-3 and abs(w.mean().item()) < 1e-3
    assert args.device is None and args.loss_collector is None
    assert common.dtype(args) == torch.float16
    assert common.dtype(Arguments(fp16=False, bf16=True)) == torch.bfloat16
    assert common.dtype(Arguments(fp16=False)) is None


def test_building_touches_no_cuda(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("CUDA touched while building Arguments")

    monkeypatch.setattr(torch.cuda, "current_device", refuse)
    monkeypatch.setattr(torch.cuda, "is_available", refuse)
    monkeypatch.setattr(torch.cuda, "init", refuse)
    Arguments()
    Arguments(mlp_impl="grouped", gmm_backend="gg", memory_optimized_mlp=True)

    probe = (
        "import torch\n"
        "from megablocks.layers import Arguments, MoE, dMoE\n"
        "from megablocks.layers.arguments import Arguments as A\n"
        "A(); A(moe_num_experts=8, moe_top_k=2, mlp_impl='grouped')\n"
        "assert not torch.cuda.is_initialized()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_device_resolves_when_a_layer_is_built():
    expected = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    args = Arguments(hidden_size=8, ffn_hidden_size=8, moe_num_experts=2, fp16=False)
    assert common.device(args) == expected
    layer = MoE(args)
    assert all(p.device == expected for p in layer.parameters())
    assert common.device(Arguments(device="cpu")) == torch.device("cpu")
    assert common.device(Arguments(device=1)) == torch.device("cuda", 1)


BAD = [
    ("hidden_size", 0, ValueError, "hidden_size: expected an int >= 1, got 0"),
    ("hidden_size", 8.0, TypeError, "hidden_size: expected an int, got float"),
    ("ffn_hidden_size", True, TypeError, "ffn_hidden_size: expected an int, got bool"),
    ("moe_num_experts", -1, ValueError, "moe_num_experts: expected an int >= 1"),
    ("moe_top_k", 3, ValueError, "moe_top_k: expected at most moe_num_experts=2, got 3"),
    ("moe_capacity_factor", -0.5, ValueError, "moe_capacity_factor: expected a finite number >= 0"),
    ("moe_capacity_factor", "1", TypeError, "moe_capacity_factor: expected a number, got str"),
    ("moe_loss_weight", float("nan"), ValueError, "moe_loss_weight: expected a finite number"),
    ("moe_normalize_expert_weights", 0, ValueError, "moe_normalize_expert_weights: expected None or a p > 0"),
    ("moe_jitter_eps", 1.5, ValueError, r"moe_jitter_eps: expected a value in \[0, 1\)"),
    ("mlp_type", "moe", ValueError, r"mlp_type: expected one of \('mlp', 'glu'\), got 'moe'"),
    ("mlp_impl", "dense", ValueError, "mlp_impl: expected one of"),
    ("gmm_backend", "cutlass", ValueError, "gmm_backend: expected one of"),
    ("moe_router_score_function", "tanh", ValueError, "moe_router_score_function: expected one of"),
    ("moe_block_size", 48, ValueError, r"moe_block_size: expected one of \(16, 32, 64, 128\), got 48"),
    ("bias", 1, TypeError, "bias: expected a bool, got int"),
    ("bf16", True, ValueError, "fp16, bf16: expected at most one of them set"),
    ("activation_fn", None, TypeError, "activation_fn: expected a callable, got NoneType"),
    ("init_method", "normal", TypeError, "init_method: expected a callable"),
    ("fc_kwargs", [], TypeError, "fc_kwargs: expected a dict, got list"),
    ("device", 1.0, TypeError, "device: expected None, an int, a str or a torch.device"),
    ("loss_collector", [], TypeError, "loss_collector: expected None or a MoELossCollector"),
    ("num_layers_per_virtual_pipeline_stage", 0, ValueError, "num_layers_per_virtual_pipeline_stage"),
    ("moe_router_sinkhorn_iterations", 0, ValueError, "moe_router_sinkhorn_iterations"),
    ("moe_expert_bias", 1, TypeError, "moe_expert_bias: expected a bool, got int"),
    ("moe_router_bias", "yes", TypeError, "moe_router_bias: expected a bool, got str"),
]


@pytest.mark.parametrize("field, value, exc, match", BAD, ids=[f"{b[0]}={b[1]!r}" for b in BAD])
def test_invalid_fields(field, value, exc, match):
    with pytest.raises(exc, match=match):
        Arguments(**{"moe_num_experts": 2, field: value})


def test_invalid_combination_of_balancing_schemes():
    with pytest.raises(ValueError, match="moe_router_sinkhorn, moe_router_enable_expert_bias"):
        Arguments(moe_router_sinkhorn=True, moe_router_enable_expert_bias=True)


def test_clamped_swiglu_needs_glu_experts():
    """gpt-oss's clamped SwiGLU takes the gate and the linear branch: GLU experts only (their
    shared expert is gated too, and computes it); the per-expert and router biases default off."""
    from megablocks.layers.moe import MoE as Layer
    from megablocks.ops.activation import clamped_swiglu

    with pytest.raises(ValueError, match="activation_fn: clamped_swiglu is a GLU activation.*got 'mlp'"):
        Arguments(moe_num_experts=2, activation_fn=clamped_swiglu)
    with pytest.raises(ValueError, match="activation_fn: clamped_swiglu is a GLU activation.*got 'mlp'"):
        Arguments(moe_num_experts=2, activation_fn=clamped_swiglu, shared_expert=True, shared_expert_glu=True)
    args = Arguments(hidden_size=8, ffn_hidden_size=6, moe_num_experts=2, activation_fn=clamped_swiglu, mlp_type="glu",
                     shared_expert=True, shared_expert_hidden_size=6, moe_expert_bias=True, moe_router_bias=True,
                     fp16=False, device="cpu", bias=False)
    assert args.moe_expert_bias and args.moe_router_bias
    assert not Arguments().moe_expert_bias and not Arguments().moe_router_bias
    shared = Layer(args).shared_expert
    x = 4 * torch.randn(3, 8)
    expected = shared.down_proj(clamped_swiglu(shared.gate_proj(x), shared.up_proj(x)))
    assert torch.equal(shared(x), expected)


def test_valid_edge_values():
    args = Arguments(moe_num_experts=4, moe_top_k=4, moe_capacity_factor=1.25, moe_normalize_expert_weights=1,
                     moe_jitter_eps=0.0, moe_block_size=16, ffn_hidden_size=2880, shared_expert_hidden_size=64,
                     loss_collector=MoELossCollector(), device=torch.device("cpu"))
    assert args.shared_expert_hidden_size == 64


def test_from_megatron_core_names():
    ns = SimpleNamespace(
        hidden_size=64, ffn_hidden_size=256, moe_ffn_hidden_size=32, num_layers=4, num_moe_experts=8,
        moe_router_topk=2, moe_aux_loss_coeff=0.01, moe_z_loss_coeff=1e-3, moe_input_jitter_eps=None,
        moe_grouped_gemm=True, expert_model_parallel_size=1, pipeline_model_parallel_size=2, bf16=True,
        fp16=False, add_bias_linear=False, gated_linear_unit=True, activation_func=F.silu,
        moe_router_pre_softmax=False, moe_router_score_function="softmax", moe_router_dtype="fp32",
        moe_shared_expert_intermediate_size=48, moe_expert_capacity_factor=None, init_method_std=0.01,
        moe_router_enable_expert_bias=True, moe_router_bias_update_rate=1e-2, unrelated_field="ignored",
    )
    args = Arguments.from_megatron(ns)
    assert (args.hidden_size, args.ffn_hidden_size, args.num_layers) == (64, 32, 4)
    assert (args.moe_num_experts, args.moe_top_k) == (8, 2)
    assert (args.moe_loss_weight, args.moe_zloss_weight, args.moe_jitter_eps) == (0.01, 1e-3, None)
    assert args.mlp_impl == "grouped" and args.mlp_type == "glu" and args.activation_fn is F.silu
    assert args.bf16 and not args.fp16 and not args.bias
    assert args.moe_expert_model_parallelism is False and args.pipeline_model_parallel_size == 2
    assert args.moe_router_fp32 and args.moe_normalize_expert_weights == 1
    assert args.shared_expert and args.shared_expert_hidden_size == 48
    assert args.moe_capacity_factor == 0
    assert args.moe_router_enable_expert_bias and args.moe_router_bias_update_rate == 1e-2
    w = torch.empty(500, 500)
    args.init_method(w)
    assert math.isclose(w.std().item(), 0.01, rel_tol=0.05)
    args.output_layer_init_method(w)
    assert math.isclose(w.std().item(), 0.01 / math.sqrt(8), rel_tol=0.05)


def test_from_megatron_other_spellings():
    ns = SimpleNamespace(num_experts=4, moe_router_topk=1, swiglu=True, moe_router_load_balancing_type="sinkhorn",
                         expert_model_parallel_size=1, moe_router_pre_softmax=True, hidden_size=16,
                         ffn_hidden_size=24, fp16=False, bf16=False)
    args = Arguments.from_megatron(ns)
    assert args.moe_num_experts == 4 and args.mlp_type == "glu" and args.activation_fn is F.silu
    assert args.moe_router_sinkhorn and args.moe_loss_weight == 0.0
    assert args.moe_normalize_expert_weights is None  # top-1: nothing to renormalise

    # A MegaBlocks-style namespace (fields named as here) is copied as MegaBlocks copies it.
    mb = SimpleNamespace(moe_num_experts=4, moe_top_k=2, mlp_impl="grouped", moe_loss_weight=0.05,
                         memory_optimized_mlp=True, fp16=False, moe_jitter_eps=None)
    args = from_megatron(mb)
    assert (args.moe_num_experts, args.moe_top_k, args.mlp_impl) == (4, 2, "grouped")
    assert args.moe_loss_weight == 0.05 and args.memory_optimized_mlp and not args.fp16
    assert args.moe_normalize_expert_weights is None
    with pytest.raises(ValueError, match="moe_top_k"):
        from_megatron(SimpleNamespace(num_moe_experts=2, moe_router_topk=3))


def test_mlp_impl_auto_resolves_to_the_measured_fastest_path():
    from megablocks.layers.arguments import AUTO_MLP_IMPL, MLP_IMPLS

    args = Arguments(mlp_impl="auto", moe_num_experts=4)
    assert AUTO_MLP_IMPL in MLP_IMPLS
    assert args.mlp_impl == AUTO_MLP_IMPL == "grouped"
    assert args.gmm_backend == "auto"
