"""Per-dimension normalisation of actions and state with statistics of the training data.

A `Normalizer` is a module whose buffers hold the statistics (count, min, max, mean, std), so it
saves and loads inside a policy's weights, or on its own as a diffusers model directory. Modes:

- `min_max`: [min, max] -> [-1, 1] per dimension (Diffusion Policy's default for actions; what
  the action head's clip_sample assumes);
- `mean_std`: zero mean, unit standard deviation.

Dimensions whose range (min_max) or std (mean_std) is below `eps` (a gripper that never moves, a
constant coordinate) are centred and left unscaled instead of divided by ~0, as Diffusion Policy
does; normalize/unnormalize stay exact inverses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from svam.policy.configuration_policy import NORMALIZATION_MODES
from svam.serialization import SvamModel


@dataclass
class NormalizerConfig:
    """What a saved Normalizer's `config.json` holds."""

    dim: int = 4
    mode: str = "min_max"
    eps: float = 1e-4

    def validate(self) -> None:
        if self.dim < 1:
            raise ValueError(f"normalizer: dim={self.dim} must be at least 1")
        if self.mode not in NORMALIZATION_MODES:
            raise ValueError(
                f"normalizer: mode '{self.mode}' is not one of {', '.join(NORMALIZATION_MODES)}"
            )
        if self.eps <= 0:
            raise ValueError(f"normalizer: eps={self.eps} must be positive")


class Normalizer(SvamModel):
    """Normalise the last dimension (size `dim`) of tensors with fitted per-dimension statistics."""

    config_class = NormalizerConfig
    rebuild = "re-run `svam train-policy`"

    def __init__(self, dim: int, mode: str = "min_max", eps: float = 1e-4):
        super().__init__(NormalizerConfig(dim, mode, eps))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        for name in ("minimum", "maximum", "mean", "std"):
            self.register_buffer(name, torch.zeros(dim))

    @property
    def fitted(self) -> bool:
        return bool(self.count > 0)

    @torch.no_grad()
    def fit(self, batches: Iterable[torch.Tensor | np.ndarray]) -> Normalizer:
        """Statistics over every row of every batch (any leading shape, last dimension `dim`),
        in one streaming pass in float64 (Chan et al.'s pairwise mean/variance update)."""
        dim = self.config.dim
        count = 0
        mean = torch.zeros(dim, dtype=torch.float64)
        m2 = torch.zeros(dim, dtype=torch.float64)
        low = torch.full((dim,), float("inf"), dtype=torch.float64)
        high = torch.full((dim,), float("-inf"), dtype=torch.float64)
        for batch in batches:
            x = torch.as_tensor(batch).detach().to("cpu", torch.float64)
            if x.dim() == 0 or x.shape[-1] != dim:
                raise ValueError(
                    f"normalizer: batches must end in a dimension of {dim}, got {tuple(x.shape)}"
                )
            x = x.reshape(-1, dim)
            if not x.shape[0]:
                continue
            if not torch.isfinite(x).all():
                raise ValueError("normalizer: batch holds NaN or infinite values")
            rows = x.shape[0]
            batch_mean = x.mean(0)
            delta = batch_mean - mean
            total = count + rows
            mean = mean + delta * rows / total
            m2 = m2 + ((x - batch_mean) ** 2).sum(0) + delta**2 * count * rows / total
            count = total
            low, high = torch.minimum(low, x.min(0).values), torch.maximum(high, x.max(0).values)
        if not count:
            raise ValueError("normalizer: fit() got no data")
        self.count.fill_(count)
        for name, value in (
            ("minimum", low),
            ("maximum", high),
            ("mean", mean),
            ("std", (m2 / count).sqrt()),
        ):
            getattr(self, name).copy_(value)
        return self

    def _affine(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, offset) with normalize(x) = x * scale + offset, in float64."""
        if not self.fitted:
            raise RuntimeError("normalizer: not fitted (call fit() or load fitted statistics)")
        if like.shape[-1] != self.config.dim:
            raise ValueError(
                f"normalizer: last dimension must be {self.config.dim}, got {tuple(like.shape)}"
            )
        low, high = self.minimum.double(), self.maximum.double()
        if self.config.mode == "min_max":
            spread, centre = high - low, (high + low) / 2
            scale_if_ok = 2 / spread
        else:
            spread, centre = self.std.double(), self.mean.double()
            scale_if_ok = 1 / spread
        scale = torch.where(spread >= self.config.eps, scale_if_ok, torch.ones_like(spread))
        return scale, -centre * scale

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        scale, offset = self._affine(x)
        return (x.double() * scale.to(x.device) + offset.to(x.device)).to(x.dtype)

    def unnormalize(self, y: torch.Tensor) -> torch.Tensor:
        scale, offset = self._affine(y)
        return ((y.double() - offset.to(y.device)) / scale.to(y.device)).to(y.dtype)

    @classmethod
    def init_kwargs(cls, config: NormalizerConfig) -> dict[str, Any]:
        return dataclasses.asdict(config)
