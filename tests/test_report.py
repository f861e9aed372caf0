"""The latency–fidelity report: intervals, paired answers, tables and the files it writes."""

from __future__ import annotations

import json

import pytest

from svam.eval.report import (
    NO_VISION,
    SAMPLING_FLOOR,
    complete,
    headline_table,
    markdown,
    pareto_front,
    wilson_interval,
    write_report,
)

TASKS = ["reach-v3", "push-v3"]
EPISODES = 40
SEEDS = list(range(100, 100 + EPISODES // len(TASKS)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def branch(skill: float) -> dict:
    frames = [skill - 0.1, skill + 0.1]
    return {
        "skill": skill,
        "nmse": 1 - skill,
        "centred_cosine": skill / 2,
        "cosine": 0.9 + skill / 10,
        "per_frame": {"skill": frames, "nmse": frames, "centred_cosine": frames, "cosine": frames},
    }


def depth(abs_rel: float) -> dict:
    return {
        "abs_rel": abs_rel,
        "skill": 1 - abs_rel,
        "per_frame": {"abs_rel": [abs_rel], "skill": [0]},
    }


def block(skill: float) -> dict:
    return {
        "semantic": branch(skill),
        "geometric": branch(skill - 0.05),
        "depth_teacher": depth(0.5 - skill / 4),
        "depth_world": depth(0.6 - skill / 4),
    }


def kind_of(name: str) -> str:
    if name in ("onestep", "blind"):
        return name
    return "multistep" if name.startswith("multistep") else "shortcut"


def mode_entry(
    name: str, successes: int, latency: float, skill: float | None = None
) -> tuple[str, dict]:
    """An evaluated mode: the first `successes` of the 40 episodes succeed (the first 20 are
    reach-v3's), so two modes' episodes pair up with only one-way discordance; `skill` None: no
    foresight."""
    outcomes = [i < successes for i in range(EPISODES)]
    per_task = {
        task: outcomes[i * len(SEEDS) : (i + 1) * len(SEEDS)] for i, task in enumerate(TASKS)
    }
    flops = int(latency * 1e7)
    foresight = None
    if skill is not None:
        foresight = {"clips": 16, "cache_noise": block(skill), "fresh_noise": block(skill - 0.05)}
    return name, {
        "status": "ok",
        "kind": kind_of(name),
        "about": f"{name}: a test mode",
        "policy": f"runs/test/policy/{name.replace(':', '-')}",
        "latency_ms": {"median": latency, "p95": latency * 1.2, "mean": latency * 1.1, "count": 50},
        "flops": {"total": flops, "parts": {"unet": flops - 1000, "action_head": 1000}},
        "flops_published": {"total": flops * 1000, "parts": {"unet": flops * 1000}},
        "achieved_flops_per_s": flops / (latency / 1000),
        "peak_fraction": flops / (latency / 1000) / 1e11,
        "foresight": foresight,
        "action": {"mse": 0.01 + latency / 1e4, "clips": 16},
        "success": {
            "episodes": EPISODES,
            "successes": successes,
            "rate": successes / EPISODES,
            "tasks": {
                task: {
                    "episodes": len(result),
                    "successes": sum(result),
                    "rate": sum(result) / len(result),
                    "seeds": SEEDS,
                    "outcomes": result,
                    "mean_steps": 80.0,
                }
                for task, result in per_task.items()
            },
        },
        "videos": [],
    }


def missing_entry(name: str) -> tuple[str, dict]:
    return name, {
        "status": "missing",
        "kind": kind_of(name),
        "reason": f"no policy at runs/test/policy/{name} (run `svam train-policy`)",
        "about": f"{name}: a test mode",
        "policy": f"runs/test/policy/{name}",
    }


def make_report(*modes: tuple[str, dict]) -> dict:
    return {
        "run": "test",
        "created": "2026-11-22T10:00:00Z",
        "key": "k",
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
            "seeds": SEEDS,
            "max_steps": 150,
            "execute_actions": 4,
            "latency_steps": 50,
            "fidelity_clips": 16,
            "feature_steps": 10,
            "split": "test",
        },
        "sampling_floor": None,
        "modes": dict(modes),
        "notes": [],
    }


def full_report() -> dict:
    report = make_report(
        mode_entry("onestep", 20, 10.0),
        mode_entry("shortcut", 30, 11.0, 0.85),
        mode_entry("partial:0.5", 31, 40.0, 0.88),
        mode_entry("multistep:3", 29, 35.0, 0.80),
        mode_entry("multistep:10", 33, 110.0, 0.95),
        mode_entry("blind", 18, 5.0),
        missing_entry("multistep:25"),
    )
    report["modes"]["multistep:3"]["foresight"]["cache_noise"]["depth_world"]["abs_rel"] = float(
        "nan"
    )
    report["sampling_floor"] = block(0.97)
    return report


def test_wilson_interval_known_values():
    assert wilson_interval(22, 40) == pytest.approx((0.399, 0.692), abs=1e-3)
    low, high = wilson_interval(0, 10)
    assert low == 0 and high == pytest.approx(0.2775, abs=1e-3)
    low, high = wilson_interval(10, 10)
    assert high == 1 and low == pytest.approx(0.7225, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)


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
    depth_world = data["modes"]["multistep:3"]["foresight"]["cache_noise"]["depth_world"]
    assert depth_world["abs_rel"] is None
    assert data["modes"]["shortcut"]["success"]["ci95"] == pytest.approx(
        list(wilson_interval(30, 40))
    )
    assert "ci95" in data["modes"]["shortcut"]["success"]["tasks"]["reach-v3"]
    assert data["pareto"]["success_rate"] == [
        "blind",
        "onestep",
        "shortcut",
        "partial:0.5",
        "multistep:10",
    ]
    assert data["answers"]["shortcut_vs_multistep"]["reference"] == "multistep:10"
    pairs = [(c["a"], c["b"]) for c in data["comparisons"]]
    assert pairs[:2] == [("shortcut", "onestep"), ("shortcut", "multistep:10")]
    assert ("onestep", "blind") in pairs and ("multistep:10", "blind") in pairs
    assert ("blind", "blind") not in pairs and len(pairs) == 2 + 5
    for comparison in data["comparisons"]:
        assert comparison["pairs"] == EPISODES and comparison["detectable_difference"] > 0

    text = md_path.read_text()
    assert md_path == tmp_path / "eval" / "report.md"
    for name in report["modes"]:
        assert name in text
    assert "missing" in text and missing["reason"] in text
    for section in ("## Foresight fidelity", "## Paired comparisons", "published size"):
        assert section in text
    assert SAMPLING_FLOOR in text and "could detect a difference of" in text
    for png in ("latency_fidelity.png", "success_per_task.png"):
        path = tmp_path / "eval" / png
        assert png in text
        assert path.stat().st_size > 0 and path.read_bytes()[:8] == PNG_SIGNATURE
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert not list((tmp_path / "eval").glob("*.tmp"))


def test_shortcut_clearly_better_than_onestep():
    report = make_report(mode_entry("onestep", 5, 10.0), mode_entry("shortcut", 38, 10.5, 0.9))
    answer = complete(report)["answers"]["shortcut_vs_onestep"]
    success = answer["success"]
    assert success["verdict"] == "better" and success["ci95"][0] > 0
    assert (success["a_only"], success["b_only"], success["both"]) == (33, 0, 5)
    assert answer["latency_ratio"] == pytest.approx(1.05)
    assert "better" in answer["text"] and "at 80% power" in answer["text"]

    report["modes"]["shortcut"], report["modes"]["onestep"] = (
        report["modes"]["onestep"],
        report["modes"]["shortcut"],
    )
    assert complete(report)["answers"]["shortcut_vs_onestep"]["success"]["verdict"] == "worse"


def test_pairing_finds_what_independent_samples_would_miss():
    # 30/40 against 22/40: Newcombe's unpaired interval spans 0, but all 8 discordant pairs go
    # shortcut's way (exact McNemar p = 2/256).
    report = make_report(mode_entry("onestep", 22, 10.0), mode_entry("shortcut", 30, 10.5, 0.9))
    success = complete(report)["answers"]["shortcut_vs_onestep"]["success"]
    assert success["p_value"] == pytest.approx(2 / 256)
    assert success["verdict"] == "better" and success["difference"] == pytest.approx(0.2)


def test_overlapping_counts_are_inconclusive_with_their_interval():
    report = make_report(
        mode_entry("onestep", 20, 10.0),
        mode_entry("shortcut", 23, 10.5, 0.9),
        mode_entry("multistep:10", 25, 100.0, 0.95),
    )
    answers = complete(report)["answers"]
    for key in ("shortcut_vs_onestep", "shortcut_vs_multistep"):
        success = answers[key]["success"]
        low, high = success["ci95"]
        assert success["verdict"] == "inconclusive" and low < 0 < high
        assert "inconclusive" in answers[key]["text"] and "95% CI [" in answers[key]["text"]
        assert "could detect a difference of" in answers[key]["text"]
    multistep = answers["shortcut_vs_multistep"]
    assert multistep["speedup"] == pytest.approx(100 / 10.5)
    assert multistep["published_flops_ratio"] == pytest.approx(100 / 10.5, rel=1e-6)
    assert multistep["foresight_gap"]["semantic_skill"] == pytest.approx(-0.05)


def test_blind_matching_the_vision_modes_gives_no_evidence_vision_is_needed():
    report = make_report(
        mode_entry("onestep", 20, 10.0),
        mode_entry("shortcut", 22, 10.5, 0.9),
        mode_entry("blind", 21, 5.0),
    )
    answer = complete(report)["answers"]["vision_matters"]
    assert answer["needs_vision"] is False and answer["beats_blind"] == []
    assert list(answer["comparisons"]) == ["onestep", "shortcut"]
    assert answer["text"].lower().startswith(NO_VISION)
    assert answer["text"].count("could detect a difference of") == 2
    largest = max(c["detectable_difference"] for c in answer["comparisons"].values())
    assert f"a gain under {100 * largest:.1f} points would go undetected" in answer["text"]

    report["modes"]["blind"] = mode_entry("blind", 4, 5.0)[1]
    answer = complete(report)["answers"]["vision_matters"]
    assert answer["needs_vision"] is True and answer["beats_blind"] == ["onestep", "shortcut"]
    assert NO_VISION not in answer["text"].lower()


def test_episodes_that_do_not_pair_cannot_be_compared():
    report = make_report(mode_entry("onestep", 20, 10.0), mode_entry("shortcut", 30, 10.5, 0.9))
    report["modes"]["onestep"]["success"]["tasks"]["push-v3"]["seeds"] = [s + 1 for s in SEEDS]
    completed = complete(report)
    answer = completed["answers"]["shortcut_vs_onestep"]
    assert "verdict" not in answer["success"]
    assert answer["text"].startswith("cannot compare") and "push-v3" in answer["text"]
    assert completed["comparisons"] == [answer["success"]]
    assert "cannot compare shortcut with onestep" in markdown(completed)


def test_missing_modes_cannot_be_answered():
    report = make_report(mode_entry("shortcut", 23, 10.5, 0.9), missing_entry("multistep:10"))
    answers = complete(report)["answers"]
    assert answers["shortcut_vs_multistep"]["text"].startswith("cannot answer")
    assert "multistep:10" in answers["shortcut_vs_multistep"]["text"]
    assert answers["shortcut_vs_onestep"]["text"].startswith("cannot answer: onestep missing")
    assert answers["vision_matters"]["text"].startswith("cannot answer: blind missing")


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


def test_headline_table_has_a_row_per_mode_and_the_sampling_floor():
    report = full_report()
    lines = headline_table(report).splitlines()
    assert len(lines) == 2 + len(report["modes"]) + 1
    rows = {line.split("|")[1].strip().strip("`"): line for line in lines[2:]}
    assert list(rows) == [*report["modes"], SAMPLING_FLOOR]
    assert "GFLOP/step (published size)" in lines[0] and "semantic skill" in lines[0]
    assert rows["onestep"].count("n/a") == 3 and rows["blind"].count("n/a") == 3
    assert "n/a" not in rows["shortcut"]
    cells = [cell.strip() for cell in rows["shortcut"].split("|")]
    assert cells[3:7] == ["0.11", "110", "0.85 (0.80)", "0.80 (0.75)"]
    assert "0.97" in rows[SAMPLING_FLOOR]
    assert "missing" in rows["multistep:25"]
    report["sampling_floor"] = None
    assert SAMPLING_FLOOR not in headline_table(report)


def test_report_shows_the_teacher_skill_or_says_it_was_not_measured(tmp_path):
    rows = [
        {"t": t, "mse_prediction": 1.0, "mse_copy": 2.0, "skill": 0.5, "low": 0.4, "high": 0.6}
        for t in (1, 2, 3)
    ]
    skill = {
        "clips": 40,
        "steps": 5,
        "per_index": {"pixels": rows, "latents": rows},
        "beats_copy_beyond_first": {"pixels": True, "latents": True},
    }
    report = full_report()
    write_report({**report, "teacher_skill": skill}, tmp_path / "with")
    text = (tmp_path / "with" / "report.md").read_text()
    section = text.split("## The teacher's own foresight")[1].split("## ")[0]
    assert "| pixels | +0.500 [+0.400, +0.600] |" in section and "40 test clips" in section
    assert "interval above 0): pixels: yes, latents: yes" in section
    write_report(report, tmp_path / "without")
    text = (tmp_path / "without" / "report.md").read_text()
    assert "Not measured: the teacher records no foresight skill" in text
