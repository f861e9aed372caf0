"""Fidelity of foreseen tokens: how close predictions come to the teacher's multi-step targets.

Metrics, per branch and per frame index t of the clip (torchmetrics `Metric`s, so their sums are
gathered across processes):

- token cosine similarity: mean over tokens of cos(prediction, target);
- normalised MSE: the squared error over the targets' squared deviation from their per-channel
  mean at that frame index (1 - R^2: 0 is perfect, 1 is no better than the mean token).

Baselines, on the same clips:

- "nothing moves": the real current frame's tokens (the reference) repeated over time;
- "linear probe": one affine map from the one-step features, resampled to the target grid as
  the decoupler's input is, to the target token; closed-form ridge regression on the train split.

Depth (geometric branch). Depth Anything 3's DPT head decodes depth from all four of its
out-layers together (`teachers.encoders.GeometricEncoder.depth`), so it cannot decode the single
layer the targets come from, nor a prediction of it. Instead a linear depth probe is fitted on the
train split, closed-form ridge from a target token to the log depth of its patch (at
`DEPTH_SUBPATCH` x `DEPTH_SUBPATCH` sub-patches), with DA3's depth of the generated frames as the
truth. It decodes the decoupler's predictions, the baselines and the targets themselves alike;
AbsRel and delta<1.25 are measured against DA3's depth of the generated frames, and the targets'
row is the floor the probe itself sets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from distill.modeling_decoupler import resample_grid

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
"""Mean NMSEs within 1% of each other are a tie: neither beats the other."""


# ------------------------------------------------------------------------------------ metrics


class TokenFidelity(Metric):
    """Token cosine similarity and normalised MSE per frame index of (B, T, P, D) tokens."""

    full_state_update = False

    def __init__(self, frames: int, dim: int):
        super().__init__()
        zeros = torch.zeros(frames, dtype=torch.float64)
        self.add_state("cosine_sum", zeros.clone(), dist_reduce_fx="sum")
        self.add_state("squared_error", zeros.clone(), dist_reduce_fx="sum")
        self.add_state("tokens", zeros.clone(), dist_reduce_fx="sum")
        moments = torch.zeros(frames, dim, dtype=torch.float64)
        self.add_state("target_sum", moments.clone(), dist_reduce_fx="sum")
        self.add_state("target_squares", moments.clone(), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        preds, target = preds.float(), target.float()
        self.cosine_sum += F.cosine_similarity(preds, target, dim=-1).sum((0, 2)).double()
        self.squared_error += (preds - target).square().sum((0, 2, 3)).double()
        self.tokens += target.shape[0] * target.shape[2]
        self.target_sum += target.sum((0, 2)).double()
        self.target_squares += target.square().sum((0, 2)).double()

    def compute(self) -> dict[str, torch.Tensor]:
        deviation = self.target_squares - self.target_sum.square() / self.tokens[:, None]
        return {
            "cosine": self.cosine_sum / self.tokens,
            "nmse": self.squared_error / deviation.sum(-1),
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

    def target_variance(self) -> float:
        """Mean over output channels of the targets' variance."""
        mean = self.xty[-1] / self.rows
        return float((self.y_squares / self.rows - mean.square()).mean())

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


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def compare(decoupler: dict[str, list[float]], baseline: dict[str, list[float]]) -> dict:
    """How the decoupler does against one baseline: cosine gain and relative NMSE change (negative
    is better) per frame index and on average; `beats` when the mean cosine is higher and the
    mean NMSE lower by more than a tie."""
    cosine_gain = [d - b for d, b in zip(decoupler["cosine"], baseline["cosine"], strict=True)]
    nmse_change = [d / b - 1 for d, b in zip(decoupler["nmse"], baseline["nmse"], strict=True)]
    mean_cosine_gain = _mean(decoupler["cosine"]) - _mean(baseline["cosine"])
    mean_nmse_change = _mean(decoupler["nmse"]) / _mean(baseline["nmse"]) - 1
    return {
        "cosine_gain": cosine_gain,
        "nmse_change": nmse_change,
        "mean_cosine_gain": mean_cosine_gain,
        "mean_nmse_change": mean_nmse_change,
        "tie": abs(mean_nmse_change) <= TIE,
        "beats": mean_cosine_gain > 0 and mean_nmse_change < -TIE,
    }


def branch_report(methods: dict[str, dict[str, list[float]]]) -> dict:
    """Per-method metrics plus the decoupler's margins over each baseline."""
    margins = {name: compare(methods["decoupler"], methods[name]) for name in BASELINES}
    return {
        "methods": methods,
        "versus": margins,
        "beats_baselines": all(margin["beats"] for margin in margins.values()),
    }


def _row(label: str, values: list[float], fmt: str) -> str:
    cells = " | ".join(format(v, fmt) for v in [*values, _mean(values)])
    return f"| {label} | {cells} |"


def markdown(report: dict) -> str:
    """The fidelity report as markdown: one table per branch, margins, depth, notes."""
    frames = report["frames"]
    head = "| | " + " | ".join(f"t={t}" for t in range(frames)) + " | mean |"
    rule = "|---" * (frames + 2) + "|"
    lines = [
        "# Decoupler fidelity",
        "",
        f"{report['clips']} validation clips of {report['cache']}; one-step features "
        f"{report['onestep']}; frame index t=0 is the current frame as the teacher regenerates "
        "it, t>0 the foreseen future. Cosine: mean token cosine similarity (higher is better). "
        "NMSE: squared error over the targets' variance around their per-channel mean (lower is "
        f"better; 1 = the mean token). Linear probe: {report['probe']}.",
    ]
    for branch, result in report["branches"].items():
        lines += ["", f"## {branch} ({result['encoder']})", "", head, rule]
        for metric, fmt in (("cosine", ".3f"), ("nmse", ".3f")):
            for method, values in result["methods"].items():
                lines.append(_row(f"{metric}: {LABELS[method]}", values[metric], fmt))
        lines.append("")
        for baseline, margin in result["versus"].items():
            gains = ", ".join(f"{g:+.3f}" for g in margin["cosine_gain"])
            changes = ", ".join(f"{100 * c:+.1f}%" for c in margin["nmse_change"])
            verdict = "does NOT beat it"
            if margin["beats"]:
                verdict = "beats it"
            elif margin["tie"]:
                verdict = f"ties with it (NMSE within {100 * TIE:.0f}%)"
            lines.append(
                f"- versus {LABELS[baseline]}: the decoupler {verdict}: cosine "
                f"{margin['mean_cosine_gain']:+.3f} (per t: {gains}), NMSE "
                f"{100 * margin['mean_nmse_change']:+.1f}% (per t: {changes}), on average"
            )
    depth = report.get("depth")
    if depth:
        lines += ["", "## depth through the linear depth probe (geometric branch)", "", head, rule]
        for metric, fmt in (("abs_rel", ".3f"), ("delta1", ".3f")):
            for method, values in depth["methods"].items():
                label = "delta<1.25" if metric == "delta1" else "AbsRel"
                lines.append(_row(f"{label}: {LABELS[method]}", values[metric], fmt))
        lines += ["", f"- {depth['about']}"]
    if report.get("notes"):
        lines += ["", "## notes", ""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"
