"""dMoE's GLU experts in FP8 as one autograd node (`megablocks.ops.grouped_glu.fp8_grouped_glu_experts`).

The node fuses the quantizers with the work next to them (the gather, the GLU) and writes the
GLU's gradient over its saved h1 and h2; the fused quantizers are bitwise the two passes they
replace, so with it on the layer must give bitwise the output and input gradient it gives with
it off (the composed FP8 ops: gather, `fp8_gmm` twice, `glu`, `fp8_gmm`), and the same weight
and router gradients, at hostile shapes (sizes not multiples of 128, empty experts, every token on
one expert); it must be taken exactly where its conditions hold and nowhere else, and keep
each weight's quantization once per optimizer step.
"""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from megablocks.layers.dmoe import dMoE
from megablocks.ops import fp8, grouped_glu
from megablocks.policy import KernelPolicy
from tests.conftest import DEVICE
from tests.layers.moe_reference import GRAD_NAMES, make_args, randomize_bias
from tests.layers.test_dmoe import SHAPES
from tests.layers.test_one_node_experts import _count as count_calls
from tests.layers.test_one_node_experts import _step
from tests.utils import assert_close, assert_equal

DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [torch.float16])


def _count(monkeypatch):
    return count_calls(monkeypatch, "fp8_grouped_glu_experts")


@pytest.mark.parametrize("gather_min_ffn", [2**31 - 1, 0], ids=["token-rows-wgrad", "gathered-wgrad"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_fp8_node_is_the_composed_fp8_ops(shape, dtype, gather_min_ffn, monkeypatch):
    T, lead, H, Fs, E, K, routing = shape
    args = make_args("triton", dtype, mlp_type="glu", hidden_size=H, ffn_hidden_size=Fs, moe_num_experts=E,
                     moe_top_k=K, activation_fn=F.silu, fp8="blockwise",
                     moe_normalize_expert_weights=1 if K > 1 else None)
    layer = dMoE(args)
    randomize_bias(layer)
    gen = torch.Generator(device=DEVICE).manual_seed(T * 37 + H)
    x = torch.randn(*lead, H, device=DEVICE, dtype=dtype, generator=gen)
    if routing == "one":  # every token on one expert: a router that prefers expert 0 by far
        with torch.no_grad():
            layer.router.layer.weight.zero_()
            layer.router.layer.weight[0].fill_(1.0)
        x = x.abs() + 0.5
    grad_out = torch.randn(*lead, H, device=DEVICE, dtype=dtype, generator=gen)
    calls = _count(monkeypatch)
    gathers, combines = [], []
    real_gather = grouped_glu._gather_rows._impl
    # Weighted: the combine's backward (the rows' output gradient); else the rows for the weight gradients.
    monkeypatch.setattr(grouped_glu, "_gather_rows", SimpleNamespace(
        _impl=lambda *a: (gathers if a[3] is None else combines).append(a[0].shape) or real_gather(*a)))
    # The combine's backward gathers, weights and quantizes the rows in one pass.
    real_quantize = grouped_glu.gather_quantize_rows
    monkeypatch.setattr(grouped_glu, "gather_quantize_rows", lambda *a, **kw: (
        combines.append(a[0].shape) if len(a) > 3 and a[3] is not None else None) or real_quantize(*a, **kw))
    results = {}
    for on in (False, True):
        # F at least the policy's bound: the node's up weight gradients read a gathered copy of the
        # rows. Unquantized weight gradients, as the composed ops make them by default.
        layer.args.kernel_policy = KernelPolicy(one_node_experts=on, fp8_gather_wgrad_min_ffn=gather_min_ffn,
                                                fp8_weight_grad=False)
        results[on] = _step(layer, x, grad_out)
        assert len(calls) == int(on), f"one_node_experts={on}: {len(calls)} FP8 node calls"
    assert type(calls[0]).__name__ == "_Fp8GroupedGluExpertsBackward", calls[0]
    assert len(gathers) == int(Fs >= gather_min_ffn), gathers
    assert len(combines) == 1, combines  # the combine in the node: its backward made there
    assert_equal("out", results[True][0], results[False][0])
    assert_equal("grad x", results[True][1]["x"], results[False][1]["x"])
    for name in GRAD_NAMES:
        off, on = results[False][1][name], results[True][1][name]
        if off is None:
            assert on is None, name
            continue
        # The weight gradients read the token rows through the maps instead of a gathered copy:
        # the same products, summed in the same order.
        assert_equal(f"grad {name}", on, off)
    assert results[True][0].abs().sum() > 0


def test_fp8_node_conditions(monkeypatch):
    """Taken with a fused activation and the policy's one_node_experts and fused_gather, in training
    and without a gradient to record (inference); not with biases, a non-fused activation, or
    either policy field off."""
    calls = _count(monkeypatch)
    size = dict(hidden_size=40, ffn_hidden_size=24, moe_num_experts=4, moe_top_k=2)
    x = torch.randn(6, 40, device=DEVICE)

    def run(grad=True, policy=None, **kw):
        kw.setdefault("activation_fn", F.silu)
        layer = dMoE(make_args("triton", torch.float32, mlp_type="glu", fp8="blockwise", **size, **kw))
        if policy is not None:
            layer.args.kernel_policy = policy
        before = len(calls)
        with torch.set_grad_enabled(grad):
            out = layer(x.clone().requires_grad_(grad))
        if grad:
            out.square().sum().backward()
            assert all(p.grad is not None for p in layer.experts.mlp.parameters())
        return len(calls) - before

    assert run() == 1
    assert run(grad=False) == 1
    assert run(moe_expert_bias=True) == 0
    assert run(activation_fn=lambda t: F.gelu(t) * 2) == 0
    assert run(policy=KernelPolicy(one_node_experts=False)) == 0
    assert run(policy=KernelPolicy(fused_gather=False)) == 0
    assert run(memory_optimized_mlp=True) == 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T, H, Fs, E, K", [(24, 40, 128, 4, 2), (5, 136, 256, 3, 3), (9, 48, 72, 5, 2)],
                         ids=["F=128", "F=256-topk=E", "F=72-apart"])
def test_fp8_node_in_inference(T, H, Fs, E, K, dtype, monkeypatch):
    """Without a gradient to record (`torch.no_grad`, `torch.inference_mode`) the FP8 node runs
    (dMoE's FP8 inference) and gives bitwise the output it gives in training; with the policy's
    `fp8_decode_glu_epilogue` (w1 and v1 stacked, F a multiple of 128, decode sizes) the GLU is made
    in the up product's epilogue: on the GPU bitwise the same (the same decode tile), under the
    interpreter (whose default product takes other tiles) within the FP8 products' tolerance."""
    layer, x, _ = _glu_layer(T, H, Fs, E, K, dtype, seed=T * 5 + Fs)
    layer.args.kernel_policy = KernelPolicy(fp8_decode_glu_epilogue=False)
    calls = _count(monkeypatch)
    epilogues = []
    real = grouped_glu.gmm_fp8_glu_quantize
    monkeypatch.setattr(grouped_glu, "gmm_fp8_glu_quantize", lambda *a, **kw: epilogues.append(1) or real(*a, **kw))
    trained = layer(x.clone().requires_grad_(True))
    assert len(calls) == 1
    with torch.no_grad():
        plain = layer(x)
    with torch.inference_mode():
        inferred = layer(x)
    assert len(calls) == 3 and not epilogues
    assert_equal("out no_grad", plain, trained.detach())
    assert_equal("out inference_mode", inferred, trained.detach())
    layer.args.kernel_policy = KernelPolicy(fp8_decode_glu_epilogue=True)
    with torch.no_grad():
        fused = layer(x)
    assert len(calls) == 4 and len(epilogues) == int(Fs % 128 == 0), epilogues
    if DEVICE == "cuda" or not epilogues:
        assert_equal("out epilogue", fused, plain)
    else:
        assert_close("out epilogue", fused, plain, dtype=dtype, family="fp8")
    assert fused.abs().sum() > 0


def test_fp8_node_quantizes_weights_once_per_step(monkeypatch):
    calls = []
    real = fp8.quantize_blocks
    monkeypatch.setattr(fp8, "quantize_blocks", lambda w, **kw: calls.append(tuple(w.shape)) or real(w, **kw))
    layer = dMoE(make_args("triton", torch.float32, mlp_type="glu", fp8="blockwise", hidden_size=48,
                           ffn_hidden_size=40, moe_num_experts=4, moe_top_k=2, activation_fn=F.silu))
    node = _count(monkeypatch)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for _ in range(2):  # two micro-batches
        layer(torch.randn(1, 9, 48, device=DEVICE)).square().mean().backward()
    assert len(node) == 2 and len(calls) == 3  # w1, v1, w2: once
    opt.step()
    layer(torch.randn(1, 9, 48, device=DEVICE)).square().mean().backward()
    assert len(calls) == 6


def _glu_layer(T, H, Fs, E, K, dtype, seed):
    """An FP8 GLU dMoE (silu, random biases) and a fresh input and output gradient [T, H]. Its
    weight gradients unquantized (`fp8_weight_grad=False`: the composed ops' default, which the
    node is held to); the tests of FP8 weight gradients set their own policies."""
    args = make_args("triton", dtype, mlp_type="glu", hidden_size=H, ffn_hidden_size=Fs, moe_num_experts=E,
                     moe_top_k=K, activation_fn=F.silu, fp8="blockwise",
                     kernel_policy=KernelPolicy(fp8_weight_grad=False))
    layer = dMoE(args)
    randomize_bias(layer)
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(T, H, device=DEVICE, dtype=dtype, generator=gen)
    return layer, x, torch.randn(T, H, device=DEVICE, dtype=dtype, generator=gen)


@pytest.mark.parametrize("fp8_weight_grad", [False, True], ids=["unquantized-wgrad", "fp8-wgrad"])
def test_fp8_node_second_backward_is_refused(fp8_weight_grad):
    """The FP8 node frees what its backward reads (and writes the GLU's gradient over h), so a
    second backward through its graph (`retain_graph=True`) raises a RuntimeError that names the
    way out, not a TypeError from inside; the composed FP8 ops (`one_node_experts=False`) run it,
    with the same gradients both times."""
    layer, x, grad_out = _glu_layer(6, 40, 128, 4, 2, torch.float32, seed=3)
    params = [p for p in layer.parameters() if p.requires_grad]
    layer.args.kernel_policy = KernelPolicy(fp8_weight_grad=fp8_weight_grad)
    out = layer(x)
    torch.autograd.grad(out, params, grad_out, retain_graph=True)
    with pytest.raises(RuntimeError, match=r"runs backward once.*one_node_experts=False"):
        torch.autograd.grad(out, params, grad_out)
    layer.args.kernel_policy = KernelPolicy(fp8_weight_grad=fp8_weight_grad, one_node_experts=False)
    out = layer(x)
    first = torch.autograd.grad(out, params, grad_out, retain_graph=True)
    second = torch.autograd.grad(out, params, grad_out)
    for a, b in zip(first, second):
        assert_equal("second backward", b, a)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T, H, Fs, E, K", [(24, 40, 128, 4, 2), (5, 136, 256, 3, 3), (1, 48, 128, 5, 1)],
                         ids=["F=128", "F=256-topk=E", "one-token-empty-experts"])
def test_fp8_node_stacked_pair(T, H, Fs, E, K, dtype, monkeypatch):
    """F a multiple of 128: w1 and v1 quantized stacked, the up projections one product into one
    [N, 2F] buffer, the GLU gradient written over it, the input gradient one product over K = 2F.
    Against the composed FP8 ops: the output and the weight and router gradients bitwise; the input
    gradient rounded once instead of summed from two rounded products (within a few units of the
    dtype's last place)."""
    layer, x, grad_out = _glu_layer(T, H, Fs, E, K, dtype, seed=T * 11 + Fs)
    calls = _count(monkeypatch)
    pairs = []
    real_pair = fp8.Fp8WeightCache.pair
    monkeypatch.setattr(fp8.Fp8WeightCache, "pair", lambda self, *a, **kw: pairs.append(a[2]) or real_pair(self, *a, **kw))
    results = {}
    for on in (False, True):
        layer.args.kernel_policy = KernelPolicy(one_node_experts=on, fp8_weight_grad=False)
        results[on] = _step(layer, x, grad_out)
    assert len(calls) == 1 and len(pairs) == 1, (calls, pairs)
    # Past the policy's fused_glu_input_grad_max_ffn the node keeps w1 and v1 apart.
    layer.args.kernel_policy = KernelPolicy(fused_glu_input_grad_max_ffn=Fs - 1, fp8_weight_grad=False)
    apart = _step(layer, x, grad_out)
    assert len(calls) == 2 and len(pairs) == 1, (calls, pairs)
    assert_equal("out apart", apart[0], results[False][0])
    assert_equal("grad x apart", apart[1]["x"], results[False][1]["x"])
    assert_equal("out", results[True][0], results[False][0])
    for name in ("router", "w1", "v1", "w2", "bias"):
        assert_equal(f"grad {name}", results[True][1][name], results[False][1][name])
    assert_close("grad x", results[True][1]["x"], results[False][1]["x"], dtype=dtype)
    assert results[True][1]["x"].abs().sum() > 0


def test_weight_cache_pair():
    """`Fp8WeightCache.pair`: [w1; v1] quantized stacked, equal byte for byte to each quantized
    alone side by side, stored the other way too; made again only when either weight changes;
    N not a multiple of 128 refused; a seeded weight's own values and scales taken as they are."""
    E, Fs, H = 3, 256, 200
    w1 = torch.randn(E * Fs, H, device=DEVICE)
    v1 = torch.randn(E * Fs, H, device=DEVICE) * 5
    cache = fp8.Fp8WeightCache(transposed=True)
    (q, s), (t, st) = cache.pair(w1, v1, (E, -1, H))
    (q1, s1), (q2, s2) = fp8.quantize_blocks(w1.view(E, Fs, H)), fp8.quantize_blocks(v1.view(E, Fs, H))
    for name, got, want in (("q", q, torch.cat([q1, q2], 1)), ("s", s, torch.cat([s1, s2], 1)),
                            ("t", t, torch.cat([q1, q2], 1).transpose(1, 2).contiguous()),
                            ("st", st, torch.cat([s1, s2], 1).transpose(1, 2))):
        assert_equal(name, got, want)
    assert cache.pair(w1, v1, (E, -1, H))[0][0] is q
    with torch.no_grad():
        v1.mul_(2)
    q_again = cache.pair(w1, v1, (E, -1, H))[0][0]
    assert q_again is not q and torch.equal(q_again[:, :Fs].view(torch.uint8), q[:, :Fs].view(torch.uint8))
    with pytest.raises(ValueError, match="multiple of 128"):
        cache.pair(w1, v1, (E * 4, -1, H))  # N = 64
    # A seeded weight (a checkpoint's values, its scales not powers of two) is taken as it is,
    # until it changes; the other is quantized.
    seeded_q, seeded_s = fp8.quantize_blocks(torch.randn(E, Fs, H, device=DEVICE))
    seeded_s = seeded_s * 1.37
    cache.seed(w1, (seeded_q, seeded_s), (E, -1, H))
    (q, s), (t, _) = cache.pair(w1, v1, (E, -1, H))
    assert_equal("seeded q", q[:, :Fs].view(torch.uint8), seeded_q.view(torch.uint8))
    assert_equal("seeded s", s[:, :Fs // 128], seeded_s)
    assert_equal("seeded t", t[:, :, :Fs].view(torch.uint8), seeded_q.transpose(1, 2).view(torch.uint8))
    assert_equal("other q", q[:, Fs:].view(torch.uint8), fp8.quantize_blocks(v1.view(E, Fs, H))[0].view(torch.uint8))
    with torch.no_grad():
        w1.add_(1.0)
    q, s = cache.pair(w1, v1, (E, -1, H))[0]
    assert_equal("changed q", q[:, :Fs].view(torch.uint8), fp8.quantize_blocks(w1.view(E, Fs, H))[0].view(torch.uint8))


def test_quantize_blocks_out_checked():
    w = torch.randn(2, 128, 256, device=DEVICE)
    q, s, t = fp8.quantize_blocks(w, transposed=True)
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in
               zip((q, t), fp8.quantize_blocks(w, transposed=True, out=(torch.empty_like(q), torch.empty_like(s),
                                                                      torch.empty_like(t)))[::2]))
    for bad in ((q, s), (q, s, t.float()), (q, s.transpose(1, 2), t), (q[:, :64], s, t), (q, s, t.transpose(0, 2))):
        with pytest.raises(ValueError, match="out"):
            fp8.quantize_blocks(w, transposed=True, out=bad)


def test_fp8_node_holds_the_combine(monkeypatch):
    """In FP8 the experts module takes the combine's weights and returns the token rows: its node
    computes the weighted combine, and its backward receives the token rows' gradient [T, H] (the
    rows' [N, H] made inside it, so that it goes once used), giving the router's gradient as the
    combine's node does. Where the node is not taken (no gradient to record) the module combines
    the rows itself; the combine needs the row maps."""
    layer = dMoE(make_args("triton", torch.float32, mlp_type="glu", fp8="blockwise", hidden_size=40,
                           ffn_hidden_size=24, moe_num_experts=4, moe_top_k=2, activation_fn=F.silu))
    experts = layer.experts.mlp
    assert experts.takes_combine()
    seen = []
    experts.register_forward_hook(lambda module, inputs, out: seen.append((len(inputs), tuple(out.shape))))
    calls = _count(monkeypatch)
    x = torch.randn(5, 2, 40, device=DEVICE, requires_grad=True)
    incoming = []
    out = layer(x)
    calls[0].register_prehook(lambda grads: incoming.append(tuple(grads[0].shape)))
    out.square().sum().backward()
    assert seen == [(4, (10, 40))] and incoming == [(10, 40)], (seen, incoming)
    assert layer.router.layer.weight.grad is not None and layer.router.layer.weight.grad.abs().sum() > 0
    with torch.no_grad():  # the node again (inference), the combine in it
        assert_equal("no-grad out", layer(x), out.detach())
    assert len(calls) == 2 and calls[1] is None and seen[-1] == (4, (10, 40))
    x_TH, tokens, maps = x.detach().view(10, 40), torch.tensor([5, 5, 5, 5], device=DEVICE), None
    with pytest.raises(ValueError, match="combine_weights"):
        experts(x_TH, tokens, maps, torch.ones(20, device=DEVICE))
    maps = layer.experts.routed_rows(torch.arange(20, device=DEVICE).remainder(4), 4, 2)[1]
    for bad in (torch.ones(19, device=DEVICE), torch.ones(20, 1, device=DEVICE)):  # one per assignment, 1-D
        with pytest.raises(ValueError, match="combine_weights"):
            experts(x_TH, tokens, maps, bad)
    with pytest.raises(TypeError, match="combine_weights"):
        experts(x_TH, tokens, maps, torch.ones(20, device=DEVICE, dtype=torch.int64))
    assert not dMoE(make_args("triton", torch.float32, mlp_type="glu", hidden_size=40, ffn_hidden_size=24,
                              moe_num_experts=4, moe_top_k=2, activation_fn=F.silu)).experts.mlp.takes_combine()


def _alive_at_glu_backward(monkeypatch, name, pick):
    """Watch the tensors that `grouped_glu.<name>` makes (`pick(out, kwargs)`: the ones to watch)
    and, each time the backward makes the GLU's gradient (`glu_backward_quantize_rows_`), which of
    them are still alive. Returns (made, alive): weak references, and a list of liveness lists."""
    import weakref

    made, alive = [], []
    real_make, real_glu = getattr(grouped_glu, name), grouped_glu.glu_backward_quantize_rows_

    def make(*a, **kw):
        out = real_make(*a, **kw)
        made.extend(weakref.ref(t) for t in pick(out, kw))
        return out

    def glu_backward(*a, **kw):
        alive.append([ref() is not None for ref in made])
        return real_glu(*a, **kw)

    monkeypatch.setattr(grouped_glu, name, make)
    monkeypatch.setattr(grouped_glu, "glu_backward_quantize_rows_", glu_backward)
    return made, alive


@pytest.mark.parametrize("Fs", [24, 256], ids=["apart", "stacked"])
def test_fp8_node_lets_go_of_the_rows_gradient(Fs, monkeypatch):
    """The rows' output gradient (16-bit and e4m3, made in one pass in the backward) is freed
    before the GLU's gradient is made, where the backward's memory peaks: nothing but the names
    the backward deletes may hold it (unquantized weight gradients: with FP8 ones the rows'
    gradient is quantized both ways and let go of before the GLU's gradient too, in
    `_fp8_wgrad_backward`)."""
    layer = dMoE(make_args("triton", torch.float32, mlp_type="glu", fp8="blockwise", hidden_size=40,
                           ffn_hidden_size=Fs, moe_num_experts=4, moe_top_k=2, activation_fn=F.silu,
                           kernel_policy=KernelPolicy(fp8_weight_grad=False)))
    made, alive = _alive_at_glu_backward(monkeypatch, "gather_quantize_rows", lambda out, kw: out)
    x = torch.randn(6, 40, device=DEVICE, requires_grad=True)
    layer(x).square().sum().backward()
    # The forward's rows (x_q, x_s), then the backward's (g_q, g_s, grad_y): all gone by then.
    assert len(made) == 5 and alive == [[False] * 5], (len(made), alive)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T, H, Fs, E, K", [(24, 40, 24, 4, 2), (5, 136, 256, 3, 3), (1, 48, 128, 5, 1),
                                            (200, 40, 128, 2, 2)],
                         ids=["apart", "stacked-topk=E", "one-token-empty-experts", "blocks-past-128-rows"])
def test_fp8_node_weight_gradients_in_fp8(T, H, Fs, E, K, dtype, monkeypatch):
    """`KernelPolicy(fp8_weight_grad=True)`: the node's three weight gradients by `gmm_fp8_wgrad`
    from operands quantized down each expert's rows in the passes that read them. The output, the
    input gradient (the same row tiles, bit for bit the other form's) and the router gradient are
    those of the node without it; each weight gradient is within FP8's quantization error of the
    unquantized one (two operands in 128 x 1 tiles: about 4% rms), and not equal to it."""
    layer, x, grad_out = _glu_layer(T, H, Fs, E, K, dtype, seed=T * 13 + Fs)
    wgrads = []
    real = grouped_glu.gmm_fp8_wgrad
    monkeypatch.setattr(grouped_glu, "gmm_fp8_wgrad", lambda *a, **k: wgrads.append(a[0].shape) or real(*a, **k))
    results = {}
    for on in (False, True):
        layer.args.kernel_policy = KernelPolicy(fp8_weight_grad=on)
        results[on] = _step(layer, x, grad_out)
    assert len(wgrads) == 3, wgrads  # w2, w1, v1
    assert_equal("out", results[True][0], results[False][0])
    if DEVICE == "cuda" and dtype == torch.float32:  # the GLU's backward compiled in another kernel
        assert_close("grad x", results[True][1]["x"], results[False][1]["x"], dtype=dtype)
    else:
        assert_equal("grad x", results[True][1]["x"], results[False][1]["x"])
    for name in ("router", "bias"):
        assert_equal(f"grad {name}", results[True][1][name], results[False][1][name])
    for name in ("w1", "v1", "w2"):
        on, off = results[True][1][name].double(), results[False][1][name].double()
        rel = ((on - off).norm() / off.norm()).item()
        assert 0 < rel < 0.08, (name, rel)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T, H, Fs, E, K", [(5, 136, 256, 3, 3), (1, 48, 128, 5, 1), (200, 40, 128, 2, 2),
                                             (24, 40, 24, 4, 2), (200, 40, 136, 2, 2)],
                         ids=["stacked-topk=E", "one-token-empty-experts", "blocks-past-128-rows", "apart",
                              "apart-blocks-past-128-rows"])
def test_fp8_node_glu_gradient_in_two_passes(T, H, Fs, E, K, dtype, monkeypatch):
    """`fp8_weight_grad` with w1 and v1 stacked (F a multiple of 128) or apart: the GLU's gradient
    made and quantized in two passes (`KernelPolicy.fp8_weight_grad_glu_two_passes`: the gradients
    written over h with their row tiles, then h's column tiles, of each half where apart) gives the
    one pass's output and every gradient, bit for bit; the one-pass kernel does not run."""
    layer, x, grad_out = _glu_layer(T, H, Fs, E, K, dtype, seed=T * 7 + Fs)
    results, one_pass = {}, []
    real = grouped_glu.glu_backward_quantize_rows_cols
    monkeypatch.setattr(grouped_glu, "glu_backward_quantize_rows_cols",
                        lambda *a, **k: one_pass.append(1) or real(*a, **k))
    assert layer.experts.mlp.fp8_stacks_up_weights() == (Fs % 128 == 0)
    for two in (False, True):
        layer.args.kernel_policy = KernelPolicy(fp8_weight_grad=True, fp8_weight_grad_glu_two_passes=two)
        one_pass.clear()
        results[two] = _step(layer, x, grad_out)
        assert len(one_pass) == (0 if two else 1), (two, one_pass)
    assert_equal("out", results[True][0], results[False][0])
    for name, grad in results[False][1].items():
        if grad is None:
            assert results[True][1][name] is None, name
        elif DEVICE == "cuda" and dtype == torch.float32:  # the GLU's backward compiled in another kernel
            assert_close(f"grad {name}", results[True][1][name], grad, dtype=dtype, family="fp8")
        else:
            assert_equal(f"grad {name}", results[True][1][name], grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T, H, Fs, E, K", [(200, 136, 128, 2, 2), (24, 40, 24, 4, 2), (1, 48, 128, 5, 1)],
                         ids=["stacked-blocks-past-128-rows", "apart", "one-token-empty-experts"])
def test_fp8_node_weight_grads_with_b_in_blocks(T, H, Fs, E, K, dtype, monkeypatch):
    """`fp8_weight_grad` with each weight gradient's b operand (the token rows for w1 and v1, the
    output gradient for w2) quantized in 128 x 128 blocks (`KernelPolicy.fp8_weight_grad_b_blocks`,
    the default) or in column tiles, by the pass that quantizes it (`blocks=` of
    `gather_quantize_cols`, once for both up weights, and `quantize_rows_and_cols`); the output
    and the input gradient bit for bit the same, the weight gradients the same values but for
    those of b that fall into e4m3's subnormals."""
    layer, x, grad_out = _glu_layer(T, H, Fs, E, K, dtype, seed=T * 3 + Fs)
    calls, results = [], {}
    for name in ("gather_quantize_cols", "quantize_rows_and_cols"):
        real = getattr(grouped_glu, name)
        monkeypatch.setattr(grouped_glu, name, lambda *a, _real=real, _name=name, **kw:
                            calls.append((_name, kw.get("blocks"))) or _real(*a, **kw))
    assert KernelPolicy().fp8_weight_grad_b_blocks
    for blocks in (False, True):
        layer.args.kernel_policy = KernelPolicy(fp8_weight_grad=True, fp8_weight_grad_b_blocks=blocks)
        calls.clear()
        results[blocks] = _step(layer, x, grad_out)
        assert sorted(calls) == [("gather_quantize_cols", blocks), ("quantize_rows_and_cols", blocks)], calls
    assert_equal("out", results[True][0], results[False][0])
    for name, grad in results[False][1].items():
        if grad is None:
            assert results[True][1][name] is None, name
        elif name in ("w1", "v1", "w2"):
            assert_close(f"grad {name}", results[True][1][name], grad, dtype=dtype, family="fp8")
        else:
            assert_equal(f"grad {name}", results[True][1][name], grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T, H, Fs, E, K", [(24, 40, 24, 4, 2), (5, 136, 256, 3, 3), (1, 48, 128, 5, 1)],
                         ids=["apart", "stacked-topk=E", "one-token-empty-experts"])
def test_fp8_node_keeps_the_glu_product(T, H, Fs, E, K, dtype, monkeypatch):
    """As the bf16 node, the FP8 node keeps the GLU product for w2's gradient, written in the
    quantizer's pass (`glu_quantize_rows(..., return_product=True)`), unless `memory_optimized_mlp`
    (then made again from h1 and h2 in the backward): both give bitwise the same output and every
    gradient. The kept product is gone before the GLU's gradient is made, and it is not kept where
    w2 takes no gradient."""
    from megablocks.backend import activation as activation_kernels

    layer, x, grad_out = _glu_layer(T, H, Fs, E, K, dtype, seed=T * 13 + Fs)
    remade = []
    kept, alive = _alive_at_glu_backward(monkeypatch, "glu_quantize_rows",
                                         lambda out, kw: out[2:] if kw.get("return_product") else ())
    for name in ("glu_forward", "glu_halves_forward"):
        real = getattr(activation_kernels, name)
        monkeypatch.setattr(activation_kernels, name, lambda *a, _real=real, **kw: remade.append(1) or _real(*a, **kw))
    results = {}
    for memory_optimized in (False, True):
        layer.args.memory_optimized_mlp = memory_optimized
        kept.clear(), remade.clear(), alive.clear()
        results[memory_optimized] = _step(layer, x, grad_out)
        assert (len(kept), len(remade)) == ((0, 1) if memory_optimized else (1, 0)), (memory_optimized, kept, remade)
        assert alive == [[False] * len(kept)], alive
    assert_equal("out", results[True][0], results[False][0])
    for name in GRAD_NAMES:
        assert_equal(f"grad {name}", results[True][1][name], results[False][1][name])
    assert results[False][1]["w2"].abs().sum() > 0
    # w2 frozen: no product kept, none made again.
    layer.args.memory_optimized_mlp = False
    layer.experts.mlp.w2.requires_grad_(False)
    kept.clear(), remade.clear()
    layer(x.clone().requires_grad_(True)).backward(grad_out)
    assert (len(kept), len(remade)) == (0, 0), (kept, remade)
