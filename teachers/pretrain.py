"""`svam pretrain-encoders`: a geometric encoder that sees the scene, for the embedded default.

No weights can be downloaded here, and a random-init Depth Anything 3 yields tokens that carry
little about the scene, so every foresight mode's targets look alike. This stage trains the
configured DA3 architecture (`encoders.geometric_model` at `encoders.geometric_image_size`) with
its own DPT depth head on the train episodes' frames, supervised by the simulator's metric depth
(L1 on log depth), on the one training loop (accelerate, checkpoints, exact resume). It writes a
Depth Anything 3 directory (config.json + model.safetensors, DA3's own `save_pretrained`), which
`encoders.geometric_weights` loads exactly as it loads real weights. The stage never runs when a
weights path is given to the encoders; point `encoders.geometric_weights` at its output to use it.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from svam.config import Config, to_dict
from svam.hashing import file_digest, json_digest
from svam.locking import output_lock
from svam.rundir import RunDir
from svam.teachers.encoders import GeometricEncoder, _import_da3, seeded_init
from svam.training import LoopSettings, TrainingLoop, TrainingStage

RECORD_NAME = "pretrain.json"
MIN_DEPTH_M = 0.05


class PretrainError(ValueError):
    """A pretraining setup that cannot run; the message is one line naming the key or file."""


class DepthNet(nn.Module):
    """DA3's backbone and DPT head as one trainable module: uint8 frames -> depth maps."""

    def __init__(self, encoder: GeometricEncoder):
        super().__init__()
        self.encoder = encoder  # its preprocessing (resize, ImageNet statistics)
        self.backbone, self.head = encoder.backbone, encoder.head

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> (B, S, S) depth in metres."""
        x = self.encoder.preprocess(frames[:, None])
        feats, _ = self.backbone(x, export_feat_layers=[])
        feats = [(tokens.float(), camera.float()) for tokens, camera in feats]
        size = self.encoder.image_size
        return self.head(feats, size, size, patch_start_idx=0)["depth"][:, 0].float()


def depth_truth(depth: torch.Tensor, size: torch.Size, max_depth: float) -> torch.Tensor:
    """Metric depth (B, H, W) area-resized to a prediction's grid `size`, clamped to the range
    trained on (the skybox reads tens of metres)."""
    truth = F.interpolate(depth[:, None].float(), size=size, mode="area")[:, 0]
    return truth.clamp(MIN_DEPTH_M, max_depth)


def log_depth_l1(predicted: torch.Tensor, depth: torch.Tensor, max_depth: float) -> torch.Tensor:
    """Mean |log predicted - log truth|."""
    truth = depth_truth(depth, predicted.shape[-2:], max_depth)
    return (predicted.clamp_min(1e-4).log() - truth.log()).abs().mean()


def abs_rel(predicted: torch.Tensor, depth: torch.Tensor, max_depth: float) -> torch.Tensor:
    truth = depth_truth(depth, predicted.shape[-2:], max_depth)
    return ((predicted - truth).abs() / truth).mean()


def frame_batches(loader, batch_size: int) -> Iterator[dict[str, Any]]:
    """Clip batches -> batches of `batch_size` single frames with their depth and keys."""
    frames, depths, keys = [], [], []
    for clips in loader:
        if "depth" not in clips:
            raise PretrainError("the episodes hold no depth: the geometric encoder cannot learn it")
        count = clips["frames"].shape[1]
        frames.append(clips["frames"].flatten(0, 1))
        depths.append(clips["depth"].flatten(0, 1))
        keys += [f"{key}/{t}" for key in clips["key"] for t in range(count)]
        while len(keys) >= batch_size:
            all_frames, all_depths = torch.cat(frames), torch.cat(depths)
            yield {
                "frames": all_frames[:batch_size],
                "depth": all_depths[:batch_size],
                "key": keys[:batch_size],
            }
            frames, depths = [all_frames[batch_size:]], [all_depths[batch_size:]]
            keys = keys[batch_size:]


class GeometricPretrainer(TrainingStage):
    """One `svam pretrain-encoders` run on the one training loop."""

    name = "pretrain-encoders"
    section = "pretrain_encoders"
    error = PretrainError

    def __init__(self, config: Config, episodes: Path, output: Path):
        self.config, self.args = config, config.pretrain_encoders
        self.episodes, self.output = episodes, output
        self.key = json_digest(
            {
                "encoders": {
                    k: v for k, v in to_dict(config.encoders).items() if "weights" not in k
                },
                "pretrain": {
                    k: v
                    for k, v in to_dict(self.args).items()
                    if k not in ("episodes", "output_dir", "resume", "log_every")
                },
                "data": to_dict(config.data),
                "seed": config.run.seed,
                "episodes": file_digest(episodes / "manifest.json"),
            }
        )
        self.training = TrainingLoop(
            self,
            LoopSettings.of(self.args),
            work_dir=output.with_name(output.name + "-train"),
            output_dir=output,
            tb_dir=RunDir.from_config(config).tb / "pretrain-encoders",
        )

    def train(self) -> Path:
        return self.training.run()

    def setup(self) -> None:
        cfg = self.config.encoders
        self.encoder = GeometricEncoder(
            cfg.geometric_model,
            cfg.geometric_image_size,
            seed=cfg.init_seed,
            device=self.loop.device,
        )

    def build(self) -> nn.Module:
        net = DepthNet(self.encoder).to(self.loop.device)
        net.backbone.requires_grad_(True).train()
        net.head.requires_grad_(True).train()
        return net

    def _loader(self, split: str, **options: Any):
        from svam.data.episodes import clip_loader

        return clip_loader(
            self.episodes, self.config.data, split, seed=self.config.run.seed, **options
        )

    def stream(self, consumed: int) -> Iterator[dict[str, Any]]:
        batches = frame_batches(
            self._loader("train", shuffle=True, repeat=True), self.args.batch_size
        )
        return itertools.islice(batches, consumed, None)

    def loss(self, model: nn.Module, batch: dict[str, Any], micro_step: int):
        device = self.loop.device
        predicted = model(batch["frames"].to(device))
        return log_depth_l1(predicted, batch["depth"].to(device), self.args.max_depth_m), {}

    @torch.no_grad()
    def validate(self, model: nn.Module, step: int) -> dict[str, float]:
        model.eval()
        batches = frame_batches(self._loader("val", shuffle=False), self.args.batch_size)
        errors, count = 0.0, 0
        for batch in itertools.islice(
            batches, max(1, self.args.val_frames // self.args.batch_size)
        ):
            predicted = model(batch["frames"].to(self.loop.device))
            errors += float(
                abs_rel(predicted, batch["depth"].to(self.loop.device), self.args.max_depth_m)
            ) * len(predicted)
            count += len(predicted)
        model.train()
        return {"val/abs_rel": errors / max(count, 1)}

    def resume_record(self) -> dict[str, Any]:
        return {"key": self.key}

    def export(self, model: nn.Module, step: int, into: Path) -> None:
        """A Depth Anything 3 directory with the trained backbone and head (DA3's own format)."""
        if not self.loop.is_main:
            return
        da3_class, _ = _import_da3()
        cfg = self.config.encoders
        with (
            seeded_init(cfg.init_seed, torch.device("cpu")),
            contextlib.redirect_stdout(io.StringIO()),
        ):
            da3 = da3_class(model_name=cfg.geometric_model)
        net = getattr(da3.model, "da3", da3.model)
        net.backbone.load_state_dict(model.backbone.state_dict())
        net.head.load_state_dict(model.head.state_dict())
        da3.save_pretrained(into)
        # The loop validated after the last step (unless eval_every is 0, or it resumed there).
        error = self.loop.metrics.get("val/abs_rel", {}).get(step)
        if error is None:
            error = self.validate(model, step)["val/abs_rel"]
        record = {"key": self.key, "steps": step, "val_abs_rel": error}
        (into / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
        print(
            f"pretrain-encoders: geometric encoder ({cfg.geometric_model}, val AbsRel "
            f"{error:.3f}) -> {self.output}; load it with "
            f"encoders.geometric_weights={self.output}"
        )


def pretrain_paths(config: Config) -> tuple[Path, Path]:
    run, args = RunDir.from_config(config), config.pretrain_encoders
    episodes = Path(args.episodes) if args.episodes else run.episodes
    output = Path(args.output_dir) if args.output_dir else run.root / "encoders" / "geometric"
    return episodes, output


def pretrain_encoders(config: Config, out_dir: str | Path | None = None) -> Path:
    """`svam pretrain-encoders`: returns the geometric encoder's directory."""
    if config.encoders.geometric_weights:
        raise PretrainError(
            f"encoders.geometric_weights={config.encoders.geometric_weights}: weights are given, "
            "so there is nothing to pretrain (set it to null to train one on the simulator)"
        )
    if out_dir is not None:
        config.pretrain_encoders.output_dir = str(out_dir)
    episodes, output = pretrain_paths(config)
    if not (episodes / "manifest.json").is_file():
        raise PretrainError(f"no episode shards at {episodes}: run `svam collect` first")
    with output_lock(output):
        return GeometricPretrainer(config, episodes, output).train()
