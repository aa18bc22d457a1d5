"""Launch settings, one style for every kernel family, and the device facts launches need.

Each kernel family describes a launch by one frozen dataclass of its settings (`GmmConfig` in
`megablocks.backend.gmm`, `SparseConfig` in `megablocks.backend.sparse`, `Tile` in
`megablocks.backend.permute`), picked by a `default_*` function that documents the measurements
behind it. A launcher's `config=` argument overrides that default: an instance of the dataclass
replaces it, a dict replaces the fields it names (`with_overrides`), for tuning and tests.
"""

import dataclasses
import functools
import os
from typing import Optional, Tuple, TypeVar, Union

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

Settings = TypeVar("Settings")


def with_overrides(default: Settings, override: Optional[Union[Settings, dict]]) -> Settings:
    """`default`, or `override` when it is a settings instance, or `default` with the fields a dict
    names replaced; an unknown field is a ValueError that lists the known ones."""
    if override is None:
        return default
    if isinstance(override, type(default)):
        return override
    if not isinstance(override, dict):
        raise TypeError(f"config: expected a {type(default).__name__} or a dict of its fields, "
                        f"got {type(override).__name__}")
    fields = {f.name for f in dataclasses.fields(default)}
    unknown = sorted(set(override) - fields)
    if unknown:
        raise ValueError(f"config: unknown fields {unknown}; {type(default).__name__} has {sorted(fields)}")
    return dataclasses.replace(default, **override)


def interpreted(t: torch.Tensor) -> bool:
    """Whether Triton kernels on `t` run in the interpreter (CPU tensors, TRITON_INTERPRET=1)."""
    return t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


# Programmatic dependent launch (Hopper and later): a kernel launched with it may start while the
# kernel before it in the stream finishes, and waits (`pdl_start`) for that kernel's results before
# it touches memory. What it saves is the gap between the two: a decode step is a chain of seven
# small kernels (route, gather and quantize, up product, GLU, down product, combine), its gaps a
# tenth of it. `PDL` (env `MEGABLOCKS_PDL`): 0 launches every kernel plainly; 1 lets the next
# kernel launch once all of this one's programs have passed their wait; 2 lets it launch once they
# have all started, so that a chain's kernels are resident and waiting before their turn.
_PDL_ENV = os.environ.get("MEGABLOCKS_PDL", "1")
if _PDL_ENV not in ("0", "1", "2"):
    raise ValueError(f"MEGABLOCKS_PDL: expected 0, 1 or 2, got {_PDL_ENV!r}")
PDL = int(_PDL_ENV)


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """First in a kernel that `pdl_launch` may launch early: wait until the kernel before it has
    finished and its writes are visible (before this kernel reads or writes any memory, so that it
    neither reads a result early nor overwrites a buffer the kernel before it still reads), and let
    the next kernel launch (`PDL` 1: after the wait; 2: before it). Nothing where PDL is 0."""
    if PDL == 2:
        gdc_launch_dependents()
        gdc_wait()
    elif PDL:
        gdc_wait()
        gdc_launch_dependents()


def pdl_launch(t: torch.Tensor) -> dict:
    """The launch keywords of a kernel that starts with `pdl_start`, on `t`'s device: `PDL` (the
    module's mode) and `launch_pdl` on CUDA devices of compute capability 9.0 and later, else none."""
    if PDL and t.device.type == "cuda" and capability(t.device)[0] >= 9:
        if PDL not in _PDL_KWARGS:
            raise ValueError(f"launch.PDL: expected 0, 1 or 2, got {PDL!r}")
        return _PDL_KWARGS[PDL]
    return {}


_PDL_KWARGS = {mode: {"PDL": mode, "launch_pdl": True} for mode in (1, 2)}


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def capability(device: torch.device) -> Tuple[int, int]:
    """(major, minor) compute capability of a CUDA device (cached per device: the launchers ask
    on every call)."""
    return _capability(_index(device))


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> Tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached per device)."""
    return _sm_count(_index(device))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def persistent_programs(device: torch.device, num_tiles: int) -> int:
    """One program per SM, at most one per tile (under the interpreter: 2, so that the tests see
    programs loop over several tiles)."""
    return max(1, min(num_tiles, num_sms(device) if device.type == "cuda" else 2))


def programs_to_fill(device: torch.device) -> int:
    """The programs a latency-bound launch should have to occupy the device: one per SM on CUDA
    (under the interpreter: 4, so that the tests at small shapes take the split launches)."""
    return num_sms(device) if device.type == "cuda" else 4


def _tma_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    # Global scratch where the kernels write their device-side TMA descriptors.
    return torch.empty(size, dtype=torch.int8, device="cuda")


def prepare_tma(device: torch.device) -> None:
    """Sets the scratch allocator Triton asks for when a kernel builds TMA descriptors on the
    device; called before every such launch, so a caller's own allocator elsewhere is no issue."""
    if device.type == "cuda":
        triton.set_allocator(_tma_scratch)


def tma_ok(*tensors: torch.Tensor) -> bool:
    """TMA descriptors need 16-byte aligned bases and row strides, and unit inner strides."""
    for t in tensors:
        es = t.element_size()
        if t.data_ptr() % 16 or any((s * es) % 16 for s in t.stride()[:-1]) or t.stride(-1) != 1:
            return False
    return True


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot`'s input precision: fp32 products follow torch's matmul setting ('highest': full
    fp32; 'high' or 'medium': TF32), 16-bit inputs are exact either way."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"
