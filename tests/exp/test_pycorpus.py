"""The corpus of a machine's own Python sources, and the time-to-quality comparison of runs."""

import os

import numpy as np
import pytest

from exp.data import pycorpus
from exp.data.indexed_dataset import IndexedDataset
from exp.plot import plot_runs, time_table, time_to_reach


def _tree(root, files):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text)


def test_corpus_reads_every_source_once_in_a_seeded_order(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    _tree(a, {"x.py": b"def x():\n    return 1\n", "pkg/y.py": b"import os\n", "pkg/data.txt": b"not python",
              "site-packages/z.py": b"# left to its own root\n", "pkg/__pycache__/y.py": b"stale\n",
              "empty.py": b"  \n"})
    _tree(b, {"copy.py": b"def x():\n    return 1\n", "w.py": "s = 'caf\u00e9'\n".encode()})
    monkeypatch.setattr(pycorpus, "source_roots", lambda scope: [("stdlib", str(a)), ("site1", str(b))])
    out = str(tmp_path / "out" / "c")
    s = pycorpus.build(out, "installed", seed=3)
    # x.py, pkg/y.py and w.py: the .txt, the other root's site-packages, __pycache__, the empty
    # file and the repeated contents are left out.
    assert (s["documents"], s["duplicates"], s["files"]) == (3, 1, 5)
    texts = {b"def x():\n    return 1\n", b"import os\n", "s = 'caf\u00e9'\n".encode()}
    assert s["tokens"] == sum(len(t) + 1 for t in texts)
    ds = IndexedDataset(out)
    got = [bytes(ds[i][:-1].astype(np.uint8)) for i in range(len(ds))]
    assert set(got) == texts and all(ds[i][-1] == 256 for i in range(len(ds)))
    order = [bytes(x[:-1].astype(np.uint8)) for x in (IndexedDataset(out)[i] for i in range(3))]
    again = pycorpus.build(str(tmp_path / "again" / "c"), "installed", seed=3)
    assert again == s and [bytes(IndexedDataset(str(tmp_path / "again" / "c"))[i][:-1].astype(np.uint8))
                           for i in range(3)] == order
    with pytest.raises(ValueError, match="min_tokens"):
        pycorpus.build(str(tmp_path / "big" / "c"), "installed", min_tokens=10**9)
    assert pycorpus.main([str(tmp_path / "cli" / "c"), "--min-tokens", str(10**9)]) == 2


def test_roots_of_each_scope():
    stdlib = pycorpus.source_roots("stdlib")
    installed = pycorpus.source_roots("installed")
    assert len(stdlib) == 1 and installed[0] == stdlib[0] and len(installed) > 1  # numpy, torch: site-packages
    assert any(os.path.isdir(os.path.join(d, "numpy")) for _, d in installed[1:])
    with pytest.raises(ValueError, match="scope"):
        pycorpus.source_roots("everything")


def test_time_to_reach_interpolates_between_evaluations():
    rows = [dict(train_s=10.0, valid_loss=3.0), dict(train_s=20.0, valid_loss=2.0), dict(train_s=30.0, valid_loss=1.5)]
    assert time_to_reach(rows, 2.5) == pytest.approx(15.0)
    assert time_to_reach(rows, 3.5) == 10.0
    assert time_to_reach(rows, 1.5) == 30.0
    assert time_to_reach(rows, 1.0) is None
    with pytest.raises(ValueError, match="train_s"):
        time_to_reach([dict(valid_loss=1.0)], 2.0)


def test_time_table_and_plot_against_time(tmp_path):
    for name, rows in {"dense": [(1, 10.0, 3.0), (2, 20.0, 2.4)], "dmoe": [(1, 12.0, 2.6), (2, 24.0, 2.0)]}.items():
        run = tmp_path / name
        run.mkdir()
        (run / "valid.csv").write_text("iteration,consumed_samples,valid_loss,valid_ppl,train_s\n" + "".join(
            f"{i},{i * 8},{v},{np.exp(v)},{t}\n" for i, t, v in rows))
        (run / "train.csv").write_text("iteration,lm_loss,train_s\n" + "".join(
            f"{i},{v + 0.1},{t}\n" for i, t, v in rows))
    runs = {n: str(tmp_path / n) for n in ("dense", "dmoe")}
    text = time_table(runs)
    # dMoE passed dense's final 2.4 between its evaluations at 12 s (2.6) and 24 s (2.0): at 16 s.
    assert "dmoe reached it at 16.0 s (0.80x dense's time)" in text
    assert "dense reached it never" in text
    pytest.importorskip("matplotlib")
    png = plot_runs(runs, str(tmp_path / "t.png"), x="time")
    assert os.path.getsize(png) > 1000
    with pytest.raises(ValueError, match="x"):
        plot_runs(runs, str(tmp_path / "u.png"), x="tokens")
