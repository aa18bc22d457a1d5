"""The eager dispatch of the custom ops (megablocks/ops/_eager.py): the same results as the
custom op itself, forward and backward, and the fast path really taken on this torch."""

import importlib

import torch

from megablocks.ops._eager import EagerOp
from tests.utils import assert_equal

# The modules, not the functions of the same names that megablocks.ops exports.
activation, gmm, permute, replicate, routing, sparse, topology = (
    importlib.import_module(f"megablocks.ops.{m}")
    for m in ("activation", "gmm", "permute", "replicate", "routing", "sparse", "topology")
)

WRAPPED = {
    "gmm": gmm._grouped_mm, "gmm_product": gmm._product,
    "route": permute._route, "gather_rows": permute._gather_rows, "scatter_rows": permute._scatter_rows,
    "weight_grad": permute._weight_grad, "histogram": routing._histogram_op,
    "small_routing": routing._small_routing_op, "replicate": replicate._replicate_op,
    "sdd": sparse._sdd_op, "dsd": sparse._dsd_op, "dds": sparse._dds_op,
    "topology": topology._topology_op, "glu": activation._glu,
}
WITH_BACKWARD = {"gmm", "gather_rows", "scatter_rows", "replicate", "sdd", "dsd", "dds", "glu"}


def test_every_op_takes_the_fast_path():
    """Every op is registered through `custom_op` (megablocks/ops/_eager.py), which keeps its
    function and autograd itself, so eager calls skip the dispatcher."""
    for name, op in WRAPPED.items():
        assert isinstance(op, EagerOp), name
        assert op._impl is not None, name
        assert (op._function is not None) == (name in WITH_BACKWARD), name


def test_eager_equals_the_custom_op(device):
    """gmm through the eager path and through torch.ops.megablocks.gmm: same output and gradients."""
    sizes = torch.tensor([3, 0, 5], dtype=torch.int32, device=device)
    grads = []
    for call in (gmm._grouped_mm, torch.ops.megablocks.gmm):
        torch.manual_seed(0)
        a = torch.randn(8, 16, device=device, requires_grad=True)
        b = torch.randn(3, 16, 8, device=device, requires_grad=True)
        (out,) = call(a, b, None, sizes, None, None, 1, False, "triton")
        out.backward(torch.ones_like(out))
        grads.append((out.detach(), a.grad, b.grad))
    for name, x, y in zip(("out", "grad a", "grad b"), *grads):
        assert_equal(name, x, y)
