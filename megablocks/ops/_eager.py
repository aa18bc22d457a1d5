"""Eager calls of our custom ops without the custom-op dispatcher's host cost.

Every kernel is registered as a `torch.library.custom_op` with a fake implementation, so
`torch.compile` traces it as one opaque node. In eager mode, though, a call through that
dispatcher costs tens to hundreds of microseconds of Python per op (schema handling, aliasing
checks, the autograd wrapper), more than the kernel itself at decode sizes. `eager(op)` returns a
callable that calls the custom op while compiling and, otherwise, the op's own Python function
directly, wrapped in an `autograd.Function` built from the op's registered `setup_context` and
`backward` when a gradient is needed. Both routes run the same implementation and backward.
"""

from typing import Any, Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_dispatch_mode


class EagerOp:
    """A custom op that, outside `torch.compile`, skips the dispatcher (see the module docstring).

    Attributes:
        op: the `torch.library` custom op (what `torch.compile` sees; `torch.ops.megablocks.*`).
    """

    def __init__(self, op: Any):
        self.op = op
        self._impl: Callable = getattr(op, "_init_fn", None)
        backward = getattr(op, "_backward_fn", None)
        setup_context = getattr(op, "_setup_context_fn", None)
        self._function = None
        if backward is not None:
            impl = self._impl

            # The forward takes ctx and calls setup_context itself: a Function with a separate
            # setup_context binds its arguments through inspect.signature on every apply.
            def forward(ctx, *args):
                output = impl(*args)
                setup_context(ctx, args, output)
                return output

            self._function = type(
                f"{op.__name__ if hasattr(op, '__name__') else 'op'}_function",
                (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)},
            )

    def __call__(self, *args, **kwargs):
        if kwargs or self._impl is None or not _plain_eager(args):
            return self.op(*args, **kwargs)
        if self._function is not None and torch.is_grad_enabled() and any(
            isinstance(a, torch.Tensor) and a.requires_grad for a in args
        ):
            return self._function.apply(*args)
        return self._impl(*args)


def _plain_eager(args) -> bool:
    """True outside every tracer: not compiling, no dispatch mode active (fake tensors, proxy
    tracing, functionalization), and only plain tensors among the arguments."""
    if torch.compiler.is_compiling() or _current_dispatch_mode() is not None:
        return False
    return all(type(a) in _PLAIN for a in args if isinstance(a, torch.Tensor))


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager(op: Any) -> EagerOp:
    """Wraps a custom op, after its fake and autograd registrations, for cheap eager calls."""
    return EagerOp(op)
