"""Foresight from the teacher: one-step features, and multi-step (optionally partial) sampling.

Both follow diffusers' `StableVideoDiffusionPipeline`: noise-augmented conditioning latent of the
current frame, initial noise scaled by the scheduler's `init_noise_sigma`, Euler steps of its EDM
(v-prediction, continuous-time) scheduler. The instruction replaces SVD's image embedding, so
classifier-free guidance is on the instruction, with the empty prompt as the unconditional input.
Randomness is drawn from the caller's generator(s) (one, or one per sample) in a fixed order
(conditioning noise, then the initial latents), so the features `__call__` returns equal
`features` for the same generators. Guidance and the feature read-out come from the pipeline's
`TeacherRuntime` only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import EulerDiscreteScheduler
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from svam.teachers.configuration_teacher import TeacherRuntime
from svam.teachers.modeling_teacher import (
    Generators,
    VideoTeacher,
    merge_up_block_features,
    unet_forward,
)


@dataclass
class TeacherPipelineOutput(BaseOutput):
    """What one sampling call returns.

    latents: (B, T, c, h, w) scaled latents at noise level `sigma` (0 after a full run).
    denoised: (B, T, c, h, w) the model's clean-latent estimate at the last step run.
    frames: (B, T, 3, H, W) uint8, `denoised` decoded; None unless decoding was asked for.
    features: (B, T, C, h', w') one-step features captured at the first step; None if not asked.
    sigma: noise level of `latents`.
    steps: denoising steps run (UNet evaluations, each on a doubled batch under guidance).
    """

    latents: torch.Tensor
    denoised: torch.Tensor
    frames: torch.Tensor | None
    features: torch.Tensor | None
    sigma: float
    steps: int


class TeacherPipeline:
    def __init__(self, teacher: VideoTeacher, runtime: TeacherRuntime | None = None):
        """`runtime` None: the teacher config's (a teacher built or trained in this process);
        stages downstream of a cache pass the cache's."""
        self.teacher = teacher
        self.runtime = runtime or TeacherRuntime.from_config(teacher.config)
        self.runtime.validate(len(teacher.unet.up_blocks))

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, runtime: TeacherRuntime | None = None, **kwargs
    ) -> TeacherPipeline:
        """`VideoTeacher.from_pretrained(path, **kwargs)` wrapped in a pipeline of `runtime`."""
        return cls(VideoTeacher.from_pretrained(path, **kwargs), runtime)

    # ------------------------------------------------------------------------------- schedule

    def scheduler(
        self, num_inference_steps: int | None = None, sigma: float | None = None
    ) -> EulerDiscreteScheduler:
        """A fresh scheduler set to `num_inference_steps` (default from the config), or to the
        single noise level `sigma` (one step from sigma to 0)."""
        scheduler = EulerDiscreteScheduler.from_config(self.teacher.scheduler.config)
        if sigma is not None:
            scheduler.set_timesteps(sigmas=[float(sigma), 0.0], device=self.teacher.device)
        else:
            steps = num_inference_steps or self.teacher.config.num_inference_steps
            scheduler.set_timesteps(steps, device=self.teacher.device)
        return scheduler

    def feature_noise_level(self, num_inference_steps: int | None = None) -> float:
        """The sigma of the one-step pass: `runtime.feature_sigma`, else the first (noisiest) of
        the `num_inference_steps` schedule (SVD's: sigma_max = 700)."""
        return float(self.scheduler(num_inference_steps, self.runtime.feature_sigma).sigmas[0])

    def noise_levels(self, num_inference_steps: int | None = None) -> list[float]:
        """The sigmas of the sampling schedule, noisiest first, ending with 0."""
        return self.scheduler(num_inference_steps).sigmas.tolist()

    # ---------------------------------------------------------------------------------- shared

    def _prepare(
        self,
        image: torch.Tensor,
        instruction: str | Sequence[str],
        generator: Generators,
        guidance: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(unit initial noise, conditioning latents, text context, added time ids)."""
        teacher = self.teacher
        if image.ndim == 3:
            image = image[None]
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be uint8 (B, 3, H, W), got shape {tuple(image.shape)}")
        batch = image.shape[0]
        instructions = [instruction] * batch if isinstance(instruction, str) else list(instruction)
        if len(instructions) != batch:
            raise ValueError(f"{len(instructions)} instructions for {batch} images")

        frames = teacher.config.num_frames
        condition = teacher.condition_latents(image, generator)
        condition = condition[:, None].expand(-1, frames, -1, -1, -1)
        context = teacher.encode_text(instructions)
        if guidance:
            context = torch.cat([teacher.encode_text([""] * batch), context])
        time_ids = teacher.added_time_ids(context.shape[0])
        shape = (batch, frames, *condition.shape[2:])
        noise = randn_tensor(shape, generator=generator, device=teacher.device, dtype=teacher.dtype)
        return noise, condition, context, time_ids

    @staticmethod
    def _model_input(latents, condition, timestep, scheduler, guidance: bool) -> torch.Tensor:
        sample = torch.cat([scheduler.scale_model_input(latents, timestep), condition], dim=2)
        return torch.cat([sample, sample]) if guidance else sample

    def _one_step_inputs(
        self, noise, condition, context, time_ids, num_inference_steps: int | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The UNet inputs of the one-step pass on unit noise `noise`: at `runtime.feature_sigma`,
        else at the first (noisiest) level of the `num_inference_steps` schedule."""
        scheduler = self.scheduler(num_inference_steps, self.runtime.feature_sigma)
        timestep = scheduler.timesteps[0]
        latents = noise * scheduler.init_noise_sigma
        sample = self._model_input(latents, condition, timestep, scheduler, guidance=False)
        return sample, timestep, context, time_ids

    def _read_features(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The one-step pass on `inputs`, stopped after the last of `runtime.feature_up_blocks`,
        their outputs merged."""
        _, captured = unet_forward(
            self.teacher.unet,
            *inputs,
            capture=self.runtime.feature_up_blocks,
            stop_after_capture=True,
        )
        return merge_up_block_features(captured, self.runtime.feature_upsample)

    # ---------------------------------------------------------------------------- public API

    @torch.no_grad()
    def first_step_inputs(
        self,
        image: torch.Tensor,
        instruction: str | Sequence[str],
        *,
        generator: Generators = None,
        num_inference_steps: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sample, timestep, context, added time ids): the UNet inputs of the one-step pass, at
        noise level `runtime.feature_sigma` or the first of the `num_inference_steps` schedule."""
        noise, condition, context, time_ids = self._prepare(
            image, instruction, generator, guidance=False
        )
        return self._one_step_inputs(noise, condition, context, time_ids, num_inference_steps)

    @torch.no_grad()
    def features(
        self,
        image: torch.Tensor,
        instruction: str | Sequence[str],
        *,
        generator: Generators = None,
        num_inference_steps: int | None = None,
    ) -> torch.Tensor:
        """One-step features (B, T, C, h, w) of the current frame(s) `image` (B, 3, H, W) uint8.

        One partial UNet pass at noise level `runtime.feature_sigma` (None: the first, noisiest
        sigma of the `num_inference_steps` schedule) that stops after the last of
        `runtime.feature_up_blocks`; their outputs are resized to the finest of their grids
        (`runtime.feature_upsample`) and concatenated on channels.
        """
        inputs = self.first_step_inputs(
            image, instruction, generator=generator, num_inference_steps=num_inference_steps
        )
        return self._read_features(inputs)

    @torch.no_grad()
    def __call__(
        self,
        image: torch.Tensor,
        instruction: str | Sequence[str],
        *,
        generator: Generators = None,
        num_inference_steps: int | None = None,
        stop_step: int | None = None,
        stop_sigma: float | None = None,
        return_features: bool = True,
        decode: bool = True,
        progress: bool = False,
    ) -> TeacherPipelineOutput:
        """Generate the clip that follows `image` (B, 3, H, W) uint8 under `instruction`.

        Runs `num_inference_steps` Euler steps (default from the config), or stops early (partial
        denoising): after `stop_step` steps, or at the first step whose noise level is at most
        `stop_sigma`. Under guidance (`runtime.guidance_scale` > 1) each step evaluates the UNet
        on the conditional and the empty-instruction batch. The one-step features equal
        `features` for the same generators: captured from the first step's pass when
        `runtime.feature_sigma` is None, else from their own partial pass at that noise level.
        """
        teacher = self.teacher
        guidance_scale = self.runtime.guidance_scale
        guidance = guidance_scale > 1.0
        scheduler = self.scheduler(num_inference_steps)
        steps = self._steps_to_run(scheduler, stop_step, stop_sigma)
        noise, condition, context, time_ids = self._prepare(image, instruction, generator, guidance)
        batch = noise.shape[0]
        # Under guidance the conditional half of the context is the second one.
        features = denoised = None
        if return_features and self.runtime.feature_sigma is not None:
            conditional_only = (context[-batch:], time_ids[-batch:])
            inputs = self._one_step_inputs(noise, condition, *conditional_only, None)
            features = self._read_features(inputs)
        capture = self.runtime.feature_up_blocks if return_features and features is None else ()
        latents = noise * scheduler.init_noise_sigma
        timesteps = scheduler.timesteps[:steps]
        for index, timestep in enumerate(tqdm(timesteps, desc="sample", disable=not progress)):
            sample = self._model_input(latents, condition, timestep, scheduler, guidance)
            output, captured = unet_forward(
                teacher.unet,
                sample,
                timestep,
                context,
                time_ids,
                capture=capture if index == 0 else (),
            )
            if captured:
                own = {k: v[-batch:] for k, v in captured.items()}
                features = merge_up_block_features(own, self.runtime.feature_upsample)
            if guidance:
                unconditional, conditional = output.chunk(2)
                output = unconditional + guidance_scale * (conditional - unconditional)
            step = scheduler.step(output, timestep, latents)
            latents, denoised = step.prev_sample, step.pred_original_sample.to(latents.dtype)
        frames = teacher.decode_latents(denoised) if decode else None
        return TeacherPipelineOutput(
            latents=latents,
            denoised=denoised,
            frames=frames,
            features=features,
            sigma=float(scheduler.sigmas[steps]),
            steps=steps,
        )

    @staticmethod
    def _steps_to_run(
        scheduler: EulerDiscreteScheduler, stop_step: int | None, stop_sigma: float | None
    ) -> int:
        total = len(scheduler.timesteps)
        if stop_step is not None and stop_sigma is not None:
            raise ValueError("give stop_step or stop_sigma, not both")
        if stop_step is not None:
            if not 1 <= stop_step <= total:
                raise ValueError(f"stop_step={stop_step}: must be in [1, {total}]")
            return stop_step
        if stop_sigma is not None:
            sigmas = scheduler.sigmas.tolist()
            return next(k for k in range(1, total + 1) if sigmas[k] <= stop_sigma)
        return total
