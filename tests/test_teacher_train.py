"""`svam train-teacher`: the loss goes down, an interrupted run resumes exactly, the stage's output."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_teacher import micro_config

from svam.config import Config, load_config
from svam.teachers.modeling_teacher import VideoTeacher, read_teacher_record
from svam.teachers.train import TeacherTrainer, TeacherTrainError, is_trained, train_teacher
from svam.training import TrainingLoop

FRAMES, SIZE = 4, 32


def synthetic_clip(index: int) -> tuple[torch.Tensor, str]:
    """A bright square on a dark floor, moving right ('reach') or down ('push') from frame to frame."""
    task = ("reach", "push")[index % 2]
    clip = torch.full((FRAMES, 3, SIZE, SIZE), 40, dtype=torch.uint8)
    for t in range(FRAMES):
        at = 2 + 4 * t + index // 2
        if task == "reach":
            clip[t, :, 12:20, at : at + 8] = 220
        else:
            clip[t, :, at : at + 8, 12:20] = 220
    return clip, task


def synthetic_batch(indices: list[int]) -> dict:
    clips, tasks = zip(*(synthetic_clip(i) for i in indices), strict=True)
    return {
        "frames": torch.stack(clips),
        "depth": torch.ones(len(indices), FRAMES, SIZE, SIZE, dtype=torch.float16),
        "actions": torch.zeros(len(indices), FRAMES, 4),
        "state": torch.zeros(len(indices), FRAMES, 4),
        "instruction": [f"{task} the goal" for task in tasks],
        "task": list(tasks),
        "key": [f"clip-{i:03d}" for i in indices],
    }


def train_stream(skip_batches: int = 0, batch_size: int = 2, clips: int = 6) -> Iterator[dict]:
    """Endless deterministic batches cycling over `clips` distinct clips, after the first
    `skip_batches`."""
    start = skip_batches * batch_size
    while True:
        yield synthetic_batch([(start + j) % clips for j in range(batch_size)])
        start += batch_size


def eval_batches() -> list[dict]:
    return [synthetic_batch([6, 7])]


def micro_run_config(**train_changes) -> Config:
    config = Config()
    config.teacher = micro_config()
    config.data = dataclasses.replace(config.data, clip_frames=FRAMES, batch_size=2)
    train = {
        "steps": 8,
        "learning_rate": 2e-3,
        "lr_warmup_steps": 0,
        "vae_steps": 2,
        "vae_batch_clips": 1,
        "log_every": 2,
        "sample_every": 4,
        "sample_clips": 1,
        "val_batches": 1,
        "checkpoint_every": 4,
        "checkpoints_total_limit": 1,
        **train_changes,
    }
    config.train_teacher = dataclasses.replace(config.train_teacher, **train)
    return config


def trainer(config: Config, root: Path) -> TeacherTrainer:
    return TeacherTrainer(
        config,
        train_stream=train_stream,
        eval_batches=eval_batches,
        output_dir=root / "teacher",
        tb_dir=root / "tb",
    )


class Interrupted(Exception):
    pass


def test_training_lowers_loss_and_resumes_exactly(tmp_path, monkeypatch):
    config = micro_run_config()
    straight = trainer(config, tmp_path / "straight")
    out = straight.train()
    assert len(straight.history) == 8
    val_loss = straight.metrics["val/loss"]
    assert sorted(val_loss) == [0, 4, 8] and val_loss[8] < 0.9 * val_loss[0]
    assert (tmp_path / "straight" / "teacher-train" / "samples" / "step-000008.png").is_file()
    assert list((tmp_path / "straight" / "tb").glob("events.out.tfevents.*"))

    # Kill a second run right after its step-4 checkpoint, then start it again.
    save_checkpoint = TrainingLoop.save_checkpoint

    def save_then_die(self, step, micro_step):
        save_checkpoint(self, step, micro_step)
        if step == 4:
            raise Interrupted

    monkeypatch.setattr(TrainingLoop, "save_checkpoint", save_then_die)
    with pytest.raises(Interrupted):
        trainer(config, tmp_path / "resumed").train()
    monkeypatch.undo()
    checkpoints = tmp_path / "resumed" / "teacher-train" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["checkpoint-000004"]
    assert not (tmp_path / "resumed" / "teacher").exists()

    resumed = trainer(config, tmp_path / "resumed")
    resumed_out = resumed.train()
    assert resumed.history == straight.history
    assert [p.name for p in checkpoints.iterdir()] == ["checkpoint-000008"]

    a, b = VideoTeacher.from_pretrained(out), VideoTeacher.from_pretrained(resumed_out)
    for name in ("unet", "vae"):
        state_a, state_b = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a), name
    assert a.fingerprint == b.fingerprint == b.compute_fingerprint()
    record = read_teacher_record(out)
    assert record["training"]["steps"] == 8 and record["training"]["ema"] is True
    # The warmed-up VAE's latents are scaled to unit variance; the saved config says so.
    assert record["teacher"]["vae_scaling_factor"] == a.vae.config.scaling_factor != 0.18215

    # A checkpoint from another teacher configuration is refused, naming the difference.
    changed = micro_run_config()
    changed.teacher.noise_aug_strength = 0.05
    with pytest.raises(TeacherTrainError, match="teacher_config_hash"):
        trainer(changed, tmp_path / "resumed").train()


def test_training_setup_errors_name_the_key(tmp_path):
    config = micro_run_config()
    config.data.clip_frames = 6
    with pytest.raises(TeacherTrainError, match="data.clip_frames=6"):
        trainer(config, tmp_path)
    config = micro_run_config()
    config.teacher.pretrained_path = str(tmp_path)
    with pytest.raises(TeacherTrainError, match="vae_steps"):
        trainer(config, tmp_path)


def test_train_teacher_reports_missing_episode_shards(tmp_path):
    config = load_config("tiny", [f"run.root={tmp_path}"])
    with pytest.raises(TeacherTrainError) as exc:
        train_teacher(config)
    message = str(exc.value)
    assert "\n" not in message and "svam collect" in message
    assert str(tmp_path / "tiny" / "episodes") in message
    (tmp_path / "tiny" / "episodes").mkdir(parents=True)
    with pytest.raises(TeacherTrainError, match="no manifest.json"):
        train_teacher(config)


def test_train_teacher_stage_writes_a_loadable_teacher(tmp_path, monkeypatch):
    """The stage function end to end, with the episode reader replaced by synthetic clips."""
    import svam.data.episodes

    def fake_clip_loader(
        root, data, split, *, seed, batch_size=None, shuffle=None, repeat=False, skip_batches=0
    ):
        assert Path(root) == tmp_path / "tiny" / "episodes" and data.clip_frames == FRAMES
        return train_stream(skip_batches) if repeat else iter(eval_batches())

    monkeypatch.setattr(svam.data.episodes, "clip_loader", fake_clip_loader)
    (tmp_path / "tiny" / "episodes").mkdir(parents=True)
    (tmp_path / "tiny" / "episodes" / "manifest.json").write_text("{}")
    config = micro_run_config(steps=2, vae_steps=1)
    config.run = dataclasses.replace(config.run, root=str(tmp_path))

    assert not is_trained(config)
    out = train_teacher(config)
    assert out == tmp_path / "tiny" / "teacher"
    assert is_trained(config)
    assert not is_trained(dataclasses.replace(config, run=dataclasses.replace(config.run, seed=1)))
    teacher = VideoTeacher.from_pretrained(out)
    record = json.loads((out / "teacher_config.json").read_text())
    assert record["fingerprint"] == teacher.compute_fingerprint()
    assert record["training"]["config"]["train_teacher"]["steps"] == 2
    assert (tmp_path / "tiny" / "configs" / "train-teacher.yaml").is_file()
    assert list((tmp_path / "tiny" / "tb" / "teacher").glob("events.out.tfevents.*"))
    # its foresight scored against copying the current frame, per future index and space
    skill = record["skill"]
    assert skill["clips"] == 2
    for space in ("pixels", "latents"):
        rows = skill["per_index"][space]
        assert [row["t"] for row in rows] == list(range(1, FRAMES))
        for row in rows:
            assert row["skill"] == pytest.approx(1 - row["mse_prediction"] / row["mse_copy"])
    assert "| pixels |" in (out / "skill.md").read_text()


def test_skill_interval_is_a_paired_bootstrap_around_the_ratio_of_errors():
    import numpy as np

    from svam.teachers.skill import skill_interval

    rng = np.random.default_rng(0)
    copy = rng.uniform(0.5, 1.5, 200)
    half = skill_interval(0.5 * copy * rng.uniform(0.9, 1.1, 200), copy, seed=0)
    assert half["low"] < 0.5 < half["high"] and half["high"] - half["low"] < 0.05
    worse = skill_interval(2 * copy * rng.uniform(0.9, 1.1, 200), copy, seed=0)
    assert worse["high"] < 0 and worse["skill"] == pytest.approx(-1, abs=0.05)


def test_clips_at_the_feature_level_train_the_teacher_where_features_are_read(tmp_path):
    """With a share of clips noised at sigma_max (where the one-step features are read) the
    validation loss at that level falls; the log-normal alone almost never draws it."""
    config = micro_run_config(feature_level_share=0.5, steps=12, sample_every=6)
    run = trainer(config, tmp_path)
    run.train()
    assert run.feature_sigma == pytest.approx(700.0, rel=1e-3)  # SVD's sigma_max
    at_features = run.metrics["val/loss_at_feature_level"]
    assert sorted(at_features) == [0, 6, 12]
    assert at_features[12] < 0.8 * at_features[0], at_features
    log_normal_only = trainer(micro_run_config(steps=12, sample_every=6), tmp_path / "log-normal")
    log_normal_only.train()
    assert at_features[12] < 0.9 * log_normal_only.metrics["val/loss_at_feature_level"][12]
