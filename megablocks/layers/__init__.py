"""The MoE layers users put into their models, with MegaBlocks' module paths and names.

    from megablocks.layers.arguments import Arguments
    from megablocks.layers.dmoe import dMoE     # dropless: block-sparse or grouped GEMM experts
    from megablocks.layers.moe import MoE       # capacity factor, tokens past capacity dropped
"""

from megablocks.layers.arguments import Arguments
from megablocks.layers.dmoe import dMoE
from megablocks.layers.losses import MoELossCollector
from megablocks.layers.moe import MoE

__all__ = ["Arguments", "MoE", "MoELossCollector", "dMoE"]
