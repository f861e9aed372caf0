"""The latency–fidelity report: intervals, Pareto fronts, answers and the files it writes."""

from __future__ import annotations

import json

import pytest

from svam.eval.report import (
    complete,
    difference_interval,
    headline_table,
    pareto_front,
    wilson_interval,
    write_report,
)

TASKS = ["reach-v3", "push-v3"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def mode_entry(
    name: str, successes: int, latency: float, cosine: float | None, episodes: int = 40
) -> tuple[str, dict]:
    """An evaluated mode; `cosine` None means no foresight (onestep)."""
    half = episodes // 2
    first = min(successes, half)
    per_task = [(first, half), (successes - first, episodes - half)]
    foresight = None
    if cosine is not None:
        foresight = {
            "semantic_cosine": cosine,
            "geometric_cosine": cosine - 0.05,
            "depth_abs_rel": 1 - cosine,
            "clips": 16,
        }
    flops = int(latency * 1e7)
    return name, {
        "status": "ok",
        "about": f"{name}: a test mode",
        "policy": f"runs/test/policy/{name.replace(':', '-')}",
        "latency_ms": {"median": latency, "p95": latency * 1.2, "mean": latency * 1.1, "count": 50},
        "flops": {"total": flops, "parts": {"unet": flops - 1000, "action_head": 1000}},
        "achieved_flops_per_s": flops / (latency / 1000),
        "peak_fraction": flops / (latency / 1000) / 1e11,
        "foresight": foresight,
        "action": {"mse": 0.01 + latency / 1e4, "clips": 16},
        "success": {
            "episodes": episodes,
            "successes": successes,
            "rate": successes / episodes,
            "tasks": {
                task: {"episodes": n, "successes": k, "rate": k / n}
                for task, (k, n) in zip(TASKS, per_task, strict=True)
            },
        },
        "videos": [],
    }


def missing_entry(name: str) -> tuple[str, dict]:
    return name, {
        "status": "missing",
        "reason": f"no policy at runs/test/policy/{name} (run `svam train-policy`)",
        "about": f"{name}: a test mode",
        "policy": f"runs/test/policy/{name}",
    }


def make_report(*modes: tuple[str, dict]) -> dict:
    return {
        "run": "test",
        "created": "2026-11-22T10:00:00Z",
        "machine": {
            "platform": "Linux",
            "processor": "x86_64",
            "torch": "2.4.0",
            "device": "cpu",
            "device_name": "",
            "threads": 2,
            "matmul_peak_flops": 1e11,
            "fingerprint": "abc123",
        },
        "config_fingerprint": "def456",
        "settings": {
            "tasks": TASKS,
            "seeds": list(range(100, 120)),
            "max_steps": 150,
            "execute_actions": 4,
            "latency_steps": 50,
            "fidelity_clips": 16,
            "feature_steps": 10,
        },
        "modes": dict(modes),
    }


def full_report() -> dict:
    report = make_report(
        mode_entry("onestep", 20, 10.0, None),
        mode_entry("shortcut", 30, 11.0, 0.85),
        mode_entry("partial:0.5", 31, 40.0, 0.88),
        mode_entry("multistep:3", 29, 35.0, 0.80),
        mode_entry("multistep:10", 33, 110.0, 0.95),
        missing_entry("multistep:25"),
    )
    report["modes"]["multistep:3"]["foresight"]["depth_abs_rel"] = float("nan")
    return report


def test_wilson_interval_known_values():
    assert wilson_interval(22, 40) == pytest.approx((0.399, 0.692), abs=1e-3)
    low, high = wilson_interval(0, 10)
    assert low == 0 and high == pytest.approx(0.2775, abs=1e-3)
    low, high = wilson_interval(10, 10)
    assert high == 1 and low == pytest.approx(0.7225, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_difference_interval_newcombe_example():
    assert difference_interval(56, 70, 48, 80) == pytest.approx((0.0524, 0.3339), abs=5e-4)
    for k1, n1, k2, n2 in [(56, 70, 48, 80), (0, 10, 10, 10), (3, 7, 3, 7), (40, 40, 1, 40)]:
        low, high = difference_interval(k1, n1, k2, n2)
        assert -1 <= low <= k1 / n1 - k2 / n2 <= high <= 1


def test_pareto_front_both_senses_with_ties():
    points = [(1.0, 0.5), (2.0, 0.7), (2.0, 0.6), (3.0, 0.7), (0.5, 0.2), (1.0, 0.5)]
    # (2, 0.6) and (3, 0.7) are dominated by (2, 0.7); the two (1, 0.5) points tie and both stay.
    assert pareto_front(points, higher_is_better=True) == [4, 0, 5, 1]
    assert pareto_front(points, higher_is_better=False) == [4]
    errors = [(1.0, 0.3), (2.0, 0.1), (3.0, 0.1), (0.5, 0.5)]
    assert pareto_front(errors, higher_is_better=False) == [3, 0, 1]
    assert pareto_front([], higher_is_better=True) == []


def test_write_report_keeps_every_mode_and_writes_all_files(tmp_path):
    report = full_report()
    md_path = write_report(report, tmp_path / "eval", tensorboard_dir=tmp_path / "tb")

    def no_nan(constant):
        raise AssertionError(f"report.json contains {constant}")

    data = json.loads((tmp_path / "eval" / "report.json").read_text(), parse_constant=no_nan)
    assert list(data["modes"]) == list(report["modes"])
    missing = data["modes"]["multistep:25"]
    assert missing["status"] == "missing" and "train-policy" in missing["reason"]
    assert data["modes"]["multistep:3"]["foresight"]["depth_abs_rel"] is None
    assert data["modes"]["shortcut"]["success"]["ci95"] == pytest.approx(
        list(wilson_interval(30, 40))
    )
    assert "ci95" in data["modes"]["shortcut"]["success"]["tasks"]["reach-v3"]
    assert data["pareto"]["success_rate"] == ["onestep", "shortcut", "partial:0.5", "multistep:10"]
    assert data["answers"]["shortcut_vs_multistep"]["reference"] == "multistep:10"

    text = md_path.read_text()
    assert md_path == tmp_path / "eval" / "report.md"
    for name in report["modes"]:
        assert name in text
    assert "missing" in text and missing["reason"] in text
    for png in ("latency_fidelity.png", "success_per_task.png"):
        path = tmp_path / "eval" / png
        assert png in text
        assert path.stat().st_size > 0 and path.read_bytes()[:8] == PNG_SIGNATURE
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert not list((tmp_path / "eval").glob("*.tmp"))


def test_shortcut_clearly_better_than_onestep():
    report = make_report(
        mode_entry("onestep", 5, 10.0, None),
        mode_entry("shortcut", 38, 10.5, 0.9),
    )
    answer = complete(report)["answers"]["shortcut_vs_onestep"]
    assert answer["success"]["verdict"] == "better"
    assert answer["success"]["ci95"][0] > 0
    assert answer["latency_ratio"] == pytest.approx(1.05)
    assert "better" in answer["text"]

    report["modes"]["shortcut"], report["modes"]["onestep"] = (
        report["modes"]["onestep"],
        report["modes"]["shortcut"],
    )
    assert complete(report)["answers"]["shortcut_vs_onestep"]["success"]["verdict"] == "worse"


def test_overlapping_counts_are_inconclusive():
    report = make_report(
        mode_entry("onestep", 20, 10.0, None),
        mode_entry("shortcut", 23, 10.5, 0.9),
        mode_entry("multistep:10", 25, 100.0, 0.95),
    )
    answers = complete(report)["answers"]
    for answer in answers.values():
        assert answer["success"]["verdict"] == "no significant difference with 40 episodes each"
        assert "inconclusive" in answer["text"]
    assert answers["shortcut_vs_multistep"]["speedup"] == pytest.approx(100 / 10.5)
    gap = answers["shortcut_vs_multistep"]["foresight_gap"]["semantic_cosine"]
    assert gap == pytest.approx(-0.05)


def test_missing_modes_cannot_be_answered():
    report = make_report(
        mode_entry("shortcut", 23, 10.5, 0.9),
        missing_entry("multistep:10"),
    )
    answers = complete(report)["answers"]
    assert answers["shortcut_vs_multistep"]["text"].startswith("cannot answer")
    assert "multistep:10" in answers["shortcut_vs_multistep"]["text"]
    assert answers["shortcut_vs_onestep"]["text"].startswith("cannot answer: onestep missing")


def test_largest_multistep_stands_in_for_the_full_schedule():
    report = make_report(
        mode_entry("shortcut", 23, 10.5, 0.9),
        mode_entry("multistep:3", 25, 30.0, 0.92),
        mode_entry("multistep:5", 25, 50.0, 0.93),
        missing_entry("multistep:10"),
    )
    answer = complete(report)["answers"]["shortcut_vs_multistep"]
    assert answer["reference"] == "multistep:5"
    assert "full 10-step schedule" in answer["text"]


def test_headline_table_has_a_row_per_mode():
    report = full_report()
    lines = headline_table(report).splitlines()
    assert len(lines) == 2 + len(report["modes"])
    rows = {line.split("|")[1].strip().strip("`"): line for line in lines[2:]}
    assert list(rows) == list(report["modes"])
    assert rows["onestep"].count("n/a") == 3
    assert "n/a" not in rows["shortcut"]
    assert "missing" in rows["multistep:25"]
