"""Every tile configuration the library can pick, at shapes that span several tiles of it.

The grouped GEMM picks one of six GPU configurations (`megablocks.backend.gmm.default_config`:
fp32; decode, plain and GLU; the 16-bit main tiles, plain and GLU; the weight gradients' small-K
tiles with pointer loads); the block-sparse products
pick one per (product, block size, dtype) (`megablocks.backend.sparse.default_config`). The
op tests run at shapes of one or two tiles; here each configuration runs at a shape of several
tiles in both dimensions, with partial tiles at the edges, ragged groups and an empty one,
against the plain-torch references, every product form the layer uses. On a GPU each runs as the
library launches it (persistent programs, TMA); in the interpreter (CPU) the same tile shapes
run without the GPU-only launch features, so the tile arithmetic is checked here too.
"""

import dataclasses

import pytest
import torch

from megablocks.backend import gmm as gmm_backend
from megablocks.backend.activation import glu_forward
from megablocks.ops import sparse as sp
from megablocks.ops.gmm import gmm_reference
from tests.conftest import DEVICE, FLOAT_DTYPES
from tests.ops.test_sparse import expert_topology, with_data
from tests.utils import assert_close


def _gmm_configs():
    """{name: (config, dtypes it is picked for, rows per group that picks it, glu)}: every
    configuration `default_config` returns for a CUDA operand."""
    def pick(dtype, rows_per_group, glu, weight_grad=False):
        return gmm_backend.default_config(torch.empty(1, dtype=dtype, device="meta"), rows_per_group, glu,
                                          weight_grad=weight_grad)

    half = [d for d in FLOAT_DTYPES if d != torch.float32]
    return {
        "fp32": (pick(torch.float32, None, False), [torch.float32], None, False),
        "decode": (pick(torch.float16, 4, False), half, 4, False),
        "decode_glu": (pick(torch.float16, 4, True), half, 4, True),
        "main": (pick(torch.float16, None, False), half, None, False),
        "main_glu": (pick(torch.float16, None, True), half, None, True),
        "weight_grad_small": (pick(torch.float16, 4, False, weight_grad=True), half, 4, False),
    }


GMM_CONFIGS = _gmm_configs()


def test_the_sweep_covers_every_gmm_configuration():
    """The names above are as many different configurations (a new pick shows up here)."""
    assert len({c for c, *_ in GMM_CONFIGS.values()}) == len(GMM_CONFIGS)


def _launchable(cfg):
    # The interpreter has no SM count or TMA: the same tiles, launched a program per tile.
    if DEVICE == "cuda":
        return cfg
    return dataclasses.replace(cfg, persistent=False, tma_store=False)


@pytest.mark.parametrize("name", sorted(GMM_CONFIGS))
def test_gmm_configuration_over_several_tiles(name, device):
    cfg, dtypes, rows_per_group, glu = GMM_CONFIGS[name]
    cfg = _launchable(cfg)
    g = torch.Generator().manual_seed(11)
    K = 2 * cfg.block_k + 24  # several K steps and a partial one
    N = 2 * cfg.block_n + 40  # several column tiles and a partial one
    if rows_per_group is not None:  # decode: a few rows per group
        sizes = [rows_per_group, 0, rows_per_group - 1, 1]
    else:
        sizes = [cfg.block_m + 7, 0, 2 * cfg.block_m + 1, 5]
    batch_sizes = torch.tensor(sizes, dtype=torch.int32, device=device)
    E, M = len(sizes), sum(sizes)
    for dtype in dtypes:
        a = torch.randn(M, K, generator=g).to(device, dtype)
        b = (torch.randn(E, K, N, generator=g) / K ** 0.5).to(device, dtype)
        dy = torch.randn(M, N, generator=g).to(device, dtype)
        tag = f"{name} {dtype}"
        assert_close(f"{tag}: a @ b", gmm_backend.triton_gmm(a, b, batch_sizes, config=cfg),
                     gmm_reference(a, b, batch_sizes))
        bt = b.transpose(1, 2).contiguous()
        assert_close(f"{tag}: a @ b^T", gmm_backend.triton_gmm(a, bt, batch_sizes, trans_b=True, config=cfg),
                     gmm_reference(a, bt, batch_sizes, trans_b=True))
        assert_close(f"{tag}: a^T @ dy", gmm_backend.triton_gmm(a, dy, batch_sizes, trans_a=True, config=cfg),
                     gmm_reference(a, dy, batch_sizes, trans_a=True))
        if glu:
            up = (torch.randn(E, K, N, generator=g) / K ** 0.5).to(device, dtype)
            got = gmm_backend.triton_gmm(a, b, batch_sizes, config=cfg, glu="silu", b_up=up)
            want = glu_forward(gmm_reference(a, b, batch_sizes), gmm_reference(a, up, batch_sizes), "silu")
            assert_close(f"{tag}: silu(a @ b) * (a @ up)", got, want, family="layer")


# Block sizes the dMoE layer takes; on CPU the two small ones keep the interpreter quick.
SPARSE_BLOCKS = [16, 32, 64, 128] if DEVICE == "cuda" else [16, 32]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("block_size", SPARSE_BLOCKS)
def test_sparse_configuration_over_several_tiles(block_size, dtype, device):
    """sdd, dsd, dsd^T, dds and dds^T with the configuration picked for this block size and
    dtype, on a topology of several block rows per expert and block columns beyond one output
    tile (256 wide on the GPU), F not a multiple of B, an empty expert."""
    B = block_size
    wide = 256 if device == "cuda" else 64
    F = 2 * wide + B // 2
    H = 3 * wide // 2 + 8
    tokens = [3 * B + 5, 0, 2 * B - 1, 4 * B]
    topo = expert_topology(tokens, B, F, device)
    E, P, nnz = len(tokens), topo.size()[0], topo.row_indices.numel()
    g = torch.Generator().manual_seed(B)
    x = torch.randn(P, H, generator=g).to(device, dtype)
    w = (torch.randn(E * F, H, generator=g) / H ** 0.5).to(device, dtype)
    h = torch.randn(nnz, B, B, generator=g).to(device, dtype)
    m, m64 = with_data(topo, h), with_data(topo, h.double())
    x64, w64 = x.double(), w.double()
    assert_close("sdd", sp.sdd(x, w.t(), topo).data, sp.sdd_reference(x64, w64.t(), topo).data, dtype)
    assert_close("dsd", sp.dsd(m, w), sp.dsd_reference(m64, w64), dtype)
    assert_close("dsd^T", sp.dsd(m.t(), x), sp.dsd_reference(m64.t(), x64), dtype)
    assert_close("dds", sp.dds(x.t(), m), sp.dds_reference(x64.t(), m64), dtype)
    assert_close("dds^T", sp.dds(w.t(), m.t()), sp.dds_reference(w64.t(), m64.t()), dtype)
