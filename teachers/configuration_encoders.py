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


@dataclass
class EncoderPretrainConfig:
    """`svam pretrain-encoders`: encoders of the configured architectures trained on the
    simulator, for when no real weights can be had (the embedded default). Geometric: Depth
    Anything 3 with its own DPT depth head, supervised by the episodes' metric depth (L1 on log
    depth, clamped to `max_depth_m`: the skybox reads tens of metres). Written as a Depth
    Anything 3 directory that `encoders.geometric_weights` loads exactly as real weights load."""

    episodes: str | None = None
    """Episode shards (need depth); default runs/<name>/episodes."""
    output_dir: str | None = None
    """Default runs/<name>/encoders/geometric."""
    steps: int = 300
    batch_size: int = 16
    """Frames per step (each frame its own single-view clip)."""
    learning_rate: float = 1e-3
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 20
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    max_depth_m: float = 10.0
    val_frames: int = 64
    """Validation frames (val episodes) scored by AbsRel; checkpoint selection only."""
    log_every: int = 10
    eval_every: int = 100
    checkpoint_every: int = 100
    checkpoints_total_limit: int = 2
    resume: str | None = "latest"
