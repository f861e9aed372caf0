"""`svam eval`: the latency–fidelity report of every foresight mode, measured side by side.

For each mode of `eval.modes` (its policy: the run's `policy/<kind>/`, see `ForesightMode`):

1. task success in Meta-World closed loop (`svam.eval.metaworld`): `eval.episodes_per_task`
   episodes per task at seeds never used for collection, the same (task, seed) episodes and noise
   keys in every mode (so modes compare pair by pair), in lockstep batches of `eval.batch_size`
   in `eval.workers` processes;
2. foresight fidelity against the cache's N-step targets under the cache's noise and under fresh
   noise, and action error, on test clips (`svam.eval.measure.fidelity`), with the teacher's
   sampling floor;
3. FLOPs of a control step by part, here and at the published size (`svam.flops`);
4. control-step latency, all modes interleaved in one loop, threads fixed, with this machine's
   measured matmul peak.

Each measurement is stored under `<eval>/` with the key of what it depends on (the policy's
config and weights, the settings, the cache, the machine for latency), so a rerun redoes only
what changed; the latency of every mode is re-measured together whenever one mode changes.
`report.md`, `report.json` and the PNG plots (`svam.eval.report`) are rebuilt from them every
time, and the figures go to tensorboard (`<run>/tb/eval/`). A mode whose policy is missing is
reported as missing, not dropped.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from svam.atomic import write_json_atomic
from svam.config import Config
from svam.distill.fidelity import NO_WORLD_DEPTH
from svam.eval.timing import CONTROL_PERIOD_S, delay_steps, latency_profile
from svam.hashing import file_digest, json_digest
from svam.locking import output_lock
from svam.policy.configuration_policy import ForesightMode, parse_mode
from svam.policy.configuration_train import mode_dirname
from svam.rundir import RunDir
from svam.serialization import WEIGHTS_NAME

REPORT_JSON = "report.json"
FIDELITY_VERSION = (
    "fidelity/2: test split, cache and fresh noise, skill, depth vs teacher and world"
)
"""Part of the key of stored fidelity: results of an older measurement are measured again."""


class EvalError(ValueError):
    """An evaluation that cannot run; one line naming the key or file."""


@dataclass(frozen=True)
class Target:
    """A mode to evaluate and the policy directory it runs."""

    foresight: ForesightMode
    policy: Path

    @property
    def mode(self) -> str:
        return self.foresight.name

    @property
    def missing(self) -> str | None:
        """Why the mode cannot be evaluated, or None."""
        if (self.policy / "config.json").is_file() and (self.policy / WEIGHTS_NAME).is_file():
            return None
        return (
            f"no policy at {self.policy} (run `svam train-policy "
            f"train_policy.mode={self.foresight.policy_kind}`)"
        )


# ---------------------------------------------------------------------------------- settings


def targets(config: Config) -> list[Target]:
    args, run = config.eval, RunDir.from_config(config)
    if args.policy:
        path = Path(args.policy)
        try:
            kind = json.loads((path / "config.json").read_text())["mode"]
        except (OSError, ValueError, KeyError) as exc:
            raise EvalError(f"eval.policy: {path} is not a policy directory ({exc})") from exc
        modes = [parse_mode(m) for m in args.modes or [kind]]
        for foresight in modes:
            if foresight.policy_kind != kind:
                raise EvalError(
                    f"eval.modes: '{foresight.name}' needs a {foresight.policy_kind} policy, but "
                    f"eval.policy={path} is a {kind} policy"
                )
        return [Target(foresight, path) for foresight in modes]
    modes = [parse_mode(m) for m in args.modes or [config.train_policy.mode]]
    return [Target(f, run.policy / mode_dirname(f.policy_kind)) for f in modes]


def settings_of(config: Config) -> dict[str, Any]:
    """Tasks, seeds and horizon of the closed-loop episodes, from the eval and collect keys."""
    from svam.envs.metaworld import check_tasks

    args, collect = config.eval, config.collect
    tasks = list(args.tasks or collect.tasks)
    check_tasks(tasks, "eval.tasks")
    used = range(collect.seed_start, collect.seed_start + collect.episodes_per_task)
    first = args.seed_start if args.seed_start is not None else used.stop
    seeds = range(first, first + args.episodes_per_task)
    if seeds.start < used.stop and used.start < seeds.stop:
        raise EvalError(
            f"eval.seed_start={first}: seeds {seeds.start}..{seeds.stop - 1} overlap the "
            f"collection's seeds {used.start}..{used.stop - 1}; evaluate on seeds >= {used.stop}"
        )
    return {
        "tasks": tasks,
        "seeds": list(seeds),
        "max_steps": args.max_steps or collect.max_steps,
        "execute_actions": args.execute_actions,
        "camera": collect.camera,
        "image_size": collect.image_size,
    }


def _file_digest(path: Path) -> str | None:
    return file_digest(path) if path.is_file() else None


def _policy_key(config: Config, target: Target) -> str | None:
    """What a mode's results depend on besides the settings; None when the policy is missing."""
    if target.missing:
        return None
    return json_digest(
        [
            target.mode,
            _file_digest(target.policy / "config.json"),
            _file_digest(target.policy / WEIGHTS_NAME),
            config.eval.teacher,
            config.eval.decouplers,
            config.run.seed,
        ]
    )


def machine() -> dict[str, Any]:
    import torch

    processor = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                processor = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "platform": platform.platform(),
        "processor": processor,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else processor,
    }
    return {**info, "fingerprint": json_digest(info)}


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def evaluate_dir(config: Config) -> Path:
    """Where `svam eval` writes: eval.output_dir, else the run directory's eval/."""
    return Path(config.eval.output_dir or RunDir.from_config(config).eval)


def _read(path: Path, key: str) -> dict | None:
    """The stored measurement at `path` when it was made for `key`."""
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return stored if stored.get("key") == key else None


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data)


# ------------------------------------------------------------------------------------- plan


class Evaluation:
    """One `svam eval` run: its targets, their keys, the stored measurements it reuses."""

    def __init__(self, config: Config):
        try:
            config.eval.validate()
        except ValueError as exc:
            raise EvalError(str(exc)) from exc
        self.config, self.args = config, config.eval
        self.settings = settings_of(config)
        self.targets = targets(config)
        self.root = evaluate_dir(config)
        self.machine = machine()
        self.device = _device(self.args.device)
        self.policy_keys = {t.mode: _policy_key(config, t) for t in self.targets}
        self.ok = [t for t in self.targets if self.policy_keys[t.mode]]
        self.record = self._first_record()
        self.cache = Path(self.record["cache"]) if self.record.get("cache") else None
        self.baselines = self._baselines_path()

    def _first_record(self) -> dict[str, Any]:
        """The first evaluated policy's `config.json`: every policy of a run records the same
        cache, schedule (feature_steps) and encoders."""
        for target in self.ok:
            return json.loads((target.policy / "config.json").read_text())
        return {}

    def _baselines_path(self) -> Path:
        """Distill's fitted baselines, published beside the decouplers; a decouplers directory
        without them was written by an older svam (no decouplers: foresight is not measured)."""
        from svam.distill.train import BASELINES_NAME

        run = RunDir.from_config(self.config)
        decouplers = Path(self.args.decouplers or self.config.distill.output_dir or run.decouplers)
        path = decouplers / BASELINES_NAME
        if decouplers.is_dir() and not path.is_file():
            raise EvalError(
                f"{path}: missing (decouplers written by an older svam): re-run `svam distill`"
            )
        return path

    def mode_dir(self, target: Target) -> Path:
        return self.root / mode_dirname(target.mode)

    def rollouts_key(self, target: Target, profile: dict | None) -> str:
        timed = [] if profile is None else [self.args.timing, profile[target.mode]["delay_steps"]]
        return json_digest(
            [self.policy_keys[target.mode], self.settings, self.args.videos_per_task, *timed]
        )

    def timing_profile(self, latency: dict | None, published: dict | None) -> dict | None:
        """Under sync/async timing, each mode's {"ms", "source", "delay_steps"} from the latency
        profile (`svam.eval.timing`): eval.latency_ms, the published-size FLOPs over
        eval.device_tflops, or the latency record of this run; None under wait."""
        if self.args.timing == "wait":
            return None
        measured = {m: v["median"] for m, v in (latency or {}).get("latency", {}).items()}
        totals = {m: (v or {}).get("total") for m, v in (published or {}).items()}
        try:
            profile = latency_profile(
                [t.mode for t in self.ok],
                measured,
                self.args.latency_ms,
                self.args.device_tflops,
                totals,
            )
        except ValueError as exc:
            raise EvalError(str(exc)) from exc
        for entry in profile.values():
            entry["delay_steps"] = delay_steps(entry["ms"])
        return profile

    def stored_profile(self) -> dict | None:
        """`timing_profile` from the stored latency and published-FLOP records."""
        if self.args.timing == "wait":
            return None
        published = _read(self.root / "flops_published.json", self.published_key())
        return self.timing_profile(
            _read(self.root / "latency.json", self.latency_key()),
            published["modes"] if published else None,
        )

    def fidelity_key(self, target: Target) -> str:
        return json_digest([self.policy_keys[target.mode], self._fidelity_inputs()])

    def _fidelity_inputs(self) -> list[Any]:
        manifest = self.cache / "manifest.json" if self.cache else Path("-")
        return [
            FIDELITY_VERSION,
            _file_digest(manifest),
            _file_digest(self.baselines),
            self.args.fidelity_clips,
            self.args.fidelity_batch,
        ]

    def floor_key(self, policy_key: str | None) -> str:
        return json_digest([policy_key, self.record.get("feature_steps"), self._fidelity_inputs()])

    def flops_key(self, target: Target) -> str:
        from svam.flops import COUNTER

        return json_digest([self.policy_keys[target.mode], self.settings["image_size"], COUNTER])

    def published_key(self) -> str:
        from svam.config import load_config
        from svam.flops import COUNTER, PUBLISHED_CONFIG

        modes = [t.mode for t in self.ok]
        return json_digest([modes, COUNTER, json_digest(load_config(PUBLISHED_CONFIG))])

    def latency_key(self) -> str:
        return json_digest(
            [
                [self.policy_keys[t.mode] for t in self.ok],
                self.args.latency_steps,
                self.args.warmup_steps,
                self.args.threads,
                self.device,
                self.machine["fingerprint"],
            ]
        )

    def report_key(self) -> str:
        """Everything the report depends on: is_evaluated compares it."""
        return json_digest(
            [
                self.policy_keys,
                self.settings,
                self._rollouts_keys() if self.args.rollouts else None,
                [self.fidelity_key(t) for t in self.ok],
                self.published_key(),
                self.latency_key(),
                self.args.tensorboard,
            ]
        )

    # ------------------------------------------------------------------------- measuring

    def load(self, target: Target):
        from svam.policy.modeling_policy import ShortcutPolicy

        return ShortcutPolicy.from_pretrained(
            target.policy,
            mode=target.mode,
            teacher=self.args.teacher,
            decouplers=self.args.decouplers,
            device=self.device,
        )

    def _rollouts_keys(self) -> list[str]:
        profile = self.stored_profile()
        return [self.rollouts_key(t, profile) for t in self.ok]

    def check_rollouts(self) -> None:
        """Refuse closed-loop episodes of policies that cannot act in Meta-World (trained on data
        imported from another robot), before anything is measured."""
        from svam.flops import ACTION_DIM

        for target in self.ok:
            head = json.loads((target.policy / "config.json").read_text())["models"]["action_head"]
            if head["action_dim"] != ACTION_DIM:
                raise EvalError(
                    f"{target.policy}: the policy acts in {head['action_dim']} dims, Meta-World's "
                    f"robot in {ACTION_DIM}: closed-loop success needs episodes of Meta-World "
                    "(for data imported from another robot set eval.rollouts=false)"
                )

    def run_rollouts(self, profile: dict | None) -> dict[str, dict]:
        """Every mode's closed-loop episodes under eval.timing (`profile`: `timing_profile`)."""
        from tqdm.auto import tqdm

        from svam.eval.metaworld import Episode, rollouts

        done, todo = {}, []
        for target in self.ok:
            key = self.rollouts_key(target, profile)
            stored = _read(self.mode_dir(target) / "rollouts.json", key)
            if stored is not None:
                done[target.mode] = stored
            else:
                todo.append(target)
        if not todo:
            return done
        for target in todo:
            shutil.rmtree(self.mode_dir(target) / "videos", ignore_errors=True)
        episodes = [
            Episode(t.mode, str(t.policy), task, seed, index < self.args.videos_per_task)
            for t in todo
            for task in self.settings["tasks"]
            for index, seed in enumerate(self.settings["seeds"])
        ]
        per_mode = len(self.settings["tasks"]) * len(self.settings["seeds"])
        outcomes: dict[str, list] = defaultdict(list)
        options = {
            "teacher": self.args.teacher,
            "decouplers": self.args.decouplers,
            "device": self.device,
            "threads": self.args.threads,
            "run_seed": self.config.run.seed,
        }
        settings = dict(self.settings)
        if profile is not None:
            settings["timing"] = self.args.timing
            settings["delays"] = {mode: entry["delay_steps"] for mode, entry in profile.items()}
        stream = rollouts(
            episodes,
            settings,
            self.args.workers,
            batch_size=self.args.batch_size,
            **options,
        )
        for outcome in tqdm(stream, total=len(episodes), desc="eval: episodes"):
            mode = outcome.episode.mode
            outcomes[mode].append(outcome)
            if len(outcomes[mode]) == per_mode:  # a mode is complete: store it now
                target = next(t for t in todo if t.mode == mode)
                key = self.rollouts_key(target, profile)
                done[mode] = self._store_rollouts(target, outcomes.pop(mode), key)
        return done

    def _store_rollouts(self, target: Target, outcomes: list, key: str) -> dict:
        import imageio.v2 as imageio

        videos_dir = self.mode_dir(target) / "videos"
        videos_dir.mkdir(parents=True, exist_ok=True)
        tasks, videos = {}, []
        for task in self.settings["tasks"]:
            mine = sorted(
                (o for o in outcomes if o.episode.task == task), key=lambda o: o.episode.seed
            )
            for o in mine:
                if o.frames is not None:
                    result = "success" if o.success else "failure"
                    name = f"{task}-seed{o.episode.seed}-{result}.gif"
                    imageio.mimsave(videos_dir / name, o.frames, duration=0.05, loop=0)
                    videos.append(str(videos_dir.relative_to(self.root) / name))
            successes = sum(o.success for o in mine)
            tasks[task] = {
                "episodes": len(mine),
                "successes": successes,
                "rate": successes / len(mine),
                "seeds": [o.episode.seed for o in mine],
                "outcomes": [o.success for o in mine],
                "mean_steps": float(np.mean([o.steps for o in mine])),
            }
        episodes = sum(t["episodes"] for t in tasks.values())
        successes = sum(t["successes"] for t in tasks.values())
        stored = {
            "key": key,
            "mode": target.mode,
            "episodes": episodes,
            "successes": successes,
            "rate": successes / episodes,
            "tasks": tasks,
            "videos": videos,
        }
        _write(self.mode_dir(target) / "rollouts.json", stored)
        return stored

    @cached_property
    def teacher_cache(self):
        """The teacher cache, opened (and its shards verified) once per evaluation."""
        from svam.data.teacher_cache import TeacherCache

        return TeacherCache.open(self.cache)

    def check_cache(self) -> None:
        """Refuse a cache without test clips (made before the test split existed): every
        measured number of the report comes from the test split. Refuse a policy, or a teacher
        setting of the config, whose teacher runtime is not the one that made the cache: the
        policies run with the runtime they record, which must be the cache's."""
        from svam.teachers.configuration_teacher import TeacherRuntime

        if self.cache is None:
            return
        cache = self.teacher_cache
        runtime = cache.runtime_for(self.config.teacher, EvalError)
        for target in self.ok:
            record = json.loads((target.policy / "config.json").read_text())
            conflict = TeacherRuntime.from_record(record.get("teacher_runtime")).conflict(runtime)
            if conflict:
                raise EvalError(
                    f"the {target.mode} policy at {target.policy} was trained with {conflict} "
                    f"({cache.manifest_path}): retrain it on that cache with `svam train-policy`"
                )
        try:
            clips = self.teacher_cache.members("test")
        except ValueError as exc:
            raise EvalError(f"{self.cache}: {exc}") from exc
        if not clips:
            raise EvalError(
                f"{self.cache / 'manifest.json'}: the teacher cache holds no test clips (made "
                "before svam held test episodes out): rebuild it with `svam cache-teachers` "
                "(and rerun `svam distill` and `svam train-policy` on it)"
            )

    def test_batches(self, arrays: list[str]) -> list[dict]:
        """Test clips of the teacher cache (evenly over the split, at most eval.fidelity_clips),
        carrying the current frame, state, actions and `arrays`."""
        from svam.data.teacher_cache import CURRENT, teacher_cache_loader

        loader = teacher_cache_loader(
            self.teacher_cache,
            "test",
            batch_size=self.args.fidelity_batch,
            arrays=[CURRENT, "state", "actions", *arrays],
            shuffle=False,
            max_clips=self.args.fidelity_clips,
        )
        return list(loader)

    def measure(self, policies: dict[str, Any]) -> dict[str, Any]:
        """Fidelity, FLOPs (here and at the published size) per mode, the sampling floor and the
        latency record, each reused when stored."""
        from tqdm.auto import tqdm

        from svam import flops as flop_count
        from svam.eval import measure

        fidelity, flops = {}, {}
        clips: tuple[list[dict], Any] | None = None

        def test_clips() -> tuple[list[dict], Any]:
            nonlocal clips
            if clips is None:
                clips = self._test_clips(policies)
            return clips

        for target in tqdm(self.ok, desc="eval: fidelity and FLOPs", leave=False):
            policy = policies[target.mode]
            path = self.mode_dir(target) / "fidelity.json"
            stored = _read(path, self.fidelity_key(target))
            if stored is None and self.cache is not None:
                batches, reference = test_clips()
                result = measure.fidelity(policy, batches, reference, self.config.run.seed)
                stored = {"key": self.fidelity_key(target), **result}
                _write(path, stored)
            fidelity[target.mode] = stored
            path = self.mode_dir(target) / "flops.json"
            stored = _read(path, self.flops_key(target))
            if stored is None:
                counted = flop_count.control_step_flops(policy, self.observation)
                stored = {"key": self.flops_key(target), **counted}
                _write(path, stored)
            flops[target.mode] = stored
        floor = self._sampling_floor(policies, fidelity, test_clips)
        path = self.root / "flops_published.json"
        published = _read(path, self.published_key())
        if published is None:
            counted = flop_count.published_step_flops([t.mode for t in self.ok])
            published = {"key": self.published_key(), "modes": counted}
            _write(path, published)
        path = self.root / "latency.json"
        record = _read(path, self.latency_key())
        if record is None:
            device = next(iter(policies.values())).device
            record = {
                "key": self.latency_key(),
                "latency": measure.latency(
                    policies, self.observation, self.args.latency_steps, self.args.warmup_steps
                ),
                "matmul_peak": measure.matmul_peak(device),
                "threads": self.args.threads,
                "measured": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            _write(path, record)
        return {
            "fidelity": fidelity,
            "flops": flops,
            "published": published["modes"],
            "floor": floor,
            "latency": record,
        }

    def _test_clips(self, policies: dict[str, Any]) -> tuple[list[dict], Any]:
        """(test batches with their depth truths, the `FidelityReference`, or None when distill's
        baselines are missing: foresight is then not measured)."""
        from svam.eval.measure import FidelityReference

        reference = None
        if self.baselines.is_file():
            encoders = [p.frozen.geometric for p in policies.values() if p.frozen.geometric]
            cache = self.teacher_cache
            grid = int(round(cache.manifest["dims"]["geometric"][0] ** 0.5))
            try:
                reference = FidelityReference.load(
                    self.baselines, grid, encoders[0] if encoders else None, cache.has
                )
            except (ValueError, KeyError) as exc:
                raise EvalError(f"{self.baselines}: {exc}") from exc
        batches = self.test_batches(reference.arrays if reference else [])
        if reference is not None:
            reference.add_truth(batches)
        return batches, reference

    def _sampling_floor(
        self, policies: dict[str, Any], fidelity: dict, clips: Callable[[], tuple]
    ) -> dict | None:
        """The teacher's own sampling spread: its full schedule under fresh noise against the
        targets it drew under the cache's noise (`multistep:N`'s fresh-noise foresight, measured
        on the multistep policy's frozen teacher and encoders); None without a multistep
        policy, a cache or distill's baselines."""
        from svam.eval import measure
        from svam.policy.modeling_policy import ShortcutPolicy

        full = f"multistep:{self.record.get('feature_steps')}"
        if (fidelity.get(full) or {}).get("foresight"):
            return fidelity[full]["foresight"]["fresh_noise"]
        generating = [t for t in self.ok if t.foresight.generates]
        if not generating or self.cache is None or not self.baselines.is_file():
            return None
        target = generating[0]
        path = self.root / "sampling_floor.json"
        key = self.floor_key(self.policy_keys[target.mode])
        stored = _read(path, key)
        if stored is None:
            loaded = policies[target.mode]
            policy = ShortcutPolicy(loaded.config, loaded.net, loaded.frozen, full)
            batches, reference = clips()
            result = measure.fidelity(
                policy, batches, reference, self.config.run.seed, ("fresh_noise",), False
            )
            stored = {"key": key, "floor": (result["foresight"] or {}).get("fresh_noise")}
            _write(path, stored)
        return stored["floor"]

    @cached_property
    def observation(self) -> dict[str, Any]:
        """The input of the latency and FLOP measurements: the first test clip's current frame,
        instruction and state (a blank frame without a cache)."""
        import torch

        if self.cache is not None:
            batch = self.test_batches([])[0]
            frames, state = batch["current"][:1], batch["state"][:1, 0].float()
            instruction = batch["instruction"][0]
        else:
            size = self.settings["image_size"]
            frames = torch.zeros(1, 3, size, size, dtype=torch.uint8)
            state, instruction = torch.zeros(1, 4), "reach the goal"
        return {"frames": frames, "instruction": instruction, "state": state}

    # ---------------------------------------------------------------------------- report

    def about(self, target: Target, full_steps: int | None) -> str:
        foresight, n = target.foresight, full_steps or "N"
        if foresight.kind == "blind":
            return "state and instruction only: no teacher, no foresight (does vision matter?)"
        if foresight.kind == "onestep":
            return "the teacher's one-step features only, no foresight (VPP)"
        if foresight.kind == "shortcut":
            return "one-step features + decoupler foresight (S-VAM): one teacher pass"
        schedule, steps = foresight.sampling(full_steps or 1)
        if foresight.kind == "partial":
            return (
                f"the {n}-step sampling stopped after {steps} steps, its clean estimate decoded "
                "and encoded (partial denoising, as LingBot-VA)"
            )
        full = " (the cache's full schedule)" if schedule == full_steps else ""
        return f"the teacher generates with {schedule} steps{full}; DINOv2 / DA3 read the frames"

    def teacher_skill(self) -> dict | None:
        """The cache's teacher's own foresight against copying the current frame, as
        `svam train-teacher` scored it on test clips (`svam.teachers.skill`); None when the
        teacher records none or is not the one that made the cache."""
        from svam.teachers.modeling_teacher import read_teacher_record

        config = self.config
        path = Path(self.args.teacher or config.cache.teacher or RunDir.from_config(config).teacher)
        try:
            record = read_teacher_record(path)
        except (OSError, ValueError):
            return None
        made_cache = self.cache is not None and record.get("fingerprint") == (
            self.teacher_cache.manifest.get("teacher_fingerprint")
        )
        return record.get("skill") if made_cache else None

    def report(self, rollouts: dict, measured: dict, profile: dict | None) -> dict:
        full_steps = self.record.get("feature_steps")
        latency, flops = measured["latency"], measured["flops"]
        peak = latency["matmul_peak"]["flops_per_s"] if latency else None
        modes = {}
        for target in self.targets:
            entry: dict[str, Any] = {
                "kind": target.foresight.kind,
                "about": self.about(target, full_steps),
                "policy": str(target.policy),
            }
            reason = target.missing
            if reason:
                modes[target.mode] = {"status": "missing", "reason": reason, **entry}
                continue
            mode = target.mode
            head = json.loads((target.policy / "config.json").read_text())["models"]["action_head"]
            entry["action_head"] = {"type": head["type"], "steps": head["num_inference_steps"]}
            timing = latency["latency"][mode] if latency else None
            count = flops.get(mode)
            achieved = count["total"] / (timing["median"] / 1000) if count and timing else None
            fid = measured["fidelity"].get(mode) or {}
            success = rollouts.get(mode)
            modes[mode] = {
                "status": "ok",
                **entry,
                "latency_ms": timing,
                "flops": {"total": count["total"], "parts": count["parts"]} if count else None,
                "flops_published": measured["published"].get(mode),
                "achieved_flops_per_s": achieved,
                "peak_fraction": achieved / peak if achieved and peak else None,
                "foresight": fid.get("foresight"),
                "action": fid.get("action"),
                "success": {k: success[k] for k in ("episodes", "successes", "rate", "tasks")}
                if success
                else None,
                "timing": {"timing": self.args.timing, **(profile or {}).get(mode, {})},
                "videos": success["videos"] if success else [],
            }
        machine = {
            **self.machine,
            "device": self.device,
            "threads": self.args.threads,
            "matmul_peak_flops": peak,
        }
        return {
            "run": self.config.run.name,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "key": self.report_key(),
            "machine": machine,
            "config_fingerprint": json_digest(self.config),
            "settings": {
                **{k: self.settings[k] for k in ("tasks", "seeds", "max_steps", "execute_actions")},
                "latency_steps": self.args.latency_steps,
                "fidelity_clips": self.args.fidelity_clips,
                "feature_steps": full_steps,
                "workers": self.args.workers,
                "batch_size": self.args.batch_size,
                "split": "test",
                "cache": str(self.cache) if self.cache else None,
                "timing": self.args.timing,
                "control_period_ms": CONTROL_PERIOD_S * 1000,
            },
            "sampling_floor": measured["floor"],
            "teacher_skill": self.teacher_skill(),
            "modes": modes,
            "notes": self.notes(measured, full_steps),
        }

    def notes(self, measured: dict, full_steps: int | None) -> list[str]:
        """What a reader needs to read the numbers right."""
        notes = []
        encoders = self.record.get("encoders", {})
        random = [
            k for k in ("semantic", "geometric") if encoders and not encoders.get(f"{k}_weights")
        ]
        if random:
            notes.append(
                f"The {' and '.join(random)} encoder(s) are random-init (encoders.*_weights null): "
                "their tokens carry little about the scene, so foresight skills say how well a "
                "mode tracks the teacher's random features, not the scene; point the encoders at "
                "real weights (configs/svd-xt.yaml) for meaningful values."
            )
        generating = [t.mode for t in self.targets if t.foresight.generates]
        if generating:
            notes.append(
                f"{', '.join(f'`{m}`' for m in generating)} run the one multistep policy, trained "
                f"on the cache's {full_steps or 'N'}-step foresight; only inference changes."
            )
        notes.append(
            f"Fidelity is measured on the cache's test clips (up to {self.args.fidelity_clips}), "
            "which no stage fits or selects on, against per-channel statistics and depth probes "
            "fitted on the train split. Under the cache's noise keys "
            f"`multistep:{full_steps or 'N'}` regenerates the cached targets (skill 1 up to "
            "float16 rounding: a check of the pipeline); under fresh noise its distance is the "
            "teacher's own sampling spread, the floor stated as the sampling floor row."
        )
        if self.cache is not None and not self.teacher_cache.has("depth"):
            notes.append(f"Foresight depth: {NO_WORLD_DEPTH}.")
        if self.cache is not None and not self.baselines.is_file():
            notes.append(
                f"Foresight fidelity is not measured: no {self.baselines} (run `svam distill`)."
            )
        notes.append(
            f"Latency and FLOPs are measured in this process with {self.args.threads or 'default'} "
            f"torch thread(s), the modes interleaved step by step at batch 1; the closed-loop "
            f"episodes ran in lockstep batches of {self.args.batch_size} in {self.args.workers} "
            "process(es) and their timings are not used. FLOPs at the published size are counted "
            "on the meta device with configs/svd-xt.yaml's models (svam/flops.py)."
        )
        return notes


def is_evaluated(config: Config) -> bool:
    """Whether the report exists for the current policies, settings and machine."""
    try:
        evaluation = Evaluation(config)
        stored = json.loads((evaluation.root / REPORT_JSON).read_text())
        return stored.get("key") == evaluation.report_key()
    except (OSError, ValueError):
        return False


def evaluate(config: Config, out_dir: str | Path | None = None) -> Path:
    """`svam eval`: measure every configured mode and write the report; returns report.md."""
    from svam.eval.measure import fixed_threads
    from svam.eval.report import headline_table, write_report

    if out_dir is not None:
        config.eval.output_dir = str(out_dir)
    with output_lock(evaluate_dir(config)):
        evaluation = Evaluation(config)
        for target in evaluation.targets:
            if target.missing:
                print(f"eval: {target.mode}: missing: {target.missing}")
        if not evaluation.ok:
            raise EvalError(f"eval: no mode has a policy: {evaluation.targets[0].missing}")
        run = RunDir.from_config(config)
        run.save_config(config, "eval")
        evaluation.root.mkdir(parents=True, exist_ok=True)
        evaluation.check_cache()
        if config.eval.rollouts:
            evaluation.check_rollouts()
        with fixed_threads(config.eval.threads):  # first: sync/async timing needs the latency
            policies = {t.mode: evaluation.load(t) for t in evaluation.ok}
            measured = evaluation.measure(policies)
        del policies
        profile = evaluation.timing_profile(measured["latency"], measured["published"])
        rollouts = evaluation.run_rollouts(profile) if config.eval.rollouts else {}
        report = evaluation.report(rollouts, measured, profile)
        tensorboard = run.tb / "eval" if config.eval.tensorboard else None
        path = write_report(report, evaluation.root, tensorboard)
        print(f"eval: report -> {path}")
        print(headline_table(json.loads((evaluation.root / REPORT_JSON).read_text())))
        return path
