"""The dMoE topology: which B×B blocks of the `[P, E·C·B]` expert activation exist.

Legend: E experts, F ffn size per expert, B block size, C = ceil(F / B) block columns per expert,
P padded rows (a static bound), R_max = P / B block rows, nnz = R_max·C block slots.

Expert e owns the block rows of its padded bin, [pb[e-1]/B, pb[e]/B), and the block columns
[e·C, (e+1)·C); `make_topology` returns that pattern as an `stk.Matrix` whose every index array is
int32 and built on the device by one kernel (megablocks/backend/topology.py), with no host sync.
docs/CONTRACTS.md states the layout, the unused slots and the transpose metadata.
"""

import stk
import torch

from megablocks import _checks
from megablocks.backend import sparse as sparse_kernels
from megablocks.backend import topology as _backend
from megablocks.backend import use_triton
from megablocks.ops._eager import custom_op

# Block sizes the sparse kernels tile with: `tl.dot` needs at least 16, and a block of at most
# 128×128 keeps a tile of each operand on chip.
BLOCK_SIZES = sparse_kernels.BLOCK_SIZES


def topology_reference(padded_bins_E: torch.Tensor, block_size: int, num_block_rows: int,
                       block_columns: int):
    """Plain-torch twin of the kernel: the six int32 arrays, same clamping of bad values."""
    device = padded_bins_E.device
    num_experts = padded_bins_E.numel()
    C = block_columns
    ends = (padded_bins_E.long().clamp(0, num_block_rows * block_size) // block_size)  # [E]
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    rows_used = ends[-1]
    slot = torch.arange(num_block_rows * C, device=device)

    row = slot // C
    expert = torch.searchsorted(ends, row, right=True).clamp(max=num_experts - 1)
    column_indices = expert * C + slot % C
    offsets = torch.minimum(torch.arange(num_block_rows + 1, device=device), rows_used) * C

    expert_t = torch.searchsorted(ends * C, slot, right=True).clamp(max=num_experts - 1)
    start = starts[expert_t]
    rows_e = (ends - starts)[expert_t].clamp(min=1)
    local = (slot - start * C).clamp(min=0)
    col_t = (local // rows_e).clamp(max=C - 1)
    row_t = (start + local % rows_e).clamp(max=max(num_block_rows - 1, 0))
    used = slot < rows_used * C
    column_indices_t = torch.where(used, row_t, 0)
    block_offsets_t = torch.where(used, row_t * C + col_t, 0)

    c = torch.arange(num_experts * C + 1, device=device)
    starts_c = torch.cat([starts, ends[-1:]])
    rows_c = torch.cat([ends - starts, ends.new_zeros(1)]).clamp(min=0)
    offsets_t = starts_c[c // C] * C + (c % C) * rows_c[c // C]
    out = (row, column_indices, offsets, column_indices_t, offsets_t, block_offsets_t)
    return tuple(t.to(torch.int32) for t in out)


@custom_op("topology")
def _topology_op(
    padded_bins: torch.Tensor, block_size: int, num_block_rows: int, block_columns: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton(padded_bins):
        return _backend.topology(padded_bins, block_size, num_block_rows, block_columns)
    return topology_reference(padded_bins, block_size, num_block_rows, block_columns)


@_topology_op.register_fake
def _(padded_bins, block_size, num_block_rows, block_columns):
    nnz = num_block_rows * block_columns
    num_experts = padded_bins.shape[0]

    def empty(n):
        return padded_bins.new_empty((n,), dtype=torch.int32)

    return (empty(nnz), empty(nnz), empty(num_block_rows + 1), empty(nnz),
            empty(num_experts * block_columns + 1), empty(nnz))


def _check_padded_bins_values(padded_bins: torch.Tensor, block_size: int, num_block_rows: int) -> None:
    """On CPU (or with MEGABLOCKS_CHECK_VALUES=1): non-decreasing multiples of B within the bound."""
    if torch.compiler.is_compiling() or not _checks.values_checked(padded_bins):
        return
    pb = padded_bins.long()
    limit = num_block_rows * block_size
    steps = torch.diff(pb, prepend=pb.new_zeros(1))
    if bool((steps < 0).any()) or bool((pb % block_size != 0).any()) or int(pb[-1]) > limit:
        raise ValueError(
            f"padded_bins: expected non-decreasing multiples of block_size={block_size} in "
            f"[0, {limit}] (num_block_rows·block_size), got {pb.tolist()[:16]}"
        )


def _validate(padded_bins, block_size: int, num_block_rows: int, block_columns: int,
              block_columns_name: str) -> None:
    _checks.check_tensor("padded_bins", padded_bins, ndim=1, dtypes=_checks.INDEX_DTYPES)
    if padded_bins.numel() == 0:
        raise ValueError("padded_bins: expected one entry per expert (at least 1), got 0")
    _checks.check_int("block_size", block_size)
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size: expected one of {BLOCK_SIZES}, got {block_size}")
    _checks.check_int("num_block_rows", num_block_rows, min_value=0)
    _checks.check_int(block_columns_name, block_columns, min_value=1)
    num_experts = padded_bins.numel()
    _checks.check_int32_range("num_block_rows * block_size (rows)", num_block_rows * block_size)
    _checks.check_int32_range(
        "num_experts * block_columns * block_size (columns)", num_experts * block_columns * block_size
    )
    nnz = num_block_rows * block_columns
    if nnz > _checks.INT32_MAX - _backend.SLOT_TILE:
        raise ValueError(
            f"num_block_rows: {num_block_rows} block rows × {block_columns} block columns = {nnz} "
            f"block slots exceed the int32 index range ({_checks.INT32_MAX - _backend.SLOT_TILE} "
            "slots at most) that the kernels use"
        )
    _check_padded_bins_values(padded_bins, block_size, num_block_rows)


def topology(padded_bins: torch.Tensor, block_size: int, output_block_rows: int,
             output_block_columns: int) -> torch.Tensor:
    """Block column index of every block slot of the dMoE topology (row-major).

    Args:
        padded_bins: int32/int64 `[E]`, inclusive cumsum of each expert's rows rounded up to
            `block_size`.
        block_size: B, one of 16, 32, 64, 128.
        output_block_rows: R_max, block rows of the output (a static bound; rows at or past
            `padded_bins[-1]` are padding).
        output_block_columns: C, block columns per expert.

    Returns:
        `[R_max·C]`: slot `r·C + j` holds `e(r)·C + j`, e(r) the expert whose padded bin holds
        block row r (E−1 on padding rows). int16, as MegaBlocks returns it, where the E·C block
        columns fit int16; int32 past that (where MegaBlocks' int16 would wrap).

    Raises:
        TypeError / ValueError: bad dtypes, ranks or sizes; sizes beyond int32; on CPU, padded_bins
        not non-decreasing multiples of B within R_max·B.
    """
    _validate(padded_bins, block_size, output_block_rows, output_block_columns, "output_block_columns")
    column_indices = _topology_op(padded_bins, block_size, output_block_rows, output_block_columns)[1]
    fits_int16 = padded_bins.numel() * output_block_columns <= torch.iinfo(torch.int16).max + 1
    return column_indices.to(torch.int16) if fits_int16 else column_indices


def make_topology(padded_bins: torch.Tensor, *, block_size: int, num_block_rows: int,
                  ffn_hidden_size: int, dtype: torch.dtype, device=None) -> stk.Matrix:
    """The dMoE topology as an `stk.Matrix` of shape `(num_block_rows·B, E·C·B)`, C = ceil(F/B).

    Args:
        padded_bins: int32/int64 `[E]` (docs/CONTRACTS.md).
        block_size: B, one of 16, 32, 64, 128.
        num_block_rows: R_max = P / B, a static bound (e.g. `padded_rows_bound(N, E, B) // B`).
        ffn_hidden_size: F >= 1; the last block column of each expert is partial when B ∤ F.
        dtype: dtype of the (meta) `data` tensor, i.e. of the activations the topology describes.
        device: where the index arrays live; default padded_bins' device (padded_bins is copied
            there if it differs).

    Returns:
        an `ExpertTopology` (an `stk.Matrix`) with `data = torch.empty((R_max·C, B, B),
        dtype=dtype, device='meta')`, int32 `row_indices`, `column_indices`, `offsets`,
        `column_indices_t`, `offsets_t`, `block_offsets_t`, and the expert layout
        `num_experts = E`, `ffn_hidden_size = F` (kept by `.t()` and `.clone()`). Slots at or
        past `offsets[-1]` (a device value) are unused; their indices are in range.

    Raises:
        TypeError / ValueError: as for `topology`; ffn_hidden_size < 1; dtype not a torch.dtype.
    """
    _checks.check_int("ffn_hidden_size", ffn_hidden_size, min_value=1)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype: expected a torch.dtype, got {type(dtype).__name__}")
    _checks.check_int("block_size", block_size)
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size: expected one of {BLOCK_SIZES}, got {block_size}")
    block_columns = -(-ffn_hidden_size // block_size)
    if device is not None:
        _checks.check_tensor("padded_bins", padded_bins)
        padded_bins = padded_bins.to(device)
    _validate(padded_bins, block_size, num_block_rows, block_columns, "ffn_hidden_size // block_size")
    num_experts = padded_bins.numel()
    (row_indices, column_indices, offsets, column_indices_t, offsets_t,
     block_offsets_t) = _topology_op(padded_bins, block_size, num_block_rows, block_columns)
    nnz = num_block_rows * block_columns
    data = torch.empty((nnz, block_size, block_size), dtype=dtype, device="meta")
    shape = torch.Size((num_block_rows * block_size, num_experts * block_columns * block_size))
    return ExpertTopology(shape, data, row_indices, column_indices, offsets, column_indices_t, offsets_t,
                          block_offsets_t, num_experts=num_experts, ffn_hidden_size=ffn_hidden_size)


class ExpertTopology(stk.Matrix):
    """An `stk.Matrix` that carries dMoE's expert layout, `num_experts = E` and
    `ffn_hidden_size = F` (`megablocks.ops.sparse` reads them), and keeps it through `.t()` and
    `.clone()`, which on a plain `stk.Matrix` drop Python attributes. A plain `stk.Matrix` with
    both attributes set has the same layout until it is transposed or cloned."""

    def __init__(self, size, data, row_indices, column_indices, offsets, column_indices_t=None, offsets_t=None,
                 block_offsets_t=None, *, num_experts: int, ffn_hidden_size: int):
        super().__init__(size, data, row_indices, column_indices, offsets, column_indices_t, offsets_t,
                         block_offsets_t)
        self.num_experts = num_experts
        self.ffn_hidden_size = ffn_hidden_size

    def _with_layout(self, m: stk.Matrix) -> "ExpertTopology":
        m.__class__ = ExpertTopology
        m.num_experts, m.ffn_hidden_size = self.num_experts, self.ffn_hidden_size
        return m

    def t(self) -> "ExpertTopology":
        return self._with_layout(super().t())

    def clone(self) -> "ExpertTopology":
        return self._with_layout(super().clone())
