"""The router's softmax + top-k kernel (megablocks/backend/topk.py, through
`megablocks.integrations.inference.softmax_topk`) against the plain-torch `softmax_topk_reference`.

Ids are compared robustly: exactly where the reference's K largest probabilities (and the next
one) are apart by more than rounding; elsewhere every chosen expert must be a valid choice. Exact
ties (equal logits) must go to the lower expert ids, first in the output.
"""

import pytest
import torch

from megablocks.backend import topk as topk_kernels
from megablocks.integrations.inference import softmax_topk, softmax_topk_reference
from megablocks.policy import KernelPolicy
from tests.conftest import DEVICE
from tests.utils import assert_close, assert_equal

# Probabilities closer than this may be ordered either way by two softmax implementations.
_GAP = 1e-6


def _check(gating, topk, renormalize):
    weights, ids = softmax_topk(gating, topk, renormalize)
    ref_w, _ = softmax_topk_reference(gating, topk, renormalize)
    t, e = gating.shape
    assert weights.shape == ids.shape == (t, topk)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    assert weights.device == ids.device == gating.device
    if t == 0:
        return
    weights, ids, ref_w = weights.cpu(), ids.cpu(), ref_w.cpu()
    probs = gating.float().softmax(-1).cpu()
    # A stable descending sort: among equal probabilities, the lower id first.
    ref_p, ref_ids = probs.sort(dim=-1, descending=True, stable=True)
    # The weights, position by position (descending order): they do not depend on tie-breaks.
    torch.testing.assert_close(weights, ref_w, rtol=2e-6, atol=1e-7)
    assert bool((ids >= 0).all() and (ids < e).all())
    assert bool((ids.sort(-1).values.diff(dim=-1) > 0).all()), "ids repeat within a row"
    # Each chosen expert is a valid choice: its probability is at least the K-th largest.
    chosen_p = probs.gather(1, ids)
    assert bool((chosen_p >= ref_p[:, topk - 1 : topk] - _GAP).all())
    # Where the first K+1 reference probabilities are apart by more than rounding: the same ids.
    gaps = ref_p[:, : topk + 1].diff(dim=-1).abs() if topk < e else ref_p.diff(dim=-1).abs()
    clear = (gaps > _GAP).all(dim=-1) if gaps.shape[1] else torch.ones(t, dtype=torch.bool)
    assert_equal("ids (rows without near-ties)", ids[clear], ref_ids[clear, :topk])
    return weights, ids


DTYPES = [torch.float32, torch.float16, torch.float64] + ([torch.bfloat16] if DEVICE == "cuda" else [])
SHAPES = [(0, 8, 2), (1, 8, 2), (7, 1, 1), (5, 6, 6), (13, 20, 3), (9, 128, 8), (3, 257, 5)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("t,e,topk", SHAPES)
def test_softmax_topk(dtype, renormalize, t, e, topk):
    gating = (torch.randn(t, e, device=DEVICE) * 3).to(dtype)
    _check(gating, topk, renormalize)


def test_weights_sum_to_one_and_are_the_softmax():
    gating = torch.randn(11, 40, device=DEVICE)
    weights, ids = softmax_topk(gating, 40, True)
    torch.testing.assert_close(weights.sum(-1).cpu(), torch.ones(11), rtol=1e-6, atol=1e-6)
    weights, ids = softmax_topk(gating, 4, False)
    expected = gating.softmax(-1).gather(1, ids)
    torch.testing.assert_close(weights, expected, rtol=2e-6, atol=1e-7)


def test_non_contiguous_logits():
    base = torch.randn(12, 30, device=DEVICE)
    gating = base.t().contiguous().t()[::2]  # column-major rows, every other one
    assert not gating.is_contiguous()
    _check(gating, 3, True)
    w, i = softmax_topk(gating, 3, True)
    w2, i2 = softmax_topk(gating.contiguous(), 3, True)
    assert_equal("ids", i, i2)
    assert_equal("weights", w, w2)


def test_ties_go_to_the_lower_expert():
    e = 24
    gating = torch.zeros(4, e, device=DEVICE)
    gating[1, [5, 9, 17]] = 2.0  # three equal maxima
    gating[2, 3:20] = 1.0  # a run of equal ones
    gating[3, [20, 4]] = 5.0  # the tie between the two largest, then all-equal zeros
    weights, ids = softmax_topk(gating, 4, False)
    expected = torch.tensor([[0, 1, 2, 3], [5, 9, 17, 0], [3, 4, 5, 6], [4, 20, 0, 1]])
    assert_equal("ids", ids.cpu(), expected)
    probs = gating.softmax(-1).cpu()
    torch.testing.assert_close(weights.cpu(), probs.gather(1, expected), rtol=2e-6, atol=1e-7)


def test_nan_and_inf_rows_stay_in_their_row():
    gating = torch.randn(5, 10, device=DEVICE)
    gating[1, 3] = float("nan")
    gating[2, 7] = float("inf")
    gating[3] = float("-inf")
    weights, ids = softmax_topk(gating, 3, True)
    weights, ids = weights.cpu(), ids.cpu()
    bad = weights.isnan().any(-1)
    assert_equal("rows with NaN weights", bad, torch.tensor([False, True, True, True, False]))
    assert bool(weights[bad].isnan().all())
    assert bool((ids >= 0).all() and (ids < 10).all())
    assert bool((ids.sort(-1).values.diff(dim=-1) > 0).all())
    good = ~bad
    ref_w, ref_i = softmax_topk_reference(gating[good], 3, True)
    assert_equal("ids of finite rows", ids[good], ref_i.cpu())


def test_minus_inf_logits_are_never_chosen_before_finite_ones():
    gating = torch.randn(6, 12, device=DEVICE)
    gating[:, ::2] = float("-inf")
    weights, ids = softmax_topk(gating, 6, False)
    assert bool((ids.cpu() % 2 == 1).all())
    _check(gating, 8, True)  # past the finite ones: zeros, lowest ids first


def test_large_e():
    """One block of 4096 (E = 3000), and past MAX_EXPERTS the plain-torch path."""
    gating = torch.randn(3, 3000, device=DEVICE) * 4
    _check(gating, 6, True)
    e = topk_kernels.MAX_EXPERTS + 5
    gating = torch.randn(2, e, device=DEVICE) * 4
    weights, ids = softmax_topk(gating, 4, True)
    ref_w, ref_i = softmax_topk_reference(gating, 4, True)
    assert_equal("ids", ids, ref_i)
    assert_equal("weights", weights, ref_w)


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("t,e,topk", [(4, 8, 2), (13, 20, 3), (5, 6, 6), (7, 1, 1)])
def test_gradient_takes_the_reference(renormalize, t, e, topk):
    """With a gradient wanted, the weights and the logits' gradient equal those of the softmax
    and top-k written out in float64 (on the ids returned), for a random output gradient."""
    gating = (torch.randn(t, e, device=DEVICE) * 3).requires_grad_()
    weights, ids = softmax_topk(gating, topk, renormalize)
    d_weights = torch.randn_like(weights)
    weights.backward(d_weights)
    assert gating.grad is not None and gating.grad.shape == gating.shape

    gating64 = gating.detach().double().requires_grad_()
    ref = gating64.softmax(-1).gather(1, ids)
    if renormalize:
        ref = ref / ref.sum(-1, keepdim=True)
    ref.backward(d_weights.double())
    assert_close("weights", weights, ref, torch.float32)
    assert_close("gating.grad", gating.grad, gating64.grad, torch.float32)


def test_bad_input():
    g = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(TypeError, match="gating_output: expected a torch.Tensor"):
        softmax_topk(g.tolist(), 2, True)
    with pytest.raises(ValueError, match="gating_output: expected a 2-D tensor"):
        softmax_topk(g[0], 2, True)
    with pytest.raises(TypeError, match="gating_output: expected dtype"):
        softmax_topk(g.long(), 2, True)
    with pytest.raises(ValueError, match="topk: expected an int <= 8"):
        softmax_topk(g, 9, True)
    with pytest.raises(ValueError, match="topk: expected an int >= 1"):
        softmax_topk(g, 0, True)
    with pytest.raises(TypeError, match="topk: expected an int"):
        softmax_topk(g, 2.0, True)
    with pytest.raises(TypeError, match="renormalize: expected a bool"):
        softmax_topk(g, 2, 1)
    with pytest.raises(ValueError, match="topk: expected an int <= 0"):
        softmax_topk(g[:, :0], 1, True)


# ------------------------------------------------------------------------------------------------
# softmax_topk_route: the top-k and the routing maps of one decode step in one program.


def _route_check(gating, topk, renormalize):
    """The maps against a stable sort of the ids they imply, the ids and weights as `_check`."""
    t, e = gating.shape
    weights, counts, row_of_assignment, row_assignment = topk_kernels.softmax_topk_route(gating, topk, renormalize)
    n = t * topk
    assert weights.shape == (t, topk) and weights.dtype == torch.float32
    assert counts.shape == (e,) and row_of_assignment.shape == row_assignment.shape == (n,)
    assert counts.dtype == row_of_assignment.dtype == row_assignment.dtype == torch.int32
    counts, roa, rsa = counts.cpu().long(), row_of_assignment.cpu().long(), row_assignment.cpu().long()
    assert int(counts.sum()) == n and bool((counts >= 0).all())
    # The expert of each assignment, from its row and the counts: rows [start_e, end_e) are e's.
    ids = torch.searchsorted(counts.cumsum(0), roa, right=True).view(t, topk)
    expected_w, expected_ids = softmax_topk(gating, topk, renormalize)
    assert_equal("ids implied by the maps", ids, expected_ids.cpu())
    torch.testing.assert_close(weights.cpu(), expected_w.cpu(), rtol=2e-6, atol=1e-7)
    assert_equal("tokens per expert", counts, torch.bincount(ids.flatten(), minlength=e))
    order = torch.sort(ids.flatten(), stable=True).indices  # expert order, token order within
    assert_equal("row of each assignment", roa, torch.argsort(order))
    assert_equal("assignment of each row", rsa, order)


ROUTE_SHAPES = [(0, 8, 2), (1, 8, 2), (1, 1, 1), (5, 6, 6), (13, 20, 3), (64, 128, 8), (37, 1000, 4),
                (512, 8, 8), (300, 16, 2)]


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("t,e,topk", ROUTE_SHAPES)
def test_softmax_topk_route(renormalize, t, e, topk):
    """Sizes that do not divide a tile, several tiles of tokens (300 x 16: 256 a tile), the most
    rows (512 x 8 = 4096), E = 1000 (4 tokens a tile), top-k = E."""
    _route_check(torch.randn(t, e, device=DEVICE) * 3, topk, renormalize)


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32])
def test_softmax_topk_route_dtypes_and_strides(dtype):
    base = (torch.randn(40, 30, device=DEVICE) * 3).to(dtype)
    _route_check(base, 3, True)
    _route_check(base.t().contiguous().t()[::3], 5, False)


def test_softmax_topk_route_ties_and_nan_rows():
    gating = torch.zeros(6, 24, device=DEVICE)
    gating[1, [5, 9, 17]] = 2.0
    gating[2, 3:20] = 1.0
    gating[4, 7] = float("nan")
    gating[5] = float("-inf")
    weights, counts, roa, _ = topk_kernels.softmax_topk_route(gating, 4, True)
    w, ids = softmax_topk(gating, 4, True)
    torch.testing.assert_close(weights, w, rtol=2e-6, atol=1e-7, equal_nan=True)
    assert_equal("rows with NaN weights", weights.isnan().any(-1).cpu(), torch.tensor([False] * 4 + [True] * 2))
    ids_from_maps = torch.searchsorted(counts.long().cumsum(0), roa.long(), right=True).view(6, 4)
    assert_equal("ids", ids_from_maps, ids)


def test_softmax_topk_route_fits():
    """Within one program's sizes and its work bound (padded tokens x padded experts x K), the
    bound the caller's policy gives (`KernelPolicy.route_max_work`)."""
    fits = topk_kernels.route_fits
    w = KernelPolicy().route_max_work
    assert fits(16, 128, 8, w) and fits(1, 1024, 1, w)
    assert fits(64, 8, 2, w) and fits(512, 8, 2, w)
    assert not fits(17, 128, 8, w) and not fits(64, 128, 8, w)
    assert not fits(2049, 8, 2, w)
    assert not fits(1, topk_kernels.ROUTE_MAX_EXPERTS + 1, 1, w)
    assert fits(64, 128, 8, 65536) and not fits(1, 8, 1, 0)
