"""Megatron-format data: the indexed dataset (.bin/.idx), preprocessing, and GPT samples."""

from exp.data.indexed_dataset import (
    DTYPE_CODES,
    DataFormatError,
    IndexedDataset,
    IndexedDatasetBuilder,
    code_from_dtype,
    dtype_from_code,
    optimal_dtype,
)

__all__ = [
    "DTYPE_CODES",
    "DataFormatError",
    "IndexedDataset",
    "IndexedDatasetBuilder",
    "code_from_dtype",
    "dtype_from_code",
    "optimal_dtype",
]
