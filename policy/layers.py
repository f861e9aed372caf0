"""Layers shared by the aggregator and the action head: SDPA attention, feed-forward, pre-norm
transformer layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KeyValue = tuple[torch.Tensor, torch.Tensor]
"""Keys and values split into heads, each (B, heads, M, head_dim)."""


class Attention(nn.Module):
    """Multi-head attention through torch's scaled_dot_product_attention. Self-attention when no
    context is given; keys and values of a fixed context can be computed once with `key_value()`
    and passed to every call that reads it (the action head's denoising steps do)."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def key_value(self, context: torch.Tensor) -> KeyValue:
        batch, length, dim = context.shape
        kv = self.kv(context).view(batch, length, 2, self.num_heads, dim // self.num_heads)
        key, value = kv.permute(2, 0, 3, 1, 4)
        return key, value

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        key_value: KeyValue | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, N, dim) attends to `context` (B, M, dim), to precomputed `key_value`, or to
        itself; `mask` (B, M) is True where a key may be attended to."""
        batch, length, dim = x.shape
        if key_value is None:
            key_value = self.key_value(x if context is None else context)
        query = self.q(x).view(batch, length, self.num_heads, -1).transpose(1, 2)
        attn_mask = None if mask is None else mask[:, None, None, :]
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(
            query, *key_value, attn_mask=attn_mask, dropout_p=dropout
        )
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


def feed_forward(dim: int, mlp_ratio: float, dropout: float) -> nn.Sequential:
    hidden = int(dim * mlp_ratio)
    return nn.Sequential(
        nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim)
    )


class TransformerLayer(nn.Module):
    """Pre-norm self-attention and feed-forward over (B, N, dim), with an optional key mask."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, dropout)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = feed_forward(dim, mlp_ratio, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), mask=mask))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


def init_linear_layers(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every Linear (as in DiT and the decouplers)."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
