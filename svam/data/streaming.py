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

from svam.data.schema import ShardSchema
from svam.data.shards import read_shard


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a distributed job."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def reader_position(rank: int, world: int) -> tuple[int, int]:
    """(index, count) of this reader among all data-loader workers of all ranks."""
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
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

    The distributed rank is read when the dataset is built (after the process group is set up),
    not in the loader worker, where a spawned process would not see it.
    Subclasses turn one decoded sample into items with `items(key, arrays, meta, epoch)`.
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
    ):
        self.root = Path(root)
        self.schema = schema
        self.members = members
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.repeat = repeat
        self.epoch = 0
        self.rank, self.world = distributed_rank()

    def items(
        self, key: str, arrays: dict[str, np.ndarray], meta: dict[str, Any], epoch: int
    ) -> Iterator[Any]:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _one_pass(self, epoch: int) -> Iterator[Any]:
        reader, readers = reader_position(self.rank, self.world)
        lo = reader * len(self.members) // readers
        hi = (reader + 1) * len(self.members) // readers
        mine = self.members[lo:hi]
        if not mine and self.repeat:
            raise ValueError(
                f"{self.root}: {len(self.members)} samples for {readers} readers (loader workers x "
                "processes): a repeating reader would get none; use fewer workers or processes"
            )
        rng = random.Random(f"{self.seed}/{epoch}/{reader}")
        shards = list(dict.fromkeys(name for name, _ in mine))
        if self.shuffle:
            rng.shuffle(shards)
        wanted = {key for _, key in mine}

        def items():
            for name in shards:
                for key, arrays, meta in read_shard(self.root / name, self.schema):
                    if key in wanted:
                        yield from self.items(key, arrays, meta, epoch)

        if not self.shuffle:
            yield from items()
            return
        buffer = self.shuffle_buffer
        yield from wds.shuffle(bufsize=buffer, initial=buffer, rng=rng)(items())

    def __iter__(self) -> Iterator[Any]:
        epoch = self.epoch
        while True:
            yield from self._one_pass(epoch)
            if not self.repeat:
                return
            epoch += 1
