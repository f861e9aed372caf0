"""Throughput and memory of `svam import lerobot` against the raw decode rate of the same videos.

    .venv/bin/python scripts/bench_import.py --root /tmp/bench-import

Builds (once, kept under --root) a LeRobot v3.0 dataset of --episodes x --length frames at
--source-size px, textured frames panning as a camera would, written with svam's own v3.0 writer
(lerobot's encoder settings: AV1, crf 30, keyframe every 2 frames). Then, in one run:

- raw decode: every frame of every video file decoded to RGB with PyAV in one process, nothing
  else done: the ceiling an import that is decode-bound approaches;
- `svam import lerobot` with 1 and with --workers processes, in a subprocess each, source frames
  per second and the peak resident memory summed over the import's process tree (sampled every
  0.05 s), against --budget-mib and against the dataset's decoded size.

Prints a table and writes --json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from bench_demo import tree_rss
from tqdm import tqdm

from svam.data.lerobot import LeRobotV3Writer, VideoSettings
from svam.data.video import frames_of

CAMERA = "observation.images.front"


def build_dataset(root: Path, episodes: int, length: int, size: int, fps: int) -> None:
    rng = np.random.default_rng(0)
    writer = LeRobotV3Writer(root, fps, CAMERA, (size, size), 6, 7, VideoSettings(), "synthetic")
    for episode in tqdm(range(episodes), desc="build dataset", unit="ep"):
        texture = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        texture = np.kron(texture, np.ones((16, 16, 1), np.uint8))  # 2x the frame, blocky
        frames = np.stack(
            [
                texture[(s // 2) % size : (s // 2) % size + size, s % size : s % size + size]
                for s in range(length)
            ]
        )
        state = rng.normal(size=(length, 6)).astype(np.float32)
        actions = rng.normal(size=(length, 7)).astype(np.float32)
        writer.add_episode(frames, state, actions, f"task {episode % 4}", {})
    writer.close()


def raw_decode(root: Path) -> tuple[int, float]:
    start = time.perf_counter()
    frames = 0
    for path in sorted((root / "videos").rglob("*.mp4")):
        frames += sum(1 for _ in frames_of(path))
    return frames, time.perf_counter() - start


def timed_import(root: Path, out: Path, workers: int, image_size: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    command = [
        sys.executable,
        "-m",
        "svam.cli",
        "import",
        "lerobot",
        str(root),
        "--out",
        str(out),
        f"run.root={out.parent / 'runs'}",
        f"lerobot.workers={workers}",
        f"lerobot.image_size={image_size}",
    ]
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    peak = 0
    process = psutil.Process(child.pid)
    output = []
    reader = threading.Thread(target=lambda: output.extend(child.stdout), daemon=True)
    reader.start()
    while child.poll() is None:
        peak = max(peak, tree_rss(process))
        time.sleep(0.05)
    elapsed = time.perf_counter() - start
    reader.join()
    if child.returncode:
        raise SystemExit(f"import failed: {b''.join(output).decode()}")
    return {"workers": workers, "seconds": elapsed, "peak_rss_mib": peak / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/bench-import"))
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--length", type=int, default=300)
    parser.add_argument("--source-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--budget-mib", type=int, default=1024)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    source = args.root / f"lerobot-{args.episodes}x{args.length}-{args.source_size}px"
    if not (source / "meta/info.json").is_file():
        shutil.rmtree(source, ignore_errors=True)
        build_dataset(source, args.episodes, args.length, args.source_size, args.fps)
    total = args.episodes * args.length
    decoded_gib = total * args.source_size**2 * 3 / 2**30
    frames, seconds = raw_decode(source)
    assert frames == total, (frames, total)
    runs = [
        timed_import(source, args.root / "imported", w, args.image_size) for w in (1, args.workers)
    ]
    results = {
        "dataset": {
            "episodes": args.episodes,
            "frames": total,
            "source_size": args.source_size,
            "on_disk_mib": sum(p.stat().st_size for p in source.rglob("*") if p.is_file()) / 2**20,
            "decoded_gib": decoded_gib,
        },
        "raw_decode_fps": frames / seconds,
        "imports": [{**run, "fps": total / run["seconds"]} for run in runs],
        "budget_mib": args.budget_mib,
        "cpus": psutil.cpu_count(),
    }
    print(
        f"dataset: {total} frames at {args.source_size}px ({results['dataset']['on_disk_mib']:.0f} MiB "
        f"on disk, {decoded_gib:.1f} GiB decoded = {decoded_gib * 1024 / args.budget_mib:.1f}x the "
        f"{args.budget_mib} MiB budget)\nraw decode, 1 process: {results['raw_decode_fps']:,.0f} frames/s"
    )
    for run in results["imports"]:
        print(
            f"import, {run['workers']} worker(s): {run['fps']:,.0f} frames/s "
            f"({run['fps'] / results['raw_decode_fps']:.2f}x raw decode), {run['seconds']:.1f} s, "
            f"peak {run['peak_rss_mib']:,.0f} MiB (process tree; budget {args.budget_mib} MiB)"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
