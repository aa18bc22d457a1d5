"""The test harness's interpreter patch (tests/interpreter_patching.py): helper calls inside a
launch stop re-patching triton.language, and nothing else changes."""

import os

import pytest
import torch
import triton
import triton.language as tl

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter only")


@triton.jit
def _scaled(x, s):
    return x * s


@triton.jit
def _row_sums_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, tl.cdiv(n, BLOCK) * BLOCK, BLOCK):  # tl.cdiv: a standard-library helper
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * n + cols, mask=cols < n, other=0.0)
        total += _scaled(x, 2.0)  # our own helper, called once per step
    tl.store(out_ptr + row, tl.sum(total, axis=0))  # tl.sum: a standard-library helper


def test_helpers_patch_once_per_launch_and_results_unchanged(monkeypatch):
    from triton.runtime import interpreter

    from tests import interpreter_patching

    assert getattr(interpreter.InterpretedFunction.__call__, "_patch_once", False), (
        "conftest installs the patch on this Triton; if its interpreter changed, update interpreter_patching")
    original_load = tl.load
    calls = []
    patch_lang = interpreter._patch_lang
    monkeypatch.setattr(interpreter, "_patch_lang", lambda fn: calls.append(fn.__name__) or patch_lang(fn))
    x = torch.randn(3, 70)
    out = torch.empty(3)
    _row_sums_kernel[(3,)](x, out, 70, BLOCK=16)
    torch.testing.assert_close(out, (2 * x).sum(1), rtol=1e-5, atol=1e-5)
    # Three programs, five steps each: 15 calls of _scaled, 3 of tl.sum, 3 of tl.cdiv. Shipped, each
    # patched the language again; now the launch does, then at most one helper for modules it lacked.
    assert calls.count("_row_sums_kernel") == 1, calls
    assert "_scaled" not in calls, calls
    assert len(calls) <= 2, calls
    assert tl.load is original_load, "the launch restores triton.language"
    assert interpreter_patching.install() is False, "installing twice is a no-op"


@triton.jit
def _bitwise_reductions_kernel(x_ptr, xor_rows_ptr, or_cols_ptr, xor_all_ptr, sorted_ptr,
                               R: tl.constexpr, C: tl.constexpr):
    offs = tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
    x = tl.load(x_ptr + offs)
    tl.store(xor_rows_ptr + tl.arange(0, R), tl.xor_sum(x, axis=1))
    tl.store(or_cols_ptr + tl.arange(0, C)[None, :], tl.reduce_or(x, axis=0, keep_dims=True))
    tl.store(xor_all_ptr, tl.xor_sum(x))
    flat = tl.load(x_ptr + tl.arange(0, R * C))
    tl.store(sorted_ptr + tl.arange(0, R * C), tl.sort(flat))  # a bitonic sort: xor_sum over pairs


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_bitwise_reductions_and_sort_against_numpy(dtype):
    import functools

    import numpy as np
    from triton.runtime import interpreter

    assert getattr(interpreter.ReduceOps.apply_impl, "_numpy_bitwise", False), "conftest installs the reductions"
    assert getattr(interpreter._get_np_dtype, "_table_once", False), "conftest installs the dtype table"
    gen = torch.Generator().manual_seed(7)
    R, C = 8, 16
    x = torch.randint(-2**30, 2**30, (R, C), generator=gen, dtype=dtype)
    xor_rows, or_cols, xor_all = torch.empty(R, dtype=dtype), torch.empty(1, C, dtype=dtype), torch.empty(1, dtype=dtype)
    out_sorted = torch.empty(R * C, dtype=dtype)
    _bitwise_reductions_kernel[(1,)](x, xor_rows, or_cols, xor_all, out_sorted, R=R, C=C)
    a = x.numpy()
    assert np.array_equal(xor_rows.numpy(), [functools.reduce(np.bitwise_xor, row) for row in a])
    assert np.array_equal(or_cols.numpy()[0], [functools.reduce(np.bitwise_or, col) for col in a.T])
    assert int(xor_all) == int(functools.reduce(np.bitwise_xor, a.ravel()))
    assert torch.equal(out_sorted, x.flatten().sort().values)


@triton.jit
def _int_add_kernel(a_ptr, b_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, tl.load(a_ptr + offs) + tl.load(b_ptr + offs))


def test_overflow_condition_only_where_debug_mode_asserts_it(monkeypatch):
    import dataclasses

    from triton.runtime import interpreter

    semantic = interpreter.interpreter_semantic
    assert "binary_op_sanitize_overflow_impl" in vars(semantic), "conftest installs the overflow shortcut"
    a = torch.tensor([2**31 - 1, 5, -7, 0], dtype=torch.int32)
    b = torch.tensor([1, 6, -8, 0], dtype=torch.int32)
    out = torch.empty(4, dtype=torch.int32)
    # As shipped without debug mode: int32 wraps, nothing is asserted.
    _int_add_kernel[(1,)](a, b, out, N=4)
    assert out.tolist() == [-2**31, 11, -15, 0]
    # In debug mode the shipped check still runs and catches the overflow.
    monkeypatch.setattr(semantic.builder, "options", dataclasses.replace(semantic.builder.options, debug=True))
    with pytest.raises(Exception, match="overflow"):
        _int_add_kernel[(1,)](a, b, out, N=4)
    ok = torch.tensor([5, 6, 7, 8], dtype=torch.int32)
    _int_add_kernel[(1,)](ok, ok, out, N=4)
    assert out.tolist() == [10, 12, 14, 16]


@triton.jit
def _outer_kernel(a_ptr, b_ptr, out_ptr, idx_ptr, R: tl.constexpr, C: tl.constexpr):
    rows = tl.arange(0, R)
    cols = tl.arange(0, C)
    a = tl.load(a_ptr + rows)  # [R] fp32
    b = tl.load(b_ptr + cols).to(tl.float32)  # [C] fp16 -> fp32
    grid = a[:, None] * b[None, :] + 1.0  # broadcasts [R, 1] x [1, C], then a scalar
    grid = grid + tl.full((R, C), 2, tl.int32)  # equal shapes, mixed types
    flat = tl.reshape(grid, (R * C,))
    tl.store(out_ptr + tl.arange(0, R * C), flat)
    tl.store(idx_ptr + rows[:, None] * C + cols[None, :], rows[:, None] * C + cols[None, :])


def _type_fields(ty):
    return ty.element_ty, list(ty.shape.values), ty.shape.type, ty.numel, ty.name


def test_block_types_and_tensor_shapes_once_per_shape_as_shipped():
    from triton.language import core

    init = core.block_type.__init__
    assert getattr(init, "_cached", False), "conftest installs the type cache on this Triton"
    for R, C in ((4, 8), (4, 8), (1, 16)):  # the second launch reads the cache
        a, b = torch.randn(R), torch.randn(C, dtype=torch.float16)
        out, idx = torch.empty(R * C), torch.empty(R, C, dtype=torch.int32)
        _outer_kernel[(1,)](a, b, out, idx, R=R, C=C)
        torch.testing.assert_close(out, (a[:, None] * b.float()[None, :] + 3.0).flatten(), rtol=1e-6, atol=1e-6)
        assert torch.equal(idx, torch.arange(R * C, dtype=torch.int32).view(R, C))
    # Every field as the shipped constructors make it, cached or not, for dtypes, pointers, lists
    # and Triton tuples of constexprs; each object with its own shape tuple.
    shapes = ([8], [4, 16], core.tuple([core.constexpr(2), core.constexpr(32)]))
    for element in (tl.float32, tl.int1, tl.pointer_type(tl.float16), tl.pointer_type(tl.int64, const=True)):
        for shape in shapes:
            for _ in range(2):
                got = core.block_type(element, shape)
                want = object.__new__(core.block_type)
                init._shipped(want, element, shape)
                assert _type_fields(got) == _type_fields(want) and got == want
                assert got.element_ty is element and got.shape is not want.shape
                t, u = core.tensor(None, got), object.__new__(core.tensor)
                core.tensor.__init__._shipped(u, None, want)
                assert (t.numel, list(t.shape.values), t.shape.type, t.dtype) == (
                    u.numel, list(u.shape.values), u.shape.type, u.dtype)
                assert t.shape is not core.tensor(None, got).shape
    scalar = core.tensor(None, tl.float32)
    assert scalar.shape.values == [] and scalar.numel == 1 and scalar.dtype == tl.float32
    # Shapes the shipped constructor refuses are refused still (nothing cached for them).
    with pytest.raises(TypeError, match="0d block_type"):
        core.block_type(tl.float32, [])
    for _ in range(2):
        with pytest.raises(ValueError, match="power of 2"):
            core.block_type(tl.float32, [3, 4])
    with pytest.raises(AssertionError):
        core.block_type(tl.float32, (4,))  # a Python tuple: the shipped constructor asserts


def test_broadcast_of_one_shape_returns_the_operands_and_others_as_shipped():
    from triton.language import core
    from triton.runtime import interpreter

    semantic = interpreter.interpreter_semantic
    fast = vars(semantic).get("broadcast_impl_value")
    assert fast is not None, "conftest installs the broadcast shortcut on this Triton"
    ty = core.block_type(tl.float32, [4, 8])
    lhs, rhs = core.tensor(None, ty), core.tensor(None, core.block_type(tl.int32, [4, 8]))
    assert fast(lhs, rhs) == (lhs, rhs)  # the same objects, unchanged
    shipped = fast._shipped(semantic, lhs, rhs)
    assert shipped[0] is lhs and shipped[1] is rhs  # as shipped
    # Different shapes go to the shipped code (run inside a launch by _outer_kernel above).
    a, b = torch.randn(2), torch.randn(4, dtype=torch.float16)
    out, idx = torch.empty(8), torch.empty(2, 4, dtype=torch.int32)
    _outer_kernel[(1,)](a, b, out, idx, R=2, C=4)
    torch.testing.assert_close(out, (a[:, None] * b.float()[None, :] + 3.0).flatten(), rtol=1e-6, atol=1e-6)
