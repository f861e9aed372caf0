"""Shard sets: webdataset tar files plus a `manifest.json`, written all-or-nothing and checked on read.

A shard set is complete exactly when its manifest exists: writers build it in `<dir>.partial/` and
rename the directory when the manifest is written, so an interrupted job never leaves a directory a
later stage could take for finished.

A manifest cannot lie: it records a digest of each of its fields (`write_manifest`), so an edited
field is refused by name, and every open checks its declarations against the shards themselves
(sample counts per shard and in total, every shard's keys in order, each sample's members against
the schema, no key in two shards), reading only the tar headers; `verify` also hashes the bytes.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tarfile
from collections.abc import Container, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from svam.atomic import atomic_file, removing_on_failure, write_json_atomic
from svam.data.schema import SchemaError, ShardSchema, schema_for
from svam.hashing import DigestReader, file_digest, json_digest

MANIFEST_NAME = "manifest.json"
PARTIAL_SUFFIX = ".partial"
FIELD_DIGESTS = "field_digests"
"""The manifest field holding a digest of each of the others."""


def field_digests(manifest: dict[str, Any]) -> dict[str, str]:
    return {name: json_digest(value) for name, value in manifest.items() if name != FIELD_DIGESTS}


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    """Write `directory/manifest.json` (atomically) with a digest of each of its fields."""
    path = Path(directory) / MANIFEST_NAME
    write_json_atomic(path, {**manifest, FIELD_DIGESTS: field_digests(manifest)})
    return path


def write_shard_set_manifest(
    directory: Path, schema: ShardSchema, shards: list[dict[str, Any]], **fields: Any
) -> Path:
    """The manifest of a shard set of `schema` made of `shards` (their records), with `fields`."""
    manifest = {
        "kind": schema.kind,
        "schema_version": schema.version,
        "schema": schema.describe(),
        "num_samples": sum(shard["samples"] for shard in shards),
        "shards": shards,
        **fields,
    }
    return write_manifest(directory, manifest)


def check_field_digests(manifest: dict[str, Any], path: Path) -> None:
    """Refuse a manifest edited after it was written, naming the first field that disagrees."""
    recorded = manifest.get(FIELD_DIGESTS)
    if not isinstance(recorded, dict):
        raise SchemaError(
            f"{path}: no {FIELD_DIGESTS} (written by an older svam, or edited): re-run the stage "
            "that wrote it"
        )
    actual = field_digests(manifest)
    for name in sorted(recorded.keys() | actual.keys()):
        if name not in actual:
            raise SchemaError(f"{path}: field '{name}' was removed after the manifest was written")
        if name not in recorded:
            raise SchemaError(f"{path}: field '{name}' was added after the manifest was written")
        if recorded[name] != actual[name]:
            raise SchemaError(
                f"{path}: field '{name}' was edited after the manifest was written (its digest "
                "does not match)"
            )


class TarWriter:
    """Write webdataset samples (`__key__` plus member name -> bytes) as a tar shard, the layout
    webdataset's own TarWriter writes (members `<key>.<name>` in sorted order, mode 0444), with a
    fixed mtime and owner so the same samples give the same bytes. Plain `tarfile`: webdataset's
    writer imports torch, which an import's decode workers have no use for."""

    def __init__(self, path: Path):
        self._file = open(path, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w|")

    def write(self, sample: dict[str, Any]) -> None:
        key = sample["__key__"]
        for name in sorted(sample):
            if name.startswith("_"):
                continue
            data = sample[name]
            info = tarfile.TarInfo(f"{key}.{name}")
            info.size, info.mtime, info.mode = len(data), 0.0, 0o444
            info.uname = info.gname = "svam"
            self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        try:
            self._tar.close()
        finally:
            self._file.close()

    def __enter__(self) -> TarWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def tar_writer(path: Path) -> TarWriter:
    return TarWriter(path)


def shard_record(path: Path, keys: list[str]) -> dict[str, Any]:
    """What a manifest lists for one finished shard."""
    return {
        "name": path.name,
        "samples": len(keys),
        "keys": keys,
        "bytes": path.stat().st_size,
        "sha256": file_digest(path),
    }


def write_shard(
    path: Path, schema: ShardSchema, samples: Iterable[tuple[str, dict, dict]], **extra: Any
) -> dict[str, Any]:
    """Write one tar shard of `samples` (key, arrays, meta) atomically, then its `<name>.json`
    sidecar (its manifest record plus `extra`), which marks it complete: a resumable job that
    writes shards one by one skips those with a sidecar (`finished_shard`)."""
    keys = []
    with atomic_file(path) as tmp, tar_writer(tmp) as tar:
        for key, arrays, meta in samples:
            tar.write(schema.encode(key, arrays, meta))
            keys.append(key)
    record = {**shard_record(path, keys), **extra}
    write_json_atomic(sidecar_path(path), record)
    return record


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def finished_shard(path: Path) -> dict[str, Any] | None:
    """The sidecar record of a shard `write_shard` completed, or None (not written, or cut off)."""
    sidecar = sidecar_path(path)
    if not (path.is_file() and sidecar.is_file()):
        return None
    return json.loads(sidecar.read_text())


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
        self._tar: TarWriter | None = None
        self._keys: list[str] = []

    def __enter__(self) -> ShardSetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def _finish_shard(self) -> None:
        if self._tar is None:
            return
        name = self.shards[-1]["name"]
        path = self.partial_dir / name
        with removing_on_failure(path, self.partial_dir):
            self._tar.close()
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
            self._tar = tar_writer(self.partial_dir / name)
        with removing_on_failure(self.partial_dir / self.shards[-1]["name"], self.partial_dir):
            self._tar.write(sample)
        self._keys.append(key)

    def close(self, **manifest_fields: Any) -> Path:
        """Finish the last shard, write the manifest and rename the set into place."""
        self._finish_shard()
        write_shard_set_manifest(self.partial_dir, self.schema, self.shards, **manifest_fields)
        if self.out_dir.exists():
            shutil.rmtree(self.out_dir)
        self.partial_dir.rename(self.out_dir)
        return self.out_dir

    def abort(self) -> None:
        if self._tar is not None:
            with contextlib.suppress(OSError):  # the write that failed may fail again here
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
        check_field_digests(manifest, manifest_path)
        shard_set = cls(root, manifest, schema_for(found_kind, version, str(manifest_path)))
        shard_set.check_declarations(hash_bytes=verify)
        return shard_set

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    def check_declarations(self, hash_bytes: bool = True) -> None:
        """Check what the manifest declares against the shards: each shard present at its size,
        holding exactly its listed keys in order, each sample's members those of the schema; no
        key in two shards; `num_samples` their total; per-sample records (`episodes`) for exactly
        these keys. Reads only the tar headers, and with `hash_bytes` every byte (sha256)."""
        where = self.manifest_path
        shard_of: dict[str, str] = {}
        for index, shard in enumerate(self.manifest["shards"]):
            path = self.root / shard["name"]
            if not path.is_file():
                raise SchemaError(f"{path}: shard listed in the manifest is missing")
            size = path.stat().st_size
            if size != shard["bytes"]:
                raise SchemaError(
                    f"{path}: {size} bytes, {where} says {shard['bytes']} (shards[{index}].bytes): "
                    "truncated or replaced"
                )
            keys, digest = shard_index(path, self.schema, hash_bytes)
            declared = shard["keys"]
            if len(declared) != shard["samples"]:
                raise SchemaError(
                    f"{where}: shards[{index}].samples is {shard['samples']} but shards[{index}]"
                    f".keys lists {len(declared)}"
                )
            if keys != declared:
                raise SchemaError(f"{path}: {_key_difference(keys, declared, where, index)}")
            for key in keys:
                if key in shard_of:
                    raise SchemaError(
                        f"{where}: key '{key}' is in two shards, {shard_of[key]} and {shard['name']}"
                    )
                shard_of[key] = shard["name"]
            if digest is not None and digest != shard["sha256"]:
                raise SchemaError(f"{path}: sha256 does not match {where} (shards[{index}].sha256)")
        if self.manifest["num_samples"] != len(shard_of):
            raise SchemaError(
                f"{where}: num_samples is {self.manifest['num_samples']}, the shards hold "
                f"{len(shard_of)}"
            )
        records = self.manifest.get("episodes")
        if isinstance(records, dict) and records.keys() != shard_of.keys():
            extra = sorted(records.keys() - shard_of.keys())
            missing = sorted(shard_of.keys() - records.keys())
            raise SchemaError(
                f"{where}: episodes lists {extra[:3]} that no shard holds and lacks {missing[:3]}"
            )

    def verify(self) -> None:
        """Check the manifest's declarations against the shards, hashing every byte."""
        self.check_declarations(hash_bytes=True)

    @property
    def shard_paths(self) -> list[Path]:
        return [self.root / shard["name"] for shard in self.manifest["shards"]]

    def samples(self, shard_paths: list[Path] | None = None):
        """Decode samples of the given shards in order: (key, arrays, meta)."""
        for path in shard_paths if shard_paths is not None else self.shard_paths:
            yield from read_shard(path, self.schema)


def _key_difference(found: list[str], declared: list[str], where: Path, index: int) -> str:
    """Say how a shard's keys differ from the manifest's list."""
    unlisted = [key for key in found if key not in set(declared)]
    if unlisted:
        return f"holds sample '{unlisted[0]}', which {where} does not list (shards[{index}].keys)"
    absent = [key for key in declared if key not in set(found)]
    if absent:
        return f"has no sample '{absent[0]}', which {where} lists (shards[{index}].keys)"
    if len(found) != len(set(found)):
        return "holds a sample key twice"
    return f"holds its samples in another order than {where} lists them (shards[{index}].keys)"


def shard_index(path: Path, schema: ShardSchema, hash_bytes: bool) -> tuple[list[str], str | None]:
    """The sample keys of a tar shard in order, each sample's members checked against the schema
    (names only: `read_shard` checks the arrays), and with `hash_bytes` the sha256 of the file,
    in the same pass. Without it only the headers are read."""
    from webdataset.tariterators import base_plus_ext

    known = {f"{name}.npy" for name in schema.arrays} | {"meta.json"}
    required = {f"{name}.npy" for name, spec in schema.arrays.items() if not spec.optional}
    required.add("meta.json")
    members: dict[str, set[str]] = {}
    keys: list[str] = []
    try:
        with open(path, "rb") as handle:
            reader = DigestReader(handle) if hash_bytes else None
            with tarfile.open(fileobj=reader or handle, mode="r|" if reader else "r:") as tar:
                for member in tar:
                    key, suffix = base_plus_ext(member.name)
                    if key is None or suffix not in known:
                        raise SchemaError(
                            f"{path}: member '{member.name}' is not in the {schema.kind} schema"
                        )
                    if not keys or keys[-1] != key:
                        keys.append(key)
                        members[key] = set()
                    members[key].add(suffix)
                    if not reader and member.offset_data + member.size > path.stat().st_size:
                        raise EOFError(f"member '{member.name}' runs past the end of the file")
            digest = reader.hexdigest() if reader else None
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise SchemaError(f"{path}: unreadable shard, truncated or corrupt ({exc})") from exc
    for key, suffixes in members.items():
        if not required <= suffixes:
            missing = sorted(required - suffixes)[0]
            raise SchemaError(f"{path}: sample '{key}' has no member '{missing}'")
    return keys, digest


def read_shard(path: Path, schema: ShardSchema, keys: Container[str] | None = None):
    """Yield decoded samples of one tar shard (only those in `keys`, if given: the others are not
    decoded); a truncated or corrupt tar raises a SchemaError naming it."""
    from webdataset import tarfile_samples

    try:
        for raw in tarfile_samples([{"url": str(path)}]):
            if keys is None or raw["__key__"] in keys:
                yield schema.decode(raw)
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        if isinstance(exc, SchemaError):
            raise
        raise SchemaError(f"{path}: unreadable shard, truncated or corrupt ({exc})") from exc
