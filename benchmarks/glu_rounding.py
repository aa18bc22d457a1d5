"""How the grouped GLU expert's bf16 output compares with MegaBlocks' unfused reference.

MegaBlocks 0.10's `glu_test.py` checks the grouped GLU expert with `torch.allclose` (rtol 1e-5,
atol 1e-8: bitwise in bf16) against a torch module that rounds at every step: `x @ w1` and
`x @ v1` to bf16, `gelu` of the first in bf16, the product in bf16, then `@ w2`. This library's
grouped GLU computes `gelu(x @ w1) * (x @ v1)` in the first GEMM's epilogue from the fp32
accumulators and rounds once, so its result differs from that module's in some elements by a
unit in the last place. This script measures both against an fp32 computation of the same bf16
weights and inputs, on the test's shapes:

    python benchmarks/glu_rounding.py        (a CUDA device)

Prints, per shape: the fraction of elements bitwise equal to the unfused module, and the
relative max / rms error of each against fp32.
"""

import torch
import torch.nn.functional as F

from megablocks.layers import dmlp_registry
from megablocks.layers.arguments import Arguments


def rel(a: torch.Tensor, ref: torch.Tensor):
    err = (a.double() - ref.double()).abs()
    return (err.max() / ref.double().abs().max()).item(), (err.pow(2).mean().sqrt() / ref.double().pow(2).mean().sqrt()).item()


def main() -> None:
    torch.manual_seed(0)
    print("shape (bs, sl, hs) | bitwise equal to the unfused bf16 module | unfused vs fp32 (max, rms) | "
          "ours vs fp32 (max, rms)")
    for bs, sl, hs in ((16, 1024, 512), (8, 2048, 512)):
        args = Arguments(hidden_size=hs, ffn_hidden_size=2 * hs, moe_num_experts=1, moe_top_k=1,
                         init_method=lambda w: torch.nn.init.normal_(w, 0.0, 0.1), mlp_type="glu",
                         mlp_impl="grouped", fp16=False, bf16=True)
        layer = dmlp_registry.get(args).cuda().to(torch.bfloat16)
        w1, v1, w2 = layer.w1.detach().t(), layer.v1.detach().t(), layer.w2.detach()
        x = torch.randn(bs * sl, hs, device="cuda").to(torch.bfloat16)
        with torch.no_grad():
            ours = layer(x, torch.tensor([bs * sl], device="cuda"))
            unfused = (F.gelu(x @ w1, approximate="tanh") * (x @ v1)) @ w2
            fp32 = (F.gelu(x.float() @ w1.float(), approximate="tanh") * (x.float() @ v1.float())) @ w2.float()
        equal = (ours == unfused).float().mean().item()
        print(f"({bs}, {sl}, {hs}) | {equal:.4f} | {rel(unfused, fp32)[0]:.2e}, {rel(unfused, fp32)[1]:.2e} | "
              f"{rel(ours, fp32)[0]:.2e}, {rel(ours, fp32)[1]:.2e}")


if __name__ == "__main__":
    main()
