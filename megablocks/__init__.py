"""megablocks: block-sparse, dropless Mixture-of-Experts kernels for PyTorch, written in Triton.

Importing the package never touches CUDA; kernels compile on first use.
"""

from megablocks import ops

__version__ = "0.1.0"

__all__ = ["ops", "__version__"]
