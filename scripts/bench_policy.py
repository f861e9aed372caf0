"""Latency of one control step (observation in, action chunk out, batch 1) per foresight mode.

    .venv/bin/python scripts/bench_policy.py                    # tiny config, random init
    .venv/bin/python scripts/bench_policy.py --steps 50 --multistep 25 --device cuda
    .venv/bin/python scripts/bench_policy.py --modes onestep,shortcut,partial:0.5,multistep:2

Builds the tiny config's teacher, encoders and decouplers (random init; latency does not depend
on the weights), a policy per mode (`onestep`, `shortcut`, `multistep:K`, `partial:F`) with its
data dims,
and times `ShortcutPolicy.predict` on one random 64x64 frame: median and p95 over `--steps`
steps after `--warmup`. The breakdown times each part inside the same steps with forward hooks
and method wrappers: the teacher (one-step pass, or K-step generation and decoding), the encoders
on the current frame (shortcut) or on the generated frames (multistep), the decouplers, the
aggregator, the head's context encoding and each DDIM step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections import defaultdict

import numpy as np
import torch

from svam.config import load_config
from svam.distill.modeling_decoupler import build_decouplers
from svam.policy.configuration_policy import parse_mode
from svam.policy.modeling_policy import FrozenParts, PolicyNet, ShortcutPolicy, ShortcutPolicyConfig
from svam.policy.train import models_for
from svam.teachers.encoders import build_encoders
from svam.teachers.modeling_teacher import VideoTeacher
from svam.teachers.pipeline_teacher import TeacherPipeline


class Timer:
    """Accumulates seconds per part within one control step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.parts: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def wrap(self, name: str, function):
        def timed(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            out = function(*args, **kwargs)
            self.sync()
            self.parts[name] += time.perf_counter() - start
            self.counts[name] += 1
            return out

        return timed

    def hook(self, name: str, module: torch.nn.Module) -> None:
        starts = []

        def before(*_):
            self.sync()
            starts.append(time.perf_counter())

        def after(*_):
            self.sync()
            self.parts[name] += time.perf_counter() - starts.pop()
            self.counts[name] += 1

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)


class TimedPipeline:
    """The teacher pipeline with its one-step pass and its K-step generation timed."""

    def __init__(self, pipeline: TeacherPipeline, timer: Timer):
        self.teacher = pipeline.teacher
        self.features = timer.wrap("teacher one-step pass", pipeline.features)
        self._generate = timer.wrap("teacher K UNet steps", pipeline.__call__)

    def __call__(self, *args, **kwargs):
        return self._generate(*args, **kwargs)


def build(config, mode: str, frozen: FrozenParts, feature_steps: int, device) -> ShortcutPolicy:
    teacher = frozen.pipeline.teacher.config
    frame = torch.zeros(1, 3, teacher.image_size, teacher.image_size, dtype=torch.uint8)
    features = frozen.pipeline.features(frame, [""], num_inference_steps=feature_steps)
    _, frames, channels, side, _ = features.shape
    dims = {
        "onestep": (side * side, channels),
        "semantic": (frozen.semantic.num_tokens, frozen.semantic.out_dim),
        "geometric": (frozen.geometric.num_tokens, frozen.geometric.out_dim),
    }
    models = models_for(
        config.policy,
        mode,
        dims,
        frames=frames,
        action=(config.data.action_horizon, 4),
        state_dim=4,
        text=(teacher.max_text_length, teacher.text_hidden_size),
    )
    policy_config = ShortcutPolicyConfig(
        mode=parse_mode(mode).policy_kind,
        models=models,
        feature_steps=feature_steps,
        use_state=True,
        decoupler_configs={b: dataclasses.asdict(m.config) for b, m in frozen.decouplers.items()},
    )
    torch.manual_seed(0)
    net = PolicyNet(policy_config)
    net.action_normalizer.fit([torch.rand(64, 4) * 2 - 1])
    net.state_normalizer.fit([torch.rand(64, 4)])
    return ShortcutPolicy(policy_config, net.to(device), frozen, mode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--multistep", type=int, help="K of the `multistep` mode (default: the config's N)"
    )
    parser.add_argument("--modes", default="onestep,shortcut,multistep")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = load_config(args.config)
    feature_steps = config.cache.num_inference_steps or config.teacher.num_inference_steps
    teacher = VideoTeacher.from_config(config.teacher, seed=0).to(device).eval()
    pipeline = TeacherPipeline(teacher)
    semantic, geometric = build_encoders(config.encoders, device)
    decouplers = {
        name: model.to(device).eval().requires_grad_(False)
        for name, model in build_decouplers(config.decouplers).items()
    }
    frozen = FrozenParts(pipeline, semantic.eval(), geometric.eval(), decouplers)

    timer = Timer(device)
    frozen.pipeline = TimedPipeline(pipeline, timer)
    teacher.decode_latents = timer.wrap("teacher decode (in generation)", teacher.decode_latents)
    timer.hook("semantic encoder (DINOv2)", semantic)
    timer.hook("geometric encoder (DA3)", geometric)
    for name, model in decouplers.items():
        timer.hook(f"{name} decoupler", model)

    size = config.teacher.image_size
    generator = torch.Generator().manual_seed(0)
    frame = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8, generator=generator)
    state = torch.rand(1, 4)
    modes = []
    for mode in args.modes.split(","):
        modes.append(
            f"multistep:{args.multistep or feature_steps}" if mode == "multistep" else mode
        )
    results = {}
    print(
        f"bench_policy: {args.config} config, random init, {device}, {torch.get_num_threads()} "
        f"threads; {args.warmup} warm-up + {args.steps} timed control steps per mode"
    )
    for mode in modes:
        policy = build(config, mode, frozen, feature_steps, device)
        head = policy.net.head
        timer.hook("aggregator", policy.net.aggregator)
        head.encode = timer.wrap("head context (once per chunk)", head.encode)
        head.denoise = timer.wrap("head DDIM step", head.denoise)
        times = []
        for step in range(args.warmup + args.steps):
            timer.parts.clear()
            timer.counts.clear()
            timer.sync()
            start = time.perf_counter()
            with torch.no_grad():
                policy.predict(frame, "reach the goal", state, generator=generator)
            timer.sync()
            elapsed = time.perf_counter() - start
            if step >= args.warmup:
                times.append(elapsed)
                if step == args.warmup:
                    totals = defaultdict(float)
                    counts = dict(timer.counts)
                for name, value in timer.parts.items():
                    totals[name] += value
        ms = [1000 * t for t in times]
        breakdown = {name: 1000 * value / len(times) for name, value in totals.items()}
        if "teacher K UNet steps" in breakdown:  # report the UNet steps and the decode apart
            decode = breakdown.get("teacher decode (in generation)", 0.0)
            breakdown["teacher K UNet steps"] -= decode
            counts["teacher K UNet steps"] = 1
        per_call = {name: breakdown[name] / counts[name] for name in breakdown}
        results[mode] = {
            "median_ms": statistics.median(ms),
            "p95_ms": float(np.percentile(ms, 95)),
            "mean_ms": statistics.fmean(ms),
            "steps": len(ms),
            "breakdown_ms": breakdown,
            "calls_per_step": counts,
            "per_call_ms": per_call,
        }
        print(
            f"\n{mode}: median {results[mode]['median_ms']:.1f} ms, p95 "
            f"{results[mode]['p95_ms']:.1f} ms over {len(ms)} steps"
        )
        accounted = sum(breakdown.values())
        for name, value in sorted(breakdown.items(), key=lambda kv: -kv[1]):
            calls = counts[name]
            each = f" ({calls} x {per_call[name]:.2f} ms)" if calls > 1 else ""
            print(
                f"  {name:<32} {value:8.2f} ms {100 * value / results[mode]['mean_ms']:5.1f}%{each}"
            )
        other = results[mode]["mean_ms"] - accounted
        print(f"  {'other (text lookup, glue)':<32} {other:8.2f} ms")
        # undo this mode's head/aggregator timers (the next mode builds its own)
        del head.encode, head.denoise
    if "shortcut" in results and "onestep" in results:
        short, one = results["shortcut"]["median_ms"], results["onestep"]["median_ms"]
        print(f"\nshortcut overhead over onestep: +{short - one:.1f} ms ({short / one:.2f}x)")
    for mode in results:
        if "shortcut" in results and mode.startswith(("multistep", "partial")):
            speedup = results[mode]["median_ms"] / results["shortcut"]["median_ms"]
            print(f"shortcut speed-up over {mode}: {speedup:.1f}x")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
