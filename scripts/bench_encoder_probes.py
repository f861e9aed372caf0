"""Linear probes from geometric tokens to depth: a random-init Depth Anything 3 against one
pretrained on the simulator (`svam pretrain-encoders`), on the same frames.

    .venv/bin/python scripts/bench_encoder_probes.py --run bench --pretrained runs/bench/encoders/geometric

A closed-form ridge (distill/fidelity.py's `RidgeRegression`, the probe distill fits) maps each
token (encoders.geometric_layer, the distillation targets) to the log depth of its patch, fitted on
train frames and scored by AbsRel (and delta < 1.25) on test frames no fit saw. Prints both.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch

from svam.config import load_config
from svam.data.episodes import clip_loader
from svam.distill.fidelity import DEPTH_SUBPATCH, DepthProbe, RidgeRegression, depth_patches
from svam.rundir import RunDir
from svam.teachers.encoders import GeometricEncoder
from svam.teachers.pretrain import MIN_DEPTH_M, frame_batches


def frames(config, episodes: Path, split: str, count: int) -> list[dict]:
    loader = clip_loader(
        episodes, config.data, split, seed=config.run.seed, shuffle=split == "train"
    )
    return list(itertools.islice(frame_batches(loader, 32), max(1, count // 32)))


@torch.no_grad()
def probe(encoder: GeometricEncoder, train: list[dict], test: list[dict], max_depth: float) -> dict:
    grid = int(round(encoder.num_tokens**0.5))
    ridge = RidgeRegression(encoder.out_dim, DEPTH_SUBPATCH**2)

    def pairs(batch):
        tokens = encoder(batch["frames"][:, None])  # (B, 1, P, D)
        depth = batch["depth"][:, None].float().clamp(MIN_DEPTH_M, max_depth)
        return tokens, depth

    for batch in train:
        tokens, depth = pairs(batch)
        ridge.update(tokens.flatten(0, 2), depth_patches(depth, grid).flatten(0, 2))
    weight, bias = ridge.solve(1e-3)
    decode = DepthProbe(weight.float(), bias.float(), grid)
    errors, deltas, count = 0.0, 0.0, 0
    for batch in test:
        tokens, depth = pairs(batch)
        predicted = decode(tokens).flatten(0, 1)  # depth (B, grid*sub, grid*sub)
        truth = torch.nn.functional.adaptive_avg_pool2d(depth.flatten(0, 1), predicted.shape[-1])
        errors += float(((predicted - truth).abs() / truth).mean()) * len(predicted)
        ratio = torch.maximum(predicted / truth, truth / predicted)
        deltas += float((ratio < 1.25).float().mean()) * len(predicted)
        count += len(predicted)
    return {"abs_rel": errors / count, "delta1": deltas / count, "test_frames": count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="bench")
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--pretrained", type=Path, required=True)
    parser.add_argument("--train-frames", type=int, default=1024)
    parser.add_argument("--test-frames", type=int, default=512)
    args = parser.parse_args()
    config = load_config(args.config, [f"run.name={args.run}"])
    episodes = RunDir.from_config(config).episodes
    train = frames(config, episodes, "train", args.train_frames)
    test = frames(config, episodes, "test", args.test_frames)
    cfg, max_depth = config.encoders, config.pretrain_encoders.max_depth_m
    for name, weights in (("random-init", None), ("pretrained", args.pretrained)):
        encoder = GeometricEncoder(
            cfg.geometric_model,
            cfg.geometric_image_size,
            weights,
            layer=cfg.geometric_layer,
            seed=cfg.init_seed,
        )
        result = probe(encoder, train, test, max_depth)
        print(
            f"{name}: linear probe tokens -> depth on {result['test_frames']} test frames: AbsRel "
            f"{result['abs_rel']:.3f}, delta<1.25 {result['delta1']:.3f}"
        )


if __name__ == "__main__":
    main()
