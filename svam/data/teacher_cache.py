"""Teacher-cache samples streamed by split: what `svam distill` trains the decouplers on.

A teacher cache (`svam cache-teachers`) holds one sample per clip: the multi-step targets, the
reference tokens of the real current frame, optionally the one-step features and the generated
frames, and the real clip. Shards are named by split (`train-00000.tar`, `val-00000.tar`).
Streaming (readers, seeded shuffle buffer, epochs) is `svam.data.streaming.ShardStream`'s.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from svam.data.episodes import SPLITS
from svam.data.schema import TEACHER_CACHE, SchemaError
from svam.data.shards import (
    MANIFEST_NAME,
    PARTIAL_SUFFIX,
    ShardSet,
    read_shard,
    shard_record,
    tar_writer,
    write_shard_set_manifest,
)
from svam.data.streaming import ShardStream, evenly_spaced
from svam.hashing import file_digest
from svam.teachers.configuration_teacher import TeacherConfig, TeacherRuntime

CURRENT = "current"
CACHED, ON_THE_FLY = "cached", "on-the-fly"
"""Item name of the real current frame (3, H, W) uint8, i.e. `frames[0]`, without the rest."""
TARGETS = ("semantic", "geometric", "semantic_ref", "geometric_ref")
VIDEO_ARRAYS = ("frames", "generated")
"""Stored (T, H, W, 3); items carry them channels-first, (T, 3, H, W)."""


@dataclass
class TeacherCache:
    """A complete teacher-cache shard set and what its manifest and first sample tell."""

    shard_set: ShardSet

    @classmethod
    def open(cls, root: str | Path, verify: bool = True) -> TeacherCache:
        root = Path(root)
        if not root.is_dir():
            raise SchemaError(
                f"no teacher cache at {root}: run `svam cache-teachers` first, or point "
                "distill.cache at a teacher-cache directory"
            )
        if not (root / MANIFEST_NAME).is_file():
            raise SchemaError(
                f"{root} has no {MANIFEST_NAME}: `svam cache-teachers` has not finished there "
                "(run it again; it resumes)"
            )
        cache = cls(ShardSet.open(root, kind=TEACHER_CACHE.kind, verify=verify))
        cache.check_splits()
        return cache

    def check_splits(self) -> None:
        """The manifest's clips per split are its split shards' samples, and its test episodes
        as many as it says."""
        counts = self.manifest.get("counts", {})
        for split in SPLITS:
            held = len(self.members(split))
            if counts.get(split, 0) != held:
                raise SchemaError(
                    f"{self.manifest_path}: counts.{split} is {counts.get(split, 0)}, the {split} "
                    f"shards hold {held}"
                )
        splits = self.manifest.get("splits")
        if splits and len(splits["test_episodes"]) != splits["episodes"].get("test", 0):
            raise SchemaError(
                f"{self.manifest_path}: splits.episodes.test is {splits['episodes'].get('test', 0)}"
                f" but splits.test_episodes lists {len(splits['test_episodes'])}"
            )

    @property
    def root(self) -> Path:
        return self.shard_set.root

    @property
    def manifest(self) -> dict[str, Any]:
        return self.shard_set.manifest

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    @property
    def runtime(self) -> TeacherRuntime:
        """The teacher runtime settings that made the cache (the defaults for a cache written
        before svam recorded them)."""
        return TeacherRuntime.from_record(self.manifest.get("teacher_runtime"))

    def runtime_for(
        self, teacher: TeacherConfig, error: type[Exception] = SchemaError
    ) -> TeacherRuntime:
        """The runtime a stage reading the cache runs the teacher with: the cache's. The config's
        teacher section `teacher` must not set it otherwise (`error`, one line naming the key)."""
        conflict = TeacherRuntime.from_config(teacher).conflict(self.runtime)
        if conflict:
            raise error(
                f"the config sets {conflict} ({self.manifest_path}): drop the setting to use "
                "the cache's, or rebuild the cache with `svam cache-teachers`"
            )
        return self.runtime

    def members(self, split: str) -> list[tuple[str, str]]:
        """(shard name, sample key) of every sample of a split, in manifest order."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got '{split}'")
        return [
            (shard["name"], key)
            for shard in self.manifest["shards"]
            if shard["name"].startswith(f"{split}-")
            for key in shard["keys"]
        ]

    @cached_property
    def first_sample(self) -> tuple[str, dict[str, np.ndarray], dict[str, Any]]:
        """The first sample of the set: which optional arrays it holds, and their shapes."""
        for path in self.shard_set.shard_paths:
            for sample in read_shard(path, TEACHER_CACHE):
                return sample
        raise SchemaError(f"{self.manifest_path}: the cache holds no samples")

    def has(self, array: str) -> bool:
        """Whether the samples hold `array` (optional arrays are in all samples or in none)."""
        return array in self.first_sample[1]


def clip_key(episode: str, start: int) -> str:
    """A cached clip's key: its episode's key and its start step."""
    return f"{episode}-{start:04d}"


def clip_episode(key: str) -> str:
    """The episode a cached clip comes from (the inverse of `clip_key`)."""
    return key.rsplit("-", 1)[0]


class TeacherCacheClips(ShardStream):
    """Stream the clips of one split of a teacher cache as dicts of tensors.

    `arrays` picks what an item carries besides `key`, `task`, `instruction` and `epoch` (the
    pass it comes from, which seeds per-epoch randomness such as on-the-fly one-step noise):
    names of cache arrays (float16 tokens and features stay float16; videos become
    (T, 3, H, W) uint8) and `current`, the real current frame alone. `max_clips` takes that many
    clips evenly over the split, the same ones on every rank and worker count;
    `exclude_episodes` leaves out every clip of those episodes (cross-fitting's folds).
    """

    def __init__(
        self,
        cache: TeacherCache | str | Path,
        split: str,
        *,
        arrays: Sequence[str] = TARGETS,
        seed: int = 0,
        shuffle: bool | None = None,
        shuffle_buffer: int = 256,
        repeat: bool = False,
        max_clips: int | None = None,
        skip_batches: int = 0,
        batch_size: int = 1,
        exclude_episodes: frozenset[str] = frozenset(),
    ):
        self.cache = cache if isinstance(cache, TeacherCache) else TeacherCache.open(cache)
        known = (*TEACHER_CACHE.arrays, CURRENT)
        for name in arrays:
            if name not in known:
                raise ValueError(
                    f"unknown teacher-cache array '{name}' (one of {', '.join(known)})"
                )
            if name != CURRENT and not self.cache.has(name):
                raise SchemaError(
                    f"{self.cache.manifest_path}: the cache holds no '{name}' arrays"
                    + (" (it was made with cache.keep_onestep=false)" if name == "onestep" else "")
                )
        self.arrays = tuple(arrays)
        self.split = split
        members = [
            m for m in self.cache.members(split) if clip_episode(m[1]) not in exclude_episodes
        ]
        members = evenly_spaced(members, max_clips)
        if not members:
            raise SchemaError(f"{self.cache.manifest_path}: the cache holds no {split} clips")
        super().__init__(
            self.cache.root,
            TEACHER_CACHE,
            members,
            seed=seed,
            shuffle=split == "train" if shuffle is None else shuffle,
            shuffle_buffer=shuffle_buffer,
            repeat=repeat,
            skip_batches=skip_batches,
            batch_size=batch_size,
        )

    def __len__(self) -> int:
        """Clips in one pass over the split (all readers together)."""
        return len(self.members)

    def items(self, key, arrays, meta, epoch) -> Iterator[dict[str, Any]]:
        item: dict[str, Any] = {
            "key": key,
            "task": meta["task"],
            "instruction": meta["instruction"],
            "epoch": epoch,
        }
        for name in self.arrays:
            if name == CURRENT:
                item[name] = torch.from_numpy(arrays["frames"][0]).permute(2, 0, 1)
            elif name in VIDEO_ARRAYS:
                item[name] = torch.from_numpy(arrays[name]).permute(0, 3, 1, 2)
            else:
                item[name] = torch.from_numpy(arrays[name])
        yield item


def teacher_cache_loader(
    cache: TeacherCache | str | Path,
    split: str,
    *,
    batch_size: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    **dataset_options: Any,
) -> DataLoader:
    """Batches of `TeacherCacheClips` items: tensors stacked on a leading batch dim, `key`, `task`
    and `instruction` as lists, `epoch` as a tensor (`skip_batches=n` starts after the first n
    batches without reading them)."""
    dataset = TeacherCacheClips(cache, split, batch_size=batch_size, **dataset_options)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


def write_teacher_cache(
    out_dir: str | Path,
    samples: Iterable[tuple[str, dict[str, np.ndarray], dict[str, Any]]],
    *,
    clips_per_shard: int,
    **manifest_fields: Any,
) -> Path:
    """Write (key, arrays, meta) samples as a complete teacher-cache shard set, split by
    `meta['split']` into `<split>-NNNNN.tar` shards, with a manifest of `manifest_fields` plus the
    schema, shard records and counts. For synthetic caches (tests, benchmarks); the real cache is
    written by `svam.teachers.cache`, resumable and across ranks."""
    out_dir = Path(out_dir)
    partial = out_dir.with_name(out_dir.name + PARTIAL_SUFFIX)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    by_split: dict[str, list] = {split: [] for split in SPLITS}
    for key, arrays, meta in samples:
        by_split[meta["split"]].append(TEACHER_CACHE.encode(key, arrays, meta))
    records = []
    for split, encoded in by_split.items():
        for index, first in enumerate(range(0, len(encoded), clips_per_shard)):
            path = partial / f"{split}-{index:05d}.tar"
            chunk = encoded[first : first + clips_per_shard]
            with tar_writer(path) as tar:
                for sample in chunk:
                    tar.write(sample)
            records.append(shard_record(path, [sample["__key__"] for sample in chunk]))
    counts = Counter({split: len(encoded) for split, encoded in by_split.items()})
    write_shard_set_manifest(
        partial, TEACHER_CACHE, records, counts=dict(counts), **manifest_fields
    )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    partial.rename(out_dir)
    return out_dir


def onestep_source(cache: TeacherCache, wanted: str, key: str) -> str:
    """'cached' or 'on-the-fly': where a stage takes one-step features from, given its config value
    `wanted` (cached, on-the-fly or auto) under the config key `key`."""
    cached = cache.has("onestep")
    if wanted == CACHED and not cached:
        raise SchemaError(
            f"{key}=cached but {cache.manifest_path} holds no one-step features (made with "
            f"cache.keep_onestep=false): use {key}=auto or on-the-fly"
        )
    if wanted == "auto":
        return CACHED if cached else ON_THE_FLY
    return wanted


def loader_settings(section: Any, data: Any) -> dict[str, int]:
    """A training section's loader workers and shuffle buffer, falling back to the data section's."""
    return {
        "num_workers": data.num_workers if section.num_workers is None else section.num_workers,
        "shuffle_buffer": (
            data.shuffle_buffer if section.shuffle_buffer is None else section.shuffle_buffer
        ),
    }


def cache_key_parts(config: Any, cache: TeacherCache, source: str) -> dict[str, Any]:
    """What a stage trained on a teacher cache depends on besides its own settings: the run seed,
    the cache manifest (which records the teacher runtime on-the-fly features are read with) and
    the one-step source."""
    return {"seed": config.run.seed, "cache": file_digest(cache.manifest_path), "onestep": source}
