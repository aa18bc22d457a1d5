"""The FP8 grouped GEMM (`megablocks.ops.fp8`) against our bf16 grouped GEMM on the forward
expert products of the target configs (`common.CONFIGS`), and the quantizers' bandwidth.

    python benchmarks/bench_fp8.py --out DIR        # CUDA: CSV + table
    python benchmarks/bench_fp8.py --smoke          # CPU: tiny shapes, checks only

Per config (T tokens, hidden H, ffn F, E experts, top-k), M = T·k routed rows grouped by a random
router's counts; the two forward products of an expert MLP, `x_MH · w1[e]^T` (H -> F) and
`h_MF · w2[e]^T` (F -> H, w2 in the checkpoints' [E, H, F] layout here), in bf16 (`gmm`, the
'triton' backend) and in FP8 (`gmm_fp8`, operands quantized beforehand: weights once per step,
activations by the layer); `quantize_rows` is timed on the same activations, against the copy
bandwidth measured in the same run. The target: FP8 >= 1.6x bf16 on the mixtral products.

`--serving` (default mixtral, qwen3moe) times `fused_moe` at decode (T = 64) and prefill (T = 4096)
sizes on bf16 experts and on their FP8 block-quantized copy (targets: 1.7x and 1.4x); replayed
from a CUDA graph, also in each mode of `launch.PDL` (`*_graph_pdl{0,1,2}_ms`; 0: every kernel
launched plainly).

`--serving-rounds R` (0 by default) times the `--serving` configs' bf16 and FP8 calls again, each
captured in one CUDA graph and replayed in turn in R rounds (the order alternating from round to
round): the ratio of each round and their median, which drifts of the device's clock between the
two calls' timings move less than one timing of each.

`--decode-variants` times the decode rows again with each of `sweep_fp8.VARIANTS` as the FP8
decode launch (`megablocks.backend.fp8.FP8_DECODE_CONFIGS`), e.g. the `swap_ab` tiles.

`--decode-glu` (none by default) times the FP8 decode with the GLU made and quantized in the up
product's epilogue (`KernelPolicy.fp8_decode_glu_epilogue`; with the rows gathered and quantized
in that kernel too, `fp8_decode_gather_prologue`) against the two launches, interleaved.

`--dmoe-inference` (none by default) times the dMoE layer itself in inference (`torch.no_grad`),
bf16 against FP8 (the FP8 node, with the GLU epilogue, and the composed FP8 ops).

`--cache-bytes` (none by default; any device) weighs the FP8 layer's weight cache after an
inference forward and after a training step, against the expert weights' bf16 bytes.

`--serving-breakdown` (none by default) lists the device time of every kernel of those calls
(torch.profiler), bf16 and FP8.

`--weights` (default mixtral, olmoe) times the weights' block quantization, once per optimizer
step in training: `quantize_blocks(w)` alone, then with the K-major copy the N-major products read
(`transposed=True`: written by the quantizer's own pass) against the same copy made by torch
(`q.transpose(1, 2).contiguous()`) after it, and checks the two copies equal byte for byte.

`--layer-accumulate` (none by default) times the layers as a trainer that accumulates gradients
runs them: `--micro-batches` micro-batches a step (8 by default), each expert weight's gradient
added into an fp32 `main_grad` by the kernels (gradient-accumulation fusion) and, apart, summed
in `.grad` by autograd; the FP8 weights quantized once a step; bf16, FP8, and FP8 with its weight
gradients in FP8 too (`fp8_wgrad_*`, the GLU experts' default).

`--layers` (default mixtral, olmoe) also times the dMoE layer as training runs it (forward, then
`.backward()` into `.grad` that is None at the start of each step; bench_dmoe's method): the grouped
path in bf16 against the same layer with `fp8='blockwise'`, on one router and one set of weights,
its weight gradients unquantized (`fp8_*`) and in FP8 (`fp8_wgrad_*`: the GLU experts' default,
`KernelPolicy.fp8_weight_grad`). The FP8 step's headline quantizes the weights in every step (one
micro-batch per optimizer step, the costliest case); `fp8_cached_ms` is a later micro-batch of
the same step (weights cached); `fp8_wgrad_*` the same FP8 layer with its weight gradients in FP8 too
(`KernelPolicy.fp8_weight_grad`; `fp8_wgrad_other_glu_form_cached_ms`: with the GLU gradient's
operands in the form `fp8_weight_grad_glu_two_passes` does not name, one pass or two;
`fp8_wgrad_other_b_form_cached_ms`: with the b operands in the form `fp8_weight_grad_b_blocks`
does not name, column tiles or 128 x 128 blocks;
`fp8_wgrad_other_epilogue_cached_ms`: with the Gluon weight gradient's other `overlap_epilogue`;
`fp8_wgrad_other_forms_cached_ms`: the other GLU form and the other epilogue),
`w_grad_*rel_rms` the worst expert weight gradient's error
against the bf16 layer's, without and with it. The extra peak memory is bench_dmoe's (peak minus
what was allocated before, less the gradients). `--layer-uncached` (none by default) times the
FP8 step cached and quantizing its weights each step in interleaved rounds of CUDA-event-timed
steps, with the no-grad forward in both states and the caching allocator's counters
(`layer_uncached_rows`). `--b-blocks` (none by default) times the weight gradients' b operands
made in 128 x 128 blocks by their quantizing pass against column tiles coarsened after.
"""

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import time
from typing import List

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gmm import routed_counts  # noqa: E402
from common import CONFIGS, copy_bandwidth_gbs, environment, graphed, print_table, timed, write_csv  # noqa: E402

import bench_dmoe  # noqa: E402

from megablocks.backend import fp8 as fp8_backend  # noqa: E402
from megablocks.backend import gmm as gb  # noqa: E402
from megablocks.backend import launch  # noqa: E402
from megablocks.integrations.inference import fused_moe  # noqa: E402
from megablocks.ops import fp8  # noqa: E402


def products(T, H, F, E, k, device):
    """(name, x_MK bf16, w_ENK bf16, batch_sizes) of the two forward products."""
    M = T * k
    bs = routed_counts(M, E, device)
    torch.manual_seed(0)
    x = torch.randn(M, H, dtype=torch.bfloat16, device=device)
    h = torch.randn(M, F, dtype=torch.bfloat16, device=device)
    w1 = (torch.randn(E, F, H, device=device) / H**0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, H, F, device=device) / F**0.5).to(torch.bfloat16)
    return [("up", x, w1, bs), ("down", h, w2, bs)]


def _report(out, name, rows, columns, env):
    """Print `rows`' `columns` and write the rows, each with `env`, to out/name (nothing without rows)."""
    if rows:
        print_table(rows, columns)
        write_csv(os.path.join(out, name), [{**r, **env} for r in rows])


def bench(args):
    if args.tile_gain is not None:
        fp8_backend._GLUON_TILE_GAIN = args.tile_gain
    env = {**environment(), "tile_gain": fp8_backend._GLUON_TILE_GAIN}
    bw = copy_bandwidth_gbs(1 << 30)
    rows = []
    for name in args.configs:
        T, H, F, E, k = CONFIGS[name]
        for proj, x, w, bs in products(T, H, F, E, k, "cuda"):
            M, K = x.shape
            N = w.shape[1]
            x_q, x_s = fp8.quantize_rows(x)
            w_q, w_s = fp8.quantize_blocks(w)
            ms_bf16 = timed(lambda: gb.gmm(x, w, bs, trans_b=True, backend="triton"))[0]
            ms_fp8 = timed(lambda: fp8.gmm_fp8(x_q, x_s, w_q, w_s, bs))[0]
            ms_q = timed(lambda: fp8.quantize_rows(x))[0]
            ref = gb.gmm(x, w, bs, trans_b=True, backend="triton").float()
            out = fp8.gmm_fp8(x_q, x_s, w_q, w_s, bs).float()
            flops = 2 * M * K * N
            rows.append(dict(
                config=name, product=proj, M=M, K=K, N=N, block_m=fp8_backend.gmm_fp8_launch(M, E).get("block_m"),
                bf16_ms=ms_bf16, fp8_ms=ms_fp8,
                speedup=ms_bf16 / ms_fp8, bf16_tflops=flops / ms_bf16 / 1e9, fp8_tflops=flops / ms_fp8 / 1e9,
                quantize_ms=ms_q, quantize_gbs=(M * K * 2 + M * K + M * K // 32) / ms_q / 1e6, copy_gbs=bw,
                rel_rms_vs_bf16=((out - ref).norm() / ref.norm()).item(), **env,
            ))
        # The weight gradient's launches: the default (the Gluon form on sm_90), the same with
        # masked stores instead of its TMA store, the Triton K-major kernel (the row-major
        # first kernel: `k_major=False`, 5.8x slower), and the Gluon form storing each tile while
        # the next tile's first product runs (`overlap_epilogue`).
        for variant, config in (("", None), ("_stores", dict(tma_store=False)), ("_triton", dict(wgmma=False)),
                                ("_overlap", dict(overlap_epilogue=True))):
            rows.append(wgrad_row(name, T * k, H, F, E, env, bw, config=config, variant=variant))
        # x's column tiles coarsened to 128 x 128 blocks (`cols_to_blocks_`): one scale a row.
        rows.append(wgrad_row(name, T * k, H, F, E, env, bw, variant="_b_blocks", b_blocks=True))
    os.makedirs(args.out, exist_ok=True)
    if rows:  # none with an empty --configs
        print_table(rows, ["config", "product", "M", "K", "N", "block_m", "bf16_ms", "fp8_ms", "speedup", "fp8_tflops",
                           "product_ms", "quantize_ms", "quantize_gbs", "copy_gbs", "rel_rms_vs_bf16"])
        write_csv(os.path.join(args.out, "bench_fp8.csv"), rows)
    gq_rows = [row for name in args.gather_quantize for row in gather_quantize_rows_forms(name)]
    _report(args.out, "bench_fp8_gather_quantize.csv", gq_rows,
            ["config", "mode", "block_t", "num_warps", "ms", "gbs", "same_bytes"], env)
    glu_rows = [row for name in args.glu_quantize for row in glu_quantize_rows_forms(name)]
    _report(args.out, "bench_fp8_glu_quantize.csv", glu_rows,
            ["config", "M", "mode", "block_m", "num_warps", "ms", "gbs", "same_bytes"], env)
    glub_rows = [row for name in args.glu_backward_quantize for row in glu_backward_quantize_forms(name)]
    _report(args.out, "bench_fp8_glu_backward_quantize.csv", glub_rows,
            ["config", "M", "form", "block_m", "num_warps", "ms", "gbs", "same_bytes"], env)
    gain_rows = [row for name in args.tile_gains_configs for row in tile_gain_rows(name, args.tile_gains)]
    _report(args.out, "bench_fp8_tile_gain.csv", gain_rows,
            ["config", "what", "M", "repeat", "gain", "block_m", "ms"], env)
    round_rows = [row for name in args.rounding for row in rounding_rows(name)]
    _report(args.out, "bench_fp8_rounding.csv", round_rows,
            ["config", "op", "M", "integer_ms", "cast_ms", "speedup", "same_bits"], env)
    serve_rows = [serving_row(name, T, "cuda") for name in args.serving for T in (64, 4096)]
    serve_rows += decode_variant_rows(args.serving, args.decode_variants)
    _report(args.out, "bench_fp8_serving.csv", serve_rows,
            ["config", "T", "decode_variant", "bf16_ms", "fp8_ms", "speedup", "bf16_graph_ms", "fp8_graph_ms",
             "speedup_graph", "speedup_graph_no_pdl", "fp8_weight_gbs", "copy_gbs", "rel_rms_vs_bf16"],
            {**env, "copy_gbs": bw})
    round_rows = [row for name in args.serving for T in (64, 4096)
                  for row in serving_rounds_rows(name, T, args.serving_rounds)] if args.serving_rounds else []
    _report(args.out, "bench_fp8_serving_rounds.csv", round_rows,
            ["config", "T", "round", "bf16_graph_ms", "fp8_graph_ms", "speedup_graph"], env)
    dglu_rows = [row for name in args.decode_glu for row in decode_glu_rows(name)]
    _report(args.out, "bench_fp8_decode_glu.csv", dglu_rows,
            ["config", "T", "repeat", "pdl", "stages", "bf16_ms", "epilogue_ms", "two_launches_ms", "prologue_ms",
             "speedup_epilogue", "speedup_prologue", "fits", "same_output", "same_output_prologue"], env)
    inference_rows = [row for name in args.dmoe_inference for row in dmoe_inference_rows(name)]
    _report(args.out, "bench_fp8_dmoe_inference.csv", inference_rows,
            ["config", "T", "form", "eager_ms", "graph_ms", "speedup_eager", "speedup_graph", "rel_rms_vs_bf16"], env)
    cache_bytes(args, "cuda", env)
    kernel_rows = [row for name in args.serving_breakdown for T in (64, 4096) for row in serving_kernels(name, T)]
    _report(args.out, "bench_fp8_serving_kernels.csv", kernel_rows, ["config", "T", "experts", "kernel", "us"], env)
    weight_rows = [weights_row(name, proj, w) for name in args.weights
                   for proj, _, w, _ in products(*CONFIGS[name], "cuda")]
    _report(args.out, "bench_fp8_weights.csv", weight_rows,
            ["config", "weight", "E", "N", "K", "quantize_ms", "torch_copy_ms", "one_pass_ms", "one_pass_gbs",
             "copies_equal"], {**env, "copy_gbs": bw})
    col_rows = [r for name in args.cols for r in cols_rows(name, args.cols_variants)]
    _report(args.out, "bench_fp8_cols.csv", col_rows, ["config", "op", "variant", "ms", "gbs"],
            {**env, "copy_gbs": bw})
    if args.cols_pick and col_rows:  # each mode's fastest variant over the configs, for the runs below
        for op, mode in COLS_OPS.items():
            total = {v: sum(r["ms"] for r in col_rows if r["op"] == op and r["variant"] == v) for v in args.cols_variants}
            best = min(total, key=total.get)
            fp8_backend.COLS_FUSED_LAUNCH[mode] = dict(COLS_VARIANTS[best])
            print(f"cols-pick: {mode} <- {best} ({total[best]:.3f} ms over {args.cols})")
    layer_rows = [layer_step(name, "cuda") for name in args.layers]
    _report(args.out, "bench_fp8_layer.csv", layer_rows,
            ["config", "bf16_ms", "fp8_ms", "speedup", "fp8_cached_ms", "speedup_cached", "fp8_wgrad_ms",
             "speedup_wgrad", "fp8_wgrad_cached_ms", "speedup_wgrad_cached", "fp8_wgrad_other_glu_form_cached_ms",
             "fp8_wgrad_other_b_form_cached_ms", "fp8_wgrad_other_epilogue_cached_ms",
             "fp8_wgrad_other_forms_cached_ms", "fp8_composed_cached_ms", "fp8_gathered_cached_ms", "bf16_extra_gib",
             "fp8_extra_gib", "fp8_gathered_extra_gib", "fp8_wgrad_extra_gib", "fp8_composed_extra_gib", "out_rel_rms",
             "x_grad_rel_rms", "w_grad_rel_rms", "w_grad_fp8_rel_rms"], env)
    accumulate_rows = [layer_accumulate_row(name, "cuda", args.micro_batches) for name in args.layer_accumulate]
    _report(args.out, "bench_fp8_layer_accumulate.csv", accumulate_rows,
            ["config", "micro_batches", "bf16_fused_ms", "fp8_fused_ms", "speedup_fused", "fp8_wgrad_fused_ms",
             "speedup_wgrad_fused", "bf16_grad_ms", "fp8_grad_ms", "speedup_grad", "fp8_wgrad_grad_ms",
             "speedup_wgrad_grad", "bf16_fusion_gain", "fp8_fusion_gain", "fp8_wgrad_fusion_gain",
             "w_grad_rel_rms_fused", "w_grad_fp8_rel_rms_fused", "fp8_wgrad_fused_vs_grad_rel_rms"], env)
    b_rows = [r for name in args.b_blocks for r in b_blocks_rows(name)]
    _report(args.out, "bench_fp8_b_blocks.csv", b_rows, ["config", "op", "form", "ms", "same_scales"], env)
    uncached_rows = [r for name in args.layer_uncached for r in layer_uncached_rows(name)]
    _report(args.out, "bench_fp8_layer_uncached.csv", uncached_rows,
            ["config", "form", "ms", "min_ms", "max_ms", "steps", *_ALLOC_KEYS], env)
    memory_rows = [r for name in args.layer_memory for r in layer_memory(name)]
    _report(args.out, "bench_fp8_layer_memory.csv", memory_rows, ["config", "layer", "site", "mib", "tensors"], env)
    kernel_rows = [r for name in args.layer_breakdown for r in layer_kernels(name)]
    _report(args.out, "bench_fp8_layer_kernels.csv", kernel_rows, ["config", "layer", "kernel", "us"], env)


PDL_MODES = (0, 1, 2)


def graph_ms_by_pdl(*calls, rep=100):
    """{mode: (ms of each call)}: each call captured in a CUDA graph and replayed
    (`bench_dmoe.graph_time_ms`) under each mode of `launch.PDL` (restored after)."""
    saved, out = launch.PDL, {}
    try:
        for mode in PDL_MODES:
            launch.PDL = mode
            out[mode] = tuple(bench_dmoe.graph_time_ms(call, rep) for call in calls)
    finally:
        launch.PDL = saved
    return out


def tile_gain_rows(name, gains, repeats=3, T=4096):
    """Rows (config, what, M, repeat, gain, block_m, ms): the Gluon form's row-tile choice
    (`backend.fp8._GLUON_TILE_GAIN`, the first gain of `gains` the default's) at config `name`,
    each gain in turn within each of `repeats` rounds (one process, the same inputs): the two
    forward products at the training size (M = T_train * top_k rows), and `fused_moe` on the FP8
    experts at T tokens replayed from a CUDA graph in each programmatic-dependent-launch mode
    (captured under the gain, so the graph holds its tiles)."""
    T_train, H, F, E, k = CONFIGS[name]
    x, w1, w2, gating, q1, s1, q2, s2 = serving_inputs(H, F, E, T, "cuda", torch.bfloat16)
    call = lambda: fused_moe(x, q1, q2, gating, k, True, w1_scale=s1, w2_scale=s2)  # noqa: E731
    quantized = [(proj, *fp8.quantize_rows(xp), *fp8.quantize_blocks(w), bs)
                 for proj, xp, w, bs in products(T_train, H, F, E, k, "cuda")]
    saved, rows = fp8_backend._GLUON_TILE_GAIN, []
    try:
        for repeat in range(repeats):
            for gain in gains:
                fp8_backend._GLUON_TILE_GAIN = gain
                for proj, x_q, x_s, w_q, w_s, bs in quantized:
                    M = x_q.shape[0]
                    rows.append(dict(config=name, what=f"{proj} product", M=M, repeat=repeat, gain=gain,
                                     block_m=fp8_backend.gmm_fp8_launch(M, w_q.shape[0])["block_m"],
                                     ms=timed(lambda: fp8.gmm_fp8(x_q, x_s, w_q, w_s, bs))[0]))
                for mode, (ms,) in graph_ms_by_pdl(call).items():
                    rows.append(dict(config=name, what=f"fused_moe T={T} pdl{mode}", M=T * k, repeat=repeat, gain=gain,
                                     block_m=fp8_backend.gmm_fp8_launch(T * k, E)["block_m"], ms=ms))
    finally:
        fp8_backend._GLUON_TILE_GAIN = saved
    return rows


def weights_row(name, proj, w):
    """One weight's block quantization (ms): alone, then with its K-major copy by torch after it
    and written by the quantizer's pass; `one_pass_gbs` the bytes that pass moves (w read, q and
    its copy written) over its time."""
    def torch_copy():
        q, s = fp8.quantize_blocks(w)
        return q, s, q.transpose(1, 2).contiguous()

    ms_q = timed(lambda: fp8.quantize_blocks(w))[0]
    ms_torch = timed(torch_copy)[0]
    ms_one = timed(lambda: fp8.quantize_blocks(w, transposed=True))[0]
    a, b = torch_copy(), fp8.quantize_blocks(w, transposed=True)
    equal = all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in ((a[0], b[0]), (a[2], b[2])))
    E, N, K = w.shape
    return dict(config=name, weight=proj, E=E, N=N, K=K, quantize_ms=ms_q, torch_copy_ms=ms_torch, one_pass_ms=ms_one,
                one_pass_gbs=w.numel() * (w.element_size() + 2) / ms_one / 1e6, copies_equal=equal)


def wgrad_row(name, M, H, F, E, env, bw, k_major=True, config=None, variant="", b_blocks=False):
    """The up projection's weight gradient dW[e] = g[e]^T x[e] ([E, F, H], reduction over each
    expert's M_e rows): bf16 variable-K grouped GEMM against the FP8 one; `fp8_ms` includes the
    two column quantizations (`quantize_ms` of them), as the backward runs them. `k_major`: the
    operands quantized into the transposed layout (`fp8_gmm`'s), else row-major (the first kernel);
    `config`: `gmm_fp8_wgrad`'s launch (transposed layout), `variant` its label; `b_blocks`: x
    quantized in 128 x 128 blocks (`quantize_cols_grouped(..., blocks=True)`, as `fp8_gmm`'s
    backward makes it)."""
    bs = routed_counts(M, E, "cuda")
    torch.manual_seed(0)
    g = torch.randn(M, F, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(M, H, dtype=torch.bfloat16, device="cuda")
    rows = M if k_major else None

    def quantize():
        g_c = fp8.quantize_cols_grouped(g, bs, transposed=k_major)
        return g_c, fp8.quantize_cols_grouped(x, bs, transposed=k_major, blocks=b_blocks)

    def fp8_wgrad():
        (gq, gs), (xq, xs) = quantize()
        return fp8.gmm_fp8_wgrad(gq, gs, xq, xs, bs, out_dtype=torch.bfloat16, rows=rows, config=config)

    ms_bf16 = timed(lambda: gb.gmm(g, x, bs, trans_a=True, backend="triton"))[0]
    ms_fp8 = timed(fp8_wgrad)[0]
    ms_q = timed(quantize)[0]
    (gq, gs), (xq, xs) = quantize()
    ms_product = timed(lambda: fp8.gmm_fp8_wgrad(gq, gs, xq, xs, bs, out_dtype=torch.bfloat16, rows=rows,
                                                 config=config))[0]
    ref = gb.gmm(g, x, bs, trans_a=True, backend="triton").float()
    out = fp8_wgrad().float()
    flops = 2 * M * H * F
    return dict(config=name, product="wgrad_up" + ("_k_major" if k_major else "") + variant, M=M, K=H, N=F,
                bf16_ms=ms_bf16, fp8_ms=ms_fp8, speedup=ms_bf16 / ms_fp8, bf16_tflops=flops / ms_bf16 / 1e9,
                fp8_tflops=flops / ms_fp8 / 1e9, product_ms=ms_product, product_tflops=flops / ms_product / 1e9,
                quantize_ms=ms_q, quantize_gbs=(M * (F + H) * 3) / ms_q / 1e6, copy_gbs=bw,
                rel_rms_vs_bf16=((out - ref).norm() / ref.norm()).item(), **env)


COLS_VARIANTS = {**{f"pieces{c}_w{w}": dict(ch=c, bk=128, num_warps=w, num_stages=1)
                    for c, w in ((32, 4), (32, 8), (64, 8))},
                 **{f"whole_bk{bk}_w{w}": dict(ch=128, bk=bk, num_warps=w, num_stages=1)
                    for bk, w in ((128, 8), (128, 4), (64, 4), (32, 4), (32, 2))}}


COLS_OPS = {"quantize_rows_and_cols": "rows", "gather_quantize_cols": "gather", "glu_quantize_cols": "glu",
            "glu_backward_quantize_rows_cols": "glu_backward"}


def cols_rows(name, variants):
    """The FP8 weight gradient's fused operand quantizers (`backend.fp8._quantize_cols_fused_kernel`)
    on config `name`'s rows, each launch variant of `COLS_VARIANTS` (`COLS_FUSED_LAUNCH`): ms and
    GB/s (bytes read once and written) against the copy bandwidth; `quantize_cols_grouped`
    (standalone, transposed) on the same [N, F] rows beside them."""
    T, H, F, E, k = CONFIGS[name]
    N = T * k
    bs = routed_counts(N, E, "cuda")
    torch.manual_seed(0)
    b2 = torch.bfloat16
    x_T = torch.randn(T, H, dtype=b2, device="cuda")
    assignment = torch.randperm(N, device="cuda").to(torch.int32)
    h = torch.randn(N, 2 * F, dtype=b2, device="cuda")
    g_N = torch.randn(N, F, dtype=b2, device="cuda")
    gy = torch.randn(N, H, dtype=b2, device="cuda")
    ops = {  # name: (call, bytes)
        "glu_quantize_cols": (lambda: fp8.glu_quantize_cols(h[:, :F], h[:, F:], "silu", bs), N * F * (4 + 1)),
        "quantize_rows_and_cols": (lambda: fp8.quantize_rows_and_cols(gy, bs), N * H * (2 + 2)),
        "glu_backward_quantize_rows_cols": (lambda: fp8.glu_backward_quantize_rows_cols(g_N, h[:, :F], h[:, F:], "silu",
                                                                                        bs), N * F * (6 + 4)),
        "gather_quantize_cols": (lambda: fp8.gather_quantize_cols(x_T, assignment, k, bs), N * H * (2 + 1)),
        "quantize_cols_grouped": (lambda: fp8.quantize_cols_grouped(g_N, bs, transposed=True), N * F * 3),
        # The GLU gradient's operands in two passes (`fp8_weight_grad_glu_two_passes`): the gradients
        # written over h with their row tiles, then h's column tiles (h's values change from call to
        # call: an elementwise pass's time does not depend on them).
        "glu_backward_two_passes": (lambda: (fp8.glu_backward_quantize_rows_(g_N, h[:, :F], h[:, F:], "silu"),
                                             fp8.quantize_cols_grouped(h, bs, transposed=True)), N * F * (12 + 6)),
    }
    saved = {mode: dict(launch) for mode, launch in fp8_backend.COLS_FUSED_LAUNCH.items()}
    rows = []
    try:
        for variant in variants:  # every mode (those with row tiles keep 128 columns a program)
            for launch in fp8_backend.COLS_FUSED_LAUNCH.values():
                launch.update(COLS_VARIANTS[variant])
            for op, (call, nbytes) in ops.items():
                if op in ("quantize_cols_grouped", "glu_backward_two_passes") and variant != variants[0]:
                    continue
                ms = timed(call)[0]
                rows.append(dict(config=name, op=op, variant=variant, ms=ms, gbs=nbytes / ms / 1e6))
    finally:
        fp8_backend.COLS_FUSED_LAUNCH.clear()
        fp8_backend.COLS_FUSED_LAUNCH.update(saved)
    return rows


# `backend.fp8.COLS_BLOCKS_LAUNCH` forms timed by `b_blocks_rows` (rows a piece, warps).
B_BLOCKS_FORMS = {"whole_w4": dict(ch=128, num_warps=4), "whole_w8": dict(ch=128, num_warps=8),
                  "pieces32_w4": dict(ch=32, num_warps=4), "pieces64_w4": dict(ch=64, num_warps=4)}


def b_blocks_rows(name, forms=tuple(B_BLOCKS_FORMS)):
    """The FP8 weight gradients' b operands (the token rows through the maps, the output
    gradient; and the output gradient as the composed ops quantize it, without row tiles) on
    config `name`'s rows, in 128 x 128 blocks: quantized in column tiles and
    coarsened after (`cols_to_blocks_`, a second pass over b) against made in blocks by the
    quantizing pass (`blocks=True`) at each of `forms` (`B_BLOCKS_FORMS`); ms, and whether each
    form's scales are those of the two passes."""
    T, H, F, E, k = CONFIGS[name]
    N = T * k
    bs = routed_counts(N, E, "cuda")
    torch.manual_seed(0)
    x_T = torch.randn(T, H, dtype=torch.bfloat16, device="cuda")
    assignment = torch.randperm(N, device="cuda").to(torch.int32)
    gy = torch.randn(N, H, dtype=torch.bfloat16, device="cuda")

    def two_passes(make):
        q, s = make()
        return q, fp8.cols_to_blocks_(q, s, bs, N)

    ops = {"gather_quantize_cols": lambda **kw: fp8.gather_quantize_cols(x_T, assignment, k, bs, **kw),
           "quantize_rows_and_cols": lambda **kw: fp8.quantize_rows_and_cols(gy, bs, **kw)[1],
           "quantize_cols_grouped": lambda **kw: fp8.quantize_cols_grouped(gy, bs, transposed=True, **kw)}
    saved = {mode: dict(launch) for mode, launch in fp8_backend.COLS_BLOCKS_LAUNCH.items()}
    rows = []
    try:
        for op, make in ops.items():
            ref = two_passes(make)
            rows.append(dict(config=name, op=op, form="column_tiles_then_blocks",
                             ms=timed(lambda: two_passes(make))[0], same_scales=True))
            for form in forms:
                for launch in fp8_backend.COLS_BLOCKS_LAUNCH.values():
                    launch.update(B_BLOCKS_FORMS[form])
                got = make(blocks=True)
                blocks = int(bs.clamp(min=0).add(127).div(128, rounding_mode="floor").sum())
                same = torch.equal(got[1][:blocks].nan_to_num(), ref[1][:blocks].nan_to_num())
                rows.append(dict(config=name, op=op, form=form, ms=timed(lambda: make(blocks=True))[0],
                                 same_scales=same))
    finally:
        for mode, launch in saved.items():
            fp8_backend.COLS_BLOCKS_LAUNCH[mode] = launch
    return rows


def _same_bytes(got, ref) -> bool:
    """Whether two sequences of outputs are equal bit for bit (e4m3 as bytes; NaN where NaN)."""
    as_bits = lambda t: t.view(torch.uint8) if t.dtype == fp8_backend.FP8_DTYPE else t.nan_to_num()  # noqa: E731
    return all(torch.equal(as_bits(a), as_bits(b)) for a, b in zip(got, ref))


def _launch_form_rows(table, calls, forms, size_key, base):
    """Rows (base, mode, size_key, num_warps, ms, gbs, same_bytes): each mode's call (`calls`:
    mode -> (call, bytes moved)) under each launch form (size, warps) of the launch table `table`
    (restored after), its outputs checked bit for bit against the mode's default launch's."""
    saved = {mode: dict(v) for mode, v in table.items()}
    rows = []
    try:
        for mode, (call, nbytes) in calls.items():
            ref = [t.clone() for t in call()]
            for size, warps in forms:
                table[mode] = {size_key: size, "num_warps": warps}
                same = _same_bytes(call(), ref)
                ms = timed(call)[0]
                rows.append(dict(base, mode=mode, **{size_key: size}, num_warps=warps, ms=ms, gbs=nbytes / ms / 1e6,
                                 same_bytes=same))
            table[mode] = saved[mode]
    finally:
        table.update(saved)
    return rows


def glu_quantize_rows_forms(name, forms=((16, 4), (32, 4), (32, 8), (64, 4), (64, 8), (128, 8))):
    """Rows (config, M, mode, block_m, num_warps, ms, gbs, same_bytes): `glu_quantize_rows` on the
    two halves of an [M, 2F] up-projection output at config `name`'s prefill (T = 4096) and
    training sizes (M = T * top_k rows), in each launch form (`GLU_QUANTIZE_LAUNCH`; `same_bytes`
    as the default launch's), quantizing only (plain) and with the 16-bit product written too
    (product); gbs counts both halves read and every output written once."""
    T_train, _, F, _, k = CONFIGS[name]
    rows = []
    for M in (4096 * k, T_train * k):
        h = torch.randn(M, 2 * F, device="cuda", dtype=torch.bfloat16)
        h1, h2 = h[:, :F], h[:, F:]
        scales = M * -(-F // fp8_backend.Q) * 4
        calls = {"plain": (lambda: fp8.glu_quantize_rows(h1, h2, "silu"), M * F * 5 + scales),
                 "product": (lambda: fp8.glu_quantize_rows(h1, h2, "silu", return_product=True), M * F * 7 + scales)}
        rows += _launch_form_rows(fp8_backend.GLU_QUANTIZE_LAUNCH, calls, forms, "block_m", dict(config=name, M=M))
        del h, h1, h2
    return rows


def glu_backward_quantize_forms(name, forms=((8, 2), (16, 2), (16, 4), (32, 4), (32, 8), (64, 4), (64, 8))):
    """Rows (config, M, form, block_m, num_warps, ms, gbs, same_bytes): `glu_backward_quantize_rows_`
    on the halves of an [M, 2F] up-projection output at config `name`'s training size (M = T * top_k
    rows) in each launch form (`GLU_BACKWARD_QUANTIZE_LAUNCH`; `same_bytes`: the gradients and
    their quantized tiles as the default launch's), and bf16's `glu_backward` (its two gradients
    written over h1 and h2, not quantized) on the same halves made contiguous; gbs counts grad,
    h1 and h2 read and every output written once. The call writes over h1 and h2, so each form is
    checked on fresh copies and then timed on values that change from call to call (an elementwise
    pass's time does not depend on them)."""
    from megablocks.backend.activation import glu_backward

    T, _, F, _, k = CONFIGS[name]
    M = T * k
    h = torch.randn(M, 2 * F, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(M, F, device="cuda", dtype=torch.bfloat16)
    nbytes = M * F * (3 * 2 + 2 * 2 + 2) + 2 * M * -(-F // fp8_backend.Q) * 4
    table = fp8_backend.GLU_BACKWARD_QUANTIZE_LAUNCH
    saved = dict(table)

    def run(h_):
        (q1, s1), (q2, s2) = fp8.glu_backward_quantize_rows_(g, h_[:, :F], h_[:, F:], "silu")
        return [h_, q1, s1, q2, s2]

    rows = []
    try:
        ref = run(h.clone())
        for block_m, warps in forms:
            table.update(block_m=block_m, num_warps=warps)
            same = _same_bytes(run(h.clone()), ref)
            work = h.clone()
            ms = timed(lambda: run(work))[0]
            rows.append(dict(config=name, M=M, form="fp8", block_m=block_m, num_warps=warps, ms=ms,
                             gbs=nbytes / ms / 1e6, same_bytes=same))
    finally:
        table.clear()
        table.update(saved)
    h1, h2 = h[:, :F].contiguous(), h[:, F:].contiguous()
    ms = timed(lambda: glu_backward(g, h1, h2, "silu", in_place=True))[0]
    rows.append(dict(config=name, M=M, form="bf16 glu_backward", ms=ms, gbs=M * F * 10 / ms / 1e6))
    return rows


def rounding_rows(name):
    """Rows (config, op, M, integer_ms, cast_ms, speedup, same_bits): the row quantizers at config
    `name`'s training size (M = T * top_k rows) rounding by `_round_e4m3`'s integer arithmetic
    against the hardware's e4m3 cast (`fp8_backend._hardware_cast` patched), the same inputs."""
    T, H, F, _, k = CONFIGS[name]
    M = T * k
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    rows = torch.randperm(M, device="cuda").to(torch.int32)
    w = torch.rand(M, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(M, 2 * F, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(M, F, device="cuda", dtype=torch.bfloat16)
    h1, h2 = h[:, :F], h[:, F:]
    ops = {"quantize_rows": lambda: fp8.quantize_rows(g),
           "gather_quantize_rows": lambda: fp8.gather_quantize_rows(x, rows, k),
           "gather_quantize_rows weighted": lambda: fp8.gather_quantize_rows(x, rows, k, w, return_rows=True),
           "glu_quantize_rows": lambda: fp8.glu_quantize_rows(h1, h2, "silu"),
           "glu_quantize_rows product": lambda: fp8.glu_quantize_rows(h1, h2, "silu", return_product=True),
           "glu_backward_quantize_rows_": lambda: fp8.glu_backward_quantize_rows_(g, h1.clone(), h2.clone(), "silu")}
    out = []
    saved = fp8_backend._hardware_cast
    try:
        for op, fn in ops.items():
            res, ms = {}, {}
            for cast in (False, True):
                fp8_backend._hardware_cast = saved if cast else (lambda t: False)
                res[cast] = fn()
                ms[cast] = timed(fn)[0]
            flat = lambda r: [t for t in (r if isinstance(r[0], tuple) else (r,)) for t in t]  # noqa: E731
            same = all(torch.equal(a.view(torch.uint8) if a.dtype == fp8.FP8_DTYPE else a.nan_to_num(),
                                   b.view(torch.uint8) if b.dtype == fp8.FP8_DTYPE else b.nan_to_num())
                       for a, b in zip(flat(res[False]), flat(res[True])))
            out.append(dict(config=name, op=op, M=M, integer_ms=ms[False], cast_ms=ms[True],
                            speedup=ms[False] / ms[True], same_bits=same))
    finally:
        fp8_backend._hardware_cast = saved
    return out


def gather_quantize_rows_forms(name, forms=((8, 2), (8, 4), (16, 4), (16, 8), (32, 4), (32, 8), (64, 4), (64, 8))):
    """Rows (config, mode, block_t, num_warps, ms, gbs): `gather_quantize_rows` at config `name`'s
    training size (T tokens, hidden H, top-k) in each launch form (`GATHER_QUANTIZE_LAUNCH`;
    `same_bytes` as the default launch's), as
    the forward runs it (plain) and as the combine's backward does (weighted, the 16-bit rows
    written too), and the two passes the weighted form replaces (the weighted gather, then
    `quantize_rows`); gbs counts each token row read once and every row written."""
    from megablocks.ops.permute import _gather_rows, route
    from megablocks.ops.routing import routing_metadata

    T, H, _, E, k = CONFIGS[name]
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    meta = routing_metadata(torch.randint(0, E, (T, k), device="cuda"), E, 1)
    maps = route(meta.indices, meta.bin_ids, meta.bins, k)
    w = torch.rand(T * k, device="cuda")
    calls = {
        "plain": (lambda: fp8.gather_quantize_rows(x, maps.assignment_row, k), T * H * 2 + T * k * H),
        "weighted": (lambda: fp8.gather_quantize_rows(x, maps.assignment_row, k, w, return_rows=True),
                     T * H * 2 + T * k * H * 3),
    }
    rows = _launch_form_rows(fp8_backend.GATHER_QUANTIZE_LAUNCH, calls, forms, "block_t", dict(config=name))
    apart = lambda: fp8.quantize_rows(_gather_rows(x, maps.row_assignment, maps.assignment_row, w, k))  # noqa: E731
    ms = timed(apart)[0]
    rows.append(dict(config=name, mode="weighted gather, then quantize_rows", ms=ms,
                     gbs=(T * H * 2 + T * k * H * 3) / ms / 1e6))
    return rows


def decode_variant_rows(names, variants):
    """`serving_row` at T = 64 again with each of sweep_fp8's `variants` as the only decode launch
    (`FP8_DECODE_CONFIGS`), which is restored afterwards."""
    from sweep_fp8 import VARIANTS

    saved = list(fp8_backend.FP8_DECODE_CONFIGS)
    bound = saved[-1][0]
    rows = []
    try:
        for variant in variants:
            fp8_backend.FP8_DECODE_CONFIGS[:] = [(bound, {k: v for k, v in VARIANTS[variant].items() if k != "xs_t"})]
            rows += [{**serving_row(name, 64, "cuda"), "decode_variant": variant} for name in names]
    finally:
        fp8_backend.FP8_DECODE_CONFIGS[:] = saved
    return rows


def decode_glu_rows(name, repeats=3, T=64, device="cuda", shape=None, stages=(2, 3, 4)):
    """Rows (config, T, repeat, pdl, stages, bf16_ms, epilogue_ms, two_launches_ms, prologue_ms,
    same_output, same_output_prologue): `fused_moe` at T tokens of config `name` on FP8 experts
    with the GLU made and quantized in the up product's epilogue (`KernelPolicy.fp8_decode_glu_epilogue`;
    its kernel at each of `stages` pipeline stages, `fp8.GLU_DECODE_STAGES`), without (the product,
    then `glu_quantize_rows`), and with the rows gathered and quantized in that kernel too
    (`fp8_decode_gather_prologue`), against bf16 experts; replayed from CUDA graphs in each PDL
    mode, the forms interleaved `repeats` times (off CUDA: the outputs only, times nan)."""
    from megablocks.policy import KernelPolicy

    _, H, F, E, k = shape or CONFIGS[name]
    x, w1, w2, gating, q1, s1, q2, s2 = serving_inputs(H, F, E, T, device,
                                                       torch.bfloat16 if device == "cuda" else torch.float32)
    epilogue, off = KernelPolicy(fp8_decode_glu_epilogue=True), KernelPolicy(fp8_decode_glu_epilogue=False)
    prologue = KernelPolicy(fp8_decode_glu_epilogue=True, fp8_decode_gather_prologue=True)
    bf16 = lambda: fused_moe(x, w1, w2, gating, k, True)  # noqa: E731
    on = lambda: fused_moe(x, q1, q2, gating, k, True, w1_scale=s1, w2_scale=s2, policy=epilogue)  # noqa: E731
    two = lambda: fused_moe(x, q1, q2, gating, k, True, w1_scale=s1, w2_scale=s2, policy=off)  # noqa: E731
    pro = lambda: fused_moe(x, q1, q2, gating, k, True, w1_scale=s1, w2_scale=s2, policy=prologue)  # noqa: E731
    saved, rows = fp8_backend.GLU_DECODE_STAGES, []
    try:
        for repeat in range(repeats):
            for n in stages:
                fp8_backend.GLU_DECODE_STAGES = n
                first = on()
                same, same_prologue = torch.equal(first, two()), torch.equal(first, pro())
                modes = graph_ms_by_pdl(bf16, on, two, pro) if device == "cuda" else {0: (float("nan"),) * 4}
                for mode, (ms_bf16, ms_on, ms_two, ms_pro) in modes.items():
                    rows.append(dict(config=name, T=T, repeat=repeat, pdl=mode, stages=n, bf16_ms=ms_bf16,
                                     epilogue_ms=ms_on, two_launches_ms=ms_two, prologue_ms=ms_pro,
                                     speedup_epilogue=ms_bf16 / ms_on, speedup_two_launches=ms_bf16 / ms_two,
                                     speedup_prologue=ms_bf16 / ms_pro,
                                     fits=fp8_backend.glu_decode_fits(T * k, E, 2 * F), same_output=same,
                                     same_output_prologue=same_prologue))
    finally:
        fp8_backend.GLU_DECODE_STAGES = saved
    return rows


def dmoe_inference_rows(name, tokens=(64, 4096), device="cuda"):
    """Rows (config, T, form, eager_ms, graph_ms, speedup_eager, speedup_graph, rel_rms_vs_bf16,
    experts_mib, fp8_cache_mib): bench_dmoe's layer `name` in inference (`torch.no_grad`), bf16 (its
    inference form) against the same layer with fp8='blockwise': the FP8 node ('fp8'), the node
    with the GLU in the up product's epilogue at decode sizes (`KernelPolicy.fp8_decode_glu_epilogue`,
    'fp8_epilogue'), and the composed FP8 ops (one_node_experts off, 'fp8_composed'); eager and
    replayed from a CUDA graph (off CUDA: the outputs only, in fp32, times nan). experts_mib: the
    expert parameters' bytes; fp8_cache_mib: what the FP8 weight cache holds after the form's
    forwards, made from an empty cache."""
    cuda = device == "cuda"
    _, bf16, fp8_layer = build_pair(name, device, torch.bfloat16 if cuda else torch.float32)
    bf16.eval()
    fp8_layer.eval()
    base = fp8_layer.args.kernel_policy
    forms = {"bf16": (bf16, None), "fp8": (fp8_layer, dataclasses.replace(base, fp8_decode_glu_epilogue=False)),
             "fp8_epilogue": (fp8_layer, dataclasses.replace(base, fp8_decode_glu_epilogue=True)),
             "fp8_composed": (fp8_layer, dataclasses.replace(base, one_node_experts=False))}
    rows = []
    for T in tokens:
        torch.manual_seed(T)
        x = torch.randn(T, bf16.args.hidden_size, device=device, dtype=torch.bfloat16 if cuda else torch.float32)
        ref = None
        for form, (module, policy) in forms.items():
            if policy is not None:
                module.args.kernel_policy = policy

            def call(module=module):
                with torch.no_grad():
                    return module(x)
            if module.args.fp8 is not None:
                module.experts.mlp._fp8_cache().clear()
            out = call().float()
            cache = module.experts.mlp.__dict__.get("_fp8_weights")
            ref = out if ref is None else ref
            rows.append(dict(config=name, T=T, form=form, eager_ms=timed(call)[0] if cuda else float("nan"),
                             graph_ms=bench_dmoe.graph_time_ms(call, 100) if cuda else float("nan"),
                             rel_rms_vs_bf16=((out - ref).norm() / ref.norm()).item(),
                             experts_mib=sum(p.numel() * p.element_size()
                                             for p in module.experts.mlp.parameters()) / 2**20,
                             fp8_cache_mib=float("nan") if cache is None else cache.nbytes() / 2**20))
        fp8_layer.args.kernel_policy = base
        for row in rows[-len(forms):]:
            row["speedup_eager"] = rows[-len(forms)]["eager_ms"] / row["eager_ms"]
            row["speedup_graph"] = rows[-len(forms)]["graph_ms"] / row["graph_ms"]
    return rows


def cache_bytes_rows(name, device="cuda", T=64):
    """Rows (config, pass, experts_bf16_mib, fp8_cache_mib, cache_over_experts): what the FP8
    dMoE layer `name`'s weight cache holds after one forward of T tokens without a gradient to
    record (`torch.no_grad`: inference) and after one training step, each from an empty cache,
    against the expert weights' bytes in bf16. The bytes do not depend on the device or the
    weights' dtype (fp32 off CUDA)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    layer, _, fp8_layer = build_pair(name, device, dtype)
    experts = sum(p.numel() for p in fp8_layer.experts.mlp.parameters()) * 2 / 2**20
    x = torch.randn(T, layer.H, device=device, dtype=dtype)
    cache = fp8_layer.experts.mlp._fp8_cache()
    rows = []
    for label in ("inference", "training"):
        cache.clear()
        if label == "inference":
            with torch.no_grad():
                fp8_layer(x)
        else:
            fp8_layer(x.clone().requires_grad_(True)).float().square().mean().backward()
            fp8_layer.zero_grad(set_to_none=True)
        held = cache.nbytes() / 2**20
        rows.append({"config": name, "pass": label, "experts_bf16_mib": experts, "fp8_cache_mib": held,
                     "cache_over_experts": held / experts})
    cache.clear()
    return rows


def cache_bytes(args, device, env):
    """`--cache-bytes`: its rows printed and written to bench_fp8_cache_bytes.csv."""
    rows = [row for name in args.cache_bytes for row in cache_bytes_rows(name, device)]
    if rows:
        print_table(rows, ["config", "pass", "experts_bf16_mib", "fp8_cache_mib", "cache_over_experts"])
        os.makedirs(args.out, exist_ok=True)
        write_csv(os.path.join(args.out, "bench_fp8_cache_bytes.csv"), [{**r, **env} for r in rows])


def serving_kernels(name, T):
    """Rows (config, T, experts, kernel, us): the device time of each kernel of one `fused_moe`
    call at T tokens of config `name`, bf16 experts and their FP8 copy (torch.profiler)."""
    _, H, F, E, k = CONFIGS[name]
    x, w1, w2, gating, q1, s1, q2, s2 = serving_inputs(H, F, E, T, "cuda", torch.bfloat16)
    calls = dict(bf16=lambda: fused_moe(x, w1, w2, gating, k, True),
                 fp8=lambda: fused_moe(x, q1, q2, gating, k, True, w1_scale=s1, w2_scale=s2))
    rows = []
    for experts, call in calls.items():
        times = bench_dmoe.kernel_times_us(call, 20)
        rows += [dict(config=name, T=T, experts=experts, kernel=kernel[:90], us=us)
                 for kernel, us in sorted(times.items(), key=lambda kv: -kv[1])]
        rows.append(dict(config=name, T=T, experts=experts, kernel="(all kernels)", us=sum(times.values())))
        rows.append(dict(config=name, T=T, experts=experts, kernel="(host, per call)", us=host_us(call)))
    return rows


def host_us(call, n=50):
    """µs of host time per call: n calls issued back to back, timed to the last one's return
    (the device keeps up where the host is slower than the kernels)."""
    call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        call()
    return (time.perf_counter() - start) / n * 1e6


def serving_inputs(H, F, E, T, device, dtype):
    """x [T, H], w1 [E, 2F, H], w2 [E, H, F], gating [T, E] (seed 0), and the FP8 copies of the
    weights with their block scales."""
    torch.manual_seed(0)
    x = torch.randn(T, H, device=device, dtype=dtype)
    w1 = (torch.randn(E, 2 * F, H, device=device) / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, F, device=device) / F**0.5).to(dtype)
    gating = torch.randn(T, E, device=device)
    return (x, w1, w2, gating, *fp8.quantize_blocks(w1), *fp8.quantize_blocks(w2))


def serving_row(name, T, device, shape=None):
    """`fused_moe` at T tokens of config `name`: bf16 experts against their FP8 block-quantized
    copy (eager, no autograd; and on CUDA replayed from a CUDA graph, `*_graph_ms`, without the
    host's time, as a serving engine that captures its steps runs them); the FP8 call's
    expert-weight bytes over its eager time."""
    _, H, F, E, k = shape or CONFIGS[name]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x, w1, w2, gating, q1, s1, q2, s2 = serving_inputs(H, F, E, T, device, dtype)
    bf16 = lambda: fused_moe(x, w1, w2, gating, k, True)  # noqa: E731
    f8 = lambda: fused_moe(x, q1, q2, gating, k, True, w1_scale=s1, w2_scale=s2)  # noqa: E731
    nan = float("nan")
    ms_bf16, ms_fp8 = (timed(bf16)[0], timed(f8)[0]) if device == "cuda" else (nan, nan)
    # The graphs in each programmatic-dependent-launch mode (0: every kernel launched plainly); the
    # headline is the module's mode.
    modes = graph_ms_by_pdl(bf16, f8) if device == "cuda" else {mode: (nan, nan) for mode in PDL_MODES}
    graph_bf16, graph_fp8 = modes[launch.PDL]
    by_mode = {f"{label}_graph_pdl{mode}_ms": ms[i] for mode, ms in modes.items()
               for i, label in enumerate(("bf16", "fp8"))}
    ref, out = bf16().float(), f8().float()
    hit = torch.topk(gating, k, dim=1).indices.unique().numel()  # experts whose weights are read
    return dict(config=name, T=T, bf16_ms=ms_bf16, fp8_ms=ms_fp8, speedup=ms_bf16 / ms_fp8,
                bf16_graph_ms=graph_bf16, fp8_graph_ms=graph_fp8, speedup_graph=graph_bf16 / graph_fp8,
                **by_mode, speedup_graph_no_pdl=modes[0][0] / modes[0][1],
                fp8_weight_gbs=hit * 3 * H * F / ms_fp8 / 1e6,
                rel_rms_vs_bf16=((out - ref).norm() / ref.norm()).item())


def serving_rounds_rows(name, T, rounds, device="cuda", shape=None):
    """Rows (config, T, round, bf16_graph_ms, fp8_graph_ms, speedup_graph), then one with round
    'median' (each column's median): `fused_moe` at T tokens of config `name` on bf16 experts and
    on their FP8 copy, each captured once in a CUDA graph (`launch.PDL`'s mode) and the two
    replays timed in turn, `rounds` times, the first timed alternating between rounds. Off CUDA:
    the two graphs' stand-ins run once each, times nan."""
    _, H, F, E, k = shape or CONFIGS[name]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x, w1, w2, gating, q1, s1, q2, s2 = serving_inputs(H, F, E, T, device, dtype)
    bf16 = lambda: fused_moe(x, w1, w2, gating, k, True)  # noqa: E731
    f8 = lambda: fused_moe(x, q1, q2, gating, k, True, w1_scale=s1, w2_scale=s2)  # noqa: E731
    calls = [graphed(call)[0] for call in (bf16, f8)] if device == "cuda" else [bf16, f8]
    rows = []
    for r in range(rounds):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        ms = [float("nan")] * 2
        for i in order:
            if device == "cuda":
                ms[i] = timed(calls[i])[0]
            else:
                calls[i]()
        rows.append(dict(config=name, T=T, round=r, bf16_graph_ms=ms[0], fp8_graph_ms=ms[1],
                         speedup_graph=ms[0] / ms[1]))
    median = lambda key: statistics.median(row[key] for row in rows)  # noqa: E731
    rows.append(dict(config=name, T=T, round="median", bf16_graph_ms=median("bf16_graph_ms"),
                     fp8_graph_ms=median("fp8_graph_ms"), speedup_graph=median("speedup_graph")))
    return rows


def build_pair(name, device, dtype=torch.bfloat16):
    """(layer, the bf16 grouped dMoE, the same layer with fp8='blockwise' and its weight gradients
    unquantized) of bench_dmoe's layer `name` (or a `bench_dmoe.Layer` itself), on one router and
    one set of weights. The FP8 layer's policy has `fp8_weight_grad=False`, so that its rows keep
    the meaning they had before FP8 weight gradients became the GLU experts' default: `fp8_*`
    unquantized weight gradients, `fp8_wgrad_*` (`fp8_weight_grads`) FP8 ones."""
    layer = name if isinstance(name, bench_dmoe.Layer) else {**bench_dmoe.all_layers(False),
                                                              **bench_dmoe.all_layers(True)}[name]
    torch.manual_seed(0)
    bf16 = bench_dmoe.build_dmoe(layer, dtype, device, "grouped", "triton")
    args = dataclasses.replace(bf16.args, fp8="blockwise",
                               kernel_policy=dataclasses.replace(bf16.args.kernel_policy, fp8_weight_grad=False))
    fp8_layer = type(bf16)(args)
    bench_dmoe.share_parameters(fp8_layer, bf16)
    return layer, bf16.train(), fp8_layer.train()


@contextlib.contextmanager
def fp8_weight_grads(module, two_passes=None, overlap=None, b_blocks=None):
    """The FP8 layer `module` with its weight gradients in FP8 (`KernelPolicy.fp8_weight_grad`),
    the GLU gradient's operands in two passes or one (`fp8_weight_grad_glu_two_passes`), the
    Gluon weight gradient's epilogue overlapped or not (`backend.fp8._WGRAD_LAUNCH`) and its b
    operand in 128 x 128 blocks or column tiles (`fp8_weight_grad_b_blocks`) where given (None: as
    they are); the policy and the launch restored after."""
    policy, launch = module.args.kernel_policy, dict(fp8_backend._WGRAD_LAUNCH)
    forms = {} if two_passes is None else dict(fp8_weight_grad_glu_two_passes=two_passes)
    if b_blocks is not None:
        forms["fp8_weight_grad_b_blocks"] = b_blocks
    module.args.kernel_policy = dataclasses.replace(policy, fp8_weight_grad=True, **forms)
    if overlap is not None:
        fp8_backend._WGRAD_LAUNCH["overlap_epilogue"] = overlap
    try:
        yield
    finally:
        module.args.kernel_policy = policy
        fp8_backend._WGRAD_LAUNCH.update(launch)


def layer_step(name, device, dtype=torch.bfloat16):
    """One row: the bf16 and FP8 layers' training steps (ms, median), extra peak memory and the
    FP8 layer's relative rms error against the bf16 layer (output and input gradient)."""
    layer, bf16, fp8_layer = build_pair(name, device, dtype)
    torch.manual_seed(1)
    x = torch.randn(layer.T, layer.H, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(layer.T, layer.H, device=device, dtype=dtype)
    inputs = [x, *bf16.parameters()]
    row = {"config": name}
    results = {}
    for label, module in (("bf16", bf16), ("fp8", fp8_layer)):
        step, _ = bench_dmoe.steps(module, "fwdbwd", False, x, g, inputs)
        if label == "fp8":
            cache_step = step
            cache = lambda: module.experts.mlp.__dict__.get("_fp8_weights")  # noqa: E731

            def step():  # every step quantizes the weights again, as after an optimizer step
                if cache() is not None:
                    cache().clear()
                cache_step()
            row["fp8_cached_ms"] = timed(cache_step)[0] if device == "cuda" else float("nan")
        row[f"{label}_ms"] = timed(step)[0] if device == "cuda" else float("nan")
        row[f"{label}_extra_gib"] = bench_dmoe.extra_peak_gib(step, device, inputs)
        if label == "fp8":  # the same FP8 layer on the composed ops (no one-node form), weights cached
            module.args.kernel_policy = dataclasses.replace(module.args.kernel_policy, one_node_experts=False)
            row["fp8_composed_cached_ms"] = timed(cache_step)[0] if device == "cuda" else float("nan")
            row["fp8_composed_extra_gib"] = bench_dmoe.extra_peak_gib(step, device, inputs)
            module.args.kernel_policy = dataclasses.replace(module.args.kernel_policy, one_node_experts=True)
            # The FP8 node's up weight gradients on a gathered copy of the rows, at any width
            # (`fp8_gathered_*`; the default gathers only for experts as wide as mixtral's).
            policy = module.args.kernel_policy
            module.args.kernel_policy = dataclasses.replace(policy, fp8_gather_wgrad_min_ffn=0)
            row["fp8_gathered_cached_ms"] = timed(cache_step)[0] if device == "cuda" else float("nan")
            step()  # the weight cache holds this form's entries only (not the composed ops' too)
            row["fp8_gathered_extra_gib"] = bench_dmoe.extra_peak_gib(step, device, inputs)
            module.args.kernel_policy = policy
            # The FP8 node with its weight gradients in FP8 too (`KernelPolicy.fp8_weight_grad`), in
            # the forms in use and in the other forms of the GLU gradient's operands and the epilogue.
            other_two = not module.args.kernel_policy.fp8_weight_grad_glu_two_passes
            other_overlap = not fp8_backend._WGRAD_LAUNCH["overlap_epilogue"]
            other_b = not module.args.kernel_policy.fp8_weight_grad_b_blocks
            nan = float("nan")
            for key, forms in (("fp8_wgrad_other_glu_form_cached_ms", dict(two_passes=other_two)),
                               ("fp8_wgrad_other_b_form_cached_ms", dict(b_blocks=other_b)),
                               ("fp8_wgrad_other_epilogue_cached_ms", dict(overlap=other_overlap)),
                               ("fp8_wgrad_other_forms_cached_ms", dict(two_passes=other_two, overlap=other_overlap))):
                with fp8_weight_grads(module, **forms):
                    row[key] = timed(cache_step)[0] if device == "cuda" else nan
            with fp8_weight_grads(module):
                row["fp8_wgrad_cached_ms"] = timed(cache_step)[0] if device == "cuda" else nan
                row["fp8_wgrad_ms"] = timed(step)[0] if device == "cuda" else nan
                row["fp8_wgrad_extra_gib"] = bench_dmoe.extra_peak_gib(step, device, inputs)
                bench_dmoe.clear_grads(inputs)
                module(x).backward(g)
                results["fp8_wgrad"] = [p.grad.float().clone() for p in module.experts.mlp.parameters()]
        bench_dmoe.clear_grads(inputs)
        out = module(x)
        out.backward(g)
        results[label] = (out.detach().float(), x.grad.float())
        results[label + "_w"] = [p.grad.float().clone() for p in module.experts.mlp.parameters()]
    row["speedup"] = row["bf16_ms"] / row["fp8_ms"]
    row["speedup_cached"] = row["bf16_ms"] / row["fp8_cached_ms"]
    row["speedup_wgrad"] = row["bf16_ms"] / row["fp8_wgrad_ms"]
    row["speedup_wgrad_cached"] = row["bf16_ms"] / row["fp8_wgrad_cached_ms"]
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    row["out_rel_rms"] = rel(results["fp8"][0], results["bf16"][0])
    row["x_grad_rel_rms"] = rel(results["fp8"][1], results["bf16"][1])
    # The expert weights' gradients against the bf16 layer's: unquantized, and in FP8.
    row["w_grad_rel_rms"] = max(rel(a, b) for a, b in zip(results["fp8_w"], results["bf16_w"]))
    row["w_grad_fp8_rel_rms"] = max(rel(a, b) for a, b in zip(results["fp8_wgrad"], results["bf16_w"]))
    return row


_ALLOC_KEYS = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")


def _event_ms(fn, n: int) -> List[float]:
    """ms of each of n calls of fn, by CUDA events around each (the device not idled between)."""
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def layer_uncached_rows(name, rounds=5, steps=6, dtype=torch.bfloat16):
    """Rows: the FP8 layer's training step with its weights cached and quantized again every step
    (the cache cleared first, as after an optimizer step), in both weight-gradient forms, and its
    forward alone in both cache states (their difference: what quantizing the weights costs),
    in `rounds` interleaved rounds of `steps` steps each timed by CUDA events back to back (the
    bf16 layer's step in each round too); medians over all of a form's steps, and the caching
    allocator's counters (`_ALLOC_KEYS`) over the form's steps. What quantizing the weights adds to
    a step should be its forward's difference; more than that is something else."""
    layer, bf16, fp8_layer = build_pair(name, "cuda", dtype)
    torch.manual_seed(1)
    x = torch.randn(layer.T, layer.H, device="cuda", dtype=dtype, requires_grad=True)
    g = torch.randn(layer.T, layer.H, device="cuda", dtype=dtype)
    inputs = [x, *bf16.parameters()]
    bf16_step, _ = bench_dmoe.steps(bf16, "fwdbwd", False, x, g, inputs)
    fp8_step, _ = bench_dmoe.steps(fp8_layer, "fwdbwd", False, x, g, inputs)

    def clear():
        cache = fp8_layer.experts.mlp.__dict__.get("_fp8_weights")
        if cache is not None:
            cache.clear()

    def forward():
        with torch.no_grad():
            fp8_layer(x)

    def uncached(fn):
        def call():
            clear()
            fn()
        return call

    forms = {"bf16_step": (bf16_step, False), "fp8_step_cached": (fp8_step, False),
             "fp8_step_uncached": (uncached(fp8_step), False), "fp8_wgrad_step_cached": (fp8_step, True),
             "fp8_wgrad_step_uncached": (uncached(fp8_step), True), "fp8_forward_cached": (forward, False),
             "fp8_forward_uncached": (uncached(forward), False)}
    times = {key: [] for key in forms}
    counters = {key: dict.fromkeys(_ALLOC_KEYS, 0) for key in forms}
    for _ in range(rounds):
        for key, (fn, wgrad) in forms.items():
            context = fp8_weight_grads(fp8_layer) if wgrad else contextlib.nullcontext()
            with context:
                fn()  # the cache in the state the form times (and the form's kernels built)
                torch.cuda.synchronize()
                before = torch.cuda.memory_stats()
                times[key] += _event_ms(fn, steps)
                after = torch.cuda.memory_stats()
            for k in _ALLOC_KEYS:
                counters[key][k] += after.get(k, 0) - before.get(k, 0)
    rows = []
    for key in forms:
        ms = sorted(times[key])
        rows.append(dict(config=name, form=key, ms=ms[len(ms) // 2], min_ms=ms[0], max_ms=ms[-1],
                         steps=len(ms), **counters[key]))
    return rows


def layer_accumulate_row(name, device, micro_batches=8, dtype=torch.bfloat16):
    """One row: the bf16 and FP8 layers trained as a trainer that accumulates gradients over
    `micro_batches` micro-batches a step runs them (forward and `.backward()` on each micro-batch's
    own rows; ms a micro-batch, the window's median over its micro-batches), in two forms:

    - `fused`: the expert weights carry an fp32 `main_grad` and their gradients are added into it
      by the kernels (gradient-accumulation fusion, as `MainWeightsAdamW.fuse_grad_accumulation`
      sets up), `.grad` untouched;
    - `grad`: plain autograd, each weight's gradient summed into `.grad` micro-batch by
      micro-batch (`.grad` None at the window's start, as `zero_grad` leaves it).

    The FP8 layer's weights are quantized once a window, at its start (as after an optimizer
    step: the cache is emptied). `fp8_wgrad`: the FP8 layer with its weight gradients in FP8 too,
    in the default forms (fused, they are added into main_grad by the product's epilogue). Also
    each form's summed expert-weight gradients, FP8 against bf16 (relative rms), and the fused
    form's against the `grad` form's in the same precision."""
    layer, bf16, fp8_layer = build_pair(name, device, dtype)
    torch.manual_seed(1)
    xs = [torch.randn(layer.T, layer.H, device=device, dtype=dtype, requires_grad=True) for _ in range(micro_batches)]
    g = torch.randn(layer.T, layer.H, device=device, dtype=dtype)
    params = list(bf16.parameters())  # fp8_layer's are the same objects
    experts = list(bf16.experts.mlp.parameters())
    cache = lambda: fp8_layer.experts.mlp.__dict__.get("_fp8_weights")  # noqa: E731

    def window(module):
        def run():
            if module is fp8_layer and cache() is not None:
                cache().clear()
            bench_dmoe.clear_grads(params + xs)
            for x in xs:
                module(x).backward(g)
        return run

    def set_fusion(on):
        for p in experts:
            if on:
                p.main_grad = torch.zeros(p.shape, device=device, dtype=torch.float32)
            elif hasattr(p, "main_grad"):
                del p.main_grad

    row, summed = {"config": name, "micro_batches": micro_batches}, {}
    try:
        for form in ("fused", "grad"):
            set_fusion(form == "fused")
            for label, module in (("bf16", bf16), ("fp8", fp8_layer), ("fp8_wgrad", fp8_layer)):
                forms = fp8_weight_grads(fp8_layer) if label == "fp8_wgrad" else contextlib.nullcontext()
                with forms:
                    run = window(module)
                    if form == "fused":  # (the last label's timed windows were summed into it)
                        for p in experts:
                            p.main_grad.zero_()
                    run()  # compiled, and the gradients of one window kept below
                    if form == "fused":
                        if any(p.grad is not None for p in experts):
                            raise AssertionError(f"{label}: a fused expert weight's gradient came back as .grad")
                        summed[label, form] = [p.main_grad.clone() for p in experts]
                    else:
                        summed[label, form] = [p.grad.float().clone() for p in experts]
                    ms = timed(run, warmup=200, rep=2000)[0] / micro_batches if device == "cuda" else float("nan")
                row[f"{label}_{form}_ms"] = ms
    finally:
        set_fusion(False)
    rel = lambda a, b: max(((x - y).norm() / y.norm()).item() for x, y in zip(a, b))  # noqa: E731
    for form in ("fused", "grad"):
        row[f"speedup_{form}"] = row[f"bf16_{form}_ms"] / row[f"fp8_{form}_ms"]
        row[f"speedup_wgrad_{form}"] = row[f"bf16_{form}_ms"] / row[f"fp8_wgrad_{form}_ms"]
        row[f"w_grad_rel_rms_{form}"] = rel(summed["fp8", form], summed["bf16", form])
        row[f"w_grad_fp8_rel_rms_{form}"] = rel(summed["fp8_wgrad", form], summed["bf16", form])
    for label in ("bf16", "fp8", "fp8_wgrad"):
        row[f"{label}_fusion_gain"] = row[f"{label}_grad_ms"] / row[f"{label}_fused_ms"]
        row[f"{label}_fused_vs_grad_rel_rms"] = rel(summed[label, "fused"], summed[label, "grad"])
    return row


def _warm_layer_steps(name):
    """(label, training step, its inputs) of the bf16 and then the FP8 layer of config `name` on
    the GPU, each step run once (compiled, the FP8 weights cached) before it is yielded: FP8 with
    unquantized weight gradients and with FP8 ones (`fp8_weight_grad`, the GLU experts' default,
    in its default forms: two-pass GLU operands, b in blocks, the overlapped epilogue)."""
    layer, bf16, fp8_layer = build_pair(name, "cuda")
    torch.manual_seed(1)
    x = torch.randn(layer.T, layer.H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(layer.T, layer.H, device="cuda", dtype=torch.bfloat16)
    inputs = [x, *bf16.parameters()]
    for label, module, forms in (("bf16", bf16, contextlib.nullcontext()), ("fp8", fp8_layer, contextlib.nullcontext()),
                                 ("fp8_wgrad", fp8_layer, fp8_weight_grads(fp8_layer))):
        with forms:
            step, _ = bench_dmoe.steps(module, "fwdbwd", False, x, g, inputs)
            step()
            yield label, step, inputs


def layer_kernels(name, repeats=5):
    """Rows (config, layer, kernel, µs per step) of the bf16 and the FP8 layers' training steps
    (weights cached) under torch.profiler, the kernels summing to at least 1% of a step."""
    rows = []
    for label, step, inputs in _warm_layer_steps(name):
        times = bench_dmoe.kernel_times_us(step, repeats)
        total = sum(times.values())
        rows += [dict(config=name, layer=label, kernel=k[:60], us=us) for k, us in
                 sorted(times.items(), key=lambda kv: -kv[1]) if us >= 0.01 * total]
        rows.append(dict(config=name, layer=label, kernel="(all kernels)", us=total))
        bench_dmoe.clear_grads(inputs)
    return rows


def _site(frames):
    """The innermost frame of a recorded allocation in this repository's Python (path below the
    package or benchmarks/, line, function)."""
    for f in frames:
        name = f.get("filename", "").replace(os.sep, "/")
        for root in ("/megablocks/", "/benchmarks/"):
            if root in name and name.endswith(".py"):
                return f"{root[1:]}{name.rsplit(root, 1)[1]}:{f['line']} {f['name']}"
    return "(other)"


def layer_memory(name, top=8):
    """Rows (config, layer, site, MiB, tensors): the tensors alive at the peak of one training step
    of the bf16 and the FP8 layers (weights cached, as `layer_step`'s `extra_gib` after its timed
    steps), by the Python line that allocated them, from torch.cuda's allocation history; the
    largest `top` sites and the rest summed, and the step's extra peak as `bench_dmoe.extra_peak_gib`."""
    rows = []
    for label, step, inputs in _warm_layer_steps(name):
        extra = bench_dmoe.extra_peak_gib(step, "cuda", inputs)
        bench_dmoe.clear_grads(inputs)
        torch.cuda.synchronize()
        torch.cuda.memory._record_memory_history(max_entries=1_000_000)
        step()
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        # Replay this step's allocations and frees: the live set where the running total peaks.
        live, total, best, best_live = {}, 0, -1, {}
        for event in (e for trace in snap["device_traces"] for e in trace):
            if event["action"] == "alloc":
                live[event["addr"]] = (event["size"], _site(event.get("frames", [])))
                total += event["size"]
                if total > best:
                    best, best_live = total, dict(live)
            elif event["action"] in ("free_requested", "free_completed") and event["addr"] in live:
                total -= live.pop(event["addr"])[0]
        sites = {}
        for size, site in best_live.values():
            mib, n = sites.get(site, (0.0, 0))
            sites[site] = (mib + size / 2**20, n + 1)
        ranked = sorted(sites.items(), key=lambda kv: -kv[1][0])
        rows += [dict(config=name, layer=label, site=site, mib=mib, tensors=n) for site, (mib, n) in ranked[:top]]
        rest = ranked[top:]
        rows.append(dict(config=name, layer=label, site="(rest)", mib=sum(v[0] for _, v in rest),
                         tensors=sum(v[1] for _, v in rest)))
        rows.append(dict(config=name, layer=label, site="(step's extra peak, GiB x 1024)", mib=extra * 1024,
                         tensors=0))
        bench_dmoe.clear_grads(inputs)
    return rows


def smoke():
    """CPU: a tiny config through the quantizers and the FP8 GEMM; returns each product's
    relative error against the unquantized product (checked: < 6%)."""
    errors = {}
    for proj, x, w, bs in products(16, 64, 96, 4, 2, "cpu"):
        x, w = x.float(), w.float()
        out = fp8.gmm_fp8(*fp8.quantize_rows(x), *fp8.quantize_blocks(w), bs, out_dtype=torch.float32)
        ref = gb.gmm(x, w, bs, trans_b=True, backend="torch")
        errors[proj] = ((out - ref).norm() / ref.norm()).item()
        assert errors[proj] < 0.06, (proj, errors[proj])
    serve = serving_row("smoke", 8, "cpu", shape=(8, 64, 96, 4, 2))
    assert 1e-3 < serve["rel_rms_vs_bf16"] < 0.08, serve
    errors["serving"] = serve["rel_rms_vs_bf16"]
    rounds = serving_rounds_rows("smoke", 8, 2, "cpu", shape=(8, 64, 96, 4, 2))
    assert [row["round"] for row in rounds] == [0, 1, "median"], rounds
    layer_row = layer_step("smoke_glu", "cpu", torch.float32)
    assert layer_row["out_rel_rms"] < 0.08 and layer_row["x_grad_rel_rms"] < 0.08, layer_row
    errors["layer_out"], errors["layer_x_grad"] = layer_row["out_rel_rms"], layer_row["x_grad_rel_rms"]
    assert layer_row["w_grad_fp8_rel_rms"] < 0.08, layer_row
    errors["layer_w_grad_fp8"] = layer_row["w_grad_fp8_rel_rms"]
    # MLP experts: the FP8 MLP node, and with FP8 weight gradients the composed FP8 ops.
    mlp_row = layer_step("smoke_mlp", "cpu", torch.float32)
    assert mlp_row["out_rel_rms"] < 0.08 and mlp_row["x_grad_rel_rms"] < 0.08, mlp_row
    assert 1e-3 < mlp_row["w_grad_fp8_rel_rms"] < 0.08, mlp_row
    errors["layer_mlp_out"] = mlp_row["out_rel_rms"]
    acc_row = layer_accumulate_row("smoke_glu", "cpu", micro_batches=2, dtype=torch.float32)
    assert 1e-4 < acc_row["w_grad_rel_rms_fused"] < 0.08, acc_row
    # The kernels' additions into main_grad sum what autograd sums into .grad (fp32 here).
    assert all(acc_row[f"{label}_fused_vs_grad_rel_rms"] < 1e-5 for label in ("bf16", "fp8", "fp8_wgrad")), acc_row
    assert 1e-4 < acc_row["w_grad_fp8_rel_rms_fused"] < 0.1, acc_row
    errors["layer_main_grad"] = acc_row["w_grad_rel_rms_fused"]
    glu_rows = decode_glu_rows("smoke", repeats=1, T=6, device="cpu", shape=(6, 64, 128, 4, 2), stages=(3,))
    assert glu_rows[0]["fits"] and glu_rows[0]["same_output_prologue"], glu_rows
    inference = {row["form"]: row for row in dmoe_inference_rows("smoke_glu", tokens=(6,), device="cpu")}
    assert set(inference) == {"bf16", "fp8", "fp8_epilogue", "fp8_composed"}, inference
    for form in ("fp8", "fp8_epilogue", "fp8_composed"):
        assert 1e-4 < inference[form]["rel_rms_vs_bf16"] < 0.08, inference[form]
    errors["dmoe_inference"] = inference["fp8"]["rel_rms_vs_bf16"]
    _, H, F, E, _ = bench_dmoe.SMOKE_CONFIGS["smoke_glu"][0]
    forward_forms = 3 * (E * F * H + 4 * E * -(-F // 128) * -(-H // 128))  # each weight's e4m3 values once
    for form in ("fp8", "fp8_epilogue", "fp8_composed"):
        assert inference[form]["fp8_cache_mib"] * 2**20 == forward_forms, inference[form]
    weighed = {row["pass"]: row["fp8_cache_mib"] * 2**20 for row in cache_bytes_rows("smoke_glu", "cpu", T=6)}
    assert weighed == {"inference": forward_forms, "training": forward_forms + 3 * E * F * H}, weighed
    print("bench_fp8 smoke: ok", errors)
    return errors


# The Gluon forms `--wgmma` takes: gmm_fp8 config keys beside wgmma=True.
GLUON_FORMS = {
    "triton": None,  # the Triton kernel (the default before the 192 x 128 Gluon form)
    "one-group": dict(warp_specialize=False, block_m=128, num_warps=8),
    "warp-specialized": dict(warp_specialize=True, block_m=128, num_warps=8),
    "warp-specialized-192x128": dict(warp_specialize=True, block_m=192, num_warps=4),
}


def _launch_gluon(form) -> None:
    """Make `gmm_fp8`'s default launch past the decode sizes the Triton kernel (`None`) or a Gluon
    form (an A/B of this process only)."""
    launch = fp8_backend.gmm_fp8_launch

    def patched(M, E, interpret=False, decode=True, gluon=True):
        cfg = launch(M, E, interpret, decode, gluon=False)
        if gluon and form is not None and cfg["tma"] and not cfg["swap_ab"]:
            cfg.update(wgmma=True, **form)
        return cfg

    fp8_backend.gmm_fp8_launch = patched


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=".")
    p.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--layers", nargs="*", default=["mixtral", "olmoe"],
                   help="bench_dmoe layers timed as a training step, bf16 against fp8 (none: skip)")
    p.add_argument("--serving", nargs="*", default=["mixtral", "qwen3moe"],
                   help="configs whose fused_moe is timed at T = 64 and 4096, bf16 against fp8 (none: skip)")
    p.add_argument("--serving-breakdown", nargs="*", default=[], choices=list(CONFIGS),
                   help="configs whose fused_moe calls (T = 64 and 4096) are split into kernel times")
    p.add_argument("--serving-rounds", type=int, default=0,
                   help="rounds in which the --serving configs' bf16 and FP8 graphs are replayed in turn (0: none)")
    p.add_argument("--decode-variants", nargs="*", default=[],
                   help="sweep_fp8 variants under which the --serving configs' decode (T = 64) is timed again")
    p.add_argument("--decode-glu", nargs="*", default=[], choices=list(CONFIGS),
                   help="configs whose FP8 decode (T = 64) is timed with the GLU in the up product's epilogue "
                        "and without, interleaved")
    p.add_argument("--dmoe-inference", nargs="*", default=[], choices=list(CONFIGS),
                   help="configs whose dMoE layer is timed in inference (T = 64 and 4096), bf16 against its FP8 forms")
    p.add_argument("--cache-bytes", nargs="*", default=[], choices=list(CONFIGS),
                   help="configs whose FP8 layer's weight cache is weighed after an inference forward and after "
                        "a training step (any device)")
    p.add_argument("--layer-breakdown", nargs="*", default=[], choices=list(CONFIGS),
                   help="configs whose bf16 and FP8 layer steps are profiled kernel by kernel")
    p.add_argument("--layer-accumulate", nargs="*", default=[], choices=list(CONFIGS),
                   help="configs whose bf16 and FP8 layers are timed over --micro-batches micro-batches a step, "
                        "the expert weights' gradients added into main_grad by the kernels and summed in .grad")
    p.add_argument("--micro-batches", type=int, default=8, help="micro-batches a step for --layer-accumulate")
    p.add_argument("--b-blocks", nargs="*", default=[], choices=list(CONFIGS),
                   help="time the weight gradients' b operands made in 128 x 128 blocks by their quantizing pass "
                        "against column tiles coarsened after (cols_to_blocks_)")
    p.add_argument("--layer-uncached", nargs="*", default=[], choices=list(CONFIGS),
                   help="configs whose FP8 layer step is timed with its weights cached and quantized again every "
                        "step, in interleaved rounds, with the caching allocator's counters")
    p.add_argument("--layer-memory", nargs="*", default=[], choices=list(CONFIGS),
                   help="configs whose bf16 and FP8 layer steps list the tensors alive at their memory peak")
    p.add_argument("--weights", nargs="*", default=["mixtral", "olmoe"], choices=list(CONFIGS),
                   help="configs whose expert weights' block quantization is timed (none: skip)")
    p.add_argument("--wgmma", choices=list(GLUON_FORMS),
                   help="products past the decode sizes by the Triton kernel or a Gluon form (gmm_fp8's config "
                        "'wgmma' with these keys: GLUON_FORMS), by a patched default launch")
    p.add_argument("--cols", nargs="*", default=[], choices=list(CONFIGS),
                   help="time the weight gradient's fused operand quantizers on these configs")
    p.add_argument("--cols-variants", nargs="*", default=["pieces32_w4"], choices=list(COLS_VARIANTS))
    p.add_argument("--glu-quantize", nargs="*", default=[], choices=list(CONFIGS),
                   help="time glu_quantize_rows' launch forms (plain and writing the product) on these configs")
    p.add_argument("--glu-backward-quantize", nargs="*", default=[], choices=list(CONFIGS),
                   help="time glu_backward_quantize_rows_' launch forms against bf16's glu_backward on these configs")
    p.add_argument("--tile-gains-configs", nargs="*", default=[], choices=list(CONFIGS),
                   help="configs whose Gluon row tiles are timed under each of --tile-gains, interleaved")
    p.add_argument("--tile-gains", nargs="*", type=float, default=[1.15, 1.0],
                   help="the 192-row tile thresholds compared by --tile-gains-configs (the first: the default)")
    p.add_argument("--rounding", nargs="*", default=[], choices=list(CONFIGS),
                   help="time the row quantizers rounding by integer arithmetic against the e4m3 cast")
    p.add_argument("--gather-quantize", nargs="*", default=[], choices=list(CONFIGS),
                   help="time gather_quantize_rows' launch forms (plain and weighted) on these configs")
    p.add_argument("--tile-gain", type=float, default=None,
                   help="the Gluon form's 192-row tile threshold (backend.fp8._GLUON_TILE_GAIN) for this run")
    p.add_argument("--cols-pick", action="store_true",
                   help="take each mode's fastest --cols variant for the layers timed after them")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    if args.wgmma:
        _launch_gluon(GLUON_FORMS[args.wgmma])
    if args.cache_bytes and not args.smoke and not torch.cuda.is_available():
        cache_bytes(args, "cpu", environment())  # bytes only: no timing off CUDA
        return
    if args.smoke or not torch.cuda.is_available():
        smoke()
        return
    bench(args)


if __name__ == "__main__":
    main()
