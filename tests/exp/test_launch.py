"""exp/launch.sh: the command each named config runs, against what the per-config scripts it
replaced ran (their commands are recorded in OLD), then one real run on CPU.

The dry runs (DRY_RUN=1) print the command; the exp.train ones are parsed by exp.train's own
parser, so two commands that differ only in spelling must give equal configs.
"""

import dataclasses
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest

from exp.config import parse_config
from exp.data.indexed_dataset import write_documents
from exp.log import read_csv
from exp.loop import lr_at

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = os.path.join(ROOT, "exp", "launch.sh")
MEGATRON_LAUNCH = os.path.join(ROOT, "exp", "megatron", "launch.sh")
DATA = "data/pile_text_document"
TORCHRUN = ["python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "8", "--master_port"]

# What `DATA_PATH=data/pile_text_document exp/<family>/<name>.sh runs/x` ran after
# `--config <config file> --data-path data/pile_text_document --save runs/x`.
_MOE_DEFAULTS = ["--train-iters", "20000", "--lr-decay-iters", "20000", "--moe-num-experts", "64"]
OLD = {
    **{f"gpt2_{size}": ["--train-iters", "100000", "--lr-decay-iters", "100000"]
       for size in ("46m", "125m", "356m", "760m", "1315m")},
    **{f"dmoe_{size}": [*_MOE_DEFAULTS, "--moe-top-k", "1", "--moe-loss-weight", "0.1", "--micro-batch-size", batch]
       for size, batch in (("46m", "64"), ("125m", "64"), ("356m", "16"), ("760m", "8"))},
    **{f"moe_{size}": [*_MOE_DEFAULTS, "--moe-capacity-factor", "1", "--moe-top-k", "1", "--moe-loss-weight", "0.1",
                       "--micro-batch-size", batch]
       for size, batch in (("46m", "64"), ("125m", "32"), ("356m", "16"))},
}
OLD_MEGATRON = {name: ["--bf16", "--train-iters", "20000", "--expert-model-parallel-size", "1"]
                for name in ("dmoe_46m", "dmoe_125m", "dmoe_356m")}


def dry_run(script, *args, **env):
    """(the command's argv, the file its output is copied to or None) that `script args` runs."""
    base = {k: v for k, v in os.environ.items() if k not in ("NGPUS", "MASTER_PORT", "DATA_PATH")}
    full_env = {**base, "DRY_RUN": "1", "NGPUS": "8", "PYTHON": "python", "DATA_PATH": DATA, **env}
    full_env = {k: v for k, v in full_env.items() if v is not None}
    out = subprocess.run(["bash", script, *args], env=full_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    tokens = shlex.split(out.stdout)
    assert tokens[:5] == ["(", "cd", ROOT, "&&", "exec"], out.stdout
    end = tokens.index(")")
    rest = tokens[end + 1:]
    assert rest == [] or rest[:3] == ["2>&1", "|", "tee"] and len(rest) == 4, out.stdout
    return tokens[5:end], (rest[3] if rest else None)


def _configs(argv):
    """exp.train's configs for the options of a torchrun command (run from the repository root)."""
    i = argv.index("exp.train")
    return parse_config(argv[i + 1:])


@pytest.mark.parametrize("name", sorted(OLD))
def test_a_name_trains_what_its_old_script_trained(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    argv, log = dry_run(LAUNCH, name, "runs/x")
    assert argv == [*TORCHRUN, "6000", "-m", "exp.train", "--config", name, "--data-path", DATA, "--save", "runs/x"]
    assert log == "runs/x/train.log"
    old = [*TORCHRUN, "6000", "-m", "exp.train", "--config", f"exp/configs/{name}.json", "--data-path", DATA,
           "--save", "runs/x", *OLD[name]]
    (new_t, new_m), (old_t, old_m) = _configs(argv), _configs(old)
    assert new_m == old_m
    # The old scripts spelled out the decay length; left out, it is train_iters: the same schedule.
    assert old_t.lr_decay_iters == old_t.train_iters and new_t.lr_decay_iters is None
    assert new_t == dataclasses.replace(old_t, lr_decay_iters=None)
    iterations = (0, 1, 199, 200, old_t.train_iters // 2, old_t.train_iters - 1, old_t.train_iters)
    assert [lr_at(new_t, i) for i in iterations] == [lr_at(old_t, i) for i in iterations]


def test_positional_arguments_are_the_old_scripts(monkeypatch):
    monkeypatch.chdir(ROOT)
    head = ["--data-path", DATA, "--save", "runs/a"]
    argv, _ = dry_run(LAUNCH, "dmoe_356m", "runs/a", "1000", "32", "2", "0.05", "4", "--seed", "7")
    assert argv == [*TORCHRUN, "6000", "-m", "exp.train", "--config", "dmoe_356m", *head, "--train-iters", "1000",
                    "--lr-decay-iters", "1000", "--moe-num-experts", "32", "--moe-top-k", "2",
                    "--moe-loss-weight", "0.05", "--micro-batch-size", "4", "--seed", "7"]
    argv, _ = dry_run(LAUNCH, "moe_125m", "runs/a", "10", "8", "1.5", "2", "0.01", "16")
    assert argv[argv.index("--save") + 2:] == ["--train-iters", "10", "--lr-decay-iters", "10", "--moe-num-experts", "8",
                                               "--moe-capacity-factor", "1.5", "--moe-top-k", "2",
                                               "--moe-loss-weight", "0.01", "--micro-batch-size", "16"]
    tcfg, mcfg = _configs(argv)
    assert (tcfg.train_iters, tcfg.lr_decay_iters, tcfg.micro_batch_size) == (10, 10, 16)
    assert mcfg.moe == {"moe_num_experts": 8, "moe_top_k": 2, "moe_loss_weight": 0.01, "moe_capacity_factor": 1.5}
    argv, _ = dry_run(LAUNCH, "gpt2_1315m", "runs/a", "5000", "--lr", "1e-4")
    assert argv[argv.index("--save") + 2:] == ["--train-iters", "5000", "--lr-decay-iters", "5000", "--lr", "1e-4"]
    # Fewer positional arguments keep the config's values for the rest; the first option ends them.
    argv, _ = dry_run(LAUNCH, "moe_46m", "runs/a", "100", "--moe-top-k", "2")
    assert argv[argv.index("--save") + 2:] == ["--train-iters", "100", "--lr-decay-iters", "100", "--moe-top-k", "2"]
    argv, _ = dry_run(LAUNCH, "exp/configs/dmoe_46m.json", "runs/a", "500", "8")
    assert argv[argv.index("--config"):] == ["--config", "exp/configs/dmoe_46m.json", *head, "--train-iters", "500",
                                             "--lr-decay-iters", "500", "--moe-num-experts", "8"]


def test_the_generic_and_expert_parallel_forms_are_unchanged():
    # exp/launch.sh CONFIG.json [options]: what it ran before, output not copied.
    argv, log = dry_run(LAUNCH, "exp/configs/tiny_dmoe_cpu.json", "--save", "runs/t")
    assert argv == [*TORCHRUN, "6000", "-m", "exp.train", "--config", "exp/configs/tiny_dmoe_cpu.json",
                    "--data-path", DATA, "--save", "runs/t"]
    assert log is None
    # What `exp/dmoe_ep.sh exp/configs/dmoe_356m.json runs/a` ran (NGPUS=8 processes, 8-way).
    argv, log = dry_run(LAUNCH, "dmoe_356m", "runs/a", "--expert-parallel-size", "8")
    assert argv == [*TORCHRUN, "6000", "-m", "exp.train", "--config", "dmoe_356m", "--data-path", DATA,
                    "--save", "runs/a", "--expert-parallel-size", "8"]
    assert log == "runs/a/train.log"
    # A config of no family takes no positional argument after EXP_DIR.
    argv, _ = dry_run(LAUNCH, "tiny_dense_cpu", "runs/t", "--train-iters", "5", NGPUS="2", MASTER_PORT="7000",
                      DATA_PATH=None)
    assert argv == [*TORCHRUN[:5], "2", "--master_port", "7000", "-m", "exp.train", "--config", "tiny_dense_cpu",
                    "--save", "runs/t", "--train-iters", "5"]
    paths = dry_run(LAUNCH, "gpt2_46m", "runs/with space", "5")
    assert paths[0][paths[0].index("--save") + 1] == "runs/with space" and paths[1] == "runs/with space/train.log"


def test_megatron_names_run_pretrain_gpt_as_its_old_scripts(monkeypatch):
    pretrain = pytest.importorskip("exp.megatron.pretrain_gpt")
    monkeypatch.chdir(ROOT)
    program = [*TORCHRUN, "6001", "exp/megatron/pretrain_gpt.py"]
    for name, tail in OLD_MEGATRON.items():
        argv, log = dry_run(MEGATRON_LAUNCH, name, "runs/m")
        assert argv == [*program, "--config", name, "--data-path", DATA, "--save", "runs/m"]
        assert log == "runs/m/train.log"
        old = ["--config", f"exp/megatron/configs/{name}.json", "--data-path", DATA, "--save", "runs/m", *tail]
        new_args, old_args = pretrain.parse_args(argv[len(program):]), pretrain.parse_args(old)
        assert vars(new_args) == {**vars(old_args), "config": name}
        assert new_args.bf16 is True  # the sized configs carry the precision the old scripts passed
    argv, _ = dry_run(MEGATRON_LAUNCH, "dmoe_46m", "runs/m", "100", "8", "--mlp-impl", "grouped")
    assert argv[len(program):] == ["--config", "dmoe_46m", "--data-path", DATA, "--save", "runs/m", "--train-iters",
                                   "100", "--expert-model-parallel-size", "8", "--mlp-impl", "grouped"]
    argv, log = dry_run(MEGATRON_LAUNCH, "exp/megatron/configs/tiny_dmoe.json", "--bf16")
    assert argv == [*program, "--config", "exp/megatron/configs/tiny_dmoe.json", "--data-path", DATA, "--bf16"]
    assert log is None


def test_usage():
    out = subprocess.run(["bash", LAUNCH], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "exp/launch.sh NAME|CONFIG.json [EXP_DIR [ARG...]]" in out.stdout
    out = subprocess.run(["bash", LAUNCH, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "dmoe_*       TRAINING_STEPS NUM_EXPERTS TOP_K LOSS_WEIGHT BATCH_SIZE" in out.stdout
    out = subprocess.run(["bash", MEGATRON_LAUNCH], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2


def test_a_real_run_writes_its_log_and_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    docs = [np.append(rng.integers(97, 123, size=int(rng.integers(20, 60))), 256) for _ in range(40)]
    prefix = str(tmp_path / "words")
    write_documents(prefix, docs)
    run = tmp_path / "run"
    env = {**os.environ, "NGPUS": "1", "PYTHON": sys.executable, "DATA_PATH": prefix, "MASTER_PORT": "29561",
           "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    tiny = ["--train-iters", "2", "--eval-interval", "2", "--eval-iters", "1", "--seq-length", "16",
            "--micro-batch-size", "2", "--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "2",
            "--ffn-hidden-size", "32", "--split", "90,10,0", "--no-progress", "--no-tensorboard", "--no-plot"]
    out = subprocess.run(["bash", LAUNCH, "tiny_dmoe_cpu", str(run), *tiny], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = (run / "train.log").read_text()
    assert "dmoe GPT" in log and "final validation loss" in log
    assert [r["iteration"] for r in read_csv(str(run / "train.csv"))] == [1, 2]
    assert (run / "latest_checkpointed_iteration.txt").read_text() == "2"
