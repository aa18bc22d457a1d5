"""megablocks.ops.gmm and megablocks.backend.gmm against the per-group loop reference.

Every backend is checked on the forward product and on both gradients, computed from the same
seeded inputs; the reference runs in float64. CPU runs use small shapes (Triton's interpreter),
a GPU runs shapes of real size and bfloat16 too.
"""

import importlib.util

import pytest
import torch

from megablocks.backend import gmm as gmm_backend
from megablocks.ops.gmm import gmm, gmm_reference
from tests.conftest import DEVICE, FLOAT_DTYPES
from tests.utils import assert_close, poisoned

HAS_GG = importlib.util.find_spec("grouped_gemm") is not None


def _backends():
    out = ["triton", "torch"]
    if DEVICE == "cuda" and HAS_GG:
        out.append("gg")
    return out


def _supported(backend, dtype, device):
    if backend == "gg":
        return dtype == torch.bfloat16
    return True


# (batch sizes, K, N). Most K and N do not divide the tiles; an odd K also rules out TMA
# (unaligned rows), so both load paths of the kernels run; 130 groups exceed one 128-wide block
# of the kernels' group table.
if DEVICE == "cuda":
    CASES = {
        "mixed": ([300, 0, 1, 517, 1024, 0, 129, 700], 1024, 768),
        "unaligned": ([130, 0, 257, 64, 1, 511], 1003, 517),
        "one_group": ([0, 0, 2049, 0], 520, 264),
        "one_row": ([0, 1, 0, 0], 264, 136),
        "no_rows": ([0, 0, 0], 64, 128),
        "many_groups": ([(e * 37) % 50 for e in range(130)], 256, 136),
    }
else:
    CASES = {
        "mixed": ([0, 17, 1, 32, 0, 30], 40, 24),
        "unaligned": ([9, 0, 33, 1], 37, 19),
        "one_group": ([0, 0, 45, 0], 24, 40),
        "one_row": ([0, 1, 0], 24, 40),
        "no_rows": ([0, 0, 0], 16, 8),
        "many_groups": ([e % 3 for e in range(130)], 16, 8),
    }


def _inputs(sizes, K, N, dtype, device, trans_b, sizes_dtype=torch.int32):
    batch_sizes = torch.tensor(sizes, dtype=sizes_dtype, device=device)
    M, E = sum(sizes), len(sizes)
    a = torch.randn(M, K, device=device).to(dtype)
    b = (torch.randn(E, N, K) if trans_b else torch.randn(E, K, N)).to(device, dtype) / K**0.5
    return a, b, batch_sizes


def _reference_with_grads(a, b, batch_sizes, trans_b, d_out, trans_a=False):
    a64 = a.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_()
    out = gmm_reference(a64, b64, batch_sizes.cpu(), trans_a=trans_a, trans_b=trans_b)
    out.backward(d_out.double())
    return out, a64.grad, b64.grad


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("backend", _backends())
def test_gmm_forward_and_grads(backend, dtype, trans_b, case, device):
    if not _supported(backend, dtype, device):
        pytest.skip(f"backend {backend} does not take {dtype} on {device}")
    sizes, K, N = CASES[case]
    a, b, batch_sizes = _inputs(sizes, K, N, dtype, device, trans_b)
    a.requires_grad_()
    b.requires_grad_()
    out = gmm(a, b, batch_sizes, trans_b=trans_b, backend=backend)
    d_out = torch.randn_like(out)
    out.backward(d_out)

    ref, d_a, d_b = _reference_with_grads(a, b, batch_sizes, trans_b, d_out)
    assert out.dtype == dtype
    assert_close("out", out, ref, dtype)
    assert_close("d_a", a.grad, d_a, dtype)
    assert_close("d_b", b.grad, d_b, dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("backend", _backends())
def test_gmm_variable_k_product(backend, dtype, device):
    """The variable-K form (the weight gradient) of the product op: per group a_e^T @ b_e, zeros
    for empty groups."""
    if not _supported(backend, dtype, device):
        pytest.skip(f"backend {backend} does not take {dtype} on {device}")
    sizes, K, N = CASES["mixed"]
    batch_sizes = torch.tensor(sizes, dtype=torch.int64, device=device)
    a = torch.randn(sum(sizes), K, device=device).to(dtype)
    b = torch.randn(sum(sizes), N, device=device).to(dtype)
    out = torch.ops.megablocks.gmm_product(a, b, batch_sizes, None, None, None, None, 1, False, True, False, backend)
    ref = gmm_reference(a.double(), b.double(), batch_sizes.cpu(), trans_a=True)
    assert_close("out", out, ref, dtype)
    assert out[[i for i, s in enumerate(sizes) if s == 0]].abs().max() == 0, "empty groups: not zero"


SCHEDULES = {
    "one_tile_each": dict(persistent=False, tma_store=False),
    "persistent": dict(persistent=True, tma_store=False),
    "persistent_tma_store": dict(persistent=True, tma_store=True),
}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("use_tma", [False, True])
def test_triton_load_paths_and_schedules(use_tma, schedule, device):
    """TMA descriptors and masked pointer loads; one tile per program, or persistent programs
    that loop over tiles (under the interpreter: 2 programs, so tiles of different groups
    interleave and a store past a group's rows would show); masked or TMA stores."""
    sizes, K, N = CASES["mixed"]
    a, b, batch_sizes = _inputs(sizes, K, N, torch.float16, device, trans_b=True)
    g = torch.randn(a.shape[0], N, device=device, dtype=torch.float16)
    cfg = SCHEDULES[schedule]
    out = gmm_backend.triton_gmm(a, b, batch_sizes, trans_b=True, use_tma=use_tma, config=cfg)
    expected = gmm_reference(a.double(), b.double(), batch_sizes.cpu(), trans_b=True)
    assert_close("out", out, expected, torch.float16)
    d_b = gmm_backend.triton_gmm(g, a, batch_sizes, trans_a=True, use_tma=use_tma, config=cfg)
    expected = gmm_reference(g.double(), a.double(), batch_sizes.cpu(), trans_a=True)
    assert_close("d_b", d_b, expected, torch.float16)


def test_triton_rows_outside_the_groups(device):
    """The kernels stay in bounds for any sizes: rows past the groups' total are written as zeros
    and never read (NaN-poisoned here), and groups are clipped at M."""
    sizes, K, N = CASES["mixed"]
    M = sum(sizes)
    extra = 5
    a = poisoned((M + extra, K), torch.float32, device)
    a[:M] = torch.randn(M, K, device=device)
    b = torch.randn(len(sizes), K, N, device=device)
    batch_sizes = torch.tensor(sizes, dtype=torch.int32, device=device)
    out = gmm_backend.triton_gmm(a, b, batch_sizes)
    assert_close("out[:M]", out[:M], gmm_reference(a[:M].double(), b.double(), batch_sizes.cpu()), torch.float32)
    assert out[M:].abs().max() == 0, "rows past the groups' total must be zero"

    g = poisoned((M + extra, N), torch.float32, device)
    g[:M] = torch.randn(M, N, device=device)
    d_b = gmm_backend.triton_gmm(a, g, batch_sizes, trans_a=True)
    expected = gmm_reference(a[:M].double(), g[:M].double(), batch_sizes.cpu(), trans_a=True)
    assert_close("d_b", d_b, expected, torch.float32)

    # Sizes past M: the last groups are clipped to the rows there are, a negative size is empty.
    over = torch.tensor([-3, M - 10, 50], dtype=torch.int64, device=device)
    b3 = b[:3]
    out = gmm_backend.triton_gmm(a[:M], b3, over)
    clipped = torch.tensor([0, M - 10, 10])
    assert_close("clipped", out, gmm_reference(a[:M].double(), b3.double(), clipped), torch.float32)


def test_noncontiguous_inputs(device):
    """Transposed and strided views give the product of their values."""
    sizes, K, N = CASES["unaligned"]
    M, E = sum(sizes), len(sizes)
    a = torch.randn(K, M, device=device).t()  # column-major a
    b = torch.randn(E, N, 2 * K, device=device)[:, :, ::2]  # no unit stride at all
    batch_sizes = torch.tensor(sizes, device=device)
    for backend in _backends():
        if not _supported(backend, torch.float32, device):
            continue
        out = gmm(a, b, batch_sizes, trans_b=True, backend=backend)
        assert_close(f"out[{backend}]", out, gmm_reference(a.double(), b.double(), batch_sizes.cpu(), trans_b=True), torch.float32)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_broadcast_gradient(backend, device):
    """`out.sum().backward()` hands a zero-stride gradient to the backward."""
    if not _supported(backend, torch.float32, device):
        pytest.skip(f"backend {backend} does not take float32 on {device}")
    sizes, K, N = CASES["mixed"]
    a, b, batch_sizes = _inputs(sizes, K, N, torch.float32, device, trans_b=False)
    a.requires_grad_()
    b.requires_grad_()
    gmm(a, b, batch_sizes, backend=backend).sum().backward()
    _, d_a, d_b = _reference_with_grads(a, b, batch_sizes, False, torch.ones(sum(sizes), N, device=device))
    assert_close("d_a", a.grad, d_a, torch.float32)
    assert_close("d_b", b.grad, d_b, torch.float32)


def test_batch_sizes_on_cpu(device):
    """grouped_gemm's convention (host-side int64 batch sizes) works with every backend."""
    sizes, K, N = CASES["mixed"]
    a, b, batch_sizes = _inputs(sizes, K, N, torch.float32, device, trans_b=False, sizes_dtype=torch.int64)
    expected = gmm_reference(a.double(), b.double(), batch_sizes.cpu())
    assert_close("out", gmm(a, b, batch_sizes.cpu(), backend="triton"), expected, torch.float32)


def test_default_backend(monkeypatch):
    a = torch.zeros(1, 1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert gmm_backend.default_backend(a) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert gmm_backend.default_backend(a) == "torch"
    if torch.cuda.is_available():
        assert gmm_backend.default_backend(a.cuda()) == "triton"


def test_triton_on_cpu_without_interpreter_runs_the_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    sizes, K, N = CASES["mixed"]
    a, b, batch_sizes = _inputs(sizes, K, N, torch.float32, "cpu", trans_b=False)
    out = gmm(a, b, batch_sizes, backend="triton")
    assert_close("out", out, gmm_reference(a.double(), b.double(), batch_sizes), torch.float32)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        gmm_backend.gmm(a, b, batch_sizes, backend="triton")


def test_opcheck(device):
    """Schema, fake (meta) implementation and autograd registration of the custom op."""
    sizes, K, N = CASES["unaligned"]
    a, b, batch_sizes = _inputs(sizes, K, N, torch.float32, device, trans_b=True)
    a.requires_grad_()
    b.requires_grad_()
    torch.library.opcheck(
        torch.ops.megablocks.gmm.default, (a, b, None, batch_sizes, None, None, 1, True, "triton"),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_compiles_in_one_graph(device):
    """The custom op (with its fake implementation and autograd) traces into one graph."""
    sizes, K, N = CASES["mixed"]
    a, b, batch_sizes = _inputs(sizes, K, N, torch.float32, device, trans_b=True)
    a.requires_grad_()
    b.requires_grad_()
    fn = torch.compile(lambda a, b, s: gmm(a, b, s, trans_b=True, backend="triton"), backend="aot_eager", fullgraph=True)
    out = fn(a, b, batch_sizes)
    d_out = torch.randn_like(out)
    out.backward(d_out)
    ref, d_a, d_b = _reference_with_grads(a, b, batch_sizes, True, d_out)
    assert_close("out", out, ref, torch.float32)
    assert a.grad is not None and a.grad.shape == a.shape
    assert_close("d_a", a.grad, d_a, torch.float32)
    assert_close("d_b", b.grad, d_b, torch.float32)


@pytest.mark.skipif(DEVICE != "cuda", reason="host-device syncs exist only with a GPU")
def test_triton_backend_never_syncs(device):
    """Forward and backward with device-side batch sizes run without a host-device sync."""
    sizes, K, N = CASES["mixed"]
    a, b, batch_sizes = _inputs(sizes, K, N, torch.bfloat16, device, trans_b=True)
    a.requires_grad_()
    b.requires_grad_()
    gmm(a, b, batch_sizes, trans_b=True, backend="triton").sum().backward()  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = gmm(a, b, batch_sizes, trans_b=True, backend="triton")
        out.backward(torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_bad_inputs(device):
    sizes, K, N = CASES["mixed"]
    M = sum(sizes)
    a, b, batch_sizes = _inputs(sizes, K, N, torch.float32, device, trans_b=False)
    with pytest.raises(TypeError, match="a: expected a torch.Tensor"):
        gmm(a.tolist(), b, batch_sizes)
    with pytest.raises(TypeError, match="a: expected dtype"):
        gmm(a.double(), b.double(), batch_sizes)
    with pytest.raises(TypeError, match="b: expected the dtype of a"):
        gmm(a, b.half(), batch_sizes)
    with pytest.raises(TypeError, match="batch_sizes: expected dtype"):
        gmm(a, b, batch_sizes.float())
    with pytest.raises(ValueError, match="b: expected a 3-D tensor"):
        gmm(a, b[0], batch_sizes)
    with pytest.raises(ValueError, match=rf"b: expected b.shape\[1\] == {K}"):
        gmm(a, b[:, :-1], batch_sizes)
    with pytest.raises(ValueError, match=rf"b: expected b.shape\[2\] \(trans_b=True\) == {K}"):
        gmm(a, b, batch_sizes, trans_b=True)
    with pytest.raises(ValueError, match=f"batch_sizes: expected {len(sizes)} entries"):
        gmm(a, b, batch_sizes[:-1])
    with pytest.raises(ValueError, match="backend: expected one of"):
        gmm(a, b, batch_sizes, backend="cutlass")
    with pytest.raises(ValueError, match="trans_a, trans_b: at most one"):
        gmm_backend.gmm(a, b, batch_sizes, trans_a=True, trans_b=True)
    with pytest.raises(ValueError, match=f"b: expected {M} rows"):
        gmm_backend.gmm(a, a[:-1], batch_sizes, trans_a=True)
    # Values are checked on CPU batch sizes (no sync needed there).
    cpu_sizes = batch_sizes.cpu()
    with pytest.raises(ValueError, match=f"batch_sizes: expected non-negative sizes summing to {M}"):
        gmm(a, b, cpu_sizes + 1)
    bad = cpu_sizes.clone()
    bad[0], bad[1] = -1, bad[1] + 1
    with pytest.raises(ValueError, match="got min -1"):
        gmm(a, b, bad)


def test_backend_dtype_and_package_errors(device):
    sizes, K, N = CASES["mixed"]
    a, b, batch_sizes = _inputs(sizes, K, N, torch.float32, device, trans_b=False)
    with pytest.raises(TypeError, match="backend='gg'"):
        gmm(a, b, batch_sizes, backend="gg")
    if not HAS_GG and device == "cuda":
        with pytest.raises(ImportError, match=r"pip install megablocks\[gg\]"):
            gmm(a.bfloat16(), b.bfloat16(), batch_sizes, backend="gg")


# ------------------------------------------------------------------------------------------------
# Two products of one input: gmm_shared_input and the accumulating kernel behind its backward.


@pytest.mark.parametrize("case", ["mixed", "unaligned", "no_rows", "many_groups"])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("backend", _backends())
def test_gmm_shared_input_forward_and_grads(backend, dtype, trans_b, case, device):
    """Both outputs and all three gradients equal those of two separate products (the gradient of
    a summed over both)."""
    from megablocks.ops.gmm import gmm_shared_input

    if not _supported(backend, dtype, device):
        pytest.skip(f"backend {backend} does not take {dtype} on {device}")
    sizes, K, N = CASES[case]
    a, b1, batch_sizes = _inputs(sizes, K, N, dtype, device, trans_b)
    b2 = torch.randn_like(b1.float()).to(dtype) / K**0.5
    for t in (a, b1, b2):
        t.requires_grad_()
    out1, out2 = gmm_shared_input(a, b1, b2, batch_sizes, trans_b=trans_b, backend=backend)
    d1, d2 = torch.randn_like(out1), torch.randn_like(out2)
    torch.autograd.backward([out1, out2], [d1, d2])

    a64, b164, b264 = (t.detach().double().requires_grad_() for t in (a, b1, b2))
    r1 = gmm_reference(a64, b164, batch_sizes.cpu(), trans_b=trans_b)
    r2 = gmm_reference(a64, b264, batch_sizes.cpu(), trans_b=trans_b)
    torch.autograd.backward([r1, r2], [d1.double(), d2.double()])
    assert_close("out1", out1, r1, dtype)
    assert_close("out2", out2, r2, dtype)
    assert_close("d_a", a.grad, a64.grad, dtype)
    assert_close("d_b1", b1.grad, b164.grad, dtype)
    assert_close("d_b2", b2.grad, b264.grad, dtype)


def test_gmm_shared_input_one_output_used(device):
    from megablocks.ops.gmm import gmm_shared_input

    sizes, K, N = CASES["mixed"]
    a, b1, batch_sizes = _inputs(sizes, K, N, torch.float32, device, trans_b=True)
    b2 = torch.randn_like(b1)
    a.requires_grad_()
    out1, _ = gmm_shared_input(a, b1, b2, batch_sizes, trans_b=True)
    d1 = torch.randn_like(out1)
    out1.backward(d1)
    a64 = a.detach().double().requires_grad_()
    gmm_reference(a64, b1.double(), batch_sizes.cpu(), trans_b=True).backward(d1.double())
    assert_close("d_a", a.grad, a64.grad, torch.float32)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("use_tma", [False, True])
def test_triton_accumulate_into(use_tma, schedule, device):
    """`accumulate_into` adds the product to the tensor's values, rows past the groups' total
    included (left as they were), on every load path and schedule."""
    sizes, K, N = CASES["mixed"]
    a, b, batch_sizes = _inputs(sizes, K, N, torch.float16, device, trans_b=True)
    extra = 3
    a = torch.cat([a, torch.randn(extra, K, device=device, dtype=a.dtype)])
    base = torch.randn(a.shape[0], N, device=device, dtype=torch.float16)
    out = base.clone()
    got = gmm_backend.triton_gmm(a, b, batch_sizes, trans_b=True, use_tma=use_tma, config=SCHEDULES[schedule],
                                 accumulate_into=out)
    assert got is out
    M = sum(sizes)
    expected = gmm_reference(a[:M].double(), b.double(), batch_sizes.cpu(), trans_b=True) + base[:M].double()
    assert_close("out[:M]", out[:M], expected, torch.float16)
    assert torch.equal(out[M:], base[M:]), "rows past the groups' total must keep their values"


def test_gmm_shared_input_bad_inputs(device):
    from megablocks.ops.gmm import gmm_shared_input

    a, b1, batch_sizes = _inputs([3, 2], 8, 4, torch.float32, device, trans_b=False)
    with pytest.raises(ValueError, match="b2: expected the shape of b1"):
        gmm_shared_input(a, b1, b1[:, :4], batch_sizes)
    with pytest.raises(TypeError):
        gmm_shared_input(a, b1, b1.half(), batch_sizes)


# --------------------------------------------------------------------------------------------
# The GLU form (`triton_gmm(..., glu=)`): b holds the gate's N columns then the up projection's;
# the result is act(a @ gate) * (a @ up) per group, from the fp32 accumulators.

def _clamped_swiglu(gate, up):  # gpt-oss's, as transformers' GptOssExperts computes it
    gate, up = gate.clamp(max=7.0), up.clamp(-7.0, 7.0)
    return (up + 1) * gate * torch.sigmoid(1.702 * gate)


_GLU_REFERENCE = {
    "silu": lambda g, u: torch.nn.functional.silu(g) * u,
    "gelu": lambda g, u: torch.nn.functional.gelu(g) * u,
    "gelu_tanh": lambda g, u: torch.nn.functional.gelu(g, approximate="tanh") * u,
    "relu": lambda g, u: torch.nn.functional.relu(g) * u,
    "clamped_swiglu": _clamped_swiglu,
}


def _glu_reference(a, b, batch_sizes, trans_b, activation, bias=None):
    """act(gate) * up per group in float64; `bias` [E, 2N] (gate's, then up's) added per group first."""
    n = (b.shape[1] if trans_b else b.shape[2]) // 2
    h = gmm_reference(a.double(), b.double(), batch_sizes.cpu(), trans_b=trans_b)
    if bias is not None:
        h = h + bias.double().cpu().repeat_interleave(batch_sizes.cpu().long(), dim=0).to(h.device)
    return _GLU_REFERENCE[activation](h[:, :n], h[:, n:])


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_triton_glu_epilogue(dtype, trans_b, case, device):
    """Every case of the plain product (N odd included: a gate tile runs into the up columns and
    an up tile past b's end; under the interpreter an unaligned N also takes the pointer loads)."""
    sizes, K, N = CASES[case]
    a, b, batch_sizes = _inputs(sizes, K, 2 * N, dtype, device, trans_b)
    for activation in ("silu", "gelu_tanh") if case != "mixed" else tuple(_GLU_REFERENCE):
        out = gmm_backend.triton_gmm(a, b, batch_sizes, trans_b=trans_b, glu=activation)
        assert out.shape == (a.shape[0], N) and out.dtype == dtype
        assert_close(f"out ({activation})", out, _glu_reference(a, b, batch_sizes, trans_b, activation), dtype)


@pytest.mark.parametrize("use_tma", [False, True])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_triton_glu_with_row_map_and_schedules(schedule, use_tma, device):
    """The GLU form reading its rows through a map (rows of a [T, K] tensor, in any order and
    repeated; a negative entry reads zeros), on every load path and schedule; rows of the token
    tensor the map never names are NaN and must not leak."""
    sizes, K, N = CASES["mixed"]
    M, T = sum(sizes), 50
    x = poisoned((T + 3, K), torch.float16, device)[:T]
    x.copy_(torch.randn(T, K, device=device))
    rows = torch.randint(0, T, (M,), device=device, dtype=torch.int32)
    rows[:3] = -1
    b = (torch.randn(len(sizes), 2 * N, K, device=device) / K**0.5).half()
    batch_sizes = torch.tensor(sizes, dtype=torch.int32, device=device)
    out = gmm_backend.triton_gmm(x, b, batch_sizes, trans_b=True, a_rows=rows, glu="silu",
                                 use_tma=use_tma, config=SCHEDULES[schedule])
    gathered = torch.where((rows >= 0)[:, None], x[rows.clamp(min=0).long()], 0.0)
    assert_close("out", out, _glu_reference(gathered, b, batch_sizes, True, "silu"), torch.float16)


def _cat_gate_up(b, b_up, trans_b):
    return torch.cat([b, b_up], dim=1 if trans_b else 2)


@pytest.mark.parametrize("case, use_tma", [("mixed", True), ("mixed", False), ("unaligned", None), ("no_rows", None)])
@pytest.mark.parametrize("trans_b", [False, True])
def test_triton_glu_separate_up_projection(trans_b, case, use_tma, device):
    """`b_up`: the gate and up projections as two tensors (dMoE's w1 and v1), equal to the same
    columns concatenated; with a row map, on both load paths (an unaligned K takes pointer loads)."""
    sizes, K, N = CASES[case]
    a, b, batch_sizes = _inputs(sizes, K, N, torch.float16, device, trans_b)
    b_up = (torch.randn(b.shape, device=device) / K**0.5).half()
    expected = _glu_reference(a, _cat_gate_up(b, b_up, trans_b), batch_sizes, trans_b, "silu")
    out = gmm_backend.triton_gmm(a, b, batch_sizes, trans_b=trans_b, glu="silu", b_up=b_up, use_tma=use_tma)
    assert_close("out", out, expected, torch.float16)
    # Through a row map: the rows of a in reverse order, read from a [T, K] tensor.
    rows = torch.arange(a.shape[0] - 1, -1, -1, device=device, dtype=torch.int32)
    out = gmm_backend.triton_gmm(a.flip(0).contiguous(), b, batch_sizes, trans_b=trans_b, a_rows=rows, glu="silu",
                                 b_up=b_up, use_tma=use_tma)
    assert_close("out (row map)", out, expected, torch.float16)


def test_triton_glu_separate_up_layouts(device):
    """dMoE's [E·F, H] weights viewed as [E, F, H] (read transposed), and a b_up whose strides
    differ from b's (both are then laid out alike first)."""
    sizes, K, N = [5, 0, 9, 3], 24, 20
    E = len(sizes)
    a, _, batch_sizes = _inputs(sizes, K, N, torch.float32, device, True)
    w1 = torch.randn(E * N, K, device=device) / K**0.5
    v1 = torch.randn(E * N, K, device=device) / K**0.5
    b, b_up = w1.view(E, N, K), v1.view(E, N, K)
    expected = _glu_reference(a, _cat_gate_up(b, b_up, True), batch_sizes, True, "gelu")
    out = gmm_backend.triton_gmm(a, b, batch_sizes, trans_b=True, glu="gelu", b_up=b_up)
    assert_close("out", out, expected, torch.float32)
    strided_up = b_up.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    assert strided_up.stride() != b.stride()
    out = gmm_backend.triton_gmm(a, b, batch_sizes, trans_b=True, glu="gelu", b_up=strided_up)
    assert_close("out (other strides)", out, expected, torch.float32)


@pytest.mark.skipif(DEVICE != "cuda", reason="the decode tiles are chosen on CUDA only")
@pytest.mark.parametrize("rows_per_group", [1, 4, 18, 24])
@pytest.mark.parametrize("glu", [None, "silu"])
def test_triton_decode_tiles(rows_per_group, glu, device):
    """Forward forms with few rows per group take the decode tiles (`_config`), the others not:
    bf16, uneven groups around the average (some over one tile), empty ones, a K that is not a
    multiple of the K step."""
    E, K, N = 24, 1000, 384
    sizes = [max(0, rows_per_group + (e % 5) - 2) if e % 7 else 0 for e in range(E)]
    cfg = gmm_backend.default_config(torch.empty(1, device=device, dtype=torch.bfloat16), sum(sizes) / E,
                                     glu is not None)
    assert (cfg.block_m == 16) == (sum(sizes) / E <= gmm_backend.DECODE_MAX_ROWS_PER_GROUP)
    a, b, batch_sizes = _inputs(sizes, K, 2 * N if glu else N, torch.bfloat16, device, trans_b=True)
    out = gmm_backend.triton_gmm(a, b, batch_sizes, trans_b=True, glu=glu)
    if glu:
        expected = _glu_reference(a, b, batch_sizes, True, glu)
    else:
        expected = gmm_reference(a.double(), b.double(), batch_sizes.cpu(), trans_b=True)
    assert_close("out", out, expected, torch.bfloat16)


@pytest.mark.skipif(DEVICE != "cuda", reason="the small-K weight-gradient tiles are chosen on CUDA only")
@pytest.mark.parametrize("rows_per_group", [1, 4, 16, 17, 40])
def test_triton_weight_grad_small_k_tiles(rows_per_group, device):
    """The weight gradient (variable-K form) with few rows per group takes the small-K tiles and
    pointer loads, the others the main tiles: bf16, uneven groups (some past one 16-row step),
    empty ones, K and N not multiples of the tile; plain, into an fp32 accumulator, and through a
    row map (the up projections' gradient reading the token rows)."""
    E, K, N = 24, 1000, 600
    sizes = [max(0, rows_per_group + (e % 5) - 2) if e % 7 else 0 for e in range(E)]
    cfg = gmm_backend.default_config(torch.empty(1, device=device, dtype=torch.bfloat16), sum(sizes) / E,
                                     weight_grad=True)
    small = sum(sizes) / E <= gmm_backend.WEIGHT_GRAD_SMALL_MAX_ROWS_PER_GROUP
    assert (cfg.block_k == 16 and not cfg.tma_loads) == small, cfg
    g = torch.Generator().manual_seed(rows_per_group)
    M = sum(sizes)
    a = torch.randn(M, K, generator=g).to(device, torch.bfloat16)
    dy = torch.randn(M, N, generator=g).to(device, torch.bfloat16)
    batch_sizes = torch.tensor(sizes, dtype=torch.int32, device=device)
    expected = gmm_reference(a.double(), dy.double(), batch_sizes.cpu(), trans_a=True)
    assert_close("a^T dy", gmm_backend.triton_gmm(a, dy, batch_sizes, trans_a=True), expected, torch.bfloat16)
    acc = torch.randn(E, K, N, generator=g).to(device)
    want = acc.double() + expected.double()
    gmm_backend.triton_gmm(a, dy, batch_sizes, trans_a=True, accumulate_into=acc)
    assert_close("acc += a^T dy", acc, want, torch.float32)
    # Through a row map: row i of the product's `a` is token row rows[i] // top_k of x.
    top_k, T = 2, (M + 1) // 2
    x = torch.randn(T, K, generator=g).to(device, torch.bfloat16)
    rows = torch.randperm(T * top_k, generator=g)[:M].to(device, torch.int32)
    gathered = x[(rows // top_k).long()]
    expected = gmm_reference(gathered.double(), dy.double(), batch_sizes.cpu(), trans_a=True)
    got = gmm_backend.triton_gmm(x, dy, batch_sizes, trans_a=True, a_rows=rows, rows_top_k=top_k)
    assert_close("x[map]^T dy", got, expected, torch.bfloat16)
    expected_t = gmm_reference(dy.double(), gathered.double(), batch_sizes.cpu(), trans_a=True)
    got_t = gmm_backend.triton_gmm(dy, x, batch_sizes, trans_a=True, b_rows=rows, rows_top_k=top_k)
    assert_close("dy^T x[map]", got_t, expected_t, torch.bfloat16)


@pytest.mark.parametrize("case", ["mixed", "unaligned", "no_rows"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_triton_bias_epilogue(dtype, case, device):
    """The experts' biases (`bias=`, row e added to group e's rows in the accumulator): the plain
    product, the GLU on concatenated gate/up columns (bias [E, 2N]), the GLU with b_up and
    bias_up, through a row map; with the clamped SwiGLU (large biases: its clamps active)."""
    sizes, K, N = CASES[case]
    E = len(sizes)
    a, b, batch_sizes = _inputs(sizes, K, 2 * N, dtype, device, True)
    bias = (8 * torch.randn(E, 2 * N, device=device)).to(dtype)
    rows_of = batch_sizes.cpu().long()

    out = gmm_backend.triton_gmm(a, b, batch_sizes, trans_b=True, bias=bias)
    expected = gmm_reference(a.double(), b.double(), batch_sizes.cpu(), trans_b=True)
    expected = expected + bias.double().cpu().repeat_interleave(rows_of, dim=0).to(expected.device)
    assert_close("out (plain)", out, expected, dtype)
    for activation in ("silu", "clamped_swiglu"):
        expected = _glu_reference(a, b, batch_sizes, True, activation, bias)
        out = gmm_backend.triton_gmm(a, b, batch_sizes, trans_b=True, glu=activation, bias=bias)
        assert_close(f"out ({activation}, concatenated)", out, expected, dtype)
        rows = torch.arange(a.shape[0] - 1, -1, -1, device=device, dtype=torch.int32)
        out = gmm_backend.triton_gmm(a.flip(0).contiguous(), b[:, :N], batch_sizes, trans_b=True, a_rows=rows,
                                     glu=activation, b_up=b[:, N:], bias=bias[:, :N], bias_up=bias[:, N:])
        assert_close(f"out ({activation}, b_up, row map)", out, expected, dtype)


def test_triton_bias_with_no_token_rows(device):
    """A row map over no token rows reads zeros: the result is each group's bias (through the GLU)."""
    sizes, K, N = [2, 0, 3], 16, 8
    batch_sizes = torch.tensor(sizes, dtype=torch.int32, device=device)
    b = torch.randn(3, 2 * N, K, device=device)
    bias = 8 * torch.randn(3, 2 * N, device=device)
    rows = torch.zeros(5, dtype=torch.int32, device=device)
    out = gmm_backend.triton_gmm(torch.empty(0, K, device=device), b, batch_sizes, trans_b=True, a_rows=rows,
                                 glu="clamped_swiglu", bias=bias)
    expected = _GLU_REFERENCE["clamped_swiglu"](bias[:, :N], bias[:, N:]).repeat_interleave(batch_sizes.long(), dim=0)
    assert_close("out", out, expected)


def test_triton_bias_bad_arguments(device):
    a, b, batch_sizes = _inputs([3, 2], 16, 8, torch.float32, device, trans_b=True)
    bias = torch.zeros(2, 8, device=device)
    with pytest.raises(ValueError, match=r"bias: expected shape \(2, 8\)"):
        gmm_backend.triton_gmm(a, b, batch_sizes, trans_b=True, bias=bias[:, :4])
    with pytest.raises(ValueError, match="bias: expected a 2-D float tensor"):
        gmm_backend.triton_gmm(a, a, batch_sizes, trans_a=True, bias=bias)
    with pytest.raises(ValueError, match="bias: expected a 2-D float tensor"):
        gmm_backend.triton_gmm(a, b, batch_sizes, trans_b=True, bias=bias.long())
    with pytest.raises(ValueError, match="bias_up: expected"):
        gmm_backend.triton_gmm(a, b, batch_sizes, trans_b=True, glu="silu", b_up=b, bias=bias)
    with pytest.raises(ValueError, match="bias_up: expected"):
        gmm_backend.triton_gmm(a, b, batch_sizes, trans_b=True, bias=bias, bias_up=bias)


def test_triton_glu_bad_arguments(device):
    a, b, batch_sizes = _inputs([3, 2], 16, 8, torch.float32, device, trans_b=True)
    with pytest.raises(ValueError, match="glu: expected one of"):
        gmm_backend.triton_gmm(a, b, batch_sizes, trans_b=True, glu="tanh")
    with pytest.raises(ValueError, match="glu: expected one of"):
        gmm_backend.triton_gmm(a, a, batch_sizes, trans_a=True, glu="silu")
    with pytest.raises(ValueError, match="glu: expected one of"):
        gmm_backend.triton_gmm(a, b, batch_sizes, trans_b=True, glu="silu",
                               accumulate_into=torch.zeros(5, 4, device=device))
    odd = torch.randn(2, 7, 16, device=device)
    with pytest.raises(ValueError, match="even number of columns"):
        gmm_backend.triton_gmm(a, odd, batch_sizes, trans_b=True, glu="silu")
    with pytest.raises(ValueError, match="b_up: expected glu"):
        gmm_backend.triton_gmm(a, b, batch_sizes, trans_b=True, b_up=b)
    with pytest.raises(ValueError, match="b_up: expected glu"):
        gmm_backend.triton_gmm(a, b, batch_sizes, trans_b=True, glu="silu", b_up=b[:, :4])
    with pytest.raises(ValueError, match="b_up: expected glu"):
        gmm_backend.triton_gmm(a, b, batch_sizes, trans_b=True, glu="silu", b_up=b.double())
