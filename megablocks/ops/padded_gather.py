"""MegaBlocks' `megablocks.ops.padded_gather` module: token rows in expert order, each expert"s rows padded to a block multiple.

The op lives with its family in `megablocks.ops.permute` (reference, kernels and tests in one
place); this module keeps MegaBlocks' import path.
"""

from megablocks.ops.permute import padded_gather

__all__ = ["padded_gather"]
