"""Randomness derived from names, not from history: a sample's noise is a function of the run seed
and the sample's key (and, where it changes per pass, the epoch), so a resumed, re-sharded or
multi-process job draws exactly what an uninterrupted single-process one would."""

from __future__ import annotations

import hashlib

import torch


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from sha256 of the parts joined with '/' (e.g. run seed, purpose, rank,
    step, clip key): distinct parts give independent streams."""
    digest = hashlib.sha256("/".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def keyed_generator(*parts: object, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator (on `device`) seeded by `derived_seed(*parts)`."""
    return torch.Generator(device).manual_seed(derived_seed(*parts))


def clip_noise(run_seed: int, clip_key: str) -> torch.Generator:
    """The generator `svam cache-teachers` draws a clip's N-step sampling noise from; `svam eval`
    draws the same noise to regenerate the cached targets exactly."""
    return keyed_generator(run_seed, clip_key)
