"""`svam distill`: teacher-cache streaming, learning what is learnable (and only that), exact
resume, manifest checks, on-the-fly one-step features, the fidelity report."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import torchrun
from safetensors.torch import load_file
from test_cache import MICRO
from torch.utils.data import DataLoader

from svam.cli import main
from svam.config import load_config
from svam.data.schema import SchemaError
from svam.data.teacher_cache import TeacherCacheClips, write_teacher_cache
from svam.distill.modeling_decoupler import Decoupler
from svam.distill.train import BASELINES_NAME, Distiller, distill, distill_paths, is_distilled
from svam.serialization import WEIGHTS_NAME
from svam.teachers.configuration_encoders import EncodersConfig
from svam.teachers.encoders import GeometricEncoder
from svam.teachers.modeling_teacher import VideoTeacher, read_teacher_record
from svam.training import TrainingLoop

FRAMES, CHANNELS, SIDE = 3, 8, 4
"""Synthetic one-step features (T, C, 4, 4); targets on a 2x2 token grid."""
DIMS = {"semantic": 8, "geometric": 12}
TOKENS = 4


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: intra-op threads only add overhead, and stall badly on a shared, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def standardised(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(-1, keepdims=True)) / x.std(-1, keepdims=True)


def synthetic_samples(
    kind: str,
    train: int,
    val: int,
    test: int | None = None,
    *,
    frames: int = FRAMES,
    seed: int = 0,
    video: int = 8,
):
    """(key, arrays, meta) of a synthetic teacher cache whose targets are

    learnable: 2 tanh(pooled features @ M) + the reference tokens, a fixed function of what a
        decoupler sees, neither constant over time nor linear in the features;
    noise: independent of everything, so nothing can be learnt.
    """
    rng = np.random.default_rng(seed)
    maps = {branch: rng.normal(size=(CHANNELS, dim)) for branch, dim in DIMS.items()}
    test = val if test is None else test
    for index in range(train + val + test):
        features = rng.normal(size=(frames, CHANNELS, SIDE, SIDE))
        pooled = features.reshape(frames, CHANNELS, 2, 2, 2, 2).mean((3, 5))
        tokens = pooled.reshape(frames, CHANNELS, TOKENS).transpose(0, 2, 1)
        arrays = {"onestep": features.astype(np.float16)}
        for branch, dim in DIMS.items():
            reference = standardised(rng.normal(size=(TOKENS, dim)))
            if kind == "learnable":
                target = 2 * np.tanh(tokens @ maps[branch]) + reference
            else:
                target = rng.normal(size=(frames, TOKENS, dim))
            arrays[branch] = target.astype(np.float16)
            arrays[f"{branch}_ref"] = reference.astype(np.float16)
        arrays["frames"] = rng.integers(0, 256, (frames, video, video, 3), dtype=np.uint8)
        arrays["generated"] = rng.integers(0, 256, (frames, 28, 28, 3), dtype=np.uint8)
        arrays["depth"] = rng.uniform(0.5, 2.0, (frames, video, video)).astype(np.float16)
        arrays["actions"] = np.zeros((4, 4), np.float32)
        arrays["state"] = np.zeros((frames, 4), np.float32)
        split = "train" if index < train else "val" if index < train + val else "test"
        task = ("reach-v3", "push-v3")[index % 2]
        meta = {
            "task": task,
            "instruction": f"do {task}",
            "episode": f"{task}-{index:06d}",
            "start": 0,
            "split": split,
        }
        yield f"{task}-{index:06d}-0000", arrays, meta


def write_cache(root: Path, samples, *, drop=(), frames: int = FRAMES, **manifest) -> Path:
    """A teacher-cache shard set as `svam cache-teachers` would write it, minus `drop` arrays."""
    kept = (
        (key, {k: v for k, v in arrays.items() if k not in drop}, meta)
        for key, arrays, meta in samples
    )
    fields = {
        "teacher_fingerprint": "synthetic-teacher",
        "semantic_fingerprint": "vit_small_patch14_dinov2-56px-synthetic",
        "geometric_fingerprint": "da3-small-56px-synthetic",
        "dims": {"semantic": [TOKENS, 8], "geometric": [TOKENS, 12], "clip_frames": frames},
        "encoders": dataclasses.asdict(EncodersConfig()),
        "cache_settings": {"dtype": "float32"},
        "num_inference_steps": 3,
        "run_seed": 0,
        **manifest,
    }
    return write_teacher_cache(root, kept, clips_per_shard=16, **fields)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    return {
        kind: write_cache(root / kind, synthetic_samples(kind, 96, 32), drop=("generated",))
        for kind in ("learnable", "noise")
    }


SMALL = [
    f"decouplers.{branch}.{key}={value}"
    for branch in DIMS
    for key, value in (("hidden_dim", 32), ("num_layers", 1), ("num_heads", 2))
]


def overrides(root: Path, cache: Path, *extra: str) -> list[str]:
    return [
        f"run.root={root}",
        "run.name=run",
        f"distill.cache={cache}",
        *SMALL,
        "distill.batch_size=16",
        "distill.learning_rate=3e-3",
        "distill.lr_warmup_steps=5",
        "distill.log_every=5",
        "data.num_workers=0",
        *extra,
    ]


def report_of(root: Path) -> dict:
    return json.loads((root / "run" / "decouplers" / "fidelity.json").read_text())


# ------------------------------------------------------------------------------ the stream


def test_stream_by_split_with_the_asked_arrays(caches):
    val = TeacherCacheClips(caches["learnable"], "val", arrays=["semantic", "onestep", "current"])
    items = list(val)
    assert len(items) == len(val) == 32 and all(int(i["key"][-11:-5]) >= 96 for i in items)
    item = items[0]
    assert item["semantic"].shape == (FRAMES, TOKENS, 8) and item["semantic"].dtype == torch.float16
    assert item["onestep"].shape == (FRAMES, CHANNELS, SIDE, SIDE)
    assert item["current"].shape == (3, 8, 8) and item["current"].dtype == torch.uint8
    assert item["instruction"] == f"do {item['task']}" and item["epoch"] == 0
    assert "geometric" not in item
    assert len(TeacherCacheClips(caches["learnable"], "train", max_clips=10)) == 10


def test_stream_workers_disjoint_and_shuffle_seeded(caches):
    def keys(seed=0, epoch=0, workers=0, shuffle=True):
        dataset = TeacherCacheClips(caches["noise"], "train", seed=seed, shuffle=shuffle)
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=None, num_workers=workers)
        return [item["key"] for item in loader]

    in_order = keys(shuffle=False)
    assert keys() == keys() and keys() != keys(seed=1) and keys() != keys(epoch=1)
    assert sorted(keys()) == sorted(in_order) and len(set(in_order)) == 96
    two = keys(workers=2, shuffle=False)
    assert sorted(two) == sorted(in_order) and len(set(two)) == 96


def test_stream_refuses_missing_arrays(tmp_path):
    cache = write_cache(tmp_path / "c", synthetic_samples("noise", 4, 2), drop=("onestep",))
    with pytest.raises(SchemaError, match=r"no 'onestep' arrays \(it was made with cache.keep"):
        TeacherCacheClips(cache, "train", arrays=["onestep"])


# ---------------------------------------------------------------------------------- training


def test_learns_the_learnable_and_beats_both_baselines(caches, tmp_path):
    config = load_config(
        "tiny",
        overrides(tmp_path, caches["learnable"], "distill.steps=150", "distill.eval_every=50"),
    )
    out = distill(config)
    report = report_of(tmp_path)
    for branch in DIMS:
        result = report["branches"][branch]
        assert result["beats_baselines"], result["versus"]
        for baseline in ("nothing_moves", "linear_probe"):
            margin = result["versus"][baseline]
            # at every future frame index, not only on average
            assert all(g > 0.05 for g in margin["skill_gain"][1:]), margin
            assert all(g > 0.05 for g in margin["centred_cosine_gain"][1:]), margin
        assert result["best_step"] in (50, 100, 150)
        loaded = Decoupler.from_pretrained(out / branch)
        assert loaded.config.in_channels == CHANNELS and loaded.config.num_frames == FRAMES
        assert (loaded.config.target_dim, loaded.config.target_tokens) == (DIMS[branch], TOKENS)
        assert loaded.config.encoder.endswith("-synthetic")
    markdown = (out / "fidelity.md").read_text()
    assert "| cosine: linear probe |" in markdown and "the decoupler beats it" in markdown
    assert list((tmp_path / "run" / "tb" / "distill").glob("events.out.tfevents.*"))
    assert is_distilled(config)
    assert not is_distilled(
        load_config("tiny", [*overrides(tmp_path, caches["learnable"]), "distill.steps=151"])
    )
    # what the report needs is published with the decouplers, not only in the scratch directory
    work = out.with_name(out.name + "-train")
    assert (out / BASELINES_NAME).read_bytes() == (work / BASELINES_NAME).read_bytes()
    shutil.rmtree(work)
    from svam.eval.evaluate import Evaluation

    evaluation = Evaluation(load_config("tiny", overrides(tmp_path, caches["learnable"])))
    assert evaluation.baselines == out / BASELINES_NAME


def test_does_not_beat_the_baselines_on_noise(caches, tmp_path):
    config = load_config(
        "tiny", overrides(tmp_path, caches["noise"], "distill.steps=150", "distill.eval_every=50")
    )
    distill(config)
    report = report_of(tmp_path)
    for branch in DIMS:
        result = report["branches"][branch]
        assert not result["beats_baselines"]
        assert not result["versus"]["linear_probe"]["beats"]
        assert min(result["methods"]["decoupler"]["per_frame"]["nmse"]) > 0.98  # explains none
        assert result["methods"]["nothing_moves"]["skill"] == pytest.approx(0, abs=1e-9)
    assert "linear_probe" in report_of(tmp_path)["notes"][-1].split("does not beat: ")[1]


class Interrupted(Exception):
    pass


def test_resume_reproduces_the_uninterrupted_run(caches, tmp_path, monkeypatch):
    extra = (
        "distill.steps=8",
        "distill.eval_every=4",
        "distill.checkpoint_every=4",
        "data.num_workers=2",
    )
    straight = tmp_path / "straight"
    distill(load_config("tiny", overrides(straight, caches["learnable"], *extra)))

    save_checkpoint = TrainingLoop.save_checkpoint

    def save_then_die(self, step, micro_step):
        save_checkpoint(self, step, micro_step)
        if step == 4:
            raise Interrupted

    resumed = tmp_path / "resumed"
    monkeypatch.setattr(TrainingLoop, "save_checkpoint", save_then_die)
    with pytest.raises(Interrupted):
        distill(load_config("tiny", overrides(resumed, caches["learnable"], *extra)))
    monkeypatch.undo()
    checkpoints = resumed / "run" / "decouplers-train" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["checkpoint-000004"]
    assert not (resumed / "run" / "decouplers").exists()
    distill(load_config("tiny", overrides(resumed, caches["learnable"], *extra)))

    def weights(root):
        path = root / "run" / "decouplers-train" / "checkpoints" / "checkpoint-000008"
        return load_file(path / "model.safetensors")

    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert report_of(straight)["branches"] == report_of(resumed)["branches"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            # every dim agrees but the geometric width
            [
                "distill.dims_from_cache=false",
                *(f"decouplers.{b}.in_channels=8" for b in DIMS),
                *(f"decouplers.{b}.num_frames=3" for b in DIMS),
                *(f"decouplers.{b}.target_tokens=4" for b in DIMS),
                "decouplers.semantic.target_dim=8",
            ],
            r"^decouplers\.geometric\.target_dim=768 but the cache's geometric tokens are 12-d "
            r"\(.*learnable/manifest\.json\)$",
        ),
        (
            ["distill.dims_from_cache=false"],
            r"^decouplers\.semantic\.in_channels=128 but the teacher's one-step features have 8 "
            r"channels",
        ),
        (["decouplers.semantic.token_pool=4"], "token_pool=4 does not divide the 2x2 target grid"),
        (["distill.onestep=on-the-fly", "distill.teacher=/no/teacher"], "/no/teacher"),
        (["distill.cache=/no/cache"], r"^no teacher cache at /no/cache: run `svam cache-teachers`"),
    ],
)
def test_refuses_a_mismatch_in_one_line(caches, tmp_path, capsys, extra, message):
    args = overrides(tmp_path, caches["learnable"], "distill.steps=2", *extra)
    assert main(["distill", *args]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("svam distill: error: ")
    assert __import__("re").search(message, err.removeprefix("svam distill: error: ")), err
    assert not (tmp_path / "run" / "decouplers").exists()


# ---------------------------------------------------------------------------- on the fly


@pytest.fixture(scope="module")
def micro_teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    config = load_config("tiny", MICRO)
    return VideoTeacher.from_config(config.teacher, seed=0).save_pretrained(root / "teacher")


def test_on_the_fly_onestep_features(micro_teacher, tmp_path, capsys):
    """No features in the cache: the cache's teacher computes them, fresh noise each epoch;
    with the generated frames in the cache, depth errors come through the depth probe."""
    encoders = EncodersConfig(semantic_image_size=28, geometric_image_size=28)
    fingerprint = GeometricEncoder("da3-small", 28).fingerprint
    cache = write_cache(
        tmp_path / "cache",
        synthetic_samples("noise", 8, 4, frames=4, video=16),
        drop=("onestep",),
        frames=4,
        teacher_fingerprint=read_teacher_record(micro_teacher)["fingerprint"],
        geometric_fingerprint=fingerprint,
        encoders=dataclasses.asdict(encoders),
    )
    config = load_config(
        "tiny",
        overrides(
            tmp_path,
            cache,
            *MICRO,
            f"distill.teacher={micro_teacher}",
            "distill.batch_size=4",
            "distill.steps=4",
            "distill.eval_every=4",
        ),
    )
    distiller = Distiller(config, distill_paths(config))
    distiller.train()
    out = capsys.readouterr().out
    assert f"one-step features computed on the fly by the teacher at {micro_teacher}" in out
    assert "64-channel 8x8 features of 4 frames" in out
    report = report_of(tmp_path)
    assert report["onestep"].startswith("on-the-fly")
    for truth in ("teacher", "world"):  # DA3 of the generated frames; the simulator's depth
        methods = report["depth"][truth]
        assert set(methods) == {"decoupler", "nothing_moves", "linear_probe", "targets"}
        for summary in methods.values():
            per_frame = summary["per_frame"]
            assert len(per_frame["abs_rel"]) == 4 and all(0 <= d <= 1 for d in per_frame["delta1"])
        assert methods["nothing_moves"]["skill"] == pytest.approx(0, abs=1e-9)

    item = next(iter(TeacherCacheClips(cache, "train", arrays=["current"], shuffle=False)))
    batch = {
        "current": item["current"][None],
        "instruction": [item["instruction"]],
        "key": [item["key"]],
    }
    first, again, later = (distiller._features({**batch, "epoch": [e]}) for e in (0, 0, 1))
    assert first.shape == (1, 4, 64, 8, 8)
    assert torch.equal(first, again) and not torch.allclose(first, later)


def test_two_processes_under_torchrun(caches, tmp_path):
    """DDP over gloo, each rank streaming its own half of the clips, in bf16 autocast."""
    args = overrides(
        tmp_path,
        caches["learnable"],
        "distill.steps=4",
        "distill.eval_every=2",
        "distill.mixed_precision=bf16",
    )
    result = subprocess.run(
        torchrun(2, "distill", *args),
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 steps of 16 clips x 2 process(es)" in result.stdout
    report = report_of(tmp_path)
    assert report["clips"] == 32 and report["steps"] == 4


def test_selection_never_reads_the_test_split(caches, tmp_path):
    """Whatever the test clips hold, the same decouplers are chosen: only the report reads them."""
    swapped = [
        (key, arrays, meta)
        for key, arrays, meta in synthetic_samples("learnable", 96, 32)
        if meta["split"] != "test"
    ] + [
        (key, arrays, {**meta, "split": "test"})
        for key, arrays, meta in synthetic_samples("noise", 96, 32, seed=7)
        if meta["split"] == "test"
    ]
    cache = write_cache(tmp_path / "swapped", swapped, drop=("generated",))
    weights = {}
    for name, source in (("original", caches["learnable"]), ("swapped", cache)):
        root = tmp_path / name
        config = load_config(
            "tiny", overrides(root, source, "distill.steps=20", "distill.eval_every=10")
        )
        out = distill(config)
        weights[name] = {b: (out / b / WEIGHTS_NAME).read_bytes() for b in DIMS}
        report = report_of(root)
        assert report["split"] == "test" and report["clips"] == 32
    assert weights["original"] == weights["swapped"]


def test_refuses_a_cache_without_a_test_split(tmp_path):
    samples = [s for s in synthetic_samples("noise", 8, 4) if s[2]["split"] != "test"]
    cache = write_cache(tmp_path / "old", samples, drop=("generated",))
    with pytest.raises(ValueError, match=r"holds no test clips .* rebuild it with `svam cache"):
        distill(load_config("tiny", overrides(tmp_path, cache)))


def test_fidelity_skill_is_0_for_nothing_moves_and_1_for_the_targets():
    """Skill against "nothing moves", NMSE of per-channel standardised tokens, centred cosine:
    a channel of large scale does not dominate, and the component every token shares does not
    make a poor guess look good."""
    from svam.distill.fidelity import ForesightFidelity, summarize_tokens

    generator = torch.Generator().manual_seed(0)
    frames, tokens, dim = 4, 6, 8
    scale = torch.ones(dim)
    scale[: dim // 2] = 100.0  # one half of the channels 100x the other (as DA3's two halves)
    mean = torch.full((dim,), 5.0)  # a component every token shares
    reference = mean + scale * torch.randn(3, tokens, dim, generator=generator)
    drift = scale * torch.randn(3, frames, tokens, dim, generator=generator)
    target = reference[:, None] + drift * torch.linspace(0, 1, frames)[None, :, None, None]

    def scores(guess):
        metric = ForesightFidelity(frames, mean, scale)
        metric.update(guess, target, reference)
        return summarize_tokens({k: v.tolist() for k, v in metric.compute().items()})

    static = reference[:, None].expand_as(target)
    assert scores(static)["skill"] == pytest.approx(0, abs=1e-9)
    perfect = scores(target)
    assert perfect["skill"] == pytest.approx(1) and perfect["nmse"] == pytest.approx(0, abs=1e-9)
    assert perfect["centred_cosine"] == pytest.approx(1)
    # the small-scale half exactly right, the large-scale half static: half the error remains
    half = static.clone()
    half[..., dim // 2 :] = target[..., dim // 2 :]
    assert 0.3 < scores(half)["skill"] < 0.7
    # a guess that is only the shared component: raw cosine high, centred cosine and skill not
    shared = scores(mean.expand_as(target).clone())
    assert shared["centred_cosine"] == pytest.approx(0, abs=1e-6) and shared["skill"] < 0
