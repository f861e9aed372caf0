"""Configuration of the video diffusion teacher (Stable Video Diffusion architecture, VPP conditioning).

Defaults are the tiny setting (64 px, 8 frames, a ~3M-parameter UNet that trains on 2 CPU cores);
`configs/svd-xt.yaml` describes the published full-scale model. The architecture keys describe a
teacher built from scratch; a teacher loaded from `pretrained_path` takes its architecture from the
directory and the resolved values are what its saved `teacher_config.json` records.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from svam.hashing import json_digest

FEATURE_UPSAMPLE_MODES = ("nearest", "bilinear")


@dataclass
class TeacherConfig:
    pretrained_path: str | None = None
    """Local directory: a svam teacher, or a diffusers SVD (unet/, vae/, scheduler/); None builds
    the architecture below from scratch (random init)."""
    text_encoder_path: str | None = None
    """Local CLIP directory (text encoder + tokenizer) for an SVD `pretrained_path`; None builds a
    random-init CLIP text encoder of `text_*` size with OpenAI CLIP's BPE vocabulary."""
    image_size: int = 64
    """Frames are resized to this square size before the VAE."""
    num_frames: int = 8
    """Frames generated per clip (frame 0 reconstructs the current observation)."""

    # VAE: diffusers AutoencoderKLTemporalDecoder (downsamples by 2 ** (len(channels) - 1)).
    latent_channels: int = 4
    vae_block_out_channels: list[int] = field(default_factory=lambda: [32, 32, 64])
    vae_layers_per_block: int = 1
    vae_scaling_factor: float = 0.18215

    # UNet: diffusers UNetSpatioTemporalConditionModel (channels multiples of 32: GroupNorm(32)).
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    down_block_types: list[str] = field(
        default_factory=lambda: [
            "DownBlockSpatioTemporal",
            "CrossAttnDownBlockSpatioTemporal",
            "CrossAttnDownBlockSpatioTemporal",
        ]
    )
    up_block_types: list[str] = field(
        default_factory=lambda: [
            "CrossAttnUpBlockSpatioTemporal",
            "CrossAttnUpBlockSpatioTemporal",
            "UpBlockSpatioTemporal",
        ]
    )
    layers_per_block: int = 1
    num_attention_heads: list[int] = field(default_factory=lambda: [1, 2, 2])
    transformer_layers_per_block: int = 1
    cross_attention_dim: int = 64
    addition_time_embed_dim: int = 32
    """Sinusoid size of each of the 3 added time ids (SVD: 256, i.e. a 768-d projection input)."""

    # Instruction encoder: transformers CLIPTextModel; projected to cross_attention_dim if sizes differ.
    text_hidden_size: int = 64
    text_num_layers: int = 2
    text_num_heads: int = 2
    text_intermediate_size: int = 128
    max_text_length: int = 20
    """Instruction tokens (padded/truncated): the cross-attention sequence length."""

    # SVD micro-conditioning, fixed constants (the UNet gets fps - 1, as SVD was trained).
    fps: int = 7
    motion_bucket_id: int = 127
    noise_aug_strength: float = 0.02
    """Std of the Gaussian noise added to the current frame (in [-1, 1] pixels) before encoding it."""

    # Sampling and one-step features; a pipeline reads the guidance and feature keys as a
    # `TeacherRuntime` (below), which downstream stages take from the cache's record.
    num_inference_steps: int = 25
    guidance_scale: float = 1.0
    """Classifier-free guidance on the instruction (empty-prompt unconditional); 1 turns it off."""
    feature_up_blocks: list[int] = field(default_factory=lambda: [0, 1])
    feature_sigma: float | None = None
    """Noise level of the one-step pass; None: the first (noisiest) of the sampling schedule."""
    feature_upsample: str = "bilinear"
    """How coarser up-block outputs are resized to the finest requested grid: nearest or bilinear."""

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae_scale_factor

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent key."""
        levels = len(self.block_out_channels)
        for key in ("down_block_types", "up_block_types", "num_attention_heads"):
            if len(getattr(self, key)) != levels:
                raise ValueError(
                    f"teacher.{key} has {len(getattr(self, key))} entries, "
                    f"teacher.block_out_channels has {levels}"
                )
        for key in ("block_out_channels", "vae_block_out_channels"):
            bad = [c for c in getattr(self, key) if c % 32]
            if bad:
                raise ValueError(
                    f"teacher.{key}: {bad} not multiples of 32 (GroupNorm with 32 groups)"
                )
        if self.image_size % self.vae_scale_factor:
            raise ValueError(
                f"teacher.image_size={self.image_size} is not a multiple of the VAE's downsampling "
                f"factor {self.vae_scale_factor}"
            )
        TeacherRuntime.from_config(self).validate(levels)
        if self.num_inference_steps < 1:
            raise ValueError("teacher.num_inference_steps must be at least 1")


@dataclass(frozen=True)
class TeacherRuntime:
    """How a teacher pipeline runs: guidance and the one-step feature read-out.

    The one source of these settings for `TeacherPipeline`. `svam cache-teachers` takes them from
    the config's teacher section and records them in the cache manifest; downstream of the cache
    (distill, train-policy, the policy's config.json, eval) the cache's record is what runs. The
    sampling schedule N is not among them: the cache records it as `num_inference_steps`, a
    policy as `feature_steps`, and modes choose their own (multistep:K).
    """

    guidance_scale: float = 1.0
    feature_up_blocks: tuple[int, ...] = (0, 1)
    feature_sigma: float | None = None
    feature_upsample: str = "bilinear"

    def __post_init__(self) -> None:
        # Lists from YAML or JSON become a tuple, so runtimes compare and hash by value.
        object.__setattr__(self, "feature_up_blocks", tuple(self.feature_up_blocks))

    @classmethod
    def from_config(cls, config: TeacherConfig) -> TeacherRuntime:
        return cls(**{key: getattr(config, key) for key in cls.keys()})

    @classmethod
    def from_record(cls, record: dict[str, Any] | None) -> TeacherRuntime:
        """A recorded runtime. None, the record of a cache or policy written before svam recorded
        runtimes, gives the defaults: the values every shipped config made them with."""
        return cls(**(record or {}))

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_record(self) -> dict[str, Any]:
        """JSON-ready (the up-blocks as a list)."""
        return {**dataclasses.asdict(self), "feature_up_blocks": list(self.feature_up_blocks)}

    @property
    def fingerprint(self) -> str:
        """Short sha256 of the settings; what stage keys record for them."""
        return json_digest(self.to_record())

    def conflict(self, recorded: TeacherRuntime) -> str | None:
        """'teacher.<key>=<this value> where <recorded value> is recorded' for the first key on
        which this runtime differs from `recorded`, else None: every mismatch message's core."""
        mine, theirs = self.to_record(), recorded.to_record()
        for key in self.keys():
            if mine[key] != theirs[key]:
                return f"teacher.{key}={mine[key]!r} where {theirs[key]!r} is recorded"
        return None

    def validate(self, levels: int) -> None:
        """Raise ValueError naming the first key that does not fit a UNet of `levels` levels."""
        blocks = list(self.feature_up_blocks)
        if not blocks or not all(0 <= b < levels for b in blocks):
            raise ValueError(
                f"teacher.feature_up_blocks={blocks}: need up-block indices in [0, {levels - 1}]"
            )
        if self.feature_upsample not in FEATURE_UPSAMPLE_MODES:
            raise ValueError(
                f"teacher.feature_upsample='{self.feature_upsample}': one of {', '.join(FEATURE_UPSAMPLE_MODES)}"
            )


@dataclass
class TeacherTrainConfig:
    """`svam train-teacher`: EDM denoising loss on episode clips, accelerate, EMA, checkpoints."""

    episodes: str | None = None
    """Episode shard directory; None: the run directory's episodes/."""
    output_dir: str | None = None
    """Final teacher directory; None: the run directory's teacher/. Checkpoints, sample grids and
    the VAE warm-up go to a sibling `<output_dir>-train/`."""
    steps: int = 600
    """Optimizer steps of the UNet (each of gradient_accumulation_steps x data.batch_size clips)."""
    learning_rate: float = 5e-4
    lr_scheduler: str = "constant_with_warmup"
    """A diffusers.optimization schedule name (constant, constant_with_warmup, cosine, linear...)."""
    lr_warmup_steps: int = 50
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    max_nonfinite_steps: int = 10
    """Steps in a row with a NaN/Inf loss or gradient (each skipped) after which training stops."""
    mixed_precision: str = "no"
    """accelerate's: no, fp16 (GPU), bf16."""
    gradient_checkpointing: bool = False
    use_ema: bool = True
    ema_decay: float = 0.999
    """EMA decay ceiling; the decay warms up as 1 - (1 + step) ** -2/3 (diffusers EMAModel)."""
    text_dropout: float = 0.1
    """Probability of training a clip with the empty instruction (enables guidance)."""
    sigma_p_mean: float = 0.7
    sigma_p_std: float = 1.6
    """Training noise levels: log(sigma) ~ N(p_mean, p_std^2), as SVD was trained."""
    feature_level_share: float = 0.0
    """Share of training clips noised at the one-step features' level (the pipeline's
    `feature_noise_level`, sigma_max = 700 on SVD's schedule) instead of the log-normal, which
    meets sigma >= 700 about once in 8,000 draws: a teacher trained from scratch is otherwise
    never trained where svam reads its features (SVD's pretraining covered that range)."""
    vae_steps: int = 300
    """Warm-up of a from-scratch VAE on episode frames before the UNet (then frozen); must be 0
    with a pretrained teacher, whose VAE stays frozen."""
    vae_learning_rate: float = 1e-3
    vae_batch_clips: int = 2
    vae_kl_weight: float = 1e-6
    cache_latents: bool = True
    """Keep each clip's VAE latents in memory after the first encode (tiny datasets only)."""
    skill_clips: int = 64
    """Test clips the finished teacher's foresight is scored on against copying the current frame
    (`svam.teachers.skill`; written in its record and skill.md); 0: not scored."""
    log_every: int = 10
    sample_every: int = 200
    """Steps between validation loss + predicted-vs-real sample grids (PNG + tensorboard)."""
    sample_clips: int = 4
    val_batches: int = 2
    checkpoint_every: int = 200
    checkpoints_total_limit: int = 2
    resume: str | None = "latest"
    """'latest' (newest checkpoint in the work dir, if any), a checkpoint directory, or None."""
