"""The video diffusion teacher: partial UNet pass, sampling, save/load, full-scale shapes, errors."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from svam.config import load_config
from svam.flops import flop_counter
from svam.teachers.configuration_teacher import TeacherConfig, TeacherRuntime
from svam.teachers.modeling_teacher import (
    TeacherLoadError,
    VideoTeacher,
    build_text_encoder,
    build_unet,
    build_vae,
    merge_up_block_features,
    read_teacher_record,
    unet_forward,
)
from svam.teachers.pipeline_teacher import TeacherPipeline


def micro_config(**changes) -> TeacherConfig:
    """Smaller than the tiny config: 32 px, 4 frames, 8x8 latents, 3 UNet levels, and a text
    encoder narrower than the cross-attention so the projection is exercised."""
    config = TeacherConfig(
        image_size=32,
        num_frames=4,
        vae_block_out_channels=[32, 32, 32],
        block_out_channels=[32, 32, 32],
        num_attention_heads=[1, 1, 1],
        cross_attention_dim=32,
        addition_time_embed_dim=8,
        text_hidden_size=16,
        text_num_layers=1,
        text_num_heads=1,
        text_intermediate_size=32,
        max_text_length=8,
        num_inference_steps=4,
    )
    return dataclasses.replace(config, **changes)


@pytest.fixture(scope="module")
def teacher() -> VideoTeacher:
    return VideoTeacher.from_config(micro_config(), seed=0)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(1)).to(
        torch.uint8
    )


INSTRUCTIONS = ["reach the goal", "press the button from the top"]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def unet_inputs(teacher: VideoTeacher, latent: int, batch: int = 2):
    g = gen(3)
    frames, channels = teacher.config.num_frames, teacher.config.latent_channels
    sample = torch.randn(batch, frames, 2 * channels, latent, latent, generator=g)
    timestep = torch.tensor(0.25 * torch.tensor(80.0).log().item())
    context = torch.randn(batch, teacher.config.max_text_length, 32, generator=g)
    return sample, timestep, context, teacher.added_time_ids(batch)


class Recorder:
    """Forward hooks recording module outputs (and call counts)."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.outputs: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
        self.handles = [
            module.register_forward_hook(
                lambda _m, _i, out, name=name: self.outputs[name].append(out)
            )
            for name, module in modules.items()
        ]

    def calls(self, name: str) -> int:
        return len(self.outputs[name])

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


# ---------------------------------------------------------------------------- partial UNet pass


@pytest.mark.parametrize("latent", [8, 6])  # 6: not a multiple of the upsampling factor
def test_partial_pass_equals_hooked_full_forward(teacher, latent):
    unet = teacher.unet
    inputs = unet_inputs(teacher, latent)
    recorder = Recorder({"up0": unet.up_blocks[0], "up1": unet.up_blocks[1]})
    with torch.no_grad():
        full = unet(*inputs).sample
    recorder.close()
    with torch.no_grad():
        output, partial = unet_forward(unet, *inputs, capture=[0, 1], stop_after_capture=True)
        same_output, _ = unet_forward(unet, *inputs)
    assert output is None
    batch, frames = inputs[0].shape[:2]
    for index in (0, 1):
        hooked = recorder.outputs[f"up{index}"][0].unflatten(0, (batch, frames))
        assert torch.equal(partial[index], hooked)
    assert torch.equal(same_output, full)


def test_partial_pass_stops_after_last_block_and_is_cheaper(teacher, images):
    pipe = TeacherPipeline(teacher)
    unet = teacher.unet
    recorder = Recorder(
        {"up2": unet.up_blocks[2], "conv_out": unet.conv_out, "up1": unet.up_blocks[1]}
    )
    with flop_counter() as partial_flops:
        features = pipe.features(images, INSTRUCTIONS, generator=gen())
    recorder.close()
    assert recorder.calls("up1") == 1
    assert recorder.calls("up2") == 0 and recorder.calls("conv_out") == 0
    with flop_counter() as step_flops:
        pipe(
            images, INSTRUCTIONS, generator=gen(), stop_step=1, decode=False, return_features=False
        )
    # Both include the conditioning frame's VAE encoding; the full step runs up-block 2 and the head.
    assert partial_flops.get_total_flops() < 0.9 * step_flops.get_total_flops()
    # (B, T, C, h, w): up-block 0 (4x4, upsampled) and up-block 1 (8x8), 32 channels each.
    assert features.shape == (2, 4, 64, 8, 8)


def test_merge_upsamples_coarse_blocks_to_finest_grid():
    coarse = torch.arange(2 * 3 * 1 * 2 * 2, dtype=torch.float32).reshape(2, 3, 1, 2, 2)
    fine = torch.zeros(2, 3, 5, 4, 4)
    merged = merge_up_block_features({1: fine, 0: coarse}, "nearest")
    assert merged.shape == (2, 3, 6, 4, 4)
    assert torch.equal(merged[:, :, 0, ::2, ::2], coarse[:, :, 0])  # up-block 0 first, replicated
    assert torch.equal(merged[:, :, 0, 1::2, 1::2], coarse[:, :, 0])
    bilinear = merge_up_block_features({0: coarse, 1: fine}, "bilinear")
    assert not torch.equal(bilinear[:, :, 0, ::2, ::2], coarse[:, :, 0])


# ------------------------------------------------------------------------------------ sampling


def test_sampling_is_deterministic_and_returns_first_step_features(teacher, images):
    pipe = TeacherPipeline(teacher)
    first = pipe(images, INSTRUCTIONS, generator=gen(5))
    again = pipe(images, INSTRUCTIONS, generator=gen(5))
    other = pipe(images, INSTRUCTIONS, generator=gen(6))
    assert first.frames.dtype == torch.uint8 and first.frames.shape == (2, 4, 3, 32, 32)
    assert first.latents.shape == (2, 4, 4, 8, 8) and first.steps == 4 and first.sigma == 0.0
    for name in ("latents", "denoised", "frames", "features"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    assert not torch.equal(first.latents, other.latents)
    features = pipe.features(images, INSTRUCTIONS, generator=gen(5))
    assert torch.equal(features, first.features)


def test_per_sample_generators_make_a_sample_independent_of_its_batch(teacher, images):
    pipe = TeacherPipeline(teacher)
    both = pipe(images, INSTRUCTIONS, generator=[gen(10), gen(11)], stop_step=2, decode=False)
    alone = pipe(images[1:], INSTRUCTIONS[1:], generator=[gen(11)], stop_step=2, decode=False)
    assert torch.allclose(both.latents[1:], alone.latents, atol=1e-5)
    assert torch.allclose(both.features[1:], alone.features, atol=1e-5)
    assert not torch.allclose(both.latents[0], alone.latents[0])


@pytest.mark.parametrize("stop_step", [1, 2, 3])
def test_partial_denoising_stops_at_requested_step(teacher, images, stop_step):
    pipe = TeacherPipeline(teacher)
    levels = pipe.noise_levels()
    recorder = Recorder({"conv_in": teacher.unet.conv_in})
    result = pipe(images, INSTRUCTIONS, generator=gen(), stop_step=stop_step, decode=False)
    recorder.close()
    assert recorder.calls("conv_in") == stop_step == result.steps
    assert result.sigma == pytest.approx(levels[stop_step])
    assert result.frames is None
    # The returned latents are the ones a full run holds at that step.
    full = pipe(images, INSTRUCTIONS, generator=gen(), decode=False)
    assert not torch.equal(result.latents, full.latents)
    assert torch.equal(result.features, full.features)


def test_partial_denoising_stops_at_requested_noise_level(teacher, images):
    pipe = TeacherPipeline(teacher)
    levels = pipe.noise_levels(6)
    target = (levels[2] + levels[3]) / 2
    result = pipe(
        images,
        INSTRUCTIONS,
        generator=gen(),
        num_inference_steps=6,
        stop_sigma=target,
        decode=False,
    )
    assert result.steps == 3 and result.sigma == pytest.approx(levels[3])
    assert result.sigma <= target < levels[result.steps - 1]
    with pytest.raises(ValueError, match="stop_step"):
        pipe(images, INSTRUCTIONS, stop_step=0)


def test_guidance_runs_conditional_and_empty_prompt_batches(teacher, images):
    pipe = TeacherPipeline(teacher)
    recorder = Recorder({"conv_in": teacher.unet.conv_in})
    guided_pipe = TeacherPipeline(teacher, dataclasses.replace(pipe.runtime, guidance_scale=3.0))
    guided = guided_pipe(images, INSTRUCTIONS, generator=gen(), stop_step=2)
    recorder.close()
    assert [out.shape[0] for out in recorder.outputs["conv_in"]] == [2 * 2 * 4] * 2
    plain = pipe(images, INSTRUCTIONS, generator=gen(), stop_step=2)
    assert torch.allclose(guided.features, plain.features, atol=1e-5)
    assert not torch.allclose(guided.latents, plain.latents)


def test_features_at_a_chosen_noise_level(teacher, images):
    pipe = TeacherPipeline(teacher)

    def at(sigma: float) -> TeacherPipeline:
        return TeacherPipeline(teacher, dataclasses.replace(pipe.runtime, feature_sigma=sigma))

    noisy = pipe.features(images, INSTRUCTIONS, generator=gen())
    same = at(pipe.noise_levels()[0]).features(images, INSTRUCTIONS, generator=gen())
    quieter = at(1.0).features(images, INSTRUCTIONS, generator=gen())
    assert torch.allclose(noisy, same, atol=1e-5)
    assert not torch.allclose(noisy, quieter)


@pytest.mark.parametrize("guidance_scale", [1.0, 2.5])
def test_call_reads_features_as_features_does(teacher, images, guidance_scale):
    """`__call__`'s features equal `features()` for the same inputs, noise and feature_sigma."""
    runtime = TeacherRuntime(guidance_scale=guidance_scale, feature_sigma=1.0)
    pipe = TeacherPipeline(teacher, runtime)
    sampled = pipe(images, INSTRUCTIONS, generator=gen(7), stop_step=2, decode=False)
    features = pipe.features(images, INSTRUCTIONS, generator=gen(7))
    assert torch.equal(sampled.features, features)
    default = TeacherPipeline(teacher, dataclasses.replace(runtime, feature_sigma=None))
    assert not torch.allclose(features, default.features(images, INSTRUCTIONS, generator=gen(7)))
    # The samples do not depend on where the features are read.
    plain = default(images, INSTRUCTIONS, generator=gen(7), stop_step=2, decode=False)
    assert torch.equal(sampled.latents, plain.latents)


def test_runtime_records_fingerprints_and_names_a_conflict():
    runtime = TeacherRuntime.from_config(micro_config())
    assert runtime == TeacherRuntime() == TeacherRuntime.from_record(None)
    record = runtime.to_record()
    assert record == {
        "guidance_scale": 1.0,
        "feature_up_blocks": [0, 1],
        "feature_sigma": None,
        "feature_upsample": "bilinear",
    }
    assert TeacherRuntime.from_record(json.loads(json.dumps(record))) == runtime
    for key, value in (
        ("guidance_scale", 2.0),
        ("feature_up_blocks", (1,)),
        ("feature_sigma", 0.5),
        ("feature_upsample", "nearest"),
    ):
        changed = dataclasses.replace(runtime, **{key: value})
        assert changed.fingerprint != runtime.fingerprint, key
        assert changed.conflict(runtime).startswith(f"teacher.{key}="), key
    assert runtime.conflict(TeacherRuntime.from_record(record)) is None
    with pytest.raises(ValueError, match="feature_up_blocks"):
        TeacherPipeline(
            VideoTeacher.from_config(micro_config()), TeacherRuntime(feature_up_blocks=(5,))
        )


# ----------------------------------------------------------------------------------- save/load


def test_save_load_round_trip(teacher, images, tmp_path):
    path = teacher.save_pretrained(tmp_path / "teacher", metadata={"training": {"steps": 3}})
    assert {p.name for p in path.iterdir()} >= {
        "model_index.json",
        "teacher_config.json",
        "unet",
        "vae",
        "scheduler",
        "text_encoder",
        "tokenizer",
        "text_projection",
    }
    record = read_teacher_record(path)
    assert record["fingerprint"] == teacher.fingerprint
    assert record["teacher"]["block_out_channels"] == [32, 32, 32]
    assert record["training"] == {"steps": 3}

    loaded = VideoTeacher.from_pretrained(path)
    assert loaded.fingerprint == teacher.fingerprint == loaded.compute_fingerprint()
    assert loaded.text_projection is not None
    a = TeacherPipeline(teacher)(images, INSTRUCTIONS, generator=gen(2))
    b = TeacherPipeline(loaded)(images, INSTRUCTIONS, generator=gen(2))
    for name in ("latents", "frames", "features"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name

    # Saving again replaces the directory as a whole; runtime keys do not change the identity.
    runtime = dataclasses.replace(loaded.config, num_inference_steps=9, feature_up_blocks=[1])
    again = VideoTeacher.from_pretrained(path, config=runtime)
    assert again.config.num_inference_steps == 9 and again.fingerprint == teacher.fingerprint
    assert again.compute_fingerprint() == teacher.fingerprint
    again.save_pretrained(path)
    assert not list(tmp_path.glob("teacher.*"))


def test_loads_an_svd_directory_plus_a_clip_directory(teacher, tmp_path):
    svd, clip = tmp_path / "svd", tmp_path / "clip"
    for name in ("unet", "vae", "scheduler"):
        getattr(teacher, name).save_pretrained(svd / name)
    (svd / "model_index.json").write_text(
        json.dumps({"_class_name": "StableVideoDiffusionPipeline"})
    )
    teacher.text_encoder.save_pretrained(clip)
    teacher.tokenizer.save_pretrained(clip)

    with pytest.raises(TeacherLoadError, match="text_encoder_path"):
        VideoTeacher.from_pretrained(svd)
    with pytest.warns(UserWarning, match="random text projection"):
        loaded = VideoTeacher.from_pretrained(svd, text_encoder_path=clip, config=micro_config())
    assert loaded.config.pretrained_path == str(svd)
    assert loaded.config.text_encoder_path == str(clip)
    # CLIP width 16 vs cross-attention 32: a fresh projection to train is added.
    assert loaded.text_projection is not None
    assert torch.equal(loaded.unet.conv_in.weight, teacher.unet.conv_in.weight)

    with pytest.warns(UserWarning):
        via_config = VideoTeacher.from_config(
            micro_config(pretrained_path=str(svd), text_encoder_path=str(clip))
        )
    assert torch.equal(via_config.vae.encoder.conv_in.weight, teacher.vae.encoder.conv_in.weight)


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_bad_paths_and_missing_components_give_one_line_errors(teacher, tmp_path):
    with pytest.raises(TeacherLoadError) as exc:
        VideoTeacher.from_pretrained(tmp_path / "nowhere")
    assert "nowhere" in one_line(exc)

    good = teacher.save_pretrained(tmp_path / "good")
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(TeacherLoadError) as exc:
        VideoTeacher.from_pretrained(broken)
    assert "'unet'" in one_line(exc) and str(broken / "unet") in one_line(exc)

    shutil.copytree(good / "unet", broken / "unet")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(TeacherLoadError, match="no weights") as exc:
        VideoTeacher.from_pretrained(broken)
    one_line(exc)

    shutil.rmtree(broken / "unet")
    shutil.copytree(good / "unet", broken / "unet")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(
        TeacherLoadError, match="cannot load UNetSpatioTemporalConditionModel"
    ) as exc:
        VideoTeacher.from_pretrained(broken)
    one_line(exc)

    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(TeacherLoadError, match="'tokenizer'") as exc:
        VideoTeacher.from_pretrained(broken)
    one_line(exc)

    svd = tmp_path / "svd"
    for name in ("unet", "vae", "scheduler"):
        shutil.copytree(good / name, svd / name)
    with pytest.raises(TeacherLoadError) as exc:
        VideoTeacher.from_pretrained(svd, text_encoder_path=tmp_path / "no-clip")
    assert "no-clip" in one_line(exc)


def test_config_validation_names_the_key():
    with pytest.raises(ValueError, match="teacher.feature_up_blocks"):
        VideoTeacher.from_config(micro_config(feature_up_blocks=[3]))
    with pytest.raises(ValueError, match="teacher.num_attention_heads"):
        micro_config(num_attention_heads=[1, 1]).validate()
    with pytest.raises(ValueError, match="teacher.image_size"):
        micro_config(image_size=30).validate()
    with pytest.raises(ValueError, match="multiples of 32"):
        micro_config(block_out_channels=[32, 48, 64]).validate()


# ---------------------------------------------------------------------------------- full scale


def test_full_scale_config_builds_on_meta_with_published_shapes():
    config = load_config("svd-xt").teacher
    config.validate()
    with torch.device("meta"):
        unet, vae, text_encoder = build_unet(config), build_vae(config), build_text_encoder(config)
    # diffusers creates a few scalars with the legacy constructor, which ignores the device context.
    for module in (unet, vae, text_encoder):
        module.to("meta")
    unet_params = sum(p.numel() for p in unet.parameters())
    assert 1.45e9 < unet_params < 1.6e9  # SVD-XT's UNet: 1.52B
    assert 80e6 < sum(p.numel() for p in vae.parameters()) < 110e6

    frames, latent = config.num_frames, config.latent_size
    assert (frames, latent) == (16, 32)
    with torch.no_grad():
        images = torch.empty(1, 3, config.image_size, config.image_size, device="meta")
        assert vae.encode(images).latent_dist.mode().shape == (1, 4, 32, 32)
        ids = torch.zeros(1, config.max_text_length, dtype=torch.long, device="meta")
        assert text_encoder(ids).last_hidden_state.shape[-1] == config.text_hidden_size

        inputs = (
            torch.empty(1, frames, 8, latent, latent, device="meta"),
            torch.ones(1, device="meta"),
            torch.empty(1, config.max_text_length, config.cross_attention_dim, device="meta"),
            torch.empty(1, 3, device="meta"),
        )
        with flop_counter() as partial_flops:
            _, captured = unet_forward(unet, *inputs, capture=[0, 1], stop_after_capture=True)
        with flop_counter() as full_flops:
            output, _ = unet_forward(unet, *inputs)
    features = merge_up_block_features(captured, config.feature_upsample)
    assert features.shape == (1, 16, 2560, 16, 16)
    assert output.shape == (1, 16, 4, 32, 32)
    ratio = partial_flops.get_total_flops() / full_flops.get_total_flops()
    assert 0.5 < ratio < 0.65  # published: 2,749 of 4,713 GFLOPs (58%)
