"""MegaBlocks' `megablocks.ops.sum` module: a sum over one dimension.

The op lives with its family in `megablocks.ops.replicate` (reference, kernels and tests in one
place); this module keeps MegaBlocks' import path.
"""

from megablocks.ops.replicate import sum

__all__ = ["sum"]
