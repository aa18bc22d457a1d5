"""MegaBlocks' `megablocks.ops.gather` module: token rows in expert order.

The op lives with its family in `megablocks.ops.permute` (reference, kernels and tests in one
place); this module keeps MegaBlocks' import path.
"""

from megablocks.ops.permute import gather

__all__ = ["gather"]
