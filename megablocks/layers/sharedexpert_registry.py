"""The shared expert for an `Arguments`: `SharedMLP` or `SharedGLU` by `mlp_type`."""

from typing import Union

from megablocks.layers import glu, mlp
from megablocks.layers.arguments import Arguments

REGISTRY = {"mlp": mlp.SharedMLP, "glu": glu.SharedGLU}


def get(args: Arguments) -> Union[mlp.SharedMLP, glu.SharedGLU]:
    """Builds the shared expert `args` asks for."""
    return REGISTRY[args.mlp_type](args)
