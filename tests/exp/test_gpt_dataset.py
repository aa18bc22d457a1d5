"""GPT samples over documents: the same samples as megatron-core's GPTDataset, and clear errors."""

import warnings

import numpy as np
import pytest

from exp.data.gpt_dataset import GPTDataset, build_datasets, build_sample_index, parse_split, split_ranges
from exp.data.indexed_dataset import DataFormatError, IndexedDataset, IndexedDatasetBuilder, write_documents

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    megatron_gpt = pytest.importorskip("megatron.core.datasets.gpt_dataset")
    from megatron.core.datasets import helpers as megatron_helpers
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexed
    from megatron.core.datasets.utils import Split


class _Tokenizer:
    """What megatron's GPTDataset reads from a tokenizer."""

    vocab_size = 300
    eod = 256
    pad = -1
    unique_identifiers = {"name": "bytes"}


def _random_docs(rng, n_docs, max_len, zero_fraction=0.15):
    docs = []
    for _ in range(n_docs):
        n = 0 if rng.random() < zero_fraction else int(rng.integers(1, max_len))
        docs.append(rng.integers(0, 256, size=n))
    return docs


@pytest.fixture
def corpus(tmp_path):
    prefix = str(tmp_path / "corpus")
    write_documents(prefix, _random_docs(np.random.default_rng(1), 40, 50))
    return prefix


def _megatron_dataset(prefix, doc_ids, seq_len, num_samples, seed):
    config = megatron_gpt.GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_len, blend=None, split="1", tokenizer=_Tokenizer(),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False, path_to_cache=None,
        create_attention_mask=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return megatron_gpt.GPTDataset(MegatronIndexed(prefix), prefix, doc_ids.astype(np.int32), num_samples, Split.train, config)


# num_samples: one epoch, part of one, two epochs with the last kept apart (< 80 % used) and
# with it shuffled in, and many epochs.
@pytest.mark.parametrize("num_samples", [None, 7, 60, 100, 400])
@pytest.mark.parametrize("seq_len, seed", [(16, 3), (5, 1234)])
def test_samples_match_megatron(corpus, num_samples, seq_len, seed):
    doc_ids = np.arange(4, 37)
    ours = GPTDataset(IndexedDataset(corpus), doc_ids, seq_len, num_samples, seed)
    theirs = _megatron_dataset(corpus, doc_ids, seq_len, num_samples, seed)
    np.testing.assert_array_equal(ours.document_index, theirs.document_index)
    np.testing.assert_array_equal(ours.sample_index, theirs.sample_index)
    np.testing.assert_array_equal(ours.shuffle_index, theirs.shuffle_index)
    assert len(ours) == (len(theirs) if num_samples is None else num_samples)
    for i in range(len(ours)):
        a, b = ours[i], theirs[i]
        np.testing.assert_array_equal(a["tokens"].numpy(), b["tokens"].numpy(), err_msg=f"sample {i}")
        np.testing.assert_array_equal(a["labels"].numpy(), b["labels"].numpy(), err_msg=f"sample {i}")


@pytest.mark.parametrize("seed", range(5))
def test_sample_index_matches_megatron_helper(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 30, size=50).astype(np.int32)
    lengths[rng.integers(0, 50, size=10)] = 0
    doc_index = rng.permutation(np.tile(np.arange(50, dtype=np.int32), 3))
    seq_len = int(rng.integers(2, 40))
    tokens = int(lengths.sum())
    num_samples = (3 * tokens - 1) // seq_len
    theirs = megatron_helpers.build_sample_idx(lengths, doc_index, seq_len, 3, tokens, True, 1)
    np.testing.assert_array_equal(build_sample_index(lengths, doc_index, seq_len, num_samples), theirs)


def test_samples_are_consecutive_windows_of_the_shuffled_stream(corpus):
    ds = GPTDataset(IndexedDataset(corpus), np.arange(40), 8, 50, seed=5)
    indexed = IndexedDataset(corpus)
    stream = np.concatenate([indexed[int(d)] for d in ds.document_index])
    for i in range(len(ds)):
        j = int(ds.shuffle_index[i])
        np.testing.assert_array_equal(ds.sample_tokens(i), stream[j * 8 : j * 8 + 9])
    assert sorted(ds.shuffle_index[: len(ds)].tolist()) != list(range(len(ds)))  # visited shuffled


def test_seed_changes_the_order_only(corpus):
    a = GPTDataset(IndexedDataset(corpus), np.arange(40), 8, None, seed=1)
    b = GPTDataset(IndexedDataset(corpus), np.arange(40), 8, None, seed=2)
    assert len(a) == len(b)
    assert not np.array_equal(a.document_index, b.document_index)
    np.testing.assert_array_equal(np.sort(a.document_index), np.sort(b.document_index))


@pytest.mark.parametrize("split", ["969,30,1", "98,2,0", "1,1,1", "100", "0,1,0", "3, 1"])
@pytest.mark.parametrize("n", [1, 7, 40, 1000])
def test_split_ranges_match_megatron(split, n):
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    theirs = [(0, 0) if m is None else (int(round(m[0] * n)), int(round(m[1] * n))) for m in matrix]
    ours = split_ranges(n, split)
    assert [(b, e) for b, e in ours if e > b] == [(b, e) for b, e in theirs if e > b]
    assert ours[0][0] == 0 and ours[-1][1] == n


def test_parse_split_rejects_nonsense():
    with pytest.raises(ValueError, match="split: expected comma-separated numbers"):
        parse_split("a,b")
    with pytest.raises(ValueError, match="split: expected 1 to 3 non-negative weights"):
        parse_split("0,0,0")
    with pytest.raises(ValueError, match="split: expected 1 to 3 non-negative weights"):
        parse_split("1,-1")


def test_build_datasets_splits_documents(corpus):
    train, valid, test = build_datasets(corpus, 8, "30,10,0", (20, 5, 0), seed=1, vocab_size=300)
    assert test is None and len(train) == 20 and len(valid) == 5
    assert set(train.document_index) <= set(range(0, 30)) and set(valid.document_index) <= set(range(30, 40))


# ---------------------------------------------------------------------------------------------
# Bad data: clear errors naming the file.


def test_empty_document_list(tmp_path, corpus):
    empty = str(tmp_path / "empty")
    write_documents(empty, [])
    with pytest.raises(ValueError, match=r"empty\.idx: the dataset has no documents"):
        build_datasets(empty, 8)
    with pytest.raises(ValueError, match=r"corpus\.idx: the train split has no documents \(the dataset has 40\)"):
        GPTDataset(IndexedDataset(corpus), np.arange(0), 8)
    with pytest.raises(ValueError, match=r"corpus\.idx: the train split has no documents"):
        build_datasets(corpus, 8, "0,1,0")


def test_sequence_longer_than_the_documents(tmp_path):
    prefix = str(tmp_path / "short")
    write_documents(prefix, [np.arange(5), np.arange(3), np.arange(4)])
    with pytest.raises(
        ValueError,
        match=r"short\.idx: sequence length 64 needs 65 tokens per sample, but the train split has only "
        r"12 tokens in 3 documents \(the longest has 5\)",
    ):
        build_datasets(prefix, 64, "1")
    # Longer than every document is fine while the split holds enough tokens: samples span documents.
    ds = build_datasets(prefix, 10, "1")[0]
    assert len(ds) == 1 and ds[0]["tokens"].shape == (10,)


def test_float_data_is_not_token_ids(tmp_path):
    prefix = str(tmp_path / "floats")
    write_documents(prefix, [np.arange(50.0)], dtype=np.float32)
    with pytest.raises(DataFormatError, match=r"floats\.idx: holds float32 values, not integer token ids"):
        build_datasets(prefix, 8, "1")


def test_token_ids_outside_the_vocabulary(tmp_path):
    prefix = str(tmp_path / "wide")
    write_documents(prefix, [np.arange(100) * 7], dtype=np.int32)
    ds = build_datasets(prefix, 8, "1", vocab_size=257)[0]
    with pytest.raises(ValueError, match=r"wide\.idx: sample \d+ of train holds token ids in \[\d+, \d+\], outside the model's vocabulary \[0, 257\)"):
        for i in range(len(ds)):
            ds[i]


def test_documents_of_several_sequences_are_refused(tmp_path):
    prefix = str(tmp_path / "multi")
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    b.add_item(np.arange(10))
    b.add_item(np.arange(10))
    b.end_document()
    b.finalize(prefix + ".idx")
    with pytest.raises(DataFormatError, match=r"multi\.idx: 2 sequences in 1 documents; GPT data needs one sequence per document"):
        build_datasets(prefix, 4, "1")
