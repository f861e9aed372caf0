"""Typed configuration: YAML files under `configs/` merged into dataclasses, plus `key=value` overrides.

Each stage reads one `Config`. Model folders own their configuration dataclasses (lerobot style);
this module composes them, loads YAML, applies overrides and rejects unknown keys with the valid
ones listed.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from svam.distill.configuration_decoupler import DecouplersConfig
from svam.distill.configuration_distill import DistillConfig
from svam.eval.configuration_eval import EvalConfig
from svam.policy.configuration_policy import PolicyModelsConfig
from svam.policy.configuration_train import PolicyTrainConfig
from svam.teachers.configuration_cache import CacheConfig
from svam.teachers.configuration_encoders import EncoderPretrainConfig, EncodersConfig
from svam.teachers.configuration_teacher import TeacherConfig, TeacherTrainConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message is one line naming the key."""


@dataclass
class RunConfig:
    name: str = "tiny"
    """Run directory name: everything the run makes goes under `<root>/<name>/`."""
    root: str = "runs"
    seed: int = 0
    """Run seed; per-sample randomness is derived from it and the sample key."""


@dataclass
class CollectConfig:
    """`svam collect`: Meta-World scripted-expert episodes."""

    tasks: list[str] = field(default_factory=lambda: ["reach-v3", "button-press-topdown-v3"])
    episodes_per_task: int = 4
    seed_start: int = 0
    """Episode seeds are seed_start .. seed_start+episodes_per_task-1; evaluation uses others."""
    image_size: int = 64
    camera: str = "corner"
    max_steps: int = 150
    steps_after_success: int = 5
    """Frames kept after the expert first succeeds, so clips show the finished task."""
    keep_failed: bool = False
    workers: int = 2
    episodes_per_shard: int = 16


@dataclass
class LeRobotConfig:
    """`svam import lerobot` and `svam export lerobot`: LeRobot-format datasets (v2.x, v3.0)."""

    camera: str | None = None
    """Video or image feature the frames come from; null: the first camera in meta/info.json."""
    state: str | None = "observation.state"
    """Proprioception feature; null: none (the policy then runs without state)."""
    action: str = "action"
    fps: float | None = None
    """Subsample to this frame rate (the dataset's must be a whole multiple of it); null: keep it."""
    image_size: int | None = None
    """Square frame side the frames are resized to; null: collect.image_size, the size every
    later stage is configured for."""
    episodes: list[int] | None = None
    """Episode indices to import; null: all."""
    workers: int = 2
    """Processes decoding episodes in parallel (each writes whole shards)."""
    episodes_per_shard: int = 8
    video_codec: str = "libsvtav1"
    """Export: lerobot's default encoder (AV1, yuv420p, keyframe every `video_gop` frames)."""
    video_crf: int = 30
    video_gop: int = 2
    video_preset: int = 12
    robot_type: str | None = None
    """Export: info.json's robot_type; null: what the episodes' source recorded ("sawyer" for
    svam's Meta-World collections)."""


@dataclass
class DataConfig:
    """How episodes are cut into training clips."""

    clip_frames: int = 8
    """T: frames per clip; frame 0 is the current observation, the rest are the future."""
    frame_stride: int = 2
    """Environment steps between consecutive clip frames."""
    action_horizon: int = 8
    """Actions per clip, starting at the current frame."""
    window_step: int = 2
    """Environment steps between the starts of consecutive clips of one episode."""
    val_fraction: float = 0.2
    """Fraction of each task's episodes held out for validation: checkpoint and model selection
    only (split by episode, never by clip)."""
    test_fraction: float = 0.2
    """Fraction of each task's episodes held out for testing: every number a report gives, never
    used for fitting or selection."""
    shuffle_buffer: int = 256
    num_workers: int = 0
    batch_size: int = 8


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    lerobot: LeRobotConfig = field(default_factory=LeRobotConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    train_teacher: TeacherTrainConfig = field(default_factory=TeacherTrainConfig)
    encoders: EncodersConfig = field(default_factory=EncodersConfig)
    pretrain_encoders: EncoderPretrainConfig = field(default_factory=EncoderPretrainConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    decouplers: DecouplersConfig = field(default_factory=DecouplersConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    policy: PolicyModelsConfig = field(default_factory=PolicyModelsConfig)
    train_policy: PolicyTrainConfig = field(default_factory=PolicyTrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path as given, or the name of a file in the repository's `configs/` (`tiny`, `tiny.yaml`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / path.name, CONFIG_DIR / f"{path.name}.yaml"):
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config file not found: {name_or_path} (bundled configs: {known})")


def _check_keys(values: Any, schema: Any, prefix: str = "") -> None:
    """Reject keys the schema does not have, naming the valid ones (OmegaConf's error lists none)."""
    if not isinstance(values, dict) or not dataclasses.is_dataclass(schema):
        return
    valid = [f.name for f in dataclasses.fields(schema)]
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" did you mean '{prefix}{close[0]}'?" if close else ""
            section = f"'{prefix[:-1]}'" if prefix else "the top level"
            raise ConfigError(
                f"unknown config key '{full}';{hint} valid keys in {section}: {', '.join(valid)}"
            )
        _check_keys(value, getattr(schema, key), f"{full}.")


def _parse_overrides(overrides: list[str]) -> dict:
    nested: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' sets a key inside a value")
        node[leaf] = yaml.safe_load(raw) if raw else ""
    return nested


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (default `configs/tiny.yaml`) and apply `key=value` overrides."""
    path = resolve_config_path(path or "tiny")
    try:
        from_file = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(from_file, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    from_cli = _parse_overrides(overrides or [])
    default = Config()
    _check_keys(from_file, default)
    _check_keys(from_cli, default)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), from_file, from_cli)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        message = str(exc).splitlines()[0]
        raise ConfigError(f"{path}: bad value for '{key}': {message}") from exc


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def to_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
