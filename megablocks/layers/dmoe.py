"""`dMoE`: the dropless mixture of experts, on block-sparse products or grouped GEMMs.

Legend: T tokens, H hidden, E experts, F ffn per expert, K top-k, N = T·K routed rows,
B block size (`moe_block_size`), P = padded_rows_bound(N, E, B) padded rows (a static bound).

Sparse path (`mlp_impl='sparse'`):
    counts, padded_bins, maps = padded_routed_rows(...)    counts, bins, row maps (once for gather
                                                           and scatter): up to 4096 routed rows the
                                                           metadata then `route`, past it five launches
    x_PH = gather_routed(x_TH, maps)                       padded_gather: rows padded to blocks
    topo = make_topology(padded_bins, ...)                 the blocks of the [P, E·F] activation
    y_PH = dsd(act(sdd(x_PH, w1^T, topo)), w2)             (GLU: act(..w1..) * sdd(x_PH, v1^T))
    out_TH = scatter_routed(y_PH, maps, expert_weights)    padded_scatter: weighted sum over K

Grouped path (`mlp_impl='grouped'`):
    counts, maps = row_maps(top_experts_TK, E)             one program, or three launches past 4096 rows
    x_NH = gather_routed(x_TH, maps)                       gather: rows in expert order
    y_NH = gmm(act(gmm(x_NH, w1^T)), w2)                   one grouped GEMM per projection
    out_TH = scatter_routed(y_NH, maps, expert_weights)    scatter
With the policy's `fused_gather` (GLU experts up to `fused_glu_input_grad_max_ffn`) the
first two lines are one: the up projections read x_TH through the maps
(`gmm_shared_input_gathered(x_TH, w1^T, v1^T, maps)`), and x_NH never exists.

Inference form (the policy's `inference_form`, `megablocks.ops.glu_experts`): without autograd (no grad
mode, or no input or weight needing a gradient), GLU experts on the Triton kernels take, on
either path, the routing in one program at decode sizes, one grouped GEMM reading the token rows
through the map with the GLU in its epilogue, the down GEMM and the scatter (the block-sparse
products, whose rows are padded to whole blocks, have nothing to add to a forward alone). The
experts' biases (`moe_expert_bias`) are added in the GEMMs' epilogues there; gpt-oss's clamped
SwiGLU is one of the epilogue's activations.

No value is read on the host on either path (the 'gg' gmm backend, which takes its group sizes
on the host, is the exception): a dMoE step can be captured in a CUDA graph.

Expert parallelism (`moe_expert_model_parallelism`): `moe.ParallelMLP.parallel_forward_once`
exchanges the rows with the ranks holding their experts and runs either path above on the
E/esd local experts (weights [E/esd · F/hsd, H]); the split sizes are read on the host.
"""

from typing import Optional

import stk
import torch

from megablocks.backend import use_triton
from megablocks.layers import dmlp_registry, mlp, moe, mpu
from megablocks.layers.activation_fn import fused_name
from megablocks.layers.arguments import Arguments
from megablocks.ops.experts import glu_experts
from megablocks.ops.permute import gather_routed, scatter_routed
from megablocks.ops.topology import make_topology


class ParallelDroplessMLP(moe.ParallelMLP):
    """The experts of `dMoE`: `mlp` is `SparseMLP`/`SparseGLU` or `GroupedMLP`/`GroupedGLU`
    (parameters `mlp.w1`, `mlp.v1`, `mlp.w2` of shape [E·F, H]; with `moe_expert_bias`
    `mlp.w1_bias`, `mlp.v1_bias` [E, F] and `mlp.w2_bias` [E, H]) and `bias` [H]."""

    def __init__(self, args: Arguments):
        super().__init__(args)
        self.hidden_size = args.hidden_size
        self.ffn_hidden_size = mpu.features_per_rank(args)
        self.blocking = args.moe_block_size

    def _init_mlp(self, args: Arguments) -> torch.nn.Module:
        return dmlp_registry.get(args)

    def topology(self, x: torch.Tensor, padded_bins: torch.Tensor) -> stk.Matrix:
        """The block-sparse topology of the activation of the padded rows `x` [P, H]."""
        return make_topology(
            padded_bins,
            block_size=self.blocking,
            num_block_rows=x.shape[0] // self.blocking,
            ffn_hidden_size=self.ffn_hidden_size,
            dtype=x.dtype,
        )

    def sparse_permute_and_compute(self, x_TH, weights_N, top_experts, num_experts: int, top_k: int):
        with torch.no_grad():
            tokens_per_expert, padded_bins, maps = self.padded_routed_rows(top_experts, num_experts, top_k,
                                                                           self.blocking)
        x_PH = gather_routed(x_TH, maps)
        with torch.no_grad():
            topo = self.topology(x_PH, padded_bins)
        y_PH = self.mlp(x_PH, topo)
        out_TH = scatter_routed(y_PH, maps, weights_N)
        return out_TH, tokens_per_expert

    def grouped_permute_and_compute(self, x_TH, weights_N, top_experts, num_experts: int, top_k: int):
        with torch.no_grad():
            tokens_per_expert, maps = self.routed_rows(top_experts, num_experts, top_k)  # gather's and scatter's
        if isinstance(self.mlp, mlp.GroupedMLP) and self.mlp.reads_token_rows():
            # The up projection(s) read x_TH's rows through the maps (no gathered copy). In FP8
            # the weighted combine is the module's too (its one-node form takes it into its node).
            if weights_N is not None and self.mlp.takes_combine():
                return self.mlp(x_TH, tokens_per_expert, maps, weights_N), tokens_per_expert
            y_NH = self.mlp(x_TH, tokens_per_expert, maps)
        else:
            x_NH = gather_routed(x_TH, maps)
            y_NH = self.mlp(x_NH, tokens_per_expert)
        out_TH = scatter_routed(y_NH, maps, weights_N)
        return out_TH, tokens_per_expert

    def permute_and_compute(self, x_TH, weights_N, top_experts, num_experts: int, top_k: int, capacity=None):
        """Dropless: every assignment is computed (`capacity` is ignored)."""
        if self.args.mlp_impl == "sparse":
            return self.sparse_permute_and_compute(x_TH, weights_N, top_experts, num_experts, top_k)
        return self.grouped_permute_and_compute(x_TH, weights_N, top_experts, num_experts, top_k)

    def sparse_forward_once(self, x: torch.Tensor, expert_weights: torch.Tensor, top_experts: torch.Tensor):
        x_TH = x.reshape(-1, x.shape[-1])
        return self.sparse_permute_and_compute(x_TH, expert_weights.flatten(), top_experts, self.num_experts, self.top_k)

    def inference_activation(self, x_TH: torch.Tensor) -> Optional[str]:
        """The GLU activation's name where this forward takes the inference form (module
        docstring), else None: the policy's `inference_form`, GLU experts (either path: the same parameters) whose
        activation the fused kernels implement, the Triton kernels in use for x, T > 0, and no
        gradient to record."""
        experts = self.mlp
        if not (self.args.kernel_policy.inference_form and isinstance(experts, mlp.SparseMLP)
                and experts._v1() is not None and self.args.fp8 is None):
            return None
        if x_TH.shape[0] == 0 or mlp._gmm_backend(self.args) not in (None, "triton") or not use_triton(x_TH):
            return None
        params = (experts.w1, experts._v1(), experts.w2, experts.w1_bias, experts._v1_bias(), experts.w2_bias)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x_TH,) + params):
            return None
        return fused_name(self.args.activation_fn)

    def inference_forward_once(self, x_TH: torch.Tensor, expert_weights: torch.Tensor, top_experts: torch.Tensor,
                               activation: str):
        """The inference form: `(out_TH, tokens_per_expert)` by `megablocks.ops.glu_experts`."""
        hidden = x_TH.shape[-1]
        w1, v1, w2 = (w.view(self.num_experts, -1, hidden) for w in self.mlp._cast_weights(x_TH))
        policy = self.args.kernel_policy
        return glu_experts(x_TH, w1, v1, w2, top_experts.view(-1, self.top_k), expert_weights.view(-1, self.top_k),
                           activation, gather_min_ffn=policy.gather_min_ffn,
                           gather_min_rows_per_expert=policy.gather_min_rows_per_expert,
                           biases=self.mlp._cast_biases(x_TH))

    def grouped_forward_once(self, x: torch.Tensor, expert_weights: torch.Tensor, top_experts: torch.Tensor):
        x_TH = x.reshape(-1, x.shape[-1])
        return self.grouped_permute_and_compute(x_TH, expert_weights.flatten(), top_experts, self.num_experts, self.top_k)

    def forward_once(self, x: torch.Tensor, expert_weights: torch.Tensor, top_experts: torch.Tensor):
        x_TH = x.reshape(-1, x.shape[-1])
        activation = self.inference_activation(x_TH)
        if activation is not None:
            return self.inference_forward_once(x_TH, expert_weights, top_experts, activation)
        if self.args.mlp_impl == "sparse":
            return self.sparse_forward_once(x, expert_weights, top_experts)
        return self.grouped_forward_once(x, expert_weights, top_experts)


class dMoE(moe.MoE):
    """The dropless MoE layer: `MoE`'s interface and losses, every assignment computed.

    Parameters and state_dict keys as MegaBlocks: `router.layer.weight` [E, H],
    `experts.mlp.w1`, `experts.mlp.v1` (GLU), `experts.mlp.w2` [E·F, H], `experts.bias` [H],
    and the shared expert's `shared_expert.{up_proj,gate_proj,down_proj}`; with the additions
    `router.layer.bias` [E] (`moe_router_bias`) and `experts.mlp.w1_bias`, `experts.mlp.v1_bias`
    (GLU) [E, F], `experts.mlp.w2_bias` [E, H] (`moe_expert_bias`).
    """

    def _init_experts_mlp(self, args: Arguments) -> torch.nn.Module:
        return ParallelDroplessMLP(args)
