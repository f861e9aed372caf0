"""The project's one FLOP counter, and the FLOPs of a policy's control step.

- `flop_counter()`: torch's `FlopCounterMode` (matmuls, convolutions, attention; multiply-add = 2,
  elementwise ops not counted) that also counts the fused CPU attention kernel torch's own counter
  skips. Every FLOP figure of the project comes from it.
- `control_step_flops(policy, observation)`: the FLOPs of one control step of a `ShortcutPolicy`,
  in total and per part (`svam.policy.modeling_policy.PARTS`), counted after a warm-up step.
- `build_step_policy(config, mode, device)`: the policy of a mode with the models a config
  describes (teacher, encoders, decouplers, aggregator and head), its data dims taken from the
  teacher and the encoders; on `meta` nothing is allocated.
- `published_step_flops(modes)`: every mode's control-step FLOPs at the published size
  (configs/svd-xt.yaml), counted on `meta` in seconds.

Attention on each device. `F.scaled_dot_product_attention` (the decouplers', the aggregator's,
the head's, diffusers' and timm's attention, and DA3's) dispatches by device: on CPU to the fused
`_scaled_dot_product_flash_attention_for_cpu`, which torch's counter does not know; on CUDA to the
flash, memory-efficient or cuDNN kernels, which it counts; on `meta` to the math fallback, whose
two batched matmuls it counts. All are counted with the same formula, 2 B H Lq Lk (D + Dv), so a
count on CPU equals the count of the same model on `meta` (`tests/test_flops.py`). No other
fused kernel (`_native_multi_head_attention`, `_transformer_encoder_layer_fwd`) runs in these
models: their attention layers are all SDPA calls.

What runs on `meta`. The real control step runs, every model on the meta device, with
shape-only substitutions that change no counted op: the Euler scheduler of the teacher keeps
its noise schedule on the CPU (its `set_timesteps` reads values; the steps are elementwise), the
action head's DDIM update is replaced by a shape-preserving stand-in (its step is elementwise
and branches on timestep values), Depth Anything 3's 2-D RoPE is skipped on meta tensors (it
reads the largest position with `.item()`; it is an embedding lookup and elementwise products),
and a UNet or head pass of input shapes already counted replays that pass's FLOPs (`_meta_safe`).
Nothing is counted analytically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import weakref
from collections.abc import Callable, Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch.utils.flop_counter import (
    FlopCounterMode,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

COUNTER = "flop_counter/2: torch FlopCounterMode + fused CPU SDPA"
"""What counts the FLOPs: part of the key of any stored FLOP figure, so that figures stored by
torch's plain counter (which missed CPU attention) are recounted."""

PUBLISHED_CONFIG = "svd-xt"
"""The published setting (configs/svd-xt.yaml)."""

ACTION_DIM = STATE_DIM = 4
"""Meta-World's action (end-effector xyz and gripper) and proprioception dims: data dims the
teacher cache would give `svam train-policy` (`svam.policy.train.models_for`)."""


# ------------------------------------------------------------------------------- the counter


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """2 B H Lq Lk (D + Dv): the two matmuls of attention (scores and weighted values), torch's
    formula for its CUDA attention kernels."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_backward_flops(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    """The backward of the fused CPU kernel: torch's formula for its CUDA kernels' backward (the
    scores recomputed, then four matmuls)."""
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter, also counting the fused CPU attention kernel (and its backward) that
    it misses; it counts the CUDA kernels and, on `meta`, the matmuls of the math fallback, with
    the same forward formula."""
    aten = torch.ops.aten
    return FlopCounterMode(
        display=False,
        custom_mapping={
            aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward_flops,
        },
    )


# -------------------------------------------------------------------------- a control step


def control_step_flops(policy: Any, observation: dict[str, Any]) -> dict[str, Any]:
    """FLOPs of one control step of `policy` (a `ShortcutPolicy`) in total and per part (the parts
    sum to the total), counted with `flop_counter()` after a warm-up step: the instruction's
    embedding is then cached, as in closed loop. `observation` holds `frames` (1, 3, H, W) uint8,
    `instruction` and `state` (1, S) (ignored by a policy without state). A policy on `meta`
    runs with the shape-only substitutions of the module docstring."""
    from svam.policy.modeling_policy import PARTS

    parts: dict[str, int] = dict.fromkeys(PARTS, 0)
    counter = flop_counter()

    @contextlib.contextmanager
    def count(name: str) -> Iterator[None]:
        before = counter.get_total_flops()
        yield
        parts[name] += counter.get_total_flops() - before

    state = observation["state"] if policy.config.use_state else None
    meta = policy.device.type == "meta"
    if meta:  # a step on meta caches nothing else, and costs seconds: warm the text caches only
        policy.text([observation["instruction"]])
        # the empty prompt too: the unconditional batch of classifier-free guidance
        policy.frozen.pipeline.teacher.encode_text([observation["instruction"], ""])
    warmups = [] if meta else [[]]
    with _meta_safe(counter) if meta else contextlib.nullcontext():
        for observers in [*warmups, [count]]:  # a warm-up step first, then the counted one
            policy.observers.extend(observers)
            try:
                with counter if observers else contextlib.nullcontext():
                    policy.predict(
                        observation["frames"],
                        observation["instruction"],
                        state,
                        generator=torch.Generator().manual_seed(0),
                    )
            finally:
                for observer in observers:
                    policy.observers.remove(observer)
    return {"total": int(counter.get_total_flops()), "parts": parts}


# ------------------------------------------------------------------- shape-only substitutions


_PASSES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Per meta UNet or action head: {its pass's input shapes (and, for the UNet, the captured blocks
and whether it stops after them): (FLOPs per op, output shapes)}."""


def _shapes(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.dtype)
    if isinstance(value, dict):
        return {key: _shapes(item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return tuple(_shapes(item) for item in value)
    return value


def _empty(spec: Any) -> Any:
    if isinstance(spec, dict):
        return {key: _empty(item) for key, item in spec.items()}
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], torch.dtype):
        return torch.empty(spec[0], dtype=spec[1], device="meta")
    if isinstance(spec, tuple):
        return tuple(_empty(item) for item in spec)
    return spec


@contextlib.contextmanager
def _meta_safe(counter: FlopCounterMode) -> Iterator[None]:
    """The shape-only substitutions of a count on `meta` (module docstring), for the block:

    - Depth Anything 3's 2-D RoPE skipped on meta tensors (it reads the largest position with
      `.item()`; its ops, an embedding lookup and elementwise products, are not counted);
    - the teacher's UNet passes and the action head's denoiser passes memoised, per model: a
      pass whose inputs have the shapes of one counted before (every denoising step after the
      first, and the same teacher pass in another mode) adds that pass's FLOPs to `counter` and
      returns meta tensors of its output shapes. A pass on meta runs every op through Python
      shape propagation (a UNet pass about a second, a head pass a tenth), so this makes a
      20-step count take seconds instead of a minute; the count is the same.
    """
    from svam.policy.modeling_action_head import DiffusionActionHead
    from svam.teachers import pipeline_teacher

    def replay(model: torch.nn.Module, key: Any, run: Callable[[], Any]) -> Any:
        """`run()` the first time `model` runs a pass of `key`; later: its FLOPs and outputs."""
        passes = _PASSES.setdefault(model, {})
        counts = counter.flop_counts["Global"]
        if key not in passes:
            before = dict(counts)
            result = run()
            added = {op: n - before.get(op, 0) for op, n in counts.items()}
            passes[key] = ({op: n for op, n in added.items() if n}, _shapes(result))
            return result
        added, spec = passes[key]
        for op, n in added.items():
            counts[op] += n
        return _empty(spec)

    unet_forward = pipeline_teacher.unet_forward
    denoise = DiffusionActionHead.denoise

    def memoized_unet(unet, *inputs, capture=(), stop_after_capture=False):
        def run():
            return unet_forward(
                unet, *inputs, capture=capture, stop_after_capture=stop_after_capture
            )

        if inputs[0].device.type != "meta":
            return run()
        return replay(unet, (_shapes(inputs), tuple(capture), bool(stop_after_capture)), run)

    def memoized_denoise(head, noisy, timesteps, encoded):
        def run():
            return denoise(head, noisy, timesteps, encoded)

        if noisy.device.type != "meta":
            return run()
        key = (_shapes((noisy, timesteps, *encoded.key_values)), _shapes(encoded.mask))
        return replay(head, key, run)

    with contextlib.ExitStack() as patches:

        def patch(owner: Any, name: str, value: Any) -> None:
            original = getattr(owner, name)
            setattr(owner, name, value)
            patches.callback(setattr, owner, name, original)

        try:
            from depth_anything_3.model.dinov2.layers.rope import RotaryPositionEmbedding2D
        except ImportError:
            pass
        else:
            rope = RotaryPositionEmbedding2D.forward

            def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
                if tokens.device.type == "meta":
                    return tokens
                return rope(self, tokens, positions)

            patch(RotaryPositionEmbedding2D, "forward", forward)
        patch(pipeline_teacher, "unet_forward", memoized_unet)
        patch(DiffusionActionHead, "denoise", memoized_denoise)
        yield


class _ShapeOnlySampler:
    """The action head's DDIM scheduler on `meta`: the same timesteps, a shape-preserving update
    (DDIM's update is elementwise, and it branches on timestep values a meta tensor lacks)."""

    def __init__(self, scheduler: Any):
        self.scheduler = scheduler

    def set_timesteps(self, steps: int, device: Any = None) -> None:
        self.scheduler.set_timesteps(steps, device=device)

    @property
    def timesteps(self) -> torch.Tensor:
        return self.scheduler.timesteps

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor):
        return SimpleNamespace(prev_sample=torch.empty_like(sample))


def _meta_pipeline(teacher: Any) -> Any:
    """A `TeacherPipeline` whose Euler scheduler keeps its schedule on the CPU (0-dim CPU sigmas
    combine with meta latents), so generation runs on a meta teacher."""
    from diffusers import EulerDiscreteScheduler

    from svam.teachers.pipeline_teacher import TeacherPipeline

    class MetaTeacherPipeline(TeacherPipeline):
        def scheduler(self, num_inference_steps=None, sigma=None) -> EulerDiscreteScheduler:
            scheduler = EulerDiscreteScheduler.from_config(self.teacher.scheduler.config)
            if sigma is not None:
                scheduler.set_timesteps(sigmas=[float(sigma), 0.0], device="cpu")
            else:
                steps = num_inference_steps or self.teacher.config.num_inference_steps
                scheduler.set_timesteps(steps, device="cpu")
            return scheduler

    return MetaTeacherPipeline(teacher)


# ----------------------------------------------------------------------- building a policy


@dataclasses.dataclass
class _Frozen:
    """What every mode of one config shares: the teacher pipeline, the encoders, the decouplers
    (the last two built on first use)."""

    config: Any
    device: torch.device
    seed: int
    pipeline: Any
    features: tuple[int, int]
    """(channels, grid side) of the teacher's one-step features."""
    encoders: tuple[Any, Any] | None = None
    decouplers: dict[str, Any] | None = None

    def get_encoders(self) -> tuple[Any, Any]:
        from svam.teachers.encoders import build_encoders

        if self.encoders is None:
            section = dataclasses.replace(
                self.config.encoders, semantic_weights=None, geometric_weights=None
            )
            semantic, geometric = build_encoders(section, self.device)
            self.encoders = semantic.eval(), geometric.eval()
        return self.encoders

    def get_decouplers(self) -> dict[str, Any]:
        from svam.distill.modeling_decoupler import Decoupler

        if self.decouplers is None:
            self.decouplers = {}
            for name, section in self.decoupler_configs().items():
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(self.seed)
                    with torch.device(self.device):
                        model = Decoupler(section)
                self.decouplers[name] = model.eval().requires_grad_(False)
        return self.decouplers

    def decoupler_configs(self) -> dict[str, Any]:
        """The config's decouplers with their data dims from the teacher and the encoders (as
        `svam.distill.train.resolve_decouplers` takes them from the cache)."""
        channels, side = self.features
        encoders = dict(zip(("semantic", "geometric"), self.get_encoders(), strict=True))
        return {
            name: dataclasses.replace(
                section,
                encoder=encoders[name].fingerprint,
                in_channels=channels,
                feature_size=side,
                num_frames=self.config.teacher.num_frames,
                target_dim=encoders[name].out_dim,
                target_tokens=encoders[name].num_tokens,
                reference_dim=None,
                reference_tokens=None,
            )
            for name, section in self.config.decouplers.branches().items()
        }


def _frozen(config: Any, device: torch.device, seed: int) -> _Frozen:
    from svam.teachers.modeling_teacher import VideoTeacher
    from svam.teachers.pipeline_teacher import TeacherPipeline

    section = dataclasses.replace(config.teacher, pretrained_path=None, text_encoder_path=None)
    from svam.teachers.encoders import seeded_init

    with seeded_init(seed, device):
        teacher = VideoTeacher.from_config(section, seed=seed)
    teacher = teacher.to(device).eval()
    pipeline = _meta_pipeline(teacher) if device.type == "meta" else TeacherPipeline(teacher)
    frame = torch.zeros(1, 3, section.image_size, section.image_size, dtype=torch.uint8)
    # On meta, through the memo of `_meta_safe`: a count's one-step pass then reuses this one.
    with flop_counter() if device.type == "meta" else contextlib.nullcontext() as counter:
        with _meta_safe(counter) if counter is not None else contextlib.nullcontext():
            features = pipeline.features(frame, [""], num_inference_steps=1)
    return _Frozen(config, device, seed, pipeline, (features.shape[2], features.shape[-1]))


def build_step_policy(
    config: Any,
    mode: str,
    *,
    device: str | torch.device = "meta",
    seed: int = 0,
    frozen: _Frozen | None = None,
) -> Any:
    """A `ShortcutPolicy` acting in `mode` with the models `config` (a `svam.config.Config`)
    describes: its teacher built from the config (never from weights), random-init encoders, its
    decouplers, and the policy section's aggregator and head, with every data dim taken from the
    teacher and the encoders (Meta-World's action and state dims; state only with
    `train_policy.use_state`). On `meta` (the default) nothing is allocated; elsewhere the weights
    are drawn from `seed`. `frozen` reuses the teacher, encoders and decouplers of an earlier call
    (`_frozen`)."""
    from svam.policy.configuration_policy import parse_mode
    from svam.policy.modeling_policy import (
        FrozenParts,
        PolicyNet,
        ShortcutPolicy,
        ShortcutPolicyConfig,
    )
    from svam.policy.normalization import Normalizer
    from svam.policy.train import models_for

    device = torch.device(device)
    foresight = parse_mode(mode)
    kind = foresight.policy_kind
    frozen = frozen or _frozen(config, device, seed)
    teacher = frozen.pipeline.teacher
    channels, side = frozen.features
    dims: dict[str, tuple[int, int]] = {"onestep": (side * side, channels)}
    parts = FrozenParts(frozen.pipeline)
    if foresight.kind in ("shortcut", "multistep", "partial"):
        semantic, geometric = frozen.get_encoders()
        parts.semantic, parts.geometric = semantic, geometric
        dims.update(
            semantic=(semantic.num_tokens, semantic.out_dim),
            geometric=(geometric.num_tokens, geometric.out_dim),
        )
    decoupler_configs = {}
    if foresight.kind == "shortcut":
        parts.decouplers = frozen.get_decouplers()
        decoupler_configs = {
            name: dataclasses.asdict(model.config) for name, model in parts.decouplers.items()
        }
    use_state = bool(config.train_policy.use_state)
    models = models_for(
        config.policy,
        kind,
        dims,
        frames=config.teacher.num_frames,
        action=(config.data.action_horizon, ACTION_DIM),
        state_dim=STATE_DIM if use_state else 0,
        text=(teacher.config.max_text_length, teacher.config.text_hidden_size),
    )
    policy_config = ShortcutPolicyConfig(
        mode=kind,
        models=models,
        feature_steps=config.cache.num_inference_steps or config.teacher.num_inference_steps,
        use_state=use_state,
        teacher_runtime=frozen.pipeline.runtime,
        encoders=dataclasses.asdict(config.encoders),
        decoupler_configs=decoupler_configs,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            net = PolicyNet(policy_config)
    # Statistics of [-1, 1] in every dimension: identity normalisers (elementwise, uncounted),
    # kept on the CPU, where they also serve a meta policy (they move their statistics to the
    # input's device).
    for name in ("action_normalizer", "state_normalizer"):
        normalizer = getattr(net, name)
        if normalizer is not None:
            fitted = Normalizer(**dataclasses.asdict(normalizer.config))
            bounds = torch.ones(2, fitted.config.dim)
            bounds[0] = -1
            setattr(net, name, fitted.fit([bounds]))
    if device.type == "meta":
        net.head.sample_scheduler = _ShapeOnlySampler(net.head.sample_scheduler)
    return ShortcutPolicy(policy_config, net, parts, mode)


def step_observation(config: Any) -> dict[str, Any]:
    """A blank observation at the config's camera size: the input of a FLOP count (the FLOPs of a
    step do not depend on the pixel values)."""
    size = config.collect.image_size
    return {
        "frames": torch.zeros(1, 3, size, size, dtype=torch.uint8),
        "instruction": "reach the goal",
        "state": torch.zeros(1, STATE_DIM),
    }


@functools.lru_cache(maxsize=2)
def _published_models(config_name: str) -> tuple[Any, _Frozen, dict[str, Any]]:
    """(config, its frozen models on `meta`, the step's observation), shared by every mode."""
    from svam.config import load_config

    config = load_config(config_name)
    return config, _frozen(config, torch.device("meta"), 0), step_observation(config)


@functools.lru_cache(maxsize=64)
def _published(mode: str, config_name: str) -> dict[str, Any]:
    config, frozen, observation = _published_models(config_name)
    policy = build_step_policy(config, mode, device="meta", frozen=frozen)
    return control_step_flops(policy, observation)


def published_step_flops(
    modes: Sequence[str], config: str = PUBLISHED_CONFIG
) -> dict[str, dict[str, Any]]:
    """Every mode's control-step FLOPs {"total", "parts"} at the published size (configs/svd-xt
    .yaml: SVD-XT's UNet at 256 px and 16 frames, DINOv2 ViT-B/14 and DA3-large at 224 px, the
    full-scale decouplers, the published aggregator and head), counted on `meta` with the real
    control step (see the module docstring); the models are built once and each mode counted
    once per process. The modes are those of
    `parse_mode`: onestep, shortcut, multistep:K, partial:F, blind."""
    from svam.policy.configuration_policy import parse_mode

    modes = list(dict.fromkeys(modes))
    for mode in modes:  # every name checked before anything is built
        parse_mode(mode)
    counted = {mode: _published(mode, config) for mode in modes}
    return {mode: {"total": c["total"], "parts": dict(c["parts"])} for mode, c in counted.items()}
