"""Diffusion action head: a transformer that denoises an action chunk, conditioned on the
aggregator's tokens, the instruction and (optionally) the robot state.

    context, once per chunk:
        aggregator tokens (B, N, cond_dim) ─LayerNorm, Linear─┐
        instruction (B, L, text_dim)       ─LayerNorm, Linear─┼─ + type embedding ─► context_layers
        state (B, state_dim)               ─MLP──────────────┘      x self-attention ─► LayerNorm
        ──► each denoiser block's cross-attention keys and values
    denoiser, once per DDIM step:
        noisy chunk (B, K, A) ─Linear─► + learned position embedding
        ──► depth x [adaLN self-attention, cross-attention to the context, adaLN MLP]
        ──► adaLN ──► Linear ──► (B, K, A)
    noise level: sinusoidal embedding of the timestep ──► MLP ──► every adaLN

The layout is VPP's (S-VAM's) action model, MDT's "GCDenoiser": a transformer encoder over the
goal and observation tokens, then a decoder over the action chunk with self-attention,
cross-attention to the encoder output and adaLN-Zero conditioning on the noise level (DiT, Peebles
and Xie 2023: shift, scale and a zero-initialised gate per sublayer). The context goes through its
layers and into every block's keys and values once per chunk, not once per step as in VPP (whose
denoiser re-runs its encoder at every sampler step). At the published size (225 context tokens, 4
blocks, 10-action chunks) a step costs 0.19 GFLOPs; recomputing the keys and values would add
0.53 (74% of the step), and the context layers another 3.6.

Noise: diffusers' DDPMScheduler for training, DDIMScheduler (eta 0, deterministic given the
initial noise) for sampling, both from the config's keys, so a saved config.json rebuilds them.
S-VAM trains with EDM (Karras et al.) preconditioning and samples with 10 DDIM-style steps; here
the discrete-time schedulers of diffusers do the same job with a cosine schedule.

Prediction target: `sample` (the clean chunk) by default. With 10 DDIM steps from a cosine
schedule the first step starts at near-zero signal, where recovering the chunk from an epsilon
prediction divides by sqrt(alpha_bar) = 0.0005 and amplifies errors (then clipped); predicting the
chunk itself is well conditioned at every noise level, and the loss is on the scale of the
actions. 3D Diffusion Policy (Ze et al. 2024) samples 10 DDIM steps from a sample-predicting model
for this reason; Diffusion Policy (Chi et al. 2023) predicts epsilon with 100 training steps.
`epsilon` and `v_prediction` remain available.

Flow matching (`type: flow`), as pi0 (Black et al. 2024) and LingBot-VA train their action
experts: the same network predicts the velocity noise - chunk on the straight path
x_t = t * noise + (1 - t) * chunk, trained at pi0's times (Beta(1.5, 1), heavier at the noisy end),
and sampled by K Euler steps of 1/K from t = 1 (diffusers' FlowMatchEulerDiscreteScheduler with
uniform sigmas); K = 1 is a single step. The time embedding reads t * num_train_timesteps, the
scale the DDPM head's integer timesteps have.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from svam.flops import flop_counter
from svam.policy.configuration_policy import ActionHeadConfig
from svam.policy.layers import (
    Attention,
    KeyValue,
    TransformerLayer,
    feed_forward,
    init_linear_layers,
)
from svam.serialization import SvamModel, count_parameters


@dataclass
class ActionCondition:
    """What an action chunk is conditioned on (state normalised like the training data)."""

    tokens: torch.Tensor
    """Aggregator tokens (B, N, cond_dim)."""
    text: torch.Tensor
    """Instruction embedding (B, L, text_dim); L = 1 for a pooled embedding."""
    text_mask: torch.Tensor | None = None
    """(B, L) bool, True for real tokens (padding is not attended to); None: all real."""
    state: torch.Tensor | None = None
    """(B, state_dim), required when the head is built with state_dim > 0."""


@dataclass
class EncodedCondition:
    """The context as every denoiser block reads it: keys and values per block, and the key mask."""

    key_values: list[KeyValue]
    mask: torch.Tensor | None


Generators = torch.Generator | list[torch.Generator] | None
"""One generator for the batch, or one per batch row (diffusers' convention, as the teacher's
`svam.teachers.modeling_teacher.Generators`)."""


def check_generators(generator: Generators, batch: int) -> None:
    """Refuse a list of generators that is not one per batch row (diffusers' `randn_tensor`
    would index past its end, or silently ignore the extra ones)."""
    if isinstance(generator, list) and len(generator) != batch:
        raise ValueError(f"{len(generator)} generators for a batch of {batch}: pass one per row")


def timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer sinusoids (B, dim) of diffusion timesteps (B,): integers for DDPM, flow times
    scaled to the same range for flow matching."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, device=timesteps.device) / half)
    angles = timesteps.float()[:, None] * frequencies[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class DenoiserBlock(nn.Module):
    """adaLN-Zero self-attention over the chunk, cross-attention to the context, adaLN-Zero MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.self_norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.self_attn = Attention(dim, num_heads, dropout)
        self.cross_norm = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, num_heads, dropout)
        self.mlp_norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = feed_forward(dim, mlp_ratio, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        noise_embedding: torch.Tensor,
        key_value: KeyValue,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        modulation = self.modulation(noise_embedding)[:, None].chunk(6, dim=-1)
        shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = modulation
        attended = self.self_attn(modulate(self.self_norm(x), shift_attn, scale_attn))
        x = x + gate_attn * self.dropout(attended)
        x = x + self.dropout(self.cross_attn(self.cross_norm(x), key_value=key_value, mask=mask))
        return x + gate_mlp * self.dropout(
            self.mlp(modulate(self.mlp_norm(x), shift_mlp, scale_mlp))
        )


class DiffusionActionHead(SvamModel):
    """Denoiser of normalised action chunks (B, horizon, action_dim), with its noise schedulers
    (DDPM/DDIM, or flow matching's Euler sampler: `config.type`)."""

    config_class = ActionHeadConfig
    rebuild = "re-run `svam train-policy`"

    def __init__(self, config: ActionHeadConfig):
        super().__init__(config)
        dim = config.dim
        self.cond_norm = nn.LayerNorm(config.cond_dim)
        self.cond_proj = nn.Linear(config.cond_dim, dim)
        self.text_norm = nn.LayerNorm(config.text_dim)
        self.text_proj = nn.Linear(config.text_dim, dim)
        if config.state_dim:
            self.state_proj = nn.Sequential(
                nn.Linear(config.state_dim, dim), nn.SiLU(), nn.Linear(dim, dim)
            )
        self.type_embedding = nn.Parameter(torch.randn(3, dim) * 0.02)
        self.context_layers = nn.ModuleList(
            TransformerLayer(dim, config.num_heads, config.mlp_ratio, config.dropout)
            for _ in range(config.context_layers)
        )
        self.context_norm = nn.LayerNorm(dim)

        self.noise_embedding = nn.Sequential(
            nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim)
        )
        self.action_proj = nn.Linear(config.action_dim, dim)
        self.action_position = nn.Parameter(torch.randn(config.horizon, dim) * 0.02)
        self.blocks = nn.ModuleList(
            DenoiserBlock(dim, config.num_heads, config.mlp_ratio, config.dropout)
            for _ in range(config.depth)
        )
        self.output_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.output_norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.output = nn.Linear(dim, config.action_dim)
        init_linear_layers(self)
        zero_init = [block.modulation[1] for block in self.blocks]
        for layer in [*zero_init, self.output_modulation[1], self.output]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

        with torch.device("cpu"):  # the schedulers' tables, also when built on `meta`
            if config.type == "flow":
                self.sample_scheduler = FlowMatchEulerDiscreteScheduler(
                    num_train_timesteps=config.num_train_timesteps
                )
            else:
                self.noise_scheduler = DDPMScheduler(**config.scheduler_kwargs())
                self.sample_scheduler = DDIMScheduler(**config.scheduler_kwargs())

    # ------------------------------------------------------------------------------- network

    def encode(self, cond: ActionCondition) -> EncodedCondition:
        """Context tokens -> per-block cross-attention keys and values (once per chunk)."""
        self._check_condition(cond)
        parts = [
            self.cond_proj(self.cond_norm(cond.tokens)) + self.type_embedding[0],
            self.text_proj(self.text_norm(cond.text)) + self.type_embedding[1],
        ]
        if self.config.state_dim:
            parts.append((self.state_proj(cond.state) + self.type_embedding[2])[:, None])
        context = torch.cat(parts, dim=1)
        mask = None
        if cond.text_mask is not None:
            batch, tokens = cond.tokens.shape[:2]
            mask = torch.ones(batch, context.shape[1], dtype=torch.bool, device=context.device)
            mask[:, tokens : tokens + cond.text.shape[1]] = cond.text_mask
        for layer in self.context_layers:
            context = layer(context, mask)
        context = self.context_norm(context)
        key_values = [block.cross_attn.key_value(context) for block in self.blocks]
        return EncodedCondition(key_values, mask)

    def denoise(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, encoded: EncodedCondition
    ) -> torch.Tensor:
        """The model output (per prediction_type) for noisy chunks (B, K, A) at timesteps (B,)."""
        noise_embedding = self.noise_embedding(timestep_embedding(timesteps, self.config.dim))
        x = self.action_proj(noisy) + self.action_position
        for block, key_value in zip(self.blocks, encoded.key_values, strict=True):
            x = block(x, noise_embedding, key_value, encoded.mask)
        shift, scale = self.output_modulation(noise_embedding)[:, None].chunk(2, dim=-1)
        return self.output(modulate(self.output_norm(x), shift, scale))

    def forward(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: ActionCondition
    ) -> torch.Tensor:
        return self.denoise(noisy, timesteps, self.encode(cond))

    # ------------------------------------------------------------------- training, sampling

    def loss(
        self,
        actions: torch.Tensor,
        cond: ActionCondition,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Training loss on normalised chunks (B, K, A), all draws from `generator`: DDPM's MSE
        against the prediction target at uniform timesteps, or flow matching's MSE against the
        velocity at pi0's times."""
        config = self.config
        expected = (config.horizon, config.action_dim)
        if actions.dim() != 3 or tuple(actions.shape[1:]) != expected:
            raise ValueError(
                f"action head: actions must be (B, {expected[0]}, {expected[1]}), got "
                f"{tuple(actions.shape)}"
            )
        batch = actions.shape[0]
        noise = randn_tensor(
            actions.shape, generator=generator, device=actions.device, dtype=actions.dtype
        )
        if config.type == "flow":
            t = self.flow_times(batch, generator).to(actions.device, actions.dtype)
            noisy = t[:, None, None] * noise + (1 - t[:, None, None]) * actions
            velocity = self(noisy, t * config.num_train_timesteps, cond)
            return F.mse_loss(velocity, noise - actions)
        timesteps = torch.randint(
            config.num_train_timesteps,
            (batch,),
            generator=generator,
            device=generator.device if generator is not None else actions.device,
        ).to(actions.device)
        noisy = self.noise_scheduler.add_noise(actions, noise, timesteps)
        prediction = self(noisy, timesteps, cond)
        if config.prediction_type == "epsilon":
            target = noise
        elif config.prediction_type == "sample":
            target = actions
        else:
            target = self.noise_scheduler.get_velocity(actions, noise, timesteps)
        return F.mse_loss(prediction, target)

    def flow_times(self, batch: int, generator: torch.Generator | None) -> torch.Tensor:
        """pi0's training times: t_min + (1 - t_min) * u with u ~ Beta(alpha, 1), drawn by its
        inverse CDF u = U ** (1 / alpha) so that `generator` alone decides them."""
        config = self.config
        device = generator.device if generator is not None else self.action_position.device
        uniform = torch.rand(batch, generator=generator, device=device)
        u = uniform ** (1 / config.flow_time_alpha)
        return config.flow_time_min + (1 - config.flow_time_min) * u

    def set_sampling_steps(self, steps: int, device: torch.device) -> None:
        """Set the sampler's schedule: DDIM's, or K uniform Euler steps from t = 1 to 0."""
        if self.config.type == "flow":
            sigmas = torch.linspace(1, 0, steps + 1)[:-1].tolist()
            self.sample_scheduler.set_timesteps(sigmas=sigmas, device=device)
        else:
            self.sample_scheduler.set_timesteps(steps, device=device)

    @torch.no_grad()
    def sample(
        self,
        cond: ActionCondition,
        generator: Generators = None,
        num_inference_steps: int | None = None,
    ) -> torch.Tensor:
        """Normalised action chunks (B, horizon, action_dim) by DDIM (eta 0) or Euler flow steps
        from Gaussian noise drawn with `generator`, or with one generator per row (a list of B):
        the same generator state gives the same chunks, and with a list a row's chunk does not
        depend on its batch."""
        config = self.config
        steps = config.num_inference_steps if num_inference_steps is None else num_inference_steps
        batch = cond.tokens.shape[0]
        check_generators(generator, batch)
        encoded = self.encode(cond)
        device, dtype = cond.tokens.device, self.action_position.dtype
        scheduler = self.sample_scheduler
        self.set_sampling_steps(steps, device)
        x = randn_tensor(
            (batch, config.horizon, config.action_dim),
            generator=generator,
            device=device,
            dtype=dtype,
        )
        for t in scheduler.timesteps:
            output = self.denoise(x, t.expand(batch), encoded)
            x = scheduler.step(output, t, x).prev_sample
        if config.type == "flow" and config.clip_sample:  # DDIM clips its estimate every step
            x = x.clamp(-config.clip_sample_range, config.clip_sample_range)
        return x

    def _check_condition(self, cond: ActionCondition) -> None:
        config = self.config
        tokens, text = cond.tokens, cond.text
        if tokens.dim() != 3 or tokens.shape[-1] != config.cond_dim:
            raise ValueError(
                f"action head: cond.tokens must be (B, N, {config.cond_dim}), got "
                f"{tuple(tokens.shape)}"
            )
        batch = tokens.shape[0]
        if text.dim() != 3 or text.shape[0] != batch or text.shape[-1] != config.text_dim:
            raise ValueError(
                f"action head: cond.text must be ({batch}, L, {config.text_dim}), got "
                f"{tuple(text.shape)}"
            )
        if cond.text_mask is not None and (
            cond.text_mask.dtype != torch.bool or cond.text_mask.shape != text.shape[:2]
        ):
            raise ValueError(
                f"action head: cond.text_mask must be bool {tuple(text.shape[:2])}, got "
                f"{cond.text_mask.dtype} {tuple(cond.text_mask.shape)}"
            )
        if config.state_dim and (
            cond.state is None or cond.state.shape != (batch, config.state_dim)
        ):
            got = None if cond.state is None else tuple(cond.state.shape)
            raise ValueError(
                f"action head is built with state_dim={config.state_dim}: cond.state must be "
                f"({batch}, {config.state_dim}), got {got}"
            )
        if not config.state_dim and cond.state is not None:
            raise ValueError("action head is built without state (state_dim=0): pass state=None")


# ------------------------------------------------------------------------------------- cost


def example_condition(
    config: ActionHeadConfig, batch: int = 1, device: str | torch.device = "cpu"
) -> ActionCondition:
    """A random condition of the shapes the config is built for."""
    state = torch.randn(batch, config.state_dim, device=device) if config.state_dim else None
    return ActionCondition(
        tokens=torch.randn(batch, config.cond_tokens, config.cond_dim, device=device),
        text=torch.randn(batch, config.text_tokens, config.text_dim, device=device),
        state=state,
    )


def build_action_head(
    config: ActionHeadConfig, device: str | torch.device | None = None
) -> DiffusionActionHead:
    """A head with parameters created on `device` ("meta" for a shape check)."""
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return DiffusionActionHead(config)


class ActionHeadFlops(NamedTuple):
    """Forward FLOPs of the head: `condition` once per chunk, `step` per denoising step."""

    condition: int
    step: int

    def total(self, steps: int) -> int:
        return self.condition + steps * self.step


def action_head_flops(config: ActionHeadConfig, batch: int = 1) -> ActionHeadFlops:
    """FLOPs (multiply-add = 2) for `batch` chunks, counted on the `meta` device."""
    model = build_action_head(config, "meta").eval().requires_grad_(False)
    cond = example_condition(config, batch, device="meta")
    noisy = torch.randn(batch, config.horizon, config.action_dim, device="meta")
    timesteps = torch.zeros(batch, dtype=torch.long, device="meta")
    with torch.no_grad():
        with flop_counter() as counter:
            encoded = model.encode(cond)
        condition = counter.get_total_flops()
        with flop_counter() as counter:
            model.denoise(noisy, timesteps, encoded)
    return ActionHeadFlops(condition, counter.get_total_flops())


def action_head_parameters(config: ActionHeadConfig) -> int:
    """Parameter count, built on the `meta` device."""
    return count_parameters(build_action_head(config, "meta"))
