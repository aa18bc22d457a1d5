"""Gated expert MLPs `(act(x W1) * (x V1)) W2` and the gated shared expert.

`v1` has `w1`'s layout: [E·F, H] on the dMoE paths (MegaBlocks' `SparseGLU`, `GroupedGLU`) and
[E, H, F] for `MoE` (`GLU`); with `moe_expert_bias`, `v1_bias` has `w1_bias`'s ([E, F]).
`memory_optimized_mlp` recomputes both the activation and the gated product in the backward (see
`megablocks.layers.mlp`).
"""

import torch

from megablocks.layers import common, mpu
from megablocks.layers.activation_fn import gated_product
from megablocks.layers.arguments import Arguments
from megablocks.layers.mlp import (
    MLP,
    GroupedMLP,
    SharedMLP,
    SparseMLP,
    create_dmoe_expert_weights,
    create_moe_expert_weights,
    register_expert_biases,
)


class GLU(MLP):
    """Capacity-bounded gated experts of `MoE`: `w1`, `v1` [E, H, F], `w2` [E, F, H]."""

    def __init__(self, args: Arguments):
        super().__init__(args)
        self.v1 = torch.nn.Parameter(torch.empty_like(self.w1))
        mpu.set_expert_model_parallel_attributes(self.v1, args.moe_expert_model_parallelism)
        with torch.no_grad():
            v1 = create_moe_expert_weights(args, args.moe_num_experts, args.ffn_hidden_size, args.hidden_size, args.init_method)
            self.v1.copy_(v1.transpose(1, 2))
        register_expert_biases(self, args, "v1_bias")

    def _v1(self) -> torch.Tensor:
        return self.v1

    def _v1_bias(self):
        return self.v1_bias


class SparseGLU(SparseMLP):
    """Gated dMoE experts on the block-sparse path: `w1`, `v1`, `w2` [E·F, H]."""

    def __init__(self, args: Arguments):
        super().__init__(args)
        self.v1 = torch.nn.Parameter(
            torch.empty(self._num_rows_per_rank, args.hidden_size, device=common.device(args), dtype=common.dtype(args))
        )
        with torch.no_grad():
            self.v1.copy_(
                create_dmoe_expert_weights(args, args.moe_num_experts, args.ffn_hidden_size, args.hidden_size, args.init_method)
            )
        mpu.set_expert_model_parallel_attributes(self.v1, self._should_set_parallelism_attribute)
        register_expert_biases(self, args, "v1_bias")

    def _v1(self) -> torch.Tensor:
        return self.v1

    def _v1_bias(self):
        return self.v1_bias


class GroupedGLU(GroupedMLP, SparseGLU):
    """Gated dMoE experts on the grouped-GEMM path (same parameters as `SparseGLU`)."""


class SharedGLU(SharedMLP):
    """The gated shared expert: `down_proj(act(gate_proj(x)) * up_proj(x))`."""

    def __init__(self, args: Arguments):
        super().__init__(args)
        self.gate_proj = args.fc_cls(args.hidden_size, args.shared_expert_hidden_size, **self.fc_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gated_product(self.act, self.gate_proj(x), self.up_proj(x)))
