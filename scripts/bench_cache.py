"""Benchmark `svam cache-teachers` on the tiny config: clips/s, where the time goes, 1 vs 2 processes.

    python scripts/bench_cache.py [--clips-per-split 16] [key=value ...]

Uses the tiny run's episodes (run `svam collect` first) and a random-init tiny teacher (timing does
not depend on the weights). Runs, side by side on the same clips:
  1. one process, 1 thread  (in-process: time split into loading, teacher, encoders, writing)
  2. two processes under torchrun, 1 thread each: speed-up over (1) and byte-identical shards
  3. one process, 2 threads (torch's default here), for reference
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from svam.config import load_config
from teachers.cache import TeacherCacheJob, cache_teachers
from teachers.modeling_teacher import VideoTeacher


def shard_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.glob("*.tar"))}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--clips-per-split", type=int, default=16)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    base = load_config(args.config, args.overrides)
    teacher_dir = work / "teacher"
    VideoTeacher.from_config(base.teacher, seed=0).save_pretrained(teacher_dir)
    common = [
        *args.overrides,
        f"cache.teacher={teacher_dir}",
        f"cache.max_clips_per_split={args.clips_per_split}",
        f"cache.clips_per_shard={max(1, args.clips_per_split // 2)}",
    ]

    def overrides(name: str, threads: int) -> list[str]:
        return [
            *common,
            f"cache.output_dir={work / name}",
            f"cache.num_threads={threads}",
            f"run.root={work}",
            f"run.name={name}-run",
        ]

    # 1. one process, one thread, in this process so the job's own timing can be read
    config = load_config(args.config, overrides("one", 1))
    torch.set_num_threads(1)
    from accelerate import PartialState

    job = TeacherCacheJob(config, PartialState(cpu=True))
    start = time.perf_counter()
    job.run()
    one = time.perf_counter() - start
    clips = json.loads((work / "one" / "manifest.json").read_text())["num_samples"]
    timing = dict(job.timing)
    peak_one = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    # 2. two processes, one thread each
    torchrun = Path(sys.executable).with_name("torchrun")
    start = time.perf_counter()
    subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node=2",
            "--master_port=29561",
            "-m",
            "svam.cli",
            "cache-teachers",
            "--config",
            args.config,
            *overrides("two", 1),
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    two = time.perf_counter() - start
    peak_two = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    identical = shard_bytes(work / "one") == shard_bytes(work / "two")

    # 3. one process, two threads
    torch.set_num_threads(2)
    start = time.perf_counter()
    cache_teachers(load_config(args.config, overrides("threads2", 2)))
    threads2 = time.perf_counter() - start

    total = sum(timing.values())
    print(
        f"\n{clips} clips, tiny teacher N={job.steps} steps, {config.data.clip_frames} frames, "
        f"batch {config.cache.batch_size}"
    )
    print(
        f"  1 process x 1 thread : {one:6.1f} s  {clips / one:5.2f} clips/s  peak RSS {peak_one:,.0f} MiB"
    )
    for part, seconds in timing.items():
        print(f"      {part:<9} {seconds:6.1f} s  {100 * seconds / total:4.1f}%")
    share = (timing["encoders"] + timing["write"]) / total
    print(f"      encoders + writing: {100 * share:.1f}% of the job")
    print(
        f"  2 processes x 1 thread: {two:6.1f} s  {clips / two:5.2f} clips/s  speed-up x{one / two:.2f}  "
        f"identical shards: {identical}  peak RSS per process {peak_two:,.0f} MiB"
    )
    print(f"  1 process x 2 threads: {threads2:6.1f} s  {clips / threads2:5.2f} clips/s")
    print("  (process times include start-up: loading torch, the teacher and both encoders)")


if __name__ == "__main__":
    main()
