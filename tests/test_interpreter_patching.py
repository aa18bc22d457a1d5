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
