"""The "megablocks" experts implementation and `convert_model` against stock transformers models.

Tiny random models built from configs (no download): Mixtral, Qwen2-MoE (shared expert, one
dense layer), Qwen3-MoE, OLMoE, DeepSeek-V3, GLM-4.5 and gpt-oss (router and expert biases, the
clamped SwiGLU). Logits, the input-embedding gradient and the gradients of the expert and router
weights (and biases) are compared with the stock model's (eager experts).
"""

import copy

import pytest
import torch

from tests.conftest import DEVICE
from tests.utils import assert_close, assert_grads_in_layout

transformers = pytest.importorskip("transformers")

from megablocks.integrations import hf  # noqa: E402
from megablocks.integrations.checkpoint import fused_to_dmoe  # noqa: E402
from megablocks.layers.activation_fn import fused_name  # noqa: E402

VOCAB = 61


def tiny_model(kind: str, dtype=torch.float32):
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2)
    if kind == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=24, num_local_experts=4, **common)
        cls = transformers.MixtralForCausalLM
    elif kind == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(intermediate_size=40, moe_intermediate_size=24, num_experts=4,
                                          shared_expert_intermediate_size=20, mlp_only_layers=[1],
                                          norm_topk_prob=False, **common)
        cls = transformers.Qwen2MoeForCausalLM
    elif kind == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(intermediate_size=40, moe_intermediate_size=24, num_experts=4,
                                          norm_topk_prob=True, head_dim=8, **common)
        cls = transformers.Qwen3MoeForCausalLM
    elif kind == "deepseek_v3":
        # 8 experts in 4 groups, top-2 within the best 2 groups, a dense first layer, one shared expert.
        cfg = transformers.DeepseekV3Config(
            intermediate_size=40, moe_intermediate_size=24, n_routed_experts=8, n_group=4, topk_group=2,
            n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
            q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
            **{**common, "num_hidden_layers": 3, "num_key_value_heads": 4})
        cls = transformers.DeepseekV3ForCausalLM
    elif kind == "glm4_moe":
        cfg = transformers.Glm4MoeConfig(intermediate_size=40, moe_intermediate_size=24, n_routed_experts=4,
                                         n_group=1, topk_group=1, n_shared_experts=1, first_k_dense_replace=1,
                                         routed_scaling_factor=1.5, norm_topk_prob=True, head_dim=8,
                                         **{**common, "num_hidden_layers": 3})
        cls = transformers.Glm4MoeForCausalLM
    elif kind == "gpt_oss":
        cfg = transformers.GptOssConfig(intermediate_size=24, num_local_experts=4, head_dim=8,
                                        layer_types=["full_attention"] * 2, **common)
        cls = transformers.GptOssForCausalLM
    else:
        cfg = transformers.OlmoeConfig(intermediate_size=24, num_experts=4, norm_topk_prob=False, **common)
        cls = transformers.OlmoeForCausalLM
    model = cls(cfg).to(device=DEVICE, dtype=dtype)
    with torch.no_grad():  # some routers start at zero: give them distinct scores
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0.0, 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # a trained bias: it changes the choice
                b.normal_(0.0, 0.1)
    return model


def run(model, ids, probe):
    """Logits and the gradients of sum(logits * probe) w.r.t. every parameter, by name."""
    model.zero_grad(set_to_none=True)
    logits = model(ids).logits
    (logits * probe).sum().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def experts_grads(grads, prefix):
    """(w1, v1, w2) gradients of a stock block's experts in the dMoE layout."""
    return fused_to_dmoe(grads[prefix + "experts.gate_up_proj"], grads[prefix + "experts.down_proj"])


@pytest.fixture
def references(monkeypatch):
    # Model-level tests run the plain-torch references of the ops (fast); the kernels under the
    # interpreter are covered by test_experts_implementation_under_interpreter.
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _inputs(seq=7):
    ids = torch.randint(0, VOCAB, (2, seq), device=DEVICE)
    probe = torch.randn(2, seq, VOCAB, device=DEVICE)
    return ids, probe


def test_registered():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    assert ALL_EXPERTS_FUNCTIONS["megablocks"] is hf.megablocks_experts_forward


def test_model_dispatches_to_megablocks(references):
    calls = []

    def spy(self, *args):
        calls.append(type(self).__name__)
        return hf.megablocks_experts_forward(self, *args)

    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register("megablocks_spy", spy)
    try:
        model = tiny_model("qwen3_moe")
        model.set_experts_implementation("megablocks_spy")
        model(_inputs()[0])
    finally:
        ExpertsInterface._global_mapping.pop("megablocks_spy")
    assert calls == ["Qwen3MoeExperts", "Qwen3MoeExperts"]


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_experts_implementation(kind, references):
    stock = tiny_model(kind).train()
    ours = copy.deepcopy(stock)
    ours.set_experts_implementation("megablocks")
    ids, probe = _inputs()
    logits, grads = run(stock, ids, probe)
    our_logits, our_grads = run(ours, ids, probe)
    assert_close("logits", our_logits, logits)
    assert set(our_grads) == set(grads)
    checked = [n for n in grads if "experts" in n or "gate.weight" in n or "embed_tokens" in n]
    assert any("gate_up_proj" in n for n in checked) and any("down_proj" in n for n in checked)
    for name in checked:
        assert_close(name, our_grads[name], grads[name])


def test_experts_implementation_under_interpreter():
    """One small case through the Triton kernels (interpreter on CPU)."""
    stock = tiny_model("mixtral")
    ours = copy.deepcopy(stock)
    ours.set_experts_implementation("megablocks")
    ids, probe = _inputs(seq=3)
    logits, grads = run(stock, ids, probe)
    our_logits, our_grads = run(ours, ids, probe)
    assert_close("logits", our_logits, logits)
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"):
        assert_close(name, our_grads[name], grads[name])


def test_experts_implementation_rejects_expert_parallel(references):
    model = tiny_model("olmoe")
    model.set_experts_implementation("megablocks")
    model.model.layers[0].mlp.experts._is_expert_parallel = True
    ids, _ = _inputs()
    with pytest.raises(NotImplementedError, match="expert parallelism"):
        model(ids)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
@pytest.mark.parametrize("mlp_impl", ["grouped", "sparse"])
def test_convert_model(kind, mlp_impl, references):
    stock = tiny_model(kind).train()
    ours = hf.convert_model(copy.deepcopy(stock), mlp_impl=mlp_impl, moe_block_size=16)
    blocks = [n for n, m in ours.named_modules() if isinstance(m, hf.MegaBlocksMoeBlock)]
    assert blocks == (["model.layers.0.mlp"] if kind == "qwen2_moe" else ["model.layers.0.mlp", "model.layers.1.mlp"])
    for block in blocks:  # transformers' activation module as the torch function the fused paths know
        assert fused_name(ours.get_submodule(block).moe.args.activation_fn) == "silu", block
    ids, probe = _inputs()
    logits, grads = run(stock, ids, probe)
    our_logits, our_grads = run(ours, ids, probe)
    assert_close("logits", our_logits, logits)
    assert_close("embed_tokens.weight", our_grads["model.embed_tokens.weight"], grads["model.embed_tokens.weight"])
    for block in blocks:
        expected = experts_grads(grads, block + ".")
        for name, exp in zip(("w1", "v1", "w2"), expected):
            key = f"{block}.moe.experts.mlp.{name}"
            assert_close(key, our_grads[key], exp)
        assert_close("router", our_grads[f"{block}.moe.router.layer.weight"], grads[f"{block}.gate.weight"])
    if kind == "qwen2_moe":
        key = "model.layers.0.mlp.shared_expert_gate.weight"
        assert_close(key, our_grads[key], grads[key])


@pytest.mark.parametrize("interpret", ["0", "1"], ids=["references", "kernels"])
@pytest.mark.parametrize("how", ["experts_implementation", "convert_model-grouped", "convert_model-sparse"])
@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_gradients_in_parameter_layout(kind, how, interpret, monkeypatch):
    """Every parameter's gradient, as `torch.autograd.grad` returns it, has its parameter's
    strides (else `.backward()` copies it into that layout): the transformers experts path and
    the converted dMoE blocks (with Qwen2-MoE's gated shared expert)."""
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
    model = tiny_model(kind).train()
    if how == "experts_implementation":
        model.set_experts_implementation("megablocks")
    else:
        model = hf.convert_model(model, mlp_impl=how.split("-")[1], moe_block_size=16)
    ids, probe = _inputs(seq=3)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad((model(ids).logits * probe).sum(), list(params.values()), allow_unused=True)
    used = {n: p for (n, p), g in zip(params.items(), grads) if g is not None}
    assert any("experts" in n or ".moe." in n for n in used), sorted(used)
    assert_grads_in_layout(f"{kind} {how}", used, [g for g in grads if g is not None])


def test_convert_model_shares_router_weight():
    model = tiny_model("mixtral")
    router = model.model.layers[0].mlp.gate.weight
    hf.convert_model(model)
    assert model.model.layers[0].mlp.moe.router.layer.weight is router


def test_convert_model_bad_input():
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="sparse-MoE blocks"):
        hf.convert_model(dense)
    with pytest.raises(TypeError, match="sparse-MoE block"):
        hf.dmoe_from_block(dense.model.layers[0].mlp)
    block = tiny_model("mixtral").model.layers[0].mlp
    with pytest.raises(ValueError, match="mlp_impl"):
        hf.dmoe_from_block(block, mlp_impl="dense")

    class SigmoidGroupRouter(torch.nn.Module):  # routing dMoE does not reproduce
        def __init__(self, weight, top_k):
            super().__init__()
            self.weight, self.top_k = weight, top_k

    block.gate = SigmoidGroupRouter(block.gate.weight, block.gate.top_k)
    with pytest.raises(TypeError, match="sparse-MoE block"):
        hf.dmoe_from_block(block)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_state_dict_round_trip_through_models(kind, references):
    """A stock checkpoint loads (strictly) into a converted model of other weights and back."""
    from megablocks.integrations.checkpoint import hf_to_megablocks_state_dict, megablocks_to_hf_state_dict

    stock = tiny_model(kind).eval()
    ids, _ = _inputs()
    expected = stock(ids).logits
    converted = hf.convert_model(tiny_model(kind)).eval()  # fresh random weights
    converted.load_state_dict(hf_to_megablocks_state_dict(stock.state_dict()), strict=True)
    assert_close("logits (converted, stock weights)", converted(ids).logits, expected)
    fresh = tiny_model(kind).eval()
    fresh.load_state_dict(megablocks_to_hf_state_dict(converted.state_dict(), num_experts=4), strict=True)
    assert_close("logits (stock, converted weights)", fresh(ids).logits, expected)


def _experts_module(has_gate, has_bias, is_transposed, e=4, h=24, f=20, dtype=torch.float32):
    """A transformers-style experts module with the layout flags, built from the decorator."""
    from transformers.integrations.moe import use_experts_implementation

    class Experts(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = e
            up = (2 * f if has_gate else f)
            name = "gate_up_proj" if has_gate else "up_proj"
            shape = (e, h, up) if is_transposed else (e, up, h)
            setattr(self, name, torch.nn.Parameter(torch.randn(shape, device=DEVICE, dtype=dtype) / h**0.5))
            self.down_proj = torch.nn.Parameter(
                torch.randn((e, f, h) if is_transposed else (e, h, f), device=DEVICE, dtype=dtype) / f**0.5)
            if has_bias:
                setattr(self, name + "_bias", torch.nn.Parameter(torch.randn(e, up, device=DEVICE, dtype=dtype)))
                self.down_proj_bias = torch.nn.Parameter(torch.randn(e, h, device=DEVICE, dtype=dtype))
            self.act_fn = torch.nn.functional.silu

        def forward(self, hidden_states, top_k_index, top_k_weights):
            raise AssertionError("the eager forward is not under test")

    decorated = use_experts_implementation(Experts, has_gate=has_gate, has_bias=has_bias, is_transposed=is_transposed)
    config = transformers.PretrainedConfig()
    return decorated(config)


@pytest.mark.parametrize("has_gate,has_bias,is_transposed", [(True, False, False), (True, True, True),
                                                              (False, True, False), (False, False, True)])
@pytest.mark.parametrize("t,k", [(0, 2), (1, 1), (9, 4), (11, 2)])
def test_experts_forward_layouts(has_gate, has_bias, is_transposed, t, k, references):
    """Against transformers' own batched_mm implementation, forward and every gradient."""
    experts = _experts_module(has_gate, has_bias, is_transposed)
    x = torch.randn(t, 24, device=DEVICE, requires_grad=True)
    ids = torch.zeros(t, k, dtype=torch.long, device=DEVICE)
    for i in range(t):
        ids[i] = torch.randperm(4, device=DEVICE)[:k]
    ids[: t // 2] = torch.arange(k, device=DEVICE)  # experts 0..k-1 crowded, expert 3 often empty
    weights = torch.rand(t, k, device=DEVICE, requires_grad=True)
    probe = torch.randn(t, 24, device=DEVICE)
    results = {}
    for impl in ("batched_mm", "megablocks"):
        experts.config._experts_implementation = impl
        for p in (x, weights, *experts.parameters()):
            p.grad = None
        out = experts(x, ids, weights)
        (out * probe).sum().backward()
        results[impl] = (out.detach(), x.grad, weights.grad, {n: p.grad for n, p in experts.named_parameters()})
    (out, dx, dw, grads), (ref, ref_dx, ref_dw, ref_grads) = results["megablocks"], results["batched_mm"]
    # Two whole expert layers (gather, two products, activation, weighted sum), each with its own
    # fp32 rounding, the reference too (transformers' fp32 batched_mm): the layer limits.
    assert_close("out", out, ref, family="layer")
    if t:
        assert_close("hidden_states.grad", dx, ref_dx, family="layer")
        assert_close("top_k_weights.grad", dw, ref_dw, family="layer")
        for name in ref_grads:
            assert_close(f"{name}.grad", grads[name], ref_grads[name], family="layer")


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 runs on the GPU")
def test_experts_forward_bf16():
    experts = _experts_module(True, False, False, e=8, h=256, f=320, dtype=torch.bfloat16)
    x = torch.randn(64, 256, device=DEVICE, dtype=torch.bfloat16)
    ids = torch.randint(0, 8, (64, 2), device=DEVICE)
    weights = torch.rand(64, 2, device=DEVICE)
    experts.config._experts_implementation = "megablocks"
    out = experts(x, ids, weights)
    fp32 = _experts_module(True, False, False, e=8, h=256, f=320)
    fp32.load_state_dict({k: v.float() for k, v in experts.state_dict().items()})
    fp32.config._experts_implementation = "batched_mm"
    ref = fp32(x.float(), ids, weights)
    assert_close("out (bf16 vs fp32 batched_mm)", out, ref.to(torch.bfloat16))


def test_greedy_generation_matches(references):
    """Decoding (one token per step, with a KV cache) picks the stock model's tokens."""
    stock = tiny_model("qwen3_moe").eval()
    ours = copy.deepcopy(stock)
    ours.set_experts_implementation("megablocks")
    prompt = torch.randint(0, VOCAB, (2, 5), device=DEVICE)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = stock.generate(prompt, **kw)
    assert expected.shape[1] == 11
    assert torch.equal(ours.generate(prompt, **kw), expected)


# --------------------------------------------------------------------------------------------------
# The routed form without autograd (the kernel policy's `fused_forms`): routing from the given ids
# (`routing_maps`), the GLU in the first grouped GEMM's epilogue.


def _activation(name):
    from transformers.activations import ACT2FN

    return {"F.silu": torch.nn.functional.silu, "nn.GELU(tanh)": torch.nn.GELU(approximate="tanh"),
            "nn.ReLU": torch.nn.ReLU()}.get(name) or ACT2FN[name]


@pytest.fixture
def fused_forms(monkeypatch):
    from megablocks.integrations import inference

    if not hasattr(__import__("transformers.integrations.moe", fromlist=["x"]), "_default_apply_gate"):
        pytest.skip("this transformers release has no default experts gate to recognise")

    calls = []
    impl = inference._experts_from_ids_impl
    monkeypatch.setattr(inference, "_experts_from_ids_impl", lambda *a: calls.append(1) or impl(*a))
    return calls


@pytest.mark.parametrize("act", ["F.silu", "silu", "swish", "gelu", "gelu_pytorch_tanh", "gelu_new",
                                 "nn.GELU(tanh)", "nn.ReLU"])
@pytest.mark.parametrize("is_transposed", [False, True])
@pytest.mark.parametrize("t,k", [(1, 1), (9, 4), (11, 2)])
def test_experts_inference_form(t, k, is_transposed, act, fused_forms):
    """Under no_grad, against transformers' batched_mm; ids may repeat within a token."""
    experts = _experts_module(True, False, is_transposed)
    experts.act_fn = _activation(act)
    x = torch.randn(t, 24, device=DEVICE)
    ids = torch.randint(0, 4, (t, k), device=DEVICE)
    ids[: t // 2] = torch.arange(k, device=DEVICE) % 4
    weights = torch.rand(t, k, device=DEVICE)
    with torch.no_grad():
        experts.config._experts_implementation = "batched_mm"
        ref = experts(x, ids, weights)
        experts.config._experts_implementation = "megablocks"
        out = experts(x, ids, weights)
    assert fused_forms == [1], "the decode form was not taken"
    assert_close("out", out, ref)


def test_experts_inference_form_only_where_exact(fused_forms):
    """Autograd, a custom gate, biases or an activation it does not compute: the general path."""
    experts = _experts_module(True, False, False)
    experts.config._experts_implementation = "megablocks"
    x = torch.randn(5, 24, device=DEVICE)
    ids = torch.randint(0, 4, (5, 2), device=DEVICE)
    weights = torch.rand(5, 2, device=DEVICE)
    experts(x, ids, weights)  # the parameters need a gradient
    with torch.no_grad():
        experts.act_fn = torch.tanh
        experts(x, ids, weights)
        biased = _experts_module(True, True, False)
        biased.config._experts_implementation = "megablocks"
        biased(x, ids, weights)
        type(experts)._apply_gate = lambda self, h: torch.nn.functional.silu(h[..., ::2]) * h[..., 1::2]
        experts.act_fn = torch.nn.functional.silu
        experts(x, ids, weights)
    assert fused_forms == []
    with torch.no_grad():  # the same module with transformers' gate back: taken
        del type(experts)._apply_gate
        from transformers.integrations.moe import _default_apply_gate

        type(experts)._apply_gate = _default_apply_gate
        experts(x, ids, weights)
    assert fused_forms == [1]


def test_greedy_generation_matches_with_fused_forms(fused_forms):
    stock = tiny_model("qwen3_moe").eval()
    ours = copy.deepcopy(stock)
    ours.set_experts_implementation("megablocks")
    prompt = torch.randint(0, VOCAB, (2, 5), device=DEVICE)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, **kw), stock.generate(prompt, **kw))
    assert len(fused_forms) >= 2 * 6, "the decode form was not taken while generating"


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 runs on the GPU")
def test_experts_inference_form_bf16(fused_forms):
    experts = _experts_module(True, False, False, e=16, h=512, f=384, dtype=torch.bfloat16)
    x = torch.randn(64, 512, device=DEVICE, dtype=torch.bfloat16)
    ids = torch.randint(0, 16, (64, 4), device=DEVICE)
    weights = torch.rand(64, 4, device=DEVICE)
    experts.config._experts_implementation = "megablocks"
    with torch.no_grad():
        out = experts(x, ids, weights)
    assert fused_forms == [1]
    fp32 = _experts_module(True, False, False, e=16, h=512, f=384)
    fp32.load_state_dict({k: v.float() for k, v in experts.state_dict().items()})
    fp32.config._experts_implementation = "batched_mm"
    with torch.no_grad():
        ref = fp32(x.float(), ids, weights)
    assert_close("out (bf16 vs fp32 batched_mm)", out, ref.to(torch.bfloat16))


def test_register_with_a_policy(fused_forms):
    """`register(name, policy=...)`: the same forward under another name with its own kernel
    choices; with `fused_forms` off the routed form is not taken, the values are the same."""
    from megablocks.policy import KernelPolicy

    hf.register("megablocks_unfused", policy=KernelPolicy(fused_forms=False))
    experts = _experts_module(True, False, False)
    x = torch.randn(7, 24, device=DEVICE)
    ids = torch.randint(0, 4, (7, 2), device=DEVICE)
    weights = torch.rand(7, 2, device=DEVICE)
    with torch.no_grad():
        experts.config._experts_implementation = "megablocks"
        fused = experts(x, ids, weights)
        assert fused_forms == [1]
        experts.config._experts_implementation = "megablocks_unfused"
        unfused = experts(x, ids, weights)
    assert fused_forms == [1], "the routed form was taken with fused_forms off"
    assert_close("out", unfused, fused)
    with pytest.raises(TypeError, match="policy"):
        hf.register("megablocks_bad", policy="fast")


@pytest.mark.parametrize("kind", ["deepseek_v3", "glm4_moe"])
@pytest.mark.parametrize("mlp_impl", ["grouped", "sparse"])
def test_convert_deepseek_v3_and_glm45(kind, mlp_impl, references):
    """DeepSeek-V3 and GLM-4.5 convert to dMoE (sigmoid scores, the expert-score bias, group-limited
    top-k, the routed scaling factor, their dense first layer and shared experts kept) with the
    stock model's logits and every gradient."""
    stock = tiny_model(kind).train()
    ours = hf.convert_model(copy.deepcopy(stock), mlp_impl=mlp_impl, moe_block_size=16)
    blocks = [n for n, m in ours.named_modules() if isinstance(m, hf.MegaBlocksMoeBlock)]
    assert blocks == ["model.layers.1.mlp", "model.layers.2.mlp"], blocks  # layer 0 stays dense
    moe = ours.get_submodule(blocks[0]).moe
    gate = stock.get_submodule(blocks[0]).gate
    assert moe.router.expert_bias is not None and torch.equal(moe.router.expert_bias, gate.e_score_correction_bias)
    assert moe.args.moe_router_topk_scaling_factor == gate.routed_scaling_factor
    ids, probe = _inputs()
    logits, grads = run(stock, ids, probe)
    our_logits, our_grads = run(ours, ids, probe)
    assert_close("logits", our_logits, logits, family="layer")
    for block in blocks:
        for name, exp in zip(("w1", "v1", "w2"), experts_grads(grads, block + ".")):
            key = f"{block}.moe.experts.mlp.{name}"
            assert_close(key, our_grads[key], exp, family="layer")
        assert_close("router", our_grads[f"{block}.moe.router.layer.weight"], grads[f"{block}.gate.weight"],
                     family="layer")
        for name in ("gate_proj", "up_proj", "down_proj"):
            key = f"{block}.shared_experts.{name}.weight"
            assert_close(key, our_grads[key], grads[key], family="layer")
    dense = "model.layers.0.mlp.gate_proj.weight"
    assert_close(dense, our_grads[dense], grads[dense], family="layer")
    # The state dict keeps the model's own names for what was not converted.
    assert "model.layers.1.mlp.shared_experts.up_proj.weight" in ours.state_dict()


def tiny_gpt_oss(**config):
    """A tiny gpt-oss with random router and expert biases (the model zero-initialises the expert
    biases): std 4 puts some gate and up values past the clamped SwiGLU's limits of ±7."""
    model = tiny_model("gpt_oss") if not config else _gpt_oss_model(**config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate_up_proj_bias", "down_proj_bias")):
                p.normal_(0.0, 4.0)
            elif name.endswith("router.bias"):
                p.normal_(0.0, 1.0)
            elif name.endswith("router.weight"):
                p.normal_(0.0, 0.5)
    return model


def _gpt_oss_model(**config):
    cfg = transformers.GptOssConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                    num_key_value_heads=2, num_experts_per_tok=2, intermediate_size=24,
                                    num_local_experts=4, head_dim=8, layer_types=["full_attention"], **config)
    return transformers.GptOssForCausalLM(cfg).to(DEVICE)


@pytest.mark.parametrize("interpret", ["0", "1"], ids=["references", "kernels"])
@pytest.mark.parametrize("mlp_impl", ["grouped", "sparse"])
def test_convert_gpt_oss(mlp_impl, interpret, monkeypatch):
    """gpt-oss converts to dMoE (router bias, per-expert biases, the clamped SwiGLU, gate/up
    de-interleaved) with the stock model's logits and the gradients of every converted parameter:
    the router's weight and bias, w1, v1, w2 and their biases (the stock gradients converted to
    the dMoE layout), and the embeddings'; with the ops' torch references and with the kernels."""
    from megablocks.integrations.checkpoint import gpt_oss_to_dmoe

    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
    elif interpret == "0":
        pytest.skip("the references are the CPU path")
    stock = tiny_gpt_oss().train()
    ours = hf.convert_model(copy.deepcopy(stock), mlp_impl=mlp_impl, moe_block_size=16)
    blocks = [n for n, m in ours.named_modules() if isinstance(m, hf.MegaBlocksMoeBlock)]
    assert blocks == ["model.layers.0.mlp", "model.layers.1.mlp"], blocks
    moe = ours.get_submodule(blocks[0]).moe
    assert moe.args.activation_fn is hf.clamped_swiglu and moe.args.moe_expert_bias and moe.args.moe_router_bias
    ids, probe = _inputs(seq=7 if interpret == "0" else 3)
    logits, grads = run(stock, ids, probe)
    our_logits, our_grads = run(ours, ids, probe)
    assert_close("logits", our_logits, logits, family="layer")
    assert_close("embed_tokens.weight", our_grads["model.embed_tokens.weight"], grads["model.embed_tokens.weight"],
                 family="layer")
    for block in blocks:
        prefix = block + ".experts."
        expected = gpt_oss_to_dmoe(*(grads[prefix + n] for n in ("gate_up_proj", "gate_up_proj_bias", "down_proj",
                                                                 "down_proj_bias")))
        for name, exp in zip(("w1", "v1", "w2", "w1_bias", "v1_bias", "w2_bias"), expected):
            key = f"{block}.moe.experts.mlp.{name}"
            assert_close(key, our_grads[key], exp, family="layer")
        for name in ("weight", "bias"):
            assert_close(f"router {name}", our_grads[f"{block}.moe.router.layer.{name}"],
                         grads[f"{block}.router.{name}"], family="layer")
    # Some of the stock experts' inputs pass the clamps (their gradient is zero there).
    experts = stock.model.layers[0].mlp.experts
    h = stock.model.layers[0].post_attention_layernorm(torch.randn(64, 32, device=DEVICE))
    gate_up = torch.einsum("th,ehf->etf", h, experts.gate_up_proj) + experts.gate_up_proj_bias[:, None]
    assert bool((gate_up[..., ::2] > 7).any()) and bool((gate_up[..., 1::2].abs() > 7).any())


def test_convert_gpt_oss_shares_what_the_layout_allows():
    """The router's weight and bias and the down projection's bias are the model's Parameters;
    w2 views the down projection's storage; gate/up are copies. The converted state dict loads
    back and the block keeps the decoder layer's two-value output."""
    model = tiny_gpt_oss()
    block = model.model.layers[0].mlp
    router, experts = block.router, block.experts
    down_ptr = experts.down_proj.data_ptr()
    hf.convert_model(model)
    moe = model.model.layers[0].mlp.moe
    assert moe.router.layer.weight is router.weight and moe.router.layer.bias is router.bias
    assert moe.experts.mlp.w2_bias is experts.down_proj_bias
    assert moe.experts.mlp.w2.data_ptr() == down_ptr
    assert moe.experts.mlp.w1.data_ptr() != experts.gate_up_proj.data_ptr()
    out = model.model.layers[0].mlp(torch.randn(2, 3, 32, device=DEVICE))
    assert isinstance(out, tuple) and out[0].shape == (2, 3, 32) and out[1] is None
    keys = [k for k in model.state_dict() if k.startswith("model.layers.0.mlp.")]
    assert sorted(keys) == sorted(f"model.layers.0.mlp.moe.{k}" for k in (
        "router.layer.weight", "router.layer.bias", "experts.mlp.w1", "experts.mlp.v1", "experts.mlp.w2",
        "experts.mlp.w1_bias", "experts.mlp.v1_bias", "experts.mlp.w2_bias")), keys
    model.load_state_dict(model.state_dict(), strict=True)


def test_convert_gpt_oss_names_what_is_missing():
    """A clamped SwiGLU of other limits than gpt-oss's is refused with its values named."""
    model = tiny_gpt_oss()
    # Set on the experts themselves: some transformers releases fix the limit in the module
    # whatever the config says, and the conversion reads what the module computes with.
    for layer in model.model.layers:
        layer.mlp.experts.limit = 5.0
    with pytest.raises(ValueError, match="swiglu_limit=5.0, swiglu_alpha=1.702"):
        hf.convert_model(model)
    assert hf.unsupported_reason(tiny_gpt_oss().model.layers[0].mlp) is None

