"""Pretraining megatron-core GPTs with megablocks dMoE MLPs (see README.md)."""
