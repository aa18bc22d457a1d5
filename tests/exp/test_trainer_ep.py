"""The trainer with expert parallelism: 2 gloo processes (tests.parallel.launcher, bounded by a
timeout so that a hang fails) against one process.

With `expert_parallel_size=2` each rank holds half of the experts of every dMoE layer and reads
its own micro-batch; one process accumulating the same two micro-batches is the reference. Every
logged loss, the gradient norm, the validation loss and the final weights (the ranks' expert
shards merged by `consolidated_state_dict`) must agree within fp32 rounding. The layers run their
torch references (TRITON_INTERPRET=0 in the ranks and around the reference run). A run stopped
and resumed from its sharded checkpoint continues the same curve, bit for bit.
"""

import numpy as np
import pytest
import torch
import torch.distributed as dist

from exp.checkpoint import consolidated_state_dict
from exp.config import configs_from_dict
from exp.data.indexed_dataset import write_documents
from exp.log import TIMING_COLUMNS, read_csv
from exp.loop import train
from exp.model import GPT
from tests.parallel.launcher import run
from tests.utils import relative_errors

TINY = dict(
    seq_length=16, num_layers=2, hidden_size=32, num_attention_heads=2, ffn_hidden_size=24,
    micro_batch_size=4, global_batch_size=8, train_iters=3, lr=1e-2, min_lr=1e-3, lr_warmup_iters=1,
    eval_interval=3, eval_iters=1, log_interval=1, make_vocab_size_divisible_by=64, split="90,10,0",
    dropout=0.0, progress=False, tensorboard=False, plot=False, device="cpu", clip_grad=0.5,
    mlp="dmoe", moe_num_experts=4, moe_top_k=2, moe_loss_weight=0.05, moe_zloss_weight=0.001,
    mlp_impl="grouped", mlp_type="glu",
)
TARGET = "tests.exp.test_trainer_ep"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(1)
    words = [rng.integers(97, 123, size=int(rng.integers(2, 7))) for _ in range(30)]
    docs = []
    for _ in range(40):
        picks = rng.integers(0, len(words), size=int(rng.integers(5, 30)))
        docs.append(np.concatenate([np.append(words[i], 32) for i in picks] + [[256]]))
    prefix = str(tmp_path_factory.mktemp("data") / "words")
    write_documents(prefix, docs)
    return prefix


def train_runs(rank, world_size, runs):
    """A rank's body: trains with each dict of options in turn (the launcher set up the process group)."""
    for values in runs:
        train(*configs_from_dict(values))


def fsdp_layout(rank, world_size, values):
    """A rank's body: builds the FSDP run of `values` and checks where each parameter lives: expert
    shards on the expert-data-parallel mesh (world / N ranks), everything else on all ranks, each
    rank holding its dim-0 piece."""
    from exp.loop import setup
    from exp.parallel import Dist
    from megablocks.layers import mpu

    tcfg, mcfg = configs_from_dict(values)
    d = Dist("cpu")
    run = setup(tcfg, mcfg, torch.device("cpu"), d)
    n = tcfg.expert_parallel_size
    experts = 0
    for name, p in run.model.named_parameters():
        expert = mpu.param_is_expert_model_parallel(p)
        experts += expert
        ranks = world_size // n if expert else world_size
        assert p.device_mesh.size() == ranks, (name, p.device_mesh.size(), ranks)
        rows = -(-p.shape[0] // ranks)  # FSDP2's dim-0 chunks: the last ones shorter or empty
        start = rows * dist.get_rank(p.device_mesh.get_group())
        assert p.to_local().shape[0] == max(0, min(rows, p.shape[0] - start)), (name, p.to_local().shape)
    assert experts == (6 if n > 1 else 0), experts  # w1, v1, w2 of 2 layers
    d.close()


def bad_setups(rank, world_size, values):
    """Each bad expert-parallel setup raises the same ValueError on every rank (no collective)."""
    cases = [
        (dict(moe_num_experts=3, moe_top_k=1), "expected a divisor of moe_num_experts=3"),
        (dict(expert_parallel_size=3), "expected a divisor of the world size 2"),
        (dict(mlp="dense"), "expected 1 for a dense model"),
        (dict(expert_parallel_size=1, moe_expert_model_parallelism=True), "use --expert-parallel-size"),
    ]
    for extra, match in cases:
        try:
            train(*configs_from_dict({**values, **extra}))
        except ValueError as e:
            if match not in str(e):
                raise AssertionError(f"rank {rank} {extra}: expected an error mentioning {match!r}, got: {e}") from e
        else:
            raise AssertionError(f"rank {rank} {extra}: expected a ValueError, none was raised")


@pytest.mark.parametrize("experts", [
    dict(moe_num_experts=4, moe_top_k=2),  # 2 experts per rank
    dict(moe_num_experts=1, moe_top_k=1),  # 2 ranks split the one expert's FFN
], ids=["E4", "E1"])
def test_expert_parallel_training_matches_one_process(tmp_path, data, monkeypatch, experts):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    common = {**TINY, **experts, "data_path": data}
    one = train(*configs_from_dict({**common, "save": str(tmp_path / "one")}))
    assert len(one["train"]) == 3 and one["train"][-1]["grad_norm"] > TINY["clip_grad"]  # the steps clip

    ep = {**common, "expert_parallel_size": 2}
    part = {**ep, "save": str(tmp_path / "part")}
    # A full run; a run stopped after 2 iterations, then resumed from its sharded checkpoint.
    run(f"{TARGET}:train_runs", 2, [{**ep, "save": str(tmp_path / "ep")}, {**part, "exit_iteration": 2}, part],
        cpu_only=True,
        timeout=120)

    two = read_csv(str(tmp_path / "ep" / "train.csv"))
    assert len(two) == 3
    for a, b in zip(one["train"], two):
        for k in ("loss", "lm_loss", "lbl_loss", "zloss", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=2e-5, abs=1e-7), (k, a, b)
    valid = read_csv(str(tmp_path / "ep" / "valid.csv"))
    assert valid[-1]["valid_loss"] == pytest.approx(one["valid"][-1]["valid_loss"], rel=2e-5)

    ckpt = tmp_path / "ep" / "iter_0000003"
    assert not (ckpt / "model.pt").exists() and (ckpt / "model_ep1.pt").exists()
    shard = torch.load(ckpt / "model_ep1.pt", weights_only=True)
    w1 = "blocks.0.mlp.moe.experts.mlp.w1"
    assert shard[w1].shape == (experts["moe_num_experts"] * TINY["ffn_hidden_size"] // 2, 32)  # half of E·F rows
    ref = torch.load(tmp_path / "one" / "iter_0000003" / "model.pt", weights_only=True)
    got = consolidated_state_dict(str(ckpt))
    assert got.keys() == ref.keys()
    for name in ref:
        # Three optimizer steps of two processes against one: Adam divides by sqrt(v), so near-zero
        # gradients (the biases) turn summation-order rounding into visible steps; held to 2e-3 of
        # the tensor's scale (max) and 5e-4 (rms), a training-level limit, not a kernel's.
        max_err, rms = relative_errors(got[name].double(), ref[name].double())
        assert max_err <= 2e-3 and rms <= 5e-4, (name, max_err, rms)
    resumed = read_csv(str(tmp_path / "part" / "train.csv"))
    assert [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in resumed] == [
        {k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in two]  # bit for bit
    for k in (0, 1):
        a = torch.load(ckpt / f"model_ep{k}.pt", weights_only=True)
        b = torch.load(tmp_path / "part" / "iter_0000003" / f"model_ep{k}.pt", weights_only=True)
        assert all(torch.equal(a[n], b[n]) for n in a), f"shard {k} after resuming"
    # The weights moved: the comparison is not one of the initial weights.
    torch.manual_seed(1234)  # TrainConfig.seed
    initial = GPT(configs_from_dict(common)[1]).state_dict()
    assert (got[w1] - initial[w1]).abs().max() > 1e-3


def test_bad_expert_parallel_setups_fail_on_every_rank(tmp_path, data):
    values = {**TINY, "data_path": data, "save": str(tmp_path / "bad"), "expert_parallel_size": 2}
    run(f"{TARGET}:bad_setups", 2, values, timeout=60, cpu_only=True)


@pytest.mark.parametrize("ep", [2, 1], ids=["ep2", "ep1"])
def test_fsdp_training_matches_one_process(tmp_path, data, monkeypatch, ep):
    """FSDP2 on 4 gloo processes (expert parallelism 2: shared parameters sharded 4 ways, expert
    shards 2 ways over their expert-data-parallel ranks; or plain FSDP) against one process
    accumulating the same 4 micro-batches: the same losses, gradient norms and final weights, and
    a run stopped after 2 iterations and resumed from its checkpoint continues bit for bit."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    common = {**TINY, "data_path": data, "micro_batch_size": 2, "global_batch_size": 8}
    one = train(*configs_from_dict({**common, "save": str(tmp_path / "one")}))
    assert one["train"][-1]["grad_norm"] > TINY["clip_grad"]  # the steps clip

    sharded = {**common, "expert_parallel_size": ep, "fsdp": True}
    run(f"{TARGET}:fsdp_layout", 4, {**sharded, "save": str(tmp_path / "layout")}, cpu_only=True, timeout=120)
    part = {**sharded, "save": str(tmp_path / "part")}
    run(f"{TARGET}:train_runs", 4, [{**sharded, "save": str(tmp_path / "fsdp")}, {**part, "exit_iteration": 2}, part],
        cpu_only=True, timeout=240)

    got_rows = read_csv(str(tmp_path / "fsdp" / "train.csv"))
    assert len(got_rows) == 3
    for a, b in zip(one["train"], got_rows):
        for k in ("loss", "lm_loss", "lbl_loss", "zloss", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=2e-5, abs=1e-7), (k, a, b)
    valid = read_csv(str(tmp_path / "fsdp" / "valid.csv"))
    assert valid[-1]["valid_loss"] == pytest.approx(one["valid"][-1]["valid_loss"], rel=2e-5)

    ckpt = tmp_path / "fsdp" / "iter_0000003"
    ref = torch.load(tmp_path / "one" / "iter_0000003" / "model.pt", weights_only=True)
    got = consolidated_state_dict(str(ckpt))
    assert got.keys() == ref.keys()
    for name in ref:
        assert got[name].shape == ref[name].shape, name  # unsharded, whatever FSDP held
        max_err, rms = relative_errors(got[name].double(), ref[name].double())  # the limit of the test above
        assert max_err <= 2e-3 and rms <= 5e-4, (name, max_err, rms)
    resumed = read_csv(str(tmp_path / "part" / "train.csv"))
    assert [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in resumed] == [
        {k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in got_rows]  # bit for bit
    resumed_state = consolidated_state_dict(str(tmp_path / "part" / "iter_0000003"))
    assert all(torch.equal(got[n], resumed_state[n]) for n in got), "weights after resuming"
    w1 = "blocks.0.mlp.moe.experts.mlp.w1"
    torch.manual_seed(1234)  # TrainConfig.seed
    initial = GPT(configs_from_dict(common)[1]).state_dict()
    assert (got[w1] - initial[w1]).abs().max() > 1e-3


def test_fsdp_rejects_bf16_params():
    with pytest.raises(ValueError, match="with fsdp use 'bf16'"):
        configs_from_dict({**TINY, "fsdp": True, "precision": "bf16-params"})
