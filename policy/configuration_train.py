"""Configuration of `svam train-policy`: training the aggregator and the action head of one
foresight mode on a teacher cache. The models' sizes are the `policy` section
(`PolicyModelsConfig`); this section is how they are trained."""

from __future__ import annotations

from dataclasses import dataclass

from svam.policy.configuration_policy import POLICY_KINDS

ONESTEP_SOURCES = ("auto", "cached", "on-the-fly")
MIXED_PRECISION = ("no", "fp16", "bf16")


def mode_dirname(mode: str) -> str:
    """A foresight mode as a directory name: `multistep:25` -> `multistep-25`."""
    return mode.replace(":", "-")


@dataclass
class PolicyTrainConfig:
    mode: str = "shortcut"
    """The policy to train: shortcut (one-step features + decoupler foresight), onestep (one-step
    features only), multistep (the real encoders on the teacher's generated frames, trained on
    the cache's N-step targets; it runs every multistep:K and partial:F mode at inference) or
    blind (state and instruction only, no vision: the baseline)."""
    cache: str | None = None
    """Teacher-cache directory; None: cache.output_dir, else the run directory's cache/."""
    teacher: str | None = None
    """The cache's teacher (instruction encoder, on-the-fly features, inference); None:
    cache.teacher, else the run directory's teacher/."""
    decouplers: str | None = None
    """Decoupler directory (shortcut); None: distill.output_dir, else the run's decouplers/."""
    output_dir: str | None = None
    """Where the policy goes; None: the run directory's policy/<mode>/. Checkpoints go to a
    sibling `<output_dir>-train/`."""
    onestep: str = "auto"
    """Where one-step features come from: cached, on-the-fly (the teacher, fresh noise per clip
    and epoch) or auto (cached when the cache holds them). A blind policy reads none: ignored."""
    use_state: bool = True
    """Condition the action head on the current proprioception."""
    cross_fit: bool = True
    """shortcut: train on out-of-sample foresight, each train clip's from the decoupler pair that
    held its episode out, when `svam distill` cross-fitted them (distill.cross_fit_folds >= 2);
    false, or without folds: the published decouplers' in-sample foresight."""

    steps: int = 300
    batch_size: int = 16
    learning_rate: float = 3e-4
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 20
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    max_nonfinite_steps: int = 10
    """Steps in a row with a NaN/Inf loss or gradient (each skipped) after which training stops."""
    mixed_precision: str = "no"
    use_ema: bool = True
    ema_decay: float = 0.999

    num_workers: int | None = None
    """Loader workers per process; None: data.num_workers."""
    shuffle_buffer: int | None = None
    """None: data.shuffle_buffer."""
    normalizer_clips: int | None = None
    """Train clips the action/state statistics are fitted on (evenly over the split); None: all."""
    val_clips: int | None = 64
    """Validation clips of the final report (denoising loss and sampled-chunk error)."""

    log_every: int = 10
    checkpoint_every: int = 100
    checkpoints_total_limit: int = 2
    resume: str | None = "latest"
    """'latest' (newest checkpoint in the work dir, if any), a checkpoint directory, or None."""

    def validate(self) -> None:
        """Raise ValueError naming the first bad key."""
        if self.mode not in POLICY_KINDS:
            raise ValueError(
                f"train_policy.mode='{self.mode}': one of {', '.join(POLICY_KINDS)} (multistep "
                "trains on the cache's N-step foresight and runs multistep:K and partial:F)"
            )
        if self.onestep not in ONESTEP_SOURCES:
            raise ValueError(
                f"train_policy.onestep='{self.onestep}': one of {', '.join(ONESTEP_SOURCES)}"
            )
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"train_policy.mixed_precision='{self.mixed_precision}': one of "
                f"{', '.join(MIXED_PRECISION)}"
            )
        for key in (
            "steps",
            "batch_size",
            "gradient_accumulation_steps",
            "log_every",
            "checkpoint_every",
            "checkpoints_total_limit",
        ):
            if getattr(self, key) < 1:
                raise ValueError(f"train_policy.{key}={getattr(self, key)} must be at least 1")
        if not 0 < self.ema_decay < 1:
            raise ValueError(f"train_policy.ema_decay={self.ema_decay} must be in (0, 1)")
        for key in ("normalizer_clips", "val_clips"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"train_policy.{key}={value} must be at least 1 (or null: all)")
