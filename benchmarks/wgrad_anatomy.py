"""Where the FP8 weight gradient's time goes, and what a cheaper promotion would buy (CUDA, sm_90).

    python benchmarks/wgrad_anatomy.py --out DIR [--configs mixtral olmoe]

The Gluon weight gradient (`fp8_wgmma.gmm_fp8_wgrad_ws`) promotes each 128-deep product with the
outer product of two column-scale vectors: `acc + (r * sa[:, None]) * sb[None, :]`, an FMUL and an
FFMA an element, against the forward's one FFMA (the rows' scales times one weight block's). This
script builds the kernel again with that one line changed, from the module's own source (a copy
in a temporary directory: the package is not touched), and times each form on the up projection's
weight gradient of each config (operands quantized as the backward quantizes them):

- `full`:         the module's line, rebuilt (its output must equal the package kernel's bit for bit);
- `no_col_scale`: the same two operations, the rows' scale twice: no column scales read or moved
                  to the product's layout (what reading them costs);
- `rows`:         one FFMA with the rows' scale (what a b operand with one scale per 128 x 128
                  block, the forward's promotion, would cost);
- `sum`:          the product added unscaled;
- `none`:         the product waited for and dropped (the tensor cores, the loads and the stores).

Only `full` computes the weight gradient; the others time the kernel's other parts. `b_blocks`
is the module's own form for b in 128 x 128 blocks (`fp8.cols_to_blocks_`, the FP8 layer's
default since; equal to the package's bit for bit). `group_n` rows time `full` at other tile
orders. The forward's up product of the same FLOPs
(`gmm_fp8`) is the reference rate (`forward_up`).

The accuracy side of a cheaper promotion (`--accuracy`): the weight gradient's relative RMS error
against fp32 with b (the token rows, x) quantized as today (128 x 1 tiles down each column of
each expert's 128-row blocks) and in 128 x 128 blocks (one scale for a block of rows and 128
columns), a in 128 x 1 tiles both times; plain torch, on the same device. x has outlier channels
(every H/16-th column `--outliers` times larger): besides the whole gradient's error, the median and the largest
over the gradient's columns of each column's own relative error (a small channel beside an
outlier in its block loses its bits). With power-of-two scales e4m3 rounds the same at any scale
while values stay normal: a block's scale costs bits only where an element lies more than about
2^14.8 (448 over the smallest normal, 2^-6) below its block's largest.
"""

import argparse
import importlib.util
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gmm import routed_counts  # noqa: E402
from common import CONFIGS, environment, print_table, timed, write_csv  # noqa: E402

from megablocks.backend import cdiv  # noqa: E402
from megablocks.backend import fp8 as fp8_backend  # noqa: E402
from megablocks.backend import fp8_wgmma  # noqa: E402
from megablocks.backend.launch import persistent_programs  # noqa: E402
from megablocks.ops import fp8  # noqa: E402

# The column tiles' promotion (`_wg_promote` without B_BLOCKS) and what replaces it in each form.
_PROMOTION = "acc = acc + (r * sa[:, None]) * sb[None, :]"
FORMS = {
    "full": _PROMOTION,
    "no_col_scale": "acc = acc + (r * sa[:, None]) * sa[:, None]",
    "rows": "acc = acc + r * sa[:, None]",
    "sum": "acc = acc + r",
    "none": "acc = acc",
}


def build(form: str, directory: str):
    """fp8_wgmma rebuilt with `_wg_promote`'s column-tile promotion replaced by FORMS[form]."""
    with open(fp8_wgmma.__file__) as f:
        source = f.read()
    if source.count(_PROMOTION) != 1:
        raise RuntimeError(f"expected the promotion line once in {fp8_wgmma.__file__}: {_PROMOTION!r}")
    source = source.replace(_PROMOTION, FORMS[form])
    source = source.replace("from .gmm import", "from megablocks.backend.gmm import")
    source = source.replace("from .launch import", "from megablocks.backend.launch import")
    path = os.path.join(directory, f"fp8_wgmma_{form}.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(f"fp8_wgmma_{form}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def operands(M, H, F, E):
    bs = routed_counts(M, E, "cuda")
    torch.manual_seed(0)
    g = torch.randn(M, F, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(M, H, dtype=torch.bfloat16, device="cuda")
    return bs, g, x


def timing_rows(name, forms, group_ns):
    T, H, F, E, k = CONFIGS[name]
    M = T * k
    bs, g, x = operands(M, H, F, E)
    gq, gs = fp8.quantize_cols_grouped(g, bs, transposed=True)
    xq, xs = fp8.quantize_cols_grouped(x, bs, transposed=True)
    sizes = bs.to(device="cuda", dtype=torch.int32)
    flops = 2 * M * H * F
    programs = persistent_programs(gq.device, E * cdiv(F, 128) * cdiv(H, 128))
    package = fp8_backend.gmm_fp8_wgrad(gq, gs, xq, xs, bs, out_dtype=torch.bfloat16, rows=M)
    rows = []

    def row(form, module, group_n):
        out = torch.empty((E, F, H), dtype=torch.bfloat16, device="cuda")

        def run():
            return module.gmm_fp8_wgrad_ws(gq, gs, xq, xs, sizes, out, M, programs, group_n=group_n)

        run()
        ms, p20, p80 = timed(run)
        same = torch.equal(out, package) if form == "full" else ""
        rows.append(dict(config=name, form=form, group_n=group_n, ms=ms, p20_ms=p20, p80_ms=p80,
                         tflops=flops / ms / 1e9, equal_to_package=same))

    for form, module in forms.items():
        row(form, module, 8)
    # b in 128 x 128 blocks (`cols_to_blocks_`, the layer's default): the module's own B_BLOCKS form.
    xq_b = xq.clone()
    xt = fp8.cols_to_blocks_(xq_b, xs, bs, M)
    blocks = fp8_backend.gmm_fp8_wgrad(gq, gs, xq_b, xt, bs, out_dtype=torch.bfloat16, rows=M)
    out = torch.empty((E, F, H), dtype=torch.bfloat16, device="cuda")

    def run_blocks():
        return forms["full"].gmm_fp8_wgrad_ws(gq, gs, xq_b, xt, sizes, out, M, programs, b_blocks=True)

    run_blocks()
    ms, p20, p80 = timed(run_blocks)
    rows.append(dict(config=name, form="b_blocks", group_n=8, ms=ms, p20_ms=p20, p80_ms=p80, tflops=flops / ms / 1e9,
                     equal_to_package=torch.equal(out, blocks)))
    for group_n in group_ns:
        if group_n != 8:
            row("full", forms["full"], group_n)
    # The forward's up product of the same FLOPs, for its rate.
    w = (torch.randn(E, F, H, device="cuda") / H**0.5).to(torch.bfloat16)
    x_q, x_s = fp8.quantize_rows(x)
    w_q, w_s = fp8.quantize_blocks(w)
    ms, p20, p80 = timed(lambda: fp8.gmm_fp8(x_q, x_s, w_q, w_s, bs))
    rows.append(dict(config=name, form="forward_up", group_n="", ms=ms, p20_ms=p20, p80_ms=p80,
                     tflops=flops / ms / 1e9, equal_to_package=""))
    return rows


def _blocks(t, first, n, Q=128):
    """Rows [first, first + n) of t as [blocks, Q, cols] fp32, the last block padded with zeros."""
    nb = cdiv(n, Q)
    out = torch.zeros((nb * Q, t.shape[1]), dtype=torch.float32, device=t.device)
    out[:n] = t[first:first + n].float()
    return out.view(nb, Q, t.shape[1])


def _dequantized(blocks, col_block: int):
    """blocks [nb, Q, C] quantized to e4m3 with one power-of-two scale per column of each block
    (col_block 1) or per col_block columns of each block, then dequantized."""
    nb, Q, C = blocks.shape
    amax = blocks.abs().amax(dim=1)  # [nb, C]
    if col_block > 1:
        amax = amax.view(nb, C // col_block, col_block).amax(dim=2).repeat_interleave(col_block, dim=1)
    scale, inv = fp8_backend._pow2_scales(amax.clamp_min(1e-30))
    q = fp8_backend._to_e4m3(blocks * inv[:, None, :])
    return q.float() * scale[:, None, :]


def accuracy_row(name, outlier):
    T, H, F, E, k = CONFIGS[name]
    M = T * k
    bs, g, x = operands(M, H, F, E)
    # Outlier channels, as activations have them: a few columns of x `outlier` times larger.
    x[:, :: max(1, H // 16)] *= outlier
    # Squared sums per column of the gradient (one per channel of x), summed over the experts.
    ref_sq, err_col_sq, err_blk_sq = (torch.zeros(H, dtype=torch.float64, device=g.device) for _ in range(3))
    first = 0
    for n in bs.tolist():
        if n:
            gb_, xb = _blocks(g, first, n), _blocks(x, first, n)
            ref = gb_.flatten(0, 1).T @ xb.flatten(0, 1)
            g_d = _dequantized(gb_, 1).flatten(0, 1)
            col = g_d.T @ _dequantized(xb, 1).flatten(0, 1)
            blk = g_d.T @ _dequantized(xb, 128).flatten(0, 1)
            ref_sq += ref.double().square().sum(0)
            err_col_sq += (col - ref).double().square().sum(0)
            err_blk_sq += (blk - ref).double().square().sum(0)
        first += n
    per_col_tiles, per_col_blocks = (err_col_sq / ref_sq).sqrt(), (err_blk_sq / ref_sq).sqrt()
    return dict(config=name, outlier=outlier, b_tiles_rel_rms=(err_col_sq.sum() / ref_sq.sum()).sqrt().item(),
                b_blocks_rel_rms=(err_blk_sq.sum() / ref_sq.sum()).sqrt().item(),
                b_tiles_median_col_rel_rms=per_col_tiles.median().item(),
                b_blocks_median_col_rel_rms=per_col_blocks.median().item(),
                b_tiles_max_col_rel_rms=per_col_tiles.max().item(),
                b_blocks_max_col_rel_rms=per_col_blocks.max().item())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".")
    p.add_argument("--configs", nargs="*", default=["mixtral", "olmoe"], choices=list(CONFIGS))
    p.add_argument("--forms", nargs="*", default=list(FORMS), choices=list(FORMS))
    p.add_argument("--group-n", nargs="*", type=int, default=[4, 8, 16])
    p.add_argument("--accuracy", action="store_true")
    p.add_argument("--outliers", nargs="*", type=float, default=[1.0, 30.0, 3000.0],
                   help="--accuracy: the outlier channels' factor, one row each")
    args = p.parse_args()
    if not (torch.cuda.is_available() and fp8_wgmma.available()):
        raise SystemExit("wgrad_anatomy.py needs a CUDA sm_90 GPU and Triton's Gluon")
    env = environment()
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        forms = {form: build(form, tmp) for form in dict.fromkeys(["full", *args.forms])}
        rows = [dict(r, **env) for name in args.configs for r in timing_rows(name, forms, args.group_n)]
    print_table(rows, ["config", "form", "group_n", "ms", "p20_ms", "p80_ms", "tflops", "equal_to_package"])
    write_csv(os.path.join(args.out, "wgrad_anatomy.csv"), rows)
    if args.accuracy:
        acc = [dict(accuracy_row(name, o), **env) for name in args.configs for o in args.outliers]
        print_table(acc, ["config", "outlier", "b_tiles_rel_rms", "b_blocks_rel_rms", "b_tiles_median_col_rel_rms",
                          "b_blocks_median_col_rel_rms", "b_tiles_max_col_rel_rms", "b_blocks_max_col_rel_rms"])
        write_csv(os.path.join(args.out, "wgrad_anatomy_accuracy.csv"), acc)


if __name__ == "__main__":
    main()
