"""Expert MLPs `act(x W1) W2` with MegaBlocks' parameter layouts, and the shared expert.

Legend: E experts, H hidden, F ffn per expert, C capacity (rows per expert), P padded rows,
N = T·K routed rows.

    MLP         (MoE, capacity)   w1 [E, H, F], w2 [E, F, H]      x [E, C, H] -> [E, C, H]  (bmm)
    SparseMLP   (dMoE, sparse)    w1 [E·F, H],  w2 [E·F, H]       x [P, H] + topology -> [P, H]
    GroupedMLP  (dMoE, grouped)   w1 [E·F, H],  w2 [E·F, H]       x [N, H] + counts [E] -> [N, H]
                                                                  (or x [T, H] + counts + row maps)

Row `e·F + f` of a dMoE weight is row f of expert e: `h = x @ w1_e^T`, `y = act(h) @ w2_e`.

With `moe_expert_bias` (gpt-oss) each expert also has biases `w1_bias` [E, F] (and `v1_bias` for
a GLU) and `w2_bias` [E, H]: `y = act(h + b1_e) @ w2_e + b2_e`, added by
`megablocks.ops.expert_bias.add_expert_bias` to the rows of each expert on every path: by the
rows' experts from the counts (grouped), by the block columns and block rows of the topology
(block-sparse: padding rows and unused slots get a bias too, and nothing reads them), by expert
(`MLP`'s [E, C, ·]). Expert parallelism shards them over experts like w1 and w2.

With `memory_optimized_mlp` the activation output is not kept for the backward: it is recomputed
from the (kept) pre-activation when the backward needs it, so the gradients are bitwise the same
and each layer keeps one activation-sized tensor less (two for a GLU on the unfused path; one for
the fused GLU op, which never keeps the activation) between forward and backward.
It works through saved-tensor hooks in eager mode (under `torch.compile` the plain form is traced
and the compiler plans memory); do not nest it inside activation checkpointing, which already
recomputes the whole layer.
"""

from typing import Callable, List, Optional, Tuple

import stk
import torch

from megablocks._checks import FLOAT_DTYPES, check_tensor
from megablocks.layers import common, mpu
from megablocks.layers.activation_fn import fused_name, gated_product
from megablocks.layers.arguments import Arguments, InitFn
from megablocks.ops.activation import GATED_ACTIVATIONS, glu
from megablocks.ops.expert_bias import add_expert_bias, block_column_bias, block_row_experts, row_experts
from megablocks.ops.fp8 import Q as FP8_BLOCK
from megablocks.ops.fp8 import Fp8WeightCache, fp8_gmm
from megablocks.ops.gmm import gmm, gmm_gathered, gmm_shared_input, gmm_shared_input_gathered, weight_grad_into
from megablocks.ops.grouped_glu import (fp8_grouped_glu_experts, fp8_grouped_mlp_experts, grouped_glu_experts,
                                        one_node_applies, records_gradient)
from megablocks.ops.permute import RowMaps, gather_routed, scatter_routed
from megablocks.ops.sparse import dsd_data, sdd_data


def resolve_dtensor(weight: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor parameter (FSDP2), else the tensor itself."""
    to_local = getattr(weight, "to_local", None)
    return to_local() if callable(to_local) else weight


def create_moe_expert_weights(
    args: Arguments, num_experts: int, ffn_hidden_size: int, hidden_size: int, init_method: InitFn
) -> torch.Tensor:
    """This rank's experts' weights `[E_local, F_local, H]`, cut from all experts' `[E, F, H]`.

    The whole tensor is initialised in one call of `init_method` and then sliced
    (`mpu.expert_shard`), so the values are independent of how experts are split over processes
    for the same seed: an expert-parallel rank holds exactly the slice a single process would.
    """
    weights = torch.empty(num_experts, ffn_hidden_size, hidden_size, device=common.device(args), dtype=common.dtype(args))
    init_method(weights)
    return mpu.expert_shard(args, weights)


def create_dmoe_expert_weights(
    args: Arguments, num_experts: int, rows: int, columns: int, init_method: InitFn
) -> torch.Tensor:
    """`create_moe_expert_weights` in the dMoE layout `[E_local·rows_local, columns]`."""
    return create_moe_expert_weights(args, num_experts, rows, columns, init_method).reshape(-1, columns)


def register_expert_biases(module: torch.nn.Module, args: Arguments, *names: str) -> None:
    """Registers the experts' biases `names` on `module` with `moe_expert_bias` (else as None):
    'w1_bias' and 'v1_bias' `[E_local, F_local]`, 'w2_bias' `[E_local, H]`, zero-initialised,
    expert parameters like the weights.

    Raises:
        ValueError: with `moe_expert_bias`, experts whose FFN is split over ranks (expert
            parallelism with more ranks than experts): each rank would add the down projection's
            bias to its partial output.
    """
    if not args.moe_expert_bias:
        for name in names:
            module.register_parameter(name, None)
        return
    if mpu.hidden_sharding_degree(args) > 1:
        raise ValueError(
            "moe_expert_bias: expected each expert on one rank, got the FFN of each expert split "
            f"{mpu.hidden_sharding_degree(args)} ways (expert parallelism over more ranks than the "
            f"{args.moe_num_experts} experts): per-expert biases do not support that split"
        )
    num_experts = mpu.experts_per_rank(args)
    kw = dict(device=common.device(args), dtype=common.dtype(args))
    for name in names:
        columns = args.hidden_size if name == "w2_bias" else mpu.features_per_rank(args)
        bias = torch.nn.Parameter(torch.zeros(num_experts, columns, **kw))
        mpu.set_expert_model_parallel_attributes(bias, args.moe_expert_model_parallelism)
        module.register_parameter(name, bias)


def _cast(args: Arguments, x: torch.Tensor, params) -> list:
    """The parameters in x's dtype, their gradients scaled by 1 / W with expert parallelism
    (`mpu.expert_gradient_scale`); None stays None."""
    scale = mpu.expert_gradient_scale(args)
    return [None if w is None else mpu.scale_gradient(resolve_dtensor(w), scale).to(x.dtype) for w in params]


class _RecomputeSaved:
    """Saved-tensor hooks that drop chosen intermediates and recompute them in the backward.

    Inside the context every tensor an op saves for its backward is packed into a slot. Tensors
    registered with `recompute(t, fn)` are then taken out of their slots at exit (so they are
    freed once the forward lets go of them) and `fn()` rebuilds them, without grad, each time the
    backward unpacks them. Matching is by identity of data (pointer, shape, strides, dtype), which
    also catches an op saving its own output.
    """

    def __init__(self):
        self._slots: List[list] = []
        self._recipes = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor) -> list:
        slot = [t, None]
        self._slots.append(slot)
        return slot

    @staticmethod
    def _unpack(slot: list) -> torch.Tensor:
        tensor, recipe = slot
        if recipe is None:
            return tensor
        with torch.no_grad():
            return recipe()

    def recompute(self, t: torch.Tensor, recipe: Callable[[], torch.Tensor]) -> None:
        self._recipes.append((t, recipe))

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        for slot in self._slots:
            for t, recipe in self._recipes:
                if _same_data(slot[0], t):
                    slot[0], slot[1] = None, recipe
                    break
        self._slots, self._recipes = [], []
        return False


def _same_data(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b:
        return True
    return (
        a.device == b.device
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.data_ptr() == b.data_ptr()
    )


def expert_ffn(
    x: torch.Tensor,
    w1: torch.Tensor,
    v1: Optional[torch.Tensor],
    w2: torch.Tensor,
    *,
    up: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    down: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    activation_fn: Callable,
    memory_optimized: bool,
    up_pair: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]] = None,
    biases: Optional[Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]] = None,
    up_bias: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
    down_bias: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """`down(act(up(x, w1)) [* up(x, v1)], w2)`: the expert MLP (v1 None) or GLU.

    `up_pair(x, w1, v1)`, where given, computes both GLU up projections at once (the grouped path:
    their input gradient in one accumulating pass, `megablocks.ops.gmm_shared_input`).
    `biases` `(b1, bv1, b2)` (bv1 None for the MLP), where given, are the experts' biases:
    `up_bias(h, b)` adds b1 (bv1) to the result of the up projection(s) and `down_bias(y, b2)` b2
    to the down projection's, each to the rows of their experts.

    `up` and `down` are the two projections of one implementation (bmm, block-sparse or grouped);
    `up` returns a plain tensor (the values of a block-sparse result). A GLU whose activation
    `fused_name` recognises computes `act(h1) * h2` with the fused `megablocks.ops.glu` (one kernel
    each way; it keeps h1 and h2 for the backward, not the activation). With `memory_optimized`
    the activation output (and the GLU product) is recomputed in the backward instead of kept.
    Under `torch.compile` the compiler plans memory itself and the plain form is traced.
    """
    if v1 is not None and up_pair is not None:
        h1, h2 = up_pair(x, w1, v1)
    else:
        h1 = up(x, w1)
        h2 = None if v1 is None else up(x, v1)
    if biases is not None:
        h1 = up_bias(h1, biases[0])
        h2 = None if h2 is None else up_bias(h2, biases[1])
    fused = None if h2 is None else fused_name(activation_fn)

    def activation():
        return activation_fn(h1)

    def gated():
        if fused is not None:
            return glu(h1, h2, fused)
        return gated_product(activation_fn, h1, h2)

    if not memory_optimized or torch.compiler.is_compiling():
        y = down(activation() if h2 is None else gated(), w2)
    else:
        with _RecomputeSaved() as saved:
            if h2 is None or fused is None:
                a = activation()
                saved.recompute(a, activation)
            if h2 is not None:
                # The fused op keeps h1 and h2 for its backward; only the product is left to drop.
                a = gated() if fused is not None else a * h2
                saved.recompute(a, gated)
            y = down(a, w2)
    return y if biases is None else down_bias(y, biases[2])


def _gmm_backend(args: Arguments) -> Optional[str]:
    return None if args.gmm_backend == "auto" else args.gmm_backend


class MLP(torch.nn.Module):
    """The capacity-bounded experts of `MoE`: `w1` [E, H, F], `w2` [E, F, H], batched matmuls.

    `forward(x)` takes x [E, C, H] and returns [E, C, H].
    """

    def __init__(self, args: Arguments):
        super().__init__()
        self.args = args
        num_experts = mpu.experts_per_rank(args)
        ffn = mpu.features_per_rank(args)
        kw = dict(device=common.device(args), dtype=common.dtype(args))
        self.w1 = torch.nn.Parameter(torch.empty(num_experts, args.hidden_size, ffn, **kw))
        self.w2 = torch.nn.Parameter(torch.empty(num_experts, ffn, args.hidden_size, **kw))
        mpu.set_expert_model_parallel_attributes(self.w1, args.moe_expert_model_parallelism)
        mpu.set_expert_model_parallel_attributes(self.w2, args.moe_expert_model_parallelism)
        register_expert_biases(self, args, "w1_bias", "w2_bias")
        with torch.no_grad():
            w1 = create_moe_expert_weights(args, args.moe_num_experts, args.ffn_hidden_size, args.hidden_size, args.init_method)
            self.w1.copy_(w1.transpose(1, 2))
            self.w2.copy_(
                create_moe_expert_weights(
                    args, args.moe_num_experts, args.ffn_hidden_size, args.hidden_size, args.output_layer_init_method
                )
            )

    def _v1(self) -> Optional[torch.Tensor]:
        return None

    def _v1_bias(self) -> Optional[torch.Tensor]:
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cast = _cast(self.args, x, (self.w1, self._v1(), self.w2))
        biases = experts = None
        if self.w1_bias is not None:
            biases = _cast(self.args, x, (self.w1_bias, self._v1_bias(), self.w2_bias))
            experts = torch.arange(x.shape[0], device=x.device)

        def add_bias(h, b):  # h [E, C, ·]: expert e's rows are h[e]
            return add_expert_bias(h, b, experts, index_sorted=True)

        return expert_ffn(
            x, *cast, up=torch.bmm, down=torch.bmm,
            activation_fn=self.args.activation_fn, memory_optimized=self.args.memory_optimized_mlp,
            biases=biases, up_bias=add_bias, down_bias=add_bias,
        )


class SparseMLP(torch.nn.Module):
    """The dMoE experts on the block-sparse path: `w1`, `w2` [E·F, H].

    `forward(x, topo)` takes the padded expert-ordered rows x [P, H] and the topology of
    `megablocks.ops.make_topology`, and returns [P, H]:
    `dsd(act(sdd(x, w1^T, topo)), w2)`.
    """

    def __init__(self, args: Arguments):
        super().__init__()
        self.args = args
        self._num_rows_per_rank = mpu.experts_per_rank(args) * mpu.features_per_rank(args)
        kw = dict(device=common.device(args), dtype=common.dtype(args))
        self.w1 = torch.nn.Parameter(torch.empty(self._num_rows_per_rank, args.hidden_size, **kw))
        self.w2 = torch.nn.Parameter(torch.empty(self._num_rows_per_rank, args.hidden_size, **kw))
        with torch.no_grad():
            self.w1.copy_(
                create_dmoe_expert_weights(args, args.moe_num_experts, args.ffn_hidden_size, args.hidden_size, args.init_method)
            )
            self.w2.copy_(
                create_dmoe_expert_weights(
                    args, args.moe_num_experts, args.ffn_hidden_size, args.hidden_size, args.output_layer_init_method
                )
            )
        self._should_set_parallelism_attribute = args.moe_expert_model_parallelism
        mpu.set_expert_model_parallel_attributes(self.w1, self._should_set_parallelism_attribute)
        mpu.set_expert_model_parallel_attributes(self.w2, self._should_set_parallelism_attribute)
        register_expert_biases(self, args, "w1_bias", "w2_bias")

    def _v1(self) -> Optional[torch.Tensor]:
        return None

    def _v1_bias(self) -> Optional[torch.Tensor]:
        return None

    def _cast_weights(self, x: torch.Tensor):
        """The weights in x's dtype; with expert parallelism their gradients are scaled by 1 / W
        (`mpu.expert_gradient_scale`)."""
        return _cast(self.args, x, (self.w1, self._v1(), self.w2))

    def _cast_biases(self, x: torch.Tensor):
        """`(b1, bv1, b2)` as `_cast_weights` gives the weights (bv1 None for the MLP), or None
        without `moe_expert_bias`."""
        if self.w1_bias is None:
            return None
        return _cast(self.args, x, (self.w1_bias, self._v1_bias(), self.w2_bias))

    def forward(self, x: torch.Tensor, topo: stk.Matrix) -> torch.Tensor:
        def up(x, w):
            return sdd_data(x, w.t(), topo)

        def down(a, w):
            return dsd_data(a, topo, w)

        def up_bias(data, b):  # block values [nnz, B, B]: slot s holds block column column_indices[s]
            return add_expert_bias(data, block_column_bias(b, topo.blocking), topo.column_indices)

        def down_bias(y, b):  # padded rows [P, H] in block rows of B rows, each of one expert
            block = topo.blocking
            experts = block_row_experts(topo.column_indices, -(-mpu.features_per_rank(self.args) // block))
            return add_expert_bias(y.view(y.shape[0] // block, block, -1), b, experts,
                                   index_sorted=True).view(y.shape)

        return expert_ffn(
            x, *self._cast_weights(x), up=up, down=down,
            activation_fn=self.args.activation_fn, memory_optimized=self.args.memory_optimized_mlp,
            biases=self._cast_biases(x), up_bias=up_bias, down_bias=down_bias,
        )


class GroupedMLP(SparseMLP):
    """The dMoE experts on the grouped-GEMM path (same parameters as `SparseMLP`).

    `forward(x, tokens_per_expert)` takes the expert-ordered rows x [N, H] and the rows of each
    expert [E] (on the device; the 'gg' backend copies them to the host) and returns [N, H].
    `forward(x, tokens_per_expert, maps)` takes the token rows x [T, H] and the `RowMaps` that
    order them by expert (`megablocks.ops.permute.route`) instead: the up projection(s) read x
    through the maps (`gmm_gathered`), the result is the same [N, H].
    """

    def _shared_input_pair(self) -> bool:
        """Whether the GLU's up projections are one op (`KernelPolicy.fused_glu_input_grad`, up to
        `fused_glu_input_grad_max_ffn` features per expert and rank; not in FP8)."""
        policy = self.args.kernel_policy
        return (
            self._v1() is not None
            and self.args.fp8 is None
            and policy.fused_glu_input_grad
            and mpu.features_per_rank(self.args) <= policy.fused_glu_input_grad_max_ffn
        )

    def _grad_accumulators(self, weights) -> dict:
        """Gradient-accumulation fusion: `{id(w): acc}` for each weight of this forward that is its
        parameter itself (no cast, no gradient scale) and whose parameter has an fp32 `main_grad`
        (`megablocks.optim.MainWeightsAdamW.fuse_grad_accumulation`): the weight gradients of
        those are added to `main_grad` by the kernels instead of coming back as `.grad`. Off under
        torch.compile and without autograd. In FP8 too: the composed products' and the one-node
        form's weight gradients (unquantized products) are added the same way, and their FP8 weight
        gradients (`fp8_weight_grad`) by the FP8 product's epilogue."""
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return {}
        accs = {}
        for w, p in zip(weights, (self.w1, self._v1(), self.w2)):
            acc = getattr(p, "main_grad", None)
            if p is not None and w is p and p.requires_grad and isinstance(acc, torch.Tensor):
                if acc.dtype != torch.float32 or acc.shape != p.shape or not acc.is_contiguous():
                    raise ValueError(f"main_grad: expected a contiguous float32 tensor of the parameter's shape "
                                     f"{tuple(p.shape)}, got {tuple(acc.shape)} {acc.dtype}")
                accs[id(w)] = acc
        return accs

    def _fp8_node(self) -> bool:
        """Whether this layer's experts may run as an FP8 one-node form: GLU experts
        (`megablocks.ops.grouped_glu.fp8_grouped_glu_experts`), or MLP experts without FP8 weight
        gradients (`fp8_grouped_mlp_experts`: with the policy's `fp8_weight_grad` and
        `fp8_weight_grad_composed`, MLP experts take the composed FP8 ops, whose `fp8_gmm` makes
        them); FP8, the policy's
        `one_node_experts`, the Triton kernels, no biases."""
        policy = self.args.kernel_policy
        return (self.args.fp8 is not None and (self._v1() is not None or not self._fp8_composed_wgrad())
                and self.w1_bias is None and policy.one_node_experts and _gmm_backend(self.args) in (None, "triton"))

    def _fp8_composed_wgrad(self) -> bool:
        """Whether the composed FP8 ops (MLP experts, `one_node_experts=False`) make FP8 weight
        gradients: the policy's `fp8_weight_grad` and `fp8_weight_grad_composed`."""
        policy = self.args.kernel_policy
        return policy.fp8_weight_grad and policy.fp8_weight_grad_composed

    def reads_token_rows(self) -> bool:
        """Whether `forward` should be given the token rows and the row maps
        (`KernelPolicy.fused_gather`, where the shared-input pair or the FP8 one-node form is taken)."""
        return self.args.kernel_policy.fused_gather and (self._shared_input_pair() or self._fp8_node())

    def takes_combine(self) -> bool:
        """Whether `forward` should be given the combine's weights (`combine_weights`) and return
        the token rows: where the FP8 one-node form may be taken (its node then holds the combine,
        so that the rows' output gradient is made in its backward and goes once used)."""
        return self._fp8_node() and self.reads_token_rows()

    def _one_node_activation(self, x: torch.Tensor, weights, accs: dict, maps: RowMaps) -> Optional[str]:
        """The fused activation's name where this forward's experts run as one autograd node
        (`KernelPolicy.one_node_experts`, up to `one_node_experts_max_rows` routed rows but in
        FP8; `megablocks.ops.grouped_glu`): token rows read through the maps, the Triton kernels, a
        fused activation, no biases, no fused gradient accumulation, a gradient to record (in FP8
        also none: the node's forward serves inference) in plain eager mode. Else None: the
        composed ops."""
        args, policy = self.args, self.args.kernel_policy
        unquantized = (policy.one_node_experts and maps.row_assignment.shape[0] <= policy.one_node_experts_max_rows
                       and self.reads_token_rows() and self._shared_input_pair() and self.w1_bias is None
                       and not accs and _gmm_backend(args) in (None, "triton"))
        # The FP8 node at any number of rows: it lets go of its intermediates as its backward goes
        # and keeps less than the composed FP8 ops.
        if not (unquantized or self._fp8_node()):
            return None
        activation = fused_name(args.activation_fn)
        if activation is None or not one_node_applies(x, *weights, inference=self.args.fp8 is not None):
            return None
        if self._v1() is None and activation in GATED_ACTIVATIONS:
            return None  # a GLU activation on MLP experts: not the MLP node's (the composed ops decide)
        return activation

    def forward(
        self, x: torch.Tensor, tokens_per_expert: torch.Tensor, maps: Optional[RowMaps] = None,
        combine_weights: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The experts' output rows `[N, H]` in expert order; with `combine_weights` (the routing
        weights, one per assignment; `maps` given) the token rows `[T, H]` they combine to
        (`scatter_routed(rows, maps, combine_weights)`), which the FP8 one-node form computes in
        its own node."""
        if combine_weights is not None:
            if maps is None:
                raise ValueError("combine_weights: the combine reads the row maps; expected maps, got None")
            check_tensor("combine_weights", combine_weights, ndim=1, dtypes=FLOAT_DTYPES)
            if combine_weights.numel() != maps.assignment_row.numel():
                raise ValueError(f"combine_weights: expected {maps.assignment_row.numel()} elements (one per "
                                 f"assignment), got {combine_weights.numel()}")
        out, combined = self._rows(x, tokens_per_expert, maps, combine_weights)
        if combine_weights is not None and not combined:
            out = scatter_routed(out, maps, combine_weights)
        return out

    def _rows(self, x: torch.Tensor, tokens_per_expert: torch.Tensor, maps: Optional[RowMaps],
              combine_weights: Optional[torch.Tensor]) -> Tuple[torch.Tensor, bool]:
        """(`forward`'s rows, False), or (the token rows, True) where the FP8 node took the combine."""
        num_experts = mpu.experts_per_rank(self.args)
        hidden = self.args.hidden_size
        backend = _gmm_backend(self.args)

        weights = self._cast_weights(x)
        accs = self._grad_accumulators(weights)
        if maps is not None:
            activation = self._one_node_activation(x, weights, accs, maps)
            if activation is not None and self.args.fp8 is not None:
                # The up weights' gradients read gathered rows (`fp8_gather_wgrad_min_ffn`).
                gathered = mpu.features_per_rank(self.args) >= self.args.kernel_policy.fp8_gather_wgrad_min_ffn
                # Without a gradient to record, only the forms the forward reads.
                alone = not records_gradient((x, *weights, combine_weights))
                if self._v1() is None:
                    w1, _, w2 = weights
                    out = fp8_grouped_mlp_experts(x, w1, w2, tokens_per_expert, maps, activation,
                                                  self._fp8_quantized(num_experts, hidden, alone),
                                                  gathered_wgrad=gathered, weights_N=combine_weights,
                                                  keep_product=not self.args.memory_optimized_mlp,
                                                  accs=[accs.get(id(w)) for w in (w1, w2)])
                    return out, combine_weights is not None
                out = fp8_grouped_glu_experts(x, *weights, tokens_per_expert, maps, activation,
                                              self._fp8_quantized(num_experts, hidden, alone), gathered_wgrad=gathered,
                                              weights_N=combine_weights,
                                              fp8_wgrad=self.args.kernel_policy.fp8_weight_grad,
                                              glu_two_passes=self.args.kernel_policy.fp8_weight_grad_glu_two_passes,
                                              wgrad_b_blocks=self.args.kernel_policy.fp8_weight_grad_b_blocks,
                                              keep_product=not self.args.memory_optimized_mlp,
                                              decode_glu_epilogue=self.args.kernel_policy.fp8_decode_glu_epilogue,
                                              accs=[accs.get(id(w)) for w in weights])
                return out, combine_weights is not None
            if activation is not None:
                return grouped_glu_experts(x, *weights, tokens_per_expert, maps, activation,
                                           keep_product=not self.args.memory_optimized_mlp), False
            if self.args.fp8 is not None:  # the composed FP8 ops read the rows in expert order
                x, maps = gather_routed(x, maps), None
        shape = (num_experts, -1, hidden)

        def operand(w):  # detached where its gradient goes to main_grad through `fused`
            if accs and id(w) in accs:  # (no id() while compiling: accs is empty then)
                w = w.detach()
            return w.view(shape)

        def fused(out, a, w, trans_b, row_maps=None):
            if not accs or id(w) not in accs:
                return out
            b = w.view(shape)
            return weight_grad_into(out, a, b, accs[id(w)].view(b.shape), tokens_per_expert, row_maps,
                                    trans_b=trans_b, backend=backend)

        def up(x, w):
            if maps is not None:
                out = gmm_gathered(x, operand(w), tokens_per_expert, maps, trans_b=True, backend=backend)
            else:
                out = gmm(x, operand(w), tokens_per_expert, trans_b=True, backend=backend)
            return fused(out, x, w, True, maps)

        def down(a, w):
            return fused(gmm(a, operand(w), tokens_per_expert, backend=backend), a, w, False)

        def up_pair(x, w1, v1):
            if maps is not None:
                h1, h2 = gmm_shared_input_gathered(x, operand(w1), operand(v1), tokens_per_expert, maps,
                                                   trans_b=True, backend=backend)
            else:
                h1, h2 = gmm_shared_input(x, operand(w1), operand(v1), tokens_per_expert, trans_b=True,
                                          backend=backend)
            return fused(h1, x, w1, True, maps), fused(h2, x, v1, True, maps)

        projections = (up, down)
        if self.args.fp8 is not None:
            projections = self._fp8_projections(weights, tokens_per_expert, num_experts, hidden, accs)

        biases = self._cast_biases(x)
        experts = None
        if biases is not None:
            # The expert of each of the N routed rows (in expert order), from the counts.
            rows = x.shape[0] if maps is None else maps.row_assignment.shape[0]
            experts = row_experts(tokens_per_expert.to(x.device), rows)

        def add_bias(h, b):
            return add_expert_bias(h, b, experts, index_sorted=True)

        return expert_ffn(
            x, *weights, up=projections[0], down=projections[1],
            up_pair=up_pair if self._shared_input_pair() else None,
            activation_fn=self.args.activation_fn, memory_optimized=self.args.memory_optimized_mlp,
            biases=biases, up_bias=add_bias, down_bias=add_bias,
        ), False

    def _fp8_cache(self) -> Fp8WeightCache:
        if "_fp8_weights" not in self.__dict__:
            # A plain attribute: not state, not copied. Each quantization also makes the weight
            # stored the other way, which the N-major products read.
            self._fp8_weights = Fp8WeightCache(transposed=True)
        return self._fp8_weights

    def fp8_stacks_up_weights(self) -> bool:
        """Whether the FP8 node quantizes and multiplies w1 and v1 stacked (`Fp8WeightCache.pair`):
        F a multiple of 128, up to the policy's `fused_glu_input_grad_max_ffn`."""
        ffn = mpu.features_per_rank(self.args)
        return (self._v1() is not None and self.w1.numel() > 0 and ffn % FP8_BLOCK == 0
                and ffn <= self.args.kernel_policy.fused_glu_input_grad_max_ffn)

    def _fp8_quantized(self, num_experts: int, hidden: int, alone: bool = False):
        """(q, s) of w1, w1ᵀ, v1, v1ᵀ, w2, w2ᵀ viewed [E, F, H] (`fp8_grouped_glu_experts`), or,
        F a multiple of 128 up to the policy's `fused_glu_input_grad_max_ffn`, of [w1; v1]
        stacked, its transpose, w2, w2ᵀ; each quantized from its parameter once per optimizer
        step, in the module's cache. (Stacked, mixtral's FP8 products took 12.48 ms a step
        against 11.56 apart; olmoe's 3.74 against 4.08: benchmarks/RESULTS.md.) `alone`
        (inference): only the forms the node's forward reads, [w1; v1] or w1 and v1 and w2ᵀ, made
        and held; None in the backward's places."""
        cache, shape = self._fp8_cache(), (num_experts, -1, hidden)
        out = []
        if self.fp8_stacks_up_weights():
            out += list(cache.pair(self.w1, self._v1(), shape, alone=alone))
        else:
            for p in (self.w1, self._v1()):
                if p is not None:  # (MLP experts: w1, w1ᵀ, w2, w2ᵀ)
                    out += [cache(p, shape, alone=alone), None if alone else cache.transposed(p, shape)]
        return out + [None if alone else cache(self.w2, shape), cache.transposed(self.w2, shape, alone=alone)]

    def _fp8_projections(self, weights, tokens_per_expert: torch.Tensor, num_experts: int, hidden: int,
                         accs: dict):
        """`up` and `down` in FP8 (`Arguments.fp8`) for the cast `weights` (w1, v1, w2) of this
        forward: each is quantized from its parameter (not from the per-forward cast) once per
        optimizer step, in the module's cache (`_fp8_product`). A weight whose gradient goes to
        its `main_grad` (gradient-accumulation fusion, `accs`) has it added there by `fp8_gmm`
        itself (`accumulate_into`: the FP8 weight-gradient product's epilogue with the policy's
        `fp8_weight_grad` and `fp8_weight_grad_composed`, else the variable-K kernel's), the
        gradient it would return without the fusion."""
        shape = (num_experts, -1, hidden)

        def product(a, w, p, trans_b):
            acc = accs.get(id(w))
            return self._fp8_product(a, w, p, tokens_per_expert, shape, trans_b,
                                     None if acc is None else acc.view(shape))

        def up(x, w):  # w1's cast or v1's
            return product(x, w, self.w1 if w is weights[0] else self._v1(), True)

        def down(a, w):
            return product(a, w, self.w2, False)

        return up, down

    @torch.compiler.disable
    def _fp8_product(self, a: torch.Tensor, w: torch.Tensor, p: torch.nn.Parameter, tokens_per_expert: torch.Tensor,
                     shape, trans_b: bool, acc: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`fp8_gmm` of `a` and the cast weight `w`, quantized from its parameter `p` in the module's
        cache. Run eagerly under `torch.compile` (a graph break): the cache's Python state, keyed
        by the parameters' identities, is not for a traced graph to freeze.

        Each weight is also stored the other way (once per step): the up projections' input
        gradients and the down projection's forward read it K-major, as FP8 products need. The
        weight's gradient is an FP8 product too with the policy's `fp8_weight_grad` and
        `fp8_weight_grad_composed` (`fp8_gmm`'s `fp8_wgrad`); where `acc` (its `main_grad`) is
        given, it is added there, not returned.
        Without a gradient to record only the form the forward reads is made and held: the up
        projections' (q, s), the down projection's transposed form (viewed back as its (q, s))."""
        cache = self._fp8_cache()
        if records_gradient((a, w)):
            forms, forms_t = cache(p, shape), cache.transposed(p, shape)
        elif trans_b:
            forms, forms_t = cache(p, shape, alone=True), None
        else:
            forms_t = cache.transposed(p, shape, alone=True)
            forms = (forms_t[0].transpose(1, 2), forms_t[1].transpose(1, 2))
        return fp8_gmm(a.contiguous(), w.view(shape), tokens_per_expert, trans_b=trans_b, weights=forms,
                       weights_t=forms_t, fp8_wgrad=self._fp8_composed_wgrad(), accumulate_into=acc,
                       wgrad_b_blocks=self.args.kernel_policy.fp8_weight_grad_b_blocks)


class SharedMLP(torch.nn.Module):
    """The shared expert: `down_proj(act(up_proj(x)))`, dense layers built with `args.fc_cls`.

    Keys as MegaBlocks: `up_proj` [S, H], `down_proj` [H, S] (S = shared_expert_hidden_size),
    with biases when `args.bias`. `fc_kwargs` are passed to `fc_cls` (they override `bias` and
    `device`); a `torch.nn.Linear` also gets the parameter dtype of `args`.

    With `shared_expert_glu` (DeepSeek-V3, Qwen2-MoE) a `gate_proj` [S, H] too:
    `down_proj(act(gate_proj(x)) * up_proj(x))`. With `shared_expert_gate` (Qwen2-MoE,
    Megatron-Core's `moe_shared_expert_gate`) the output is scaled per token by
    `sigmoid(gate(x))`, `gate` a bias-free [1, H] Linear.
    """

    def __init__(self, args: Arguments):
        super().__init__()
        self.args = args
        self.fc_kwargs = {"bias": args.bias, "device": common.device(args)}
        if isinstance(args.fc_cls, type) and issubclass(args.fc_cls, torch.nn.Linear):
            self.fc_kwargs["dtype"] = common.dtype(args)
        self.fc_kwargs.update(args.fc_kwargs)
        self.up_proj = args.fc_cls(args.hidden_size, args.shared_expert_hidden_size, **self.fc_kwargs)
        self.act = args.activation_fn
        self.down_proj = args.fc_cls(args.shared_expert_hidden_size, args.hidden_size, **self.fc_kwargs)
        self.down_proj._is_residual = True
        self.gate_proj = None
        if args.shared_expert_glu:
            self.gate_proj = args.fc_cls(args.hidden_size, args.shared_expert_hidden_size, **self.fc_kwargs)
        self.gate = None
        if args.shared_expert_gate:
            self.gate = torch.nn.Linear(args.hidden_size, 1, bias=False, device=common.device(args),
                                        dtype=common.dtype(args))

    def add_experts_sharedexpert(self, shared_expert_out: torch.Tensor, expert_out: torch.Tensor) -> torch.Tensor:
        """`shared + experts`, or with `shared_expert_weighted_sum` `(shared + K·experts) / (K+1)`."""
        if self.args.shared_expert_weighted_sum:
            total = self.args.moe_top_k + 1
            return shared_expert_out / total + expert_out * (self.args.moe_top_k / total)
        return shared_expert_out + expert_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is None:
            out = self.down_proj(self.act(self.up_proj(x)))
        else:
            out = self.down_proj(gated_product(self.act, self.gate_proj(x), self.up_proj(x)))
        if self.gate is not None:
            out = torch.sigmoid(self.gate(x)) * out
        return out
