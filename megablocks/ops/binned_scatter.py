"""MegaBlocks' `megablocks.ops.binned_scatter` module: the inverse of `binned_gather`, weighted and summed over each token"s choices.

The op lives with its family in `megablocks.ops.permute` (reference, kernels and tests in one
place); this module keeps MegaBlocks' import path.
"""

from megablocks.ops.permute import binned_scatter

__all__ = ["binned_scatter"]
