"""FP8 block-quantized experts for serving: `fused_moe(..., w1_scale=, w2_scale=)` against its
plain-torch definition (`fused_moe_fp8_reference`: the weights dequantized, every routed row
quantized per 1 x 128 tile as the kernels do, float32 products) and against the unquantized
layer within e4m3's error, at sizes that do not divide the 128-wide blocks, with empty experts;
and the checkpoint conversion from DeepSeek-V3's per-expert `weight_scale_inv` layout.
"""

import pytest
import torch

from megablocks.backend import fp8
from megablocks.integrations.checkpoint import dequantize_fp8, fp8_per_expert_to_fused
from megablocks.integrations.inference import fused_moe, fused_moe_fp8_reference, fused_moe_reference
from tests.conftest import DEVICE
from tests.utils import relative_errors

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _layer_limits(dtype):
    """(max, rms) relative limits of an FP8 layer against its reference from the same quantized
    operands. fp32 under the interpreter (exact FP8 dots): fp32 sums' order only. Otherwise each
    product's own error (an output rounding, or on Hopper the tensor cores' ~14-bit accumulation
    inside a 128-deep block, tests/utils.py) can flip an e4m3 rounding of the GLU output, one e4m3
    step (up to 12.5%) of that element: 16-bit-level limits (measured on an H200 in fp32:
    6.8e-3 / 1.8e-3)."""
    if dtype == torch.float32 and DEVICE != "cuda":
        return 1e-5, 1e-6
    return 4e-2, 8e-3


def _layer(t, h, f, e, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(dtype).to(DEVICE)
    w1 = (torch.randn(e, 2 * f, h, generator=g) / h**0.5).to(DEVICE)
    w2 = (torch.randn(e, h, f, generator=g) / f**0.5).to(DEVICE)
    gating = torch.randn(t, e, generator=g).to(DEVICE)
    if e > 2:
        gating[:, -1] = -1e4  # the last expert gets no token
    return x, w1, w2, gating


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t, h, f, e, k", [
    (13, 200, 136, 5, 2),  # H, F not multiples of 128; an empty expert
    (1, 128, 128, 4, 4),   # one token, top-k = E
    (40, 72, 40, 3, 1),    # smaller than one block
])
def test_fused_moe_fp8(t, h, f, e, k, dtype):
    x, w1, w2, gating = _layer(t, h, f, e, dtype, seed=t * 7 + h)
    q1, s1 = fp8.quantize_blocks(w1)
    q2, s2 = fp8.quantize_blocks(w2)
    out = fused_moe(x, q1, q2, gating, k, True, w1_scale=s1, w2_scale=s2)
    assert out.dtype == dtype and out.shape == (t, h)
    ref = fused_moe_fp8_reference(x, q1, q2, gating, k, True, s1, s2)
    # The same quantized operands and roundings (see _layer_limits).
    max_err, rms = relative_errors(out.double(), ref.double())
    max_tol, rms_tol = _layer_limits(dtype)
    assert max_err <= max_tol and rms <= rms_tol, (max_err, rms)
    # Against the unquantized layer: e4m3's error (3 mantissa bits, two operands per product).
    full = fused_moe_reference(x.float(), w1, w2, gating, k, True)
    _, rms = relative_errors(out.double(), full.double())
    assert 1e-3 < rms < 0.1, rms


@pytest.mark.parametrize("t, e, k", [(13, 5, 2), (300, 64, 8)])
def test_fused_moe_fp8_routings_agree(t, e, k):
    """The routed form's routing (the one-launch top-k and maps where they fit, else `row_maps`)
    and the general one (`routing_metadata` and `route`, with the policy's fused forms off) lay
    the rows out alike: the same output bit for bit."""
    from megablocks.policy import KernelPolicy

    x, w1, w2, gating = _layer(t, 136, 72, e, torch.float32, seed=t + e)
    q1, s1 = fp8.quantize_blocks(w1)
    q2, s2 = fp8.quantize_blocks(w2)
    routed = fused_moe(x, q1, q2, gating, k, True, w1_scale=s1, w2_scale=s2)
    general = fused_moe(x, q1, q2, gating, k, True, w1_scale=s1, w2_scale=s2,
                        policy=KernelPolicy(fused_forms=False))
    assert torch.equal(routed, general)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t, h, e, k", [(13, 200, 5, 2), (3, 128, 8, 2)])
def test_fused_moe_fp8_decode_glu_epilogue(t, h, e, k, dtype):
    """The GLU made and quantized in the up product's epilogue (`fp8_decode_glu_epilogue`, where
    it fits: decode sizes, F a multiple of 128) against the two launches (the policy off): on the
    GPU the same output bit for bit (the same decode tile); under the interpreter, whose default
    product takes other tiles, each within the layer's limits of the reference. With
    `fp8_decode_gather_prologue` too (the rows gathered and quantized in that kernel), bit for bit
    the epilogue alone. Also through `fp8_experts_from_ids` (transformers' experts path)."""
    from megablocks.integrations.inference import fp8_experts_from_ids, softmax_topk
    from megablocks.policy import KernelPolicy

    x, w1, w2, gating = _layer(t, h, 256, e, dtype, seed=t + h)
    q1, s1 = fp8.quantize_blocks(w1)
    q2, s2 = fp8.quantize_blocks(w2)
    assert fp8.glu_decode_fits(t * k, e, 2 * 256)
    epilogue, off = KernelPolicy(fp8_decode_glu_epilogue=True), KernelPolicy(fp8_decode_glu_epilogue=False)
    prologue = KernelPolicy(fp8_decode_glu_epilogue=True, fp8_decode_gather_prologue=True)
    on = fused_moe(x, q1, q2, gating, k, True, w1_scale=s1, w2_scale=s2, policy=epilogue)
    two = fused_moe(x, q1, q2, gating, k, True, w1_scale=s1, w2_scale=s2, policy=off)
    # The rows also gathered and quantized in the kernel's K loop: the same bits as the epilogue alone.
    gathered = fused_moe(x, q1, q2, gating, k, True, w1_scale=s1, w2_scale=s2, policy=prologue)
    assert torch.equal(gathered, on)
    ref = fused_moe_fp8_reference(x, q1, q2, gating, k, True, s1, s2)
    max_tol, rms_tol = _layer_limits(dtype)
    for out in (on, two):
        max_err, rms = relative_errors(out.double(), ref.double())
        assert max_err <= max_tol and rms <= rms_tol, (max_err, rms)
    weights, ids = softmax_topk(gating, k, True)
    by_ids = fp8_experts_from_ids(x, q1, s1, q2, s2, ids, weights, policy=epilogue)
    assert torch.equal(fp8_experts_from_ids(x, q1, s1, q2, s2, ids, weights, policy=prologue), by_ids)
    by_ids_two = fp8_experts_from_ids(x, q1, s1, q2, s2, ids, weights, policy=off)
    if DEVICE == "cuda":
        assert torch.equal(on, two) and torch.equal(by_ids, by_ids_two)
    max_err, _ = relative_errors(by_ids.double(), ref.double())
    assert max_err <= max_tol, max_err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("t", [64, 1000])
def test_fused_moe_fp8_cuda_graph_and_no_sync(t):
    """No host sync in the FP8 call (sync debug mode "error"), and a CUDA graph captured once
    replays it on new tokens and router logits (as serving engines run decode)."""
    x, w1, w2, gating = _layer(t, 256, 192, 8, torch.bfloat16, seed=t)
    q1, s1 = fp8.quantize_blocks(w1)
    q2, s2 = fp8.quantize_blocks(w2)
    call = lambda: fused_moe(x, q1, q2, gating, 2, True, w1_scale=s1, w2_scale=s2)  # noqa: E731
    call()  # compile the kernels outside the capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    x.copy_(torch.randn_like(x))
    gating.copy_(torch.randn_like(gating))
    graph.replay()
    assert torch.equal(out, call())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", [1, 2], ids=["after-wait", "early"])
@pytest.mark.parametrize("quantized", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("t", [64, 1000])
def test_fused_moe_programmatic_dependent_launch(t, quantized, mode, monkeypatch):
    """On Hopper the decode chain's kernels start while the kernel before them ends (PDL), each
    waiting for its results before it touches memory: eager and replayed from a CUDA graph, twenty
    times on new tokens and logits, the output equals the one launched without it bit for bit."""
    from megablocks.backend import launch

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    x, w1, w2, gating = _layer(t, 256, 192, 8, torch.bfloat16, seed=t + 1)
    w1, w2 = w1.to(torch.bfloat16), w2.to(torch.bfloat16)
    scales = {}
    if quantized:
        (w1, s1), (w2, s2) = fp8.quantize_blocks(w1), fp8.quantize_blocks(w2)
        scales = dict(w1_scale=s1, w2_scale=s2)
    call = lambda: fused_moe(x, w1, w2, gating, 2, True, **scales)  # noqa: E731
    monkeypatch.setattr(launch, "PDL", mode)
    assert launch.pdl_launch(x) == {"PDL": mode, "launch_pdl": True}
    call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    g = torch.Generator(device="cuda").manual_seed(t)
    for _ in range(20):
        x.copy_(torch.randn(x.shape, generator=g, device="cuda"))
        gating.copy_(torch.randn(gating.shape, generator=g, device="cuda"))
        graph.replay()
        eager = call()
        monkeypatch.setattr(launch, "PDL", 0)
        assert launch.pdl_launch(x) == {}
        plain = call()
        monkeypatch.setattr(launch, "PDL", mode)
        assert torch.equal(eager, plain) and torch.equal(out, plain)


def test_fused_moe_fp8_empty_and_checks():
    x, w1, w2, gating = _layer(0, 64, 32, 4, torch.float32, seed=1)
    q1, s1 = fp8.quantize_blocks(w1)
    q2, s2 = fp8.quantize_blocks(w2)
    assert fused_moe(x, q1, q2, gating, 2, True, w1_scale=s1, w2_scale=s2).shape == (0, 64)
    x, w1, w2, gating = _layer(3, 64, 32, 4, torch.float32, seed=2)
    with pytest.raises(ValueError, match="need both scales"):
        fused_moe(x, q1, q2, gating, 2, True, w1_scale=s1)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        fused_moe(x, w1, w2, gating, 2, True, w1_scale=s1, w2_scale=s2)
    with pytest.raises(ValueError, match="w1_scale: expected"):
        fused_moe(x, q1, q2, gating, 2, True, w1_scale=s1[:2], w2_scale=s2)
    with pytest.raises(ValueError, match="w2_scale: expected"):
        fused_moe(x, q1, q2, gating, 2, True, w1_scale=s1, w2_scale=s2[:2])
    with pytest.raises(TypeError, match="float32"):
        fused_moe(x, q1, q2, gating, 2, True, w1_scale=s1.double(), w2_scale=s2)
    with pytest.raises(ValueError, match="topk"):
        fused_moe(x, q1, q2, gating, 5, True, w1_scale=s1, w2_scale=s2)


def _checkpoint_experts(e, f, h, seed):
    """Per-expert FP8 weights with arbitrary (not power-of-two) inverse scales, as checkpoints hold."""
    g = torch.Generator().manual_seed(seed)

    def one(n, k):
        q = (torch.randn(n, k, generator=g) * 100).clamp(-448, 448).to(fp8.FP8_DTYPE)
        s = torch.rand(fp8.cdiv(n, fp8.Q), fp8.cdiv(k, fp8.Q), generator=g) * 1e-3 + 1e-4
        return q, s

    parts = {name: [one(*shape) for _ in range(e)] for name, shape in
             (("gate", (f, h)), ("up", (f, h)), ("down", (h, f)))}
    return {name: ([q for q, _ in v], [s for _, s in v]) for name, v in parts.items()}


@pytest.mark.parametrize("f", [256, 200], ids=["F%128=0", "F%128!=0"])
def test_fp8_per_expert_to_fused(f):
    e, h = 3, 160
    p = _checkpoint_experts(e, f, h, seed=f)
    w1, w1_scale, w2, w2_scale = fp8_per_expert_to_fused(*p["gate"], *p["up"], *p["down"])
    assert w1.shape == (e, 2 * f, h) and w2.shape == (e, h, f) and w1.dtype == w2.dtype == fp8.FP8_DTYPE
    assert w1_scale.shape == (e, fp8.cdiv(2 * f, 128), fp8.cdiv(h, 128)) and w2_scale.shape == (e, 2, fp8.cdiv(f, 128))
    want_gate = torch.stack([dequantize_fp8(q, s, torch.float32) for q, s in zip(*p["gate"])])
    want_up = torch.stack([dequantize_fp8(q, s, torch.float32) for q, s in zip(*p["up"])])
    want_down = torch.stack([dequantize_fp8(q, s, torch.float32) for q, s in zip(*p["down"])])
    got1 = fp8.dequantize_blocks(w1, w1_scale)
    assert torch.equal(fp8.dequantize_blocks(w2, w2_scale), want_down)  # always exact
    if f % 128 == 0:
        assert torch.equal(got1, torch.cat([want_gate, want_up], dim=1))
    else:  # re-quantized once: within half an e4m3 unit of each value (relative 2^-4; below e4m3's
        # normal range at its block's scale, half the subnormal spacing 2^-9 of that scale)
        want = torch.cat([want_gate, want_up], dim=1)
        scale = w1_scale.repeat_interleave(128, 1).repeat_interleave(128, 2)[:, :2 * f, :h]
        assert ((got1 - want).abs() <= want.abs() * 2.0**-4 + scale * 2.0**-10).all()
        assert not torch.equal(got1, want)


def test_dequantize_fp8_and_checks():
    q = torch.tensor([[1.0, -2.0], [0.5, 448.0]]).to(fp8.FP8_DTYPE)
    s = torch.tensor([[0.25]])
    assert torch.equal(dequantize_fp8(q, s, torch.float32), torch.tensor([[0.25, -0.5], [0.125, 112.0]]))
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        dequantize_fp8(q.float(), s)
    with pytest.raises(ValueError, match="one scale per 128 x 128 block"):
        dequantize_fp8(q, torch.ones(2, 1))
    p = _checkpoint_experts(2, 128, 128, seed=3)
    with pytest.raises(ValueError, match="same positive number of experts"):
        fp8_per_expert_to_fused(p["gate"][0][:1], p["gate"][1], *p["up"], *p["down"])
    with pytest.raises(ValueError, match=r"down\[0\]: expected shape"):
        fp8_per_expert_to_fused(*p["gate"], *p["up"], [d[:64] for d in p["down"][0]], p["down"][1])


def _fp8_experts_module(dtype_act="silu", **config_overrides):
    """transformers' fine-grained FP8 experts (`FP8Experts`, as its FP8 quantizer builds them for a
    Qwen3-MoE block) with random e4m3 weights and per-block scales; "megablocks" selected."""
    transformers = pytest.importorskip("transformers")
    fg = pytest.importorskip("transformers.integrations.finegrained_fp8")
    from transformers.integrations.moe import use_experts_implementation

    import megablocks.integrations.hf  # noqa: F401  (registers "megablocks")

    cfg = transformers.Qwen3MoeConfig(hidden_size=160, moe_intermediate_size=136, num_experts=5, num_experts_per_tok=2,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                      vocab_size=64, hidden_act=dtype_act, **config_overrides)
    cfg._experts_implementation = "megablocks"
    cls = use_experts_implementation(experts_class=fg.FP8Experts, experts_interface=fg.ALL_FP8_EXPERTS_FUNCTIONS)
    module = cls(cfg, block_size=(128, 128)).to(DEVICE)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(module, name)
            w.copy_((torch.randn(w.shape, generator=g) * 64).clamp(-448, 448).to(w.dtype).to(DEVICE))
            s = getattr(module, f"{name}_scale_inv")
            s.copy_((torch.rand(s.shape, generator=g) * 2e-4 + 1e-4).to(DEVICE))
    return module


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_transformers_fp8_experts(dtype):
    """experts_implementation='megablocks' on transformers' FP8Experts: our FP8 grouped GEMMs on its
    own e4m3 weights and scales, against the plain FP8 definition."""
    from megablocks.integrations import hf
    from megablocks.integrations.inference import fp8_experts_reference

    module = _fp8_experts_module()
    assert hf.fp8_unsupported_reason(module) is None
    g = torch.Generator().manual_seed(12)
    x = torch.randn(9, 160, generator=g).to(dtype).to(DEVICE)
    ids = torch.randint(0, 5, (9, 2), generator=g).to(DEVICE)
    weights = torch.rand(9, 2, generator=g).to(DEVICE)
    with torch.no_grad():
        out = module(x, ids, weights)
    ref = fp8_experts_reference(x, module.gate_up_proj, module.gate_up_proj_scale_inv, module.down_proj,
                                module.down_proj_scale_inv, ids, weights)
    assert out.dtype == dtype and out.shape == x.shape
    max_err, rms = relative_errors(out.double(), ref.double())
    max_tol, rms_tol = _layer_limits(dtype)
    assert max_err <= max_tol and rms <= rms_tol, (max_err, rms)


def test_transformers_fp8_experts_unsupported_falls_back():
    """A module the FP8 path does not cover (a clamped gate here) runs transformers' own forward."""
    from megablocks.integrations import hf

    module = _fp8_experts_module()
    module.limit = 7.0
    assert "clamped" in hf.fp8_unsupported_reason(module)
    calls = []
    original = hf.inference.fp8_experts_from_ids
    try:
        hf.inference.fp8_experts_from_ids = lambda *a, **k: calls.append(1)
        fallback = type(module).forward.__wrapped__
        seen = []
        type(module).forward.__wrapped__ = lambda self, *a: seen.append(a) or a[0]
        x = torch.randn(3, 160, device=DEVICE)
        with torch.no_grad():
            out = module(x, torch.zeros(3, 2, dtype=torch.long, device=DEVICE), torch.ones(3, 2, device=DEVICE))
        assert not calls and len(seen) == 1 and out is x
    finally:
        hf.inference.fp8_experts_from_ids = original
        type(module).forward.__wrapped__ = fallback


@pytest.mark.parametrize("decode_glu", [False, True], ids=["two-launches", "epilogue"])
def test_fp8_serving_compiles_fullgraph(decode_glu):
    """`fused_moe` and `fp8_experts_from_ids` on FP8 experts trace as one graph each
    (`torch.compile(fullgraph=True)`: each is one custom op with a fake) and compute bitwise what
    they compute eagerly."""
    from megablocks.integrations.inference import fp8_experts_from_ids
    from megablocks.policy import KernelPolicy

    T, H, F, E, k = 6, 64, 128, 4, 2
    g = torch.Generator().manual_seed(5)
    x = torch.randn(T, H, generator=g).to(DEVICE)
    q1, s1 = fp8.quantize_blocks((torch.randn(E, 2 * F, H, generator=g) * 0.05).to(DEVICE))
    q2, s2 = fp8.quantize_blocks((torch.randn(E, H, F, generator=g) * 0.05).to(DEVICE))
    gating = torch.randn(T, E, generator=g).to(DEVICE)
    ids = torch.randint(0, E, (T, k), generator=g).to(DEVICE)
    weights = torch.rand(T, k, generator=g).to(DEVICE)
    policy = KernelPolicy(fp8_decode_glu_epilogue=decode_glu)
    calls = (lambda x: fused_moe(x, q1, q2, gating, k, True, w1_scale=s1, w2_scale=s2, policy=policy),
             lambda x: fp8_experts_from_ids(x, q1, s1, q2, s2, ids, weights, policy=policy))
    for call in calls:
        torch._dynamo.reset()
        compiled = torch.compile(call, fullgraph=True, backend="aot_eager")(x)
        eager = call(x)
        assert torch.equal(compiled, eager) and eager.abs().sum() > 0


def test_fp8_experts_block_compiles_fullgraph():
    """A transformers sparse-MoE block whose FP8 experts run on megablocks
    (`experts_implementation="megablocks"`) traces as one graph and computes bitwise its eager
    output."""
    transformers = pytest.importorskip("transformers")
    fg = pytest.importorskip("transformers.integrations.finegrained_fp8")
    from transformers.integrations.moe import use_experts_implementation

    import megablocks.integrations.hf  # noqa: F401  (registers "megablocks")

    cfg = transformers.Qwen3MoeConfig(hidden_size=160, moe_intermediate_size=128, num_experts=4, num_experts_per_tok=2,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                      vocab_size=64, norm_topk_prob=True)
    cfg._experts_implementation = "megablocks"
    block = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock(cfg).to(DEVICE)
    cls = use_experts_implementation(experts_class=fg.FP8Experts, experts_interface=fg.ALL_FP8_EXPERTS_FUNCTIONS)
    experts = cls(cfg, block_size=(128, 128)).to(DEVICE)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, shape in (("gate_up_proj", (4, 256, 160)), ("down_proj", (4, 160, 128))):
            q, s = fp8.quantize_blocks(torch.randn(shape, generator=g).to(DEVICE) * 0.05)
            getattr(experts, name).data = q
            getattr(experts, f"{name}_scale_inv").data = s * 1.5
    block.experts = experts
    x = torch.randn(2, 5, 160, generator=g).to(DEVICE)
    torch._dynamo.reset()
    with torch.no_grad():
        eager, compiled = block(x), torch.compile(block, fullgraph=True, backend="aot_eager")(x)
    eager, compiled = (o[0] if isinstance(o, tuple) else o for o in (eager, compiled))
    assert torch.equal(compiled, eager) and eager.abs().sum() > 0


@pytest.mark.parametrize("ffn, apart", [(128, False), (128, True), (72, False)],
                         ids=["F%128=0", "F%128=0-apart", "F%128!=0"])
def test_convert_model_of_fp8_experts(ffn, apart):
    """`convert_model` on a block whose experts are transformers' FP8Experts: a dMoE with
    fp8='blockwise' whose bf16/fp32 parameters are the dequantized checkpoint and whose FP8 cache
    starts from the checkpoint's own values and scales (exactly, where F is a multiple of 128):
    the converted block computes what the FP8 block computes on megablocks' FP8 path."""
    transformers = pytest.importorskip("transformers")
    fg = pytest.importorskip("transformers.integrations.finegrained_fp8")
    from transformers.integrations.moe import use_experts_implementation

    from megablocks.integrations import hf
    from megablocks.policy import KernelPolicy

    cfg = transformers.Qwen3MoeConfig(hidden_size=160, moe_intermediate_size=ffn, num_experts=4, num_experts_per_tok=2,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                      vocab_size=64, norm_topk_prob=True)
    cfg._experts_implementation = "megablocks"
    block = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock(cfg).to(DEVICE)
    with torch.no_grad():
        block.gate.weight.normal_(0.0, 0.5)
    cls = use_experts_implementation(experts_class=fg.FP8Experts, experts_interface=fg.ALL_FP8_EXPERTS_FUNCTIONS)
    experts = cls(cfg, block_size=(128, 128)).to(DEVICE)
    g = torch.Generator().manual_seed(ffn)
    with torch.no_grad():
        for name, shape in (("gate_up_proj", (4, 2 * ffn, 160)), ("down_proj", (4, 160, ffn))):
            q, s = fp8.quantize_blocks(torch.randn(shape, generator=g).to(DEVICE) * 0.05)
            getattr(experts, name).data = q
            # Scales that are not powers of two, as checkpoints' are (x 1.5: the dequantized
            # values stay exact in bf16); quantized again, the values would round otherwise.
            getattr(experts, f"{name}_scale_inv").data = s * 1.5
    block.experts = experts
    x = torch.randn(2, 5, 160, generator=g).to(DEVICE)
    # apart: w1 and v1 multiplied apart (F past the policy's fused_glu_input_grad_max_ffn).
    overrides = dict(kernel_policy=KernelPolicy(fused_glu_input_grad_max_ffn=ffn - 1)) if apart else {}
    converted = hf.dmoe_from_block(block, **overrides).eval()
    mlp = converted.moe.experts.mlp
    assert converted.moe.args.fp8 == "blockwise"
    assert torch.equal(mlp.w2.view(4, ffn, 160).transpose(1, 2).float(),
                       dequantize_fp8(experts.down_proj, experts.down_proj_scale_inv, torch.float32))
    # The cache holds the checkpoint's values once: the down projection as stored (in x out, the
    # form the forward reads) and, F a multiple of 128, [gate; up] as stored where the layer
    # multiplies them stacked, else a copy of each half.
    cache, shape = mlp._fp8_weights, (4, -1, 160)
    held = [experts.down_proj, experts.down_proj_scale_inv]
    assert cache.transposed(mlp.w2, shape, alone=True)[0].data_ptr() == experts.down_proj.data_ptr()
    assert mlp.fp8_stacks_up_weights() == (ffn % 128 == 0 and not apart)
    if ffn % 128 == 0:
        held += [experts.gate_up_proj, experts.gate_up_proj_scale_inv]
        if not apart:
            assert cache.pair(mlp.w1, mlp.v1, shape, alone=True)[0][0].data_ptr() == experts.gate_up_proj.data_ptr()
        else:
            assert torch.equal(cache(mlp.v1, shape)[0].view(torch.uint8), experts.gate_up_proj[:, ffn:].view(torch.uint8))
    seeded_bytes = sum(t.numel() * t.element_size() for t in held)
    assert cache.nbytes() == seeded_bytes
    with torch.no_grad():
        want = block(x)
        want = want[0] if isinstance(want, tuple) else want
        got = converted(x)
        got = got[0] if isinstance(got, tuple) else got
    # Serving adds to the cache only what the checkpoint lacks: nothing, or the gate and up
    # halves quantized again (one form each, values and scales).
    added = 0 if ffn % 128 == 0 else 2 * (4 * ffn * 160 + 4 * 4 * -(-ffn // 128) * -(-160 // 128))
    assert cache.nbytes() == seeded_bytes + added, (cache.nbytes(), seeded_bytes, added)
    max_err, rms = relative_errors(got.double(), want.double())
    if ffn % 128 == 0:  # the same FP8 operands: fp32 rounding only
        assert max_err <= 1e-5 and rms <= 1e-6, (max_err, rms)
    else:  # the gate and up halves quantized again: one more e4m3 rounding of w1
        assert rms <= 0.08, rms
    # Fine-tuning the converted block: its first training step multiplies the same FP8 operands
    # (the backward's forms made from the checkpoint's values) and gives every expert weight a
    # gradient.
    converted.train()
    trained = converted(x)
    trained = trained[0] if isinstance(trained, tuple) else trained
    trained.float().square().sum().backward()
    assert torch.equal(trained.detach(), got)
    for name in ("w1", "v1", "w2"):
        grad = getattr(mlp, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
