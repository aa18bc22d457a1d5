"""The README's FP8 example runs as written (small shapes: the interpreter on the CPU), and
computes what it says: the layer's gradients reach its expert weights, and `fused_moe` on the
fused checkpoint gives the plain-torch FP8 reference's output."""

import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_fp8_example_runs():
    text = README.read_text()
    section = text[text.index("## FP8 experts (preview)"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope = {}
    exec(compile(code, "README.md (FP8 example)", "exec"), scope)
    layer, x, y = scope["layer"], scope["x"], scope["y"]
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.experts.mlp.parameters())
    assert layer.experts.mlp._fp8_weights.nbytes() > 0  # the FP8 path ran
    from megablocks.integrations.inference import fused_moe_fp8_reference

    want = fused_moe_fp8_reference(scope["tokens"], scope["w1"], scope["w2"], scope["router_logits"], scope["top_k"],
                                   True, scope["w1_scale"], scope["w2_scale"])
    assert y.shape == want.shape and y.dtype == scope["tokens"].dtype
    err = ((y.float() - want.float()).norm() / want.float().norm()).item()
    assert err < 1e-2, err
