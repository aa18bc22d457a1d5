"""Fuzzing the Megatron-format reader (exp/data/indexed_dataset.py) with corrupted files.

A seeded loop writes small datasets with the writer, then damages a copy of the `.idx` or the
`.bin`: truncation, appended bytes, bit flips, random bytes over a header field or an array,
swapped or emptied files. Every case must end in one of two ways:

- the reader refuses the pair with `DataFormatError` (a ValueError) or an OSError whose message
  names the damaged file; or
- the damage is one the format cannot detect (a flipped token in the `.bin`, a document boundary
  moved within the monotone range, a flipped mode byte) and every sequence reads back in bounds
  with the length its index declares.

Anything else — a numpy error, an IndexError, a crash — fails the test with the case's seed.
"""

import os
import random
import shutil

import numpy as np
import pytest

from exp.data.indexed_dataset import (
    HEADER_BYTES,
    DataFormatError,
    IndexedDataset,
    data_file_path,
    index_file_path,
    write_documents,
)

NUM_CASES = 240
MUTATIONS = (
    "truncate_idx", "truncate_bin", "extend_idx", "extend_bin", "flip_idx", "flip_bin",
    "flip_idx_header", "overwrite_header_field", "overwrite_idx_array", "empty_idx", "empty_bin",
    "swap_files", "zero_idx_tail",
)


def _make_dataset(rng: random.Random, prefix: str) -> None:
    dtype = rng.choice([np.uint8, np.uint16, np.int32, np.int64])
    high = min(int(np.iinfo(dtype).max), 1000)
    docs = [np.array([rng.randrange(high) for _ in range(rng.randrange(0, 9))], dtype=dtype)
            for _ in range(rng.randrange(1, 6))]
    write_documents(prefix, docs, dtype=dtype)


def _flip(data: bytearray, rng: random.Random, lo: int = 0, hi: int = None) -> None:
    hi = len(data) if hi is None else min(hi, len(data))
    if hi <= lo:
        return
    for _ in range(rng.randrange(1, 4)):
        i = rng.randrange(lo, hi)
        data[i] ^= 1 << rng.randrange(8)


def _mutate(kind: str, rng: random.Random, idx: bytearray, bin_: bytearray):
    """Returns the damaged (idx, bin) contents."""
    if kind == "truncate_idx":
        return idx[: rng.randrange(len(idx))], bin_
    if kind == "truncate_bin":
        return idx, bin_[: rng.randrange(len(bin_))] if bin_ else bin_
    if kind == "extend_idx":
        return idx + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 17))), bin_
    if kind == "extend_bin":
        return idx, bin_ + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 17)))
    if kind == "flip_idx":
        _flip(idx, rng, HEADER_BYTES)
        return idx, bin_
    if kind == "flip_bin":
        _flip(bin_, rng)
        return idx, bin_
    if kind == "flip_idx_header":
        _flip(idx, rng, 0, HEADER_BYTES)
        return idx, bin_
    if kind == "overwrite_header_field":
        start, width = rng.choice([(0, 9), (9, 8), (17, 1), (18, 8), (26, 8)])
        idx[start:start + width] = bytes(rng.randrange(256) for _ in range(width))
        return idx, bin_
    if kind == "overwrite_idx_array":
        if len(idx) > HEADER_BYTES:
            at = rng.randrange(HEADER_BYTES, len(idx))
            width = min(8, len(idx) - at)
            idx[at:at + width] = bytes(rng.randrange(256) for _ in range(width))
        return idx, bin_
    if kind == "empty_idx":
        return bytearray(), bin_
    if kind == "empty_bin":
        return idx, bytearray()
    if kind == "swap_files":
        return bin_, idx
    if kind == "zero_idx_tail":
        cut = rng.randrange(HEADER_BYTES, len(idx) + 1)
        return idx[:cut] + bytes(len(idx) - cut), bin_
    raise AssertionError(kind)


def _read_everything(prefix: str) -> None:
    ds = IndexedDataset(prefix)
    lengths = ds.sequence_lengths
    assert len(ds) == len(lengths)
    for i in range(len(ds)):
        seq = ds[i]
        assert seq.shape == (int(lengths[i]),), f"sequence {i}: shape {seq.shape}, index says {lengths[i]}"
    docs = ds.document_indices
    assert docs[0] == 0 and docs[-1] == len(ds) and bool((np.diff(docs) >= 0).all())


def _run_case(seed: int, tmp_path) -> str:
    rng = random.Random(seed)
    clean = str(tmp_path / f"clean{seed}")
    _make_dataset(rng, clean)
    kind = MUTATIONS[seed % len(MUTATIONS)]
    idx = bytearray(open(index_file_path(clean), "rb").read())
    bin_ = bytearray(open(data_file_path(clean), "rb").read())
    new_idx, new_bin = _mutate(kind, rng, bytearray(idx), bytearray(bin_))
    prefix = str(tmp_path / f"case{seed}")
    with open(index_file_path(prefix), "wb") as f:
        f.write(new_idx)
    with open(data_file_path(prefix), "wb") as f:
        f.write(new_bin)
    try:
        _read_everything(prefix)
    except (DataFormatError, OSError) as e:
        damaged = {index_file_path(prefix), data_file_path(prefix)}
        assert any(p in str(e) for p in damaged), f"seed {seed} ({kind}): error names no file: {e}"
        return "refused"
    except Exception as e:  # noqa: BLE001 (the point of the test)
        raise AssertionError(f"seed {seed} ({kind}): {type(e).__name__}: {e}") from e
    return "read"


def test_fuzz_corrupted_files(tmp_path):
    outcomes = {"refused": 0, "read": 0}
    by_kind = {}
    for seed in range(NUM_CASES):
        out = _run_case(seed, tmp_path)
        outcomes[out] += 1
        kind = MUTATIONS[seed % len(MUTATIONS)]
        by_kind.setdefault(kind, set()).add(out)
    assert sum(outcomes.values()) >= 200
    # Damage the format always detects must always be refused.
    for kind in ("truncate_idx", "extend_idx", "extend_bin", "empty_idx", "swap_files"):
        assert by_kind[kind] == {"refused"}, (kind, by_kind[kind])
    assert outcomes["refused"] > NUM_CASES // 2, outcomes


@pytest.mark.parametrize("kind", ["empty_idx", "swap_files", "truncate_idx"])
def test_refusal_is_a_value_error_naming_the_file(tmp_path, kind):
    rng = random.Random(7)
    clean = str(tmp_path / "clean")
    write_documents(clean, [np.arange(5, dtype=np.uint16), np.arange(3, dtype=np.uint16)])
    idx = bytearray(open(index_file_path(clean), "rb").read())
    bin_ = bytearray(open(data_file_path(clean), "rb").read())
    new_idx, new_bin = _mutate(kind, rng, idx, bin_)
    prefix = str(tmp_path / "bad")
    open(index_file_path(prefix), "wb").write(new_idx)
    open(data_file_path(prefix), "wb").write(new_bin)
    with pytest.raises(ValueError, match=os.path.basename(prefix) + r"\.idx"):
        IndexedDataset(prefix)


def test_missing_files_raise_file_not_found(tmp_path):
    prefix = str(tmp_path / "ds")
    write_documents(prefix, [np.arange(4, dtype=np.uint16)])
    os.remove(data_file_path(prefix))
    with pytest.raises(FileNotFoundError, match=r"ds\.bin"):
        IndexedDataset(prefix)
    shutil.copy(index_file_path(prefix), str(tmp_path / "other.idx"))
    os.remove(index_file_path(prefix))
    with pytest.raises(FileNotFoundError, match=r"ds\.idx"):
        IndexedDataset(prefix)
