"""Policy models: Uni-Perceiver shapes and stream checks, normalisation, the diffusion action head
learning a toy conditional (and bimodal) action distribution, save/load, full scale on `meta`,
FLOP counting."""

from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from svam.flops import flop_counter
from svam.policy import (
    ActionCondition,
    ActionHeadConfig,
    AggregatorConfig,
    DiffusionActionHead,
    Normalizer,
    PolicyLoadError,
    PolicyModelsConfig,
    StreamConfig,
    UniPerceiver,
    action_head_flops,
    action_head_parameters,
    aggregator_flops,
    aggregator_parameters,
    build_action_head,
    build_aggregator,
    example_condition,
    example_streams,
    foresight_streams,
    published_policy_models,
)
from svam.policy.configuration_policy import HEAD_TYPES
from svam.serialization import WEIGHTS_NAME

ONE_STEP_GFLOPS = 2749
"""SVD's one-step pass up to up-block 1 at 256 px, 16 frames (DESIGN.md)."""


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: intra-op threads only add overhead, and stall badly on a shared, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_aggregator(**changes) -> AggregatorConfig:
    streams = [
        StreamConfig("onestep", dim=12, tokens=16, max_grid=2),
        StreamConfig("semantic", dim=10, tokens=4, max_grid=None),
        StreamConfig("geometric", dim=14, tokens=9, max_grid=None),
    ]
    base = AggregatorConfig(
        streams=streams, num_frames=3, queries_per_frame=2, dim=16, depth=2, num_heads=2
    )
    return dataclasses.replace(base, **changes)


def tiny_head(**changes) -> ActionHeadConfig:
    base = ActionHeadConfig(
        action_dim=3,
        horizon=4,
        cond_dim=16,
        cond_tokens=6,
        text_dim=8,
        text_tokens=3,
        state_dim=2,
        dim=16,
        depth=2,
        num_heads=2,
    )
    return dataclasses.replace(base, **changes)


def seeded(module_class, config):
    torch.manual_seed(0)
    return module_class(config).eval()


# ------------------------------------------------------------------------------ aggregator


@pytest.mark.parametrize(
    "mode, streams",
    [
        ("onestep", ("onestep",)),
        ("shortcut", ("onestep", "semantic", "geometric")),
        ("multistep:5", ("onestep", "semantic", "geometric")),
        ("partial:0.5", ("onestep", "semantic", "geometric")),
    ],
)
def test_aggregator_shapes_per_foresight_mode(mode, streams):
    assert foresight_streams(mode) == streams
    config = tiny_aggregator().for_mode(mode)
    assert config.stream_names == streams
    model = seeded(UniPerceiver, config)
    out = model(example_streams(config, batch=2))
    assert out.shape == (2, 3 * 2, 16)
    assert torch.isfinite(out).all()
    inputs = {
        name.split(".")[1] for name, _ in model.named_parameters() if name.startswith("inputs.")
    }
    assert inputs == set(streams)


def test_aggregator_refuses_other_streams():
    model = seeded(UniPerceiver, tiny_aggregator())
    streams = example_streams(model.config)
    missing = {k: v for k, v in streams.items() if k != "semantic"}
    with pytest.raises(ValueError, match=r"\(onestep, semantic, geometric\).*missing semantic"):
        model(missing)
    onestep = seeded(UniPerceiver, tiny_aggregator().for_mode("onestep"))
    with pytest.raises(ValueError, match="unexpected semantic, geometric"):
        onestep(streams)
    with pytest.raises(TypeError, match="mapping of streams"):
        model(list(streams.values()))
    bad_dim = {**streams, "geometric": torch.randn(1, 3, 9, 15)}
    with pytest.raises(ValueError, match=r"'geometric' must be \(B, 3, tokens, 14\), got"):
        model(bad_dim)
    bad_frames = {**streams, "onestep": torch.randn(1, 4, 16, 12)}
    with pytest.raises(ValueError, match=r"'onestep' must be \(B, 3, tokens, 12\)"):
        model(bad_frames)
    with pytest.raises(ValueError, match="'semantic' has 5 tokens per frame, not a square grid"):
        model({**streams, "semantic": torch.randn(1, 3, 5, 10)})
    with pytest.raises(ValueError, match="disagree on the batch size"):
        model({**streams, "semantic": torch.randn(2, 3, 4, 10)})
    with pytest.raises(ValueError, match="reads stream 'semantic', which aggregator.streams"):
        tiny_aggregator().for_mode("onestep").for_mode("shortcut")
    with pytest.raises(ValueError, match="foresight mode 'multistep:0' is not one of"):
        foresight_streams("multistep:0")


def test_aggregator_output_size_is_fixed_for_any_token_count():
    model = seeded(UniPerceiver, tiny_aggregator())
    outputs = []
    for onestep_grid, semantic_grid in ((4, 2), (8, 3), (2, 1), (6, 5)):
        streams = example_streams(model.config)
        streams["onestep"] = torch.randn(1, 3, onestep_grid**2, 12)
        streams["semantic"] = torch.randn(1, 3, semantic_grid**2, 10)
        with torch.no_grad():
            outputs.append(model(streams))
    assert all(out.shape == (1, 6, 16) for out in outputs)
    assert not torch.allclose(outputs[0], outputs[1])


def test_every_stream_and_frame_reaches_the_output():
    model = seeded(UniPerceiver, tiny_aggregator())
    streams = example_streams(model.config)
    with torch.no_grad():
        base = model(streams)
        for name, tokens in streams.items():
            changed = tokens.clone()
            changed[:, 2] += 1  # last frame only
            out = model({**streams, name: changed})
            assert not torch.allclose(out, base), name


def test_blind_mode_has_no_aggregator_and_a_text_and_state_head():
    """`blind` reads no streams: its aggregator config is empty (no Uni-Perceiver is built from
    it), the section then wants cond_tokens=0, and the head, given an empty token tensor, is
    conditioned on the instruction and the state alone."""
    assert foresight_streams("blind") == ()
    config = tiny_aggregator().for_mode("blind")
    assert config.streams == [] and config.num_tokens == 0
    with pytest.raises(ValueError, match="streams is empty"):
        UniPerceiver(config)
    section = PolicyModelsConfig(aggregator=config, action_head=tiny_head())
    with pytest.raises(
        ValueError, match=r"^action_head.cond_tokens=6 but the aggregator gives 0 \(no streams"
    ):
        section.validate()
    section.action_head.cond_tokens = 0
    section.validate()
    head = seeded(DiffusionActionHead, section.action_head)
    torch.nn.init.normal_(head.output.weight)  # zero at init: every output would be 0
    cond = example_condition(section.action_head, batch=2)
    assert cond.tokens.shape == (2, 0, 16)
    noisy, timesteps = torch.randn(2, 4, 3), torch.tensor([5, 9])
    with torch.no_grad():
        out = head(noisy, timesteps, cond)
        assert out.shape == (2, 4, 3) and torch.isfinite(out).all()
        for changed in ({"text": cond.text + 1}, {"state": cond.state + 1}):
            other = head(noisy, timesteps, dataclasses.replace(cond, **changed))
            assert not torch.allclose(out, other), changed
        assert head.sample(cond, torch.Generator().manual_seed(0)).shape == (2, 4, 3)
    head.train()
    loss = head.loss(torch.rand(2, 4, 3) * 2 - 1, cond, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and head.text_proj.weight.grad.abs().sum() > 0
    with_tokens = action_head_flops(tiny_head())
    without = action_head_flops(section.action_head)
    # fewer context tokens: a cheaper context and fewer keys per step
    assert 0 < without.condition < with_tokens.condition and 0 < without.step < with_tokens.step


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"dim": 15}, "dim=15 is not a multiple of num_heads=2"),
        ({"streams": []}, "streams is empty"),
        ({"streams": [StreamConfig("depth", 4, 4)]}, "stream name 'depth' is not one of"),
        ({"streams": [StreamConfig("onestep", 4, 8)]}, "tokens=8 is not a square grid"),
        ({"streams": [StreamConfig("onestep", 4, 36, 4)]}, "max_grid=4 does not divide the 6x6"),
        ({"streams": [StreamConfig(), StreamConfig()]}, "stream names repeat"),
    ],
)
def test_aggregator_config_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        UniPerceiver(tiny_aggregator(**changes))


# --------------------------------------------------------------------------- normalisation


def _data(rows: int = 200) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 4, generator=generator) * torch.tensor([0.3, 5.0, 1.0, 1.0])
    x[:, 2] = 0.7  # a constant dimension
    x[:, 3] = 2.0 + 1e-6 * x[:, 3]  # a (numerically) constant one
    return x + torch.tensor([0.0, 10.0, 0.0, 0.0])


@pytest.mark.parametrize("mode", ["min_max", "mean_std"])
def test_normalizer_round_trip_and_zero_range_dims(mode, tmp_path):
    x = _data()
    streamed = Normalizer(4, mode).fit(x[i : i + 25].view(5, 5, 4) for i in range(0, 200, 25))
    whole = Normalizer(4, mode).fit([x.numpy()])
    for name in ("minimum", "maximum", "mean", "std"):
        assert torch.allclose(getattr(streamed, name), getattr(whole, name), atol=1e-6)
    assert torch.allclose(streamed.mean, x.double().mean(0).float(), atol=1e-5)
    assert torch.allclose(streamed.std, torch.from_numpy(np.std(x.double().numpy(), 0)).float())

    y = streamed.normalize(x)
    assert torch.isfinite(y).all()
    assert torch.allclose(y[:, 2:], torch.zeros(200, 2), atol=1e-5)  # constant dims: centred
    if mode == "min_max":
        assert torch.allclose(y[:, :2].amin(0), -torch.ones(2), atol=1e-6)
        assert torch.allclose(y[:, :2].amax(0), torch.ones(2), atol=1e-6)
    else:
        assert torch.allclose(y[:, :2].mean(0), torch.zeros(2), atol=1e-5)
        assert torch.allclose(y[:, :2].std(0, unbiased=False), torch.ones(2), atol=1e-5)
    assert torch.allclose(streamed.unnormalize(y), x, atol=1e-5, rtol=1e-6)
    chunk = torch.randn(2, 5, 4)  # any leading shape, values outside the training range
    assert torch.allclose(streamed.normalize(streamed.unnormalize(chunk)), chunk, atol=1e-5)

    path = streamed.save_pretrained(tmp_path / "actions")
    loaded = Normalizer.from_pretrained(path, expect={"dim": 4, "mode": mode})
    assert torch.equal(loaded.normalize(x), y)


def test_normalizer_errors(tmp_path):
    normalizer = Normalizer(3)
    with pytest.raises(RuntimeError, match="not fitted"):
        normalizer.normalize(torch.zeros(3))
    with pytest.raises(ValueError, match="got no data"):
        normalizer.fit([])
    with pytest.raises(ValueError, match=r"end in a dimension of 3, got \(5, 4\)"):
        normalizer.fit([torch.zeros(5, 4)])
    with pytest.raises(ValueError, match="NaN or infinite"):
        normalizer.fit([torch.tensor([[0.0, float("nan"), 1.0]])])
    normalizer.fit([torch.randn(10, 3)])
    with pytest.raises(ValueError, match=r"last dimension must be 3, got \(2, 4\)"):
        normalizer.unnormalize(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="mode 'minmax' is not one of min_max, mean_std"):
        Normalizer(3, "minmax")
    path = normalizer.save_pretrained(tmp_path / "state")
    with pytest.raises(PolicyLoadError, match=r"config\.json: dim=3, expected 4"):
        Normalizer.from_pretrained(path, expect={"dim": 4})


# ----------------------------------------------------------------------------- action head


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon", "v_prediction"])
def test_head_shapes_and_condition_checks(prediction_type):
    config = tiny_head(prediction_type=prediction_type)
    head = seeded(DiffusionActionHead, config)
    cond = example_condition(config, batch=2)
    actions = torch.rand(2, 4, 3) * 2 - 1
    loss = head.loss(actions, cond, generator=torch.Generator().manual_seed(0))
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert head.sample(cond).shape == (2, 4, 3)
    assert head.sample(cond, num_inference_steps=3).shape == (2, 4, 3)
    # a scheduler is built from config keys, so a saved config.json rebuilds it
    assert head.sample_scheduler.config.prediction_type == config.prediction_type
    assert head.noise_scheduler.config.num_train_timesteps == config.num_train_timesteps

    with pytest.raises(ValueError, match=r"actions must be \(B, 4, 3\), got \(2, 10, 3\)"):
        head.loss(torch.zeros(2, 10, 3), cond)
    with pytest.raises(ValueError, match=r"built with state_dim=2: cond.state must be \(2, 2\)"):
        head.sample(dataclasses.replace(cond, state=None))
    with pytest.raises(ValueError, match=r"cond.text must be \(2, L, 8\), got \(2, 3, 7\)"):
        head.sample(dataclasses.replace(cond, text=torch.randn(2, 3, 7)))
    with pytest.raises(ValueError, match=r"cond.tokens must be \(B, N, 16\)"):
        head.sample(dataclasses.replace(cond, tokens=torch.randn(2, 6, 15)))
    with pytest.raises(ValueError, match="cond.text_mask must be bool"):
        head.sample(dataclasses.replace(cond, text_mask=torch.ones(2, 3)))
    stateless = seeded(DiffusionActionHead, tiny_head(state_dim=0))
    with pytest.raises(ValueError, match="built without state"):
        stateless.sample(cond)


def test_text_mask_hides_padding_tokens():
    head = seeded(DiffusionActionHead, tiny_head())
    for parameter in head.parameters():  # zero-initialised gates and output would hide changes
        torch.nn.init.normal_(parameter, std=0.3)
    cond = example_condition(head.config, batch=2)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    masked = dataclasses.replace(cond, text_mask=mask)
    noisy, timesteps = torch.randn(2, 4, 3), torch.tensor([3, 70])
    padded = cond.text.clone()
    padded[0, 2] = torch.randn(8)
    padded[1, 1:] = torch.randn(2, 8)
    with torch.no_grad():
        reference = head(noisy, timesteps, masked)
        assert torch.allclose(
            head(noisy, timesteps, dataclasses.replace(masked, text=padded)), reference, atol=1e-6
        )
        assert not torch.allclose(
            head(noisy, timesteps, dataclasses.replace(cond, text=padded)),
            head(noisy, timesteps, cond),
        )


RAMP, FLAT = torch.linspace(-0.8, 0.8, 4), torch.full((4,), 0.5)
TARGETS = torch.stack(
    [
        torch.stack([RAMP, FLAT], 1),
        torch.stack([-RAMP, -FLAT], 1),
        torch.stack([FLAT, RAMP], 1),
        torch.stack([-FLAT, -RAMP], 1),
    ]
)
"""Four chunks (K=4, A=2), pairwise RMS distances 0.78 to 1.10."""


class ToyTask:
    """The aggregator tokens encode a group (chunks 0/1 or 2/3), the instruction a choice: the
    first, the second, or either (50/50). A padding instruction token carries large noise and is
    masked. A good conditional model lands on the right chunk, and on both chunks of the pair for
    'either' rather than on their mean (which is 0.55 from each)."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.token_codes = torch.randn(2, 2, 16, generator=self.generator)
        self.text_codes = torch.randn(3, 2, 8, generator=self.generator)

    def condition(self, group: torch.Tensor, choice: torch.Tensor) -> ActionCondition:
        g, n = self.generator, len(group)
        padding = 10 * torch.randn(n, 1, 8, generator=g)
        text = torch.cat([self.text_codes[choice], padding], 1)
        return ActionCondition(
            tokens=self.token_codes[group] + 0.1 * torch.randn(n, 2, 16, generator=g),
            text=text + 0.1 * torch.randn(n, 3, 8, generator=g),
            text_mask=torch.tensor([True, True, False]).expand(n, 3),
        )

    def batch(self, size: int) -> tuple[torch.Tensor, ActionCondition]:
        group = torch.randint(2, (size,), generator=self.generator)
        choice = torch.randint(3, (size,), generator=self.generator)
        coin = torch.randint(2, (size,), generator=self.generator)
        target = 2 * group + torch.where(choice == 2, coin, choice)
        return TARGETS[target], self.condition(group, choice)


TOY_HEAD = ActionHeadConfig(
    action_dim=2,
    horizon=4,
    cond_dim=16,
    cond_tokens=2,
    text_dim=8,
    text_tokens=3,
    state_dim=0,
    dim=32,
    depth=2,
    context_layers=0,
    num_heads=2,
)


@functools.cache
def train_toy_head(head_type: str):
    """400 steps of AdamW on the toy task (~2 s on one core)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    head = DiffusionActionHead(dataclasses.replace(TOY_HEAD, type=head_type)).train()
    task, steps = ToyTask(seed=0), 400
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1 - i / steps)
    losses = []
    for _ in range(steps):
        actions, cond = task.batch(64)
        loss = head.loss(actions, cond, generator=task.generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return head.eval(), task, losses


@pytest.fixture(scope="module", params=HEAD_TYPES)
def trained_toy_head(request):
    return train_toy_head(request.param)


def toy_samples(head, steps=None):
    """Samples for 2 groups x 3 choices x 16 seeds, and their RMS distance to each target (the
    conditions from a fresh task: the same whatever ran before)."""
    group = torch.arange(2).repeat_interleave(48)
    choice = torch.arange(3).repeat_interleave(16).repeat(2)
    cond = ToyTask(seed=0).condition(group, choice)
    samples = head.sample(cond, torch.Generator().manual_seed(1), num_inference_steps=steps)
    return samples, ((samples[:, None] - TARGETS[None]) ** 2).mean((2, 3)).sqrt()  # (96, 4)


def test_head_learns_a_conditional_bimodal_action_distribution(trained_toy_head):
    """Both heads, at their 10 steps (DDIM, or Euler for flow matching)."""
    head, task, losses = trained_toy_head
    assert np.mean(losses[-50:]) < 0.35 * np.mean(losses[:20]), (losses[:20], losses[-50:])
    samples, rms = toy_samples(head)
    nearest, error = rms.argmin(1).view(2, 3, 16), rms.min(1).values.view(2, 3, 16)
    for g in range(2):
        # One target: every sample on it (targets are >= 0.78 apart; ~0.05 over 8 seeds tried).
        assert (nearest[g, 0] == 2 * g).all() and (nearest[g, 1] == 2 * g + 1).all()
        assert error[g, :2].max() < 0.15, error[g, :2]
        # Either of two: samples on one of them, both taken, not their mean (0.55 from each).
        # Over 8 seeds tried, at most 2 of 32 samples were left between the modes.
        close = error[g, 2] < 0.2
        assert close.sum() >= 14, error[g, 2]
        either = nearest[g, 2][close]
        assert ((either == 2 * g) | (either == 2 * g + 1)).all(), either
        assert (either == 2 * g).sum() >= 4 and (either == 2 * g + 1).sum() >= 4, either


def test_flow_head_in_one_euler_step_lands_on_the_chunk_or_on_the_mean_of_two():
    """K = 1 works: one step from pure noise gives E[chunk | condition], so a condition with one
    chunk gets it, and 'either of two' gets their mean (flow matching's known one-step limit)."""
    head, _, _ = train_toy_head("flow")
    samples, rms = toy_samples(head, steps=1)
    error = rms.min(1).values.view(2, 3, 16)
    nearest = rms.argmin(1).view(2, 3, 16)
    for g in range(2):  # measured: median 0.08, max 0.24 (targets are >= 0.78 apart)
        assert (nearest[g, 0] == 2 * g).all() and (nearest[g, 1] == 2 * g + 1).all()
        assert error[g, :2].median() < 0.12 and error[g, :2].max() < 0.3, error[g, :2]
        mean = (TARGETS[2 * g] + TARGETS[2 * g + 1]) / 2
        either = samples.view(2, 3, 16, 4, 2)[g, 2]
        to_mean = ((either - mean) ** 2).mean((1, 2)).sqrt()  # measured: median 0.12, max 0.28
        assert (to_mean < error[g, 2]).all() and to_mean.median() < 0.2, (to_mean, error[g, 2])


def test_sampling_is_deterministic_and_survives_save_load(trained_toy_head, tmp_path):
    head, task, _ = trained_toy_head
    cond = task.condition(torch.tensor([0, 1, 1]), torch.tensor([2, 2, 0]))

    def sample(model, seed, steps=None):
        return model.sample(cond, torch.Generator().manual_seed(seed), num_inference_steps=steps)

    first = sample(head, 7)
    assert torch.equal(first, sample(head, 7))
    assert not torch.allclose(first, sample(head, 8))
    assert not torch.allclose(first, sample(head, 7, steps=4))

    path = head.save_pretrained(tmp_path / "head")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", WEIGHTS_NAME]
    assert json.loads((path / "config.json").read_text())["type"] == head.config.type
    loaded = DiffusionActionHead.from_pretrained(path, expect={"action_dim": 2, "horizon": 4})
    assert loaded.config == head.config
    assert torch.equal(sample(loaded.eval(), 7), first)


# ---------------------------------------------------------------------------------- save/load


def test_aggregator_save_load_round_trip(tmp_path):
    model = seeded(UniPerceiver, tiny_aggregator().for_mode("shortcut"))
    streams = example_streams(model.config, batch=2)
    path = model.save_pretrained(tmp_path / "aggregator")
    loaded = UniPerceiver.from_pretrained(path, expect={"dim": 16})
    assert loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(loaded.eval()(streams), model(streams))


def test_load_errors_name_file_and_key(tmp_path):
    path = seeded(UniPerceiver, tiny_aggregator()).save_pretrained(tmp_path / "aggregator")
    record = json.loads((path / "config.json").read_text())

    def load_with(changed):
        (path / "config.json").write_text(json.dumps(changed))
        return UniPerceiver.from_pretrained(path)

    streams = [dict(s) for s in record["streams"]]
    streams[2]["dim"] = 20
    with pytest.raises(
        PolicyLoadError,
        match=rf"{WEIGHTS_NAME}: 'inputs\.geometric\.norm\.\w+' has shape \(14,\), "
        r"config\.json implies \(20,\)",
    ):
        load_with({**record, "streams": streams})
    streams[2] = {**streams[2], "dim": 14, "pool": 2}
    with pytest.raises(PolicyLoadError, match=r"config\.json: unknown key 'streams\[2\]\.pool'"):
        load_with({**record, "streams": streams})
    with pytest.raises(PolicyLoadError, match=r"config\.json: missing key 'depth'"):
        load_with({k: v for k, v in record.items() if k != "depth"})
    with pytest.raises(PolicyLoadError, match="tensor 'inputs.geometric.norm.bias' is not in"):
        load_with({**record, "streams": record["streams"][:2]})
    with pytest.raises(PolicyLoadError, match="config.json: aggregator: dim=16 is not a multiple"):
        load_with({**record, "num_heads": 3})
    (path / "config.json").write_text(json.dumps(record))
    with pytest.raises(PolicyLoadError, match="not a DiffusionActionHead config"):
        DiffusionActionHead.from_pretrained(path)
    with pytest.raises(PolicyLoadError, match=r"config\.json: depth=2, expected 6"):
        UniPerceiver.from_pretrained(path, expect={"depth": 6})
    (path / WEIGHTS_NAME).unlink()
    with pytest.raises(PolicyLoadError, match=rf"{WEIGHTS_NAME}: missing"):
        UniPerceiver.from_pretrained(path)
    with pytest.raises(PolicyLoadError, match=r"config\.json: missing"):
        UniPerceiver.from_pretrained(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- config section


def test_section_checks_and_omegaconf():
    PolicyModelsConfig().validate()
    section = PolicyModelsConfig(aggregator=tiny_aggregator())
    with pytest.raises(ValueError, match="action_head.cond_dim=64 but the aggregator gives 16"):
        section.validate()
    section.action_head.cond_dim = 16
    with pytest.raises(ValueError, match="action_head.cond_tokens=32 but the aggregator gives 6"):
        section.validate()
    section = PolicyModelsConfig()
    section.normalization.actions = "mean_std"
    with pytest.raises(ValueError, match="clip_sample_range=1.0 clips standardised actions"):
        section.validate()

    merged = OmegaConf.merge(
        OmegaConf.structured(PolicyModelsConfig),
        {"aggregator": {"streams": [{"name": "onestep", "dim": 32, "tokens": 64}]}},
    )
    section = OmegaConf.to_object(merged)
    assert section.aggregator.streams == [StreamConfig("onestep", 32, 64, 8)]


# ------------------------------------------------------------------------ full scale and cost


def test_published_setting_on_meta():
    section = published_policy_models()
    section.validate()
    aggregator = build_aggregator(section.aggregator, device="meta")
    streams = example_streams(section.aggregator, device="meta")
    assert {k: tuple(v.shape) for k, v in streams.items()} == {
        "onestep": (1, 16, 256, 2560),
        "semantic": (1, 16, 256, 768),
        "geometric": (1, 16, 256, 2048),
    }
    tokens = aggregator(streams)
    assert tokens.shape == (1, 224, 384)
    head = build_action_head(section.action_head, device="meta")
    cond = example_condition(section.action_head, device="meta")
    assert cond.text.shape == (1, 1, 512) and cond.state is None
    noisy = torch.randn(1, 10, 7, device="meta")
    assert head(noisy, torch.zeros(1, dtype=torch.long, device="meta"), cond).shape == (1, 10, 7)
    assert section.action_head.num_inference_steps == 10
    # Parameter counts: 16.66M aggregator (15.38M in `onestep` mode), 21.35M head.
    assert 16.5e6 < aggregator_parameters(section.aggregator) < 16.8e6
    assert 15.2e6 < aggregator_parameters(section.aggregator.for_mode("onestep")) < 15.5e6
    assert 21.2e6 < action_head_parameters(section.action_head) < 21.5e6


def test_cost_of_the_published_setting():
    section = published_policy_models()
    # 68.8 GFLOPs (30.0 in `onestep` mode): 2.5% of the teacher's one-step pass.
    aggregator = aggregator_flops(section.aggregator)
    assert 65e9 < aggregator < 72e9
    assert aggregator < 0.03 * ONE_STEP_GFLOPS * 1e9
    # The head: 4.09 GFLOPs of context once per chunk, 0.19 per DDIM step (6.0 for 10 steps).
    head = action_head_flops(section.action_head)
    assert 3.9e9 < head.condition < 4.3e9 and 0.17e9 < head.step < 0.21e9
    assert head.total(10) == head.condition + 10 * head.step


def test_flop_counts_match_real_forwards():
    config = tiny_aggregator()
    model = seeded(UniPerceiver, config)
    with flop_counter() as counter, torch.no_grad():
        model(example_streams(config, batch=2))
    assert counter.get_total_flops() == aggregator_flops(config, batch=2)

    head_config = tiny_head()
    head = seeded(DiffusionActionHead, head_config)
    cond = example_condition(head_config, batch=2)
    with flop_counter() as counter, torch.no_grad():
        encoded = head.encode(cond)
    condition = counter.get_total_flops()
    with flop_counter() as counter, torch.no_grad():
        head.denoise(torch.randn(2, 4, 3), torch.tensor([5, 9]), encoded)
    assert (condition, counter.get_total_flops()) == tuple(action_head_flops(head_config, 2))


@pytest.mark.parametrize("model_class", [UniPerceiver, DiffusionActionHead, Normalizer])
def test_mixin_round_trip_honours_dtype_and_device(model_class, tmp_path):
    if model_class is Normalizer:
        model = Normalizer(4).fit([torch.randn(10, 4)])
        inputs, run = torch.randn(3, 4), lambda m, x: m.normalize(x)
    elif model_class is UniPerceiver:
        model = seeded(UniPerceiver, tiny_aggregator())
        inputs, run = example_streams(model.config, batch=2), lambda m, x: m(x)
    else:
        model = seeded(DiffusionActionHead, tiny_head())
        inputs = example_condition(model.config, batch=2)
        run = lambda m, x: m.encode(x).key_values[0][0]  # noqa: E731
    path = model.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", WEIGHTS_NAME]
    assert json.loads((path / "config.json").read_text())["_class_name"] == model_class.__name__
    loaded = model_class.from_pretrained(path, torch_dtype=torch.bfloat16, device_map="cpu")
    assert loaded.config == model.config
    floats = {p.dtype for p in loaded.state_dict().values() if p.is_floating_point()}
    assert floats == {torch.bfloat16}
    assert {p.device.type for p in loaded.state_dict().values()} == {"cpu"}
    with torch.no_grad():
        again = model_class.from_pretrained(path)
        assert torch.equal(run(again.eval(), inputs), run(model.eval(), inputs))


def test_old_format_directory_is_refused_in_one_line(tmp_path):
    path = tmp_path / "aggregator"
    path.mkdir()
    old = {"_class_name": "UniPerceiver", "_format_version": 1}
    (path / "config.json").write_text(json.dumps({**old, **dataclasses.asdict(tiny_aggregator())}))
    with pytest.raises(PolicyLoadError) as error:
        UniPerceiver.from_pretrained(path)
    message = str(error.value)
    assert "\n" not in message and str(path / "config.json") in message
    assert "written by an older svam" in message and "re-run `svam train-policy`" in message
