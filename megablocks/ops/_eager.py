"""How an op is registered: one torch custom op, its fake and autograd, and a cheap eager path.

Every kernel is a `torch.library.custom_op` with a fake implementation, so `torch.compile` traces
it as one opaque node. In eager mode, though, a call through that dispatcher costs tens to
hundreds of microseconds of Python per op (schema handling, aliasing checks, the autograd wrapper),
more than the kernel itself at decode sizes. So an op is defined with `custom_op` below instead
of torch's decorator:

    @custom_op("gmm")                       # torch.ops.megablocks.gmm
    def _gmm(a: torch.Tensor, ...) -> torch.Tensor: ...

    @_gmm.register_fake
    def _(a, ...): ...

    _gmm.register_autograd(_backward, setup_context=_setup_context)

`_gmm` is then an `EagerOp`, the one callable the code uses: while compiling or tracing it calls
the custom op; otherwise it calls the function directly, wrapped in an `autograd.Function` built
from the same `setup_context` and `backward` when a gradient is needed. Both routes run the same
implementation and backward. The `EagerOp` keeps the function, fake and autograd it was given
(no torch internals are read back from the custom op), and the name is bound once.
"""

from typing import Callable, Iterable, List, Optional

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_dispatch_mode


class EagerOp:
    """A custom op and its eager fast path (see the module docstring).

    Attributes:
        op: the `torch.library` custom op (what `torch.compile` sees; `torch.ops.megablocks.*`).
    """

    def __init__(self, name: str, impl: Callable, mutates_args: Iterable[str] = ()):
        self.op = torch.library.custom_op(f"megablocks::{name}", impl, mutates_args=tuple(mutates_args))
        self._name = name
        self._impl = impl
        self._function: Optional[type] = None
        self._list_output = getattr(impl, "__annotations__", {}).get("return") == List[torch.Tensor]

    def register_fake(self, fake: Callable) -> Callable:
        """Registers the op's fake (meta) implementation; usable as a decorator."""
        self.op.register_fake(fake)
        return fake

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        """Registers the op's backward, and builds the eager path's `autograd.Function` from it.

        The Function's forward takes ctx and calls `setup_context` itself: a Function with a
        separate setup_context binds its arguments through inspect.signature on every apply.
        """
        self.op.register_autograd(backward, setup_context=setup_context)
        impl = self._impl

        def forward(ctx, *args):
            output = impl(*args)
            setup_context(ctx, args, output)
            # A Function returns tensors or a tuple: a list output travels as a tuple, and its
            # gradients reach the backward as one list, as the custom op passes them.
            ctx.list_output = isinstance(output, list)
            return tuple(output) if ctx.list_output else output

        def function_backward(ctx, *grads):
            return backward(ctx, list(grads)) if ctx.list_output else backward(ctx, *grads)

        self._function = type(
            f"{self._name}_function",
            (torch.autograd.Function,),
            {"forward": staticmethod(forward), "backward": staticmethod(function_backward)},
        )

    def __call__(self, *args, **kwargs):
        if kwargs or not _plain_eager(args):
            return self.op(*args, **kwargs)
        if self._function is not None and torch.is_grad_enabled() and any(
            isinstance(a, torch.Tensor) and a.requires_grad for a in args
        ):
            output = self._function.apply(*args)
            return list(output) if isinstance(output, tuple) and self._list_output else output
        return self._impl(*args)


def _plain_eager(args) -> bool:
    """True outside every tracer: not compiling, no dispatch mode active (fake tensors, proxy
    tracing, functionalization), and only plain tensors among the arguments."""
    if torch.compiler.is_compiling() or _current_dispatch_mode() is not None:
        return False
    return all(type(a) in _PLAIN for a in args if isinstance(a, torch.Tensor))


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def custom_op(name: str, mutates_args: Iterable[str] = ()) -> Callable[[Callable], EagerOp]:
    """Decorator: the function as the custom op `megablocks::<name>`, returned as an `EagerOp`
    (register its fake and autograd on the result, as on a torch custom op)."""

    def wrap(impl: Callable) -> EagerOp:
        return EagerOp(name, impl, mutates_args)

    return wrap
