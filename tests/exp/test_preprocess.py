"""The preprocessing CLI: text and jsonl to .bin/.idx that megatron-core reads."""

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest

from exp.data.indexed_dataset import IndexedDataset
from exp.data.preprocess import ByteTokenizer, build_tokenizer, main, preprocess

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    megatron_indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")

DOCS = ["Hello, wörld!", "", "second document\nwith two lines", "ünïcødé ✓"]


def _jsonl(tmp_path, docs=DOCS):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": d, "title": d[:3], "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return str(path)


def test_jsonl_to_megatron_dataset(tmp_path, capsys):
    rc = main(["--input", _jsonl(tmp_path), "--output-prefix", str(tmp_path / "out" / "c"), "--json-keys", "text", "title"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "text: 3 documents" in printed and "title: 3 documents" in printed
    tok = ByteTokenizer()
    for key in ("text", "title"):
        prefix = str(tmp_path / "out" / f"c_{key}_document")
        expected = [list((d if key == "text" else d[:3]).encode("utf-8")) + [tok.eod] for d in DOCS if d]
        for ds in (IndexedDataset(prefix), megatron_indexed.IndexedDataset(prefix)):
            assert len(ds) == 3
            for i, ids in enumerate(expected):
                np.testing.assert_array_equal(ds[i], ids)
            np.testing.assert_array_equal(ds.document_indices, [0, 1, 2, 3])
        assert IndexedDataset(prefix).dtype == np.uint16  # the smallest dtype for 257 ids
        assert tok.detokenize(IndexedDataset(prefix)[0]) == (DOCS[0] if key == "text" else DOCS[0][:3])


@pytest.mark.parametrize("text_split, expected", [
    ("file", ["a b\n\nc\nd\n\n\ne\n"]),
    ("blank-line", ["a b\n", "c\nd\n", "e\n"]),
    ("line", ["a b", "c", "d", "e"]),
])
def test_text_document_splitting(tmp_path, text_split, expected):
    path = tmp_path / "in.txt"
    path.write_text("a b\n\nc\nd\n\n\ne\n")
    out = preprocess([str(path)], str(tmp_path / "t"), text_split=text_split, append_eod=False, dtype="int32")
    prefix, docs, tokens = out["text"]
    assert prefix.endswith("t_text_document") and docs == len(expected)
    assert tokens == sum(len(e) for e in expected)
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.int32
    assert [ByteTokenizer().detokenize(ds[i]) for i in range(len(ds))] == expected


def test_cli_runs_as_a_module(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "exp.data.preprocess", "--input", _jsonl(tmp_path), "--output-prefix", str(tmp_path / "m")],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert len(IndexedDataset(str(tmp_path / "m_text_document"))) == 3


def test_malformed_input_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": oops}\n')
    assert main(["--input", str(path), "--output-prefix", str(tmp_path / "b")]) == 2
    assert "bad.jsonl:2: not valid json" in capsys.readouterr().err
    path.write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: no key 'text' \(keys: \['body'\]\)"):
        preprocess([str(path)], str(tmp_path / "b"))
    path.write_text('{"text": 5}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: key 'text' is not a string"):
        preprocess([str(path)], str(tmp_path / "b"))
    with pytest.raises(FileNotFoundError, match=r"nope\.txt: input file not found"):
        preprocess([str(tmp_path / "nope.txt")], str(tmp_path / "b"))


def test_tokenizer_choices(tmp_path):
    with pytest.raises(ValueError, match="tokenizer: 'hf' needs --tokenizer-name-or-path"):
        build_tokenizer("hf")
    with pytest.raises(ValueError, match="tokenizer: expected 'byte' or 'hf', got 'bpe'"):
        build_tokenizer("bpe")
    with pytest.raises(ValueError, match="dtype: uint8 cannot hold the 257 token ids"):
        preprocess([_jsonl(tmp_path)], str(tmp_path / "x"), dtype="uint8")
