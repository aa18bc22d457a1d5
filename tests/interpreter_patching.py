"""Triton's interpreter, without its repeated language patching (CPU test runs only).

Every launch under `TRITON_INTERPRET=1` patches `triton.language` (its builtins replaced by
interpreter versions, found with `inspect.getmembers`) and restores it when the launch ends. Every
call of a `@triton.jit` helper inside the launch patches again, though the launch already did for
the same modules: a few milliseconds a call on a 2-core machine, and the kernels call helpers
(`tl.cdiv`, `tl.sum`, our own) thousands of times per test. On a dMoE step that was about 40% of
the interpreted time.

`install()` makes a helper call patch only modules the running launch has not patched yet (the
standard library's helpers see `triton.language.core`, which a kernel's module may not import, so
those still get patched, once per launch). What runs is unchanged: the same patched builtins, the
same restore at the end of the launch. Where the interpreter's internals differ from what this
expects (another Triton version), nothing is installed and the interpreter runs as shipped.
"""

import inspect
import threading

_state = threading.local()


def _langs(fn, tl):
    """The `triton.language` modules visible from `fn`, as the interpreter selects them."""
    return frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))


def install() -> bool:
    """Installs the patch-once helper calls; True when installed."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    grid_call = getattr(getattr(interpreter, "GridExecutor", None), "__call__", None)
    helper_call = getattr(getattr(interpreter, "InterpretedFunction", None), "__call__", None)
    patch_lang = getattr(interpreter, "_patch_lang", None)
    if grid_call is None or helper_call is None or patch_lang is None or getattr(helper_call, "_patch_once", False):
        return False
    # The shipped helper call is `_patch_lang(self.fn)`, then the rewritten function: check that the
    # source still reads so before replacing it.
    try:
        source = inspect.getsource(helper_call)
    except (OSError, TypeError):
        return False
    if "_patch_lang(self.fn)" not in source or "self.rewrite()" not in source:
        return False

    def launch(self, *args, **kwargs):
        # The launch patches the modules visible from its kernel (and restores them at its end).
        outer = getattr(_state, "patched", None)
        _state.patched = set(_langs(self.fn, tl))
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            _state.patched = outer

    def helper(self, *args, **kwargs):
        patched = getattr(_state, "patched", None)
        langs = _langs(self.fn, tl)
        if patched is None or not langs <= patched:
            interpreter._patch_lang(self.fn)
            if patched is not None:
                patched |= langs
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise interpreter.InterpreterError(repr(e)) from e

    helper._patch_once = True
    interpreter.GridExecutor.__call__ = launch
    interpreter.InterpretedFunction.__call__ = helper
    return True
