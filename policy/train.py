"""`svam train-policy`: train the Uni-Perceiver and the diffusion action head of one foresight
mode on a teacher cache, with the teacher, the encoders and the decouplers frozen.

Streams per mode, all from the cache:
- `onestep`: the cached one-step features (or, when the cache holds none, the teacher's one-step
  pass on the real current frame, fresh noise per clip and epoch, seeded by run seed, clip key
  and epoch);
- `shortcut`: those features plus the decouplers' foresight from them and the cached reference
  tokens of the real current frame (what the policy computes at inference);
- `multistep`: those features plus the cached semantic and geometric targets, i.e. the encoders
  on the teacher's N-step generation. This one policy runs every generating mode at inference
  (`multistep:K` for any K, `partial:F`): retraining per K would need the teacher to generate
  every clip on the fly, so the cheaper foresight is judged by the policy trained on the best;
- `blind`: no streams at all, the state and the instruction only (the baseline that says whether
  the tasks need vision): it reads the cache's actions, state and instructions, never its one-step
  features, and loads no decouplers and runs no teacher pass (its key ignores the one-step
  settings).

The instruction is embedded by the teacher's frozen CLIP text encoder (computed once per
distinct instruction). Actions and the current state are normalised with statistics of the train
split, saved with the policy. accelerate (mixed precision, DDP), EMA weights (diffusers EMAModel,
the saved policy's weights), tensorboard scalars under `<run>/tb/policy/<mode>/`, checkpoints
that resume exactly (model, optimizer, LR schedule, EMA, RNG states and the data position).

Layout: `<output_dir>/` (a ShortcutPolicy directory plus `train_policy.json`), default
`runs/<name>/policy/<mode>/`; `<output_dir>-train/checkpoints/`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from torch import nn
from tqdm.auto import tqdm

from svam.config import Config, to_dict
from svam.data.teacher_cache import (
    CACHED,
    CURRENT,
    TeacherCache,
    cache_key_parts,
    clip_episode,
    loader_settings,
    onestep_source,
    teacher_cache_loader,
)
from svam.distill.cross_fitting import fold_dir, folds_dir, read_folds
from svam.hashing import json_digest
from svam.locking import output_lock
from svam.policy.configuration_policy import (
    AggregatorConfig,
    PolicyModelsConfig,
    StreamConfig,
    foresight_streams,
)
from svam.policy.configuration_train import mode_dirname
from svam.policy.modeling_policy import (
    BRANCHES,
    PolicyNet,
    ShortcutPolicyConfig,
    features_to_tokens,
)
from svam.rundir import RunDir
from svam.seeding import keyed_generator
from svam.serialization import WEIGHTS_NAME, weights_fingerprint
from svam.training import LoopSettings, TrainingLoop, TrainingStage

RECORD_NAME = "train_policy.json"
NOT_IN_KEY = (
    "cache",
    "teacher",
    "decouplers",
    "output_dir",
    "resume",
    "log_every",
    "checkpoint_every",
    "checkpoints_total_limit",
    "val_clips",
)


class PolicyTrainError(ValueError):
    """A policy-training setup that cannot run; the message is one line naming the key or file."""


@dataclass(frozen=True)
class PolicyPaths:
    cache: Path
    teacher: Path
    decouplers: Path
    output: Path

    @property
    def work(self) -> Path:
        return self.output.with_name(self.output.name + "-train")


def policy_paths(config: Config) -> PolicyPaths:
    run, args = RunDir.from_config(config), config.train_policy
    return PolicyPaths(
        cache=Path(args.cache or config.cache.output_dir or run.cache),
        teacher=Path(args.teacher or config.cache.teacher or run.teacher),
        decouplers=Path(args.decouplers or config.distill.output_dir or run.decouplers),
        output=Path(args.output_dir or run.policy / mode_dirname(args.mode)),
    )


def _decoupler_fingerprints(paths: PolicyPaths) -> dict[str, str]:
    return {b: weights_fingerprint(paths.decouplers / b) for b in BRANCHES}


def reads_onestep(mode: str) -> bool:
    """Whether the policy of `mode` reads one-step features (every kind but blind)."""
    return "onestep" in foresight_streams(mode)


def policy_onestep_source(config: Config, cache: TeacherCache) -> str | None:
    """Where the policy's one-step features come from (`onestep_source`); None for a policy that
    reads none (blind), whatever `train_policy.onestep` says."""
    if not reads_onestep(config.train_policy.mode):
        return None
    return onestep_source(cache, config.train_policy.onestep, "train_policy.onestep")


def training_key(
    config: Config, cache: TeacherCache, source: str | None, paths: PolicyPaths
) -> str:
    """What the trained policy depends on: model and training settings (paths, resumption and
    logging left out), the run seed, the cache manifest, the one-step source and, for a
    shortcut policy, the decouplers' weights. A blind policy (`source` None) leaves out what it
    does not read: the one-step source and settings, and every aggregator setting except its
    width (which is the head's cond_dim)."""
    args = config.train_policy
    settings = {k: v for k, v in to_dict(args).items() if k not in NOT_IN_KEY}
    policy = to_dict(config.policy)
    if source is None:
        del settings["onestep"]
        policy["aggregator"] = {"dim": policy["aggregator"]["dim"]}
    parts: dict[str, Any] = {
        "policy": policy,
        "train_policy": {**settings, **loader_settings(config.train_policy, config.data)},
        **cache_key_parts(config, cache, source),
    }
    if source is None:
        parts.pop("onestep", None)
    if args.mode == "shortcut":
        parts["decouplers"] = _decoupler_fingerprints(paths)
        folds = cross_fitted_folds(config, paths)
        if folds is not None:
            parts["cross_fit"] = {
                "folds": folds["fold_of"],
                "decouplers": [
                    _decoupler_fingerprints(dataclasses.replace(paths, decouplers=d))
                    for d in fold_dirs(paths, folds)
                ],
            }
    return json_digest(parts)


def cross_fitted_folds(config: Config, paths: PolicyPaths) -> dict[str, Any] | None:
    """The decoupler folds a shortcut policy trains on (`svam.distill.cross_fitting`), or None
    (in-sample foresight): refused when distill was asked for folds and has not made them."""
    if config.train_policy.mode != "shortcut" or not config.train_policy.cross_fit:
        return None
    folds = read_folds(paths.decouplers)
    if folds is None and config.distill.cross_fit_folds:
        raise PolicyTrainError(
            f"distill.cross_fit_folds={config.distill.cross_fit_folds} but "
            f"{folds_dir(paths.decouplers)} holds no complete folds: run `svam distill`"
        )
    return folds


def fold_dirs(paths: PolicyPaths, folds: dict[str, Any]) -> list[Path]:
    return [fold_dir(paths.decouplers, fold) for fold in range(folds["folds"])]


def is_policy_trained(config: Config) -> bool:
    """Whether the run already holds a policy trained with this config (and mode)."""
    paths = policy_paths(config)
    try:
        cache = TeacherCache.open(paths.cache, verify=False)
        record = json.loads((paths.output / RECORD_NAME).read_text())
        key = training_key(config, cache, policy_onestep_source(config, cache), paths)
        # weights under another name: a directory written by an older svam
        return record.get("key") == key and (paths.output / WEIGHTS_NAME).is_file()
    except (OSError, ValueError):
        return False


def resolve_models(
    section: PolicyModelsConfig,
    mode: str,
    cache: TeacherCache,
    features: tuple[int, int] | None,
    text: tuple[int, int],
    use_state: bool,
) -> PolicyModelsConfig:
    """The policy's model configs with every data dim taken from the cache, the one-step features
    ((channels, grid side); None for a mode that reads none) and the text encoder ((tokens,
    dim)); the sizes (depths, widths, pooling, schedule) are the section's."""
    manifest, where = cache.manifest, cache.manifest_path
    _, arrays, _ = cache.first_sample
    horizon, action_dim = arrays["actions"].shape
    dims = {} if features is None else {"onestep": (features[1] ** 2, features[0])}
    for branch in BRANCHES:
        tokens, dim = manifest["dims"][branch]
        dims[branch] = (tokens, dim)
    try:
        return models_for(
            section,
            mode,
            dims,
            frames=manifest["dims"]["clip_frames"],
            action=(int(horizon), int(action_dim)),
            state_dim=int(arrays["state"].shape[-1]) if use_state else 0,
            text=text,
        )
    except ValueError as exc:
        raise PolicyTrainError(f"policy: {exc} (dims from {where})") from exc


def models_for(
    section: PolicyModelsConfig,
    mode: str,
    dims: dict[str, tuple[int, int]],
    *,
    frames: int,
    action: tuple[int, int],
    state_dim: int,
    text: tuple[int, int],
) -> PolicyModelsConfig:
    """The section's models for a mode, with data dims: `dims` maps each stream to (tokens per
    frame, dim); `action` is (horizon, action_dim); `text` is (tokens, dim)."""
    configured = {s.name: s for s in section.aggregator.streams}
    streams = []
    for name in AggregatorConfig().for_mode(mode).stream_names:
        tokens, dim = dims[name]
        side = math.isqrt(tokens)
        if side**2 != tokens:
            raise ValueError(
                f"the {name} tokens ({tokens} per frame) are not a square grid (a cache made "
                "with encoders.geometric_camera_token=true?)"
            )
        max_grid = configured.get(name, StreamConfig(name)).max_grid
        if max_grid is not None and side > max_grid and side % max_grid:
            max_grid = math.gcd(side, max_grid)  # the largest grid that pools evenly
        streams.append(StreamConfig(name, dim=dim, tokens=tokens, max_grid=max_grid))
    aggregator = dataclasses.replace(section.aggregator, streams=streams, num_frames=frames)
    head = dataclasses.replace(
        section.action_head,
        horizon=action[0],
        action_dim=action[1],
        cond_dim=aggregator.dim,
        cond_tokens=aggregator.num_tokens,
        text_tokens=text[0],
        text_dim=text[1],
        state_dim=state_dim,
    )
    models = PolicyModelsConfig(aggregator, head, dataclasses.replace(section.normalization))
    models.validate()
    return models


# ------------------------------------------------------------------------------------ trainer


class PolicyTrainer(TrainingStage):
    """One `svam train-policy` run on the one training loop; `train` returns the policy dir."""

    section = "train_policy"
    error = PolicyTrainError

    def __init__(self, config: Config, paths: PolicyPaths):
        try:
            config.train_policy.validate()
        except ValueError as exc:
            raise PolicyTrainError(str(exc)) from exc
        self.config, self.args, self.paths = config, config.train_policy, paths
        self.mode = self.args.mode
        self.name = f"train-policy ({self.mode})"
        self.cache = TeacherCache.open(paths.cache)
        self.teacher_runtime = self.cache.runtime_for(config.teacher, PolicyTrainError)
        self.source = policy_onestep_source(config, self.cache)  # None: blind
        if self.mode == "shortcut":
            for branch in BRANCHES:
                if not (paths.decouplers / branch / WEIGHTS_NAME).is_file():
                    raise PolicyTrainError(
                        f"train_policy.mode=shortcut needs decouplers, but {paths.decouplers / branch}"
                        " holds none: run `svam distill` first or set train_policy.decouplers"
                    )
        self.key = training_key(config, self.cache, self.source, paths)
        self.loader_settings = loader_settings(config.train_policy, config.data)
        self.training = TrainingLoop(
            self,
            LoopSettings.of(self.args),
            work_dir=paths.work,
            output_dir=paths.output,
            tb_dir=RunDir.from_config(config).tb / "policy" / mode_dirname(self.mode),
        )

    def train(self) -> Path:
        return self.training.run()

    @property
    def device(self) -> torch.device:
        return self.loop.device

    # ------------------------------------------------------------------------------ inputs

    def _load_frozen(self) -> None:
        from svam.teachers.modeling_teacher import check_cache_teacher
        from svam.teachers.pipeline_teacher import TeacherPipeline

        # The policy runs the cache's teacher (instruction encoder, one-step pass at inference).
        teacher_dir, manifest = self.paths.teacher, self.cache.manifest
        self.teacher_fingerprint = check_cache_teacher(
            teacher_dir,
            self.cache.manifest_path,
            manifest["teacher_fingerprint"],
            "train_policy.teacher",
            PolicyTrainError,
        )
        self.pipeline = TeacherPipeline.from_pretrained(
            teacher_dir, self.teacher_runtime, config=self.config.teacher
        )
        self.pipeline.teacher.to(self.device)
        self.decouplers, self.fold_decouplers, self.fold_of = {}, [], {}
        if self.mode != "shortcut":
            return
        self.decouplers = self._load_decouplers(self.paths.decouplers)
        folds = cross_fitted_folds(self.config, self.paths)
        if folds is not None:
            self.fold_of = folds["fold_of"]
            self.fold_decouplers = [self._load_decouplers(d) for d in fold_dirs(self.paths, folds)]

    def _load_decouplers(self, root: Path) -> dict[str, nn.Module]:
        """Both decouplers of `root`, checked against the cache's dims, frozen."""
        from svam.distill.modeling_decoupler import Decoupler

        dims, decouplers = self.cache.manifest["dims"], {}
        for branch in BRANCHES:
            model = Decoupler.from_pretrained(root / branch, device_map=self.device)
            cfg = model.config
            tokens, dim = dims[branch]
            found = {
                "num_frames": dims["clip_frames"],
                "target_tokens": tokens,
                "target_dim": dim,
            }
            for key, value in found.items():
                if getattr(cfg, key) != value:
                    raise PolicyTrainError(
                        f"{root / branch}: {key}={getattr(cfg, key)} but the cache has {value} "
                        f"({self.cache.manifest_path})"
                    )
            decouplers[branch] = model.eval().requires_grad_(False)
        return decouplers

    def _arrays(self) -> list[str]:
        if self.source is None:  # blind: the instruction comes with every clip
            return ["actions", "state"]
        arrays = ["actions", "state", "onestep" if self.source == CACHED else CURRENT]
        if self.mode == "shortcut":
            arrays += [f"{b}_ref" for b in BRANCHES]
        elif self.mode != "onestep":
            arrays += list(BRANCHES)
        return arrays

    def _loader(self, split: str, arrays: list[str], **options: Any):
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
        if self.source == CACHED:
            return batch["onestep"].to(self.device, non_blocking=True).float()
        seed = self.config.run.seed
        generators = [
            keyed_generator(seed, key, "policy-onestep", int(epoch))
            for key, epoch in zip(batch["key"], batch["epoch"], strict=True)
        ]
        return self.pipeline.features(
            batch[CURRENT],
            batch["instruction"],
            generator=generators,
            num_inference_steps=self.cache.manifest["num_inference_steps"],
        ).float()

    @torch.no_grad()
    def _streams(self, batch: dict[str, Any], cross_fit: bool = False) -> dict[str, torch.Tensor]:
        """The policy's input streams; `cross_fit` (train clips): each clip's foresight from the
        fold pair that held its episode out, when distill cross-fitted them."""
        if self.source is None:  # blind: no streams, no teacher pass
            return {}
        features = self._features(batch)
        streams = {"onestep": features_to_tokens(features)}
        if self.mode == "shortcut":
            groups = [(self.decouplers, slice(None))]
            if cross_fit and self.fold_decouplers:
                folds = torch.tensor([self.fold_of[clip_episode(k)] for k in batch["key"]])
                groups = [
                    (self.fold_decouplers[f], torch.nonzero(folds == f)[:, 0].to(self.device))
                    for f in folds.unique().tolist()
                ]
            for branch in BRANCHES:
                reference = batch[f"{branch}_ref"].to(self.device).float()
                out = None
                for models, rows in groups:
                    model = models[branch]
                    part = model(
                        features[rows], reference[rows] if model.config.reference else None
                    ).float()
                    if out is None:
                        out = part.new_empty((len(features), *part.shape[1:]))
                    out[rows] = part
                streams[branch] = out
        elif self.mode != "onestep":
            for branch in BRANCHES:
                streams[branch] = batch[branch].to(self.device, non_blocking=True).float()
        return streams

    @torch.no_grad()
    def _text(self, instructions: list[str]) -> torch.Tensor:
        missing = [s for s in dict.fromkeys(instructions) if s not in self.text_cache]
        if missing:
            states = self.pipeline.teacher.text_states(missing).float().to(self.device)
            self.text_cache.update(zip(missing, states, strict=True))
        return torch.stack([self.text_cache[s] for s in instructions])

    def _inputs(self, batch: dict[str, Any], cross_fit: bool = False) -> tuple:
        streams = self._streams(batch, cross_fit)
        text = self._text(list(batch["instruction"]))
        state = batch["state"][:, 0].to(self.device).float() if self.args.use_state else None
        actions = batch["actions"].to(self.device).float()
        return streams, text, state, actions

    def _feature_shape(self) -> tuple[int, int]:
        _, arrays, _ = self.cache.first_sample
        if self.source == CACHED:
            _, channels, side, _ = arrays["onestep"].shape
            return channels, side
        current = torch.from_numpy(arrays["frames"][:1]).permute(0, 3, 1, 2)
        features = self._features(
            {CURRENT: current, "instruction": [""], "key": ["probe"], "epoch": [0]}
        )
        return features.shape[2], features.shape[3]

    def _policy_config(self) -> ShortcutPolicyConfig:
        teacher = self.pipeline.teacher.config
        models = resolve_models(
            self.config.policy,
            self.mode,
            self.cache,
            None if self.source is None else self._feature_shape(),
            (teacher.max_text_length, teacher.text_hidden_size),
            self.args.use_state,
        )
        manifest = self.cache.manifest
        shortcut = self.mode == "shortcut"
        return ShortcutPolicyConfig(
            mode=self.mode,
            models=models,
            feature_steps=manifest["num_inference_steps"],
            use_state=self.args.use_state,
            teacher=str(self.paths.teacher.resolve()),
            teacher_fingerprint=self.teacher_fingerprint,
            teacher_runtime=self.teacher_runtime,
            encoders=dict(manifest["encoders"]),
            semantic_fingerprint=manifest["semantic_fingerprint"],
            geometric_fingerprint=manifest["geometric_fingerprint"],
            decouplers=str(self.paths.decouplers.resolve()) if shortcut else None,
            decoupler_configs={b: dataclasses.asdict(m.config) for b, m in self.decouplers.items()},
            decoupler_fingerprints=_decoupler_fingerprints(self.paths) if shortcut else {},
            cache=str(self.cache.root.resolve()),
        )

    @torch.no_grad()
    def _fit_normalizers(self, net: PolicyNet) -> None:
        loader = self._loader(
            "train", ["actions", "state"], shuffle=False, max_clips=self.args.normalizer_clips
        )
        batches = list(loader)
        net.action_normalizer.fit(b["actions"] for b in batches)
        if net.state_normalizer is not None:
            net.state_normalizer.fit(b["state"][:, 0] for b in batches)

    # -------------------------------------------------------------------- the loop's stage

    def setup(self) -> None:
        set_seed(self.config.run.seed, device_specific=True)
        if self.loop.is_main:
            RunDir.from_config(self.config).save_config(self.config, "train-policy")
        self._load_frozen()
        self.text_cache: dict[str, torch.Tensor] = {}
        self.policy_config = self._policy_config()
        if self.loop.is_main:
            self._announce()

    def build(self) -> PolicyNet:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.run.seed)
            net = PolicyNet(self.policy_config).to(self.device)
        self._fit_normalizers(net)
        return net.train()

    def stream(self, consumed: int):
        return iter(
            self._loader(
                "train",
                self._arrays(),
                shuffle=True,
                shuffle_buffer=self.loader_settings["shuffle_buffer"],
                repeat=True,
                skip_batches=consumed,
            )
        )

    def _announce(self) -> None:
        cfg = self.policy_config.models
        streams = ", ".join(f"{s.name} {s.tokens}x{s.dim}" for s in cfg.aggregator.streams)
        counts = {split: len(self.cache.members(split)) for split in ("train", "val")}
        source = "cache" if self.source == CACHED else f"teacher at {self.paths.teacher}"
        reads = (
            "no streams (state and instruction only)"
            if self.source is None
            else f"streams per frame: {streams} (one-step features from the {source})"
        )
        if self.mode == "shortcut":
            reads += (
                f"; train clips' foresight out-of-sample from {len(self.fold_decouplers)} "
                "cross-fitted decoupler folds"
                if self.fold_decouplers
                else "; foresight in-sample (no cross-fitted folds, or train_policy.cross_fit=false)"
            )
        tqdm.write(
            f"train-policy: mode {self.mode}; {reads}; chunks "
            f"{cfg.action_head.horizon}x{cfg.action_head.action_dim}\n"
            f"train-policy: {counts['train']} train / {counts['val']} val clips; "
            f"{self.args.steps} steps of {self.args.batch_size} clips x "
            f"{self.loop.accelerator.num_processes} process(es)"
        )

    def loss(self, model, batch: dict[str, Any], micro_step: int) -> tuple[torch.Tensor, dict]:
        """The diffusion noise and timesteps come from a generator seeded by (run seed, process,
        micro step), so a resumed run draws what the uninterrupted one did."""
        generator = keyed_generator(
            self.config.run.seed, "policy-train", self.loop.accelerator.process_index, micro_step
        )
        inputs = self._inputs(batch, cross_fit=True)
        with self.loop.accelerator.autocast():
            return model(*inputs, generator), {}

    def resume_record(self) -> dict[str, Any]:
        return {"key": self.key}

    # ------------------------------------------------------------------------------- finish

    @torch.no_grad()
    def _validate(self, net: PolicyNet) -> dict[str, float]:
        """Denoising loss and sampled-chunk error (MSE of unnormalised actions, and of the
        normalised ones) on validation clips, with a fixed generator."""
        net.eval()
        generator = keyed_generator(self.config.run.seed, "policy-val", device=self.device)
        loader = self._loader("val", self._arrays(), shuffle=False, max_clips=self.args.val_clips)
        sums = {"loss": 0.0, "action_mse": 0.0, "action_mse_normalized": 0.0}
        clips = 0
        for batch in loader:
            streams, text, state, actions = self._inputs(batch)
            cond = net.condition(streams, text, state)
            normalized = net.action_normalizer.normalize(actions)
            count = actions.shape[0]
            sums["loss"] += net.head.loss(normalized, cond, generator).item() * count
            sample = net.head.sample(cond, generator)
            predicted = net.action_normalizer.unnormalize(sample)
            sums["action_mse"] += (predicted - actions).pow(2).mean().item() * count
            sums["action_mse_normalized"] += (sample - normalized).pow(2).mean().item() * count
            clips += count
        return {f"val/{k}": v / max(clips, 1) for k, v in sums.items()} | {"val/clips": clips}

    def export(self, net: PolicyNet, step: int, into: Path) -> None:
        results = self._validate(net)
        self.loop.log(step, results)
        if not self.loop.is_main:
            return
        net.save_pretrained(into)
        history = self.loop.history
        record = {
            "key": self.key,
            "mode": self.mode,
            "steps": step,
            "onestep": self.source,  # None: blind reads no one-step features
            "ema": self.args.use_ema,
            "cache": str(self.cache.root),
            "final_train_loss": history[-1] if history else None,
            **{k.replace("/", "_"): v for k, v in results.items()},
        }
        (into / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
        tqdm.write(
            f"train-policy: {self.mode} policy -> {self.paths.output} (val loss "
            f"{results['val/loss']:.4f}, action MSE {results['val/action_mse']:.4g} on "
            f"{results['val/clips']} clips)"
        )


def train_policy(config: Config, out_dir: str | Path | None = None) -> Path:
    """`svam train-policy`: train the policy of `train_policy.mode` on the run's teacher cache;
    returns the policy directory (default `runs/<name>/policy/<mode>`)."""
    if out_dir is not None:
        config.train_policy.output_dir = str(out_dir)
    paths = policy_paths(config)
    with output_lock(paths.output):
        return PolicyTrainer(config, paths).train()


def evaluated_kinds(config: Config) -> list[str]:
    """The policy kinds `eval.modes` runs (train_policy.mode when no modes are set)."""
    from svam.policy.configuration_policy import parse_mode

    modes = config.eval.modes or [config.train_policy.mode]
    return list(dict.fromkeys(parse_mode(mode).policy_kind for mode in modes))


def _for_kind(config: Config, kind: str) -> Config:
    if config.train_policy.output_dir and len(evaluated_kinds(config)) > 1:
        raise PolicyTrainError(
            f"train_policy.output_dir={config.train_policy.output_dir} cannot hold the "
            f"{', '.join(evaluated_kinds(config))} policies eval.modes needs: leave it unset"
        )
    kind_config = copy.deepcopy(config)
    kind_config.train_policy.mode = kind
    return kind_config


def train_evaluated_policies(config: Config) -> list[Path]:
    """`svam demo`'s policy stage: train (or find trained) every policy kind the evaluation's
    modes run."""
    trained = []
    for kind in evaluated_kinds(config):
        kind_config = _for_kind(config, kind)
        if is_policy_trained(kind_config):
            tqdm.write(f"train-policy: {kind} policy already trained for this config, skipped")
            trained.append(policy_paths(kind_config).output)
        else:
            trained.append(train_policy(kind_config))
    return trained


def are_evaluated_policies_trained(config: Config) -> bool:
    return all(is_policy_trained(_for_kind(config, k)) for k in evaluated_kinds(config))
