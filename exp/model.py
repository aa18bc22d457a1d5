"""A small GPT whose MLP is dense, MoE or dMoE (MegaBlocks' layers).

Pre-LayerNorm decoder blocks (causal self-attention, then the MLP), learned position embeddings,
an output head tied to the token embedding. Megatron's initialisation: every weight
N(0, init_method_std), the output projections of attention and MLP N(0, std / sqrt(2 · layers)),
biases zero.

MLP choices (`GPTConfig.mlp`):
  dense  `act(x W1 + b1) W2 + b2` ('glu': `(act(x W1) * (x V1)) W2`), width ffn_hidden_size.
  moe    `megablocks.layers.moe.MoE`, capacity factor `moe_capacity_factor`.
  dmoe   `megablocks.layers.dmoe.dMoE`, dropless.
Every MoE/dMoE layer takes `megablocks.layers.arguments.Arguments` built by `moe_arguments`:
the shared fields (hidden_size, ffn_hidden_size per expert, num_layers, bias, activation_fn,
mlp_type) come from the GPT config, every other field from `GPTConfig.moe` (by name).

Shape legend: B batch, S sequence, H hidden, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS: Dict[str, Callable] = {
    "gelu": partial(F.gelu, approximate="tanh"),  # MegaBlocks' default
    "gelu_exact": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "squared_relu": lambda x: F.relu(x).square(),
}
MLP_KINDS = ("dense", "moe", "dmoe")
# Arguments fields the GPT config decides (shared with the dense model) or the trainer sets.
SHARED_FIELDS = ("hidden_size", "ffn_hidden_size", "num_layers", "bias", "activation_fn", "mlp_type")
MODEL_SET_FIELDS = ("init_method", "output_layer_init_method", "loss_collector", "device", "fp16", "bf16")


@dataclasses.dataclass
class GPTConfig:
    """The model's shape and MLP choice.

    Args:
        vocab_size: V (pad it to a multiple of 64 or 128 for speed).
        seq_length: the longest sequence (size of the position embedding).
        num_layers, hidden_size, num_attention_heads: depth, width H and heads (H % heads == 0).
        ffn_hidden_size: width of the dense MLP and of each expert; default 4·H.
        mlp: 'dense', 'moe' or 'dmoe'.
        mlp_type: 'mlp' or 'glu' (dense and experts alike).
        activation_fn: a name in ACTIVATIONS.
        bias: biases in every linear layer (and `experts.bias`).
        dropout, attention_dropout: dropout on the residual branches and the attention weights.
        init_method_std: std of the normal initialisation.
        layernorm_epsilon: LayerNorm eps.
        moe: other `Arguments` fields by name (e.g. moe_num_experts, moe_top_k, moe_loss_weight).
    """

    vocab_size: int = 257
    seq_length: int = 1024
    num_layers: int = 6
    hidden_size: int = 512
    num_attention_heads: int = 8
    ffn_hidden_size: Optional[int] = None
    mlp: str = "dense"
    mlp_type: str = "mlp"
    activation_fn: str = "gelu"
    bias: bool = True
    dropout: float = 0.0
    attention_dropout: float = 0.0
    init_method_std: float = 0.02
    layernorm_epsilon: float = 1e-5
    moe: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name in ("vocab_size", "seq_length", "num_layers", "hidden_size", "num_attention_heads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads: expected a divisor of hidden_size={self.hidden_size}, got "
                f"{self.num_attention_heads}"
            )
        if self.mlp not in MLP_KINDS:
            raise ValueError(f"mlp: expected one of {MLP_KINDS}, got {self.mlp!r}")
        if self.mlp_type not in ("mlp", "glu"):
            raise ValueError(f"mlp_type: expected 'mlp' or 'glu', got {self.mlp_type!r}")
        if self.activation_fn not in ACTIVATIONS:
            raise ValueError(f"activation_fn: expected one of {sorted(ACTIVATIONS)}, got {self.activation_fn!r}")
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}: expected a value in [0, 1), got {getattr(self, name)}")
        bad = [k for k in self.moe if k in SHARED_FIELDS or k in MODEL_SET_FIELDS]
        if bad:
            raise ValueError(
                f"moe: {bad} are set from the model config (or by the model), not through `moe`"
            )


def moe_arguments(config: GPTConfig, loss_collector=None, device=None):
    """The `megablocks.layers.arguments.Arguments` of the config's MoE/dMoE layers."""
    from megablocks.layers.arguments import Arguments

    std = config.init_method_std
    known = {f.name for f in dataclasses.fields(Arguments)}
    unknown = sorted(set(config.moe) - known)
    if unknown:
        raise ValueError(f"moe: unknown Arguments fields {unknown}")
    kwargs = dict(
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.ffn_hidden_size,
        num_layers=config.num_layers,
        bias=config.bias,
        activation_fn=ACTIVATIONS[config.activation_fn],
        mlp_type=config.mlp_type,
        init_method=partial(nn.init.normal_, mean=0.0, std=std),
        output_layer_init_method=partial(nn.init.normal_, mean=0.0, std=std / math.sqrt(2.0 * config.num_layers)),
        fp16=False,
        bf16=False,
        device=device,
        loss_collector=loss_collector,
    )
    kwargs.update(config.moe)
    return Arguments(**kwargs)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.heads = config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.bias)
        self.dropout = config.attention_dropout

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        b, s, h = x_BSH.shape
        q, k, v = self.qkv(x_BSH).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(b, s, h))


class DenseMLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        h, f = config.hidden_size, config.ffn_hidden_size
        self.fc1 = nn.Linear(h, f, bias=config.bias)
        self.gate = nn.Linear(h, f, bias=config.bias) if config.mlp_type == "glu" else None
        self.fc2 = nn.Linear(f, h, bias=config.bias)
        self.act = ACTIVATIONS[config.activation_fn]

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x_BSH))
        if self.gate is not None:
            h = h * self.gate(x_BSH)
        return self.fc2(h)


class MoEMLP(nn.Module):
    """A MegaBlocks MoE/dMoE layer on [B, S, H] inputs (it takes [S, B, H], as MegaBlocks)."""

    def __init__(self, config: GPTConfig, args):
        super().__init__()
        if config.mlp == "dmoe":
            from megablocks.layers.dmoe import dMoE as layer_cls
        else:
            from megablocks.layers.moe import MoE as layer_cls
        self.moe = layer_cls(args)

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        out = self.moe(x_BSH.transpose(0, 1))
        bias = None
        if isinstance(out, tuple):
            out, bias = out
        if bias is not None:
            out = out + bias
        return out.transpose(0, 1)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, moe_args=None):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = DenseMLP(config) if config.mlp == "dense" else MoEMLP(config, moe_args)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        x_BSH = x_BSH + self.drop(self.attn(self.ln1(x_BSH)))
        return x_BSH + self.drop(self.mlp(self.ln2(x_BSH)))


class GPT(nn.Module):
    """The model. `forward(tokens_BS, labels_BS=None)`.

    Without labels returns logits [B, S, V]. With labels returns a dict of 0-d tensors:
    'loss' (what to backpropagate: lm_loss + load-balancing loss + z-loss), 'lm_loss' (mean
    cross-entropy), 'lbl_loss', 'zloss' (weighted as Arguments says; 0 for dense, in eval, or
    when their weight is 0).
    """

    def __init__(self, config: GPTConfig, device=None):
        super().__init__()
        self.config = config
        self.moe_args = None
        self.loss_collector = None
        if config.mlp != "dense":
            from megablocks.layers.losses import MoELossCollector

            self.loss_collector = MoELossCollector()
            self.moe_args = moe_arguments(config, self.loss_collector, device=device or "cpu")
        with torch.device(device or "cpu"):  # parameters are created where they will live
            self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
            self.pos = nn.Embedding(config.seq_length, config.hidden_size)
            self.drop = nn.Dropout(config.dropout)
            self.blocks = nn.ModuleList(Block(config, self.moe_args) for _ in range(config.num_layers))
            self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self._init_weights()

    def _init_weights(self) -> None:
        std = self.config.init_method_std
        out_std = std / math.sqrt(2.0 * self.config.num_layers)
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=out_std if name.endswith(("proj", "fc2")) else std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def num_parameters(self, active: bool = False) -> int:
        """Parameters in total, or active per token (a token uses top_k of E experts' weights)."""
        total = 0
        for name, p in self.named_parameters():
            n = p.numel()
            if active and ".experts.mlp." in name and self.moe_args is not None:
                n = n * self.moe_args.moe_top_k // self.moe_args.moe_num_experts
            total += n
        return total

    def forward(self, tokens_BS: torch.Tensor, labels_BS: Optional[torch.Tensor] = None):
        b, s = tokens_BS.shape
        if s > self.config.seq_length:
            raise ValueError(f"tokens: sequence of {s} exceeds seq_length={self.config.seq_length}")
        positions = torch.arange(s, device=tokens_BS.device)
        x = self.drop(self.embed(tokens_BS) + self.pos(positions))
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.embed.weight)
        if labels_BS is None:
            self._clear_moe_losses()
            return logits
        lm_loss = F.cross_entropy(logits.float().view(b * s, -1), labels_BS.reshape(-1))
        lbl, z = self._moe_losses(lm_loss)
        return {"loss": lm_loss + lbl + z, "lm_loss": lm_loss, "lbl_loss": lbl, "zloss": z}

    def _clear_moe_losses(self) -> None:
        if self.loss_collector is not None:
            self.loss_collector.clear()

    def _moe_losses(self, like: torch.Tensor):
        zero = like.new_zeros(())
        if self.loss_collector is None or not self.training:
            self._clear_moe_losses()
            return zero, zero
        args = self.moe_args
        lbl = zero
        if args.moe_loss_weight > 0:
            lbl = self.loss_collector.batched_load_balancing_loss(args).float()
        z = zero
        if args.moe_zloss_weight > 0:
            z = self.loss_collector.batched_router_zloss(args).sum().float()
        self._clear_moe_losses()
        return lbl, z
