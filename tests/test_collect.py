import dataclasses
import json
import subprocess
import sys

import pytest
from conftest import file_size_limit, tiny_collect_overrides

from svam.collect import collect
from svam.config import load_config
from svam.data.episodes import EpisodeClips
from svam.data.shards import MANIFEST_NAME, ShardSet


def test_collection_reads_back_with_the_right_shapes(collected):
    config, out = collected
    shard_set = ShardSet.open(out, kind="episodes")
    manifest = shard_set.manifest
    assert manifest["kept"] + len(manifest["dropped"]) == 4
    assert manifest["kept"] >= 3  # the scripted experts succeed on ~98% of episodes
    for key, arrays, meta in shard_set.samples():
        length = len(arrays["frames"])
        assert arrays["frames"].shape == (length, 32, 32, 3)
        assert arrays["depth"].shape == (length, 32, 32) and arrays["depth"].dtype == "float16"
        assert arrays["actions"].shape == (length, 4) and arrays["state"].shape == (length, 4)
        assert meta["success"] and meta["task"] in config.collect.tasks and meta["instruction"]
        assert key == f"{meta['task']}-{meta['seed']:06d}"
        assert (
            meta["first_success_step"]
            < length
            <= meta["first_success_step"] + 1 + config.collect.steps_after_success
        )
    assert (out.parent / "configs" / "collect.yaml").is_file()


@pytest.mark.parametrize("held_out", ["val", "test"])
def test_collected_clips_split_by_episode(collected, held_out):
    config, out = collected  # 2 episodes per task: one train, one held out
    fractions = {"val_fraction": 0.0, "test_fraction": 0.0, f"{held_out}_fraction": 0.25}
    data = dataclasses.replace(config.data, **fractions)
    train = {c["key"].split("/")[0] for c in EpisodeClips(out, data, "train")}
    other = {c["key"].split("/")[0] for c in EpisodeClips(out, data, held_out)}
    assert train and other and not train & other


def test_same_config_same_bytes_whatever_the_workers(collected, tmp_path):
    config, out = collected
    again = load_config("tiny", tiny_collect_overrides(tmp_path) + ["collect.workers=2"])
    out2 = collect(again)
    for name in ["shard-00000.tar", "shard-00001.tar"]:
        assert (out / name).read_bytes() == (out2 / name).read_bytes()
    first, second = (json.loads((d / MANIFEST_NAME).read_text()) for d in (out, out2))
    assert first["shards"] == second["shards"] and first["config_hash"] != ""


def test_failed_episodes_are_dropped_and_counted(tmp_path):
    config = load_config(
        "tiny",
        tiny_collect_overrides(tmp_path) + ["collect.tasks=[reach-v3]", "collect.max_steps=3"],
    )
    with pytest.raises(ValueError, match="no episode kept: the expert failed all 2"):
        collect(config)
    assert not (tmp_path / "test" / "episodes").exists()
    assert not (tmp_path / "test" / "episodes.partial").exists()
    kept = collect(
        load_config(
            "tiny",
            tiny_collect_overrides(tmp_path)
            + ["collect.tasks=[reach-v3]", "collect.max_steps=3", "collect.keep_failed=true"],
        )
    )
    manifest = ShardSet.open(kept).manifest
    assert manifest["kept"] == 2 and not any(e["success"] for e in manifest["episodes"].values())


def test_a_failed_write_leaves_nothing_partial_and_names_the_path(tmp_path):
    """A real OSError from the kernel (a file-size limit standing in for a full disk)."""
    result = subprocess.run(
        [sys.executable, "-m", "svam.cli", "collect", *tiny_collect_overrides(tmp_path)],
        capture_output=True,
        text=True,
        preexec_fn=file_size_limit(64 * 1024),
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    shard = tmp_path / "test" / "episodes.partial" / "shard-00000.tar"
    assert last.startswith(f"svam collect: error: could not write {shard}: File too large, ")
    assert not (tmp_path / "test" / "episodes").exists()
    assert not (tmp_path / "test" / "episodes.partial").exists()
