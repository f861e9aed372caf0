"""Configuration of the frozen foundation encoders whose features are the distillation targets."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EncodersConfig:
    semantic_model: str = "vit_small_patch14_dinov2"
    """timm DINOv2 architecture (`vit_*_patch14_dinov2` or a `*_reg4_dinov2` variant)."""
    semantic_weights: str | None = None
    """Local weights file; None means random init (tests and the tiny config)."""
    semantic_image_size: int = 56
    geometric_model: str = "da3-small"
    """Depth Anything 3 preset."""
    geometric_weights: str | None = None
    """Local Depth Anything 3 directory; None means random init."""
    geometric_image_size: int = 56
