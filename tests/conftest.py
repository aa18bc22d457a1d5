"""Test configuration.

Without a GPU the suite runs every Triton kernel through Triton's interpreter on CPU tensors; the
variable must be set before the kernels are defined, so it is set here, before any test module
imports megablocks. With a GPU the same tests run on CUDA tensors (bf16 included).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 is broken in Triton's interpreter (arithmetic and tl.dot on bf16 loads); it is tested on GPU.
FLOAT_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _exact_fp32_matmuls():
    """fp32 matmuls at full precision (no TF32) for the whole run: the float32 references are
    then exact to fp32 rounding, and the kernels' fp32 products (which follow this setting) are
    held to the fp32 limits of tests/utils.py. A test that checks TF32 sets it for itself."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)
