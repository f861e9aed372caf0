"""`svam cache-teachers` on a micro teacher: contents, determinism, kill + resume, two ranks, faults."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import torchrun, write_synthetic_episodes

from svam.atomic import WriteFailedError
from svam.cli import main
from svam.config import load_config
from svam.data.schema import TEACHER_CACHE, SchemaError
from svam.data.shards import MANIFEST_NAME, ShardSet
from svam.data.teacher_cache import TeacherCache
from svam.teachers.cache import cache_teachers, is_cached
from svam.teachers.configuration_teacher import TeacherRuntime
from svam.teachers.encoders import SemanticEncoder
from svam.teachers.modeling_teacher import VideoTeacher

MICRO = [
    "teacher.image_size=32",
    "teacher.num_frames=4",
    "teacher.vae_block_out_channels=[32,32,32]",
    "teacher.block_out_channels=[32,32,32]",
    "teacher.num_attention_heads=[1,1,1]",
    "teacher.cross_attention_dim=32",
    "teacher.addition_time_embed_dim=8",
    "teacher.text_hidden_size=16",
    "teacher.text_num_layers=1",
    "teacher.text_num_heads=1",
    "teacher.text_intermediate_size=32",
    "teacher.max_text_length=8",
    "teacher.num_inference_steps=3",
    "data.clip_frames=4",
    "data.frame_stride=2",
    "data.action_horizon=4",
    "data.window_step=4",
    "data.val_fraction=0.34",
    "data.test_fraction=0.34",
    "encoders.semantic_image_size=28",
    "encoders.geometric_image_size=28",
    "cache.clips_per_shard=2",
    "cache.batch_size=2",
    "cache.num_threads=1",  # bytes depend on threads per process; torchrun gives each rank one
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Episode shards (2 tasks x 3 episodes, 3 clips each) and a saved random-init micro teacher."""
    root = tmp_path_factory.mktemp("cache-inputs")
    episodes = write_synthetic_episodes(root / "episodes", seeds=range(3), length=16, size=16)
    config = load_config("tiny", MICRO)
    VideoTeacher.from_config(config.teacher, seed=0).save_pretrained(root / "teacher")
    return [*MICRO, f"cache.episodes={episodes}", f"cache.teacher={root / 'teacher'}"]


def overrides_for(inputs, out: Path, *extra: str) -> list[str]:
    return [
        *inputs,
        f"run.root={out.parent}",
        f"run.name={out.name}-run",
        f"cache.output_dir={out}",
        *extra,
    ]


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """One uninterrupted single-process run every other run is compared with."""
    out = tmp_path_factory.mktemp("reference") / "cache"
    cache_teachers(load_config("tiny", overrides_for(inputs, out)))
    return out


def shard_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.glob("*.tar"))}


def test_cache_contents(reference):
    shard_set = ShardSet.open(reference, kind=TEACHER_CACHE.kind)
    manifest = shard_set.manifest
    counts = {"train": 6, "val": 6, "test": 6}  # one episode of each task per split
    assert manifest["counts"] == counts and manifest["skipped_nonfinite"] == []
    assert [s["name"] for s in manifest["shards"]] == [
        f"{split}-0000{i}.tar" for split in counts for i in range(3)
    ]
    assert manifest["splits"]["episodes"] == {"train": 2, "val": 2, "test": 2}
    assert manifest["num_inference_steps"] == 3 and manifest["teacher_fingerprint"]
    assert manifest["dims"]["semantic"] == [4, 384] and manifest["dims"]["geometric"] == [4, 768]
    keys = set()
    for key, arrays, meta in shard_set.samples():
        keys.add(key)
        assert arrays["semantic"].shape == (4, 4, 384) and arrays["semantic"].dtype == np.float16
        assert arrays["geometric"].shape == (4, 4, 768) and arrays["geometric"].dtype == np.float16
        assert arrays["semantic_ref"].shape == (4, 384) and arrays["geometric_ref"].shape == (
            4,
            768,
        )
        assert arrays["onestep"].shape[:2] == (4, 64) and arrays["onestep"].dtype == np.float16
        assert arrays["generated"].shape == (4, 32, 32, 3) and arrays["generated"].dtype == np.uint8
        assert arrays["frames"].shape == (4, 16, 16, 3) and arrays["actions"].shape == (4, 4)
        assert key == f"{meta['episode']}-{meta['start']:04d}"
        # the real clip is the episode's frames start, start+2, ... (synthetic value = step + seed)
        seed = int(meta["episode"].rsplit("-", 1)[1])
        assert arrays["frames"][:, 0, 0, 0].tolist() == [
            meta["start"] + 2 * i + seed for i in range(4)
        ]
    assert len(keys) == 18
    assert not list(reference.glob("*.tmp"))


def test_same_inputs_same_bytes_and_resume_skips(inputs, reference, tmp_path, capsys):
    out = tmp_path / "cache"
    config = load_config("tiny", overrides_for(inputs, out))
    cache_teachers(config)
    assert shard_bytes(out) == shard_bytes(reference)
    assert is_cached(config)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    cache_teachers(load_config("tiny", overrides_for(inputs, out)))
    assert "(9 already complete)" in capsys.readouterr().out
    assert before == {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "svam.cli", "cache-teachers", *args]


def test_killed_run_resumes_to_identical_bytes(inputs, reference, tmp_path):
    out = tmp_path / "cache"
    process = subprocess.Popen(
        _cli(*overrides_for(inputs, out)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    while not list(out.glob("*.tar.json")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = list(out.glob("*.tar.json"))
    assert 1 <= len(finished) < 9, "the kill should land between the first and the last shard"
    assert not (out / MANIFEST_NAME).exists()
    with pytest.raises(SchemaError, match="manifest.json: missing"):
        ShardSet.open(out)
    cache_teachers(load_config("tiny", overrides_for(inputs, out)))
    assert shard_bytes(out) == shard_bytes(reference)
    assert not list(out.glob("*.tmp"))


def test_two_ranks_write_disjoint_shards_equal_to_one(inputs, reference, tmp_path):
    out = tmp_path / "cache"
    result = subprocess.run(
        torchrun(2, "cache-teachers", *overrides_for(inputs, out)),
        capture_output=True,
        text=True,
        timeout=400,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert shard_bytes(out) == shard_bytes(reference)
    # rank r wrote shards r, r+2, ...: each rank reports its own share
    assert "cache-teachers: rank 0:" in result.stdout and "cache-teachers: rank 1:" in result.stdout
    assert (
        json.loads((out / MANIFEST_NAME).read_text())["shards"]
        == json.loads((reference / MANIFEST_NAME).read_text())["shards"]
    )


def test_nonfinite_samples_are_skipped_and_named(inputs, tmp_path, monkeypatch, capsys):
    original = SemanticEncoder.forward

    def poisoned(self, images):
        tokens = original(self, images)
        if images.dim() == 5 and images.shape[0] == 2:  # a batch of generated clips
            tokens = tokens.clone()
            tokens[1, 0, 0, 0] = float("nan")
        return tokens

    monkeypatch.setattr(SemanticEncoder, "forward", poisoned)
    out = tmp_path / "cache"
    cache_teachers(load_config("tiny", overrides_for(inputs, out, "cache.splits=[val]")))
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["num_samples"] == 3 and len(manifest["skipped_nonfinite"]) == 3
    assert "skipped 3 with NaN/Inf" in capsys.readouterr().out
    written = {key for shard in manifest["shards"] for key in shard["keys"]}
    assert not written & set(manifest["skipped_nonfinite"])


def test_dry_run_writes_nothing(inputs, tmp_path, capsys):
    out = tmp_path / "cache"
    assert main(["cache-teachers", "--dry-run", *overrides_for(inputs, out)]) == 0
    text = capsys.readouterr().out
    assert "18 clips (train 6, val 6, test 6) in 9 shards" in text and "estimated" in text
    assert not out.exists() or not any(out.iterdir())


def test_manifest_records_the_teacher_runtime_that_later_stages_read(inputs, reference, tmp_path):
    config = load_config("tiny", overrides_for(inputs, reference))
    manifest = json.loads((reference / MANIFEST_NAME).read_text())
    assert manifest["teacher_runtime"] == TeacherRuntime.from_config(config.teacher).to_record()
    cache = TeacherCache.open(reference, verify=False)
    assert cache.runtime_for(config.teacher) == TeacherRuntime.from_config(config.teacher)
    assert is_cached(config)
    changed = load_config("tiny", [*overrides_for(inputs, reference), "teacher.feature_sigma=0.5"])
    assert not is_cached(changed)
    with pytest.raises(SchemaError) as refused:
        cache.runtime_for(changed.teacher)
    message = str(refused.value)
    assert "teacher.feature_sigma=0.5 where None is recorded" in message and "\n" not in message
    assert "svam cache-teachers" in message

    # A cache written by an older svam (no runtime, no field digests) is refused: rebuild it.
    legacy = tmp_path / "legacy"
    shutil.copytree(reference, legacy)
    del manifest["teacher_runtime"], manifest["field_digests"]
    (legacy / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(SchemaError, match="no field_digests .*re-run the stage that wrote it"):
        TeacherCache.open(legacy, verify=False)


def test_refuses_to_add_to_a_cache_of_other_teacher_settings(inputs, reference, tmp_path, capsys):
    out = tmp_path / "cache"
    shutil.copytree(reference, out)
    (out / MANIFEST_NAME).unlink()  # an unfinished run, so the job checks its plan
    before = shard_bytes(out)
    argv = ["cache-teachers", *overrides_for(inputs, out, "teacher.guidance_scale=2.0")]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "different teacher_runtime" in err and "'guidance_scale': 2.0" in err
    assert "\n" not in err and shard_bytes(out) == before


def test_refuses_to_mix_with_another_cache(inputs, reference, tmp_path, capsys):
    out = tmp_path / "cache"
    shutil.copytree(reference, out)
    before = shard_bytes(out)
    assert main(["cache-teachers", *overrides_for(inputs, out, "run.seed=7")]) == 1
    err = capsys.readouterr().err.strip()
    assert "different run_seed (0 there, 7 now)" in err and "\n" not in err
    assert shard_bytes(out) == before


@pytest.mark.parametrize(
    "override, message",
    [
        ("cache.episodes=/no/such/episodes", "shard set not found: /no/such/episodes"),
        ("cache.teacher=/no/such/teacher", "/no/such/teacher"),
        ("encoders.semantic_weights=/no/such/dinov2.safetensors", "/no/such/dinov2.safetensors"),
        ("encoders.semantic_image_size=30", "encoders.semantic_image_size=30"),
        ("data.clip_frames=5", "data.clip_frames=5"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(inputs, tmp_path, capsys, override, message):
    out = tmp_path / "cache"
    assert main(["cache-teachers", *overrides_for(inputs, out), override]) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_wrong_architecture_weights(inputs, tmp_path, capsys):
    weights = tmp_path / "vit_base.pth"
    torch.save(SemanticEncoder("vit_small_patch14_dinov2", 28).vit.state_dict(), weights)
    out = tmp_path / "cache"
    code = main(
        [
            "cache-teachers",
            *overrides_for(inputs, out),
            "encoders.semantic_model=vit_base_patch14_dinov2",
            f"encoders.semantic_weights={weights}",
        ]
    )
    assert code != 0 and str(weights) in capsys.readouterr().err
    assert not out.exists()


def test_multistep_under_cache_noise_reproduces_the_cached_targets(inputs, reference):
    """The report's exact check: `svam eval`'s multistep:N foresight under the cache's per-clip
    noise keys is the cached N-step targets (up to their float16 rounding); under fresh noise it
    is not (the teacher's sampling spread)."""
    from svam.data.teacher_cache import CURRENT, TeacherCache, teacher_cache_loader
    from svam.eval.measure import noise_generators
    from svam.flops import build_step_policy
    from svam.policy.modeling_policy import FrozenParts
    from svam.teachers.encoders import build_encoders
    from svam.teachers.pipeline_teacher import TeacherPipeline

    config = load_config("tiny", overrides_for(inputs, reference))
    cache = TeacherCache.open(reference)
    semantic, geometric = build_encoders(config.encoders)
    assert geometric.fingerprint == cache.manifest["geometric_fingerprint"]
    policy = build_step_policy(config, "multistep:3", device="cpu")
    policy.frozen = FrozenParts(
        TeacherPipeline.from_pretrained(config.cache.teacher), semantic.eval(), geometric.eval()
    )
    arrays = [CURRENT, "semantic", "geometric"]
    batches = list(teacher_cache_loader(cache, "test", batch_size=3, arrays=arrays, shuffle=False))
    assert sum(len(b["key"]) for b in batches) == 6
    errors = {}
    for noise in ("cache_noise", "fresh_noise"):
        worst = 0.0
        for batch in batches:
            generators = noise_generators(config.run.seed, list(batch["key"]), noise)
            with torch.no_grad():
                streams = policy.streams(batch[CURRENT], list(batch["instruction"]), generators)
            for branch in ("semantic", "geometric"):
                target = batch[branch].float()
                scale = target.abs().amax()
                worst = max(worst, float((streams[branch] - target).abs().amax() / scale))
        errors[noise] = worst
    assert errors["cache_noise"] < 5e-3  # float16 keeps 11 significant bits
    assert errors["fresh_noise"] > 10 * errors["cache_noise"]


def test_shards_inspect_shows_the_splits(reference, capsys):
    assert main(["shards", "inspect", str(reference)]) == 0
    out = capsys.readouterr().out
    assert (
        "splits: train 6 clips / 2 episodes, val 6 clips / 2 episodes, test 6 clips / 2 episodes"
        in out
    )
    assert "data.test_fraction=0.34" in out


def test_a_failed_shard_write_leaves_nothing_partial_and_the_rerun_resumes(
    inputs, reference, tmp_path, monkeypatch, capsys
):
    """A full disk at the fourth shard (val-00000): the three train shards stand, it leaves no file."""
    import svam.data.shards as shards_module

    original, calls = shards_module.tar_writer, []

    def filling(path):
        calls.append(path)
        if len(calls) == 4:
            path.write_bytes(b"half a shard")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(path)

    monkeypatch.setattr(shards_module, "tar_writer", filling)
    out = tmp_path / "cache"
    with pytest.raises(WriteFailedError) as failed:
        cache_teachers(load_config("tiny", overrides_for(inputs, out)))
    assert str(failed.value).startswith(f"could not write {out / 'val-00000.tar'}: No space")
    assert sorted(p.name for p in out.glob("*.tar*")) == [
        f"train-0000{i}.tar{suffix}" for i in range(3) for suffix in ("", ".json")
    ]
    monkeypatch.undo()
    capsys.readouterr()
    cache_teachers(load_config("tiny", overrides_for(inputs, out)))
    assert "(3 already complete)" in capsys.readouterr().out
    assert shard_bytes(out) == shard_bytes(reference)
