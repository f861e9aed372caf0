"""Uni-Perceiver: aggregate the conditioning streams of a clip into a fixed number of tokens.

    stream s (B, T, N_s, D_s) ──LayerNorm──► [area-pool the grid to max_grid] ──Linear──►
        + learned position embedding (on the stream's grid) + learned stream-type embedding
    ──► per frame, the tokens of all streams concatenated: media (B*T, sum_s n_s, dim)
    latent queries, learned per frame (T, q, dim)
    ──► depth x block:
          cross-attention: frame t's queries read frame t's media (keys: media + the queries)
          self-attention among all T*q queries of the clip (space and time jointly)
          feed-forward                                   (pre-norm residual layers, SDPA)
    ──► LayerNorm ──► (B, T*q, dim)

Structure from VPP's "Video Former" (Video_Former_3D in S-VAM's code), itself Flamingo's Perceiver
Resampler made per frame: queries learned per frame, keys and values are the frame's tokens
followed by the queries themselves, then attention across frames, then a feed-forward. Choices
that differ, and why:

- S-VAM concatenates its streams along channels (all on one 16x16 grid, 5376 channels into a
  two-layer MLP). Here each stream is projected on its own and streams are concatenated along
  tokens, with a stream-type embedding: streams may have different grids, pooling can be set per
  stream, and dropping streams (the `onestep` mode) leaves the others' weights unchanged.
- Frame identity is carried by the per-frame queries alone. VPP also adds a time embedding to the
  media tokens, but queries of frame t only read frame t's tokens, where a vector added to every
  key and value shifts all scores equally (softmax-invariant) and every output by one constant.
- The temporal attention runs over all T*q queries jointly instead of per query index across
  frames (VPP): a query can read other slots of other frames. At the published size (224 tokens)
  that adds 0.43 GFLOPs to the aggregator's 68.8 (0.6%).
- Learned 2-D position embeddings per stream (VPP has none on the media; its one-step features
  carry the UNet's spatial layout only implicitly), resized bilinearly to other input grids.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from svam.flops import flop_counter
from svam.policy.configuration_policy import AggregatorConfig, StreamConfig
from svam.policy.layers import Attention, feed_forward, init_linear_layers
from svam.serialization import SvamModel, count_parameters


class StreamInput(nn.Module):
    """One stream's tokens (B, T, N, D) -> (B*T, n, dim) on its (possibly pooled) grid, with
    position and stream-type embeddings."""

    def __init__(self, stream: StreamConfig, dim: int):
        super().__init__()
        self.max_grid = stream.max_grid
        grid = stream.attended_grid
        self.norm = nn.LayerNorm(stream.dim)
        self.proj = nn.Linear(stream.dim, dim)
        self.position_embedding = nn.Parameter(torch.randn(grid, grid, dim) * 0.02)
        self.type_embedding = nn.Parameter(torch.randn(dim) * 0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, frames, count, channels = tokens.shape
        grid = math.isqrt(count)
        x = self.norm(tokens).reshape(batch * frames, grid, grid, channels)
        if self.max_grid is not None and grid > self.max_grid:
            x = F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), self.max_grid).permute(0, 2, 3, 1)
        x = self.proj(x)
        position = self.position_embedding
        if position.shape[:2] != x.shape[1:3]:
            position = F.interpolate(
                position.permute(2, 0, 1)[None], size=x.shape[1:3], mode="bilinear"
            )[0].permute(1, 2, 0)
        return (x + position + self.type_embedding).flatten(1, 2)


class PerceiverBlock(nn.Module):
    """Per-frame cross-attention of the queries, joint self-attention over the clip's queries,
    feed-forward."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim)
        self.media_norm = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, num_heads, dropout)
        self.self_norm = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads, dropout)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = feed_forward(dim, mlp_ratio, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, latents: torch.Tensor, media: torch.Tensor) -> torch.Tensor:
        """latents (B, T, q, dim), media (B*T, n, dim) -> (B, T, q, dim)."""
        batch, frames, queries, dim = latents.shape
        x = latents.reshape(batch * frames, queries, dim)
        query = self.query_norm(x)
        context = torch.cat([self.media_norm(media), query], dim=1)
        x = x + self.dropout(self.cross_attn(query, context))
        x = x.reshape(batch, frames * queries, dim)
        x = x + self.dropout(self.self_attn(self.self_norm(x)))
        x = x + self.dropout(self.mlp(self.mlp_norm(x)))
        return x.reshape(batch, frames, queries, dim)


class UniPerceiver(SvamModel):
    """Conditioning streams {name: (B, T, N_s, D_s)} -> (B, T * queries_per_frame, dim)."""

    config_class = AggregatorConfig
    rebuild = "re-run `svam train-policy`"

    def __init__(self, config: AggregatorConfig):
        super().__init__(config)
        dim = config.dim
        self.inputs = nn.ModuleDict({s.name: StreamInput(s, dim) for s in config.streams})
        self.latents = nn.Parameter(
            torch.randn(config.num_frames, config.queries_per_frame, dim) * 0.02
        )
        self.blocks = nn.ModuleList(
            PerceiverBlock(dim, config.num_heads, config.mlp_ratio, config.dropout)
            for _ in range(config.depth)
        )
        self.output_norm = nn.LayerNorm(dim)
        init_linear_layers(self)

    def forward(self, streams: Mapping[str, torch.Tensor]) -> torch.Tensor:
        batch = self._check_inputs(streams)
        config = self.config
        media = torch.cat([self.inputs[s.name](streams[s.name]) for s in config.streams], dim=1)
        # repeat, not expand: torch's FLOP counter fails on a view of a parameter under no_grad
        latents = self.latents.repeat(batch, 1, 1, 1)
        for block in self.blocks:
            latents = block(latents, media)
        return self.output_norm(latents.flatten(1, 2))

    def _check_inputs(self, streams: Mapping[str, torch.Tensor]) -> int:
        """Exactly the configured streams, each (B, T, square grid, dim); returns B."""
        config = self.config
        expected = config.stream_names
        if not isinstance(streams, Mapping):
            raise TypeError(
                f"Uni-Perceiver takes a mapping of streams {{{', '.join(expected)}}}, "
                f"got {type(streams).__name__}"
            )
        missing = [name for name in expected if name not in streams]
        extra = [name for name in streams if name not in expected]
        if missing or extra:
            problems = [f"missing {', '.join(missing)}"] if missing else []
            problems += [f"unexpected {', '.join(extra)}"] if extra else []
            raise ValueError(
                f"Uni-Perceiver is configured for streams ({', '.join(expected)}), got "
                f"({', '.join(streams)}): {'; '.join(problems)}"
            )
        batch = None
        for stream in config.streams:
            tokens = streams[stream.name]
            shape = tuple(tokens.shape)
            if tokens.dim() != 4 or shape[1] != config.num_frames or shape[3] != stream.dim:
                raise ValueError(
                    f"Uni-Perceiver stream '{stream.name}' must be (B, {config.num_frames}, "
                    f"tokens, {stream.dim}), got {shape}"
                )
            if shape[2] < 1 or math.isqrt(shape[2]) ** 2 != shape[2]:
                raise ValueError(
                    f"Uni-Perceiver stream '{stream.name}' has {shape[2]} tokens per frame, "
                    "not a square grid"
                )
            if batch is not None and shape[0] != batch:
                raise ValueError(
                    f"Uni-Perceiver streams disagree on the batch size ({batch} vs {shape[0]} "
                    f"for '{stream.name}')"
                )
            batch = shape[0]
        return batch


# ------------------------------------------------------------------------------------- cost


def example_streams(
    config: AggregatorConfig, batch: int = 1, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Random streams of the shapes the config is built for."""
    return {
        s.name: torch.randn(batch, config.num_frames, s.tokens, s.dim, device=device)
        for s in config.streams
    }


def build_aggregator(
    config: AggregatorConfig, device: str | torch.device | None = None
) -> UniPerceiver:
    """An aggregator with parameters created on `device` ("meta" for a shape check)."""
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return UniPerceiver(config)


def aggregator_flops(config: AggregatorConfig, batch: int = 1) -> int:
    """Forward FLOPs (multiply-add = 2) for `batch` clips of the configured streams, counted on the
    `meta` device."""
    model = build_aggregator(config, "meta").eval().requires_grad_(False)
    streams = example_streams(config, batch, device="meta")
    with flop_counter() as counter, torch.no_grad():
        model(streams)
    return counter.get_total_flops()


def aggregator_parameters(config: AggregatorConfig) -> int:
    """Parameter count, built on the `meta` device."""
    return count_parameters(build_aggregator(config, "meta"))
