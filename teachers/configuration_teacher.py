"""Configuration of the video diffusion teacher (Stable Video Diffusion architecture, VPP conditioning)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TeacherConfig:
    pretrained_path: str | None = None
    """Local diffusers directory of a (fine-tuned) SVD; None builds the architecture below from scratch."""
    text_encoder_path: str | None = None
    """Local CLIP text-encoder directory; None builds a random-init one of `text_hidden_size`."""
    image_size: int = 64
    num_frames: int = 8
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])
    num_inference_steps: int = 25
    feature_up_blocks: list[int] = field(default_factory=lambda: [0, 1])


@dataclass
class TeacherTrainConfig:
    """`svam train-teacher` optimisation settings."""

    steps: int = 2000
    learning_rate: float = 1e-4
