"""The teacher's own foresight skill: its N-step prediction against copying the current frame.

Foresight distilled from a teacher is only worth something if the teacher foresees. On test clips
(which no stage fits or selects on) the teacher generates each clip's future from its current
frame and instruction with its N-step schedule (noise keyed by the clip, as the cache draws it),
and per future frame index t >= 1 the mean squared error of the prediction and of "nothing
moves" (frame 0 held still) against the real frame t is taken twice: in pixels (scaled to [0, 1])
and in the VAE's latent space (the prediction's denoised latents against the real frames'
latents). Skill = 1 - MSE(prediction) / MSE(copy): above 0 the teacher beats copying the current
frame. The 95% interval is a paired bootstrap over clips (scipy.stats.bootstrap, BCa).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

from svam.seeding import clip_noise
from svam.teachers.pipeline_teacher import TeacherPipeline

SKILL_NAME = "skill.md"
"""Written beside the exported teacher; the numbers are in its record (`skill`)."""
SPACES = ("pixels", "latents")
CONFIDENCE = 0.95


def skill_interval(prediction: np.ndarray, copy: np.ndarray, seed: int) -> dict[str, float]:
    """Skill 1 - mean(prediction) / mean(copy) of paired per-clip errors, with its interval."""

    def skill(p: np.ndarray, c: np.ndarray, axis: int = -1) -> np.ndarray:
        return 1 - p.mean(axis) / c.mean(axis)

    point = float(skill(prediction, copy))
    if len(prediction) < 3:
        return {"skill": point, "low": None, "high": None}  # too few clips for an interval
    result = stats.bootstrap(
        (prediction, copy),
        skill,
        paired=True,
        vectorized=True,
        confidence_level=CONFIDENCE,
        n_resamples=2000,
        random_state=np.random.default_rng(seed),
    )
    low, high = result.confidence_interval
    return {"skill": point, "low": float(low), "high": float(high)}


@torch.no_grad()
def teacher_skill(
    pipeline: TeacherPipeline,
    batches: Iterable[dict[str, Any]],
    run_seed: int,
    num_inference_steps: int | None = None,
) -> dict[str, Any]:
    """Per future frame index and space: the prediction's and the copy's MSE, the skill and its
    interval, over the clips of `batches` (uint8 `frames` (B, T, 3, H, W), `instruction`, `key`)."""
    teacher = pipeline.teacher
    errors: dict[tuple[str, str], list[torch.Tensor]] = {
        (space, guess): [] for space in SPACES for guess in ("prediction", "copy")
    }
    clips = 0
    for batch in batches:
        frames = batch["frames"]
        output = pipeline(
            frames[:, 0],
            list(batch["instruction"]),
            generator=[clip_noise(run_seed, key) for key in batch["key"]],
            num_inference_steps=num_inference_steps,
            return_features=False,
            decode=True,
        )
        size = output.frames.shape[-2:]
        real = frames.float()
        if real.shape[-2:] != size:
            real = F.interpolate(real.flatten(0, 1), size=size, mode="area").unflatten(
                0, frames.shape[:2]
            )
        real = real.to(output.frames.device) / 255
        predicted = output.frames.float() / 255
        real_latents = teacher.encode_video(frames.to(teacher.device)).float()
        pairs = {
            "pixels": (predicted, real),
            "latents": (output.denoised.float(), real_latents),
        }
        for space, (guess, truth) in pairs.items():
            copy = truth[:, :1].expand_as(truth)
            errors[space, "prediction"].append((guess - truth).square().flatten(2).mean(2).cpu())
            errors[space, "copy"].append((copy - truth).square().flatten(2).mean(2).cpu())
        clips += len(frames)
    report: dict[str, Any] = {"clips": clips, "steps": num_inference_steps, "per_index": {}}
    for space in SPACES:
        prediction = torch.cat(errors[space, "prediction"]).double().numpy()
        copy = torch.cat(errors[space, "copy"]).double().numpy()
        rows = []
        for t in range(1, prediction.shape[1]):
            rows.append(
                {
                    "t": t,
                    "mse_prediction": float(prediction[:, t].mean()),
                    "mse_copy": float(copy[:, t].mean()),
                    **skill_interval(prediction[:, t], copy[:, t], run_seed + t),
                }
            )
        report["per_index"][space] = rows
    report["beats_copy_beyond_first"] = {
        space: all(
            row["low"] is not None and row["low"] > 0 for row in report["per_index"][space][1:]
        )
        for space in SPACES
    }
    return report


def skill_table(report: dict[str, Any]) -> str:
    """The skill report as markdown: one row per space, one column per future frame index."""
    first = report["per_index"][SPACES[0]]
    header = "| skill vs copying frame 0 | " + " | ".join(f"t={row['t']}" for row in first) + " |"
    lines = [header, "|---|" + "---:|" * len(first)]
    for space in SPACES:
        cells = [
            f"{row['skill']:+.3f} "
            + (f"[{row['low']:+.3f}, {row['high']:+.3f}]" if row["low"] is not None else "[n/a]")
            for row in report["per_index"][space]
        ]
        lines.append(f"| {space} | " + " | ".join(cells) + " |")
    verdict = ", ".join(
        f"{space}: {'yes' if ok else 'no'}"
        for space, ok in report["beats_copy_beyond_first"].items()
    )
    lines += [
        "",
        f"{report['clips']} test clips, {report['steps'] or 'the configured'} sampling steps; skill = "
        "1 - MSE(prediction) / MSE(frame 0 held still), 95% paired bootstrap interval over clips. "
        f"Beats copying at every index t >= 2 (interval above 0): {verdict}.",
    ]
    return "\n".join(lines)
