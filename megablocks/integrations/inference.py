"""A functional MoE for serving engines: `fused_moe` with vLLM's weight layout, no autograd.

Legend: T tokens, H hidden, E experts, F ffn per expert, K top-k, N = T·K routed rows.

    weights_TK, ids_TK = top-k of softmax(gating_output_TE)     (renormalised if asked)
    grouped path:  x_NH = gather(x_TH)                          rows in expert order
                   h_N2F = gmm(x_NH, w1^T)                      [gate | up] of each row
                   y_NH = gmm(act(gate) * up, w2^T)
                   out_TH = scatter(y_NH, weights)              weighted sum over K, in fp32
    gather path:   the N rows' expert matrices are indexed out of w1 / w2 and multiplied with
                   batched mat-vecs: no sort, histogram or permutation (few launches, for tiny T)

Weights: `w1` [E, 2F, H] (gate rows, then up rows), `w2` [E, H, F] — vLLM's layout, which is also
transformers' fused `gate_up_proj` / `down_proj`.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from megablocks import _checks
from megablocks.ops.gmm import gmm
from megablocks.ops.permute import gather, scatter
from megablocks.ops.routing import routing_metadata

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}
PATHS = ("auto", "grouped", "gather")

# 'auto' takes the gather path up to this many routed rows (T·K). The gather path reads each
# selected expert's weights once per routed row and copies them; the grouped path reads each
# selected expert once but launches the routing ops. The crossover is to be measured on the
# H100 with benchmarks/bench_fused_moe.py (it reports both paths); 2 rows is a conservative
# placeholder (one token, top-2).
GATHER_MAX_ROWS = 2


def softmax_topk(gating_output: torch.Tensor, topk: int, renormalize: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """`(weights_TK float32, ids_TK int64)`: the top-k of `softmax(gating_output)` computed in
    float32, divided by their sum when `renormalize`."""
    scores = gating_output.float().softmax(dim=-1)
    weights, ids = torch.topk(scores, topk, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def _check_args(hidden_states, w1, w2, gating_output, topk, renormalize, activation, path) -> Tuple[int, int]:
    _checks.check_tensor("hidden_states", hidden_states, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.check_tensor("w1", w1, ndim=3, dtypes=(hidden_states.dtype,))
    _checks.check_tensor("w2", w2, ndim=3, dtypes=(hidden_states.dtype,))
    _checks.check_tensor("gating_output", gating_output, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.check_same_device(hidden_states=hidden_states, w1=w1, w2=w2, gating_output=gating_output)
    t, h = hidden_states.shape
    e, two_f, h1 = w1.shape
    if h1 != h or two_f % 2:
        raise ValueError(f"w1: expected shape [E, 2F, H={h}] with an even 2F, got {tuple(w1.shape)}")
    f = two_f // 2
    if tuple(w2.shape) != (e, h, f):
        raise ValueError(f"w2: expected shape {(e, h, f)} (E, H, F), got {tuple(w2.shape)}")
    if tuple(gating_output.shape) != (t, e):
        raise ValueError(f"gating_output: expected shape {(t, e)} (T, E), got {tuple(gating_output.shape)}")
    _checks.check_int("topk", topk, min_value=1, max_value=e)
    if not isinstance(renormalize, bool):
        raise TypeError(f"renormalize: expected a bool, got {type(renormalize).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if path not in PATHS:
        raise ValueError(f"path: expected one of {PATHS}, got {path!r}")
    return e, f


@torch.no_grad()
def fused_moe(
    hidden_states: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    gating_output: torch.Tensor,
    topk: int,
    renormalize: bool,
    *,
    activation: str = "silu",
    path: str = "auto",
    backend: Optional[str] = None,
) -> torch.Tensor:
    """The output of a gated (SwiGLU-style) MoE layer, as vLLM's `fused_moe`, without autograd.

    Args:
        hidden_states: [T, H] float32/float16/bfloat16 (T may be 0).
        w1: [E, 2F, H] in hidden_states' dtype: the gate rows then the up rows of each expert.
        w2: [E, H, F] in hidden_states' dtype.
        gating_output: [T, E] router logits (any float dtype; the softmax runs in float32).
        topk: experts per token K, 1 <= K <= E.
        renormalize: divide the K weights of each token by their sum.
        activation: 'silu' (default), 'gelu' or 'gelu_tanh', applied to the gate.
        path: 'grouped' (routing metadata, gather, two grouped GEMMs, scatter), 'gather' (index the
            routed rows' expert matrices and use batched mat-vecs; for a handful of tokens) or
            'auto' ('gather' up to GATHER_MAX_ROWS routed rows, else 'grouped').
        backend: the grouped GEMM backend of the grouped path (`megablocks.ops.gmm`): None picks
            'triton' on CUDA and under TRITON_INTERPRET=1, 'torch' on CPU otherwise.

    Returns:
        [T, H] in hidden_states' dtype: `Σ_k weight_tk · (act(x_t W_g^T) * (x_t W_u^T)) W_d^T`
        with the matrices of expert `id_tk`, accumulated over K in float32.

    Raises:
        TypeError, ValueError: wrong types, dtypes, shapes, devices, topk or choice names.
    """
    e, f = _check_args(hidden_states, w1, w2, gating_output, topk, renormalize, activation, path)
    act = ACTIVATIONS[activation]
    weights_TK, ids_TK = softmax_topk(gating_output, topk, renormalize)
    t, h = hidden_states.shape
    n = t * topk
    if path == "gather" or (path == "auto" and n <= GATHER_MAX_ROWS):
        ids_N = ids_TK.reshape(-1)
        x_N1H = hidden_states.repeat_interleave(topk, dim=0).unsqueeze(1)
        h_N2F = torch.bmm(x_N1H, w1.index_select(0, ids_N).transpose(1, 2)).squeeze(1)
        a_N1F = (act(h_N2F[:, :f]) * h_N2F[:, f:]).unsqueeze(1)
        y_NH = torch.bmm(a_N1F, w2.index_select(0, ids_N).transpose(1, 2)).squeeze(1)
        out = (y_NH.view(t, topk, h).float() * weights_TK.unsqueeze(-1)).sum(dim=1)
        return out.to(hidden_states.dtype)
    meta = routing_metadata(ids_TK, e, 1)
    x_NH = gather(hidden_states, meta.indices, meta.bin_ids, meta.bins, topk)
    h_N2F = gmm(x_NH, w1, meta.tokens_per_expert, trans_b=True, backend=backend)
    a_NF = act(h_N2F[:, :f]) * h_N2F[:, f:]
    y_NH = gmm(a_NF, w2, meta.tokens_per_expert, trans_b=True, backend=backend)
    return scatter(y_NH, meta.indices, meta.bin_ids, weights_TK.reshape(-1), meta.bins, topk)


def fused_moe_reference(
    hidden_states: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    gating_output: torch.Tensor,
    topk: int,
    renormalize: bool,
    activation: str = "silu",
) -> torch.Tensor:
    """The per-token, per-choice loop `fused_moe` is checked against; float32 (float64 for float64)."""
    acc = torch.float64 if hidden_states.dtype == torch.float64 else torch.float32
    act = ACTIVATIONS[activation]
    weights_TK, ids_TK = softmax_topk(gating_output, topk, renormalize)
    f = w1.shape[1] // 2
    out = torch.zeros(hidden_states.shape, dtype=acc, device=hidden_states.device)
    for t in range(hidden_states.shape[0]):
        x = hidden_states[t].to(acc)
        for k in range(topk):
            e = int(ids_TK[t, k])
            g, u = w1[e, :f].to(acc) @ x, w1[e, f:].to(acc) @ x
            out[t] += weights_TK[t, k].to(acc) * (w2[e].to(acc) @ (act(g) * u))
    return out.to(hidden_states.dtype)
