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
