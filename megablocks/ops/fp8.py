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
bf16 on a GPU): on an H200 the FP8 product with its two column quantizations ran slower than it
on mixtral's shapes (3.42 against 3.06 ms; `fp8_gmm`'s docstring).
`Fp8WeightCache` quantizes a weight once per optimizer step: again only when the storage or
version (bumped by every in-place update) changed, so micro-batches of one step share one
quantization; without a gradient to record it makes only the form the forward reads. dMoE runs
its grouped path this way with `Arguments(fp8='blockwise')`.
"""

import contextlib
import importlib
import weakref
from typing import Optional, Tuple

import torch

from megablocks.backend import gmm as _gmm
from megablocks.backend.fp8 import (
    E4M3_MAX,
    FP8_DTYPE,
    Q,
    act_backward_quantize_rows_,
    act_backward_rows_,
    act_quantize_rows,
    act_rows,
    cols_to_blocks_,
    cols_to_blocks_reference,
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
    quantize_blocks_grouped_reference,
    quantize_blocks_reference,
    quantize_cols_grouped,
    quantize_cols_grouped_reference,
    quantize_rows,
    quantize_rows_and_cols,
    quantize_rows_reference,
)

_gmm_ops = importlib.import_module("megablocks.ops.gmm")  # the module (megablocks.ops.gmm is also a function)


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


class _Entry:
    """What the cache holds for a weight or a stacked pair of weights: weak references to them,
    their stamps when it was made, the two forms ([(q, s), stored the other way], either None until
    asked for), and whether the forms are the weights' own quantization (`exact`: made again
    bit for bit by quantizing them) or given (a checkpoint's, `seed`)."""

    __slots__ = ("refs", "stamps", "forms", "exact")

    def __init__(self, weights, forms: list, exact: bool):
        self.refs = tuple(weakref.ref(w) for w in weights)
        self.stamps = tuple(_stamp(w) for w in weights)
        self.forms = forms
        self.exact = exact

    def holds(self, i: int, w: torch.Tensor) -> bool:
        """Whether its weight i is `w`, unchanged since."""
        return self.refs[i]() is w and self.stamps[i] == _stamp(w)


class Fp8WeightCache:
    """Blockwise FP8 copies of weights, made again only when a weight changed (its storage or
    its version, which every in-place update such as an optimizer step bumps).

    Each weight has two forms: `(q, s)` as `quantize_blocks` makes them (`cache(w)`), and the same
    values stored the other way (`transposed(w)`), which the products that would read `q` N-major
    read. A form is made when first asked for; a cache made with `transposed` makes both in the
    quantizing pass. `alone=True` (inference, whose forward reads one form of each weight) makes
    only the form asked for, so that the cache holds half the bytes; if a later call asks for the
    other, both are made again in one quantizing pass (the same values; a checkpoint's values,
    `seed`, are transposed instead). `nbytes()` says what the cache holds."""

    def __init__(self, transposed: bool = False):
        self._entries = {}
        self._transposed = transposed

    def __call__(self, w: torch.Tensor, shape: Optional[Tuple[int, ...]] = None,
                 alone: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """`quantize_blocks(w.view(shape))` (shape default: w's own, 3-D), from the cache when
        `w` has not changed since; `alone`: where quantized here, the transposed form not made."""
        return self._form(w, shape, 0, alone)

    def transposed(self, w: torch.Tensor, shape: Optional[Tuple[int, ...]] = None,
                   alone: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """`(q.transpose(1, 2).contiguous(), s.transpose(1, 2))` of `self(w, shape)`: the same
        quantized weight stored the other way, made once per quantization (with it when the
        cache was made with `transposed`, else from q at the first call). FP8 tensor-core
        products read the weight K-major; a product that would read `q` N-major (the
        trans_b=False form of `[E, K, N]` storage, or an input gradient) reads this instead.
        `alone`: where quantized here, only this form is kept."""
        return self._form(w, shape, 1, alone)

    def _form(self, w, shape, which: int, alone: bool):
        entry = self._entry(w, shape)
        view = lambda: w.detach() if shape is None else w.detach().view(shape)  # noqa: E731
        if entry is None:  # new, changed, or a new tensor that reuses an id
            with _made_for_autograd():
                v = view()
                if which == 0 and (alone or not self._transposed):
                    forms = [quantize_blocks(v), None]
                else:
                    q, s, t = quantize_blocks(v, transposed=True)
                    forms = [None if alone else (q, s), (t, s.transpose(1, 2))]
            entry = self._entries[(id(w), shape)] = _Entry((w,), forms, exact=True)
        elif entry.forms[which] is None and entry.exact and (which == 0 or self._transposed):
            # The other form made alone before: both again in one pass (faster than a transposing copy).
            with _made_for_autograd():
                q, s, t = quantize_blocks(view(), transposed=True)
            entry.forms[:] = [(q, s), (t, s.transpose(1, 2))]
        return _fill(entry.forms, which)

    def _entry(self, w: torch.Tensor, shape) -> Optional[_Entry]:
        """The entry of `w` viewed as `shape`, or None where there is none or `w` changed since.
        A half of a stacked pair (`pair`, `seed_pair`) made from `w` as it is serves too, copied
        into an entry of `w`'s own."""
        entry = self._entries.get((id(w), shape))
        if entry is not None and entry.holds(0, w):
            return entry
        half = self._pair_half(w, shape)
        if half is None:
            return None
        (q, s), exact = half
        with _made_for_autograd():
            forms = [(q.contiguous(), s.contiguous()), None]
        entry = self._entries[(id(w), shape)] = _Entry((w,), forms, exact)
        return entry

    def _known(self, w: torch.Tensor, shape):
        """((q, s), exact) of `w` viewed as `shape` where the cache holds them in either form or as
        a half of a stacked pair (views: nothing made or kept), else None."""
        entry = self._entries.get((id(w), shape))
        if entry is None or not entry.holds(0, w):
            return self._pair_half(w, shape)
        if entry.forms[0] is not None:
            return entry.forms[0], entry.exact
        t, st = entry.forms[1]
        return (t.transpose(1, 2), st.transpose(1, 2)), entry.exact

    def _pair_half(self, w: torch.Tensor, shape):
        """((q, s) views of `w`'s half of a cached stacked pair made from `w` as it is, whether
        that pair is exact), or None."""
        for key, entry in self._entries.items():
            for i in range(2 if key[0] == "pair" and key[3] == shape else 0):
                if entry.holds(i, w):
                    q, s = entry.forms[0]
                    return _half(i, q.shape[1] // 2, q, s, None), entry.exact
        return None

    def pair(self, a: torch.Tensor, b: torch.Tensor, shape: Tuple[int, ...], alone: bool = False):
        """((q, s), (t, sᵀ)) of `a` and `b` viewed as `shape` [E, N, K] and stacked along N
        ([E, 2N, K], each expert's a rows then b rows; t [E, K, 2N] the same stored the other way),
        N a multiple of Q (each block from one of them: equal to their own quantizations side by
        side). Made again only when either changed, written straight into the stacked tensors; a
        weight whose quantization the cache holds (`seed`: a checkpoint's values and scales; the
        unchanged half of a pair made before) is taken as it is. `alone`: where made here, t is
        not (None in its place) until a call without `alone`."""
        key = ("pair", id(a), id(b), shape)
        entry = self._entries.get(key)
        if entry is None or not (entry.holds(0, a) and entry.holds(1, b)):
            va, vb = _pair_views("pair", a, b, shape)
            E, N, K = va.shape
            q = torch.empty((E, 2 * N, K), dtype=FP8_DTYPE, device=a.device)
            s = torch.empty((E, 2 * N // Q, -(-K // Q)), dtype=torch.float32, device=a.device)
            t = None if alone else torch.empty((E, K, 2 * N), dtype=FP8_DTYPE, device=a.device)
            exact = True
            with _made_for_autograd():
                for i, (w, v) in enumerate(((a, va), (b, vb))):
                    out, known = _half(i, N, q, s, t), self._known(w, shape)
                    if known is None:
                        quantize_blocks(v, transposed=t is not None, out=out)
                        continue
                    (kq, ks), exact = known[0], exact and known[1]
                    out[0].copy_(kq)
                    out[1].copy_(ks)
                    if t is not None:
                        out[2].copy_(kq.transpose(1, 2))
            forms = [(q, s), None if t is None else (t, s.transpose(1, 2))]
            entry = self._entries[key] = _Entry((a, b), forms, exact)
        if not alone and entry.forms[1] is None and entry.exact:
            # Made alone before: both again in one pass, q and s written over with the same values.
            (q, s), views = entry.forms[0], _pair_views("pair", a, b, shape)
            t = torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=FP8_DTYPE, device=q.device)
            with _made_for_autograd():
                for i, v in enumerate(views):
                    quantize_blocks(v, transposed=True, out=_half(i, v.shape[1], q, s, t))
            entry.forms[1] = (t, s.transpose(1, 2))
        if not alone:
            _fill(entry.forms, 1)
        return tuple(entry.forms)

    def seed(self, w: torch.Tensor, quantized: Tuple[torch.Tensor, torch.Tensor],
             shape: Optional[Tuple[int, ...]] = None, transposed: bool = False) -> None:
        """Makes `quantized` the cached quantization of `w` (viewed as `shape`) until `w` changes:
        a checkpoint's own FP8 values and scales, held as they are (not copied, not quantized
        again). `(q [E, N, K], s [E, NB, KB])` as `quantize_blocks` makes them, or with
        `transposed` the same stored the other way (`[E, K, N]` values, `[E, KB, NB]` scales: a
        checkpoint's weight stored in x out).

        Raises:
            ValueError: values not e4m3 of the view's shape, or scales not fp32 of its blocks'.
        """
        view = tuple(w.shape if shape is None else w.detach().view(shape).shape)
        _check_seed(quantized, view, transposed, w.device)
        forms = [None, tuple(quantized)] if transposed else [tuple(quantized), None]
        self._drop(w)
        self._entries[(id(w), shape)] = _Entry((w,), forms, exact=False)

    def seed_pair(self, a: torch.Tensor, b: torch.Tensor, quantized: Tuple[torch.Tensor, torch.Tensor],
                  shape: Tuple[int, ...]) -> None:
        """`seed` for `pair(a, b, shape)`: `quantized` the stacked values `[E, 2N, K]` and scales
        `[E, 2NB, KB]` (a checkpoint's fused gate and up projections), held as they are; `a` or `b`
        alone is then served from its half.

        Raises:
            ValueError: as `seed`, or views whose N is not a multiple of Q.
        """
        E, N, K = _pair_views("seed_pair", a, b, shape)[0].shape
        _check_seed(quantized, (E, 2 * N, K), False, a.device)
        self._drop(a)
        self._drop(b)
        self._entries[("pair", id(a), id(b), shape)] = _Entry((a, b), [tuple(quantized), None], exact=False)

    def _drop(self, w: torch.Tensor) -> None:
        """Forgets what was made from `w` (its own entries and the pairs it is part of)."""
        for key in [k for k in self._entries if id(w) in (k[1:3] if k[0] == "pair" else k[:1])]:
            del self._entries[key]

    def clear(self) -> None:
        """Forgets every quantization (seeded ones too): the next calls quantize again."""
        self._entries.clear()

    def nbytes(self) -> int:
        """Bytes of the FP8 values and scales the cache holds (each storage once, seeded ones too)."""
        held = {}
        for entry in self._entries.values():
            for form in entry.forms:
                for x in form or ():
                    held[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return sum(held.values())

    def __getstate__(self):  # copies and pickles of a module start with an empty cache
        return {"_entries": {}, "_transposed": self._transposed}


def _check_seed(quantized, view, transposed: bool, device: torch.device) -> None:
    """A checkpoint's (values, scales) of a weight viewed `view` [E, N, K], or stored the other
    way, on the weight's device."""
    E, N, K = view
    shapes = ((E, K, N), (E, -(-K // Q), -(-N // Q))) if transposed else ((E, N, K), (E, -(-N // Q), -(-K // Q)))
    if not isinstance(quantized, (tuple, list)) or len(quantized) != 2:
        raise TypeError(f"quantized: expected a (values, scales) pair, got {type(quantized).__name__}")
    q, s = quantized
    if q.dtype != FP8_DTYPE or tuple(q.shape) != shapes[0] or s.dtype != torch.float32 or tuple(s.shape) != shapes[1]:
        raise ValueError(f"quantized: expected e4m3 values {shapes[0]} and fp32 scales {shapes[1]}, got "
                         f"{q.dtype} {tuple(q.shape)} and {s.dtype} {tuple(s.shape)}")
    if q.device != device or s.device != device:
        raise ValueError(f"quantized: expected values and scales on the weight's device {device}, got {q.device} "
                         f"and {s.device}")


def _pair_views(name: str, a: torch.Tensor, b: torch.Tensor, shape) -> Tuple[torch.Tensor, torch.Tensor]:
    """a and b viewed as `shape`, two equal [E, N, K] with N a multiple of Q (else ValueError)."""
    va, vb = a.detach().view(shape), b.detach().view(shape)
    if va.shape[1] % Q or vb.shape != va.shape:
        raise ValueError(f"{name}: expected two [E, N, K] views with N a multiple of {Q}, got "
                         f"{tuple(va.shape)} and {tuple(vb.shape)}")
    return va, vb


def _half(i: int, n: int, q, s, t):
    """Half i's slices (q, s[, t]) of a stacked pair of two [E, n, K] weights."""
    rows, blocks = slice(i * n, (i + 1) * n), slice(i * n // Q, (i + 1) * n // Q)
    return (q[:, rows], s[:, blocks]) + (() if t is None else (t[:, :, rows],))


def _fill(forms: list, which: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """forms[which] (0: (q, s); 1: stored the other way), made from the other where missing."""
    if forms[which] is None:
        q, s = forms[1 - which]
        with _made_for_autograd():
            forms[which] = (q.transpose(1, 2).contiguous(), s.transpose(1, 2))
    return forms[which]


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
    def forward(ctx, x, w, batch_sizes, trans_b, w_q, w_s, t_q, t_s, fp8_wgrad, acc, wgrad_b_blocks):
        x_q, x_s = quantize_rows(x)
        t = None if t_q is None else (t_q, t_s)
        ctx.save_for_backward(x, w_q, w_s, t_q, t_s, batch_sizes)
        # The accumulator is not saved: its values change between this forward and the backward
        # (other micro-batches' gradients), which is what it is for.
        ctx.trans_b, ctx.fp8_wgrad, ctx.w_dtype, ctx.acc = trans_b, fp8_wgrad, w.dtype, acc
        ctx.wgrad_b_blocks = wgrad_b_blocks
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
                # With wgrad_b_blocks, one scale per 128 x 128 block of b, made in the quantizing pass.
                b_q, b_s = quantize_cols_grouped(b, batch_sizes, transposed=True, blocks=ctx.wgrad_b_blocks)
                grad_w = gmm_fp8_wgrad(*quantize_cols_grouped(a, batch_sizes, transposed=True), b_q, b_s,
                                       batch_sizes, out_dtype=ctx.w_dtype, rows=a.shape[0], accumulate_into=ctx.acc)
            elif ctx.acc is not None:  # the variable-K kernel's epilogue adds it
                _gmm_ops._add_weight_grad(ctx.acc, x, grad, batch_sizes, None, None, 1, ctx.trans_b,
                                          _gmm.default_backend(x))
            else:
                grad_w = _gmm.gmm(a, b, batch_sizes, trans_a=True)
            if ctx.acc is not None:
                grad_w = None  # added into the accumulator, not returned
        return grad_x, grad_w, None, None, None, None, None, None, None, None, None


def fp8_gmm(x_MK: torch.Tensor, w: torch.Tensor, batch_sizes: torch.Tensor, trans_b: bool = True,
            weights: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, fp8_wgrad: bool = False,
            weights_t: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
            accumulate_into: Optional[torch.Tensor] = None, wgrad_b_blocks: bool = True) -> torch.Tensor:
    """Differentiable grouped GEMM with FP8 operands: out[rows of e] = x[rows of e] @ w[e]^T
    (`trans_b`, w `[E, N, K]`) or @ w[e] (w `[E, K, N]`), in x's dtype.

    Args:
        x_MK: `[M, K]` float32/float16/bfloat16, rows grouped by `batch_sizes`, last dim
            contiguous; quantized in 1 x 128 tiles in the forward.
        w: the weights (x's dtype).
        batch_sizes: `[E]` int32/int64 rows per group on x's device, summing to M.
        weights: `quantize_blocks(w)` when the caller keeps it (`Fp8WeightCache`); else the
            weights are quantized in this call.
        fp8_wgrad: the weight gradient in FP8 (`gmm_fp8_wgrad`) or, by default, unquantized. On
            an H200, with b in blocks (`wgrad_b_blocks`), the FP8 product and its operands' two
            column quantizations take 2.29 ms on mixtral's up projection against the bf16
            variable-K GEMM's 3.05, but 1.1-1.2 ms against 0.75-0.88 on olmoe's and qwen3moe's
            (benchmarks/RESULTS.md, "b in 128 x 128 blocks"): the quantizers' own passes, which the
            GLU experts' FP8 node fuses with the passes that read the operands.
        weights_t: `weights` stored the other way (`Fp8WeightCache.transposed`), read by the
            products (forward or input gradient) that would read `weights` N-major; without it
            `gmm_fp8` copies the weight K-major for each such product.
        accumulate_into: gradient-accumulation fusion (`main_grad`): a contiguous float32 tensor
            of w's shape on x's device into which the backward adds w's gradient (by the FP8
            weight-gradient product's epilogue with `fp8_wgrad`, else by the variable-K kernel's)
            instead of returning it; w's `.grad` is left alone (w is an input so that the output
            requires grad where w does). As `ops.gmm.weight_grad_into`, for FP8 products.
        wgrad_b_blocks: with `fp8_wgrad`, the weight gradient's b operand quantized with one
            scale per 128 x 128 block (`quantize_cols_grouped(..., blocks=True)`, in its one pass)
            instead of per 128 x 1 column tile: the product's promotion one scale a row; the scales
            `cols_to_blocks_` gives the column tiles, the same values but where one falls below
            e4m3's smallest normal (`KernelPolicy.fp8_weight_grad_b_blocks`).

    Raises:
        ValueError, TypeError: as `quantize_rows` and `gmm_fp8`, `w` of another dtype than x, or
            an `accumulate_into` that is not such a tensor.
    """
    if not isinstance(w, torch.Tensor) or w.dtype != x_MK.dtype:
        raise TypeError(f"w: expected a tensor of x's dtype {x_MK.dtype}, got "
                        f"{getattr(w, 'dtype', type(w).__name__)}")
    w_q, w_s = weights if weights is not None else quantize_blocks(w.detach())
    if not isinstance(fp8_wgrad, bool):
        raise TypeError(f"fp8_wgrad: expected a bool, got {type(fp8_wgrad).__name__}")
    if not isinstance(wgrad_b_blocks, bool):
        raise TypeError(f"wgrad_b_blocks: expected a bool, got {type(wgrad_b_blocks).__name__}")
    t_q, t_s = weights_t if weights_t is not None else (None, None)
    if accumulate_into is not None:
        _gmm._check_accumulator(accumulate_into, tuple(w.shape), x_MK.device, (torch.float32,), "w's shape ")
    return _Fp8Gmm.apply(x_MK, w, batch_sizes, trans_b, w_q, w_s, t_q, t_s, fp8_wgrad, accumulate_into,
                         wgrad_b_blocks)


__all__ = [
    "E4M3_MAX", "FP8_DTYPE", "Fp8WeightCache", "Q", "act_backward_quantize_rows_", "act_backward_rows_",
    "act_quantize_rows", "act_rows", "cols_to_blocks_", "cols_to_blocks_reference",
    "dequantize_blocks", "dequantize_cols_grouped", "dequantize_rows",
    "fp8_gmm", "gather_gmm_fp8_glu_quantize", "gather_quantize_cols", "gather_quantize_rows",
    "glu_backward_quantize_rows_", "glu_backward_quantize_rows_cols", "glu_quantize_cols", "glu_quantize_rows",
    "gmm_fp8", "gmm_fp8_glu_quantize", "gmm_fp8_reference",
    "gmm_fp8_wgrad", "gmm_fp8_wgrad_reference", "quantize_blocks", "quantize_blocks_grouped_reference",
    "quantize_blocks_reference",
    "quantize_cols_grouped", "quantize_cols_grouped_reference", "quantize_rows", "quantize_rows_and_cols",
    "quantize_rows_reference",
]
