"""Configuration of the frozen foundation encoders whose features are the distillation targets."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EncodersConfig:
    semantic_model: str = "vit_small_patch14_dinov2"
    """timm DINOv2 architecture (`vit_*_patch14_dinov2` or a `*_reg4_dinov2` variant)."""
    semantic_weights: str | None = None
    """Local weights file (.safetensors or .pth state dict, timm or original DINOv2 naming);
    None means random init (tests and the tiny config)."""
    semantic_image_size: int = 56
    """Frames are resized to this square size; a multiple of the patch size 14."""
    geometric_model: str = "da3-small"
    """Depth Anything 3 preset (da3-small, da3-base, da3-large, da3-giant, ...)."""
    geometric_weights: str | None = None
    """Local Depth Anything 3 directory (config.json + model.safetensors); None means random init."""
    geometric_image_size: int = 56
    """Frames are resized to this square size; a multiple of the patch size 14."""
    geometric_layer: int = 0
    """Which of the preset's out-layers gives the tokens: 0 is the first (S-VAM's choice)."""
    geometric_camera_token: bool = False
    """Prepend DA3's per-view camera token to the patch tokens (P+1 tokens). S-VAM's targets do
    not carry it; see teachers/encoders.py."""
    init_seed: int = 0
    """Seed of random-init encoders (ignored where weights are given)."""
