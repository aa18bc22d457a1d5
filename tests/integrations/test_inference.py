"""`fused_moe` (vLLM layout) against the per-token loop, on both paths, kernels and references."""

import pytest
import torch
import torch.nn.functional as F

from megablocks.integrations import inference
from megablocks.integrations.inference import fused_moe, fused_moe_reference, softmax_topk
from megablocks.policy import KernelPolicy
from tests.conftest import DEVICE, FLOAT_DTYPES
from tests.utils import assert_close, assert_equal

E, H, FF = 4, 24, 20  # sizes that do not divide any block


def make(t, dtype=torch.float32, e=E, h=H, f=FF):
    x = torch.randn(t, h, device=DEVICE, dtype=dtype)
    w1 = (torch.randn(e, 2 * f, h, device=DEVICE) / h**0.5).to(dtype)
    w2 = (torch.randn(e, h, f, device=DEVICE) / f**0.5).to(dtype)
    gating = torch.randn(t, e, device=DEVICE)
    return x, w1, w2, gating


def test_softmax_topk():
    gating = torch.randn(9, E, device=DEVICE)
    weights, ids = softmax_topk(gating, 2, renormalize=True)
    probs = gating.softmax(-1)
    expected_ids = probs.argsort(-1, descending=True)[:, :2]
    assert_equal("ids", ids, expected_ids)
    top = probs.gather(1, expected_ids)
    assert_close("weights", weights, top / top.sum(-1, keepdim=True))
    weights, _ = softmax_topk(gating, 2, renormalize=False)
    assert_close("weights (no renormalize)", weights, top)


@pytest.fixture(params=[False, True], ids=["unfused", "fused_forms"])
def fused_forms(request):
    """Both settings of the policy's `fused_forms` (the routed form, and the general path)."""
    return KernelPolicy(fused_forms=request.param)


@pytest.mark.parametrize("path", ["grouped", "gather"])
@pytest.mark.parametrize("t,topk,renormalize", [(0, 2, True), (1, 2, True), (5, 1, False), (13, 4, True), (16, 3, False)])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_fused_moe(path, t, topk, renormalize, dtype, fused_forms):
    """Under the interpreter on CPU: the grouped path runs the Triton gather/gmm/scatter kernels
    (with `fused_forms`: the routing program, the GLU-epilogue GEMM and the scatter)."""
    x, w1, w2, gating = make(t, dtype)
    out = fused_moe(x, w1, w2, gating, topk, renormalize, path=path, policy=fused_forms)
    assert out.dtype == dtype and not out.requires_grad
    assert_close("out", out, fused_moe_reference(x, w1, w2, gating, topk, renormalize), family="layer")


def test_fused_moe_matches_dense_formula(monkeypatch):
    """Against an independent dense computation: every expert on every token, masked by routing."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w1, w2, gating = make(64, e=6, h=40, f=36)
    probs = gating.softmax(-1)
    top = probs.topk(2, dim=-1)
    mask = torch.zeros_like(probs).scatter(1, top.indices, top.values / top.values.sum(-1, keepdim=True))
    gate_up = torch.einsum("th,efh->tef", x, w1)
    act = F.silu(gate_up[..., :36]) * gate_up[..., 36:]
    dense = torch.einsum("tef,ehf,te->th", act, w2, mask)
    for path in ("grouped", "gather", "auto"):
        assert_close(f"out ({path})", fused_moe(x, w1, w2, gating, 2, True, path=path), dense, family="layer")


def test_fused_moe_every_token_on_one_expert_and_gelu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w1, w2, gating = make(10)
    gating[:, 2] += 100.0  # expert 2 takes every token; with topk=E all experts get all tokens
    for topk in (1, E):
        out = fused_moe(x, w1, w2, gating, topk, False, activation="gelu_tanh")
        assert_close(f"out (topk={topk})", out, fused_moe_reference(x, w1, w2, gating, topk, False, "gelu_tanh"),
                     family="layer")


@pytest.mark.parametrize("path", ["grouped", "gather"])
def test_fused_moe_clamped_swiglu(path, fused_forms):
    """gpt-oss's clamped SwiGLU (gate and up halves of w1, concatenated): the routed form's GEMM
    epilogue and the general path's fused GLU op, with inputs large enough to reach the clamps."""
    x, w1, w2, gating = make(13)
    x = 8 * x
    gate_up = torch.einsum("th,efh->tef", x, w1)
    assert bool((gate_up[..., :FF] > 7).any()) and bool((gate_up[..., FF:].abs() > 7).any())
    out = fused_moe(x, w1, w2, gating, 2, True, activation="clamped_swiglu", path=path, policy=fused_forms)
    expected = fused_moe_reference(x, w1, w2, gating, 2, True, "clamped_swiglu")
    assert_close("out", out, expected, family="layer")


def test_fused_moe_no_autograd():
    x, w1, w2, gating = make(3)
    w1.requires_grad_(True)
    out = fused_moe(x, w1, w2, gating, 2, True)
    assert out.grad_fn is None


def test_fused_moe_bad_input():
    x, w1, w2, gating = make(4)
    with pytest.raises(ValueError, match="w1"):
        fused_moe(x, w1[:, :-1], w2, gating, 2, True)
    with pytest.raises(ValueError, match="w2"):
        fused_moe(x, w1, w2.transpose(1, 2), gating, 2, True)
    with pytest.raises(ValueError, match="gating_output"):
        fused_moe(x, w1, w2, gating[:, :3], 2, True)
    with pytest.raises(ValueError, match="topk"):
        fused_moe(x, w1, w2, gating, E + 1, True)
    with pytest.raises(TypeError, match="w1"):
        fused_moe(x, w1.half(), w2, gating, 2, True)
    with pytest.raises(TypeError, match="renormalize"):
        fused_moe(x, w1, w2, gating, 2, 1)
    with pytest.raises(ValueError, match="activation"):
        fused_moe(x, w1, w2, gating, 2, True, activation="relu2")
    with pytest.raises(ValueError, match="path"):
        fused_moe(x, w1, w2, gating, 2, True, path="dense")


def test_fused_moe_compiles_fullgraph(monkeypatch, fused_forms):
    """The grouped path traces into one graph (custom ops, no host sync), e.g. for CUDA graphs."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w1, w2, gating = make(7)
    compiled = torch.compile(lambda *a: fused_moe(*a, 2, True, path="grouped", policy=fused_forms), backend="aot_eager",
                             fullgraph=True)
    assert_close("out", compiled(x, w1, w2, gating), fused_moe_reference(x, w1, w2, gating, 2, True))


# --------------------------------------------------------------------------------------------------
# CUDA only: no host sync, and CUDA-graph capture (how serving engines run decode).

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda_only
@pytest.mark.parametrize("path", ["grouped", "gather"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_moe_no_host_sync(path, dtype, fused_forms):
    x, w1, w2, gating = make(4, dtype, e=16, h=64, f=48)
    run = lambda: fused_moe(x, w1, w2, gating, 2, True, path=path, backend="triton", policy=fused_forms)  # noqa: E731
    expected = run()  # the first call compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = run()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert_equal("out", out, expected)


@cuda_only
@pytest.mark.parametrize("path", ["grouped", "auto"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_moe_cuda_graph_replay(path, dtype, fused_forms):
    """Captured once at a decode size (T=4, E=16, top-2); each replay on new inputs copied into the
    static ones gives the eager result."""
    t, e, k, h, f = 4, 16, 2, 64, 48
    x, w1, w2, gating = make(t, dtype, e=e, h=h, f=f)
    static_x, static_gating = x.clone(), gating.clone()
    run = lambda: fused_moe(static_x, w1, w2, static_gating, k, True, path=path, backend="triton",  # noqa: E731
                            policy=fused_forms)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (kernel compilation, allocator) off the capture
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run()
    for step in range(3):
        new_x = torch.randn(t, h, device=DEVICE, dtype=dtype)
        new_gating = torch.randn(t, e, device=DEVICE) * (step + 1)
        static_x.copy_(new_x)
        static_gating.copy_(new_gating)
        graph.replay()
        eager_out = fused_moe(new_x, w1, w2, new_gating, k, True, path=path, backend="triton", policy=fused_forms)
        assert_equal(f"replay {step}", static_out, eager_out)
        assert_close(f"replay {step} vs reference", static_out, fused_moe_reference(new_x, w1, w2, new_gating, k, True))


# --------------------------------------------------------------------------------------------------
# The two forms of the grouped path: the routed form (the routing in one to three launches, the
# GLU in the first GEMM's epilogue) and the general one (`fused_forms` off).


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("t,topk", [(1, 1), (13, 4), (16, 3)])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_fused_moe_decode_and_general_forms(monkeypatch, dtype, t, topk, activation):
    """The routed form with its one-program routing, with the top-k kernel and the one-program
    sort (past `route_fits`), with the sorted routing (past one program's rows), and the general
    form (`fused_forms` off)."""
    from megablocks.backend import topk as topk_kernels

    calls = []
    decode_impl = inference._routed_moe_impl
    monkeypatch.setattr(inference, "_routed_moe_impl", lambda *a: calls.append(1) or decode_impl(*a))
    program = []
    route = topk_kernels.softmax_topk_route
    monkeypatch.setattr(topk_kernels, "softmax_topk_route", lambda *a: program.append(1) or route(*a))
    x, w1, w2, gating = make(t, dtype)
    expected = fused_moe_reference(x, w1, w2, gating, topk, True, activation)
    def run(**policy):
        return fused_moe(x, w1, w2, gating, topk, True, activation=activation, path="grouped", policy=policy)

    decode = run()
    assert calls == [1] and program == [1], "the decode form with its routing program was not taken"
    decode_sorted = run(route_max_work=0)
    assert calls == [1, 1] and program == [1], "the decode form's two-kernel routing was not taken"
    from megablocks.backend import routing as routing_kernels

    monkeypatch.setattr(routing_kernels, "SMALL_ROUTING_MAX_ROWS", t * topk - 1)  # one row too many for it
    routed_sorted = run(route_max_work=0)
    assert calls == [1, 1, 1] and program == [1], "the routed form past one routing program was not taken"
    general = run(fused_forms=False)
    assert calls == [1, 1, 1], "the routed form was taken with fused_forms off"
    assert_close("decode form", decode, expected)
    assert_close("decode form, two-kernel routing", decode_sorted, expected)
    assert_equal("the two routings agree", decode_sorted, decode)
    assert_equal("the sorted routing agrees", routed_sorted, decode)
    # The general form rounds each product and the GLU to the dtype (three roundings in a row): the
    # whole-layer limits, where the fused forms above round once.
    assert_close("general form", general, expected, family="layer")


def test_fused_moe_degenerate_sizes(fused_forms):
    """F = 0 (every expert's output is zero), and every token on one expert with top-k 1."""
    x, w1, w2, gating = make(5, f=0)
    out = fused_moe(x, w1, w2, gating, 2, True, policy=fused_forms)
    assert_equal("out (F = 0)", out, torch.zeros_like(x))
    x, w1, w2, gating = make(9, e=8)
    gating[:, 5] += 50.0
    assert_close("out (one expert)", fused_moe(x, w1, w2, gating, 1, False, policy=fused_forms),
                 fused_moe_reference(x, w1, w2, gating, 1, False))


def test_fused_moe_routed_op_registration():
    """The decode form's custom op (what torch.compile traces): schema, fake tensor and the
    dispatcher agree with the implementation (the Triton kernels: on CPU under the interpreter)."""
    x, w1, w2, gating = make(6)
    policy = KernelPolicy()
    torch.library.opcheck(torch.ops.megablocks.fused_moe_routed,
                          (x, w1, w2, gating, 2, True, "silu", policy.route_max_work, policy.gather_min_ffn,
                           policy.gather_min_rows_per_expert))


def test_experts_from_ids(monkeypatch):
    """The decode form on a given routing (transformers' experts): against the per-token loop of
    the same ids and weights; ids repeat within a token and one is out of range (dropped); None
    where the form does not apply; the custom op's registration (schema, fake tensor)."""
    from megablocks.integrations.inference import experts_from_ids

    x, w1, w2, _ = make(9)
    ids = torch.randint(0, E, (9, 3), device=DEVICE)
    ids[0] = 1
    ids[1, 2] = E  # dropped
    weights = torch.rand(9, 3, device=DEVICE)
    assert experts_from_ids(x, w1, w2, ids, weights, "silu", policy=KernelPolicy(fused_forms=False)) is None
    out = experts_from_ids(x, w1, w2, ids, weights, "silu")
    expected = torch.zeros(9, H, dtype=torch.float64, device=DEVICE)
    for t in range(9):
        for k in range(3):
            e = int(ids[t, k])
            if e < E:
                g, u = w1[e, :FF].double() @ x[t].double(), w1[e, FF:].double() @ x[t].double()
                expected[t] += weights[t, k].double() * (w2[e].double() @ (F.silu(g) * u))
    assert_close("out", out, expected)
    transposed = experts_from_ids(x, w1.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous(), ids,
                                  weights, "silu", trans_b=False)
    assert_close("out (transposed weights)", transposed, expected)
    from megablocks.backend import routing as routing_kernels

    monkeypatch.setattr(routing_kernels, "SMALL_ROUTING_MAX_ROWS", 8)  # the sorted routing
    assert_equal("out (sorted routing)", experts_from_ids(x, w1, w2, ids, weights, "silu"), out)
    assert experts_from_ids(x[:0], w1, w2, ids[:0], weights[:0], "silu") is None
    policy = KernelPolicy()
    torch.library.opcheck(torch.ops.megablocks.experts_from_ids,
                          (x, w1, w2, ids, weights, "silu", True, policy.gather_min_ffn,
                           policy.gather_min_rows_per_expert))


def test_experts_from_ids_bad_input():
    from megablocks.integrations.inference import experts_from_ids

    x, w1, w2, _ = make(4)
    ids = torch.randint(0, E, (4, 2), device=DEVICE)
    weights = torch.rand(4, 2, device=DEVICE)
    with pytest.raises(ValueError, match="w1: expected shape"):
        experts_from_ids(x, w1[:, :-1], w2, ids, weights, "silu")
    with pytest.raises(ValueError, match="w2: expected shape"):
        experts_from_ids(x, w1, w2.transpose(1, 2), ids, weights, "silu")
    with pytest.raises(ValueError, match="ids_TK, weights_TK"):
        experts_from_ids(x, w1, w2, ids[:3], weights[:3], "silu")
    with pytest.raises(TypeError, match="ids_TK"):
        experts_from_ids(x, w1, w2, ids.float(), weights, "silu")
    with pytest.raises(TypeError, match="w2"):
        experts_from_ids(x, w1, w2.half(), ids, weights, "silu")
    with pytest.raises(ValueError, match="activation"):
        experts_from_ids(x, w1, w2, ids, weights, "tanh")
    with pytest.raises(TypeError, match="trans_b"):
        experts_from_ids(x, w1, w2, ids, weights, "silu", trans_b=1)


def test_fused_moe_past_one_routing_programs_experts(fused_forms):
    """More experts than one routing program takes (E > 1022): the sorted routing, most experts
    empty, against the reference (and the general path with `fused_forms` off)."""
    x, w1, w2, gating = make(6, e=1030, h=16, f=8)
    gating[:3, 1029] += 30.0  # the last expert id, past 1024, taken
    out = fused_moe(x, w1, w2, gating, 2, True, policy=fused_forms)
    assert_close("out", out, fused_moe_reference(x, w1, w2, gating, 2, True))
