"""dMoE's MLP experts in FP8 as one autograd node (`megablocks.ops.grouped_glu.fp8_grouped_mlp_experts`).

The node fuses the quantizers with the work next to them (the gather, the activation, the
activation's backward) and holds the combine; the fused quantizers are bitwise the passes they
replace, so where the activation is computed alike by its kernel and by torch (relu: exact) the
layer gives bitwise the output and every gradient with the node and with the composed FP8 ops
(gather, `fp8_gmm`, torch's activation, `fp8_gmm`, the combine), at hostile shapes; with silu and
the gelus (fp32 math compiled apart from torch's) within the FP8 products' tolerance. It is taken
exactly where its conditions hold, and nowhere else.
"""

import pytest
import torch
import torch.nn.functional as F

from megablocks.backend import fp8 as fp8_backend
from megablocks.layers.arguments import DEFAULT_ACTIVATION_FN
from megablocks.layers.dmoe import dMoE
from megablocks.ops import grouped_glu
from megablocks.policy import KernelPolicy
from tests.conftest import DEVICE
from tests.layers.moe_reference import GRAD_NAMES, make_args, randomize_bias
from tests.layers.test_dmoe import SHAPES
from tests.layers.test_one_node_experts import _count as count_calls
from tests.layers.test_one_node_experts import _step
from tests.utils import assert_close, assert_equal

DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [torch.float16])


def _count(monkeypatch):
    return count_calls(monkeypatch, "fp8_grouped_mlp_experts")


def _mlp_layer(shape, dtype, activation_fn=F.relu, seed=0, **kw):
    """An FP8 MLP dMoE of a test_dmoe SHAPES entry (random biases), an input and an output gradient."""
    T, lead, H, Fs, E, K, routing = shape
    args = make_args("triton", dtype, mlp_type="mlp", hidden_size=H, ffn_hidden_size=Fs, moe_num_experts=E,
                     moe_top_k=K, activation_fn=activation_fn, fp8="blockwise",
                     moe_normalize_expert_weights=1 if K > 1 else None, **kw)
    layer = dMoE(args)
    randomize_bias(layer)
    gen = torch.Generator(device=DEVICE).manual_seed(T * 41 + H + seed)
    x = torch.randn(*lead, H, device=DEVICE, dtype=dtype, generator=gen)
    if routing == "one":  # every token on one expert
        with torch.no_grad():
            layer.router.layer.weight.zero_()
            layer.router.layer.weight[0].fill_(1.0)
        x = x.abs() + 0.5
    return layer, x, torch.randn(*lead, H, device=DEVICE, dtype=dtype, generator=gen)


def _record_activation_kernels(monkeypatch, fused):
    """The node's activation kernels, their names appended to `fused` as they run."""
    for name in ("act_quantize_rows", "act_rows", "act_backward_quantize_rows_", "act_backward_rows_"):
        real = getattr(grouped_glu, name)
        monkeypatch.setattr(grouped_glu, name, lambda *a, _n=name, _r=real, **kw: fused.append(_n) or _r(*a, **kw))


def _both(layer, x, grad_out, calls, **policy):
    """{one_node_experts: (out, grads)} of one training step each, the node counted."""
    results = {}
    for on in (False, True):
        layer.args.kernel_policy = KernelPolicy(one_node_experts=on, **policy)
        before = len(calls)
        results[on] = _step(layer, x, grad_out)
        assert len(calls) - before == int(on), f"one_node_experts={on}: {len(calls) - before} FP8 MLP node calls"
    return results


@pytest.mark.parametrize("memory_optimized", [False, True], ids=["product-kept", "memory-optimized"])
@pytest.mark.parametrize("gather_min_ffn", [2**31 - 1, 0], ids=["token-rows-wgrad", "gathered-wgrad"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_fp8_mlp_node_is_the_composed_fp8_ops(shape, dtype, gather_min_ffn, memory_optimized, monkeypatch):
    layer, x, grad_out = _mlp_layer(shape, dtype, memory_optimized_mlp=memory_optimized)
    calls = _count(monkeypatch)
    fused = []
    _record_activation_kernels(monkeypatch, fused)
    results = _both(layer, x, grad_out, calls, fp8_gather_wgrad_min_ffn=gather_min_ffn)
    assert type(calls[0]).__name__ == "_Fp8GroupedMlpExpertsBackward", calls[0]
    # The activation quantized as it is made (and, memory-optimized, made again unquantized for
    # w2's gradient), its gradient as it is made.
    want = ["act_quantize_rows"] + ["act_rows"] * memory_optimized + ["act_backward_quantize_rows_"]
    assert sorted(fused) == sorted(want), fused
    assert_equal("out", results[True][0], results[False][0])
    for name in ("x", *GRAD_NAMES):
        off, on = results[False][1][name], results[True][1][name]
        if off is None:
            assert on is None, name
            continue
        assert_equal(f"grad {name}", on, off)
    assert results[True][0].abs().sum() > 0 and results[True][1]["w1"].abs().sum() > 0


@pytest.mark.parametrize("activation_fn", [F.silu, F.gelu, DEFAULT_ACTIVATION_FN],
                         ids=["silu", "gelu", "gelu_tanh-default"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp8_mlp_node_other_activations(activation_fn, dtype, monkeypatch):
    """Activations whose kernel math is compiled apart from torch's: within a layer's tolerance of
    the composed ops (an activation a unit of the last place apart moves the products after it,
    and may flip an e4m3 rounding)."""
    layer, x, grad_out = _mlp_layer((40, (40,), 48, 136, 4, 2, "random"), dtype, activation_fn=activation_fn)
    calls = _count(monkeypatch)
    results = _both(layer, x, grad_out, calls)
    pairs = [("out", results[True][0], results[False][0])]
    pairs += [(f"grad {name}", results[True][1][name], results[False][1][name]) for name in ("x", *GRAD_NAMES)
              if results[False][1][name] is not None]
    for name, on, off in pairs:
        # Relative to the tensor's scale: rms within 1e-3 (a 16-bit unit of the last place moved
        # here and there), max within 2e-2 (room for an e4m3 rounding flipped by one); a wrong
        # activation, weight or combine is off by O(1).
        on, off = on.double(), off.double()
        scale = off.abs().max().clamp_min(1e-30)
        rms = ((on - off).square().mean().sqrt() / off.square().mean().sqrt().clamp_min(1e-30)).item()
        assert rms <= 1e-3 and ((on - off).abs().max() / scale).item() <= 2e-2, (name, rms)


def test_fp8_mlp_node_conditions(monkeypatch):
    """Taken for MLP experts in FP8 with a fused activation and the policy's one_node_experts and
    fused_gather, in training and in inference (bitwise the training output there); not with
    expert biases, an activation the kernels do not compute, either policy field off, or FP8
    weight gradients (the GLU node's alone: MLP experts stay on the composed ops)."""
    calls = _count(monkeypatch)
    shape = (6, (6,), 40, 24, 4, 2, "random")

    def run(grad=True, policy=None, **kw):
        layer, x, _ = _mlp_layer(shape, torch.float32, **kw)
        if policy is not None:
            layer.args.kernel_policy = policy
        before = len(calls)
        with torch.set_grad_enabled(grad):
            out = layer(x.clone().requires_grad_(grad))
        if grad:
            out.square().sum().backward()
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.experts.mlp.parameters())
        return len(calls) - before, out

    assert run()[0] == 1
    assert run(grad=False)[0] == 1
    layer, x, _ = _mlp_layer(shape, torch.float32)
    trained = layer(x.clone().requires_grad_(True)).detach()
    with torch.no_grad():
        assert_equal("no_grad out", layer(x), trained)
    with torch.inference_mode():
        assert_equal("inference_mode out", layer(x), trained)
    assert run(moe_expert_bias=True)[0] == 0
    assert run(activation_fn=lambda t: F.relu(t) * 2)[0] == 0
    assert run(policy=KernelPolicy(one_node_experts=False))[0] == 0
    assert run(policy=KernelPolicy(fused_gather=False))[0] == 0
    assert run(policy=KernelPolicy(fp8_weight_grad=True, fp8_weight_grad_composed=True))[0] == 0
    assert run(policy=KernelPolicy(fp8_weight_grad=True))[0] == 1  # (the default) the node's
    assert run(memory_optimized_mlp=True)[0] == 1


def test_fp8_mlp_node_second_backward_is_refused():
    layer, x, grad_out = _mlp_layer((6, (6,), 40, 24, 4, 2, "random"), torch.float32)
    params = [p for p in layer.parameters() if p.requires_grad]
    out = layer(x)
    torch.autograd.grad(out, params, grad_out, retain_graph=True)
    with pytest.raises(RuntimeError, match=r"runs backward once.*one_node_experts=False"):
        torch.autograd.grad(out, params, grad_out)


def test_fp8_mlp_node_weight_grads_go_to_main_grad(monkeypatch):
    """With fp32 accumulators (gradient-accumulation fusion) the node adds w1's and w2's
    unquantized gradients into them: after two micro-batches, bitwise the sum of the two steps'
    `.grad` (in fp32), `.grad` itself untouched."""
    layer, x, grad_out = _mlp_layer((16, (16,), 40, 24, 4, 2, "random"), torch.float32)
    experts = layer.experts.mlp
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    x2 = torch.randn(x.shape, device=DEVICE, generator=gen)
    want = {}
    for xi in (x, x2):
        layer.zero_grad(set_to_none=True)
        layer(xi).backward(grad_out)
        for name in ("w1", "w2"):
            g = getattr(experts, name).grad.float()
            want[name] = g if name not in want else want[name] + g
    layer.zero_grad(set_to_none=True)
    for name in ("w1", "w2"):
        getattr(experts, name).main_grad = torch.zeros_like(getattr(experts, name), dtype=torch.float32)
    import megablocks.layers.mlp as mlp_module

    calls = []
    real = grouped_glu.fp8_grouped_mlp_experts
    monkeypatch.setattr(mlp_module, "fp8_grouped_mlp_experts",
                        lambda *a, **kw: calls.append(kw["accs"]) or real(*a, **kw))
    for xi in (x, x2):
        layer(xi).backward(grad_out)
    assert len(calls) == 2 and all(acc is not None for accs in calls for acc in accs), calls
    for name in ("w1", "w2"):
        p = getattr(experts, name)
        assert p.grad is None, name
        assert_equal(f"main_grad {name}", p.main_grad, want[name])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []),
                         ids=str)
@pytest.mark.parametrize("activation", ["relu", "silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("M, K", [(37, 300), (1, 128), (5, 1), (0, 16)])
def test_act_quantize_rows(M, K, activation, dtype):
    """The MLP activation quantized as it is made: (q, s) bitwise `quantize_rows` of the activation
    it writes, that activation within a few units of the last place of torch's (exact for relu),
    and the backward's gradient (written over h) likewise against torch's derivative."""
    from megablocks.ops.activation import act_backward_reference, act_reference

    gen = torch.Generator().manual_seed(M * 7 + K)
    h = (torch.randn(M, K, generator=gen) * 3).to(dtype).to(DEVICE)
    grad = torch.randn(M, K, generator=gen).to(dtype).to(DEVICE)
    q, s, a = fp8_backend.act_quantize_rows(h, activation, return_product=True)
    rq, rs = fp8_backend.quantize_rows(a)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)
    q2, s2 = fp8_backend.act_quantize_rows(h, activation)
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8)) and torch.equal(s2, s)
    assert_equal("act_rows", fp8_backend.act_rows(h, activation), a)  # the same kernel, not quantizing
    want = act_reference(h, activation)
    hb = h.clone()
    bq, bs = fp8_backend.act_backward_quantize_rows_(grad, hb, activation)
    rq, rs = fp8_backend.quantize_rows(hb)
    assert torch.equal(bq.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(bs, rs)
    hp = h.clone()
    assert fp8_backend.act_backward_rows_(grad, hp, activation) is hp
    assert_equal("act_backward_rows_", hp, hb)
    grad_want = act_backward_reference(grad, h, activation)
    if activation == "relu":
        assert_equal("relu", a, want)
        assert_equal("relu backward", hb, grad_want)
    else:
        assert_close(activation, a, want)
        assert_close(f"{activation} backward", hb, grad_want)


def test_act_quantize_rows_refuses():
    h = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="MLP experts' activations"):
        fp8_backend.act_quantize_rows(h, "clamped_swiglu")
    with pytest.raises(ValueError, match="activation"):
        fp8_backend.act_backward_quantize_rows_(h, h.clone(), "tanh")
    with pytest.raises(ValueError, match="shape"):
        fp8_backend.act_backward_quantize_rows_(h, h[:, :4].contiguous(), "relu")
    with pytest.raises(ValueError, match="contiguous last dim"):
        fp8_backend.act_quantize_rows(h.t(), "relu")
    with pytest.raises(TypeError):
        fp8_backend.act_quantize_rows(h, "relu", return_product=1)
    with pytest.raises(ValueError, match="MLP experts' activations"):
        fp8_backend.act_rows(h, "clamped_swiglu")
    with pytest.raises(ValueError, match="shape"):
        fp8_backend.act_backward_rows_(h, h[:, :4].contiguous(), "relu")
    with pytest.raises(ValueError, match="contiguous last dim"):
        fp8_backend.act_rows(h.t(), "relu")


@pytest.mark.parametrize("memory_optimized", [False, True], ids=["product-kept", "memory-optimized"])
def test_fp8_mlp_node_without_input_gradient(memory_optimized, monkeypatch):
    """An input that takes no gradient (a frozen layer below): the node writes the activation's
    gradient over h without quantizing it (no product reads it) and gives the weights bitwise the
    composed ops' gradients."""
    layer, x, grad_out = _mlp_layer((40, (40,), 48, 136, 4, 2, "random"), DTYPES[-1],
                                    memory_optimized_mlp=memory_optimized)
    calls = _count(monkeypatch)
    fused = []
    _record_activation_kernels(monkeypatch, fused)
    results = {}
    for on in (False, True):
        layer.args.kernel_policy = KernelPolicy(one_node_experts=on)
        layer.zero_grad(set_to_none=True)
        out = layer(x)
        out.backward(grad_out)
        results[on] = out.detach(), {n: p.grad for n, p in layer.named_parameters()}
    assert len(calls) == 1 and not x.requires_grad
    want = ["act_quantize_rows"] + ["act_rows"] * memory_optimized + ["act_backward_rows_"]
    assert sorted(fused) == sorted(want), fused
    assert_equal("out", results[True][0], results[False][0])
    assert set(results[True][1]) == set(results[False][1])
    for name, off in results[False][1].items():
        on = results[True][1][name]
        assert (on is None) == (off is None), name
        if off is not None:
            assert_equal(f"grad {name}", on, off)
    assert results[True][1]["experts.mlp.w1"].abs().sum() > 0


def test_fp8_mlp_weight_gradients_in_fp8(monkeypatch):
    """With the policy's `fp8_weight_grad` and `fp8_weight_grad_composed` (off by default: with
    `fp8_weight_grad` alone the node runs), MLP experts take the composed FP8 ops, whose weight
    gradients are FP8 products (`gmm_fp8_wgrad`, one for w1 and one for w2): the output and the
    input gradient bitwise the node's (relu: the same dgrad products), the weight gradients within
    FP8's error of the unquantized ones, and not equal to them."""
    from megablocks.ops import fp8 as ops_fp8

    layer, x, grad_out = _mlp_layer((40, (40,), 48, 136, 4, 2, "random"), torch.float32)
    calls = _count(monkeypatch)
    wgrads = []
    real = ops_fp8.gmm_fp8_wgrad
    monkeypatch.setattr(ops_fp8, "gmm_fp8_wgrad", lambda *a, **kw: wgrads.append(1) or real(*a, **kw))
    layer.args.kernel_policy = KernelPolicy()
    node = _step(layer, x, grad_out)
    layer.args.kernel_policy = KernelPolicy(fp8_weight_grad=True, fp8_weight_grad_composed=True)
    quantized = _step(layer, x, grad_out)
    assert len(calls) == 1 and len(wgrads) == 2, (len(calls), len(wgrads))
    assert_equal("out", quantized[0], node[0])
    assert_equal("grad x", quantized[1]["x"], node[1]["x"])
    for name in ("w1", "w2"):
        a, b = quantized[1][name].double(), node[1][name].double()
        rel = ((a - b).norm() / b.norm()).item()
        assert 1e-4 < rel < 0.08, (name, rel)
