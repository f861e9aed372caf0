"""Paired comparison of success: exact McNemar, Tango's score interval, detectable difference."""

from __future__ import annotations

import math

import pytest
from scipy.optimize import minimize_scalar
from scipy.stats import binom, binomtest

from svam.eval.stats import detectable_difference, paired_comparison


def outcomes(both: int, a_only: int, b_only: int, neither: int) -> tuple[list[bool], list[bool]]:
    a = [True] * both + [True] * a_only + [False] * b_only + [False] * neither
    b = [True] * both + [False] * a_only + [True] * b_only + [False] * neither
    return a, b


def split(a: list[bool], b: list[bool], tasks: int) -> tuple[dict, dict]:
    """The same pairs dealt round-robin into `tasks` tasks."""
    return (
        {f"task-{t}": a[t::tasks] for t in range(tasks)},
        {f"task-{t}": b[t::tasks] for t in range(tasks)},
    )


def test_textbook_mcnemar_exact_p_value():
    # b = 2 discordant pairs for a, c = 8 for b: p = 2 P(X <= 2 | X ~ Bin(10, 1/2)) = 112/1024.
    a, b = outcomes(30, 2, 8, 20)
    result = paired_comparison({"reach": a}, {"reach": b})
    assert (result["pairs"], result["both"], result["a_only"], result["b_only"]) == (60, 30, 2, 8)
    assert result["neither"] == 20
    assert result["p_value"] == pytest.approx(112 / 1024)
    assert result["p_value"] == pytest.approx(2 * binom.cdf(2, 10, 0.5))
    assert result["p_value"] == pytest.approx(binomtest(2, 10, 0.5).pvalue)
    assert result["difference"] == pytest.approx(-6 / 60)
    assert result["rate_a"] - result["rate_b"] == pytest.approx(result["difference"])


def test_stratifying_by_task_pools_the_discordant_pairs():
    a, b = outcomes(40, 9, 1, 30)
    pooled = paired_comparison({"reach": a}, {"reach": b})
    by_task = paired_comparison(*split(a, b, 4))
    for key in ("pairs", "a_only", "b_only", "difference", "ci95", "p_value"):
        assert by_task[key] == pytest.approx(pooled[key])
    assert sum(task["a_only"] for task in by_task["tasks"].values()) == 9
    assert sum(task["pairs"] for task in by_task["tasks"].values()) == 80


@pytest.mark.parametrize(
    "counts", [(30, 2, 8, 20), (7, 4, 0, 5), (0, 0, 0, 16), (0, 16, 0, 0), (10, 3, 3, 4)]
)
def test_interval_contains_the_estimate_and_inverts_the_score_test(counts):
    n = sum(counts)
    _, b, c, m = counts
    m += counts[0]
    result = paired_comparison({"t": outcomes(*counts)[0]}, {"t": outcomes(*counts)[1]})
    low, high = result["ci95"]
    assert -1 <= low <= result["difference"] <= high <= 1 and low < high

    def score(delta: float) -> float:
        """Tango's continuity-corrected score statistic with the nuisance parameter maximised
        numerically (independently of the closed form in svam.eval.stats)."""

        def nll(q):
            terms = [(b, q + delta), (c, q), (m, 1 - 2 * q - delta)]
            return -sum(k * math.log(p) for k, p in terms if k)

        lo, hi = max(0.0, -delta) + 1e-12, (1 - delta) / 2 - 1e-12
        q = minimize_scalar(nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-12}).x
        return (abs(b - c - n * delta) - 1) / math.sqrt(n * (2 * q + delta * (1 - delta)))

    for bound in (low, high):
        if abs(bound) < 1:
            assert score(bound) == pytest.approx(1.959964, abs=1e-4)


def test_identical_outcomes_give_no_difference():
    a, _ = outcomes(7, 0, 0, 9)
    result = paired_comparison({"reach": a[:8], "push": a[8:]}, {"reach": a[:8], "push": a[8:]})
    assert result["difference"] == 0 and result["p_value"] == 1.0
    assert result["verdict"] == "inconclusive"
    low, high = result["ci95"]
    assert low < 0 < high  # no discordant pair is not proof of no difference


def test_verdict_follows_the_interval_and_agrees_with_the_exact_test():
    # 4 of 16 pairs only for a: exact p = 0.125, so the interval must still span 0.
    a, b = outcomes(6, 4, 0, 6)
    weak = paired_comparison({"t": a}, {"t": b})
    assert weak["p_value"] == pytest.approx(0.125)
    assert weak["verdict"] == "inconclusive" and weak["ci95"][0] < 0
    a, b = outcomes(6, 8, 0, 2)
    strong = paired_comparison({"t": a}, {"t": b})
    assert strong["p_value"] < 0.05 and strong["ci95"][0] > 0 and strong["verdict"] == "better"
    assert paired_comparison({"t": b}, {"t": a})["verdict"] == "worse"


def test_interval_never_excludes_0_where_the_exact_test_does_not_reject():
    for discordant in range(1, 41):
        for a_only in range(discordant + 1):
            a, b = outcomes(5, a_only, discordant - a_only, 5)
            result = paired_comparison({"t": a}, {"t": b})
            if result["verdict"] != "inconclusive":
                assert result["p_value"] < 0.05, (a_only, discordant - a_only)


def test_detectable_difference_shrinks_as_pairs_grow():
    sizes = [16, 40, 100, 400]
    detectable = [detectable_difference(n, 0.125) for n in sizes]
    assert all(0 < d < 1 for d in detectable)
    assert detectable == sorted(detectable, reverse=True)
    assert detectable_difference(3, 0.1) is None
    a, b = outcomes(6, 1, 1, 8)
    assert paired_comparison({"t": a}, {"t": b})["detectable_difference"] == pytest.approx(
        detectable_difference(16, 2 / 16)
    )


def test_detectable_difference_has_80_percent_power_by_connor():
    # Connor (1987): n = (z_a sqrt(psi) + z_b sqrt(psi - d^2))^2 / d^2, here solved for d.
    d = detectable_difference(200, 0.3)
    z_a, z_b = 1.959964, 0.841621
    n = (z_a * math.sqrt(0.3) + z_b * math.sqrt(0.3 - d * d)) ** 2 / d**2
    assert n == pytest.approx(200, rel=1e-4)


def test_pairs_that_do_not_pair_up_raise():
    with pytest.raises(ValueError, match="push"):
        paired_comparison(
            {"reach": [True], "push": [True, False]}, {"reach": [True], "push": [True]}
        )
    with pytest.raises(ValueError, match="push"):
        paired_comparison({"reach": [True]}, {"reach": [True], "push": [False]})
    with pytest.raises(ValueError, match="pair"):
        paired_comparison({}, {})
