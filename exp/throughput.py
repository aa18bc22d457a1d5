"""How fast a run trains: tokens/s, ms per step, model TFLOP/s per GPU and MFU; phase timers.

Model FLOPs are counted the standard way (Kaplan et al. / PaLM): per token,

    6 · N + 12 · L · H · S

with N the parameters of the matrix products a token goes through (the active ones: a token uses
top_k of E experts' weights; the tied output head counted once through the token embedding, the
position embedding left out; biases, norms and the router included, < 0.5% at these sizes),
L layers, H hidden size and S the sequence length (the attention scores and their weighted
sum, forward and backward, without halving for the causal mask). A step's model FLOPs are that
times the tokens of the global batch. MFU divides the FLOP/s per GPU by the GPU's dense bf16 peak
(`peak_tflops`, from the device name where known, else `TrainConfig.peak_tflops`); it is blank
where no peak is known (CPU).
"""

from __future__ import annotations

import time
from typing import Dict, Optional

import torch

# Dense bf16 tensor-core peaks (TFLOP/s), from the vendors' data sheets (SXM parts).
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0}


def flops_per_token(active_parameters: int, position_parameters: int, num_layers: int, hidden_size: int,
                    seq_length: int) -> float:
    """Model FLOPs per trained token (forward and backward), as the module docstring counts them."""
    matmul_parameters = active_parameters - position_parameters
    return 6.0 * matmul_parameters + 12.0 * num_layers * hidden_size * seq_length


def peak_tflops(device: torch.device, override: Optional[float] = None) -> Optional[float]:
    """The dense bf16 peak of `device` in TFLOP/s: `override`, else by the CUDA device's name
    (e.g. 'NVIDIA H200' → 989.4), else None."""
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name.split() or f" {key}" in name:
            return value
    return None


def throughput(step_s: float, tokens_per_step: int, flops_per_tok: float, world: int,
               peak: Optional[float]) -> Dict[str, Optional[float]]:
    """The columns of one step: ms per step, tokens/s (all ranks), model TFLOP/s per GPU, MFU."""
    tflops = flops_per_tok * tokens_per_step / world / step_s / 1e12
    return dict(step_ms=_digits(step_s * 1e3), tokens_per_s=_digits(tokens_per_step / step_s),
                tflops_per_gpu=_digits(tflops), mfu=_digits(tflops / peak) if peak else None)


def _digits(x: float) -> float:
    return float(f"{x:.6g}")


class PhaseTimer:
    """Wall time per phase of a step ('fwd', 'bwd', 'clip', 'optim'), in ms; with `enabled`
    False it costs nothing. On CUDA each boundary synchronizes the device (so the phases add up to
    the step; the synchronization itself slows the step slightly: on request only)."""

    PHASES = ("fwd", "bwd", "clip", "optim")

    def __init__(self, device: torch.device, enabled: bool):
        self.enabled, self.cuda = enabled, device.type == "cuda"
        self.ms: Dict[str, float] = {}
        self._t = 0.0

    def start(self) -> None:
        if self.enabled:
            self.ms = {p: 0.0 for p in self.PHASES}
            self._now()

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        previous, self._t = self._t, time.perf_counter()
        return self._t - previous

    def lap(self, phase: str) -> None:
        """Adds the time since the previous boundary to `phase`."""
        if self.enabled:
            self.ms[phase] += self._now() * 1e3

    def columns(self) -> Dict[str, float]:
        return {f"{p}_ms": _digits(v) for p, v in self.ms.items()} if self.enabled else {}
