"""`Arguments`: the configuration of the MoE layers, with MegaBlocks' field names and meanings.

Every field of MegaBlocks 0.10's `Arguments` is here with its default and meaning, so existing
configurations move over unchanged. Additions (gpt-oss's per-expert and router biases, router
score function, Sinkhorn balancing, an expert bias for aux-loss-free balancing, the block size and
the grouped GEMM backend) are grouped at the end and default to MegaBlocks' behaviour.

Building an `Arguments` never touches CUDA: `device=None` means "the current CUDA device when
there is one, else the CPU", resolved when a layer is built (`megablocks.layers.common.device`).
"""

import dataclasses
import math
from functools import partial
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F

from megablocks.layers.activation_fn import is_gated
from megablocks.layers.losses import MoELossCollector
from megablocks.ops import sparse as ops_sparse
from megablocks.policy import KernelPolicy, as_policy

# In-place tensor initialisation function, e.g. `partial(torch.nn.init.normal_, std=0.02)`.
InitFn = Callable[[torch.Tensor], Any]

DEFAULT_ACTIVATION_FN = partial(F.gelu, approximate="tanh")

MLP_TYPES = ("mlp", "glu")
MLP_IMPLS = ("sparse", "grouped")
# What `mlp_impl='auto'` resolves to: the path measured fastest on every config (benchmarks/
# RESULTS.md, "The training step as training runs it"); with gmm_backend='auto', Triton on CUDA.
AUTO_MLP_IMPL = "grouped"
GMM_BACKENDS = ("auto", "triton", "torch", "gg")
FP8_RECIPES = (None, "blockwise")
ROUTER_SCORE_FUNCTIONS = ("softmax", "sigmoid")
LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss")
BLOCK_SIZES = ops_sparse.BLOCK_SIZES


@dataclasses.dataclass
class Arguments:
    """Configuration shared by `MoE`, `dMoE`, their routers and expert MLPs.

    MegaBlocks fields (same names, defaults and meanings):
        hidden_size, ffn_hidden_size: model width H and per-expert FFN width F.
        num_layers: number of MoE layers in the model (scales the batched load-balancing loss).
        bias: add a learned output bias `experts.bias` [H] (zero-initialised).
        return_bias: return `(out, bias)` instead of adding the bias.
        activation_fn: elementwise activation of the expert MLPs (tanh-approximate GELU); a GLU
            activation of the gate and the linear branch, `megablocks.ops.activation.clamped_swiglu`
            (gpt-oss's clamped SwiGLU, limit 7 and alpha 1.702 fixed), needs mlp_type='glu' (the
            shared expert, if any, is then gated too).
        moe_num_experts, moe_top_k: E experts, each token routed to its top-k.
        moe_capacity_factor: `MoE` only; an expert takes at most
            `int(moe_capacity_factor * top_k * tokens / E)` rows; 0 means no dropping.
        moe_normalize_expert_weights: if set, the top-k weights are divided by their p-norm with
            this p (1 makes them sum to one).
        moe_loss_weight: weight of the load-balancing loss (0 disables it).
        moe_jitter_eps: multiplicative uniform noise in [1 - eps, 1 + eps] on the router input
            during training.
        moe_lbl_in_fp32: compute the load-balancing loss in float32.
        moe_expert_model_parallelism, expert_parallel_group: expert parallelism (see `mpu`).
        moe_expert_parallel_chunks: with expert parallelism, the local experts in this many
            chunks, each chunk's all_to_all overlapped with another chunk's expert compute,
            forward and backward (`megablocks.layers.expert_parallel`); 1 (default): one
            exchange each way. At most the local expert count is used; with experts split over
            ranks by their FFN (more ranks than experts) the exchange is not chunked.
        pipeline_model_parallel_size, num_layers_per_virtual_pipeline_stage: how many MoE layers
            one pipeline stage holds (the batched loss expects that many).
        memory_optimized_mlp: recompute the activation in the backward instead of keeping it.
        mlp_type: 'mlp' (`act(x W1) W2`) or 'glu' (`(act(x W1) * (x V1)) W2`).
        mlp_impl: 'sparse' (block-sparse products), 'grouped' (grouped GEMMs), or 'auto': the
            path measured fastest, resolved when the Arguments is built (`AUTO_MLP_IMPL`).
        fp16, bf16: parameter dtype float16 / bfloat16 (both False: the default float dtype).
        device: where parameters are created; None resolves lazily (CUDA if available, else CPU).
        init_method, output_layer_init_method: in-place initialisers of the input (router, w1,
            v1) and output (w2) projections.
        uniform_expert_assignment: route assignment i of the flattened [T*K] to expert i % E
            (benchmarking: balanced load regardless of the router).
        shared_expert, fc_cls, fc_kwargs, shared_expert_hidden_size, shared_expert_weighted_sum:
            a dense expert every token goes through, built from `fc_cls` layers, added to the MoE
            output (or averaged with weights 1/(k+1) and k/(k+1)).
        remat_act_fn: accepted for compatibility; rematerialisation is `memory_optimized_mlp`.
        moe_zloss_weight, moe_zloss_in_fp32: router z-loss weight (0 disables it) and precision.

    Additions:
        moe_expert_bias: a bias per expert on each projection, added to that expert's rows on
            every path: `experts.mlp.w1_bias` (and `v1_bias` for a GLU) [E, F] after the up
            projection(s), `experts.mlp.w2_bias` [E, H] after the down projection (gpt-oss).
            Zero-initialised expert parameters, sharded over experts like w1 / w2 with expert
            parallelism (not with the FFN split over ranks, W > E: a ValueError).
        moe_router_bias: a learned bias [E] on the router's logits (`router.layer.bias`,
            zero-initialised; gpt-oss).
        moe_router_score_function: 'softmax' (MegaBlocks) or 'sigmoid' scores.
        moe_router_fp32: compute the router logits, scores and weights in float32.
        moe_router_sinkhorn: in training, choose experts by a Sinkhorn-balanced assignment
            (S-BASE); the weights still come from the scores.
        moe_router_sinkhorn_iterations: fixed number of Sinkhorn iterations (no host sync).
        moe_router_enable_expert_bias: a per-expert bias (buffer `router.expert_bias`) added to the
            scores for choosing experts only, updated by `router.update_expert_bias()` for
            aux-loss-free balancing.
        moe_router_bias_update_rate: step of that update.
        moe_block_size: block size of the sparse path (MegaBlocks uses 128).
        gmm_backend: grouped GEMM backend of `mlp_impl='grouped'`: 'auto', 'triton', 'torch', 'gg'.
        fp8: None, or 'blockwise': the grouped path's expert products in FP8 (DeepSeek-V3's layout:
            e4m3, 1 x 128 activation tiles, 128 x 128 weight blocks; `megablocks.ops.fp8.fp8_gmm`):
            the forward products and the input gradients in FP8, the weight gradients from the
            unquantized operands; each weight quantized once per optimizer step. Needs
            mlp_impl='grouped' (or 'auto'): the block-sparse path has no FP8 form (README, "FP8
            experts"); the inference form is not taken. GLU experts in training run
            as one node reading the token rows (`megablocks.ops.grouped_glu.fp8_grouped_glu_experts`,
            the policy's `one_node_experts` and `fused_gather`).
        loss_collector: where the layers record what the batched losses need; None uses the
            process-wide collector that MegaBlocks' global functions read.
        kernel_policy: the fused forms and thresholds the layer runs (`megablocks.policy.KernelPolicy`,
            measured defaults); a dict of its fields is accepted (e.g. from a configuration file).

    Raises:
        TypeError, ValueError: on a field of the wrong type or an invalid combination.
    """

    # Model arguments.
    hidden_size: int = 1024
    ffn_hidden_size: int = 4096
    num_layers: int = 1
    bias: bool = True
    return_bias: bool = True
    activation_fn: Optional[Callable] = DEFAULT_ACTIVATION_FN

    # MoE arguments.
    moe_num_experts: int = 1
    moe_top_k: int = 1
    moe_capacity_factor: Union[int, float] = 1
    moe_normalize_expert_weights: Optional[Union[int, float]] = None
    moe_loss_weight: float = 0.1
    moe_jitter_eps: Optional[float] = None
    moe_lbl_in_fp32: bool = False

    # Parallelism arguments.
    moe_expert_model_parallelism: bool = False
    expert_parallel_group: Optional[Any] = None
    moe_expert_parallel_chunks: int = 1
    pipeline_model_parallel_size: int = 1
    num_layers_per_virtual_pipeline_stage: Optional[int] = None

    # Compute arguments.
    memory_optimized_mlp: bool = False
    mlp_type: str = "mlp"
    mlp_impl: str = "sparse"

    # Initialization arguments.
    fp16: bool = True
    bf16: bool = False
    device: Optional[Union[int, str, torch.device]] = None
    init_method: InitFn = partial(torch.nn.init.normal_, mean=0.0, std=0.02)
    output_layer_init_method: InitFn = init_method

    # Benchmarking arguments.
    uniform_expert_assignment: bool = False

    # Shared expert arguments.
    shared_expert: bool = False
    fc_cls: Any = torch.nn.Linear
    fc_kwargs: dict = dataclasses.field(default_factory=dict)
    remat_act_fn: bool = True
    shared_expert_hidden_size: Optional[int] = None
    shared_expert_weighted_sum: bool = False
    shared_expert_glu: bool = False
    shared_expert_gate: bool = False

    # Router z-loss arguments.
    moe_zloss_weight: float = 0
    moe_zloss_in_fp32: bool = False

    # Additions: expert and router biases, router, sparse blocking, grouped GEMM backend, loss bookkeeping.
    moe_expert_bias: bool = False
    moe_router_bias: bool = False
    moe_router_score_function: str = "softmax"
    moe_router_fp32: bool = False
    moe_router_sinkhorn: bool = False
    moe_router_sinkhorn_iterations: int = 20
    moe_router_enable_expert_bias: bool = False
    moe_router_bias_update_rate: float = 1e-3
    # DeepSeek-V3's routing (Megatron-Core's names): experts in `moe_router_num_groups` groups, a
    # token's top-k taken within its `moe_router_group_topk` best groups; the chosen experts'
    # weights multiplied by `moe_router_topk_scaling_factor` (the routed scaling factor).
    moe_router_num_groups: Optional[int] = None
    moe_router_group_topk: Optional[int] = None
    moe_router_group_score_topk: Optional[int] = None  # experts summed per group; None: top_k // group_topk
    moe_router_topk_scaling_factor: Optional[float] = None
    # The load-balancing loss: MegaBlocks' per-batch 'aux_loss', the per-sequence 'seq_aux_loss'
    # (sequences along `moe_router_seq_dim` of a 3-D input) or 'global_aux_loss' (expert counts
    # summed over `moe_aux_loss_group`, default the whole world when torch.distributed runs).
    moe_router_load_balancing_type: str = "aux_loss"
    moe_router_seq_dim: int = 0
    moe_aux_loss_group: Optional[Any] = dataclasses.field(default=None, repr=False, compare=False)
    moe_block_size: int = 128
    gmm_backend: str = "auto"
    fp8: Optional[str] = None
    loss_collector: Optional[MoELossCollector] = dataclasses.field(default=None, repr=False, compare=False)
    kernel_policy: KernelPolicy = dataclasses.field(default_factory=KernelPolicy)

    def __post_init__(self):
        for name in ("hidden_size", "ffn_hidden_size", "num_layers", "moe_num_experts", "moe_top_k",
                     "pipeline_model_parallel_size", "moe_router_sinkhorn_iterations"):
            _check_int(name, getattr(self, name), 1)
        if self.moe_top_k > self.moe_num_experts:
            raise ValueError(
                f"moe_top_k: expected at most moe_num_experts={self.moe_num_experts}, got {self.moe_top_k}"
            )
        if self.num_layers_per_virtual_pipeline_stage is not None:
            _check_int("num_layers_per_virtual_pipeline_stage", self.num_layers_per_virtual_pipeline_stage, 1)
        if self.shared_expert_hidden_size is None:
            self.shared_expert_hidden_size = self.ffn_hidden_size
        _check_int("shared_expert_hidden_size", self.shared_expert_hidden_size, 1)
        _check_int("moe_expert_parallel_chunks", self.moe_expert_parallel_chunks, 1)

        for name in ("bias", "return_bias", "moe_lbl_in_fp32", "moe_expert_model_parallelism",
                     "memory_optimized_mlp", "fp16", "bf16", "uniform_expert_assignment", "shared_expert",
                     "remat_act_fn", "shared_expert_weighted_sum", "shared_expert_glu", "shared_expert_gate",
                     "moe_zloss_in_fp32", "moe_router_fp32", "moe_expert_bias", "moe_router_bias",
                     "moe_router_sinkhorn", "moe_router_enable_expert_bias"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected a bool, got {type(getattr(self, name)).__name__}")
        if self.fp16 and self.bf16:
            raise ValueError("fp16, bf16: expected at most one of them set, got both True")

        _check_number("moe_capacity_factor", self.moe_capacity_factor, min_value=0.0)
        _check_number("moe_loss_weight", self.moe_loss_weight, min_value=0.0)
        _check_number("moe_zloss_weight", self.moe_zloss_weight, min_value=0.0)
        _check_number("moe_router_bias_update_rate", self.moe_router_bias_update_rate, min_value=0.0)
        if self.moe_normalize_expert_weights is not None:
            _check_number("moe_normalize_expert_weights", self.moe_normalize_expert_weights, min_value=0.0)
            if self.moe_normalize_expert_weights == 0:
                raise ValueError("moe_normalize_expert_weights: expected None or a p > 0, got 0")
        if self.moe_jitter_eps is not None:
            _check_number("moe_jitter_eps", self.moe_jitter_eps, min_value=0.0)
            if self.moe_jitter_eps >= 1:
                raise ValueError(f"moe_jitter_eps: expected a value in [0, 1), got {self.moe_jitter_eps}")

        _check_choice("mlp_type", self.mlp_type, MLP_TYPES)
        _check_choice("mlp_impl", self.mlp_impl, MLP_IMPLS + ("auto",))
        if self.mlp_impl == "auto":
            self.mlp_impl = AUTO_MLP_IMPL
        _check_choice("gmm_backend", self.gmm_backend, GMM_BACKENDS)
        _check_choice("fp8", self.fp8, FP8_RECIPES)
        if self.fp8 is not None and self.mlp_impl != "grouped":
            raise ValueError(f"fp8: the {self.fp8!r} recipe runs on mlp_impl='grouped' (or 'auto'); the "
                             f"block-sparse path has no FP8 form; got mlp_impl={self.mlp_impl!r}")
        _check_choice("moe_router_score_function", self.moe_router_score_function, ROUTER_SCORE_FUNCTIONS)
        _check_int("moe_block_size", self.moe_block_size, 1)
        if self.moe_block_size not in BLOCK_SIZES:
            raise ValueError(f"moe_block_size: expected one of {BLOCK_SIZES}, got {self.moe_block_size}")
        _check_choice("moe_router_load_balancing_type", self.moe_router_load_balancing_type,
                      LOAD_BALANCING_TYPES)
        _check_choice("moe_router_seq_dim", self.moe_router_seq_dim, (0, 1))
        self._check_group_routing()
        if self.moe_router_topk_scaling_factor is not None:
            _check_number("moe_router_topk_scaling_factor", self.moe_router_topk_scaling_factor, min_value=0.0)
        if self.moe_router_sinkhorn and self.moe_router_enable_expert_bias:
            raise ValueError(
                "moe_router_sinkhorn, moe_router_enable_expert_bias: expected at most one balancing "
                "scheme for choosing experts, got both"
            )

        for name in ("activation_fn", "init_method", "output_layer_init_method", "fc_cls"):
            if not callable(getattr(self, name)):
                raise TypeError(f"{name}: expected a callable, got {type(getattr(self, name)).__name__}")
        if is_gated(self.activation_fn) and self.mlp_type != "glu":
            raise ValueError(f"activation_fn: {getattr(self.activation_fn, '__name__', 'it')} is a GLU activation of "
                             f"the gate and the linear branch: expected mlp_type='glu', got {self.mlp_type!r}")
        if not isinstance(self.fc_kwargs, dict):
            raise TypeError(f"fc_kwargs: expected a dict, got {type(self.fc_kwargs).__name__}")
        if self.device is not None and not isinstance(self.device, (int, str, torch.device)):
            raise TypeError(f"device: expected None, an int, a str or a torch.device, got {type(self.device).__name__}")
        self.kernel_policy = as_policy(self.kernel_policy)
        if self.loss_collector is not None and not isinstance(self.loss_collector, MoELossCollector):
            raise TypeError(
                f"loss_collector: expected None or a MoELossCollector, got {type(self.loss_collector).__name__}"
            )

    def _check_group_routing(self) -> None:
        groups, group_topk = self.moe_router_num_groups, self.moe_router_group_topk
        if groups is None and group_topk is None:
            return
        if groups is None or group_topk is None:
            raise ValueError("moe_router_num_groups, moe_router_group_topk: expected both set or neither, "
                             f"got {groups} and {group_topk}")
        _check_int("moe_router_num_groups", groups, 1)
        _check_int("moe_router_group_topk", group_topk, 1)
        experts = self.moe_num_experts
        if experts % groups:
            raise ValueError(f"moe_router_num_groups: expected a divisor of moe_num_experts={experts}, got {groups}")
        if group_topk > groups:
            raise ValueError(f"moe_router_group_topk: expected at most moe_router_num_groups={groups}, got {group_topk}")
        if self.moe_top_k > group_topk * (experts // groups):
            raise ValueError(f"moe_top_k={self.moe_top_k}: expected at most the {group_topk * (experts // groups)} "
                             "experts of the chosen groups")
        if self.moe_router_sinkhorn:
            raise ValueError("moe_router_num_groups: group-limited routing does not combine with moe_router_sinkhorn")
        if self.moe_router_group_score_topk is not None:
            _check_int("moe_router_group_score_topk", self.moe_router_group_score_topk, 1)
            if self.moe_router_group_score_topk > experts // groups:
                raise ValueError(f"moe_router_group_score_topk: expected at most the {experts // groups} experts of a "
                                 f"group, got {self.moe_router_group_score_topk}")

    @classmethod
    def from_megatron(cls, megatron_args: Any, **overrides) -> "Arguments":
        """Builds `Arguments` from a Megatron args namespace or `TransformerConfig`.

        Attributes named like a field are copied (MegaBlocks' behaviour), then Megatron-Core's
        names are mapped: num_moe_experts / num_experts, moe_router_topk, moe_aux_loss_coeff,
        moe_z_loss_coeff, moe_input_jitter_eps, moe_grouped_gemm (mlp_impl='grouped'),
        expert_model_parallel_size (> 1 turns on expert parallelism), moe_ffn_hidden_size,
        moe_expert_capacity_factor (None: dropless), add_bias_linear, gated_linear_unit / swiglu
        (mlp_type='glu', SiLU for swiglu), activation_func, moe_router_score_function,
        moe_router_dtype='fp32', moe_router_load_balancing_type ('aux_loss', 'seq_aux_loss',
        'global_aux_loss'; 'sinkhorn' and 'none' turn the loss off), moe_router_num_groups,
        moe_router_group_topk, moe_router_topk_scaling_factor,
        moe_router_enable_expert_bias, moe_router_bias_update_rate,
        moe_shared_expert_intermediate_size (a GLU shared expert with gated_linear_unit / swiglu;
        moe_shared_expert_gate: its sigmoid gate), and moe_router_pre_softmax (Megatron's default of a
        softmax over the chosen k equals L1-renormalised softmax weights, so k > 1 without
        pre-softmax sets moe_normalize_expert_weights=1), use_cpu_initialization (device='cpu').
        Attributes that are None are skipped.
        `overrides` are applied last.

        Raises:
            TypeError, ValueError: when the resulting fields are invalid.
        """
        kwargs = {}
        names = {f.name for f in dataclasses.fields(cls)}
        for name in names:
            if name != "loss_collector" and hasattr(megatron_args, name):
                value = getattr(megatron_args, name)
                if value is not None or name in _NULLABLE_FIELDS:
                    kwargs[name] = value

        def get(name):
            return getattr(megatron_args, name, None)

        if get("use_cpu_initialization") and get("device") is None:
            kwargs["device"] = "cpu"  # Megatron creates the parameters on the CPU

        renames = {
            "num_moe_experts": "moe_num_experts",
            "num_experts": "moe_num_experts",
            "moe_router_topk": "moe_top_k",
            "moe_aux_loss_coeff": "moe_loss_weight",
            "moe_z_loss_coeff": "moe_zloss_weight",
            "moe_input_jitter_eps": "moe_jitter_eps",
            "moe_ffn_hidden_size": "ffn_hidden_size",
            "add_bias_linear": "bias",
            "activation_func": "activation_fn",
            "moe_router_score_function": "moe_router_score_function",
            "moe_router_enable_expert_bias": "moe_router_enable_expert_bias",
            "moe_router_bias_update_rate": "moe_router_bias_update_rate",
        }
        for src, dst in renames.items():
            if get(src) is not None:
                kwargs[dst] = get(src)
        if get("moe_grouped_gemm"):
            kwargs["mlp_impl"] = "grouped"
        if get("expert_model_parallel_size") is not None:
            kwargs["moe_expert_model_parallelism"] = get("expert_model_parallel_size") > 1
        if hasattr(megatron_args, "moe_expert_capacity_factor"):
            factor = get("moe_expert_capacity_factor")
            kwargs["moe_capacity_factor"] = 0 if factor is None else factor
        if get("gated_linear_unit") or get("swiglu"):
            kwargs["mlp_type"] = "glu"
        if get("swiglu"):
            kwargs["activation_fn"] = F.silu
        if get("moe_router_dtype") == "fp32":
            kwargs["moe_router_fp32"] = True
        balancing = get("moe_router_load_balancing_type")
        if balancing in ("sinkhorn", "none"):
            kwargs["moe_router_load_balancing_type"] = "aux_loss"
            kwargs["moe_loss_weight"] = 0.0
            kwargs["moe_router_sinkhorn"] = balancing == "sinkhorn"
        if get("moe_shared_expert_intermediate_size"):
            kwargs["shared_expert"] = True
            kwargs["shared_expert_hidden_size"] = get("moe_shared_expert_intermediate_size")
            kwargs["shared_expert_glu"] = bool(get("gated_linear_unit") or get("swiglu"))
            kwargs["shared_expert_gate"] = bool(get("moe_shared_expert_gate"))
        top_k = kwargs.get("moe_top_k", 1)
        if get("moe_router_topk") is not None and top_k > 1 and not kwargs.get("moe_router_sinkhorn", False):
            sigmoid = kwargs.get("moe_router_score_function") == "sigmoid"
            if sigmoid or not get("moe_router_pre_softmax"):
                kwargs["moe_normalize_expert_weights"] = 1
        if get("init_method_std") is not None and get("init_method") is None:
            std = get("init_method_std")
            kwargs["init_method"] = partial(torch.nn.init.normal_, mean=0.0, std=std)
            layers = kwargs.get("num_layers", 1)
            kwargs["output_layer_init_method"] = partial(
                torch.nn.init.normal_, mean=0.0, std=std / math.sqrt(2.0 * layers)
            )
        kwargs.update(overrides)
        return cls(**kwargs)


# Fields whose None is meaningful when a Megatron namespace carries it.
_NULLABLE_FIELDS = ("moe_normalize_expert_weights", "moe_jitter_eps", "num_layers_per_virtual_pipeline_stage",
                    "expert_parallel_group")


def from_megatron(megatron_args: Any) -> Arguments:
    """MegaBlocks' module-level spelling of `Arguments.from_megatron`."""
    return Arguments.from_megatron(megatron_args)


def _check_int(name: str, value, min_value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < min_value:
        raise ValueError(f"{name}: expected an int >= {min_value}, got {value}")


def _check_number(name: str, value, min_value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < min_value:
        raise ValueError(f"{name}: expected a finite number >= {min_value}, got {value}")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
