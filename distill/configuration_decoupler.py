"""Configuration of the decouplers: one-step teacher features -> foreseen encoder tokens.

A `DecouplerConfig` describes one decoupler completely (it is what the model saves as its
`config.json`); `DecouplersConfig` is the config section holding the semantic (DINOv2) and the
geometric (Depth Anything 3) branch. Defaults are the tiny setting: the tiny teacher's one-step
features (up-blocks 0+1: 64 + 64 channels on a 16x16 latent grid, 8 frames) mapped to a ViT-S/14
DINOv2 and a `da3-small` at 56 px (4x4 patch tokens; DA3 presets built with `cat_token` give
2 x embed_dim channels per token, 768 for da3-small: see teachers/encoders.py). `published_decouplers()` is S-VAM's full-scale setting and
`full_scale_decouplers()` svam's cheaper full-scale default (see its docstring for the trade).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

BRANCHES = ("semantic", "geometric")

SHARED_INPUT_KEYS = ("in_channels", "feature_size", "num_frames")
"""Keys both branches must agree on: they describe the same teacher's one-step features."""


@dataclass
class DecouplerConfig:
    branch: str = "semantic"
    """Which foresight this decoupler produces: semantic (DINOv2) or geometric (Depth Anything 3)."""
    encoder: str = "vit_small_patch14_dinov2"
    """Name or fingerprint of the encoder whose tokens are the targets (and the reference)."""

    # Input: the teacher's one-step features (B, T, in_channels, h, w).
    in_channels: int = 128
    feature_size: int = 16
    """Side of the teacher's feature grid. The model adapts any grid; this is the one it is built
    for, used by cost estimates and by checks against a teacher cache."""
    num_frames: int = 8
    """Clip length T the decoupler is built for (sinusoidal time embeddings accept any T)."""

    # Output: target tokens (B, T, target_tokens, target_dim), a square grid of patch tokens.
    target_dim: int = 384
    target_tokens: int = 16

    # Reference conditioning (S-VAM's "WithRef"): the real current frame's encoder tokens.
    reference: bool = True
    reference_dim: int | None = None
    """None: target_dim (the reference comes from the target encoder)."""
    reference_tokens: int | None = None
    """None: target_tokens."""

    # Trunk. Cost knobs: hidden_dim and num_layers (quadratic and linear), mlp_ratio, and
    # token_pool, which runs the blocks on a grid token_pool times coarser per side.
    hidden_dim: int = 64
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0
    token_pool: int = 1
    """Average-pool the target grid by this factor before the attention blocks; their update is
    upsampled (bilinear) and added back to the full-resolution tokens. 1: blocks at full grid."""
    dropout: float = 0.0
    position_embeddings: bool = True
    """Fixed sinusoidal space (2-D) and time (1-D) embeddings before the blocks (S-VAM has none)."""

    @property
    def target_grid(self) -> int:
        return math.isqrt(self.target_tokens)

    @property
    def ref_dim(self) -> int:
        return self.target_dim if self.reference_dim is None else self.reference_dim

    @property
    def ref_tokens(self) -> int:
        return self.target_tokens if self.reference_tokens is None else self.reference_tokens

    @property
    def ref_grid(self) -> int:
        return math.isqrt(self.ref_tokens)

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent key."""
        where = f"decoupler ({self.branch})"
        if self.branch not in BRANCHES:
            raise ValueError(f"{where}: branch must be one of {', '.join(BRANCHES)}")
        positive = (
            "in_channels",
            "feature_size",
            "num_frames",
            "target_dim",
            "target_tokens",
            "hidden_dim",
            "num_layers",
            "num_heads",
            "token_pool",
        )
        for key in positive:
            if getattr(self, key) < 1:
                raise ValueError(f"{where}: {key}={getattr(self, key)} must be at least 1")
        if self.reference and (self.ref_dim < 1 or self.ref_tokens < 1):
            raise ValueError(f"{where}: reference_dim and reference_tokens must be at least 1")
        grids = {"target_tokens": self.target_tokens}
        if self.reference:
            grids["reference_tokens"] = self.ref_tokens
        for key, tokens in grids.items():
            if math.isqrt(tokens) ** 2 != tokens:
                raise ValueError(f"{where}: {key}={tokens} is not a square grid of patch tokens")
        if self.hidden_dim % self.num_heads:
            raise ValueError(
                f"{where}: hidden_dim={self.hidden_dim} is not a multiple of num_heads={self.num_heads}"
            )
        if self.position_embeddings and self.hidden_dim % 4:
            raise ValueError(
                f"{where}: hidden_dim={self.hidden_dim} must be a multiple of 4 for the 2-D "
                "sinusoidal position embeddings"
            )
        if self.target_grid % self.token_pool:
            raise ValueError(
                f"{where}: token_pool={self.token_pool} does not divide the {self.target_grid}x"
                f"{self.target_grid} target grid"
            )
        if self.mlp_ratio <= 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"{where}: need mlp_ratio > 0 and 0 <= dropout < 1")


def _geometric(**changes) -> DecouplerConfig:
    return dataclasses.replace(
        DecouplerConfig(branch="geometric", encoder="da3-small", target_dim=768), **changes
    )


@dataclass
class DecouplersConfig:
    """The config section: one decoupler per branch (branches may differ in size and targets)."""

    semantic: DecouplerConfig = field(default_factory=DecouplerConfig)
    geometric: DecouplerConfig = field(default_factory=_geometric)

    def branches(self) -> dict[str, DecouplerConfig]:
        return {"semantic": self.semantic, "geometric": self.geometric}

    def validate(self) -> None:
        for name, branch in self.branches().items():
            if branch.branch != name:
                raise ValueError(
                    f"decouplers.{name}.branch is '{branch.branch}', expected '{name}'"
                )
            branch.validate()
        for key in SHARED_INPUT_KEYS:
            semantic, geometric = getattr(self.semantic, key), getattr(self.geometric, key)
            if semantic != geometric:
                raise ValueError(
                    f"decouplers.semantic.{key}={semantic} but decouplers.geometric.{key}={geometric}: "
                    "both read the same one-step features"
                )


def published_decouplers() -> DecouplersConfig:
    """S-VAM's published setting: SVD up-blocks 0+1 (2560 channels, 16x16 grid, 16 frames) to
    DINOv2 ViT-B/14 (768-d) and Depth Anything 3 large (2 x 1024 = 2048-d, `cat_token`) patch tokens
    at 224 px (16x16); hidden 1024, 4 blocks, 8 heads, no position embeddings (S-VAM has none);
    105.0M / 107.6M parameters."""
    trunk = dict(
        in_channels=2560,
        feature_size=16,
        num_frames=16,
        target_tokens=256,
        hidden_dim=1024,
        num_layers=4,
        num_heads=8,
        mlp_ratio=4.0,
        token_pool=1,
        dropout=0.1,
        position_embeddings=False,
    )
    return DecouplersConfig(
        semantic=DecouplerConfig(encoder="vit_base_patch14_dinov2", target_dim=768, **trunk),
        geometric=_geometric(encoder="da3-large", target_dim=2048, **trunk),
    )


def full_scale_decouplers() -> DecouplersConfig:
    """svam's full-scale default: the published width and depth, with the blocks on an 8x8 grid
    (token_pool=2) instead of 16x16, and sinusoidal space-time embeddings. Both decouplers cost
    ~17% of the teacher's one-step pass instead of ~63%; full-resolution detail reaches the output
    through the skip around the blocks (`scripts/bench_decoupler.py` has the numbers)."""
    published = published_decouplers()
    changes = dict(token_pool=2, position_embeddings=True)
    return DecouplersConfig(
        semantic=dataclasses.replace(published.semantic, **changes),
        geometric=dataclasses.replace(published.geometric, **changes),
    )
