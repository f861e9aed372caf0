"""Configuration of `svam cache-teachers`, the job that turns the teacher's multi-step foresight
into distillation targets."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CacheConfig:
    episodes: str | None = None
    """Episode shard directory; None: the run directory's episodes/."""
    teacher: str | None = None
    """Teacher directory; None: the run directory's teacher/."""
    output_dir: str | None = None
    """Teacher-cache shard directory; None: the run directory's cache/."""
    num_inference_steps: int | None = None
    """N, the teacher's sampling steps for the targets; None: the teacher config's."""
    splits: list[str] = field(default_factory=lambda: ["train", "val", "test"])
    """Episode splits to cache (data.val_fraction / data.test_fraction cut them): train fits,
    val selects, test is what `svam eval` and distill's fidelity report measure on."""
    clips_per_shard: int = 32
    """Also the unit of resumption: a re-run redoes only shards that were not finished."""
    batch_size: int = 8
    """Clips per teacher sampling call; the encoders see batch_size x T frames at once."""
    keep_onestep: bool = True
    """Store the teacher's one-step features of each clip (large at full scale: see the plan)."""
    keep_generated: bool = True
    """Store the generated frames as uint8 (inspection and reports)."""
    max_clips_per_split: int | None = None
    """Cap on clips per split, taken evenly over the split (quick runs); None: all clips."""
    num_threads: int = 0
    """CPU threads per process (torch.set_num_threads); 0 leaves torch's default. Float results,
    and so the bytes written, depend on it: compare runs at the same threads per process."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu, cuda, cuda:1..."""
    dtype: str = "float32"
    """Model dtype: float32, bfloat16 or float16 (GPU)."""
