"""The FP8 grouped GEMM's Hopper form with two products in flight, written in Gluon.

`gmm_fp8`'s Triton kernel promotes each 128-deep FP8 product (scaled by the rows' and the block's
scales and added to the fp32 accumulator) before the next product starts: Triton waits for a
product where its result is used. Here the schedule is explicit (Triton's Gluon dialect): step
k's product is issued asynchronously (wgmma), then step k-1's is waited for (one product left in
flight), its stage's buffers refilled by TMA and its result promoted while step k's runs on the
tensor cores. Same arithmetic as the Triton kernel (one fresh fp32 product per 128-deep step,
scaled and added in step order). Operands by TMA (x [M, K], the weight K-major as [E * N, K]),
one program per SM looping over 128 x 128 output tiles, the row tiles' groups read from a table
built on the device by `_row_tiles_kernel` (no host sync).

The warp-specialized forms (`warp_specialize`) move the loads to a one-warp partition and split
each output tile among 64-row consumer warpgroups, each with its own chain: two over 128 x 128
tiles (steps in pairs: both products issued, the first promoted while the second runs, nothing in
flight across the loop's edge), three over 192 x 128 (one product at a time each). The two
measure within a few per cent of each other on mixtral's, olmoe's and qwen3moe's products, 4-16%
under the Triton kernel (benchmarks/RESULTS.md); 128-row tiles pad fewer rows per expert. Each
consumer stores a 16-bit output's pieces that lie wholly in their group by TMA from a shared-memory
buffer of its own, and goes on to its next tile while the store runs. That is 3-29% faster than
masked stores from registers, where all of a tile's consumers stored at once while the tensor
cores idled (the shorter the K loop, the larger the gain). A third form, two consumers of 128 rows
over 256 x 128 tiles (each running its two 64-row pieces' products one after the other through
one register tile), loads a quarter fewer bytes a FLOP; on an H100 it measured -6% to +8% against
the 128-row form (Mixtral's up product slower, OLMoE's down product faster; benchmarks/RESULTS.md)
and is taken only where a config asks for it (`block_m=256`).

Available where Triton ships Gluon's Hopper language (`available()`); `gmm_fp8(config={'wgmma': True})`
takes this form on sm_90 when the operands allow TMA, else its Triton kernel.
"""

import functools

import torch
import triton
import triton.language as tl

from .gmm import _group_table, _row_tile
from .launch import capability, tma_ok

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    # The TMA load's name: `async_load` from Triton 3.7 on, `async_copy_global_to_shared` before.
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    _gluon = True
except ImportError:  # a Triton without Gluon's Hopper language
    _gluon = False

# Output tile and K step (one scale block per step).
BLOCK = 128
# The warp-specialized form's output tiles (block_m, block_n) and, for each, the register limit at
# launch: two consumer warpgroups and the loader's (384 threads) at 168 fit the 64K registers,
# shared out as 240 / 240 / 24 (over 128 or 256 rows); three and the loader's (512 threads) at
# 128, shared out as 168 / 160 / 160 / 24. (128 x 256 tiles, two consumers each running a step's
# two 128-column products in turn, measured 30-50% slower than 128 x 128 and were dropped.)
WS_TILES = {(128, 128): 168, (192, 128): 128, (256, 128): 168}
# The consumer warpgroups of each: 64 rows each over 128 and 192 rows, 128 (two 64-row pieces,
# one product in flight) over 256.
WS_CONSUMERS = {(128, 128): 2, (192, 128): 3, (256, 128): 2}


# Row tile t of the groups (`_row_tile`) -> table[t] = (group, first row, end row, flags): flags bit 0
# a group's tile, bit 1 a tile at all (t below the row-tile count); other entries (0, 0, 0, 0).
@triton.jit
def _row_tiles_kernel(sizes_ptr, table_ptr, M, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    t = tl.program_id(0)
    e, starts, ends, tile_starts, tiles = _group_table(sizes_ptr, E, M, BLOCK_M, BLOCK_E)
    rows_total = tl.max(ends, 0)
    real_m_tiles = tl.sum(tiles, 0)
    num_m_tiles = real_m_tiles + tl.cdiv(M - rows_total, BLOCK_M)
    group, row0, row_end, real = _row_tile(t, e, starts, ends, tile_starts, tiles, real_m_tiles, rows_total, M,
                                           BLOCK_M)
    valid = t < num_m_tiles
    tl.store(table_ptr + 4 * t, tl.where(valid, group, 0))
    tl.store(table_ptr + 4 * t + 1, tl.where(valid, row0, 0))
    tl.store(table_ptr + 4 * t + 2, tl.where(valid, row_end, 0))
    tl.store(table_ptr + 4 * t + 3, tl.where(valid, 2 + real.to(tl.int32), 0))


if _gluon:

    @gluon.jit
    def _load_step(x_desc, w_desc, a_bufs, b_bufs, bars, g, row0, w_row, k, pred, STAGES: gl.constexpr):
        """Loads of this program's step `g` (x rows from row0, weight rows from w_row, at k) into
        stage g % STAGES, counted on its barrier; nothing where `pred` is false."""
        s = g % STAGES
        bar = bars.index(s)
        mbarrier.expect(bar, x_desc.block_type.nbytes + w_desc.block_type.nbytes, pred=pred)
        _tma_load(x_desc, [row0, k], bar, a_bufs.index(s), pred=pred)
        _tma_load(w_desc, [w_row, k], bar, b_bufs.index(s), pred=pred)

    @gluon.jit
    def _product(a_bufs, b_bufs, bars, g, zero, STAGES: gl.constexpr):
        """Step g's FP8 product into a fresh fp32 tile, issued asynchronously once its loads landed."""
        s = g % STAGES
        mbarrier.wait(bars.index(s), (g // STAGES) & 1)
        return warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), zero, use_acc=False, is_async=True)

    @gluon.jit
    def _scales(xs_rows, row_ok, ws_tile, kb, stride_xsk, stride_wsk):
        """[BLOCK_M] scales of step kb: the rows' times the weight block's."""
        return gl.load(xs_rows + kb * stride_xsk, mask=row_ok, other=0.0) * gl.load(ws_tile + kb * stride_wsk)

    @gluon.jit
    def _gmm_fp8_wgmma_kernel(
        x_desc, w_desc, xs_ptr, ws_ptr, out_ptr, table_ptr,
        N, K, num_m_tiles, num_programs,
        stride_xsm, stride_xsk, stride_wse, stride_wsn, stride_wsk, stride_om,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, QB: gl.constexpr,
        STAGES: gl.constexpr, GROUP_M: gl.constexpr, num_warps: gl.constexpr,
    ):
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                             instr_shape=[16, BLOCK_N, 32])
        rows_layout: gl.constexpr = gl.SliceLayout(1, mma_layout)
        cols_layout: gl.constexpr = gl.SliceLayout(0, mma_layout)
        a_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
        b_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(bars.index(s), count=1)
        fence_async_shared()
        zero = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, mma_layout)
        num_n_tiles = gl.cdiv(N, BLOCK_N)
        k_steps = gl.cdiv(K, BLOCK_K)
        c0 = 0  # this program's steps so far: step g uses stage g % STAGES, barrier phase (g // STAGES) & 1
        for tile in range(gl.program_id(0), num_m_tiles * num_n_tiles, num_programs):
            width = GROUP_M * num_n_tiles
            first_m = (tile // width) * GROUP_M
            rows = gl.minimum(num_m_tiles - first_m, GROUP_M)
            tile_m = first_m + (tile % width) % rows
            n0 = ((tile % width) // rows) * BLOCK_N
            group = gl.load(table_ptr + 4 * tile_m)
            row0 = gl.load(table_ptr + 4 * tile_m + 1)
            row_end = gl.load(table_ptr + 4 * tile_m + 2)
            flags = gl.load(table_ptr + 4 * tile_m + 3)
            offs_m = row0 + gl.arange(0, BLOCK_M, layout=rows_layout)
            offs_n = n0 + gl.arange(0, BLOCK_N, layout=cols_layout)
            row_ok = offs_m < row_end
            acc = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, mma_layout)
            if (flags & 1) != 0:
                w_row = group * N + n0
                xs_rows = xs_ptr + offs_m.to(gl.int64) * stride_xsm
                ws_tile = ws_ptr + group.to(gl.int64) * stride_wse + (n0 // QB) * stride_wsn
                for i in gl.static_range(STAGES - 1):
                    _load_step(x_desc, w_desc, a_bufs, b_bufs, bars, c0 + i, row0, w_row, i * BLOCK_K, i < k_steps,
                               STAGES)
                prev = _product(a_bufs, b_bufs, bars, c0, zero, STAGES)
                # Stage (c0 - 1) % STAGES: its last product finished with the previous tile.
                _load_step(x_desc, w_desc, a_bufs, b_bufs, bars, c0 + STAGES - 1, row0, w_row,
                           (STAGES - 1) * BLOCK_K, STAGES - 1 < k_steps, STAGES)
                for ks in range(1, k_steps):
                    cur = _product(a_bufs, b_bufs, bars, c0 + ks, zero, STAGES)
                    scale = _scales(xs_rows, row_ok, ws_tile, ks - 1, stride_xsk, stride_wsk)
                    done = warpgroup_mma_wait(num_outstanding=1, deps=(prev, ))
                    # Step ks - 1's stage is free: refill it with step ks + STAGES - 1.
                    _load_step(x_desc, w_desc, a_bufs, b_bufs, bars, c0 + ks + STAGES - 1, row0, w_row,
                               (ks + STAGES - 1) * BLOCK_K, ks + STAGES - 1 < k_steps, STAGES)
                    acc += done * scale[:, None]
                    prev = cur
                scale = _scales(xs_rows, row_ok, ws_tile, k_steps - 1, stride_xsk, stride_wsk)
                done = warpgroup_mma_wait(num_outstanding=0, deps=(prev, ))
                acc += done * scale[:, None]
                c0 += k_steps
            out_ptrs = out_ptr + offs_m[:, None].to(gl.int64) * stride_om + offs_n[None, :]
            gl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n < N)[None, :])
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(s))


if _gluon:
    # The warp-specialized form: a one-warp partition issues every TMA load into a ring of STAGES
    # buffers (`ready` barriers count the bytes in, `empty` barriers the two consumers' releases);
    # two consumer warpgroups each take 64 rows of the 128 x 128 output tile and run their own
    # chain (steps k and k+1 issued, step k waited for, its buffers released, its result promoted
    # while step k+1's product runs, then step k+1's), so that one group's promotion runs beside
    # the other's products and neither waits on a load it did not issue. Registers: 4 + 4 + 1
    # warps (three warpgroups) under `maxnreg` 168 give the loader 24 and each consumer 240 (two
    # 64-register products in flight and the accumulator).

    @gluon.jit
    def _ws_tile(tile, table_ptr, num_m_tiles, num_n_tiles, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr):
        """(group, first row, end row, flags, first column) of this program's tile `tile`."""
        width = GROUP_M * num_n_tiles
        first_m = (tile // width) * GROUP_M
        rows = gl.minimum(num_m_tiles - first_m, GROUP_M)
        tile_m = first_m + (tile % width) % rows
        n0 = ((tile % width) // rows) * BLOCK_N
        return (gl.load(table_ptr + 4 * tile_m), gl.load(table_ptr + 4 * tile_m + 1),
                gl.load(table_ptr + 4 * tile_m + 2), gl.load(table_ptr + 4 * tile_m + 3), n0)

    @gluon.jit
    def _ws_loader(x_desc, w_desc, a_bufs, b_bufs, ready, empty, table_ptr, N, K, num_m_tiles, num_programs,
                   BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                   PIECES: gl.constexpr):
        num_n_tiles = gl.cdiv(N, BLOCK_N)
        k_steps = gl.cdiv(K, BLOCK_K)
        g = 0
        for tile in range(gl.program_id(0), num_m_tiles * num_n_tiles, num_programs):
            group, row0, row_end, flags, n0 = _ws_tile(tile, table_ptr, num_m_tiles, num_n_tiles, BLOCK_N, GROUP_M)
            if (flags & 1) != 0:
                w_row = group * N + n0
                # The tile's 64-row pieces that hold rows of it (a group's last tile may end within
                # the first): only those are loaded.
                pieces = gl.minimum(gl.cdiv(row_end - row0, 64), PIECES)
                for ks in range(k_steps):
                    s = g % STAGES
                    # A fresh barrier counts as released once (phase 1 complete): the first pass waits on nothing.
                    mbarrier.wait(empty.index(s), ((g // STAGES) & 1) ^ 1)
                    bar = ready.index(s)
                    for c in gl.static_range(1, PIECES + 1):  # one expect (it arrives): the bytes of `pieces`
                        mbarrier.expect(bar, c * x_desc.block_type.nbytes + w_desc.block_type.nbytes,
                                        pred=pieces == c)
                    for c in gl.static_range(PIECES):  # each piece's 64 rows
                        _tma_load(x_desc, [row0 + c * 64, ks * BLOCK_K], bar, a_bufs.index(s * PIECES + c),
                                  pred=c < pieces)
                    _tma_load(w_desc, [w_row, ks * BLOCK_K], bar, b_bufs.index(s))
                    g += 1

    @gluon.jit
    def _issue(a_bufs, b_bufs, ready, g, into, HALF: gl.constexpr, STAGES: gl.constexpr, PIECES: gl.constexpr):
        """A consumer's product of its stage-ring step g (the stage's 64-row piece HALF of PIECES),
        issued asynchronously into `into`'s registers (not read: use_acc=False) once the step's
        loads landed."""
        s = g % STAGES
        mbarrier.wait(ready.index(s), (g // STAGES) & 1)
        return warpgroup_mma(a_bufs.index(s * PIECES + HALF), b_bufs.index(s).permute((1, 0)), into,
                             use_acc=False, is_async=True)

    @gluon.jit
    def _ws_release(ready, empty, g, k_steps, STAGES: gl.constexpr):
        """A consumer whose rows of a tile were not loaded releases each of the tile's k_steps
        stages (from ring step g) once the loader's other loads for it landed; returns the next
        ring step."""
        for ks in range(k_steps):
            s = (g + ks) % STAGES
            mbarrier.wait(ready.index(s), ((g + ks) // STAGES) & 1)
            mbarrier.arrive(empty.index(s), count=1)
        return g + k_steps

    @gluon.jit
    def _ws_consumer(a_bufs, b_bufs, ready, empty, xs_ptr, ws_ptr, out_ptr, table_ptr, N, K, num_m_tiles,
                     num_programs, stride_xsm, stride_xsk, stride_wse, stride_wsn, stride_wsk, stride_om,
                     out_desc, c_bufs,
                     HALF: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, QB: gl.constexpr,
                     STAGES: gl.constexpr, GROUP_M: gl.constexpr, DEFER: gl.constexpr, PIECES: gl.constexpr,
                     TMA_OUT: gl.constexpr):
        """Rows [HALF * 64, HALF * 64 + 64) of each of this program's tiles. DEFER: steps in pairs,
        the first promoted while the second's product runs (two products in flight, neither carried
        across the loop's edge: ptxas serializes a product whose registers are copied while it
        runs, "wgmma serialized ... accumulator registers", C7514); else each step's products
        are waited for at once (one product's registers: three consumers fit)."""
        ROWS: gl.constexpr = 64
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, BLOCK_N, 32])
        rows_layout: gl.constexpr = gl.SliceLayout(1, mma_layout)
        zero = gl.zeros((ROWS, BLOCK_N), gl.float32, mma_layout)
        num_n_tiles = gl.cdiv(N, BLOCK_N)
        k_steps = gl.cdiv(K, BLOCK_K)
        g = 0
        for tile in range(gl.program_id(0), num_m_tiles * num_n_tiles, num_programs):
            group, row0, row_end, flags, n0 = _ws_tile(tile, table_ptr, num_m_tiles, num_n_tiles, BLOCK_N, GROUP_M)
            offs_m = row0 + HALF * ROWS + gl.arange(0, ROWS, layout=rows_layout)
            row_ok = offs_m < row_end
            acc = gl.zeros((ROWS, BLOCK_N), gl.float32, mma_layout)
            # A piece past the tile's last row (a group's last tile) was not loaded: no products, no
            # store; each step's stage is released once the loader's other loads for it landed.
            live = ((flags & 1) != 0) & (row0 + HALF * ROWS < row_end)
            if ((flags & 1) != 0) & (row0 + HALF * ROWS >= row_end):
                g = _ws_release(ready, empty, g, k_steps, STAGES)
            if live and not DEFER:
                xs_rows = xs_ptr + offs_m.to(gl.int64) * stride_xsm
                ws_tile = ws_ptr + group.to(gl.int64) * stride_wse + (n0 // QB) * stride_wsn
                scale_cur = _scales(xs_rows, row_ok, ws_tile, 0, stride_xsk, stride_wsk)
                # Each product is written over the last one's registers (use_acc=False: not read), so
                # that no register tile of zeros stays live beside the product and the accumulator.
                done = gl.zeros((ROWS, BLOCK_N), gl.float32, mma_layout)
                for ks in range(k_steps):
                    s = (g + ks) % STAGES
                    mbarrier.wait(ready.index(s), ((g + ks) // STAGES) & 1)
                    cur = warpgroup_mma(a_bufs.index(s * PIECES + HALF), b_bufs.index(s).permute((1, 0)),
                                        done, use_acc=False, is_async=True)
                    scale_next = _scales(xs_rows, row_ok, ws_tile, gl.minimum(ks + 1, k_steps - 1), stride_xsk,
                                         stride_wsk)
                    done = warpgroup_mma_wait(num_outstanding=0, deps=(cur, ))
                    mbarrier.arrive(empty.index(s), count=1)
                    acc += done * scale_cur[:, None]
                    scale_cur = scale_next
                g += k_steps
            if live and DEFER:
                xs_rows = xs_ptr + offs_m.to(gl.int64) * stride_xsm
                ws_tile = ws_ptr + group.to(gl.int64) * stride_wse + (n0 // QB) * stride_wsn
                # Steps in pairs: both issued, the first promoted while the second runs, nothing in
                # flight across the loop's edge (no register copy of a running product).
                ra = gl.zeros((ROWS, BLOCK_N), gl.float32, mma_layout)
                rb = gl.zeros((ROWS, BLOCK_N), gl.float32, mma_layout)
                for i in range(0, k_steps // 2):
                    ks = 2 * i
                    pa = _issue(a_bufs, b_bufs, ready, g + ks, ra, HALF, STAGES, PIECES)
                    pb = _issue(a_bufs, b_bufs, ready, g + ks + 1, rb, HALF, STAGES, PIECES)
                    scale = _scales(xs_rows, row_ok, ws_tile, ks, stride_xsk, stride_wsk)
                    ra = warpgroup_mma_wait(num_outstanding=1, deps=(pa, ))
                    mbarrier.arrive(empty.index((g + ks) % STAGES), count=1)
                    acc += ra * scale[:, None]
                    scale = _scales(xs_rows, row_ok, ws_tile, ks + 1, stride_xsk, stride_wsk)
                    rb = warpgroup_mma_wait(num_outstanding=0, deps=(pb, ))
                    mbarrier.arrive(empty.index((g + ks + 1) % STAGES), count=1)
                    acc += rb * scale[:, None]
                if k_steps % 2 == 1:
                    pa = _issue(a_bufs, b_bufs, ready, g + k_steps - 1, ra, HALF, STAGES, PIECES)
                    scale = _scales(xs_rows, row_ok, ws_tile, k_steps - 1, stride_xsk, stride_wsk)
                    ra = warpgroup_mma_wait(num_outstanding=0, deps=(pa, ))
                    mbarrier.arrive(empty.index((g + k_steps - 1) % STAGES), count=1)
                    acc += ra * scale[:, None]
                g += k_steps
            _ws_store(acc, row0 + HALF * ROWS, row_end, n0, N, out_ptr, stride_om, out_desc, c_bufs.index(HALF),
                      BLOCK_N, TMA_OUT)
        if TMA_OUT:
            tma.store_wait(0)

    @gluon.jit
    def _ws_store(acc, piece0, row_end, n0, N, out_ptr, stride_om, out_desc, c_buf, BLOCK_N: gl.constexpr,
                  TMA_OUT: gl.constexpr):
        """A consumer's 64-row piece of the output (rows from piece0, columns from n0; acc in the
        product's layout), nothing where it starts at or past row_end: where all 64 rows are the
        group's, staged in the consumer's shared-memory buffer `c_buf` and stored by TMA (clipped at
        the tensor's edges), the consumer free for its next tile while it runs; else by masked
        stores."""
        ROWS: gl.constexpr = 64
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, BLOCK_N, 32])
        if TMA_OUT and piece0 + ROWS <= row_end:
            tma.store_wait(0)  # the last store from this buffer has read it
            c_buf.store(acc.to(out_desc.dtype))
            fence_async_shared()
            _tma_store(out_desc, [piece0, n0], c_buf)
        elif piece0 < row_end:
            offs_m = piece0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, mma_layout))
            offs_n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma_layout))
            out_ptrs = out_ptr + offs_m[:, None].to(gl.int64) * stride_om + offs_n[None, :]
            gl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty),
                     mask=(offs_m < row_end)[:, None] & (offs_n < N)[None, :])

    @gluon.jit
    def _ws_consumer_pieces(a_bufs, b_bufs, ready, empty, xs_ptr, ws_ptr, out_ptr, table_ptr, N, K, num_m_tiles,
                            num_programs, stride_xsm, stride_xsk, stride_wse, stride_wsn, stride_wsk, stride_om,
                            out_desc, c_bufs,
                            HALF: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, QB: gl.constexpr,
                            STAGES: gl.constexpr, GROUP_M: gl.constexpr, PIECES: gl.constexpr,
                            TMA_OUT: gl.constexpr):
        """Rows [HALF * 128, HALF * 128 + 128) of each of this program's 256-row tiles: the stage's
        64-row pieces 2 HALF and 2 HALF + 1, each with its own accumulator. A step's two products
        run one after the other through one register tile, each promoted before the next is
        issued (two accumulators and one product: 192 registers a thread, where two products in
        flight would need 256); the other consumer's products keep the tensor cores busy through
        each promotion. Against the 128-row tiles the weight's tile is loaded once for 256 rows
        instead of 128: 48 KB of loads a step for 256 x 128 outputs, against 64 KB for two
        128 x 128 tiles."""
        ROWS: gl.constexpr = 64
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, BLOCK_N, 32])
        rows_layout: gl.constexpr = gl.SliceLayout(1, mma_layout)
        FIRST: gl.constexpr = 2 * HALF
        num_n_tiles = gl.cdiv(N, BLOCK_N)
        k_steps = gl.cdiv(K, BLOCK_K)
        g = 0
        for tile in range(gl.program_id(0), num_m_tiles * num_n_tiles, num_programs):
            group, row0, row_end, flags, n0 = _ws_tile(tile, table_ptr, num_m_tiles, num_n_tiles, BLOCK_N, GROUP_M)
            top = row0 + FIRST * ROWS  # this consumer's first row
            acc_a = gl.zeros((ROWS, BLOCK_N), gl.float32, mma_layout)
            acc_b = gl.zeros((ROWS, BLOCK_N), gl.float32, mma_layout)
            if ((flags & 1) != 0) & (top >= row_end):  # neither piece loaded
                g = _ws_release(ready, empty, g, k_steps, STAGES)
            if ((flags & 1) != 0) & (top < row_end):
                offs_a = top + gl.arange(0, ROWS, layout=rows_layout)
                xs_a = xs_ptr + offs_a.to(gl.int64) * stride_xsm
                xs_b = xs_a + ROWS * stride_xsm
                ok_a = offs_a < row_end
                ok_b = offs_a + ROWS < row_end
                ws_tile = ws_ptr + group.to(gl.int64) * stride_wse + (n0 // QB) * stride_wsn
                r = gl.zeros((ROWS, BLOCK_N), gl.float32, mma_layout)
                # The second piece's product runs even where the piece holds no rows (a group's last
                # tile; not loaded): its buffer's old values go into acc_b, which is not stored. A
                # branch around it spilled 620 bytes of registers a thread.
                for ks in range(k_steps):
                    s = (g + ks) % STAGES
                    mbarrier.wait(ready.index(s), ((g + ks) // STAGES) & 1)
                    p = warpgroup_mma(a_bufs.index(s * PIECES + FIRST), b_bufs.index(s).permute((1, 0)), r,
                                      use_acc=False, is_async=True)
                    w_scale = gl.load(ws_tile + ks * stride_wsk)
                    scale = gl.load(xs_a + ks * stride_xsk, mask=ok_a, other=0.0) * w_scale
                    r = warpgroup_mma_wait(num_outstanding=0, deps=(p, ))
                    acc_a += r * scale[:, None]
                    p = warpgroup_mma(a_bufs.index(s * PIECES + FIRST + 1), b_bufs.index(s).permute((1, 0)), r,
                                      use_acc=False, is_async=True)
                    scale = gl.load(xs_b + ks * stride_xsk, mask=ok_b, other=0.0) * w_scale
                    r = warpgroup_mma_wait(num_outstanding=0, deps=(p, ))
                    acc_b += r * scale[:, None]
                    mbarrier.arrive(empty.index(s), count=1)
                g += k_steps
            _ws_store(acc_a, top, row_end, n0, N, out_ptr, stride_om, out_desc, c_bufs.index(HALF), BLOCK_N, TMA_OUT)
            _ws_store(acc_b, top + ROWS, row_end, n0, N, out_ptr, stride_om, out_desc, c_bufs.index(HALF), BLOCK_N,
                      TMA_OUT)
        if TMA_OUT:
            tma.store_wait(0)

    @gluon.jit
    def _gmm_fp8_ws_kernel(
        x_desc, w_desc, xs_ptr, ws_ptr, out_ptr, table_ptr, out_desc,
        N, K, num_m_tiles, num_programs,
        stride_xsm, stride_xsk, stride_wse, stride_wsn, stride_wsk, stride_om,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, QB: gl.constexpr,
        STAGES: gl.constexpr, GROUP_M: gl.constexpr, CONSUMERS: gl.constexpr, TMA_OUT: gl.constexpr,
    ):
        """CONSUMERS warpgroups over BLOCK_M-row tiles (`WS_CONSUMERS`): two of 64 rows each over 128
        rows (steps in pairs), three of 64 over 192 (a step at a time), two of 128 over 256 (two
        64-row pieces each, `_ws_consumer_pieces`); with TMA_OUT (a 16-bit out; out_desc its [M, N]
        descriptor of 64 x BLOCK_N blocks) each consumer's full 64-row pieces go out by TMA from a
        buffer of its own."""
        # Stage s holds the tile's 64-row pieces of x at a_bufs[s * PIECES + c] and the weight's
        # tile at b_bufs[s].
        PIECES: gl.constexpr = BLOCK_M // 64
        a_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES * PIECES, 64, BLOCK_K], x_desc.layout)
        b_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(empty.index(s), count=CONSUMERS)  # every consumer releases a stage
        if TMA_OUT:
            c_bufs = gl.allocate_shared_memory(out_desc.dtype, [CONSUMERS, 64, BLOCK_N], out_desc.layout)
        else:
            c_bufs = a_bufs  # not read
        fence_async_shared()
        FIRST: gl.constexpr = 0
        SECOND: gl.constexpr = 1
        THIRD: gl.constexpr = 2
        if PIECES == 4:
            gl.warp_specialize([
                (_ws_consumer_pieces, (a_bufs, b_bufs, ready, empty, xs_ptr, ws_ptr, out_ptr, table_ptr, N, K,
                                       num_m_tiles, num_programs, stride_xsm, stride_xsk, stride_wse, stride_wsn,
                                       stride_wsk, stride_om, out_desc, c_bufs, FIRST, BLOCK_N, BLOCK_K, QB, STAGES,
                                       GROUP_M, PIECES, TMA_OUT)),
                (_ws_consumer_pieces, (a_bufs, b_bufs, ready, empty, xs_ptr, ws_ptr, out_ptr, table_ptr, N, K,
                                       num_m_tiles, num_programs, stride_xsm, stride_xsk, stride_wse, stride_wsn,
                                       stride_wsk, stride_om, out_desc, c_bufs, SECOND, BLOCK_N, BLOCK_K, QB, STAGES,
                                       GROUP_M, PIECES, TMA_OUT)),
                (_ws_loader, (x_desc, w_desc, a_bufs, b_bufs, ready, empty, table_ptr, N, K, num_m_tiles,
                              num_programs, BLOCK_N, BLOCK_K, STAGES, GROUP_M, PIECES)),
            ], [4, 1], [240, 24])
        elif PIECES == 2:
            gl.warp_specialize([
                (_ws_consumer, (a_bufs, b_bufs, ready, empty, xs_ptr, ws_ptr, out_ptr, table_ptr, N, K, num_m_tiles,
                                num_programs, stride_xsm, stride_xsk, stride_wse, stride_wsn, stride_wsk, stride_om,
                                out_desc, c_bufs, FIRST, BLOCK_N, BLOCK_K, QB, STAGES, GROUP_M, True, PIECES,
                                TMA_OUT)),
                (_ws_consumer, (a_bufs, b_bufs, ready, empty, xs_ptr, ws_ptr, out_ptr, table_ptr, N, K, num_m_tiles,
                                num_programs, stride_xsm, stride_xsk, stride_wse, stride_wsn, stride_wsk, stride_om,
                                out_desc, c_bufs, SECOND, BLOCK_N, BLOCK_K, QB, STAGES, GROUP_M, True, PIECES,
                                TMA_OUT)),
                (_ws_loader, (x_desc, w_desc, a_bufs, b_bufs, ready, empty, table_ptr, N, K, num_m_tiles,
                              num_programs, BLOCK_N, BLOCK_K, STAGES, GROUP_M, PIECES)),
            ], [4, 1], [240, 24])
        else:
            gl.warp_specialize([
                (_ws_consumer, (a_bufs, b_bufs, ready, empty, xs_ptr, ws_ptr, out_ptr, table_ptr, N, K, num_m_tiles,
                                num_programs, stride_xsm, stride_xsk, stride_wse, stride_wsn, stride_wsk, stride_om,
                                out_desc, c_bufs, FIRST, BLOCK_N, BLOCK_K, QB, STAGES, GROUP_M, False, PIECES,
                                TMA_OUT)),
                (_ws_consumer, (a_bufs, b_bufs, ready, empty, xs_ptr, ws_ptr, out_ptr, table_ptr, N, K, num_m_tiles,
                                num_programs, stride_xsm, stride_xsk, stride_wse, stride_wsn, stride_wsk, stride_om,
                                out_desc, c_bufs, SECOND, BLOCK_N, BLOCK_K, QB, STAGES, GROUP_M, False, PIECES,
                                TMA_OUT)),
                (_ws_consumer, (a_bufs, b_bufs, ready, empty, xs_ptr, ws_ptr, out_ptr, table_ptr, N, K, num_m_tiles,
                                num_programs, stride_xsm, stride_xsk, stride_wse, stride_wsn, stride_wsk, stride_om,
                                out_desc, c_bufs, THIRD, BLOCK_N, BLOCK_K, QB, STAGES, GROUP_M, False, PIECES,
                                TMA_OUT)),
                (_ws_loader, (x_desc, w_desc, a_bufs, b_bufs, ready, empty, table_ptr, N, K, num_m_tiles,
                              num_programs, BLOCK_N, BLOCK_K, STAGES, GROUP_M, PIECES)),
            ], [4, 4, 1], [160, 160, 24])


# Group e's first block of Q rows and its number of blocks -> table[e] = (first block, blocks), as
# `quantize_cols_grouped` numbers them (the weight gradient's reduction runs over them).
@triton.jit
def _group_blocks_kernel(sizes_ptr, table_ptr, M, E, QB: tl.constexpr, BLOCK_E: tl.constexpr):
    e, starts, ends, block_starts, blocks = _group_table(sizes_ptr, E, M, QB, BLOCK_E)
    tl.store(table_ptr + 2 * e, block_starts, mask=e < E)
    tl.store(table_ptr + 2 * e + 1, blocks, mask=e < E)


if _gluon:
    # The weight gradient's warp-specialized form: out[e] = a[blocks of e]^T b[blocks of e] from the
    # K-major operands of `quantize_cols_grouped(..., transposed=True)` (a [N, P], b [K, P], block
    # j in columns [j*Q, (j+1)*Q)). The forward's schedule with the roles moved: the output tile is
    # BLOCK_N rows of a by 128 rows of b, the reduction runs over the expert's blocks of rows, each
    # 128-deep product is scaled by the outer product of the block's two column-scale vectors
    # (the forward: the rows' scales times one weight block's). Tiles run expert by expert (an
    # expert's blocks stay in L2 while its tiles run), GROUP_N tiles of a's rows down each column
    # of tiles. Two consumer warpgroups over 128-row tiles only: with three over 192 rows the
    # column scales' registers spill (1.3-1.5x slower on the H200, benchmarks/RESULTS.md).

    @gluon.jit
    def _wg_tile(tile, table_ptr, num_n_tiles, num_k_tiles, BLOCK_N: gl.constexpr, GROUP_N: gl.constexpr,
                 QB: gl.constexpr):
        """(expert, first row of a, first row of b, first block, blocks) of tile `tile`."""
        per_expert = num_n_tiles * num_k_tiles
        e = tile // per_expert
        t = tile % per_expert
        width = GROUP_N * num_k_tiles
        first_n = (t // width) * GROUP_N
        rows = gl.minimum(num_n_tiles - first_n, GROUP_N)
        n0 = (first_n + (t % width) % rows) * BLOCK_N
        k0 = ((t % width) // rows) * QB
        return e, n0, k0, gl.load(table_ptr + 2 * e), gl.load(table_ptr + 2 * e + 1)

    @gluon.jit
    def _wg_loader(a_desc, b_desc, a_bufs, b_bufs, ready, empty, table_ptr, num_tiles, num_n_tiles, num_k_tiles,
                   num_programs, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, GROUP_N: gl.constexpr,
                   CONSUMERS: gl.constexpr, QB: gl.constexpr):
        g = 0
        for tile in range(gl.program_id(0), num_tiles, num_programs):
            e, n0, k0, blk0, nblocks = _wg_tile(tile, table_ptr, num_n_tiles, num_k_tiles, BLOCK_N, GROUP_N, QB)
            for j in range(nblocks):
                s = g % STAGES
                mbarrier.wait(empty.index(s), ((g // STAGES) & 1) ^ 1)
                bar = ready.index(s)
                mbarrier.expect(bar, CONSUMERS * a_desc.block_type.nbytes + b_desc.block_type.nbytes)
                col = (blk0 + j) * QB
                for c in gl.static_range(CONSUMERS):  # each consumer's 64 rows of a
                    _tma_load(a_desc, [n0 + c * 64, col], bar, a_bufs.index(s * CONSUMERS + c))
                _tma_load(b_desc, [k0, col], bar, b_bufs.index(s))
                g += 1

    @gluon.jit
    def _wg_consumer(a_bufs, b_bufs, ready, empty, as_ptr, bs_ptr, out_ptr, table_ptr, N, K, num_tiles,
                     num_n_tiles, num_k_tiles, num_programs, stride_asb, stride_bsb, stride_oe, stride_on,
                     out_desc, c_bufs,
                     HALF: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, GROUP_N: gl.constexpr,
                     CONSUMERS: gl.constexpr, QB: gl.constexpr, TMA_OUT: gl.constexpr, ACCUMULATE: gl.constexpr,
                     B_BLOCKS: gl.constexpr):
        """Rows [HALF * 64, HALF * 64 + 64) of a of each of this program's tiles, the expert's
        blocks in pairs as `_ws_consumer` runs its steps (8-10% faster than one product at a time
        on the H200). The column scales (32 a thread in the product's layout) are read one a thread
        and moved to that layout: read in it, their 32 addresses a thread spilled the registers."""
        ROWS: gl.constexpr = 64
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, QB, 32])
        rows_layout: gl.constexpr = gl.SliceLayout(1, mma_layout)
        flat_layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        g = 0
        for tile in range(gl.program_id(0), num_tiles, num_programs):
            e, n0, k0, blk0, nblocks = _wg_tile(tile, table_ptr, num_n_tiles, num_k_tiles, BLOCK_N, GROUP_N, QB)
            offs_n = n0 + HALF * ROWS + gl.arange(0, ROWS, layout=rows_layout)
            n_ok = offs_n < N
            acc = gl.zeros((ROWS, QB), gl.float32, mma_layout)
            ra = gl.zeros((ROWS, QB), gl.float32, mma_layout)
            rb = gl.zeros((ROWS, QB), gl.float32, mma_layout)
            # The column scales read one per thread (a plain layout: one address each), then moved
            # to the product's column layout.
            offs_k = k0 + gl.arange(0, QB, layout=flat_layout)
            kb = k0 // QB  # b's block column (B_BLOCKS)
            k_ok = offs_k < K
            # Blocks in pairs: both products issued, the first promoted while the second runs,
            # each block's scales read just before its promotion (one pair of scale vectors live).
            for i in range(0, nblocks // 2):
                j = 2 * i
                pa = _issue(a_bufs, b_bufs, ready, g + j, ra, HALF, STAGES, CONSUMERS)
                pb = _issue(a_bufs, b_bufs, ready, g + j + 1, rb, HALF, STAGES, CONSUMERS)
                blk = (blk0 + j).to(gl.int64)
                acc, ra = _wg_promote(acc, ra, pa, empty, as_ptr, bs_ptr, blk, offs_n, n_ok, offs_k, k_ok, kb,
                                      stride_asb, stride_bsb, g + j, 1, STAGES, QB, B_BLOCKS)
                acc, rb = _wg_promote(acc, rb, pb, empty, as_ptr, bs_ptr, blk + 1, offs_n, n_ok, offs_k, k_ok, kb,
                                      stride_asb, stride_bsb, g + j + 1, 0, STAGES, QB, B_BLOCKS)
            if nblocks % 2 == 1:
                pa = _issue(a_bufs, b_bufs, ready, g + nblocks - 1, ra, HALF, STAGES, CONSUMERS)
                acc, ra = _wg_promote(acc, ra, pa, empty, as_ptr, bs_ptr, (blk0 + nblocks - 1).to(gl.int64), offs_n,
                                      n_ok, offs_k, k_ok, kb, stride_asb, stride_bsb, g + nblocks - 1, 0, STAGES, QB,
                                      B_BLOCKS)
            g += nblocks
            _wg_store(acc, e, n0 + HALF * ROWS, k0, N, K, out_ptr, stride_oe, stride_on, out_desc, c_bufs, HALF, ROWS,
                      QB, TMA_OUT, ACCUMULATE)
        if TMA_OUT:
            tma.store_wait(0)

    @gluon.jit
    def _wg_store(acc, e, piece0, k0, N, K, out_ptr, stride_oe, stride_on, out_desc, c_bufs, HALF: gl.constexpr,
                  ROWS: gl.constexpr, QB: gl.constexpr, TMA_OUT: gl.constexpr, ACCUMULATE: gl.constexpr):
        """A consumer's 64 x 128 piece of the gradient (rows [piece0, piece0 + 64) of expert e,
        columns from k0; acc in the product's layout): where the piece's 64 rows are all expert
        e's, staged and stored by TMA (out viewed as [E * N, K], clipped at K) from its
        shared-memory buffer, as the forward's consumers store theirs; else by masked stores, with
        ACCUMULATE (an fp32 out: never by TMA) added to what out holds."""
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, QB, 32])
        rows_layout: gl.constexpr = gl.SliceLayout(1, mma_layout)
        cols_layout: gl.constexpr = gl.SliceLayout(0, mma_layout)
        if TMA_OUT and piece0 + ROWS <= N:
            c_buf = c_bufs.index(HALF)
            tma.store_wait(0)
            c_buf.store(acc.to(out_desc.dtype))
            fence_async_shared()
            _tma_store(out_desc, [e * N + piece0, k0], c_buf)
        else:
            offs_n = piece0 + gl.arange(0, ROWS, layout=rows_layout)
            cols = k0 + gl.arange(0, QB, layout=cols_layout)
            out_ptrs = (out_ptr + e.to(gl.int64) * stride_oe + offs_n[:, None].to(gl.int64) * stride_on
                        + cols[None, :])
            mask = (offs_n < N)[:, None] & (cols < K)[None, :]
            if ACCUMULATE:
                acc += gl.load(out_ptrs, mask=mask, other=0.0)
            gl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @gluon.jit
    def _wg_promote(acc, r, token, empty, as_ptr, bs_ptr, blk, offs_n, n_ok, offs_k, k_ok, kb, stride_asb, stride_bsb,
                    g, OUTSTANDING: gl.constexpr, STAGES: gl.constexpr, QB: gl.constexpr, B_BLOCKS: gl.constexpr):
        """acc plus block blk's product (stage-ring step g, issued into r: `token`) scaled by the
        block's two column-scale vectors, once at most OUTSTANDING products are in flight; the
        stage released. The scales are read before the wait, under the product. B_BLOCKS: b's
        scales one per block of Q rows and Q columns (column kb of bs): one scale a row, the
        forward's promotion (one FFMA an element against an FMUL and an FFMA, and no column
        scales moved to the product's layout); with powers of two the same bits where the values
        are the same."""
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, QB, 32])
        cols_layout: gl.constexpr = gl.SliceLayout(0, mma_layout)
        sa = gl.load(as_ptr + blk * stride_asb + offs_n, mask=n_ok, other=0.0)
        if B_BLOCKS:
            scale = sa * gl.load(bs_ptr + blk * stride_bsb + kb)
        else:
            sb = gl.convert_layout(gl.load(bs_ptr + blk * stride_bsb + offs_k, mask=k_ok, other=0.0), cols_layout)
        r = warpgroup_mma_wait(num_outstanding=OUTSTANDING, deps=(token, ))
        mbarrier.arrive(empty.index(g % STAGES), count=1)
        if B_BLOCKS:
            acc = acc + r * scale[:, None]
        else:
            acc = acc + (r * sa[:, None]) * sb[None, :]
        return acc, r

    @gluon.jit
    def _wg_store_tile(acc, tile, table_ptr, num_n_tiles, num_k_tiles, N, K, out_ptr, stride_oe, stride_on, out_desc,
                       c_bufs, HALF: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_N: gl.constexpr, ROWS: gl.constexpr,
                       QB: gl.constexpr, TMA_OUT: gl.constexpr, ACCUMULATE: gl.constexpr):
        """`_wg_store` of this consumer's piece of tile `tile` (its expert, rows and columns found
        again from the tile's index)."""
        e, n0, k0, _, _ = _wg_tile(tile, table_ptr, num_n_tiles, num_k_tiles, BLOCK_N, GROUP_N, QB)
        _wg_store(acc, e, n0 + HALF * ROWS, k0, N, K, out_ptr, stride_oe, stride_on, out_desc, c_bufs, HALF, ROWS, QB,
                  TMA_OUT, ACCUMULATE)

    @gluon.jit
    def _wg_consumer_overlap(a_bufs, b_bufs, ready, empty, as_ptr, bs_ptr, out_ptr, table_ptr, N, K, num_tiles,
                             num_n_tiles, num_k_tiles, num_programs, stride_asb, stride_bsb, stride_oe, stride_on,
                             out_desc, c_bufs,
                             HALF: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, GROUP_N: gl.constexpr,
                             CONSUMERS: gl.constexpr, QB: gl.constexpr, TMA_OUT: gl.constexpr,
                             ACCUMULATE: gl.constexpr, B_BLOCKS: gl.constexpr):
        """`_wg_consumer` with each tile's output stored while the next tile's first product runs.
        Both consumers work on the same tile, so in `_wg_consumer` their epilogues coincide and
        the tensor cores idle through them, once every tile: on mixtral's weight gradients every
        16 blocks (a tile's K loop runs over one expert's rows). Here the accumulator is kept
        until the next tile has issued its first product, then stored (TMA or masked, as
        `_wg_consumer`) and zeroed; the first pair of blocks (or the one block) is taken before
        the loop, so that the loop's body is `_wg_consumer`'s; and each tile's entry of the
        experts' table is read one tile ahead. The same arithmetic in the same order: the same
        bits."""
        ROWS: gl.constexpr = 64
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, QB, 32])
        rows_layout: gl.constexpr = gl.SliceLayout(1, mma_layout)
        flat_layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        g = 0
        acc = gl.zeros((ROWS, QB), gl.float32, mma_layout)
        ra = gl.zeros((ROWS, QB), gl.float32, mma_layout)
        rb = gl.zeros((ROWS, QB), gl.float32, mma_layout)
        # The tile whose output acc holds, not yet stored (-1: none); one int carried, its expert,
        # rows and columns found again when it is stored (fewer registers live through the loop).
        prev = gl.program_id(0) * 0 - 1
        # Each tile's first block and block count (the expert's entry of the table) read one tile
        # ahead, so that the next tile's first product is not issued behind a global load.
        per_expert = num_n_tiles * num_k_tiles
        ahead = gl.minimum(gl.program_id(0), num_tiles - 1) // per_expert
        nxt_blk0, nxt_nblocks = gl.load(table_ptr + 2 * ahead), gl.load(table_ptr + 2 * ahead + 1)
        for tile in range(gl.program_id(0), num_tiles, num_programs):
            e, n0, k0, _, _ = _wg_tile(tile, table_ptr, num_n_tiles, num_k_tiles, BLOCK_N, GROUP_N, QB)
            blk0, nblocks = nxt_blk0, nxt_nblocks
            ahead = gl.minimum(tile + num_programs, num_tiles - 1) // per_expert
            nxt_blk0, nxt_nblocks = gl.load(table_ptr + 2 * ahead), gl.load(table_ptr + 2 * ahead + 1)
            offs_n = n0 + HALF * ROWS + gl.arange(0, ROWS, layout=rows_layout)
            n_ok = offs_n < N
            offs_k = k0 + gl.arange(0, QB, layout=flat_layout)
            kb = k0 // QB  # b's block column (B_BLOCKS)
            k_ok = offs_k < K
            blk = blk0.to(gl.int64)
            if nblocks >= 2:  # the first pair: the previous tile's output goes under its first product
                pa = _issue(a_bufs, b_bufs, ready, g, ra, HALF, STAGES, CONSUMERS)
                if prev >= 0:
                    _wg_store_tile(acc, prev, table_ptr, num_n_tiles, num_k_tiles, N, K, out_ptr, stride_oe,
                                   stride_on, out_desc, c_bufs, HALF, BLOCK_N, GROUP_N, ROWS, QB, TMA_OUT, ACCUMULATE)
                acc = gl.zeros((ROWS, QB), gl.float32, mma_layout)
                pb = _issue(a_bufs, b_bufs, ready, g + 1, rb, HALF, STAGES, CONSUMERS)
                acc, ra = _wg_promote(acc, ra, pa, empty, as_ptr, bs_ptr, blk, offs_n, n_ok, offs_k, k_ok, kb,
                                      stride_asb, stride_bsb, g, 1, STAGES, QB, B_BLOCKS)
                acc, rb = _wg_promote(acc, rb, pb, empty, as_ptr, bs_ptr, blk + 1, offs_n, n_ok, offs_k, k_ok, kb,
                                      stride_asb, stride_bsb, g + 1, 0, STAGES, QB, B_BLOCKS)
            elif nblocks == 1:
                pa = _issue(a_bufs, b_bufs, ready, g, ra, HALF, STAGES, CONSUMERS)
                if prev >= 0:
                    _wg_store_tile(acc, prev, table_ptr, num_n_tiles, num_k_tiles, N, K, out_ptr, stride_oe,
                                   stride_on, out_desc, c_bufs, HALF, BLOCK_N, GROUP_N, ROWS, QB, TMA_OUT, ACCUMULATE)
                acc = gl.zeros((ROWS, QB), gl.float32, mma_layout)
                acc, ra = _wg_promote(acc, ra, pa, empty, as_ptr, bs_ptr, blk, offs_n, n_ok, offs_k, k_ok, kb,
                                      stride_asb, stride_bsb, g, 0, STAGES, QB, B_BLOCKS)
            else:  # an empty expert: no product to store under
                if prev >= 0:
                    _wg_store_tile(acc, prev, table_ptr, num_n_tiles, num_k_tiles, N, K, out_ptr, stride_oe,
                                   stride_on, out_desc, c_bufs, HALF, BLOCK_N, GROUP_N, ROWS, QB, TMA_OUT, ACCUMULATE)
                acc = gl.zeros((ROWS, QB), gl.float32, mma_layout)
            for i in range(1, nblocks // 2):  # the other pairs, as `_wg_consumer` runs them
                j = 2 * i
                pa = _issue(a_bufs, b_bufs, ready, g + j, ra, HALF, STAGES, CONSUMERS)
                pb = _issue(a_bufs, b_bufs, ready, g + j + 1, rb, HALF, STAGES, CONSUMERS)
                blk_j = (blk0 + j).to(gl.int64)
                acc, ra = _wg_promote(acc, ra, pa, empty, as_ptr, bs_ptr, blk_j, offs_n, n_ok, offs_k, k_ok, kb,
                                      stride_asb, stride_bsb, g + j, 1, STAGES, QB, B_BLOCKS)
                acc, rb = _wg_promote(acc, rb, pb, empty, as_ptr, bs_ptr, blk_j + 1, offs_n, n_ok, offs_k, k_ok, kb,
                                      stride_asb, stride_bsb, g + j + 1, 0, STAGES, QB, B_BLOCKS)
            if nblocks % 2 == 1 and nblocks > 1:  # the last block of an odd count
                pa = _issue(a_bufs, b_bufs, ready, g + nblocks - 1, ra, HALF, STAGES, CONSUMERS)
                acc, ra = _wg_promote(acc, ra, pa, empty, as_ptr, bs_ptr, (blk0 + nblocks - 1).to(gl.int64), offs_n,
                                      n_ok, offs_k, k_ok, kb, stride_asb, stride_bsb, g + nblocks - 1, 0, STAGES, QB,
                                      B_BLOCKS)
            g += nblocks
            prev = tile
        if prev >= 0:
            _wg_store_tile(acc, prev, table_ptr, num_n_tiles, num_k_tiles, N, K, out_ptr, stride_oe, stride_on,
                           out_desc, c_bufs, HALF, BLOCK_N, GROUP_N, ROWS, QB, TMA_OUT, ACCUMULATE)
        if TMA_OUT:
            tma.store_wait(0)

    @gluon.jit
    def _gmm_fp8_wgrad_ws_kernel(
        a_desc, b_desc, as_ptr, bs_ptr, out_ptr, table_ptr, out_desc,
        N, K, num_tiles, num_n_tiles, num_k_tiles, num_programs,
        stride_asb, stride_bsb, stride_oe, stride_on,
        BLOCK_N: gl.constexpr, STAGES: gl.constexpr, GROUP_N: gl.constexpr, CONSUMERS: gl.constexpr, QB: gl.constexpr,
        TMA_OUT: gl.constexpr, OVERLAP: gl.constexpr, ACCUMULATE: gl.constexpr, B_BLOCKS: gl.constexpr,
    ):
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES * CONSUMERS, 64, QB], a_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES, QB, QB], b_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(empty.index(s), count=CONSUMERS)
        if TMA_OUT:
            c_bufs = gl.allocate_shared_memory(out_desc.dtype, [CONSUMERS, 64, QB], out_desc.layout)
        else:
            c_bufs = a_bufs  # not read
        fence_async_shared()
        FIRST: gl.constexpr = 0
        SECOND: gl.constexpr = 1
        if OVERLAP:  # each tile's output stored while the next tile's first product runs
            gl.warp_specialize([
                (_wg_consumer_overlap, (a_bufs, b_bufs, ready, empty, as_ptr, bs_ptr, out_ptr, table_ptr, N, K,
                                        num_tiles, num_n_tiles, num_k_tiles, num_programs, stride_asb, stride_bsb,
                                        stride_oe, stride_on, out_desc, c_bufs, FIRST, BLOCK_N, STAGES, GROUP_N,
                                        CONSUMERS, QB, TMA_OUT, ACCUMULATE, B_BLOCKS)),
                (_wg_consumer_overlap, (a_bufs, b_bufs, ready, empty, as_ptr, bs_ptr, out_ptr, table_ptr, N, K,
                                        num_tiles, num_n_tiles, num_k_tiles, num_programs, stride_asb, stride_bsb,
                                        stride_oe, stride_on, out_desc, c_bufs, SECOND, BLOCK_N, STAGES, GROUP_N,
                                        CONSUMERS, QB, TMA_OUT, ACCUMULATE, B_BLOCKS)),
                (_wg_loader, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, table_ptr, num_tiles, num_n_tiles,
                              num_k_tiles, num_programs, BLOCK_N, STAGES, GROUP_N, CONSUMERS, QB)),
            ], [4, 1], [240, 24])
        else:
            gl.warp_specialize([
                (_wg_consumer, (a_bufs, b_bufs, ready, empty, as_ptr, bs_ptr, out_ptr, table_ptr, N, K, num_tiles,
                                num_n_tiles, num_k_tiles, num_programs, stride_asb, stride_bsb, stride_oe, stride_on,
                                out_desc, c_bufs, FIRST, BLOCK_N, STAGES, GROUP_N, CONSUMERS, QB, TMA_OUT,
                                ACCUMULATE, B_BLOCKS)),
                (_wg_consumer, (a_bufs, b_bufs, ready, empty, as_ptr, bs_ptr, out_ptr, table_ptr, N, K, num_tiles,
                                num_n_tiles, num_k_tiles, num_programs, stride_asb, stride_bsb, stride_oe, stride_on,
                                out_desc, c_bufs, SECOND, BLOCK_N, STAGES, GROUP_N, CONSUMERS, QB, TMA_OUT,
                                ACCUMULATE, B_BLOCKS)),
                (_wg_loader, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, table_ptr, num_tiles, num_n_tiles,
                              num_k_tiles, num_programs, BLOCK_N, STAGES, GROUP_N, CONSUMERS, QB)),
            ], [4, 1], [240, 24])


# The 16-bit outputs the warp-specialized form can store by TMA (a 64 x 128 buffer per consumer
# beside the stages: 208 KB of shared memory with three consumers and four stages).
_OUT_TYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16} if _gluon else {}
# A Hopper block's shared memory (opt-in), less room for the barriers.
_SHARED_BYTES = 232448 - 2048


def tma_store_fits(block_m: int, stages: int, dtype: torch.dtype) -> bool:
    """Whether the warp-specialized form over block_m-row tiles with `stages` stages has room for
    its consumers' 64-row output buffers (and `dtype` is one it stores by TMA)."""
    buffers = WS_CONSUMERS[(block_m, BLOCK)] * 64 * BLOCK * 2
    return dtype in _OUT_TYPES and stages * (block_m + BLOCK) * BLOCK + buffers <= _SHARED_BYTES


def _tma_out_desc(out_2d: torch.Tensor, use: bool, block_m: int, stages: int):
    """The descriptor through which the warp-specialized forms' consumers store a 2-D 16-bit
    output's 64-row pieces by TMA, or None where `use` is off, their buffers do not fit beside
    `stages` stages of block_m-row tiles, or the tensor does not allow TMA."""
    if not (use and tma_store_fits(block_m, stages, out_2d.dtype) and tma_ok(out_2d)):
        return None
    return _descriptor(out_2d, 64, _OUT_TYPES[out_2d.dtype])


@functools.lru_cache(maxsize=None)
def _shared_layout(rows: int, gl_dtype) -> "gl.NVMMASharedLayout":
    # Built once per block shape: Gluon's layout constructor costs more host time than the
    # descriptor (5.6-10.7 us against 2.6-5.0 on the H200 machine's host, benchmarks/RESULTS.md).
    return gl.NVMMASharedLayout.get_default_for([rows, BLOCK], gl_dtype)


def _descriptor(t_2d: torch.Tensor, rows: int, gl_dtype) -> "TensorDescriptor":
    """The TMA descriptor of a 2-D tensor with a unit last stride, in [rows, BLOCK] blocks."""
    return TensorDescriptor(t_2d, list(t_2d.shape), [t_2d.stride(0), 1], [rows, BLOCK], _shared_layout(rows, gl_dtype))


def available() -> bool:
    """Whether this Triton ships Gluon's Hopper language (the forms here compile)."""
    return _gluon


def usable(x_q: torch.Tensor, w_q: torch.Tensor) -> bool:
    """Whether this form can take the operands: Gluon present, an sm_90 GPU, x and the [E, N, K]
    weight laid out for TMA (unit K stride, 16-byte aligned rows and bases, the weight contiguous)."""
    if not _gluon or x_q.device.type != "cuda" or capability(x_q.device) != (9, 0):
        return False
    E, N, K = w_q.shape
    return (K % 16 == 0 and x_q.stride(1) == 1 and x_q.stride(0) % 16 == 0 and w_q.is_contiguous()
            and x_q.data_ptr() % 16 == 0 and w_q.data_ptr() % 16 == 0)


def gmm_fp8_wgmma(x_q, x_s, w_q, w_s, sizes, out, num_programs: int, stages: int = 4, num_warps: int = 8,
                  group_m: int = 8, warp_specialize: bool = False, block_m: int = BLOCK,
                  tma_store: bool = True) -> torch.Tensor:
    """out[rows of e] = (x_q * x_s)[rows of e] @ (w_q[e] * w_s[e])^T for `usable` operands: x_q
    [M, K] e4m3, x_s [M, KB] (any strides), w_q [E, N, K] e4m3 contiguous, w_s as its logical
    [E, NB, KB] strides, sizes int32 [E] on the device, out [M, N] (rows past the groups' total
    written as zeros). `warp_specialize`: the loader warp and consumer warpgroups over the tiles
    of `WS_TILES` (two of 64 rows over 128 x 128, three over 192 x 128, two of 128 rows over
    256 x 128), with `tma_store` and a 16-bit
    `out` whose strides allow it storing each consumer's full 64-row pieces by TMA; else one group
    of `num_warps` warps over 128 x 128 tiles."""
    tiles = WS_TILES if warp_specialize else {(BLOCK, BLOCK): None}
    if (block_m, BLOCK) not in tiles:
        raise ValueError(f"block_m: expected one of {tuple(m for m, _ in tiles)}, got {block_m}")
    M, K = x_q.shape
    E, N, _ = w_q.shape
    max_m_tiles = triton.cdiv(M, block_m) + E
    table = torch.empty((max_m_tiles, 4), dtype=torch.int32, device=x_q.device)
    _row_tiles_kernel[(max_m_tiles,)](sizes, table, M, E, BLOCK_M=block_m, BLOCK_E=max(2, triton.next_power_of_2(E)))
    x_rows = 64 if warp_specialize else BLOCK  # the warp-specialized form loads x in its consumers' pieces
    x_desc = _descriptor(x_q, x_rows, gl.float8e4nv)
    w_desc = _descriptor(w_q.view(E * N, K), BLOCK, gl.float8e4nv)
    programs = max(1, min(num_programs, max_m_tiles * triton.cdiv(N, BLOCK)))
    if warp_specialize:  # a loader warp and 64-row consumer warpgroups (`_gmm_fp8_ws_kernel`)
        out_desc = _tma_out_desc(out, tma_store, block_m, stages)
        _gmm_fp8_ws_kernel[(programs,)](
            x_desc, w_desc, x_s, w_s, out, table, x_desc if out_desc is None else out_desc,  # (x_desc: not read)
            N, K, max_m_tiles, programs,
            x_s.stride(0), x_s.stride(1), w_s.stride(0), w_s.stride(1), w_s.stride(2), out.stride(0),
            BLOCK_M=block_m, BLOCK_N=BLOCK, BLOCK_K=BLOCK, QB=BLOCK, STAGES=stages, GROUP_M=group_m,
            CONSUMERS=WS_CONSUMERS[(block_m, BLOCK)], TMA_OUT=out_desc is not None, num_warps=4,
            maxnreg=WS_TILES[(block_m, BLOCK)],
            enable_fp_fusion=True,
        )
        return out
    _gmm_fp8_wgmma_kernel[(programs,)](
        x_desc, w_desc, x_s, w_s, out, table,
        N, K, max_m_tiles, programs,
        x_s.stride(0), x_s.stride(1), w_s.stride(0), w_s.stride(1), w_s.stride(2), out.stride(0),
        BLOCK_M=BLOCK, BLOCK_N=BLOCK, BLOCK_K=BLOCK, QB=BLOCK, STAGES=stages, GROUP_M=group_m,
        num_warps=num_warps,
        enable_fp_fusion=True,
    )
    return out


def wgrad_usable(a_q: torch.Tensor, b_q: torch.Tensor) -> bool:
    """Whether the weight gradient's form can take the K-major operands: Gluon present, an sm_90
    GPU, unit inner strides, 16-byte aligned row strides and bases."""
    if not _gluon or a_q.device.type != "cuda" or capability(a_q.device) != (9, 0):
        return False
    return all(t.stride(1) == 1 and t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0 for t in (a_q, b_q))


def gmm_fp8_wgrad_ws(a_q, a_s, b_q, b_s, sizes, out, rows: int, num_programs: int, stages: int = 4,
                     group_n: int = 8, tma_store: bool = True, overlap: bool = False,
                     accumulate: bool = False, b_blocks: bool = False) -> torch.Tensor:
    """The FP8 weight gradient [E, N, K] from `wgrad_usable` K-major operands (a_q [N, P], b_q
    [K, P], block j of the groups in columns [j*Q, (j+1)*Q); scales a_s [ceil(rows/Q) + E, N],
    b_s [.., K] with unit inner stride): out[e][n, k] = Σ over group e's blocks j of
    a_s[j, n] · b_s[j, k] · Σ_r a_q[n, j*Q + r] · b_q[k, j*Q + r], each block's product in fp32.
    sizes int32 [E] on the device; a loader warp and two 64-row consumer warpgroups over 128 x 128
    tiles; an empty group's gradient is written as zeros. `overlap`: each tile's output stored
    while the next tile's first product runs (`_wg_consumer_overlap`), the same bits; `accumulate`:
    the gradient added into out (float32, by masked stores) instead of written; `b_blocks`: b_s
    holds one scale per block of Q rows and Q columns ([.., ceil(K/Q)], `fp8.cols_to_blocks_`),
    each block's product promoted with one scale a row (a_s[j, n] · b_s[j, k // Q])."""
    N, P = a_q.shape
    K = b_q.shape[0]
    E = sizes.numel()
    table = torch.empty((E, 2), dtype=torch.int32, device=a_q.device)
    _group_blocks_kernel[(1,)](sizes, table, rows, E, QB=BLOCK, BLOCK_E=max(2, triton.next_power_of_2(E)))
    a_desc = _descriptor(a_q, 64, gl.float8e4nv)
    b_desc = _descriptor(b_q, BLOCK, gl.float8e4nv)
    num_n_tiles, num_k_tiles = triton.cdiv(N, BLOCK), triton.cdiv(K, BLOCK)
    num_tiles = E * num_n_tiles * num_k_tiles
    programs = max(1, min(num_programs, num_tiles))
    # A 16-bit contiguous gradient's full 64-row pieces go out by TMA (out viewed as [E * N, K]); an
    # accumulated one is float32, never by TMA.
    out_desc = _tma_out_desc(out.view(E * N, K), tma_store, BLOCK, stages) if out.is_contiguous() else None
    _gmm_fp8_wgrad_ws_kernel[(programs,)](
        a_desc, b_desc, a_s, b_s, out, table, a_desc if out_desc is None else out_desc,  # (a_desc: not read)
        N, K, num_tiles, num_n_tiles, num_k_tiles, programs,
        a_s.stride(0), b_s.stride(0), out.stride(0), out.stride(1),
        BLOCK_N=BLOCK, STAGES=stages, GROUP_N=group_n, CONSUMERS=2, QB=BLOCK, TMA_OUT=out_desc is not None,
        OVERLAP=bool(overlap), ACCUMULATE=bool(accumulate), B_BLOCKS=bool(b_blocks), num_warps=4,
        maxnreg=WS_TILES[(BLOCK, BLOCK)],
        enable_fp_fusion=True,
    )
    return out
