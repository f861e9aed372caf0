"""What `svam eval` measures of each foresight mode besides task success.

- `latency`: control steps (observation in, chunk out, batch 1) of every mode, interleaved step by
  step so that all modes see the same machine load, after warm-up, torch threads fixed;
- `flops`: FLOPs of one control step by part (`policy.modeling_policy.PARTS`), torch's FLOP
  counter (matmuls, convolutions, attention; elementwise ops are not counted);
- `matmul_peak`: this machine's measured float32 matmul FLOP/s, the compute-bound limit the
  modes' achieved FLOP/s are compared against;
- `fidelity`: on validation clips of the teacher cache, the mode's foresight against the cache's
  N-step targets (token cosine per branch, depth AbsRel through distill's depth probe) and its
  action chunks against the expert's (MSE).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from policy.modeling_policy import BRANCHES, PARTS, ShortcutPolicy


@contextlib.contextmanager
def fixed_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `threads` (None: unchanged) for the block."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summary_ms(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {
        "median": float(np.median(ms)),
        "p95": float(np.percentile(ms, 95)),
        "mean": float(ms.mean()),
        "count": len(ms),
    }


def latency(
    policies: dict[str, ShortcutPolicy],
    observation: dict[str, Any],
    steps: int,
    warmup: int,
    generator_seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Median, p95 and mean ms of a control step per mode; `observation` holds `frames` (1, 3,
    H, W) uint8, `instruction` and `state` (1, S). Round r times every mode's step r in turn."""
    times: dict[str, list[float]] = defaultdict(list)
    generators = {mode: torch.Generator().manual_seed(generator_seed) for mode in policies}
    for step in range(warmup + steps):
        for mode, policy in policies.items():
            state = observation["state"] if policy.config.use_state else None
            _sync(policy.device)
            start = time.perf_counter()
            policy.predict(
                observation["frames"],
                observation["instruction"],
                state,
                generator=generators[mode],
            )
            _sync(policy.device)
            if step >= warmup:
                times[mode].append(time.perf_counter() - start)
    return {mode: summary_ms(seconds) for mode, seconds in times.items()}


def flops(policy: ShortcutPolicy, observation: dict[str, Any]) -> dict[str, Any]:
    """FLOPs of one control step in total and per part (the parts sum to the total), counted
    after a warm-up step: the instruction's embedding is then cached, as in closed loop."""
    parts: dict[str, int] = dict.fromkeys(PARTS, 0)
    counter = FlopCounterMode(display=False)

    @contextlib.contextmanager
    def count(name: str) -> Iterator[None]:
        before = counter.get_total_flops()
        yield
        parts[name] += counter.get_total_flops() - before

    state = observation["state"] if policy.config.use_state else None
    for observers in ([], [count]):  # a warm-up step first, then the counted one
        policy.observers.extend(observers)
        try:
            with counter if observers else contextlib.nullcontext():
                policy.predict(
                    observation["frames"],
                    observation["instruction"],
                    state,
                    generator=torch.Generator().manual_seed(0),
                )
        finally:
            for observer in observers:
                policy.observers.remove(observer)
    return {"total": int(counter.get_total_flops()), "parts": parts}


def matmul_peak(device: torch.device, repeats: int = 10) -> dict[str, Any]:
    """Measured float32 matmul FLOP/s (median over `repeats`) at the current thread count."""
    size = 4096 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    seconds = []
    for _ in range(repeats + 2):
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        seconds.append(time.perf_counter() - start)
    median = float(np.median(seconds[2:]))
    return {"flops_per_s": 2 * size**3 / median, "size": size, "dtype": "float32"}


class DepthTruth:
    """Depth errors of geometric tokens: distill's linear depth probe decodes them, DA3's depth of
    the cache's generated frames is the truth (see distill/fidelity.py)."""

    def __init__(self, baselines: Path, encoder):
        from distill.fidelity import DepthProbe

        saved = torch.load(baselines, map_location="cpu", weights_only=True)
        if "depth.weight" not in saved:
            raise ValueError(f"{baselines}: no depth probe ({saved.get('depth_note') or 'none'})")
        grid = int(round(encoder.num_tokens**0.5))
        self.probe = DepthProbe(saved["depth.weight"], saved["depth.bias"], grid)
        self.encoder = encoder

    def add_truth(self, batches: list[dict[str, Any]]) -> None:
        """Store DA3's depth of each batch's generated frames as `depth`, once for every mode."""
        from distill.fidelity import depth_map, depth_patches

        grid = self.probe.grid
        for batch in batches:
            depth = self.encoder.depth(batch["generated"]).cpu()
            batch["depth"] = depth_map(depth_patches(depth, grid), grid)


def fidelity(
    policy: ShortcutPolicy,
    batches: list[dict[str, Any]],
    depth: DepthTruth | None,
    run_seed: int,
) -> dict[str, Any]:
    """Foresight fidelity (None for onestep) and action MSE of a mode on validation batches
    (from the teacher cache: current frame, instruction, state, actions, targets; with `depth`,
    the truth `DepthTruth.add_truth` stored in them)."""
    from distill.fidelity import DepthFidelity, TokenFidelity
    from svam.seeding import keyed_generator

    foresight = policy.foresight.kind != "onestep"
    cosine = {b: TokenFidelity(batches[0][b].shape[1], batches[0][b].shape[-1]) for b in BRANCHES}
    depth_metric = DepthFidelity(batches[0]["geometric"].shape[1])
    floor = DepthFidelity(batches[0]["geometric"].shape[1])
    squared, count = 0.0, 0
    for index, batch in enumerate(batches):
        generator = keyed_generator(run_seed, "eval-fidelity", policy.mode, index)
        instructions = list(batch["instruction"])
        streams = policy.streams(batch["current"], instructions, generator)
        state = batch["state"][:, 0].float() if policy.config.use_state else None
        chunk = policy.act(streams, instructions, state, generator).cpu()
        squared += float((chunk - batch["actions"].float()).square().sum())
        count += chunk.numel()
        if not foresight:
            continue
        for branch in BRANCHES:
            cosine[branch].update(streams[branch].cpu(), batch[branch].float())
        if depth is not None:
            depth_metric.update(depth.probe(streams["geometric"].cpu()), batch["depth"])
            floor.update(depth.probe(batch["geometric"].float()), batch["depth"])
    clips = sum(len(b["instruction"]) for b in batches)
    result: dict[str, Any] = {"action": {"mse": squared / count, "clips": clips}, "foresight": None}
    if foresight:
        scores = {b: cosine[b].compute()["cosine"].mean().item() for b in BRANCHES}
        result["foresight"] = {
            "semantic_cosine": scores["semantic"],
            "geometric_cosine": scores["geometric"],
            "depth_abs_rel": depth_metric.compute()["abs_rel"].mean().item() if depth else None,
            "depth_abs_rel_floor": floor.compute()["abs_rel"].mean().item() if depth else None,
            "clips": clips,
        }
    return result
