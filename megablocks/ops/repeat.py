"""MegaBlocks' `megablocks.ops.repeat` module: `x.repeat(tiling)`.

The op lives with its family in `megablocks.ops.replicate` (reference, kernels and tests in one
place); this module keeps MegaBlocks' import path.
"""

from megablocks.ops.replicate import repeat

__all__ = ["repeat"]
