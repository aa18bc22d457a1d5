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

if os.environ.get("TRITON_INTERPRET") == "1":
    # The interpreter patches triton.language once per launch, not again at every helper call,
    # reduces integers by xor and or with numpy, builds its dtype table once and computes integer
    # overflow conditions only where debug mode asserts them, builds each block type and tensor
    # shape once per shape and broadcasts operands of one shape at once (tests/interpreter_patching.py:
    # the same kernels, the same results, less time).
    from tests import interpreter_patching  # noqa: E402

    interpreter_patching.install()
    interpreter_patching.install_reductions()
    interpreter_patching.install_dtype_table()
    interpreter_patching.install_overflow_shortcut()
    interpreter_patching.install_type_cache()
    interpreter_patching.install_broadcast_shortcut()

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
    # MEGABLOCKS_TEST_TF32=1: TF32 instead, with the fp32 limits widened to match (tests/utils.py).
    torch.set_float32_matmul_precision("high" if os.environ.get("MEGABLOCKS_TEST_TF32") == "1" else "highest")
    yield
    torch.set_float32_matmul_precision(previous)


def _commit_seed() -> int:
    """The property tests' seed: $HYPOTHESIS_SEED, else one drawn from the commit being tested
    (so every commit explores new examples, and a failure reproduces from the commit), else 0."""
    if os.environ.get("HYPOTHESIS_SEED"):
        return int(os.environ["HYPOTHESIS_SEED"])
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head = ""
    return int(head[:8], 16) if head else 0


def pytest_configure(config):
    # Hypothesis draws from this seed unless --hypothesis-seed is given.
    if getattr(config.option, "hypothesis_seed", None) is None and hasattr(config.option, "hypothesis_seed"):
        config.option.hypothesis_seed = _commit_seed()


def pytest_report_header(config):
    seed = getattr(config.option, "hypothesis_seed", None)
    if seed is not None:
        return [f"property tests: hypothesis seed {seed} (reproduce with --hypothesis-seed={seed} or "
                f"HYPOTHESIS_SEED={seed})"]
    return []


def pytest_collection_finish(session):
    # The sm_90 compile sweep runs in a subprocess: start it as soon as it is known to be
    # collected, so it overlaps the rest of the suite (tests/reliability/test_sm90_compile.py).
    if os.environ.get("PYTEST_XDIST_WORKER"):  # workers already share the cores
        return
    for item in session.items:
        if item.name == "test_kernels_compile_for_sm90_within_shared_memory":
            item.module.start_sweep()
            break


# With pytest-xdist workers (`make test`), the longest tests go first so that the last minutes
# are not one worker finishing a long test while the others idle: the sm_90 compile sweep (about
# three minutes of ptxas), then the property tests and the multi-process ones. The order of the
# rest is kept. Without workers the order is left alone (the sweep then overlaps from the start).
_LONG_FIRST = ("tests/reliability/test_sm90_compile.py", "tests/reliability/test_properties.py",
               "tests/parallel/", "tests/ops/test_routing.py", "tests/integrations/test_inference.py")


def pytest_collection_modifyitems(config, items):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return

    def rank(item):
        path = item.nodeid.split("::")[0]
        return next((i for i, p in enumerate(_LONG_FIRST) if path.startswith(p)), len(_LONG_FIRST))

    items.sort(key=rank)  # stable: the order within each rank is kept
