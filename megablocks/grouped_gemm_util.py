"""MegaBlocks' `grouped_gemm_util`: whether the `grouped_gemm` package is installed, and its ops.

    from megablocks import grouped_gemm_util as gg
    gg.grouped_gemm_is_available()             # the package (`pip install megablocks[gg]`) imports
    gg.ops.gmm(x, w, batch_sizes, trans_b=True) # a differentiable grouped GEMM
    gg.backend.gmm(a, b, batch_sizes, trans_a, trans_b)  # the same without autograd

`ops` and `backend` are the package's own modules where it is installed. Where it is not, they are
this library's equivalents (`megablocks.ops.gmm`, the Triton kernels; batch sizes on the host or
the device), so code written against MegaBlocks' `gg.ops.gmm` runs either way; only
`assert_grouped_gemm_is_available()` insists on the package itself.
"""

import types

try:
    import grouped_gemm
except ImportError:
    grouped_gemm = None


def grouped_gemm_is_available() -> bool:
    """Whether the `grouped_gemm` package imports."""
    return grouped_gemm is not None


def assert_grouped_gemm_is_available() -> None:
    """Raises an AssertionError (as MegaBlocks does) that says how to install the package."""
    assert grouped_gemm_is_available(), (
        "the grouped_gemm package is not installed: pip install megablocks[gg] "
        "(megablocks' own grouped path runs without it: Arguments(mlp_impl='grouped', gmm_backend='triton'))"
    )


def _own_ops() -> types.SimpleNamespace:
    from megablocks.backend import gmm as gmm_backend
    from megablocks.ops.gmm import gmm

    def backend_gmm(a, b, batch_sizes, trans_a=False, trans_b=False, c=None):
        """`grouped_gemm.backend.gmm`: no autograd; `c`, if given, receives the result."""
        out = gmm_backend.gmm(a, b, batch_sizes, trans_a, trans_b)
        return out if c is None else c.copy_(out)

    def ops_gmm(a, b, batch_sizes, trans_b=False):
        """`grouped_gemm.ops.gmm`: differentiable in a and b."""
        return gmm(a, b, batch_sizes, trans_b=trans_b)

    return types.SimpleNamespace(ops=types.SimpleNamespace(gmm=ops_gmm),
                                 backend=types.SimpleNamespace(gmm=backend_gmm))


if grouped_gemm is not None:
    backend = grouped_gemm.backend
    ops = grouped_gemm.ops
else:
    _own = _own_ops()
    backend, ops = _own.backend, _own.ops
