"""Streaming the samples of a shard set across data-loader workers and distributed ranks.

The one place that decides which reader (loader worker x rank) reads which samples and in what
order; `svam.data.episodes` and `svam.data.teacher_cache` build on it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from svam.data.schema import SchemaError, ShardSchema
from svam.data.shards import read_shard
from svam.seeding import derived_seed


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a distributed job."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def loader_worker(skip_batches: int = 0) -> tuple[int, int]:
    """(index, count) of this data-loader worker. A loader takes batch i from worker i mod count;
    a loader started after `skip_batches` batches shifts its workers' roles by as many, so that
    its first batch comes from the worker whose turn it was."""
    info = get_worker_info()
    if info is None:
        return 0, 1
    return (info.id + skip_batches) % info.num_workers, info.num_workers


def reader_position(rank: int, world: int, skip_batches: int = 0) -> tuple[int, int]:
    """(index, count) of this reader among all data-loader workers of all ranks."""
    worker, workers = loader_worker(skip_batches)
    return rank * workers + worker, world * workers


def evenly_spaced(items: list, count: int | None) -> list:
    """At most `count` items taken evenly over the list (all of them for None)."""
    if count is None or len(items) <= count:
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, count).round().astype(int)]


class ShardStream(IterableDataset):
    """Stream items made from the samples `members` names, as (shard file name, sample key).

    Each reader takes a contiguous, disjoint block of `members`, so it opens only the shards that
    hold its samples. Shuffling permutes the reader's shard order per epoch and mixes items in a
    buffer of `shuffle_buffer`; both are seeded by (seed, epoch, reader), so a stream is the same
    every time it is replayed. With `repeat` the stream goes on epoch after epoch.

    The order of a pass is planned from the manifest before any sample is read (the shuffle
    buffer's choices depend only on how many items it holds), so a stream can start after the
    first `skip_batches` batches of `batch_size` items of its data loader without reading them
    again: whole passes are skipped, and then every sample whose items were all consumed.

    The distributed rank is read when the dataset is built (after the process group is set up),
    not in the loader worker, where a spawned process would not see it.
    Subclasses turn one decoded sample into items with `items(key, arrays, meta, epoch)`, and say
    how many a sample yields, without reading it, with `item_count(key)`.
    """

    def __init__(
        self,
        root: Path,
        schema: ShardSchema,
        members: list[tuple[str, str]],
        *,
        seed: int,
        shuffle: bool,
        shuffle_buffer: int,
        repeat: bool,
        skip_batches: int = 0,
        batch_size: int = 1,
    ):
        self.root = Path(root)
        self.schema = schema
        self.members = members
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.repeat = repeat
        self.skip_batches = skip_batches
        self.batch_size = batch_size
        self.epoch = 0
        self.rank, self.world = distributed_rank()

    def items(
        self, key: str, arrays: dict[str, np.ndarray], meta: dict[str, Any], epoch: int
    ) -> Iterator[Any]:
        raise NotImplementedError

    def item_count(self, key: str) -> int:
        """How many items sample `key` yields."""
        return 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _mine(self) -> tuple[int, list[tuple[str, str]]]:
        """(reader index, the members this reader reads)."""
        reader, readers = reader_position(self.rank, self.world, self.skip_batches)
        lo = reader * len(self.members) // readers
        hi = (reader + 1) * len(self.members) // readers
        mine = self.members[lo:hi]
        if not mine and self.repeat:
            raise ValueError(
                f"{self.root}: {len(self.members)} samples for {readers} readers (loader workers x "
                "processes): a repeating reader would get none; use fewer workers or processes"
            )
        return reader, mine

    def _skipped_items(self) -> int:
        """Items of this reader in the first `skip_batches` batches of its loader."""
        worker, workers = loader_worker(self.skip_batches)
        return len(range(worker, self.skip_batches, workers)) * self.batch_size

    def _plan(self, epoch: int, reader: int, mine: list[tuple[str, str]]):
        """(shards in reading order, the pass's items as (key, index) in yielding order)."""
        rng = random.Random(derived_seed(self.seed, epoch, reader))
        shards = list(dict.fromkeys(name for name, _ in mine))
        if self.shuffle:
            rng.shuffle(shards)
        keys_of: dict[str, list[str]] = {name: [] for name in shards}
        for name, key in mine:
            keys_of[name].append(key)
        read_order = (
            (key, index)
            for name in shards
            for key in keys_of[name]
            for index in range(self.item_count(key))
        )
        if not self.shuffle:
            return keys_of, list(read_order)
        buffer = self.shuffle_buffer
        return keys_of, list(wds.shuffle(bufsize=buffer, initial=buffer, rng=rng)(read_order))

    def _one_pass(self, epoch: int, reader: int, mine: list[tuple[str, str]], skip: int):
        keys_of, order = self._plan(epoch, reader, mine)
        order = order[skip:]
        wanted = set(order)
        keys = {key for key, _ in order}
        ready: dict[tuple[str, int], Any] = {}
        position = 0
        for name, shard_keys in keys_of.items():
            if keys.isdisjoint(shard_keys):
                continue
            for key, arrays, meta in read_shard(self.root / name, self.schema, keys):
                items = list(self.items(key, arrays, meta, epoch))
                if len(items) != self.item_count(key):
                    raise SchemaError(
                        f"{self.root / name}: sample '{key}' yields {len(items)} items, its "
                        f"manifest says {self.item_count(key)}"
                    )
                ready.update(
                    ((key, index), item)
                    for index, item in enumerate(items)
                    if (key, index) in wanted
                )
                while position < len(order) and order[position] in ready:
                    yield ready.pop(order[position])
                    position += 1

    def __iter__(self) -> Iterator[Any]:
        reader, mine = self._mine()
        epoch, skip = self.epoch, self._skipped_items()
        per_pass = sum(self.item_count(key) for _, key in mine)
        if skip and self.repeat and per_pass:
            epoch, skip = epoch + skip // per_pass, skip % per_pass
        while True:
            yield from self._one_pass(epoch, reader, mine, skip)
            if not self.repeat:
                return
            epoch, skip = epoch + 1, 0
