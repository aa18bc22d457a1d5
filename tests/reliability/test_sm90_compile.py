"""The grouped GEMM, block-sparse and router kernels compile for Hopper (sm_90) and fit its shared
memory, at every tile configuration the library picks on CUDA, without a GPU.

Triton's CUDA backend compiles ahead of time for a named target with the tools its wheel ships
(ptxas), so a CPU machine can lower each kernel variant to a cubin and read the shared memory it
needs. That catches what the interpreter cannot: a kernel that does not lower, or tiles whose
pipeline stages overflow the 227 KiB a Hopper block may use (e.g. the GLU epilogue's two
accumulators on the 128x256 training tiles: 311 KB). The compile runs in a subprocess without
TRITON_INTERPRET (under which `triton.jit` returns interpreted functions instead).
"""

import json
import os
import subprocess
import sys
import tempfile

import pytest

pytest.importorskip("triton.backends.nvidia")

# Hopper's opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin on an H100).
HOPPER_SHARED_BYTES = 232448
# The longest a kernel variant may take to compile here (seconds; each takes 1-20 s on one core).
COMPILE_SECONDS_MAX = 120

_SCRIPT = r"""
import inspect, json, sys, time
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from megablocks.backend import fp8 as F8, gmm as G, launch as L, permute as P, routing as R, sparse as S, topk as TK

TARGET = GPUTarget("cuda", 90, 32)
ELEMENT = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}


def compile_kernel(fn, element, consts, num_warps, num_stages, types=None, source=ASTSource, options=None):
    names = list(inspect.signature(fn.fn).parameters)
    signature = {}
    for name in names:
        if types and name in types:
            signature[name] = types[name]
        elif name in consts:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            index = any(s in name for s in ("sizes", "rows", "counts", "assignment", "indices", "offsets", "slots"))
            signature[name] = "*i64" if name == "ids_ptr" else "*i32" if index else element
        else:
            signature[name] = "i32"
    src = source(fn, signature=signature, constexprs={(names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages, **(options or {})})


results = []


def check(label, fn, element, consts, num_warps, num_stages, types=None, source=ASTSource, options=None):
    try:
        start = time.perf_counter()
        kernel = compile_kernel(fn, element, consts, num_warps, num_stages, types, source, options)
        results.append({"label": label, "shared": kernel.metadata.shared, "seconds": time.perf_counter() - start})
    except Exception as err:  # reported by the test
        results.append({"label": label, "error": f"{type(err).__name__}: {str(err)[:3000]}"})


meta = lambda dtype: torch.empty(0, dtype=dtype, device="meta")  # noqa: E731
for dtype in (torch.bfloat16, torch.float32):
    element = ELEMENT[dtype]
    precision = L.dot_precision(dtype)
    for rows_per_group in (4.0, 1000.0):
        for glu in (False, True):
            cfg = G.default_config(meta(dtype), rows_per_group, glu)
            for gather in (False, True):
                for k_major in (True, False):
                    label = (f"gmm {dtype} rows/group={rows_per_group} glu={glu} gather={gather} "
                             f"k_major={k_major} {cfg.block_m}x{cfg.block_n}x{cfg.block_k}")
                    consts = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                                  BLOCK_E=128, GROUP_M=cfg.group_m, USE_TMA=True, B_K_MAJOR=k_major,
                                  UPCAST=False, PRECISION=precision, TMA_STORE=cfg.tma_store,
                                  ACCUMULATE=False, GATHER_A=gather, GLU="silu" if glu else "none",
                                  HAS_BIAS=False, PDL=2)
                    check(label, G._gmm_kernel, element, consts, cfg.num_warps, cfg.num_stages)
            # The experts' biases in the epilogue, with gpt-oss's clamped SwiGLU where there is a GLU.
            consts.update(HAS_BIAS=True, GLU="clamped_swiglu" if glu else "none")
            check(f"gmm {dtype} rows/group={rows_per_group} glu={glu} bias", G._gmm_kernel, element, consts,
                  cfg.num_warps, cfg.num_stages)
            if not glu:
                consts.update(ACCUMULATE=True, GATHER_A=False, B_K_MAJOR=True, HAS_BIAS=False)
                check(f"gmm {dtype} rows/group={rows_per_group} accumulate", G._gmm_kernel, element, consts,
                      cfg.num_warps, cfg.num_stages)
    # The weight gradients, also added into an fp32 accumulator (gradient-accumulation fusion), at
    # the main tiles and (16-bit) the small-K tiles of a few rows per group.
    for rows_per_group in (None, 4.0) if dtype != torch.float32 else (None,):
        cfg = G.default_config(meta(dtype), rows_per_group, weight_grad=True)
        for gather, trans_out, accumulate in ((False, False, False), (True, False, False), (True, True, False),
                                              (False, False, True), (True, True, True)):
            consts = dict(BLOCK_K=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=cfg.block_k, BLOCK_E=128,
                          GROUP_M=cfg.group_m, USE_TMA=cfg.tma_loads,
                          TMA_STORE=cfg.tma_loads and cfg.tma_store and not accumulate, UPCAST=False,
                          PRECISION=precision, GATHER_A=gather, TRANS_OUT=trans_out, ACCUMULATE=accumulate)
            check(f"gmm variable-K {dtype} rows/group={rows_per_group} gather={gather} trans_out={trans_out} "
                  f"accumulate={accumulate} {cfg.block_m}x{cfg.block_n}x{cfg.block_k}",
                  G._gmm_var_k_kernel, element, consts, cfg.num_warps, cfg.num_stages,
                  types={"out_ptr": "*fp32"} if accumulate else None)

for dtype in (torch.bfloat16, torch.float32):
    element, precision = ELEMENT[dtype], L.dot_precision(dtype)
    for block in (64, 128):
        cfg = S.default_config("sdd", block, dtype, torch.device("cuda"))
        block_k = min(cfg.block_k, block)
        for structured, tma, k_major in ((True, True, False), (True, True, True), (True, False, False),
                                          (False, False, False)):
            slots = cfg.slots if structured else 1
            consts = dict(BLOCK=block, SLOTS=slots, BLOCK_K=block_k, GROUP_M=cfg.group_m, STRUCTURED=structured,
                          EVEN_K=False, MASK_COLS=True, COL_ALIGN=8, PRECISION=precision, USE_TMA=tma,
                          B_K_MAJOR=k_major)
            check(f"sdd {dtype} B={block} structured={structured} tma={tma} k_major={k_major}", S._sdd_kernel,
                  element, consts, cfg.num_warps, cfg.num_stages)
        cfg = S.default_config("dsd", block, dtype, torch.device("cuda"))
        block_k = min(cfg.block_k, block)
        for gather, contiguous, tma, m_major, k_major in (
                (False, True, True, False, False), (True, True, True, True, False), (True, True, True, True, True),
                (True, False, False, True, False), (False, False, False, False, False)):
            consts = dict(BLOCK=block, BLOCK_N=cfg.block_n, BLOCK_K=block_k, GROUP_M=cfg.group_m, GATHER=gather,
                          CONTIGUOUS=contiguous, MASK_OUT=True, MASK_IN=True, EVEN_N=False, IN_ALIGN=8,
                          PRECISION=precision, USE_TMA=tma, A_M_MAJOR=m_major, B_K_MAJOR=k_major)
            check(f"dsd {dtype} B={block} gather={gather} contiguous={contiguous} tma={tma} m_major={m_major} "
                  f"k_major={k_major}", S._dsd_kernel, element, consts, cfg.num_warps, cfg.num_stages)

for block_e in (16, 128, 1024):
    block_t = max(1, min(256, TK.ROUTE_TILE // block_e))
    # Integer arguments equal to 1 are compiled as constants (Triton's specialization; K never is).
    for ones in ({}, {"T": 1, "stride_e": 1}, {"E": 1, "stride_e": 1}):
        check(f"softmax_topk_route E<={block_e} {ones}", TK._softmax_topk_route_kernel, "*fp32",
              dict(RENORMALIZE=True, BLOCK_T=block_t, BLOCK_E=block_e, **ones), 8, 3)
    check(f"softmax_topk E<={block_e}", TK._softmax_topk_kernel, "*fp32",
          dict(RENORMALIZE=True, BLOCK_E=block_e, PDL=2), TK._num_warps(block_e), 3)
for maps in (False, True):
    check(f"small_routing maps={maps}", R._small_routing_kernel, "*i32",
          dict(BLOCK_N=4096, NUM_BINS=1024, ID_BITS=R._ID_BITS, MAPS=maps, PDL=2), 8, 3)
check("routing keys", R._routing_keys_kernel, "*i32", dict(BLOCK=R._MAPS_BLOCK), 4, 3)
check("sorted maps", R._sorted_maps_kernel, "*i32",
      dict(BLOCK=R._MAPS_BLOCK, BLOCK_E=R._COUNTS_BLOCK, SEARCH_STEPS=18), 4, 3)
check("padded counts", R._padded_counts_kernel, "*i32",
      dict(BLOCK_E=R.PADDED_MAPS_MAX_EXPERTS, SEARCH_STEPS=18), 4, 3, types={"keys_ptr": "*u8"})
check("padded maps", R._padded_maps_kernel, "*i32", dict(BLOCK=R._MAPS_BLOCK), 4, 3,
      types={"keys_ptr": "*u8", "order_ptr": "*i64"})
# The combine (weighted scatter), launched on Hopper to start while the product before it ends (PDL).
for dtype in (torch.bfloat16, torch.float32):
    tile = P.default_tile(4096)
    check(f"permute scatter {dtype} {tile.rows}x{tile.cols}", P._scatter_kernel, ELEMENT[dtype],
          dict(TOP_K=8, HAS_WEIGHTS=True, ROUND_TERMS=False, BLOCK_T=tile.rows, BLOCK_H=tile.cols, PDL=2),
          tile.num_warps, 3, types={"weights_ptr": "*fp32", "assignment_row_ptr": "*i32"})
# The permutation's weight gradient at the smallest hidden size's tile (the most rows a program
# takes; its loop over them is unrolled).
for dtype in (torch.bfloat16, torch.float32):
    tile = P.weight_grad_tile(1)
    check(f"permute weight_grad {dtype} {tile.rows}x{tile.cols}", P._weight_grad_kernel, ELEMENT[dtype],
          dict(TOP_K=4, BLOCK_A=tile.rows, BLOCK_H=tile.cols), tile.num_warps, 3, types={"out_ptr": "*fp32"})
# FP8: the quantizer from each 16-bit dtype (rounding by the hardware's cast, as CUDA runs it), and
# the grouped GEMM's Hopper tiles into bf16 / fp32.
for dtype in (torch.bfloat16, torch.float32):
    check(f"fp8 quantize_rows from {dtype}", F8._quantize_rows_kernel, ELEMENT[dtype],
          dict(BLOCK_M=32, QB=F8.Q, CAST=True), 4, 3, types={"q_ptr": "*fp8e4nv", "s_ptr": "*fp32"})
    # The quantizers fused with the serving path's gather and GLU.
    # ... and with the routing weights and the 16-bit rows written too (the combine's backward).
    for weighted in (False, True):
        check(f"fp8 gather_quantize_rows from {dtype} weighted={weighted}", F8._gather_quantize_rows_kernel,
              ELEMENT[dtype], dict(TOP_K=8, BLOCK_T=16 if weighted else 32, QB=F8.Q, HAS_WEIGHTS=weighted,
                                   WRITE_ROWS=weighted, PDL=2, CAST=True),
              4, 3,
              types={"assignment_row_ptr": "*i32", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "rows_ptr": ELEMENT[dtype]})
    # ... and with the 16-bit product written too (the FP8 node keeps it for w2's gradient).
    # The MLP experts' forms (`act_quantize_rows`, `act_backward_quantize_rows_`: GATED=False;
    # `act_rows`, `act_backward_rows_`: not quantizing either).
    for activation, write_a, gated, quantize in (("silu", False, True, True), ("clamped_swiglu", False, True, True),
                                                 ("silu", True, True, True), ("gelu_tanh", True, False, True),
                                                 ("gelu_tanh", True, False, False)):
        check(f"fp8 glu_quantize_rows {activation} from {dtype} write_a={write_a}"
              + ("" if gated else " (MLP activation)") + ("" if quantize else " not quantizing"),
              F8._glu_quantize_rows_kernel,
              ELEMENT[dtype], dict(ACTIVATION=activation, BLOCK_M=32, QB=F8.Q, PDL=2, WRITE_A=write_a, CAST=True,
                                   GATED=gated, QUANTIZE=quantize),
              4, 3,
              types={"q_ptr": "*fp8e4nv", "s_ptr": "*fp32"})
    for activation, gated, quantize in (("silu", True, True), ("gelu_tanh", False, True), ("gelu_tanh", False, False)):
        check(f"fp8 glu_backward_quantize_rows {activation} from {dtype}" + ("" if gated else " (MLP activation)")
              + ("" if quantize else " not quantizing"),
              F8._glu_backward_quantize_rows_kernel, ELEMENT[dtype],
              dict(ACTIVATION=activation, BLOCK_M=32, QB=F8.Q, CAST=True, GATED=gated, QUANTIZE=quantize), 4, 3,
              types={"q1_ptr": "*fp8e4nv", "s1_ptr": "*fp32", "q2_ptr": "*fp8e4nv", "s2_ptr": "*fp32"})
    # Pointer loads (decode), and TMA loads of K-major and N-major weights, warp-specialized with 4
    # stages (the default) and not with 3.
    for tma, k_major, stages, ws in ((False, True, 4, False), (True, True, 4, True), (True, False, 4, True),
                                     (True, True, 3, False)):
        check(f"fp8 gmm into {dtype} tma={tma} k_major={k_major} warp_specialize={ws}", F8._gmm_fp8_kernel,
              ELEMENT[dtype], dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, QB=F8.Q, BLOCK_E=128, GROUP_M=8,
                                   USE_TMA=tma, W_K_MAJOR=k_major, WARP_SPECIALIZE=ws, PDL=2), 8, stages,
              types={"x_ptr": "*fp8e4nv", "w_ptr": "*fp8e4nv", "xs_ptr": "*fp32", "ws_ptr": "*fp32"})
    # Each tile transposed (weights times rows) with few-row tiles, for decode (`swap_ab`).
    for block_m in (16, 64):
        check(f"fp8 gmm into {dtype} swap_ab block_m={block_m}", F8._gmm_fp8_kernel, ELEMENT[dtype],
              dict(BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=128, QB=F8.Q, BLOCK_E=128, GROUP_M=8, USE_TMA=False,
                   W_K_MAJOR=True, WARP_SPECIALIZE=False, SWAP_AB=True, PDL=2), 4, 4,
              types={"x_ptr": "*fp8e4nv", "w_ptr": "*fp8e4nv", "xs_ptr": "*fp32", "ws_ptr": "*fp32"})
    # ... and the up product's form with the GLU and its quantizer in the epilogue (two accumulators).
    for block_m, activation in ((16, "silu"), (32, "silu"), (32, "clamped_swiglu")):
        check(f"fp8 gmm glu decode h {dtype} block_m={block_m} {activation}", F8._gmm_fp8_glu_decode_kernel,
              "*fp8e4nv", dict(ACTIVATION=activation, H_DTYPE=F8._TL_DTYPES[dtype], BLOCK_M=block_m, BLOCK_K=128,
                               QB=F8.Q, BLOCK_E=128, PDL=2, CAST=True, GATHER=False, TOP_K=1), 4,
              F8.GLU_DECODE_STAGES,
              types={"xs_ptr": "*fp32", "ws_ptr": "*fp32", "s_ptr": "*fp32", "row_assignment_ptr": "*i32"})
    # ... and gathering the token rows, quantized in its K loop.
    check(f"fp8 gmm glu decode gathering {dtype} rows", F8._gmm_fp8_glu_decode_kernel, "*fp8e4nv",
          dict(ACTIVATION="silu", H_DTYPE=F8._TL_DTYPES[dtype], BLOCK_M=16, BLOCK_K=128, QB=F8.Q, BLOCK_E=128, PDL=2,
               CAST=True, GATHER=True, TOP_K=8), 4, F8.GLU_DECODE_STAGES,
          types={"x_ptr": ELEMENT[dtype], "xs_ptr": "*fp32", "ws_ptr": "*fp32", "s_ptr": "*fp32",
                 "row_assignment_ptr": "*i32"})
    # Alone, and with the transposed copy (four bytes to an int32 word, or one by one); the
    # hardware's cast, as CUDA runs it.
    for transposed, packed in ((False, False), (True, True), (True, False)):
        check(f"fp8 quantize_blocks from {dtype} transposed={transposed} packed={packed}", F8._quantize_blocks_kernel,
              ELEMENT[dtype], dict(QB=F8.Q, TRANSPOSED=transposed, PACKED=packed, CAST=True), 16 if transposed else 8,
              3, types={"q_ptr": "*u8", "s_ptr": "*fp32", "t_ptr": "*i32" if packed else "*u8"})
    check(f"fp8 quantize_cols_grouped from {dtype}", F8._quantize_cols_grouped_kernel, ELEMENT[dtype],
          dict(QB=F8.Q, BLOCK_K=64, BLOCK_E=128, TRANSPOSED=True, CAST=True), 4, 3,
          types={"q_ptr": "*fp8e4nv", "s_ptr": "*fp32"})
    if dtype is torch.float32:  # the weight gradient's b operand coarsened to 128 x 128 blocks in place
        check("fp8 cols_to_blocks_", F8._cols_to_blocks_kernel, "*fp8e4nv", dict(QB=F8.Q, BLOCK_E=128, CAST=True),
              4, 3, types={"s_ptr": "*fp32", "t_ptr": "*fp32", "sizes_ptr": "*i32"})
    # The weight gradient's operands quantized in the passes that read them, at the launch taken.
    for mode, launch in F8.COLS_FUSED_LAUNCH.items():
        bk = F8.Q if mode in ("rows", "glu_backward") else launch["bk"]
        check(f"fp8 weight-gradient operands ({mode}) from {dtype}", F8._quantize_cols_fused_kernel, ELEMENT[dtype],
              dict(MODE=mode, ACTIVATION="silu", TOP_K=2, QB=F8.Q, CH=launch["ch"], BK=bk, BLOCK_E=128, CAST=True,
                   BLOCKS=False),
              launch["num_warps"], launch["num_stages"],
              types={n: "*fp8e4nv" for n in ("qc_ptr", "q1_ptr", "q2_ptr")}
              | {n: "*fp32" for n in ("sc_ptr", "s1_ptr", "s2_ptr")})
    # The b operands with one scale per 128 x 128 block, at their launch.
    for mode, launch in F8.COLS_BLOCKS_LAUNCH.items():
        check(f"fp8 weight-gradient b operand in blocks ({mode}) from {dtype}", F8._quantize_cols_fused_kernel,
              ELEMENT[dtype], dict(MODE=mode, ACTIVATION="silu", TOP_K=2, QB=F8.Q, CH=launch["ch"], BK=F8.Q,
                                   BLOCK_E=128, CAST=True, BLOCKS=True), launch["num_warps"], launch["num_stages"],
              types={n: "*fp8e4nv" for n in ("qc_ptr", "q1_ptr", "q2_ptr")}
              | {n: "*fp32" for n in ("sc_ptr", "s1_ptr", "s2_ptr")})
    check(f"fp8 weight gradient into {dtype}", F8._gmm_fp8_wgrad_kernel, ELEMENT[dtype],
          dict(BLOCK_N=128, BLOCK_K=128, QB=F8.Q, BLOCK_E=128, ACCUMULATE=False), 8, 3,
          types={"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "as_ptr": "*fp32", "bs_ptr": "*fp32"})
    # The K-major form (the Triton kernel where the Gluon one does not apply), added into an fp32
    # gradient (gradient-accumulation fusion) and written.
    for accumulate in (False, True) if dtype == torch.float32 else (False,):
        check(f"fp8 weight gradient, K-major, into {dtype}" + (" accumulating" if accumulate else ""),
              F8._gmm_fp8_wgrad_kmajor_kernel, ELEMENT[dtype],
              dict(BLOCK_N=128, BLOCK_K=128, QB=F8.Q, BLOCK_E=128, USE_TMA=True, ACCUMULATE=accumulate), 8, 4,
              types={"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "as_ptr": "*fp32", "bs_ptr": "*fp32"})
# The Gluon form of the FP8 GEMM (`wgmma`) at 4 and 6 stages, where this Triton ships Gluon's
# Hopper language, and the table of its row tiles.
from megablocks.backend import fp8_wgmma as FW
check("fp8 wgmma row tiles", FW._row_tiles_kernel, "*i32", dict(BLOCK_M=128, BLOCK_E=128), 4, 3)
if FW.available():
    from triton.experimental.gluon._runtime import GluonASTSource
    DESC = "tensordesc<fp8e4nv[128, 128],%r>" % FW.gl.NVMMASharedLayout.get_default_for([128, 128], FW.gl.float8e4nv)
    for dtype in (torch.bfloat16, torch.float32):
        for stages in (4, 6):
            check(f"fp8 gmm wgmma into {dtype} stages={stages}", FW._gmm_fp8_wgmma_kernel, ELEMENT[dtype],
                  dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, QB=F8.Q, STAGES=stages, GROUP_M=8, num_warps=8), 8,
                  stages, types={"x_desc": DESC, "w_desc": DESC, "xs_ptr": "*fp32", "ws_ptr": "*fp32",
                                 "table_ptr": "*i32"}, source=GluonASTSource)
    # The warp-specialized form: a loader warp and two or three consumer warpgroups under its
    # register limit (two of 128 rows over 256-row tiles).
    for dtype in (torch.bfloat16, torch.float32):
        for (block_m, block_n), stages in (((128, 128), 4), ((128, 128), 6), ((192, 128), 4), ((192, 128), 5),
                                           ((256, 128), 3), ((256, 128), 4)):
            x_desc = "tensordesc<fp8e4nv[64, 128],%r>" % FW.gl.NVMMASharedLayout.get_default_for([64, 128],
                                                                                             FW.gl.float8e4nv)
            # A 16-bit output goes out by TMA where its buffers fit beside the stages.
            tma_out = FW.tma_store_fits(block_m, stages, dtype)
            out_desc = ("tensordesc<bf16[64, 128],%r>" % FW.gl.NVMMASharedLayout.get_default_for([64, 128],
                                                                                                FW.gl.bfloat16)
                        if tma_out else x_desc)
            check(f"fp8 gmm wgmma warp-specialized into {dtype} {block_m}x{block_n} stages={stages}"
                  + (" TMA store" if tma_out else ""),
                  FW._gmm_fp8_ws_kernel, ELEMENT[dtype],
                  dict(BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=128, QB=F8.Q, STAGES=stages, GROUP_M=8,
                       CONSUMERS=FW.WS_CONSUMERS[(block_m, block_n)], TMA_OUT=tma_out), 4, stages,
                  types={"x_desc": x_desc, "w_desc": DESC, "xs_ptr": "*fp32", "ws_ptr": "*fp32", "table_ptr": "*i32",
                         "out_desc": out_desc},
                  source=GluonASTSource, options={"maxnreg": FW.WS_TILES[(block_m, block_n)]})
    # The weight gradient's warp-specialized form (two consumers, blocks in pairs), with each
    # tile's output stored after the next tile's first product is issued (OVERLAP) and without.
    # B_BLOCKS: b's scales one per 128 x 128 block (the forward's promotion).
    for dtype, overlap, accumulate, b_blocks in ((torch.bfloat16, False, False, False),
                                                 (torch.float32, False, False, False),
                                                 (torch.bfloat16, True, False, False),
                                                 (torch.float32, True, True, False),
                                                 (torch.bfloat16, False, False, True),
                                                 (torch.float32, True, True, True)):
        for stages in (2, 4):
            a_desc = "tensordesc<fp8e4nv[64, 128],%r>" % FW.gl.NVMMASharedLayout.get_default_for([64, 128],
                                                                                             FW.gl.float8e4nv)
            tma_out = FW.tma_store_fits(128, stages, dtype) and not accumulate
            out_desc = ("tensordesc<bf16[64, 128],%r>" % FW.gl.NVMMASharedLayout.get_default_for([64, 128],
                                                                                                FW.gl.bfloat16)
                        if tma_out else a_desc)
            check(f"fp8 weight gradient wgmma warp-specialized into {dtype} stages={stages}"
                  + (" TMA store" if tma_out else "") + (" overlapped epilogue" if overlap else "")
                  + (" accumulating" if accumulate else "") + (" b in blocks" if b_blocks else ""),
                  FW._gmm_fp8_wgrad_ws_kernel, ELEMENT[dtype],
                  dict(BLOCK_N=128, STAGES=stages, GROUP_N=8, CONSUMERS=2, QB=F8.Q, TMA_OUT=tma_out, OVERLAP=overlap,
                       ACCUMULATE=accumulate, B_BLOCKS=b_blocks),
                  4, stages,
                  types={"a_desc": a_desc, "b_desc": DESC, "as_ptr": "*fp32", "bs_ptr": "*fp32", "table_ptr": "*i32",
                         "out_desc": out_desc},
                  source=GluonASTSource, options={"maxnreg": FW.WS_TILES[(128, 128)]})
# The multi-tensor AdamW: addresses read from a table and cast to typed pointers.
from megablocks.backend import optim as O
FLOATS = ("decay", "one_minus_beta1", "beta2", "one_minus_beta2", "neg_step_size", "bias_correction2_sqrt", "eps")
for dtype in (torch.bfloat16, torch.float32):
    check(f"adamw multi-tensor params {dtype}", O._adamw_multi_kernel, ELEMENT[dtype],
          dict(SEARCH_STEPS=8, HAS_GRAD_SCALE=True, WRITE_PARAM=True, BLOCK=1024, ALIGNED=True), 4, 3,
          types={"table_ptr": "*i64", "block_start_ptr": "*i32", "grad_scale_ptr": "*fp32",
                 **{name: "fp32" for name in FLOATS}})
json.dump(results, sys.stdout)
"""


_sweep = None


def start_sweep():
    """Starts the compile sweep in a subprocess (once) and returns it. tests/conftest.py calls this
    as soon as the suite is collected, so the sweep (minutes of ptxas on one core) runs beside the
    interpreted tests instead of after them; the test below waits for it."""
    global _sweep
    if _sweep is None:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        _sweep = (subprocess.Popen([sys.executable, "-c", _SCRIPT], stdout=out, stderr=err, text=True, env=env,
                                   cwd=root), out, err)
    return _sweep


def test_kernels_compile_for_sm90_within_shared_memory():
    proc, out, err = start_sweep()
    try:
        returncode = proc.wait(timeout=1500)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    out.seek(0)
    err.seek(0)
    assert returncode == 0, err.read()[-3000:]
    results = json.loads(out.read())
    assert len(results) >= 30
    failed = [r for r in results if "error" in r]
    assert not failed, "\n".join(f"{r['label']}: {r['error']}" for r in failed)
    # A kernel that takes minutes to compile is a hang to its user (the permutation's weight gradient
    # once unrolled 512 copies of its body for hidden sizes below 4): none may take 2 minutes.
    slow = [r for r in results if r["seconds"] > COMPILE_SECONDS_MAX]
    assert not slow, "\n".join(f"{r['label']}: compiled in {r['seconds']:.0f} s" for r in slow)
    too_big = [r for r in results if r["shared"] > HOPPER_SHARED_BYTES]
    assert not too_big, "\n".join(f"{r['label']}: {r['shared']} B > {HOPPER_SHARED_BYTES} B" for r in too_big)
