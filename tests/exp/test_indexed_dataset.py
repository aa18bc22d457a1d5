"""The MMIDIDX reader/writer: byte-compatible with megatron-core both ways, and strict on bad files."""

import os
import pickle
import struct
import warnings

import numpy as np
import pytest
import torch

from exp.data.indexed_dataset import (
    DTYPE_CODES,
    HEADER_BYTES,
    DataFormatError,
    IndexedDataset,
    IndexedDatasetBuilder,
    code_from_dtype,
    dtype_from_code,
    optimal_dtype,
    write_documents,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    megatron_indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")

ALL_DTYPES = [DTYPE_CODES[c] for c in sorted(DTYPE_CODES)]


def _documents(rng, dtype, n_docs=12, max_seqs=3, max_len=40):
    """Documents as lists of sequences; some sequences and documents are empty."""
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    lo, hi = (max(info.min, -1000), min(info.max, 60000)) if info else (-1e6, 1e6)
    docs = []
    for _ in range(n_docs):
        seqs = []
        for _ in range(int(rng.integers(0, max_seqs + 1))):
            n = int(rng.integers(0, max_len))
            if info:
                seqs.append(rng.integers(lo, hi, size=n, endpoint=True).astype(dtype))
            else:
                seqs.append(rng.uniform(lo, hi, size=n).astype(dtype))
        docs.append(seqs)
    return docs


def _write(builder_cls, prefix, docs, dtype, multimodal=False):
    b = builder_cls(prefix + ".bin", dtype=dtype, multimodal=multimodal)
    for d, seqs in enumerate(docs):
        for s, seq in enumerate(seqs):
            if multimodal:
                b.add_item(torch.from_numpy(seq.astype(np.float64 if seq.dtype.kind == "f" else np.int64)), mode=(d + s) % 3)
            else:
                b.add_item(torch.from_numpy(seq.astype(np.float64 if seq.dtype.kind == "f" else np.int64)))
        b.end_document()
    b.finalize(prefix + ".idx")


def _read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("multimodal", [False, True])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda t: np.dtype(t).name)
def test_written_files_are_byte_identical_to_megatron(tmp_path, dtype, multimodal):
    docs = _documents(np.random.default_rng(code_from_dtype(dtype)), dtype)
    ours, theirs = str(tmp_path / "ours"), str(tmp_path / "theirs")
    _write(IndexedDatasetBuilder, ours, docs, dtype, multimodal)
    _write(megatron_indexed.IndexedDatasetBuilder, theirs, docs, dtype, multimodal)
    assert _read_bytes(ours + ".idx") == _read_bytes(theirs + ".idx")
    assert _read_bytes(ours + ".bin") == _read_bytes(theirs + ".bin")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda t: np.dtype(t).name)
def test_each_reads_what_the_other_wrote(tmp_path, dtype):
    docs = _documents(np.random.default_rng(100 + code_from_dtype(dtype)), dtype)
    flat = [seq for seqs in docs for seq in seqs]
    ours, theirs = str(tmp_path / "ours"), str(tmp_path / "theirs")
    _write(IndexedDatasetBuilder, ours, docs, dtype)
    _write(megatron_indexed.IndexedDatasetBuilder, theirs, docs, dtype)

    mine = IndexedDataset(theirs)  # ours reads Megatron's files
    other = megatron_indexed.IndexedDataset(ours)  # Megatron reads ours
    assert len(mine) == len(other) == len(flat)
    assert mine.dtype == np.dtype(dtype) and other.index.dtype == dtype
    np.testing.assert_array_equal(mine.sequence_lengths, other.sequence_lengths)
    np.testing.assert_array_equal(mine.sequence_pointers, other.index.sequence_pointers)
    np.testing.assert_array_equal(mine.document_indices, other.document_indices)
    assert mine.num_documents == len(docs)
    for i, seq in enumerate(flat):
        np.testing.assert_array_equal(mine[i], seq)
        np.testing.assert_array_equal(other[i], seq)
        assert mine[i].dtype == np.dtype(dtype)
        if len(seq) >= 3:
            np.testing.assert_array_equal(mine.get(i, 1, 2), other.get(i, offset=1, length=2))
    if len(flat) > 3:
        for a, b in zip(mine[1:4], other[1:4]):
            np.testing.assert_array_equal(a, b)


def test_multimodal_modes_round_trip(tmp_path):
    docs = _documents(np.random.default_rng(7), np.int32)
    ours = str(tmp_path / "ours")
    _write(megatron_indexed.IndexedDatasetBuilder, ours, docs, np.int32, multimodal=True)
    mine = IndexedDataset(ours, multimodal=True)
    other = megatron_indexed.IndexedDataset(ours, multimodal=True)
    np.testing.assert_array_equal(mine.sequence_modes, other.index.sequence_modes)
    for i in range(len(mine)):
        seq, mode = mine[i]
        seq2, mode2 = other[i]
        np.testing.assert_array_equal(seq, seq2)
        assert mode == mode2


def test_add_document_and_add_index_match_megatron(tmp_path):
    rng = np.random.default_rng(3)
    parts = [rng.integers(0, 60000, size=n).astype(np.uint16) for n in (5, 0, 9)]
    for i, cls in enumerate((IndexedDatasetBuilder, megatron_indexed.IndexedDatasetBuilder)):
        b = cls(str(tmp_path / f"part{i}.bin"), dtype=np.uint16)
        b.add_document(torch.from_numpy(np.concatenate(parts).astype(np.int64)), [5, 0, 9])
        b.add_item(torch.from_numpy(parts[0].astype(np.int64)))
        b.end_document()
        b.finalize(str(tmp_path / f"part{i}.idx"))
    for i, cls in enumerate((IndexedDatasetBuilder, megatron_indexed.IndexedDatasetBuilder)):
        b = cls(str(tmp_path / f"merged{i}.bin"), dtype=np.uint16)
        b.add_index(str(tmp_path / "part0"))
        b.add_index(str(tmp_path / "part1"))
        b.finalize(str(tmp_path / f"merged{i}.idx"))
    for ext in (".idx", ".bin"):
        assert _read_bytes(str(tmp_path / "part0") + ext) == _read_bytes(str(tmp_path / "part1") + ext)
        assert _read_bytes(str(tmp_path / "merged0") + ext) == _read_bytes(str(tmp_path / "merged1") + ext)
    merged = IndexedDataset(str(tmp_path / "merged0"))
    assert merged.num_documents == 4
    np.testing.assert_array_equal(merged.document_indices, [0, 3, 4, 7, 8])


def test_dtype_codes_are_megatrons():
    for member in megatron_indexed.DType:
        assert DTYPE_CODES[member.value] is getattr(np, member.name)
        assert code_from_dtype(getattr(np, member.name)) == member.value
        assert dtype_from_code(member.value) is getattr(np, member.name)
    assert len(DTYPE_CODES) == len(megatron_indexed.DType)
    for vocab in (None, 257, 65499, 65500, 200000):
        assert optimal_dtype(vocab) is megatron_indexed.DType.optimal_dtype(vocab)
    with pytest.raises(ValueError, match="dtype code: expected one of .* got 9"):
        dtype_from_code(9)
    with pytest.raises(TypeError, match="dtype: expected one of"):
        code_from_dtype(np.float16)


def test_builder_rejects_values_that_do_not_fit(tmp_path):
    b = IndexedDatasetBuilder(str(tmp_path / "x.bin"), dtype=np.uint16)
    with pytest.raises(ValueError, match=r"tokens: values in \[0, 70000\] do not fit dtype uint16"):
        b.add_item(np.array([0, 70000]))
    with pytest.raises(ValueError, match="do not fit dtype uint16"):
        b.add_item(np.array([-1, 3]))
    with pytest.raises(TypeError, match="expected integer token ids"):
        b.add_item(np.array([1.5]))
    with pytest.raises(ValueError, match="lengths: expected non-negative lengths summing to the 3 tokens"):
        b.add_document(np.array([1, 2, 3]), [1, 1])
    with pytest.raises(TypeError, match="dtype: expected one of"):
        IndexedDatasetBuilder(str(tmp_path / "y.bin"), dtype=np.float16)


def test_indexing_errors_and_pickle(tmp_path):
    prefix = str(tmp_path / "d")
    write_documents(prefix, [np.arange(5), np.arange(3)])
    ds = IndexedDataset(prefix)
    np.testing.assert_array_equal(ds[-1], [0, 1, 2])
    with pytest.raises(IndexError, match="sequence index 2 out of range for 2 sequences"):
        ds[2]
    with pytest.raises(IndexError, match=r"tokens \[2, 6\) out of range for sequence 0 of length 5"):
        ds.get(0, 2, 4)
    with pytest.raises(ValueError, match="slices must be contiguous"):
        ds[::2]
    with pytest.raises(TypeError, match="idx: expected an int or a slice, got str"):
        ds["0"]
    blob = pickle.dumps(ds)
    assert len(blob) < 1000  # the path, not the data
    np.testing.assert_array_equal(pickle.loads(blob)[0], np.arange(5))


# ---------------------------------------------------------------------------------------------
# Bad files: each problem raises DataFormatError naming the file and the problem.


@pytest.fixture
def good(tmp_path):
    prefix = str(tmp_path / "good")
    write_documents(prefix, [np.arange(10), np.arange(7), np.arange(4)], dtype=np.uint16)
    return prefix


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


@pytest.mark.parametrize("size", [0, 5, 20, HEADER_BYTES, HEADER_BYTES + 13, -1])
def test_truncated_index(good, size):
    idx = good + ".idx"
    full = os.path.getsize(idx)
    _truncate(idx, size if size >= 0 else full + size)
    with pytest.raises(DataFormatError, match=f"{idx}: truncated"):
        IndexedDataset(good)


def test_not_an_index(good):
    _patch(good + ".idx", 0, b"GARBAGE!!")
    with pytest.raises(DataFormatError, match=r"good\.idx: not an MMIDIDX index: starts with b'GARBAGE!!'"):
        IndexedDataset(good)


def test_version_mismatch(good):
    _patch(good + ".idx", 9, struct.pack("<Q", 2))
    with pytest.raises(DataFormatError, match=r"good\.idx: unsupported index version 2, this reader reads version 1"):
        IndexedDataset(good)


@pytest.mark.parametrize("code", [0, 9, 255])
def test_wrong_dtype_code(good, code):
    _patch(good + ".idx", 17, bytes([code]))
    with pytest.raises(DataFormatError, match=rf"good\.idx: unknown dtype code {code} in the header \(known: 1=uint8"):
        IndexedDataset(good)


def test_dtype_code_of_another_width_is_caught_by_the_bin_size(good):
    _patch(good + ".idx", 17, bytes([code_from_dtype(np.int32)]))  # uint16 data, int32 header
    with pytest.raises(DataFormatError, match=r"good\.(idx|bin): corrupt|good\.bin: truncated"):
        IndexedDataset(good)


def test_header_counts_disagree_with_the_file(good):
    _patch(good + ".idx", 18, struct.pack("<Q", 1000))
    with pytest.raises(DataFormatError, match=r"good\.idx: truncated: the header declares 1000 sequences"):
        IndexedDataset(good)
    _patch(good + ".idx", 18, struct.pack("<Q", 3))
    with open(good + ".idx", "ab") as f:
        f.write(b"\x00" * 5)
    with pytest.raises(DataFormatError, match=r"good\.idx: 5 bytes more than the"):
        IndexedDataset(good)


def test_multimodal_index_read_as_plain_says_so(tmp_path):
    prefix = str(tmp_path / "mm")
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32, multimodal=True)
    b.add_item(np.arange(4), mode=1)
    b.end_document()
    b.finalize(prefix + ".idx")
    with pytest.raises(DataFormatError, match="open it with multimodal=True"):
        IndexedDataset(prefix)
    assert IndexedDataset(prefix, multimodal=True)[0][1] == 1


def test_corrupt_lengths_and_pointers(good):
    idx = good + ".idx"
    _patch(idx, HEADER_BYTES + 4, struct.pack("<i", -3))
    with pytest.raises(DataFormatError, match=r"good\.idx: corrupt: sequence_lengths\[1\] = -3 is negative"):
        IndexedDataset(good)
    _patch(idx, HEADER_BYTES + 4, struct.pack("<i", 7))
    _patch(idx, HEADER_BYTES + 12 + 8 * 2, struct.pack("<q", 999))
    with pytest.raises(DataFormatError, match=r"good\.idx: corrupt: sequence_pointers\[2\] = 999, but the sequence lengths put sequence 2 at byte 34"):
        IndexedDataset(good)


@pytest.mark.parametrize(
    "docs, problem",
    [
        ([1, 1, 2, 3], "runs from 1 to 3"),
        ([0, 1, 2, 2], "runs from 0 to 2, expected 0 to the number of sequences, 3"),
        ([0, 2, 1, 3], "decreases at position 2"),
    ],
)
def test_corrupt_document_index(good, docs, problem):
    _patch(good + ".idx", HEADER_BYTES + 12 * 3, struct.pack("<4q", *docs))
    with pytest.raises(DataFormatError, match=rf"good\.idx: corrupt: the document index {problem}"):
        IndexedDataset(good)


def test_empty_document_index(tmp_path):
    prefix = str(tmp_path / "nodocs")
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, 0, 0))
    open(prefix + ".bin", "wb").close()
    with pytest.raises(DataFormatError, match=r"nodocs\.idx: corrupt: the document index is empty"):
        IndexedDataset(prefix)


def test_bin_of_the_wrong_size(good):
    binf = good + ".bin"
    _truncate(binf, os.path.getsize(binf) - 1)
    with pytest.raises(DataFormatError, match=r"good\.bin: truncated: 41 bytes, but .*good\.idx describes 21 tokens of uint16 \(42 bytes\)"):
        IndexedDataset(good)
    with open(binf, "ab") as f:
        f.write(b"\x00\x00\x00")
    with pytest.raises(DataFormatError, match=r"good\.bin: too long: 44 bytes"):
        IndexedDataset(good)


def test_missing_files(good):
    os.remove(good + ".bin")
    with pytest.raises(FileNotFoundError, match=r"good\.bin: data file not found"):
        IndexedDataset(good)
    os.remove(good + ".idx")
    with pytest.raises(FileNotFoundError, match=r"good\.idx: index file not found"):
        IndexedDataset(good)


def test_empty_dataset_reads_as_empty(tmp_path):
    prefix = str(tmp_path / "empty")
    write_documents(prefix, [])
    ds = IndexedDataset(prefix)
    assert len(ds) == 0 and ds.num_documents == 0 and ds.num_tokens == 0
