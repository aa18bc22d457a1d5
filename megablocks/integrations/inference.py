"""A functional MoE for serving engines: `fused_moe` with vLLM's weight layout, no autograd.

Legend: T tokens, H hidden, E experts, F ffn per expert, K top-k, N = T·K routed rows.

    grouped path, 'triton' backend, the policy's `fused_forms` (the routed form): four launches at decode sizes
        weights, counts, maps = softmax_topk_route(gating_TE)      top-k, tokens per expert and the
                                                                   row maps, one program (where
                                                                   `route_fits`; else the top-k
                                                                   kernel, then `row_maps`:    
                                                                   one program that sorts up to
                                                                   4096 rows and 1022 experts,
                                                                   else a key kernel, torch.sort
                                                                   and one kernel for the maps)
        a_NF   = act(x[rows] @ w1_gate^T) * (x[rows] @ w1_up^T)    one grouped GEMM: token rows read
                                                                   through the map, GLU in its epilogue
        y_NH   = gmm(a_NF, w2^T)
        out_TH = scatter(y_NH, maps, weights)                      weighted sum over K, in fp32
    grouped path, otherwise (`fused_forms` off, or the 'torch' / 'gg' GEMM backends):
        weights_TK, ids_TK = top-k of softmax(gating_output_TE)   one kernel (renormalised if asked)
        meta = routing_metadata(ids_TK); maps = route(meta)       row maps, once for gather and scatter
        x_NH = gather_routed(x_TH, maps)                          rows in expert order
        a_NF = gmm(x_NH, w1^T), then the fused GLU op
        y_NH = gmm(a_NF, w2^T); out_TH = scatter_routed(y_NH, maps, weights)
    gather path:   the N rows' expert matrices are indexed out of w1 / w2 and multiplied with
                   batched mat-vecs: no sort, histogram or permutation (few launches, for tiny T)

Weights: `w1` [E, 2F, H] (gate rows, then up rows), `w2` [E, H, F] — vLLM's layout, which is also
transformers' fused `gate_up_proj` / `down_proj`.

On CUDA the grouped path with the 'triton' backend reads no value on the host (no sync) and has no
data-dependent shapes, so a call can be captured in a CUDA graph (decode under graphs: host time
gone) and traced by `torch.compile(fullgraph=True)`.
"""

from typing import Optional, Tuple

import torch

from megablocks import _checks
from megablocks.backend import fp8
from megablocks.backend import topk as topk_kernels
from megablocks.backend import use_triton
from megablocks.backend.activation import ACTIVATIONS as GLU_ACTIVATIONS
from megablocks.ops._eager import custom_op
from megablocks.ops.activation import ACTIVATION_FUNCTIONS, gated_product, glu
from megablocks.ops.experts import routed_glu_experts
from megablocks.ops.gmm import gmm
from megablocks.ops.permute import gather_routed, route, scatter_routed
from megablocks.ops.routing import RowMaps, row_maps, routing_metadata
from megablocks.policy import KernelPolicy, as_policy

# fused_moe's activations: the one table's (`megablocks.ops.activation.ACTIVATION_FUNCTIONS`).
ACTIVATIONS = ACTIVATION_FUNCTIONS
PATHS = ("auto", "grouped", "gather")
_GATING_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# 'auto' takes the gather path up to this many routed rows (T·K): none, as the grouped path was
# faster at every measured size (benchmarks/RESULTS.md, "Measurements behind the kernels' defaults").
GATHER_MAX_ROWS = 0


def softmax_topk_reference(
    gating_output: torch.Tensor, topk: int, renormalize: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    """`(weights_TK float32, ids_TK int64)`: the top-k of `softmax(gating_output)` computed in
    float32, divided by their sum when `renormalize` (plain torch; differentiable in the logits)."""
    scores = gating_output.float().softmax(dim=-1)
    weights, ids = torch.topk(scores, topk, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


@custom_op("softmax_topk")
def _softmax_topk_op(gating_output: torch.Tensor, topk: int, renormalize: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    if use_triton(gating_output) and gating_output.shape[1] <= topk_kernels.MAX_EXPERTS:
        return topk_kernels.softmax_topk(gating_output, topk, renormalize)
    return softmax_topk_reference(gating_output, topk, renormalize)


@_softmax_topk_op.register_fake
def _(gating_output, topk, renormalize):
    t = gating_output.shape[0]
    return (gating_output.new_empty((t, topk), dtype=torch.float32),
            gating_output.new_empty((t, topk), dtype=torch.int64))


def softmax_topk(gating_output: torch.Tensor, topk: int, renormalize: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The router's top-k: `(weights_TK float32, ids_TK int64)`, the K largest of
    `softmax(gating_output)` (computed in float32) in descending order, divided by their sum when
    `renormalize`.

    On CUDA tensors (and CPU ones under TRITON_INTERPRET=1) one Triton kernel computes it all for
    E <= `megablocks.backend.topk.MAX_EXPERTS` (megablocks/backend/topk.py: what it guarantees
    against `softmax_topk_reference`: weights within fp32 rounding, exact ties to the lower
    expert id, NaN rows kept NaN); otherwise, and when the logits need a gradient,
    `softmax_topk_reference`. No host sync either way.

    Args:
        gating_output: [T, E] float32/float16/bfloat16/float64 router logits (T may be 0).
        topk: K, 1 <= K <= E.
        renormalize: a bool.

    Raises:
        TypeError: not a tensor, a dtype not listed, topk not an int, renormalize not a bool.
        ValueError: not 2-D, topk out of range.
    """
    _checks.check_tensor("gating_output", gating_output, ndim=2, dtypes=_GATING_DTYPES)
    _checks.check_int("topk", topk, min_value=1, max_value=gating_output.shape[1])
    if not isinstance(renormalize, bool):
        raise TypeError(f"renormalize: expected a bool, got {type(renormalize).__name__}")
    if gating_output.requires_grad and torch.is_grad_enabled():
        return softmax_topk_reference(gating_output, topk, renormalize)
    return _softmax_topk_op(gating_output, topk, renormalize)


def _glu(h_N2F: torch.Tensor, f: int, activation: str) -> torch.Tensor:
    """`act(h[:, :F]) * h[:, F:]` by the fused GLU op (fp32 math, rounded once). `glu` takes
    contiguous halves: one copy lays the gate rows and then the up rows out as `[2, N, F]` (two
    copies otherwise); one row needs none."""
    n = h_N2F.shape[0]
    if n <= 1:
        return glu(h_N2F[:, :f], h_N2F[:, f:], activation)
    halves = h_N2F.view(n, 2, f).transpose(0, 1).contiguous()
    return glu(halves[0], halves[1], activation)


def _route_tokens(gating_output: torch.Tensor, topk: int, renormalize: bool,
                  route_max_work: int) -> Tuple[torch.Tensor, torch.Tensor, RowMaps]:
    """(weights_TK, tokens_per_expert_E, maps of the plain layout) of the routed form: the top-k
    and the maps in one launch where `route_fits`, else the top-k kernel, then one program for the
    counts and maps (three past 4096 rows: `row_maps`). No host sync."""
    t, e = gating_output.shape
    if topk_kernels.route_fits(t, e, topk, route_max_work):
        weights_TK, counts_E, assignment_row_N, row_assignment_N = topk_kernels.softmax_topk_route(
            gating_output, topk, renormalize
        )
        return weights_TK, counts_E, RowMaps(assignment_row_N, row_assignment_N, topk)
    weights_TK, ids_TK = topk_kernels.softmax_topk(gating_output, topk, renormalize)
    counts_E, maps = row_maps(ids_TK, e)
    return weights_TK, counts_E, maps


def _routed_moe_impl(hidden_states: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, gating_output: torch.Tensor,
                     topk: int, renormalize: bool, activation: str, route_max_work: int, gather_min_ffn: int,
                     gather_min_rows_per_expert: int) -> torch.Tensor:
    """The routed form of the grouped path (module docstring): four launches (five past
    `route_fits`; seven past 4096 rows), no host sync. The thresholds are those of `KernelPolicy`."""
    weights_TK, counts_E, maps = _route_tokens(gating_output, topk, renormalize, route_max_work)
    return routed_glu_experts(hidden_states, w1, None, w2, counts_E, maps, weights_TK.view(-1), activation,
                              up_trans_b=True, down_trans_b=True, gather_min_ffn=gather_min_ffn,
                              gather_min_rows_per_expert=gather_min_rows_per_expert)


@custom_op("fused_moe_routed")
def _routed_moe_op(hidden_states: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, gating_output: torch.Tensor,
                   topk: int, renormalize: bool, activation: str, route_max_work: int, gather_min_ffn: int,
                   gather_min_rows_per_expert: int) -> torch.Tensor:
    return _routed_moe_impl(hidden_states, w1, w2, gating_output, topk, renormalize, activation, route_max_work,
                            gather_min_ffn, gather_min_rows_per_expert)


@_routed_moe_op.register_fake
def _(hidden_states, w1, w2, gating_output, topk, renormalize, activation, route_max_work, gather_min_ffn,
      gather_min_rows_per_expert):
    return torch.empty_like(hidden_states)


def _experts_from_ids_impl(hidden_states: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, ids_TK: torch.Tensor,
                           weights_TK: torch.Tensor, activation: str, trans_b: bool, gather_min_ffn: int,
                           gather_min_rows_per_expert: int) -> torch.Tensor:
    """The routed form on a routing given as ids and weights (transformers' experts): the routing
    (`row_maps`), the GLU-epilogue grouped GEMM through the row map, the down GEMM, the
    scatter."""
    counts_E, maps = row_maps(ids_TK, w1.shape[0])
    return routed_glu_experts(hidden_states, w1, None, w2, counts_E, maps, weights_TK.reshape(-1), activation,
                              up_trans_b=trans_b, down_trans_b=trans_b, gather_min_ffn=gather_min_ffn,
                              gather_min_rows_per_expert=gather_min_rows_per_expert)


@custom_op("experts_from_ids")
def _experts_from_ids_op(hidden_states: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, ids_TK: torch.Tensor,
                         weights_TK: torch.Tensor, activation: str, trans_b: bool, gather_min_ffn: int,
                         gather_min_rows_per_expert: int) -> torch.Tensor:
    return _experts_from_ids_impl(hidden_states, w1, w2, ids_TK, weights_TK, activation, trans_b, gather_min_ffn,
                                  gather_min_rows_per_expert)


@_experts_from_ids_op.register_fake
def _(hidden_states, w1, w2, ids_TK, weights_TK, activation, trans_b, gather_min_ffn, gather_min_rows_per_expert):
    return torch.empty_like(hidden_states)


def _check_rows_and_weights(hidden_states, w1, w2, weight_dtypes: Optional[Tuple[torch.dtype, ...]]) -> None:
    """hidden_states [T, H] of a float dtype, w1 and w2 3-D of `weight_dtypes` (None:
    hidden_states')."""
    _checks.check_tensor("hidden_states", hidden_states, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.check_tensor("w1", w1, ndim=3, dtypes=weight_dtypes or (hidden_states.dtype,))
    _checks.check_tensor("w2", w2, ndim=3, dtypes=weight_dtypes or (hidden_states.dtype,))


def _check_experts_args(hidden_states, w1, w2, ids_TK, weights_TK, activation, trans_b,
                        weight_dtypes: Optional[Tuple[torch.dtype, ...]] = None) -> None:
    """`weight_dtypes`: those w1 and w2 may have (default: hidden_states')."""
    _check_rows_and_weights(hidden_states, w1, w2, weight_dtypes)
    _checks.check_tensor("ids_TK", ids_TK, ndim=2, dtypes=_checks.INDEX_DTYPES)
    _checks.check_tensor("weights_TK", weights_TK, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.check_same_device(hidden_states=hidden_states, w1=w1, w2=w2, ids_TK=ids_TK, weights_TK=weights_TK)
    if not isinstance(trans_b, bool):
        raise TypeError(f"trans_b: expected a bool, got {type(trans_b).__name__}")
    t, h = hidden_states.shape
    e = w1.shape[0]
    two_f = w1.shape[1] if trans_b else w1.shape[2]
    w1_h = w1.shape[2] if trans_b else w1.shape[1]
    if w1_h != h or two_f % 2:
        layout = "[E, 2F, H]" if trans_b else "[E, H, 2F]"
        raise ValueError(f"w1: expected shape {layout} with H={h} and an even 2F, got {tuple(w1.shape)}")
    expected_w2 = (e, h, two_f // 2) if trans_b else (e, two_f // 2, h)
    if tuple(w2.shape) != expected_w2:
        raise ValueError(f"w2: expected shape {expected_w2}, got {tuple(w2.shape)}")
    if ids_TK.shape[0] != t or tuple(weights_TK.shape) != tuple(ids_TK.shape):
        raise ValueError(f"ids_TK, weights_TK: expected two [T={t}, K] tensors, got {tuple(ids_TK.shape)} and "
                         f"{tuple(weights_TK.shape)}")
    if activation not in GLU_ACTIVATIONS:
        raise ValueError(f"activation: expected one of {GLU_ACTIVATIONS}, got {activation!r}")


def experts_from_ids(hidden_states: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, ids_TK: torch.Tensor,
                     weights_TK: torch.Tensor, activation: str, trans_b: bool = True,
                     policy: Optional[KernelPolicy] = None) -> Optional[torch.Tensor]:
    """`Σ_k weights[t, k] · expert_{ids[t, k]}(x_t)` by the routed form, without autograd, or None
    where that form does not apply (the policy's `fused_forms` off, the Triton kernels not in use,
    T = 0); the caller then takes its general path.

    Args:
        hidden_states: [T, H] in the weights' dtype.
        w1: [E, 2F, H] gate rows then up rows (`trans_b=True`), or [E, H, 2F] (`trans_b=False`).
        w2: [E, H, F] (`trans_b=True`) or [E, F, H].
        ids_TK: [T, K] integer expert ids; ids outside [0, E) add nothing (a dropped assignment).
        weights_TK: [T, K] float routing weights.
        activation: of the gate: 'silu', 'gelu', 'gelu_tanh' or 'relu', or 'clamped_swiglu'.
        trans_b: the weights' orientation, as above.
        policy: a `megablocks.policy.KernelPolicy` (or a dict of its fields); None: the defaults.

    Returns:
        [T, H] in hidden_states' dtype, or None.

    Raises:
        TypeError, ValueError: wrong types, dtypes, shapes, devices or activation.
    """
    _check_experts_args(hidden_states, w1, w2, ids_TK, weights_TK, activation, trans_b)
    policy = as_policy(policy, "policy")
    if not _routed_form_fits(hidden_states, policy):
        return None
    return _experts_from_ids_op(hidden_states, w1, w2, ids_TK, weights_TK, activation, trans_b, policy.gather_min_ffn,
                                policy.gather_min_rows_per_expert)


def _routed_form_fits(hidden_states: torch.Tensor, policy: KernelPolicy) -> bool:
    """Whether the routed form runs: the policy's `fused_forms`, the Triton kernels, T > 0."""
    return policy.fused_forms and use_triton(hidden_states) and hidden_states.shape[0] > 0


def _check_args(hidden_states, w1, w2, gating_output, topk, renormalize, activation, path,
                weight_dtypes: Optional[Tuple[torch.dtype, ...]] = None) -> Tuple[int, int]:
    """(E, F) of checked `fused_moe` arguments; `weight_dtypes`: those w1 and w2 may have (default:
    hidden_states')."""
    _check_rows_and_weights(hidden_states, w1, w2, weight_dtypes)
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
    # The grouped GEMMs' int32 offset arithmetic (as `megablocks.ops.gmm` checks it).
    _checks.check_int32_range("w1: one expert's 2F·H", two_f * h)
    _checks.check_int32_range("256·H", 256 * h)
    _checks.check_int32_range("256·2F", 256 * two_f)
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
    policy: Optional[KernelPolicy] = None,
    w1_scale: Optional[torch.Tensor] = None,
    w2_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The output of a gated (SwiGLU-style) MoE layer, as vLLM's `fused_moe`, without autograd.

    Args:
        hidden_states: [T, H] float32/float16/bfloat16 (T may be 0).
        w1: [E, 2F, H] in hidden_states' dtype: the gate rows then the up rows of each expert.
        w2: [E, H, F] in hidden_states' dtype.
        gating_output: [T, E] router logits (any float dtype; the softmax runs in float32; its
            top-k is `softmax_topk`, one kernel on CUDA).
        topk: experts per token K, 1 <= K <= E.
        renormalize: divide the K weights of each token by their sum.
        activation: 'silu' (default), 'gelu' (erf), 'gelu_tanh' or 'relu', applied to the gate, or
            'clamped_swiglu' (gpt-oss's, of both halves; transformers' gpt-oss checkpoints interleave
            gate and up columns: de-interleave them into this layout first); the GLU
            `act(gate) * up` is one fused op (`megablocks.ops.glu`), fp32 math rounded once.
        path: 'grouped' (routing, two grouped GEMMs, scatter: the routed form of the module
            docstring with the policy's `fused_forms` and the 'triton' backend; no host sync with the 'triton'
            backend on CUDA, so it can be captured in a CUDA graph), 'gather' (index the
            routed rows' expert matrices and use batched mat-vecs; for a handful of tokens) or
            'auto' ('gather' up to GATHER_MAX_ROWS routed rows, else 'grouped').
        backend: the grouped GEMM backend of the grouped path (`megablocks.ops.gmm`): None picks
            'triton' on CUDA and under TRITON_INTERPRET=1, 'torch' on CPU otherwise.
        policy: the kernel choices (`megablocks.policy.KernelPolicy`, or a dict of its fields):
            `fused_forms`, `route_max_work`, `gather_min_ffn`, `gather_min_rows_per_expert`,
            `small_routing`; None: the measured defaults.
        w1_scale, w2_scale: FP8 block-quantized experts (both or neither): `w1` / `w2` then hold
            float8_e4m3fn values in the layout above and these their fp32 inverse scales per
            128 x 128 block, [E, ceil(2F/128), ceil(H/128)] and [E, ceil(H/128), ceil(F/128)]
            (DeepSeek-V3's `weight_scale_inv`, vLLM's `w1_scale` / `w2_scale` with block shape
            [128, 128]: weight = value * scale). The routed rows are quantized per 1 x 128 tile
            (`megablocks.backend.fp8.quantize_rows`) and multiplied by the FP8 grouped GEMM
            (`gmm_fp8`, fp32 accumulation), the GLU between them in hidden_states' dtype
            (bfloat16, float16 or float32); `path` and `backend` do not apply.

    Returns:
        [T, H] in hidden_states' dtype: `Σ_k weight_tk · (act(x_t W_g^T) * (x_t W_u^T)) W_d^T`
        with the matrices of expert `id_tk`, accumulated over K in float32.

    Raises:
        TypeError, ValueError: wrong types, dtypes, shapes, devices, topk or choice names.
    """
    if w1_scale is not None or w2_scale is not None:
        return _fused_moe_fp8(hidden_states, w1, w2, gating_output, topk, renormalize, activation, path,
                              as_policy(policy, "policy"), w1_scale, w2_scale)
    e, f = _check_args(hidden_states, w1, w2, gating_output, topk, renormalize, activation, path)
    policy = as_policy(policy, "policy")
    t, h = hidden_states.shape
    n = t * topk
    if (path != "gather" and n > GATHER_MAX_ROWS and backend in (None, "triton")
            and _routed_form_fits(hidden_states, policy)):
        return _routed_moe_op(hidden_states, w1, w2, gating_output, topk, renormalize, activation,
                              policy.route_max_work, policy.gather_min_ffn, policy.gather_min_rows_per_expert)
    weights_TK, ids_TK = _softmax_topk_op(gating_output, topk, renormalize)
    if path == "gather" or (path == "auto" and n <= GATHER_MAX_ROWS):
        ids_N = ids_TK.reshape(-1)
        x_N1H = hidden_states.unsqueeze(1).expand(t, topk, h).reshape(n, 1, h)
        h_N2F = torch.bmm(x_N1H, w1.index_select(0, ids_N).transpose(1, 2)).squeeze(1)
        a_N1F = _glu(h_N2F, f, activation).unsqueeze(1)
        y_NH = torch.bmm(a_N1F, w2.index_select(0, ids_N).transpose(1, 2)).squeeze(1)
        out = (y_NH.view(t, topk, h).float() * weights_TK.unsqueeze(-1)).sum(dim=1)
        return out.to(hidden_states.dtype)
    meta = routing_metadata(ids_TK, e, 1, small_routing=policy.small_routing)
    maps = route(meta.indices, meta.bin_ids, meta.bins, topk)  # those of gather and scatter, once
    x_NH = gather_routed(hidden_states, maps)
    a_NF = _glu(gmm(x_NH, w1, meta.tokens_per_expert, trans_b=True, backend=backend), f, activation)
    y_NH = gmm(a_NF, w2, meta.tokens_per_expert, trans_b=True, backend=backend)
    return scatter_routed(y_NH, maps, weights_TK.reshape(-1))


def _check_fp8_scales(hidden_states, w1_scale, w2_scale) -> None:
    """Both FP8 scales given as fp32 [E, ., .] tensors, and hidden_states of a dtype the FP8 form
    takes (the weights are `_check_args`' or `_check_experts_args`' with `weight_dtypes=(FP8_DTYPE,)`,
    then `_check_fp8_scales_fit`)."""
    if w1_scale is None or w2_scale is None:
        raise ValueError("w1_scale, w2_scale: FP8 experts need both scales (got one)")
    _checks.check_tensor("hidden_states", hidden_states, ndim=2, dtypes=(torch.bfloat16, torch.float16, torch.float32))
    _checks.check_tensor("w1_scale", w1_scale, ndim=3, dtypes=(torch.float32,))
    _checks.check_tensor("w2_scale", w2_scale, ndim=3, dtypes=(torch.float32,))


def _check_fp8_scales_fit(w1, w1_scale, w2_scale) -> None:
    """The scales on checked weights' device, one per 128 x 128 block of w1 [E, 2F, H] and w2 [E, H, F]."""
    _checks.check_same_device(w1=w1, w1_scale=w1_scale, w2_scale=w2_scale)
    e, two_f, h = w1.shape
    blocks = (e, fp8.cdiv(two_f, fp8.Q), fp8.cdiv(h, fp8.Q))
    if tuple(w1_scale.shape) != blocks:
        raise ValueError(f"w1_scale: expected [E, ceil(2F/{fp8.Q}), ceil(H/{fp8.Q})] = {blocks} (128 x 128 blocks of "
                         f"w1 {tuple(w1.shape)}), got {tuple(w1_scale.shape)}")
    blocks = (e, fp8.cdiv(h, fp8.Q), fp8.cdiv(two_f // 2, fp8.Q))
    if tuple(w2_scale.shape) != blocks:
        raise ValueError(f"w2_scale: expected [E, ceil(H/{fp8.Q}), ceil(F/{fp8.Q})] = {blocks} (128 x 128 blocks of "
                         f"w2 [E={e}, H={h}, F={two_f // 2}]), got {tuple(w2_scale.shape)}")


def _fused_moe_fp8(hidden_states, w1, w2, gating_output, topk, renormalize, activation, path, policy,
                   w1_scale, w2_scale) -> torch.Tensor:
    """`fused_moe` on FP8 block-quantized experts: route, quantize the rows as they are gathered,
    FP8 grouped GEMM, GLU quantized as it is made, FP8 grouped GEMM, weighted scatter."""
    _check_fp8_scales(hidden_states, w1_scale, w2_scale)
    _check_args(hidden_states, w1, w2, gating_output, topk, renormalize, activation, path,
                weight_dtypes=(fp8.FP8_DTYPE,))
    _check_fp8_scales_fit(w1, w1_scale, w2_scale)
    return _fused_moe_fp8_op(hidden_states, w1, w1_scale, w2, w2_scale, gating_output, topk, renormalize, activation,
                             _routed_form_fits(hidden_states, policy), policy.small_routing, policy.route_max_work,
                             policy.fp8_decode_glu_epilogue, policy.fp8_decode_gather_prologue)


@custom_op("fused_moe_fp8")
def _fused_moe_fp8_op(hidden_states: torch.Tensor, w1: torch.Tensor, w1_scale: torch.Tensor, w2: torch.Tensor,
                      w2_scale: torch.Tensor, gating_output: torch.Tensor, topk: int, renormalize: bool,
                      activation: str, routed: bool, small_routing: bool, route_max_work: int, glu_epilogue: bool,
                      gather_prologue: bool) -> torch.Tensor:
    """On checked arguments; `routed`: `_routed_form_fits`, the other flags the policy's."""
    if routed:  # routed as the unquantized routed form
        weights_TK, counts_E, maps = _route_tokens(gating_output, topk, renormalize, route_max_work)
        routing = counts_E, maps
    else:
        weights_TK, ids_TK = _softmax_topk_op(gating_output, topk, renormalize)
        routing = _fp8_routing(ids_TK, w1.shape[0], routed, small_routing)
    return _fp8_experts(hidden_states, w1, w1_scale, w2, w2_scale, routing, weights_TK, activation, glu_epilogue,
                        gather_prologue)


@_fused_moe_fp8_op.register_fake
def _(hidden_states, w1, w1_scale, w2, w2_scale, gating_output, topk, renormalize, activation, routed, small_routing,
      route_max_work, glu_epilogue, gather_prologue):
    return torch.empty_like(hidden_states)


def _fp8_routing(ids_TK, e, routed: bool, small_routing: bool) -> Tuple[torch.Tensor, RowMaps]:
    """(tokens_per_expert_E, the plain layout's maps) of a routing given as ids: the routed form's
    maps (`row_maps`, one program up to 4096 rows) where it runs (`routed`), else
    `routing_metadata` and `route`."""
    if routed:
        return row_maps(ids_TK, e)
    meta = routing_metadata(ids_TK, e, 1, small_routing=small_routing)
    return meta.tokens_per_expert, route(meta.indices, meta.bin_ids, meta.bins, ids_TK.shape[1])


def _fp8_experts(hidden_states, w1, w1_scale, w2, w2_scale, routing, weights_TK, activation, glu_epilogue: bool,
                 gather_prologue: bool) -> torch.Tensor:
    """`Σ_k weights[t, k] · expert_{ids[t, k]}(x_t)` on checked FP8 experts and a routing
    (tokens_per_expert_E, maps): the rows quantized as they are gathered (each token's tiles once;
    the e4m3 bytes move, not the rows'), FP8 grouped GEMM, the GLU quantized as it is made (at
    decode sizes, with `glu_epilogue` (the policy's `fp8_decode_glu_epilogue`), in the up product's
    epilogue; with `gather_prologue` (`fp8_decode_gather_prologue`) too, the rows gathered and
    quantized in its K loop), FP8 grouped GEMM, weighted scatter."""
    tokens_per_expert, maps = routing
    f = w1.shape[1] // 2
    dtype = hidden_states.dtype
    # Each launcher runs the two launches itself past the decode sizes (`fp8.glu_decode_fits`).
    if glu_epilogue and gather_prologue:
        a_q, a_s = fp8.gather_gmm_fp8_glu_quantize(hidden_states, maps.assignment_row, maps.row_assignment, maps.top_k,
                                                   w1, w1_scale, tokens_per_expert, activation, out_dtype=dtype)
    elif glu_epilogue:
        x_q, x_s = fp8.gather_quantize_rows(hidden_states, maps.assignment_row, maps.top_k)
        a_q, a_s = fp8.gmm_fp8_glu_quantize(x_q, x_s, w1, w1_scale, tokens_per_expert, activation, out_dtype=dtype)
    else:
        x_q, x_s = fp8.gather_quantize_rows(hidden_states, maps.assignment_row, maps.top_k)
        h_N2F = fp8.gmm_fp8(x_q, x_s, w1, w1_scale, tokens_per_expert, out_dtype=dtype)
        # The GLU quantized as it is made, from the two halves in place (a copy to contiguous
        # halves, the GLU's write and the quantizer's read of it were 0.93 of 4.87 ms of mixtral's
        # T = 4096 forward; H200, bench_fp8.py --serving-breakdown).
        a_q, a_s = fp8.glu_quantize_rows(h_N2F[:, :f], h_N2F[:, f:], activation)
    y_NH = fp8.gmm_fp8(a_q, a_s, w2, w2_scale, tokens_per_expert, out_dtype=dtype)
    return scatter_routed(y_NH, maps, weights_TK.reshape(-1).float())


@torch.no_grad()
def fp8_experts_from_ids(hidden_states: torch.Tensor, w1: torch.Tensor, w1_scale: torch.Tensor, w2: torch.Tensor,
                         w2_scale: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                         activation: str = "silu", policy: Optional[KernelPolicy] = None) -> torch.Tensor:
    """`Σ_k weights[t, k] · expert_{ids[t, k]}(x_t)` on FP8 block-quantized experts (the routing
    given), without autograd: `fused_moe`'s FP8 form after its top-k. Weights and scales as
    `fused_moe` documents them; ids_TK [T, K] integer expert ids in [0, E), weights_TK [T, K].

    Raises:
        TypeError, ValueError: wrong types, dtypes, shapes, devices, scales or activation.
    """
    _check_fp8_scales(hidden_states, w1_scale, w2_scale)
    _check_experts_args(hidden_states, w1, w2, ids_TK, weights_TK, activation, True, weight_dtypes=(fp8.FP8_DTYPE,))
    _check_fp8_scales_fit(w1, w1_scale, w2_scale)
    policy = as_policy(policy, "policy")
    return _fp8_experts_from_ids_op(hidden_states, w1, w1_scale, w2, w2_scale, ids_TK, weights_TK, activation,
                                    _routed_form_fits(hidden_states, policy), policy.small_routing,
                                    policy.fp8_decode_glu_epilogue, policy.fp8_decode_gather_prologue)


@custom_op("fp8_experts_from_ids")
def _fp8_experts_from_ids_op(hidden_states: torch.Tensor, w1: torch.Tensor, w1_scale: torch.Tensor, w2: torch.Tensor,
                             w2_scale: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor, activation: str,
                             routed: bool, small_routing: bool, glu_epilogue: bool,
                             gather_prologue: bool) -> torch.Tensor:
    routing = _fp8_routing(ids_TK, w1.shape[0], routed, small_routing)
    return _fp8_experts(hidden_states, w1, w1_scale, w2, w2_scale, routing, weights_TK, activation, glu_epilogue,
                        gather_prologue)


@_fp8_experts_from_ids_op.register_fake
def _(hidden_states, w1, w1_scale, w2, w2_scale, ids_TK, weights_TK, activation, routed, small_routing, glu_epilogue,
      gather_prologue):
    return torch.empty_like(hidden_states)


def fused_moe_fp8_reference(hidden_states: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, gating_output: torch.Tensor,
                            topk: int, renormalize: bool, w1_scale: torch.Tensor, w2_scale: torch.Tensor,
                            activation: str = "silu") -> torch.Tensor:
    """Plain torch `fused_moe` on FP8 experts, token by token in float32: the weights dequantized
    block by block, each routed row quantized per 1 x 128 tile and dequantized (the same rounding
    as the kernels'), the GLU output rounded to hidden_states' dtype and quantized likewise."""
    weights_TK, ids_TK = softmax_topk_reference(gating_output, topk, renormalize)
    return fp8_experts_reference(hidden_states, w1, w1_scale, w2, w2_scale, ids_TK, weights_TK, activation)


def fp8_experts_reference(hidden_states: torch.Tensor, w1: torch.Tensor, w1_scale: torch.Tensor, w2: torch.Tensor,
                          w2_scale: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                          activation: str = "silu") -> torch.Tensor:
    """Plain torch `fp8_experts_from_ids` (see `fused_moe_fp8_reference`)."""
    act = ACTIVATIONS[activation]
    topk = ids_TK.shape[1]
    w1f, w2f = fp8.dequantize_blocks(w1, w1_scale), fp8.dequantize_blocks(w2, w2_scale)
    f = w1.shape[1] // 2
    dtype = hidden_states.dtype
    through = lambda v: fp8.dequantize_rows(*fp8.quantize_rows_reference(v.to(dtype)[None]))[0]  # noqa: E731
    out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
    for t in range(hidden_states.shape[0]):
        x = through(hidden_states[t])
        for k in range(topk):
            e = int(ids_TK[t, k])
            h = (w1f[e] @ x).to(dtype).float()
            a = through(gated_product(act, h[:f], h[f:]))
            out[t] += weights_TK[t, k].float() * (w2f[e] @ a).to(dtype).float()
    return out.to(dtype)


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
    weights_TK, ids_TK = softmax_topk_reference(gating_output, topk, renormalize)
    f = w1.shape[1] // 2
    out = torch.zeros(hidden_states.shape, dtype=acc, device=hidden_states.device)
    for t in range(hidden_states.shape[0]):
        x = hidden_states[t].to(acc)
        for k in range(topk):
            e = int(ids_TK[t, k])
            g, u = w1[e, :f].to(acc) @ x, w1[e, f:].to(acc) @ x
            out[t] += weights_TK[t, k].to(acc) * (w2[e].to(acc) @ gated_product(act, g, u))
    return out.to(hidden_states.dtype)
