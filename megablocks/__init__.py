"""megablocks: block-sparse, dropless Mixture-of-Experts kernels for PyTorch, written in Triton.

Importing the package never touches CUDA; kernels compile on first use.
"""

from megablocks import ops
from megablocks.layers.arguments import Arguments
from megablocks.layers.dmoe import ParallelDroplessMLP, dMoE
from megablocks.layers.glu import SparseGLU
from megablocks.layers.mlp import MLP, SparseMLP
from megablocks.layers.moe import MoE, ParallelMLP, get_load_balancing_loss

__version__ = "0.1.0"

__all__ = [
    "MLP",
    "Arguments",
    "MoE",
    "ParallelDroplessMLP",
    "ParallelMLP",
    "SparseGLU",
    "SparseMLP",
    "dMoE",
    "get_load_balancing_loss",
    "ops",
    "__version__",
]
