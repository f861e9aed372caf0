"""Configuration of `svam distill`: training the decouplers on a teacher cache.

The decouplers' sizes are the `decouplers` section (`DecouplersConfig`); this section is how they
are trained, evaluated and checkpointed.
"""

from __future__ import annotations

from dataclasses import dataclass

ONESTEP_MODES = ("auto", "cached", "on-the-fly")
MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass
class DistillConfig:
    cache: str | None = None
    """Teacher-cache directory; None: the run directory's cache/."""
    teacher: str | None = None
    """Teacher directory, for one-step features computed on the fly; None: cache.teacher, else
    the run directory's teacher/. It must be the teacher the cache was made with."""
    output_dir: str | None = None
    """Where the best decouplers and the fidelity report go; None: the run directory's
    decouplers/. Checkpoints go to a sibling `<output_dir>-train/`."""
    onestep: str = "auto"
    """Where the one-step features come from: cached (the cache holds them), on-the-fly (the
    teacher computes them, fresh noise every epoch) or auto (cached when the cache holds them)."""
    dims_from_cache: bool = True
    """Take the decouplers' data dims (in_channels, feature_size, num_frames, target and
    reference tokens and dims, encoder) from the cache and the teacher. False: use the
    decouplers section as written and refuse a cache that disagrees with it."""

    # Optimisation.
    steps: int = 400
    """Optimizer steps (each of gradient_accumulation_steps x batch_size clips per process)."""
    epochs: float | None = None
    """If set, replaces `steps`: this many passes over the train split."""
    batch_size: int = 16
    learning_rate: float = 1e-3
    lr_scheduler: str = "cosine"
    """A diffusers.optimization schedule name (constant, constant_with_warmup, cosine, linear...)."""
    lr_warmup_steps: int = 20
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    max_nonfinite_steps: int = 10
    """Steps in a row with a NaN/Inf loss or gradient (each skipped) after which training stops."""
    mixed_precision: str = "no"
    """accelerate's: no, fp16 (GPU), bf16."""
    mse_weight: float = 1.0
    """Weight of the MSE of per-channel standardised tokens (the train split's statistics)."""
    cosine_weight: float = 1.0
    """Weight of the token cosine distance, 1 - cos(prediction, target), of standardised tokens."""

    # Data.
    num_workers: int | None = None
    """Loader workers per process; None: data.num_workers."""
    shuffle_buffer: int | None = None
    """Clips mixed in the shuffle buffer of each reader; None: data.shuffle_buffer."""

    # Evaluation and baselines.
    eval_every: int = 100
    """Steps between validation fidelity runs; the best decouplers (per branch) are kept."""
    eval_clips: int | None = None
    """Validation clips of the periodic evaluations (evenly over the split); None: all. The
    final report always uses every validation clip."""
    probe_clips: int | None = 512
    """Train clips the linear-probe baseline (and the target statistics) are fitted on."""
    probe_ridge: float = 1e-3
    """Ridge strength of the linear probe, relative to the mean feature energy."""
    depth_probe: bool = True
    """Also report depth errors through a linear token-to-depth probe (needs the generated
    frames in the cache and the geometric encoder the cache names; see distill/fidelity.py)."""
    depth_probe_clips: int | None = 128
    """Train clips the depth probe is fitted on."""

    # Logging and checkpoints.
    log_every: int = 10
    checkpoint_every: int = 100
    checkpoints_total_limit: int = 2
    resume: str | None = "latest"
    """'latest' (newest checkpoint in the work dir, if any), a checkpoint directory, or None."""
    cross_fit_folds: int = 0
    """K >= 2: also fit K decoupler pairs, fold k on the train episodes outside fold k (episodes
    dealt round-robin in key order), so `svam train-policy` gives every train clip foresight from
    decouplers that never fitted it, as it will get at evaluation (cross-fitting); 0: the policy
    trains on the published decouplers' in-sample foresight."""

    def validate(self) -> None:
        """Raise ValueError naming the first bad key."""
        if self.cross_fit_folds == 1 or self.cross_fit_folds < 0:
            raise ValueError(
                f"distill.cross_fit_folds={self.cross_fit_folds}: 0 (no cross-fitting) or at least 2"
            )
        if self.onestep not in ONESTEP_MODES:
            raise ValueError(f"distill.onestep='{self.onestep}': one of {', '.join(ONESTEP_MODES)}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"distill.mixed_precision='{self.mixed_precision}': one of {', '.join(MIXED_PRECISION)}"
            )
        positive = (
            "steps",
            "batch_size",
            "gradient_accumulation_steps",
            "log_every",
            "eval_every",
            "checkpoint_every",
            "checkpoints_total_limit",
        )
        for key in positive:
            if getattr(self, key) < 1:
                raise ValueError(f"distill.{key}={getattr(self, key)} must be at least 1")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"distill.epochs={self.epochs} must be positive")
        if (
            self.mse_weight < 0
            or self.cosine_weight < 0
            or self.mse_weight + self.cosine_weight == 0
        ):
            raise ValueError("distill.mse_weight and distill.cosine_weight: >= 0, not both 0")
        for key in ("eval_clips", "probe_clips", "depth_probe_clips"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"distill.{key}={value} must be at least 1 (or null for all)")
