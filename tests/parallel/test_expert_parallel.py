"""Expert parallelism with 2 and 4 processes: gloo on CPU, NCCL (and bf16 too) on as many GPUs
(see tests/parallel/ep_workers.py).

Each test spawns its ranks through `tests.parallel.launcher.run`, bounded by a timeout so that
a hang fails. The ranks run the plain-torch references (TRITON_INTERPRET=0) except one case
that runs the Triton kernels through the interpreter.
"""

import pytest
import torch

from megablocks.layers import mpu
from megablocks.layers.arguments import Arguments
from megablocks.layers.dmoe import dMoE
from tests.parallel.launcher import run

W = "tests.parallel.ep_workers"

CASES_2 = [
    dict(layer="dmoe", impl="torch", mlp_type="mlp", experts=4, top_k=2, tokens=(6, 5)),
    dict(layer="dmoe", impl="sparse", mlp_type="glu", experts=4, top_k=2, tokens=(7, 0)),  # a rank without tokens
    dict(layer="dmoe", impl="triton", mlp_type="glu", experts=2, top_k=2, tokens=(1, 9)),  # top_k = E
    dict(layer="moe", impl="torch", mlp_type="mlp", experts=4, top_k=2, tokens=(8, 5), capacity_factor=0.5),  # drops
    dict(layer="moe", impl="torch", mlp_type="glu", experts=2, top_k=1, tokens=(5, 6), capacity_factor=0),
]

CASES_4 = [
    dict(layer="dmoe", impl="torch", mlp_type="glu", experts=2, top_k=1, tokens=(5, 3, 6, 4)),  # F split 2 ways
    dict(layer="dmoe", impl="sparse", mlp_type="mlp", experts=1, top_k=1, tokens=(4, 4, 2, 7)),  # F split 4 ways
    dict(layer="dmoe", impl="triton", mlp_type="mlp", experts=8, top_k=3, tokens=(6, 2, 5, 3)),
    dict(layer="dmoe", impl="torch", mlp_type="mlp", experts=8, top_k=2, tokens=(4, 3, 5, 2), all_to_expert=5),
    dict(layer="moe", impl="torch", mlp_type="glu", experts=2, top_k=2, tokens=(6, 6, 4, 5), capacity_factor=0.75),
]


def test_2_ranks_layers_and_one_training_step():
    run(f"{W}:steps", 2, [("layer_cases", (CASES_2,)), ("dp_step", (2, False))])


def test_4_ranks_layers_and_one_training_step():
    run(f"{W}:steps", 4, [("layer_cases", (CASES_4,)), ("dp_step", (4, False))])


def test_4_ranks_in_two_expert_parallel_groups():
    """Ranks {0,1} and {2,3} each hold all experts; the helper (alone, or beside torch DDP for the
    shared parameters) reduces expert gradients over {0,2} and {1,3}."""
    run(f"{W}:steps", 4, [
        ("layer_cases_in_subgroups", (2, [CASES_2[0], CASES_2[3]])),
        ("dp_step", (2, False)),
        ("dp_step", (2, True)),
    ])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter case is for CPU-only machines")
def test_sparse_under_triton_interpreter():
    case = dict(layer="dmoe", impl="sparse", mlp_type="mlp", experts=2, top_k=2, hidden=20, ffn=12, tokens=(3, 4))
    run(f"{W}:layer_cases", 2, [case], interpret="1")


def test_2_ranks_expert_biases():
    """gpt-oss's experts over 2 ranks: the per-expert biases sharded over experts like the
    weights (their gradients scaled alike), the router bias replicated; block-sparse and grouped,
    dMoE and MoE."""
    cases = [
        dict(layer="dmoe", impl="torch", mlp_type="glu", experts=4, top_k=2, tokens=(6, 5), expert_bias=True),
        dict(layer="dmoe", impl="sparse", mlp_type="mlp", experts=2, top_k=2, tokens=(7, 0), expert_bias=True),
        dict(layer="moe", impl="torch", mlp_type="glu", experts=2, top_k=1, tokens=(5, 6), capacity_factor=0,
             expert_bias=True),
    ]
    run(f"{W}:layer_cases", 2, cases)


def test_2_ranks_fp8_experts():
    """`Arguments(fp8='blockwise')` under expert parallelism: each rank's FP8 experts (the weights
    quantized per expert, the received rows in 1 x 128 tiles as one process quantizes them) give
    one process's FP8 layer's output and every gradient; GLU and plain experts, the exchange in
    chunks, a rank without tokens, F past a 128-column block."""
    cases = [
        dict(layer="dmoe", impl="triton", mlp_type="glu", experts=4, top_k=2, tokens=(6, 5), fp8="blockwise"),
        dict(layer="dmoe", impl="triton", mlp_type="mlp", experts=4, top_k=2, tokens=(7, 0), fp8="blockwise"),
        dict(layer="dmoe", impl="triton", mlp_type="glu", experts=8, top_k=3, tokens=(5, 9), chunks=2,
             hidden=136, ffn=144, fp8="blockwise"),
    ]
    run(f"{W}:layer_cases", 2, cases)
    if not torch.cuda.is_available():  # the FP8 kernels themselves, through the interpreter
        run(f"{W}:layer_cases", 2, cases[:1], interpret="1")


CHUNKED_2 = [  # the exchange in chunks of the local experts, overlapped with their compute
    dict(layer="dmoe", impl="torch", mlp_type="glu", experts=8, top_k=2, tokens=(9, 6), chunks=2),
    dict(layer="dmoe", impl="torch", mlp_type="mlp", experts=8, top_k=3, tokens=(7, 0), chunks=3),  # uneven, no tokens
    dict(layer="dmoe", impl="sparse", mlp_type="glu", experts=4, top_k=2, tokens=(6, 5), chunks=8),  # capped at 2
    dict(layer="moe", impl="torch", mlp_type="mlp", experts=4, top_k=2, tokens=(8, 5), capacity_factor=0.5,
         chunks=2),  # drops
    dict(layer="dmoe", impl="torch", mlp_type="glu", experts=4, top_k=2, tokens=(6, 5), chunks=2,
         shared_expert=True),  # the shared expert while the rows travel
    dict(layer="dmoe", impl="torch", mlp_type="mlp", experts=4, top_k=2, tokens=(4, 7), shared_expert=True),
]

CHUNKED_4 = [
    dict(layer="dmoe", impl="torch", mlp_type="glu", experts=8, top_k=2, tokens=(5, 3, 6, 4), chunks=2),
    dict(layer="dmoe", impl="torch", mlp_type="mlp", experts=2, top_k=1, tokens=(4, 4, 2, 7), chunks=2),  # F split: 1
]


def test_chunked_exchange_overlapped_with_the_experts():
    """`moe_expert_parallel_chunks`: the same outputs and every gradient as one process, on 2 and
    4 ranks (uneven chunks, a rank without tokens, a chunk count above the local experts, token
    dropping, experts split by their FFN where chunks do not apply), and the shared expert run
    during the exchange, with and without chunks."""
    run(f"{W}:layer_cases", 2, CHUNKED_2)
    run(f"{W}:layer_cases", 4, CHUNKED_4)


def test_bad_setups_fail_on_every_rank():
    run(f"{W}:bad_setups", 2)


def test_expert_parallelism_needs_torch_distributed():
    args = Arguments(hidden_size=8, ffn_hidden_size=8, moe_num_experts=2, fp16=False, device="cpu",
                     moe_expert_model_parallelism=True)
    with pytest.raises(ValueError, match="torch.distributed to be initialised"):
        dMoE(args)


def test_scale_gradient():
    w = torch.randn(3, requires_grad=True)
    mpu.scale_gradient(w, 0.25).sum().backward()
    assert torch.equal(w.grad, torch.full((3,), 0.25))
