"""MegaBlocks' `megablocks.ops.sort` module: stable sort of expert ids.

The op lives with its family in `megablocks.ops.routing` (reference, kernels and tests in one
place); this module keeps MegaBlocks' import path.
"""

from megablocks.ops.routing import sort

__all__ = ["sort"]
