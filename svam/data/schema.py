"""The one place that knows what a shard sample holds: key names, dtypes, shapes, schema versions.

Every writer encodes through `ShardSchema.encode` and every reader decodes through
`ShardSchema.decode`, so a sample that does not match the schema is refused at both ends.
Arrays are stored as `.npy` members, per-sample metadata as one `.json` member.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class SchemaError(ValueError):
    """A sample or shard set that does not match the schema; the message names the key or file."""


@dataclass(frozen=True)
class ArraySpec:
    dtype: str
    dims: tuple[str | int, ...]
    """Named dimensions must agree across the arrays of one sample; ints are fixed sizes."""
    doc: str = ""
    optional: bool = False
    """May be left out of every sample of a shard set (the manifest says which are present)."""


@dataclass(frozen=True)
class ShardSchema:
    kind: str
    version: int
    arrays: dict[str, ArraySpec]
    meta_keys: tuple[str, ...] = field(default=())

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "version": self.version,
            "arrays": {
                name: {
                    "dtype": spec.dtype,
                    "dims": list(spec.dims),
                    "doc": spec.doc,
                    "optional": spec.optional,
                }
                for name, spec in self.arrays.items()
            },
            "meta": list(self.meta_keys),
        }

    def _check(self, key: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        missing = {name for name, spec in self.arrays.items() if not spec.optional} - set(arrays)
        extra = set(arrays) - set(self.arrays)
        if missing or extra:
            raise SchemaError(
                f"sample '{key}': arrays {sorted(missing)} missing, {sorted(extra)} unexpected "
                f"for {self.kind} schema v{self.version}"
            )
        missing_meta = set(self.meta_keys) - set(meta)
        if missing_meta:
            raise SchemaError(f"sample '{key}': metadata keys {sorted(missing_meta)} missing")
        sizes: dict[str, int] = {}
        for name, array in arrays.items():
            spec = self.arrays[name]
            if array.dtype != np.dtype(spec.dtype):
                raise SchemaError(
                    f"sample '{key}': array '{name}' has dtype {array.dtype}, schema says {spec.dtype}"
                )
            if array.ndim != len(spec.dims):
                raise SchemaError(
                    f"sample '{key}': array '{name}' has shape {array.shape}, schema says {spec.dims}"
                )
            for dim, size in zip(spec.dims, array.shape, strict=True):
                expected = dim if isinstance(dim, int) else sizes.setdefault(dim, size)
                if size != expected:
                    raise SchemaError(
                        f"sample '{key}': array '{name}' dim {dim} is {size}, expected {expected}"
                    )

    def encode(self, key: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> dict:
        """A webdataset sample dict of bytes (deterministic: same input, same bytes)."""
        self._check(key, arrays, meta)
        sample: dict[str, Any] = {"__key__": key}
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
            sample[f"{name}.npy"] = buffer.getvalue()
        sample["meta.json"] = json.dumps(meta, sort_keys=True).encode()
        return sample

    def decode(self, sample: dict[str, Any]) -> tuple[str, dict[str, np.ndarray], dict[str, Any]]:
        """The inverse of `encode` for a raw webdataset sample (member name -> bytes)."""
        key = sample["__key__"]
        source = sample.get("__url__", "?")
        arrays = {}
        for name, spec in self.arrays.items():
            member = f"{name}.npy"
            if member in sample:
                arrays[name] = np.load(io.BytesIO(sample[member]), allow_pickle=False)
            elif not spec.optional:
                raise SchemaError(f"{source}: sample '{key}' has no member '{member}'")
        if "meta.json" not in sample:
            raise SchemaError(f"{source}: sample '{key}' has no member 'meta.json'")
        meta = json.loads(sample["meta.json"])
        self._check(key, arrays, meta)
        return key, arrays, meta


EPISODES = ShardSchema(
    kind="episodes",
    version=1,
    arrays={
        "frames": ArraySpec(
            "uint8", ("L", "H", "W", 3), "RGB observation before action i, upright"
        ),
        "depth": ArraySpec(
            "float16",
            ("L", "H", "W"),
            "depth in metres from the same camera (the simulator's; imported datasets may lack it)",
            optional=True,
        ),
        "actions": ArraySpec("float32", ("L", "A"), "the demonstrator's action i"),
        "state": ArraySpec(
            "float32", ("L", "S"), "proprioception (Meta-World: end-effector xyz, gripper)"
        ),
    },
    meta_keys=("task", "instruction", "seed", "success", "first_success_step", "camera"),
)

TEACHER_CACHE = ShardSchema(
    kind="teacher-cache",
    version=2,
    arrays={
        "semantic": ArraySpec(
            "float16",
            ("T", "Ps", "Ds"),
            "DINOv2 patch tokens of the teacher's generated frames (target)",
        ),
        "geometric": ArraySpec(
            "float16", ("T", "Pg", "Dg"), "Depth Anything 3 tokens of the generated frames (target)"
        ),
        "semantic_ref": ArraySpec(
            "float16", ("Ps", "Ds"), "DINOv2 tokens of the real current frame"
        ),
        "geometric_ref": ArraySpec(
            "float16", ("Pg", "Dg"), "Depth Anything 3 tokens of the real current frame"
        ),
        "onestep": ArraySpec(
            "float16", ("T", "C", "h", "w"), "the teacher's one-step features", optional=True
        ),
        "generated": ArraySpec(
            "uint8", ("T", "Hg", "Wg", 3), "the teacher's generated frames", optional=True
        ),
        "frames": ArraySpec(
            "uint8", ("T", "H", "W", 3), "the real clip; frame 0 is the current one"
        ),
        "depth": ArraySpec(
            "float16",
            ("T", "H", "W"),
            "the simulator's depth of the real clip, metres (absent when the episodes have none)",
            optional=True,
        ),
        "actions": ArraySpec("float32", ("K", "A"), "expert actions from the current frame on"),
        "state": ArraySpec("float32", ("T", "S"), "proprioception at the clip's frames"),
    },
    meta_keys=("task", "instruction", "episode", "start", "split"),
)

SCHEMAS = {schema.kind: schema for schema in (EPISODES, TEACHER_CACHE)}
REBUILD = {EPISODES.kind: "svam collect", TEACHER_CACHE.kind: "svam cache-teachers"}
"""The stage that writes each kind of shard set, named when an old one must be rebuilt."""


def schema_for(kind: str, version: int, source: str) -> ShardSchema:
    """The schema a manifest names, or a one-line error naming the manifest."""
    schema = SCHEMAS.get(kind)
    if schema is None:
        raise SchemaError(f"{source}: unknown shard kind '{kind}' (known: {', '.join(SCHEMAS)})")
    if version != schema.version:
        raise SchemaError(
            f"{source}: {kind} schema version {version} is not supported by this svam "
            f"(it reads version {schema.version}): rebuild it with `{REBUILD[kind]}`"
        )
    return schema
