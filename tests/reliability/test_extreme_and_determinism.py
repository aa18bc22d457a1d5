"""Sizes past MegaBlocks' int16 block-index limits, and bitwise-repeatable steps.

On CUDA these run at full size: more than 32767 block rows (the int16 limit that crashes
stanford-stk's kernels on Triton >= 3.2), for the block sizes 16 and 128. On CPU the same code
runs at a tiny size under the interpreter, so the test logic itself is checked on every run.

Determinism: with `torch.use_deterministic_algorithms(True)` (scripts/reliability_gpu.sh sets
CUBLAS_WORKSPACE_CONFIG too), two dMoE forward+backward steps from the same seed and input give
bitwise identical outputs and gradients, on both expert paths.
"""

import pytest
import torch

from megablocks import ops
from megablocks.layers.dmoe import dMoE
from tests.conftest import DEVICE
from tests.layers.moe_reference import make_args
from tests.utils import assert_close, assert_equal

ON_GPU = DEVICE == "cuda"
INT16_BLOCK_ROWS = 32767


@pytest.mark.parametrize("block", [16, 128])
def test_more_than_int16_block_rows(block):
    """Routing, padded gather, topology, SDD/DSD and padded scatter past 32767 block rows,
    checked against a per-expert dense computation on a sample of tokens."""
    E, K, H, F = 8, 1, 64, 128
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    # Enough routed rows that the padded rows exceed 32767 blocks (CPU: 40 rows, a smoke size).
    tokens = (INT16_BLOCK_ROWS + 64) * block if ON_GPU else 40
    g = torch.Generator(device=DEVICE).manual_seed(0)
    top = torch.randint(0, E, (tokens, K), generator=g, device=DEVICE, dtype=torch.int32)
    meta = ops.routing_metadata(top, E, block)
    rows = ops.padded_rows_bound(tokens * K, E, block)
    if ON_GPU:
        assert rows // block > INT16_BLOCK_ROWS
    x = torch.randn(tokens, H, generator=g, device=DEVICE).to(dtype)
    w1 = (torch.randn(E * F, H, generator=g, device=DEVICE) / H**0.5).to(dtype)
    w2 = (torch.randn(E * F, H, generator=g, device=DEVICE) / F**0.5).to(dtype)
    x_PH = ops.padded_gather(x, meta.indices, meta.bin_ids, meta.bins, meta.padded_bins, K, block_size=block)
    topo = ops.make_topology(meta.padded_bins, block_size=block, num_block_rows=rows // block, ffn_hidden_size=F,
                             dtype=dtype)
    blocks_per_expert_row = -(-F // block)
    assert int(topo.offsets[-1]) == int(meta.padded_bins[-1]) // block * blocks_per_expert_row
    y_PH = ops.dsd(ops.sdd(x_PH, w1.t(), topo), w2)
    out = ops.padded_scatter(y_PH, meta.indices, meta.bin_ids, None, meta.bins, meta.padded_bins, K)
    # Reference on a sample of tokens spread over the whole range (the last ones included).
    sample = torch.unique(torch.cat([torch.linspace(0, tokens - 1, 512, device=DEVICE).long(),
                                     torch.arange(max(0, tokens - 64), tokens, device=DEVICE)]))
    e = top[sample, 0].long()
    w1_e = w1.view(E, F, H)[e].float()
    w2_e = w2.view(E, F, H)[e].float()
    h = torch.bmm(w1_e, x[sample].float().unsqueeze(-1)).squeeze(-1).to(dtype).float()
    expected = torch.bmm(h.unsqueeze(1), w2_e).squeeze(1)
    assert_close("out (sampled tokens)", out[sample], expected, dtype=dtype)
    assert not out.isnan().any()


@pytest.mark.parametrize("impl", ["sparse", "triton"])
def test_deterministic_steps(impl):
    """Two identical steps give bitwise identical outputs and gradients."""
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    T = 4096 if ON_GPU else 12
    H, F, E, K = (512, 1024, 8, 2) if ON_GPU else (40, 24, 4, 2)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=not ON_GPU)
    try:
        results = []
        for _ in range(2):
            torch.manual_seed(0)
            layer = dMoE(make_args(impl, dtype, hidden_size=H, ffn_hidden_size=F, moe_num_experts=E, moe_top_k=K,
                                   moe_block_size=128 if ON_GPU else 16))
            x = torch.randn(T, H, device=DEVICE, dtype=dtype, requires_grad=True)
            out = layer(x)
            (out.float() * torch.linspace(-1, 1, out.numel(), device=DEVICE).view_as(out)).sum().backward()
            grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
            results.append((out.detach().clone(), x.grad.clone(), grads))
    finally:
        torch.use_deterministic_algorithms(previous)
    (o1, gx1, g1), (o2, gx2, g2) = results
    assert_equal("out", o1, o2)
    assert_equal("grad x", gx1, gx2)
    assert g1.keys() == g2.keys() and g1
    for name in g1:
        assert_equal(f"grad {name}", g1[name], g2[name])
