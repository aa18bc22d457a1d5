"""The options of a run (exp.config): every Arguments field an option, config files under the
command line, named configs in exp/configs/ (and exp/megatron/configs/ for pretrain_gpt.py)."""

import dataclasses
import json
import os

import pytest
import torch

from exp.config import CONFIG_DIR, build_parser, config_names, config_path, parse_config
from exp.model import MODEL_SET_FIELDS, SHARED_FIELDS, moe_arguments
from exp.train import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_arguments_field_is_an_option():
    from megablocks.layers.arguments import Arguments

    parser, groups = build_parser()
    dests = {a.dest for a in parser._actions}
    fields = {f.name for f in dataclasses.fields(Arguments)}
    # Process groups are not options (the default of moe_aux_loss_group, the world, is the trainer's).
    set_elsewhere = set(SHARED_FIELDS) | set(MODEL_SET_FIELDS) | {"expert_parallel_group", "moe_aux_loss_group"}
    missing = sorted(fields - set_elsewhere - dests)
    assert not missing, f"Arguments fields without an option: {missing}"
    assert set(SHARED_FIELDS) <= dests  # the model's options carry them

    tcfg, mcfg = parse_config([
        "--data-path", "x", "--vocab-size", "64", "--mlp", "moe", "--mlp-type", "glu", "--no-bias",
        "--activation-fn", "silu", "--moe-num-experts", "6", "--moe-top-k", "2", "--moe-capacity-factor", "1.5",
        "--moe-normalize-expert-weights", "1", "--moe-jitter-eps", "0.01", "--moe-loss-weight", "0.2",
        "--moe-zloss-weight", "0.001", "--moe-lbl-in-fp32", "--mlp-impl", "grouped", "--memory-optimized-mlp",
        "--shared-expert", "--shared-expert-hidden-size", "24", "--fc-cls", "torch.nn.Linear", "--fc-kwargs", "{}",
        "--moe-router-score-function", "sigmoid", "--moe-block-size", "64", "--return-bias",
        "--kernel-policy", '{"fused_gather": false}',
    ])
    args = moe_arguments(mcfg)
    assert (args.moe_num_experts, args.moe_top_k, args.moe_capacity_factor) == (6, 2, 1.5)
    assert args.moe_normalize_expert_weights == 1 and args.moe_jitter_eps == 0.01 and args.moe_loss_weight == 0.2
    assert args.moe_lbl_in_fp32 and args.memory_optimized_mlp and args.shared_expert and args.return_bias
    assert args.mlp_type == "glu" and args.mlp_impl == "grouped" and args.bias is False
    assert args.shared_expert_hidden_size == 24 and args.fc_cls is torch.nn.Linear
    assert args.moe_router_score_function == "sigmoid" and args.moe_block_size == 64
    assert args.activation_fn(torch.tensor([1.0])).item() == pytest.approx(torch.nn.functional.silu(torch.tensor(1.0)).item())
    assert not args.fp16 and not args.bf16 and args.num_layers == mcfg.num_layers
    assert args.kernel_policy.fused_gather is False and args.kernel_policy.fused_forms is True


def test_config_file_then_command_line(tmp_path):
    path = tmp_path / "small.json"
    path.write_text(json.dumps({"hidden_size": 48, "num_attention_heads": 4, "mlp": "dmoe", "moe_num_experts": 4}))
    tcfg, mcfg = parse_config(["--config", str(path), "--hidden-size", "64", "--data-path", "d"])
    assert mcfg.hidden_size == 64 and mcfg.moe == {"moe_num_experts": 4} and tcfg.name == "small"
    assert mcfg.vocab_size == 384  # the byte tokenizer's 257 ids padded to a multiple of 128
    path.write_text(json.dumps({"hidden_sise": 48}))
    with pytest.raises(ValueError, match=r"small\.json: unknown options \['hidden_sise'\]"):
        parse_config(["--config", str(path)])
    assert main(["--config", str(path)]) == 2


def test_a_name_is_the_config_of_that_name(tmp_path, monkeypatch):
    by_path = parse_config(["--config", os.path.join(CONFIG_DIR, "dmoe_125m.json"), "--data-path", "d"])
    by_name = parse_config(["--config", "dmoe_125m", "--data-path", "d"])
    assert by_name == by_path and by_name[0].name == "dmoe_125m"
    assert by_name[1].moe == {"moe_num_experts": 64, "moe_top_k": 1, "moe_loss_weight": 0.1, "mlp_impl": "auto"}
    assert parse_config(["--config", "dmoe_125m.json", "--data-path", "d"]) == by_path
    # A file at the given path wins over the name, from any working directory.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dmoe_125m").write_text(json.dumps({"hidden_size": 48, "num_attention_heads": 4}))
    assert parse_config(["--config", "dmoe_125m", "--data-path", "d"])[1].hidden_size == 48
    assert parse_config(["--config", "gpt2_46m", "--data-path", "d"])[1].hidden_size == 512


def test_an_unknown_name_lists_the_names(capsys):
    assert "tiny_dmoe_cpu" in config_names() and "gpt2_1315m" in config_names()
    listed = r"expected a JSON file or a name in .*\(dmoe_125m, .*tiny_moe_cpu\), got 'dmoe_1b'"
    with pytest.raises(FileNotFoundError, match=listed):
        config_path("dmoe_1b")
    with pytest.raises(FileNotFoundError, match="got 'configs/dmoe_125m'"):  # a path is not a name
        config_path("configs/dmoe_125m")
    assert main(["--config", "dmoe_1b"]) == 2
    assert "got 'dmoe_1b'" in capsys.readouterr().err


def test_pretrain_gpt_takes_a_name_and_the_configs_precision():
    pretrain = pytest.importorskip("exp.megatron.pretrain_gpt")
    megatron_configs = os.path.join(ROOT, "exp", "megatron", "configs")
    for name in ("dmoe_46m", "dmoe_125m", "dmoe_356m"):
        by_name = pretrain.parse_args(["--config", name, "--mock-data"])
        by_path = pretrain.parse_args(["--config", os.path.join(megatron_configs, name + ".json"), "--mock-data"])
        assert vars(by_name) == {**vars(by_path), "config": name}
        assert by_name.bf16 is True and by_name.moe_num_experts == 64
    assert pretrain.parse_args(["--config", "dmoe_46m", "--mock-data", "--no-bf16"]).bf16 is False
    assert pretrain.parse_args(["--config", "tiny_dmoe", "--mock-data"]).bf16 is False
    assert pretrain.parse_args(["--config", "tiny_dmoe", "--mock-data", "--bf16"]).bf16 is True
    assert pretrain.parse_args(["--mock-data"]).bf16 is False
    with pytest.raises(FileNotFoundError, match=r"tiny_dmoe\), got 'dmoe_46'"):
        pretrain.parse_args(["--config", "dmoe_46", "--mock-data"])


def test_auto_precision_is_bf16_params_on_one_gpu():
    from exp.config import resolve_precision

    assert resolve_precision("auto", "cuda", 1) == "bf16-params"
    assert resolve_precision("auto", "cuda", 8) == "bf16"
    assert resolve_precision("auto", "cpu", 1) == "fp32"
    assert resolve_precision("auto", "cuda", 1, fsdp=True) == "bf16"  # FSDP shards bf16-params' main weights
    for p in ("bf16", "bf16-params", "fp32"):
        assert resolve_precision(p, "cuda", 1) == p and resolve_precision(p, "cpu", 4) == p
