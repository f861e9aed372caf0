"""Benchmark `svam cache-teachers` on the tiny config: clips/s, where the time goes, 1 vs 2 processes.

    python scripts/bench_cache.py [--clips-per-split 32] [key=value ...]

Uses the tiny run's episodes (run `svam collect` first) and a random-init tiny teacher (timing does
not depend on the weights). Side by side on the same clips, one thread per process:
  1. one process under torchrun (wall time, start-up included)
  2. two processes under torchrun: speed-up over (1) and byte-identical shards
  3. one process in this one, for the split of the job's time into loading, teacher, encoders
     and writing, and its peak memory
Two threads per process are left out: on a shared 2-core machine they swing 10x with the load.
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
from accelerate import PartialState

from svam.config import load_config
from svam.rundir import RunDir
from svam.teachers.cache import TeacherCacheJob
from svam.teachers.modeling_teacher import VideoTeacher


def shard_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.glob("*.tar"))}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--clips-per-split", type=int, default=32)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    base = load_config(args.config, args.overrides)
    teacher_dir = work / "teacher"
    VideoTeacher.from_config(base.teacher, seed=0).save_pretrained(teacher_dir)
    common = [
        *args.overrides,
        f"cache.teacher={teacher_dir}",
        f"cache.episodes={(base.cache.episodes or RunDir.from_config(base).episodes)}",
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

    torchrun = Path(sys.executable).with_name("torchrun")

    def launch(name: str, processes: int) -> float:
        start = time.perf_counter()
        subprocess.run(
            [
                str(torchrun),
                f"--nproc_per_node={processes}",
                "--master_port=29561",
                "-m",
                "svam.cli",
                "cache-teachers",
                "--config",
                args.config,
                *overrides(name, 1),
            ],
            check=True,
            capture_output=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        return time.perf_counter() - start

    one = launch("one", 1)
    two = launch("two", 2)
    peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    identical = shard_bytes(work / "one") == shard_bytes(work / "two")
    clips = json.loads((work / "one" / "manifest.json").read_text())["num_samples"]

    torch.set_num_threads(1)
    config = load_config(args.config, overrides("inprocess", 1))
    job = TeacherCacheJob(config, PartialState(cpu=True))
    job.run()
    timing = dict(job.timing)
    total = sum(timing.values())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print(
        f"\n{clips} clips, tiny teacher N={job.steps} steps, {config.data.clip_frames} frames, "
        f"batch {config.cache.batch_size}, 1 thread per process"
    )
    print(f"  1 process : {one:6.1f} s  {clips / one:5.2f} clips/s")
    print(
        f"  2 processes: {two:6.1f} s  {clips / two:5.2f} clips/s  speed-up x{one / two:.2f}  "
        f"identical shards: {identical}"
    )
    print(
        f"  peak RSS per process: {peak_children:,.0f} MiB (torchrun runs), {peak:,.0f} MiB (in-process)"
    )
    print(f"  in-process run, {total:.1f} s of work:")
    for part, seconds in timing.items():
        print(f"      {part:<9} {seconds:6.1f} s  {100 * seconds / total:4.1f}%")
    share = (timing["encoders"] + timing["write"]) / total
    print(f"      encoders + writing: {100 * share:.1f}% of the job")


if __name__ == "__main__":
    main()
