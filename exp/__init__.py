"""Experiments on top of megablocks: Megatron-format data, a small GPT with a dense, MoE or dMoE
MLP, a trainer, and the demo (`python -m exp.demo`). Never imported by the `megablocks` package."""
