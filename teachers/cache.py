"""`svam cache-teachers`: the teacher's multi-step foresight, encoded as distillation targets.

For every clip of the episode shards: generate the future with N teacher steps from the clip's
current frame and instruction (noise seeded by the clip key and the run seed), encode the generated
frames with DINOv2 and Depth Anything 3 (the targets) and the real current frame (the reference
tokens), and write them with what the later stages need into teacher-cache shards.

Scale-out and faults: the clips are cut into shards by a deterministic plan; under `torchrun` or
`accelerate launch` rank r writes shards r, r+world, ... and no other file. A shard is written
under a temporary name, renamed when complete, then recorded in a `<shard>.json` sidecar; a re-run
skips shards with a sidecar and redoes the rest. Clips are batched within a shard only, so a
clip's bytes never depend on how the job was split or resumed. Rank 0 writes `manifest.json` once
every shard is done.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from tqdm import tqdm

from svam import __version__
from svam.atomic import write_json_atomic
from svam.config import Config
from svam.data.episodes import SPLITS, clip_starts, split_counts, split_episodes
from svam.data.schema import EPISODES, TEACHER_CACHE, SchemaError
from svam.data.shards import (
    MANIFEST_NAME,
    ShardSet,
    finished_shard,
    read_shard,
    write_shard,
    write_shard_set_manifest,
)
from svam.data.teacher_cache import clip_key
from svam.hashing import file_digest, json_digest
from svam.locking import output_lock
from svam.rundir import RunDir
from svam.seeding import clip_noise, keyed_generator
from svam.teachers.configuration_teacher import TeacherRuntime
from svam.teachers.encoders import build_encoders
from svam.teachers.modeling_teacher import read_teacher_record
from svam.teachers.pipeline_teacher import TeacherPipeline

PLAN_NAME = "cache-plan.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CacheMismatchError(ValueError):
    """The output directory holds shards made from something else; the message names what."""


@dataclass(frozen=True)
class ClipRef:
    split: str
    episode: str
    start: int

    @property
    def key(self) -> str:
        return clip_key(self.episode, self.start)


@dataclass(frozen=True)
class ShardJob:
    name: str
    clips: tuple[ClipRef, ...]


def plan_shards(episodes: ShardSet, config: Config) -> list[ShardJob]:
    """Every clip of the chosen splits, in episode-manifest order, cut into shards per split."""
    manifest, data, cache = episodes.manifest, config.data, config.cache
    split_of = split_episodes(manifest["episodes"], data.val_fraction, data.test_fraction)
    order = [key for shard in manifest["shards"] for key in shard["keys"]]
    jobs = []
    for split in cache.splits:
        clips = [
            ClipRef(split, key, start)
            for key in order
            if split_of[key] == split
            for start in clip_starts(manifest["episodes"][key]["length"], data)
        ]
        if cache.max_clips_per_split is not None and len(clips) > cache.max_clips_per_split:
            picks = np.linspace(0, len(clips) - 1, cache.max_clips_per_split).round().astype(int)
            clips = [clips[i] for i in picks]
        per_shard = cache.clips_per_shard
        for index, first in enumerate(range(0, len(clips), per_shard)):
            jobs.append(
                ShardJob(f"{split}-{index:05d}.tar", tuple(clips[first : first + per_shard]))
            )
    return jobs


class EpisodeStore:
    """Decoded episodes by key, reading each episode shard once while clips go in order."""

    def __init__(self, episodes: ShardSet):
        self.root = episodes.root
        self.shard_of = {key: s["name"] for s in episodes.manifest["shards"] for key in s["keys"]}
        self._shard: str | None = None
        self._episodes: dict[str, tuple[dict[str, np.ndarray], dict[str, Any]]] = {}

    def get(self, key: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        name = self.shard_of[key]
        if name != self._shard:
            self._episodes = {k: (a, m) for k, a, m in read_shard(self.root / name, EPISODES)}
            self._shard = name
        return self._episodes[key]


def cache_settings(config: Config) -> dict[str, Any]:
    """The cache keys that change what is written (paths, device and threads do not)."""
    paths = ("episodes", "teacher", "output_dir", "device", "num_threads")
    return {key: value for key, value in asdict(config.cache).items() if key not in paths}


def is_cached(config: Config) -> bool:
    """Whether the cache directory is complete and was made from this teacher, data and settings."""
    run_dir = RunDir.from_config(config)
    try:
        manifest = ShardSet.open(
            config.cache.output_dir or run_dir.cache, kind=TEACHER_CACHE.kind, verify=False
        ).manifest
        teacher = read_teacher_record(config.cache.teacher or run_dir.teacher)
    except (SchemaError, OSError):
        return False
    return (
        manifest["teacher_fingerprint"] == teacher["fingerprint"]
        and TeacherRuntime.from_record(manifest.get("teacher_runtime"))
        == TeacherRuntime.from_config(config.teacher)
        and manifest["run_seed"] == config.run.seed
        and manifest["data_config_hash"] == json_digest(config.data)
        and manifest["encoders"] == asdict(config.encoders)
        and manifest["cache_settings"] == cache_settings(config)
    )


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class TeacherCacheJob:
    """One process's share of the cache job; `run` writes its shards."""

    def __init__(self, config: Config, state: PartialState):
        run_dir = RunDir.from_config(config)
        cache = config.cache
        self.config = config
        self.state = state
        self.out_dir = Path(cache.output_dir or run_dir.cache)
        if cache.dtype not in DTYPES:
            raise ValueError(f"cache.dtype='{cache.dtype}': one of {', '.join(DTYPES)}")
        if cache.clips_per_shard < 1 or cache.batch_size < 1:
            raise ValueError("cache.clips_per_shard and cache.batch_size must be at least 1")
        unknown = [split for split in cache.splits if split not in SPLITS]
        if unknown or not cache.splits:
            raise ValueError(f"cache.splits={cache.splits}: each one of {', '.join(SPLITS)}")
        self.episodes = ShardSet.open(cache.episodes or run_dir.episodes, kind=EPISODES.kind)
        teacher_dir = Path(cache.teacher or run_dir.teacher)
        device = _resolve_device(cache.device) if cache.device != "auto" else state.device
        dtype = DTYPES[cache.dtype]
        # The cache's runtime settings come from the config; every later stage reads its record.
        self.pipeline = TeacherPipeline.from_pretrained(
            teacher_dir,
            TeacherRuntime.from_config(config.teacher),
            config=config.teacher,
            torch_dtype=dtype,
        )
        self.pipeline.teacher.to(device)
        teacher = self.pipeline.teacher
        if teacher.config.num_frames != config.data.clip_frames:
            raise ValueError(
                f"data.clip_frames={config.data.clip_frames} but the teacher at {teacher_dir} "
                f"generates {teacher.config.num_frames} frames"
            )
        self.steps = cache.num_inference_steps or teacher.config.num_inference_steps
        self.semantic, self.geometric = build_encoders(config.encoders, device=device, dtype=dtype)
        self.jobs = plan_shards(self.episodes, config)
        self.plan = {
            "svam_version": __version__,
            "teacher_fingerprint": teacher.fingerprint,
            "teacher_runtime": self.pipeline.runtime.to_record(),
            "semantic_fingerprint": self.semantic.fingerprint,
            "geometric_fingerprint": self.geometric.fingerprint,
            "episodes_sha256": file_digest(self.episodes.root / MANIFEST_NAME),
            "num_inference_steps": self.steps,
            "run_seed": config.run.seed,
            "data_config_hash": json_digest(config.data),
            "cache_settings": cache_settings(config),
        }

    # ------------------------------------------------------------------------------ planning

    def check_or_write_plan(self) -> None:
        """Refuse an output directory made from another teacher, encoder, data or setting."""
        path = self.out_dir / PLAN_NAME
        if path.is_file():
            found = json.loads(path.read_text())
            for key, value in self.plan.items():
                if found.get(key) != value:
                    raise CacheMismatchError(
                        f"{self.out_dir} holds a cache made with a different {key} "
                        f"({found.get(key)} there, {value} now); choose another cache.output_dir "
                        "or delete that directory"
                    )
        elif self.state.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, self.plan)
        self.state.wait_for_everyone()

    def is_done(self, job: ShardJob) -> bool:
        return finished_shard(self.out_dir / job.name) is not None

    def sample_bytes(self, store: EpisodeStore) -> dict[str, int]:
        """Bytes per clip of each stored array, from one cheap one-step pass for the feature size."""
        data, teacher_cfg = self.config.data, self.pipeline.teacher.config
        frames = data.clip_frames
        size = store.get(self.jobs[0].clips[0].episode)[0]["frames"].shape[1]
        probe = torch.zeros(1, 3, size, size, dtype=torch.uint8)
        features = self.pipeline.features(probe, [""], generator=keyed_generator(0, "probe"))
        sizes = {
            "semantic": frames * self.semantic.num_tokens * self.semantic.out_dim * 2,
            "geometric": frames * self.geometric.num_tokens * self.geometric.out_dim * 2,
            "references": (
                self.semantic.num_tokens * self.semantic.out_dim
                + self.geometric.num_tokens * self.geometric.out_dim
            )
            * 2,
            "frames+depth+actions+state": frames * size * size * (3 + 2)
            + data.action_horizon * 4 * 4
            + frames * 16,
        }
        if self.config.cache.keep_onestep:
            sizes["onestep"] = features[0].numel() * 2
        if self.config.cache.keep_generated:
            sizes["generated"] = frames * teacher_cfg.image_size**2 * 3
        return sizes

    # ------------------------------------------------------------------------------- the work

    @torch.inference_mode()
    def encode_batch(self, clips: list[ClipRef], store: EpisodeStore):
        """Arrays and metadata for each clip of one batch, or None for a clip with NaN/Inf."""
        timing = self.timing
        data = self.config.data
        start = time.perf_counter()
        arrays, metas = [], []
        for clip in clips:
            episode, meta = store.get(clip.episode)
            steps = clip.start + np.arange(data.clip_frames) * data.frame_stride
            clip_arrays = {
                "frames": episode["frames"][steps],
                "actions": episode["actions"][clip.start : clip.start + data.action_horizon],
                "state": episode["state"][steps],
            }
            if "depth" in episode:  # imported datasets may hold none
                clip_arrays["depth"] = episode["depth"][steps]
            arrays.append(clip_arrays)
            metas.append(
                {
                    "task": meta["task"],
                    "instruction": meta["instruction"],
                    "episode": clip.episode,
                    "start": clip.start,
                    "split": clip.split,
                }
            )
        real = torch.from_numpy(np.stack([a["frames"] for a in arrays])).permute(0, 1, 4, 2, 3)
        current = real[:, 0]
        timing["load"] += time.perf_counter() - start

        start = time.perf_counter()
        output = self.pipeline(
            current,
            [m["instruction"] for m in metas],
            generator=[clip_noise(self.config.run.seed, c.key) for c in clips],
            num_inference_steps=self.steps,
            return_features=self.config.cache.keep_onestep,
            decode=True,
        )
        timing["teacher"] += time.perf_counter() - start

        start = time.perf_counter()
        generated = output.frames.cpu()
        semantic = self.semantic(generated)
        geometric = self.geometric(generated)
        semantic_ref = self.semantic(current)
        geometric_ref = self.geometric(current[:, None])[:, 0]
        timing["encoders"] += time.perf_counter() - start

        results = []
        for index, clip_arrays in enumerate(arrays):
            clip_arrays.update(
                semantic=semantic[index],
                geometric=geometric[index],
                semantic_ref=semantic_ref[index],
                geometric_ref=geometric_ref[index],
            )
            if self.config.cache.keep_onestep:
                clip_arrays["onestep"] = output.features[index]
            if self.config.cache.keep_generated:
                clip_arrays["generated"] = generated[index].permute(0, 2, 3, 1)
            for name, value in clip_arrays.items():
                if isinstance(value, torch.Tensor):
                    value = value.float() if value.is_floating_point() else value
                    clip_arrays[name] = value.cpu().numpy()
            for name in ("semantic", "geometric", "semantic_ref", "geometric_ref", "onestep"):
                if name in clip_arrays:
                    clip_arrays[name] = clip_arrays[name].astype(np.float16)
            # After the cast to float16, so values that overflow it count as non-finite too.
            finite = all(np.isfinite(v).all() for v in clip_arrays.values() if v.dtype.kind == "f")
            results.append((clip_arrays, metas[index]) if finite else None)
        return results

    def write_shard(self, job: ShardJob, store: EpisodeStore, progress: tqdm) -> None:
        samples: list[tuple[str, dict, dict]] = []
        skipped: list[str] = []
        batch = self.config.cache.batch_size
        for first in range(0, len(job.clips), batch):
            clips = list(job.clips[first : first + batch])
            for clip, result in zip(clips, self.encode_batch(clips, store), strict=True):
                if result is None:
                    skipped.append(clip.key)
                else:
                    samples.append((clip.key, *result))
            progress.update(len(clips))
            if not self.reported_eta:
                self.report_eta(progress)
        start = time.perf_counter()
        write_shard(self.out_dir / job.name, TEACHER_CACHE, samples, skipped=skipped)
        self.timing["write"] += time.perf_counter() - start

    def report_eta(self, progress: tqdm) -> None:
        self.reported_eta = True
        elapsed = time.perf_counter() - self.started
        remaining = (progress.total - progress.n) * elapsed / max(progress.n, 1)
        progress.write(
            f"cache-teachers: rank {self.state.process_index}: first batch took {elapsed:.1f}s, "
            f"estimated {remaining / 60:.1f} min for its remaining {progress.total - progress.n} clips"
        )

    def run(self, dry_run: bool = False) -> Path:
        state = self.state
        store = EpisodeStore(self.episodes)
        if not self.jobs:
            raise ValueError(
                f"{self.episodes.root}: no clips to cache for splits {self.config.cache.splits}"
            )
        if state.is_main_process:
            self.print_plan(sum(self.is_done(job) for job in self.jobs), store)
        if not dry_run:
            self.check_or_write_plan()
        mine = [
            job for i, job in enumerate(self.jobs) if i % state.num_processes == state.process_index
        ]
        todo = [job for job in mine if dry_run or not self.is_done(job)]
        self.timing: dict[str, float] = defaultdict(float)
        self.reported_eta = False
        self.started = time.perf_counter()
        progress = tqdm(
            total=sum(len(job.clips) for job in todo),
            desc=f"cache-teachers[{state.process_index}]",
            unit="clip",
            disable=not todo,
        )
        if dry_run:
            if todo:
                first = list(todo[0].clips[: self.config.cache.batch_size])
                self.encode_batch(first, store)
                progress.update(len(first))
                self.report_eta(progress)
            progress.close()
            return self.out_dir
        with progress:  # closed before a failure's one-line error, not after it
            for job in todo:
                for stale in self.out_dir.glob(f"{job.name}*.tmp"):
                    stale.unlink()
                self.write_shard(job, store, progress)
        total = time.perf_counter() - self.started
        if todo:
            parts = ", ".join(
                f"{k} {v:.1f}s ({100 * v / total:.0f}%)" for k, v in self.timing.items()
            )
            print(f"cache-teachers: rank {state.process_index}: {total:.1f}s: {parts}")
        state.wait_for_everyone()
        if state.is_main_process:
            self.write_manifest()
        state.wait_for_everyone()
        return self.out_dir

    def print_plan(self, done: int, store: EpisodeStore) -> None:
        clips = defaultdict(int)
        for job in self.jobs:
            clips[job.clips[0].split] += len(job.clips)
        sizes = self.sample_bytes(store)
        per_clip = sum(sizes.values())
        total_clips = sum(clips.values())
        parts = ", ".join(f"{name} {size / 1024:,.0f} KiB" for name, size in sizes.items())
        print(
            f"cache-teachers: {total_clips} clips ({', '.join(f'{s} {n}' for s, n in clips.items())}) "
            f"in {len(self.jobs)} shards ({done} already complete) on {self.state.num_processes} "
            f"process(es); teacher N={self.steps} steps -> {self.out_dir}\n"
            f"cache-teachers: estimated {total_clips * per_clip / 2**20:,.1f} MiB "
            f"({per_clip / 1024:,.0f} KiB per clip: {parts})"
        )

    def splits(self) -> dict[str, Any]:
        """The episode split the cache was cut by: fractions, episodes per split, the test
        episodes by name (what no stage may select on)."""
        data = self.config.data
        split_of = split_episodes(
            self.episodes.manifest["episodes"], data.val_fraction, data.test_fraction
        )
        return {
            "val_fraction": data.val_fraction,
            "test_fraction": data.test_fraction,
            "episodes": split_counts(split_of),
            "test_episodes": sorted(k for k, s in split_of.items() if s == "test"),
        }

    def write_manifest(self) -> None:
        records = [finished_shard(self.out_dir / job.name) for job in self.jobs]
        skipped = [key for record in records for key in record.pop("skipped")]
        counts: dict[str, int] = defaultdict(int)
        for job, record in zip(self.jobs, records, strict=True):
            counts[job.clips[0].split] += record["samples"]
        fields = {
            **self.plan,
            "counts": dict(counts),
            "skipped_nonfinite": skipped,
            "dims": {
                "semantic": [self.semantic.num_tokens, self.semantic.out_dim],
                "geometric": [self.geometric.num_tokens, self.geometric.out_dim],
                "clip_frames": self.config.data.clip_frames,
            },
            "encoders": asdict(self.config.encoders),
            "splits": self.splits(),
        }
        write_shard_set_manifest(self.out_dir, TEACHER_CACHE, records, **fields)
        note = f", skipped {len(skipped)} with NaN/Inf: {', '.join(skipped)}" if skipped else ""
        print(
            f"cache-teachers: {sum(r['samples'] for r in records)} clips in {len(records)} shards{note} "
            f"-> {self.out_dir}"
        )


def cache_teachers(
    config: Config, out_dir: str | Path | None = None, dry_run: bool = False
) -> Path:
    """Run this process's share of the cache job (all of it without a distributed launcher)."""
    if out_dir is not None:
        config.cache.output_dir = str(out_dir)
    if config.cache.num_threads > 0:
        torch.set_num_threads(config.cache.num_threads)
    # accelerate only forms a multi-process CPU group (gloo) when told the run is on the CPU.
    on_cpu = config.cache.device == "cpu" or not torch.cuda.is_available()
    state = PartialState(cpu=on_cpu)
    job = TeacherCacheJob(config, state)
    if dry_run:
        return job.run(dry_run=True)
    with output_lock(job.out_dir):
        if state.is_main_process:
            RunDir.from_config(config).save_config(config, "cache-teachers")
        return job.run()
