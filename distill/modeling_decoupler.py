"""Decouplers: map a teacher's noisy one-step features to the encoder tokens of its future frames.

    features (B, T, C, h, w) ──LayerNorm, Linear──► hidden tokens on the target grid (g x g)
    reference (B, P_ref, D_ref) ──LayerNorm, Linear──► added to every frame          (optional)
        ──► [token_pool > 1: average-pool to (g/p x g/p)] + sinusoidal space/time embeddings
        ──► blocks: spatial attention + MLP within each frame, then temporal attention + MLP
            across frames at each grid position (pre-norm residual layers)
        ──► [token_pool > 1: the blocks' update, upsampled bilinearly, added to the full grid]
        ──► LayerNorm, Linear ──► target tokens (B, T, g*g, D)

Grid adaptation: feature maps and reference tokens are brought to the target grid by area
averaging where they are larger and bilinear interpolation where they are smaller. Both are linear
with weights summing to one, so they commute with the input projection; each input is projected on
whichever side of the resampling has fewer tokens.

Reference conditioning follows S-VAM's "WithRef" decoupler: the real current frame's tokens are
projected and added to every frame. S-VAM projects them to the 2560 feature channels for every
frame and adds them before the input LayerNorm; here they are normalised and projected once per
clip into the hidden width and added after the input projection (0.4 instead of 16 GFLOPs at full
scale).

A decoupler saves as a diffusers model directory (`svam.serialization`): `config.json` (the
`DecouplerConfig`, including the target encoder and dims) and its safetensors weights.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from torch import nn

from svam.distill.configuration_decoupler import DecouplerConfig, DecouplersConfig
from svam.flops import flop_counter
from svam.serialization import ModelLoadError, SvamModel

DecouplerLoadError = ModelLoadError
"""The one model-directory load error, under the decoupler's name."""


# ------------------------------------------------------------------------------------- layers


class Attention(nn.Module):
    """Multi-head self-attention through torch's scaled_dot_product_attention (flash/memory-
    efficient kernels on CUDA, a fused kernel on CPU)."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.num_heads, dim // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class TransformerLayer(nn.Module):
    """Pre-norm self-attention and MLP over (batch, sequence, dim)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, dropout)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x)))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class SpaceTimeBlock(nn.Module):
    """Attention among the tokens of each frame, then among the frames at each grid position."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.spatial = TransformerLayer(dim, num_heads, mlp_ratio, dropout)
        self.temporal = TransformerLayer(dim, num_heads, mlp_ratio, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, frames, tokens, dim = x.shape
        x = self.spatial(x.reshape(batch * frames, tokens, dim)).view(batch, frames, tokens, dim)
        x = x.transpose(1, 2).reshape(batch * tokens, frames, dim)
        return self.temporal(x).view(batch, tokens, frames, dim).transpose(1, 2)


# ---------------------------------------------------------------------------------- helpers


def resample_grid(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize channels-last maps (N, h, w, C) to (N, size, size, C): area averaging along a side
    that shrinks, bilinear interpolation along one that grows."""
    height, width = x.shape[1:3]
    if (height, width) == (size, size):
        return x
    x = x.permute(0, 3, 1, 2)
    if height > size or width > size:
        x = F.adaptive_avg_pool2d(x, (min(height, size), min(width, size)))
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.permute(0, 2, 3, 1)


def project_to_grid(x: torch.Tensor, norm: nn.Module, proj: nn.Module, size: int) -> torch.Tensor:
    """Normalise and project channels-last maps (N, h, w, C) onto a (size x size) grid, projecting
    after shrinking or before growing so the projection runs on the fewer tokens."""
    x = norm(x)
    if x.shape[1] * x.shape[2] > size * size:
        return proj(resample_grid(x, size))
    return resample_grid(proj(x), size)


def sincos(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer sinusoids (len(positions), dim) for integer positions."""
    frequencies = 10000.0 ** -(torch.arange(dim // 2, device=positions.device) / (dim // 2))
    angles = positions[:, None].float() * frequencies[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def space_time_embedding(frames: int, grid: int, dim: int, device: torch.device) -> torch.Tensor:
    """(frames, grid*grid, dim): 1-D time sinusoids plus 2-D (row, column) space sinusoids."""
    steps = torch.arange(grid, device=device)
    rows, cols = steps.repeat_interleave(grid), steps.repeat(grid)
    space = torch.cat([sincos(rows, dim // 2), sincos(cols, dim // 2)], dim=1)
    time = sincos(torch.arange(frames, device=device), dim)
    return time[:, None] + space[None]


# ------------------------------------------------------------------------------------ model


class Decoupler(SvamModel):
    """One-step features (B, T, C, h, w) [+ reference tokens (B, P_ref, D_ref)] -> (B, T, P, D).

    The head predicts per-channel standardised tokens; `target_mean` and `target_std` (the train
    split's per-channel statistics, set by `svam distill` and saved with the weights) undo the
    standardisation, so `forward` returns tokens in the encoder's own scale. Trained on
    standardised targets, every channel counts alike, whatever its scale (half of Depth Anything
    3's concatenated tokens would otherwise dominate the loss)."""

    config_class = DecouplerConfig
    rebuild = "re-run `svam distill`"

    def __init__(self, config: DecouplerConfig):
        super().__init__(config)
        dim = config.hidden_dim
        self.input_norm = nn.LayerNorm(config.in_channels)
        self.input_proj = nn.Linear(config.in_channels, dim)
        if config.reference:
            self.reference_norm = nn.LayerNorm(config.ref_dim)
            self.reference_proj = nn.Linear(config.ref_dim, dim)
        self.blocks = nn.ModuleList(
            SpaceTimeBlock(dim, config.num_heads, config.mlp_ratio, config.dropout)
            for _ in range(config.num_layers)
        )
        self.output_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, config.target_dim)
        self.register_buffer("target_mean", torch.zeros(config.target_dim))
        self.register_buffer("target_std", torch.ones(config.target_dim))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(
        self, features: torch.Tensor, reference: torch.Tensor | None = None
    ) -> torch.Tensor:
        config = self.config
        self._check_inputs(features, reference)
        batch, frames = features.shape[:2]
        grid = config.target_grid
        maps = features.permute(0, 1, 3, 4, 2).flatten(0, 1)
        x = project_to_grid(maps, self.input_norm, self.input_proj, grid)
        x = x.reshape(batch, frames, grid, grid, config.hidden_dim)
        if reference is not None:
            ref = reference.reshape(batch, config.ref_grid, config.ref_grid, config.ref_dim)
            x = x + project_to_grid(ref, self.reference_norm, self.reference_proj, grid)[:, None]
        x = self._context(x)
        standardised = self.head(self.output_norm(x)).flatten(2, 3)
        return standardised * self.target_std + self.target_mean

    @torch.no_grad()
    def set_target_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """The per-channel mean and std (D,) of the targets the output is standardised by."""
        self.target_mean.copy_(mean)
        self.target_std.copy_(std.clamp_min(1e-6))

    def standardise(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (..., D) in the encoder's scale -> standardised per channel (what the head
        predicts)."""
        return (tokens - self.target_mean) / self.target_std

    def _context(self, x: torch.Tensor) -> torch.Tensor:
        """Run the blocks on (B, T, g, g, hidden), on a token_pool-times coarser grid if set."""
        batch, frames, grid, _, dim = x.shape
        pool = self.config.token_pool
        coarse = x
        if pool > 1:
            coarse = F.avg_pool2d(x.flatten(0, 1).permute(0, 3, 1, 2), pool)
            coarse = coarse.permute(0, 2, 3, 1).unflatten(0, (batch, frames))
        side = grid // pool
        tokens = coarse.reshape(batch, frames, side * side, dim)
        if self.config.position_embeddings:
            tokens = tokens + space_time_embedding(frames, side, dim, x.device).to(x.dtype)
        out = tokens
        for block in self.blocks:
            out = block(out)
        if pool == 1:
            return out.reshape(batch, frames, grid, grid, dim)
        update = (out - tokens).reshape(batch * frames, side, side, dim).permute(0, 3, 1, 2)
        update = F.interpolate(update, size=(grid, grid), mode="bilinear", align_corners=False)
        return x + update.permute(0, 2, 3, 1).unflatten(0, (batch, frames))

    def _check_inputs(self, features: torch.Tensor, reference: torch.Tensor | None) -> None:
        config = self.config
        name = f"{config.branch} decoupler"
        if features.dim() != 5 or features.shape[2] != config.in_channels:
            raise ValueError(
                f"{name}: features must be (B, T, {config.in_channels}, h, w), "
                f"got {tuple(features.shape)}"
            )
        expected = (features.shape[0], config.ref_tokens, config.ref_dim)
        if config.reference and reference is None:
            raise ValueError(
                f"{name} is configured with reference conditioning (reference=True): pass the "
                f"current frame's encoder tokens, shape {expected}"
            )
        if not config.reference and reference is not None:
            raise ValueError(
                f"{name} was built without reference conditioning (reference=False): "
                "pass reference=None"
            )
        if reference is not None and tuple(reference.shape) != expected:
            raise ValueError(f"{name}: reference must be {expected}, got {tuple(reference.shape)}")


def read_decoupler_config(path: str | os.PathLike) -> DecouplerConfig:
    """The `DecouplerConfig` of a saved decoupler directory (checked, without loading weights)."""
    return Decoupler.read_config(path)


def build_decouplers(
    config: DecouplersConfig, device: str | torch.device | None = None
) -> dict[str, Decoupler]:
    """The semantic and the geometric decoupler of a config section, keyed by branch; `device`
    ("meta" for a shape check) is where parameters are created (default: torch's default)."""
    config.validate()
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return {name: Decoupler(branch) for name, branch in config.branches().items()}


# ------------------------------------------------------------------------------------- cost


def example_inputs(
    config: DecouplerConfig, batch: int = 1, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random (features, reference) of the shapes the config is built for."""
    size = config.feature_size
    features = torch.randn(batch, config.num_frames, config.in_channels, size, size, device=device)
    if not config.reference:
        return features, None
    return features, torch.randn(batch, config.ref_tokens, config.ref_dim, device=device)


def decoupler_flops(config: DecouplerConfig, batch: int = 1) -> int:
    """Forward FLOPs (multiply-add = 2) for `batch` clips of the configured input, counted on the
    `meta` device: nothing is allocated, so full-scale configs cost milliseconds."""
    with torch.device("meta"):
        model = Decoupler(config).eval()
        features, reference = example_inputs(config, batch, device="meta")
    with flop_counter() as counter, torch.no_grad():
        model(features, reference)
    return counter.get_total_flops()


def decoupler_parameters(config: DecouplerConfig) -> int:
    """Parameter count, built on the `meta` device."""
    with torch.device("meta"):
        return sum(p.numel() for p in Decoupler(config).parameters())
