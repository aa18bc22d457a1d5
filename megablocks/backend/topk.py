"""The router's softmax and top-k in one kernel: one program per token row.

Legend: T tokens, E experts, K top-k.

    p_TE          = softmax(logits_TE) in fp32          exp(x - max) / Σ exp(x - max)
    ids_TK        = the K largest p of each row, in descending order
    weights_TK    = p[ids], divided by their sum when RENORMALIZE

What the kernel guarantees, against the plain-torch version (`softmax(x.float())`, `torch.topk`):
- weights are fp32 and equal torch's to within fp32 rounding (the exponential and the order of
  the sums differ: a few ulp); ids are int64 in [0, E).
- Ties: among equal probabilities the lower expert id is taken first (and comes first in the
  output), as `torch.topk` does on CUDA. Equal logits always give equal probabilities, so exact
  ties are resolved the same on every device. Where two probabilities differ by no more than
  rounding, either may be chosen (that holds between any two softmax implementations).
- NaN: a row whose softmax has NaN (a NaN or +inf logit, or every logit -inf) comes out with
  NaN weights and valid, distinct ids (NaN ranks above every number, as in `torch.topk`), so
  the NaN propagates to that token's output only.

One program holds a whole row in registers, so E is limited to `MAX_EXPERTS` (the caller takes
the plain-torch path beyond it). The K selections loop over the row: each takes the largest key
and, among equal keys, the lowest id (two reductions), then retires it.
"""

import torch
import triton
import triton.language as tl

from megablocks.backend import cdiv, next_power_of_2
from megablocks.backend.launch import pdl_launch, pdl_start

# The largest E one program handles (one block of fp32 registers per row).
MAX_EXPERTS = 8192


# logits_TE: any float dtype, strides (stride_t, stride_e). weights_TK fp32 / ids_TK int64 out,
# contiguous. Program t handles row t; offsets in int64.
@triton.jit
def _softmax_topk_kernel(
    logits_ptr,
    weights_ptr,
    ids_ptr,
    E,
    K,
    stride_t,
    stride_e,
    RENORMALIZE: tl.constexpr,
    BLOCK_E: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    in_row = offs < E
    x = tl.load(logits_ptr + row * stride_t + offs.to(tl.int64) * stride_e, mask=in_row, other=float("-inf"))
    x = x.to(tl.float32)
    num = tl.where(in_row, tl.exp(x - tl.max(x, axis=0)), 0.0)
    p = num / tl.sum(num, axis=0)
    # Selection keys: probabilities are in [0, 1]; NaN ranks first (2), padding never (-1).
    key = tl.where(p != p, 2.0, p)
    key = tl.where(in_row, key, -1.0)
    rank = tl.full([BLOCK_E], -1, dtype=tl.int32)
    for k in range(K):
        best = tl.max(key, axis=0)
        pick = tl.min(tl.where(key == best, offs, BLOCK_E), axis=0)
        chosen = offs == pick
        rank = tl.where(chosen, k, rank)
        key = tl.where(chosen, -2.0, key)
    selected = rank >= 0
    w = p
    if RENORMALIZE:
        w = p / tl.sum(tl.where(selected, p, 0.0), axis=0)
    out = row * K + rank.to(tl.int64)
    tl.store(weights_ptr + out, w, mask=selected)
    tl.store(ids_ptr + out, offs.to(tl.int64), mask=selected)


def _num_warps(block_e: int) -> int:
    # 128 experts: one warp, 4 values a thread, reductions without shared memory.
    return max(1, min(16, block_e // 256))


def softmax_topk(logits_TE: torch.Tensor, topk: int, renormalize: bool):
    """`(weights_TK float32, ids_TK int64)` of the 2-D float logits, one launch (none for T = 0).

    No validation beyond what the launch needs (the caller checks its inputs); E must be at most
    `MAX_EXPERTS` and 1 <= topk <= E.
    """
    t, e = logits_TE.shape
    assert 1 <= topk <= e <= MAX_EXPERTS, (topk, e)
    weights = torch.empty((t, topk), dtype=torch.float32, device=logits_TE.device)
    ids = torch.empty((t, topk), dtype=torch.int64, device=logits_TE.device)
    if t == 0:
        return weights, ids
    block_e = max(16, next_power_of_2(e))
    _softmax_topk_kernel[(t,)](
        logits_TE,
        weights,
        ids,
        e,
        topk,
        logits_TE.stride(0),
        logits_TE.stride(1),
        RENORMALIZE=renormalize,
        BLOCK_E=block_e,
        num_warps=_num_warps(block_e),
        **pdl_launch(logits_TE),
    )
    return weights, ids


# ------------------------------------------------------------------------------------------------
# The top-k and all the routing a decode step needs, in one program.
#
#   (weights_TK, ids) = softmax_topk(logits_TE)                  as above, chunk by chunk of rows
#   counts_E          = #{(t, k) : ids[t, k] = e}                tokens per expert
#   row(t, e)         = Σ_{e' < e} counts[e'] + #{t' < t : e in ids[t']}
#                                                                its row in expert order (token
#                                                                order within an expert: stable)
#   row_of_assignment_N[t·K + k] = row(t, ids[t, k]),  row_assignment_N[row(t, ids[t, k])] = t·K + k
#
# No sort: an expert's rows are a prefix count over the token axis of the [T, E] selection mask.
# Two passes over the rows: the first counts (the row offsets need every count), the second
# recomputes the same selection (bitwise the same: same code, same inputs) and writes the maps.
# Tokens go BLOCK_T at a time, so registers hold a [BLOCK_T, BLOCK_E] tile whatever T is (4096
# values: 16 a thread over 8 warps for each of the tile's arrays).

# The most experts, and the most rows of one tile, of the one-program routing.
ROUTE_MAX_EXPERTS = 1024
ROUTE_TILE = 4096
# The most selection work it takes is the caller's (`route_fits`' max_work:
# `megablocks.policy.KernelPolicy.route_max_work`, where its measurement is).


# logits chunk -> (rank_TE: the k of each selected (t, e), else -1; weight_TE: its fp32 weight).
@triton.jit
def _select_tile(logits_ptr, t, offs_e, T, E, K, stride_t, stride_e, RENORMALIZE: tl.constexpr,
                 BLOCK_E: tl.constexpr):
    row_ok = t < T
    valid = row_ok[:, None] & (offs_e < E)[None, :]
    x = tl.load(logits_ptr + t.to(tl.int64)[:, None] * stride_t + offs_e.to(tl.int64)[None, :] * stride_e,
                mask=valid, other=float("-inf")).to(tl.float32)
    # Rows past T (all -inf) get a finite max and a unit sum: no NaN arithmetic on padding.
    m = tl.where(row_ok, tl.max(x, axis=1), 0.0)
    num = tl.where(valid, tl.exp(x - m[:, None]), 0.0)
    p = num / tl.where(row_ok, tl.sum(num, axis=1), 1.0)[:, None]
    key = tl.where(p != p, 2.0, p)
    key = tl.where(valid, key, -1.0)
    rank = tl.full(key.shape, -1, dtype=tl.int32)
    for k in range(K):
        best = tl.max(key, axis=1)
        pick = tl.min(tl.where(key == best[:, None], offs_e[None, :], BLOCK_E), axis=1)
        chosen = offs_e[None, :] == pick[:, None]
        rank = tl.where(chosen, k, rank)
        key = tl.where(chosen, -2.0, key)
    rank = tl.where(valid, rank, -1)
    w = p
    if RENORMALIZE:
        w = p / tl.where(row_ok, tl.sum(tl.where(rank >= 0, p, 0.0), axis=1), 1.0)[:, None]
    return rank, w


# logits_TE: any float dtype, strides (stride_t, stride_e). Out (contiguous): weights_TK fp32,
# counts_E, row_of_assignment_N, row_assignment_N int32. One program. K is never specialized: Triton
# 3.6 fails to compile the kernel with K = 1 as a constant ("operand does not dominate this use"
# in TritonGPURemoveLayoutConversions, on sm_90).
@triton.jit(do_not_specialize=["K"])
def _softmax_topk_route_kernel(
    logits_ptr, weights_ptr, counts_ptr, row_of_assignment_ptr, row_assignment_ptr,
    T, E, K, stride_t, stride_e,
    RENORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    offs_e = tl.arange(0, BLOCK_E)
    offs_t = tl.arange(0, BLOCK_T)
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for t0 in range(0, T, BLOCK_T):
        rank, _ = _select_tile(logits_ptr, t0 + offs_t, offs_e, T, E, K, stride_t, stride_e,
                               RENORMALIZE, BLOCK_E)
        counts += tl.sum((rank >= 0).to(tl.int32), axis=0)
    tl.store(counts_ptr + offs_e, counts, mask=offs_e < E)
    next_row = tl.cumsum(counts, 0) - counts  # per expert: its next row in expert order
    for t0 in range(0, T, BLOCK_T):
        t = t0 + offs_t
        rank, w = _select_tile(logits_ptr, t, offs_e, T, E, K, stride_t, stride_e, RENORMALIZE, BLOCK_E)
        sel = rank >= 0
        taken = sel.to(tl.int32)
        row = next_row[None, :] + tl.cumsum(taken, axis=0) - taken
        a = t[:, None] * K + rank
        tl.store(weights_ptr + a, w, mask=sel)
        tl.store(row_of_assignment_ptr + a, row, mask=sel)
        tl.store(row_assignment_ptr + row, a, mask=sel)
        next_row += tl.sum(taken, axis=0)


def _route_tiles(num_tokens: int, num_experts: int):
    block_e = max(16, next_power_of_2(num_experts))
    block_t = max(1, min(next_power_of_2(max(num_tokens, 1)), ROUTE_TILE // block_e))
    return block_t, block_e


def route_fits(num_tokens: int, num_experts: int, topk: int, max_work: int) -> bool:
    """Whether `softmax_topk_route` takes these sizes and is the faster routing for them:
    E <= ROUTE_MAX_EXPERTS, N = T·K <= ROUTE_TILE and its selection work (padded tokens x padded
    experts x K) at most `max_work`."""
    if num_experts > ROUTE_MAX_EXPERTS or num_tokens * topk > ROUTE_TILE:
        return False
    block_t, block_e = _route_tiles(num_tokens, num_experts)
    return cdiv(num_tokens, block_t) * block_t * block_e * topk <= max_work


def softmax_topk_route(logits_TE: torch.Tensor, topk: int, renormalize: bool):
    """`(weights_TK fp32, tokens_per_expert_E, row_of_assignment_N, row_assignment_N)` (int32) in
    one launch: the top-k of `softmax_topk` (same guarantees, ties and NaN rows included) and the
    maps of its routing in expert order, rows of an expert in token order (see above).
    `row_of_assignment[t·K + k]` is the expert-order row of token t's k-th choice,
    `row_assignment[r]` the assignment of row r (its token: `// topk`). No validation beyond what the launch needs (the caller
    checks its inputs); E <= ROUTE_MAX_EXPERTS, N <= ROUTE_TILE and 1 <= topk <= E (`route_fits`
    says where it is also the faster routing)."""
    t, e = logits_TE.shape
    assert 1 <= topk <= e <= ROUTE_MAX_EXPERTS and t * topk <= ROUTE_TILE, (t, e, topk)
    device = logits_TE.device
    weights = torch.empty((t, topk), dtype=torch.float32, device=device)
    counts = torch.empty(e, dtype=torch.int32, device=device)
    maps = torch.empty((2, t * topk), dtype=torch.int32, device=device)
    block_t, block_e = _route_tiles(t, e)
    _softmax_topk_route_kernel[(1,)](
        logits_TE, weights, counts, maps[0], maps[1],
        t, e, topk, logits_TE.stride(0), logits_TE.stride(1),
        RENORMALIZE=renormalize, BLOCK_T=block_t, BLOCK_E=block_e, num_warps=8,
    )
    return weights, counts, maps[0], maps[1]
