"""Adapters that put megablocks into other frameworks' models (import the submodule you need).

    megablocks.integrations.hf          transformers >= 5: the "megablocks" experts implementation,
                                        and `convert_model` (sparse-MoE blocks -> dMoE)
    megablocks.integrations.moefy       `moefy`: a dense transformer's MLPs -> upcycled dMoE
    megablocks.integrations.inference   `fused_moe` with vLLM's weight layout, no autograd
    megablocks.integrations.checkpoint  expert-weight layout conversions (MegaBlocks, ours, HF)

`hf` needs the `hf` extra (transformers); the others need only megablocks.
"""
