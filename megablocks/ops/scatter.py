"""MegaBlocks' `megablocks.ops.scatter` module: the inverse of `gather`, weighted and summed over each token"s choices.

The op lives with its family in `megablocks.ops.permute` (reference, kernels and tests in one
place); this module keeps MegaBlocks' import path.
"""

from megablocks.ops.permute import scatter

__all__ = ["scatter"]
