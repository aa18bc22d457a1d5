"""MegaBlocks' `megablocks.ops.padded_scatter` module: the inverse of `padded_gather`, weighted and summed over each token"s choices.

The op lives with its family in `megablocks.ops.permute` (reference, kernels and tests in one
place); this module keeps MegaBlocks' import path.
"""

from megablocks.ops.permute import padded_scatter

__all__ = ["padded_scatter"]
