"""`megablocks.policy.KernelPolicy`: the one place where kernel choices live.

The policy validates its fields, round-trips through a plain dict (a configuration file), is
carried by `Arguments` (a dict is accepted there), and no module of the package keeps a
process-wide switch (an upper-case bool) that would decide a kernel choice behind the policy.
"""

import importlib
import pkgutil

import pytest

import megablocks
from megablocks.layers.arguments import Arguments
from megablocks.policy import KernelPolicy, as_policy


def test_defaults_and_round_trip():
    policy = KernelPolicy()
    assert policy.fused_gather and policy.fused_forms and policy.inference_form and policy.small_routing
    assert policy.fused_glu_input_grad_max_ffn == 4096 and policy.route_max_work == 16384
    assert KernelPolicy.from_dict(policy.to_dict()) == policy
    changed = policy.replace(fused_gather=False, gather_min_ffn=0)
    assert changed.fused_gather is False and changed.gather_min_ffn == 0 and policy.fused_gather is True


@pytest.mark.parametrize("fields, error, match", [
    (dict(fused_gather=1), TypeError, "fused_gather: expected a bool"),
    (dict(route_max_work=True), TypeError, "route_max_work: expected an int"),
    (dict(gather_min_ffn=2.0), TypeError, "gather_min_ffn: expected an int"),
    (dict(fused_glu_input_grad_max_ffn=-1), ValueError, "expected an int >= 0"),
])
def test_bad_fields(fields, error, match):
    with pytest.raises(error, match=match):
        KernelPolicy(**fields)


def test_unknown_field_and_bad_type():
    with pytest.raises(ValueError, match="unknown fields \\['fused_gathr'\\]"):
        KernelPolicy.from_dict({"fused_gathr": False})
    with pytest.raises(TypeError, match="expected a KernelPolicy, a dict"):
        as_policy("fast")


def test_arguments_carry_a_policy():
    assert Arguments(fp16=False, device="cpu").kernel_policy == KernelPolicy()
    args = Arguments(fp16=False, device="cpu", kernel_policy={"fused_gather": False})
    assert args.kernel_policy == KernelPolicy(fused_gather=False)
    with pytest.raises(TypeError, match="kernel_policy"):
        Arguments(fp16=False, device="cpu", kernel_policy=["fused_gather"])
    with pytest.raises(ValueError, match="unknown fields"):
        Arguments(fp16=False, device="cpu", kernel_policy={"nope": 1})


def test_no_module_level_switches():
    switches = []
    for info in pkgutil.walk_packages(megablocks.__path__, "megablocks."):
        if info.name.startswith("megablocks.integrations.megatron"):
            continue  # needs megatron-core; it defines no switch either
        try:
            module = importlib.import_module(info.name)
        except ImportError:
            continue
        for name, value in vars(module).items():
            if name.isupper() and isinstance(value, bool):
                switches.append(f"{info.name}.{name}")
    assert not switches, f"process-wide switches outside the kernel policy: {switches}"


def test_exp_config_sets_a_layer_policy():
    """The exp/ trainer's model config passes a policy through its `moe` fields (as JSON would)."""
    model = pytest.importorskip("exp.model")
    config = model.GPTConfig(num_layers=1, hidden_size=16, num_attention_heads=2, mlp="dmoe",
                             moe={"moe_num_experts": 2, "kernel_policy": {"fused_gather": False}})
    assert model.moe_arguments(config, device="cpu").kernel_policy == KernelPolicy(fused_gather=False)
