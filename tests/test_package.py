"""The package imports without a GPU, and importing it touches no CUDA state."""

import subprocess
import sys

import pytest

import megablocks

_PROBE = """
import torch
import megablocks
import megablocks.ops
import megablocks.backend
assert not torch.cuda.is_initialized(), "importing megablocks initialised CUDA"
print("ok", megablocks.__version__)
"""


def test_import_touches_no_cuda():
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"ok {megablocks.__version__}"


def test_no_compiled_extension_required():
    # The compiled ops are optional: the package works whether or not megablocks._csrc was built.
    from megablocks.backend import csrc

    mod = csrc.load()
    assert mod is None or hasattr(mod, "histogram")


def test_use_triton_rule(monkeypatch):
    import torch

    from megablocks.backend import use_triton

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not use_triton(torch.empty(1))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton(torch.empty(1))
    assert not use_triton(torch.empty(1, device="meta"))


@pytest.mark.parametrize("bad", [1.5, "4", None])
def test_check_int_rejects_non_ints(bad):
    from megablocks._checks import check_int

    with pytest.raises(TypeError, match="top_k: expected an int"):
        check_int("top_k", bad)


def test_test_file_names_are_unique():
    """pytest imports test files by their base name (the test folders are not packages): two
    files of one name in different folders stop the collection of the second."""
    import collections
    import pathlib

    root = pathlib.Path(__file__).parent
    names = collections.Counter(p.name for p in root.rglob("test_*.py"))
    assert not [n for n, c in names.items() if c > 1], names
