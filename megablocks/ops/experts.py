"""Gated experts without autograd, by the fewest launches: what inference runs.

Legend: T tokens, H hidden, E experts, F ffn per expert, K top-k, N = T·K routed rows.

    counts_E, maps = routing of ids_TK           one program (N <= 4096, E <= 1022: small_routing_maps),
                                                 else a key kernel, torch.sort and one kernel
                                                 (sorted_routing_maps)
    a_NF   = act(x[rows] @ w1_e^T) * (x[rows] @ v1_e^T)   one grouped GEMM: the token rows read through
                                                 the map, the GLU in its epilogue (fp32, rounded once)
    y_NH   = a_NF @ w2_e                         the down grouped GEMM

With the experts' biases (gpt-oss: b1_e, bv1_e [F], b2_e [H]) each GEMM adds its expert's bias to
the fp32 accumulator in its epilogue: `act(x w1_e^T + b1_e) * (x v1_e^T + bv1_e)`, `a w2_e + b2_e`.
    out_TH = Σ_k weights_tk · y[row of (t, k)]   the scatter, in fp32

Three launches after the routing's one (or three); no `[N, H]` gathered copy (but for wide
experts with many rows each: `KernelPolicy.gather_min_ffn`), no `[N, F]` pre-activations, no GLU kernel; no
value read on the host. The Triton kernels only (CUDA, or the interpreter).
`glu_experts` takes dMoE's layout (`w1`, `v1`, `w2` as [E, F, H]); `routed_glu_experts` is the
part after the routing, which `megablocks.integrations.inference` shares with its layouts.
"""

from typing import Optional, Tuple

import torch

from megablocks.backend.gmm import triton_gmm
from megablocks.backend.permute import gather_rows, scatter_rows
from megablocks.ops._eager import custom_op
from megablocks.ops.activation import gated_product
from megablocks.ops.routing import RowMaps, row_maps
from megablocks.policy import KernelPolicy


# The first GEMM reads a gathered copy of the token rows (TMA loads) instead of the rows through
# the map only for wide experts with many rows each (`KernelPolicy.gather_min_*`): the map is
# ahead elsewhere (benchmarks/RESULTS.md, "The routed form at every size").


def routed_glu_experts(x_TH: torch.Tensor, w1: torch.Tensor, v1: Optional[torch.Tensor], w2: torch.Tensor,
                       counts_E: torch.Tensor, maps: RowMaps, weights_N: torch.Tensor, activation: str,
                       up_trans_b: bool, down_trans_b: bool, *, gather_min_ffn: int,
                       gather_min_rows_per_expert: int, b1: Optional[torch.Tensor] = None,
                       bv1: Optional[torch.Tensor] = None, b2: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The experts after their routing: the GLU-epilogue grouped GEMM reading the token rows
    through `maps` (experts wider than `gather_min_ffn` with at least `gather_min_rows_per_expert`
    rows each: a gathered copy of them), the down GEMM, the weighted scatter (three or four
    launches). `v1` None: `w1` holds the gate's columns then the up projection's
    (`triton_gmm(..., glu=)`). `b1`, `bv1` ([E, F]; with `v1` None, `b1` [E, 2F] and `bv1` None)
    and `b2` ([E, H]), where given, are the experts' biases, added in the GEMMs' epilogues."""
    ffn = w2.shape[2] if down_trans_b else w2.shape[1]
    rows = maps.row_assignment
    bias = dict(bias=b1, bias_up=bv1)
    if ffn > gather_min_ffn and rows.numel() >= gather_min_rows_per_expert * counts_E.numel():
        x_NH = gather_rows(x_TH, maps.assignment_row, rows, None, maps.top_k)
        a_NF = triton_gmm(x_NH, w1, counts_E, trans_b=up_trans_b, glu=activation, b_up=v1, **bias)
    else:
        a_NF = triton_gmm(x_TH, w1, counts_E, trans_b=up_trans_b, a_rows=rows, rows_top_k=maps.top_k,
                          glu=activation, b_up=v1, **bias)
    y_NH = triton_gmm(a_NF, w2, counts_E, trans_b=down_trans_b, bias=b2)
    return scatter_rows(y_NH, maps.assignment_row, weights_N, maps.top_k)


def _glu_experts_impl(x_TH: torch.Tensor, w1_EFH: torch.Tensor, v1_EFH: torch.Tensor, w2_EFH: torch.Tensor,
                      ids_TK: torch.Tensor, weights_TK: torch.Tensor, activation: str, gather_min_ffn: int,
                      gather_min_rows_per_expert: int, b1_EF: Optional[torch.Tensor],
                      bv1_EF: Optional[torch.Tensor], b2_EH: Optional[torch.Tensor]
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    counts_E, maps = row_maps(ids_TK, w1_EFH.shape[0])
    out_TH = routed_glu_experts(x_TH, w1_EFH, v1_EFH, w2_EFH, counts_E, maps, weights_TK.reshape(-1), activation,
                                up_trans_b=True, down_trans_b=False, gather_min_ffn=gather_min_ffn,
                                gather_min_rows_per_expert=gather_min_rows_per_expert, b1=b1_EF, bv1=bv1_EF,
                                b2=b2_EH)
    return out_TH, counts_E


@custom_op("glu_experts")
def _glu_experts_op(x_TH: torch.Tensor, w1_EFH: torch.Tensor, v1_EFH: torch.Tensor, w2_EFH: torch.Tensor,
                    ids_TK: torch.Tensor, weights_TK: torch.Tensor, activation: str, gather_min_ffn: int,
                    gather_min_rows_per_expert: int, b1_EF: Optional[torch.Tensor],
                    bv1_EF: Optional[torch.Tensor], b2_EH: Optional[torch.Tensor]
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    return _glu_experts_impl(x_TH, w1_EFH, v1_EFH, w2_EFH, ids_TK, weights_TK, activation, gather_min_ffn,
                             gather_min_rows_per_expert, b1_EF, bv1_EF, b2_EH)


@_glu_experts_op.register_fake
def _(x_TH, w1_EFH, v1_EFH, w2_EFH, ids_TK, weights_TK, activation, gather_min_ffn, gather_min_rows_per_expert,
      b1_EF, bv1_EF, b2_EH):
    return torch.empty_like(x_TH), x_TH.new_empty((w1_EFH.shape[0],), dtype=torch.int32)


def glu_experts(x_TH: torch.Tensor, w1_EFH: torch.Tensor, v1_EFH: torch.Tensor, w2_EFH: torch.Tensor,
                ids_TK: torch.Tensor, weights_TK: torch.Tensor, activation: str, *,
                gather_min_ffn: int = KernelPolicy.gather_min_ffn,
                gather_min_rows_per_expert: int = KernelPolicy.gather_min_rows_per_expert,
                biases: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """`(out_TH, tokens_per_expert_E)`: `out[t] = Σ_k weights[t, k] · expert_{ids[t, k]}(x_t)` with
    `expert_e(x) = (act(x w1_e^T) * (x v1_e^T)) w2_e` (with `biases` `(b1, bv1, b2)`:
    `(act(x w1_e^T + b1_e) * (x v1_e^T + bv1_e)) w2_e + b2_e`), by the launches of the module
    docstring.

    No autograd, no validation (the caller's: dMoE's inference form); the Triton kernels must be
    in use for x (`megablocks.backend.use_triton`). `w1_EFH`, `v1_EFH`, `w2_EFH`: [E, F, H] in
    x's dtype; `ids_TK` integer ids in [0, E); `weights_TK` float; `activation` a name of
    `megablocks.backend.activation.ACTIVATIONS`; `gather_min_ffn`, `gather_min_rows_per_expert`:
    where the first GEMM reads a gathered copy of the token rows (`megablocks.policy.KernelPolicy`);
    `biases`: None, or `b1`, `bv1` [E, F] and `b2` [E, H] in x's dtype.
    Counts are int32. A custom op (`torch.ops.megablocks.glu_experts`) for `torch.compile`.
    """
    b1, bv1, b2 = (None, None, None) if biases is None else biases
    return _glu_experts_op(x_TH, w1_EFH, v1_EFH, w2_EFH, ids_TK, weights_TK, activation, gather_min_ffn,
                           gather_min_rows_per_expert, b1, bv1, b2)


def glu_experts_reference(x_TH: torch.Tensor, w1_EFH: torch.Tensor, v1_EFH: torch.Tensor, w2_EFH: torch.Tensor,
                          ids_TK: torch.Tensor, weights_TK: torch.Tensor, activation,
                          biases: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """The per-token, per-choice loop `glu_experts` is checked against, in float64; `activation`
    a callable (a GLU activation such as `clamped_swiglu` takes the gate and the linear branch)."""
    out = torch.zeros(x_TH.shape, dtype=torch.float64, device=x_TH.device)
    for t in range(x_TH.shape[0]):
        x = x_TH[t].double()
        for k in range(ids_TK.shape[1]):
            e = int(ids_TK[t, k])
            gate, up = w1_EFH[e].double() @ x, v1_EFH[e].double() @ x
            if biases is not None:
                gate, up = gate + biases[0][e].double(), up + biases[1][e].double()
            h = gated_product(activation, gate, up)
            y = h @ w2_EFH[e].double()
            if biases is not None:
                y = y + biases[2][e].double()
            out[t] += float(weights_TK[t, k]) * y
    return out
