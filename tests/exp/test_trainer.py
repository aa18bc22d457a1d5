"""The trainer: exact resume, MoE losses in the loss, DDP, the shipped configs.

The MoE layers run their torch references here (TRITON_INTERPRET=0 around each run): these
tests check the trainer, not the kernels, and the interpreter would make them slow.
"""

import glob
import importlib
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import megablocks

from exp.config import configs_from_dict
from exp.data.indexed_dataset import write_documents
from exp.log import TIMING_COLUMNS, read_csv
from exp.loop import lr_at, train
from exp.model import GPT

gmm_ops = importlib.import_module("megablocks.ops.gmm")  # the module (megablocks.ops.gmm is also a function)
_ADD_WEIGHT_GRAD = gmm_ops._add_weight_grad


def _import_all_kernels():
    """Defines every kernel now, as the test session set TRITON_INTERPRET (interpreted on CPU).

    Triton decides at definition whether a kernel is interpreted; the tests below switch the
    variable off around their runs, and a kernel module first imported then would stay compiled
    for the rest of the session.
    """
    import pkgutil

    for mod in pkgutil.walk_packages(megablocks.__path__, "megablocks."):
        try:
            importlib.import_module(mod.name)
        except ImportError:
            pass


_import_all_kernels()

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY = dict(
    seq_length=16, num_layers=2, hidden_size=32, num_attention_heads=2, ffn_hidden_size=32,
    micro_batch_size=4, global_batch_size=8, train_iters=6, lr=1e-2, min_lr=1e-3, lr_warmup_iters=2,
    eval_interval=2, eval_iters=2, log_interval=1, make_vocab_size_divisible_by=64, split="90,10,0",
    dropout=0.1, progress=False, tensorboard=False, plot=False, device="cpu",
)
DMOE = dict(mlp="dmoe", moe_num_experts=4, moe_top_k=2, moe_jitter_eps=0.1, moe_loss_weight=0.05,
            moe_zloss_weight=0.001, mlp_impl="grouped")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = [rng.integers(97, 123, size=int(rng.integers(2, 7))) for _ in range(40)]
    docs = []
    for _ in range(60):
        picks = rng.integers(0, len(words), size=int(rng.integers(5, 40)))
        docs.append(np.concatenate([np.append(words[i], 32) for i in picks] + [[256]]))
    prefix = str(tmp_path_factory.mktemp("data") / "words")
    write_documents(prefix, docs)
    return prefix


@pytest.fixture
def torch_references(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _run(data, save, **overrides):
    tcfg, mcfg = configs_from_dict({**TINY, "data_path": data, "save": str(save), **overrides})
    return train(tcfg, mcfg)


def _curve(rows):  # a run's rows without the columns that measure time
    return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rows]


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "dmoe"])
def test_resume_continues_the_same_loss_curve(tmp_path, data, moe, torch_references):
    extra = DMOE if moe else {}
    full = _run(data, tmp_path / "full", **extra)
    part = _run(data, tmp_path / "part", exit_iteration=3, **extra)
    assert part["iterations"] == 3 and len(part["train"]) == 3
    rest = _run(data, tmp_path / "part", **extra)
    assert rest["start_iteration"] == 3
    assert len(full["train"]) == 6
    assert _curve(rest["train"]) == _curve(full["train"])  # every logged value, bit for bit
    assert _curve(rest["valid"]) == _curve(full["valid"]) and len(full["valid"]) == 3
    # The training clock goes on from the checkpoint: the resumed rows count the first part's seconds.
    first_part = part["train"][-1]["train_s"]
    assert all(r["train_s"] > first_part for r in rest["train"][3:])
    assert [r["train_s"] for r in rest["train"]] == sorted(r["train_s"] for r in rest["train"])
    a = torch.load(tmp_path / "full" / "iter_0000006" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "iter_0000006" / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # Losses moved: the run trained.
    assert full["train"][-1]["lm_loss"] < full["train"][0]["lm_loss"]


def test_exit_duration_stops_on_training_time_with_a_validation_and_a_checkpoint(tmp_path, data, monkeypatch,
                                                                               torch_references):
    import types

    import exp.loop

    ticks = iter(range(10_000))  # every read of the step clock moves it by 0.5 s: a step takes 0.5 s
    clock = types.SimpleNamespace(perf_counter=lambda: 0.5 * next(ticks), time=__import__("time").time)
    monkeypatch.setattr(exp.loop, "time", clock)
    out = _run(data, tmp_path / "r", exit_duration_s=1.2, **DMOE)
    assert out["iterations"] == 3  # 0.5, 1.0, 1.5 s: the third step ends past 1.2 s
    assert [r["train_s"] for r in out["train"]] == [0.5, 1.0, 1.5]
    # Validated at the interval (2) and where it stopped (3), each row with its training seconds.
    assert [(r["iteration"], r["train_s"]) for r in out["valid"]] == [(2, 1.0), (3, 1.5)]
    assert (tmp_path / "r" / "latest_checkpointed_iteration.txt").read_text() == "3"
    # The schedule stays that of train_iters = 6.
    tcfg, _ = configs_from_dict({**TINY, "data_path": data})
    assert [r["lr"] for r in out["train"]] == pytest.approx([lr_at(tcfg, i) for i in range(3)])
    with pytest.raises(ValueError, match="exit_duration_s"):
        configs_from_dict({**TINY, "data_path": data, "exit_duration_s": 0})
    # Runs that only measure write their logs and no checkpoint.
    quiet = _run(data, tmp_path / "q", train_iters=2, eval_iters=0, save_interval=1, checkpoint=False)
    assert len(quiet["train"]) == 2 and not glob.glob(str(tmp_path / "q" / "iter_*"))
    assert not (tmp_path / "q" / "latest_checkpointed_iteration.txt").exists()


def test_moe_losses_are_added_to_the_loss(tmp_path, data, torch_references):
    out = _run(data, tmp_path / "r", train_iters=2, eval_iters=0, **DMOE)
    for row in out["train"]:
        assert row["lbl_loss"] > 0 and row["zloss"] > 0
        assert math.isclose(row["loss"], row["lm_loss"] + row["lbl_loss"] + row["zloss"], rel_tol=1e-6)
    # Balanced routing gives a load-balancing loss near its weight (MegaBlocks' normalisation).
    assert 0.5 * DMOE["moe_loss_weight"] < out["train"][0]["lbl_loss"] < 2 * DMOE["moe_loss_weight"]
    dense = _run(data, tmp_path / "d", train_iters=1, eval_iters=0)
    assert dense["train"][0]["lbl_loss"] == 0 and dense["train"][0]["zloss"] == 0


def test_outputs_and_plot(tmp_path, data):
    out = _run(data, tmp_path / "r", train_iters=2, eval_interval=1, plot=True)
    assert os.path.getsize(out["plot"]) > 1000
    assert [r["iteration"] for r in read_csv(str(tmp_path / "r" / "valid.csv"))] == [1, 2]
    assert (tmp_path / "r" / "latest_checkpointed_iteration.txt").read_text() == "2"
    meta = json.loads((tmp_path / "r" / "iter_0000002" / "meta.json").read_text())
    assert meta["consumed_samples"] == 16 and meta["model"]["hidden_size"] == 32


def _run_torchrun(cmd, env, marker: str, timeout: int = 240):
    """(returncode, stdout, stderr) of a torchrun command (about 10 s alone). On a timeout the
    launcher's process group and every process whose command line holds `marker` (torchrun starts
    its ranks in sessions of their own) are killed, and the test fails with the launcher's stderr:
    a rank that hangs is not left behind. (Ranks once hung at exit: exp/loop.py's `train`.)"""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        return proc.returncode, stdout, stderr
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in os.listdir("/proc"):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        os.kill(int(pid), signal.SIGKILL)
            except (OSError, ValueError):
                continue
        _, stderr = proc.communicate()
    pytest.fail(f"torchrun timed out after {timeout} s; its stderr:\n{stderr[-3000:]}")


def test_ddp_matches_one_process(tmp_path, data, torch_references):
    """Two gloo processes with one micro-batch each = one process accumulating two."""
    common = {**TINY, **DMOE, "data_path": data, "train_iters": 3, "dropout": 0.0, "moe_jitter_eps": None,
              "eval_interval": 3}
    single = train(*configs_from_dict({**common, "save": str(tmp_path / "one")}))
    config = tmp_path / "ddp.json"
    config.write_text(json.dumps({k: v for k, v in common.items() if v is not None}))
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "exp.train", "--config", str(config), "--save", str(tmp_path / "two")]
    returncode, stdout, stderr = _run_torchrun(cmd, env, marker=str(tmp_path / "two"))
    assert returncode == 0, stderr[-3000:]
    assert "2 process(es) on cpu" in stdout + stderr
    two = read_csv(str(tmp_path / "two" / "train.csv"))
    for a, b in zip(single["train"], two):
        for k in ("lm_loss", "lbl_loss", "zloss", "grad_norm"):
            assert math.isclose(a[k], b[k], rel_tol=2e-5, abs_tol=1e-7), (k, a, b)
    v2 = read_csv(str(tmp_path / "two" / "valid.csv"))
    assert math.isclose(single["valid"][-1]["valid_loss"], v2[-1]["valid_loss"], rel_tol=2e-5)


SIZES = {"46m": 46e6, "125m": 125e6, "356m": 356e6, "760m": 760e6, "1315m": 1315e6}


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "exp", "configs", "*.json"))), ids=os.path.basename)
def test_shipped_configs_build(path, torch_references):
    with open(path) as f:
        tcfg, mcfg = configs_from_dict(json.load(f))
    model = GPT(mcfg, device="meta")
    name = os.path.basename(path)[:-5]
    size = name.split("_")[-1]
    if size in SIZES:  # the name gives the (active) size, as MegaBlocks names them
        assert abs(model.num_parameters(active=True) / SIZES[size] - 1) < 0.03, model.num_parameters(active=True)
    if mcfg.mlp != "dense":
        assert model.num_parameters() > model.num_parameters(active=True)
    tcfg_gbs = tcfg.global_batch_size or tcfg.micro_batch_size
    assert tcfg_gbs % tcfg.micro_batch_size == 0


def test_lr_schedule():
    tcfg, _ = configs_from_dict({"lr": 1.0, "min_lr": 0.1, "train_iters": 100, "lr_warmup_iters": 10})
    lrs = [lr_at(tcfg, i) for i in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[54] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert lrs[99] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    tcfg, _ = configs_from_dict({"lr": 1.0, "min_lr": 0.0, "train_iters": 100, "lr_warmup_fraction": 0.0,
                                 "lr_decay_style": "linear"})
    assert lr_at(tcfg, 49) == pytest.approx(0.5)


def test_bad_training_options(tmp_path, data):
    with pytest.raises(ValueError, match=r"global_batch_size: expected a multiple of micro_batch_size · world size = 4 · 1, got 6"):
        _run(data, tmp_path / "r", global_batch_size=6)
    with pytest.raises(ValueError, match="data_path: expected the prefix of a .bin/.idx pair"):
        train(*configs_from_dict({**TINY, "save": str(tmp_path / "r")}))
    with pytest.raises(ValueError, match="lr_decay_style: expected 'cosine', 'linear' or 'constant'"):
        configs_from_dict({"lr_decay_style": "step"})
    with pytest.raises(ValueError, match="num_attention_heads: expected a divisor of hidden_size=32"):
        configs_from_dict({"hidden_size": 32, "num_attention_heads": 5})
    _run(data, tmp_path / "c", train_iters=1, eval_iters=0)
    with pytest.raises(ValueError, match=r"saved with global batch size 8, resumed with 4"):
        _run(data, tmp_path / "c", global_batch_size=4, eval_iters=0)
    with pytest.raises(ValueError, match=r"iter_0000001/model\.pt does not fit the configured model"):
        _run(data, tmp_path / "c", hidden_size=64, eval_iters=0)
    with pytest.raises(ValueError, match=r"sample \d+ of train holds token ids .* outside the model's vocabulary \[0, 100\)"):
        _run(data, tmp_path / "v", vocab_size=100)


def test_throughput_in_every_row(tmp_path, data, torch_references):
    """tokens/s, ms per step and model TFLOP/s in every train.csv row (MFU blank on CPU: no peak
    known), consistent with each other and with the documented FLOP count; the phase times on
    request, adding up to about the step."""
    from exp.throughput import flops_per_token

    out = _run(data, tmp_path / "r", train_iters=3, eval_iters=0, phase_times=True, **DMOE)
    tokens = TINY["global_batch_size"] * TINY["seq_length"]
    cfg = configs_from_dict({**TINY, **DMOE, "data_path": data})[1]
    model = GPT(cfg)
    fpt = flops_per_token(model.num_parameters(active=True), model.pos.weight.numel(), cfg.num_layers,
                          cfg.hidden_size, cfg.seq_length)
    # 6·N + 12·L·H·S by hand: N = active parameters without the position embedding.
    assert fpt == 6 * (out["active_parameters"] - cfg.seq_length * cfg.hidden_size) + 12 * 2 * 32 * 16
    for row in out["train"]:
        assert row["step_ms"] > 0 and "mfu" not in row
        assert math.isclose(row["tokens_per_s"], tokens / (row["step_ms"] / 1e3), rel_tol=1e-3)
        assert math.isclose(row["tflops_per_gpu"], fpt * tokens / (row["step_ms"] / 1e3) / 1e12, rel_tol=1e-2,
                            abs_tol=1e-3)
        phases = sum(row[f"{p}_ms"] for p in ("fwd", "bwd", "clip", "optim"))
        assert 0 < phases <= row["step_ms"] * 1.05 + 1.0
    plain = _run(data, tmp_path / "p", train_iters=1, eval_iters=0)
    assert "fwd_ms" not in plain["train"][0] and plain["train"][0]["tokens_per_s"] > 0


def test_peak_and_mfu():
    from exp.throughput import peak_tflops, throughput

    assert peak_tflops(torch.device("cpu")) is None
    assert peak_tflops(torch.device("cpu"), 100.0) == 100.0
    row = throughput(0.5, 1000, 6e9, 2, 989.4)
    assert row["tokens_per_s"] == 2000.0 and row["step_ms"] == 500.0
    assert math.isclose(row["tflops_per_gpu"], 6e9 * 1000 / 2 / 0.5 / 1e12, rel_tol=1e-3)
    assert math.isclose(row["mfu"], row["tflops_per_gpu"] / 989.4, rel_tol=1e-3)



def test_a_failed_checkpoint_write_stops_cleanly(tmp_path, data, torch_references, monkeypatch):
    """A write that fails (a full disk) stops the run with the path and the cause; no file of the
    failed checkpoint is left under its final name, `latest` still names the last complete one,
    and a resume continues from it."""
    from exp import checkpoint as ckpt

    first = _run(data, tmp_path / "r", train_iters=4, eval_iters=0, save_interval=2, exit_iteration=2)
    assert first["iterations"] == 2
    real_save = torch.save

    def full_disk(obj, f, *a, **kw):
        if str(f).endswith("optimizer.pt.tmp"):
            with open(f, "wb") as out:
                out.write(b"partial")  # half a file, then the disk is full
            raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed "
                               "writing file data/3: file write failed")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    with pytest.raises(ckpt.CheckpointError) as err:
        _run(data, tmp_path / "r", train_iters=4, eval_iters=0, save_interval=2)
    msg = str(err.value)
    assert "iter_0000004" in msg and "optimizer.pt" in msg and "file write failed" in msg, msg
    assert "latest complete checkpoint is iteration 2" in msg, msg
    assert (tmp_path / "r" / "latest_checkpointed_iteration.txt").read_text() == "2"
    leftovers = sorted(p.name for p in (tmp_path / "r" / "iter_0000004").iterdir())
    assert "optimizer.pt" not in leftovers and not any(n.endswith(".tmp") for n in leftovers), leftovers
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    resumed = _run(data, tmp_path / "r", train_iters=4, eval_iters=0, save_interval=2)
    assert resumed["start_iteration"] == 2 and resumed["iterations"] == 4
    assert (tmp_path / "r" / "latest_checkpointed_iteration.txt").read_text() == "4"


def test_expert_bias_updated_after_every_step(tmp_path, data, torch_references):
    """With `moe_router_enable_expert_bias` the trainer applies the bias update after each
    optimizer step (the routers' counts are reset by it): the biases move off zero."""
    out = _run(data, tmp_path / "r", train_iters=3, eval_iters=0,
               **{**DMOE, "moe_router_enable_expert_bias": True, "moe_router_bias_update_rate": 0.01})
    state = torch.load(tmp_path / "r" / "iter_0000003" / "model.pt", weights_only=True)
    biases = [v for k, v in state.items() if k.endswith("router.expert_bias")]
    assert len(biases) == TINY["num_layers"] and out["iterations"] == 3
    for b in biases:
        # Each step moves every entry by ±rate or 0: after 3 steps a multiple of 0.01, not all zero.
        assert b.abs().max() > 0 and torch.allclose(b * 100, (b * 100).round(), atol=1e-4)


@pytest.mark.parametrize("accum", [1, 2])
def test_bf16_params_follow_the_autocast_loss_curve(tmp_path, data, torch_references, accum, monkeypatch):
    """precision 'bf16-params' (bf16 parameters, fp32 main weights in MainWeightsAdamW, fp32
    accumulation over micro-batches) and 'bf16' (autocast over fp32 parameters) draw the same loss
    curve within bf16 noise, and both follow fp32; the checkpoint keeps bf16 weights and fp32 main
    weights, and a resume continues the curve."""
    common = dict(train_iters=8, eval_iters=0, lr=5e-3, global_batch_size=8, micro_batch_size=8 // accum,
                  dropout=0.0, **{**DMOE, "moe_jitter_eps": None})
    fused = []  # the weight gradients added into fp32 accumulators by the products' backward
    monkeypatch.setattr(gmm_ops, "_add_weight_grad", lambda *a: fused.append(1) or _ADD_WEIGHT_GRAD(*a))
    runs = {p: _run(data, tmp_path / p, precision=p, **common) for p in ("fp32", "bf16", "bf16-params")}
    # 2 layers x 2 expert weights x 2 micro-batches x 8 steps with accumulation; none without.
    assert len(fused) == (64 if accum > 1 else 0)
    curves = {p: [r["lm_loss"] for r in out["train"]] for p, out in runs.items()}
    for p in ("bf16", "bf16-params"):
        for step, (a, b) in enumerate(zip(curves[p], curves["fp32"])):
            assert abs(a - b) < 0.03 * b, (p, step, curves)
    for a, b in zip(curves["bf16-params"], curves["bf16"]):
        assert abs(a - b) < 0.03 * b, curves
    assert curves["bf16-params"][-1] < curves["bf16-params"][0], "it trained"
    if accum > 1:  # by default the experts' weight gradients go straight into the fp32 accumulators
        plain = _run(data, tmp_path / "unfused", precision="bf16-params", grad_accumulation_fusion=False, **common)
        assert len(fused) == 64, "no fusion when it is turned off"
        for a, b in zip(curves["bf16-params"], [r["lm_loss"] for r in plain["train"]]):
            assert abs(a - b) < 0.01 * b, (curves["bf16-params"], [r["lm_loss"] for r in plain["train"]])
    state = torch.load(tmp_path / "bf16-params" / "iter_0000008" / "model.pt", weights_only=True)
    assert all(v.dtype == torch.bfloat16 for k, v in state.items() if v.is_floating_point()), "bf16 weights"
    opt = torch.load(tmp_path / "bf16-params" / "iter_0000008" / "optimizer.pt", weights_only=True)["optimizer"]
    mains = [s["main"] for s in opt["state"].values()]
    assert mains and all(m.dtype == torch.float32 for m in mains), "fp32 main weights in the optimizer"
    part = _run(data, tmp_path / "part", precision="bf16-params", exit_iteration=4, **common)
    rest = _run(data, tmp_path / "part", precision="bf16-params", **common)
    assert part["iterations"] == 4 and rest["start_iteration"] == 4
    assert _curve(rest["train"]) == _curve(runs["bf16-params"]["train"])


def test_fp8_experts_follow_the_bf16_loss_curve_quantizing_once_a_step(tmp_path, data, torch_references,
                                                                       monkeypatch):
    """`--fp8 blockwise` (the experts' products in FP8; their torch references on CPU) draws the
    bf16 curve within FP8's error; each expert weight is quantized once a step, not once a
    micro-batch (the cache keeps it across the step's micro-batches and the optimizer's update
    makes it new), and its gradient goes into its fp32 accumulator as bf16's does."""
    fp8_ops = importlib.import_module("megablocks.ops.fp8")
    quantize_blocks = fp8_ops.quantize_blocks
    made, fused = [], []
    monkeypatch.setattr(fp8_ops, "quantize_blocks",
                        lambda w, *a, **k: made.append(w.shape) or quantize_blocks(w, *a, **k))
    monkeypatch.setattr(gmm_ops, "_add_weight_grad", lambda *a: fused.append(1) or _ADD_WEIGHT_GRAD(*a))
    common = dict(train_iters=6, eval_iters=0, lr=5e-3, global_batch_size=8, micro_batch_size=4, dropout=0.0,
                  precision="bf16-params", **{**DMOE, "moe_jitter_eps": None})
    bf16 = [r["lm_loss"] for r in _run(data, tmp_path / "bf16", **common)["train"]]
    assert made == [] and len(fused) == 48
    fp8 = [r["lm_loss"] for r in _run(data, tmp_path / "fp8", fp8="blockwise", **common)["train"]]
    # 6 steps x 2 layers x 2 expert weights (w1, w2), each step's 2 micro-batches sharing them.
    assert len(made) == 6 * 2 * 2, made
    # Their gradients added into the fp32 accumulators by the products' backward, as in bf16.
    assert len(fused) == 2 * 48
    assert fp8[-1] < fp8[0], "it trained"
    for step, (a, b) in enumerate(zip(fp8, bf16)):
        assert abs(a - b) < 0.005 * b, (step, fp8, bf16)
    assert fp8 != bf16, "the FP8 run quantized"
