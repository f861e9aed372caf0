"""Closed-loop Meta-World episodes of trained policies, in parallel worker processes.

Control is receding horizon: at each control step the policy maps the rendered frame, the
instruction and the proprioception to a chunk, and the first `execute_actions` actions are
executed. An episode succeeds when Meta-World reports success at any step within `max_steps`.
Each episode's randomness (the teacher's and the head's noise) comes from a generator keyed by
(run seed, task, seed), so an episode's outcome does not depend on which worker ran it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Episode:
    """One closed-loop episode to run: a mode's policy on a task at a seed."""

    mode: str
    policy: str
    task: str
    seed: int
    record: bool


@dataclass
class Outcome:
    episode: Episode
    success: bool
    steps: int
    frames: list[np.ndarray] | None


def run_episode(policy, task: str, seed: int, settings: dict, run_seed: int, record: bool):
    """(success, env steps, frames or None) of one episode of a loaded policy."""
    import torch

    from svam.envs.metaworld import MetaWorldEnv
    from svam.seeding import keyed_generator

    generator = keyed_generator(run_seed, "eval", task, seed)
    frames = []
    success, steps = False, 0
    with MetaWorldEnv(task, seed, settings["camera"], settings["image_size"]) as env:
        obs = env.reset()
        while steps < settings["max_steps"] and not success:
            rgb, _ = env.render()
            if record:
                frames.append(rgb)
            image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]
            state = torch.from_numpy(env.proprio(obs))[None]
            chunk = policy.predict(image, env.instruction, state, generator=generator)
            for action in chunk[0, : settings["execute_actions"]].cpu().numpy():
                obs, _, done = env.step(action)
                steps += 1
                success = success or done
                if success or steps >= settings["max_steps"]:
                    break
        if record:
            frames.append(env.render()[0])
    return success, steps, (frames if record else None)


class _Worker:
    """What one process keeps: the policy of the mode it ran last (episodes come sorted by
    mode, so each process loads each mode's policy once)."""

    def __init__(self, settings: dict, options: dict[str, Any]):
        self.settings, self.options = settings, options
        self.loaded: tuple[str, Any] | None = None

    def policy(self, episode: Episode):
        from policy.modeling_policy import ShortcutPolicy

        if self.loaded is None or self.loaded[0] != episode.mode:
            self.loaded = None  # free the previous policy first
            policy = ShortcutPolicy.from_pretrained(
                episode.policy,
                mode=episode.mode,
                teacher=self.options["teacher"],
                decouplers=self.options["decouplers"],
                device=self.options["device"],
            )
            self.loaded = (episode.mode, policy)
        return self.loaded[1]

    def __call__(self, episode: Episode) -> Outcome:
        import torch

        with torch.no_grad():
            success, steps, frames = run_episode(
                self.policy(episode),
                episode.task,
                episode.seed,
                self.settings,
                self.options["run_seed"],
                episode.record,
            )
        return Outcome(episode, success, steps, frames)


_WORKER: _Worker | None = None


def _start_worker(settings: dict, options: dict[str, Any]) -> None:
    global _WORKER
    import torch

    if options["threads"]:
        torch.set_num_threads(options["threads"])
    _WORKER = _Worker(settings, options)


def _run_in_worker(episode: Episode) -> Outcome:
    return _WORKER(episode)


def rollouts(
    episodes: list[Episode], settings: dict, workers: int, **options: Any
) -> Iterator[Outcome]:
    """Outcomes of `episodes` (in completion order) from `workers` processes (1: this process).

    options: teacher, decouplers (directory overrides), device, threads, run_seed."""
    episodes = sorted(episodes, key=lambda e: (e.mode, e.task, e.seed))
    if workers == 1 or len(episodes) == 1:
        import torch

        threads = torch.get_num_threads()
        _start_worker(settings, options)
        try:
            for episode in episodes:
                yield _run_in_worker(episode)
        finally:
            torch.set_num_threads(threads)
        return
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    os.environ.setdefault("MUJOCO_GL", "egl")
    pool = context.Pool(min(workers, len(episodes)), _start_worker, (settings, options))
    try:
        yield from pool.imap_unordered(_run_in_worker, episodes)
    except BaseException:
        pool.terminate()
        raise
    else:
        pool.close()  # let the workers exit on their own: a terminated one prints a trace
    finally:
        pool.join()
