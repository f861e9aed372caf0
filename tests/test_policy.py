"""`ShortcutPolicy`, `svam train-policy` and `svam eval` (latency, FLOPs, fidelity, closed-loop
Meta-World, the report), on a micro teacher, the micro encoders, random decouplers and a
synthetic teacher cache of their shapes."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from svam.config import load_config
from svam.data.teacher_cache import write_teacher_cache
from svam.distill.configuration_decoupler import DecouplerConfig
from svam.distill.modeling_decoupler import Decoupler
from svam.policy.configuration_policy import ForesightMode, parse_mode
from svam.policy.configuration_train import mode_dirname
from svam.policy.modeling_policy import BRANCHES, PolicyLoadError, ShortcutPolicy
from svam.policy.train import PolicyTrainError, is_policy_trained, train_policy
from svam.serialization import WEIGHTS_NAME
from svam.teachers.configuration_teacher import TeacherRuntime
from svam.teachers.encoders import build_encoders
from svam.teachers.modeling_teacher import VideoTeacher
from svam.teachers.pipeline_teacher import TeacherPipeline

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
                "depth": rng.uniform(0.5, 2.0, (FRAMES, SIZE, SIZE)).astype(np.float16),
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
                "split": "train" if index < 12 else "val" if index < 16 else "test",
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
    """One 4-step policy per kind (the multistep one on the cache's N=3 foresight)."""
    root, cache = world
    out = {}
    for mode in ("shortcut", "onestep", "multistep", "blind"):
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
        expected = {"onestep": ("onestep",), "blind": ()}.get(mode, ("onestep", *BRANCHES))
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
    weights = tmp_path / "decouplers" / "semantic" / WEIGHTS_NAME
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


def test_policy_runs_the_teacher_runtime_it_records(world, trained, tmp_path):
    root, cache = world
    path = trained["onestep"]
    record = json.loads((path / "config.json").read_text())
    # The world's cache records no runtime (written before they were): the defaults made it.
    assert record["teacher_runtime"] == TeacherRuntime().to_record()
    assert ShortcutPolicy.from_pretrained(path).frozen.pipeline.runtime == TeacherRuntime()
    with pytest.raises(PolicyLoadError) as refused:
        ShortcutPolicy.from_pretrained(path, teacher_runtime=TeacherRuntime(feature_sigma=0.5))
    message = str(refused.value)
    assert "teacher.feature_sigma=0.5 where None is recorded" in message and "\n" not in message

    # The policy's record wins over the settings saved with the teacher.
    policy = tmp_path / "policy"
    shutil.copytree(path, policy)
    quieter = TeacherRuntime(feature_sigma=1.0).to_record()
    (policy / "config.json").write_text(json.dumps({**record, "teacher_runtime": quieter}))
    assert ShortcutPolicy.from_pretrained(policy).frozen.pipeline.runtime.feature_sigma == 1.0

    # Training on the cache with a conflicting teacher setting is refused in one line.
    config = load_config("micro", overrides(root, cache, "onestep", "teacher.guidance_scale=2.0"))
    with pytest.raises(PolicyTrainError) as refused:
        train_policy(config)
    message = str(refused.value)
    assert "teacher.guidance_scale=2.0 where 1.0 is recorded" in message and "\n" not in message


@pytest.mark.parametrize("mode", ["onestep", "blind"])
def test_train_lowers_loss_and_resumes_exactly(world, tmp_path, mode):
    root, cache = world
    args = overrides(
        root,
        cache,
        mode,
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
    weights = load_file(out / WEIGHTS_NAME)

    # resume from step 30: the same weights as the uninterrupted run
    work = out.with_name(out.name + "-train") / "checkpoints"
    shutil.rmtree(work / "checkpoint-000060")
    shutil.rmtree(out)
    assert not is_policy_trained(config)
    out = train_policy(load_config("micro", args))
    resumed = load_file(out / WEIGHTS_NAME)
    assert weights.keys() == resumed.keys()
    for key, tensor in weights.items():
        assert torch.equal(tensor, resumed[key]), key


def test_multistep_policy_runs_every_generating_mode(world, trained, tmp_path):
    """multistep:K for any K and partial:F run the multistep policy; the shortcut and onestep
    modes need their own policies; a bad mode is one line naming the forms."""
    frames, state = frames_state()
    steps = {}
    for mode in ("multistep:1", "multistep:2", "multistep", "partial:0.5"):
        policy = ShortcutPolicy.from_pretrained(trained["multistep"], mode=mode)
        calls = []
        generate = policy.frozen.pipeline.__class__.__call__

        def counting(pipeline, *args, _calls=calls, _generate=generate, **kwargs):
            out = _generate(pipeline, *args, **kwargs)
            _calls.append(out.steps)
            return out

        policy.frozen.pipeline.__class__.__call__ = counting
        try:
            chunk = policy.predict(frames, "do reach-v3", state, generator=torch.Generator())
        finally:
            policy.frozen.pipeline.__class__.__call__ = generate
        assert chunk.shape == (2, 4, 4) and torch.isfinite(chunk).all()
        steps[mode] = calls
    # the cache's N = 3: multistep is multistep:3; partial:0.5 stops after round(1.5) = 2 steps
    assert steps == {"multistep:1": [1], "multistep:2": [2], "multistep": [3], "partial:0.5": [2]}
    with pytest.raises(PolicyLoadError, match="a multistep policy cannot act in mode 'shortcut'"):
        ShortcutPolicy.from_pretrained(trained["multistep"], mode="shortcut")
    with pytest.raises(PolicyLoadError, match="needs a multistep policy"):
        ShortcutPolicy.from_pretrained(trained["onestep"], mode="partial:0.25")
    with pytest.raises(ValueError, match=r"partial:F \(0 < F < 1\)"):
        ShortcutPolicy.from_pretrained(trained["multistep"], mode="partial:1.5")
    root, cache = world
    with pytest.raises(PolicyTrainError, match="train_policy.mode='multistep:3': one of"):
        train_policy(load_config("micro", overrides(root, cache, "multistep:3", runs=tmp_path)))


def count_module_calls(teacher: VideoTeacher) -> tuple[dict[str, int], list]:
    """Forward calls into the teacher's UNet, VAE and text encoder (any of their submodules: the
    one-step pass calls the UNet's blocks, not its forward), and the hooks to remove."""
    calls = {"unet": 0, "vae": 0, "text_encoder": 0}
    hooks = []
    for name in calls:

        def hook(*_, _name=name):
            calls[_name] += 1

        hooks += [m.register_forward_pre_hook(hook) for m in getattr(teacher, name).modules()]
    return calls, hooks


def test_blind_policy_sees_state_and_instruction_only(world, trained):
    """The blind baseline: no aggregator, no teacher pass, no encoders, no decouplers; its chunk
    depends on the instruction and the state, never on the frames; it acts in its own mode only."""
    assert parse_mode("blind") == ForesightMode("blind", "blind")
    assert parse_mode("blind").policy_kind == "blind" and parse_mode("blind").streams == ()
    assert not parse_mode("blind").generates
    with pytest.raises(ValueError, match=r"'blind:2' is not one of .*, blind$") as error:
        parse_mode("blind:2")
    assert "\n" not in str(error.value)

    path = trained["blind"]
    record = json.loads((path / "train_policy.json").read_text())
    assert record["mode"] == "blind" and record["onestep"] is None
    assert not [k for k in load_file(path / WEIGHTS_NAME) if k.startswith("aggregator.")]
    policy = ShortcutPolicy.from_pretrained(path)
    config = policy.config
    assert config.models.aggregator.streams == [] and config.models.action_head.cond_tokens == 0
    assert not config.needs_encoders and not config.needs_decouplers
    assert policy.net.aggregator is None
    frozen = policy.frozen
    assert frozen.semantic is None and frozen.geometric is None and frozen.decouplers == {}

    parts: list[str] = []
    policy.observers.append(lambda name: parts.append(name) or contextlib.nullcontext())
    calls, hooks = count_module_calls(frozen.pipeline.teacher)
    frames, state = frames_state()
    try:

        def chunk(frames=frames, instruction="do reach-v3", state=state):
            generator = torch.Generator().manual_seed(3)
            return policy.predict(frames, instruction, state, generator=generator)

        a = chunk()
        assert a.shape == (2, 4, 4) and torch.isfinite(a).all()
        assert calls == {"unet": 0, "vae": 0, "text_encoder": calls["text_encoder"]}
        assert calls["text_encoder"] > 0  # the instruction, through the teacher's CLIP encoder
        assert parts == ["text", "aggregator", "head"]
        assert torch.equal(a, chunk(frames=torch.zeros_like(frames)))  # blind to the frames
        assert not torch.equal(a, chunk(instruction="do button-press-topdown-v3"))
        assert not torch.equal(a, chunk(state=state + 1))
        assert calls["unet"] == calls["vae"] == 0
    finally:
        for hook in hooks:
            hook.remove()
    # the counter does see a teacher pass: the onestep policy's
    onestep = ShortcutPolicy.from_pretrained(trained["onestep"])
    calls, hooks = count_module_calls(onestep.frozen.pipeline.teacher)
    try:
        onestep.predict(frames, "do reach-v3", state, generator=torch.Generator())
    finally:
        for hook in hooks:
            hook.remove()
    assert calls["unet"] > 0

    with pytest.raises(ValueError, match="a blind policy reads no streams, got \\(onestep\\)"):
        policy.act({"onestep": torch.zeros(2, FRAMES, 4, 8)}, ["do reach-v3"] * 2, state)
    with pytest.raises(
        PolicyLoadError, match="a blind policy cannot act in mode 'shortcut'"
    ) as error:
        ShortcutPolicy.from_pretrained(path, mode="shortcut")
    assert "\n" not in str(error.value)
    with pytest.raises(PolicyLoadError, match="a onestep policy cannot .* needs a blind policy"):
        ShortcutPolicy.from_pretrained(trained["onestep"], mode="blind")
    with pytest.raises(
        ValueError, match="mode 'multistep:2' runs a multistep policy, not this blind"
    ):
        ShortcutPolicy(policy.config, policy.net, frozen, mode="multistep:2")


def test_blind_training_reads_no_vision_and_keys_no_onestep_settings(world, trained, monkeypatch):
    """Training a blind policy reads actions, state and instructions from the cache, never
    features or frames; it loads no decouplers or encoders and runs no teacher pass, even with
    on-the-fly one-step features; its key ignores one-step and aggregator settings."""
    import svam.policy.train as train_module
    import svam.teachers.encoders as encoders_module
    from svam.distill.modeling_decoupler import Decoupler

    root, cache = world
    blind = overrides(
        root, cache, "blind", "train_policy.steps=4", "train_policy.checkpoint_every=2"
    )
    assert is_policy_trained(load_config("micro", blind))
    for unused in ("train_policy.onestep=on-the-fly", "policy.aggregator.depth=3"):
        assert is_policy_trained(load_config("micro", [*blind, unused])), unused
    assert not is_policy_trained(load_config("micro", [*blind, "policy.action_head.depth=2"]))
    onestep = overrides(
        root, cache, "onestep", "train_policy.steps=4", "train_policy.checkpoint_every=2"
    )
    assert is_policy_trained(load_config("micro", onestep))
    assert not is_policy_trained(
        load_config("micro", [*onestep, "train_policy.onestep=on-the-fly"])
    )

    def refuse(*args, **kwargs):
        raise AssertionError("a blind policy must not run or load this")

    monkeypatch.setattr(TeacherPipeline, "features", refuse)
    monkeypatch.setattr(TeacherPipeline, "__call__", refuse)
    monkeypatch.setattr(Decoupler, "from_pretrained", refuse)
    monkeypatch.setattr(encoders_module, "build_encoders", refuse)
    read: list[str] = []
    loader = train_module.teacher_cache_loader

    def spy(*args, arrays, **kwargs):
        read.extend(arrays)
        return loader(*args, arrays=arrays, **kwargs)

    monkeypatch.setattr(train_module, "teacher_cache_loader", spy)
    args = [
        *blind,
        "train_policy.onestep=on-the-fly",
        "train_policy.steps=2",
        "train_policy.resume=null",
    ]
    config = load_config("micro", [*args, f"train_policy.output_dir={root / 'blind-fly'}"])
    out = train_policy(config)
    assert set(read) == {"actions", "state"}
    assert ShortcutPolicy.from_pretrained(out).mode == "blind"


def test_flops_of_a_mode_are_the_sum_of_its_parts(trained):
    from svam.flops import control_step_flops as flops

    frames, state = frames_state(1)
    observation = {"frames": frames, "instruction": "do reach-v3", "state": state}
    counted = {}
    for mode, kind in (
        ("onestep", "onestep"),
        ("shortcut", "shortcut"),
        ("multistep:1", "multistep"),
        ("multistep:2", "multistep"),
        ("partial:0.5", "multistep"),
    ):
        policy = ShortcutPolicy.from_pretrained(trained[kind], mode=mode)
        counted[mode] = result = flops(policy, observation)
        assert result["total"] > 0 and sum(result["parts"].values()) == result["total"]
        assert result["parts"]["text"] == 0  # cached after the warm-up step, as in closed loop
        assert result["parts"]["head"] > 0 and result["parts"]["aggregator"] > 0
    parts = {mode: result["parts"] for mode, result in counted.items()}
    assert parts["onestep"]["encoders"] == parts["onestep"]["decouplers"] == 0
    assert parts["shortcut"]["decouplers"] > 0 and parts["shortcut"]["encoders"] > 0
    assert parts["multistep:2"]["decouplers"] == 0
    # one more UNet evaluation per step; partial:0.5 of N=3 runs 2 steps
    unet = parts["multistep:2"]["teacher"] - parts["multistep:1"]["teacher"]
    assert unet > 0 and parts["partial:0.5"]["teacher"] == parts["multistep:2"]["teacher"]
    # the one-step pass stops after its up-blocks and decodes nothing
    assert parts["onestep"]["teacher"] < parts["multistep:1"]["teacher"]
    # blind: the head is all there is (the instruction's embedding is cached)
    blind = flops(ShortcutPolicy.from_pretrained(trained["blind"]), observation)
    assert sum(blind["parts"].values()) == blind["total"] == blind["parts"]["head"] > 0


def eval_overrides(root: Path, runs: Path, *extra: str) -> list[str]:
    return [
        f"run.root={runs}",
        "run.name=run",
        "eval.tasks=[reach-v3]",
        "eval.episodes_per_task=2",
        "eval.max_steps=4",
        "eval.execute_actions=3",
        "eval.latency_steps=2",
        "eval.warmup_steps=1",
        "eval.fidelity_clips=4",
        "eval.fidelity_batch=2",
        "eval.workers=1",
        *extra,
    ]


def write_baselines(path: Path, trained: dict) -> None:
    """What `svam distill` leaves for the report: each branch's train-split token statistics and
    the world depth probe (tokens -> log depth of 4x4 sub-patches)."""
    policy = ShortcutPolicy.from_pretrained(trained["shortcut"])
    dims = {
        "semantic": policy.frozen.semantic.out_dim,
        "geometric": policy.frozen.geometric.out_dim,
    }
    generator = torch.Generator().manual_seed(0)
    saved: dict = {
        "depth_note": "no depth against the teacher: the cache holds no generated frames"
    }
    for branch, dim in dims.items():
        saved[f"{branch}.mean"] = torch.zeros(dim)
        saved[f"{branch}.std"] = torch.ones(dim)
    saved["world_depth.weight"] = 0.01 * torch.randn(dims["geometric"], 16, generator=generator)
    saved["world_depth.bias"] = torch.zeros(16)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(saved, path)


def test_eval_reports_every_mode_and_reuses_what_did_not_change(trained, world, tmp_path):
    from svam.eval.evaluate import evaluate, is_evaluated

    root, _ = world
    for kind in ("shortcut", "multistep", "blind"):  # no onestep policy: reported as missing
        shutil.copytree(trained[kind], tmp_path / "run" / "policy" / kind)
    write_baselines(tmp_path / "run" / "decouplers" / "baselines.pt", trained)
    modes = "eval.modes=[onestep,shortcut,multistep:2,partial:0.5,blind]"
    config = load_config("micro", eval_overrides(root, tmp_path, modes))
    assert not is_evaluated(config)
    path = evaluate(config)
    out = path.parent
    report = json.loads((out / "report.json").read_text())
    assert list(report["modes"]) == ["onestep", "shortcut", "multistep:2", "partial:0.5", "blind"]
    assert report["settings"]["split"] == "test"
    missing = report["modes"]["onestep"]
    assert missing["status"] == "missing" and "train_policy.mode=onestep" in missing["reason"]
    text = path.read_text()
    for mode in report["modes"]:
        assert f"`{mode}`" in text
    assert "missing" in text and missing["reason"] in text
    for mode in ("shortcut", "multistep:2", "partial:0.5"):
        result = report["modes"][mode]
        assert result["status"] == "ok"
        assert result["latency_ms"]["count"] == 2 and result["latency_ms"]["median"] > 0
        assert sum(result["flops"]["parts"].values()) == result["flops"]["total"]
        assert 0 < result["peak_fraction"]
        published = result["flops_published"]
        assert published["total"] > 1000 * result["flops"]["total"]
        foresight = result["foresight"]
        assert foresight["clips"] == 4
        for noise in ("cache_noise", "fresh_noise"):
            block = foresight[noise]
            for branch in ("semantic", "geometric"):
                assert -1 <= block[branch]["centred_cosine"] <= 1
                assert len(block[branch]["per_frame"]["skill"]) == 4
                assert block[branch]["skill"] < 1  # random decouplers and policies
            assert block["depth_world"]["abs_rel"] > 0 and block["depth_teacher"] is None
        assert result["action"]["clips"] == 4 and result["action"]["mse"] > 0
        success = result["success"]
        assert success["episodes"] == 2 and 0 <= success["rate"] <= 1
        assert success["tasks"]["reach-v3"]["episodes"] == 2
        assert len(success["ci95"]) == 2 and success["ci95"][0] <= success["rate"]
        assert (out / result["videos"][0]).is_file()
    blind = report["modes"]["blind"]
    assert blind["kind"] == "blind" and blind["foresight"] is None and blind["action"]["mse"] > 0
    assert blind["success"]["episodes"] == 2
    floor = report["sampling_floor"]  # the multistep policy's teacher under fresh noise
    assert floor is not None and floor["semantic"]["skill"] < 1
    seeds = report["settings"]["seeds"]
    assert seeds[0] >= config.collect.seed_start + config.collect.episodes_per_task
    for png in ("latency_fidelity.png", "success_per_task.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((tmp_path / "run" / "tb" / "eval").glob("events.out.tfevents.*"))
    assert is_evaluated(config)

    # a rerun with more episodes redoes the rollouts only
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if p.name != "report.json"}
    more = load_config("micro", eval_overrides(root, tmp_path, modes, "eval.episodes_per_task=3"))
    assert not is_evaluated(more)
    evaluate(more)
    changed = {p.relative_to(out).as_posix() for p in stamps if p.stat().st_mtime_ns != stamps[p]}
    modes_run = ("shortcut", "multistep-2", "partial-0.5", "blind")
    assert changed == {f"{m}/rollouts.json" for m in modes_run}
    report = json.loads((out / "report.json").read_text())
    assert report["modes"]["shortcut"]["success"]["episodes"] == 3


def test_parallel_episodes_match_sequential_ones(trained):
    from svam.eval.metaworld import Episode, rollouts

    settings = {
        "tasks": ["reach-v3"],
        "seeds": [6, 7],
        "max_steps": 6,
        "execute_actions": 3,
        "camera": "corner",
        "image_size": SIZE,
    }
    episodes = [
        Episode("shortcut", str(trained["shortcut"]), "reach-v3", seed, record=False)
        for seed in settings["seeds"]
    ]
    options = dict(teacher=None, decouplers=None, device="cpu", threads=1, run_seed=0)
    runs = []
    for workers in (1, 2):
        outcomes = sorted(
            rollouts(episodes, settings, workers, **options), key=lambda o: o.episode.seed
        )
        runs.append([(o.episode.seed, o.success, o.steps) for o in outcomes])
    assert runs[0] == runs[1] and [seed for seed, _, _ in runs[0]] == [6, 7]


def test_eval_refuses_a_cache_without_test_clips(world, trained, tmp_path, capsys):
    """A cache made before the test split existed: one line saying how to rebuild it, before any
    episode runs."""
    from svam.cli import main
    from svam.data.shards import write_manifest

    root, cache = world
    old = tmp_path / "old-cache"
    shutil.copytree(cache, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for shard in [s for s in manifest["shards"] if s["name"].startswith("test-")]:
        (old / shard["name"]).unlink()
        manifest["shards"].remove(shard)
        manifest["num_samples"] -= shard["samples"]
    manifest["counts"].pop("test", None)
    manifest.pop("field_digests")
    write_manifest(old, manifest)  # as the svam of the time wrote it
    policy = tmp_path / "run" / "policy" / "shortcut"
    shutil.copytree(trained["shortcut"], policy)
    record = json.loads((policy / "config.json").read_text())
    (policy / "config.json").write_text(json.dumps({**record, "cache": str(old)}))
    assert main(["eval", *eval_overrides(root, tmp_path, "eval.modes=[shortcut]")]) == 1
    err = capsys.readouterr().err.strip()
    assert "holds no test clips" in err and "svam cache-teachers" in err and "\n" not in err
    assert not (tmp_path / "run" / "eval" / "shortcut" / "rollouts.json").exists()


def test_eval_refuses_a_policy_of_other_teacher_settings_than_its_cache(
    world, trained, tmp_path, capsys
):
    from svam.cli import main

    root, _ = world
    policy = tmp_path / "run" / "policy" / "shortcut"
    shutil.copytree(trained["shortcut"], policy)
    record = json.loads((policy / "config.json").read_text())
    record["teacher_runtime"] = TeacherRuntime(feature_up_blocks=(1,)).to_record()
    (policy / "config.json").write_text(json.dumps(record))
    assert main(["eval", *eval_overrides(root, tmp_path, "eval.modes=[shortcut]")]) == 1
    err = capsys.readouterr().err.strip()
    assert "teacher.feature_up_blocks=[1] where [0, 1] is recorded" in err and "\n" not in err
    assert "svam train-policy" in err


def test_eval_refuses_decouplers_without_baselines(world, trained, tmp_path, capsys):
    """Decouplers published before distill wrote its baselines beside them: one line saying how
    to rebuild, not a report without its foresight columns."""
    from svam.cli import main

    root, _ = world
    shutil.copytree(trained["shortcut"], tmp_path / "run" / "policy" / "shortcut")
    shutil.copytree(root / "decouplers", tmp_path / "run" / "decouplers")
    assert main(["eval", *eval_overrides(root, tmp_path, "eval.modes=[shortcut]")]) == 1
    err = capsys.readouterr().err.strip()
    path = tmp_path / "run" / "decouplers" / "baselines.pt"
    assert f"{path}: missing" in err and "re-run `svam distill`" in err and "\n" not in err


def test_old_format_policy_is_refused_in_one_line(trained, tmp_path):
    old = tmp_path / "policy"
    shutil.copytree(trained["blind"], old)
    record = json.loads((old / "config.json").read_text())
    record = {k: v for k, v in record.items() if not k.startswith("_")}
    (old / "config.json").write_text(
        json.dumps({"_class_name": "ShortcutPolicy", "_format_version": 1, **record})
    )
    (old / WEIGHTS_NAME).rename(old / "model.safetensors")
    with pytest.raises(PolicyLoadError) as error:
        ShortcutPolicy.from_pretrained(old)
    message = str(error.value)
    assert "\n" not in message and "written by an older svam" in message
    assert "re-run `svam train-policy`" in message


def test_cross_fitting_never_gives_a_clip_foresight_from_decouplers_that_fitted_it(world, tmp_path):
    """distill.cross_fit_folds=2: each fold pair fits the train episodes outside its fold, and the
    shortcut policy's every train clip gets its foresight from the pair that held its episode out
    (val clips from the published pair); checked clip by clip against each pair's own output."""
    from svam.distill.cross_fitting import fold_dir, read_folds
    from svam.distill.modeling_decoupler import Decoupler
    from svam.distill.train import distill
    from svam.policy.train import PolicyTrainer, policy_paths

    root, cache = world
    decouplers = tmp_path / "decouplers"
    distilled = [
        f"distill.cache={cache}",
        f"distill.teacher={root / 'teacher'}",
        f"distill.output_dir={decouplers}",
        "distill.steps=2",
        "distill.eval_every=2",
        "distill.depth_probe=false",
        "distill.cross_fit_folds=2",
        "decouplers.semantic.hidden_dim=16",
        "decouplers.geometric.hidden_dim=16",
    ]
    config = load_config(
        "micro",
        overrides(root, cache, "shortcut", "train_policy.steps=2", *distilled, runs=tmp_path)
        + [f"train_policy.decouplers={decouplers}"],
    )
    distill(config)
    folds = read_folds(decouplers)
    train_episodes = set(folds["fold_of"])
    assert len(train_episodes) == 12 and sorted(set(folds["fold_of"].values())) == [0, 1]
    held_out = {}
    for fold in (0, 1):
        record = json.loads((fold_dir(decouplers, fold) / "distill.json").read_text())
        held_out[fold] = set(record["held_out_episodes"])
        assert held_out[fold] == {e for e, f in folds["fold_of"].items() if f == fold}
    assert held_out[0].isdisjoint(held_out[1]) and held_out[0] | held_out[1] == train_episodes

    trainer = PolicyTrainer(config, policy_paths(config))
    trainer.train()
    assert len(trainer.fold_decouplers) == 2
    pairs = {
        fold: {
            b: Decoupler.from_pretrained(fold_dir(decouplers, fold) / b).eval() for b in BRANCHES
        }
        for fold in (0, 1)
    }
    published = {b: Decoupler.from_pretrained(decouplers / b).eval() for b in BRANCHES}
    for split, cross_fit in (("train", True), ("val", False)):
        batch = next(iter(trainer._loader(split, trainer._arrays(), shuffle=False)))
        streams = trainer._streams(batch, cross_fit=cross_fit)
        features = trainer._features(batch)
        for index, key in enumerate(batch["key"]):
            episode = key.rsplit("-", 1)[0]
            for branch in BRANCHES:
                reference = batch[f"{branch}_ref"][index : index + 1].float()
                outputs = {
                    name: models[branch](features[index : index + 1], reference)[0]
                    for name, models in [*pairs.items(), ("published", published)]
                }
                got = streams[branch][index]
                if split == "train":
                    fold = folds["fold_of"][episode]
                    assert episode in held_out[fold]  # the pair serving it never fitted it
                    torch.testing.assert_close(got, outputs[fold], rtol=1e-4, atol=1e-4)
                    assert not torch.allclose(got, outputs[1 - fold], atol=1e-4)
                else:
                    torch.testing.assert_close(got, outputs["published"], rtol=1e-4, atol=1e-4)
