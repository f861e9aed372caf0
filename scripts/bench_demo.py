"""Wall time and peak memory of `svam demo`, the figures the README and the demo's budget
(30 minutes on 2 AVX2 CPU cores) are about.

    .venv/bin/python scripts/bench_demo.py --run demo-bench          # from scratch
    .venv/bin/python scripts/bench_demo.py --run demo-bench --keep   # resume an existing run

Runs `svam demo` in a subprocess and samples, every `--interval` seconds, the resident memory
summed over the demo and all its descendants (the rollout workers run beside the main process,
so the largest single process understates the peak). Prints the wall time, each stage's wall time
and peak, and writes them as JSON with `--json`. On a machine with AVX-512, measure the AVX2-only
machines too by capping torch's and oneDNN's kernels:

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python scripts/bench_demo.py
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

STAGE = re.compile(rb"demo \[(\d)/\d\] ([a-z-]+)")


def tree_rss(process: psutil.Process) -> int:
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            pass
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="demo-bench")
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--keep", action="store_true", help="keep (resume) an existing run")
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--log", type=Path, help="write the demo's output here")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    run_dir = Path("runs") / args.run
    if not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, "-m", "svam.cli", "demo", "--config", args.config, "--run", args.run]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = open(args.log or run_dir.with_name(args.run + "-demo.log"), "wb")
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    stage = {"name": "start"}
    stage_peaks: dict[str, int] = {}
    stage_starts: dict[str, float] = {"start": 0.0}

    def read_output() -> None:
        for chunk in iter(lambda: child.stdout.read1(4096), b""):
            log.write(chunk)
            log.flush()
            for match in STAGE.finditer(chunk):
                stage["name"] = match.group(2).decode()
                stage_starts.setdefault(stage["name"], time.perf_counter() - start)

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    process = psutil.Process(child.pid)
    while child.poll() is None:
        rss = tree_rss(process)
        stage_peaks[stage["name"]] = max(stage_peaks.get(stage["name"], 0), rss)
        time.sleep(args.interval)
    reader.join()
    log.close()
    seconds = time.perf_counter() - start
    peak_stage = max(stage_peaks, key=stage_peaks.get)
    starts = sorted(stage_starts.items(), key=lambda item: item[1])
    ends = [t for _, t in starts[1:]] + [seconds]
    stage_seconds = {name: end - begin for (name, begin), end in zip(starts, ends, strict=True)}
    results = {
        "exit_code": child.returncode,
        "wall_s": seconds,
        "peak_rss_gib": stage_peaks[peak_stage] / 2**30,
        "peak_stage": peak_stage,
        "stage_peaks_gib": {k: v / 2**30 for k, v in stage_peaks.items()},
        "stage_seconds": stage_seconds,
        "cpus": psutil.cpu_count(),
    }
    minutes, rest = divmod(seconds, 60)
    print(
        f"svam demo ({args.config}, run {args.run}): exit {child.returncode}, "
        f"{int(minutes)}m{rest:04.1f}s on {psutil.cpu_count()} CPUs; peak memory (process tree) "
        f"{results['peak_rss_gib']:.2f} GiB in {peak_stage}"
    )
    for name, peak in results["stage_peaks_gib"].items():
        minutes = stage_seconds.get(name, 0.0) / 60
        print(f"  {name:<16} {minutes:5.1f} min, peak {peak:.2f} GiB")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    sys.exit(child.returncode)


if __name__ == "__main__":
    main()
