"""The load-balancing loss and router z-loss against their formulas, per layer and batched; the
MegaBlocks global-list functions; collectors stay separate."""

import pytest
import torch

from megablocks.layers import moe as moe_module
from megablocks.layers import router as router_module
from megablocks.layers.losses import MoELossCollector, default_collector, load_balancing_loss, router_zloss
from megablocks.layers.moe import MoE
from tests.conftest import DEVICE
from tests.layers.moe_reference import make_args
from tests.utils import assert_close, assert_equal

E, K, H = 4, 2, 40


@pytest.fixture(autouse=True)
def _clean_default_collector():
    default_collector().clear()
    yield
    default_collector().clear()


def megablocks_lbl(entries, *, num_experts, top_k, num_layers, weight, in_fp32=False):
    """MegaBlocks' batched formula: weight·E/(L·T·K) · dot(cat f, mean_t cat scores)."""
    counts = torch.cat([f.double().cpu() for f, _ in entries])
    scores = torch.cat([s.detach().cpu().double() for _, s in entries], dim=1)
    tokens = scores.shape[0]
    return weight * num_experts / (num_layers * tokens * top_k) * torch.dot(counts, scores.mean(0))


def two_layers(collector=None, **kw):
    base = dict(moe_loss_weight=0.1, moe_zloss_weight=0.01, num_layers=2, moe_capacity_factor=0,
                loss_collector=collector)
    base.update(kw)
    args = make_args(**base)
    return args, [MoE(args), MoE(args)]


def test_load_balancing_loss_is_one_at_uniform_routing():
    T = 12
    counts = torch.full((E,), T * K // E)
    scores = torch.full((T, E), 1.0 / E)
    assert_close("uniform", load_balancing_loss(counts, scores, K), torch.tensor(1.0))
    skewed = torch.tensor([T * K, 0, 0, 0])
    peaked = torch.zeros(T, E)
    peaked[:, 0] = 1
    assert_close("collapsed", load_balancing_loss(skewed, peaked, K), torch.tensor(float(E)))
    assert load_balancing_loss(counts, scores[:0], K).item() == 0.0
    assert router_zloss(torch.zeros(0, E)).item() == 0.0


def test_per_layer_and_batched_losses_match_formulas():
    collector = MoELossCollector()
    args, layers = two_layers(collector)
    x = torch.randn(6, 2, H, device=DEVICE)
    seen = []

    def hook(module, inputs, outputs):
        logits = torch.nn.functional.linear(inputs[0].reshape(-1, H), module.layer.weight)
        seen.append((logits, outputs[0], outputs[2]))

    h = x
    for layer in layers:
        layer.router.register_forward_hook(hook)
        h = layer(h)

    entries = []
    for layer, (logits, scores, top) in zip(layers, seen):
        counts = torch.bincount(top.flatten().cpu(), minlength=E)
        assert_equal("tokens_per_expert", layer.experts.tokens_per_expert.cpu().long(), counts)
        expected = 0.1 / 2 * E / (12 * K) * torch.dot(counts.double(), scores.detach().cpu().double().mean(0))
        assert_close("layer load_balancing_loss", layer.load_balancing_loss, expected)
        z = 0.01 * torch.logsumexp(logits.double(), 1).square().mean()
        assert_close("layer router_zloss", layer.router_zloss, z)
        entries.append((counts, scores))

    batched = moe_module.batched_load_balancing_loss(args)
    want = megablocks_lbl(entries, num_experts=E, top_k=K, num_layers=2, weight=0.1)
    assert_close("batched", batched, want)
    assert_close("batched == sum of layers", batched, layers[0].load_balancing_loss + layers[1].load_balancing_loss)
    zlosses = router_module.batched_router_zloss(args)
    assert zlosses.shape == (2,)
    assert_close("batched zloss", zlosses, torch.stack([layers[0].router_zloss, layers[1].router_zloss]))

    # Gradients: the batched loss and the sum of the layers' losses are the same function.
    w = layers[0].router.layer.weight
    g_batched = torch.autograd.grad(batched, w, retain_graph=True)[0]
    g_sum = torch.autograd.grad(layers[0].load_balancing_loss + layers[1].load_balancing_loss, w)[0]
    assert_close("grad router", g_batched, g_sum)
    assert float(g_batched.abs().sum()) > 0

    assert default_collector().load_balancing == [] and default_collector().router_logits == []
    collector.clear()
    assert collector.load_balancing == [] and collector.router_logits == []


def test_lbl_in_fp32_and_sigmoid_scores():
    collector = MoELossCollector()
    args, layers = two_layers(collector, dtype=torch.float16, moe_lbl_in_fp32=True, moe_zloss_in_fp32=True,
                              moe_router_score_function="sigmoid")
    x = torch.randn(5, H, device=DEVICE, dtype=torch.float16)
    for layer in layers:
        x = layer(x)
    batched = moe_module.batched_load_balancing_loss(args)
    assert batched.dtype == torch.float32 and layers[0].load_balancing_loss.dtype == torch.float32
    assert router_module.batched_router_zloss(args).dtype == torch.float32
    for _, scores in collector.load_balancing:  # sigmoid scores are normalised per token for the loss
        assert_close("score rows", scores.float().sum(-1), torch.ones(5, device=DEVICE), dtype=torch.float16)
    assert_close("batched == sum of layers", batched, layers[0].load_balancing_loss + layers[1].load_balancing_loss)


def test_nothing_recorded_in_eval_or_with_zero_weights():
    collector = MoELossCollector()
    args, layers = two_layers(collector)
    x = torch.randn(4, H, device=DEVICE)
    layers[0].eval()
    layers[0](x)
    assert layers[0].load_balancing_loss is None and layers[0].router_zloss is None
    assert collector.load_balancing == [] and collector.router_logits == []

    args0, layers0 = two_layers(collector, moe_loss_weight=0.0, moe_zloss_weight=0.0)
    layers0[0](x)
    assert collector.load_balancing == [] and layers0[0].load_balancing_loss is None
    assert moe_module.batched_load_balancing_loss(args0) == 0.0
    with pytest.warns(UserWarning, match="moe_zloss_weight=0"):
        assert router_module.batched_router_zloss(args0) == 0


def test_batched_loss_checks_the_layer_count():
    collector = MoELossCollector()
    args, layers = two_layers(collector, num_layers=4, pipeline_model_parallel_size=2)
    x = torch.randn(4, H, device=DEVICE)
    layers[0](x)
    with pytest.raises(ValueError, match="expected 2 recorded layers"):
        moe_module.batched_load_balancing_loss(args)
    layers[1](x)
    moe_module.batched_load_balancing_loss(args)
    virtual, _ = two_layers(collector, num_layers=4, pipeline_model_parallel_size=2,
                            num_layers_per_virtual_pipeline_stage=1)
    with pytest.raises(ValueError, match="expected 1 recorded layers"):
        moe_module.batched_load_balancing_loss(virtual)
    collector.clear()
    layers[0](x)
    layers[1](x[:3])
    with pytest.raises(ValueError, match="layer 1 recorded"):
        moe_module.batched_load_balancing_loss(args)


def test_megablocks_global_functions():
    args, layers = two_layers(None)  # no collector: the process-wide one, as in MegaBlocks
    x = torch.randn(3, 2, H, device=DEVICE)
    h = layers[1](layers[0](x))
    entries = moe_module.get_load_balancing_loss()
    assert len(entries) == 2
    for layer, (counts, scores) in zip(layers, entries):
        assert counts is layer.experts.tokens_per_expert
        assert scores.shape == (6, E)
    want = megablocks_lbl(entries, num_experts=E, top_k=K, num_layers=2, weight=0.1)
    assert_close("batched", moe_module.batched_load_balancing_loss(args), want)
    assert router_module.batched_router_zloss(args).shape == (2,)
    (h.sum() + moe_module.batched_load_balancing_loss(args)).backward()

    first = entries[0]
    moe_module.clear_load_balancing_loss()  # clears the list in place, as MegaBlocks does
    assert moe_module.get_load_balancing_loss() == [] and entries == []
    moe_module.save_load_balancing_loss(first)
    assert moe_module.get_load_balancing_loss() == [first]
    router_module.clear_router_zloss()
    with pytest.raises(ValueError, match="no router logits"):
        router_module.batched_router_zloss(args)


# ------------------------------------------------------------------------------------------------
# The per-sequence and global-batch load-balancing losses.


def sequence_loss_reference(top_TK, scores_TE, num_sequences, seq_dim):
    """Per sequence in Python: E/(S·K) · Σ_e count_e · mean score_e, averaged over sequences."""
    tokens, experts = scores_TE.shape
    k = top_TK.shape[1]
    seq_len = tokens // num_sequences
    total = 0.0
    for b in range(num_sequences):
        rows = [t for t in range(tokens) if (t % num_sequences if seq_dim == 0 else t // seq_len) == b]
        counts = torch.bincount(top_TK[rows].flatten().cpu(), minlength=experts).double()
        mean = scores_TE[rows].double().cpu().mean(0)
        total = total + experts / (seq_len * k) * torch.dot(counts, mean)
    return total / num_sequences


@pytest.mark.parametrize("seq_dim", [0, 1])
def test_sequence_load_balancing_loss_in_the_layer(seq_dim):
    from megablocks.layers.losses import sequence_load_balancing_loss

    torch.manual_seed(3)
    args = make_args(moe_loss_weight=0.3, num_layers=2, moe_capacity_factor=0,
                     moe_router_load_balancing_type="seq_aux_loss", moe_router_seq_dim=seq_dim,
                     loss_collector=MoELossCollector())
    layer = MoE(args)
    layer.train()
    x = torch.randn(5, 3, H, device=DEVICE, requires_grad=True)  # [S, B, H] or [B, S, H]
    seen = {}
    layer.router.register_forward_hook(lambda m, i, o: seen.update(scores=o[0], top=o[2]))
    layer(x)
    num_sequences = x.shape[1 - seq_dim]
    want = 0.3 / 2 * sequence_loss_reference(seen["top"], seen["scores"], num_sequences, seq_dim)
    assert_close("seq_aux_loss", layer.load_balancing_loss, want, torch.float32)
    # Gradient by value, through the scores: autograd on the reference formula in float64.
    s64 = seen["scores"].detach().double().requires_grad_()
    ref = 0.3 / 2 * sequence_load_balancing_loss(seen["top"].reshape(-1, args.moe_top_k), s64, num_sequences, seq_dim)
    assert_close("seq_aux_loss (float64 formula)", layer.load_balancing_loss, ref, torch.float32)
    (g_layer,) = torch.autograd.grad(layer.load_balancing_loss, seen["scores"], retain_graph=True)
    (g_ref,) = torch.autograd.grad(ref, s64)
    assert_close("d scores", g_layer, g_ref, torch.float32)
    # The batched function sums the layers' losses of this type (two layers recorded).
    layer(x)
    assert_close("batched = sum of the layers", moe_module.batched_load_balancing_loss(args),
                 torch.stack(args.loss_collector.layer_losses).sum(), torch.float32)


def test_sequence_loss_is_one_at_uniform_routing():
    from megablocks.layers.losses import sequence_load_balancing_loss

    experts, k, seq_len, seqs = 4, 2, 8, 3
    top = torch.tensor([[(t + j) % experts for j in range(k)] for t in range(seq_len)] * seqs)
    top = top.view(seqs, seq_len, k).transpose(0, 1).reshape(-1, k)  # [S, B] layout
    scores = torch.full((seq_len * seqs, experts), 1.0 / experts, dtype=torch.float64)
    assert abs(float(sequence_load_balancing_loss(top, scores, seqs, 0)) - 1.0) < 1e-12


def test_global_load_balancing_loss_single_process_and_world_of_one(tmp_path):
    from megablocks.layers.losses import global_load_balancing_loss

    torch.manual_seed(1)
    scores = torch.rand(10, E, dtype=torch.float64).softmax(-1)
    counts = torch.tensor([7, 3, 6, 4])
    local = load_balancing_loss(counts, scores, K)
    assert_close("no process group: the local loss", global_load_balancing_loss(counts, scores, K), local,
                 torch.float64)
    import torch.distributed as dist

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        if dist.get_world_size() == 1:
            assert_close("a world of one", global_load_balancing_loss(counts, scores, K), local, torch.float64)
    finally:
        if started:
            dist.destroy_process_group()


def test_global_loss_type_in_the_layer():
    args = make_args(moe_loss_weight=0.2, num_layers=1, moe_capacity_factor=0,
                     moe_router_load_balancing_type="global_aux_loss", loss_collector=MoELossCollector())
    layer = MoE(args)
    layer.train()
    x = torch.randn(12, H, device=DEVICE)
    seen = {}
    layer.router.register_forward_hook(lambda m, i, o: seen.update(scores=o[0], top=o[2]))
    layer(x)
    counts = torch.bincount(seen["top"].flatten().cpu(), minlength=E)
    want = 0.2 * load_balancing_loss(counts.double(), seen["scores"].detach().double().cpu(), K)
    assert_close("global_aux_loss without a process group", layer.load_balancing_loss, want, torch.float32)
