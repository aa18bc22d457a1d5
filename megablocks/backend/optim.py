"""One AdamW step over one tensor with fp32 main weights, fused into a single elementwise pass.

Legend: n elements of the tensor (any shape, read in its logical, row-major order).

For a parameter `param_n` (fp32, fp16 or bf16) whose fp32 main copy is `main_n`, with gradient
`grad_n` (fp32, fp16 or bf16), moments `exp_avg_n`, `exp_avg_sq_n` (fp32) and step count t
(after its increment), the update is torch.optim.AdamW's, all in fp32:

    g = grad · grad_scale                       (grad_scale: a 0-d fp32 device tensor, or 1)
    w = main · (1 - lr·wd)                      (decoupled weight decay)
    m = exp_avg + (1 - β1) · (g - exp_avg)      (= β1·exp_avg + (1 - β1)·g)
    v = exp_avg_sq · β2 + (1 - β2) · g · g
    w = w - (lr / (1 - β1^t)) · m / (sqrt(v) / sqrt(1 - β2^t) + eps)
    main, exp_avg, exp_avg_sq = w, m, v;  param = w rounded to param's dtype (nearest even)

The step-dependent scalars (bias corrections, step size, decay factor) come from the host, where
the step count lives; only `grad_scale` is read on the device, so a step never waits for the GPU.
The kernel reads the gradient, main and both moments once and writes main, both moments and the
parameter once: 14 bytes read and 14 written per element for a bf16 parameter and gradient.
When `main` is the fp32 parameter itself, the parameter is not written separately.
"""

import math
from dataclasses import dataclass
from typing import List, Optional, Union

import torch
import triton
import triton.language as tl

from megablocks import _checks
from megablocks.backend import cdiv
from megablocks.backend.launch import with_overrides


@dataclass(frozen=True)
class AdamWConfig:
    """The settings of one `adamw_step` launch: `block` elements per program, `num_warps`
    (`default_adamw_config` picks them; `config=` overrides them, see `megablocks.backend.launch`)."""

    block: int
    num_warps: int

    def __post_init__(self):
        if self.block < 1 or self.block & (self.block - 1):
            raise ValueError(f"block: expected a power of 2, got {self.block}")
        if self.num_warps < 1 or self.num_warps & (self.num_warps - 1):
            raise ValueError(f"num_warps: expected a power of 2, got {self.num_warps}")


def default_adamw_config(numel: int) -> AdamWConfig:
    """The launch settings for a tensor of `numel` elements: 1024 elements per program, 4 warps
    (8 elements, two 16-byte fp32 accesses per thread and array). The pass is elementwise and
    memory-bound, so any block that keeps every thread on wide accesses does; this one is the
    usual choice for such passes and has not been tuned by a sweep here."""
    return AdamWConfig(block=1024, num_warps=4)


# The update of `adamw_step` over the elements `offs` (masked): loads, fp32 math, stores of main
# and both moments; returns the new main values (for the parameter's copy).
@triton.jit
def _adamw_update(grad_ptr, main_ptr, exp_avg_ptr, exp_avg_sq_ptr, grad_scale_ptr, offs, mask, decay,
                  one_minus_beta1, beta2, one_minus_beta2, neg_step_size, bias_correction2_sqrt, eps,
                  HAS_GRAD_SCALE: tl.constexpr):
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_GRAD_SCALE:
        g = g * tl.load(grad_scale_ptr).to(tl.float32)
    w = tl.load(main_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = w * decay
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + one_minus_beta2 * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    w = w + tl.div_rn(neg_step_size * m, denom)
    tl.store(main_ptr + offs, w, mask=mask)
    tl.store(exp_avg_ptr + offs, m, mask=mask)
    tl.store(exp_avg_sq_ptr + offs, v, mask=mask)
    return w


# param_n (fp32/fp16/bf16; written only if WRITE_PARAM), grad_n (fp32/fp16/bf16), main_n,
# exp_avg_n, exp_avg_sq_n (fp32), grad_scale (0-d fp32; read only if HAS_GRAD_SCALE): all
# contiguous. Program p updates elements [p·BLOCK, (p+1)·BLOCK). Every loaded value is turned into
# fp32 right after its load; divisions and the square root are IEEE-rounded (div_rn, sqrt_rn).
@triton.jit
def _adamw_kernel(
    param_ptr,
    grad_ptr,
    main_ptr,
    exp_avg_ptr,
    exp_avg_sq_ptr,
    grad_scale_ptr,
    n,
    decay,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    neg_step_size,
    bias_correction2_sqrt,
    eps,
    HAS_GRAD_SCALE: tl.constexpr,
    WRITE_PARAM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w = _adamw_update(grad_ptr, main_ptr, exp_avg_ptr, exp_avg_sq_ptr, grad_scale_ptr, offs, mask, decay,
                      one_minus_beta1, beta2, one_minus_beta2, neg_step_size, bias_correction2_sqrt, eps,
                      HAS_GRAD_SCALE)
    if WRITE_PARAM:
        tl.store(param_ptr + offs, w.to(param_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class _Scalars:
    """The host-side scalars of one step (Python floats, rounded to fp32 at the launch)."""

    decay: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    neg_step_size: float
    bias_correction2_sqrt: float
    eps: float


def _scalars(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: float) -> _Scalars:
    return _Scalars(
        decay=1.0 - lr * weight_decay,
        one_minus_beta1=1.0 - beta1,
        beta2=beta2,
        one_minus_beta2=1.0 - beta2,
        neg_step_size=-lr / (1.0 - beta1**step),
        bias_correction2_sqrt=math.sqrt(1.0 - beta2**step),
        eps=eps,
    )


def _check_step_args(param, grad, main, exp_avg, exp_avg_sq, grad_scale, step) -> None:
    _checks.check_tensor("grad", grad, dtypes=_checks.FLOAT_DTYPES, numel_int32=False)
    for name, t in (("main", main), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        _checks.check_tensor(name, t, dtypes=(torch.float32,), numel_int32=False)
        if not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()}")
        if t.shape != grad.shape:
            raise ValueError(f"{name}: expected shape {tuple(grad.shape)} (grad's), got {tuple(t.shape)}")
    if param is not None:
        _checks.check_tensor("param", param, dtypes=_checks.FLOAT_DTYPES, numel_int32=False)
        if param.shape != grad.shape:
            raise ValueError(f"param: expected shape {tuple(grad.shape)} (grad's), got {tuple(param.shape)}")
    if grad_scale is not None:
        _checks.check_tensor("grad_scale", grad_scale, dtypes=(torch.float32,))
        if grad_scale.numel() != 1:
            raise ValueError(f"grad_scale: expected one element, got shape {tuple(grad_scale.shape)}")
    _checks.check_same_device(main=main, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, param=param,
                              grad_scale=grad_scale)
    if not step >= 1:
        raise ValueError(f"step: expected the step count after its increment (>= 1), got {step}")


def adamw_step(
    param: Optional[torch.Tensor],
    grad: torch.Tensor,
    main: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: float,
    grad_scale: Optional[torch.Tensor] = None,
    config: Optional[Union[AdamWConfig, dict]] = None,
) -> None:
    """One AdamW step of one tensor in place, by one Triton launch (the module docstring's update).

    `main`, `exp_avg`, `exp_avg_sq`: contiguous fp32, of `grad`'s shape, updated in place.
    `param`: fp32/fp16/bf16 of `grad`'s shape, overwritten with the new `main` rounded to its dtype;
    None when `main` is the parameter itself (an fp32 parameter updated in place).
    `grad`: fp32/fp16/bf16. `grad_scale`: a one-element fp32 tensor on the same device that the
    gradient is multiplied by (read by the kernel, no host sync); None means 1.
    `step`: the step count after its increment (>= 1). Every tensor on one device.

    A non-contiguous `grad` is read from a contiguous copy; a non-contiguous `param` is written
    through a contiguous buffer that is then copied into it (one extra pass each).

    Raises TypeError for a dtype outside those above, ValueError for shapes, devices or a step < 1.
    """
    _check_step_args(param, grad, main, exp_avg, exp_avg_sq, grad_scale, step)
    n = grad.numel()
    if n == 0:
        return
    s = _scalars(lr, beta1, beta2, eps, weight_decay, step)
    grad = grad.contiguous()
    param_out = None
    if param is not None:
        param_out = param if param.is_contiguous() else torch.empty_like(param, memory_format=torch.contiguous_format)
    cfg = with_overrides(default_adamw_config(n), config)
    _adamw_kernel[(cdiv(n, cfg.block),)](
        param_out if param_out is not None else main,
        grad,
        main,
        exp_avg,
        exp_avg_sq,
        grad_scale if grad_scale is not None else main,
        n,
        s.decay,
        s.one_minus_beta1,
        s.beta2,
        s.one_minus_beta2,
        s.neg_step_size,
        s.bias_correction2_sqrt,
        s.eps,
        HAS_GRAD_SCALE=grad_scale is not None,
        WRITE_PARAM=param_out is not None,
        BLOCK=cfg.block,
        num_warps=cfg.num_warps,
        enable_fp_fusion=False,
    )
    if param_out is not None and param_out is not param:
        param.copy_(param_out)


# The multi-tensor form: tensor i's addresses in row i of table_T6 (int64: param, grad, main,
# exp_avg, exp_avg_sq, numel), its first program in block_start_T1[i] (int32, T + 1 entries, the
# last the grid size). The element types come from the `*_like` pointers (one dtype per launch).
# ALIGNED: every address is a multiple of 16 bytes and every numel of 16 (the host sorts the tensors
# that are not into a launch of their own), said to the compiler, which cannot know it of values
# loaded from memory; without it each thread moves one element at a time instead of 16 bytes
# (the per-tensor kernel gets this from its arguments' specialization). Measured on an H200 in the
# dmoe_125m trainer: 28.5 ms a step without, 27.1 ms with (one launch per tensor: 26.2 ms).
@triton.jit
def _adamw_multi_kernel(
    table_ptr,
    block_start_ptr,
    num_tensors,
    param_like_ptr,
    grad_like_ptr,
    grad_scale_ptr,
    decay,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    neg_step_size,
    bias_correction2_sqrt,
    eps,
    SEARCH_STEPS: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    WRITE_PARAM: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    pid = tl.program_id(0)
    lo = 0
    hi = num_tensors
    for _ in range(SEARCH_STEPS):  # the last tensor i with block_start[i] <= pid
        active = lo < hi
        mid = (lo + hi) // 2
        go_right = tl.load(block_start_ptr + mid) <= pid
        lo = tl.where(active & go_right, mid + 1, lo)
        hi = tl.where(active & ~go_right, mid, hi)
    i = (lo - 1).to(tl.int64)
    row = table_ptr + i * 6
    n = tl.load(row + 5)
    if ALIGNED:
        n = tl.multiple_of(n, 16)
    offs = (pid - tl.load(block_start_ptr + i)).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    grad_ptr = tl.load(row + 1).to(tl.pointer_type(grad_like_ptr.dtype.element_ty))
    main_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    exp_avg_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    exp_avg_sq_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))
    if ALIGNED:
        grad_ptr = tl.multiple_of(grad_ptr, 16)
        main_ptr = tl.multiple_of(main_ptr, 16)
        exp_avg_ptr = tl.multiple_of(exp_avg_ptr, 16)
        exp_avg_sq_ptr = tl.multiple_of(exp_avg_sq_ptr, 16)
    w = _adamw_update(grad_ptr, main_ptr, exp_avg_ptr, exp_avg_sq_ptr, grad_scale_ptr, offs, mask, decay,
                      one_minus_beta1, beta2, one_minus_beta2, neg_step_size, bias_correction2_sqrt, eps,
                      HAS_GRAD_SCALE)
    if WRITE_PARAM:
        param_ptr = tl.load(row).to(tl.pointer_type(param_like_ptr.dtype.element_ty))
        if ALIGNED:
            param_ptr = tl.multiple_of(param_ptr, 16)
        tl.store(param_ptr + offs, w.to(param_like_ptr.dtype.element_ty), mask=mask)


def adamw_multi_step(
    params: List[Optional[torch.Tensor]],
    grads: List[torch.Tensor],
    mains: List[torch.Tensor],
    exp_avgs: List[torch.Tensor],
    exp_avg_sqs: List[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: float,
    grad_scale: Optional[torch.Tensor] = None,
    config: Optional[Union[AdamWConfig, dict]] = None,
) -> None:
    """`adamw_step` over many tensors with the same hyperparameters and step count, in one
    launch per (parameter dtype, gradient dtype) pair (two where some tensors are not 16-byte
    aligned or sized): the programs of all tensors in one grid,
    each finding its tensor in a table of addresses (the host cost of one launch instead of one
    per tensor). The same arithmetic as `adamw_step`, element for element. Arguments as
    `adamw_step`'s, one list entry per tensor (params[i] None: mains[i] is the fp32 parameter).

    Raises TypeError / ValueError as `adamw_step`, and ValueError for lists of unequal lengths.
    """
    lists = (params, grads, mains, exp_avgs, exp_avg_sqs)
    if len({len(x) for x in lists}) != 1:
        raise ValueError(f"params, grads, mains, exp_avgs, exp_avg_sqs: expected lists of one length, got "
                         f"{[len(x) for x in lists]}")
    buckets = {}
    copies = []
    for param, grad, main, exp_avg, exp_avg_sq in zip(*lists):
        _check_step_args(param, grad, main, exp_avg, exp_avg_sq, grad_scale, step)
        if grad.numel() == 0:
            continue
        grad = grad.contiguous()
        out = param
        if param is not None and not param.is_contiguous():
            out = torch.empty_like(param, memory_format=torch.contiguous_format)
            copies.append((param, out))
        tensors = (out, grad, main, exp_avg, exp_avg_sq)
        aligned = grad.numel() % 16 == 0 and all(t is None or t.data_ptr() % 16 == 0 for t in tensors)
        key = (None if param is None else param.dtype, grad.dtype, main.device, aligned)
        buckets.setdefault(key, []).append(tensors)
    if not buckets:
        return
    s = _scalars(lr, beta1, beta2, eps, weight_decay, step)
    for (param_dtype, _, device, aligned), rows in buckets.items():
        cfg = with_overrides(default_adamw_config(max(r[1].numel() for r in rows)), config)
        table, starts, total = [], [0], 0
        for out, grad, main, exp_avg, exp_avg_sq in rows:
            n = grad.numel()
            table.append([out.data_ptr() if out is not None else 0, grad.data_ptr(), main.data_ptr(),
                          exp_avg.data_ptr(), exp_avg_sq.data_ptr(), n])
            total += cdiv(n, cfg.block)
            starts.append(total)
        _checks.check_int32_range("programs of one multi-tensor launch", total)
        table_t = torch.tensor(table, dtype=torch.int64).to(device, non_blocking=True)
        starts_t = torch.tensor(starts, dtype=torch.int32).to(device, non_blocking=True)
        first = rows[0]
        _adamw_multi_kernel[(total,)](
            table_t,
            starts_t,
            len(rows),
            first[0] if first[0] is not None else first[2],
            first[1],
            grad_scale if grad_scale is not None else first[2],
            s.decay,
            s.one_minus_beta1,
            s.beta2,
            s.one_minus_beta2,
            s.neg_step_size,
            s.bias_correction2_sqrt,
            s.eps,
            SEARCH_STEPS=max(1, len(rows)).bit_length(),
            HAS_GRAD_SCALE=grad_scale is not None,
            WRITE_PARAM=param_dtype is not None,
            BLOCK=cfg.block,
            ALIGNED=aligned,
            num_warps=cfg.num_warps,
            enable_fp_fusion=False,
        )
    for param, out in copies:
        param.copy_(out)


def adamw_step_reference(
    param: Optional[torch.Tensor],
    grad: torch.Tensor,
    main: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: float,
    grad_scale: Optional[torch.Tensor] = None,
) -> None:
    """`adamw_step` in plain torch ops, the same fp32 operations in the same order (what runs where
    Triton does not, and what the kernel is tested against). Same arguments and checks."""
    _check_step_args(param, grad, main, exp_avg, exp_avg_sq, grad_scale, step)
    s = _scalars(lr, beta1, beta2, eps, weight_decay, step)
    g = grad.float()
    if grad_scale is not None:
        g = g * grad_scale.reshape(())
    main.mul_(s.decay)
    exp_avg.add_((g - exp_avg).mul_(s.one_minus_beta1))
    exp_avg_sq.mul_(s.beta2).add_(g.mul(s.one_minus_beta2).mul_(g))
    denom = exp_avg_sq.sqrt().div_(s.bias_correction2_sqrt).add_(s.eps)
    main.add_(exp_avg.mul(s.neg_step_size).div_(denom))
    if param is not None:
        param.copy_(main)
