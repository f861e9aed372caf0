"""`svam train-teacher`: train or fine-tune the teacher's UNet on episode clips.

The loss is the EDM denoising loss SVD's scheduler implies (v-prediction, sigma_data = 1, log-normal
noise levels); the VAE and the CLIP text encoder stay frozen. A teacher built from scratch first
warms its random VAE up on episode frames (`train_teacher.vae_steps`), then freezes it.

Everything goes through accelerate (mixed precision, gradient accumulation, DDP and multi-node
under `accelerate launch` or `torchrun`, gloo on CPU-only machines). Per-step randomness comes from generators seeded by (run seed, micro
step, rank), and checkpoints hold model, optimizer, LR schedule, EMA and the data position, so a
resumed run continues exactly where the interrupted one was. Working files (checkpoints, sample
grids, the warmed-up VAE) go to `<teacher dir>-train/`; the final teacher directory holds the EMA
weights and is what `VideoTeacher.from_pretrained` reads.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import PartialState
from diffusers import AutoencoderKLTemporalDecoder
from PIL import Image, ImageDraw
from torch import nn
from tqdm.auto import tqdm

from svam.atomic import atomic_dir
from svam.config import Config, to_dict
from svam.hashing import file_digest, json_digest, state_digest
from svam.locking import output_lock
from svam.rundir import RunDir
from svam.seeding import keyed_generator
from svam.teachers.modeling_teacher import (
    VideoTeacher,
    behaviour_config,
    quiet_libraries,
    read_teacher_record,
)
from svam.teachers.pipeline_teacher import TeacherPipeline
from svam.teachers.skill import SKILL_NAME, skill_table, teacher_skill
from svam.training import LoopSettings, TrainingLoop, TrainingStage


class TeacherTrainError(ValueError):
    """A training setup that cannot run; the message is one line naming the key or path."""


class Denoiser(nn.Module):
    """The trained part of the teacher (UNet + optional text projection) as one module, so that
    accelerate wraps, checkpoints and averages it as a unit."""

    def __init__(self, unet: nn.Module, text_projection: nn.Module | None):
        super().__init__()
        self.unet = unet
        self.text_projection = text_projection

    def forward(self, sample, timestep, text_states, added_time_ids) -> torch.Tensor:
        context = text_states if self.text_projection is None else self.text_projection(text_states)
        return self.unet(sample, timestep, context, added_time_ids).sample


def edm_scalings(sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(c_in, c_noise, c_skip, c_out, loss weight) of EulerDiscreteScheduler's v-prediction with
    continuous timesteps: scale_model_input divides by sqrt(sigma^2 + 1), the timestep is
    log(sigma) / 4 and denoised = c_out * output + c_skip * noisy."""
    variance = sigma**2 + 1
    return (
        variance.rsqrt(),
        0.25 * sigma.log(),
        1 / variance,
        -sigma * variance.rsqrt(),
        variance / sigma**2,
    )


def clip_grid(rows: list[tuple[str, torch.Tensor]], pad: int = 2) -> np.ndarray:
    """Labelled rows of frames (T, 3, H, W) uint8 -> one HWC uint8 image."""
    frames, height, width = rows[0][1].shape[0], rows[0][1].shape[-2], rows[0][1].shape[-1]
    label = 40
    canvas = np.full(
        (len(rows) * (height + pad) + pad, label + frames * (width + pad) + pad, 3), 255, np.uint8
    )
    for r, (_, clip) in enumerate(rows):
        for t, frame in enumerate(clip):
            y, x = pad + r * (height + pad), label + pad + t * (width + pad)
            canvas[y : y + height, x : x + width] = frame.permute(1, 2, 0).cpu().numpy()
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for r, (name, _) in enumerate(rows):
        draw.text((2, pad + r * (height + pad) + height // 2 - 5), name, fill=(0, 0, 0))
    return np.asarray(image)


class TeacherTrainer(TrainingStage):
    """One training run of the teacher, on the one training loop.

    train_stream: `train_stream(skip_batches)` returns a fresh, deterministic, endless iterator of
        clip batches (the format of `svam.data.episodes.clip_loader`) that starts after its first
        `skip_batches` batches; called once per phase and on resume.
    eval_batches: returns the fixed clip batches used for the validation loss and sample grids.
    test_batches: returns the test clips the exported teacher's foresight skill is measured on
        (`svam.teachers.skill`), or None: not measured.
    training_key: recorded in the teacher directory; `is_trained` compares it.
    """

    name = "train-teacher"
    section = "train_teacher"
    error = TeacherTrainError
    validate_at_start = True

    def __init__(
        self,
        config: Config,
        *,
        train_stream: Callable[[int], Iterator[dict[str, Any]]],
        eval_batches: Callable[[], list[dict[str, Any]]],
        output_dir: str | Path,
        tb_dir: str | Path | None = None,
        training_key: str | None = None,
        test_batches: Callable[[], list[dict[str, Any]]] | None = None,
    ):
        self.config = config
        self.test_batches = test_batches
        self.training_key = training_key
        self.args = config.train_teacher
        self.train_stream = train_stream
        self.eval_batches = eval_batches
        self.output_dir = Path(output_dir)
        self.work_dir = self.output_dir.with_name(self.output_dir.name + "-train")
        self._latent_cache: dict[str, torch.Tensor] = {}
        self._check()
        self.training = TrainingLoop(
            self,
            LoopSettings.of(self.args, eval_every=self.args.sample_every),
            work_dir=self.work_dir,
            output_dir=self.output_dir,
            tb_dir=tb_dir,
        )

    @property
    def history(self) -> list[float]:
        """Mean training loss of every optimizer step."""
        return self.training.history

    @property
    def metrics(self) -> dict[str, dict[int, float]]:
        """Every logged scalar by name and step, on the main process (also in tensorboard);
        `val/loss` is measured on fixed clips and noise with the EMA weights."""
        return self.training.metrics

    def _check(self) -> None:
        config, args = self.config, self.args
        config.teacher.validate()
        if config.data.clip_frames != config.teacher.num_frames:
            raise TeacherTrainError(
                f"data.clip_frames={config.data.clip_frames} but teacher.num_frames="
                f"{config.teacher.num_frames}: the teacher generates whole clips, make them equal"
            )
        if config.teacher.pretrained_path and args.vae_steps:
            raise TeacherTrainError(
                f"train_teacher.vae_steps={args.vae_steps} would retrain the pretrained VAE of "
                f"{config.teacher.pretrained_path}: set train_teacher.vae_steps=0"
            )

    def train(self) -> Path:
        """Train to `train_teacher.steps`, resuming from a checkpoint if there is one; returns the
        final teacher directory."""
        return self.training.run()

    # ---------------------------------------------------------------------- the loop's stage

    def setup(self) -> None:
        self.accelerator = self.loop.accelerator
        teacher = VideoTeacher.from_config(self.config.teacher, seed=self.config.run.seed)
        self.teacher = teacher.to(self.accelerator.device)
        self.feature_sigma = TeacherPipeline(teacher).feature_noise_level()
        if self.args.vae_steps:
            self._warm_up_vae()

    def build(self) -> Denoiser:
        teacher = self.teacher
        denoiser = Denoiser(teacher.unet, teacher.text_projection).requires_grad_(True).train()
        if self.args.gradient_checkpointing:
            teacher.unet.enable_gradient_checkpointing()
        return denoiser

    def stream(self, consumed: int) -> Iterator[dict[str, Any]]:
        return self.train_stream(consumed)

    def loss(self, model, batch: dict[str, Any], micro_step: int) -> tuple[torch.Tensor, dict]:
        generator = keyed_generator(
            self.config.run.seed, "train", self.accelerator.process_index, micro_step
        )
        return self._loss(batch, model, generator), {}

    def resume_record(self) -> dict[str, Any]:
        return {
            "teacher_config_hash": json_digest(behaviour_config(self.config.teacher)),
            "use_ema": self.args.use_ema,
            "vae": state_digest(self.teacher.vae),
        }

    # --------------------------------------------------------------------------------- phases

    def _warm_up_vae(self) -> None:
        """Fit the from-scratch VAE to episode frames, set its latent scaling to unit variance,
        and save it to the work dir (reused on resume)."""
        accelerator, args, teacher = self.accelerator, self.args, self.teacher
        target = self.work_dir / "vae"
        marker = {
            "vae_steps": args.vae_steps,
            "teacher_config_hash": json_digest(behaviour_config(self.config.teacher)),
            "seed": self.config.run.seed,
        }
        done = target / "warm_up.json"
        if done.is_file() and json.loads(done.read_text()) == marker:
            with quiet_libraries():
                vae = AutoencoderKLTemporalDecoder.from_pretrained(target, local_files_only=True)
            teacher.vae = vae.to(accelerator.device).requires_grad_(False).eval()
        else:
            vae = teacher.vae.requires_grad_(True).train()
            optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_learning_rate)
            stream = self.train_stream(0)
            generator = keyed_generator(self.config.run.seed, "vae", accelerator.process_index)
            bar = tqdm(
                range(args.vae_steps), desc="vae warm-up", disable=not accelerator.is_main_process
            )
            for _ in bar:
                clips = next(stream)["frames"][: args.vae_batch_clips]
                images = teacher.preprocess(clips).flatten(0, 1)
                with accelerator.autocast():
                    posterior = vae.encode(images).latent_dist
                    latents = posterior.sample(generator=generator)
                    recon = vae.decode(latents, num_frames=clips.shape[1]).sample
                    loss = F.mse_loss(recon.float(), images)
                    loss = loss + args.vae_kl_weight * posterior.kl().mean()
                loss.backward()
                if accelerator.num_processes > 1:  # plain data parallelism for the warm-up
                    for p in vae.parameters():
                        if p.grad is not None:
                            p.grad = accelerator.reduce(p.grad, reduction="mean")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                bar.set_postfix(loss=f"{loss.item():.4f}")
            vae.requires_grad_(False).eval()
            std = self._latent_std(stream)
            vae.register_to_config(scaling_factor=1.0 / std)
            if accelerator.is_main_process:
                with atomic_dir(target) as tmp:
                    with quiet_libraries():
                        vae.save_pretrained(tmp)
                    (tmp / "warm_up.json").write_text(json.dumps(marker, indent=2) + "\n")
            accelerator.wait_for_everyone()
        teacher.config = dataclasses.replace(
            teacher.config, vae_scaling_factor=teacher.vae.config.scaling_factor
        )
        teacher.invalidate_fingerprint()

    @torch.no_grad()
    def _latent_std(self, stream: Iterator[dict[str, Any]], batches: int = 4) -> float:
        latents = [
            self.teacher.vae.encode(self.teacher.preprocess(next(stream)["frames"]).flatten(0, 1))
            .latent_dist.mode()
            .float()
            for _ in range(batches)
        ]
        std = torch.cat(latents).std()
        return float(self.accelerator.reduce(std, reduction="mean"))

    def _latents(self, batch: dict[str, Any]) -> torch.Tensor:
        """Scaled VAE latents of each clip, encoded one clip at a time so that a cached and a
        fresh encoding are bit-identical (resume stays exact with or without the cache)."""
        latents = []
        for key, clip in zip(batch["key"], batch["frames"], strict=True):
            cached = self._latent_cache.get(key)
            if cached is None:
                cached = self.teacher.encode_video(clip[None])[0].float().cpu()
                if self.args.cache_latents:
                    self._latent_cache[key] = cached
            latents.append(cached)
        return torch.stack(latents).to(self.accelerator.device)

    def _loss(
        self,
        batch: dict[str, Any],
        denoiser: nn.Module,
        generator: torch.Generator,
        sigma: float | None = None,
    ) -> torch.Tensor:
        """EDM loss of one batch, at noise level `sigma` or at training's; all noise comes from
        `generator` (CPU)."""
        teacher, args = self.teacher, self.args
        device = self.accelerator.device
        with torch.no_grad():
            latents = self._latents(batch)
            batch_size = latents.shape[0]
            condition = teacher.condition_latents(batch["frames"][:, 0], generator)
            keep = torch.rand(batch_size, generator=generator) >= args.text_dropout
            instructions = [
                text if k else "" for text, k in zip(batch["instruction"], keep, strict=True)
            ]
            text_states = teacher.text_states(instructions)
        if sigma is None:
            log_sigma = args.sigma_p_mean + args.sigma_p_std * torch.randn(
                batch_size, generator=generator
            )
            if args.feature_level_share > 0:  # no extra draw otherwise: same stream as before
                at_features = torch.rand(batch_size, generator=generator) < args.feature_level_share
                log_sigma[at_features] = math.log(self.feature_sigma)
            sigma = log_sigma.exp()
        else:
            sigma = torch.full((batch_size,), float(sigma))
        sigma = sigma.to(device)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        c_in, c_noise, c_skip, c_out, weight = edm_scalings(sigma)
        expand = (-1, 1, 1, 1, 1)
        noisy = latents + sigma.view(expand) * noise
        sample = torch.cat(
            [noisy * c_in.view(expand), condition[:, None].expand_as(latents)], dim=2
        )
        output = denoiser(sample, c_noise, text_states, teacher.added_time_ids(batch_size))
        denoised = c_out.view(expand) * output.float() + c_skip.view(expand) * noisy
        per_clip = ((denoised - latents) ** 2).flatten(1).mean(1)
        return (weight * per_clip).mean()

    # --------------------------------------------------------------------- eval, logs, samples

    @torch.no_grad()
    def validate(self, denoiser: nn.Module, step: int) -> dict[str, float]:
        """Validation loss and a real / VAE / predicted grid (the loop puts the EMA weights in
        place); main only."""
        if not self.accelerator.is_main_process:
            return {}
        batches = self.eval_batches()
        if not batches:
            return {}
        seed = self.config.run.seed
        with self.accelerator.autocast():
            denoiser.eval()
            losses = [
                self._loss(b, denoiser, keyed_generator(seed, "val", i))
                for i, b in enumerate(batches[: self.args.val_batches])
            ]
            at_features = [
                self._loss(b, denoiser, keyed_generator(seed, "val", i), self.feature_sigma)
                for i, b in enumerate(batches[: self.args.val_batches])
            ]
            frames, instructions = _pick_clips(batches, self.args.sample_clips)
            count = len(frames)
            result = TeacherPipeline(self.teacher)(
                frames[:, 0],
                instructions,
                generator=keyed_generator(seed, "samples"),
                return_features=False,
            )
            recon = self.teacher.decode_latents(self.teacher.encode_video(frames))
            denoiser.train()
        rows = []
        for i in range(count):
            rows += [("real", frames[i]), ("vae", recon[i]), ("pred", result.frames[i])]
        grid = clip_grid(rows)
        path = self.work_dir / "samples" / f"step-{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(path)
        if self.loop.tensorboard is not None:
            self.loop.tensorboard.add_image("samples/real_vae_pred", grid, step, dataformats="HWC")
        return {
            "val/loss": float(torch.stack(losses).mean()),
            "val/loss_at_feature_level": float(torch.stack(at_features).mean()),
        }

    # ---------------------------------------------------------------------------- export

    def _skill(self) -> dict[str, Any] | None:
        """The exported teacher's foresight skill on the test clips (None without them)."""
        batches = self.test_batches() if self.test_batches is not None else []
        if not batches:
            return None
        with self.accelerator.autocast():
            return teacher_skill(TeacherPipeline(self.teacher), batches, self.config.run.seed)

    def export(self, denoiser: nn.Module, step: int, into: Path) -> None:
        """The teacher directory, with the EMA weights the loop put in place; main only."""
        if not self.accelerator.is_main_process:
            return
        self.teacher.requires_grad_(False).eval()
        self.teacher.invalidate_fingerprint()
        grid = self.work_dir / "samples" / f"step-{step:06d}.png"
        history = self.loop.history
        metadata = {
            "training": {
                "key": self.training_key,
                "steps": step,
                "ema": self.args.use_ema,
                "final_train_loss": history[-1] if history else None,
                "samples": str(grid) if grid.is_file() else None,
                "config": to_dict(self.config),
            }
        }
        skill = self._skill()
        if skill is not None:
            metadata["skill"] = skill
        self.teacher.save_pretrained(into, metadata=metadata)
        if skill is not None:
            (into / SKILL_NAME).write_text(f"# The teacher's foresight\n\n{skill_table(skill)}\n")
            tqdm.write(f"train-teacher: foresight skill on test clips:\n{skill_table(skill)}")
        tqdm.write(
            f"train-teacher: teacher {self.teacher.fingerprint} -> {self.output_dir}"
            + (f"; samples (real / vae / predicted): {grid}" if grid.is_file() else "")
        )


def _pick_clips(batches: list[dict[str, Any]], count: int) -> tuple[torch.Tensor, list[str]]:
    """Up to `count` clips for the sample grid, one per task first, then in order."""
    clips = [
        (b["task"][i], b["frames"][i], b["instruction"][i])
        for b in batches
        for i in range(len(b["key"]))
    ]
    firsts, rest, seen = [], [], set()
    for clip in clips:
        (rest if clip[0] in seen else firsts).append(clip)
        seen.add(clip[0])
    chosen = (firsts + rest)[:count]
    return torch.stack([c[1] for c in chosen]), [c[2] for c in chosen]


# ---------------------------------------------------------------------------------- the stage


def _first_batches(loader: Iterable[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    return list(itertools.islice(loader, count))


def _paths(config: Config) -> tuple[Path, Path]:
    """(episode shard dir, final teacher dir) of a run."""
    run, args = RunDir.from_config(config), config.train_teacher
    episodes = Path(args.episodes) if args.episodes else run.episodes
    return episodes, Path(args.output_dir) if args.output_dir else run.teacher


def training_key(config: Config, episodes: Path) -> str:
    """What a finished teacher depends on: teacher, training and data settings, run seed and the
    episode shards' manifest (paths, resume and logging settings left out)."""
    skip = {"episodes", "output_dir", "resume", "log_every", "sample_every", "checkpoint_every"}
    train = {k: v for k, v in to_dict(config.train_teacher).items() if k not in skip}
    return json_digest(
        {
            "teacher": to_dict(config.teacher),
            "train_teacher": train,
            "data": to_dict(config.data),
            "seed": config.run.seed,
            "episodes": file_digest(episodes / "manifest.json"),
        }
    )


def is_trained(config: Config) -> bool:
    """Whether the run already holds a teacher trained with this config on these episodes."""
    episodes, output = _paths(config)
    try:
        record = read_teacher_record(output)
        return record.get("training", {}).get("key") == training_key(config, episodes)
    except OSError:
        return False


def train_teacher(config: Config) -> Path:
    """`svam train-teacher`: train the teacher on the run's episode shards; returns the teacher
    directory (default `runs/<name>/teacher`)."""
    from svam.data.episodes import clip_loader
    from svam.data.schema import SchemaError

    run = RunDir.from_config(config)
    args = config.train_teacher
    episodes, output = _paths(config)
    if not (episodes / "manifest.json").is_file():
        where = "directory missing" if not episodes.is_dir() else "no manifest.json"
        raise TeacherTrainError(
            f"no episode shards at {episodes} ({where}): run `svam collect` first "
            "or point train_teacher.episodes at a shard directory"
        )
    with output_lock(output):
        data, seed = config.data, config.run.seed

        def train_stream(skip_batches: int) -> Iterator[dict[str, Any]]:
            loader = clip_loader(
                episodes, data, "train", seed=seed, repeat=True, skip_batches=skip_batches
            )
            return iter(loader)

        eval_cache: list[list[dict[str, Any]]] = []

        def eval_batches() -> list[dict[str, Any]]:
            if not eval_cache:
                count = max(args.val_batches, 1)
                try:
                    loader = clip_loader(episodes, data, "val", seed=seed, shuffle=True)
                except SchemaError:  # no validation episodes: show training clips instead
                    loader = clip_loader(episodes, data, "train", seed=seed, shuffle=True)
                eval_cache.append(_first_batches(loader, count))
            return eval_cache[0]

        def test_batches() -> list[dict[str, Any]]:
            if not args.skill_clips:
                return []
            try:
                loader = clip_loader(episodes, data, "test", seed=seed, shuffle=True)
            except SchemaError:  # no test episodes (data.test_fraction=0)
                return []
            return _first_batches(loader, math.ceil(args.skill_clips / data.batch_size))

        if PartialState(cpu=not torch.cuda.is_available()).is_main_process:
            run.save_config(config, "train-teacher")
        trainer = TeacherTrainer(
            config,
            train_stream=train_stream,
            eval_batches=eval_batches,
            output_dir=output,
            tb_dir=run.tb / "teacher",
            training_key=training_key(config, episodes),
            test_batches=test_batches,
        )
        return trainer.train()
