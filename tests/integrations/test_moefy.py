"""`moefy`: upcycled models equal the dense ones at step 0, and train."""

import copy

import pytest
import torch

from megablocks.integrations import moefy as mf
from megablocks.layers.activation_fn import fused_name
from tests.conftest import DEVICE
from tests.utils import assert_close

transformers = pytest.importorskip("transformers")

VOCAB = 61


def llama(**kw):
    kw = {"num_hidden_layers": 2, **kw}
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40,
                                   num_attention_heads=4, num_key_value_heads=2, **kw)
    return transformers.LlamaForCausalLM(cfg).to(DEVICE)


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).to(DEVICE)


def exp_gpt(mlp_type):
    model = pytest.importorskip("exp.model")
    cfg = model.GPTConfig(vocab_size=VOCAB, seq_length=16, num_layers=2, hidden_size=32, num_attention_heads=4,
                          ffn_hidden_size=48, mlp_type=mlp_type, bias=mlp_type == "mlp")
    return model.GPT(cfg).to(DEVICE)


def logits_of(model, ids):
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.fixture
def references(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.mark.parametrize("build", ["llama", "gpt2", "exp_mlp", "exp_glu"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_step0_equals_dense(build, top_k, references):
    dense = {"llama": llama, "gpt2": gpt2, "exp_mlp": lambda: exp_gpt("mlp"), "exp_glu": lambda: exp_gpt("glu")}[build]()
    dense.eval()
    moe = mf.moefy(copy.deepcopy(dense), num_experts=4, top_k=top_k)
    layers = [m for m in moe.modules() if isinstance(m, mf.MoefiedMLP)]
    assert len(layers) == 2
    assert layers[0].moe.experts.mlp.w1.shape[0] == 4 * layers[0].moe.args.ffn_hidden_size
    if build == "llama":  # transformers' SiLUActivation as F.silu: the fused paths are taken
        assert fused_name(layers[0].moe.args.activation_fn) == "silu"
    ids = torch.randint(0, VOCAB, (2, 9), device=DEVICE)
    assert_close("logits", logits_of(moe, ids), logits_of(dense, ids))


def test_step0_gradients_sum_over_experts(references):
    """Each expert is a copy, so the dense weight's gradient is the sum of the experts' gradients."""
    dense = llama()
    moe = mf.moefy(copy.deepcopy(dense), num_experts=3, top_k=2, moe_loss_weight=0.0)
    ids = torch.randint(0, VOCAB, (2, 9), device=DEVICE)
    probe = torch.randn(2, 9, VOCAB, device=DEVICE)
    for m in (dense, moe):
        (logits_of(m, ids) * probe).sum().backward()
    for i in range(2):
        mlp = dense.model.layers[i].mlp
        experts = moe.model.layers[i].mlp.moe.experts.mlp
        f = mlp.gate_proj.weight.shape[0]
        for ours, theirs in ((experts.w1, mlp.gate_proj.weight.grad), (experts.v1, mlp.up_proj.weight.grad),
                             (experts.w2, mlp.down_proj.weight.grad.t())):
            assert_close(f"layer {i}", ours.grad.view(3, f, -1).sum(0), theirs)


def test_step0_under_interpreter():
    """One small case through the Triton kernels (interpreter on CPU), sparse path."""
    dense = exp_gpt("glu").eval()
    moe = mf.moefy(copy.deepcopy(dense), num_experts=2, top_k=2, mlp_impl="sparse", moe_block_size=16)
    ids = torch.randint(0, VOCAB, (1, 5), device=DEVICE)
    assert_close("logits", logits_of(moe, ids), logits_of(dense, ids))


@pytest.fixture
def one_thread():
    # The tiny model's ops are too small to gain from threads; one thread avoids contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_upcycled_model_trains(references, one_thread):
    torch.manual_seed(1)
    model = mf.moefy(llama(), num_experts=4, top_k=2, moe_loss_weight=0.01)
    model.train()
    ids = torch.randint(0, VOCAB, (4, 12), device=DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        out = model(ids, labels=ids)
        aux = mf.moe_aux_loss(model)
        assert aux.item() > 0
        (out.loss + aux).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    w1 = model.model.layers[0].mlp.moe.experts.mlp.w1.view(4, 40, 32)
    assert (w1[0] - w1[1]).abs().max() > 0, "the experts did not drift apart"
    assert len(model.moe_loss_collector.load_balancing) == 0  # moe_aux_loss clears the collector


def test_moefy_bad_input():
    with pytest.raises(ValueError, match="dense MLPs"):
        mf.moefy(torch.nn.Sequential(torch.nn.Linear(4, 4)), num_experts=2)
    with pytest.raises(ValueError, match="gate/up biases"):
        mf.moefy(llama(mlp_bias=True), num_experts=2)
    with pytest.raises(ValueError, match="mlp_impl"):
        mf.moefy(gpt2(), num_experts=2, mlp_impl="sparse")
    with pytest.raises(ValueError, match="moe_normalize_expert_weights"):
        mf.moefy(llama(), num_experts=2, moe_normalize_expert_weights=2)
    with pytest.raises(ValueError, match="moe_top_k"):
        mf.moefy(llama(), num_experts=2, top_k=3)


def test_moefy_twice_converts_nothing_new(references):
    model = mf.moefy(llama(), num_experts=2)
    with pytest.raises(ValueError, match="dense MLPs"):
        mf.moefy(model, num_experts=2)


def test_first_k_layers_stay_dense(references):
    """`first_k_dense=1` leaves the first layer's MLP dense (DeepSeek-V3's `first_k_dense_replace`),
    converts the rest, and the model still equals the dense one at step 0."""
    dense = llama(num_hidden_layers=3).eval()
    moe = mf.moefy(copy.deepcopy(dense), num_experts=4, top_k=2, first_k_dense=1)
    kinds = [type(layer.mlp).__name__ for layer in moe.model.layers]
    assert kinds[0] == type(dense.model.layers[0].mlp).__name__ and kinds[1:] == ["MoefiedMLP"] * 2, kinds
    ids = torch.randint(0, VOCAB, (2, 9), device=DEVICE)
    assert_close("logits", logits_of(moe, ids), logits_of(dense, ids))
    with pytest.raises(ValueError, match="first_k_dense: expected an int in"):
        mf.moefy(copy.deepcopy(dense), num_experts=4, first_k_dense=3)
