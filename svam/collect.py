"""`svam collect`: scripted-expert Meta-World episodes written as an episode shard set."""

from __future__ import annotations

import multiprocessing
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from svam import __version__
from svam.config import CollectConfig, Config
from svam.data.schema import EPISODES
from svam.data.shards import ShardSetWriter
from svam.hashing import json_digest
from svam.locking import output_lock
from svam.rundir import RunDir


def episode_key(task: str, seed: int) -> str:
    return f"{task}-{seed:06d}"


def is_collected(config: Config) -> bool:
    """Whether the run directory already holds a complete collection made with this config, or
    episodes imported from elsewhere (`svam import`), which take the collection's place."""
    from svam.data.schema import SchemaError
    from svam.data.shards import ShardSet

    try:
        shard_set = ShardSet.open(RunDir.from_config(config).episodes, kind=EPISODES.kind)
    except SchemaError:
        return False
    manifest = shard_set.manifest
    return "source" in manifest or manifest.get("config_hash") == json_digest(config.collect)


def _rollout(job: tuple[str, int, CollectConfig]):
    from svam.envs.metaworld import rollout_expert

    task, seed, cfg = job
    return rollout_expert(
        task,
        seed,
        camera=cfg.camera,
        image_size=cfg.image_size,
        max_steps=cfg.max_steps,
        steps_after_success=cfg.steps_after_success,
    )


def collect(config: Config, out_dir: str | Path | None = None) -> Path:
    """Roll out the expert on every (task, seed) and write the kept episodes; returns the shard dir.

    Episodes are written in (task, seed) order whatever the number of workers, so the same config
    always writes byte-identical shards.
    """
    from svam.envs.metaworld import check_camera, check_tasks

    cfg = config.collect
    check_tasks(cfg.tasks)
    check_camera(cfg.camera)
    if cfg.episodes_per_task < 1:
        raise ValueError(f"collect.episodes_per_task must be >= 1, got {cfg.episodes_per_task}")
    run_dir = RunDir.from_config(config)
    out_dir = Path(out_dir) if out_dir is not None else run_dir.episodes
    with output_lock(out_dir):
        return _collect(config, run_dir, out_dir)


def _collect(config: Config, run_dir: RunDir, out_dir: Path) -> Path:
    cfg = config.collect
    run_dir.save_config(config, "collect")
    jobs = [
        (task, seed, cfg)
        for task in cfg.tasks
        for seed in range(cfg.seed_start, cfg.seed_start + cfg.episodes_per_task)
    ]
    kept: Counter[str] = Counter()
    dropped: list[str] = []
    episodes: dict[str, dict] = {}
    start = time.perf_counter()
    workers = max(1, min(cfg.workers, len(jobs)))
    with ShardSetWriter(out_dir, EPISODES, cfg.episodes_per_shard) as writer:
        context = multiprocessing.get_context("spawn")
        with context.Pool(workers) if workers > 1 else _InProcess() as pool:
            progress = tqdm(pool.imap(_rollout, jobs), total=len(jobs), desc="collect", unit="ep")
            for episode in progress:
                key = episode_key(episode.task, episode.seed)
                if not (episode.success or cfg.keep_failed):
                    dropped.append(key)
                    progress.set_postfix(kept=sum(kept.values()), dropped=len(dropped))
                    continue
                writer.write(
                    key,
                    {
                        "frames": episode.frames,
                        "depth": episode.depth,
                        "actions": episode.actions,
                        "state": episode.state,
                    },
                    {
                        "task": episode.task,
                        "instruction": episode.instruction,
                        "seed": episode.seed,
                        "success": bool(episode.success),
                        "first_success_step": int(episode.first_success_step),
                        "camera": episode.camera,
                    },
                )
                episodes[key] = {
                    "task": episode.task,
                    "seed": episode.seed,
                    "length": len(episode.frames),
                    "success": bool(episode.success),
                }
                kept[episode.task] += 1
                progress.set_postfix(kept=sum(kept.values()), dropped=len(dropped))
        if not episodes:
            raise ValueError(
                f"no episode kept: the expert failed all {len(jobs)} (raise collect.max_steps "
                "or set collect.keep_failed=true)"
            )
        writer.close(
            svam_version=__version__,
            config_hash=json_digest(cfg),
            collect=asdict(cfg),
            episodes=episodes,
            kept=len(episodes),
            dropped=dropped,
        )
    elapsed = time.perf_counter() - start
    print(
        f"collect: kept {len(episodes)} of {len(jobs)} episodes, dropped {len(dropped)} failed "
        f"{'(' + ', '.join(dropped) + ') ' if dropped else ''}"
        f"in {elapsed:.1f}s ({len(jobs) / elapsed:.2f} episodes/s, {workers} workers) -> {out_dir}"
    )
    return out_dir


class _InProcess:
    """A stand-in for a process pool that runs jobs in this process (one worker, no spawn cost)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap(self, fn, jobs):
        return map(fn, jobs)
