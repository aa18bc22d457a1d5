"""FP8 experts, DeepSeek-V3's blockwise layout: quantizers and the FP8 grouped GEMM.

    x_q, x_s = quantize_rows(x_MK)                  # 1 x 128 tiles, e4m3 + fp32 scales
    w_q, w_s = quantize_blocks(w_ENK)               # 128 x 128 blocks of [E, N, K] (out x in)
    out_MN = gmm_fp8(x_q, x_s, w_q, w_s, batch_sizes_E)   # bf16 out, fp32 accumulation

    y_MN = fp8_gmm(x_MK, w_ENK, batch_sizes_E, weights=cache(w_ENK))   # differentiable

`gmm_fp8_reference` is the plain-torch definition (dequantize both operands, multiply in fp32).
The kernels and the layout are in `megablocks.backend.fp8`.

`fp8_gmm` is the training form: the forward product and the input gradient run in FP8, taking
the rows in 1 x 128 tiles (the output gradient quantized like the input, the
same quantized weight read in the other layout); the weight gradient, whose reduction runs down
each expert's rows, takes both operands in 128 x 1 tiles that start at each expert's first row
(`quantize_cols_grouped`, `gmm_fp8_wgrad`), DeepSeek-V3's layout for that product, with
`fp8_wgrad=True`; by default the weight gradient stays unquantized (the variable-K grouped GEMM,
bf16 on a GPU), which measured 7x faster on an H200 than the untuned FP8 kernel.
`Fp8WeightCache` quantizes a weight once per optimizer step: again only when the storage or version (bumped by every in-place update) changed, so micro-batches of one
step share one quantization. dMoE runs its grouped path this way with `Arguments(fp8='blockwise')`.
"""

import contextlib
import weakref
from typing import Optional, Tuple

import torch

from megablocks.backend import gmm as _gmm
from megablocks.backend.fp8 import (
    E4M3_MAX,
    FP8_DTYPE,
    Q,
    dequantize_blocks,
    dequantize_cols_grouped,
    dequantize_rows,
    gather_quantize_cols,
    gather_gmm_fp8_glu_quantize,
    gather_quantize_rows,
    glu_backward_quantize_rows_,
    glu_backward_quantize_rows_cols,
    glu_quantize_cols,
    glu_quantize_rows,
    gmm_fp8,
    gmm_fp8_glu_quantize,
    gmm_fp8_reference,
    gmm_fp8_wgrad,
    gmm_fp8_wgrad_reference,
    quantize_blocks,
    quantize_blocks_reference,
    quantize_cols_grouped,
    quantize_cols_grouped_reference,
    quantize_rows,
    quantize_rows_and_cols,
    quantize_rows_reference,
)


def _stamp(w: torch.Tensor):
    """What tells a weight's values changed: its storage, version (bumped by in-place updates),
    shape and dtype."""
    return (w.data_ptr(), w._version, tuple(w.shape), w.dtype)


@contextlib.contextmanager
def _made_for_autograd():
    """The context the cache quantizes in: no gradient recorded, and outside inference mode even
    under `torch.inference_mode()` (its tensors would be inference tensors, which a later training
    step that finds them cached cannot save for its backward)."""
    with torch.inference_mode(False), torch.no_grad():
        yield


class Fp8WeightCache:
    """Blockwise FP8 copies of weights, made again only when a weight changed (its storage or
    its version, which every in-place update such as an optimizer step bumps). With
    `transposed`, each quantization also makes the values stored the other way (`transposed()`)."""

    def __init__(self, transposed: bool = False):
        self._entries = {}
        self._transposed = transposed

    def __call__(self, w: torch.Tensor, shape: Optional[Tuple[int, ...]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """`quantize_blocks(w.view(shape))` (shape default: w's own, 3-D), from the cache when
        `w` has not changed since."""
        current = self._current(w, shape)
        if current is not None:
            return current
        with _made_for_autograd():  # new, changed, or a new tensor that reuses an id
            v = w.detach() if shape is None else w.detach().view(shape)
            if self._transposed:
                q, s, t = quantize_blocks(v, transposed=True)
                hit = (weakref.ref(w), _stamp(w), (q, s), (t, s.transpose(1, 2)))
            else:
                hit = (weakref.ref(w), _stamp(w), quantize_blocks(v))
        self._entries[(id(w), shape)] = hit
        return hit[2]

    def _current(self, w: torch.Tensor, shape) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """The cached (q, s) of `w` viewed as `shape` (made by `__call__` or given to `seed`), or
        None where there is none or `w` changed since."""
        hit = self._entries.get((id(w), shape))
        if hit is None or hit[0]() is not w or hit[1] != _stamp(w):
            return None
        return hit[2]

    def transposed(self, w: torch.Tensor, shape: Optional[Tuple[int, ...]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """`(q.transpose(1, 2).contiguous(), s.transpose(1, 2))` of `self(w, shape)`: the same
        quantized weight stored the other way, made once per quantization (with it when the
        cache was made with `transposed`, else from q at the first call). FP8 tensor-core
        products read the weight K-major; a product that would read `q` N-major (the
        trans_b=False form of `[E, K, N]` storage, or an input gradient) reads this instead."""
        q, s = self(w, shape)
        entry = self._entries[(id(w), shape)]
        if len(entry) < 4:
            with _made_for_autograd():
                entry = entry + ((q.transpose(1, 2).contiguous(), s.transpose(1, 2)),)
            self._entries[(id(w), shape)] = entry
        return entry[3]

    def pair(self, a: torch.Tensor, b: torch.Tensor, shape: Tuple[int, ...]):
        """((q, s), (t, sᵀ)) of `a` and `b` viewed as `shape` [E, N, K] and stacked along N
        ([E, 2N, K], each expert's a rows then b rows; t [E, K, 2N] the same stored the other way),
        N a multiple of Q (each block from one of them: equal to their own quantizations side by
        side). Made again only when either changed, written straight into the stacked tensors; a
        weight whose own quantization the cache holds (`seed`: a checkpoint's values and scales)
        is taken as it is."""
        key = ("pair", id(a), id(b), shape)
        stamps = (_stamp(a), _stamp(b))
        hit = self._entries.get(key)
        if hit is None or hit[0]() is not a or hit[1]() is not b or hit[2] != stamps:
            va, vb = a.detach().view(shape), b.detach().view(shape)
            E, N, K = va.shape
            if N % Q or vb.shape != va.shape:
                raise ValueError(f"pair: expected two [E, N, K] views with N a multiple of {Q}, got "
                                 f"{tuple(va.shape)} and {tuple(vb.shape)}")
            q = torch.empty((E, 2 * N, K), dtype=FP8_DTYPE, device=a.device)
            s = torch.empty((E, 2 * N // Q, -(-K // Q)), dtype=torch.float32, device=a.device)
            t = torch.empty((E, K, 2 * N), dtype=FP8_DTYPE, device=a.device)
            with _made_for_autograd():
                for i, (w, v) in enumerate(((a, va), (b, vb))):
                    rows, blocks = slice(i * N, (i + 1) * N), slice(i * N // Q, (i + 1) * N // Q)
                    known = self._current(w, shape)
                    if known is None:
                        quantize_blocks(v, transposed=True, out=(q[:, rows], s[:, blocks], t[:, :, rows]))
                    else:
                        q[:, rows], s[:, blocks] = known
                        t[:, :, rows] = known[0].transpose(1, 2)
            hit = (weakref.ref(a), weakref.ref(b), stamps, ((q, s), (t, s.transpose(1, 2))))
            self._entries[key] = hit
        return hit[3]

    def seed(self, w: torch.Tensor, quantized: Tuple[torch.Tensor, torch.Tensor],
             shape: Optional[Tuple[int, ...]] = None) -> None:
        """Makes `(q, s)` the cached quantization of `w` (viewed as `shape`) until `w` changes: a
        checkpoint's own FP8 values and scales, used as they are instead of quantized again."""
        q, s = quantized
        view = w.shape if shape is None else w.detach().view(shape).shape
        blocks = (view[0], -(-view[1] // Q), -(-view[2] // Q))
        if q.dtype != FP8_DTYPE or tuple(q.shape) != tuple(view) or tuple(s.shape) != blocks or s.dtype != torch.float32:
            raise ValueError(f"quantized: expected e4m3 values {tuple(view)} and fp32 scales {blocks}, got "
                             f"{q.dtype} {tuple(q.shape)} and {s.dtype} {tuple(s.shape)}")
        stamp = _stamp(w)
        self._entries[(id(w), shape)] = (weakref.ref(w), stamp, (q, s))
        for key in [k for k in self._entries if k[0] == "pair" and id(w) in k[1:3]]:  # made from w before
            del self._entries[key]

    def __getstate__(self):  # copies and pickles of a module start with an empty cache
        return {"_entries": {}}


def _k_major(w_q, w_s, t, trans_b):
    """(values, scales, trans_b) of the product `trans_b` over (w_q, w_s) that reads the weight
    K-major: as given, or through `t` = (w_q^T, w_s^T) stored the other way (the same product
    with trans_b flipped), where w_q would be read N-major."""
    logical = w_q if trans_b else w_q.transpose(1, 2)  # [E, N, K] as gmm_fp8 reads it
    if t is None or logical.stride(2) == 1:
        return w_q, w_s, trans_b
    return t[0], t[1], not trans_b


class _Fp8Gmm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, batch_sizes, trans_b, w_q, w_s, t_q, t_s, fp8_wgrad):
        x_q, x_s = quantize_rows(x)
        t = None if t_q is None else (t_q, t_s)
        ctx.save_for_backward(x, w_q, w_s, t_q, t_s, batch_sizes)
        ctx.trans_b, ctx.fp8_wgrad, ctx.w_dtype = trans_b, fp8_wgrad, w.dtype
        q, s, tb = _k_major(w_q, w_s, t, trans_b)
        return gmm_fp8(x_q, x_s, q, s, batch_sizes, out_dtype=x.dtype, trans_b=tb)

    @staticmethod
    def backward(ctx, grad):
        x, w_q, w_s, t_q, t_s, batch_sizes = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            g_q, g_s = quantize_rows(grad)
            q, s, tb = _k_major(w_q, w_s, None if t_q is None else (t_q, t_s), not ctx.trans_b)
            grad_x = gmm_fp8(g_q, g_s, q, s, batch_sizes, out_dtype=x.dtype, trans_b=tb)
        if ctx.needs_input_grad[1]:
            a, b = (grad, x) if ctx.trans_b else (x, grad)
            if ctx.fp8_wgrad:  # both operands K-major by blocks: each step one FP8 tensor-core product
                grad_w = gmm_fp8_wgrad(*quantize_cols_grouped(a, batch_sizes, transposed=True),
                                       *quantize_cols_grouped(b, batch_sizes, transposed=True),
                                       batch_sizes, out_dtype=ctx.w_dtype, rows=a.shape[0])
            else:
                grad_w = _gmm.gmm(a, b, batch_sizes, trans_a=True)
        return grad_x, grad_w, None, None, None, None, None, None, None


def fp8_gmm(x_MK: torch.Tensor, w: torch.Tensor, batch_sizes: torch.Tensor, trans_b: bool = True,
            weights: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, fp8_wgrad: bool = False,
            weights_t: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Differentiable grouped GEMM with FP8 operands: out[rows of e] = x[rows of e] @ w[e]^T
    (`trans_b`, w `[E, N, K]`) or @ w[e] (w `[E, K, N]`), in x's dtype.

    Args:
        x_MK: `[M, K]` float32/float16/bfloat16, rows grouped by `batch_sizes`, last dim
            contiguous; quantized in 1 x 128 tiles in the forward.
        w: the weights (x's dtype).
        batch_sizes: `[E]` int32/int64 rows per group on x's device, summing to M.
        weights: `quantize_blocks(w)` when the caller keeps it (`Fp8WeightCache`); else the
            weights are quantized in this call.
        fp8_wgrad: the weight gradient in FP8 (`gmm_fp8_wgrad`) or, by default, unquantized: on an
            H200 the FP8 product ran level with the bf16 variable-K GEMM on mixtral's shapes (2.94
            against 3.06 ms) and slower with its two column quantizations (3.42 ms;
            benchmarks/RESULTS.md, "The Gluon products' output stored by TMA").
        weights_t: `weights` stored the other way (`Fp8WeightCache.transposed`), read by the
            products (forward or input gradient) that would read `weights` N-major; without it
            `gmm_fp8` copies the weight K-major for each such product.

    Raises:
        ValueError, TypeError: as `quantize_rows` and `gmm_fp8`, or `w` of another dtype than x.
    """
    if not isinstance(w, torch.Tensor) or w.dtype != x_MK.dtype:
        raise TypeError(f"w: expected a tensor of x's dtype {x_MK.dtype}, got "
                        f"{getattr(w, 'dtype', type(w).__name__)}")
    w_q, w_s = weights if weights is not None else quantize_blocks(w.detach())
    if not isinstance(fp8_wgrad, bool):
        raise TypeError(f"fp8_wgrad: expected a bool, got {type(fp8_wgrad).__name__}")
    t_q, t_s = weights_t if weights_t is not None else (None, None)
    return _Fp8Gmm.apply(x_MK, w, batch_sizes, trans_b, w_q, w_s, t_q, t_s, fp8_wgrad)


__all__ = [
    "E4M3_MAX", "FP8_DTYPE", "Fp8WeightCache", "Q", "dequantize_blocks", "dequantize_cols_grouped", "dequantize_rows",
    "fp8_gmm", "gather_gmm_fp8_glu_quantize", "gather_quantize_cols", "gather_quantize_rows",
    "glu_backward_quantize_rows_", "glu_backward_quantize_rows_cols", "glu_quantize_cols", "glu_quantize_rows",
    "gmm_fp8", "gmm_fp8_glu_quantize", "gmm_fp8_reference",
    "gmm_fp8_wgrad", "gmm_fp8_wgrad_reference", "quantize_blocks", "quantize_blocks_reference",
    "quantize_cols_grouped", "quantize_cols_grouped_reference", "quantize_rows", "quantize_rows_and_cols",
    "quantize_rows_reference",
]
