"""GPT pretraining samples over an indexed dataset, sample for sample as Megatron builds them.

The documents of a split are laid end to end in a seeded random order, once per epoch (as many
epochs as `num_samples` needs), and cut into samples of `sequence_length + 1` tokens: sample i
covers stream tokens [i·L, i·L + L], so consecutive samples share one token and a sample may span
documents. The samples are then visited in a seeded random order. The seeds, the shuffles (one
`numpy.random.RandomState(seed)` drawn in Megatron's order: document order first, then sample
order, the last epoch apart when it is used below 80 %) and the split rule are Megatron's, so the
same data, seed, sequence length and sample count give the same batches as Megatron's GPTDataset.

Shape legend: D documents in the split, S samples, L sequence length.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from exp.data.indexed_dataset import DataFormatError, IndexedDataset, index_file_path

# Megatron keeps the last epoch out of the global shuffle when less than this fraction of it is used.
_SEPARATE_LAST_EPOCH_BELOW = 0.80


def parse_split(split: Union[str, Sequence[float]]) -> List[float]:
    """'969,30,1' (or '98/2/0', or [0.9, 0.1]) -> the train, valid, test weights, summing to 1."""
    if isinstance(split, str):
        parts = [x for x in split.replace("/", ",").split(",") if x.strip()]
        try:
            weights = [float(x) for x in parts]
        except ValueError:
            raise ValueError(f"split: expected comma-separated numbers like '969,30,1', got {split!r}") from None
    else:
        weights = [float(x) for x in split]
    if not weights or len(weights) > 3 or any(not w >= 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"split: expected 1 to 3 non-negative weights with a positive sum, got {split!r}")
    weights += [0.0] * (3 - len(weights))
    return (np.array(weights, dtype=np.float64) / np.sum(weights)).tolist()


def split_ranges(num_documents: int, split: Union[str, Sequence[float]]) -> List[Tuple[int, int]]:
    """Document ranges [begin, end) of the train, valid and test splits.

    Megatron's rule: the bounds are the cumulative weights times the document count, rounded.
    """
    bounds = [0.0]
    for w in parse_split(split):
        bounds.append(bounds[-1] + w)
    edges = [int(round(b * float(num_documents))) for b in bounds]
    return [(edges[i], edges[i + 1]) for i in range(3)]


def build_sample_index(
    lengths_D: np.ndarray, document_index: np.ndarray, sequence_length: int, num_samples: int
) -> np.ndarray:
    """[S + 1, 2] (position in document_index, token offset) of each sample's first token.

    Sample i starts at stream token i·L, where the stream is the documents of `document_index` end
    to end; the entry names the document holding that token (never an empty one, except the
    first entry, always (0, 0)).
    """
    seq_lengths = lengths_D[document_index].astype(np.int64)
    ends = np.cumsum(seq_lengths)
    starts_tok = np.arange(num_samples + 1, dtype=np.int64) * sequence_length
    assert num_samples == 0 or starts_tok[-1] < ends[-1], "sample start beyond the stream"
    doc_pos = np.searchsorted(ends, starts_tok, side="right")
    offsets = starts_tok - (ends[doc_pos] - seq_lengths[doc_pos])
    doc_pos[0] = offsets[0] = 0  # as Megatron, the first sample starts at position 0 even if empty
    return np.stack([doc_pos, offsets], axis=1)


def _shuffled_range(begin: int, end: int, rng: np.random.RandomState) -> np.ndarray:
    dtype = np.uint32 if end < np.iinfo(np.uint32).max - 1 else np.int64
    out = np.arange(begin, end, dtype=dtype)
    rng.shuffle(out)
    return out


class GPTDataset(torch.utils.data.Dataset):
    """Samples of `sequence_length + 1` tokens from the documents `document_ids` of `indexed`.

    Args:
        indexed: the token data; one sequence per document, integer dtype.
        document_ids: the documents of this split (e.g. `np.arange(begin, end)`).
        sequence_length: L, tokens per sample input (a sample reads L + 1 tokens).
        num_samples: samples to provide; None gives one epoch. More than an epoch repeats the
            documents in a fresh order per epoch.
        seed: the shuffling seed.
        name: the split's name, for messages.
        vocab_size: when given, every sample's ids are checked to lie in [0, vocab_size).

    Item i: {'tokens': int64[L], 'labels': int64[L]} with labels = tokens shifted by one.

    Raises:
        ValueError: no documents, or fewer tokens than one sample needs; a float dtype; the
            documents are not one sequence each. Messages name the data file.
    """

    def __init__(
        self,
        indexed: IndexedDataset,
        document_ids: np.ndarray,
        sequence_length: int,
        num_samples: Optional[int] = None,
        seed: int = 1234,
        name: str = "train",
        vocab_size: Optional[int] = None,
    ):
        self.indexed = indexed
        self.name = name
        self.vocab_size = vocab_size
        self.sequence_length = int(sequence_length)
        path = index_file_path(indexed.path_prefix)
        if self.sequence_length < 1:
            raise ValueError(f"sequence_length: expected >= 1, got {sequence_length}")
        if indexed.dtype.kind not in "iu":
            raise DataFormatError(path, f"holds {indexed.dtype.name} values, not integer token ids")
        if len(indexed) != indexed.num_documents:
            raise DataFormatError(
                path,
                f"{len(indexed)} sequences in {indexed.num_documents} documents; GPT data needs one "
                "sequence per document",
            )
        document_ids = np.asarray(document_ids, dtype=np.int64)
        if document_ids.size == 0:
            raise ValueError(
                f"{path}: the {name} split has no documents (the dataset has "
                f"{indexed.num_documents}); change the split or add documents"
            )
        if document_ids.min() < 0 or document_ids.max() >= len(indexed):
            raise ValueError(f"document_ids: expected ids in [0, {len(indexed)}) for {path}")

        lengths = indexed.sequence_lengths
        tokens_per_epoch = int(lengths[document_ids].astype(np.int64).sum())
        need = self.sequence_length + 1
        if tokens_per_epoch < need:
            longest = int(lengths[document_ids].max())
            raise ValueError(
                f"{path}: sequence length {self.sequence_length} needs {need} tokens per sample, "
                f"but the {name} split has only {tokens_per_epoch} tokens in {document_ids.size} "
                f"documents (the longest has {longest}); lower the sequence length or add data"
            )
        samples_per_epoch = (tokens_per_epoch - 1) // self.sequence_length
        if num_samples is None:
            num_samples = samples_per_epoch
        if num_samples < 0:
            raise ValueError(f"num_samples: expected >= 0, got {num_samples}")
        num_epochs = 1
        while num_epochs * tokens_per_epoch < num_samples * self.sequence_length + 1:
            num_epochs += 1

        separate_last = False
        if num_epochs > 1:
            before_last = ((num_epochs - 1) * tokens_per_epoch - 1) // self.sequence_length
            separate_last = (num_samples - before_last) < int(
                _SEPARATE_LAST_EPOCH_BELOW * samples_per_epoch
            )

        rng = np.random.RandomState(seed)
        ids32 = document_ids.astype(np.int32)
        if separate_last:
            first = np.tile(ids32, num_epochs - 1)
            rng.shuffle(first)
            last = ids32.copy()
            rng.shuffle(last)
            self.document_index = np.concatenate([first, last])
        else:
            self.document_index = np.tile(ids32, num_epochs)
            rng.shuffle(self.document_index)

        total_samples = (num_epochs * tokens_per_epoch - 1) // self.sequence_length
        self.sample_index = build_sample_index(
            np.asarray(lengths), self.document_index, self.sequence_length, total_samples
        )
        if separate_last:
            self.shuffle_index = np.concatenate(
                [_shuffled_range(0, before_last, rng), _shuffled_range(before_last, total_samples, rng)]
            )
        else:
            self.shuffle_index = _shuffled_range(0, total_samples, rng)
        self.num_samples = int(num_samples)
        self.num_epochs = num_epochs

    def __len__(self) -> int:
        return self.num_samples

    def sample_tokens(self, idx: int) -> np.ndarray:
        """The L + 1 token ids of sample `idx` (int64)."""
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range for the {self.num_samples} samples of {self.name}")
        j = int(self.shuffle_index[idx])
        (beg_doc, beg_off), (end_doc, end_off) = self.sample_index[j], self.sample_index[j + 1]
        parts = []
        for pos in range(int(beg_doc), int(end_doc) + 1):
            doc = int(self.document_index[pos])
            offset = int(beg_off) if pos == beg_doc else 0
            stop = int(end_off) + 1 if pos == end_doc else int(self.indexed.sequence_lengths[doc])
            parts.append(self.indexed.get(doc, offset, stop - offset))
        text = np.concatenate(parts).astype(np.int64)
        assert text.size == self.sequence_length + 1, (idx, text.size)
        if self.vocab_size is not None and (text.min() < 0 or text.max() >= self.vocab_size):
            raise ValueError(
                f"{index_file_path(self.indexed.path_prefix)}: sample {idx} of {self.name} holds "
                f"token ids in [{text.min()}, {text.max()}], outside the model's vocabulary "
                f"[0, {self.vocab_size}); the data was tokenized for another vocabulary"
            )
        return text

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        text = torch.from_numpy(self.sample_tokens(int(idx)))
        return {"tokens": text[:-1].contiguous(), "labels": text[1:].contiguous()}


def build_datasets(
    path_prefix: str,
    sequence_length: int,
    split: Union[str, Sequence[float]] = "969,30,1",
    num_samples: Sequence[Optional[int]] = (None, None, None),
    seed: int = 1234,
    vocab_size: Optional[int] = None,
) -> List[Optional[GPTDataset]]:
    """The train, valid and test GPTDatasets of one indexed dataset.

    `num_samples` per split: None gives one epoch, 0 skips the split (None in the result). An
    empty valid or test split is skipped too.

    Raises:
        ValueError: the dataset has no documents, the train split is empty or smaller than one
            sample (messages name the file).
    """
    indexed = IndexedDataset(path_prefix)
    if indexed.num_documents == 0:
        raise ValueError(f"{index_file_path(path_prefix)}: the dataset has no documents")
    out: List[Optional[GPTDataset]] = []
    ranges = split_ranges(indexed.num_documents, split)
    for (begin, end), n, name in zip(ranges, num_samples, ("train", "valid", "test")):
        if n == 0 or (begin == end and name != "train"):
            out.append(None)
            continue
        out.append(
            GPTDataset(indexed, np.arange(begin, end), sequence_length, n, seed, name, vocab_size)
        )
    return out
