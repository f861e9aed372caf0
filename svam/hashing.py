"""svam's one way to fingerprint things: sha256 of JSON with sorted keys (configs, records, keys),
of files' bytes (shards, manifests, weights) and of tensors (module states). Stage keys,
manifests and fingerprints all go through here, so two stages never hash one value differently."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SHORT = 16
"""Hex digits of a short digest (keys and fingerprints); file digests are full length."""


def json_digest(value: Any) -> str:
    """Short sha256 of a JSON-able value or a config dataclass (keys sorted, so dict order does
    not matter)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    blob = json.dumps(value, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:SHORT]


def file_digest(*paths: str | Path, chunk_size: int = 1 << 20) -> str:
    """Full sha256 of the files' bytes, read in chunks, in the order given."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while chunk := handle.read(chunk_size):
                digest.update(chunk)
    return digest.hexdigest()


class DigestReader:
    """A binary file wrapper that hashes what is read through it, so a parser (tarfile's stream
    mode) and the sha256 share one pass over the bytes."""

    def __init__(self, handle, chunk_size: int = 1 << 20):
        self.handle = handle
        self.chunk_size = chunk_size
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.digest.update(data)
        return data

    def hexdigest(self) -> str:
        """The full sha256 of the file, reading what the parser left (tar's end padding)."""
        while self.read(self.chunk_size):
            pass
        return self.digest.hexdigest()


def state_digest(modules: Mapping[str, torch.nn.Module] | torch.nn.Module) -> str:
    """Short sha256 of module states: every tensor's name, dtype, shape and bytes, in name order."""
    import torch  # here, so that reading a config (which hashes) does not import torch

    if isinstance(modules, torch.nn.Module):
        modules = {"": modules}
    digest = hashlib.sha256()
    for name, module in modules.items():
        for key, tensor in sorted(module.state_dict().items()):
            digest.update(f"{name}.{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:SHORT]
