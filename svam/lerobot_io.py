"""`svam import lerobot` and `svam export lerobot`: LeRobot datasets in and out of episode shards.

Import streams: episodes are cut into shards by a deterministic plan, and each worker process
decodes one shard's episodes at a time (frames resized as they are decoded), so memory holds a
few episodes at the output size whatever the dataset's size. A shard is written whole under a
temporary name and marked complete by its sidecar (`svam.data.shards.write_shard`); an interrupted
import re-run redoes only the shards without one and ends byte-identical to an uninterrupted run.
The output is complete when its manifest is written, last.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from svam import __version__
from svam.atomic import atomic_dir, write_json_atomic
from svam.config import Config
from svam.data.lerobot import (
    EpisodeRef,
    LeRobotFormatError,
    LeRobotSource,
    LeRobotV3Writer,
    VideoSettings,
)
from svam.data.schema import EPISODES
from svam.data.shards import (
    MANIFEST_NAME,
    ShardSet,
    finished_shard,
    write_shard,
    write_shard_set_manifest,
)
from svam.data.video import VideoError
from svam.hashing import file_digest, json_digest
from svam.locking import output_lock
from svam.rundir import RunDir

PLAN_NAME = "import-plan.json"
METAWORLD_ROBOT = "sawyer"
"""The robot of svam's Meta-World collections (Yu et al. 2019), for an export's robot_type."""


@dataclass(frozen=True)
class ImportJob:
    name: str
    source: LeRobotSource
    episodes: tuple[EpisodeRef, ...]
    size: int
    step: int
    out_dir: Path


def _import_shard(job: ImportJob) -> int:
    """Decode one shard's episodes and write the shard (in a worker process); returns the
    source frames it read."""
    from svam.collect import episode_key

    records: dict[str, dict[str, Any]] = {}

    def samples():
        for ref in job.episodes:
            arrays, meta = job.source.read_episode(ref, job.size, job.step)
            key = episode_key(meta["task"], meta["seed"])
            records[key] = {
                "task": meta["task"],
                "seed": meta["seed"],
                "length": len(arrays["frames"]),
                "success": meta["success"],
                "lerobot_episode": ref.index,
            }
            yield key, arrays, meta

    for stale in job.out_dir.glob(f"{job.name}*.tmp"):
        stale.unlink()
    write_shard(job.out_dir / job.name, EPISODES, samples(), episodes=records)
    return sum(ref.length for ref in job.episodes)


def _source_fingerprint(source: LeRobotSource) -> dict[str, Any]:
    """What identifies the dataset: the digest of its metadata files, the size of every file."""
    meta = sorted(p for p in (source.root / "meta").rglob("*") if p.is_file())
    files = sorted(p for p in source.root.rglob("*") if p.is_file())
    return {
        "meta_sha256": file_digest(*meta),
        "file_sizes": json_digest(
            {str(p.relative_to(source.root)): p.stat().st_size for p in files}
        ),
    }


def import_plan(config: Config, source: LeRobotSource, refs: list[EpisodeRef]) -> dict[str, Any]:
    cfg = config.lerobot
    return {
        "svam_version": __version__,
        "source": {
            "format": "lerobot",
            "path": str(source.root.resolve()),
            "codebase_version": source.version,
            "fps": source.fps,
            "robot_type": source.info.get("robot_type"),
            "camera": source.camera,
            "state": source.state,
            "action": source.action,
            **_source_fingerprint(source),
        },
        "image_size": cfg.image_size or config.collect.image_size,
        "fps": source.fps / source.subsample_step(cfg.fps),
        "episodes": [ref.index for ref in refs],
        "episodes_per_shard": cfg.episodes_per_shard,
    }


def import_lerobot(config: Config, source: str | Path, out_dir: str | Path | None = None) -> Path:
    """Import the LeRobot dataset at `source` as episode shards (default runs/<name>/episodes);
    returns the shard directory."""
    cfg = config.lerobot
    if cfg.workers < 1 or cfg.episodes_per_shard < 1:
        raise ValueError("lerobot.workers and lerobot.episodes_per_shard must be at least 1")
    dataset = LeRobotSource.open(source, cfg.camera, cfg.state, cfg.action)
    step = dataset.subsample_step(cfg.fps)
    refs = dataset.select(cfg.episodes)
    if not refs:
        raise LeRobotFormatError(f"{dataset.root}: no episodes to import")
    dataset.check_files(refs)
    run_dir = RunDir.from_config(config)
    out_dir = Path(out_dir) if out_dir is not None else run_dir.episodes
    plan = import_plan(config, dataset, refs)
    with output_lock(out_dir):
        if _complete_import(out_dir, plan):
            print(f"import: {out_dir} already holds this import, nothing to do")
            return out_dir
        run_dir.save_config(config, "import")
        return _import(plan, dataset, refs, step, out_dir, cfg.workers)


def _complete_import(out_dir: Path, plan: dict[str, Any]) -> bool:
    """Whether `out_dir` is this import, complete; refuses a directory holding something else."""
    plan_path = out_dir / PLAN_NAME
    if plan_path.is_file():
        found = json.loads(plan_path.read_text())
        for key, value in plan.items():
            if found.get(key) != value:
                raise ValueError(
                    f"{out_dir} holds an import with a different {key} ({found.get(key)} there, "
                    f"{value} now): choose another --out or delete that directory"
                )
        return (out_dir / MANIFEST_NAME).is_file()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(
            f"{out_dir} already holds other episodes (not an import): choose another --out or "
            "another --run, or delete that directory"
        )
    return False


def _import(
    plan: dict[str, Any],
    dataset: LeRobotSource,
    refs: list[EpisodeRef],
    step: int,
    out_dir: Path,
    workers: int,
) -> Path:
    per_shard = plan["episodes_per_shard"]
    jobs = [
        ImportJob(
            f"shard-{i // per_shard:05d}.tar",
            dataset,
            tuple(refs[i : i + per_shard]),
            plan["image_size"],
            step,
            out_dir,
        )
        for i in range(0, len(refs), per_shard)
    ]
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / PLAN_NAME, plan)
    todo = [job for job in jobs if finished_shard(out_dir / job.name) is None]
    frames = sum(ref.length for job in todo for ref in job.episodes)
    workers = max(1, min(workers, len(todo)))
    rate = f"{dataset.fps:g} fps" + (f", kept at {plan['fps']:g}" if step > 1 else "")
    print(
        f"import: {len(refs)} episodes of {dataset.root} (LeRobot {dataset.version}, "
        f"'{dataset.camera}' at {rate}) in "
        f"{len(jobs)} shards ({len(jobs) - len(todo)} already complete), {workers} worker(s) "
        f"-> {out_dir}"
    )
    start = time.perf_counter()
    try:
        with tqdm(total=frames, desc="import", unit="frame", disable=not todo) as progress:
            if workers == 1:
                for count in map(_import_shard, todo):
                    progress.update(count)
            else:
                context = multiprocessing.get_context("spawn")
                with context.Pool(workers) as pool:
                    for count in pool.imap_unordered(_import_shard, todo):
                        progress.update(count)
    except (LeRobotFormatError, VideoError):
        # Bad input does not get better on a re-run: leave nothing of this import behind.
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        else:
            for path in out_dir.glob("shard-*"):
                path.unlink()
            (out_dir / PLAN_NAME).unlink(missing_ok=True)
        raise
    records = [finished_shard(out_dir / job.name) for job in jobs]
    episodes = {key: info for record in records for key, info in record.pop("episodes").items()}
    # The episode records take the place of the plan's list of source episode indices.
    fields = {**plan, "config_hash": json_digest(plan), "episodes": episodes}
    write_shard_set_manifest(out_dir, EPISODES, records, **fields, kept=len(episodes), dropped=[])
    elapsed = time.perf_counter() - start
    print(
        f"import: {len(episodes)} episodes in {elapsed:.1f}s "
        f"({frames / max(elapsed, 1e-9):,.0f} source frames/s) -> {out_dir}"
    )
    return out_dir


# --------------------------------------------------------------------------------------- export


def resolve_episodes(config: Config, run_or_shards: str | Path) -> Path:
    """An episode shard set from a shard directory, a run directory or a run name."""
    path = Path(run_or_shards)
    for candidate in (
        path,
        path / "episodes",
        Path(config.run.root) / str(run_or_shards) / "episodes",
    ):
        if (candidate / MANIFEST_NAME).is_file():
            return candidate
    raise ValueError(
        f"{run_or_shards}: neither an episode shard set (a directory with {MANIFEST_NAME}), nor a "
        f"run directory or run name under {config.run.root}/ holding episodes/"
    )


def export_lerobot(config: Config, run_or_shards: str | Path, out: str | Path) -> Path:
    """Write the episode shards of a run (or a shard directory) as a LeRobot v3.0 dataset at
    `out`, built beside it and put in place when complete. Depth is not exported (a LeRobot
    video holds 8-bit colour; svam's depth is metric float)."""
    from svam.eval.timing import CONTROL_PERIOD_S

    cfg = config.lerobot
    episodes = ShardSet.open(resolve_episodes(config, run_or_shards), kind=EPISODES.kind)
    manifest = episodes.manifest
    source = manifest.get("source", {})
    fps = manifest.get("fps") or 1 / CONTROL_PERIOD_S  # svam's collections: Meta-World's env.dt
    if abs(fps - round(fps)) > 1e-6:
        raise ValueError(f"{episodes.root}: {fps} fps, but LeRobot v3.0 records a whole frame rate")
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out}: already exists; choose another output or delete it")
    _, first, meta = next(episodes.samples(episodes.shard_paths[:1]))
    camera = source.get("camera") or f"observation.images.{meta['camera']}"
    video = VideoSettings(
        cfg.video_codec, "yuv420p", cfg.video_crf, cfg.video_gop, cfg.video_preset
    )
    robot_type = (
        cfg.robot_type
        or source.get("robot_type")
        or (METAWORLD_ROBOT if "collect" in manifest else None)
    )
    with output_lock(out), atomic_dir(out) as tmp:
        writer = LeRobotV3Writer(
            tmp,
            int(round(fps)),
            camera,
            first["frames"].shape[1:3],
            first["state"].shape[1],
            first["actions"].shape[1],
            video,
            robot_type,
        )
        depth = False
        with tqdm(total=manifest["num_samples"], desc="export", unit="ep") as progress:
            for _, arrays, meta in episodes.samples():
                depth |= "depth" in arrays
                writer.add_episode(
                    arrays["frames"], arrays["state"], arrays["actions"], meta["instruction"], meta
                )
                progress.update()
        writer.close()
    note = " (depth not exported: LeRobot videos hold 8-bit colour)" if depth else ""
    print(
        f"export: {writer.frames} frames of {len(writer.episodes)} episodes as LeRobot v3.0 "
        f"('{camera}', {int(round(fps))} fps){note} -> {out}"
    )
    return out
