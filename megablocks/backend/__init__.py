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


# Host-side integer helpers of the launchers. `triton.cdiv` and `triton.next_power_of_2` are
# constexpr functions, whose calls from Python unwrap their arguments first: microseconds each,
# several per launch, which decode-sized calls feel (their host time is their wall time).


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of ints."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 that is >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
