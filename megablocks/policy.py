"""`KernelPolicy`: which fused forms and thresholds the layers and ops run, in one place.

Every kernel choice that is not forced by correctness is a field here, with its measured default
and the reason for it (benchmarks/RESULTS.md holds the measurements). A layer carries its policy in
`Arguments.kernel_policy` (saved with the layer's configuration, overridable per layer); the ops
that make a choice take the fields they need as explicit arguments; `fused_moe` and transformers'
experts path take a policy. Nothing reads a process-wide switch: a reader sees in the policy what a
layer runs, and an A/B measurement builds two policies (`benchmarks/bench_dmoe.py --levers`).

    from megablocks.policy import KernelPolicy
    args = Arguments(..., kernel_policy=KernelPolicy(fused_gather=False))
    args = Arguments(..., kernel_policy={"fused_gather": False})      # the same, from a config file
"""

import dataclasses
from typing import Any, Dict, Mapping, Union


@dataclasses.dataclass(frozen=True)
class KernelPolicy:
    """The kernel choices of a layer. Defaults are the measured fastest (H100, bf16, Triton 3.6).

    Attributes:
        fused_glu_input_grad: the grouped GLU computes its two up projections as one op whose
            input gradient accumulates both products in one pass (`megablocks.ops.gmm_shared_input`).
            Forward+backward olmoe 11.15 -> 10.55 ms, qwen3moe 9.31 -> 9.01 ms; mixtral even.
        fused_glu_input_grad_max_ffn: ... for ffn sizes per expert up to this (mixtral, F = 14336,
            where the add is small next to the GEMMs, measured 27.49 -> 27.61 ms; sizes between
            1024 and 14336 not measured).
        fused_gather: where the shared-input pair is taken, the grouped GEMMs read the token rows
            through the routing's row maps instead of a gathered `[N, H]` copy. Peak memory olmoe
            2.32 -> 1.82 GiB, qwen3moe 2.19 -> 1.76 GiB for ~1% of the step's time; slower on
            mixtral (27.5 -> 31.7 ms) and mb_paper's MLP forward (1.49 -> 2.15 ms), where it is
            not taken.
        small_routing: routing metadata in one kernel for up to 4096 routed rows and 1022 experts
            (decode sizes): about -0.25 ms of host time per decode forward.
        one_node_experts: in training, where the grouped GLU experts read the token rows through
            the maps (the two fields above) with a fused activation, the Triton kernels, no biases,
            and no fused gradient accumulation, the up pair, the GLU and the down GEMM run
            as one autograd node (`megablocks.ops.grouped_glu`): the same kernels and results,
            less host time a step (H200, qwen3moe at T = 64: 3.13 / 3.48 -> 3.02 / 3.26 ms in two
            interleaved runs). In FP8 (with `fused_gather`, at any ffn size and number of rows)
            the node fuses the quantizers with the gather and the GLU and keeps no gathered rows;
            it keeps the GLU product as the bf16 node does, unless `memory_optimized_mlp`
            (`fp8_grouped_glu_experts`; benchmarks/RESULTS.md). MLP experts in FP8 run as a node
            too (`fp8_grouped_mlp_experts`: the gather and the activation, forward and backward,
            quantized as they are made; not with `fp8_weight_grad`). Its backward frees what it
            reads as it goes (h written over by the activation's gradient), so its graph runs
            backward once: a second backward (`retain_graph=True`) raises; set this False for that.
        one_node_experts_max_rows: ... up to this many routed rows (T·K; not in FP8). The node's backward
            keeps its saved h1, h2 (and the product) until it ends, where the composed ops free
            each after its own backward: olmoe at T = 16384 (131072 rows) peaked 1.25 GiB higher,
            for no change in time (its step is bound by the GPU, not the host).
        inference_form: without autograd, dMoE's GLU experts run the routed form (routing, the
            GLU-epilogue GEMM through the row map, the down GEMM, the scatter): decode forward
            1.15 -> 0.99 ms (mixtral, T = 64), prefill qwen3moe 1.68 -> 0.94 ms.
        fused_forms: `fused_moe` and transformers' experts path run that routed form (with the
            Triton kernels); off: gather, grouped GEMMs, GLU, scatter as separate ops. Faster or
            even at every size measured, T = 1 to 4096 on the mixtral and qwen3moe layers
            (replayed from a CUDA graph at T = 64: 1.005 -> 0.974 ms and 0.448 -> 0.434 ms).
        gather_min_ffn, gather_min_rows_per_expert: in the routed form, experts wider than
            `gather_min_ffn` with at least `gather_min_rows_per_expert` rows each read an
            `index_select` copy of the token rows instead of the row map (mixtral T = 4096
            5.15 -> 4.90 ms; qwen3moe keeps the map at every size).
        route_max_work: the routed form's one-program routing (softmax, top-k, counts and both
            row maps with no sort) is taken while (tokens rounded to its tile) x experts x top-k
            stays within this; past it, the top-k kernel and a one-program sort. One program is
            slow past a few tiles (qwen3moe, E = 128, K = 8: 23.7 µs at T = 64, work 65536,
            against 6 µs for the top-k kernel and the sort; mixtral, E = 8, K = 2: 6.1 µs at
            T = 64, work 8192); below the bound the launch it saves is worth more.
        fp8_weight_grad: with `Arguments.fp8`, the GLU experts' FP8 node (`one_node_experts`)
            computes the weight gradients in FP8 too (`gmm_fp8_wgrad`, DeepSeek-V3's 128 x 1 tiles
            down each expert's rows, b in 128 x 128 blocks with `fp8_weight_grad_b_blocks`), their
            operands quantized in the passes that already read them; off, from the unquantized
            operands (the variable-K bf16 product). On by default since b's blocks made the FP8
            product 26% faster: the training step with the weights cached on the H200, mixtral
            22.71 -> 20.31 ms (1.209x -> 1.352x bf16's), olmoe 8.45 -> 8.32 (1.187x -> 1.205x), at
            a lower extra peak (0.609 / 0.922 GiB against 0.625 / 1.011); before, 22.40 -> 22.34
            and 8.44 -> 9.02 (benchmarks/RESULTS.md). Where the gradient goes to `main_grad`, the
            FP8 product's epilogue adds it there.
        fp8_weight_grad_composed: with `fp8_weight_grad`, MLP experts and experts on the composed
            FP8 ops (`one_node_experts=False`) take FP8 weight gradients too, on the composed ops
            (`fp8_gmm(..., fp8_wgrad=True)`: each operand quantized down the rows in a pass of its
            own). Off by default: slower and more memory where measured (H200, mb_paper's step
            with the weights cached 4.45 -> 4.78 ms, extra peak 0.317 -> 0.708 GiB against bf16's
            0.379; the exp/ trainer's dmoe_125m step 116.9 ms against bf16's 98.9), though its
            loss stays within 0.3% of bf16's at 200 steps.
        fp8_weight_grad_glu_two_passes: with `fp8_weight_grad` (w1 and v1 stacked or apart), the GLU's
            gradient and its weight-gradient operand in two passes over h: the gradients written
            over it with their row tiles (`fp8.glu_backward_quantize_rows_`), then its column
            tiles (`fp8.quantize_cols_grouped`); off, one pass that writes neither gradient
            (`fp8.glu_backward_quantize_rows_cols`: 1.3 TB/s, bound by the instructions of its
            transposed e4m3 store). 18 bytes an element against 10, the same values, and faster
            on the H200 (mixtral's training rows 1.839 -> 1.395 ms, olmoe's 1.021 -> 0.844;
            benchmarks/RESULTS.md).
        fp8_weight_grad_b_blocks: with `fp8_weight_grad`, each weight gradient's b operand (the
            token rows for w1 and v1, the output gradient for w2) quantized with one power-of-two
            scale per 128 x 128 block instead of column tiles, so that the Gluon product promotes
            each step with one scale a row, as the forward does, instead of the outer product of
            two scale vectors moved into the product's layout: H200, the product on Mixtral's up
            projection 2.701 -> 1.996 ms, OLMoE's 0.839 -> 0.586, Qwen3-MoE's 0.730 -> 0.472
            (benchmarks/RESULTS.md). The blocks are made in the pass that quantizes b
            (`blocks=True` of `fp8.gather_quantize_cols` and `fp8.quantize_rows_and_cols` in the
            GLU experts' node, of `fp8.quantize_cols_grouped` in the composed ops), with the scales
            `fp8.cols_to_blocks_` gives the column tiles (0.03-0.13 ms an operand less than the
            column tiles coarsened after, H100). The values are the column tiles' but where one
            falls below e4m3's smallest normal (more than 2^14.8 under its block's largest):
            rounded to the nearest subnormal once (through the column tiles, twice).
        fp8_gather_wgrad_min_ffn: the FP8 node's up weights' gradients (unquantized) read a
            gathered copy of the token rows, made in the backward for both, for experts of at
            least this ffn per rank; narrower ones read the token rows through the maps. The
            variable-K product through the maps runs 26-34% slower than on contiguous rows
            (H200, `benchmarks/sweep_var_k.py --projs down up_mapped`: olmoe 1.193 against
            0.893 ms, mixtral 3.901 against 3.096). The copy ([routed rows, hidden], 512 MiB on
            olmoe) is alive with the three weight gradients at the backward's peak: with it
            (0) the step with cached weights ran olmoe 8.42 -> 7.93 and 8.46 -> 8.20 ms in two
            runs, qwen3moe 7.17 -> 6.79 and 7.28 -> 7.51 (not settled), at an extra peak of
            1.066 and 0.943 GiB, level with the bf16 layer's (1.065, 0.942) where through the
            maps it stays below (1.011, 0.575). The default keeps the maps below mixtral's width
            (F = 14336: 23.69 -> 22.37 ms gathered), as before.
        fp8_decode_glu_epilogue: `fused_moe`, transformers' experts path and dMoE's FP8 layer in
            inference (w1 and v1 stacked) on FP8 experts, at decode sizes (`fp8.glu_decode_fits`:
            up to 32 routed rows per expert, F a multiple of 128), make the GLU and quantize it in
            the up product's epilogue (`fp8.gmm_fp8_glu_quantize`): one launch fewer and h never
            written ([T·K, 2F] in 16 bits), the same bits as the two launches. On an H200 at
            T = 64, replayed (PDL mode 1, 3 stages): OLMoE 134.7 -> 130.6 µs (1.67x -> 1.72x
            bf16), Qwen3-MoE 180.4 -> 178.6, Mixtral 378.0 -> 378.8 (level).
        fp8_decode_gather_prologue: where `fp8_decode_glu_epilogue` applies, the same kernel also
            gathers the token rows and quantizes them in its K loop
            (`fp8.gather_gmm_fp8_glu_quantize`): `gather_quantize_rows` and its launch gone, the
            same bits. Off: slower than the epilogue alone on an H200 at T = 64 (OLMoE 130.6 ->
            132.3 µs, Qwen3-MoE 178.6 -> 183.3, Mixtral 378.8 -> 478.4: each of a row tile's F/128
            programs quantizes the rows again).

    Raises:
        TypeError: a field of the wrong type.
        ValueError: a negative threshold.
    """

    fused_glu_input_grad: bool = True
    fused_glu_input_grad_max_ffn: int = 4096
    fused_gather: bool = True
    one_node_experts: bool = True
    one_node_experts_max_rows: int = 4096
    small_routing: bool = True
    inference_form: bool = True
    fused_forms: bool = True
    gather_min_ffn: int = 4096
    gather_min_rows_per_expert: int = 512
    route_max_work: int = 16384
    fp8_weight_grad: bool = True
    fp8_weight_grad_composed: bool = False
    fp8_weight_grad_glu_two_passes: bool = True
    fp8_weight_grad_b_blocks: bool = True
    fp8_gather_wgrad_min_ffn: int = 4097
    fp8_decode_glu_epilogue: bool = True
    fp8_decode_gather_prologue: bool = False

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type in (bool, "bool"):
                if not isinstance(value, bool):
                    raise TypeError(f"kernel_policy.{field.name}: expected a bool, got {type(value).__name__}")
            else:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise TypeError(f"kernel_policy.{field.name}: expected an int, got {type(value).__name__}")
                if value < 0:
                    raise ValueError(f"kernel_policy.{field.name}: expected an int >= 0, got {value}")

    def replace(self, **changes: Any) -> "KernelPolicy":
        """A copy with `changes` (field names of this class) applied."""
        return KernelPolicy.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> Dict[str, Any]:
        """The fields as a plain dict (for a configuration file)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> "KernelPolicy":
        """A policy from a mapping of field names (missing ones keep their defaults).

        Raises:
            ValueError: a name that is not a field.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - names)
        if unknown:
            raise ValueError(f"kernel_policy: unknown fields {unknown}; expected names from {sorted(names)}")
        return cls(**fields)


def as_policy(value: Union[None, KernelPolicy, Mapping[str, Any]], name: str = "kernel_policy") -> KernelPolicy:
    """`value` as a `KernelPolicy`: None gives the defaults, a mapping its fields.

    Raises:
        TypeError: anything else.
    """
    if value is None:
        return KernelPolicy()
    if isinstance(value, KernelPolicy):
        return value
    if isinstance(value, Mapping):
        return KernelPolicy.from_dict(value)
    raise TypeError(f"{name}: expected a KernelPolicy, a dict of its fields or None, got {type(value).__name__}")
