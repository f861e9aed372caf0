"""What `svam eval` measures of each foresight mode besides task success (FLOPs: `svam.flops`).

- `latency`: control steps (observation in, chunk out, batch 1) of every mode, interleaved step by
  step so that all modes see the same machine load, after warm-up, torch threads fixed;
- `matmul_peak`: this machine's measured float32 matmul FLOP/s, the compute-bound limit the
  modes' achieved FLOP/s are compared against;
- `fidelity`: on test clips of the teacher cache (no stage selects on them), the mode's action
  chunks against the expert's (MSE) and its foresight against the cache's N-step targets, with
  the metrics of `svam distill` (distill/fidelity.py): per branch and future frame, skill against
  "nothing moves", NMSE of per-channel standardised tokens, centred cosine; depth decoded by
  distill's linear probes, AbsRel against DA3's depth of the teacher's frames and against the
  simulator's depth of the real future frames. Foresight is measured twice: under the cache's
  own per-clip noise (then `multistep:N` regenerates the targets: an exact check of the pipeline)
  and under fresh noise (the teacher's own sampling spread shows there: the floor of any mode).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from svam.data.teacher_cache import CURRENT
from svam.distill.fidelity import (
    DepthFidelity,
    DepthProbe,
    ForesightFidelity,
    depth_map,
    depth_patches,
    summarize_depth,
    summarize_tokens,
)
from svam.policy.modeling_policy import BRANCHES, ShortcutPolicy
from svam.seeding import clip_noise, keyed_generator


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


NOISES = ("cache_noise", "fresh_noise")
"""The two noises fidelity is measured under (module docstring)."""


def noise_generators(run_seed: int, keys: list[str], noise: str) -> list[torch.Generator]:
    """One generator per clip. `cache_noise`: the one `svam cache-teachers` drew the clip's
    targets with (`svam.teachers.cache`), so `multistep:N` regenerates them; `fresh_noise`: another
    one per clip, the same for every mode."""
    if noise == "cache_noise":
        return [clip_noise(run_seed, key) for key in keys]
    if noise == "fresh_noise":
        return [keyed_generator(run_seed, "eval-fresh-noise", key) for key in keys]
    raise ValueError(f"noise must be one of {NOISES}, got '{noise}'")


@dataclass
class FidelityReference:
    """What foresight is scored against, all fitted by `svam distill` on the train split (its
    baselines.pt, `svam.distill.train`): each branch's per-channel token mean and std, and the depth
    probes that decode geometric tokens into depth: `teacher` (DA3's depth of the teacher's
    generated frames, `encoder` computes it) and `world` (the simulator's depth of the real
    frames)."""

    moments: dict[str, tuple[torch.Tensor, torch.Tensor]]
    probes: dict[str, DepthProbe]
    encoder: Any = None

    @classmethod
    def load(
        cls, path: Path, grid: int, encoder: Any, has: Callable[[str], bool]
    ) -> FidelityReference:
        """From distill's baselines.pt at `path`; `grid` is the side of the geometric token grid,
        `encoder` the geometric encoder (None: no depth against the teacher), `has` tells which
        arrays the teacher cache holds."""
        saved = torch.load(path, map_location="cpu", weights_only=True)
        missing = [f"{b}.{m}" for b in BRANCHES for m in ("mean", "std") if f"{b}.{m}" not in saved]
        if missing:
            raise ValueError(
                f"{path}: no {', '.join(missing)} (made by an older svam: rerun `svam distill`)"
            )
        moments = {b: (saved[f"{b}.mean"], saved[f"{b}.std"]) for b in BRANCHES}
        probes = {}
        available = {
            "teacher": ("depth", encoder is not None and has("generated")),
            "world": ("world_depth", has("depth")),
        }
        for truth, (name, usable) in available.items():
            if f"{name}.weight" in saved and usable:
                probes[truth] = DepthProbe(saved[f"{name}.weight"], saved[f"{name}.bias"], grid)
        return cls(moments, probes, encoder if "teacher" in probes else None)

    @property
    def arrays(self) -> list[str]:
        """The cache arrays fidelity reads besides the current frame, state and actions."""
        arrays = [*BRANCHES, *(f"{b}_ref" for b in BRANCHES)]
        arrays += ["generated"] if "teacher" in self.probes else []
        arrays += ["depth"] if "world" in self.probes else []
        return arrays

    def add_truth(self, batches: list[dict[str, Any]]) -> None:
        """Store each batch's depth truths, `depth_<truth>` (B, T, S, S) at the probes'
        resolution, once for every mode."""
        for batch in batches:
            maps = {}
            if "teacher" in self.probes:
                maps["teacher"] = self.encoder.depth(batch["generated"]).cpu()
            if "world" in self.probes:
                maps["world"] = batch["depth"]
            for truth, depth in maps.items():
                grid = self.probes[truth].grid
                batch[f"depth_{truth}"] = depth_map(depth_patches(depth, grid), grid)


class ForesightScores:
    """A mode's foresight against the cache's N-step targets over clips: per branch
    `ForesightFidelity` (skill against "nothing moves", standardised NMSE, centred and raw cosine)
    and per depth truth AbsRel of the decoded foresight, with the "nothing moves" decoding for
    its skill."""

    def __init__(self, frames: int, reference: FidelityReference):
        self.reference = reference
        self.tokens = {b: ForesightFidelity(frames, *reference.moments[b]) for b in BRANCHES}
        self.depth = {
            truth: (DepthFidelity(frames), DepthFidelity(frames)) for truth in reference.probes
        }

    def update(self, foresight: dict[str, torch.Tensor], batch: dict[str, Any]) -> None:
        for branch in BRANCHES:
            self.tokens[branch].update(
                foresight[branch].cpu(), batch[branch].float(), batch[f"{branch}_ref"].float()
            )
        static = batch["geometric_ref"].float()[:, None].expand_as(batch["geometric"])
        for truth, (predicted, nothing_moves) in self.depth.items():
            probe, maps = self.reference.probes[truth], batch[f"depth_{truth}"]
            predicted.update(probe(foresight["geometric"].cpu()), maps)
            nothing_moves.update(probe(static), maps)

    def summary(self) -> dict[str, Any]:
        def lists(metric) -> dict[str, list[float]]:
            return {k: v.tolist() for k, v in metric.compute().items()}

        block: dict[str, Any] = {b: summarize_tokens(lists(m)) for b, m in self.tokens.items()}
        for truth in ("teacher", "world"):
            pair = self.depth.get(truth)
            block[f"depth_{truth}"] = (
                summarize_depth(lists(pair[0]), lists(pair[1])) if pair else None
            )
        return block


def fidelity(
    policy: ShortcutPolicy,
    batches: list[dict[str, Any]],
    reference: FidelityReference | None,
    run_seed: int,
    noises: tuple[str, ...] = NOISES,
    actions: bool = True,
) -> dict[str, Any]:
    """A mode's action error and foresight fidelity on test clips of the teacher cache (batches
    of `teacher_cache_loader`, with `reference.add_truth` applied).

    Returns {"action": {"mse", "clips"} (under the cache's noise) or None, "foresight": None for
    a mode without foresight (onestep, blind) or without `reference`, else {"clips", <noise>:
    `ForesightScores.summary()` for each of `noises`}}."""
    measured = reference is not None and policy.foresight.kind not in ("onestep", "blind")
    blocks, squared, count = {}, 0.0, 0
    for noise in noises if measured else noises[:1]:
        scores = ForesightScores(batches[0]["semantic"].shape[1], reference) if measured else None
        for batch in batches:
            generators = noise_generators(run_seed, list(batch["key"]), noise)
            instructions = list(batch["instruction"])
            streams = policy.streams(batch[CURRENT], instructions, generators)
            if scores is not None:
                scores.update(streams, batch)
            if actions and noise == "cache_noise":
                state = batch["state"][:, 0].float() if policy.config.use_state else None
                chunk = policy.act(streams, instructions, state, generators).cpu()
                squared += float((chunk - batch["actions"].float()).square().sum())
                count += chunk.numel()
        if scores is not None:
            blocks[noise] = scores.summary()
    clips = sum(len(b["instruction"]) for b in batches)
    return {
        "action": {"mse": squared / count, "clips": clips} if count else None,
        "foresight": {"clips": clips, **blocks} if blocks else None,
    }
