"""Autograd-aware ops, one family per file, each with a plain-torch reference.

The names and argument order follow MegaBlocks 0.10, so code written against it keeps working.
"""

from megablocks.ops.activation import glu
from megablocks.ops.experts import glu_experts
from megablocks.ops.gmm import gmm, gmm_gathered, gmm_shared_input, gmm_shared_input_gathered
from megablocks.ops.permute import (
    binned_gather,
    binned_scatter,
    gather,
    gather_routed,
    padded_gather,
    padded_scatter,
    route,
    scatter,
    scatter_routed,
)
from megablocks.ops.replicate import repeat, replicate, sum
from megablocks.ops.routing import (
    exclusive_cumsum,
    histogram,
    inclusive_cumsum,
    padded_rows_bound,
    round_up,
    routing_metadata,
    sort,
)
from megablocks.ops.sparse import dds, dsd, dsd_data, sdd, sdd_data
from megablocks.ops.topology import make_topology, topology

__all__ = [
    "dds",
    "glu",
    "glu_experts",
    "dsd",
    "dsd_data",
    "gmm",
    "gmm_gathered",
    "gmm_shared_input",
    "gmm_shared_input_gathered",
    "sdd",
    "sdd_data",
    "binned_gather",
    "binned_scatter",
    "gather",
    "gather_routed",
    "padded_gather",
    "padded_scatter",
    "route",
    "scatter",
    "scatter_routed",
    "exclusive_cumsum",
    "histogram",
    "inclusive_cumsum",
    "make_topology",
    "padded_rows_bound",
    "repeat",
    "replicate",
    "round_up",
    "routing_metadata",
    "sort",
    "sum",
    "topology",
]
