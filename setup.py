"""Build script.

A plain `pip install .` compiles nothing: every op has a Triton or torch path. The optional CUDA
ops in `csrc/` are built only when asked for with `MEGABLOCKS_BUILD_CUDA=1`, and only where a
CUDA build of torch and `nvcc` are present (install with `--no-build-isolation` so the build sees
that torch).
"""

import os
import shutil

from setuptools import setup


def _cuda_extensions():
    if os.environ.get("MEGABLOCKS_BUILD_CUDA", "0") != "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    if torch.version.cuda is None or shutil.which("nvcc") is None:
        raise RuntimeError(
            "MEGABLOCKS_BUILD_CUDA=1 needs a CUDA build of torch and nvcc on PATH; "
            f"found torch.version.cuda={torch.version.cuda!r}, nvcc={shutil.which('nvcc')!r}"
        )
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(
        os.path.join("csrc", f) for f in os.listdir(os.path.join(here, "csrc"))
        if f.endswith((".cu", ".cpp"))
    )
    ext = CUDAExtension(
        name="megablocks._csrc",
        sources=sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
