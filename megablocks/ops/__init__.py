"""Autograd-aware ops, one family per file, each with a plain-torch reference.

The names and argument order follow MegaBlocks 0.10, so code written against it keeps working.
"""

from megablocks.ops.activation import glu
from megablocks.ops.expert_bias import add_expert_bias
from megablocks.ops.experts import glu_experts
from megablocks.ops.gmm import gmm, gmm_gathered, gmm_shared_input, gmm_shared_input_gathered
from megablocks.ops.permute import gather_routed, route, scatter_routed
from megablocks.ops.routing import padded_rows_bound, routing_metadata
from megablocks.ops.sparse import dds, dsd, dsd_data, sdd, sdd_data
from megablocks.ops.topology import make_topology

# MegaBlocks' ops, through MegaBlocks' per-op modules (which re-export them from their families):
# importing each module here first binds the package's attribute to the function afterwards, so a
# later `import megablocks.ops.sort` leaves `megablocks.ops.sort` the function.
from megablocks.ops.binned_gather import binned_gather  # noqa: E402
from megablocks.ops.binned_scatter import binned_scatter  # noqa: E402
from megablocks.ops.cumsum import exclusive_cumsum, inclusive_cumsum  # noqa: E402
from megablocks.ops.gather import gather  # noqa: E402
from megablocks.ops.histogram import histogram  # noqa: E402
from megablocks.ops.padded_gather import padded_gather  # noqa: E402
from megablocks.ops.padded_scatter import padded_scatter  # noqa: E402
from megablocks.ops.repeat import repeat  # noqa: E402
from megablocks.ops.replicate import replicate  # noqa: E402
from megablocks.ops.round_up import round_up  # noqa: E402
from megablocks.ops.scatter import scatter  # noqa: E402
from megablocks.ops.sort import sort  # noqa: E402
from megablocks.ops.sum import sum  # noqa: E402
from megablocks.ops.topology import topology  # noqa: E402

__all__ = [
    "add_expert_bias",
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
