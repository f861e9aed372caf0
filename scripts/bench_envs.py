"""Seconds to set up a Meta-World episode: a new environment against a kept one reseeded.

    .venv/bin/python scripts/bench_envs.py
    .venv/bin/python scripts/bench_envs.py --tasks reach-v3,push-v3 --seeds 12 --image-size 128

Per episode set-up is everything an eval episode spends outside its steps: getting the environment
at the episode's seed, its `reset` and first frame, and closing it after (a kept one is not
closed). Three ways, taken in turn episode by episode so that they share the machine's load:

- new, own renderer: `MetaWorldEnv(task, seed)` making its own MuJoCo render context, as every
  episode did before environments were kept (renderer sharing switched off);
- new, shared renderer: `MetaWorldEnv(task, seed)` drawing with its thread's render context of the
  task (what a pool's first environments of a task cost now);
- reused: `env.reseed(seed)` on a kept environment of the task (what `svam eval` workers do for
  every later episode of a task, `svam.eval.metaworld.EnvPool`).

Prints median, min and max seconds per way, and whether every way gave the same reset
observation and first RGB-D frame, byte for byte.
"""

from __future__ import annotations

import argparse
import statistics
import time

from svam.envs import metaworld
from svam.envs.metaworld import MetaWorldEnv

WAYS = ("new, own renderer", "new, shared renderer", "reused")


def set_up(way: str, task: str, seed: int, kept: dict, camera: str, size: int):
    """(seconds, reset observation, RGB, depth) of one episode's set-up in `way`."""
    if way == "reused":
        start = time.perf_counter()
        env = kept[task]
        env.reseed(seed)
        obs = env.reset()
        rgb, depth = env.render()
        return time.perf_counter() - start, obs, rgb, depth
    shared, idle = metaworld._Renderers.of_this_thread(), metaworld._IDLE_RENDERERS
    if way == "new, own renderer":  # as before sharing: made for the env, freed with it
        metaworld._thread_local.renderers = metaworld._Renderers()
        metaworld._IDLE_RENDERERS = 0
    try:
        start = time.perf_counter()
        env = MetaWorldEnv(task, seed, camera, size)
        obs = env.reset()
        rgb, depth = env.render()
        env.close()
        return time.perf_counter() - start, obs, rgb, depth
    finally:
        metaworld._thread_local.renderers, metaworld._IDLE_RENDERERS = shared, idle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tasks", default="reach-v3,button-press-topdown-v3,drawer-close-v3,plate-slide-v3"
    )
    parser.add_argument("--seeds", type=int, default=8, help="episodes per task and way")
    parser.add_argument("--camera", default="corner")
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    tasks = args.tasks.split(",")
    metaworld.check_tasks(tasks, "--tasks")
    size = args.image_size

    # Warm up (the GL context, the first frame) with one kept environment per task.
    kept = {task: MetaWorldEnv(task, 1000, args.camera, size) for task in tasks}
    for env in kept.values():
        env.reset()
        env.render()
    seconds = {way: [] for way in WAYS}
    same = True
    for seed in range(args.seeds):
        for task in tasks:
            ways = WAYS[seed % 3 :] + WAYS[: seed % 3]  # each way first in turn
            results = {}
            for way in ways:
                elapsed, *results[way] = set_up(way, task, seed, kept, args.camera, size)
                seconds[way].append(elapsed)
            first = results[WAYS[0]]
            for way in WAYS[1:]:
                pairs = zip(first, results[way], strict=True)
                same &= all(a.tobytes() == b.tobytes() for a, b in pairs)
    for env in kept.values():
        env.close()

    count = len(seconds[WAYS[0]])
    print(
        f"bench_envs: {len(tasks)} tasks x {args.seeds} seeds = {count} episode set-ups per way, "
        f"camera {args.camera}, {size} px; seconds per episode (make or reseed, reset, first "
        "RGB-D frame, close)\n"
    )
    print("| way | median s | min s | max s | vs new, own renderer |")
    print("| --- | ---: | ---: | ---: | ---: |")
    base = statistics.median(seconds[WAYS[0]])
    for way in WAYS:
        median = statistics.median(seconds[way])
        print(
            f"| {way} | {median:.4f} | {min(seconds[way]):.4f} | {max(seconds[way]):.4f} | "
            f"{base / median:.1f}x |"
        )
    print(f"\nsame reset observation and first frame (RGB and depth) every way: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
