"""`ShortcutPolicy`: (current frame, instruction[, state]) -> action chunk, in one of the
foresight modes (`svam.policy.configuration_policy.ForesightMode`).

    shortcut     teacher one-step pass ─► features ─┬────────────────────────────► onestep
                 current frame ─► DINOv2 / DA3 ─► reference tokens ─► decouplers ─► semantic,
                                                                                   geometric
    onestep      teacher one-step pass ─► features ──────────────────────────────► onestep
    multistep:K  teacher K-step generation ─► features of its first step ────────► onestep
    partial:F                             └─► generated frames ─► DINOv2 / DA3 ──► semantic,
                                                                                   geometric
    blind        nothing: no teacher pass, no streams, no aggregator (state and instruction only)
    streams ─► Uni-Perceiver ─► tokens ─┐
    instruction ─► teacher's CLIP text encoder ─┼─► diffusion action head (DDIM) ─► unnormalise
    state ─► normalise ─────────────────────────┘

A policy directory is the `PolicyNet`'s diffusers model directory: `config.json`
(`ShortcutPolicyConfig`: the policy kind trained (onestep, shortcut, multistep or blind; a
multistep policy runs any multistep:K or partial:F mode), the resolved model configs, and where
the frozen parts live with their fingerprints) and the weights (the aggregator, if any, the head
and both normalisers). Loading checks the
teacher's fingerprint (its `teacher_config.json`), the encoders' fingerprints and each
decoupler's config and weights hash against what the policy was trained with; any difference is
one PolicyLoadError line.

Randomness: the teacher's noise and then the head's initial noise are drawn from `generator` in
that order (a blind policy draws the head's only), so the same generator state gives the same
chunk.

Acting (lerobot's policy API): an observation is a dict of
    "observation.image"  current frames (B, 3, H, W) uint8
    "observation.state"  raw proprioception (B, S), for a policy with use_state (ignored otherwise)
    "task"               the instructions: one string for the batch or a list of B
    "generator"          optional: one generator for the batch or a list of one per row (None or
                         absent: torch's global generator); svam's addition, so that each row
                         draws the noise it would draw alone.
`predict_action_chunk(observation)` gives the chunks (B, K, A); `select_action(observation)` one
action per row (B, A) from a queue that holds the first `execute_actions` actions of the current
chunk, predicting the next chunk when it is empty; `reset()` empties it at an episode's start.
The queue is the batch's: its rows start together and take a new chunk together; `keep_rows`
drops the rows whose episodes ended.

Parts: a control step runs the parts of PARTS in order, each inside `ShortcutPolicy.part(name)`;
observers added to `ShortcutPolicy.observers` (context-manager factories taking the part's name)
time them or count their FLOPs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from svam.policy.configuration_policy import (
    POLICY_KINDS,
    PolicyModelsConfig,
    foresight_streams,
    parse_mode,
)
from svam.policy.modeling_action_head import (
    ActionCondition,
    DiffusionActionHead,
    Generators,
    check_generators,
)
from svam.policy.modeling_aggregator import UniPerceiver
from svam.policy.normalization import Normalizer
from svam.serialization import ModelLoadError, SvamModel, weights_fingerprint
from svam.teachers.configuration_teacher import TeacherRuntime

PolicyLoadError = ModelLoadError
"""The one model-directory load error, under the policy's name."""
BRANCHES = ("semantic", "geometric")
PARTS = ("text", "teacher", "encoders", "decouplers", "aggregator", "head")
"""The parts of a control step: instruction embedding (once per distinct instruction), the
teacher (one-step pass, or generation and decoding), the encoders (on the current frame for the
shortcut, on the generated frames otherwise), the decouplers, the aggregator, the action head
(context encoding and every DDIM step)."""

# An observation's keys (module docstring).
OBS_IMAGE = "observation.image"
OBS_STATE = "observation.state"
TASK = "task"
GENERATOR = "generator"


@dataclass
class ShortcutPolicyConfig:
    """What a policy's `config.json` holds."""

    mode: str = "shortcut"
    """The policy kind trained: onestep, shortcut, multistep or blind (see `ForesightMode`)."""
    models: PolicyModelsConfig = field(default_factory=PolicyModelsConfig)
    """Aggregator (the mode's streams, dims resolved from the cache), head and normalisation."""
    feature_steps: int = 25
    """The teacher schedule whose first (noisiest) level gives the one-step features: the
    cache's number of steps, so inference sees the features training saw."""
    use_state: bool = True
    teacher: str = ""
    """Teacher directory the policy was trained with (override at load time)."""
    teacher_fingerprint: str = ""
    teacher_runtime: TeacherRuntime = field(default_factory=TeacherRuntime)
    """The teacher runtime settings of the cache the policy was trained on: what it runs with."""
    encoders: dict[str, Any] = field(default_factory=dict)
    """The cache's `EncodersConfig` (shortcut and multistep modes read the encoders)."""
    semantic_fingerprint: str = ""
    geometric_fingerprint: str = ""
    decouplers: str | None = None
    """Decoupler directory (shortcut mode), holding semantic/ and geometric/."""
    decoupler_configs: dict[str, Any] = field(default_factory=dict)
    decoupler_fingerprints: dict[str, str] = field(default_factory=dict)
    """Short sha256 of each decoupler's weights file (`weights_fingerprint`)."""
    cache: str = ""
    """The teacher cache the policy was trained on (provenance)."""

    @property
    def streams(self) -> tuple[str, ...]:
        return foresight_streams(self.mode)

    @property
    def needs_encoders(self) -> bool:
        return self.mode in ("shortcut", "multistep")

    @property
    def needs_decouplers(self) -> bool:
        return self.mode == "shortcut"

    def validate(self) -> None:
        if self.mode not in POLICY_KINDS:
            raise ValueError(f"policy mode '{self.mode}' is not one of {', '.join(POLICY_KINDS)}")
        streams = self.streams
        self.models.validate()
        if self.models.aggregator.stream_names != streams:
            raise ValueError(
                f"aggregator streams ({', '.join(self.models.aggregator.stream_names)}) are not "
                f"those of mode '{self.mode}' ({', '.join(streams)})"
            )
        if self.feature_steps < 1:
            raise ValueError(f"feature_steps={self.feature_steps} must be at least 1")
        if self.use_state != bool(self.models.action_head.state_dim):
            raise ValueError(
                f"use_state={self.use_state} but action_head.state_dim="
                f"{self.models.action_head.state_dim}"
            )
        if self.needs_decouplers and sorted(self.decoupler_configs) != sorted(BRANCHES):
            raise ValueError("a shortcut policy records both decouplers' configs")


class PolicyNet(SvamModel):
    """What a policy trains and saves: aggregator, action head and the normalisers. A blind
    policy (no streams) has no aggregator: the head gets no tokens, only the instruction and the
    state (see `PolicyModelsConfig`)."""

    config_class = ShortcutPolicyConfig
    rebuild = "re-run `svam train-policy`"

    def __init__(self, config: ShortcutPolicyConfig):
        super().__init__(config)
        models = config.models
        self.aggregator = UniPerceiver(models.aggregator) if models.aggregator.streams else None
        self.head = DiffusionActionHead(models.action_head)
        norm = models.normalization
        self.action_normalizer = Normalizer(models.action_head.action_dim, norm.actions, norm.eps)
        self.state_normalizer = (
            Normalizer(models.action_head.state_dim, norm.state, norm.eps)
            if config.use_state
            else None
        )

    def condition(
        self,
        streams: Mapping[str, torch.Tensor],
        text: torch.Tensor,
        state: torch.Tensor | None,
    ) -> ActionCondition:
        """The head's condition; `state` raw (B, S) or None. Without an aggregator (blind) the
        tokens are an empty (B, 0, cond_dim) tensor and `streams` must be empty."""
        if self.aggregator is not None:
            tokens = self.aggregator(streams)
        elif streams:
            raise ValueError(f"a blind policy reads no streams, got ({', '.join(streams)})")
        else:
            width = self.head.config.cond_dim
            tokens = text.new_zeros(text.shape[0], 0, width, dtype=torch.float32)
        if self.state_normalizer is not None:
            if state is None:
                raise ValueError(
                    f"this policy is conditioned on the state: pass state (B, "
                    f"{self.state_normalizer.config.dim})"
                )
            state = self.state_normalizer.normalize(state.to(tokens.device, torch.float32))
        else:
            state = None
        return ActionCondition(tokens=tokens, text=text.to(tokens.dtype), state=state)

    def forward(
        self,
        streams: Mapping[str, torch.Tensor],
        text: torch.Tensor,
        state: torch.Tensor | None,
        actions: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Denoising loss of raw action chunks (B, K, A), noise and timesteps from `generator`."""
        cond = self.condition(streams, text, state)
        normalized = self.action_normalizer.normalize(actions.float())
        return self.head.loss(normalized, cond, generator)


def features_to_tokens(features: torch.Tensor) -> torch.Tensor:
    """One-step features (B, T, C, h, w) -> the aggregator's `onestep` stream (B, T, h*w, C)."""
    return features.flatten(3).transpose(2, 3).float()


@dataclass
class FrozenParts:
    """The frozen models a policy reads: the teacher pipeline, the encoders, the decouplers."""

    pipeline: Any
    semantic: nn.Module | None = None
    geometric: nn.Module | None = None
    decouplers: dict[str, nn.Module] = field(default_factory=dict)


def memoize_text(teacher: Any) -> None:
    """Make the frozen teacher encode each distinct instruction once: its one-step pass
    re-encodes the instruction on every call (2.4 ms of the tiny teacher's 48 ms pass on one
    core), while a policy sees the same instruction for a whole episode."""
    original = teacher.encode_text
    if getattr(original, "memoized", False):
        return
    cache: dict[str, torch.Tensor] = {}

    def encode_text(instructions: Sequence[str]) -> torch.Tensor:
        instructions = list(instructions)
        missing = [s for s in dict.fromkeys(instructions) if s not in cache]
        if missing:
            cache.update(zip(missing, original(missing), strict=True))
        return torch.stack([cache[s] for s in instructions])

    encode_text.memoized = True
    teacher.encode_text = encode_text


class ShortcutPolicy:
    """A trained policy with the frozen models it reads, acting in one foresight mode (default:
    the mode it was trained for; a multistep policy runs any multistep:K or partial:F)."""

    def __init__(
        self,
        config: ShortcutPolicyConfig,
        net: PolicyNet,
        frozen: FrozenParts,
        mode: str | None = None,
    ):
        config.validate()
        self.config = config
        self.foresight = parse_mode(mode or config.mode)
        if self.foresight.policy_kind != config.mode:
            raise ValueError(
                f"mode '{self.foresight.name}' runs a {self.foresight.policy_kind} policy, not "
                f"this {config.mode} policy"
            )
        self.net = net.eval().requires_grad_(False)
        self.frozen = frozen
        self.observers: list[Callable[[str], contextlib.AbstractContextManager]] = []
        self._text: dict[str, torch.Tensor] = {}
        memoize_text(frozen.pipeline.teacher)
        self.execute_actions: int | None = None
        """Actions of each chunk `select_action` gives before predicting the next chunk (None:
        the whole chunk; more than the chunk's length: the whole chunk)."""
        self._queue: deque[torch.Tensor] = deque()  # the current chunk's next actions, (B, A) each

    @property
    def mode(self) -> str:
        return self.foresight.name

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        """Run a part of the control step inside every observer's context."""
        with contextlib.ExitStack() as stack:
            for observer in self.observers:
                stack.enter_context(observer(name))
            yield

    @property
    def device(self) -> torch.device:
        return self.net.head.action_position.device

    # ------------------------------------------------------------------------------ inputs

    @torch.no_grad()
    def text(self, instructions: Sequence[str]) -> torch.Tensor:
        """The frozen CLIP text encoder's hidden states (B, L, text_dim), cached per string."""
        teacher = self.frozen.pipeline.teacher
        missing = [s for s in dict.fromkeys(instructions) if s not in self._text]
        if missing:
            states = teacher.text_states(missing).float().to(self.device)
            self._text.update(zip(missing, states, strict=True))
        return torch.stack([self._text[s] for s in instructions])

    @torch.no_grad()
    def streams(
        self,
        frames: torch.Tensor,
        instructions: Sequence[str],
        generator: Generators = None,
    ) -> dict[str, torch.Tensor]:
        """The aggregator's streams of the mode for current frames (B, 3, H, W) uint8; the
        teacher's noise comes from `generator`, or from one generator per row (a list of B)."""
        check_generators(generator, frames.shape[0])
        frozen, foresight, instructions = self.frozen, self.foresight, list(instructions)
        if not foresight.streams:  # blind: no teacher pass, nothing for an aggregator
            return {}
        if foresight.generates:
            schedule, steps = foresight.sampling(self.config.feature_steps)
            with self.part("teacher"):
                output = frozen.pipeline(
                    frames,
                    instructions,
                    generator=generator,
                    num_inference_steps=schedule,
                    stop_step=steps,
                    return_features=True,
                    decode=True,
                )
            features = output.features
        else:
            with self.part("teacher"):
                features = frozen.pipeline.features(
                    frames,
                    instructions,
                    generator=generator,
                    num_inference_steps=self.config.feature_steps,
                )
        streams = {"onestep": features_to_tokens(features).to(self.device)}
        if foresight.kind == "onestep":
            return streams
        if foresight.generates:  # the real encoders on the generated frames
            with self.part("encoders"):
                streams["semantic"] = frozen.semantic(output.frames).to(self.device).float()
                streams["geometric"] = frozen.geometric(output.frames).to(self.device).float()
            return streams
        # shortcut: decoupler foresight from the features and the real current frame's tokens
        with self.part("encoders"):
            references = {
                "semantic": frozen.semantic(frames),
                "geometric": frozen.geometric(frames[:, None])[:, 0],
            }
        feats = features.to(self.device).float()
        with self.part("decouplers"):
            for branch in BRANCHES:
                decoupler = frozen.decouplers[branch]
                reference = references[branch].to(self.device).float()
                streams[branch] = decoupler(
                    feats, reference if decoupler.config.reference else None
                ).float()
        return streams

    # ----------------------------------------------------------------------------- predict

    @torch.no_grad()
    def predict(
        self,
        frames: torch.Tensor,
        instructions: str | Sequence[str],
        state: torch.Tensor | None = None,
        generator: Generators = None,
        num_inference_steps: int | None = None,
    ) -> torch.Tensor:
        """Action chunks (B, K, A), unnormalised, for current frames (B, 3, H, W) uint8, their
        instructions and (for a policy with use_state) raw states (B, S).

        `generator` is one generator for the batch or a list of one per row; with a list, each
        row draws the teacher's noise and then the head's from its own generator, so a row's
        chunk is the one it would get alone (up to floating-point rounding of batched kernels)."""
        if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[1] != 3:
            raise ValueError(
                f"frames must be uint8 (B, 3, H, W), got {frames.dtype} {tuple(frames.shape)}"
            )
        batch = frames.shape[0]
        if isinstance(instructions, str):
            instructions = [instructions] * batch
        if len(instructions) != batch:
            raise ValueError(f"{len(instructions)} instructions for {batch} frames")
        streams = self.streams(frames, instructions, generator)
        return self.act(streams, instructions, state, generator, num_inference_steps)

    @torch.no_grad()
    def act(
        self,
        streams: Mapping[str, torch.Tensor],
        instructions: Sequence[str],
        state: torch.Tensor | None = None,
        generator: Generators = None,
        num_inference_steps: int | None = None,
    ) -> torch.Tensor:
        """Action chunks (B, K, A), unnormalised, from the mode's streams (`streams`); the head's
        noise comes from `generator`, or from one generator per row (a list of B)."""
        if state is not None:
            state = torch.as_tensor(state, dtype=torch.float32)
        with self.part("text"):
            text = self.text(list(instructions))
        with self.part("aggregator"):
            cond = self.net.condition(streams, text, state)
        with self.part("head"):
            chunk = self.net.head.sample(cond, generator, num_inference_steps)
        return self.net.action_normalizer.unnormalize(chunk.float())

    # ------------------------------------------------------------------------------- acting

    @torch.no_grad()
    def predict_action_chunk(self, observation: Mapping[str, Any]) -> torch.Tensor:
        """Action chunks (B, K, A), unnormalised, for an observation (module docstring): `predict`
        of its frames, instructions, state and generator."""
        return self.predict(
            observation[OBS_IMAGE],
            observation[TASK],
            observation.get(OBS_STATE),
            generator=observation.get(GENERATOR),
        )

    @property
    def needs_observation(self) -> bool:
        """Whether the next `select_action` predicts a chunk, so reads its observation (the
        queue is empty)."""
        return not self._queue

    @torch.no_grad()
    def select_action(self, observation: Mapping[str, Any] | None) -> torch.Tensor:
        """Each row's next action (B, A), unnormalised: the queue's next one, after queueing the
        first `execute_actions` actions of `predict_action_chunk(observation)` if it was empty.

        `observation` is read only to predict (`needs_observation`); otherwise it may be None,
        for a caller whose observations are costly (rendering)."""
        if self._queue:
            if observation is not None and len(observation[OBS_IMAGE]) != len(self._queue[0]):
                raise ValueError(
                    f"an observation of {len(observation[OBS_IMAGE])} rows, but the action queue "
                    f"holds {len(self._queue[0])}: keep_rows the rows that go on, or reset()"
                )
            return self._queue.popleft()
        if observation is None:
            raise ValueError("the action queue is empty: select_action needs an observation")
        if self.execute_actions is not None and self.execute_actions < 1:
            raise ValueError(f"execute_actions={self.execute_actions} must be at least 1")
        chunk = self.predict_action_chunk(observation)
        self._queue.extend(chunk[:, : self.execute_actions].unbind(1))
        return self._queue.popleft()

    def keep_rows(self, rows: Sequence[int]) -> None:
        """Keep the queued actions of these rows only, in this order: the batch goes on without
        the others (their episodes ended)."""
        rows = list(rows)
        self._queue = deque(actions[rows] for actions in self._queue)

    def reset(self) -> None:
        """Empty the action queue: the next `select_action` predicts (an episode's start)."""
        self._queue.clear()

    # ---------------------------------------------------------------------------- save/load

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        return self.net.save_pretrained(path)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        teacher: str | os.PathLike | None = None,
        decouplers: str | os.PathLike | None = None,
        teacher_runtime: TeacherRuntime | None = None,
        device: str | torch.device = "cpu",
        mode: str | None = None,
    ) -> ShortcutPolicy:
        """Load a policy directory and the frozen parts it records (`teacher`, `decouplers`
        override their directories), to act in `mode` (default: the mode it was trained for);
        every fingerprint is checked. The teacher runs with the runtime the policy records;
        `teacher_runtime`, when given, must equal it."""
        net = PolicyNet.from_pretrained(path, device_map=device)
        config = net.config
        if mode is not None and parse_mode(mode).policy_kind != config.mode:
            raise PolicyLoadError(
                f"{path}: a {config.mode} policy cannot act in mode '{mode}' (it needs a "
                f"{parse_mode(mode).policy_kind} policy)"
            )
        frozen = load_frozen(
            config,
            teacher=teacher,
            decouplers=decouplers,
            teacher_runtime=teacher_runtime,
            device=device,
            where=Path(path),
        )
        return cls(config, net, frozen, mode)


def load_frozen(
    config: ShortcutPolicyConfig,
    *,
    teacher: str | os.PathLike | None = None,
    decouplers: str | os.PathLike | None = None,
    teacher_runtime: TeacherRuntime | None = None,
    device: str | torch.device = "cpu",
    where: Path | str = "the policy",
) -> FrozenParts:
    """The teacher pipeline, encoders and decouplers a policy config names, each checked against
    the fingerprints it records; the teacher runs with the recorded runtime, which an explicit
    `teacher_runtime` must equal."""
    from svam.distill.modeling_decoupler import Decoupler
    from svam.teachers.configuration_encoders import EncodersConfig
    from svam.teachers.encoders import build_encoders
    from svam.teachers.modeling_teacher import read_teacher_record
    from svam.teachers.pipeline_teacher import TeacherPipeline

    source = f"{where}/config.json" if isinstance(where, Path) else where
    teacher_dir = Path(teacher or config.teacher)
    try:
        found = read_teacher_record(teacher_dir)["fingerprint"]
    except OSError as exc:
        raise PolicyLoadError(f"{source}: cannot read the policy's teacher ({exc})") from exc
    if found != config.teacher_fingerprint:
        raise PolicyLoadError(
            f"{teacher_dir}: teacher fingerprint {found}, but the policy was trained with "
            f"teacher {config.teacher_fingerprint} ({source})"
        )
    conflict = teacher_runtime and teacher_runtime.conflict(config.teacher_runtime)
    if conflict:
        raise PolicyLoadError(
            f"teacher_runtime sets {conflict} ({source}): drop it to use the policy's, or "
            "retrain the policy with `svam train-policy`"
        )
    pipeline = TeacherPipeline.from_pretrained(teacher_dir, config.teacher_runtime)
    pipeline.teacher.to(device)
    frozen = FrozenParts(pipeline)
    if config.needs_encoders:
        semantic, geometric = build_encoders(EncodersConfig(**config.encoders), device)
        for name, encoder in (("semantic", semantic), ("geometric", geometric)):
            recorded = getattr(config, f"{name}_fingerprint")
            if encoder.fingerprint != recorded:
                raise PolicyLoadError(
                    f"{source}: the {name} encoder built from the recorded encoder config is "
                    f"{encoder.fingerprint}, the policy was trained with {recorded}"
                )
        frozen.semantic, frozen.geometric = semantic.eval(), geometric.eval()
    if config.needs_decouplers:
        root = Path(decouplers or config.decouplers or "")
        for branch in BRANCHES:
            directory = root / branch
            model = Decoupler.from_pretrained(directory, device_map=device)
            if dataclasses.asdict(model.config) != config.decoupler_configs[branch]:
                raise PolicyLoadError(
                    f"{directory}: decoupler config differs from the one the policy was trained "
                    f"with ({source})"
                )
            found = weights_fingerprint(directory)
            recorded = config.decoupler_fingerprints.get(branch)
            if found != recorded:
                raise PolicyLoadError(
                    f"{directory}: decoupler weights {found}, but the policy was trained with "
                    f"{recorded} ({source})"
                )
            frozen.decouplers[branch] = model.eval().requires_grad_(False)
    return frozen
