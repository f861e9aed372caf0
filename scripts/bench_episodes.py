"""Closed-loop episodes per second per foresight mode: lockstep batches against one at a time.

    .venv/bin/python scripts/bench_episodes.py --config micro --run runs/micro
    .venv/bin/python scripts/bench_episodes.py --run runs/tiny --episodes 64 --batch-size 16
    .venv/bin/python scripts/bench_episodes.py --run runs/tiny --modes onestep,shortcut --repeats 3

Loads each mode's policy of an existing run (made by `svam demo` or `svam train-policy`) once, then
runs the same `--episodes` episodes per mode (the run's eval tasks, at its eval seeds) in this
process with eval.threads torch threads, two ways: in lockstep batches of `--batch-size` (default
eval.batch_size) and one at a time (batch 1, the way `svam eval` ran them before batching). The
two ways alternate mode by mode, in both orders over `--repeats` rounds; medians are reported,
with whether both ways gave every episode the same success and steps. Episodes/s of `svam eval`
with W workers is about W times these (one process each), while the cores last. As in an eval
worker, environments are kept across batches and reseeded for later episodes of their task
(`EnvPool`); scripts/bench_envs.py times that set-up alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from svam.config import load_config
from svam.eval.evaluate import settings_of, targets
from svam.eval.measure import fixed_threads
from svam.eval.metaworld import EnvPool, Episode, batches, run_batch
from svam.policy.modeling_policy import ShortcutPolicy


def episodes_of(mode: str, policy: Path, settings: dict, count: int) -> list[Episode]:
    """`count` episodes, seed by seed over the tasks so that every task gets its share."""
    pairs = [(task, seed) for seed in settings["seeds"] for task in settings["tasks"]]
    return [Episode(mode, str(policy), task, seed, False) for task, seed in pairs[:count]]


def run_all(
    policy, episodes: list[Episode], settings: dict, batch_size: int, run_seed: int, envs: EnvPool
):
    """(seconds, outcomes by (task, seed)) of the episodes in batches of `batch_size`."""
    start = time.perf_counter()
    outcomes = [
        outcome
        for batch in batches(episodes, batch_size)
        for outcome in run_batch(policy, batch, settings, run_seed, envs)
    ]
    elapsed = time.perf_counter() - start
    return elapsed, {(o.episode.task, o.episode.seed): o for o in outcomes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", help="the config the run was built with")
    parser.add_argument("--run", help="run directory (default: <run.root>/<run.name>)")
    parser.add_argument("--modes", help="comma-separated modes (default: eval.modes)")
    parser.add_argument("--episodes", type=int, default=64, help="episodes per mode")
    parser.add_argument("--batch-size", type=int, help="lockstep batch (default: eval.batch_size)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of both ways")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = parser.parse_args()
    overrides = list(args.overrides)
    if args.run:
        run = Path(args.run)
        overrides += [f"run.root={run.parent}", f"run.name={run.name}"]
    if args.modes:
        overrides.append(f"eval.modes=[{args.modes}]")
    config = load_config(args.config, overrides)
    tasks = len(config.eval.tasks or config.collect.tasks)
    config.eval.episodes_per_task = -(-args.episodes // tasks)  # enough seeds for --episodes
    config.eval.validate()
    batch_size = args.batch_size or config.eval.batch_size
    if batch_size < 1 or args.episodes < 1 or args.repeats < 1:
        raise SystemExit("bench_episodes: --batch-size, --episodes and --repeats must be >= 1")
    settings = settings_of(config)
    device = config.eval.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    modes = targets(config)
    for target in modes:
        if target.missing:
            raise SystemExit(f"bench_episodes: {target.mode}: {target.missing}")

    envs = EnvPool(settings["camera"], settings["image_size"])
    with fixed_threads(config.eval.threads), torch.no_grad(), envs:
        policies = {
            t.mode: ShortcutPolicy.from_pretrained(
                t.policy,
                mode=t.mode,
                teacher=config.eval.teacher,
                decouplers=config.eval.decouplers,
                device=device,
            )
            for t in modes
        }
        episodes = {t.mode: episodes_of(t.mode, t.policy, settings, args.episodes) for t in modes}
        warmup = {**settings, "max_steps": 1}  # one control step: GL context, first calls
        for target in modes:
            for size in (batch_size, 1):
                policy, some = policies[target.mode], episodes[target.mode][:size]
                run_all(policy, some, warmup, size, config.run.seed, envs)
        ways = {"batched": batch_size, "one at a time": 1}
        seconds = {t.mode: {way: [] for way in ways} for t in modes}
        same = {t.mode: True for t in modes}
        action_gap = {t.mode: 0.0 for t in modes}
        for repeat in range(args.repeats):
            for target in modes:
                order = list(ways) if repeat % 2 == 0 else list(ways)[::-1]
                outcomes = {}
                for way in order:
                    elapsed, outcomes[way] = run_all(
                        policies[target.mode],
                        episodes[target.mode],
                        settings,
                        ways[way],
                        config.run.seed,
                        envs,
                    )
                    seconds[target.mode][way].append(elapsed)
                for key, one in outcomes["one at a time"].items():
                    other = outcomes["batched"][key]
                    if (one.success, one.steps) != (other.success, other.steps):
                        same[target.mode] = False
                        continue
                    gap = float(np.abs(one.actions - other.actions).max())
                    action_gap[target.mode] = max(action_gap[target.mode], gap)

    print(
        f"bench_episodes: run {config.run.name}, {device}, eval.threads={config.eval.threads}, "
        f"{settings['max_steps']} max steps, {args.repeats} round(s), medians; batched = "
        f"lockstep batches of {batch_size}\n"
    )
    print(
        "| mode | episodes | s batched | s one at a time | speed-up | episodes/s batched | "
        "episodes/s one at a time | same outcomes (max action gap) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    results = {}
    for target in modes:
        mode, count = target.mode, len(episodes[target.mode])
        fast = statistics.median(seconds[mode]["batched"])
        slow = statistics.median(seconds[mode]["one at a time"])
        results[mode] = {
            "episodes": count,
            "batch_size": batch_size,
            "seconds_batched": fast,
            "seconds_one_at_a_time": slow,
            "speed_up": slow / fast,
            "same_outcomes": same[mode],
            "max_action_gap": action_gap[mode],
        }
        print(
            f"| `{mode}` | {count} | {fast:.1f} | {slow:.1f} | {slow / fast:.2f}x | "
            f"{count / fast:.2f} | {count / slow:.2f} | "
            f"{'yes' if same[mode] else 'NO'} ({action_gap[mode]:.1e}) |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
