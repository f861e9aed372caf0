"""Fidelity of foreseen tokens: how close predictions come to the teacher's multi-step targets.

Metrics, per branch and per frame index t of the clip (torchmetrics `Metric`s, so their sums are
gathered across processes), on targets standardised per channel with the train split's mean and
standard deviation (so a channel with a large scale, such as one half of Depth Anything 3's
concatenated tokens, weighs no more than any other):

- normalised MSE: the mean squared error of the standardised tokens (0 is perfect, about 1 is no
  better than the train mean token);
- skill against "nothing moves": 1 - error / error of repeating the real current frame's tokens
  (0: no better than assuming a static world, 1: perfect, negative: worse than static);
- centred cosine: mean over tokens of cos(prediction - train mean, target - train mean); the
  uncentred cosine, dominated by the component every token shares, is kept for reference.

Averages over a clip are over its future frames (t >= 1): frame 0 is the current frame as the
teacher regenerates it, which "nothing moves" nearly knows. Skill averages pool the errors.

Baselines, on the same clips:

- "nothing moves": the real current frame's tokens (the reference) repeated over time;
- "linear probe": one affine map from the one-step features, resampled to the target grid as
  the decoupler's input is, to the target token; closed-form ridge regression on the train split.

Depth (geometric branch). Depth Anything 3's DPT head decodes depth from all four of its
out-layers together (`svam.teachers.encoders.GeometricEncoder.depth`), so it cannot decode the single
layer the targets come from, nor a prediction of it. Instead linear depth probes are fitted on the
train split, closed-form ridge from a geometric token to the log depth of its patch (at
`DEPTH_SUBPATCH` x `DEPTH_SUBPATCH` sub-patches), against two truths:

- the teacher: DA3's depth of the generated frames, from the target tokens (`depth`);
- the world: the simulator's metric depth of the real current frame, from its reference tokens
  (`world_depth`); decoding a foresight with it and comparing with the simulator's depth of the
  real future frames tells how far the foresight is from what really happened.

Each probe decodes the decoupler's predictions, the baselines and the targets alike; AbsRel,
delta<1.25 and skill against "nothing moves" (the current frame's tokens decoded) are measured,
and the targets' row against the teacher is the floor the probe itself sets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from svam.distill.modeling_decoupler import resample_grid

METHODS = ("decoupler", "nothing_moves", "linear_probe")
BASELINES = METHODS[1:]
LABELS = {
    "decoupler": "decoupler",
    "nothing_moves": "nothing moves",
    "linear_probe": "linear probe",
    "targets": "targets (probe floor)",
}
DEPTH_SUBPATCH = 4
"""Depth values per token side that the depth probe decodes (4 x 4 per patch token)."""
TIE = 0.01
"""Mean skills within 0.01 of each other are a tie: neither beats the other."""


# ------------------------------------------------------------------------------------ metrics


class ForesightFidelity(Metric):
    """Standardised NMSE, skill against "nothing moves", centred and raw cosine per frame index of
    (B, T, P, D) tokens; `mean` and `std` (D,) are the train split's per-channel statistics."""

    full_state_update = False

    def __init__(self, frames: int, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.detach().float().flatten())
        self.register_buffer("std", std.detach().float().flatten().clamp_min(1e-6))
        zeros = torch.zeros(frames, dtype=torch.float64)
        for name in ("error", "static_error", "elements", "centred_cosine", "cosine", "tokens"):
            self.add_state(name, zeros.clone(), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor, reference: torch.Tensor) -> None:
        """Predictions and targets (B, T, P, D); `reference` (B, P, D): the current frame's tokens,
        the "nothing moves" guess for every frame."""
        preds, target = preds.float() - self.mean, target.float() - self.mean
        static = (reference.float() - self.mean)[:, None].expand_as(target)
        self.error += ((preds - target) / self.std).square().sum((0, 2, 3)).double()
        self.static_error += ((static - target) / self.std).square().sum((0, 2, 3)).double()
        self.elements += target[:, 0].numel()
        self.centred_cosine += F.cosine_similarity(preds, target, dim=-1).sum((0, 2)).double()
        raw = F.cosine_similarity(preds + self.mean, target + self.mean, dim=-1)
        self.cosine += raw.sum((0, 2)).double()
        self.tokens += target.shape[0] * target.shape[2]

    def compute(self) -> dict[str, torch.Tensor]:
        return {
            "skill": 1 - self.error / self.static_error,
            "nmse": self.error / self.elements,
            "static_nmse": self.static_error / self.elements,
            "centred_cosine": self.centred_cosine / self.tokens,
            "cosine": self.cosine / self.tokens,
        }


def future(values: list[float]) -> list[float]:
    """The future frames' values (t >= 1) of a per-frame list; all of them for a 1-frame clip."""
    return values[1:] or values


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def pooled_skill(errors: list[float], static_errors: list[float]) -> float:
    """1 - the future frames' summed error over the summed error of "nothing moves"."""
    return 1 - sum(future(errors)) / sum(future(static_errors))


def summarize_tokens(per_frame: dict[str, list[float]]) -> dict:
    """A branch's fidelity: future-frame averages (skill pooled) and the per-frame lists."""
    return {
        "skill": pooled_skill(per_frame["nmse"], per_frame["static_nmse"]),
        **{k: _mean(future(per_frame[k])) for k in ("nmse", "centred_cosine", "cosine")},
        "per_frame": per_frame,
    }


def summarize_depth(per_frame: dict[str, list[float]], static: dict[str, list[float]]) -> dict:
    """Depth fidelity: future-frame AbsRel and delta<1.25, and skill against the depth that
    "nothing moves" decodes (`static`), pooled like the tokens'."""
    skill = [1 - d / s for d, s in zip(per_frame["abs_rel"], static["abs_rel"], strict=True)]
    return {
        "abs_rel": _mean(future(per_frame["abs_rel"])),
        "delta1": _mean(future(per_frame["delta1"])),
        "skill": pooled_skill(per_frame["abs_rel"], static["abs_rel"]),
        "per_frame": {**per_frame, "skill": skill},
    }


class DepthFidelity(Metric):
    """AbsRel and delta<1.25 per frame index of positive depth maps (B, T, H, W)."""

    full_state_update = False

    def __init__(self, frames: int):
        super().__init__()
        zeros = torch.zeros(frames, dtype=torch.float64)
        self.add_state("abs_rel_sum", zeros.clone(), dist_reduce_fx="sum")
        self.add_state("within", zeros.clone(), dist_reduce_fx="sum")
        self.add_state("pixels", zeros.clone(), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        preds, target = preds.float(), target.float()
        self.abs_rel_sum += ((preds - target).abs() / target).sum((0, 2, 3)).double()
        ratio = torch.maximum(preds / target, target / preds)
        self.within += (ratio < 1.25).sum((0, 2, 3)).double()
        self.pixels += target.shape[0] * target.shape[2] * target.shape[3]

    def compute(self) -> dict[str, torch.Tensor]:
        return {"abs_rel": self.abs_rel_sum / self.pixels, "delta1": self.within / self.pixels}


# --------------------------------------------------------------------------------- regression


class RidgeRegression:
    """Closed-form ridge regression y = x W + b from sufficient statistics gathered over batches.

    `statistics()` are plain sums: add them up across processes before `solve`. The bias is not
    penalised; the penalty is `ridge` times the mean feature energy (sum x^2 / rows / in_dim).
    """

    def __init__(self, in_dim: int, out_dim: int, device: torch.device | str = "cpu"):
        self.xtx = torch.zeros(in_dim + 1, in_dim + 1, dtype=torch.float64, device=device)
        self.xty = torch.zeros(in_dim + 1, out_dim, dtype=torch.float64, device=device)
        self.y_squares = torch.zeros(out_dim, dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Rows x (N, in_dim) and y (N, out_dim)."""
        x = torch.cat([x.double(), torch.ones_like(x[:, :1], dtype=torch.float64)], dim=1)
        y = y.double()
        self.xtx += x.T @ x
        self.xty += x.T @ y
        self.y_squares += y.square().sum(0)

    def statistics(self) -> list[torch.Tensor]:
        return [self.xtx, self.xty, self.y_squares]

    @property
    def rows(self) -> int:
        return int(self.xtx[-1, -1].item())

    def target_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per output channel: the targets' mean and standard deviation (float32)."""
        mean = self.xty[-1] / self.rows
        variance = (self.y_squares / self.rows - mean.square()).clamp_min(0)
        return mean.float(), variance.sqrt().float()

    def solve(self, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight (in_dim, out_dim), bias (out_dim,)) in float32."""
        in_dim = self.xtx.shape[0] - 1
        energy = self.xtx.diagonal()[:-1].sum() / in_dim
        penalty = torch.full((in_dim + 1,), ridge, dtype=torch.float64, device=self.xtx.device)
        penalty[-1] = 0
        solution = torch.linalg.solve(self.xtx + torch.diag(penalty * energy), self.xty)
        return solution[:-1].float(), solution[-1].float()


def grid_features(features: torch.Tensor, grid: int) -> torch.Tensor:
    """One-step features (B, T, C, h, w) -> (B, T, grid*grid, C) on the target grid, resampled
    as the decoupler resamples its input (area averaging to shrink, bilinear to grow)."""
    batch, frames = features.shape[:2]
    maps = resample_grid(features.float().permute(0, 1, 3, 4, 2).flatten(0, 1), grid)
    return maps.reshape(batch, frames, grid * grid, -1)


@dataclass
class LinearProbe:
    """The linear-probe baseline of one branch: features on the target grid -> target tokens."""

    weight: torch.Tensor
    bias: torch.Tensor
    grid: int

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return grid_features(features, self.grid) @ self.weight + self.bias


def depth_patches(depth: torch.Tensor, grid: int) -> torch.Tensor:
    """Depth maps (B, T, S, S) -> log depth per token patch (B, T, grid*grid, sub*sub), area
    averaged to a (grid*sub)^2 map first."""
    sub = DEPTH_SUBPATCH
    batch, frames = depth.shape[:2]
    pooled = F.adaptive_avg_pool2d(depth.float().flatten(0, 1), grid * sub)
    patches = pooled.reshape(batch, frames, grid, sub, grid, sub).permute(0, 1, 2, 4, 3, 5)
    return patches.reshape(batch, frames, grid * grid, sub * sub).clamp_min(1e-6).log()


def depth_map(patches: torch.Tensor, grid: int) -> torch.Tensor:
    """The inverse of `depth_patches`: log patches (B, T, P, sub*sub) -> depth (B, T, G, G)."""
    sub = DEPTH_SUBPATCH
    batch, frames = patches.shape[:2]
    maps = patches.reshape(batch, frames, grid, grid, sub, sub).permute(0, 1, 2, 4, 3, 5)
    return maps.reshape(batch, frames, grid * sub, grid * sub).exp()


@dataclass
class DepthProbe:
    """Geometric tokens (B, T, P, D) -> depth maps (B, T, grid*sub, grid*sub)."""

    weight: torch.Tensor
    bias: torch.Tensor
    grid: int

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return depth_map(tokens.float() @ self.weight + self.bias, self.grid)


# ------------------------------------------------------------------------------------- report


def compare(decoupler: dict, baseline: dict) -> dict:
    """How the decoupler does against one baseline (`summarize_tokens` dicts): skill and centred
    cosine gains per frame index and on average over the future; `beats` when both averages are
    higher, the skill by more than a tie."""
    per_d, per_b = decoupler["per_frame"], baseline["per_frame"]
    gains = {
        metric: [d - b for d, b in zip(per_d[metric], per_b[metric], strict=True)]
        for metric in ("skill", "centred_cosine")
    }
    skill_gain = decoupler["skill"] - baseline["skill"]
    cosine_gain = decoupler["centred_cosine"] - baseline["centred_cosine"]
    return {
        "skill_gain": gains["skill"],
        "centred_cosine_gain": gains["centred_cosine"],
        "mean_skill_gain": skill_gain,
        "mean_centred_cosine_gain": cosine_gain,
        "tie": abs(skill_gain) <= TIE,
        "beats": skill_gain > TIE and cosine_gain > 0,
    }


def branch_report(methods: dict[str, dict[str, list[float]]]) -> dict:
    """Per-method fidelity (`summarize_tokens`) plus the decoupler's margins over each baseline;
    `methods` maps each method to its `ForesightFidelity` per-frame lists."""
    summaries = {name: summarize_tokens(per_frame) for name, per_frame in methods.items()}
    margins = {name: compare(summaries["decoupler"], summaries[name]) for name in BASELINES}
    return {
        "methods": summaries,
        "versus": margins,
        "beats_baselines": all(margin["beats"] for margin in margins.values()),
    }


def _row(label: str, per_frame: list[float], mean: float, fmt: str) -> str:
    cells = " | ".join(format(v, fmt) for v in [*per_frame, mean])
    return f"| {label} | {cells} |"


TOKEN_METRICS = (
    ("skill", "skill"),
    ("nmse", "NMSE"),
    ("centred_cosine", "centred cosine"),
    ("cosine", "cosine"),
)
DEPTH_METRICS = (("abs_rel", "AbsRel"), ("delta1", "delta<1.25"), ("skill", "skill"))
NO_WORLD_DEPTH = (
    "no depth against the world: the episodes hold no depth (a dataset imported without one, "
    "`svam import lerobot`)"
)
DEPTH_TRUTHS = {
    "teacher": "Depth Anything 3's depth of the teacher's generated frames",
    "world": "the simulator's depth of the real future frames",
}


def _metric_rows(methods: dict[str, dict], metrics: tuple[tuple[str, str], ...]) -> list[str]:
    """One row per metric and method: its per-frame values, then the future-frame mean."""
    return [
        _row(f"{label}: {LABELS[method]}", summary["per_frame"][metric], summary[metric], ".3f")
        for metric, label in metrics
        for method, summary in methods.items()
    ]


def markdown(report: dict) -> str:
    """The fidelity report as markdown: one table per branch, margins, depth, notes."""
    frames = report["frames"]
    head = "| | " + " | ".join(f"t={t}" for t in range(frames)) + " | future mean |"
    rule = "|---" * (frames + 2) + "|"
    lines = [
        "# Decoupler fidelity",
        "",
        f"{report['clips']} {report.get('split', 'test')} clips of {report['cache']} (no stage "
        f"selects on them); one-step features {report['onestep']}; frame index t=0 is the "
        "current frame as the teacher regenerates it, t>0 the foreseen future, and the means are "
        "over t>0. Tokens are standardised per channel with the train split's statistics. Skill: "
        "1 - error / error of 'nothing moves' (0 = no better than a static world, 1 = perfect). "
        "NMSE: mean squared error of the standardised tokens (about 1 = the mean token). Centred "
        "cosine: cosine after subtracting the train mean token (higher is better). Linear probe: "
        f"{report['probe']}.",
    ]
    for branch, result in report["branches"].items():
        lines += ["", f"## {branch} ({result['encoder']})", "", head, rule]
        lines += _metric_rows(result["methods"], TOKEN_METRICS)
        lines.append("")
        for baseline, margin in result["versus"].items():
            gains = ", ".join(f"{g:+.3f}" for g in margin["skill_gain"])
            verdict = "does NOT beat it"
            if margin["beats"]:
                verdict = "beats it"
            elif margin["tie"]:
                verdict = f"ties with it (skill within {TIE})"
            lines.append(
                f"- versus {LABELS[baseline]}: the decoupler {verdict}: skill "
                f"{margin['mean_skill_gain']:+.3f} (per t: {gains}), centred cosine "
                f"{margin['mean_centred_cosine_gain']:+.3f}, on average over the future"
            )
    depth = report.get("depth")
    if depth:
        for truth, about in DEPTH_TRUTHS.items():
            if not depth.get(truth):
                continue
            lines += ["", f"## depth against {about}", "", head, rule]
            lines += _metric_rows(depth[truth], DEPTH_METRICS)
        lines += ["", f"- {depth['about']}"]
    if report.get("notes"):
        lines += ["", "## notes", ""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"
