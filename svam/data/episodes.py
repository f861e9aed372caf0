"""Training clips streamed from episode shards.

A clip is `clip_frames` frames `frame_stride` steps apart, starting at a current frame `t0`, with
the `action_horizon` expert actions from `t0` on. Episodes, never clips, are split three ways:
train (fitting), val (checkpoint and model selection only) and test (every reported number), so
no frame of a held-out episode is ever seen in training and nothing is selected on test.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from svam.config import DataConfig
from svam.data.schema import EPISODES, SchemaError
from svam.data.shards import ShardSet
from svam.data.streaming import ShardStream

SPLITS = ("train", "val", "test")


def split_episodes(
    episodes: dict[str, dict[str, Any]], val_fraction: float, test_fraction: float = 0.0
) -> dict[str, str]:
    """Map each episode key to 'train', 'val' or 'test': per task, ordered by seed, the highest
    seeds go to test and the next highest to val.

    Deterministic and stratified by task. A task keeps at least one train episode, and at least
    one episode of each held-out split whose fraction is positive when it has enough episodes.
    """
    if min(val_fraction, test_fraction) < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} must be at "
            "least 0 and sum to less than 1"
        )
    by_task: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for key, info in episodes.items():
        by_task[info["task"]].append((info["seed"], key))
    split = {}
    for members in by_task.values():
        members.sort(reverse=True)  # highest seeds first
        order = []
        for name, fraction in (("test", test_fraction), ("val", val_fraction)):
            count = max(round(len(members) * fraction), 1 if fraction > 0 else 0)
            room = len(members) - 1 - len(order)  # one train episode stays
            order += [name] * max(min(count, room), 0)
        order += ["train"] * (len(members) - len(order))
        split.update({key: name for (_, key), name in zip(members, order, strict=True)})
    return split


def split_counts(split_of: dict[str, str]) -> dict[str, int]:
    """Episodes per split, in SPLITS order."""
    return {name: sum(1 for s in split_of.values() if s == name) for name in SPLITS}


def clip_starts(length: int, data: DataConfig) -> range:
    """Start steps of the clips an episode of `length` steps yields."""
    span = max((data.clip_frames - 1) * data.frame_stride + 1, data.action_horizon)
    return range(0, max(length - span + 1, 0), data.window_step)


def episode_clips(key: str, arrays: dict[str, np.ndarray], meta: dict[str, Any], data: DataConfig):
    """Cut one decoded episode into clip dicts of torch tensors."""
    frames = torch.from_numpy(arrays["frames"]).permute(0, 3, 1, 2)  # (L, 3, H, W)
    depth = torch.from_numpy(arrays["depth"]) if "depth" in arrays else None
    actions = torch.from_numpy(arrays["actions"])
    state = torch.from_numpy(arrays["state"])
    for t0 in clip_starts(len(frames), data):
        index = torch.arange(data.clip_frames) * data.frame_stride + t0
        clip = {
            "frames": frames[index],
            "actions": actions[t0 : t0 + data.action_horizon],
            "state": state[index],
            "instruction": meta["instruction"],
            "task": meta["task"],
            "key": f"{key}/{t0:04d}",
        }
        if depth is not None:  # imported datasets may hold none
            clip["depth"] = depth[index]
        yield clip


class EpisodeClips(ShardStream):
    """Stream clips of one split of an episode shard set.

    Readers (data-loader workers x distributed ranks) take disjoint blocks of the split's
    episodes; shuffling (train default) permutes episode shards per epoch and mixes clips in a
    buffer, seeded by (seed, epoch, reader): see `svam.data.streaming.ShardStream`.
    """

    def __init__(
        self,
        root: str | Path,
        data: DataConfig,
        split: str,
        *,
        seed: int = 0,
        shuffle: bool | None = None,
        repeat: bool = False,
        verify: bool = True,
        skip_batches: int = 0,
        batch_size: int = 1,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got '{split}'")
        self.shard_set = ShardSet.open(root, kind=EPISODES.kind, verify=verify)
        self.data = data
        self.split = split
        manifest = self.shard_set.manifest
        split_of = split_episodes(manifest["episodes"], data.val_fraction, data.test_fraction)
        self.episodes = [
            (shard["name"], key)
            for shard in manifest["shards"]
            for key in shard["keys"]
            if split_of[key] == split
        ]
        if not self.episodes:
            raise SchemaError(
                f"{self.shard_set.root}: no {split} episodes (data.val_fraction={data.val_fraction}, "
                f"data.test_fraction={data.test_fraction}, {len(split_of)} episodes in all)"
            )
        super().__init__(
            self.shard_set.root,
            EPISODES,
            self.episodes,
            seed=seed,
            shuffle=split == "train" if shuffle is None else shuffle,
            shuffle_buffer=data.shuffle_buffer,
            repeat=repeat,
            skip_batches=skip_batches,
            batch_size=batch_size,
        )

    def __len__(self) -> int:
        """Number of clips in one pass over the split."""
        return sum(self.item_count(key) for _, key in self.episodes)

    def item_count(self, key: str) -> int:
        length = self.shard_set.manifest["episodes"][key]["length"]
        return len(clip_starts(length, self.data))

    def items(self, key, arrays, meta, epoch) -> Iterator[dict[str, Any]]:
        return episode_clips(key, arrays, meta, self.data)


def clip_loader(
    root: str | Path,
    data: DataConfig,
    split: str,
    *,
    seed: int = 0,
    batch_size: int | None = None,
    shuffle: bool | None = None,
    repeat: bool = False,
    skip_batches: int = 0,
) -> DataLoader:
    """A DataLoader of clip batches: frames uint8 (B,T,3,H,W), depth float16 (B,T,H,W),
    actions float32 (B,K,A), state float32 (B,T,S), and lists of instruction, task and key;
    it starts after its first `skip_batches` batches without reading them."""
    batch_size = batch_size or data.batch_size
    dataset = EpisodeClips(
        root,
        data,
        split,
        seed=seed,
        shuffle=shuffle,
        repeat=repeat,
        skip_batches=skip_batches,
        batch_size=batch_size,
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=data.num_workers,
        persistent_workers=False,
    )
