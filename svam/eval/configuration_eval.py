"""Configuration of `svam eval`: the latency–fidelity report of every foresight mode."""

from __future__ import annotations

from dataclasses import dataclass

from svam.eval.timing import TIMINGS
from svam.policy.configuration_policy import parse_mode


@dataclass
class EvalConfig:
    modes: list[str] | None = None
    """Foresight modes to compare (blind, onestep, shortcut, multistep:K, partial:F); each runs
    the run's policy/<kind>/ (multistep:K and partial:F the multistep policy). None: the one
    train_policy.mode names."""
    policy: str | None = None
    """Evaluate this policy directory instead, in the mode it was trained for (eval.modes, when
    set, must all run on it)."""
    teacher: str | None = None
    """Override the teacher directory the policies recorded."""
    decouplers: str | None = None
    """Override the decoupler directory the policies recorded."""
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
    timing: str = "wait"
    """What the world does while the policy thinks (`svam.eval.timing`): wait (it stops: the
    classic protocol), sync (it goes on; the robot holds its last command, then executes the new
    chunk) or async (pipelined: the next chunk is computed while the current one executes, its
    stale first actions skipped). Each mode's inference spans its latency profile's ms over the
    12.5 ms control period, rounded up, in simulator steps."""
    latency_ms: dict[str, float] | None = None
    """The latency profile for sync/async, ms per mode (e.g. what your GPU measures); None: each
    mode's latency measured in this run, or the published-size FLOPs over device_tflops."""
    device_tflops: float | None = None
    """With latency_ms unset: latency = each mode's FLOPs at the published size / this many
    TFLOP/s (a device's sustained throughput), instead of the latency measured here."""
    videos_per_task: int = 1
    """Rollouts per task and mode saved as GIF (the first episodes)."""
    workers: int = 1
    """Processes the closed-loop episodes run in (each loads the policies once, uses `threads`
    threads). On CPU, processes beat torch's intra-op threads on models this small."""
    batch_size: int = 16
    """Episodes of one mode run in lockstep in one process, one batched policy call per control
    step (workers take whole batches). Outcomes do not depend on it; the report's latency is
    still measured at batch 1."""
    threads: int | None = 1
    """torch threads for the latency and FLOP measurements and in each rollout worker; None:
    torch's default. Fixed so that latencies compare across runs and modes."""
    latency_steps: int = 50
    """Timed control steps per mode (after `warmup_steps`), interleaved across modes."""
    warmup_steps: int = 3
    fidelity_clips: int | None = 32
    """Test clips of the foresight and action fidelity (evenly over the split); None: all."""
    fidelity_batch: int = 8
    rollouts: bool = True
    """Run the closed-loop episodes (task success); false reports success as not measured."""
    tensorboard: bool = True
    """Log the report's figures to <run>/tb/eval/."""
    device: str = "auto"
    """auto (CUDA when available), cpu or cuda."""

    def validate(self) -> None:
        for mode in self.modes or []:
            try:
                parse_mode(mode)
            except ValueError as exc:
                raise ValueError(f"eval.modes: {exc}") from exc
        if self.modes is not None and len(set(self.modes)) != len(self.modes):
            raise ValueError(f"eval.modes lists a mode twice: {self.modes}")
        for key in (
            "episodes_per_task",
            "execute_actions",
            "workers",
            "batch_size",
            "latency_steps",
            "fidelity_batch",
        ):
            if getattr(self, key) < 1:
                raise ValueError(f"eval.{key}={getattr(self, key)} must be at least 1")
        for key in ("max_steps", "threads", "fidelity_clips"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"eval.{key}={value} must be at least 1 (or null)")
        for key in ("videos_per_task", "warmup_steps"):
            if getattr(self, key) < 0:
                raise ValueError(f"eval.{key}={getattr(self, key)} must be at least 0")
        if self.timing not in TIMINGS:
            raise ValueError(f"eval.timing='{self.timing}': one of {', '.join(TIMINGS)}")
        for mode, ms in (self.latency_ms or {}).items():
            if not ms >= 0:
                raise ValueError(f"eval.latency_ms.{mode}={ms} must be a number of ms >= 0")
        if self.device_tflops is not None and not self.device_tflops > 0:
            raise ValueError(f"eval.device_tflops={self.device_tflops} must be positive")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"eval.device='{self.device}': one of auto, cpu, cuda")
