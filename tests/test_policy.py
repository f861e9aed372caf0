"""`ShortcutPolicy`, `svam train-policy` and the Meta-World evaluation, on a micro teacher, the
micro encoders, random decouplers and a synthetic teacher cache of their shapes."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from distill.configuration_decoupler import DecouplerConfig
from distill.modeling_decoupler import Decoupler
from policy.configuration_train import mode_dirname
from policy.modeling_policy import ShortcutPolicy
from policy.serialization import PolicyLoadError
from policy.train import PolicyTrainError, is_policy_trained, policy_paths, train_policy
from svam.config import load_config
from svam.data.teacher_cache import write_teacher_cache
from teachers.encoders import build_encoders
from teachers.modeling_teacher import VideoTeacher
from teachers.pipeline_teacher import TeacherPipeline

FRAMES, SIZE, TOKENS = 4, 32, 4
TASKS = ("reach-v3", "button-press-topdown-v3")
SMALL = [
    "policy.aggregator.dim=16",
    "policy.aggregator.depth=1",
    "policy.aggregator.num_heads=2",
    "policy.aggregator.queries_per_frame=2",
    "policy.action_head.dim=16",
    "policy.action_head.depth=1",
    "policy.action_head.num_heads=2",
    "policy.action_head.context_layers=0",
    "policy.action_head.num_inference_steps=3",
]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def chunk_of(task: str) -> np.ndarray:
    """The expert chunk of a task in the synthetic cache: what the policy should learn."""
    sign = 1.0 if task == TASKS[0] else -1.0
    return (sign * np.linspace(-0.8, 0.8, 16).reshape(4, 4)).astype(np.float32)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A saved micro teacher, the micro encoders' fingerprints, random decouplers and a synthetic
    teacher cache (shapes of the real ones) whose actions depend on the task."""
    root = tmp_path_factory.mktemp("policy")
    base = load_config("micro")
    teacher = VideoTeacher.from_config(base.teacher, seed=0)
    teacher.save_pretrained(root / "teacher")
    pipeline = TeacherPipeline(teacher)
    frame = torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8)
    features = pipeline.features(frame, ["x"], num_inference_steps=3)
    _, _, channels, side, _ = features.shape
    semantic, geometric = build_encoders(base.encoders)
    dims = {"semantic": semantic.out_dim, "geometric": geometric.out_dim}
    for branch, dim in dims.items():
        config = DecouplerConfig(
            branch=branch,
            encoder=(semantic if branch == "semantic" else geometric).fingerprint,
            in_channels=channels,
            feature_size=side,
            num_frames=FRAMES,
            target_dim=dim,
            target_tokens=TOKENS,
            hidden_dim=16,
            num_layers=1,
            num_heads=2,
        )
        torch.manual_seed(0)
        Decoupler(config).save_pretrained(root / "decouplers" / branch)

    rng = np.random.default_rng(0)

    def samples():
        for index in range(24):
            task = TASKS[index % 2]
            arrays = {
                "onestep": rng.normal(size=(FRAMES, channels, side, side)).astype(np.float16),
                "frames": rng.integers(0, 256, (FRAMES, SIZE, SIZE, 3), dtype=np.uint8),
                "actions": chunk_of(task) + 0.01 * rng.normal(size=(4, 4)).astype(np.float32),
                "state": rng.normal(size=(FRAMES, 4)).astype(np.float32),
            }
            for branch, dim in dims.items():
                arrays[branch] = rng.normal(size=(FRAMES, TOKENS, dim)).astype(np.float16)
                arrays[f"{branch}_ref"] = rng.normal(size=(TOKENS, dim)).astype(np.float16)
            meta = {
                "task": task,
                "instruction": f"do {task}",
                "episode": f"{task}-{index:06d}",
                "start": 0,
                "split": "train" if index < 16 else "val",
            }
            yield f"{task}-{index:06d}-0000", arrays, meta

    cache = write_teacher_cache(
        root / "cache",
        samples(),
        clips_per_shard=8,
        teacher_fingerprint=teacher.fingerprint,
        semantic_fingerprint=semantic.fingerprint,
        geometric_fingerprint=geometric.fingerprint,
        dims={
            "semantic": [TOKENS, dims["semantic"]],
            "geometric": [TOKENS, dims["geometric"]],
            "clip_frames": FRAMES,
        },
        encoders=dataclasses.asdict(base.encoders),
        cache_settings={"dtype": "float32"},
        num_inference_steps=3,
        run_seed=0,
    )
    return root, cache


def overrides(root: Path, cache: Path, mode: str, *extra: str, runs: Path | None = None):
    return [
        f"run.root={runs or root / 'runs'}",
        "run.name=run",
        f"train_policy.cache={cache}",
        f"train_policy.teacher={root / 'teacher'}",
        f"train_policy.decouplers={root / 'decouplers'}",
        f"train_policy.mode={mode}",
        "train_policy.batch_size=8",
        "train_policy.learning_rate=3e-3",
        "train_policy.lr_warmup_steps=2",
        "train_policy.lr_scheduler=constant_with_warmup",
        "train_policy.log_every=2",
        "train_policy.val_clips=4",
        *SMALL,
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(world):
    """One 4-step policy per mode (the cache's N=3 for multistep)."""
    root, cache = world
    out = {}
    for mode in ("shortcut", "onestep", "multistep:3"):
        config = load_config(
            "micro",
            overrides(root, cache, mode, "train_policy.steps=4", "train_policy.checkpoint_every=2"),
        )
        out[mode] = train_policy(config)
    return out


def frames_state(batch: int = 2):
    frames = torch.randint(0, 256, (batch, 3, SIZE, SIZE), dtype=torch.uint8)
    return frames, torch.randn(batch, 4)


def test_shapes_per_mode_and_save_load_identical(trained, tmp_path):
    frames, state = frames_state()
    for mode, path in trained.items():
        policy = ShortcutPolicy.from_pretrained(path)
        assert policy.mode == mode
        streams = policy.streams(frames, ["do reach-v3"] * 2)
        expected = ("onestep",) if mode == "onestep" else ("onestep", "semantic", "geometric")
        assert tuple(streams) == expected
        for tokens in streams.values():
            assert tokens.shape[:2] == (2, FRAMES)
        a = policy.predict(frames, "do reach-v3", state, generator=torch.Generator().manual_seed(3))
        assert a.shape == (2, 4, 4) and torch.isfinite(a).all()
        policy.save_pretrained(tmp_path / mode_dirname(mode))
        shutil.copy(path / "config.json", tmp_path / mode_dirname(mode) / "config.json")
        again = ShortcutPolicy.from_pretrained(tmp_path / mode_dirname(mode))
        b = again.predict(frames, "do reach-v3", state, generator=torch.Generator().manual_seed(3))
        assert torch.equal(a, b)
        c = again.predict(frames, "do reach-v3", state, generator=torch.Generator().manual_seed(4))
        assert not torch.equal(a, c)


def test_fingerprint_mismatch_refused(world, trained, tmp_path):
    root, _ = world
    path = trained["shortcut"]
    # another teacher
    other = load_config("micro").teacher
    VideoTeacher.from_config(other, seed=1).save_pretrained(tmp_path / "teacher")
    with pytest.raises(PolicyLoadError, match="teacher fingerprint") as error:
        ShortcutPolicy.from_pretrained(path, teacher=tmp_path / "teacher")
    assert "\n" not in str(error.value)
    # changed decoupler weights
    shutil.copytree(root / "decouplers", tmp_path / "decouplers")
    weights = tmp_path / "decouplers" / "semantic" / "model.safetensors"
    model = Decoupler.from_pretrained(weights.parent)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    model.save_pretrained(weights.parent)
    with pytest.raises(PolicyLoadError, match="decoupler weights"):
        ShortcutPolicy.from_pretrained(path, decouplers=tmp_path / "decouplers")
    # another encoder
    record = json.loads((path / "config.json").read_text())
    record["encoders"]["init_seed"] = 5
    shutil.copytree(path, tmp_path / "policy")
    (tmp_path / "policy" / "config.json").write_text(json.dumps(record))
    with pytest.raises(PolicyLoadError, match="semantic encoder"):
        ShortcutPolicy.from_pretrained(tmp_path / "policy")


def test_train_lowers_loss_and_resumes_exactly(world, tmp_path):
    root, cache = world
    args = overrides(
        root,
        cache,
        "onestep",
        "train_policy.steps=60",
        "train_policy.checkpoint_every=30",
        "train_policy.log_every=5",
        runs=tmp_path,
    )
    config = load_config("micro", args)
    out = train_policy(config)
    record = json.loads((out / "train_policy.json").read_text())
    assert record["steps"] == 60 and record["val_loss"] > 0
    state = json.loads(
        (
            out.with_name(out.name + "-train")
            / "checkpoints"
            / "checkpoint-000060"
            / "train_state.json"
        ).read_text()
    )
    history = state["history"]
    assert np.mean(history[-10:]) < 0.6 * np.mean(history[:5]), history
    assert is_policy_trained(config)
    weights = load_file(out / "model.safetensors")

    # resume from step 30: the same weights as the uninterrupted run
    work = out.with_name(out.name + "-train") / "checkpoints"
    shutil.rmtree(work / "checkpoint-000060")
    shutil.rmtree(out)
    assert not is_policy_trained(config)
    out = train_policy(load_config("micro", args))
    resumed = load_file(out / "model.safetensors")
    assert weights.keys() == resumed.keys()
    for key, tensor in weights.items():
        assert torch.equal(tensor, resumed[key]), key


def test_multistep_needs_the_caches_steps(world, tmp_path):
    root, cache = world
    with pytest.raises(PolicyTrainError, match="multistep:3"):
        train_policy(load_config("micro", overrides(root, cache, "multistep:5", runs=tmp_path)))
    assert (
        policy_paths(
            load_config("micro", overrides(root, cache, "multistep:5", runs=tmp_path))
        ).output.name
        == "multistep-5"
    )


def test_tiny_rollout_reports_a_success_rate(trained, tmp_path):
    from svam.eval.metaworld import evaluate

    config = load_config(
        "micro",
        [
            f"run.root={tmp_path}",
            f"eval.policy={trained['shortcut']}",
            "eval.tasks=[reach-v3]",
            "eval.episodes_per_task=1",
            "eval.max_steps=6",
            "eval.execute_actions=3",
        ],
    )
    out = evaluate(config)
    report = json.loads((out / "shortcut" / "results.json").read_text())
    task = report["tasks"]["reach-v3"]
    assert task["episodes"] == 1 and 0.0 <= task["success_rate"] <= 1.0
    assert report["overall"]["episodes"] == 1
    assert task["seeds"][0] >= config.collect.seed_start + config.collect.episodes_per_task
    assert report["latency_ms"]["median"] > 0 and report["steps"] == 6
    assert list((out / "shortcut" / "videos").glob("*.gif"))
