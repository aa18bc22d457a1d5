"""Block-sparse products sdd / dsd / dds against dense, masked references: forward and every
gradient, on dMoE topologies (built here from tokens per expert, docs/CONTRACTS.md) and on
general stk matrices, plus stanford-stk's own ops where they run."""

import dataclasses
import itertools
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest
import stk
import torch

from megablocks.ops import sparse as sp
from megablocks.ops.topology import ExpertTopology
from tests.conftest import DEVICE, FLOAT_DTYPES
from tests.utils import assert_close, assert_equal


# ---------------------------------------------------------------------------------------------
# Topologies and references written with plain loops
# ---------------------------------------------------------------------------------------------


def expert_topology(tokens_per_expert, block_size, ffn_hidden_size, device, *,
                    index_dtype=torch.int32, keeps_layout=True):
    """The dMoE topology of docs/CONTRACTS.md for these token counts, with the static bound
    P = ((N + E·(B−1)) // B)·B on the rows."""
    B, F, E = block_size, ffn_hidden_size, len(tokens_per_expert)
    C = -(-F // B)
    blocks = [-(-n // B) for n in tokens_per_expert]
    ends = list(itertools.accumulate(blocks))
    starts = [end - n for end, n in zip(ends, blocks)]
    R = ends[-1]
    num_block_rows = (sum(tokens_per_expert) + E * (B - 1)) // B
    nnz = num_block_rows * C
    expert_of_row = [next((e for e in range(E) if starts[e] <= r < ends[e]), E - 1)
                     for r in range(num_block_rows)]
    row = [s // C for s in range(nnz)]
    col = [expert_of_row[s // C] * C + s % C for s in range(nnz)]
    offsets = [min(r, R) * C for r in range(num_block_rows + 1)]
    col_t, block_t, offsets_t = [], [], [0]
    for e in range(E):
        for j in range(C):
            for r in range(starts[e], ends[e]):
                col_t.append(r)
                block_t.append(r * C + j)
            offsets_t.append(len(col_t))
    col_t += [0] * (nnz - len(col_t))
    block_t += [0] * (nnz - len(block_t))

    def ints(x, dtype=index_dtype):
        return torch.tensor(x, dtype=dtype, device=device)

    shape = torch.Size((num_block_rows * B, E * C * B))
    meta = (ints(row), ints(col), ints(offsets, torch.int32), ints(col_t), ints(offsets_t, torch.int32),
            ints(block_t, torch.int32))
    data = torch.empty((nnz, B, B), device="meta")
    if keeps_layout:  # as make_topology builds it: the layout survives .t()
        return ExpertTopology(shape, data, *meta, num_experts=E, ffn_hidden_size=F)
    m = stk.Matrix(shape, data, *meta)
    m.num_experts, m.ffn_hidden_size = E, F
    return m


META_NAMES = ("row_indices", "column_indices", "offsets", "column_indices_t", "offsets_t", "block_offsets_t")


def with_data(topo, data):
    meta = [getattr(topo, n) for n in META_NAMES]
    if isinstance(topo, ExpertTopology):
        return ExpertTopology(topo.size(), data, *meta, num_experts=topo.num_experts,
                              ffn_hidden_size=topo.ffn_hidden_size)
    m = stk.Matrix(topo.size(), data, *meta)
    if hasattr(topo, "num_experts"):
        m.num_experts, m.ffn_hidden_size = topo.num_experts, topo.ffn_hidden_size
    return m


def real_slots(m):
    return int(m.offsets[-1])


def dense_columns(m, c, expert_layout):
    """Dense columns block column c stands for (the expert map, or plain c·B + [0, B))."""
    B = m.blocking
    if expert_layout is None:
        return list(range(c * B, (c + 1) * B))
    E, F = expert_layout
    C = -(-F // B)
    e, j = divmod(c, C)
    return [e * F + j * B + i for i in range(B) if j * B + i < F]


def loop_sdd(a, b, m, expert_layout):
    out = torch.zeros(m.row_indices.numel(), m.blocking, m.blocking, dtype=torch.float64)
    B = m.blocking
    for s in range(real_slots(m)):
        r, c = int(m.row_indices[s]), int(m.column_indices[s])
        cols = dense_columns(m, c, expert_layout)
        out[s, :, :len(cols)] = a[r * B:(r + 1) * B].double() @ b[:, cols].double()
    return out


def loop_dense(m, expert_layout, num_cols):
    """The logical matrix (stored orientation) in dense coordinates, from its blocks."""
    B = m.blocking
    out = torch.zeros((m.offsets.numel() - 1) * B, num_cols, dtype=torch.float64)
    for s in range(real_slots(m)):
        r, c = int(m.row_indices[s]), int(m.column_indices[s])
        cols = dense_columns(m, c, expert_layout)
        out[r * B:(r + 1) * B, cols] = m.data[s, :, :len(cols)].double()
    return out


# ---------------------------------------------------------------------------------------------
# The references themselves: dense masked products == per-block loops
# ---------------------------------------------------------------------------------------------


def test_dense_references_match_block_loops():
    torch.manual_seed(1)
    topo = expert_topology([5, 0, 20], 16, 40, "cpu")
    layout = (3, 40)
    P, EF, H = topo.size()[0], 3 * 40, 24
    x, w1 = torch.randn(P, H, dtype=torch.float64), torch.randn(EF, H, dtype=torch.float64)
    data = torch.randn(topo.row_indices.numel(), 16, 16, dtype=torch.float64)
    data[real_slots(topo):] = float("nan")
    h = with_data(topo, data)
    dense_h = loop_dense(h, layout, EF)
    dy = torch.randn(P, H, dtype=torch.float64)
    torch.testing.assert_close(sp.sdd_reference(x, w1.t(), topo).data, loop_sdd(x, w1.t(), topo, layout))
    torch.testing.assert_close(sp.dsd_reference(h, w1), dense_h @ w1)
    torch.testing.assert_close(sp.dsd_reference(h.t(), dy), dense_h.t() @ dy)
    torch.testing.assert_close(sp.dds_reference(x.t(), h), x.t() @ dense_h)
    torch.testing.assert_close(sp.dds_reference(w1.t(), h.t()), w1.t() @ dense_h.t())

    g = stk.random.mask(48, 64, 0.5, blocking=16)
    g = stk.Matrix(g.size(), torch.randn(g.data.shape, dtype=torch.float64), g.row_indices,
                   g.column_indices, g.offsets, g.column_indices_t, g.offsets_t, g.block_offsets_t)
    dense_g = loop_dense(g, None, 64)
    a, b = torch.randn(48, 8, dtype=torch.float64), torch.randn(8, 64, dtype=torch.float64)
    torch.testing.assert_close(sp.sdd_reference(a, b, g).data, loop_sdd(a, b, g, None))
    torch.testing.assert_close(sp.dsd_reference(g, b.t()), dense_g @ b.t())
    torch.testing.assert_close(sp.dds_reference(b, g.t()), b @ dense_g.t())


# ---------------------------------------------------------------------------------------------
# Kernels vs references: forward and every gradient
# ---------------------------------------------------------------------------------------------


def embedded(t):
    """`t` as a strided view into a larger NaN-filled buffer: reading past its last row or column
    (or past a block's edge) picks up NaN."""
    rows, cols = t.shape[-2:]
    big = torch.nn.functional.pad(t, (0, 5, 0, 3), value=float("nan"))
    return big[..., :rows, :cols]


def check_product(name, fn, ref_fn, inputs, dtype):
    """Runs fn (inputs embedded in NaN) and ref_fn (fp64, NaN read as 0) on `inputs` (name →
    tensor, NaN where the op must not read), compares the output and every input's gradient."""
    args = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    ref_args = {k: torch.nan_to_num(v.detach().double(), nan=0.0).requires_grad_()
                for k, v in inputs.items()}
    out = fn(**{k: embedded(v) for k, v in args.items()})
    ref = ref_fn(**ref_args)
    assert out.dtype == dtype, f"{name}: output dtype {out.dtype}"
    assert_close(f"{name}: output", out, ref, dtype)
    grad = torch.randn(out.shape, dtype=torch.float64, device=out.device)
    out.backward(grad.to(dtype))
    ref.backward(grad)
    for k in inputs:
        assert args[k].grad is not None, f"{name}: no gradient for {k}"
        assert_close(f"{name}: grad {k}", args[k].grad, ref_args[k].grad, dtype)
    return out, args


MLP_CASES = {
    # tokens per expert, block size, F, H
    "partial_blocks": ([5, 0, 20], 16, 40, 24),
    "one_expert_gets_all": ([0, 33, 0], 16, 32, 16),
    "no_tokens": ([0, 0, 0], 16, 40, 24),
    "one_token": ([0, 1], 32, 50, 40),
    "block64": ([70, 0, 20], 64, 96, 80),
    "block128": ([100, 0, 140], 128, 200, 136),
}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", list(MLP_CASES))
def test_expert_mlp_products(case, dtype, device):
    """The products of the dMoE MLP (forward and backward) on hostile routings: F and H not
    multiples of B, experts without tokens, NaN in padding rows and in unused slots."""
    tokens, B, F, H = MLP_CASES[case]
    topo = expert_topology(tokens, B, F, device)
    E, P, nnz = len(tokens), topo.size()[0], topo.row_indices.numel()
    used_rows = sum(-(-n // B) * B for n in tokens)
    real = real_slots(topo)

    def rows_with_nan_padding(cols):
        x = torch.randn(P, cols, dtype=dtype, device=device)
        x[used_rows:] = float("nan")
        return x

    x, dy = rows_with_nan_padding(H), rows_with_nan_padding(H)
    w1 = torch.randn(E * F, H, dtype=dtype, device=device)
    g = torch.randn(H, E * F, dtype=dtype, device=device)
    h = torch.randn(nnz, B, B, dtype=dtype, device=device)
    h[real:] = float("nan")
    if F % B:  # columns past F in each expert's last block do not exist: never read
        h.view(-1, -(-F // B), B, B)[:, -1, :, F % B:] = float("nan")

    def mat(data):
        return with_data(topo, data)

    x1, _ = check_product("sdd(x, w1.t())", lambda x, w1: sp.sdd(x, w1.t(), topo).data,
                          lambda x, w1: sp.sdd_reference(x, w1.t(), topo).data,
                          {"x": x, "w1": w1}, dtype)
    assert_equal("sdd: unused slots", x1[real:], torch.zeros_like(x1[real:]))
    C = -(-F // B)
    last = x1.view(-1, C, B, B)[:, -1] if nnz else x1
    if F % B:
        assert bool((last[..., F % B:] == 0).all()), "sdd: columns past F must hold zeros"

    check_product("dsd(h, w2)", lambda h, w2: sp.dsd(mat(h), w2),
                  lambda h, w2: sp.dsd_reference(mat(h), w2), {"h": h, "w2": w1}, dtype)
    out, _ = check_product("dsd(h.t(), dy)", lambda h, dy: sp.dsd(mat(h).t(), dy),
                           lambda h, dy: sp.dsd_reference(mat(h).t(), dy),
                           {"h": h, "dy": dy}, dtype)
    assert out.shape == (E * F, H)
    check_product("dds(x.t(), h)", lambda x, h: sp.dds(x.t(), mat(h)),
                  lambda x, h: sp.dds_reference(x.t(), mat(h)), {"x": x, "h": h}, dtype)
    check_product("dds(g, h.t())", lambda g, h: sp.dds(g, mat(h).t()),
                  lambda g, h: sp.dds_reference(g, mat(h).t()), {"g": g, "h": h}, dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_expert_topology_with_plain_width_operands(dtype, device):
    """On an expert topology a dense side of E·C·B (not E·F) keeps plain stk semantics."""
    tokens, B, F, H = [9, 30, 0], 16, 40, 20
    topo = expert_topology(tokens, B, F, device)
    Q = topo.size()[1]
    x = torch.randn(topo.size()[0], H, dtype=dtype, device=device)
    x[sum(-(-n // B) * B for n in tokens):] = float("nan")
    w = torch.randn(Q, H, dtype=dtype, device=device)
    check_product("sdd(x, w.t()) plain width", lambda x, w: sp.sdd(x, w.t(), topo).data,
                  lambda x, w: sp.sdd_reference(x, w.t(), topo).data, {"x": x, "w": w}, dtype)
    h = torch.randn(topo.row_indices.numel(), B, B, dtype=dtype, device=device)
    check_product("dsd(h, w) plain width", lambda h, w: sp.dsd(with_data(topo, h), w),
                  lambda h, w: sp.dsd_reference(with_data(topo, h), w), {"h": h, "w": w}, dtype)


def _descriptor_case(device):
    if DEVICE == "cuda":  # GPU tiles: blocks of 128, 64-deep steps, 256 wide
        return [300, 0, 129, 17], 128, 512, 200
    return [40, 0, 17, 5], 16, 64, 40


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("product", ["sdd", "sdd_n_major", "dsd", "dsd_t", "dds", "dds_t"])
def test_tensor_descriptor_loads(product, dtype, device, monkeypatch):
    """On an expert topology with F a whole number of blocks and aligned operands, the products
    load through TMA descriptors (K and N not multiples of the tile: the descriptor's zero fill);
    the result equals the pointer loads' and the reference, forward and every gradient."""
    from megablocks.backend import sparse as backend

    tokens, B, F, H = _descriptor_case(device)
    topo = expert_topology(tokens, B, F, device)
    E, P, nnz = len(tokens), topo.size()[0], topo.row_indices.numel()
    used_rows = sum(-(-n // B) * B for n in tokens)
    x = torch.randn(P, H, dtype=dtype, device=device)
    x[used_rows:] = 0
    h = torch.randn(nnz, B, B, dtype=dtype, device=device)
    h[real_slots(topo):] = 0
    w = torch.randn(E * F, H, dtype=dtype, device=device)
    g = torch.randn(H, E * F, dtype=dtype, device=device)

    def mat(data):
        return with_data(topo, data)

    op, inputs = {
        "sdd": (lambda x, w: sp.sdd(x, w.t(), topo).data, {"x": x, "w": w}),
        "sdd_n_major": (lambda x, g: sp.sdd(x, g, topo).data, {"x": x, "g": g}),
        "dsd": (lambda h, w: sp.dsd(mat(h), w), {"h": h, "w": w}),
        "dsd_t": (lambda h, x: sp.dsd(mat(h).t(), x), {"h": h, "x": x}),
        "dds": (lambda x, h: sp.dds(x.t(), mat(h)), {"x": x, "h": h}),
        "dds_t": (lambda g, h: sp.dds(g, mat(h).t()), {"g": g, "h": h}),
    }[product]
    reference = {
        "sdd": lambda x, w: sp.sdd_reference(x, w.t(), topo).data,
        "sdd_n_major": lambda x, g: sp.sdd_reference(x, g, topo).data,
        "dsd": lambda h, w: sp.dsd_reference(mat(h), w),
        "dsd_t": lambda h, x: sp.dsd_reference(mat(h).t(), x),
        "dds": lambda x, h: sp.dds_reference(x.t(), mat(h)),
        "dds_t": lambda g, h: sp.dds_reference(g, mat(h).t()),
    }[product]

    # (the transposed sparse operand takes descriptors past a number of blocks per row that
    # these small topologies do not reach)
    monkeypatch.setattr(backend, "TMA_MIN_TRANSPOSED_STEPS", 1)
    taken = []
    tma_ok = backend.tma_ok
    monkeypatch.setattr(backend, "tma_ok", lambda *t: taken.append(tma_ok(*t)) or taken[-1])
    with_tma = op(**inputs)
    assert taken and all(taken), f"{product} did not take the tensor-descriptor loads"
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert_close(f"{product} by TMA", with_tma, reference(**{k: v.to(acc) for k, v in inputs.items()}), dtype)

    default = backend.default_config
    monkeypatch.setattr(backend, "default_config",
                        lambda *a: dataclasses.replace(default(*a), use_tma=False))
    taken.clear()
    with_pointers = op(**inputs)
    assert not taken, "use_tma=False still asked for descriptors"
    assert_close(f"{product} by TMA vs pointer loads", with_tma, with_pointers, dtype)
    monkeypatch.setattr(backend, "default_config", default)

    args = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    out = op(**args)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref_args = {k: v.to(acc).requires_grad_() for k, v in inputs.items()}
    reference(**ref_args).backward(grad.to(acc))
    for k in inputs:
        assert_close(f"{product} by TMA: grad {k}", args[k].grad, ref_args[k].grad, dtype)


GENERAL_CASES = {
    # rows, columns, sparsity, block size, K
    "half": (64, 96, 0.5, 16, 40),
    "mostly_empty": (96, 64, 0.8, 32, 24),
    "dense": (32, 48, 0.0, 16, 16),
    "empty": (32, 32, 1.0, 16, 8),
}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", list(GENERAL_CASES))
def test_general_topologies(case, dtype, device):
    """Any stk BCSR matrix (stk.random.mask: int16 indices, rows of any length)."""
    M, N, sparsity, B, K = GENERAL_CASES[case]
    torch.manual_seed(2)
    topo = stk.random.mask(M, N, sparsity, blocking=B).to(device)
    data = torch.randn(topo.data.shape, dtype=dtype, device=device)
    a = torch.randn(M, K, dtype=dtype, device=device)
    b = torch.randn(N, K, dtype=dtype, device=device)
    c = torch.randn(K, M, dtype=dtype, device=device)

    def mat(d):
        return with_data(topo, d)

    check_product("sdd(a, b.t())", lambda a, b: sp.sdd(a, b.t(), topo).data,
                  lambda a, b: sp.sdd_reference(a, b.t(), topo).data, {"a": a, "b": b}, dtype)
    check_product("dsd(S, b)", lambda s, b: sp.dsd(mat(s), b),
                  lambda s, b: sp.dsd_reference(mat(s), b), {"s": data, "b": b}, dtype)
    check_product("dsd(S.t(), a)", lambda s, a: sp.dsd(mat(s).t(), a),
                  lambda s, a: sp.dsd_reference(mat(s).t(), a), {"s": data, "a": a}, dtype)
    check_product("dds(c, S)", lambda c, s: sp.dds(c, mat(s)),
                  lambda c, s: sp.dds_reference(c, mat(s)), {"c": c, "s": data}, dtype)
    check_product("dds(b.t(), S.t())", lambda b, s: sp.dds(b.t(), mat(s).t()),
                  lambda b, s: sp.dds_reference(b.t(), mat(s).t()), {"b": b, "s": data}, dtype)


def test_more_than_int16_blocks(device):
    """40000 block rows or columns: int32 indices work; int16 indices are refused."""
    B, K, nb = 16, 8, 40000
    picks = [0, 32767, 32768, nb - 1]
    ints = dict(dtype=torch.int32, device=device)
    zero = torch.zeros(len(picks), **ints)
    idx = torch.tensor(picks, **ints)
    order = torch.arange(len(picks), **ints)
    # One block row, 40000 block columns; and its mirror image, 40000 block rows.
    wide = stk.Matrix(torch.Size((B, nb * B)), torch.randn(len(picks), B, B, device=device),
                      zero, idx, torch.tensor([0, len(picks)], **ints), zero,
                      torch.bucketize(torch.arange(nb + 1, **ints), idx, right=False).int(), order)
    tall = wide.t()
    tall_m = stk.Matrix(tall.size(), wide.data, idx, zero, wide.offsets_t, idx, wide.offsets,
                        order)
    a = torch.randn(B, K, device=device)
    b = torch.randn(K, nb * B, device=device)
    assert_close("sdd wide", sp.sdd(a, b, wide).data, sp.sdd_reference(a, b, wide).data)
    bt = torch.randn(nb * B, K, device=device)
    assert_close("dsd wide", sp.dsd(wide, bt), sp.dsd_reference(wide, bt))
    assert_close("dsd tall^T", sp.dsd(tall_m.t(), bt), sp.dsd_reference(tall_m.t(), bt))
    assert_close("dds tall", sp.dds(bt.t(), tall_m), sp.dds_reference(bt.t(), tall_m))
    assert_close("dds wide^T", sp.dds(bt.t(), wide.t()), sp.dds_reference(bt.t(), wide.t()))

    narrow = stk.Matrix(tall_m.size(), tall_m.data, idx.to(torch.int16), zero,
                        tall_m.offsets, idx, tall_m.offsets_t, order)
    with pytest.raises(ValueError, match="row_indices: int16 cannot hold index 39999"):
        sp.dsd(narrow.t(), bt)


@pytest.mark.skipif(DEVICE != "cpu", reason="stk's kernels run here only in the interpreter; "
                    "the GPU comparison is test_agrees_with_stk_on_gpu")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_agrees_with_stk_interpreted(dtype):
    """stanford-stk's own ops (Triton interpreter, dims multiples of 128)."""
    torch.manual_seed(3)
    topo = stk.random.mask(256, 384, 0.5, blocking=128)
    s = with_data(topo, torch.randn(topo.data.shape, dtype=dtype))
    a, b = torch.randn(256, 128, dtype=dtype), torch.randn(128, 384, dtype=dtype)
    assert_close("sdd", sp.sdd(a, b, topo).data, stk.ops.sdd(a, b, topo).data)
    assert_close("dsd", sp.dsd(s, b.t()), stk.ops.dsd(s, b.t()))
    assert_close("dsd^T", sp.dsd(s.t(), a), stk.ops.dsd(s.t(), a))
    assert_close("dds", sp.dds(a.t(), s), stk.ops.dds(a.t(), s))


_STK_GPU_SCRIPT = textwrap.dedent("""
    import sys, torch, stk
    torch.manual_seed(3)
    topo = stk.random.mask(512, 768, 0.5, blocking=128).cuda()
    s = stk.Matrix(topo.size(), torch.randn(topo.data.shape, dtype=torch.float16, device="cuda"),
                   topo.row_indices, topo.column_indices, topo.offsets, topo.column_indices_t,
                   topo.offsets_t, topo.block_offsets_t)
    a = torch.randn(512, 256, dtype=torch.float16, device="cuda")
    b = torch.randn(256, 768, dtype=torch.float16, device="cuda")
    out = dict(sdd=stk.ops.sdd(a, b, topo).data, dsd=stk.ops.dsd(s, b.t()),
               dsdT=stk.ops.dsd(s.t(), a), dds=stk.ops.dds(a.t(), s))
    torch.cuda.synchronize()
    torch.save(dict(inputs=dict(data=s.data, a=a, b=b, meta=[topo.row_indices,
               topo.column_indices, topo.offsets, topo.column_indices_t, topo.offsets_t,
               topo.block_offsets_t]), out=out), sys.argv[1])
""")


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU")
def test_agrees_with_stk_on_gpu():
    """stanford-stk's GPU kernels, run in a subprocess: on Triton >= 3.2 they may die with an
    illegal memory access, which would poison this process's CUDA context."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "stk.pt")
        proc = subprocess.run([sys.executable, "-c", _STK_GPU_SCRIPT, path], capture_output=True,
                              text=True, timeout=300)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            pytest.skip(f"stanford-stk's kernels fail on this Triton: {tail[0][:200]}")
        saved = torch.load(path)
    inp, ref = saved["inputs"], saved["out"]
    topo = stk.Matrix(torch.Size((512, 768)), inp["data"], *inp["meta"])
    a, b = inp["a"], inp["b"]
    assert_close("sdd vs stk", sp.sdd(a, b, topo).data, ref["sdd"])
    assert_close("dsd vs stk", sp.dsd(topo, b.t()), ref["dsd"])
    assert_close("dsd^T vs stk", sp.dsd(topo.t(), a), ref["dsdT"])
    assert_close("dds vs stk", sp.dds(a.t(), topo), ref["dds"])


@pytest.mark.skipif(DEVICE != "cuda", reason="real shapes run on the GPU only")
@pytest.mark.parametrize("block_size", [128, 64])
def test_real_shapes_gpu(block_size):
    """gpt-oss-like layer (H = F = 2880, 8 experts, 4096 routed rows), bf16, against fp32."""
    torch.manual_seed(4)
    dtype, E, F, H, N = torch.bfloat16, 8, 2880, 2880, 4096
    tokens = torch.bincount(torch.randint(0, E, (N,)), minlength=E).tolist()
    topo = expert_topology(tokens, block_size, F, "cuda")
    P, nnz = topo.size()[0], topo.row_indices.numel()
    x = torch.randn(P, H, dtype=dtype, device="cuda")
    w1 = torch.randn(E * F, H, dtype=dtype, device="cuda") / 50
    h = torch.randn(nnz, block_size, block_size, dtype=dtype, device="cuda")

    def ref32(fn, *args):
        return fn(*(t.float() if isinstance(t, torch.Tensor) else t for t in args))

    m, m32 = with_data(topo, h), with_data(topo, h.float())
    assert_close("sdd", sp.sdd(x, w1.t(), topo).data, sp.sdd_reference(x.float(), w1.t().float(), topo).data)
    assert_close("dsd", sp.dsd(m, w1), ref32(sp.dsd_reference, m32, w1))
    assert_close("dsd^T", sp.dsd(m.t(), x), ref32(sp.dsd_reference, m32.t(), x))
    assert_close("dds", sp.dds(x.t(), m), ref32(sp.dds_reference, x.t(), m32))
    assert_close("dds^T", sp.dds(w1.t(), m.t()), ref32(sp.dds_reference, w1.t(), m32.t()))


# ---------------------------------------------------------------------------------------------
# Registration and bad input
# ---------------------------------------------------------------------------------------------


def test_opcheck(device):
    """Schema, fake tensors, autograd registration and AOT dispatch of the three custom ops."""
    topo = expert_topology([5, 0, 20], 16, 40, device)
    meta = sp._meta(topo)
    x = torch.randn(topo.size()[0], 24, device=device, requires_grad=True)
    w = torch.randn(120, 24, device=device, requires_grad=True)
    h = torch.randn(topo.row_indices.numel(), 16, 16, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.megablocks.sdd, (x, w.t(), *meta, 16, 3, 40))
    torch.library.opcheck(torch.ops.megablocks.dsd, (h, *meta, False, w, 3, 40))
    torch.library.opcheck(torch.ops.megablocks.dds, (x.t(), h, *meta, False, 3, 40))
    torch.library.opcheck(torch.ops.megablocks.dds, (w.t(), h, *meta, True, 3, 40))


def test_expert_topology_keeps_its_layout(device):
    """`make_topology`'s ExpertTopology keeps the expert layout through `.t()` and `.clone()`; a
    plain `stk.Matrix` with the attributes loses them on `.t()` (stk semantics: E·C·B rows)."""
    topo = expert_topology([5, 0, 20], 16, 40, device, keeps_layout=False)
    data = torch.randn(topo.row_indices.numel(), 16, 16, device=device)
    h = with_data(topo, data)
    dy = torch.randn(topo.size()[0], 8, device=device)
    assert sp.dsd(h.t(), dy).shape == (3 * 48, 8)  # plain stk semantics: E·C·B rows
    kept = ExpertTopology(topo.size(), data, *(getattr(topo, n) for n in META_NAMES), num_experts=3,
                          ffn_hidden_size=40)
    for view in (kept.t(), kept.clone().t(), kept.t().t().t()):
        assert isinstance(view, ExpertTopology)
        assert (view.num_experts, view.ffn_hidden_size) == (3, 40)
        assert sp.dsd(view, dy).shape == (3 * 40, 8)
    assert isinstance(sp.sdd(torch.randn(topo.size()[0], 8, device=device), torch.randn(8, 120, device=device),
                             kept), ExpertTopology)


def test_bad_inputs(device):
    topo = expert_topology([5, 0, 20], 16, 40, device)
    P = topo.size()[0]
    x = torch.randn(P, 24, device=device)
    w = torch.randn(120, 24, device=device)
    h = with_data(topo, torch.randn(topo.row_indices.numel(), 16, 16, device=device))
    with pytest.raises(TypeError, match="topo: expected an stk.Matrix"):
        sp.sdd(x, w.t(), x)
    with pytest.raises(TypeError, match="b: expected dtype float32"):
        sp.sdd(x, w.t().half(), topo)
    with pytest.raises(TypeError, match="a: expected dtype in"):
        sp.sdd(x.long(), w.t(), topo)
    with pytest.raises(ValueError, match="topo: expected a non-transposed"):
        sp.sdd(x, w.t(), topo.t())
    with pytest.raises(ValueError, match="a: expected rows"):
        sp.sdd(x[:-16], w.t(), topo)
    with pytest.raises(ValueError, match=r"b \(columns\): expected size 120"):
        sp.sdd(x, w[:-1].t(), topo)
    with pytest.raises(ValueError, match="b: expected rows"):
        sp.dsd(h.t(), w)
    with pytest.raises(ValueError, match=r"b \(rows\): expected size 120"):
        sp.dsd(h, w[:-2])
    with pytest.raises(TypeError, match="b: expected dtype float32"):
        sp.dsd(h, w.half())
    with pytest.raises(ValueError, match="a: expected a 2-D tensor"):
        sp.dds(x[None], h)
    with pytest.raises(ValueError, match="a: expected columns"):
        sp.dds(x, h)
    bad = stk.Matrix(topo.size(), topo.data, topo.row_indices,
                     torch.full_like(topo.column_indices, 9), topo.offsets, topo.column_indices_t,
                     topo.offsets_t, topo.block_offsets_t)
    bad.num_experts, bad.ffn_hidden_size = 3, 40
    if device == "cpu":
        with pytest.raises(ValueError, match=r"column_indices: expected values in \[0, 9\)"):
            sp.sdd(x, w.t(), bad)
    wrong = with_data(topo, h.data)
    wrong.num_experts, wrong.ffn_hidden_size = 4, 40
    with pytest.raises(ValueError, match="num_experts, ffn_hidden_size: 4 experts"):
        sp.dsd(wrong, w)
    with pytest.raises(ValueError, match="data: expected square blocks"):
        sp.dsd(with_data(topo, torch.randn(topo.row_indices.numel(), 16, 8, device=device)), w)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_data_level_products_equal_the_matrix_ones(dtype, device):
    """`sdd_data` / `dsd_data` (the layer's path, no stk.Matrix built) against `sdd(...).data` and
    `dsd(matrix, b)`: the same values and the same gradients, bitwise."""
    tokens, B, F, H = [9, 0, 21], 16, 40, 24
    topo = expert_topology(tokens, B, F, device)
    E = len(tokens)
    x = torch.randn(topo.size()[0], H, device=device, dtype=dtype, requires_grad=True)
    w1 = torch.randn(E * F, H, device=device, dtype=dtype, requires_grad=True)
    w2 = torch.randn(E * F, H, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(topo.size()[0], H, device=device, dtype=dtype)

    def run(data_level):
        for t in (x, w1, w2):
            t.grad = None
        if data_level:
            y = sp.dsd_data(sp.sdd_data(x, w1.t(), topo), topo, w2)
        else:
            y = sp.dsd(sp.sdd(x, w1.t(), topo), w2)
        y.backward(g)
        return y.detach(), x.grad, w1.grad, w2.grad

    for name, a, b in zip(("y", "x.grad", "w1.grad", "w2.grad"), run(True), run(False)):
        assert_equal(name, a, b)
    with pytest.raises(TypeError, match="data"):
        sp.dsd_data([1.0], topo, w2)
    with pytest.raises(ValueError, match="non-transposed"):
        sp.sdd_data(x, w1.t(), topo.t())
