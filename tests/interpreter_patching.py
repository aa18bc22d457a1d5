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

Two more costs of the shipped interpreter, removed the same way (`install_reductions`,
`install_dtype_table`), each with the same results:
- A reduction whose combine function is not one of the few it knows (sum, min, max, argmin,
  argmax) runs element by element in Python, calling the combine function per element. `tl.sort`
  (the routing kernel's bitonic sort) reduces with `xor_sum` over pairs at every stage: 4096 keys
  took 144 s of a 147 s test. The integer `xor_sum` and `reduce_or` are numpy's bitwise
  reductions instead (exact: integer xor and or are associative and commutative).
- `_get_np_dtype`, called for every tensor the interpreter makes, built its table of 20 dtypes on
  each call (a third of the remaining time of that test); the table is now built once.
And one that computes what nothing reads (`install_overflow_shortcut`): every integer add, sub and
mul of 32 bits or fewer computed its overflow condition (both operands cast to int64, the op, two
compares, an and) and handed it to `device_assert`, which drops it unless the launch is in debug
mode (the interpreter's default: not). A third of an interpreted dMoE property test went there. The
condition is now computed only where it will be asserted (debug mode), as shipped.
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


def install_reductions() -> bool:
    """Integer `xor_sum` and `reduce_or` by numpy's bitwise reductions; True when installed."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    reduce_ops = getattr(interpreter, "ReduceOps", None)
    apply_impl = getattr(reduce_ops, "apply_impl", None)
    combines = {getattr(tl.standard, "_xor_combine", None): np.bitwise_xor,
                getattr(tl.standard, "_or_combine", None): np.bitwise_or}
    if apply_impl is None or None in combines or getattr(apply_impl, "_numpy_bitwise", False):
        return False

    def apply(self, input):
        ufunc = combines.get(self.combine_fn)
        if ufunc is None or len(input) != 1 or not input[0].dtype.is_int():
            return apply_impl(self, input)
        data = input[0].handle.data
        return self.to_tensor(ufunc.reduce(data, axis=self.axis, keepdims=self.keep_dims), input[0].dtype)

    apply._numpy_bitwise = True
    reduce_ops.apply_impl = apply
    return True


def install_dtype_table() -> bool:
    """`_get_np_dtype` with its table built once; True when installed."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    shipped = getattr(interpreter, "_get_np_dtype", None)
    if shipped is None or getattr(shipped, "_table_once", False):
        return False
    try:
        source = inspect.getsource(shipped)
    except (OSError, TypeError):
        return False
    if "np_types = {" not in source:
        return False
    import triton.language as tl
    table = {}

    pointer = shipped(tl.pointer_type(tl.int32))  # every pointer (and block of them): uint64, as shipped

    def get_np_dtype(tt_dtype):
        key = tt_dtype.element_ty if isinstance(tt_dtype, tl.block_type) else tt_dtype
        if isinstance(key, tl.pointer_type):
            return pointer
        found = table.get(key)
        if found is None:
            found = table[key] = shipped(key)
        return found

    get_np_dtype._table_once = True
    interpreter._get_np_dtype = get_np_dtype
    return True


def install_overflow_shortcut() -> bool:
    """The interpreter's integer overflow condition computed only in debug mode, where
    `device_assert` checks it; True when installed."""
    try:
        from triton.language.semantic import TritonSemantic
        from triton.runtime import interpreter
    except ImportError:
        return False
    semantic = getattr(interpreter, "interpreter_semantic", None)
    shipped = getattr(TritonSemantic, "binary_op_sanitize_overflow_impl", None)
    if semantic is None or shipped is None or "binary_op_sanitize_overflow_impl" in vars(semantic):
        return False
    # Shipped: the condition goes to device_assert, which returns at once without debug mode.
    try:
        sanitize, assert_source = inspect.getsource(shipped), inspect.getsource(TritonSemantic.device_assert)
    except (OSError, TypeError):
        return False
    if "self.device_assert(" not in sanitize or "if not self.builder.options.debug:" not in assert_source:
        return False

    def binary_op_sanitize_overflow_impl(lhs, rhs, binary_op):
        if not semantic.builder.options.debug:
            return None
        return shipped(semantic, lhs, rhs, binary_op)

    semantic.binary_op_sanitize_overflow_impl = binary_op_sanitize_overflow_impl
    return True
