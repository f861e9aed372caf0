import dataclasses
import json
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import synthetic_episode, write_synthetic_episodes
from torch.utils.data import DataLoader

from svam.config import DataConfig
from svam.data.episodes import (
    SPLITS,
    EpisodeClips,
    clip_loader,
    clip_starts,
    split_counts,
    split_episodes,
)
from svam.data.schema import EPISODES, SchemaError, ShardSchema
from svam.data.shards import (
    FIELD_DIGESTS,
    MANIFEST_NAME,
    ShardSet,
    ShardSetWriter,
    write_manifest,
)

DATA = DataConfig(
    clip_frames=4,
    frame_stride=2,
    action_horizon=5,
    window_step=3,
    val_fraction=0.25,
    test_fraction=0.25,
    shuffle_buffer=16,
    num_workers=0,
    batch_size=4,
)


def test_schema_round_trip():
    arrays, meta = synthetic_episode("reach-v3", 3, 6)
    sample = EPISODES.encode("reach-v3-000003", arrays, meta)
    assert EPISODES.encode("reach-v3-000003", arrays, meta) == sample  # deterministic bytes
    key, decoded, decoded_meta = EPISODES.decode(sample)
    assert key == "reach-v3-000003" and decoded_meta == meta
    for name in arrays:
        np.testing.assert_array_equal(decoded[name], arrays[name])
        assert decoded[name].dtype == arrays[name].dtype


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda a: a.update(depth=a["depth"].astype(np.float32)), "'depth' has dtype float32"),
        (lambda a: a.update(actions=a["actions"][:-1]), "'actions' dim L is 5, expected 6"),
        (lambda a: a.pop("state"), r"\['state'\] missing"),
        (lambda a: a.update(frames=a["frames"][..., :2]), "'frames' dim 3 is 2"),
    ],
)
def test_schema_rejects_bad_samples(corrupt, match):
    arrays, meta = synthetic_episode("reach-v3", 0, 6)
    corrupt(arrays)
    with pytest.raises(SchemaError, match=match):
        EPISODES.encode("k", arrays, meta)


def test_writer_is_all_or_nothing(tmp_path):
    out = tmp_path / "episodes"
    with pytest.raises(RuntimeError):
        with ShardSetWriter(out, EPISODES, 2) as writer:
            writer.write("reach-v3-000000", *synthetic_episode("reach-v3", 0, 5))
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_manifest_lists_shards_and_counts(synthetic_episodes):
    shard_set = ShardSet.open(synthetic_episodes)
    manifest = shard_set.manifest
    assert manifest["kind"] == "episodes" and manifest["num_samples"] == 8
    assert [s["samples"] for s in manifest["shards"]] == [3, 3, 2]
    assert sorted(p.name for p in synthetic_episodes.iterdir()) == [
        MANIFEST_NAME,
        "shard-00000.tar",
        "shard-00001.tar",
        "shard-00002.tar",
    ]
    assert [key for key, _, _ in shard_set.samples()] == [
        k for s in manifest["shards"] for k in s["keys"]
    ]


def test_missing_shard_set_and_partial_hint(tmp_path):
    with pytest.raises(SchemaError, match="shard set not found"):
        ShardSet.open(tmp_path / "nope")
    (tmp_path / "episodes.partial").mkdir()
    with pytest.raises(SchemaError, match="interrupted"):
        ShardSet.open(tmp_path / "episodes")
    (tmp_path / "episodes").mkdir()
    with pytest.raises(SchemaError, match="manifest.json: missing"):
        ShardSet.open(tmp_path / "episodes")


def _edit_manifest(root, edit=None, resign=False, **changes):
    """Change manifest fields (or apply `edit` to it) as a hand edit would; with `resign` as a
    writer would, field digests recomputed."""
    path = root / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    if edit:
        edit(manifest)
    if resign:
        manifest.pop(FIELD_DIGESTS)
        write_manifest(root, manifest)
    else:
        path.write_text(json.dumps(manifest))


def _raise_samples(manifest, shard=1, by=1):
    manifest["shards"][shard]["samples"] += by


def _list_absent_key(manifest):
    manifest["shards"][1]["keys"].append("push-v3-999999")


def _list_a_key_twice(manifest):
    manifest["shards"][2]["keys"][0] = manifest["shards"][0]["keys"][0]


def _drop_an_episode_record(manifest):
    manifest["episodes"].pop(next(iter(manifest["episodes"])))


def _add_a_field(manifest):
    manifest["note"] = "edited"


def _remove_a_field(manifest):
    manifest.pop("config_hash", None) or manifest.pop("num_samples")


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda m: m.update(num_samples=m["num_samples"] + 3), "num_samples' was edited"),
        (_raise_samples, "shards' was edited"),
        (_list_absent_key, "shards' was edited"),
        (_drop_an_episode_record, "episodes' was edited"),
        (_add_a_field, "note' was added"),
        (_remove_a_field, "' was removed"),
    ],
)
def test_an_edited_manifest_is_refused_naming_the_field(synthetic_episodes, edit, field):
    _edit_manifest(synthetic_episodes, edit)
    with pytest.raises(SchemaError, match=f"manifest.json: field '[a-z_]*{field}"):
        ShardSet.open(synthetic_episodes, verify=False)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(num_samples=11), "num_samples is 11, the shards hold 8"),
        (_raise_samples, r"shards\[1\].samples is 4 but shards\[1\].keys lists 3"),
        (
            lambda m: (_raise_samples(m), _list_absent_key(m)),
            r"shard-00001.tar: has no sample 'push-v3-999999', which .* lists \(shards\[1\].keys\)",
        ),
        (_list_a_key_twice, "shard-00002.tar: holds sample 'push-v3-"),
        (_drop_an_episode_record, "episodes lists .* and lacks"),
    ],
)
@pytest.mark.parametrize("verify", [False, True])
def test_declarations_that_the_shards_contradict_are_refused(
    synthetic_episodes, edit, message, verify
):
    """Even with valid field digests (a writer's bug, or a re-signed edit), every open checks
    what the manifest declares against the shards' own contents."""
    _edit_manifest(synthetic_episodes, edit, resign=True)
    with pytest.raises(SchemaError, match=message):
        ShardSet.open(synthetic_episodes, verify=verify)


def test_a_key_in_two_shards_is_refused(tmp_path):
    with ShardSetWriter(tmp_path / "e", EPISODES, 1) as writer:
        for _ in range(2):
            writer.write("reach-v3-000000", *synthetic_episode("reach-v3", 0, 5))
        with pytest.raises(SchemaError, match="key 'reach-v3-000000' is in two shards"):
            ShardSet.open(writer.close(episodes={"reach-v3-000000": {}}))


def test_a_manifest_without_field_digests_is_refused(synthetic_episodes):
    _edit_manifest(synthetic_episodes, lambda m: m.pop(FIELD_DIGESTS))
    with pytest.raises(SchemaError, match="no field_digests .*re-run the stage that wrote it"):
        ShardSet.open(synthetic_episodes, verify=False)


def test_unknown_schema_version(synthetic_episodes):
    _edit_manifest(synthetic_episodes, schema_version=99, resign=True)
    with pytest.raises(SchemaError, match="schema version 99 is not supported"):
        ShardSet.open(synthetic_episodes)


def test_sha256_mismatch_names_the_shard(synthetic_episodes):
    shard = synthetic_episodes / "shard-00001.tar"
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(SchemaError, match="shard-00001.tar: sha256 does not match"):
        ShardSet.open(synthetic_episodes)


def test_missing_shard_file(synthetic_episodes):
    (synthetic_episodes / "shard-00002.tar").unlink()
    with pytest.raises(
        SchemaError, match="shard-00002.tar: shard listed in the manifest is missing"
    ):
        ShardSet.open(synthetic_episodes)


def test_truncated_tar_names_the_shard(synthetic_episodes):
    shard = synthetic_episodes / "shard-00000.tar"
    shard_set = ShardSet.open(synthetic_episodes, verify=False)
    shard.write_bytes(shard.read_bytes()[:3000])
    with pytest.raises(SchemaError, match="shard-00000.tar: 3000 bytes, .* truncated or replaced"):
        ShardSet.open(synthetic_episodes, verify=False)
    with pytest.raises(SchemaError, match="shard-00000.tar: unreadable shard"):
        list(shard_set.samples())  # a reader that opened the set before the damage


def test_split_is_by_episode_and_stratified():
    episodes = {f"{t}-{s}": {"task": t, "seed": s} for t in ("a", "b") for s in range(4)}
    split = split_episodes(episodes, 0.25)
    assert sorted(k for k, v in split.items() if v == "val") == ["a-3", "b-3"]
    # every task keeps one episode on each side even when rounding says otherwise
    assert Counter(
        split_episodes(
            {"a-0": {"task": "a", "seed": 0}, "a-1": {"task": "a", "seed": 1}}, 0.1
        ).values()
    ) == {"train": 1, "val": 1}


def test_three_splits_highest_seeds_to_test_then_val():
    episodes = {f"{t}-{s}": {"task": t, "seed": s} for t in ("a", "b") for s in range(8)}
    split = split_episodes(dict(reversed(episodes.items())), 0.25, 0.25)
    assert split == split_episodes(episodes, 0.25, 0.25)  # deterministic, whatever the order
    by_split = {name: sorted(k for k, v in split.items() if v == name) for name in SPLITS}
    assert by_split["test"] == ["a-6", "a-7", "b-6", "b-7"]
    assert by_split["val"] == ["a-4", "a-5", "b-4", "b-5"]
    assert split_counts(split) == {"train": 8, "val": 4, "test": 4}
    # too few episodes: one train episode stays, test is served before val
    three = {f"a-{s}": {"task": "a", "seed": s} for s in range(3)}
    assert Counter(split_episodes(three, 0.2, 0.2).values()) == {"train": 1, "val": 1, "test": 1}
    two = {f"a-{s}": {"task": "a", "seed": s} for s in range(2)}
    assert Counter(split_episodes(two, 0.2, 0.2).values()) == {"train": 1, "test": 1}


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (-0.1, 0.2), (0.2, -0.1)])
def test_bad_split_fractions_are_refused(fractions):
    episodes = {"a-0": {"task": "a", "seed": 0}}
    with pytest.raises(ValueError, match="data.val_fraction=.* and data.test_fraction=.*"):
        split_episodes(episodes, *fractions)


def test_clips_have_schema_shapes_and_trace_back(synthetic_episodes):
    clips = list(EpisodeClips(synthetic_episodes, DATA, "train", shuffle=False))
    first = clips[0]
    assert first["frames"].shape == (4, 3, 8, 8) and first["frames"].dtype == torch.uint8
    assert first["depth"].shape == (4, 8, 8) and first["depth"].dtype == torch.float16
    assert first["actions"].shape == (5, 4) and first["state"].shape == (4, 4)
    for clip in clips:
        key, t0 = clip["key"].split("/")
        t0, seed = int(t0), int(key.rsplit("-", 1)[1])
        steps = [t0 + 2 * i for i in range(4)]
        assert clip["frames"][:, 0, 0, 0].tolist() == [(s + seed) % 256 for s in steps]
        assert clip["actions"][:, 0].tolist() == list(range(t0, t0 + 5))
        assert clip["state"][:, 3].tolist() == [seed] * 4
        assert clip["instruction"] == f"do {clip['task']}"
    assert (
        len(clips)
        == len(EpisodeClips(synthetic_episodes, DATA, "train"))
        == 4 * len(clip_starts(20, DATA))  # seeds 0 and 1 of both tasks
    )


def test_splits_never_share_an_episode(synthetic_episodes):
    def episodes_of(split):
        return {clip["key"].split("/")[0] for clip in EpisodeClips(synthetic_episodes, DATA, split)}

    train, val, test = (episodes_of(split) for split in SPLITS)
    assert not train & val and not train & test and not val & test
    assert len(train | val | test) == 8
    assert val == {"reach-v3-000002", "push-v3-000002"}
    assert test == {"reach-v3-000003", "push-v3-000003"}


def test_shuffle_is_seeded(synthetic_episodes):
    def keys(seed, epoch=0):
        dataset = EpisodeClips(synthetic_episodes, DATA, "train", seed=seed)
        dataset.set_epoch(epoch)
        return [clip["key"] for clip in dataset]

    assert keys(0) == keys(0)
    assert keys(0) != keys(1) and sorted(keys(0)) == sorted(keys(1))
    assert keys(0, epoch=1) != keys(0)


def test_workers_read_disjoint_parts(synthetic_episodes):
    single = [
        clip["key"] for clip in EpisodeClips(synthetic_episodes, DATA, "train", shuffle=False)
    ]
    loader = DataLoader(
        EpisodeClips(synthetic_episodes, DATA, "train", shuffle=False),
        batch_size=None,
        num_workers=2,
    )
    multi = [clip["key"] for clip in loader]
    assert sorted(multi) == sorted(single) and len(set(multi)) == len(multi)


def test_repeat_streams_more_than_one_epoch(synthetic_episodes):
    dataset = EpisodeClips(synthetic_episodes, DATA, "val", repeat=True)
    stream = iter(dataset)
    assert len([next(stream) for _ in range(3 * len(dataset))]) == 3 * len(dataset)


def resumed_keys(root, skip_batches: int, batches: int, workers: int = 0) -> list[list[str]]:
    """The clip keys of `batches` batches of a repeating train loader started after
    `skip_batches` batches."""
    data = dataclasses.replace(DATA, num_workers=workers)
    loader = clip_loader(root, data, "train", seed=3, repeat=True, skip_batches=skip_batches)
    stream = iter(loader)
    return [list(next(stream)["key"]) for _ in range(batches)]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_stream_continues_the_uninterrupted_one(synthetic_episodes, workers):
    """Started after n batches (within the first pass, at a pass boundary, passes later), the
    stream yields exactly what the uninterrupted one yields from batch n on."""
    per_pass = len(EpisodeClips(synthetic_episodes, DATA, "train")) // DATA.batch_size
    full = resumed_keys(synthetic_episodes, 0, 3 * per_pass + 2, workers)
    for skip in (1, per_pass, 2 * per_pass + 1):
        assert resumed_keys(synthetic_episodes, skip, len(full) - skip, workers) == full[skip:]


def test_a_resumed_stream_does_not_read_what_was_consumed(synthetic_episodes, monkeypatch):
    """Resuming two passes in decodes at most one pass's episodes; replaying decodes every
    episode of both consumed passes first."""
    decoded: list[str] = []
    decode = ShardSchema.decode

    def counting(self, raw):
        decoded.append(raw["__key__"])
        return decode(self, raw)

    monkeypatch.setattr(ShardSchema, "decode", counting)
    train_episodes = len(EpisodeClips(synthetic_episodes, DATA, "train").members)
    per_pass = len(EpisodeClips(synthetic_episodes, DATA, "train")) // DATA.batch_size
    skip = 2 * per_pass + 1
    decoded.clear()
    resumed = resumed_keys(synthetic_episodes, skip, 1)
    resumed_reads = len(decoded)
    decoded.clear()
    replayed = resumed_keys(synthetic_episodes, 0, skip + 1)
    assert resumed == replayed[skip:]
    assert resumed_reads <= train_episodes < 2 * train_episodes <= len(decoded)


def test_loader_batches(synthetic_episodes):
    batch = next(iter(clip_loader(synthetic_episodes, DATA, "train", seed=0)))
    assert batch["frames"].shape == (4, 4, 3, 8, 8) and len(batch["instruction"]) == 4


def test_no_validation_episodes_is_an_error(tmp_path):
    root = write_synthetic_episodes(tmp_path / "e", tasks=("reach-v3",), seeds=range(1))
    with pytest.raises(SchemaError, match="no val episodes"):
        EpisodeClips(root, DATA, "val")
