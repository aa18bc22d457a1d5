"""Helpers shared by the layers: parameter dtype and device, autocast, input checks."""

from typing import Optional

import torch


def dtype(args) -> Optional[torch.dtype]:
    """The parameter dtype `args` asks for: float16, bfloat16, or None (torch's default dtype)."""
    if args.fp16:
        return torch.float16
    if args.bf16:
        return torch.bfloat16
    return None


def device(args) -> torch.device:
    """The device parameters are created on; `args.device=None` means CUDA if available, else CPU.

    Called when a layer is built, never when `Arguments` is.
    """
    if args.device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    if isinstance(args.device, int):
        return torch.device("cuda", args.device)
    return torch.device(args.device)


def autocast_dtype(t: torch.Tensor) -> Optional[torch.dtype]:
    """The autocast dtype in effect for `t`'s device type, or None when autocast is off."""
    kind = t.device.type
    if kind not in ("cuda", "cpu") or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def cast_if_autocast_enabled(t: torch.Tensor) -> torch.Tensor:
    """Casts `t` to the autocast dtype when autocast is on for its device (as MegaBlocks does)."""
    to = autocast_dtype(t)
    return t if to is None else t.to(dtype=to)


def check_input(name: str, x, hidden_size: int, param: torch.Tensor) -> None:
    """Checks a layer input `x` [..., hidden_size] against the layer's parameters.

    Raises:
        TypeError: `x` is not a floating-point tensor, or (outside autocast) its dtype is not
            the parameters' dtype.
        ValueError: wrong last dimension, or `x` on another device than the parameters.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != hidden_size:
        raise ValueError(f"{name}: expected shape [..., hidden_size={hidden_size}], got {tuple(x.shape)}")
    if x.device != param.device:
        raise ValueError(f"{name}: expected a tensor on {param.device} (the layer's parameters), got {x.device}")
    if autocast_dtype(x) is None and x.dtype != param.dtype:
        raise TypeError(
            f"{name}: expected dtype {param.dtype} (the layer's parameters; or run under autocast), got {x.dtype}"
        )
