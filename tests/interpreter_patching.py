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

import builtins  # triton.language.core defines its own `tuple`
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
        # A helper's module imports `triton.language` once: its modules are looked up at its
        # first call, not at every one (a scan of the module's globals each time).
        langs = self.__dict__.get("_langs")
        if langs is None:
            langs = self.__dict__["_langs"] = _langs(self.fn, tl)
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


def install_type_cache() -> bool:
    """Block types and tensors' shape fields built once per (element type, shape); True when
    installed.

    Every value the interpreter makes is a `tl.tensor` with a `tl.block_type`, built afresh for each
    operation: the block type unwraps and validates its shape and formats its name, the tensor wraps
    each dimension in a `constexpr` and builds a Triton tuple (and its tuple type) of them. Over a
    dMoE test that was about a third of the interpreted time, for the same few dozen shapes. Here
    each distinct (element type, shape) pays that once: a new block type copies the cached fields
    (keeping its own element type object), a new tensor gets a fresh Triton tuple of the cached
    `constexpr` dimensions with the cached tuple type. The objects hold the same values as shipped.
    """
    try:
        from triton.language import core
    except ImportError:
        return False
    block_type, tensor = getattr(core, "block_type", None), getattr(core, "tensor", None)
    if block_type is None or tensor is None or getattr(block_type.__init__, "_cached", False):
        return False
    try:
        block_source, tensor_source = inspect.getsource(block_type.__init__), inspect.getsource(tensor.__init__)
    except (OSError, TypeError):
        return False
    # The shipped constructors set exactly these fields; anything else and nothing is installed.
    if ("self.name = f'<{self.shape}, {self.element_ty}>'" not in block_source
            or "self.shape = tuple([constexpr(s) for s in self.shape])" not in tensor_source):
        return False
    shipped_block, shipped_tensor = block_type.__init__, tensor.__init__
    plain = (core.dtype, core.pointer_type)
    blocks, shapes = {}, {}

    def _element_key(ty):
        # dtypes and pointer types compare by these fields (pointer types are not hashable).
        if type(ty) is core.dtype:
            return ty.name
        if type(ty) is core.pointer_type and type(ty.element_ty) in plain:
            return ("ptr", _element_key(ty.element_ty), ty.address_space, ty.const)
        return None

    def block_init(self, element_ty, shape):
        # The shipped constructor takes a list or a Triton tuple (a tensor's shape, of constexprs).
        element = _element_key(element_ty)
        values = shape.values if isinstance(shape, core.tuple) else shape if isinstance(shape, list) else None
        if element is None or values is None:
            return shipped_block(self, element_ty, shape)
        dims = builtins.tuple(s.value if isinstance(s, core.constexpr) else s for s in values)
        key = (element, dims)
        cached = blocks.get(key)
        if cached is None:
            shipped_block(self, element_ty, shape)  # validates (and raises) as shipped
            if set(self.__dict__) == {"element_ty", "shape", "numel", "name"}:
                blocks[key] = (list(self.shape.values), self.shape.type, self.numel, self.name)
            return
        shape_values, shape_type, numel, name = cached
        self.element_ty = element_ty
        self.shape = core.tuple(shape_values, shape_type)  # a Triton tuple of its own, as shipped
        self.numel = numel
        self.name = name

    def tensor_init(self, handle, type):
        # Keyed by the dimensions (a block type's shape is a Triton tuple of ints; a scalar's is ()).
        if type.__class__ is block_type:
            key = builtins.tuple(type.shape.values)
        elif type.__class__ in plain:
            key = ()
        else:
            return shipped_tensor(self, handle, type)
        cached = shapes.get(key)
        if cached is None:
            shipped_tensor(self, handle, type)
            shapes[key] = (self.numel, list(self.shape.values), self.shape.type)
            return
        numel, dims, shape_type = cached
        self.handle = handle
        self.numel = numel
        self.type = type
        self.dtype = type.scalar
        self.shape = core.tuple(dims, shape_type)

    block_init._cached = True
    block_init._shipped = shipped_block
    tensor_init._shipped = shipped_tensor
    block_type.__init__ = block_init
    tensor.__init__ = tensor_init
    return True


def install_broadcast_shortcut() -> bool:
    """The interpreter's broadcast of two operands of one shape returns them at once; True when
    installed.

    Every binary operation broadcasts its operands first. For two blocks of the same shape (most of
    them) the shipped code compares the shapes dimension by dimension as constexprs, builds the
    common shape and compares it with each operand's as Triton tuples, to return both unchanged.
    Here equal dimensions return them unchanged at once; any other pair takes the shipped code.
    """
    try:
        from triton.language import core
        from triton.language.semantic import TritonSemantic
        from triton.runtime import interpreter
    except ImportError:
        return False
    semantic = getattr(interpreter, "interpreter_semantic", None)
    shipped = getattr(TritonSemantic, "broadcast_impl_value", None)
    if semantic is None or shipped is None or "broadcast_impl_value" in vars(semantic):
        return False
    try:
        source = inspect.getsource(shipped)
    except (OSError, TypeError):
        return False
    if "# (scalar, scalar) => returns original blocks" not in source or "return lhs, rhs" not in source:
        return False
    block_type = core.block_type

    def broadcast_impl_value(lhs, rhs):
        lhs_ty, rhs_ty = lhs.type, rhs.type
        if (lhs_ty.__class__ is block_type and rhs_ty.__class__ is block_type
                and lhs_ty.shape.values == rhs_ty.shape.values):
            return lhs, rhs
        return shipped(semantic, lhs, rhs)

    broadcast_impl_value._shipped = shipped
    semantic.broadcast_impl_value = broadcast_impl_value
    return True
