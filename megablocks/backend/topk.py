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
):
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
    block_e = max(16, triton.next_power_of_2(e))
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
    )
    return weights, ids
