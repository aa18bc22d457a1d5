"""The demo's pieces: a deterministic corpus from Python's own sources, both runs, the table."""

import importlib
import os
import pkgutil

import numpy as np

import megablocks
from exp import demo
from exp.data.indexed_dataset import IndexedDataset

# Define every kernel now, while TRITON_INTERPRET is as the session set it (see test_trainer.py).
for _mod in pkgutil.walk_packages(megablocks.__path__, "megablocks."):
    try:
        importlib.import_module(_mod.name)
    except ImportError:
        pass


def test_corpus_is_deterministic_megatron_data(tmp_path):
    a = demo.build_corpus(str(tmp_path / "a" / "c"))
    b = demo.build_corpus(str(tmp_path / "b" / "c"))
    assert a == b and a["documents"] > 1000 and a["tokens"] > 1_000_000
    for ext in (".bin", ".idx"):
        assert (tmp_path / "a" / ("c" + ext)).read_bytes() == (tmp_path / "b" / ("c" + ext)).read_bytes()
    ds = IndexedDataset(str(tmp_path / "a" / "c"))
    assert ds.num_documents == a["documents"] and ds.num_tokens == a["tokens"]
    assert all(ds[i][-1] == 256 for i in range(0, len(ds), 97))  # each block ends with the eod token
    text = bytes(np.concatenate([ds[i][:-1] for i in range(50)]).astype(np.uint8)).decode("utf-8", "replace")
    assert "def " in text or "class " in text or "import " in text


def test_both_runs_table_and_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the layers' torch references: fast
    monkeypatch.setitem(demo.COMMON, "eval_iters", 1)
    out = demo.run(str(tmp_path), iters=2, device="cpu", progress=False)
    res = out["results"]
    assert set(res) == {"dense", "dmoe"}
    # The same parameters per token, eight times the MLPs in total. Apart from the MLP weights, the
    # dMoE adds a router per layer and its experts have no first-layer bias (MegaBlocks' layout).
    dense, dmoe = res["dense"], res["dmoe"]
    c = demo.COMMON
    router = c["num_layers"] * c["hidden_size"] * demo.DMOE["moe_num_experts"]
    fc1_bias = c["num_layers"] * c["ffn_hidden_size"]
    assert dmoe["active_parameters"] == dense["active_parameters"] + router - fc1_bias
    assert dmoe["parameters"] > 3 * dense["parameters"]
    assert os.path.getsize(out["plot"]) > 1000
    text = demo.table(res)
    assert "iteration |    dense |     dmoe" in text and "M active per token" in text
    assert len(dense["valid"]) == len(dmoe["valid"]) == 1
