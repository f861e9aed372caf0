"""Configuration of `svam eval` (its Meta-World part): closed-loop rollouts of trained policies."""

from __future__ import annotations

from dataclasses import dataclass

from policy.configuration_policy import foresight_streams


@dataclass
class EvalConfig:
    modes: list[str] | None = None
    """Foresight modes whose policies (runs/<name>/policy/<mode>/) are evaluated; None: the one
    train_policy.mode names."""
    policy: str | None = None
    """Evaluate this policy directory instead (its mode is read from it)."""
    teacher: str | None = None
    """Override the teacher directory the policy recorded."""
    decouplers: str | None = None
    """Override the decoupler directory the policy recorded."""
    output_dir: str | None = None
    """None: the run directory's eval/."""
    tasks: list[str] | None = None
    """None: collect.tasks."""
    episodes_per_task: int = 10
    seed_start: int | None = None
    """First evaluation seed; None: collect.seed_start + collect.episodes_per_task, so no seed
    used for collection is evaluated. Seeds below that are refused."""
    max_steps: int | None = None
    """Environment steps per episode; None: collect.max_steps."""
    execute_actions: int = 4
    """Receding horizon: actions of each predicted chunk executed before predicting again."""
    videos_per_task: int = 1
    """Rollouts per task saved as GIF (the first episodes)."""
    device: str = "auto"
    """auto (CUDA when available), cpu or cuda."""

    def validate(self) -> None:
        for mode in self.modes or []:
            try:
                foresight_streams(mode)
            except ValueError as exc:
                raise ValueError(f"eval.modes: {exc}") from exc
        for key in ("episodes_per_task", "execute_actions"):
            if getattr(self, key) < 1:
                raise ValueError(f"eval.{key}={getattr(self, key)} must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"eval.max_steps={self.max_steps} must be at least 1")
        if self.videos_per_task < 0:
            raise ValueError(f"eval.videos_per_task={self.videos_per_task} must be at least 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"eval.device='{self.device}': one of auto, cpu, cuda")
