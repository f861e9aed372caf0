"""Closed-loop Meta-World episodes of trained policies, in lockstep batches in worker processes.

Control is receding horizon: at each control step the policy maps the rendered frame, the
instruction and the proprioception to a chunk, and the first `execute_actions` actions are
executed, one per environment step. Under `eval.timing` other than `wait` the world keeps moving
while the policy thinks (`svam.eval.timing.TimedControl`). An episode succeeds when Meta-World
reports success at any step within `max_steps` (simulator steps of 12.5 ms: a budget in simulated
time, whatever the policy's latency).

Episodes of one mode run `batch_size` at a time in lockstep, one environment each: every control
step makes one batched policy call for all the live episodes (frames are rendered only then), and
an episode leaves the batch (`ShortcutPolicy.keep_rows`) when it succeeds or reaches `max_steps`.
Each episode's randomness (the teacher's and the head's noise) comes from its own generator keyed
by (run seed, task, seed), drawn in the order it would be alone, so an episode's outcome depends
neither on its batch nor on the worker that ran it (up to floating-point rounding of batched
kernels).

Building an environment (compiling the task's MuJoCo model, ~0.17 s) would cost more than a short
episode on a tiny policy, so each worker keeps the environments of finished episodes in an
`EnvPool` and starts later episodes of the same task on them (`MetaWorldEnv.reseed`, ~15 ms),
which gives exactly what a new environment would.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from svam.eval.timing import TimedControl


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
    actions: np.ndarray
    """(steps, action_dim) float32: the executed actions as the policy gave them (the
    environment clips them to its action space)."""


POOL_ENVS = 64
"""At most this many idle environments an `EnvPool` keeps (~25 MB each, whatever the image
size: the render contexts are shared by task); the least recently used tasks' go first."""


class EnvPool:
    """Environments of finished episodes by task, to run later episodes of the task on.

    `take` gives an environment of a task at a seed: a kept one reseeded, or a new one; `give`
    keeps one for later. Use it as a context manager, or call `close`, to close the kept ones.
    """

    def __init__(self, camera: str, image_size: int, max_envs: int = POOL_ENVS):
        self.camera, self.image_size, self.max_envs = camera, image_size, max_envs
        self._idle: dict[str, list] = {}  # task -> environments, least recently used task first
        self.made = self.reused = 0

    def take(self, task: str, seed: int):
        from svam.envs.metaworld import MetaWorldEnv

        idle = self._idle.get(task)
        if idle:
            env = idle.pop()
            env.reseed(seed)
            self.reused += 1
            return env
        self.made += 1
        return MetaWorldEnv(task, seed, self.camera, self.image_size)

    def give(self, env) -> None:
        idle = self._idle.pop(env.task, [])
        self._idle[env.task] = [*idle, env]  # now the most recently used task
        while sum(map(len, self._idle.values())) > self.max_envs:
            oldest = next(iter(self._idle))
            self._idle[oldest].pop().close()
            if not self._idle[oldest]:
                del self._idle[oldest]

    def close(self) -> None:
        for idle in self._idle.values():
            for env in idle:
                env.close()
        self._idle.clear()

    def __enter__(self) -> EnvPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Running:
    """An episode in progress: its environment, its generator and what it has recorded."""

    def __init__(self, episode: Episode, run_seed: int, envs: EnvPool):
        from svam.seeding import keyed_generator

        self.episode = episode
        self.generator = keyed_generator(run_seed, "eval", episode.task, episode.seed)
        self.env = envs.take(episode.task, episode.seed)
        self.obs = self.env.reset()
        self.success, self.steps = False, 0
        self.frames: list[np.ndarray] | None = [] if episode.record else None
        self.actions: list[np.ndarray] = []

    def observe(self) -> tuple[np.ndarray, np.ndarray]:
        """(RGB frame, proprioception) of the current step; the frame is recorded if asked."""
        rgb, _ = self.env.render()
        if self.frames is not None:
            self.frames.append(rgb)
        return rgb, self.env.proprio(self.obs)

    def step(self, action: np.ndarray, max_steps: int) -> bool:
        """Execute `action`; whether the episode is over (success, or `max_steps` reached)."""
        self.obs, _, done = self.env.step(action)
        self.actions.append(action)
        self.steps += 1
        self.success = self.success or done
        return self.success or self.steps >= max_steps

    def finish(self, envs: EnvPool) -> Outcome:
        if self.frames is not None:
            self.frames.append(self.env.render()[0])
        envs.give(self.env)
        actions = np.stack(self.actions).astype(np.float32)
        return Outcome(self.episode, self.success, self.steps, self.frames, actions)


def _observation(running: list[_Running]) -> dict[str, Any]:
    """The policy's observation (`svam.policy.modeling_policy`) of the live episodes, one row each."""
    import torch

    from svam.policy.modeling_policy import GENERATOR, OBS_IMAGE, OBS_STATE, TASK

    rgbs, states = zip(*(episode.observe() for episode in running), strict=True)
    return {
        OBS_IMAGE: torch.from_numpy(np.stack(rgbs)).permute(0, 3, 1, 2),
        OBS_STATE: torch.from_numpy(np.stack(states)),
        TASK: [episode.env.instruction for episode in running],
        GENERATOR: [episode.generator for episode in running],
    }


def run_batch(
    policy, episodes: list[Episode], settings: dict, run_seed: int, envs: EnvPool | None = None
) -> list[Outcome]:
    """Outcomes (in finishing order) of `episodes` of one loaded policy (all of one mode), run in
    lockstep, on environments from `envs` (given back to it after their episode; None: a pool of
    this call's), under the settings' `timing` with the mode's `delays` entry in simulator steps
    (`svam.eval.timing`; default: wait)."""
    if envs is None:
        with EnvPool(settings["camera"], settings["image_size"]) as envs:
            return run_batch(policy, episodes, settings, run_seed, envs)
    delay = settings.get("delays", {}).get(episodes[0].mode, 0)
    timing = settings.get("timing", "wait")
    control = TimedControl(policy, timing, delay, settings["execute_actions"])
    running, outcomes = [], []
    try:
        for episode in episodes:
            running.append(_Running(episode, run_seed, envs))
        while running:
            observation = _observation(running) if control.needs_observation else None
            actions = control.select_action(observation).cpu().numpy()
            going_on = []
            for row, (episode, action) in enumerate(zip(running, actions, strict=True)):
                if episode.step(action, settings["max_steps"]):
                    outcomes.append(episode.finish(envs))
                else:
                    going_on.append(row)
            control.keep_rows(going_on)
            running = [running[row] for row in going_on]
    finally:
        for episode in running:  # interrupted: those environments are in an unknown state
            episode.env.close()
    return outcomes


def batches(episodes: list[Episode], batch_size: int) -> list[list[Episode]]:
    """The episodes by mode, sorted by (task, seed), in batches of at most `batch_size`."""
    ordered = sorted(episodes, key=lambda e: (e.mode, e.task, e.seed))
    out = []
    for _, group in itertools.groupby(ordered, key=lambda e: e.mode):
        group = list(group)
        out += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    return out


class _Worker:
    """What one process keeps: the policy of the mode it ran last (batches come sorted by mode,
    so each process loads each mode's policy once) and the environments of its past episodes."""

    def __init__(self, settings: dict, options: dict[str, Any]):
        self.settings, self.options = settings, options
        self.loaded: tuple[str, Any] | None = None
        self.envs: EnvPool | None = None

    def policy(self, episode: Episode):
        from svam.policy.modeling_policy import ShortcutPolicy

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

    def __call__(self, batch: list[Episode]) -> list[Outcome]:
        import torch

        if self.envs is None:
            self.envs = EnvPool(self.settings["camera"], self.settings["image_size"])
        with torch.no_grad():
            policy = self.policy(batch[0])
            return run_batch(policy, batch, self.settings, self.options["run_seed"], self.envs)

    def close(self) -> None:
        if self.envs is not None:
            self.envs.close()
        self.loaded = None


_WORKER: _Worker | None = None


def _start_worker(settings: dict, options: dict[str, Any]) -> None:
    global _WORKER
    import torch

    if options["threads"]:
        torch.set_num_threads(options["threads"])
    _WORKER = _Worker(settings, options)


def _start_pool_worker(settings: dict, options: dict[str, Any]) -> None:
    from multiprocessing.util import Finalize

    _start_worker(settings, options)
    # Run when the worker exits on its own (after `Pool.close`), not when it is terminated.
    Finalize(_WORKER, _WORKER.close, exitpriority=10)


def _stop_worker() -> None:
    global _WORKER
    if _WORKER is not None:
        _WORKER.close()
        _WORKER = None


def _run_in_worker(batch: list[Episode]) -> list[Outcome]:
    return _WORKER(batch)


def rollouts(
    episodes: list[Episode],
    settings: dict,
    workers: int,
    *,
    batch_size: int = 1,
    **options: Any,
) -> Iterator[Outcome]:
    """Outcomes of `episodes` (in completion order) from `workers` processes (1: this process),
    each running whole batches of up to `batch_size` episodes of one mode in lockstep.

    options: teacher, decouplers (directory overrides), device, threads, run_seed."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    work = batches(episodes, batch_size)
    if workers == 1 or len(work) <= 1:
        import torch

        threads = torch.get_num_threads()
        _start_worker(settings, options)
        try:
            for batch in work:
                yield from _run_in_worker(batch)
        finally:
            _stop_worker()
            torch.set_num_threads(threads)
        return
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    os.environ.setdefault("MUJOCO_GL", "egl")
    pool = context.Pool(min(workers, len(work)), _start_pool_worker, (settings, options))
    try:
        for outcomes in pool.imap_unordered(_run_in_worker, work):
            yield from outcomes
    except BaseException:
        pool.terminate()
        raise
    else:
        pool.close()  # let the workers exit on their own: a terminated one prints a trace
    finally:
        pool.join()
