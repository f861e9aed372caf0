"""Benchmark `svam collect`: episodes per second with 1 and 2 worker processes, side by side.

    python scripts/bench_collect.py [--config tiny] [--repeats 3] [key=value ...]

Each setting runs `--repeats` times, interleaved, on the same config; medians are reported, plus
the peak resident memory of the main process and of the largest worker.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time

from svam.collect import collect
from svam.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    seconds: dict[int, list[float]] = {w: [] for w in args.workers}
    episodes = 0
    for _ in range(args.repeats):
        for workers in args.workers:
            with tempfile.TemporaryDirectory() as root:
                config = load_config(
                    args.config, [*args.overrides, f"run.root={root}", f"collect.workers={workers}"]
                )
                episodes = len(config.collect.tasks) * config.collect.episodes_per_task
                start = time.perf_counter()
                collect(config)
                seconds[workers].append(time.perf_counter() - start)
    print(
        f"\n{episodes} episodes per run ({config.collect.image_size}x{config.collect.image_size}, "
        f"tasks {', '.join(config.collect.tasks)}), {args.repeats} runs each, medians:"
    )
    base = statistics.median(seconds[args.workers[0]])
    for workers, times in seconds.items():
        median = statistics.median(times)
        print(
            f"  workers={workers}: {median:6.1f} s  {episodes / median:6.2f} episodes/s  "
            f"speed-up x{base / median:.2f}"
        )
    to_mib = 1 / 1024
    print(
        f"  peak RSS: main {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * to_mib:.0f} MiB, "
        f"largest worker {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * to_mib:.0f} MiB"
    )


if __name__ == "__main__":
    main()
