"""Loader for the optional compiled CUDA ops (`megablocks._csrc`, built from `csrc/`).

The extension is built only with `MEGABLOCKS_BUILD_CUDA=1` (see setup.py). Every op in it has a
Triton or torch path that is always there; `load()` returns None when the extension is absent.
"""

import functools
import importlib


@functools.lru_cache(maxsize=1)
def load():
    """Returns the compiled module, or None when it was not built."""
    try:
        return importlib.import_module("megablocks._csrc")
    except ImportError:
        return None
