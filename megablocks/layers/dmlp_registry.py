"""The dMoE expert MLP for an `Arguments`: `mlp_type` x `mlp_impl`."""

from typing import Union

from megablocks.layers import glu, mlp
from megablocks.layers.arguments import Arguments

REGISTRY = {
    "mlp": {"sparse": mlp.SparseMLP, "grouped": mlp.GroupedMLP},
    "glu": {"sparse": glu.SparseGLU, "grouped": glu.GroupedGLU},
}


def get(args: Arguments) -> Union[mlp.SparseMLP, glu.SparseGLU]:
    """Builds the dMoE expert MLP `args` asks for (Arguments has validated both names)."""
    return REGISTRY[args.mlp_type][args.mlp_impl](args)
