"""MegaBlocks' `megablocks.ops.histogram` module: counts of each expert id.

The op lives with its family in `megablocks.ops.routing` (reference, kernels and tests in one
place); this module keeps MegaBlocks' import path.
"""

from megablocks.ops.routing import histogram

__all__ = ["histogram"]
