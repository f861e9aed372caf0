"""The teacher model: Stable Video Diffusion's UNet and temporal VAE, conditioned as VPP does it.

The current frame's VAE latent is concatenated to every noisy frame latent (SVD's 8-channel UNet
input) and the task instruction, encoded by a CLIP text encoder, replaces SVD's CLIP image
embedding as the cross-attention context. `unet_forward` runs diffusers' UNet forward with hooks
that capture up-block outputs, so that a one-step feature pass can stop right after the last
up-block it needs.

A teacher saves as a directory in diffusers layout (`model_index.json`, `unet/`, `vae/`,
`scheduler/`, `text_encoder/`, `tokenizer/`, optionally `text_projection/`) plus
`teacher_config.json`: the resolved `TeacherConfig` and a fingerprint of the weights that later
stages record to know which teacher they read.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import diffusers
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKLTemporalDecoder,
    EulerDiscreteScheduler,
    UNetSpatioTemporalConditionModel,
)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import logging as diffusers_logging
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, PreTrainedModel
from transformers.utils import logging as transformers_logging

from svam.hashing import json_digest, state_digest
from svam.teachers.configuration_teacher import TeacherConfig

TEACHER_CONFIG_NAME = "teacher_config.json"
FORMAT_NAME = "svam-teacher"
FORMAT_VERSION = 1

SVD_SCHEDULER_CONFIG = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "sigma_max": 700.0,
    "sigma_min": 0.002,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "timestep_type": "continuous",
    "use_karras_sigmas": True,
}
"""The EDM-style Euler scheduler Stable Video Diffusion (-XT) ships (`scheduler/scheduler_config.json`)."""

Generators = torch.Generator | list[torch.Generator] | None
"""One generator for the batch, or one per batch element (diffusers' convention): with a list,
each sample's noise depends on its own generator only, not on the batch it is in."""

RUNTIME_KEYS = (
    "pretrained_path",
    "text_encoder_path",
    "num_inference_steps",
    "guidance_scale",
    "feature_up_blocks",
    "feature_sigma",
    "feature_upsample",
)
"""TeacherConfig keys that change how a teacher is used, not what it is: a caller's value wins over
the one saved with the teacher; they are left out of the fingerprint. A pipeline's guidance and
feature keys are its `TeacherRuntime`, which caches and policies record next to the fingerprint."""


def behaviour_config(config: TeacherConfig) -> dict[str, Any]:
    """The config keys that define what a teacher computes (all but `RUNTIME_KEYS`)."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in RUNTIME_KEYS}


class TeacherLoadError(FileNotFoundError):
    """A teacher or CLIP directory that cannot be loaded; the message is one line naming the path."""


class TextProjection(ModelMixin, ConfigMixin):
    """Linear map from the text encoder's width to the UNet's cross-attention width."""

    @register_to_config
    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden_states)


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence diffusers/transformers info and warning chatter (unused CLIP vision weights etc.)."""
    libraries = (diffusers_logging, transformers_logging)
    previous = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libraries]
    for lib in libraries:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lib, (verbosity, bars) in zip(libraries, previous, strict=True):
            lib.set_verbosity(verbosity)
            if bars:
                lib.enable_progress_bar()


# --------------------------------------------------------------------------------------- builders


def build_unet(config: TeacherConfig) -> UNetSpatioTemporalConditionModel:
    return UNetSpatioTemporalConditionModel(
        sample_size=config.latent_size,
        in_channels=2 * config.latent_channels,
        out_channels=config.latent_channels,
        down_block_types=tuple(config.down_block_types),
        up_block_types=tuple(config.up_block_types),
        block_out_channels=tuple(config.block_out_channels),
        addition_time_embed_dim=config.addition_time_embed_dim,
        projection_class_embeddings_input_dim=3 * config.addition_time_embed_dim,
        layers_per_block=config.layers_per_block,
        cross_attention_dim=config.cross_attention_dim,
        transformer_layers_per_block=config.transformer_layers_per_block,
        num_attention_heads=tuple(config.num_attention_heads),
        num_frames=config.num_frames,
    )


def build_vae(config: TeacherConfig) -> AutoencoderKLTemporalDecoder:
    levels = len(config.vae_block_out_channels)
    return AutoencoderKLTemporalDecoder(
        down_block_types=("DownEncoderBlock2D",) * levels,
        block_out_channels=tuple(config.vae_block_out_channels),
        layers_per_block=config.vae_layers_per_block,
        latent_channels=config.latent_channels,
        sample_size=config.image_size,
        scaling_factor=config.vae_scaling_factor,
    )


def build_text_encoder(config: TeacherConfig) -> CLIPTextModel:
    text_config = CLIPTextConfig(
        hidden_size=config.text_hidden_size,
        intermediate_size=config.text_intermediate_size,
        num_hidden_layers=config.text_num_layers,
        num_attention_heads=config.text_num_heads,
        projection_dim=config.text_hidden_size,
        max_position_embeddings=max(77, config.max_text_length),
    )
    return CLIPTextModel(text_config)


@functools.cache
def _clip_bpe_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    units = list(bytes_to_unicode().values())
    tokens = units + [u + "</w>" for u in units] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def clip_bpe_tokenizer(max_length: int) -> CLIPTokenizer:
    """OpenAI CLIP's tokenizer built from the BPE vocabulary the open_clip wheel ships (no hub)."""
    vocab, merges = _clip_bpe_vocabulary()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=max_length)


def build_scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG)


def architecture_of(
    unet: UNetSpatioTemporalConditionModel,
    vae: AutoencoderKLTemporalDecoder,
    text_encoder: CLIPTextModel,
) -> dict[str, Any]:
    """The TeacherConfig architecture keys of built or loaded components."""

    def per_block(value: Any) -> list[int]:
        levels = len(unet.config.block_out_channels)
        return [value] * levels if isinstance(value, int) else list(value)

    transformer_layers = unet.config.transformer_layers_per_block
    if not isinstance(transformer_layers, int):
        raise TeacherLoadError("per-block transformer_layers_per_block is not supported")
    layers = unet.config.layers_per_block
    if not isinstance(layers, int):
        raise TeacherLoadError("per-block layers_per_block is not supported")
    text = text_encoder.config
    return {
        "latent_channels": unet.config.out_channels,
        "vae_block_out_channels": list(vae.config.block_out_channels),
        "vae_layers_per_block": vae.config.layers_per_block,
        "vae_scaling_factor": vae.config.scaling_factor,
        "block_out_channels": list(unet.config.block_out_channels),
        "down_block_types": list(unet.config.down_block_types),
        "up_block_types": list(unet.config.up_block_types),
        "layers_per_block": layers,
        "num_attention_heads": per_block(unet.config.num_attention_heads),
        "transformer_layers_per_block": transformer_layers,
        "cross_attention_dim": per_block(unet.config.cross_attention_dim)[0],
        "addition_time_embed_dim": unet.config.addition_time_embed_dim,
        "text_hidden_size": text.hidden_size,
        "text_num_layers": text.num_hidden_layers,
        "text_num_heads": text.num_attention_heads,
        "text_intermediate_size": text.intermediate_size,
    }


# ------------------------------------------------------------------------------ partial UNet pass


class _StopForward(Exception):
    """Raised by the forward hook on the last captured up-block to end the UNet's pass there."""


def unet_forward(
    unet: UNetSpatioTemporalConditionModel,
    sample: torch.Tensor,
    timestep: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    added_time_ids: torch.Tensor,
    *,
    capture: Sequence[int] = (),
    stop_after_capture: bool = False,
) -> tuple[torch.Tensor | None, dict[int, torch.Tensor]]:
    """diffusers' `UNetSpatioTemporalConditionModel.forward`, capturing up-block outputs.

    Returns (output (B, T, C, H, W) or None, {up-block index: output (B, T, C, h, w)}). Forward
    hooks on the captured up-blocks record their outputs; with `stop_after_capture` the hook on
    the last one ends the pass: the finer up-blocks and the output head never run, and the
    output is None.
    """
    batch, frames = sample.shape[:2]
    wanted = sorted(set(capture))
    last = wanted[-1] if stop_after_capture and wanted else None
    captured: dict[int, torch.Tensor] = {}

    def hook(index: int):
        def record(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            captured[index] = output.unflatten(0, (batch, frames))
            if index == last:
                raise _StopForward

        return record

    handles = [unet.up_blocks[index].register_forward_hook(hook(index)) for index in wanted]
    try:
        output = unet(sample, timestep, encoder_hidden_states, added_time_ids, return_dict=False)[0]
    except _StopForward:
        return None, captured
    finally:
        for handle in handles:
            handle.remove()
    return output, captured


def merge_up_block_features(features: dict[int, torch.Tensor], mode: str) -> torch.Tensor:
    """Concatenate up-block outputs (B, T, C_i, h_i, w_i) on channels, in up-block order, after
    resizing each to the finest grid among them with `mode` (nearest or bilinear)."""
    ordered = [features[index] for index in sorted(features)]
    height = max(f.shape[-2] for f in ordered)
    width = max(f.shape[-1] for f in ordered)
    resized = []
    for feature in ordered:
        if feature.shape[-2:] != (height, width):
            flat = feature.flatten(0, 1)
            options = {"align_corners": False} if mode == "bilinear" else {}
            flat = F.interpolate(flat, size=(height, width), mode=mode, **options)
            feature = flat.unflatten(0, feature.shape[:2])
        resized.append(feature)
    return torch.cat(resized, dim=2)


# ------------------------------------------------------------------------------------ the teacher


class VideoTeacher(nn.Module):
    """SVD components plus the instruction encoder, with the conditioning and VAE round trips.

    The sampling loop lives in `svam.teachers.pipeline_teacher.TeacherPipeline`.
    """

    def __init__(
        self,
        config: TeacherConfig,
        unet: UNetSpatioTemporalConditionModel,
        vae: AutoencoderKLTemporalDecoder,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        scheduler: EulerDiscreteScheduler,
        text_projection: TextProjection | None = None,
    ):
        super().__init__()
        config.validate()
        edm = (scheduler.config.prediction_type, scheduler.config.timestep_type)
        if edm != ("v_prediction", "continuous"):
            raise ValueError(
                f"scheduler {edm} is not SVD's EDM-style (v_prediction, continuous) Euler scheduler"
            )
        self.config = config
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.text_projection = text_projection
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self._fingerprint: str | None = None

    # ---------------------------------------------------------------------------- construction

    @classmethod
    def from_config(cls, config: TeacherConfig, *, seed: int = 0) -> VideoTeacher:
        """The teacher `config` describes: loaded from `config.pretrained_path` when it is set,
        else built from scratch with weights drawn from `seed` (the global RNG is left alone)."""
        if config.pretrained_path:
            return cls.from_pretrained(config.pretrained_path, config=config)
        config.validate()
        with torch.random.fork_rng(devices=[]), quiet_libraries():
            torch.manual_seed(seed)
            unet = build_unet(config)
            vae = build_vae(config)
            text_encoder = build_text_encoder(config)
            projection = None
            if config.text_hidden_size != config.cross_attention_dim:
                projection = TextProjection(config.text_hidden_size, config.cross_attention_dim)
        return cls(
            config,
            unet,
            vae,
            text_encoder,
            clip_bpe_tokenizer(config.max_text_length),
            build_scheduler(),
            projection,
        ).requires_grad_(False)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        text_encoder_path: str | os.PathLike | None = None,
        config: TeacherConfig | None = None,
        torch_dtype: torch.dtype | None = None,
    ) -> VideoTeacher:
        """Load a svam teacher directory, or a diffusers SVD directory (unet/, vae/, scheduler/)
        plus a CLIP text-encoder directory. Local files only; a missing path or component raises
        `TeacherLoadError` naming it.

        `config` supplies the runtime keys (sampling steps, guidance, feature blocks) and, for an
        SVD directory, the conditioning constants; the architecture always comes from the files.
        """
        root = Path(path).expanduser()
        if not root.is_dir():
            raise TeacherLoadError(f"teacher directory not found: {root}")
        saved_path = root / TEACHER_CONFIG_NAME
        if saved_path.is_file():
            saved = _read_teacher_config(saved_path)
            base = TeacherConfig(**saved["teacher"])
            if config is not None:
                base = dataclasses.replace(base, **{k: getattr(config, k) for k in RUNTIME_KEYS})
            text_root, tokenizer_root = root / "text_encoder", root / "tokenizer"
            required = ["unet", "vae", "scheduler", "text_encoder", "tokenizer"]
            if _model_index(root).get("text_projection", [None])[0]:
                required.append("text_projection")
        else:
            saved = None
            base = config or TeacherConfig()
            text_path = text_encoder_path or base.text_encoder_path
            if not text_path:
                raise TeacherLoadError(
                    f"{root} has no {TEACHER_CONFIG_NAME}: to load it as an SVD directory, "
                    "set teacher.text_encoder_path to a local CLIP directory"
                )
            text_root, tokenizer_root = _clip_dirs(Path(text_path).expanduser())
            required = ["unet", "vae", "scheduler"]
        for name in required:
            _check_component(root / name, name)
        _check_component(text_root, "text_encoder")
        _check_component(tokenizer_root, "tokenizer")

        dtype = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        with quiet_libraries():
            unet = _load(UNetSpatioTemporalConditionModel, root / "unet", **dtype)
            vae = _load(AutoencoderKLTemporalDecoder, root / "vae", **dtype)
            scheduler = _load(EulerDiscreteScheduler, root / "scheduler")
            text_encoder = _load(CLIPTextModel, text_root, **dtype)
            tokenizer = _load(CLIPTokenizer, tokenizer_root)
            projection = None
            if "text_projection" in required:
                projection = _load(TextProjection, root / "text_projection", **dtype)

        resolved = dataclasses.replace(
            base, pretrained_path=str(root), **architecture_of(unet, vae, text_encoder)
        )
        if saved is None:
            resolved.text_encoder_path = str(text_encoder_path or base.text_encoder_path)
        if projection is None and resolved.text_hidden_size != resolved.cross_attention_dim:
            warnings.warn(
                f"{root}: CLIP width {resolved.text_hidden_size} != UNet cross-attention width "
                f"{resolved.cross_attention_dim}; adding a random text projection: fine-tune the "
                "teacher (svam train-teacher) before using it",
                stacklevel=2,
            )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                projection = TextProjection(resolved.text_hidden_size, resolved.cross_attention_dim)
            if torch_dtype is not None:
                projection.to(torch_dtype)
        teacher = cls(resolved, unet, vae, text_encoder, tokenizer, scheduler, projection)
        if saved is not None:
            teacher._fingerprint = saved["fingerprint"]
        return teacher.requires_grad_(False).eval()

    def save_pretrained(self, path: str | os.PathLike, *, metadata: dict | None = None) -> Path:
        """Write the teacher directory atomically (a complete new one replaces the old one)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        components = {
            "unet": self.unet,
            "vae": self.vae,
            "scheduler": self.scheduler,
            "text_encoder": self.text_encoder,
            "tokenizer": self.tokenizer,
        }
        if self.text_projection is not None:
            components["text_projection"] = self.text_projection
        index: dict[str, Any] = {
            "_class_name": "VideoTeacher",
            "_svam_module": "svam.teachers.modeling_teacher",
            "_diffusers_version": diffusers.__version__,
        }
        for name, component in components.items():
            with quiet_libraries():
                component.save_pretrained(tmp / name)
            library = type(component).__module__.split(".")[0]
            index[name] = [library, type(component).__name__]
        index.setdefault("text_projection", [None, None])
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        record = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "teacher": dataclasses.asdict(self.config),
            **(metadata or {}),
        }
        (tmp / TEACHER_CONFIG_NAME).write_text(json.dumps(record, indent=2) + "\n")
        if path.exists():
            old = path.with_name(f"{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
        return path

    # ------------------------------------------------------------------------------- identity

    @property
    def fingerprint(self) -> str:
        """Short sha256 of the weights, the tokenizer's vocabulary size, the scheduler and the
        behaviour-defining config: what a cache built from this teacher records. A teacher loaded
        from a svam directory reports the fingerprint recorded there (of the saved weights, in
        whatever dtype it was loaded)."""
        if self._fingerprint is None:
            self._fingerprint = self.compute_fingerprint()
        return self._fingerprint

    def compute_fingerprint(self) -> str:
        modules = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}
        if self.text_projection is not None:
            modules["text_projection"] = self.text_projection
        scheduler = {k: v for k, v in self.scheduler.config.items() if not k.startswith("_")}
        return json_digest(
            {
                "config": behaviour_config(self.config),
                "scheduler": scheduler,
                "vocab": len(self.tokenizer),
                "weights": state_digest(modules),
            }
        )

    def invalidate_fingerprint(self) -> None:
        """Call after changing weights in place (training)."""
        self._fingerprint = None

    # ------------------------------------------------------------------------------ properties

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    # ---------------------------------------------------------------------------- conditioning

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 frames (..., 3, H, W) -> float in [-1, 1] at the teacher's image size."""
        if frames.dtype != torch.uint8:
            raise TypeError(f"frames must be uint8 (..., 3, H, W), got {frames.dtype}")
        lead = frames.shape[:-3]
        images = frames.reshape(-1, *frames.shape[-3:]).to(self.device, torch.float32).contiguous()
        size = self.config.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
        images = images / 127.5 - 1.0
        return images.reshape(*lead, *images.shape[-3:])

    def text_states(self, instructions: Sequence[str]) -> torch.Tensor:
        """Instructions -> the frozen CLIP text encoder's last hidden states (B, L, text width)."""
        ids = self.tokenizer(
            list(instructions),
            padding="max_length",
            max_length=self.config.max_text_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.text_encoder(ids).last_hidden_state.to(self.dtype)

    def encode_text(self, instructions: Sequence[str]) -> torch.Tensor:
        """Instructions -> cross-attention context (B, max_text_length, cross_attention_dim)."""
        hidden = self.text_states(instructions)
        return self.text_projection(hidden) if self.text_projection is not None else hidden

    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 clips (B, T, 3, H, W) -> scaled latents (B, T, c, h, w): the denoising targets."""
        images = self.preprocess(frames).flatten(0, 1).to(self.vae.dtype)
        latents = self.vae.encode(images).latent_dist.mode() * self.vae.config.scaling_factor
        return latents.unflatten(0, frames.shape[:2]).to(self.dtype)

    def condition_latents(self, image: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        """The current frame (B, 3, H, W) uint8 -> SVD's conditioning latent (B, c, h, w): noise
        augmented in pixel space and not scaled, as the SVD pipeline does it."""
        images = self.preprocess(image).to(self.vae.dtype)
        noise = randn_tensor(
            images.shape, generator=generator, device=images.device, dtype=images.dtype
        )
        images = images + self.config.noise_aug_strength * noise
        return self.vae.encode(images).latent_dist.mode().to(self.dtype)

    def added_time_ids(self, batch_size: int) -> torch.Tensor:
        ids = [self.config.fps - 1, self.config.motion_bucket_id, self.config.noise_aug_strength]
        return torch.tensor([ids], dtype=self.dtype, device=self.device).repeat(batch_size, 1)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, T, c, h, w) -> uint8 frames (B, T, 3, H, W); one clip per temporal
        decoder call."""
        frames = []
        for clip in latents:
            clip = clip.to(self.vae.dtype) / self.vae.config.scaling_factor
            frames.append(self.vae.decode(clip, num_frames=clip.shape[0]).sample)
        images = torch.stack(frames).float()
        return ((images + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------- file helpers


def _read_teacher_config(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TeacherLoadError(f"{path}: unreadable ({exc})") from exc
    if record.get("format") != FORMAT_NAME or record.get("version") != FORMAT_VERSION:
        raise TeacherLoadError(
            f"{path}: not a {FORMAT_NAME} v{FORMAT_VERSION} config "
            f"(format={record.get('format')!r}, version={record.get('version')!r})"
        )
    known = {f.name for f in dataclasses.fields(TeacherConfig)}
    unknown = sorted(set(record["teacher"]) - known)
    if unknown:
        raise TeacherLoadError(f"{path}: unknown teacher keys {unknown}")
    return record


def read_teacher_record(path: str | os.PathLike) -> dict[str, Any]:
    """A saved teacher's `teacher_config.json` (resolved config, fingerprint, training metadata),
    without loading weights."""
    return _read_teacher_config(Path(path) / TEACHER_CONFIG_NAME)


def check_cache_teacher(
    teacher_dir: str | os.PathLike,
    cache_manifest: Path,
    expected: str,
    key: str,
    error: type[Exception] = ValueError,
) -> str:
    """The fingerprint of the teacher at `teacher_dir`, which must be the one that made the cache
    (`expected`, from `cache_manifest`); else one line naming the config key `key` to set."""
    try:
        fingerprint = read_teacher_record(teacher_dir)["fingerprint"]
    except OSError as exc:
        raise error(f"{exc}: set {key} to the teacher that made {cache_manifest}") from exc
    if fingerprint != expected:
        raise error(
            f"the teacher at {teacher_dir} is {fingerprint} but the cache was made by teacher "
            f"{expected} ({cache_manifest}): set {key} to the cache's teacher"
        )
    return fingerprint


def _model_index(root: Path) -> dict[str, Any]:
    path = root / "model_index.json"
    if not path.is_file():
        raise TeacherLoadError(f"{root}: missing model_index.json")
    return json.loads(path.read_text())


_COMPONENT_FILES = {
    "scheduler": (("scheduler_config.json",),),
    "tokenizer": (("tokenizer.json",), ("vocab.json", "merges.txt")),
}


def _check_component(folder: Path, name: str) -> None:
    if not folder.is_dir():
        raise TeacherLoadError(f"missing component '{name}': no directory {folder}")
    if name in _COMPONENT_FILES:
        options = _COMPONENT_FILES[name]
        if not any(all((folder / f).is_file() for f in option) for option in options):
            wanted = " or ".join("+".join(option) for option in options)
            raise TeacherLoadError(f"component '{name}' at {folder}: missing {wanted}")
        return
    if not (folder / "config.json").is_file():
        raise TeacherLoadError(f"component '{name}' at {folder}: missing config.json")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise TeacherLoadError(
            f"component '{name}' at {folder}: no weights (*.safetensors or *.bin)"
        )


def _clip_dirs(root: Path) -> tuple[Path, Path]:
    """(text encoder dir, tokenizer dir) of a CLIP directory: a transformers CLIP(Text)Model dir
    with its tokenizer, or a diffusers-style dir with text_encoder/ and tokenizer/."""
    if not root.is_dir():
        raise TeacherLoadError(f"CLIP text-encoder directory not found: {root}")
    if (root / "text_encoder").is_dir():
        return root / "text_encoder", root / "tokenizer"
    return root, root


def _load(cls: type, folder: Path, **kwargs: Any) -> Any:
    """`cls.from_pretrained` on local files, library errors turned into one line."""
    options: dict[str, Any] = {"local_files_only": True}
    if "torch_dtype" in kwargs:
        # transformers 5 calls it `dtype`, diffusers `torch_dtype`.
        options["dtype" if issubclass(cls, PreTrainedModel) else "torch_dtype"] = kwargs[
            "torch_dtype"
        ]
    if issubclass(cls, ModelMixin):
        plain = folder / "diffusion_pytorch_model.safetensors"
        if not plain.is_file() and any(folder.glob("*.fp16.safetensors")):
            options["variant"] = "fp16"
    try:
        return cls.from_pretrained(folder, **options)
    except Exception as exc:  # noqa: BLE001 - any library failure becomes one readable line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TeacherLoadError(f"cannot load {cls.__name__} from {folder}: {first}") from exc
