"""Benchmark the decouplers' cost: FLOPs per clip against the teacher's one-step pass, CPU latency.

    python scripts/bench_decoupler.py [--teacher-gflops 2749] [--tiny-teacher-gflops G] [--repeats 50]

FLOPs are counted with torch's FLOP counter on the `meta` device (forward, one clip, both branches).
Full scale: S-VAM's published decouplers, svam's default (`full_scale_decouplers`) and a few
other settings of the cost knobs, as a fraction of SVD's one-step pass up to up-block 1 (2,749
GFLOPs at 256 px and 16 frames, DESIGN.md). Tiny: the default configs; their fraction needs the
tiny teacher's one-step FLOPs, which depend on the teacher config: pass them with
--tiny-teacher-gflops (the default TeacherConfig's UNet pass to up-block 1 counted 1.82 GFLOPs per
clip when this script was written). CPU wall time: median over repeats of one clip through each
tiny decoupler and through both, with 1 thread and with torch's default thread count.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from svam.distill import (
    DecouplersConfig,
    build_decouplers,
    decoupler_flops,
    decoupler_parameters,
    example_inputs,
    full_scale_decouplers,
    published_decouplers,
)


def variant(base: DecouplersConfig, **changes) -> DecouplersConfig:
    return DecouplersConfig(
        **{name: dataclasses.replace(cfg, **changes) for name, cfg in base.branches().items()}
    )


def cost_row(label: str, config: DecouplersConfig, teacher_gflops: float | None) -> None:
    flops = {name: decoupler_flops(cfg) / 1e9 for name, cfg in config.branches().items()}
    params = {name: decoupler_parameters(cfg) / 1e6 for name, cfg in config.branches().items()}
    total = sum(flops.values())
    share = f"{100 * total / teacher_gflops:5.1f}%" if teacher_gflops else "  n/a"
    print(
        f"  {label:<34} {params['semantic']:7.2f} {params['geometric']:7.2f}"
        f" {flops['semantic']:9.2f} {flops['geometric']:9.2f} {total:9.2f}   {share}"
    )


def header(title: str) -> None:
    print(title)
    print(
        f"  {'setting':<34} {'Mparams':>7} {'(geo)':>7} {'GFLOPs':>9} {'(geo)':>9} {'both':>9}"
        "   of one-step"
    )


def cpu_latency(config: DecouplersConfig, repeats: int, warmup: int = 5) -> dict[str, float]:
    """Median milliseconds per clip (batch 1) for each branch and for both in sequence."""
    torch.manual_seed(0)
    models = build_decouplers(config)
    inputs = {name: example_inputs(model.config) for name, model in models.items()}
    runs = {name: [(model.eval(), inputs[name])] for name, model in models.items()}
    runs["both"] = [pair for pairs in runs.values() for pair in pairs]
    result = {}
    with torch.inference_mode():
        for name, pairs in runs.items():
            times = []
            for _ in range(warmup + repeats):
                start = time.perf_counter()
                for model, (features, reference) in pairs:
                    model(features, reference)
                times.append(1000 * (time.perf_counter() - start))
            result[name] = statistics.median(times[warmup:])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--teacher-gflops", type=float, default=2749.0, help="full-scale one-step pass, GFLOPs"
    )
    parser.add_argument(
        "--tiny-teacher-gflops", type=float, help="tiny teacher's one-step pass per clip, GFLOPs"
    )
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()

    published, default = published_decouplers(), full_scale_decouplers()
    header(f"Full scale, per clip (16 frames), vs {args.teacher_gflops:,.0f} GFLOPs one-step pass")
    cost_row("published (S-VAM)", published, args.teacher_gflops)
    cost_row("svam default: published, pool 2", default, args.teacher_gflops)
    cost_row("  pool 4 (4x4 grid)", variant(default, token_pool=4), args.teacher_gflops)
    cost_row("  hidden 768, pool 2", variant(default, hidden_dim=768), args.teacher_gflops)
    cost_row(
        "  hidden 640, pool 1", variant(default, hidden_dim=640, token_pool=1), args.teacher_gflops
    )
    cost_row(
        "  2 layers, pool 1", variant(default, num_layers=2, token_pool=1), args.teacher_gflops
    )

    tiny = DecouplersConfig()
    print()
    header(f"Tiny (defaults), per clip ({tiny.semantic.num_frames} frames)")
    cost_row("tiny", tiny, args.tiny_teacher_gflops)
    if args.tiny_teacher_gflops is None:
        print(
            "  (pass --tiny-teacher-gflops to see the fraction of the tiny teacher's one-step pass)"
        )
    for threads in sorted({1, torch.get_num_threads()}):
        torch.set_num_threads(threads)
        latency = cpu_latency(tiny, args.repeats)
        print(
            f"Tiny CPU wall time per clip, {threads} thread(s), median of {args.repeats}:"
            f" semantic {latency['semantic']:.2f} ms, geometric {latency['geometric']:.2f} ms,"
            f" both {latency['both']:.2f} ms"
        )


if __name__ == "__main__":
    main()
