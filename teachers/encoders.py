"""Frozen foundation encoders whose tokens are the distillation targets.

- `SemanticEncoder`: DINOv2 through timm, the last layer's normalised patch tokens without the
  class and register tokens (DINOv2's `x_norm_patchtokens`, what S-VAM distils).
- `GeometricEncoder`: Depth Anything 3, the backbone tokens of one out-layer, the frames of a clip
  passed together as views.

Both own their preprocessing: they take raw uint8 RGB frames, resize them to their image size and
normalise them with the ImageNet statistics. Float input is refused, so no caller can hand them an
image that is already normalised, or normalised with other statistics.

Random-init encoders (tests, the tiny config) are built from a seed with the caller's RNG state
untouched, so every process builds the same weights. `fingerprint`, `out_dim` and `num_tokens`
are what a cache manifest records and checks.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from svam.hashing import file_digest, json_digest
from svam.teachers.configuration_encoders import EncodersConfig

PATCH_SIZE = 14


class EncoderWeightsError(ValueError):
    """Encoder weights that are missing or do not fit the configured architecture (one line)."""


def check_image_size(size: int, key: str) -> None:
    """One line naming the config key unless `size` is a positive multiple of the patch size."""
    if size < PATCH_SIZE or size % PATCH_SIZE:
        nearest = max(1, round(size / PATCH_SIZE)) * PATCH_SIZE
        raise ValueError(
            f"{key}={size} is not a positive multiple of the patch size {PATCH_SIZE} "
            f"(try {nearest})"
        )


@contextlib.contextmanager
def seeded_init(seed: int, device: torch.device) -> Iterator[None]:
    """Build modules from `seed` on the CPU generator, leaving the caller's RNG state as it was.

    On the meta device parameters get no storage (accelerate's init_empty_weights: DA3's
    constructor calls `.item()`, which a `torch.device("meta")` context refuses).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if device.type == "meta":
            from accelerate import init_empty_weights

            with init_empty_weights():
                yield
        else:
            with torch.device("cpu"):
                yield


def _first_problem(exc: BaseException) -> str:
    """The most telling line of a load error (load_state_dict's message lists every key)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for prefix in ("size mismatch", "Missing key", "Unexpected key"):
        for line in lines:
            if line.startswith(prefix):
                return line if len(line) <= 240 else line[:237] + "..."
    return lines[0][:240] if lines else type(exc).__name__


def _import_da3():
    """Depth Anything 3, imported quietly: it logs INFO lines and warns about gsplat on import."""
    import depth_anything_3.utils.logger as da3_logging

    if "DA3_LOG_LEVEL" not in os.environ:
        da3_logging.logger.level = da3_logging.LOG_LEVELS["ERROR"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from depth_anything_3.api import DepthAnything3
        from depth_anything_3.registry import MODEL_REGISTRY
    return DepthAnything3, MODEL_REGISTRY


class _FrameEncoder(nn.Module):
    """What both encoders share: uint8 frames in, resized and ImageNet-normalised on the device."""

    def __init__(
        self,
        model: str,
        image_size: int,
        weight_files: list[Path],
        seed: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        super().__init__()
        self.model_name = model
        self.image_size = image_size
        self.weight_files = weight_files
        """The files the weights come from; empty for a random init from `seed`."""
        self.seed = seed
        # Compute dtype (autocast): the weights stay float32 and the tokens come out float32.
        self.dtype = dtype
        self.register_buffer(
            "mean", torch.tensor(IMAGENET_DEFAULT_MEAN, device=device).view(3, 1, 1), False
        )
        self.register_buffer(
            "std", torch.tensor(IMAGENET_DEFAULT_STD, device=device).view(3, 1, 1), False
        )

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 3, H, W) in [0, 255] -> float32 (..., 3, S, S) on the device, resized
        (bicubic, antialiased, as DINOv2's evaluation transform) and ImageNet-normalised."""
        name = type(self).__name__
        if images.dtype != torch.uint8:
            raise TypeError(
                f"{name} takes raw uint8 RGB frames in [0, 255], got {images.dtype}: it resizes "
                "and normalises them itself, so pass the frames unnormalised"
            )
        if images.ndim < 4 or images.shape[-3] != 3:
            raise ValueError(f"{name} takes (..., 3, H, W) RGB frames, got {tuple(images.shape)}")
        size = self.image_size
        x = images.to(self.device).flatten(0, -4).float() / 255
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True).clamp_(0, 1)
        x = (x - self.mean) / self.std
        return x.reshape(*images.shape[:-3], 3, size, size)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32 or self.device.type == "meta":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _identity(self) -> dict:
        """What, besides the weights and the compute dtype, decides the tokens."""
        return {"model": self.model_name, "image_size": self.image_size}

    @cached_property
    def fingerprint(self) -> str:
        """`<model>-<size>px-<hash>`; the hash covers architecture, image size, layer choice,
        compute dtype and the weights' sha256 (or `random-init:<seed>`). Computed once: hashing
        full-scale weights takes seconds."""
        weights = (
            file_digest(*self.weight_files) if self.weight_files else f"random-init:{self.seed}"
        )
        fields = {**self._identity(), "weights": weights, "dtype": str(self.dtype)}
        return f"{self.model_name}-{self.image_size}px-{json_digest(fields)}"


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    key = "encoders.semantic_weights"
    if not path.is_file():
        raise EncoderWeightsError(f"{key}: no file at {path}")
    try:
        if path.suffix == ".safetensors":
            return safetensors.torch.load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EncoderWeightsError(
            f"{key}: {path} is not a readable state dict ({_first_problem(exc)})"
        ) from exc


class SemanticEncoder(_FrameEncoder):
    """DINOv2 (timm): the last layer's normalised patch tokens, class and register tokens dropped.

    (N, 3, H, W) uint8 -> (N, P, D) float32, or (B, T, 3, H, W) -> (B, T, P, D); P = (S/14)^2.
    The model is built at the target size, so a checkpoint's position embedding (37x37 patches
    for 518 px) is resampled once at load by timm's checkpoint filter, not at every forward.
    Outputs are inference tensors: clone them before using them in autograd.
    """

    def __init__(
        self,
        model: str = "vit_small_patch14_dinov2",
        image_size: int = 56,
        weights: str | Path | None = None,
        *,
        seed: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        known = timm.list_models("vit_*_patch14*_dinov2")
        if model not in known:
            raise ValueError(f"encoders.semantic_model='{model}' is not one of {', '.join(known)}")
        check_image_size(image_size, "encoders.semantic_image_size")
        device = torch.device(device)
        weights = Path(weights) if weights is not None else None
        super().__init__(model, image_size, [weights] if weights else [], seed, device, dtype)
        state = _read_state_dict(weights) if weights is not None else None
        # With weights, an empty model: a random init would only be overwritten.
        with seeded_init(seed, device if state is None else torch.device("meta")):
            self.vit = timm.create_model(model, img_size=image_size, use_naflex=False)
        if state is not None:
            try:
                # Converts the original DINOv2 naming and resamples the position embedding.
                state = checkpoint_filter_fn(state, self.vit)
                state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
                self.vit.load_state_dict(state, assign=True)
            except Exception as exc:
                raise EncoderWeightsError(
                    f"encoders.semantic_weights: {weights} does not fit {model}: "
                    f"{_first_problem(exc)}"
                ) from exc
        self.vit.eval().requires_grad_(False).to(device)

    @property
    def out_dim(self) -> int:
        return self.vit.embed_dim

    @property
    def num_tokens(self) -> int:
        return self.vit.patch_embed.num_patches

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images)
        with self._autocast():
            tokens = self.vit.forward_features(x.flatten(0, -4))
        tokens = tokens[:, self.vit.num_prefix_tokens :].float()
        return tokens.reshape(*x.shape[:-3], *tokens.shape[1:])


@contextlib.contextmanager
def _first_blocks(vit: nn.Module, count: int) -> Iterator[None]:
    """Run only the first `count` transformer blocks: later ones cannot change an earlier layer's
    tokens, and S-VAM's layer (the first out-layer) is halfway up, so this halves the cost."""
    blocks = vit.blocks
    vit.blocks = blocks[:count]
    try:
        yield
    finally:
        vit.blocks = blocks


class GeometricEncoder(_FrameEncoder):
    """Depth Anything 3: the backbone tokens of one out-layer; the frames of a clip are views.

    (B, T, 3, H, W) uint8 -> (B, T, P, D') float32, P = (S/14)^2 (+1 with `camera_token`).
    A single frame is a one-view clip: `encoder(frames[:, None])[:, 0]`.

    What the tokens are. Per out-layer, DA3's backbone returns `(tokens, camera_token)`: the patch
    tokens (the camera-token slot removed) and that slot. Presets built with `cat_token`
    (da3-small/base/large/giant) concatenate, along channels, the layer's frame-local attention
    output with its cross-view one, so D' = 2 x embed_dim: 768 for da3-small, 2048 for da3-large.
    S-VAM caches exactly these `tokens` of out-layer 0 and drops `camera_token`
    (hidden2dpa/train_new_st.py `extract_da3_targets`; its DA3 decoupler has token_dim 2048 on a
    16x16 grid): the published method's "concatenation" is this channel one, and the default here.
    `camera_token=True` prepends the view's camera token along the token dimension (same width
    as a patch token; a channel concatenation would copy one vector into all P tokens).

    Views are ordered by DA3's default reference-view strategy (saddle_balanced, as S-VAM ran it)
    for clips of 3 or more frames. Outputs are inference tensors: clone them for autograd.
    """

    def __init__(
        self,
        model: str = "da3-small",
        image_size: int = 56,
        weights: str | Path | None = None,
        *,
        layer: int = 0,
        camera_token: bool = False,
        seed: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        da3_class, registry = _import_da3()
        if model not in registry:
            raise ValueError(
                f"encoders.geometric_model='{model}' is not one of {', '.join(registry)}"
            )
        check_image_size(image_size, "encoders.geometric_image_size")
        device = torch.device(device)
        weights = Path(weights) if weights is not None else None
        files = [weights / "config.json", weights / "model.safetensors"] if weights else []
        super().__init__(model, image_size, files, seed, device, dtype)
        if weights is None:
            with seeded_init(seed, device):
                da3 = da3_class(model_name=model)
        else:
            da3 = self._load(da3_class, weights)
        # Nested presets pair an any-view model with a metric one; the tokens are the any-view's.
        net = getattr(da3.model, "da3", da3.model)
        self.backbone, self.head = net.backbone, net.head
        out_layers = list(self.backbone.out_layers)
        if not -len(out_layers) <= layer < len(out_layers):
            raise ValueError(
                f"encoders.geometric_layer={layer}: {model} has {len(out_layers)} out-layers "
                f"(blocks {out_layers})"
            )
        if camera_token and self.backbone.alt_start == -1:
            raise ValueError(
                f"encoders.geometric_camera_token: {model} is single-view, without a camera token"
            )
        self.block = out_layers[layer]
        """The transformer block whose output the tokens are."""
        self.camera_token = camera_token
        self.backbone.eval().requires_grad_(False).to(device)
        self.head.eval().requires_grad_(False).to(device)

    def _load(self, da3_class, path: Path) -> nn.Module:
        key = "encoders.geometric_weights"
        if not path.is_dir():
            raise EncoderWeightsError(f"{key}: no directory at {path}")
        missing = [
            name for name in ("config.json", "model.safetensors") if not (path / name).is_file()
        ]
        if missing:
            raise EncoderWeightsError(
                f"{key}: {path} has no {' or '.join(missing)} (a Depth Anything 3 directory holds "
                "config.json and model.safetensors)"
            )
        try:
            saved = json.loads((path / "config.json").read_text()).get("model_name")
        except (ValueError, AttributeError) as exc:
            raise EncoderWeightsError(f"{key}: {path}/config.json is not a DA3 config") from exc
        if saved != self.model_name:
            raise EncoderWeightsError(
                f"{key}: {path} holds a {saved} model but encoders.geometric_model is "
                f"{self.model_name}"
            )
        try:
            # Its random init (then overwritten) must not move the caller's RNG; it prints a line.
            with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(io.StringIO()):
                return da3_class.from_pretrained(path, local_files_only=True, strict=True)
        except Exception as exc:
            raise EncoderWeightsError(
                f"{key}: {path} does not fit {self.model_name}: {_first_problem(exc)}"
            ) from exc

    def _identity(self) -> dict:
        return {**super()._identity(), "block": self.block, "camera_token": self.camera_token}

    @property
    def out_dim(self) -> int:
        vit = self.backbone.pretrained
        return vit.embed_dim * (2 if vit.cat_token else 1)

    @property
    def num_tokens(self) -> int:
        return (self.image_size // PATCH_SIZE) ** 2 + int(self.camera_token)

    def _clip_input(self, clips: torch.Tensor) -> torch.Tensor:
        if clips.ndim != 5:
            raise ValueError(
                f"GeometricEncoder takes clips (B, T, 3, H, W) whose T frames are DA3 views, got "
                f"{tuple(clips.shape)}; a single frame is frames[:, None]"
            )
        return self.preprocess(clips)

    @torch.inference_mode()
    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        x = self._clip_input(clips)
        vit = self.backbone.pretrained
        with self._autocast(), _first_blocks(vit, self.block + 1):
            ((tokens, camera),), _ = vit.get_intermediate_layers(
                x, n=[self.block], export_feat_layers=[]
            )
        if self.camera_token:
            tokens = torch.cat([camera[:, :, None], tokens], dim=2)
        return tokens.float()

    @torch.inference_mode()
    def depth(self, clips: torch.Tensor) -> torch.Tensor:
        """Depth maps (B, T, S, S) of uint8 clips, from all out-layers through the DPT head.

        Only from images: the head (DualDPT) projects each of the preset's four out-layers with
        its own weights into a feature pyramid, so it cannot decode the one layer the tokens come
        from, and predicted tokens of that layer alone cannot be turned into depth.
        """
        x = self._clip_input(clips)
        with self._autocast():
            feats, _ = self.backbone(x, export_feat_layers=[])
        # DA3 runs its head in float32, outside autocast.
        feats = [(tokens.float(), camera.float()) for tokens, camera in feats]
        size = self.image_size
        return self.head(feats, size, size, patch_start_idx=0)["depth"].float()


def build_encoders(
    cfg: EncodersConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[SemanticEncoder, GeometricEncoder]:
    """Both encoders of a config; the image sizes are checked before anything is built."""
    check_image_size(cfg.semantic_image_size, "encoders.semantic_image_size")
    check_image_size(cfg.geometric_image_size, "encoders.geometric_image_size")
    semantic = SemanticEncoder(
        cfg.semantic_model,
        cfg.semantic_image_size,
        cfg.semantic_weights,
        seed=cfg.init_seed,
        device=device,
        dtype=dtype,
    )
    geometric = GeometricEncoder(
        cfg.geometric_model,
        cfg.geometric_image_size,
        cfg.geometric_weights,
        layer=cfg.geometric_layer,
        camera_token=cfg.geometric_camera_token,
        seed=cfg.init_seed,
        device=device,
        dtype=dtype,
    )
    return semantic, geometric
