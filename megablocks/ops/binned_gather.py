"""MegaBlocks' `megablocks.ops.binned_gather` module: token rows in expert order with a fixed capacity per expert.

The op lives with its family in `megablocks.ops.permute` (reference, kernels and tests in one
place); this module keeps MegaBlocks' import path.
"""

from megablocks.ops.permute import binned_gather

__all__ = ["binned_gather"]
