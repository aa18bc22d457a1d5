"""Block-sparse products with `stk.Matrix` operands: drop-in replacements for `stk.ops.sdd/dsd/dds`.

Legend: B block size; a sparse matrix S of R block rows and Q block columns, shape `[R·B, Q·B]`,
`data_SBB` `[nnz, B, B]` (docs/CONTRACTS.md); E experts, F ffn size, C = ceil(F/B).

    sdd(a_MK, b_KN, topo) -> stk.Matrix   the blocks of a @ b that `topo` names (topo's metadata)
    dsd(S, b)  -> Tensor                  S @ b      (S may be `m.t()`)
    dds(a, S)  -> Tensor                  a @ S      (S may be `m.t()`)

Every input gets a gradient, the sparse operand's `data` included. Inputs are fp32, fp16 or bf16
(one dtype per call); products accumulate in fp32 and return the inputs' dtype. fp32 products
follow `torch.get_float32_matmul_precision()` ('highest': full fp32, else TF32), like torch.

Expert layout. A topology that carries `num_experts = E` and `ffn_hidden_size = F` (the dMoE
topology of `megablocks.ops.topology.make_topology`) has Q = E·C block columns, of which block
column e·C + j stands for the dense columns e·F + j·B + [0, B) that exist (j·B + col < F). A dense
operand along that side may then have E·F entries (e.g. `w1_EFH.t()` as sdd's b, `w2_EFH` as dsd's
b), or Q·B entries (plain stk semantics); outputs along that side (dsd of `S.t()`, dds of `S`)
have E·F. Sparse entries in the columns past F of an expert's last block are read as zero, and
sdd writes zeros there. Without those attributes, dense sizes are multiples of B as in stk.
`make_topology`'s `ExpertTopology` keeps the layout through `.t()` and `.clone()` (a plain
`stk.Matrix` drops Python attributes there); the ops return their sparse results as one too.

Unused slots. On the dMoE topology the slots at or past `offsets[-1]` (a device value) are
unused: sdd writes zeros there, dsd and dds never read them (no host sync either way).

On CUDA (and on CPU under TRITON_INTERPRET=1) the Triton kernels of megablocks/backend/sparse.py
run; on CPU otherwise the dense, masked references below (`*_reference`) do.
"""

import functools
from typing import Optional, Tuple

import stk
import torch

from megablocks import _checks
from megablocks.backend import sparse as _backend
from megablocks.backend import use_triton
from megablocks.ops._eager import custom_op
from megablocks.ops.topology import ExpertTopology

BLOCK_SIZES = _backend.BLOCK_SIZES
_INDEX_DTYPES = (torch.int16, torch.int32, torch.int64)
_META_NAMES = ("row_indices", "column_indices", "offsets", "column_indices_t", "offsets_t",
               "block_offsets_t")


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _check_index_dtype_range(name: str, dtype: torch.dtype, largest: int) -> None:
    if largest > torch.iinfo(dtype).max:
        raise ValueError(
            f"{name}: {str(dtype).replace('torch.', '')} cannot hold index {largest} of this "
            f"topology (more than {torch.iinfo(dtype).max} blocks); build it with int32 indices"
        )


def _check_values(name: str, t: torch.Tensor, upper: int) -> None:
    if not torch.compiler.is_compiling():
        _checks.check_index_values(name, t, upper)


def _check_meta(block_size: int, meta, device: torch.device) -> Tuple[int, int, int]:
    """Checks the six index arrays of a topology; returns (R, Q, nnz)."""
    _checks.check_int("block_size", block_size)
    for name, t in zip(_META_NAMES, meta):
        _checks.check_tensor(name, t, ndim=1, dtypes=_INDEX_DTYPES)
    # Everything but the values depends on the block size, dtypes, sizes and devices only: checked
    # once per such layout (the layer's ops check the same topology several times a step).
    R, Q, nnz = _check_meta_layout(block_size, device,
                                   tuple((t.dtype, t.numel(), t.device) for t in meta))
    row_indices, column_indices, offsets, column_indices_t, offsets_t, block_offsets_t = meta
    _check_values("row_indices", row_indices, max(R, 1))
    _check_values("column_indices", column_indices, max(Q, 1))
    _check_values("offsets", offsets, nnz + 1)
    _check_values("column_indices_t", column_indices_t, max(R, 1))
    _check_values("offsets_t", offsets_t, nnz + 1)
    _check_values("block_offsets_t", block_offsets_t, max(nnz, 1))
    return R, Q, nnz


@functools.lru_cache(maxsize=256)
def _check_meta_layout(block_size: int, device: torch.device, specs) -> Tuple[int, int, int]:
    """The checks of `_check_meta` on (dtype, numel, device) of each index array."""
    _checks.check_int("block_size", block_size)
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block size: expected one of {BLOCK_SIZES}, got {block_size}")
    for name, (_, _, where) in zip(_META_NAMES, specs):
        if where != device:
            raise ValueError(f"{name}: expected a tensor on {device}, got one on {where}")
    dtypes = dict(zip(_META_NAMES, (dtype for dtype, _, _ in specs)))
    sizes = dict(zip(_META_NAMES, (numel for _, numel, _ in specs)))
    nnz = sizes["row_indices"]
    for name in ("column_indices", "column_indices_t", "block_offsets_t"):
        if sizes[name] != nnz:
            raise ValueError(f"{name}: expected {nnz} entries (one per block, like row_indices), "
                             f"got {sizes[name]}")
    if sizes["offsets"] < 1 or sizes["offsets_t"] < 1:
        raise ValueError("offsets/offsets_t: expected one entry per block row/column plus one, "
                         f"got {sizes['offsets']} and {sizes['offsets_t']} entries")
    R, Q = sizes["offsets"] - 1, sizes["offsets_t"] - 1
    _checks.check_int32_range("rows of the sparse matrix (block rows · block size)", R * block_size)
    _checks.check_int32_range("columns of the sparse matrix (block columns · block size)",
                              Q * block_size)
    _checks.check_int32_range("number of blocks (nnz)", nnz)
    for name, largest in (("row_indices", R - 1), ("column_indices", Q - 1),
                          ("column_indices_t", R - 1), ("block_offsets_t", nnz - 1),
                          ("offsets", nnz), ("offsets_t", nnz)):
        _check_index_dtype_range(name, dtypes[name], largest)
    return R, Q, nnz


def _check_dense(name: str, t, dtype: Optional[torch.dtype], device: Optional[torch.device]):
    _checks.check_tensor(name, t, ndim=2, dtypes=_checks.FLOAT_DTYPES, numel_int32=False)
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {str(dtype).replace('torch.', '')} (one dtype per "
                        f"product), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the topology's device), "
                         f"got one on {t.device}")


def _check_sparse(data, meta) -> Tuple[int, int, int, int]:
    """Checks a sparse operand (data and index arrays); returns (B, R, Q, nnz)."""
    _checks.check_tensor("data", data, ndim=3, dtypes=_checks.FLOAT_DTYPES, numel_int32=False)
    if data.shape[1] != data.shape[2]:
        raise ValueError(f"data: expected square blocks [nnz, B, B], got {tuple(data.shape)}")
    R, Q, nnz = _check_meta(data.shape[-1], meta, data.device)
    if data.shape[0] != nnz:
        raise ValueError(f"data: expected {nnz} blocks (one per index), got {data.shape[0]}")
    return data.shape[-1], R, Q, nnz


def _maps(num_experts: int, ffn_hidden_size: int, B: int, Q: int):
    """(expert map (C, F) or the identity (1, B), C or 0) for the op-level layout arguments.

    An expert layout means the dMoE topology: when nnz = R·C, block row r holds the slots
    r·C + [0, C) at consecutive block columns, and block column e·C + j the consecutive block rows
    of expert e at slots C apart (docs/CONTRACTS.md); the kernels then skip per-block index loads.
    """
    if num_experts == 0:
        return (1, B), 0
    _checks.check_int("num_experts", num_experts, min_value=1)
    _checks.check_int("ffn_hidden_size", ffn_hidden_size, min_value=1)
    C = -(-ffn_hidden_size // B)
    if num_experts * C != Q:
        raise ValueError(
            f"num_experts, ffn_hidden_size: {num_experts} experts × ceil({ffn_hidden_size}/{B}) = "
            f"{num_experts * C} block columns, but the topology has {Q}"
        )
    return (C, ffn_hidden_size), C


def _side(num_experts: int, ffn_hidden_size: int, B: int, Q: int) -> int:
    """Dense size along the topology's column side: E·F, or Q·B without an expert layout."""
    return num_experts * ffn_hidden_size if num_experts else Q * B


def _expect(name: str, what: str, got: int, want: int) -> None:
    if got != want:
        raise ValueError(f"{name}: expected {what} {want}, got {got}")


# ---------------------------------------------------------------------------------------------
# Dense, masked references (plain torch; differentiable; used on CPU and by the tests)
# ---------------------------------------------------------------------------------------------


def _used(offsets: torch.Tensor, nnz: int) -> torch.Tensor:
    """[nnz] bool: slot s is real (s < offsets[-1]); read on the device, no sync."""
    return torch.arange(nnz, device=offsets.device) < offsets[-1].long()


def _block_ids(meta, R: int, Q: int) -> torch.Tensor:
    row = meta[0].long().clamp(0, max(R - 1, 0))
    col = meta[1].long().clamp(0, max(Q - 1, 0))
    return row * Q + col


def _to_dense(data_SBB: torch.Tensor, meta, R: int, Q: int) -> torch.Tensor:
    """The `[R·B, Q·B]` matrix the blocks describe (unused slots ignored, even if NaN)."""
    B = data_SBB.shape[-1]
    used = _used(meta[2], data_SBB.shape[0])[:, None, None]
    blocks = torch.where(used, data_SBB, torch.zeros((), dtype=data_SBB.dtype,
                                                     device=data_SBB.device))
    dense = blocks.new_zeros((R * Q, B, B)).index_add(0, _block_ids(meta, R, Q), blocks)
    return dense.view(R, Q, B, B).transpose(1, 2).reshape(R * B, Q * B)


def _from_dense(dense: torch.Tensor, meta, R: int, Q: int, B: int) -> torch.Tensor:
    """The blocks of `[R·B, Q·B]` `dense` at the topology's slots; zeros in unused slots."""
    blocks = dense.reshape(R, B, Q, B).transpose(1, 2).reshape(R * Q, B, B)
    out = blocks.index_select(0, _block_ids(meta, R, Q))
    used = _used(meta[2], out.shape[0])[:, None, None]
    return torch.where(used, out, torch.zeros((), dtype=out.dtype, device=out.device))


def _pad_experts(x: torch.Tensor, dim: int, expert_map, Q: int, B: int) -> torch.Tensor:
    """E·F entries along `dim` → Q·B (each expert's F padded to C·B with zeros)."""
    C, F = expert_map
    if C * B == F:
        return x
    x = x.movedim(dim, -1)
    x = x.reshape(*x.shape[:-1], Q // C, F)
    x = torch.nn.functional.pad(x, (0, C * B - F))
    return x.reshape(*x.shape[:-2], Q * B).movedim(-1, dim)


def _crop_experts(x: torch.Tensor, dim: int, expert_map, Q: int, B: int) -> torch.Tensor:
    """Q·B entries along `dim` → E·F (the inverse of `_pad_experts`)."""
    C, F = expert_map
    if C * B == F:
        return x
    x = x.movedim(dim, -1)
    x = x.reshape(*x.shape[:-1], Q // C, C * B)[..., :F]
    return x.reshape(*x.shape[:-2], (Q // C) * F).movedim(-1, dim)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _sdd_data_reference(a_MK, b_KN, meta, block_size, num_experts, ffn_hidden_size):
    R, Q = meta[2].numel() - 1, meta[4].numel() - 1
    expert_map, _ = _maps(num_experts, ffn_hidden_size, block_size, Q)
    acc = _acc_dtype(a_MK.dtype)
    dense = _pad_experts(a_MK.to(acc) @ b_KN.to(acc), 1, expert_map, Q, block_size)
    return _from_dense(dense, meta, R, Q, block_size).to(a_MK.dtype)


def _dsd_data_reference(data_SBB, meta, transposed, b_KN, num_experts, ffn_hidden_size):
    R, Q = meta[2].numel() - 1, meta[4].numel() - 1
    B = data_SBB.shape[-1]
    expert_map, _ = _maps(num_experts, ffn_hidden_size, B, Q)
    acc = _acc_dtype(b_KN.dtype)
    dense = _crop_experts(_to_dense(data_SBB.to(acc), meta, R, Q), 1, expert_map, Q, B)
    return ((dense.t() if transposed else dense) @ b_KN.to(acc)).to(b_KN.dtype)


def _dds_data_reference(a_MK, data_SBB, meta, transposed, num_experts, ffn_hidden_size):
    R, Q = meta[2].numel() - 1, meta[4].numel() - 1
    B = data_SBB.shape[-1]
    expert_map, _ = _maps(num_experts, ffn_hidden_size, B, Q)
    acc = _acc_dtype(a_MK.dtype)
    dense = _crop_experts(_to_dense(data_SBB.to(acc), meta, R, Q), 1, expert_map, Q, B)
    return (a_MK.to(acc) @ (dense.t() if transposed else dense)).to(a_MK.dtype)


# ---------------------------------------------------------------------------------------------
# Custom ops (kernel or reference) with their autograd
# ---------------------------------------------------------------------------------------------


@custom_op("sdd")
def _sdd_op(a: torch.Tensor, b: torch.Tensor, row_indices: torch.Tensor,
            column_indices: torch.Tensor, offsets: torch.Tensor, column_indices_t: torch.Tensor,
            offsets_t: torch.Tensor, block_offsets_t: torch.Tensor, block_size: int,
            num_experts: int, ffn_hidden_size: int) -> torch.Tensor:
    meta = (row_indices, column_indices, offsets, column_indices_t, offsets_t, block_offsets_t)
    _check_dense("a", a, None, row_indices.device)
    _check_dense("b", b, a.dtype, row_indices.device)
    R, Q, nnz = _check_meta(block_size, meta, a.device)
    expert_map, row_blocks = _maps(num_experts, ffn_hidden_size, block_size, Q)
    _expect("a", "rows (the topology's rows)", a.shape[0], R * block_size)
    _expect("b", "rows (a's columns)", b.shape[0], a.shape[1])
    _expect("b", "columns", b.shape[1], _side(num_experts, ffn_hidden_size, block_size, Q))
    if not use_triton(a):
        return _sdd_data_reference(a, b, meta, block_size, num_experts, ffn_hidden_size)
    return _backend.sdd(a, b, row_indices, column_indices, offsets, block_size=block_size,
                        num_block_cols=Q, group_blocks=expert_map[0], group_size=expert_map[1],
                        row_blocks=row_blocks if nnz == R * row_blocks else 0)


@_sdd_op.register_fake
def _(a, b, row_indices, column_indices, offsets, column_indices_t, offsets_t, block_offsets_t,
      block_size, num_experts, ffn_hidden_size):
    return a.new_empty((row_indices.shape[0], block_size, block_size))


def _dsd_out_rows(R, Q, B, transposed, num_experts, ffn_hidden_size) -> int:
    return _side(num_experts, ffn_hidden_size, B, Q) if transposed else R * B


@custom_op("dsd")
def _dsd_op(data: torch.Tensor, row_indices: torch.Tensor, column_indices: torch.Tensor,
            offsets: torch.Tensor, column_indices_t: torch.Tensor, offsets_t: torch.Tensor,
            block_offsets_t: torch.Tensor, transposed: bool, b: torch.Tensor, num_experts: int,
            ffn_hidden_size: int) -> torch.Tensor:
    meta = (row_indices, column_indices, offsets, column_indices_t, offsets_t, block_offsets_t)
    B, R, Q, nnz = _check_sparse(data, meta)
    _check_dense("b", b, data.dtype, data.device)
    expert_map, C = _maps(num_experts, ffn_hidden_size, B, Q)
    structured = C > 0 and nnz == R * C
    side = _side(num_experts, ffn_hidden_size, B, Q)
    _expect("b", "rows (the sparse operand's columns)", b.shape[0], R * B if transposed else side)
    if not use_triton(b):
        return _dsd_data_reference(data, meta, transposed, b, num_experts, ffn_hidden_size)
    out = b.new_empty((_dsd_out_rows(R, Q, B, transposed, num_experts, ffn_hidden_size),
                       b.shape[1]))
    if transposed:
        return _backend.dsd(data, offsets_t, column_indices_t, block_offsets_t, b, out,
                            transposed=True, num_block_cols=R, out_map=expert_map, in_map=(1, B),
                            slot_step=C if structured else 0)
    return _backend.dsd(data, offsets, column_indices, None, b, out, transposed=False,
                        num_block_cols=Q, out_map=(1, B), in_map=expert_map,
                        slot_step=1 if structured else 0)


@_dsd_op.register_fake
def _(data, row_indices, column_indices, offsets, column_indices_t, offsets_t, block_offsets_t,
      transposed, b, num_experts, ffn_hidden_size):
    R, Q, B = offsets.shape[0] - 1, offsets_t.shape[0] - 1, data.shape[-1]
    return b.new_empty((_dsd_out_rows(R, Q, B, transposed, num_experts, ffn_hidden_size),
                        b.shape[1]))


@custom_op("dds")
def _dds_op(a: torch.Tensor, data: torch.Tensor, row_indices: torch.Tensor,
            column_indices: torch.Tensor, offsets: torch.Tensor, column_indices_t: torch.Tensor,
            offsets_t: torch.Tensor, block_offsets_t: torch.Tensor, transposed: bool,
            num_experts: int, ffn_hidden_size: int) -> torch.Tensor:
    meta = (row_indices, column_indices, offsets, column_indices_t, offsets_t, block_offsets_t)
    B, R, Q, nnz = _check_sparse(data, meta)
    _check_dense("a", a, data.dtype, data.device)
    expert_map, C = _maps(num_experts, ffn_hidden_size, B, Q)
    structured = C > 0 and nnz == R * C
    side = _side(num_experts, ffn_hidden_size, B, Q)
    _expect("a", "columns (the sparse operand's rows)", a.shape[1], side if transposed else R * B)
    if not use_triton(a):
        return _dds_data_reference(a, data, meta, transposed, num_experts, ffn_hidden_size)
    out = a.new_empty((a.shape[0], R * B if transposed else side))
    # (a @ S)^T = S^T @ a^T: the dsd kernel with S^T, a^T and out^T as strided views.
    if transposed:
        _backend.dsd(data, offsets, column_indices, None, a.t(), out.t(), transposed=False,
                     num_block_cols=Q, out_map=(1, B), in_map=expert_map,
                     slot_step=1 if structured else 0)
    else:
        _backend.dsd(data, offsets_t, column_indices_t, block_offsets_t, a.t(), out.t(),
                     transposed=True, num_block_cols=R, out_map=expert_map, in_map=(1, B),
                     slot_step=C if structured else 0)
    return out


@_dds_op.register_fake
def _(a, data, row_indices, column_indices, offsets, column_indices_t, offsets_t, block_offsets_t,
      transposed, num_experts, ffn_hidden_size):
    R, Q, B = offsets.shape[0] - 1, offsets_t.shape[0] - 1, data.shape[-1]
    return a.new_empty((a.shape[0], R * B if transposed else
                        _side(num_experts, ffn_hidden_size, B, Q)))


# Gradients (S the stored matrix, `layout` = (num_experts, ffn_hidden_size)):
#   sdd:  y = [a @ b]_S        da = dsd(dy, b^T)          db = dds(a^T, dy)
#   dsd:  y = S @ b            dS = [dy @ b^T]_S          db = dsd(S^T, dy)
#         y = S^T @ b          dS = [b @ dy^T]_S          db = dsd(S, dy)
#   dds:  y = a @ S            da = dds(dy, S^T)          dS = [a^T @ dy]_S
#         y = a @ S^T          da = dds(dy, S)            dS = [dy^T @ a]_S


def _sdd_setup(ctx, inputs, output):
    a, b, *meta = inputs[:8]
    ctx.block_size, ctx.num_experts, ctx.ffn_hidden_size = inputs[8:]
    ctx.save_for_backward(a, b, *meta)


def _sdd_backward(ctx, dy):
    a, b, *meta = ctx.saved_tensors
    layout = (ctx.num_experts, ctx.ffn_hidden_size)
    da = db = None
    if ctx.needs_input_grad[0]:
        da = _dsd_op(dy, *meta, False, b.t(), *layout)
    if ctx.needs_input_grad[1]:
        db = _sdd_b_grad(a, b, dy, meta, layout)
    return (da, db) + (None,) * 9


def _sdd_b_grad(a, b, dy, meta, layout):
    """sdd's db = a^T @ dy, in b's layout: a column-major b (the layer's `w1_EFH.t()`) gets
    `dsd(dy^T, a)^T`, whose storage is the contiguous `[N, K]` that the kernel writes row by row,
    so the parameter's gradient reaches `.grad` without a strided copy (AccumulateGrad copies a
    gradient whose strides differ from its parameter's)."""
    if b.dim() == 2 and b.shape[0] > 1 and b.stride(0) == 1 and b.stride(1) == b.shape[0]:
        return _dsd_op(dy, *meta, True, a, *layout).t()
    return _dds_op(a.t(), dy, *meta, False, *layout)


def _dsd_setup(ctx, inputs, output):
    data, *rest = inputs
    meta, (ctx.transposed, b, ctx.num_experts, ctx.ffn_hidden_size) = rest[:6], rest[6:]
    ctx.block_size = data.shape[-1]
    ctx.save_for_backward(data, b, *meta)


def _dsd_backward(ctx, dy):
    data, b, *meta = ctx.saved_tensors
    layout = (ctx.num_experts, ctx.ffn_hidden_size)
    ddata = db = None
    if ctx.needs_input_grad[0]:
        lhs, rhs = (b, dy.t()) if ctx.transposed else (dy, b.t())
        ddata = _sdd_op(lhs, rhs, *meta, ctx.block_size, *layout)
    if ctx.needs_input_grad[8]:
        db = _dsd_op(data, *meta, not ctx.transposed, dy, *layout)
    return (ddata,) + (None,) * 7 + (db, None, None)


def _dds_setup(ctx, inputs, output):
    a, data, *rest = inputs
    meta, (ctx.transposed, ctx.num_experts, ctx.ffn_hidden_size) = rest[:6], rest[6:]
    ctx.block_size = data.shape[-1]
    ctx.save_for_backward(a, data, *meta)


def _dds_backward(ctx, dy):
    a, data, *meta = ctx.saved_tensors
    layout = (ctx.num_experts, ctx.ffn_hidden_size)
    da = ddata = None
    if ctx.needs_input_grad[0]:
        da = _dds_op(dy, data, *meta, not ctx.transposed, *layout)
    if ctx.needs_input_grad[1]:
        lhs, rhs = (dy.t(), a) if ctx.transposed else (a.t(), dy)
        ddata = _sdd_op(lhs, rhs, *meta, ctx.block_size, *layout)
    return (da, ddata) + (None,) * 9


_sdd_op.register_autograd(_sdd_backward, setup_context=_sdd_setup)
_dsd_op.register_autograd(_dsd_backward, setup_context=_dsd_setup)
_dds_op.register_autograd(_dds_backward, setup_context=_dds_setup)


# ---------------------------------------------------------------------------------------------
# Public functions (stk.Matrix level)
# ---------------------------------------------------------------------------------------------


def _check_matrix(name: str, m) -> None:
    if not isinstance(m, stk.Matrix):
        raise TypeError(f"{name}: expected an stk.Matrix, got {type(m).__name__}")
    if m.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D stk.Matrix, got shape {tuple(m.size())}")


def _meta(m: stk.Matrix):
    return tuple(getattr(m, n) for n in _META_NAMES)


def _expert_layout(m: stk.Matrix) -> Optional[Tuple[int, int]]:
    """(num_experts, ffn_hidden_size) carried by `m`, else None."""
    E, F = getattr(m, "num_experts", None), getattr(m, "ffn_hidden_size", None)
    if E is None or F is None:
        return None
    return _checks.check_int("num_experts", E, min_value=1), _checks.check_int("ffn_hidden_size", F, min_value=1)


def _stored_shape(m: stk.Matrix) -> Tuple[int, int]:
    size = tuple(m.size())
    return (size[1], size[0]) if not m.is_contiguous() else (size[0], size[1])


def _layout_args(name: str, m: stk.Matrix, dense_size: Optional[int], what: str):
    """(num_experts, ffn_hidden_size) op arguments for a dense size along m's column side.

    `dense_size` None: the side is an output (E·F with an expert layout). Also checks m's size
    against its metadata.
    """
    B = m.blocking
    R, Q = m.offsets.numel() - 1, m.offsets_t.numel() - 1
    if _stored_shape(m) != (R * B, Q * B):
        raise ValueError(f"{name}: shape {tuple(m.size())} does not match its metadata "
                         f"({R} block rows, {Q} block columns of {B})")
    layout = _expert_layout(m)
    if layout is None:
        if dense_size is not None:
            _expect(what, "size", dense_size, Q * B)
        return 0, 0
    E, F = layout
    _maps(E, F, B, Q)
    if dense_size is None or dense_size == E * F:
        return E, F
    if dense_size == Q * B:
        return E, Q * B // E
    raise ValueError(f"{what}: expected size {E * F} (num_experts·ffn_hidden_size) or {Q * B} "
                     f"(block columns · block size), got {dense_size}")


def _like(topo: stk.Matrix, data: torch.Tensor) -> stk.Matrix:
    layout = _expert_layout(topo)
    if layout is None:
        return stk.Matrix(topo.size(), data, *_meta(topo))
    return ExpertTopology(topo.size(), data, *_meta(topo), num_experts=layout[0], ffn_hidden_size=layout[1])


def sdd(a: torch.Tensor, b: torch.Tensor, topo: stk.Matrix) -> stk.Matrix:
    """The blocks of `a @ b` that `topo` names, as an `stk.Matrix` with topo's metadata.

    Args:
        a: `[M, K]` fp32/fp16/bf16, M = topo rows; any strides (e.g. a transposed view).
        b: `[K, N]`, a's dtype; N = topo columns, or E·F when topo carries an expert layout
            (module docstring), e.g. `w1_EFH.t()`.
        topo: non-transposed `stk.Matrix` (its `data` may live on the meta device; only its
            shape is used), indices int16/int32/int64 on a's device, block size 16/32/64/128.

    Returns:
        `stk.Matrix(topo.size(), data, topo's index tensors)` with `data` `[nnz, B, B]` of a's
        dtype, the expert layout attributes copied. Slots at or past `topo.offsets[-1]` hold zeros.
        Differentiable in a and b.

    Raises:
        TypeError: a, b not tensors of one float dtype; topo not an stk.Matrix.
        ValueError: topo transposed; mismatched shapes or devices; index dtypes too narrow for the
            topology; index values out of range (checked on CPU).
    """
    return _like(topo, sdd_data(a, b, topo))


def _check_topology(topo) -> None:
    _check_matrix("topo", topo)
    if not topo.is_contiguous():
        raise ValueError("topo: expected a non-transposed stk.Matrix (sdd writes the blocks in "
                         "topo's row-major order)")


def sdd_data(a: torch.Tensor, b: torch.Tensor, topo: stk.Matrix) -> torch.Tensor:
    """`sdd(a, b, topo).data`: the `[nnz, B, B]` blocks alone, without building an `stk.Matrix`
    (a layer that keeps its topology passes the blocks on to `dsd_data`). Arguments, gradients and
    errors as `sdd`."""
    _check_topology(topo)
    _check_dense("a", a, None, None)
    _check_dense("b", b, a.dtype, a.device)
    layout = _layout_args("topo", topo, b.shape[1], "b (columns)")
    return _sdd_op(a, b, *_meta(topo), topo.blocking, *layout)


def dsd_data(data: torch.Tensor, topo: stk.Matrix, b: torch.Tensor) -> torch.Tensor:
    """`dsd(S, b)` for the sparse S with topo's blocks holding `data` (`[nnz, B, B]`, e.g. from
    `sdd_data`), without building S. `topo` is not transposed; the rest as `dsd`."""
    _check_topology(topo)
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"data: expected a torch.Tensor of blocks [nnz, B, B], got {type(data).__name__}")
    _check_dense("b", b, data.dtype, None)
    layout = _layout_args("topo", topo, b.shape[0], "b (rows)")
    return _dsd_op(data, *_meta(topo), False, b, *layout)


def dsd(a: stk.Matrix, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` for a sparse `a` (an `stk.Matrix`, possibly `m.t()`) and a dense `b`.

    Args:
        a: `[M, K]` stk.Matrix, data fp32/fp16/bf16 `[nnz, B, B]`.
        b: `[K, N]` of a's dtype; with an expert layout and `a` not transposed, K may be E·F
            (e.g. `w2_EFH`).

    Returns:
        `[M, N]` of b's dtype; M = E·F when `a` is a transposed expert topology (e.g. the weight
        gradient `dsd(h.t(), dy)`). Block rows without blocks give zero rows. Differentiable in
        `a.data` and b.

    Raises:
        TypeError / ValueError: as for `sdd`.
    """
    _check_matrix("a", a)
    transposed = not a.is_contiguous()
    _check_dense("b", b, a.data.dtype, None)
    layout = _layout_args("a", a, None if transposed else b.shape[0], "b (rows)")
    return _dsd_op(a.data, *_meta(a), transposed, b, *layout)


def dds(a: torch.Tensor, b: stk.Matrix) -> torch.Tensor:
    """`a @ b` for a dense `a` and a sparse `b` (an `stk.Matrix`, possibly `m.t()`).

    Args:
        a: `[M, K]` of b's dtype; with an expert layout and `b` transposed, K may be E·F.
        b: `[K, N]` stk.Matrix, data fp32/fp16/bf16 `[nnz, B, B]`.

    Returns:
        `[M, N]` of a's dtype; N = E·F when `b` is a (non-transposed) expert topology.
        Differentiable in a and `b.data`.

    Raises:
        TypeError / ValueError: as for `sdd`.
    """
    _check_matrix("b", b)
    transposed = not b.is_contiguous()
    _check_dense("a", a, b.data.dtype, None)
    layout = _layout_args("b", b, a.shape[1] if transposed else None, "a (columns)")
    return _dds_op(a, b.data, *_meta(b), transposed, *layout)


def _reference_layout(m: stk.Matrix, dense_size: Optional[int]):
    return _layout_args("matrix", m, dense_size, "dense operand")


def sdd_reference(a: torch.Tensor, b: torch.Tensor, topo: stk.Matrix) -> stk.Matrix:
    """Dense, masked reference of `sdd` (plain torch, differentiable, any float dtype, fp32+)."""
    data = _sdd_data_reference(a, b, _meta(topo), topo.blocking, *_reference_layout(topo, b.shape[1]))
    return _like(topo, data)


def dsd_reference(a: stk.Matrix, b: torch.Tensor) -> torch.Tensor:
    """Dense, masked reference of `dsd` (plain torch, differentiable, any float dtype, fp32+)."""
    transposed = not a.is_contiguous()
    layout = _reference_layout(a, None if transposed else b.shape[0])
    return _dsd_data_reference(a.data, _meta(a), transposed, b, *layout)


def dds_reference(a: torch.Tensor, b: stk.Matrix) -> torch.Tensor:
    """Dense, masked reference of `dds` (plain torch, differentiable, any float dtype, fp32+)."""
    transposed = not b.is_contiguous()
    layout = _reference_layout(b, a.shape[1] if transposed else None)
    return _dds_data_reference(a, b.data, _meta(b), transposed, *layout)
