"""Bodies of the expert-parallel tests, run on every rank by `tests.parallel.launcher`.

The reference on every rank is the single-process layer built from the same seed (so from the
same global weights) and run on the union of all ranks' batches (regenerated locally from
per-rank seeds). With per-rank losses L_r = Σ out_r · g_r:
    out_r, dL_r/dx_r, router and bias gradients  = the reference's, on rank r's rows only
    expert weight gradients                      = (1/W) dΣ_r L_r / dw, this rank's slice
"""

import torch
import torch.distributed as dist

from megablocks.layers import data_parallel, mpu
from megablocks.layers.all_to_all import all_to_all, start_all_to_all, wait_all_to_all
from megablocks.layers.dmoe import dMoE
from megablocks.layers.moe import MoE
from megablocks.ops.activation import clamped_swiglu
from tests.layers.moe_reference import make_args, randomize_expert_biases, route_all_to
from tests.utils import assert_close, assert_equal, assert_grads_in_layout


def _device() -> torch.device:
    """The rank's device: its GPU under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _dtypes():
    """fp32 everywhere; bf16 too on GPUs (the interpreter mishandles bf16)."""
    return [torch.float32] + ([torch.bfloat16] if _device().type == "cuda" else [])


def _expert_names(layer):
    return [n for n, p in layer.named_parameters() if mpu.param_is_expert_model_parallel(p)]


def _shard(ep_args, name: str, full: torch.Tensor, moe_layout: bool) -> torch.Tensor:
    """This rank's slice of a single-process expert parameter (or gradient)."""
    E, F, H = ep_args.moe_num_experts, ep_args.ffn_hidden_size, ep_args.hidden_size
    if name.endswith("_bias"):  # the experts' biases [E, ·]: sharded over experts only (hsd = 1)
        per_rank = mpu.experts_per_rank(ep_args)
        first = mpu.expert_shard_index(ep_args) * per_rank
        return full[first:first + per_rank]
    if moe_layout and not name.endswith("w2"):  # MoE's w1 / v1: [E, H, F]
        return mpu.expert_shard(ep_args, full.transpose(1, 2)).transpose(1, 2)
    shard = mpu.expert_shard(ep_args, full.reshape(E, F, H))
    return shard if moe_layout else shard.reshape(-1, H)


def _batches(world_size, tokens, hidden, dtype, positive):
    xs, gs = [], []
    for s in range(world_size):
        gen = torch.Generator().manual_seed(1000 + s)
        t = tokens[s % len(tokens)]
        x = torch.rand(t, hidden, generator=gen) + 0.5 if positive else torch.randn(t, hidden, generator=gen)
        xs.append(x.to(dtype=dtype, device=_device()))
        gs.append(torch.randn(t, hidden, generator=gen).to(dtype=dtype, device=_device()))
    return xs, gs


def check_layer(rank, world_size, *, layer="dmoe", impl="torch", mlp_type="mlp", experts=4, top_k=2,
                hidden=24, ffn=16, tokens=(6, 5), capacity_factor=0, group=None, all_to_expert=None,
                expert_bias=False, chunks=1, shared_expert=False, fp8=None):
    for dtype in _dtypes():
        _check_layer(rank, world_size, layer, impl, mlp_type, experts, top_k, hidden, ffn, tokens,
                     capacity_factor, group, all_to_expert, dtype, expert_bias, chunks, shared_expert, fp8)


def _check_layer(rank, world_size, layer, impl, mlp_type, experts, top_k, hidden, ffn, tokens, capacity_factor,
                 group, all_to_expert, dtype, expert_bias=False, chunks=1, shared_expert=False, fp8=None):
    cls = dMoE if layer == "dmoe" else MoE
    kw = dict(hidden_size=hidden, ffn_hidden_size=ffn, moe_num_experts=experts, moe_top_k=top_k,
              mlp_type=mlp_type, moe_capacity_factor=capacity_factor, device=_device(), fp8=fp8)
    if shared_expert:  # run while the rows travel (`during_exchange`)
        kw.update(shared_expert=True, shared_expert_hidden_size=ffn + 4)
    if expert_bias:  # gpt-oss's experts: per-expert biases (sharded like the weights), the clamped SwiGLU
        kw.update(moe_expert_bias=True, moe_router_bias=True)
        if mlp_type == "glu":
            kw.update(activation_fn=clamped_swiglu)
    torch.manual_seed(7)
    ref = cls(make_args(impl, dtype, **kw))
    torch.manual_seed(7)
    ep = cls(make_args(impl, dtype, moe_expert_model_parallelism=True, expert_parallel_group=group,
                       moe_expert_parallel_chunks=chunks, **kw))
    ep_size = world_size if group is None else dist.get_world_size(group)
    assert ep.experts._exchange.chunks == (min(chunks, experts // ep_size) if experts >= ep_size else 1)
    with torch.no_grad():
        ref.experts.bias.copy_(torch.randn(hidden, generator=torch.Generator().manual_seed(3)))
        ep.experts.bias.copy_(ref.experts.bias)
        if all_to_expert is not None:
            route_all_to(ref, all_to_expert)
            ep.router.layer.weight.copy_(ref.router.layer.weight)
        if expert_bias:
            torch.manual_seed(5)
            randomize_expert_biases(ref)
            ep.router.layer.bias.copy_(ref.router.layer.bias)
            for name, p in ep.experts.mlp.named_parameters():
                if name.endswith("_bias"):
                    p.copy_(_shard(ep.args, name, ref.experts.mlp.get_parameter(name), layer == "moe"))
    moe_layout = layer == "moe"
    names = _expert_names(ep)
    expected_names = ["w1", "w2"] + (["v1"] if mlp_type == "glu" else [])
    if expert_bias:
        expected_names += [f"{n}_bias" for n in expected_names]
    assert sorted(names) == sorted(f"experts.mlp.{n}" for n in expected_names), names
    ref_params = dict(ref.named_parameters())
    for name, p in ep.named_parameters():
        expected = _shard(ep.args, name, ref_params[name], moe_layout) if name in names else ref_params[name]
        assert_equal(f"rank {rank} parameter {name}", p, expected)

    xs, gs = _batches(world_size, tokens, hidden, dtype, positive=all_to_expert is not None)
    x = xs[rank].clone().requires_grad_(True)
    out = ep(x)
    where = f"rank {rank} {layer} {impl} {mlp_type} E={experts} W={world_size} chunks={chunks} {dtype} fp8={fp8}"
    params = dict(ep.named_parameters())
    # The FP8 node's graph runs backward once (KernelPolicy.one_node_experts): its layout check
    # takes a forward of its own.
    probe = out if fp8 is None else ep(x)
    assert_grads_in_layout(where, params, torch.autograd.grad(probe, list(params.values()), gs[rank],
                                                              retain_graph=fp8 is None))
    (out * gs[rank]).sum().backward()

    X = torch.cat(xs).requires_grad_(True)
    OUT = ref(X)
    if fp8 is not None:  # both layers ran their experts in FP8: each holds its weights' FP8 forms
        for which, module in (("expert parallel", ep), ("one process", ref)):
            cache = module.experts.mlp.__dict__.get("_fp8_weights")
            assert cache is not None and cache.nbytes() > 0, f"{where}: the {which} layer made no FP8 weights"
    lo = sum(t.shape[0] for t in xs[:rank])
    rows = slice(lo, lo + xs[rank].shape[0])
    expert_params = [ref_params[n] for n in names]
    expert_grads = torch.autograd.grad((OUT * torch.cat(gs)).sum(), expert_params, retain_graph=fp8 is None)
    if fp8 is not None:  # (as above: a forward for each backward)
        OUT = ref(X)
    local = [X, ref.router.layer.weight, ref.experts.bias]
    if expert_bias:
        local.append(ref.router.layer.bias)
    shared_names = [n for n in ref_params if n.startswith("shared_expert.")]
    assert bool(shared_names) == shared_expert, shared_names
    local += [ref_params[n] for n in shared_names]
    local_grads = torch.autograd.grad((OUT[rows] * gs[rank]).sum(), local)

    if all_to_expert is not None:
        _, _, top = ref.router(X.detach())
        assert bool((top[:, 0] == all_to_expert).all()), "the routing did not put every first choice on one expert"
    # FP8 in fp32 on a GPU: the tensor cores' FP8 chains, whose order differs between the two
    # layers' launches (`fp8_tolerance`); elsewhere the layer's limits.
    fam = "fp8" if fp8 is not None and dtype == torch.float32 and _device().type == "cuda" else "layer"
    assert_close(f"{where} out", out, OUT[rows], family=fam)
    assert_close(f"{where} grad x", x.grad, local_grads[0][rows], family=fam)
    assert_close(f"{where} grad router", ep.router.layer.weight.grad, local_grads[1], family=fam)
    assert_close(f"{where} grad bias", ep.experts.bias.grad, local_grads[2], family=fam)
    if expert_bias:
        assert_close(f"{where} grad router bias", ep.router.layer.bias.grad, local_grads[3], family=fam)
    ep_params = dict(ep.named_parameters())
    for name, g in zip(shared_names, local_grads[len(local_grads) - len(shared_names):]):
        assert_close(f"{where} grad {name}", ep_params[name].grad, g, family=fam)
    for name, g in zip(names, expert_grads):
        assert_close(f"{where} grad {name}", ep_params[name].grad, _shard(ep.args, name, g / world_size, moe_layout),
                     family=fam)


def layer_cases(rank, world_size, cases):
    for case in cases:
        check_layer(rank, world_size, **case)


def layer_cases_in_subgroups(rank, world_size, group_size, cases):
    """Expert-parallel groups of `group_size` consecutive ranks side by side, each checked
    against the single-process layer on its own ranks' batches."""
    ep_group, _ = data_parallel.expert_parallel_groups(group_size)
    for case in cases:
        check_layer(rank % group_size, group_size, group=ep_group, **case)


class _Model(torch.nn.Module):
    """A shared projection, then a dMoE: out = moe(relu(x W^T))."""

    def __init__(self, args):
        super().__init__()
        self.proj = torch.nn.Linear(args.hidden_size, args.hidden_size, dtype=torch.float32, device=args.device)
        self.moe = dMoE(args)

    def forward(self, x):
        return self.moe(torch.relu(self.proj(x)))


def _model(ep_group=None, impl="torch"):
    kw = dict(hidden_size=16, ffn_hidden_size=8, moe_num_experts=4, moe_top_k=2, mlp_type="glu")
    if ep_group is not None:
        kw.update(moe_expert_model_parallelism=True, expert_parallel_group=ep_group)
    torch.manual_seed(11)
    return _Model(make_args(impl, torch.float32, device=_device(), **kw))


def _loss(model, x, target):
    return (model(x) - target).pow(2).mean()


def dp_step(rank, world_size, ep_size, use_ddp, max_norm=0.05):
    """One SGD step (gradient norm clipped) of an expert-parallel model with the data-parallel
    helper equals one step of the single-process model on the union of the batches (mean of the
    per-rank mean losses)."""
    ep_group, edp_group = data_parallel.expert_parallel_groups(ep_size)
    batches = []
    for s in range(world_size):
        gen = torch.Generator().manual_seed(500 + s)
        batches.append(tuple(torch.randn(5, 16, generator=gen).to(_device()) for _ in range(2)))

    ref = _model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    sum(_loss(ref, x, t) for x, t in batches).div(world_size).backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    assert ref_norm > max_norm, "the test should clip"
    ref_opt.step()

    model = _model(ep_group)
    if use_ddp:
        data_parallel.ignore_expert_parameters_in_ddp(model)
        shared = torch.nn.parallel.DistributedDataParallel(model, device_ids=[_device()] if _device().type == "cuda" else None)
        helper = data_parallel.DistributedGroupedDataParallel(
            model, expert_data_parallel_group=edp_group if world_size > ep_size else None, reduce_shared=False
        )
        forward = shared
    else:
        helper = data_parallel.DistributedGroupedDataParallel(
            model, expert_data_parallel_group=edp_group if world_size > ep_size else None
        )
        forward = helper
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, t = batches[rank]
    _loss(forward, x, t).backward()
    helper.allreduce_gradients()
    norm = helper.clip_grad_norm_(max_norm)
    assert_close(f"rank {rank} ddp={use_ddp} gradient norm", norm, ref_norm, family="layer")
    opt.step()

    names = _expert_names(model)
    assert len(names) == 3
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        expected = _shard(model.moe.args, name, ref_params[name], False) if name in names else ref_params[name]
        assert_close(f"rank {rank} ddp={use_ddp} weight {name} after one step", p, expected, family="layer")


def _expect_error(what, fn, match):
    try:
        fn()
    except ValueError as e:
        if match not in str(e):
            raise AssertionError(f"{what}: expected a ValueError mentioning {match!r}, got: {e}") from e
        return
    raise AssertionError(f"{what}: expected a ValueError, none was raised")


def bad_setups(rank, world_size):
    base = dict(hidden_size=16, ffn_hidden_size=8, moe_num_experts=4, moe_top_k=2)

    dev = _device()

    def build(**kw):
        return dMoE(make_args("torch", torch.float32, device=dev, moe_expert_model_parallelism=True, **{**base, **kw}))

    # Experts that cannot be split over the group: every rank raises when building.
    _expect_error("E=3 over 2 ranks", lambda: build(moe_num_experts=3, moe_top_k=1), "moe_num_experts")
    # Per-expert biases with each expert's FFN split over the ranks (E=1 over 2 ranks).
    _expect_error("biases with the FFN split", lambda: build(moe_num_experts=1, moe_top_k=1, moe_expert_bias=True),
                  "moe_expert_bias: expected each expert on one rank")

    # Ranks that disagree on the layer's sizes: every rank raises before any all_to_all.
    layer = build(ffn_hidden_size=8 if rank == 0 else 4)
    _expect_error("ffn sizes differ", lambda: layer(torch.randn(3, 16, device=dev)), "disagree on ffn_hidden_size")
    # Ranks that disagree on whether the experts have biases.
    layer = build(moe_expert_bias=rank == 0)
    _expect_error("biases differ", lambda: layer(torch.randn(3, 16, device=dev)), "disagree on moe_expert_bias")
    # Ranks that disagree on the exchange's chunks (their all_to_alls would not pair up).
    layer = build(moe_expert_parallel_chunks=1 + rank)
    _expect_error("chunks differ", lambda: layer(torch.randn(3, 16, device=dev)), "disagree on moe_expert_parallel_chunks")

    # Ranks that disagree on the input dtype: every rank raises.
    dtype = torch.float32 if rank == 0 else torch.float16
    layer = dMoE(make_args("torch", dtype, device=dev, moe_expert_model_parallelism=True, **base))
    _expect_error("dtypes differ", lambda: layer(torch.randn(3, 16, device=dev).to(dtype)), "disagree on the input dtype")

    # A group this rank is not a member of.
    solo = dist.new_group([0])
    if rank == 0:
        build(expert_parallel_group=solo)(torch.randn(3, 16, device=dev))
    else:
        _expect_error("non-member group", lambda: build(expert_parallel_group=solo), "not a member")

    # The all_to_all op: uneven splits (zero included), backward = the reverse exchange.
    send = [[3, 0], [1, 2]][rank]
    recv = [[3, 1], [0, 2]][rank]
    x = (torch.arange(sum(send) * 2, dtype=torch.float32, device=dev).view(-1, 2) + 100 * rank).requires_grad_(True)
    y = all_to_all(x, recv, send)
    expected = {0: [[0, 1], [2, 3], [4, 5], [100, 101]], 1: [[102, 103], [104, 105]]}[rank]
    assert_equal(f"rank {rank} all_to_all", y, torch.tensor(expected, dtype=torch.float32, device=dev))
    gs = [torch.randn(n, 2, generator=torch.Generator().manual_seed(50 + s)).to(dev) for s, n in enumerate((4, 2))]
    y.backward(gs[rank])
    expected_grad = gs[0][:3] if rank == 0 else torch.cat([gs[0][3:], gs[1]])
    assert_equal(f"rank {rank} all_to_all grad", x.grad, expected_grad)
    # The same exchange started, other work done, then waited for: forward and backward alike.
    x.grad = None
    handle = start_all_to_all(x, recv, send)
    y2 = wait_all_to_all(handle)
    assert_equal(f"rank {rank} start/wait all_to_all", y2, y)
    y2.backward(gs[rank])
    assert_equal(f"rank {rank} start/wait all_to_all grad", x.grad, expected_grad)
    _expect_error("split sum", lambda: all_to_all(x, recv, [1, 1]), "input_split_sizes")
    _expect_error("split sum, started", lambda: start_all_to_all(x, recv, [1, 1]), "input_split_sizes")
    _expect_error("split count", lambda: all_to_all(x, recv, [3]), "input_split_sizes")


def steps(rank, world_size, plan):
    """Runs several bodies in one set of processes (spawning is the slow part on CPU):
    `plan` is a list of (body name, positional args)."""
    for name, args in plan:
        globals()[name](rank, world_size, *args)
