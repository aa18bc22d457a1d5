"""MegaBlocks' `megablocks.ops.round_up` module: counts rounded up to a multiple.

The op lives with its family in `megablocks.ops.routing` (reference, kernels and tests in one
place); this module keeps MegaBlocks' import path.
"""

from megablocks.ops.routing import round_up

__all__ = ["round_up"]
