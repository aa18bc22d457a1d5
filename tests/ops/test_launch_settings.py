"""The one launch-settings style (megablocks/backend/launch.py): every kernel family's settings
are a frozen dataclass with a default, overridden by an instance or a dict of its fields."""

import dataclasses
import os

import pytest
import torch

from megablocks.backend import gmm, permute, sparse
from megablocks.backend.launch import dot_precision, tma_ok, with_overrides

DEFAULTS = {
    "gmm": gmm.default_config(torch.empty(1)),
    "sparse": sparse.default_config("sdd", 64, torch.float32, torch.device("cpu")),
    "permute": permute.default_tile(512),
}


@pytest.mark.parametrize("family", sorted(DEFAULTS))
def test_every_family_is_a_frozen_dataclass_with_overrides(family):
    default = DEFAULTS[family]
    assert dataclasses.is_dataclass(default)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(default, dataclasses.fields(default)[0].name, 1)
    assert with_overrides(default, None) is default
    first = dataclasses.fields(default)[0].name
    changed = with_overrides(default, {first: 7})
    assert getattr(changed, first) == 7 and type(changed) is type(default)
    assert all(getattr(changed, f.name) == getattr(default, f.name) for f in dataclasses.fields(default)[1:])
    assert with_overrides(default, changed) is changed
    with pytest.raises(ValueError, match="unknown fields"):
        with_overrides(default, {"BLOCK_M": 16})
    with pytest.raises(TypeError, match="expected a"):
        with_overrides(default, [first, 7])


def test_launchers_take_dict_overrides(device):
    """A dict of fields reaches the launch: the grouped GEMM with another tile gives the same product."""
    a = torch.randn(40, 24, device=device)
    b = torch.randn(3, 24, 16, device=device)
    sizes = torch.tensor([10, 0, 30], dtype=torch.int32, device=device)
    base = gmm.gmm(a, b, sizes)
    other = gmm.triton_gmm(a, b, sizes, config={"block_m": 16, "block_n": 16, "block_k": 16})
    torch.testing.assert_close(other, base, rtol=1e-5, atol=1e-5)


def test_dot_precision_follows_torch():
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert dot_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert dot_precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(old)


def test_tma_ok():
    x = torch.empty(8, 16)
    assert tma_ok(x)
    assert not tma_ok(x[:, 1:])  # an unaligned base
    assert not tma_ok(x.t())  # no unit inner stride


def test_pdl_launch_only_on_hopper(monkeypatch):
    """Programmatic dependent launch: its keywords on CUDA devices of compute capability 9.0 and
    later only, none on CPU or with `launch.PDL` off."""
    from megablocks.backend import launch

    x = torch.zeros(4)
    assert launch.pdl_launch(x) == {}
    if torch.cuda.is_available():
        major = torch.cuda.get_device_capability()[0]
        for mode in (1, 2):
            monkeypatch.setattr(launch, "PDL", mode)
            expected = {"PDL": mode, "launch_pdl": True} if major >= 9 else {}
            assert launch.pdl_launch(x.cuda()) == expected
        monkeypatch.setattr(launch, "PDL", False)
        assert launch.pdl_launch(x.cuda()) == {}


def test_pdl_mode_checked():
    """An unknown `MEGABLOCKS_PDL` fails at import with what it expected."""
    import subprocess
    import sys

    env = {**os.environ, "MEGABLOCKS_PDL": "yes"}
    run = subprocess.run([sys.executable, "-c", "import megablocks.backend.launch"], env=env, capture_output=True,
                         text=True)
    assert run.returncode != 0 and "MEGABLOCKS_PDL: expected 0, 1 or 2, got 'yes'" in run.stderr, run.stderr[-500:]
