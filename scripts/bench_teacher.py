"""Benchmark the teacher: one-step features against N-step sampling, the partial UNet pass against a
full forward, and training throughput with peak memory.

    .venv/bin/python scripts/bench_teacher.py                    # tiny config, random init, CPU
    .venv/bin/python scripts/bench_teacher.py --teacher runs/tiny/teacher --json bench.json

Every figure is a median over `--repeats` runs, all from one process on the same teacher, so the
ratios compare like with like on a noisy machine. Sampling is timed without decoding (the VAE
decode is timed on its own): the ratio to one-step features approaches N when the partial pass
costs about one UNet step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from svam.config import Config, load_config
from svam.flops import flop_counter
from svam.teachers.modeling_teacher import VideoTeacher, unet_forward
from svam.teachers.pipeline_teacher import TeacherPipeline
from svam.teachers.train import TeacherTrainer


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: allocator, oneDNN primitives
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def flops(fn: Callable[[], object]) -> int:
    with flop_counter() as counter:
        fn()
    return counter.get_total_flops()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def bench_inference(pipe: TeacherPipeline, batch: int, repeats: int, steps: list[int]) -> dict:
    teacher = pipe.teacher
    config = teacher.config
    size = config.image_size
    image = torch.randint(
        0, 256, (batch, 3, size, size), generator=torch.Generator().manual_seed(0)
    )
    image = image.to(torch.uint8)
    instruction = "press the button from the top"

    def generator() -> torch.Generator:
        return torch.Generator().manual_seed(0)

    one_step = median_seconds(
        lambda: pipe.features(image, instruction, generator=generator()), repeats
    )
    sampling = []
    for n in steps:
        seconds = median_seconds(
            lambda n=n: pipe(
                image, instruction, generator=generator(), num_inference_steps=n, decode=False
            ),
            repeats,
        )
        sampling.append({"steps": n, "seconds": seconds, "x_one_step": seconds / one_step})
    latents = pipe(image, instruction, generator=generator(), stop_step=1, decode=False).denoised
    decode = median_seconds(lambda: teacher.decode_latents(latents), repeats)

    # The UNet alone on the inputs of a first sampling step: partial pass vs full forward.
    inputs = pipe.first_step_inputs(image, instruction, generator=generator())
    blocks = list(config.feature_up_blocks)

    def partial():
        return unet_forward(teacher.unet, *inputs, capture=blocks, stop_after_capture=True)

    def full():
        return unet_forward(teacher.unet, *inputs)

    partial_s, full_s = median_seconds(partial, repeats), median_seconds(full, repeats)
    partial_flops, full_flops = flops(partial), flops(full)
    return {
        "batch": batch,
        "one_step_features_s": one_step,
        "sampling": sampling,
        "vae_decode_s": decode,
        "unet_partial_s": partial_s,
        "unet_full_s": full_s,
        "partial_over_full_time": partial_s / full_s,
        "unet_partial_gflops": partial_flops / 1e9,
        "unet_full_gflops": full_flops / 1e9,
        "partial_over_full_flops": partial_flops / full_flops,
        "feature_shape": list(pipe.features(image, instruction, generator=generator()).shape),
    }


def synthetic_stream(config: Config, distinct_clips: int):
    """Endless batches of random clips; keys repeat every `distinct_clips` clips."""
    data, size = config.data, config.teacher.image_size
    generator = torch.Generator().manual_seed(0)
    index = 0
    while True:
        keys = [f"clip-{(index + i) % distinct_clips}" for i in range(data.batch_size)]
        index += data.batch_size
        frames = torch.randint(
            0, 256, (data.batch_size, data.clip_frames, 3, size, size), generator=generator
        )
        yield {
            "frames": frames.to(torch.uint8),
            "instruction": ["reach the goal"] * data.batch_size,
            "task": ["reach-v3"] * data.batch_size,
            "key": keys,
        }


def bench_training(config: Config, steps: int, log_every: int, distinct_clips: int) -> dict:
    train = dataclasses.replace(
        config.train_teacher,
        steps=steps,
        vae_steps=0,
        log_every=log_every,
        sample_every=10**9,
        checkpoint_every=10**9,
        resume=None,
    )
    config = dataclasses.replace(config, train_teacher=train)
    rss_before = peak_rss_mib()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = TeacherTrainer(
            config,
            train_stream=lambda skip_batches: synthetic_stream(config, distinct_clips),
            eval_batches=lambda: [next(synthetic_stream(config, distinct_clips))],
            output_dir=Path(tmp) / "teacher",
        )
        trainer.train()
    windows = trainer.metrics["train/clips_per_s"]
    steady = [windows[s] for s in sorted(windows)[1:]] or list(windows.values())
    return {
        "batch_clips": config.data.batch_size,
        "frames": config.data.clip_frames,
        "distinct_clips": distinct_clips,
        "latent_cache": config.train_teacher.cache_latents,
        "steps": steps,
        "clips_per_s": statistics.median(steady),
        "peak_rss_mib_before": rss_before,
        "peak_rss_mib_after": peak_rss_mib(),
        "unet_params_m": sum(p.numel() for p in trainer.teacher.unet.parameters()) / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument(
        "--teacher", help="a saved teacher directory (default: random init from the config)"
    )
    parser.add_argument("--batch", type=int, default=1, help="observations per call (inference)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5, 25])
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    config = load_config(args.config)
    if args.teacher:
        teacher = VideoTeacher.from_pretrained(args.teacher, config=config.teacher)
    else:
        teacher = VideoTeacher.from_config(config.teacher, seed=0)
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "config": args.config,
        "teacher": args.teacher or "random init",
        "unet_params_m": sum(p.numel() for p in teacher.unet.parameters()) / 1e6,
        "inference": bench_inference(
            TeacherPipeline(teacher), args.batch, args.repeats, args.steps
        ),
        "training": [
            bench_training(config, args.train_steps, 10, distinct_clips=2 * config.data.batch_size),
            bench_training(
                dataclasses.replace(
                    config,
                    train_teacher=dataclasses.replace(config.train_teacher, cache_latents=False),
                ),
                args.train_steps,
                10,
                distinct_clips=10**9,
            ),
        ],
    }
    inference = results["inference"]
    print(
        f"teacher: {results['teacher']} ({results['unet_params_m']:.2f}M-parameter UNet), {results['machine']}"
    )
    print(
        f"one-step features, batch {inference['batch']}: {inference['one_step_features_s'] * 1e3:.1f} ms "
        f"-> {tuple(inference['feature_shape'])}"
    )
    print("| sampling steps | seconds | x one-step features |")
    print("|---:|---:|---:|")
    for row in inference["sampling"]:
        print(f"| {row['steps']} | {row['seconds']:.3f} | {row['x_one_step']:.1f} |")
    print(f"VAE decode of the clip: {inference['vae_decode_s'] * 1e3:.1f} ms")
    print(
        f"UNet partial pass (up-blocks {teacher.config.feature_up_blocks}) vs full forward: "
        f"{inference['unet_partial_s'] * 1e3:.1f} / {inference['unet_full_s'] * 1e3:.1f} ms "
        f"= {inference['partial_over_full_time']:.0%} of the time, "
        f"{inference['unet_partial_gflops']:.2f} / {inference['unet_full_gflops']:.2f} GFLOPs "
        f"= {inference['partial_over_full_flops']:.0%} of the FLOPs"
    )
    for row in results["training"]:
        print(
            f"training ({row['batch_clips']} clips x {row['frames']} frames per step, latent cache "
            f"{'hit' if row['latent_cache'] else 'off'}): {row['clips_per_s']:.1f} clips/s; "
            f"peak RSS {row['peak_rss_mib_before']:.0f} -> {row['peak_rss_mib_after']:.0f} MiB"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
