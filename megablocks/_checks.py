"""Argument validation shared by the ops and layers.

Every public entry point checks ranks, dtypes, devices and sizes before any kernel runs, and raises
`TypeError` (wrong type or dtype) or `ValueError` (wrong rank, size, device or value) with a message
that names the argument, what was expected and what came. These checks read only shapes and dtypes,
never tensor values, so they cost no host-device synchronisation.

Value checks (e.g. expert ids within range) would need a host sync on CUDA. They run on CPU
tensors always, and on CUDA tensors only when the environment sets `MEGABLOCKS_CHECK_VALUES=1`
(a debugging aid). Kernels never read or write out of bounds either way: they mask indices they
cannot trust.
"""

import os
from typing import Optional, Sequence

import torch

INT32_MAX = 2**31 - 1

INDEX_DTYPES = (torch.int32, torch.int64)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(
    name: str,
    t,
    *,
    ndim: Optional[int] = None,
    dtypes: Optional[Sequence[torch.dtype]] = None,
    numel_int32: bool = True,
) -> None:
    """Checks that `t` is a tensor of rank `ndim` with a dtype in `dtypes`."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        want = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({want}), got {str(t.dtype).replace('torch.', '')}")
    if numel_int32 and t.numel() > INT32_MAX:
        raise ValueError(
            f"{name}: {t.numel()} elements exceed the int32 index range ({INT32_MAX}) "
            "that the kernels address with"
        )


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """Checks that every tensor lives on one device and returns it."""
    items = [(k, v) for k, v in tensors.items() if v is not None]
    device = items[0][1].device
    for k, v in items[1:]:
        if v.device != device:
            first = items[0][0]
            raise ValueError(
                f"{k}: expected a tensor on {device} (the device of {first}), got one on {v.device}"
            )
    return device


def check_int(name: str, v, *, min_value: Optional[int] = None, max_value: Optional[int] = None) -> int:
    """Checks that `v` is a Python int (not a bool) within [min_value, max_value]."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if min_value is not None and v < min_value:
        raise ValueError(f"{name}: expected an int >= {min_value}, got {v}")
    if max_value is not None and v > max_value:
        raise ValueError(f"{name}: expected an int <= {max_value}, got {v}")
    return v


def check_int32_range(name: str, value: int) -> None:
    """Refuses a size whose int32 index arithmetic would overflow."""
    if value > INT32_MAX:
        raise ValueError(
            f"{name}: {value} exceeds the int32 index range ({INT32_MAX}) that the kernels use"
        )


def values_checked(t: torch.Tensor) -> bool:
    """True when value checks on `t` are allowed (CPU, or CUDA with MEGABLOCKS_CHECK_VALUES=1)."""
    if torch.compiler.is_compiling():
        return False  # reading values would break the graph
    if t.device.type == "cpu":
        return True
    return os.environ.get("MEGABLOCKS_CHECK_VALUES", "0") == "1"


def check_index_values(name: str, t: torch.Tensor, upper: int) -> None:
    """Checks 0 <= t < upper where that costs no host sync (see the module docstring)."""
    if t.numel() == 0 or not values_checked(t):
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= upper:
        raise ValueError(f"{name}: expected values in [0, {upper}), got values in [{lo}, {hi}]")


def check_batch_size_values(batch_sizes: torch.Tensor, rows: int, what: str = "the rows of a", *,
                            exact: bool = True) -> None:
    """Checks that the group sizes `batch_sizes` are non-negative and sum to `rows` (`what` names
    them), or to at most `rows` where not `exact` (operands whose rows past the groups' total are
    left unset), where that costs no host sync (`values_checked`)."""
    if not values_checked(batch_sizes):
        return
    if batch_sizes.numel() == 0:
        if rows and exact:
            raise ValueError(f"batch_sizes: expected sizes summing to {rows} ({what}), got none")
        return
    lo, total = int(batch_sizes.min()), int(batch_sizes.sum())
    if lo < 0 or total > rows or (exact and total != rows):
        bound = f"{rows}" if exact else f"at most {rows}"
        raise ValueError(f"batch_sizes: expected non-negative sizes summing to {bound} ({what}), "
                         f"got min {lo}, sum {total}")
