"""LearnedRouter against its formulas: scores, top-k, renormalisation, jitter, fp32 math, sigmoid,
Sinkhorn, the expert bias and its update, uniform assignment."""

import pytest
import torch
import torch.nn.functional as F

from megablocks.layers.arguments import Arguments
from megablocks.layers.losses import MoELossCollector
from megablocks.layers.router import LearnedRouter, sinkhorn
from tests.conftest import DEVICE
from tests.utils import assert_close, assert_equal

E, H = 6, 32


def make_router(**kw) -> LearnedRouter:
    base = dict(hidden_size=H, moe_num_experts=E, moe_top_k=2, fp16=False, device=DEVICE,
                init_method=lambda w: torch.nn.init.normal_(w, std=0.2), loss_collector=MoELossCollector())
    base.update(kw)
    return LearnedRouter(Arguments(**base))


def expected_routing(x_TH, weight, top_k, *, score="softmax", normalize=None, bias=None):
    logits = x_TH.double() @ weight.double().t()
    scores = torch.sigmoid(logits) if score == "sigmoid" else logits.softmax(-1)
    choice = scores if bias is None else scores + bias.double()
    top = torch.topk(choice, top_k, dim=-1).indices
    weights = scores.gather(1, top)
    if normalize:
        weights = weights / weights.norm(p=normalize, dim=-1, keepdim=True)
    return scores, weights, top


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("top_k, normalize", [(1, None), (2, None), (3, 1), (6, 2.0)])
def test_scores_topk_and_weights(score, top_k, normalize):
    router = make_router(moe_top_k=top_k, moe_normalize_expert_weights=normalize, moe_router_score_function=score)
    x = torch.randn(5, 3, H, device=DEVICE)
    scores, weights, top = router(x)
    want_scores, want_weights, want_top = expected_routing(x.reshape(-1, H), router.layer.weight, top_k,
                                                           score=score, normalize=normalize)
    assert scores.shape == (15, E) and weights.shape == (15, top_k) and top.shape == (15, top_k)
    assert_equal("top_experts", top.cpu(), want_top.cpu())
    assert_close("scores", scores, want_scores.float())
    assert_close("expert_weights", weights, want_weights.float())


def test_jitter_in_training_only():
    router = make_router(moe_jitter_eps=0.1)
    x = torch.randn(7, H, device=DEVICE)
    torch.manual_seed(3)
    scores, _, _ = router(x)
    torch.manual_seed(3)
    noise = torch.rand(x.shape, device=DEVICE)
    assert bool(((noise >= 0) & (noise < 1)).all())
    jittered = x * (0.9 + noise * 0.2)
    assert_close("train scores", scores, F.linear(jittered, router.layer.weight).softmax(-1))
    router.eval()
    scores, _, _ = router(x)
    assert_close("eval scores", scores, F.linear(x, router.layer.weight).softmax(-1))


def test_fp32_router_math():
    router = make_router(fp16=True, moe_router_fp32=True)
    x = torch.randn(9, H, device=DEVICE, dtype=torch.float16)
    scores, weights, top = router(x)
    assert scores.dtype == torch.float32 and weights.dtype == torch.float32
    want_scores, want_weights, want_top = expected_routing(x.float(), router.layer.weight.float(), 2)
    assert_equal("top_experts", top.cpu(), want_top.cpu())
    assert_close("scores", scores, want_scores.float())
    plain = make_router(fp16=True)
    assert plain(x)[0].dtype == torch.float16


@pytest.mark.parametrize("fp32", [False, True])
def test_router_bias(fp32):
    """`moe_router_bias`: a zero-initialised bias [E] on the logits (fp32 math included), with its
    gradient; with renormalised softmax weights the router is gpt-oss's (top-k of the logits,
    softmax over the k chosen)."""
    router = make_router(moe_router_bias=True, moe_top_k=3, moe_normalize_expert_weights=1, moe_router_fp32=fp32)
    bias = router.layer.bias
    assert bias is not None and bias.shape == (E,) and not bias.any()
    assert make_router().layer.bias is None
    with torch.no_grad():
        bias.normal_(0.0, 1.0)
    x = torch.randn(11, H, device=DEVICE, requires_grad=True)
    scores, weights, top = router(x)
    logits = x.detach().double() @ router.layer.weight.detach().double().t() + bias.detach().double()
    assert_close("scores", scores, logits.softmax(-1).float())
    chosen = torch.topk(logits, 3, dim=-1)  # gpt-oss's GptOssTopKRouter
    assert_equal("top_experts", top.cpu(), chosen.indices.cpu())
    assert_close("expert_weights", weights, chosen.values.softmax(-1).float())
    probe = torch.randn(11, 3, device=DEVICE)
    (weights * probe).sum().backward()
    bias_ref = bias.detach().double().requires_grad_(True)
    ref_logits = x.detach().double() @ router.layer.weight.detach().double().t() + bias_ref
    (ref_logits.gather(1, chosen.indices).softmax(-1) * probe.double()).sum().backward()
    assert_close("grad bias", bias.grad, bias_ref.grad.float())


def test_sinkhorn_balances():
    logits = torch.randn(64, E, device=DEVICE) * 3
    logits[:, 0] += 4  # a router that prefers expert 0 for everyone
    p = sinkhorn(logits, 50)
    assert_close("row sums", p.sum(1), torch.ones(64, device=DEVICE))
    assert_close("column sums", p.sum(0), torch.full((E,), 64 / E, device=DEVICE))
    assert sinkhorn(logits[:0], 5).shape == (0, E)


def test_sinkhorn_router_chooses_balanced_in_training_only():
    router = make_router(moe_router_sinkhorn=True, moe_router_sinkhorn_iterations=30, moe_top_k=1)
    with torch.no_grad():
        router.layer.weight[0] += 0.5  # skew: plain top-1 would send most tokens to expert 0
    x = torch.randn(96, H, device=DEVICE).abs()
    scores, weights, top = router(x)
    logits = F.linear(x, router.layer.weight)
    assert_equal("train top_experts", top.cpu(), torch.topk(sinkhorn(logits, 30), 1).indices.cpu())
    assert_close("train weights", weights, scores.gather(1, top))
    balanced = torch.bincount(top.flatten().cpu(), minlength=E)
    plain = torch.bincount(logits.argmax(-1).cpu(), minlength=E)
    assert balanced.max() < plain.max(), f"sinkhorn {balanced.tolist()} vs plain {plain.tolist()}"
    router.eval()
    _, _, top = router(x)
    assert_equal("eval top_experts", top.cpu().flatten(), logits.argmax(-1).cpu())


def test_expert_bias_chooses_but_does_not_weigh():
    router = make_router(moe_router_enable_expert_bias=True, moe_router_bias_update_rate=0.25)
    assert "expert_bias" in router.state_dict() and "local_tokens_per_expert" not in router.state_dict()
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0, 0.0, 0.0]))
    x = torch.randn(10, H, device=DEVICE)
    scores, weights, top = router(x)
    want_scores, want_weights, want_top = expected_routing(x, router.layer.weight, 2, bias=router.expert_bias)
    assert bool((top == 3).any(dim=1).all()), "the bias did not make expert 3 a choice of every token"
    assert_equal("top_experts", top.cpu(), want_top.cpu())
    assert_close("weights (unbiased scores)", weights, want_weights.float())

    counts = torch.bincount(top.flatten().cpu(), minlength=E).float()
    assert_equal("counted", router.local_tokens_per_expert.cpu(), counts)
    before = router.expert_bias.clone()
    router.update_expert_bias()
    step = 0.25 * torch.sign(counts.mean() - counts)
    assert_equal("bias update", router.expert_bias.cpu(), (before.cpu() + step))
    assert_equal("counts reset", router.local_tokens_per_expert.cpu(), torch.zeros(E))
    with pytest.raises(ValueError, match="moe_router_enable_expert_bias"):
        make_router().update_expert_bias()


def test_uniform_expert_assignment():
    router = make_router(moe_top_k=2, uniform_expert_assignment=True)
    x = torch.randn(9, H, device=DEVICE)
    scores, weights, top = router(x)
    assert_equal("top_experts", top.cpu(), (torch.arange(18) % E).view(9, 2))
    assert_close("weights", weights, scores.detach().topk(2).values)


def test_router_zloss_recorded_in_training():
    router = make_router(moe_zloss_weight=0.01)
    x = torch.randn(11, H, device=DEVICE)
    router(x)
    logits = F.linear(x, router.layer.weight)
    assert_close("zloss", router.zloss, 0.01 * torch.logsumexp(logits, 1).square().mean())
    router.eval()
    router(x)
    assert router.zloss is None


# ------------------------------------------------------------------------------------------------
# DeepSeek-V3's routing: group-limited top-k, the routed scaling factor, the expert-bias hook.


def group_limited_reference(choice_TE, num_groups, group_topk, top_k):
    """Per token, in Python: each group's score is the sum of its best max(1, k // group_topk)
    choice scores; only the best `group_topk` groups' experts may be chosen."""
    tokens, experts = choice_TE.shape
    size = experts // num_groups
    per_group = max(1, top_k // group_topk)
    out = []
    for t in range(tokens):
        row = choice_TE[t].double().tolist()
        group_scores = [sum(sorted(row[g * size:(g + 1) * size], reverse=True)[:per_group]) for g in range(num_groups)]
        best = sorted(range(num_groups), key=lambda g: (-group_scores[g], g))[:group_topk]
        allowed = [e for e in range(experts) if e // size in best]
        out.append(sorted(sorted(allowed, key=lambda e: (-row[e], e))[:top_k]))
    return torch.tensor(out)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("experts, groups, group_topk, top_k", [(8, 4, 2, 4), (8, 8, 3, 2), (6, 3, 1, 2),
                                                                 (12, 4, 2, 3), (16, 8, 4, 8)])
def test_group_limited_top_k_and_scaling(score, experts, groups, group_topk, top_k):
    torch.manual_seed(experts * 7 + groups)
    router = make_router(moe_num_experts=experts, moe_top_k=top_k, moe_router_score_function=score,
                         moe_router_num_groups=groups, moe_router_group_topk=group_topk,
                         moe_normalize_expert_weights=1, moe_router_topk_scaling_factor=2.5)
    x = torch.randn(37, H, device=DEVICE, requires_grad=True)
    scores, weights, top = router(x)
    logits = x.detach().double() @ router.layer.weight.detach().double().t()
    want_scores = torch.sigmoid(logits) if score == "sigmoid" else logits.softmax(-1)
    want_top = group_limited_reference(want_scores.cpu(), groups, group_topk, top_k)
    assert_equal("chosen experts (sorted)", top.sort(dim=-1).values.cpu(), want_top)
    size = experts // groups
    assert all(len({int(e) // size for e in row}) <= group_topk for row in top.cpu()), "outside the best groups"
    want_weights = want_scores.gather(1, top.to(want_scores.device).long())
    want_weights = 2.5 * want_weights / want_weights.sum(-1, keepdim=True)
    assert_close("weights (normalised, scaled by 2.5)", weights, want_weights, torch.float32)
    # Gradient by value: through the chosen experts' scores into x and the router weight.
    g = torch.randn_like(weights)
    weights.backward(g)
    x64 = x.detach().double().requires_grad_()
    w64 = router.layer.weight.detach().double().requires_grad_()
    lg = x64 @ w64.t()
    sc = torch.sigmoid(lg) if score == "sigmoid" else lg.softmax(-1)
    ref = sc.gather(1, top.to(sc.device).long())
    (2.5 * ref / ref.sum(-1, keepdim=True)).backward(g.double())
    assert_close("d x", x.grad, x64.grad, torch.float32)
    assert_close("d router weight", router.layer.weight.grad, w64.grad, torch.float32)


def test_group_limited_routing_arguments():
    with pytest.raises(ValueError, match="both set or neither"):
        make_router(moe_num_experts=8, moe_router_num_groups=4)
    with pytest.raises(ValueError, match="a divisor of moe_num_experts"):
        make_router(moe_num_experts=8, moe_router_num_groups=3, moe_router_group_topk=1)
    with pytest.raises(ValueError, match="at most moe_router_num_groups"):
        make_router(moe_num_experts=8, moe_router_num_groups=2, moe_router_group_topk=3)
    with pytest.raises(ValueError, match="experts of the chosen groups"):
        make_router(moe_num_experts=8, moe_top_k=3, moe_router_num_groups=4, moe_router_group_topk=1)
    with pytest.raises(ValueError, match="finite number >= 0"):
        make_router(moe_router_topk_scaling_factor=-1.0)


def test_update_expert_biases_hook_updates_every_router():
    from megablocks.layers.router import update_expert_biases

    model = torch.nn.ModuleList([make_router(moe_router_enable_expert_bias=True, moe_router_bias_update_rate=0.5),
                                 make_router(moe_router_enable_expert_bias=True, moe_router_bias_update_rate=0.5),
                                 make_router()])
    model.train()
    x = torch.randn(30, H, device=DEVICE)
    expected = []
    for router in model[:2]:
        _, _, top = router(x)
        counts = torch.bincount(top.flatten().cpu(), minlength=E).double()
        expected.append(0.5 * torch.sign(counts.mean() - counts))
    assert update_expert_biases(model) == 2
    for router, want in zip(model[:2], expected):
        assert_equal("expert_bias", router.expert_bias.cpu().double(), want)
        assert router.local_tokens_per_expert.abs().sum() == 0, "counts reset after the update"
