"""Configuration of the policy models: the Uni-Perceiver aggregator, the diffusion action head and
the action/state normalisation.

`PolicyModelsConfig` is the config section; `AggregatorConfig` and `ActionHeadConfig` describe one
model completely (each is what that model saves as its `config.json`). Defaults are the tiny
setting, sized for configs/tiny.yaml: the tiny teacher's one-step features (128 channels on a
16x16 grid, 8 frames), ViT-S/14 DINOv2 (384-d) and da3-small (768-d with its camera token) tokens on
4x4 grids at 56 px, the tiny CLIP text encoder (64-d, 20 tokens), Meta-World's 4-d actions and 4-d
state, chunks of 8. `published_policy_models()` is S-VAM's full-scale setting.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

STREAMS = ("onestep", "semantic", "geometric")
"""Conditioning streams the aggregator can read, named as in the teacher cache: the teacher's
one-step features and the foreseen semantic (DINOv2) and geometric (Depth Anything 3) tokens."""

NORMALIZATION_MODES = ("min_max", "mean_std")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
HEAD_TYPES = ("ddpm", "flow")


POLICY_KINDS = ("onestep", "shortcut", "multistep", "blind")
"""What `svam train-policy` trains (`train_policy.mode`): one policy per kind of conditioning."""

BLIND = "blind"
"""The blind baseline's kind: state and instruction only, no streams (see `ForesightMode`)."""


@dataclass(frozen=True)
class ForesightMode:
    """How a control step gets its foresight, parsed from a mode name:

    - `onestep`: the teacher's one-step features only (VPP);
    - `shortcut`: those features plus decoupler foresight (S-VAM);
    - `multistep:K`: the teacher generates with a K-step schedule, the real encoders read the
      frames (the slow "imagine, then act" baseline); `multistep` alone is K = N, the schedule
      the teacher cache used;
    - `partial:F`: the N-step schedule stopped after a fraction F of its steps, its clean-latent
      estimate decoded and encoded (partial denoising, as LingBot-VA acts on half-denoised
      video);
    - `blind`: no vision at all, the state and the instruction only (no teacher pass, no
      foresight): the baseline that says whether the tasks need vision.

    The generated-foresight modes (`multistep:K`, `partial:F`) all run the `multistep` policy,
    trained on the cache's N-step foresight; K and F only change inference.
    """

    name: str
    kind: str
    steps: int | None = None
    fraction: float | None = None

    @property
    def policy_kind(self) -> str:
        """The trained policy this mode runs (one of POLICY_KINDS)."""
        return "multistep" if self.generates else self.kind

    @property
    def generates(self) -> bool:
        """Whether the teacher generates frames (multi-step or partial sampling)."""
        return self.kind in ("multistep", "partial")

    @property
    def streams(self) -> tuple[str, ...]:
        """The aggregator's input streams; none for `blind`."""
        if self.kind == BLIND:
            return ()
        return ("onestep",) if self.kind == "onestep" else STREAMS

    def sampling(self, full_steps: int) -> tuple[int, int]:
        """(schedule length, steps run) of a generating mode, N = `full_steps`."""
        if self.kind == "partial":
            return full_steps, max(1, round(self.fraction * full_steps))
        steps = self.steps or full_steps
        return steps, steps


def parse_mode(mode: str) -> ForesightMode:
    """A foresight mode name -> ForesightMode; a one-line ValueError naming the forms."""
    kind, colon, value = mode.partition(":")
    if not colon and kind in POLICY_KINDS:
        return ForesightMode(mode, kind)
    if kind == "multistep" and value.isdigit() and int(value) >= 1:
        return ForesightMode(mode, kind, steps=int(value))
    if kind == "partial":
        try:
            fraction = float(value)
        except ValueError:
            fraction = 0.0
        if 0.0 < fraction < 1.0:
            return ForesightMode(mode, kind, fraction=fraction)
    raise ValueError(
        f"foresight mode '{mode}' is not one of onestep, shortcut, multistep, multistep:K "
        "(K >= 1), partial:F (0 < F < 1), blind"
    )


def foresight_streams(mode: str) -> tuple[str, ...]:
    """The aggregator's input streams for a foresight mode: `onestep` reads the one-step features
    only, `blind` reads none (it has no aggregator); every other mode reads them together with
    semantic and geometric tokens."""
    return parse_mode(mode).streams


@dataclass
class StreamConfig:
    """One conditioning stream: (B, T, tokens, dim) per clip, tokens a square grid per frame."""

    name: str = "onestep"
    dim: int = 128
    tokens: int = 256
    """Tokens per frame the stream is built for (a square grid). Other square grids are accepted:
    the learned position embeddings are resized to them."""
    max_grid: int | None = 8
    """Average-pool the stream's grid to at most max_grid x max_grid tokens per frame before the
    blocks (None: keep it). The cost knob: every block's cross-attention reads these tokens."""

    @property
    def grid(self) -> int:
        return math.isqrt(self.tokens)

    @property
    def attended_grid(self) -> int:
        """Side of the grid the blocks attend to (and the position embeddings are learned on)."""
        return self.grid if self.max_grid is None else min(self.grid, self.max_grid)

    def validate(self, where: str) -> None:
        if self.name not in STREAMS:
            raise ValueError(
                f"{where}: stream name '{self.name}' is not one of {', '.join(STREAMS)}"
            )
        where = f"{where} stream '{self.name}'"
        if self.dim < 1 or self.tokens < 1:
            raise ValueError(f"{where}: dim and tokens must be at least 1")
        if self.grid**2 != self.tokens:
            raise ValueError(f"{where}: tokens={self.tokens} is not a square grid")
        if self.max_grid is not None:
            if self.max_grid < 1:
                raise ValueError(f"{where}: max_grid={self.max_grid} must be at least 1")
            if self.grid > self.max_grid and self.grid % self.max_grid:
                raise ValueError(
                    f"{where}: max_grid={self.max_grid} does not divide the {self.grid}x{self.grid} "
                    "grid (area pooling would be uneven)"
                )


def _tiny_streams() -> list[StreamConfig]:
    return [
        StreamConfig("onestep", dim=128, tokens=256, max_grid=8),
        StreamConfig("semantic", dim=384, tokens=16, max_grid=None),
        StreamConfig("geometric", dim=768, tokens=16, max_grid=None),
    ]


@dataclass
class AggregatorConfig:
    """The Uni-Perceiver: latent queries per frame read the frame's tokens of every stream.

    No streams (`for_mode("blind")`) means no aggregator: a policy builds none and gives the head
    no tokens (`num_tokens` is 0, see `PolicyModelsConfig`); a Uni-Perceiver itself needs at least
    one stream (`validate`)."""

    streams: list[StreamConfig] = field(default_factory=_tiny_streams)
    """The streams forward() takes, in order; `for_mode()` keeps those of a foresight mode."""
    num_frames: int = 8
    """Frames T per clip; each frame has its own learned queries, so T is fixed."""
    queries_per_frame: int = 4
    dim: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0

    @property
    def num_tokens(self) -> int:
        """Output tokens: num_frames * queries_per_frame; 0 without streams (no aggregator)."""
        return self.num_frames * self.queries_per_frame if self.streams else 0

    @property
    def stream_names(self) -> tuple[str, ...]:
        return tuple(stream.name for stream in self.streams)

    def for_mode(self, mode: str) -> AggregatorConfig:
        """A copy reading the streams of a foresight mode (all must be configured here)."""
        wanted = foresight_streams(mode)
        missing = [name for name in wanted if name not in self.stream_names]
        if missing:
            raise ValueError(
                f"aggregator: foresight mode '{mode}' reads stream '{missing[0]}', which "
                "aggregator.streams does not configure"
            )
        streams = [dataclasses.replace(s) for s in self.streams if s.name in wanted]
        return dataclasses.replace(self, streams=streams)

    def validate(self) -> None:
        where = "aggregator"
        if not self.streams:
            raise ValueError(f"{where}: streams is empty")
        for stream in self.streams:
            stream.validate(where)
        names = self.stream_names
        if len(set(names)) != len(names):
            raise ValueError(f"{where}: stream names repeat ({', '.join(names)})")
        for key in ("num_frames", "queries_per_frame", "dim", "depth", "num_heads"):
            if getattr(self, key) < 1:
                raise ValueError(f"{where}: {key}={getattr(self, key)} must be at least 1")
        if self.dim % self.num_heads:
            raise ValueError(
                f"{where}: dim={self.dim} is not a multiple of num_heads={self.num_heads}"
            )
        if self.mlp_ratio <= 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"{where}: need mlp_ratio > 0 and 0 <= dropout < 1")


@dataclass
class ActionHeadConfig:
    """The diffusion action head: a transformer denoiser over an action chunk (B, horizon,
    action_dim), conditioned on aggregator tokens, the instruction and (optionally) the state."""

    action_dim: int = 4
    horizon: int = 8
    """Actions per chunk K."""

    # Conditioning. Token counts are what the head is built for (cost estimates, consistency
    # checks); cross-attention accepts any count.
    cond_dim: int = 64
    """Width of the aggregator tokens (aggregator.dim)."""
    cond_tokens: int = 32
    """Aggregator tokens (aggregator.num_tokens); 0 for a policy without an aggregator (`blind`),
    whose context is the instruction and the state alone."""
    text_dim: int = 64
    text_tokens: int = 20
    state_dim: int = 4
    """Proprioception (normalised, current frame) as one more context token; 0: none."""

    # Denoiser.
    dim: int = 64
    depth: int = 2
    """Denoiser blocks: self-attention over the chunk, cross-attention to the context, MLP."""
    context_layers: int = 1
    """Self-attention layers over the context tokens, run once per sample, not per step."""
    num_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0

    type: str = "ddpm"
    """How the head learns and samples chunks: `ddpm` (DDPM noise in training, DDIM steps at
    inference, the keys below) or `flow` (flow matching, as pi0 and LingBot-VA: a velocity on the
    straight path from noise to the chunk, `num_inference_steps` Euler steps of 1/K)."""

    # Noise schedule: DDPM for training, DDIM for sampling, both built from these keys. A flow
    # head reads num_train_timesteps (the scale of its time embedding), clip_sample(_range) (the
    # final chunk) and num_inference_steps.
    num_train_timesteps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: str = "sample"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    timestep_spacing: str = "trailing"
    """`trailing` starts DDIM at the last training step (pure noise): Lin et al. 2024, "Common
    diffusion noise schedules and sample steps are flawed"). With 100 training steps and 10 DDIM
    steps, `leading` would start at t=90, where sqrt(alpha_bar) is 0.14 rather than 0.0005."""
    num_inference_steps: int = 10
    flow_time_alpha: float = 1.5
    flow_time_min: float = 0.001
    """A flow head trains at times t = flow_time_min + (1 - flow_time_min) * u, u ~ Beta(alpha, 1)
    (t = 1 is pure noise): pi0's distribution (Black et al. 2024, alpha 1.5, s = 0.999), which
    puts more weight on the noisy end, where a few Euler steps start."""

    def scheduler_kwargs(self) -> dict:
        """Keys shared by the DDPM (training) and DDIM (sampling) schedulers."""
        return dict(
            num_train_timesteps=self.num_train_timesteps,
            beta_schedule=self.beta_schedule,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            prediction_type=self.prediction_type,
            clip_sample=self.clip_sample,
            clip_sample_range=self.clip_sample_range,
            timestep_spacing=self.timestep_spacing,
        )

    def validate(self) -> None:
        where = "action_head"
        positive = (
            "action_dim",
            "horizon",
            "cond_dim",
            "text_dim",
            "text_tokens",
            "dim",
            "depth",
            "num_heads",
            "num_train_timesteps",
            "num_inference_steps",
        )
        for key in positive:
            if getattr(self, key) < 1:
                raise ValueError(f"{where}: {key}={getattr(self, key)} must be at least 1")
        for key in ("cond_tokens", "state_dim", "context_layers"):
            if getattr(self, key) < 0:
                raise ValueError(f"{where}: {key}={getattr(self, key)} must be at least 0")
        if self.dim % self.num_heads:
            raise ValueError(
                f"{where}: dim={self.dim} is not a multiple of num_heads={self.num_heads}"
            )
        if self.dim % 2:
            raise ValueError(f"{where}: dim={self.dim} must be even (sinusoidal time embedding)")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"{where}: prediction_type '{self.prediction_type}' is not one of "
                f"{', '.join(PREDICTION_TYPES)}"
            )
        if self.type not in HEAD_TYPES:
            raise ValueError(f"{where}: type '{self.type}' is not one of {', '.join(HEAD_TYPES)}")
        if self.flow_time_alpha <= 0 or not 0 <= self.flow_time_min < 1:
            raise ValueError(f"{where}: need flow_time_alpha > 0 and 0 <= flow_time_min < 1")
        if self.type == "ddpm" and self.num_inference_steps > self.num_train_timesteps:
            raise ValueError(
                f"{where}: num_inference_steps={self.num_inference_steps} exceeds "
                f"num_train_timesteps={self.num_train_timesteps}"
            )
        if self.clip_sample_range <= 0:
            raise ValueError(f"{where}: clip_sample_range must be positive")
        if self.mlp_ratio <= 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"{where}: need mlp_ratio > 0 and 0 <= dropout < 1")


@dataclass
class NormalizationConfig:
    """How actions and state are normalised, with statistics of the training data."""

    actions: str = "min_max"
    """min_max maps each dimension's [min, max] to [-1, 1] (what clip_sample assumes); mean_std
    standardises."""
    state: str = "min_max"
    eps: float = 1e-4
    """Dimensions whose range (min_max) or std (mean_std) is below eps are only centred."""

    def validate(self) -> None:
        for key in ("actions", "state"):
            if getattr(self, key) not in NORMALIZATION_MODES:
                raise ValueError(
                    f"normalization.{key}='{getattr(self, key)}' is not one of "
                    f"{', '.join(NORMALIZATION_MODES)}"
                )
        if self.eps <= 0:
            raise ValueError(f"normalization.eps={self.eps} must be positive")


@dataclass
class PolicyModelsConfig:
    """The config section: aggregator, action head and normalisation of one policy.

    An aggregator without streams (the `blind` policy) is no aggregator: it is not validated nor
    built, and the head is conditioned on the instruction's text tokens and the state alone. The
    head is unchanged: the policy hands it an empty (B, 0, cond_dim) token tensor, so its context
    (and its cross-attention) is just text + state, with nothing to learn or mask; cond_tokens
    must then be 0. That keeps one head and one ActionCondition for every kind, where an optional
    `tokens` or a learned stand-in token would add a branch (or a constant) to every path."""

    aggregator: AggregatorConfig = field(default_factory=AggregatorConfig)
    action_head: ActionHeadConfig = field(default_factory=ActionHeadConfig)
    normalization: NormalizationConfig = field(default_factory=NormalizationConfig)

    def validate(self) -> None:
        if self.aggregator.streams:  # none: no aggregator (blind), see the class docstring
            self.aggregator.validate()
        self.action_head.validate()
        self.normalization.validate()
        head, aggregator = self.action_head, self.aggregator
        tokens = "num_frames * queries_per_frame" if aggregator.streams else "no streams: none"
        for key, value, why in (
            ("cond_dim", aggregator.dim, "dim"),
            ("cond_tokens", aggregator.num_tokens, tokens),
        ):
            if getattr(head, key) != value:
                raise ValueError(
                    f"action_head.{key}={getattr(head, key)} but the aggregator gives {value} "
                    f"({why})"
                )
        if (
            self.normalization.actions == "mean_std"
            and head.clip_sample
            and (head.clip_sample_range < 3)
        ):
            raise ValueError(
                f"action_head.clip_sample_range={head.clip_sample_range} clips standardised "
                "actions (normalization.actions='mean_std'): use min_max, clip_sample=false or a "
                "range of at least 3"
            )


def published_policy_models() -> PolicyModelsConfig:
    """S-VAM's published setting (its CALVIN config): SVD up-blocks 0+1 features (2560 channels),
    DINOv2 ViT-B/14 (768-d) and DA3-large with camera token (2048-d), all on 16x16 grids over 16
    frames, unpooled; 224 queries (14 per frame), dim 384, depth 6, 8 heads (S-VAM's heads are 64
    wide, 512 in all; here 8 heads split the 384). The head: dim 384, 4 context ("encoder") and 4
    denoiser layers, 8 heads, dropout 0.1 (S-VAM: 0.3 on attention, 0.1 residual), the pooled CLIP
    ViT-B/32 instruction (512-d, one token), 7-d CALVIN actions in chunks of 10, 10 DDIM steps.
    S-VAM freezes its proprioception embedding at init, so no state here. Sizes: 16.7M (aggregator)
    and 21.4M (head) parameters."""
    streams = [
        StreamConfig("onestep", dim=2560, tokens=256, max_grid=None),
        StreamConfig("semantic", dim=768, tokens=256, max_grid=None),
        StreamConfig("geometric", dim=2048, tokens=256, max_grid=None),
    ]
    aggregator = AggregatorConfig(
        streams=streams, num_frames=16, queries_per_frame=14, dim=384, depth=6, num_heads=8
    )
    head = ActionHeadConfig(
        action_dim=7,
        horizon=10,
        cond_dim=384,
        cond_tokens=224,
        text_dim=512,
        text_tokens=1,
        state_dim=0,
        dim=384,
        depth=4,
        context_layers=4,
        num_heads=8,
        dropout=0.1,
    )
    return PolicyModelsConfig(aggregator=aggregator, action_head=head)
