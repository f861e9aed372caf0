"""`svam eval` (Meta-World): closed-loop rollouts of trained policies on unseen seeds.

For each evaluated policy (one per foresight mode) and each task, `eval.episodes_per_task`
episodes run at seeds from `eval.seed_start` on (default: the first seed after those
`svam collect` used, so no evaluated scene was in the training data). Control is receding
horizon: at each control step the policy maps the rendered frame, the instruction and the
proprioception to a chunk, and the first `eval.execute_actions` actions are executed. An episode
succeeds when Meta-World reports success at any step within `eval.max_steps`.

Reported per mode (`<eval>/<mode>/results.json` and `results.md`): success rate per task and
overall with episode counts; the latency of one control step (observation in, chunk out, batch
1) as median, p95 and mean; the first `eval.videos_per_task` rollouts of each task as GIFs under
`videos/`. Episodes run one after another in this process: the policy's models are loaded once,
and on a 2-core machine torch already uses the cores a second process would need.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from policy.configuration_train import mode_dirname
from svam.config import Config, to_dict
from svam.rundir import RunDir

RESULTS_NAME = "results.json"


class EvalError(ValueError):
    """An evaluation that cannot run; one line naming the key or file."""


@dataclass(frozen=True)
class Target:
    mode: str
    policy: Path


def _targets(config: Config) -> list[Target]:
    args, run = config.eval, RunDir.from_config(config)
    if args.policy:
        path = Path(args.policy)
        try:
            mode = json.loads((path / "config.json").read_text())["mode"]
        except (OSError, ValueError, KeyError) as exc:
            raise EvalError(f"eval.policy: {path} is not a policy directory ({exc})") from exc
        return [Target(mode, path)]
    modes = args.modes or [config.train_policy.mode]
    return [Target(mode, run.policy / mode_dirname(mode)) for mode in modes]


def _settings(config: Config) -> dict[str, Any]:
    """Tasks, seeds and horizon of the evaluation, resolved from the eval and collect keys."""
    args, collect = config.eval, config.collect
    from svam.envs.metaworld import check_tasks

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


def _key(config: Config, target: Target, settings: dict[str, Any]) -> str:
    weights = target.policy / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else None
    parts = {
        "settings": settings,
        "weights": digest,
        "overrides": [config.eval.teacher, config.eval.decouplers],
        "videos": config.eval.videos_per_task,
        "seed": config.run.seed,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _output(config: Config) -> Path:
    return Path(config.eval.output_dir or RunDir.from_config(config).eval)


def is_evaluated(config: Config) -> bool:
    """Whether every configured policy already has results for these settings."""
    try:
        settings = _settings(config)
        for target in _targets(config):
            results = _output(config) / mode_dirname(target.mode) / RESULTS_NAME
            if json.loads(results.read_text()).get("key") != _key(config, target, settings):
                return False
        return True
    except (OSError, ValueError):
        return False


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run_episode(policy, task: str, seed: int, settings: dict, run_seed: int, record: bool):
    """One closed-loop episode: (success, env steps, chunk latencies in s, frames or None)."""
    import torch

    from svam.envs.metaworld import MetaWorldEnv
    from svam.seeding import keyed_generator

    generator = keyed_generator(run_seed, "eval", task, seed)
    latencies, frames = [], []
    success, steps = False, 0
    with MetaWorldEnv(task, seed, settings["camera"], settings["image_size"]) as env:
        obs = env.reset()
        while steps < settings["max_steps"] and not success:
            rgb, _ = env.render()
            if record:
                frames.append(rgb)
            image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]
            state = torch.from_numpy(env.proprio(obs))[None]
            start = time.perf_counter()
            chunk = policy.predict(image, env.instruction, state, generator=generator)
            if chunk.is_cuda:
                torch.cuda.synchronize()
            latencies.append(time.perf_counter() - start)
            for action in chunk[0, : settings["execute_actions"]].cpu().numpy():
                obs, _, done = env.step(action)
                steps += 1
                success = success or done
                if success or steps >= settings["max_steps"]:
                    break
        if record:
            frames.append(env.render()[0])
    return success, steps, latencies, (frames if record else None)


def _markdown(report: dict) -> str:
    lines = [
        f"# Meta-World evaluation: {report['mode']}",
        "",
        f"Policy `{report['policy']}`; seeds {report['seeds'][0]}..{report['seeds'][-1]} (never "
        f"used for collection); {report['steps']} steps per episode; the first "
        f"{report['execute_actions']} actions of each chunk executed.",
        "",
        "| task | episodes | successes | success rate |",
        "|---|---:|---:|---:|",
    ]
    for task, result in report["tasks"].items():
        lines.append(
            f"| {task} | {result['episodes']} | {result['successes']} | "
            f"{result['success_rate']:.2f} |"
        )
    overall = report["overall"]
    lines.append(
        f"| **overall** | {overall['episodes']} | {overall['successes']} | "
        f"{overall['success_rate']:.2f} |"
    )
    latency = report["latency_ms"]
    lines += [
        "",
        f"Control-step latency (observation in, chunk out, batch 1, {report['device']}): median "
        f"{latency['median']:.1f} ms, p95 {latency['p95']:.1f} ms over {latency['count']} steps.",
        "",
        report["note"],
        "",
    ]
    return "\n".join(lines)


def evaluate_policy(config: Config, target: Target, settings: dict, out: Path) -> dict:
    import imageio.v2 as imageio
    import torch

    from policy.modeling_policy import ShortcutPolicy

    args = config.eval
    if not (target.policy / "config.json").is_file():
        raise EvalError(
            f"no {target.mode} policy at {target.policy}: run `svam train-policy "
            f"train_policy.mode={target.mode}` first, or set eval.policy"
        )
    device = _device(args.device)
    policy = ShortcutPolicy.from_pretrained(
        target.policy, teacher=args.teacher, decouplers=args.decouplers, device=device
    )
    horizon = policy.config.models.action_head.horizon
    if settings["execute_actions"] > horizon:
        raise EvalError(
            f"eval.execute_actions={settings['execute_actions']} exceeds the policy's chunk of "
            f"{horizon} actions"
        )
    with torch.no_grad():  # warm-up (lazy initialisation, allocator), not timed
        size = settings["image_size"]
        policy.predict(
            torch.zeros(1, 3, size, size, dtype=torch.uint8),
            "warm up",
            torch.zeros(1, policy.config.models.action_head.state_dim)
            if policy.config.use_state
            else None,
            generator=torch.Generator().manual_seed(0),
        )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "videos").mkdir(parents=True)
    tasks, latencies = {}, []
    with torch.no_grad():
        for task in settings["tasks"]:
            outcomes, lengths = [], []
            for index, seed in enumerate(settings["seeds"]):
                record = index < args.videos_per_task
                success, steps, times, frames = run_episode(
                    policy, task, seed, settings, config.run.seed, record
                )
                outcomes.append(success)
                lengths.append(steps)
                latencies += times
                if record:
                    name = f"{task}-seed{seed}-{'success' if success else 'failure'}.gif"
                    imageio.mimsave(tmp / "videos" / name, frames, duration=0.05, loop=0)
            tasks[task] = {
                "episodes": len(outcomes),
                "successes": int(sum(outcomes)),
                "success_rate": float(np.mean(outcomes)),
                "seeds": settings["seeds"],
                "mean_steps": float(np.mean(lengths)),
            }
    episodes = sum(t["episodes"] for t in tasks.values())
    successes = sum(t["successes"] for t in tasks.values())
    ms = [1000 * t for t in latencies]
    report = {
        "key": _key(config, target, settings),
        "mode": target.mode,
        "policy": str(target.policy),
        "device": device,
        "tasks": tasks,
        "overall": {
            "episodes": episodes,
            "successes": successes,
            "success_rate": successes / episodes if episodes else float("nan"),
        },
        "latency_ms": {
            "median": _percentile(ms, 50),
            "p95": _percentile(ms, 95),
            "mean": float(np.mean(ms)) if ms else float("nan"),
            "count": len(ms),
        },
        "seeds": settings["seeds"],
        "steps": settings["max_steps"],
        "execute_actions": settings["execute_actions"],
        "settings": settings,
        "note": (
            "Episodes ran sequentially in one process (the models load once; parallel "
            "processes are not implemented). Latency is timed after one warm-up prediction; "
            "rendering and simulation are not included."
        ),
    }
    (tmp / RESULTS_NAME).write_text(json.dumps(report, indent=2) + "\n")
    (tmp / "results.md").write_text(_markdown(report))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return report


def evaluate(config: Config, out_dir: str | Path | None = None) -> Path:
    """`svam eval`: roll out every configured policy; returns the eval directory."""
    if out_dir is not None:
        config.eval.output_dir = str(out_dir)
    try:
        config.eval.validate()
    except ValueError as exc:
        raise EvalError(str(exc)) from exc
    settings = _settings(config)
    targets = _targets(config)
    root = _output(config)
    RunDir.from_config(config).save_config(config, "eval")
    summary = {}
    for target in targets:
        report = evaluate_policy(config, target, settings, root / mode_dirname(target.mode))
        overall = report["overall"]
        summary[target.mode] = {
            "success_rate": overall["success_rate"],
            "episodes": overall["episodes"],
            "latency_ms_median": report["latency_ms"]["median"],
            "latency_ms_p95": report["latency_ms"]["p95"],
        }
        print(
            f"eval: {target.mode}: success {overall['successes']}/{overall['episodes']} "
            f"({overall['success_rate']:.2f}); control step median "
            f"{report['latency_ms']['median']:.1f} ms, p95 {report['latency_ms']['p95']:.1f} ms "
            f"-> {root / mode_dirname(target.mode)}"
        )
    (root / "summary.json").write_text(
        json.dumps({"modes": summary, "eval": to_dict(config.eval)}, indent=2) + "\n"
    )
    return root
