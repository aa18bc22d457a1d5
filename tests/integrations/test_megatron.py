"""Megatron-Core integration: our MLP inside megatron-core's GPT equals our standalone dMoE and
megatron-core's own MoE layer given the same weights, forward and backward, aux loss included.

On CPU megatron-core builds a GPTModel (gloo, world size 1) but its core attention needs CUDA,
so the tests drive the TransformerLayer's MLP block (`_forward_mlp`: pre-MLP norm, our MLP,
bias-dropout-add) and the MLP module itself; expert parallelism runs on 2 gloo ranks over
megatron-core's expert-model-parallel group. The GPU script `scripts/megatron_gpu.sh` trains
the whole model.
"""

import contextlib
import copy
import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("megatron.core")

import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.models.gpt.gpt_model import GPTModel  # noqa: E402
from megatron.core.transformer.moe.moe_utils import (  # noqa: E402
    MoEAuxLossAutoScaler,
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
)
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from megablocks.integrations import megatron as mg  # noqa: E402
from megablocks.layers.arguments import Arguments  # noqa: E402
from megablocks.layers.dmoe import dMoE  # noqa: E402
from tests.utils import assert_close, assert_equal, assert_grads_in_layout  # noqa: E402

H, FFN, E, LAYERS = 32, 48, 4, 2


@pytest.fixture(scope="module", autouse=True)
def model_parallel(tmp_path_factory):
    started = False
    if not dist.is_initialized():
        # A store file, not a TCP port that another test worker could take first.
        store = tmp_path_factory.mktemp("process-group") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        started = True
    parallel_state.initialize_model_parallel(1, 1)
    yield
    parallel_state.destroy_model_parallel()
    if started:
        dist.destroy_process_group()


@pytest.fixture(autouse=True)
def references(monkeypatch):
    # The torch references of the ops (the kernels are tested in tests/ops); fast on CPU.
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def config(top_k=2, swiglu=False, coeff=0.05, **kw):
    return TransformerConfig(
        num_layers=LAYERS, hidden_size=H, num_attention_heads=4, ffn_hidden_size=FFN, use_cpu_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0, num_moe_experts=E, moe_router_topk=top_k,
        moe_router_pre_softmax=top_k == 1, moe_aux_loss_coeff=coeff, gated_linear_unit=swiglu,
        activation_func=F.silu if swiglu else F.gelu, **kw,
    )


def gpt(cfg, **overrides):
    return GPTModel(config=cfg, transformer_layer_spec=mg.megablocks_layer_spec(**overrides), vocab_size=64,
                    max_sequence_length=16)


def standalone(top_k, swiglu, mlp_impl, state, coeff=0.05):
    """Our dMoE configured by hand (not through from_megatron), with the integrated layer's weights."""
    args = Arguments(
        hidden_size=H, ffn_hidden_size=FFN, num_layers=LAYERS, moe_num_experts=E, moe_top_k=top_k,
        moe_normalize_expert_weights=1 if top_k > 1 else None, moe_loss_weight=coeff, moe_capacity_factor=0,
        activation_fn=F.silu if swiglu else F.gelu, mlp_type="glu" if swiglu else "mlp", mlp_impl=mlp_impl,
        moe_block_size=16, fp16=False, device="cpu",
    )
    layer = dMoE(args)
    layer.load_state_dict(state)
    return layer


def grads(module):
    return {name: p.grad.clone() for name, p in module.named_parameters()}


@pytest.mark.parametrize("mlp_impl", ["sparse", "grouped"])
@pytest.mark.parametrize("top_k,swiglu", [(1, False), (2, False), (2, True)])
def test_mlp_equals_standalone_dmoe(mlp_impl, top_k, swiglu):
    model = gpt(config(top_k, swiglu, coeff=1.0), mlp_impl=mlp_impl, moe_block_size=16)
    layer = model.decoder.layers[1]
    mlp = layer.mlp
    assert isinstance(mlp, mg.MegablocksMLP) and mlp.layer_number == 2
    ref = standalone(top_k, swiglu, mlp_impl, mlp.moe.state_dict(), coeff=1.0)
    for p in ref.parameters():
        p.data.normal_(0, 0.3)  # large enough weights that routing and the losses matter
    mlp.moe.load_state_dict(ref.state_dict())
    model.train()

    h = torch.randn(7, 3, H)
    g = torch.randn(7, 3, H)
    h_ours = h.clone().requires_grad_()
    out, bias = mlp(h_ours)
    params = dict(mlp.named_parameters())
    layout = torch.autograd.grad((out * g + bias * g).sum(), list(params.values()), retain_graph=True)
    assert_grads_in_layout(f"MegablocksMLP {mlp_impl}", params, layout)
    (out * g + bias * g).sum().backward()

    h_ref = h.clone().requires_grad_()
    y, b = ref(h_ref)
    lbl = ref.load_balancing_loss * LAYERS  # megatron's coefficient is per layer
    ((y * g + b * g).sum() + lbl).backward()

    assert_equal("output", out, y)  # the attached loss leaves the forward value unchanged
    assert_equal("bias", bias, b)
    assert bias.shape == (H,)
    assert_close("hidden_states.grad", h_ours.grad, h_ref.grad)
    ours, theirs = grads(mlp.moe), grads(ref)
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert_close(f"{name}.grad", ours[name], theirs[name])
    assert_close("aux loss", mlp.aux_losses()["load_balancing_loss"], lbl)


def test_aux_loss_reaches_router_gradient_with_megatron_scale():
    """Only the aux loss drives the router when the main gradient is 0; its gradient follows
    megatron-core's MoEAuxLossAutoScaler scale, and the loss is logged per layer."""
    model = gpt(config(top_k=2), mlp_impl="grouped")
    mlp = model.decoder.layers[0].mlp
    ref = standalone(2, False, "grouped", mlp.moe.state_dict())
    model.train()
    h = torch.randn(9, 2, H)
    clear_aux_losses_tracker()
    try:
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(3.0))
        out, _ = mlp(h)
        (out * 0).sum().backward()
    finally:
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    ref(h)
    (3.0 * LAYERS * ref.load_balancing_loss).backward()
    router_grad = mlp.moe.router.layer.weight.grad
    assert router_grad.abs().max() > 0
    assert_close("router.layer.weight.grad", router_grad, ref.router.layer.weight.grad)
    assert mlp.moe.experts.mlp.w1.grad.abs().max() == 0  # the aux loss does not touch the experts
    logged = get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"]
    assert_close("logged loss", logged[0], ref.load_balancing_loss.detach() * LAYERS / 0.05)
    assert logged[1] == 0


def test_no_aux_loss_in_eval():
    model = gpt(config(top_k=2), mlp_impl="grouped")
    model.eval()
    out, _ = model.decoder.layers[0].mlp(torch.randn(5, 2, H))
    assert out.grad_fn is None or "AuxLoss" not in type(out.grad_fn).__name__
    assert model.decoder.layers[0].mlp.aux_losses() == {}


def test_transformer_layer_mlp_block():
    """The TransformerLayer's MLP block: residual + our MLP(norm(x)) + bias, gradients through."""
    model = gpt(config(top_k=1), mlp_impl="grouped")
    layer = model.decoder.layers[0]
    model.train()
    x = torch.randn(6, 2, H, requires_grad=True)
    out = layer._forward_mlp(x)
    out = out[0] if isinstance(out, tuple) else out
    with torch.no_grad():
        y, b = layer.mlp.moe(layer.pre_mlp_layernorm(x))
    assert_close("layer output", out, x + y + b)
    out.square().sum().backward()
    assert x.grad.abs().max() > 0
    assert layer.mlp.moe.experts.mlp.w2.grad.abs().max() > 0
    assert layer.pre_mlp_layernorm.weight.grad.abs().max() > 0
    _check_mlp_block_grads(layer, x, lambda out: out.square().sum())


def _check_mlp_block_grads(layer, x, loss_of):
    """The gradients `loss_of(layer._forward_mlp(x)).backward()` left (x, the norm, every MoE
    parameter) against plain autograd on `x + moe(norm(x)) + bias` built from copies: the norm
    copied, the MoE rebuilt as a standalone dMoE from the layer's own Arguments and weights, and
    megatron-core's aux-loss gradients (load balancing, coefficient per layer; z-loss) added as the
    losses they stand for."""
    norm = copy.deepcopy(layer.pre_mlp_layernorm)
    ref = dMoE(dataclasses.replace(layer.mlp.args, loss_collector=None))
    ref.load_state_dict(layer.mlp.moe.state_dict())
    ref.train()
    x_ref = x.detach().clone().requires_grad_()
    y, b = ref(norm(x_ref))
    loss = loss_of(x_ref + y + b)
    if ref.load_balancing_loss is not None:
        loss = loss + ref.load_balancing_loss * layer.mlp.args.num_layers
    if ref.router_zloss is not None:
        loss = loss + ref.router_zloss
    loss.backward()
    assert_close("x.grad", x.grad, x_ref.grad, family="layer")
    for name, p in norm.named_parameters():
        assert_close(f"pre_mlp_layernorm.{name}.grad", getattr(layer.pre_mlp_layernorm, name).grad, p.grad,
                     family="layer")
    ours, theirs = grads(layer.mlp.moe), grads(ref)
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert_close(f"moe.{name}.grad", ours[name], theirs[name], family="layer")


def test_moefy_megatron_replaces_dense_mlps():
    cfg = TransformerConfig(num_layers=LAYERS, hidden_size=H, num_attention_heads=4, ffn_hidden_size=FFN,
                            use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0)
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=64,
                     max_sequence_length=16)
    mg.moefy_megatron(model, moe_num_experts=E, moe_top_k=1, mlp_impl="grouped")
    layers = model.decoder.layers
    assert [type(l.mlp) for l in layers] == [mg.MegablocksMLP] * LAYERS
    assert [l.mlp.layer_number for l in layers] == [1, 2]
    assert layers[0].mlp.moe.router.layer.weight.shape == (E, H)
    assert layers[0].mlp.moe.experts.mlp.w1.shape == (E * FFN, H)
    x = torch.randn(4, 2, H, requires_grad=True)
    out = layers[0]._forward_mlp(x)
    (out[0] if isinstance(out, tuple) else out).sum().backward()
    assert layers[0].mlp.moe.router.layer.weight.grad.abs().max() > 0
    _check_mlp_block_grads(layers[0], x, lambda out: out.sum())


def test_moefy_megatron_keeps_the_first_layers_dense():
    cfg = TransformerConfig(num_layers=LAYERS, hidden_size=H, num_attention_heads=4, ffn_hidden_size=FFN,
                            use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0)
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=64,
                     max_sequence_length=16)
    dense_type = type(model.decoder.layers[0].mlp)
    mg.moefy_megatron(model, first_k_dense=1, moe_num_experts=E, moe_top_k=1, mlp_impl="grouped")
    assert [type(l.mlp) for l in model.decoder.layers] == [dense_type, mg.MegablocksMLP]
    with pytest.raises(ValueError, match="first_k_dense"):
        mg.moefy_megatron(model, first_k_dense=LAYERS, moe_num_experts=E)


def test_arguments_from_config_mapping():
    cfg = config(top_k=2, swiglu=True, moe_z_loss_coeff=1e-3, moe_grouped_gemm=False)
    args = mg.arguments_from_config(cfg, moe_block_size=32)
    assert (args.hidden_size, args.ffn_hidden_size, args.num_layers) == (H, FFN, LAYERS)
    assert (args.moe_num_experts, args.moe_top_k, args.moe_loss_weight, args.moe_zloss_weight) == (E, 2, 0.05, 1e-3)
    assert args.mlp_type == "glu" and args.activation_fn is F.silu
    assert args.moe_normalize_expert_weights == 1 and args.moe_capacity_factor == 0
    assert args.return_bias and args.bias and not args.fp16 and not args.moe_expert_model_parallelism
    assert args.moe_block_size == 32 and args.expert_parallel_group is None


def test_bad_configurations():
    cfg = copy.copy(config())
    cfg.tensor_model_parallel_size = 2
    with pytest.raises(ValueError, match="tensor_model_parallel_size"):
        mg.arguments_from_config(cfg)
    cfg = copy.copy(config())
    cfg.sequence_parallel = True
    with pytest.raises(ValueError, match="sequence_parallel"):
        mg.arguments_from_config(cfg)
    with pytest.raises(ValueError, match="TransformerLayer"):
        mg.moefy_megatron(torch.nn.Linear(2, 2), moe_num_experts=E)
    with pytest.raises(ValueError, match="moe_top_k"):
        mg.MegablocksMLP(config(), moe_top_k=E + 1)
    identity = copy.deepcopy(get_gpt_layer_local_spec())
    from megatron.core.transformer.identity_op import IdentityOp

    identity.submodules.pre_mlp_layernorm = IdentityOp
    with pytest.raises(ValueError, match="pre_mlp_layernorm"):
        mg.megablocks_layer_spec(identity)


def test_pretrain_gpt_datasets_over_exp_data(tmp_path):
    """exp/megatron/pretrain_gpt.py reads exp.data's Megatron-format files with megatron-core's
    GPTDataset: next-token labels, byte ids, enough samples for the steps asked."""
    preprocess = pytest.importorskip("exp.data.preprocess")
    pretrain = pytest.importorskip("exp.megatron.pretrain_gpt")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(f"document {i}: " + "the quick brown fox " * (5 + i % 7) for i in range(60)))
    assert preprocess.main(["--input", str(corpus), "--output-prefix", str(tmp_path / "c")]) == 0
    args = pretrain.parse_args(["--config", "exp/megatron/configs/tiny_dmoe.json", "--data-path",
                                str(tmp_path / "c_text_document"), "--seq-length", "32", "--train-iters", "5",
                                "--cache-dir", str(tmp_path / "cache")])
    assert (args.num_layers, args.moe_num_experts, args.vocab_size, args.seq_length) == (2, 8, 257, 32)
    train, valid, test = pretrain.build_datasets(args, steps=5, global_batch=4)
    assert len(train) >= 20 and valid is not None and test is None
    text = corpus.read_bytes()
    for i in (0, 7, len(train) - 1):
        sample = train[i]
        tokens, labels = torch.as_tensor(sample["tokens"]), torch.as_tensor(sample["labels"])
        assert tokens.shape == (32,) and int(tokens.max()) <= 256
        assert_equal("labels", labels[:-1], tokens[1:])
        window = bytes(t for t in tokens.tolist() if t < 256)[:8]
        assert window in text or 256 in tokens.tolist()[:8]


def _ep_worker(rank, world_size):
    """Each rank holds E/W experts of the megatron-core expert-model-parallel group; its outputs,
    input gradients and expert-weight gradients equal one process's dMoE on the union of the
    ranks' batches (megatron-core's DDP then averages them over the data-parallel ranks)."""
    os.environ["TRITON_INTERPRET"] = "0"
    parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=world_size)
    try:
        cfg = config(top_k=2, coeff=0.0, expert_model_parallel_size=world_size)
        mlp = mg.MegablocksMLP(cfg, mlp_impl="grouped")
        assert mlp.args.moe_expert_model_parallelism
        assert mlp.args.expert_parallel_group is parallel_state.get_expert_model_parallel_group()
        gen = torch.Generator().manual_seed(5)
        ref = dMoE(Arguments(hidden_size=H, ffn_hidden_size=FFN, num_layers=LAYERS, moe_num_experts=E, moe_top_k=2,
                             moe_normalize_expert_weights=1, moe_loss_weight=0.0, moe_capacity_factor=0,
                             activation_fn=F.gelu, mlp_impl="grouped", fp16=False, device="cpu"))
        for p in ref.parameters():
            p.data = torch.randn(p.shape, generator=gen) * 0.3
        per_rank = E // world_size
        with torch.no_grad():
            for name, p in mlp.moe.named_parameters():
                src = dict(ref.named_parameters())[name]
                if name.startswith("experts.mlp."):
                    src = src.view(E, FFN, H)[rank * per_rank:(rank + 1) * per_rank].reshape(-1, H)
                p.copy_(src)
        xs = [torch.randn(5 + r, 2, H, generator=gen) for r in range(world_size)]
        gs = [torch.randn(5 + r, 2, H, generator=gen) for r in range(world_size)]
        mlp.train()
        x = xs[rank].clone().requires_grad_()
        out, bias = mlp(x)
        (out * gs[rank]).sum().backward()

        x_ref = torch.cat(xs).requires_grad_()
        y, _ = ref(x_ref)
        (y * torch.cat(gs)).sum().backward()
        rows = slice(sum(t.shape[0] for t in xs[:rank]), sum(t.shape[0] for t in xs[:rank + 1]))
        assert_close("output", out, y[rows])
        assert_close("x.grad", x.grad, x_ref.grad[rows])
        for name in ("w1", "w2"):
            ours = getattr(mlp.moe.experts.mlp, name)
            theirs = getattr(ref.experts.mlp, name).grad.view(E, FFN, H)[rank * per_rank:(rank + 1) * per_rank]
            assert getattr(ours, "allreduce", True) is False  # megatron-core DDP: expert-data-parallel reduce
            assert_close(f"experts.mlp.{name}.grad", ours.grad, theirs.reshape(-1, H))
    finally:
        parallel_state.destroy_model_parallel()


def test_expert_parallel_over_megatron_groups():
    from tests.parallel.launcher import run

    run("tests.integrations.test_megatron:_ep_worker", 2, timeout=120)


@pytest.mark.parametrize("top_k", [1, 2])
def test_equals_megatron_core_moe_layer(top_k, monkeypatch, request):
    """Given the same router and expert weights, our layer computes what megatron-core's own
    MoELayer (SequentialMLP experts, allgather dispatcher) computes: output, input gradient,
    expert gradients and the router gradient, load-balancing loss included."""
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.spec_utils import build_module

    # megatron-core's router moves its weight to the current CUDA device and probes Transformer
    # Engine's GEMM; on a CPU-only machine point both at the CPU / torch path.
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    monkeypatch.setattr(moe_utils, "te_general_gemm", None, raising=False)
    # Its router functions are compiled; torch.compile on a machine with CUDA asks for the current
    # device's properties, which the patch above breaks: they run eagerly here (the same math).
    stack = contextlib.ExitStack()
    stack.enter_context(torch._dynamo.config.patch(disable=True))
    request.addfinalizer(stack.close)
    cfg = config(top_k=top_k, coeff=10.0, add_bias_linear=False, moe_token_dispatcher_type="allgather")
    spec = get_gpt_layer_local_spec(num_experts=E).submodules.mlp
    pgs = moe_utils.get_default_pg_collection()
    # Newer megatron-core releases give specs as functools.partial objects, called directly.
    theirs = spec(config=cfg, pg_collection=pgs) if callable(spec) and not hasattr(spec, "module") else build_module(
        spec, config=cfg, pg_collection=pgs)
    theirs.set_layer_number(1)
    ours = mg.MegablocksMLP(cfg, mlp_impl="grouped")
    ours.set_layer_number(1)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.3)
        ours.moe.router.layer.weight.copy_(theirs.router.weight)
        for i, expert in enumerate(theirs.experts.local_experts):
            ours.moe.experts.mlp.w1[i * FFN:(i + 1) * FFN].copy_(expert.linear_fc1.weight)
            ours.moe.experts.mlp.w2[i * FFN:(i + 1) * FFN].copy_(expert.linear_fc2.weight.t())
    theirs.train()
    ours.train()
    x = torch.randn(6, 2, H)
    g = torch.randn(6, 2, H)
    x_theirs = x.clone().requires_grad_()
    out_theirs, bias_theirs = theirs(x_theirs)
    (out_theirs * g).sum().backward()
    x_ours = x.clone().requires_grad_()
    out_ours, bias_ours = ours(x_ours)
    (out_ours * g).sum().backward()

    assert bias_theirs is None and bias_ours is None
    assert_close("output", out_ours, out_theirs)
    assert_close("hidden_states.grad", x_ours.grad, x_theirs.grad)
    assert_close("router.weight.grad", ours.moe.router.layer.weight.grad, theirs.router.weight.grad)
    for i, expert in enumerate(theirs.experts.local_experts):
        rows = slice(i * FFN, (i + 1) * FFN)
        assert_close(f"expert {i} fc1.grad", ours.moe.experts.mlp.w1.grad[rows], expert.linear_fc1.weight.grad)
        assert_close(f"expert {i} fc2.grad", ours.moe.experts.mlp.w2.grad[rows], expert.linear_fc2.weight.grad.t())


def test_build_kwargs_and_cpu_initialization():
    """A TransformerLayer's build-time keywords (e.g. is_mtp_layer) are accepted and ignored;
    use_cpu_initialization puts the parameters on the CPU, as megatron-core does."""
    mlp = mg.MegablocksMLP(config(), is_mtp_layer=False, name="decoder.layers.0.mlp", mlp_impl="grouped")
    assert all(p.device.type == "cpu" for p in mlp.parameters())
    with pytest.raises(TypeError):
        mg.MegablocksMLP(config(), not_a_field=1)
    assert Arguments.from_megatron(config()).device == "cpu"
