"""Benchmark `svam distill`: the shortcut's cost against the teacher's one-step pass, and training
throughput with the data loader measured alone.

    python scripts/bench_distill.py [--cache DIR] [--steps 100] [--repeats 20] [key=value ...]

(a) Cost per clip, both decouplers against the teacher's one-step feature pass:
    - tiny: FLOPs (svam.flops.flop_counter: torch's FLOP counter plus the fused CPU attention
      kernel it misses) of `TeacherPipeline.features` on a random-init tiny teacher, and of the
      tiny decouplers built for its features; CPU wall-time medians of both, batch 1, 1 thread;
    - published size: svam's full-scale decouplers and S-VAM's published ones against SVD's
      one-step pass up to up-block 1 (2,749 GFLOPs at 256 px and 16 frames, DESIGN.md).
(b) Training throughput on a teacher cache (`--cache`, default a synthetic one of the tiny
    config's shapes): clips/s of the loader alone (0 and 2 workers), of a training run, and the
    run's split into waiting for data, moving features and training steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from svam.config import Config, load_config
from svam.data.teacher_cache import TARGETS, teacher_cache_loader, write_teacher_cache
from svam.distill import (
    build_decouplers,
    decoupler_flops,
    full_scale_decouplers,
    published_decouplers,
)
from svam.distill.train import Distiller, distill_paths
from svam.flops import flop_counter
from svam.teachers.configuration_encoders import EncodersConfig
from svam.teachers.configuration_teacher import TeacherRuntime
from svam.teachers.modeling_teacher import VideoTeacher
from svam.teachers.pipeline_teacher import TeacherPipeline

PUBLISHED_ONE_STEP_GFLOPS = 2749.0


def median_ms(run, repeats: int, warmup: int = 3) -> float:
    times = []
    for _ in range(warmup + repeats):
        start = time.perf_counter()
        run()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times[warmup:])


def cost(config: Config, repeats: int) -> None:
    torch.set_num_threads(1)
    pipeline = TeacherPipeline(VideoTeacher.from_config(config.teacher, seed=0))
    size = config.teacher.image_size
    image = torch.zeros(1, 3, size, size, dtype=torch.uint8)

    def one_step():
        return pipeline.features(image, ["reach the goal"], generator=torch.Generator())

    with flop_counter() as counter:
        features = one_step()
    teacher_flops = counter.get_total_flops()
    section = config.decouplers
    expected = (section.semantic.num_frames, section.semantic.in_channels)
    if features.shape[1:3] != expected:
        raise SystemExit(f"tiny teacher features {tuple(features.shape)} do not fit {expected}")
    branches = section.branches()
    flops = {name: decoupler_flops(cfg) for name, cfg in branches.items()}
    both = sum(flops.values())
    models = {name: model.eval() for name, model in build_decouplers(section).items()}
    reference = {
        name: torch.randn(1, cfg.ref_tokens, cfg.ref_dim) for name, cfg in branches.items()
    }

    def decouple():
        for name, model in models.items():
            model(features, reference[name])

    with torch.inference_mode():
        teacher_ms = median_ms(one_step, repeats)
        decoupler_ms = median_ms(decouple, repeats)
    print("(a) cost per clip, both decouplers vs the teacher's one-step pass")
    print(
        f"  tiny ({config.teacher.image_size} px, {section.semantic.num_frames} frames, "
        f"{tuple(features.shape[2:])} features):"
    )
    print(
        f"    FLOPs: teacher one-step {teacher_flops / 1e9:.3f} G; decouplers "
        f"{flops['semantic'] / 1e9:.3f} + {flops['geometric'] / 1e9:.3f} = {both / 1e9:.3f} G "
        f"-> {100 * both / teacher_flops:.1f}%"
    )
    print(
        f"    CPU wall, 1 thread, median of {repeats}: teacher one-step {teacher_ms:.1f} ms; "
        f"decouplers {decoupler_ms:.1f} ms -> {100 * decoupler_ms / teacher_ms:.1f}%"
    )
    for label, setting in (
        ("svam full scale (token_pool 2)", full_scale_decouplers()),
        ("S-VAM published", published_decouplers()),
    ):
        total = sum(decoupler_flops(cfg) for cfg in setting.branches().values()) / 1e9
        print(
            f"  {label}: {total:.0f} GFLOPs vs {PUBLISHED_ONE_STEP_GFLOPS:,.0f} -> "
            f"{100 * total / PUBLISHED_ONE_STEP_GFLOPS:.1f}%"
        )


def synthetic_cache(root: Path, config: Config, train: int, val: int) -> Path:
    """Random arrays of the tiny config's cache shapes (one-step features kept)."""
    rng = np.random.default_rng(0)
    frames, size = config.data.clip_frames, config.teacher.image_size
    sem, geo = config.decouplers.semantic, config.decouplers.geometric
    latent = sem.feature_size

    def half(*shape):
        return rng.standard_normal(shape, dtype=np.float32).astype(np.float16)

    def samples():
        for index in range(train + val):
            arrays = {
                "semantic": half(frames, sem.target_tokens, sem.target_dim),
                "geometric": half(frames, geo.target_tokens, geo.target_dim),
                "semantic_ref": half(sem.target_tokens, sem.target_dim),
                "geometric_ref": half(geo.target_tokens, geo.target_dim),
                "onestep": half(frames, sem.in_channels, latent, latent),
                "frames": rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8),
                "actions": np.zeros((config.data.action_horizon, 4), np.float32),
                "state": np.zeros((frames, 4), np.float32),
            }
            split = "train" if index < train else "val"
            meta = {"task": "t", "instruction": "do t", "episode": f"e{index}", "start": 0}
            yield f"clip-{index:05d}", arrays, {**meta, "split": split}

    return write_teacher_cache(
        root,
        samples(),
        clips_per_shard=32,
        teacher_fingerprint="synthetic",
        semantic_fingerprint=f"{sem.encoder}-synthetic",
        geometric_fingerprint=f"{geo.encoder}-synthetic",
        dims={
            "semantic": [sem.target_tokens, sem.target_dim],
            "geometric": [geo.target_tokens, geo.target_dim],
            "clip_frames": frames,
        },
        encoders=dataclasses.asdict(EncodersConfig()),
        num_inference_steps=config.teacher.num_inference_steps,
        teacher_runtime=TeacherRuntime.from_config(config.teacher).to_record(),
        run_seed=0,
    )


def throughput(config: Config, overrides: list[str], cache: Path, steps: int, work: Path) -> None:
    batch = config.distill.batch_size
    print(f"(b) training throughput on {cache}, batch {batch}, {torch.get_num_threads()} threads")
    for workers in (0, 2):
        loader = teacher_cache_loader(
            cache,
            "train",
            batch_size=batch,
            num_workers=workers,
            arrays=[*TARGETS, "onestep"],
            shuffle=True,
            shuffle_buffer=config.data.shuffle_buffer,
            repeat=True,
        )
        stream = iter(loader)
        next(stream)  # worker start-up
        start = time.perf_counter()
        for _ in range(steps):
            next(stream)
        elapsed = time.perf_counter() - start
        print(f"  loader alone, {workers} workers: {steps * batch / elapsed:7.1f} clips/s")
    for workers in (0, 2):
        run = load_config(
            "tiny",
            [
                *overrides,
                f"run.root={work}",
                f"run.name=bench-{workers}",
                f"distill.cache={cache}",
                f"distill.steps={steps}",
                f"distill.eval_every={steps}",
                f"distill.checkpoint_every={steps}",
                "distill.depth_probe=false",
                "distill.probe_clips=64",
                "distill.eval_clips=32",
                f"distill.num_workers={workers}",
            ],
        )
        distiller = Distiller(run, distill_paths(run))
        distiller.train()
        timing = distiller.timing
        train_step = timing["step"] - timing["features"]  # the loop's steps include features
        loop = timing["data"] + timing["step"]
        print(
            f"  training, {workers} loader workers: {steps * batch / loop:7.1f} clips/s "
            f"({steps} steps: waiting for data {100 * timing['data'] / loop:.0f}%, features "
            f"to device {100 * timing['features'] / loop:.0f}%, training step "
            f"{100 * train_step / loop:.0f}%); step alone {steps * batch / train_step:.1f} "
            "clips/s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache", type=Path, help="teacher cache (default: a synthetic one)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    config = load_config("tiny", args.overrides)
    threads = torch.get_num_threads()
    cost(config, args.repeats)
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        work = Path(tmp)
        cache = args.cache or synthetic_cache(work / "cache", config, train=512, val=64)
        throughput(config, args.overrides, cache, args.steps, work)


if __name__ == "__main__":
    main()
