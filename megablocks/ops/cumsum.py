"""MegaBlocks' `megablocks.ops.cumsum` module: cumulative sums of integer counts.

The op lives with its family in `megablocks.ops.routing` (reference, kernels and tests in one
place); this module keeps MegaBlocks' import path.
"""

from megablocks.ops.routing import exclusive_cumsum, inclusive_cumsum

__all__ = ["exclusive_cumsum", "inclusive_cumsum"]
