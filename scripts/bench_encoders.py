"""Benchmark the foundation encoders: milliseconds per frame at batch sizes 1, 8 and 32 (medians).

    python scripts/bench_encoders.py [--config tiny] [--repeats 5] [--threads N] [--device cpu]
                                     [--dtype float32] [key=value ...]

Builds both encoders of the config (random init unless the config names weights) and times them
on random uint8 frames at the episodes' resolution (collect.image_size), preprocessing included.
The geometric encoder sees a batch the way the cache job passes it: clips of data.clip_frames
views (a batch of 1 is a single-view clip, the reference-frame case).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from svam.config import load_config
from svam.teachers.encoders import build_encoders

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def median_seconds(encoder, frames: torch.Tensor, repeats: int) -> float:
    encoder(frames)  # warm-up: first-call allocations and kernel selection
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        encoder(frames)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(args.config, args.overrides)
    semantic, geometric = build_encoders(config.encoders, args.device, DTYPES[args.dtype])
    size, views = config.collect.image_size, config.data.clip_frames
    print(
        f"{args.config}: {size} px frames, {torch.get_num_threads()} threads, {args.device}, "
        f"{args.dtype}; median of {args.repeats}, ms per frame"
    )
    for name, encoder in (("semantic", semantic), ("geometric", geometric)):
        print(
            f"  {name}: {encoder.model_name} at {encoder.image_size} px -> "
            f"{encoder.num_tokens} x {encoder.out_dim} tokens"
        )
        for batch in args.batches:
            shape = (batch,) if name == "semantic" else (max(1, batch // views), min(batch, views))
            frames = torch.randint(0, 256, (*shape, 3, size, size), dtype=torch.uint8)
            seconds = median_seconds(encoder, frames, args.repeats)
            layout = "frames" if name == "semantic" else "clips x views"
            print(
                f"    batch {batch:>3} ({' x '.join(map(str, shape))} {layout}): "
                f"{1000 * seconds / batch:7.1f} ms/frame"
            )


if __name__ == "__main__":
    main()
