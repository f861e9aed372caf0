"""Benchmark the episode-clip reader: clips per second streamed, with 0 and 2 loader workers.

    python scripts/bench_reader.py [--episodes runs/tiny/episodes] [--repeats 3]

Reads a collected episode shard set (default: the tiny run's; collect it first with `svam collect`),
streams the train split through `clip_loader` (decode, cut, shuffle, batch) and reports medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

from svam.config import load_config
from svam.data.episodes import clip_loader
from svam.rundir import RunDir


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="tiny")
    parser.add_argument(
        "--episodes", help="episode shard set (default: the config's run directory)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = load_config(args.config)
    root = args.episodes or RunDir.from_config(config).episodes
    results = {}
    for workers in (0, 2):
        config.data.num_workers = workers
        times, clips = [], 0
        for repeat in range(args.repeats):
            loader = clip_loader(root, config.data, "train", seed=repeat)
            start = time.perf_counter()
            clips = sum(len(batch["key"]) for batch in loader)
            times.append(time.perf_counter() - start)
        results[workers] = (clips, statistics.median(times))
    print(
        f"{root}: train split, batch {config.data.batch_size}, clips of {config.data.clip_frames} frames"
    )
    for workers, (clips, seconds) in results.items():
        print(
            f"  num_workers={workers}: {clips} clips in {seconds:.2f} s -> {clips / seconds:,.0f} clips/s"
        )


if __name__ == "__main__":
    main()
