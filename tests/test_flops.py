"""The project's one FLOP counter (`svam.flops`): CPU attention counted, a control step's count on
CPU equal to the same policy's on `meta` for every mode kind, and the published-size counts."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from svam.config import load_config
from svam.flops import (
    _frozen,
    build_step_policy,
    control_step_flops,
    flop_counter,
    published_step_flops,
    step_observation,
)

MODES = ("onestep", "shortcut", "multistep:2", "partial:0.5", "blind")
"""One mode of every kind (the tiny teacher's N is 10: partial:0.5 runs 5 of its steps)."""


@pytest.fixture(scope="module")
def tiny():
    return load_config("tiny")


@pytest.fixture(scope="module")
def frozen(tiny):
    """The tiny config's teacher, encoders and decouplers, built once per device."""
    built = {}

    def get(device: str):
        if device not in built:
            built[device] = _frozen(tiny, torch.device(device), 0)
        return built[device]

    return get


def step_flops(config, mode, device, frozen):
    policy = build_step_policy(config, mode, device=device, frozen=frozen(device))
    assert policy.device.type == device and policy.mode == mode
    return control_step_flops(policy, step_observation(config))


@pytest.fixture(scope="module")
def meta_counts(tiny, frozen):
    counted = {}

    def get(mode: str):
        if mode not in counted:
            counted[mode] = step_flops(tiny, mode, "meta", frozen)
        return counted[mode]

    return get


def test_the_models_count_with_the_one_counter():
    from svam.distill import modeling_decoupler
    from svam.policy import modeling_action_head, modeling_aggregator

    for module in (modeling_decoupler, modeling_action_head, modeling_aggregator):
        assert module.flop_counter is flop_counter


def test_cpu_attention_is_counted():
    # (the fused CPU kernel wants one head dim for queries, keys and values; else: math, counted)
    batch, heads, queries, keys, dim = 2, 3, 5, 7, 8
    value_dim = dim
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(batch, heads, queries, dim, generator=generator, requires_grad=True)
    key = torch.randn(batch, heads, keys, dim, generator=generator)
    value = torch.randn(batch, heads, keys, value_dim, generator=generator)
    expected = 2 * batch * heads * queries * keys * (dim + value_dim)
    with FlopCounterMode(display=False) as plain:
        F.scaled_dot_product_attention(query, key, value)
    with flop_counter() as counter:
        out = F.scaled_dot_product_attention(query, key, value)
    cpu_kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    assert counter.get_flop_counts()["Global"] == {cpu_kernel: expected}
    assert plain.get_total_flops() == 0  # torch's own counter misses the fused CPU kernel
    # on meta, the math fallback's two batched matmuls: the same count
    with flop_counter() as on_meta:
        F.scaled_dot_product_attention(query.to("meta"), key.to("meta"), value.to("meta"))
    assert on_meta.get_total_flops() == expected
    # the backward of the CPU kernel too (torch's formula for its CUDA kernels': 5 matmuls)
    with flop_counter() as backward:
        out.sum().backward()
    assert backward.get_total_flops() == 2 * batch * heads * queries * keys * (
        3 * dim + 2 * value_dim
    )


@pytest.mark.parametrize("mode", MODES)
def test_a_step_counts_the_same_on_cpu_and_meta(tiny, frozen, meta_counts, mode):
    """The real control step on CPU (random weights, after a warm-up step) and on `meta` (shape-
    only substitutions, memoised UNet passes): the same count, in total and per part."""
    on_cpu = step_flops(tiny, mode, "cpu", frozen)
    assert on_cpu == meta_counts(mode)
    assert on_cpu["total"] > 0 and sum(on_cpu["parts"].values()) == on_cpu["total"]
    parts = on_cpu["parts"]
    assert parts["text"] == 0 and parts["head"] > 0  # the instruction's embedding is cached
    if mode == "blind":
        assert parts["head"] == on_cpu["total"]
    else:
        assert parts["teacher"] > 0 and parts["aggregator"] > 0
    assert (parts["encoders"] > 0) == (mode != "onestep" and mode != "blind")
    assert (parts["decouplers"] > 0) == (mode == "shortcut")


def test_generation_costs_one_unet_pass_per_step(meta_counts):
    """multistep:K on meta (every UNet pass after the first memoised) grows by one UNet pass per
    step, and partial:F costs the passes of the steps it runs."""
    from svam.policy.configuration_policy import parse_mode

    teacher = {mode: meta_counts(mode)["parts"]["teacher"] for mode in MODES}
    long = meta_counts("multistep:20")["parts"]
    assert (long["teacher"] - teacher["multistep:2"]) % 18 == 0
    unet = (long["teacher"] - teacher["multistep:2"]) // 18
    assert unet > 0
    assert long["encoders"] == meta_counts("multistep:2")["parts"]["encoders"]
    full = load_config("tiny").teacher.num_inference_steps
    _, steps = parse_mode("partial:0.5").sampling(full)
    assert teacher["partial:0.5"] == teacher["multistep:2"] + (steps - 2) * unet


def test_published_step_flops():
    modes = ["onestep", "shortcut", "multistep:2", "blind"]
    start = time.perf_counter()
    counted = published_step_flops(modes)
    seconds = time.perf_counter() - start
    gflops = {mode: round(c["total"] / 1e9, 1) for mode, c in counted.items()}
    print(f"published_step_flops: {seconds:.1f} s, GFLOPs {gflops}")
    assert list(counted) == modes
    for c in counted.values():
        assert sum(c["parts"].values()) == c["total"] > 0
    total = {mode: c["total"] for mode, c in counted.items()}
    assert total["blind"] < total["onestep"] < total["shortcut"] < total["multistep:2"]
    # the one-step pass at 256 px and 16 frames (SVD-XT's UNet to up-block 1 and the VAE encoding
    # of the current frame): thousands of GFLOPs; the shortcut adds the encoders and decouplers
    assert 2000e9 < counted["onestep"]["parts"]["teacher"] < 5000e9
    assert counted["shortcut"]["parts"]["teacher"] == counted["onestep"]["parts"]["teacher"]
    # cached per mode: a second call, in another order, counts nothing again
    start = time.perf_counter()
    assert published_step_flops(modes[::-1]) == {mode: counted[mode] for mode in modes[::-1]}
    assert time.perf_counter() - start < 1
    with pytest.raises(ValueError, match="foresight mode"):
        published_step_flops(["onestep", "sideways"])
