"""Benchmark a resume's data start: the first batch after a late checkpoint, streamed by skipping
the consumed batches (what the trainers do) against replaying them (what they did before).

    python scripts/bench_resume.py [--config tiny] [--batches N] [--workers 0] [--repeats 3] [key=value ...]
    python scripts/bench_resume.py run.name=demo-bench   # the run scripts/bench_demo.py made

Reads the run's collected episodes (`svam collect` first) and, if the run has one, its teacher
cache. The stream is each stage's own: train-teacher's repeating clip loader and distill's
repeating cache loader; `--batches` defaults to the stage's last checkpoint before its final step
(`train_teacher.steps` / `distill.steps`, `checkpoint_every`, gradient accumulation). Both ways
are timed in the same run, alternating, and the first batch is checked to be the same.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator

from svam.config import load_config
from svam.data.episodes import clip_loader
from svam.data.teacher_cache import TARGETS, loader_settings, teacher_cache_loader
from svam.rundir import RunDir


def last_checkpoint(section) -> int:
    """Consumed batches at the stage's last checkpoint before its final step."""
    step = (section.steps - 1) // section.checkpoint_every * section.checkpoint_every
    return step * section.gradient_accumulation_steps


def first_batch_after(make: Callable[[int], Iterator], batches: int, replay: bool):
    """(seconds to the batch after `batches` consumed ones, its keys)."""
    start = time.perf_counter()
    stream = make(0 if replay else batches)
    for _ in range(batches if replay else 0):
        next(stream)
    batch = next(stream)
    return time.perf_counter() - start, list(batch["key"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--batches", type=int, help="consumed batches (default: see above)")
    parser.add_argument("--workers", type=int, default=0, help="loader workers")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. run.name=demo-bench")
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    run = RunDir.from_config(config)
    seed = config.run.seed
    config.data.num_workers = args.workers
    streams = {}
    if (run.episodes / "manifest.json").is_file():
        streams["train-teacher (episode clips)"] = (
            lambda skip: iter(
                clip_loader(
                    run.episodes, config.data, "train", seed=seed, repeat=True, skip_batches=skip
                )
            ),
            last_checkpoint(config.train_teacher),
        )
    if (run.cache / "manifest.json").is_file():
        streams["distill (teacher cache)"] = (
            lambda skip: iter(
                teacher_cache_loader(
                    run.cache,
                    "train",
                    batch_size=config.distill.batch_size,
                    num_workers=args.workers,
                    arrays=[*TARGETS, "onestep"],
                    seed=seed,
                    shuffle=True,
                    shuffle_buffer=loader_settings(config.distill, config.data)["shuffle_buffer"],
                    repeat=True,
                    skip_batches=skip,
                )
            ),
            last_checkpoint(config.distill),
        )
    if not streams:
        raise SystemExit(f"no episodes or cache under {run.root}: run `svam collect` first")
    print(f"{run.root}: first batch after a late checkpoint, {args.workers} loader workers")
    for name, (make, default_batches) in streams.items():
        batches = args.batches or default_batches
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            keys = {}
            for replay in (True, False):
                seconds, keys[replay] = first_batch_after(make, batches, replay)
                times[replay].append(seconds)
            assert keys[True] == keys[False], f"{name}: the resumed stream diverged"
        replayed, skipped = (statistics.median(times[replay]) for replay in (True, False))
        print(
            f"  {name}, after {batches} batches: replay {replayed:.2f} s, "
            f"skip {skipped:.2f} s (median of {args.repeats}) -> {replayed / skipped:.1f}x"
        )


if __name__ == "__main__":
    main()
