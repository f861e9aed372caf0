"""The latency–fidelity report of `svam eval`: tables, answers, plots and TensorBoard logs.

Input is a plain dict built by the eval stage: the run, the machine, the evaluation settings, the
teacher's sampling floor and, per mode in configured order, either `status: ok` with its
measurements or `status: missing` with a one-line reason. `complete` adds Wilson intervals, Pareto
fronts, paired comparisons of success (`svam.eval.stats`) and the answers the paper asks of the
numbers; `write_report` writes `report.json`, `report.md` and two figures.

Conventions: a measurement that is None or NaN is "not measured" (`—` in tables, skipped in plots
and logs); the foresight of `onestep` and `blind` is "not applicable" (`n/a`), since they have
none; a missing mode is never dropped, it is a "missing" row in the headline table and listed with
its reason. Foresight is scored as skill against "nothing moves" (repeating the current frame's
tokens): 0 is no better than a static world, 1 is perfect; the headline reads it under the cache's
own noise keys, with fresh noise beside it.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from svam.atomic import atomic_file, write_text_atomic
from svam.eval.stats import paired_comparison

DPI = 110
LATENCY_FIDELITY_PNG = "latency_fidelity.png"
SUCCESS_PER_TASK_PNG = "success_per_task.png"
BLIND = "blind"
NO_FORESIGHT_KINDS = ("onestep", "blind")
SAMPLING_FLOOR = "sampling floor (teacher, fresh noise)"
NO_VISION = (
    "no vision mode beats the blind policy on these episodes: this run gives no evidence that the "
    "tasks need vision"
)


@dataclass(frozen=True)
class FidelityAxis:
    key: str
    path: tuple[str, ...]
    label: str
    higher_is_better: bool

    @property
    def sense(self) -> str:
        return "higher is better" if self.higher_is_better else "lower is better"

    @property
    def fresh_path(self) -> tuple[str, ...] | None:
        """The same measurement under fresh noise, for a foresight axis."""
        if self.path[:2] != ("foresight", "cache_noise"):
            return None
        return ("foresight", "fresh_noise", *self.path[2:])


FIDELITY_AXES = (
    FidelityAxis("success_rate", ("success", "rate"), "success rate", True),
    FidelityAxis(
        "semantic_skill", ("foresight", "cache_noise", "semantic", "skill"), "semantic skill", True
    ),
    FidelityAxis(
        "geometric_skill",
        ("foresight", "cache_noise", "geometric", "skill"),
        "geometric skill",
        True,
    ),
    FidelityAxis(
        "depth_world_abs_rel",
        ("foresight", "cache_noise", "depth_world", "abs_rel"),
        "depth AbsRel vs world",
        False,
    ),
    FidelityAxis("action_mse", ("action", "mse"), "action MSE", False),
)
FORESIGHT_AXES = tuple(axis for axis in FIDELITY_AXES if axis.path[0] == "foresight")


# ---------------------------------------------------------------------------------------------
# Statistics


def wilson_interval(successes: int, episodes: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a success rate (95% for z=1.96); (0, 1) when there are no episodes,
    since no data rules out no rate."""
    if episodes == 0:
        return 0.0, 1.0
    p, n, z2 = successes / episodes, episodes, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the (latency, fidelity) points no other point dominates, sorted by latency.

    A point is dominated by one at most as slow and at least as faithful that is strictly better on
    one axis, so two identical points are both on the front."""
    sign = 1.0 if higher_is_better else -1.0
    scored = [(x, sign * y) for x, y in points]

    def dominated(i: int) -> bool:
        x, y = scored[i]
        return any(
            ox <= x and oy >= y and (ox < x or oy > y)
            for j, (ox, oy) in enumerate(scored)
            if j != i
        )

    front = [i for i in range(len(points)) if not dominated(i)]
    return sorted(front, key=lambda i: (points[i][0], -scored[i][1], i))


# ---------------------------------------------------------------------------------------------
# Reading a report


def _get(block: dict | None, *path: str) -> Any:
    """The value at `path`, or None when a block on the way is None or the value is NaN."""
    for key in path:
        if not isinstance(block, dict):
            return None
        block = block.get(key)
    if isinstance(block, float) and math.isnan(block):
        return None
    return block


def _ok_modes(report: dict) -> dict[str, dict]:
    return {name: mode for name, mode in report["modes"].items() if mode["status"] == "ok"}


def _has_no_foresight(mode: dict) -> bool:
    return mode.get("kind") in NO_FORESIGHT_KINDS


def _axis_points(report: dict, axis: FidelityAxis) -> dict[str, tuple[float, float]]:
    """(latency median ms, value) of every ok mode that has both, in configured order."""
    points = {}
    for name, mode in _ok_modes(report).items():
        latency, value = _get(mode, "latency_ms", "median"), _get(mode, *axis.path)
        if latency is not None and value is not None:
            points[name] = (float(latency), float(value))
    return points


def _ci(success: dict) -> tuple[float, float]:
    return wilson_interval(success["successes"], success["episodes"])


def _multistep_k(name: str) -> int | None:
    match = re.fullmatch(r"multistep:(\d+)", name)
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------------------------------------
# Completing a report: intervals, Pareto fronts, paired comparisons, answers


def complete(report: dict) -> dict:
    """A copy of `report` with Wilson intervals (`success.ci95`, overall and per task), the Pareto
    front of each fidelity axis (`pareto`: axis key -> mode names), `answers` and `comparisons`
    (every paired comparison the answers made, in order)."""
    report = copy.deepcopy(report)
    for mode in _ok_modes(report).values():
        success = mode.get("success")
        if success:
            success["ci95"] = list(_ci(success))
            for task in success["tasks"].values():
                task["ci95"] = list(_ci(task))
    report["pareto"] = {}
    for axis in FIDELITY_AXES:
        points = _axis_points(report, axis)
        names = list(points)
        front = pareto_front([points[name] for name in names], axis.higher_is_better)
        report["pareto"][axis.key] = [names[i] for i in front]
    report["answers"] = {
        "shortcut_vs_onestep": _shortcut_vs_onestep(report),
        "shortcut_vs_multistep": _shortcut_vs_multistep(report),
        "vision_matters": _vision_matters(report),
    }
    report["comparisons"] = [
        comparison
        for answer in report["answers"].values()
        for comparison in (
            [answer["success"]] if "success" in answer else answer.get("comparisons", {}).values()
        )
    ]
    return report


def _unavailable(report: dict, names: list[str]) -> str | None:
    """'cannot answer: ...' when a mode needed for an answer has no success numbers, else None."""
    for name in names:
        mode = report["modes"].get(name)
        if mode is None:
            return f"cannot answer: {name} missing: not configured"
        if mode["status"] != "ok":
            return f"cannot answer: {name} missing: {mode.get('reason', 'no reason given')}"
        if _get(mode, "success", "episodes") is None:
            return f"cannot answer: {name} missing its success measurement"
    return None


def _pct(rate: float) -> str:
    return f"{100 * rate:.1f}%"


def _points(delta: float) -> str:
    return f"{100 * delta:+.1f}"


def _detectable(comparison: dict) -> str:
    detectable = comparison["detectable_difference"]
    if detectable is None:
        return "this run has too few pairs to detect any difference at 80% power"
    return f"this run could detect a difference of {100 * detectable:.1f} points at 80% power"


def _outcomes(mode: dict, other: dict) -> dict[str, list[bool]]:
    """Outcomes per task of `mode`; ValueError naming the task where its seeds differ from
    `other`'s, since then the episodes do not pair."""
    tasks, others = mode["success"]["tasks"], other["success"]["tasks"]
    for task in tasks.keys() & others.keys():
        if tasks[task]["seeds"] != others[task]["seeds"]:
            raise ValueError(f"task {task}: the seeds differ, so the episodes do not pair")
    return {task: result["outcomes"] for task, result in tasks.items()}


def _compare_success(report: dict, a: str, b: str) -> dict:
    """The paired comparison of `a`'s success against `b`'s (`svam.eval.stats`) with a sentence in
    `text`; only `a`, `b` and `text` ('cannot compare: ...') when the episodes do not pair."""
    ma, mb = report["modes"][a], report["modes"][b]
    try:
        result = paired_comparison(_outcomes(ma, mb), _outcomes(mb, ma))
    except ValueError as error:
        return {"a": a, "b": b, "text": f"cannot compare {a} with {b}: {error}."}
    low, high = result["ci95"]
    conclusion = {
        "better": f"so {a} is better",
        "worse": f"so {a} is worse",
        "inconclusive": "which spans 0: inconclusive",
    }[result["verdict"]]
    n = result["pairs"]
    text = (
        f"{a} succeeds in {_pct(result['rate_a'])} of episodes "
        f"({result['both'] + result['a_only']}/{n}) against {_pct(result['rate_b'])} "
        f"({result['both'] + result['b_only']}/{n}) for {b} on the same episodes, "
        f"{result['a_only']} succeeding only with {a} and {result['b_only']} only with {b}: "
        f"a difference of {_points(result['difference'])} points, 95% CI "
        f"[{_points(low)}, {_points(high)}], exact McNemar p = {result['p_value']:.3g}, "
        f"{conclusion}; {_detectable(result)}."
    )
    return {"a": a, "b": b, **result, "text": text}


def _latencies(report: dict, a: str, b: str) -> tuple[float, float] | None:
    la = _get(report["modes"][a], "latency_ms", "median")
    lb = _get(report["modes"][b], "latency_ms", "median")
    return (la, lb) if la is not None and lb is not None and la > 0 and lb > 0 else None


def _shortcut_vs_onestep(report: dict) -> dict:
    question = "Does shortcut beat onestep (raw one-step features) at nearly the same latency?"
    missing = _unavailable(report, ["shortcut", "onestep"])
    if missing:
        return {"question": question, "text": missing}
    success = _compare_success(report, "shortcut", "onestep")
    latency = _latencies(report, "shortcut", "onestep")
    ratio = latency[0] / latency[1] if latency else None
    mse = [_get(report["modes"][name], "action", "mse") for name in ("shortcut", "onestep")]
    details = []
    if latency:
        details.append(
            f"its median latency is {ratio:.2f}x onestep's "
            f"({_ms(latency[0])} vs {_ms(latency[1])} ms)"
        )
    if None not in mse:
        details.append(f"its action MSE is {_num(mse[0])} vs {_num(mse[1])}")
    text = success["text"] + "".join(f" {d[0].upper()}{d[1:]}." for d in details)
    return {
        "question": question,
        "success": success,
        "latency_ratio": ratio,
        "foresight": "n/a: onestep has no foresight to compare",
        "action_mse": {
            "shortcut": mse[0],
            "onestep": mse[1],
            "difference": None if None in mse else mse[0] - mse[1],
        },
        "text": text,
    }


def _reference_mode(report: dict) -> str | None:
    """`multistep:N` for the teacher's full schedule N if it ran, else the largest K that ran."""
    ok = _ok_modes(report)
    full = f"multistep:{report['settings']['feature_steps']}"
    if full in ok:
        return full
    ks = {k: name for name in ok if (k := _multistep_k(name)) is not None}
    return ks[max(ks)] if ks else None


def _published_flops_ratio(report: dict, a: str, b: str) -> float | None:
    """Published-size FLOPs per step of `a` over `b`'s: the latency ratio a compute-bound GPU
    would see."""
    fa = _get(report["modes"][a], "flops_published", "total")
    fb = _get(report["modes"][b], "flops_published", "total")
    return fa / fb if fa and fb else None


def _shortcut_vs_multistep(report: dict) -> dict:
    question = "How far is shortcut from full multi-step foresight?"
    steps = report["settings"]["feature_steps"]
    full = f"multistep:{steps}"
    reference = _reference_mode(report)
    if reference is None:
        mode = report["modes"].get(full)
        why = mode.get("reason", "no reason given") if mode else "not configured"
        text = f"cannot answer: every multistep mode missing ({full}: {why})"
        return {"question": question, "text": text}
    missing = _unavailable(report, ["shortcut", reference])
    if missing:
        return {"question": question, "text": missing}
    success = _compare_success(report, "shortcut", reference)
    gaps, measured = {}, []
    for axis in FORESIGHT_AXES:
        mine = _get(report["modes"]["shortcut"], *axis.path)
        theirs = _get(report["modes"][reference], *axis.path)
        gaps[axis.key] = None if mine is None or theirs is None else mine - theirs
        if gaps[axis.key] is not None:
            measured.append(f"{gaps[axis.key]:+.3f} {axis.label}")
    latency = _latencies(report, reference, "shortcut")
    speedup = latency[0] / latency[1] if latency else None
    published = _published_flops_ratio(report, reference, "shortcut")
    against = reference
    if reference != full:
        against += f" (standing in for the full {steps}-step schedule, which was not evaluated)"
    details = [
        f"its foresight differs by {', '.join(measured)} (under the cache's noise)"
        if measured
        else "its foresight was not compared (not measured)"
    ]
    if latency:
        details.append(
            f"its median latency is {_ms(latency[1])} vs {_ms(latency[0])} ms, "
            f"a {_num(speedup)}x speed-up"
        )
    if published:
        details.append(f"at the published size it needs {_num(published)}x fewer FLOPs per step")
    text = f"{success['text']} Against {against}, {'; '.join(details)}."
    return {
        "question": question,
        "reference": reference,
        "feature_steps": steps,
        "success": success,
        "foresight_gap": gaps,
        "speedup": speedup,
        "published_flops_ratio": published,
        "text": text,
    }


def _vision_matters(report: dict) -> dict:
    """Every vision mode's success against the blind policy's (state and instruction only)."""
    question = "Do the tasks need vision (does any mode beat the blind policy)?"
    missing = _unavailable(report, [BLIND])
    if missing:
        return {"question": question, "text": missing}
    vision = [
        name
        for name, mode in _ok_modes(report).items()
        if name != BLIND and _get(mode, "success", "episodes") is not None
    ]
    comparisons = {name: _compare_success(report, name, BLIND) for name in vision}
    compared = {name: c for name, c in comparisons.items() if "verdict" in c}
    sentences = " ".join(c["text"] for c in comparisons.values())
    if not compared:
        why = "no vision mode has comparable success measurements"
        return {"question": question, "comparisons": comparisons, "text": f"cannot answer: {why}."}
    beat = [name for name, c in compared.items() if c["verdict"] == "better"]
    if beat:
        names = ", ".join(beat)
        lead = f"Yes: {names} beat{'s' if len(beat) == 1 else ''} the blind policy."
    else:
        detectable = [c["detectable_difference"] for c in compared.values()]
        undetected = (
            f" (a gain under {100 * max(detectable):.1f} points would go undetected at 80% power)"
            if None not in detectable
            else " (this run has too few pairs to detect any gain at 80% power)"
        )
        lead = f"{NO_VISION[0].upper()}{NO_VISION[1:]}{undetected}."
    return {
        "question": question,
        "needs_vision": bool(beat),
        "beats_blind": beat,
        "comparisons": comparisons,
        "text": f"{lead} {sentences}",
    }


# ---------------------------------------------------------------------------------------------
# Markdown


def _num(value: float) -> str:
    """Three significant digits, without exponent notation for large values."""
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def _ms(value: float) -> str:
    return f"{value:.1f}" if value >= 1 else f"{value:.3g}"


def _cell(value: Any, fmt=_num) -> str:
    return "—" if value is None else fmt(value)


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _success_cell(success: dict | None) -> str:
    if not success:
        return "—"
    low, high = _ci(success)
    return (
        f"{success['rate']:.2f} ({success['successes']}/{success['episodes']}, "
        f"{low:.2f}–{high:.2f})"
    )


def _skill(value: float) -> str:
    return f"{value:.2f}"


def _three(value: float) -> str:
    return f"{value:.3f}"


def _noise_cell(block: dict | None, path: tuple[str, ...], fmt=_three) -> str:
    """`cache (fresh)`: a foresight value under the cache's noise, under fresh noise beside it."""
    cache = _get(block, "cache_noise", *path)
    fresh = _get(block, "fresh_noise", *path)
    if fresh is None:
        return _cell(cache, fmt)
    return f"{_cell(cache, fmt)} ({fmt(fresh)})"


def _axis_format(axis: FidelityAxis):
    return _skill if axis.higher_is_better else _three


def headline_table(report: dict) -> str:
    """One row per configured mode: latency, compute, foresight skill and action fidelity, success;
    a last row for the teacher's sampling floor when it was measured."""
    header = [
        "mode",
        "latency median (p95), ms",
        "GFLOP/step (tiny)",
        "GFLOP/step (published size)",
        "semantic skill",
        "geometric skill",
        "depth AbsRel vs world",
        "action MSE",
        "success (k/n, 95% CI)",
    ]
    lines = [_row(header), _row(["---"] + ["---:"] * (len(header) - 1))]
    for name, mode in report["modes"].items():
        if mode["status"] != "ok":
            lines.append(_row([f"`{name}`", "missing"] + ["—"] * (len(header) - 2)))
            continue
        median, p95 = _get(mode, "latency_ms", "median"), _get(mode, "latency_ms", "p95")
        latency = "—" if median is None else f"{_ms(median)} ({_cell(p95, _ms)})"
        flops = _get(mode, "flops", "total")
        published = _get(mode, "flops_published", "total")
        if _has_no_foresight(mode):
            foresight = ["n/a"] * len(FORESIGHT_AXES)
        else:
            foresight = [
                _noise_cell(_get(mode, "foresight"), axis.path[2:], _axis_format(axis))
                for axis in FORESIGHT_AXES
            ]
        lines.append(
            _row(
                [
                    f"`{name}`",
                    latency,
                    _cell(None if flops is None else flops / 1e9),
                    _cell(None if published is None else published / 1e9),
                    *foresight,
                    _cell(_get(mode, "action", "mse")),
                    _success_cell(_get(mode, "success")),
                ]
            )
        )
    floor = report.get("sampling_floor")
    if floor:
        cells = [_cell(_get(floor, *axis.path[2:]), _axis_format(axis)) for axis in FORESIGHT_AXES]
        lines.append(_row([SAMPLING_FLOOR, "—", "—", "—", *cells, "—", "—"]))
    return "\n".join(lines)


def _setup_paragraph(report: dict) -> str:
    machine, settings = report["machine"], report["settings"]
    device = machine["device"] + (f" ({machine['device_name']})" if machine["device_name"] else "")
    threads = f"{machine['threads']} threads" if machine["threads"] else "default threads"
    seeds = settings["seeds"]
    seed_range = f"{min(seeds)}..{max(seeds)}" if seeds else "none"
    tasks = settings["tasks"]
    return (
        f"Run `{report['run']}`, created {report['created']}, on {machine['platform']} "
        f"({machine['processor']}), torch {machine['torch']}, device {device}, {threads}; a large "
        f"float32 matmul peaks at {machine['matmul_peak_flops'] / 1e9:.1f} GFLOP/s (machine "
        f"`{machine['fingerprint']}`, config `{report['config_fingerprint']}`). Each mode is evaluated on "
        f"the same {len(tasks) * len(seeds)} episodes: {len(tasks)} tasks ({', '.join(tasks)}) x "
        f"seeds {seed_range}, at most {settings['max_steps']} simulator steps"
        f"{_simulated_seconds(settings)}, executing the first "
        f"{settings['execute_actions']} actions of each chunk. Latency is over "
        f"{settings['latency_steps']} control steps at batch 1, foresight and action fidelity over "
        f"{settings['fidelity_clips']} {settings['split']} clips; the teacher's full schedule has "
        f"{settings['feature_steps']} steps.{_heads_sentence(report)}{_timing_sentence(report)}"
    )


HEAD_WORDS = {"ddpm": "DDIM steps (DDPM-trained)", "flow": "Euler steps (flow matching)"}


def _heads_sentence(report: dict) -> str:
    """Which action head each mode's policy samples with, e.g. 'a flow head, 2 Euler steps'."""
    heads = {
        (mode["action_head"]["type"], mode["action_head"]["steps"])
        for mode in _ok_modes(report).values()
        if mode.get("action_head")
    }
    if not heads:
        return ""
    described = "; ".join(
        f"{kind} head, {steps} {HEAD_WORDS[kind]}" for kind, steps in sorted(heads)
    )
    return f" Action head: {described}."


def _simulated_seconds(settings: dict) -> str:
    period = settings.get("control_period_ms")
    return f" ({settings['max_steps'] * period / 1000:g} s simulated)" if period else ""


TIMING_WORDS = {
    "sync": "the world moves on while the policy thinks and the robot holds its last command",
    "async": "the world moves on while the policy thinks, the next chunk computed while the "
    "current one executes and its stale first actions skipped",
}


def _timing_sentence(report: dict) -> str:
    """How success was measured in time: nothing under wait (the world waits for the policy)."""
    timing = report["settings"].get("timing", "wait")
    if timing == "wait":
        return " The world waits while the policy thinks (eval.timing=wait)."
    delays, source = [], None
    for name, mode in _ok_modes(report).items():
        entry = mode.get("timing") or {}
        if "delay_steps" in entry:
            delays.append(f"`{name}` {_ms(entry['ms'])} ms = {entry['delay_steps']}")
            source = entry["source"]
    period = report["settings"]["control_period_ms"]
    return (
        f" Success is under `{timing}` timing: {TIMING_WORDS[timing]}; a control step spans its "
        f"latency ({source}) over the {period:g} ms control period, rounded up, in simulator "
        f"steps: {', '.join(delays)}."
    )


def _flops_table(report: dict, key: str) -> list[str]:
    """GFLOP per control step by part (`—`: the mode has no such part) from `flops` (with the
    achieved rate and % of peak, as measured) or `flops_published` (counted, not run)."""
    modes = {name: mode for name, mode in _ok_modes(report).items() if _get(mode, key)}
    if not modes:
        return ["Not counted."]
    measured = key == "flops"
    parts = list(dict.fromkeys(part for mode in modes.values() for part in mode[key]["parts"]))
    extra = ["achieved GFLOP/s", "% of peak"] if measured else []
    lines = [
        _row(["mode", *parts, "total", *extra]),
        _row(["---"] + ["---:"] * (len(parts) + 1 + len(extra))),
    ]
    for name, mode in modes.items():
        flops = mode[key]
        cells = [
            f"`{name}`",
            *(_cell(_get(flops, "parts", part), lambda v: _num(v / 1e9)) for part in parts),
            _num(flops["total"] / 1e9),
        ]
        if measured:
            cells += [
                _cell(_get(mode, "achieved_flops_per_s"), lambda v: _num(v / 1e9)),
                _cell(_get(mode, "peak_fraction"), lambda v: f"{_num(100 * v)}%"),
            ]
        lines.append(_row(cells))
    return lines


def _foresight_modes(report: dict) -> dict[str, dict]:
    return {
        name: mode["foresight"]
        for name, mode in _ok_modes(report).items()
        if _get(mode, "foresight") and not _has_no_foresight(mode)
    }


def _fidelity_tables(report: dict) -> list[str]:
    """Per branch (semantic, geometric, depth): every foresight mode's numbers, `cache (fresh)`,
    and the sampling floor's (fresh noise only)."""
    modes, floor = _foresight_modes(report), report.get("sampling_floor")
    if not modes and not floor:
        return ["No foresight was measured."]
    columns = (
        ("skill", "skill", _skill),
        ("NMSE", "nmse", _num),
        ("centred cosine", "centred_cosine", _three),
    )
    depth = [
        (f"{stat} vs {against}", f"depth_{against}", key, fmt)
        for against in ("teacher", "world")
        for stat, key, fmt in (("AbsRel", "abs_rel", _three), ("skill", "skill", _skill))
    ]
    lines = []
    for branch in ("semantic", "geometric"):
        lines += [
            f"**{branch}**",
            "",
            _row(["mode", *(label for label, _, _ in columns)]),
            _row(["---"] + ["---:"] * len(columns)),
        ]
        lines += [
            _row([f"`{name}`", *(_noise_cell(f, (branch, key), fmt) for _, key, fmt in columns)])
            for name, f in modes.items()
        ]
        if floor:
            cells = [_cell(_get(floor, branch, key), fmt) for _, key, fmt in columns]
            lines.append(_row([SAMPLING_FLOOR, *cells]))
        lines.append("")
    lines += [
        "**depth** (vs teacher: Depth Anything 3 on the teacher's N-step frames; vs world: the "
        "simulator's metric depth of the real future frames)",
        "",
        _row(["mode", *(label for label, _, _, _ in depth)]),
        _row(["---"] + ["---:"] * len(depth)),
    ]
    lines += [
        _row([f"`{name}`", *(_noise_cell(f, (b, k), fmt) for _, b, k, fmt in depth)])
        for name, f in modes.items()
    ]
    if floor:
        lines.append(
            _row([SAMPLING_FLOOR, *(_cell(_get(floor, b, k), fmt) for _, b, k, fmt in depth)])
        )
    clips = sorted({f["clips"] for f in modes.values() if f.get("clips") is not None})
    if clips:
        lines += ["", f"Over {', '.join(map(str, clips))} {report['settings']['split']} clips."]
    return lines


def _comparison_table(report: dict) -> list[str]:
    comparisons = report["comparisons"]
    if not comparisons:
        return ["No two modes could be compared."]
    header = [
        "comparison",
        "pairs",
        "a only",
        "b only",
        "difference, points",
        "95% CI",
        "exact McNemar p",
        "detectable at 80% power, points",
        "verdict",
    ]
    lines = [_row(header), _row(["---"] + ["---:"] * (len(header) - 2) + ["---"])]
    for c in comparisons:
        label = f"`{c['a']}` vs `{c['b']}`"
        if "verdict" not in c:
            lines.append(_row([label, *["—"] * (len(header) - 2), c["text"]]))
            continue
        low, high = c["ci95"]
        detectable = c["detectable_difference"]
        lines.append(
            _row(
                [
                    label,
                    str(c["pairs"]),
                    str(c["a_only"]),
                    str(c["b_only"]),
                    _points(c["difference"]),
                    f"[{_points(low)}, {_points(high)}]",
                    f"{c['p_value']:.3g}",
                    "none" if detectable is None else f"{100 * detectable:.1f}",
                    c["verdict"],
                ]
            )
        )
    return lines


def _published_note(report: dict) -> list[str]:
    """Shortcut against the full multistep: the published-size FLOP ratio beside the measured
    (tiny) latency ratio."""
    answer = report["answers"]["shortcut_vs_multistep"]
    published, speedup = answer.get("published_flops_ratio"), answer.get("speedup")
    if published is None:
        return [
            "Not available: the published-size FLOPs of shortcut or the multistep reference "
            "were not counted."
        ]
    tiny = f"{_num(speedup)}x" if speedup is not None else "not measured"
    return [
        f"`{answer['reference']}` needs {_num(published)}x the FLOPs of `shortcut` per control "
        f"step at the published size (configs/svd-xt.yaml): the latency ratio a GPU user would see "
        f"when compute bound. The measured latency ratio at the tiny size is {tiny}."
    ]


def _teacher_skill(report: dict) -> list[str]:
    """What the distilled foresight can at best be worth: the teacher's N-step prediction against
    copying the current frame (train-teacher's scoring on test clips)."""
    skill = report.get("teacher_skill")
    if not skill:
        return [
            "Not measured: the teacher records no foresight skill (trained before svam scored it, "
            "with train_teacher.skill_clips=0, or not the teacher that made the cache)."
        ]
    from svam.teachers.skill import skill_table

    return [
        "The teacher's N-step prediction of each future frame against holding the current frame "
        "still, on test clips: foresight distilled from a teacher that does not beat copying is "
        '"nothing moves".',
        "",
        skill_table(skill),
    ]


def _success_table(report: dict) -> list[str]:
    modes = {name: mode for name, mode in _ok_modes(report).items() if _get(mode, "success")}
    if not modes:
        return ["No success rates were measured."]
    lines = [
        _row(["task", *(f"`{name}`" for name in modes)]),
        _row(["---"] + ["---:"] * len(modes)),
    ]
    for task in report["settings"]["tasks"]:
        cells = []
        for mode in modes.values():
            result = mode["success"]["tasks"].get(task)
            cells.append(
                f"{result['rate']:.2f} ({result['successes']}/{result['episodes']})"
                if result
                else "—"
            )
        lines.append(_row([task, *cells]))
    lines.append(_row(["**overall**", *(_success_cell(m["success"]) for m in modes.values())]))
    return lines


def _about(name: str, mode: dict) -> str:
    kind = f" ({mode['kind']})" if mode.get("kind") else ""
    return f"- `{name}`{kind}: {mode['about']} (policy `{mode['policy']}`)"


def markdown(report: dict) -> str:
    """`report.md` of a completed report (see `complete`)."""
    modes = report["modes"]
    lines = [
        f"# Latency–fidelity report: `{report['run']}`",
        "",
        _setup_paragraph(report),
        "",
        "## Headline",
        "",
        headline_table(report),
        "",
        'Foresight is skill against "nothing moves" (repeating the current frame\'s tokens; 0: no '
        "better than a static world, 1: perfect) under the cache's own noise keys, with fresh noise "
        "in parentheses; the sampling floor is the teacher's own N-step foresight regenerated with "
        "fresh noise, the best any foresight can do. `n/a`: the mode has no foresight, `—`: not "
        "measured.",
        "",
        f"![latency vs fidelity]({LATENCY_FIDELITY_PNG})",
        "",
        "## What each mode is",
        "",
        *(_about(name, mode) for name, mode in modes.items()),
        "",
        "## Compute per control step (GFLOP)",
        "",
        "As measured (tiny model):",
        "",
        *_flops_table(report, "flops"),
        "",
        "At the published size (configs/svd-xt.yaml, counted on the meta device):",
        "",
        *_flops_table(report, "flops_published"),
        "",
        "### Latency ratio at the published size",
        "",
        *_published_note(report),
        "",
        "## Foresight fidelity",
        "",
        "Each cell: under the cache's noise (under fresh noise).",
        "",
        *_fidelity_tables(report),
        "",
        "## The teacher's own foresight",
        "",
        *_teacher_skill(report),
        "",
        "## Success per task",
        "",
        *_success_table(report),
        "",
        f"![success per task]({SUCCESS_PER_TASK_PNG})",
        "",
        "## Answers",
        "",
    ]
    for answer in report["answers"].values():
        lines += [f"**{answer['question']}** {answer['text']}", ""]
    lines += [
        "## Paired comparisons",
        "",
        "Every mode runs the same episodes (task, seed, noise key), so success is compared pair by "
        "pair: a only / b only count the discordant pairs; the interval is Tango's score interval "
        "for paired proportions, the p-value the exact McNemar test (see `svam.eval.stats`).",
        "",
        *_comparison_table(report),
        "",
        "## Pareto fronts (latency vs each fidelity axis)",
        "",
    ]
    for axis in FIDELITY_AXES:
        front = report["pareto"][axis.key]
        names = " → ".join(f"`{name}`" for name in front) if front else "no mode measured"
        lines.append(f"- {axis.label} ({axis.sense}): {names}")
    lines += ["", "## Missing modes", ""]
    missing = [(name, mode) for name, mode in modes.items() if mode["status"] != "ok"]
    lines += [f"- `{name}`: {mode.get('reason', 'no reason given')}" for name, mode in missing]
    if not missing:
        lines.append("None: every configured mode was evaluated.")
    if report.get("notes"):
        lines += ["", "## Notes", "", *(f"- {note}" for note in report["notes"])]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(report: dict) -> dict[str, Any]:
    """One colour per mode, by configured position, so both figures agree."""
    cmap = _pyplot().get_cmap("tab10")
    return {name: cmap(i % 10) for i, name in enumerate(report["modes"])}


def _placeholder(message: str):
    fig, ax = _pyplot().subplots(figsize=(5, 2), dpi=DPI)
    ax.text(0.5, 0.5, message, ha="center", va="center")
    ax.set_axis_off()
    return fig


def _latency_fidelity_figure(report: dict):
    panels = [(axis, pts) for axis in FIDELITY_AXES if (pts := _axis_points(report, axis))]
    if not panels:
        return _placeholder("no mode has both a latency and a fidelity value")
    colors, ok = _colors(report), _ok_modes(report)
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = _pyplot().subplots(
        nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), dpi=DPI, squeeze=False
    )
    for ax, (axis, points) in zip(axes.flat, panels, strict=False):
        for name, (x, y) in points.items():
            yerr = None
            if axis.key == "success_rate":
                low, high = _ci(ok[name]["success"])
                yerr = [[max(0.0, y - low)], [max(0.0, high - y)]]
            ax.errorbar(x, y, yerr=yerr, fmt="o", color=colors[name], capsize=3)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        names = list(points)
        front = pareto_front([points[name] for name in names], axis.higher_is_better)
        xs, ys = zip(*(points[names[i]] for i in front), strict=True)
        ax.step(
            xs, ys, where="post", color="0.4", linestyle="--", linewidth=1, label="Pareto front"
        )
        ax.scatter(xs, ys, s=140, facecolors="none", edgecolors="black", zorder=3)
        ax.set_xscale("log")
        ax.set_xlabel("latency median, ms (log scale)")
        ax.set_ylabel(f"{axis.label} ({axis.sense})")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"latency vs fidelity: {report['run']}")
    fig.tight_layout()
    return fig


def _success_figure(report: dict):
    modes = {name: mode for name, mode in _ok_modes(report).items() if _get(mode, "success")}
    if not modes:
        return _placeholder("no success rates were measured")
    colors, tasks = _colors(report), report["settings"]["tasks"]
    groups = np.arange(len(tasks) + 1)
    width = 0.8 / len(modes)
    fig, ax = _pyplot().subplots(
        figsize=(min(40.0, max(5.0, 0.3 * len(groups) * (len(modes) + 1))), 3.6), dpi=DPI
    )
    for i, (name, mode) in enumerate(modes.items()):
        success = mode["success"]
        rates = [_get(success, "tasks", task, "rate") for task in tasks] + [success["rate"]]
        xs = groups + (i - (len(modes) - 1) / 2) * width
        ax.bar(
            xs, [np.nan if r is None else r for r in rates], width, label=name, color=colors[name]
        )
        low, high = _ci(success)
        yerr = [[max(0.0, success["rate"] - low)], [max(0.0, high - success["rate"])]]
        ax.errorbar(xs[-1], success["rate"], yerr=yerr, fmt="none", ecolor="black", capsize=3)
    ax.set_xticks(groups, [*tasks, "overall"], rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate (overall: 95% CI)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(f"success per task: {report['run']}")
    fig.tight_layout()
    return fig


def _save(fig, path: Path) -> None:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
        _pyplot().close(fig)


def plot(report: dict, out_dir: Path) -> list[Path]:
    """Write `latency_fidelity.png` and `success_per_task.png` into `out_dir`; their paths."""
    out_dir = Path(out_dir)
    paths = [out_dir / LATENCY_FIDELITY_PNG, out_dir / SUCCESS_PER_TASK_PNG]
    _save(_latency_fidelity_figure(report), paths[0])
    _save(_success_figure(report), paths[1])
    return paths


# ---------------------------------------------------------------------------------------------
# TensorBoard and files


def _scalars(mode: dict) -> dict[str, float]:
    flops = _get(mode, "flops", "total")
    published = _get(mode, "flops_published", "total")
    values = {
        "latency_ms_median": _get(mode, "latency_ms", "median"),
        "latency_ms_p95": _get(mode, "latency_ms", "p95"),
        "gflop_per_step": None if flops is None else flops / 1e9,
        "gflop_per_step_published": None if published is None else published / 1e9,
        "peak_fraction": _get(mode, "peak_fraction"),
        **{axis.key: _get(mode, *axis.path) for axis in FIDELITY_AXES},
        **{f"{axis.key}_fresh": _get(mode, *axis.fresh_path) for axis in FORESIGHT_AXES},
    }
    return {key: float(value) for key, value in values.items() if value is not None}


def log_tensorboard(report: dict, logdir: Path) -> None:
    """Scalars `eval/<mode>/<name>` per ok mode (':' in mode names becomes '-'), both figures and
    the markdown report."""
    from torch.utils.tensorboard import SummaryWriter

    report = complete(report)
    with SummaryWriter(log_dir=str(logdir)) as writer:
        for name, mode in _ok_modes(report).items():
            tag = name.replace(":", "-")
            for key, value in _scalars(mode).items():
                writer.add_scalar(f"eval/{tag}/{key}", value)
        writer.add_figure("eval/latency_fidelity", _latency_fidelity_figure(report))
        writer.add_figure("eval/success_per_task", _success_figure(report))
        writer.add_text("eval/report", markdown(report))


def _json_safe(value: Any) -> Any:
    """`value` with NaN and infinities as None: strict JSON has no spelling for them."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_report(report: dict, out_dir: Path, tensorboard_dir: Path | None = None) -> Path:
    """Complete `report` and write `report.json`, `report.md` and the figures into `out_dir` (and
    TensorBoard logs into `tensorboard_dir` if given); the path of `report.md`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    completed = complete(report)
    payload = json.dumps(_json_safe(completed), indent=2, allow_nan=False)
    write_text_atomic(out_dir / "report.json", payload + "\n")
    write_text_atomic(out_dir / "report.md", markdown(completed))
    plot(completed, out_dir)
    if tensorboard_dir is not None:
        log_tensorboard(completed, tensorboard_dir)
    return out_dir / "report.md"
