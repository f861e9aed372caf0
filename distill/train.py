"""`svam distill`: train the semantic and geometric decouplers on a teacher cache.

Both decouplers train together (one accelerate-prepared module, one optimizer) on teacher-cache
clips streamed with a seeded shuffle buffer, disjoint per loader worker and process. Targets are
standardised per channel by the train split's statistics (stored in each decoupler, which undoes
them at inference), and per branch the loss is `mse_weight` x MSE + `cosine_weight` x (1 - token
cosine), both on standardised tokens, so every channel counts alike; the branches' losses are
summed.

One-step features come from the cache, or, when it holds none, from the cache's teacher on the
fly: a fresh noise draw per clip and epoch, seeded by (run seed, clip key, epoch).

Before training, the decouplers' data dims are derived from the cache manifest and the features
(or, with `distill.dims_from_cache=false`, checked against them), and the linear-probe baseline,
the per-channel target statistics and the depth probes are fitted on the train split (kept in the
work dir for resumes, and published with the decouplers for `svam eval`). Every `eval_every`
steps the validation fidelity is measured and each branch's best decoupler so far is kept
(selection uses val only); at the end the best decouplers are compared with both baselines on
every test clip (distill/fidelity.py), which nothing selected on.

Resuming: checkpoints (accelerate `save_state`, written under a temporary name and renamed) hold
the models, optimizer, LR schedule, RNG states, best scores and the data position; a resumed run
skips the batches already consumed and goes on exactly as the uninterrupted run would.

Layout: `<output_dir>/{semantic,geometric}/` (`Decoupler` directories), `baselines.pt`,
`fidelity.json`, `fidelity.md`, `distill.json`, all written at once (a complete new directory
replaces the old one); `<output_dir>-train/`: `checkpoints/`, `best/`, `baselines.pt` (scratch:
eval reads only `<output_dir>`).
Tensorboard scalars go to `<run>/tb/distill/`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed
from torch import nn
from torchmetrics.aggregation import SumMetric
from tqdm.auto import tqdm

from svam.atomic import atomic_dir, atomic_file, write_json_atomic
from svam.config import Config, to_dict
from svam.data.episodes import SPLITS
from svam.data.teacher_cache import (
    CACHED,
    CURRENT,
    ON_THE_FLY,
    TARGETS,
    TeacherCache,
    cache_key_parts,
    clip_episode,
    loader_settings,
    onestep_source,
    teacher_cache_loader,
)
from svam.distill.configuration_decoupler import BRANCHES, DecouplerConfig, DecouplersConfig
from svam.distill.cross_fitting import (
    FOLDS_NAME,
    assign_folds,
    fold_dir,
    folds_dir,
    held_out,
    read_folds,
)
from svam.distill.fidelity import (
    BASELINES,
    DEPTH_SUBPATCH,
    METHODS,
    NO_WORLD_DEPTH,
    DepthFidelity,
    DepthProbe,
    ForesightFidelity,
    LinearProbe,
    RidgeRegression,
    branch_report,
    depth_map,
    depth_patches,
    grid_features,
    markdown,
    summarize_depth,
    summarize_tokens,
)
from svam.distill.modeling_decoupler import Decoupler, build_decouplers
from svam.hashing import file_digest, json_digest
from svam.locking import output_lock
from svam.rundir import RunDir
from svam.seeding import keyed_generator
from svam.serialization import WEIGHTS_NAME
from svam.training import LoopSettings, TrainingLoop, TrainingStage

RECORD_NAME = "distill.json"
BASELINES_NAME = "baselines.pt"
"""The fitted baselines: linear probes, each branch's target statistics and the depth probes."""
NOT_IN_KEY = (
    "cache",
    "teacher",
    "output_dir",
    "resume",
    "log_every",
    "checkpoint_every",
    "checkpoints_total_limit",
    "cross_fit_folds",  # the published decouplers do not depend on it; folds.json records it
)
"""Distill keys that do not change the trained decouplers (paths, resumption, logging)."""


class DistillError(ValueError):
    """A distillation setup that cannot run; the message is one line naming the key or file."""


# ------------------------------------------------------------------------------------ setup


@dataclass(frozen=True)
class DistillPaths:
    cache: Path
    teacher: Path
    output: Path

    @property
    def work(self) -> Path:
        """Checkpoints, the best decouplers so far and the fitted baselines."""
        return self.output.with_name(self.output.name + "-train")


def distill_paths(config: Config) -> DistillPaths:
    run, args = RunDir.from_config(config), config.distill
    return DistillPaths(
        cache=Path(args.cache or config.cache.output_dir or run.cache),
        teacher=Path(args.teacher or config.cache.teacher or run.teacher),
        output=Path(args.output_dir or run.decouplers),
    )


def onestep_mode(config: Config, cache: TeacherCache) -> str:
    """'cached' or 'on-the-fly': where the one-step features come from."""
    return onestep_source(cache, config.distill.onestep, "distill.onestep")


def training_key(config: Config, cache: TeacherCache, mode: str) -> str:
    """What the distilled decouplers depend on: the decoupler and distill settings (paths,
    resumption and logging left out), the run seed, the cache manifest and the one-step source."""
    settings = {k: v for k, v in to_dict(config.distill).items() if k not in NOT_IN_KEY}
    parts = {
        "decouplers": to_dict(config.decouplers),
        "distill": {**settings, **loader_settings(config.distill, config.data)},
        **cache_key_parts(config, cache, mode),
    }
    return json_digest(parts)


def is_distilled(config: Config) -> bool:
    """Whether the run already holds decouplers distilled with this config from this cache."""
    paths = distill_paths(config)
    try:
        cache = TeacherCache.open(paths.cache, verify=False)
        record = json.loads((paths.output / RECORD_NAME).read_text())
        published = [
            paths.output / BASELINES_NAME,
            *(paths.output / b / WEIGHTS_NAME for b in BRANCHES),
        ]
        if not all(path.is_file() for path in published):
            return False  # written by an older svam
        key = training_key(config, cache, onestep_mode(config, cache))
        if record.get("key") != key:
            return False
        folds = config.distill.cross_fit_folds
        found = read_folds(paths.output)
        return not folds or (found is not None and (found["key"], found["folds"]) == (key, folds))
    except (OSError, ValueError):
        return False


def _check_dims(name: str, branch: DecouplerConfig, found: dict[str, tuple[int, str]]) -> None:
    """Refuse the first config dim that differs from what the cache or teacher has."""
    configured = {"reference_dim": branch.ref_dim, "reference_tokens": branch.ref_tokens}
    for key, (value, phrase) in found.items():
        mine = configured.get(key, getattr(branch, key))
        if mine != value:
            raise DistillError(f"decouplers.{name}.{key}={mine} but {phrase}")


def resolve_decouplers(
    section: DecouplersConfig,
    cache: TeacherCache,
    features: tuple[int, int],
    feature_source: str,
    from_cache: bool,
) -> DecouplersConfig:
    """The decoupler configs with their data dims from the cache and the one-step features
    (`features` = (channels, grid side)); with `from_cache` false the section's own dims are
    kept and must agree with the cache, else a one-line error names both numbers."""
    manifest, where = cache.manifest, cache.manifest_path
    frames = manifest["dims"]["clip_frames"]
    channels, side = features
    if manifest.get("encoders", {}).get("geometric_camera_token"):
        raise DistillError(
            f"the cache's geometric tokens carry DA3's camera token ({where}): the decouplers "
            "predict a square grid of patch tokens; rebuild the cache with "
            "encoders.geometric_camera_token=false"
        )
    resolved = {}
    for name, branch in section.branches().items():
        tokens, dim = manifest["dims"][name]
        fingerprint = manifest[f"{name}_fingerprint"]
        if not from_cache:
            found = {
                "in_channels": (
                    channels,
                    f"the teacher's one-step features have {channels} channels ({feature_source})",
                ),
                "num_frames": (frames, f"the cache's clips have {frames} frames ({where})"),
                "target_dim": (dim, f"the cache's {name} tokens are {dim}-d ({where})"),
                "target_tokens": (
                    tokens,
                    f"the cache holds {tokens} {name} tokens per frame ({where})",
                ),
            }
            if branch.reference:
                found["reference_dim"] = (
                    dim,
                    f"the cache's {name} reference tokens are {dim}-d ({where})",
                )
                found["reference_tokens"] = (
                    tokens,
                    f"the cache holds {tokens} {name} reference tokens ({where})",
                )
            _check_dims(name, branch, found)
            if not fingerprint.startswith(f"{branch.encoder}-"):
                raise DistillError(
                    f"decouplers.{name}.encoder={branch.encoder} but the cache's {name} tokens "
                    f"come from {fingerprint} ({where})"
                )
        resolved[name] = dataclasses.replace(
            branch,
            encoder=fingerprint,
            in_channels=channels,
            feature_size=side,
            num_frames=frames,
            target_dim=dim,
            target_tokens=tokens,
            reference_dim=None,
            reference_tokens=None,
        )
    config = DecouplersConfig(**resolved)
    try:
        config.validate()
    except ValueError as exc:
        raise DistillError(f"{exc} (dims from {where})") from exc
    return config


class DecouplerPair(nn.Module):
    """Both decouplers as one module, so accelerate wraps (DDP), casts and checkpoints them as
    a unit."""

    def __init__(self, models: dict[str, Decoupler]):
        super().__init__()
        self.branches = nn.ModuleDict(models)

    def forward(
        self, features: torch.Tensor, references: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return {
            name: model(features, references[name] if model.config.reference else None)
            for name, model in self.branches.items()
        }


def _save_atomic(model: Decoupler, path: Path) -> None:
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)


def _means(result: dict[str, list[float]]) -> dict[str, float]:
    return {metric: sum(values) / len(values) for metric, values in result.items()}


# ------------------------------------------------------------------------------------ trainer


class Distiller(TrainingStage):
    """One `svam distill` run on the one training loop; `train` returns the output directory."""

    name = "distill"
    section = "distill"
    error = DistillError

    def __init__(
        self,
        config: Config,
        paths: DistillPaths,
        exclude_episodes: frozenset[str] = frozenset(),
        tb_name: str = "distill",
    ):
        """`exclude_episodes`: train episodes this run must not fit (a cross-fitting fold's)."""
        try:
            config.distill.validate()
        except ValueError as exc:
            raise DistillError(str(exc)) from exc
        self.config, self.args, self.paths = config, config.distill, paths
        self.exclude = exclude_episodes
        self.cache = TeacherCache.open(paths.cache)
        for split in SPLITS:
            if not self.cache.members(split):
                raise DistillError(
                    f"{self.cache.manifest_path}: the cache holds no {split} clips (made before "
                    "the train/val/test split, or with cache.splits leaving it out): rebuild it "
                    "with `svam cache-teachers`"
                )
        self.teacher_runtime = self.cache.runtime_for(config.teacher, DistillError)
        self.mode = onestep_mode(config, self.cache)
        self.key = training_key(config, self.cache, self.mode)
        if exclude_episodes:
            self.key = json_digest([self.key, sorted(exclude_episodes)])
        self.loader_settings = loader_settings(config.distill, config.data)
        self.feature_array = "onestep" if self.mode == CACHED else CURRENT
        self.teacher_pipeline = None
        self.best = {name: {"score": None, "step": None} for name in BRANCHES}
        processes = PartialState(cpu=not torch.cuda.is_available()).num_processes
        self.total_steps = self._total_steps(processes)
        self.training = TrainingLoop(
            self,
            LoopSettings.of(self.args, steps=self.total_steps),
            work_dir=paths.work,
            output_dir=paths.output,
            tb_dir=RunDir.from_config(config).tb / tb_name,
        )

    def train(self) -> Path:
        return self.training.run()

    @property
    def accelerator(self) -> Accelerator:
        return self.loop.accelerator

    @property
    def device(self) -> torch.device:
        return self.loop.device

    @property
    def is_main(self) -> bool:
        return self.loop.is_main

    @property
    def timing(self) -> dict[str, float]:
        """Seconds spent waiting for batches ('data'), in training steps ('step') and, within
        them, computing one-step features ('features')."""
        return self.loop.timing

    # ------------------------------------------------------------------------------ inputs

    def _load_teacher(self) -> None:
        from svam.teachers.modeling_teacher import check_cache_teacher
        from svam.teachers.pipeline_teacher import TeacherPipeline

        # The cache holds no one-step features, so the teacher that made it computes them.
        teacher_dir = self.paths.teacher
        check_cache_teacher(
            teacher_dir,
            self.cache.manifest_path,
            self.cache.manifest["teacher_fingerprint"],
            "distill.teacher",
            DistillError,
        )
        pipeline = TeacherPipeline.from_pretrained(
            teacher_dir, self.teacher_runtime, config=self.config.teacher
        )
        pipeline.teacher.to(self.device)
        self.teacher_pipeline = pipeline

    def _feature_shape(self) -> tuple[tuple[int, int], str]:
        """((channels, grid side), where that was read) of the one-step features."""
        _, arrays, _ = self.cache.first_sample
        if self.mode == CACHED:
            _, channels, side, _ = arrays["onestep"].shape
            return (channels, side), str(self.cache.manifest_path)
        current = torch.from_numpy(arrays["frames"][:1]).permute(0, 3, 1, 2)
        features = self._features(
            {"current": current, "instruction": [""], "key": ["probe"], "epoch": [0]}
        )
        return (features.shape[2], features.shape[3]), str(self.paths.teacher)

    def _train_clips(self) -> int:
        return sum(clip_episode(key) not in self.exclude for _, key in self.cache.members("train"))

    def _loader(self, split: str, arrays: list[str], **options: Any):
        if split == "train":
            options["exclude_episodes"] = self.exclude
        return teacher_cache_loader(
            self.cache,
            split,
            batch_size=self.args.batch_size,
            num_workers=self.loader_settings["num_workers"],
            pin_memory=self.device.type == "cuda",
            arrays=arrays,
            seed=self.config.run.seed,
            **options,
        )

    @torch.no_grad()
    def _features(self, batch: dict[str, Any]) -> torch.Tensor:
        """One-step features (B, T, C, h, w) float32 on the device."""
        start = time.perf_counter()
        if self.mode == CACHED:
            features = batch["onestep"].to(self.device, non_blocking=True).float()
        else:
            seed = self.config.run.seed
            generators = [
                keyed_generator(seed, key, "onestep", int(epoch))
                for key, epoch in zip(batch["key"], batch["epoch"], strict=True)
            ]
            with self.accelerator.autocast():
                features = self.teacher_pipeline.features(
                    batch[CURRENT],
                    batch["instruction"],
                    generator=generators,
                    num_inference_steps=self.cache.manifest["num_inference_steps"],
                ).float()
        self.timing["features"] += time.perf_counter() - start
        return features

    def _targets(
        self, batch: dict[str, Any]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(targets (B, T, P, D), references (B, P, D)) per branch, float32 on the device."""

        def get(name: str) -> torch.Tensor:
            return batch[name].to(self.device, non_blocking=True).float()

        return {b: get(b) for b in BRANCHES}, {b: get(f"{b}_ref") for b in BRANCHES}

    # --------------------------------------------------------------------------- baselines

    def _reduce(self, tensors: list[torch.Tensor]) -> None:
        for tensor in tensors:
            tensor.copy_(self.accelerator.reduce(tensor, reduction="sum"))

    @torch.no_grad()
    def _fit_linear_probes(self) -> dict[str, Any]:
        """Linear probes and per-channel target statistics of both branches, fitted on the train
        split."""
        configs = self.decouplers.branches()
        channels = configs["semantic"].in_channels
        ridges = {
            b: RidgeRegression(channels, cfg.target_dim, self.device) for b, cfg in configs.items()
        }
        loader = self._loader(
            "train", [*TARGETS, self.feature_array], shuffle=False, max_clips=self.args.probe_clips
        )
        clips = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch in tqdm(
            loader, desc="distill: linear probe", disable=not self.is_main, leave=False
        ):
            clips += len(batch["key"])
            features = self._features(batch)
            targets, _ = self._targets(batch)
            for name, cfg in configs.items():
                x = grid_features(features, cfg.target_grid).flatten(0, 2)
                ridges[name].update(x, targets[name].flatten(0, 2))
        self._reduce([clips])
        fitted = {"train_clips": clips.long().cpu()}
        for name, ridge in ridges.items():
            self._reduce(ridge.statistics())
            weight, bias = ridge.solve(self.args.probe_ridge)
            fitted[f"{name}.weight"], fitted[f"{name}.bias"] = weight, bias
            fitted[f"{name}.mean"], fitted[f"{name}.std"] = ridge.target_moments()
        return fitted

    @cached_property
    def _depth_encoder(self) -> tuple[Any, str | None]:
        """(the cache's geometric encoder, None), for DA3 depth of the generated frames, or
        (None, a note on why there is none)."""
        from svam.teachers.cache import DTYPES
        from svam.teachers.configuration_encoders import EncodersConfig
        from svam.teachers.encoders import GeometricEncoder

        manifest = self.cache.manifest
        cfg = EncodersConfig(**manifest["encoders"])
        dtype = DTYPES[manifest.get("cache_settings", {}).get("dtype", "float32")]
        try:
            encoder = GeometricEncoder(
                cfg.geometric_model,
                cfg.geometric_image_size,
                cfg.geometric_weights,
                layer=cfg.geometric_layer,
                camera_token=cfg.geometric_camera_token,
                seed=cfg.init_seed,
                device=self.device,
                dtype=dtype,
            )
        except (ValueError, OSError) as exc:
            return None, f"no depth errors: the cache's geometric encoder cannot be built ({exc})"
        if encoder.fingerprint != manifest["geometric_fingerprint"]:
            return None, (
                f"no depth errors: the geometric encoder the cache's config builds is "
                f"{encoder.fingerprint}, the cache's tokens come from "
                f"{manifest['geometric_fingerprint']}"
            )
        return encoder, None

    @torch.no_grad()
    def _fit_depth_probes(self) -> tuple[dict[str, torch.Tensor], list[str]]:
        """The depth probes' weights (distill/fidelity.py: `depth` against the teacher, from the
        target tokens to DA3's depth of the generated frames; `world_depth` against the world,
        from the real current frame's tokens to the simulator's depth), and notes on any missing."""
        if not self.args.depth_probe:
            return {}, ["no depth errors: distill.depth_probe=false"]
        encoder, note = None, "no depth against the teacher: the cache holds no generated frames"
        if self.cache.has("generated"):
            encoder, note = self._depth_encoder
        notes = [] if encoder is not None else [note]
        grid, dim = self.decouplers.geometric.target_grid, self.decouplers.geometric.target_dim
        ridges, arrays = {}, []
        if self.cache.has("depth"):
            ridges["world_depth"] = RidgeRegression(dim, DEPTH_SUBPATCH**2, self.device)
            arrays += ["geometric_ref", "depth"]
        else:
            notes.append(NO_WORLD_DEPTH)
        if encoder is not None:
            ridges["depth"] = RidgeRegression(dim, DEPTH_SUBPATCH**2, self.device)
            arrays += ["geometric", "generated"]
        if not ridges:
            return {}, notes
        loader = self._loader("train", arrays, shuffle=False, max_clips=self.args.depth_probe_clips)
        for batch in tqdm(
            loader, desc="distill: depth probes", disable=not self.is_main, leave=False
        ):
            if "world_depth" in ridges:
                world = depth_patches(batch["depth"][:, :1].to(self.device), grid)
                reference = batch["geometric_ref"].to(self.device).float()
                ridges["world_depth"].update(reference.flatten(0, 1), world.flatten(0, 2))
            if encoder is not None:
                teacher = depth_patches(encoder.depth(batch["generated"]), grid)
                tokens = batch["geometric"].to(self.device).float()
                ridges["depth"].update(tokens.flatten(0, 2), teacher.flatten(0, 2))
        fitted = {}
        for name, ridge in ridges.items():
            self._reduce(ridge.statistics())
            fitted[f"{name}.weight"], fitted[f"{name}.bias"] = ridge.solve(self.args.probe_ridge)
        return fitted, notes

    def _baselines(self) -> None:
        """Fit (or load, when this config already fitted them) the linear probes, the target
        statistics and the depth probes."""
        path = self.paths.work / BASELINES_NAME
        fitted = None
        if path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("key") == self.key:
                fitted = saved
        if fitted is None:
            fitted = {**self._fit_linear_probes(), "key": self.key}
            depth, notes = self._fit_depth_probes()
            fitted.update(depth, depth_note="; ".join(notes))
            if self.is_main:
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_file(path) as tmp:
                    torch.save(fitted, tmp)
        configs = self.decouplers.branches()
        on_device = {k: v.to(self.device) for k, v in fitted.items() if isinstance(v, torch.Tensor)}
        self.probes = {
            b: LinearProbe(on_device[f"{b}.weight"], on_device[f"{b}.bias"], cfg.target_grid)
            for b, cfg in configs.items()
        }
        self.moments = {
            b: (on_device[f"{b}.mean"], on_device[f"{b}.std"].clamp_min(1e-6)) for b in configs
        }
        self.probe_clips = int(fitted["train_clips"])
        self.notes = [fitted["depth_note"]] if fitted["depth_note"] else []
        grid = self.decouplers.geometric.target_grid
        self.depth_probes = {}
        if "world_depth.weight" in fitted:
            weight, bias = on_device["world_depth.weight"], on_device["world_depth.bias"]
            self.depth_probes["world"] = DepthProbe(weight, bias, grid)
        if "depth.weight" in fitted:
            encoder, note = self._depth_encoder  # built again on a resume: it can fail there
            if encoder is None:
                self.notes.append(note)
            else:
                weight, bias = on_device["depth.weight"], on_device["depth.bias"]
                self.depth_probes["teacher"] = DepthProbe(weight, bias, grid)

    # -------------------------------------------------------------------------------- run

    # ---------------------------------------------------------------------- the loop's stage

    def setup(self) -> None:
        set_seed(self.config.run.seed, device_specific=True)
        if self.is_main:
            RunDir.from_config(self.config).save_config(self.config, "distill")
            for stale in self.paths.work.glob("*/*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
        if self.mode == ON_THE_FLY:
            self._load_teacher()
        features, source = self._feature_shape()
        self.decouplers = resolve_decouplers(
            self.config.decouplers, self.cache, features, source, self.args.dims_from_cache
        )
        self.frames = self.decouplers.semantic.num_frames
        self._announce(features)
        self._baselines()

    def build(self) -> DecouplerPair:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.run.seed)
            pair = DecouplerPair(build_decouplers(self.decouplers))
        for name, model in pair.branches.items():
            model.set_target_statistics(*self.moments[name])
        return pair.to(self.device).train()

    def stream(self, consumed: int):
        arrays = [*TARGETS, self.feature_array]
        buffer = self.loader_settings["shuffle_buffer"]
        return iter(
            self._loader(
                "train",
                arrays,
                shuffle=True,
                shuffle_buffer=buffer,
                repeat=True,
                skip_batches=consumed,
            )
        )

    def _total_steps(self, processes: int) -> int:
        args = self.args
        if args.epochs is None:
            return args.steps
        per_step = args.batch_size * args.gradient_accumulation_steps * processes
        return max(1, math.ceil(args.epochs * self._train_clips() / per_step))

    def _announce(self, features: tuple[int, int]) -> None:
        if not self.is_main:
            return
        if self.mode == CACHED:
            where = f"read from the cache ({self.cache.root})"
        else:
            where = (
                f"computed on the fly by the teacher at {self.paths.teacher} (the cache holds none "
                "or distill.onestep=on-the-fly), fresh noise per clip and epoch"
            )
        dims = "; ".join(
            f"{name} -> {cfg.target_tokens} x {cfg.target_dim} ({cfg.encoder})"
            for name, cfg in self.decouplers.branches().items()
        )
        counts = {split: len(self.cache.members(split)) for split in SPLITS}
        counts["train"] = self._train_clips()
        tqdm.write(
            f"distill: one-step features {where}\n"
            f"distill: {features[0]}-channel {features[1]}x{features[1]} features of "
            f"{self.frames} frames; {dims}\n"
            f"distill: {counts['train']} train / {counts['val']} val (selection) / "
            f"{counts['test']} test (report) clips; {self.total_steps} "
            f"steps of {self.args.batch_size} clips x {self.accelerator.num_processes} process(es)"
        )

    def _loss(
        self, preds: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        args = self.args
        total, parts = 0.0, {}
        for name, pred in preds.items():
            mean, std = self.moments[name]
            pred, target = (pred.float() - mean) / std, (targets[name] - mean) / std
            nmse = F.mse_loss(pred, target)  # per-channel standardised
            cosine = F.cosine_similarity(pred, target, dim=-1).mean()
            total = total + args.mse_weight * nmse + args.cosine_weight * (1 - cosine)
            parts[f"train/{name}/nmse"] = nmse.item()
            parts[f"train/{name}/cosine"] = cosine.item()
        return total, parts

    def loss(self, model, batch: dict[str, Any], micro_step: int) -> tuple[torch.Tensor, dict]:
        features = self._features(batch)
        targets, references = self._targets(batch)
        with self.accelerator.autocast():
            preds = model(features, references)
        return self._loss(preds, targets)

    # --------------------------------------------------------------------------- evaluation

    def _score(self, result: dict[str, list[float]]) -> float:
        """The validation counterpart of the loss over the future frames: weighted standardised
        NMSE + centred cosine distance."""
        summary = summarize_tokens(result)
        return self.args.mse_weight * summary["nmse"] + self.args.cosine_weight * (
            1 - summary["centred_cosine"]
        )

    @torch.no_grad()
    def _evaluate(self, models: dict[str, Decoupler], max_clips: int | None, final: bool) -> dict:
        """Fidelity on the validation split (selection), or, when final, on the test split with
        the baselines: {branch: {method: {metric: per-frame list}}}, plus 'depth' ({truth:
        {method: ...}}) when final and a depth probe exists. Every process evaluates its share."""
        methods = METHODS if final else ("decoupler",)
        probes = self.depth_probes if final else {}
        arrays = [*TARGETS, self.feature_array]
        arrays += ["generated"] if "teacher" in probes else []
        arrays += ["depth"] if "world" in probes else []
        loader = self._loader(
            "test" if final else "val", arrays, shuffle=False, max_clips=max_clips
        )
        tokens = {
            name: {
                m: ForesightFidelity(self.frames, *self.moments[name]).to(self.device)
                for m in methods
            }
            for name in self.decouplers.branches()
        }
        depth = {
            truth: {m: DepthFidelity(self.frames).to(self.device) for m in (*METHODS, "targets")}
            for truth in probes
        }
        clips = SumMetric().to(self.device)
        split = "test" if final else "val"
        for batch in tqdm(
            loader, desc=f"distill: {split} fidelity", disable=not self.is_main, leave=False
        ):
            clips.update(len(batch["key"]))
            features = self._features(batch)
            targets, references = self._targets(batch)
            guesses: dict[str, dict[str, torch.Tensor]] = {}
            for name, model in models.items():
                with self.accelerator.autocast():
                    pred = model(features, references[name] if model.config.reference else None)
                guesses[name] = {"decoupler": pred.float()}
                if final:
                    guesses[name]["nothing_moves"] = references[name][:, None].expand_as(
                        targets[name]
                    )
                    guesses[name]["linear_probe"] = self.probes[name](features)
                for method, guess in guesses[name].items():
                    tokens[name][method].update(guess, targets[name], references[name])
            truths = {}
            if "teacher" in probes:
                truths["teacher"] = self._depth_encoder[0].depth(batch["generated"])
            if "world" in probes:
                truths["world"] = batch["depth"].to(self.device)
            decoded = {**guesses.get("geometric", {}), "targets": targets["geometric"]}
            for truth, maps in truths.items():
                grid = probes[truth].grid
                maps = depth_map(depth_patches(maps, grid), grid)
                for method, guess in decoded.items():
                    depth[truth][method].update(probes[truth](guess), maps)
        results: dict[str, Any] = {
            name: {
                m: {k: v.tolist() for k, v in metric.compute().items()}
                for m, metric in by_method.items()
            }
            for name, by_method in tokens.items()
        }
        results["clips"] = int(clips.compute())
        if depth:
            results["depth"] = {
                truth: {
                    m: {k: v.tolist() for k, v in metric.compute().items()}
                    for m, metric in by.items()
                }
                for truth, by in depth.items()
            }
        return results

    def validate(self, model: DecouplerPair, step: int) -> dict[str, float]:
        """Validation fidelity of the current weights; keep each branch's best decoupler."""
        models = dict(model.branches.items())
        for model in models.values():
            model.eval()
        results = self._evaluate(models, self.args.eval_clips, final=False)
        for model in models.values():
            model.train()
        scalars = {}
        for name in BRANCHES:
            score = self._score(results[name]["decoupler"])
            means = _means(results[name]["decoupler"])
            scalars.update(
                {
                    f"val/{name}/score": score,
                    f"val/{name}/cosine": means["cosine"],
                    f"val/{name}/nmse": means["nmse"],
                }
            )
            best = self.best[name]
            if best["score"] is None or score < best["score"]:
                self.best[name] = {"score": score, "step": step}
                if self.is_main:
                    _save_atomic(models[name], self.paths.work / "best" / name)
        self.accelerator.wait_for_everyone()
        return scalars

    # -------------------------------------------------------------------------- checkpoints

    def resume_record(self) -> dict[str, Any]:
        return {
            "decouplers": to_dict(self.decouplers),
            "cache": file_digest(self.cache.manifest_path),
            "onestep": self.mode,
            "batch_size": self.args.batch_size,
            "gradient_accumulation_steps": self.args.gradient_accumulation_steps,
            "seed": self.config.run.seed,
            **self.loader_settings,
        }

    def state(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state(self, state: dict[str, Any]) -> None:
        self.best = state["best"]

    # ------------------------------------------------------------------------------- export

    def export(self, model: DecouplerPair, step: int, into: Path) -> None:
        """Evaluate the best decouplers against the baselines; write the output directory."""
        best_dir = self.paths.work / "best"
        models = {
            name: Decoupler.from_pretrained(best_dir / name, device_map=self.device).eval()
            for name in BRANCHES
        }
        results = self._evaluate(models, None, final=True)
        if self.is_main:
            report = self._report(results, step)
            self._write_output(report, into)
            self._log_report(report)
            tqdm.write(markdown(report))
            tqdm.write(f"distill: decouplers and fidelity report -> {self.paths.output}")

    def _report(self, results: dict, step: int) -> dict:
        report = {
            "cache": str(self.cache.root),
            "clips": results["clips"],
            "split": "test",
            "frames": self.frames,
            "onestep": f"{self.mode} ({'the cache' if self.mode == CACHED else self.paths.teacher})",
            "probe": (
                f"closed-form ridge (strength {self.args.probe_ridge} x mean feature energy) on "
                f"{self.probe_clips} train clips"
            ),
            "steps": step,
            "branches": {},
            "notes": list(self.notes),
        }
        for name, cfg in self.decouplers.branches().items():
            report["branches"][name] = {
                "encoder": cfg.encoder,
                "best_step": self.best[name]["step"],
                **branch_report(results[name]),
            }
        if "depth" in results:
            report["depth"] = {
                truth: {
                    method: summarize_depth(per_frame, by_method["nothing_moves"])
                    for method, per_frame in by_method.items()
                }
                for truth, by_method in results["depth"].items()
            }
            report["depth"]["about"] = (
                "linear probes from a geometric token to the log depth of its patch, fitted on "
                "train clips, decode every row: against the teacher, from the target tokens to "
                "Depth Anything 3's depth of the generated frames (the 'targets' row is the floor "
                "that probe sets); against the world, from the real current frame's tokens to the "
                "simulator's depth (the 'targets' row is how far the teacher's own foresight is "
                "from what happened)"
            )
        for name in BRANCHES:
            if not report["branches"][name]["beats_baselines"]:
                beaten_by = [
                    b for b in BASELINES if not report["branches"][name]["versus"][b]["beats"]
                ]
                report["notes"].append(
                    f"the {name} decoupler does not beat: {', '.join(beaten_by)}"
                )
        return report

    def _write_output(self, report: dict, tmp: Path) -> None:
        for name in BRANCHES:
            shutil.copytree(self.paths.work / "best" / name, tmp / name)
        shutil.copy2(self.paths.work / BASELINES_NAME, tmp / BASELINES_NAME)
        (tmp / "fidelity.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "fidelity.md").write_text(markdown(report))
        record = {
            "key": self.key,
            "steps": report["steps"],
            "best_steps": {name: self.best[name]["step"] for name in BRANCHES},
            "onestep": self.mode,
            "cache": str(self.cache.root),
            "teacher_fingerprint": self.cache.manifest["teacher_fingerprint"],
            "encoders": {name: cfg.encoder for name, cfg in self.decouplers.branches().items()},
            "held_out_episodes": sorted(self.exclude),
        }
        (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")

    def _log_report(self, report: dict) -> None:
        """Fidelity as tensorboard scalars over the frame index (the horizon is the x axis)."""
        curves = {
            f"fidelity/{name}/{{metric}}/{method}": summary["per_frame"]
            for name, result in report["branches"].items()
            for method, summary in result["methods"].items()
        }
        for truth, methods in report.get("depth", {}).items():
            if isinstance(methods, dict):
                for method, summary in methods.items():
                    curves[f"fidelity/depth_{truth}/{{metric}}/{method}"] = summary["per_frame"]
        for tag, per_frame in curves.items():
            for metric, values in per_frame.items():
                for t, value in enumerate(values):
                    self.loop.tensorboard.add_scalar(tag.format(metric=metric), value, t)


# ---------------------------------------------------------------------------------- the stage


def distill(config: Config, out_dir: str | Path | None = None) -> Path:
    """`svam distill`: train both decouplers on the run's teacher cache; returns the decoupler
    directory (default `runs/<name>/decouplers`)."""
    if out_dir is not None:
        config.distill.output_dir = str(out_dir)
    paths = distill_paths(config)
    with output_lock(paths.output):
        distiller = Distiller(config, paths)
        if _published_key(paths.output) != distiller.key:
            distiller.train()
        if config.distill.cross_fit_folds:
            _cross_fit(config, paths, distiller.key)
        return paths.output


def _published_key(output: Path) -> str | None:
    """The training key of the decouplers published at `output`, or None."""
    try:
        return json.loads((output / RECORD_NAME).read_text()).get("key")
    except (OSError, ValueError):
        return None


def _cross_fit(config: Config, paths: DistillPaths, key: str) -> None:
    """Fit the K fold pairs (`svam.distill.cross_fitting`), skipping those already published for
    this config, then write folds.json."""
    folds = config.distill.cross_fit_folds
    cache = TeacherCache.open(paths.cache, verify=False)
    fold_of = assign_folds([clip_episode(k) for _, k in cache.members("train")], folds)
    if folds > len(fold_of):
        raise DistillError(
            f"distill.cross_fit_folds={folds}, but the cache holds {len(fold_of)} train episodes"
        )
    for fold in range(folds):
        fold_paths = dataclasses.replace(paths, output=fold_dir(paths.output, fold))
        excluded = held_out(fold_of, fold)
        tqdm.write(
            f"distill: cross-fitting fold {fold + 1}/{folds} (holds out {len(excluded)} episodes)"
        )
        distiller = Distiller(config, fold_paths, excluded, tb_name=f"distill-fold-{fold}")
        if _published_key(fold_paths.output) != distiller.key:
            distiller.train()
    if PartialState(cpu=not torch.cuda.is_available()).is_main_process:
        record = {"key": key, "folds": folds, "fold_of": fold_of}
        write_json_atomic(folds_dir(paths.output) / FOLDS_NAME, record)
