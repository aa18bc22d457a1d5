"""Megatron's indexed dataset: a `.bin` file of token ids and an `.idx` file that indexes it.

The format (called MMIDIDX after its magic bytes), byte-compatible with megatron-core's
`IndexedDataset` / `IndexedDatasetBuilder` in both directions. All integers little-endian:

    .idx   magic           9 bytes   b"MMIDIDX\\x00\\x00"
           version         uint64    1
           dtype code      uint8     see DTYPE_CODES
           n               uint64    number of sequences
           d               uint64    number of document boundaries (documents + 1)
           lengths         int32[n]  tokens per sequence
           pointers        int64[n]  byte offset of each sequence in the .bin
           doc_indices     int64[d]  sequence index where each document starts; 0 first, n last
           modes           int8[n]   only in multimodal datasets
    .bin   the sequences' tokens back to back, in the dtype of the code

A document is one or more consecutive sequences (one per document in GPT pretraining data).

Every inconsistency the reader can detect (truncation, a foreign or corrupt header, an unknown
dtype code, another version, pointers that disagree with the lengths, a document index that is
not a monotone cover of the sequences, a `.bin` of the wrong size) raises `DataFormatError`, which
names the file and the problem, before any token is read.
"""

from __future__ import annotations

import os
import struct
from typing import TYPE_CHECKING, Iterable, Optional, Sequence, Union

import numpy as np

if TYPE_CHECKING:  # only for the annotation; reading data needs no torch
    import torch

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# magic (9) + version (8) + dtype code (1) + sequence count (8) + document count (8)
HEADER_BYTES = 34

# The dtype codes Megatron defines, by number.
DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF = {np.dtype(t): c for c, t in DTYPE_CODES.items()}

ArrayLike = Union[np.ndarray, Sequence[int], "torch.Tensor"]


class DataFormatError(ValueError):
    """A `.bin`/`.idx` pair that cannot be read as an indexed dataset; names the file."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


def code_from_dtype(dtype) -> int:
    """The Megatron dtype code of a numpy dtype (`np.uint16` -> 8). Raises TypeError if none."""
    try:
        return _CODE_OF[np.dtype(dtype)]
    except (KeyError, TypeError):
        known = ", ".join(np.dtype(t).name for t in DTYPE_CODES.values())
        raise TypeError(f"dtype: expected one of ({known}), got {dtype!r}") from None


def dtype_from_code(code: int) -> type:
    """The numpy dtype of a Megatron dtype code (8 -> `np.uint16`). Raises ValueError if unknown."""
    if code not in DTYPE_CODES:
        raise ValueError(f"dtype code: expected one of {_known_codes()}, got {code}")
    return DTYPE_CODES[code]


def optimal_dtype(vocab_size: Optional[int]) -> type:
    """The token dtype Megatron picks for a vocabulary: uint16 below 65500 ids, else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def index_file_path(path_prefix: str) -> str:
    return path_prefix + ".idx"


def data_file_path(path_prefix: str) -> str:
    return path_prefix + ".bin"


def _known_codes() -> str:
    return ", ".join(f"{c}={np.dtype(t).name}" for c, t in DTYPE_CODES.items())


class _Index:
    """The parsed and validated contents of an `.idx` file."""

    def __init__(self, idx_path: str, multimodal: bool):
        self.path = idx_path
        if not os.path.isfile(idx_path):
            raise FileNotFoundError(f"{idx_path}: index file not found")
        size = os.path.getsize(idx_path)
        with open(idx_path, "rb") as f:
            head = f.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES and MAGIC.startswith(head[: len(MAGIC)]):
            raise DataFormatError(
                idx_path, f"truncated: {size} bytes, the header alone needs {HEADER_BYTES}"
            )
        if head[:9] != MAGIC:
            raise DataFormatError(
                idx_path, f"not an MMIDIDX index: starts with {head[:9]!r}, expected {MAGIC!r}"
            )
        (version,) = struct.unpack("<Q", head[9:17])
        if version != VERSION:
            raise DataFormatError(
                idx_path, f"unsupported index version {version}, this reader reads version {VERSION}"
            )
        code = head[17]
        if code not in DTYPE_CODES:
            raise DataFormatError(
                idx_path, f"unknown dtype code {code} in the header (known: {_known_codes()})"
            )
        self.dtype = np.dtype(DTYPE_CODES[code])
        self.sequence_count, self.document_count = struct.unpack("<QQ", head[18:34])
        n, d = self.sequence_count, self.document_count

        expected = HEADER_BYTES + 4 * n + 8 * n + 8 * d + (n if multimodal else 0)
        if size < expected:
            raise DataFormatError(
                idx_path,
                f"truncated: the header declares {n} sequences and {d} document boundaries, "
                f"which need {expected} bytes, but the file has {size}",
            )
        if size > expected:
            if not multimodal and size == expected + n and n > 0:
                hint = "it carries per-sequence modes: open it with multimodal=True"
            else:
                hint = "corrupt header counts or trailing garbage"
            raise DataFormatError(
                idx_path,
                f"{size - expected} bytes more than the {expected} that the header's {n} sequences "
                f"and {d} document boundaries need ({hint})",
            )

        with open(idx_path, "rb") as f:
            f.seek(HEADER_BYTES)
            raw = f.read()
        off = 0
        self.sequence_lengths = np.frombuffer(raw, dtype="<i4", count=n, offset=off)
        off += 4 * n
        self.sequence_pointers = np.frombuffer(raw, dtype="<i8", count=n, offset=off)
        off += 8 * n
        self.document_indices = np.frombuffer(raw, dtype="<i8", count=d, offset=off)
        off += 8 * d
        self.sequence_modes = (
            np.frombuffer(raw, dtype=np.int8, count=n, offset=off) if multimodal else None
        )
        self._validate()

    def _validate(self) -> None:
        p, n = self.path, self.sequence_count
        lengths, pointers, docs = self.sequence_lengths, self.sequence_pointers, self.document_indices
        if n and lengths.min() < 0:
            i = int(np.argmax(lengths < 0))
            raise DataFormatError(p, f"corrupt: sequence_lengths[{i}] = {lengths[i]} is negative")
        byte_lengths = lengths.astype(np.int64) * self.dtype.itemsize
        expected_pointers = np.zeros(n, dtype=np.int64)
        np.cumsum(byte_lengths[:-1], out=expected_pointers[1:])
        bad = np.flatnonzero(pointers != expected_pointers)
        if bad.size:
            i = int(bad[0])
            raise DataFormatError(
                p,
                f"corrupt: sequence_pointers[{i}] = {pointers[i]}, but the sequence lengths put "
                f"sequence {i} at byte {expected_pointers[i]} of the .bin",
            )
        self.total_bytes = int(byte_lengths.sum()) if n else 0
        if docs.size == 0:
            raise DataFormatError(
                p, "corrupt: the document index is empty (it must start with 0 and end with the "
                "number of sequences)",
            )
        if docs[0] != 0 or docs[-1] != n:
            raise DataFormatError(
                p,
                f"corrupt: the document index runs from {docs[0]} to {docs[-1]}, expected 0 to the "
                f"number of sequences, {n}",
            )
        if docs.size > 1 and (np.diff(docs) < 0).any():
            i = int(np.argmax(np.diff(docs) < 0))
            raise DataFormatError(
                p,
                f"corrupt: the document index decreases at position {i + 1} "
                f"({docs[i]} -> {docs[i + 1]})",
            )


class IndexedDataset:
    """Reads a `.bin`/`.idx` pair, memory-mapping the tokens.

    Args:
        path_prefix: the path without the `.bin`/`.idx` suffix.
        multimodal: whether the index carries a per-sequence mode array (int8).

    Indexing with an int returns one sequence as a numpy array of the file's dtype (a
    `(sequence, mode)` pair when multimodal); a contiguous slice returns a list of them.

    Raises:
        FileNotFoundError: a file is missing.
        DataFormatError (a ValueError): the files are not a consistent indexed dataset.
    """

    def __init__(self, path_prefix: str, multimodal: bool = False):
        self.path_prefix = str(path_prefix)
        self.multimodal = bool(multimodal)
        self._open()

    def _open(self) -> None:
        self.index = _Index(index_file_path(self.path_prefix), self.multimodal)
        bin_path = data_file_path(self.path_prefix)
        if not os.path.isfile(bin_path):
            raise FileNotFoundError(f"{bin_path}: data file not found")
        size = os.path.getsize(bin_path)
        if size != self.index.total_bytes:
            what = "truncated" if size < self.index.total_bytes else "too long"
            raise DataFormatError(
                bin_path,
                f"{what}: {size} bytes, but {index_file_path(self.path_prefix)} describes "
                f"{self.index.total_bytes // self.index.dtype.itemsize} tokens of "
                f"{self.index.dtype.name} ({self.index.total_bytes} bytes)",
            )
        if size == 0:
            self._tokens = np.zeros(0, dtype=self.index.dtype)
        else:
            self._tokens = np.memmap(bin_path, dtype=self.index.dtype.newbyteorder("<"), mode="r")

    # Pickle the path, not the memory map (a DataLoader worker re-opens the files).
    def __getstate__(self):
        return {"path_prefix": self.path_prefix, "multimodal": self.multimodal}

    def __setstate__(self, state):
        self.path_prefix = state["path_prefix"]
        self.multimodal = state["multimodal"]
        self._open()

    def __len__(self) -> int:
        return self.index.sequence_count

    def _check_idx(self, idx: int) -> int:
        n = len(self)
        if idx < 0:
            idx += n
        if not 0 <= idx < n:
            raise IndexError(f"sequence index {idx} out of range for {n} sequences in {self.path_prefix}")
        return idx

    def __getitem__(self, idx):
        if isinstance(idx, (int, np.integer)):
            seq = self.get(int(idx))
            return (seq, self.index.sequence_modes[int(idx)]) if self.multimodal else seq
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError(f"idx: slices must be contiguous (step 1), got step {step}")
            seqs = [self.get(i) for i in range(start, stop)]
            return (seqs, self.index.sequence_modes[start:stop]) if self.multimodal else seqs
        raise TypeError(f"idx: expected an int or a slice, got {type(idx).__name__}")

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens `[offset, offset + length)` of sequence `idx` (to its end when length is None)."""
        idx = self._check_idx(int(idx))
        seq_len = int(self.index.sequence_lengths[idx])
        if length is None:
            length = seq_len - offset
        if offset < 0 or length < 0 or offset + length > seq_len:
            raise IndexError(
                f"tokens [{offset}, {offset + length}) out of range for sequence {idx} of "
                f"length {seq_len} in {self.path_prefix}"
            )
        start = int(self.index.sequence_pointers[idx]) // self.index.dtype.itemsize + offset
        return np.asarray(self._tokens[start : start + length])

    @property
    def dtype(self) -> np.dtype:
        return self.index.dtype

    @property
    def sequence_lengths(self) -> np.ndarray:
        return self.index.sequence_lengths

    @property
    def sequence_pointers(self) -> np.ndarray:
        return self.index.sequence_pointers

    @property
    def document_indices(self) -> np.ndarray:
        return self.index.document_indices

    @property
    def sequence_modes(self) -> Optional[np.ndarray]:
        return self.index.sequence_modes

    @property
    def num_documents(self) -> int:
        return self.index.document_count - 1

    @property
    def num_tokens(self) -> int:
        return self.index.total_bytes // self.index.dtype.itemsize

    @staticmethod
    def exists(path_prefix: str) -> bool:
        return os.path.isfile(index_file_path(path_prefix)) and os.path.isfile(
            data_file_path(path_prefix)
        )


class IndexedDatasetBuilder:
    """Writes a `.bin` file sequence by sequence and its `.idx` at `finalize`.

    Args:
        bin_path: the `.bin` file to write (created or truncated).
        dtype: the token dtype, one of DTYPE_CODES' (default int32, as Megatron's builder).
        multimodal: whether to store a mode (int8) per sequence.

    Usage: `add_item` + `end_document` per sequence/document (or `add_document` at once),
    `add_index` to append a whole dataset, then `finalize(idx_path)`.
    Values that do not fit the dtype raise ValueError (they would wrap silently otherwise).
    """

    def __init__(self, bin_path: str, dtype=np.int32, multimodal: bool = False):
        code_from_dtype(dtype)
        self.dtype = np.dtype(dtype)
        self.multimodal = bool(multimodal)
        self.bin_path = str(bin_path)
        self._file = open(self.bin_path, "wb")
        self.sequence_lengths: list = []
        self.document_indices: list = [0]
        self.sequence_modes: Optional[list] = [] if multimodal else None

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, *exc) -> None:
        if not self._file.closed:
            self._file.close()

    def _as_array(self, tokens: ArrayLike, name: str) -> np.ndarray:
        if hasattr(tokens, "detach"):  # a torch tensor
            tokens = tokens.detach().cpu().numpy()
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            arr = arr.reshape(-1)
        if arr.size and self.dtype.kind in "iu":
            if arr.dtype.kind not in "iub":
                raise TypeError(
                    f"{name}: expected integer token ids for dtype {self.dtype.name}, got {arr.dtype}"
                )
            info = np.iinfo(self.dtype)
            lo, hi = arr.min(), arr.max()
            if lo < info.min or hi > info.max:
                raise ValueError(
                    f"{name}: values in [{lo}, {hi}] do not fit dtype {self.dtype.name} "
                    f"([{info.min}, {info.max}]); pick a wider dtype"
                )
        return arr.astype(self.dtype.newbyteorder("<"), copy=False)

    def add_item(self, tokens: ArrayLike, mode: int = 0) -> None:
        """Appends one sequence (ends no document)."""
        arr = self._as_array(tokens, "tokens")
        self._file.write(arr.tobytes(order="C"))
        self.sequence_lengths.append(int(arr.size))
        if self.multimodal:
            self.sequence_modes.append(int(mode))

    def end_document(self) -> None:
        """Marks the sequences added since the last boundary as one document."""
        self.document_indices.append(len(self.sequence_lengths))

    def add_document(
        self, tokens: ArrayLike, lengths: Iterable[int], modes: Optional[Iterable[int]] = None
    ) -> None:
        """Appends a document made of sequences of `lengths` (summing to len(tokens))."""
        arr = self._as_array(tokens, "tokens")
        lengths = [int(x) for x in lengths]
        if any(x < 0 for x in lengths) or sum(lengths) != arr.size:
            raise ValueError(
                f"lengths: expected non-negative lengths summing to the {arr.size} tokens, got {lengths}"
            )
        self._file.write(arr.tobytes(order="C"))
        self.sequence_lengths.extend(lengths)
        self.document_indices.append(len(self.sequence_lengths))
        if self.multimodal:
            modes = [0] * len(lengths) if modes is None else [int(m) for m in modes]
            if len(modes) != len(lengths):
                raise ValueError(f"modes: expected {len(lengths)} modes, got {len(modes)}")
            self.sequence_modes.extend(modes)

    def add_index(self, path_prefix: str) -> None:
        """Appends every sequence and document of another dataset of the same dtype."""
        other = IndexedDataset(path_prefix, multimodal=self.multimodal)
        if other.dtype != self.dtype:
            raise ValueError(
                f"path_prefix: {path_prefix} holds {other.dtype.name} tokens, this builder writes "
                f"{self.dtype.name}"
            )
        base = len(self.sequence_lengths)
        self.sequence_lengths.extend(int(x) for x in other.sequence_lengths)
        self.document_indices.extend(int(x) + base for x in other.document_indices[1:])
        if self.multimodal:
            self.sequence_modes.extend(int(x) for x in other.sequence_modes)
        with open(data_file_path(path_prefix), "rb") as f:
            while chunk := f.read(1 << 24):
                self._file.write(chunk)

    def finalize(self, idx_path: str) -> None:
        """Closes the `.bin` and writes the `.idx`."""
        self._file.close()
        write_index(
            idx_path,
            self.dtype,
            self.sequence_lengths,
            self.document_indices,
            self.sequence_modes,
        )


def write_index(
    idx_path: str,
    dtype,
    sequence_lengths: Sequence[int],
    document_indices: Sequence[int],
    sequence_modes: Optional[Sequence[int]] = None,
) -> None:
    """Writes an `.idx` file for sequences stored back to back in a `.bin` of `dtype`."""
    dtype = np.dtype(dtype)
    code = code_from_dtype(dtype)
    lengths = np.asarray(sequence_lengths, dtype=np.int64)
    if lengths.size and (lengths.min() < 0 or lengths.max() > np.iinfo(np.int32).max):
        raise ValueError("sequence_lengths: expected lengths in [0, 2**31 - 1]")
    pointers = np.zeros(lengths.size, dtype=np.int64)
    np.cumsum(lengths[:-1] * dtype.itemsize, out=pointers[1:])
    docs = np.asarray(document_indices, dtype=np.int64)
    if docs.size == 0 or docs[0] != 0 or docs[-1] != lengths.size or (np.diff(docs) < 0).any():
        raise ValueError(
            f"document_indices: expected a non-decreasing list from 0 to {lengths.size}, got "
            f"{docs[:5].tolist()}{'...' if docs.size > 5 else ''}"
        )
    with open(idx_path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", VERSION))
        f.write(struct.pack("<B", code))
        f.write(struct.pack("<QQ", lengths.size, docs.size))
        f.write(lengths.astype("<i4").tobytes())
        f.write(pointers.astype("<i8").tobytes())
        f.write(docs.astype("<i8").tobytes())
        if sequence_modes is not None:
            modes = np.asarray(sequence_modes, dtype=np.int64)
            if modes.size != lengths.size:
                raise ValueError(f"sequence_modes: expected {lengths.size} modes, got {modes.size}")
            f.write(modes.astype(np.int8).tobytes())


def write_documents(path_prefix: str, documents: Iterable[ArrayLike], dtype=np.uint16) -> None:
    """Writes `documents` (one sequence each) as the dataset `path_prefix`.{bin,idx}."""
    with IndexedDatasetBuilder(data_file_path(path_prefix), dtype=dtype) as builder:
        for doc in documents:
            builder.add_item(doc)
            builder.end_document()
        builder.finalize(index_file_path(path_prefix))
