"""Raw Triton kernels and their launchers: no autograd, no nn.Module.

Dispatch rule used by every op: a kernel runs on CUDA tensors, and on CPU tensors when Triton's
interpreter is on (`TRITON_INTERPRET=1`, how the test suite runs kernels without a GPU). Otherwise
a CPU tensor takes the op's plain-torch reference.
"""

import os

import torch


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op on `t` runs its Triton kernel (else its torch reference)."""
    if t.device.type == "cuda":
        return True
    return t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"
