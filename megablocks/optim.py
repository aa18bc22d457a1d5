"""AdamW over low-precision parameters, with fp32 main weights kept in the optimizer state.

The model computes with bf16 (or fp16) parameters; the optimizer keeps an fp32 copy of each
("main" weights) and the two fp32 Adam moments, updates them by torch.optim.AdamW's rule in one
fused pass (one launch for all the tensors of a param group, `megablocks.backend.optim`), and
writes the parameter back rounded from the new main weights. Contiguous fp32 parameters are updated in place: their main weights are the
parameters themselves, no copy.

    opt = MainWeightsAdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    loss.backward()
    norm = opt.clip_grad_norm_(1.0)   # one read of the gradients, no host sync
    opt.step()                        # applies the clip coefficient inside the update
    opt.zero_grad()
"""

import math
from itertools import chain
from typing import Callable, Dict, Optional

import torch

from megablocks import _checks
from megablocks.backend import use_triton
from megablocks.backend.optim import adamw_multi_step, adamw_step_reference

__all__ = ["MainWeightsAdamW"]

_FP32_STATE = ("main", "exp_avg", "exp_avg_sq")


def _check_hyperparameters(lr, betas, eps, weight_decay) -> None:
    """torch.optim.AdamW's ranges, as ValueErrors that name the argument (Python numbers only:
    a tensor lr would have to be read on the host every step)."""
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
        if not value >= 0.0:
            raise ValueError(f"{name}: expected a float >= 0, got {value}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if isinstance(beta, bool) or not isinstance(beta, (int, float)):
            raise TypeError(f"betas[{i}]: expected a float, got {type(beta).__name__}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"betas[{i}]: expected a float in [0, 1), got {beta}")


def _is_param(main: torch.Tensor, p: torch.Tensor) -> bool:
    """Whether `main` is the (fp32, contiguous) parameter `p` itself rather than a copy."""
    return p.dtype == torch.float32 and main.data_ptr() == p.data_ptr() and main.shape == p.shape


class MainWeightsAdamW(torch.optim.Optimizer):
    """AdamW over low-precision params with fp32 main weights kept in the optimizer state.

    Args:
        params: parameters or param groups (dicts with their own `lr`, `betas`, `eps`,
            `weight_decay`), as torch.optim.AdamW takes them; each of dtype bf16, fp16 or fp32.
        lr: learning rate (>= 0). Default 1e-3.
        betas: (beta1, beta2), each in [0, 1). Default (0.9, 0.999).
        eps: added to the denominator (>= 0). Default 1e-8.
        weight_decay: decoupled weight decay (>= 0), applied as `main *= 1 - lr·weight_decay`.
            Default 1e-2.

    State per parameter, created at its first step with a gradient: `main` (fp32 copy of the
    parameter; for a contiguous fp32 parameter the parameter itself), `exp_avg`, `exp_avg_sq`
    (fp32, zeros at first) and `step` (a 0-d fp32 CPU tensor, as torch.optim.AdamW keeps it).

    The update is torch.optim.AdamW's (non-amsgrad, non-maximize), every operation in fp32, with
    the parameter then set to `main` rounded to its dtype (to nearest even). It runs as one Triton
    launch per param group and dtype pair on CUDA (`adamw_multi_step`: every tensor of the group in one grid), and on CPU when `TRITON_INTERPRET=1`; other CPU tensors take the
    same operations in torch (`megablocks.backend.optim.adamw_step_reference`). Non-contiguous
    parameters and gradients work through contiguous copies (one extra pass each).

    Raises:
        ValueError: an lr, eps or weight_decay < 0, a beta outside [0, 1), naming the argument.
        TypeError: a hyperparameter that is not a number, or a parameter whose dtype is not
            fp32/fp16/bf16 (and, at `step`, a gradient whose dtype is not).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        _check_hyperparameters(lr, betas, eps, weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        self._clip_coef: Optional[torch.Tensor] = None
        self._main_grads: Dict[torch.Tensor, torch.Tensor] = {}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """torch's `add_param_group`, with the group's hyperparameters and params' dtypes checked."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"])
            for i, p in enumerate(group["params"]):
                if p.dtype not in _checks.FLOAT_DTYPES:
                    want = ", ".join(str(d).replace("torch.", "") for d in _checks.FLOAT_DTYPES)
                    raise TypeError(f"params[{i}]: expected dtype in ({want}), got "
                                    f"{str(p.dtype).replace('torch.', '')}")
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def _init_state(self, p: torch.Tensor) -> None:
        state = self.state[p]
        if p.dtype == torch.float32 and p.is_contiguous():
            main = p.detach()
        else:
            main = p.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["main"] = main
        state["exp_avg"] = torch.zeros_like(main)
        state["exp_avg_sq"] = torch.zeros_like(main)

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None, grad_scale: Optional[torch.Tensor] = None):
        """One AdamW step of every parameter that has a gradient.

        Args:
            closure: re-evaluates the model and returns the loss (optional, as in torch).
            grad_scale: a one-element fp32 tensor the gradients are multiplied by inside the update
                (e.g. 1 / loss scale), read on the device: no host sync. None means 1. A clip
                coefficient left by `clip_grad_norm_` multiplies it, and is used up by this step.

        Returns:
            The closure's loss, or None.

        Raises:
            TypeError: a gradient that is sparse or not fp32/fp16/bf16; a grad_scale not fp32.
            ValueError: a grad_scale with more than one element.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scale is not None:
            _checks.check_tensor("grad_scale", grad_scale, dtypes=(torch.float32,))
            if grad_scale.numel() != 1:
                raise ValueError(f"grad_scale: expected one element, got shape {tuple(grad_scale.shape)}")
        scale, self._clip_coef = self._clip_coef, None
        if grad_scale is not None:
            grad_scale = grad_scale.reshape(())
            scale = grad_scale if scale is None else scale * grad_scale.to(scale.device)
        # Every gradient is checked before any parameter moves: a refused step changes nothing.
        work = []
        for group in self.param_groups:
            for p in group["params"]:
                grad = self._gradient(p)
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise TypeError("grad: sparse gradients are not supported")
                _checks.check_tensor("grad", grad, dtypes=_checks.FLOAT_DTYPES, numel_int32=False)
                if grad.shape != p.shape:
                    raise ValueError(f"grad: expected the parameter's shape {tuple(p.shape)}, "
                                     f"got {tuple(grad.shape)}")
                work.append((group, p, grad))
        scale_on: Dict[torch.device, torch.Tensor] = {}
        # Tensors that share a group, a step count and a device go through one multi-tensor
        # launch per dtype pair (`adamw_multi_step`): one launch's host cost, not one per tensor.
        batches: Dict[tuple, list] = {}
        for group, p, grad in work:
            state = self.state[p]
            if "main" not in state:
                self._init_state(p)
            state["step"] += 1
            main = state["main"]
            if scale is not None and p.device not in scale_on:
                scale_on[p.device] = scale.to(p.device)
            args = (None if _is_param(main, p) else p.detach(), grad, main, state["exp_avg"], state["exp_avg_sq"])
            key = (id(group), state["step"].item(), p.device, use_triton(main))
            batches.setdefault(key, [group, []])[1].append(args)
        for (_, step, device, triton_kernels), (group, rows) in batches.items():
            hyper = dict(lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
                         weight_decay=group["weight_decay"], step=step, grad_scale=scale_on.get(device))
            if triton_kernels:
                adamw_multi_step(*(list(column) for column in zip(*rows)), **hyper)
            else:
                for row in rows:
                    adamw_step_reference(*row, **hyper)
        for _, p, _ in work:
            self.state[p].pop("grad_acc", None)
        return loss

    @torch.no_grad()
    def fuse_grad_accumulation(self, enabled: bool = True) -> None:
        """Gradient-accumulation fusion (Megatron's): gives each parameter that is not fp32 (and
        requires grad) a persistent fp32 gradient buffer, set as its `main_grad` attribute, that `zero_grad` zeroes.

        Layers that can (the grouped-GEMM experts, `megablocks.layers.mlp.GroupedMLP`, with the
        'triton' backend) add their weight gradients into `main_grad` in the kernels' epilogue
        instead of returning them as `.grad`; other parameters' `.grad` is added to it by
        `accumulate_grads` as before. Over micro-batches that is 8 bytes an element a micro-batch
        (the buffer read and written) for the fused weights, against 12 (the 16-bit gradient
        written, then read with the buffer and the buffer written). `clip_grad_norm_` and `step`
        take the buffer as the gradient; a parameter with a buffer is stepped every step (with
        zeros if nothing was added, as after `zero_grad(set_to_none=False)`). The buffers are not
        part of `state_dict`. `enabled=False` removes them.
        """
        for p in list(self._main_grads):
            if hasattr(p, "main_grad"):
                del p.main_grad
        self._main_grads = {}
        if not enabled:
            return
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype == torch.float32 or not p.requires_grad or p in self._main_grads:
                    continue
                buf = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                if p.grad is not None:
                    buf.add_(p.grad)
                    p.grad = None
                self._main_grads[p] = buf
                p.main_grad = buf

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's `zero_grad`, and the fp32 buffers of `fuse_grad_accumulation` set to zeros."""
        super().zero_grad(set_to_none=set_to_none)
        if self._main_grads:
            torch._foreach_zero_(list(self._main_grads.values()))

    @torch.no_grad()
    def accumulate_grads(self) -> None:
        """Gradient accumulation in fp32, kept by the optimizer: adds each parameter's `.grad`
        (bf16 say, one micro-batch's) into an fp32 buffer in its state and frees the `.grad`.
        Call it after each micro-batch's backward; `clip_grad_norm_` and `step` then take the
        buffer (plus any `.grad` left) as the gradient, and the step frees the buffer. With
        `fuse_grad_accumulation` the buffer is the parameter's `main_grad` (kept)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p in self._main_grads:
                    self._main_grads[p].add_(p.grad)
                    p.grad = None
                    continue
                state = self.state[p]
                if "grad_acc" in state:
                    state["grad_acc"].add_(p.grad)
                else:
                    state["grad_acc"] = p.grad.to(torch.float32, copy=True)
                p.grad = None

    def _gradient(self, p: torch.Tensor) -> Optional[torch.Tensor]:
        """The gradient a step takes: the fp32 accumulation buffer (with any `.grad` added), or
        the `.grad`."""
        acc = self._main_grads.get(p)
        if acc is None and p in self.state:
            acc = self.state[p].get("grad_acc")
        if acc is None:
            return p.grad
        if p.grad is not None:
            acc.add_(p.grad)
            p.grad = None
        return acc

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """The total 2-norm of all gradients, and a clip coefficient for the next `step`.

        The norm is taken in fp32 from the gradients as they are (any of fp32/fp16/bf16), as
        torch.nn.utils.clip_grad_norm_ takes it; the coefficient `min(1, max_norm / (norm + 1e-6))`
        is kept as a device tensor that the next `step` multiplies the gradients by inside its
        update, so the gradients themselves are left unchanged (one read of them, no host sync).
        `max_norm = inf` gives the coefficient 1. A non-finite norm is not an error: it gives
        a coefficient of 0 (inf norm) or NaN (NaN norm), as in torch.

        Args:
            max_norm: the largest total norm allowed (> 0, or inf).

        Returns:
            The total norm, a 0-d fp32 tensor on the first gradient's device (the first
            parameter's if no parameter has a gradient; 0 then).

        Raises:
            ValueError: max_norm not > 0.
        """
        if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)):
            raise TypeError(f"max_norm: expected a float, got {type(max_norm).__name__}")
        if not max_norm > 0:
            raise ValueError(f"max_norm: expected a float > 0, got {max_norm}")
        params = [p for group in self.param_groups for p in group["params"]]
        grads = [g for g in (self._gradient(p) for p in params) if g is not None]
        if not grads:
            device = params[0].device if params else torch.device("cpu")
            total = torch.zeros((), dtype=torch.float32, device=device)
        else:
            by_device: Dict[torch.device, list] = {}
            for g in grads:
                by_device.setdefault(g.device, []).append(g)
            first = grads[0].device
            norms = chain.from_iterable(torch._foreach_norm(gs, 2.0, dtype=torch.float32)
                                        for gs in by_device.values())
            total = torch.linalg.vector_norm(torch.stack([n.to(first) for n in norms]), 2.0)
        if math.isinf(max_norm):
            self._clip_coef = torch.ones((), dtype=torch.float32, device=total.device)
        else:
            self._clip_coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        return total

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's `load_state_dict`, keeping `main`, `exp_avg` and `exp_avg_sq` in fp32.

        torch casts every floating state tensor to its parameter's dtype, which would round the
        main weights to bf16; these three are set aside, and after torch's load put back as
        contiguous fp32 copies on the parameter's device. Each parameter is then set from its
        loaded main weights (rounded to its dtype), so that model and optimizer agree at once
        (a no-op when the model was saved at the same step).

        Raises:
            ValueError: as torch's, and for a saved tensor whose shape is not its parameter's.
        """
        fp32_state = {}
        stripped = {}
        for key, s in state_dict["state"].items():
            fp32_state[key] = {k: v for k, v in s.items() if k in _FP32_STATE}
            stripped[key] = {k: v for k, v in s.items() if k not in _FP32_STATE}
        super().load_state_dict({**state_dict, "state": stripped})
        params = dict(zip(chain.from_iterable(g["params"] for g in state_dict["param_groups"]),
                          chain.from_iterable(g["params"] for g in self.param_groups)))
        with torch.no_grad():
            for key, p in params.items():
                state = self.state.get(p)
                if not state:
                    continue
                if isinstance(state.get("step"), torch.Tensor):  # not shared with the loaded dict
                    state["step"] = state["step"].clone()
                for k, v in fp32_state.get(key, {}).items():
                    if v.shape != p.shape:
                        raise ValueError(f"state[{key}][{k!r}]: expected shape {tuple(p.shape)} "
                                         f"(the parameter's), got {tuple(v.shape)}")
                    state[k] = v.to(device=p.device, dtype=torch.float32,
                                    memory_format=torch.contiguous_format, copy=True)
                if "main" in state:
                    p.copy_(state["main"])
                    if p.dtype == torch.float32 and p.is_contiguous():
                        state["main"] = p.detach()
