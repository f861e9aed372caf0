"""Shard sets: webdataset tar files plus a `manifest.json`, written all-or-nothing and checked on read.

A shard set is complete exactly when its manifest exists: writers build it in `<dir>.partial/` and
rename the directory when the manifest is written, so an interrupted job never leaves a directory a
later stage could take for finished.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from svam.data.schema import SchemaError, ShardSchema, schema_for
from svam.hashing import file_digest

MANIFEST_NAME = "manifest.json"
PARTIAL_SUFFIX = ".partial"


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def tar_writer(path: Path) -> wds.TarWriter:
    """A webdataset tar writer with a fixed mtime and owner: the same samples give the same bytes."""
    return wds.TarWriter(str(path), mtime=0.0, user="svam", group="svam")


def shard_record(path: Path, keys: list[str]) -> dict[str, Any]:
    """What a manifest lists for one finished shard."""
    return {
        "name": path.name,
        "samples": len(keys),
        "keys": keys,
        "bytes": path.stat().st_size,
        "sha256": file_digest(path),
    }


class ShardSetWriter:
    """Write samples into numbered tar shards; `close` writes the manifest and publishes the set.

    Use as a context manager: an exception inside the block removes the partial directory.
    Tar members get a fixed mtime and owner, so the same samples always give the same bytes.
    """

    def __init__(self, out_dir: Path, schema: ShardSchema, samples_per_shard: int):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.out_dir = Path(out_dir)
        self.partial_dir = self.out_dir.with_name(self.out_dir.name + PARTIAL_SUFFIX)
        self.schema = schema
        self.samples_per_shard = samples_per_shard
        shutil.rmtree(self.partial_dir, ignore_errors=True)
        self.partial_dir.mkdir(parents=True)
        self.shards: list[dict[str, Any]] = []
        self._tar: wds.TarWriter | None = None
        self._keys: list[str] = []

    def __enter__(self) -> ShardSetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def _finish_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        name = self.shards[-1]["name"]
        path = self.partial_dir / name
        self.shards[-1].update(
            samples=len(self._keys),
            keys=self._keys,
            bytes=path.stat().st_size,
            sha256=file_digest(path),
        )
        self._tar, self._keys = None, []

    def write(self, key: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        sample = self.schema.encode(key, arrays, meta)
        if self._tar is not None and len(self._keys) >= self.samples_per_shard:
            self._finish_shard()
        if self._tar is None:
            name = f"shard-{len(self.shards):05d}.tar"
            self.shards.append({"name": name})
            self._tar = wds.TarWriter(
                str(self.partial_dir / name), mtime=0.0, user="svam", group="svam"
            )
        self._tar.write(sample)
        self._keys.append(key)

    def close(self, **manifest_fields: Any) -> Path:
        """Finish the last shard, write the manifest and rename the set into place."""
        self._finish_shard()
        manifest = {
            "kind": self.schema.kind,
            "schema_version": self.schema.version,
            "schema": self.schema.describe(),
            "num_samples": sum(shard["samples"] for shard in self.shards),
            "shards": self.shards,
            **manifest_fields,
        }
        write_json_atomic(self.partial_dir / MANIFEST_NAME, manifest)
        if self.out_dir.exists():
            shutil.rmtree(self.out_dir)
        self.partial_dir.rename(self.out_dir)
        return self.out_dir

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        shutil.rmtree(self.partial_dir, ignore_errors=True)


@dataclass
class ShardSet:
    """A complete shard set on disk, its manifest and its schema."""

    root: Path
    manifest: dict[str, Any]
    schema: ShardSchema

    @classmethod
    def open(cls, root: str | Path, kind: str | None = None, verify: bool = True) -> ShardSet:
        """Open and check a shard set: manifest present, schema known, shards present (and hashed)."""
        root = Path(root)
        manifest_path = root / MANIFEST_NAME
        if not root.is_dir():
            partial = root.with_name(root.name + PARTIAL_SUFFIX)
            hint = (
                " (an interrupted run left it incomplete; re-run that stage)"
                if partial.exists()
                else ""
            )
            raise SchemaError(f"shard set not found: {root}{hint}")
        if not manifest_path.is_file():
            raise SchemaError(f"{manifest_path}: missing, so {root} is not a complete shard set")
        try:
            manifest = json.loads(manifest_path.read_text())
            found_kind, version = manifest["kind"], manifest["schema_version"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise SchemaError(f"{manifest_path}: unreadable manifest ({exc})") from exc
        if kind is not None and found_kind != kind:
            raise SchemaError(f"{manifest_path}: holds '{found_kind}' shards, expected '{kind}'")
        shard_set = cls(root, manifest, schema_for(found_kind, version, str(manifest_path)))
        for shard in manifest["shards"]:
            path = root / shard["name"]
            if not path.is_file():
                raise SchemaError(f"{path}: shard listed in the manifest is missing")
        if verify:
            shard_set.verify()
        return shard_set

    def verify(self) -> None:
        """Check every shard's size and sha256 against the manifest."""
        for shard in self.manifest["shards"]:
            path = self.root / shard["name"]
            if path.stat().st_size != shard["bytes"] or file_digest(path) != shard["sha256"]:
                raise SchemaError(f"{path}: sha256 does not match {self.root / MANIFEST_NAME}")

    @property
    def shard_paths(self) -> list[Path]:
        return [self.root / shard["name"] for shard in self.manifest["shards"]]

    def samples(self, shard_paths: list[Path] | None = None):
        """Decode samples of the given shards in order: (key, arrays, meta)."""
        for path in shard_paths if shard_paths is not None else self.shard_paths:
            yield from read_shard(path, self.schema)


def read_shard(path: Path, schema: ShardSchema, keys: Container[str] | None = None):
    """Yield decoded samples of one tar shard (only those in `keys`, if given: the others are not
    decoded); a truncated or corrupt tar raises a SchemaError naming it."""
    try:
        for raw in wds.tarfile_samples([{"url": str(path)}]):
            if keys is None or raw["__key__"] in keys:
                yield schema.decode(raw)
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        if isinstance(exc, SchemaError):
            raise
        raise SchemaError(f"{path}: unreadable shard, truncated or corrupt ({exc})") from exc
