"""Paired comparison of two modes' task success, for the report.

Every mode runs the same episodes (task, seed, noise key), so two modes' outcomes pair up and most
pairs end the same way in both. `paired_comparison` compares them on the discordant pairs:

- **Test**: the exact McNemar test, i.e. the two-sided binomial test of the a-only count among the
  discordant pairs against 1/2 (`scipy.stats.binomtest`; what statsmodels' `mcnemar(exact=True)`
  computes). Stratified by task it stays valid pooled: under H0 (the modes succeed equally often on
  every task) each discordant pair is a fair coin within every stratum, so the pooled a-only count
  is Binomial(discordant, 1/2) whatever the tasks' difficulties.
- **Interval**: Tango's score interval for a difference of paired proportions (Tango 1998, Stat Med
  17:891; recommended by Fagerland, Lydersen & Laake 2014, Stat Med 33:2850), with a continuity
  correction of one pair, found by inverting the score test with `scipy.optimize.brentq`. At a
  difference of 0 its statistic is the continuity-corrected McNemar statistic, which is never less
  conservative than the exact test (checked for up to 120 discordant pairs), so the interval never
  excludes 0 where the exact p-value is 0.05 or more: the report never calls a difference the exact
  test does not support (the converse happens only for p just under 0.05, e.g. 13 against 4).
  Unlike a bootstrap it does not collapse to [0, 0] when few or no pairs are discordant. Each pair
  is matched on task, so the task cancels from the paired difference; pooling the pairs is the
  stratified estimate with stratum weights by size, and the pooled variance exceeds the stratified
  one only by the between-task spread of the difference (nil under H0), so the interval is at worst
  conservative.
- **Power**: the smallest true difference detected at 80% power, two-sided alpha 0.05, for this many
  pairs at the observed discordance rate, by Connor's (1987, Biometrics 43:207) approximation to
  the McNemar test's power, solved for the difference with `brentq`; the discordance rate is floored
  at the difference itself, since a difference needs at least that many discordant pairs.
"""

from __future__ import annotations

import math

from scipy.optimize import brentq
from scipy.stats import binomtest, norm

ALPHA = 0.05
POWER = 0.8


def _tango_interval(n: int, b: int, c: int, z: float) -> tuple[float, float]:
    """Continuity-corrected Tango score interval for (b − c) / n, where b and c are the a-only and
    b-only counts of n pairs: the differences the score test at level `z` does not reject."""

    def sd(delta: float) -> float:
        """SD of b − c under a true difference `delta`, with the b-only probability at its
        maximum-likelihood value under `delta` (the positive root of Tango's quadratic)."""
        w = b * (1 + delta) + c * (1 - delta) - 2 * n * delta
        q = (w + math.sqrt(max(0.0, w * w + 8 * n * c * delta * (1 - delta)))) / (4 * n)
        return math.sqrt(max(0.0, n * (2 * q + delta * (1 - delta))))

    def below(delta: float) -> float:  # > 0 where delta is rejected as too small
        return (b - c - n * delta - 1) - z * sd(delta)

    def above(delta: float) -> float:  # > 0 where delta is rejected as too large
        return (n * delta - (b - c) - 1) - z * sd(delta)

    estimate = (b - c) / n
    low_edge, high_edge = max(-1.0, estimate - 1 / n), min(1.0, estimate + 1 / n)
    low = brentq(below, -1.0, low_edge) if below(-1.0) > 0 > below(low_edge) else -1.0
    high = brentq(above, high_edge, 1.0) if above(1.0) > 0 > above(high_edge) else 1.0
    return low, high


def detectable_difference(pairs: int, discordance: float) -> float | None:
    """The smallest true difference in success rate that an exact-McNemar-sized test of `pairs`
    pairs detects at 80% power and two-sided alpha 0.05 (Connor 1987), with the discordance rate
    floored at the difference; None when no difference up to 1 is detectable (very few pairs)."""
    z_alpha, z_beta = norm.ppf(1 - ALPHA / 2), norm.ppf(POWER)

    def shortfall(delta: float) -> float:
        psi = max(discordance, delta)
        return (
            math.sqrt(pairs) * delta
            - z_alpha * math.sqrt(psi)
            - z_beta * math.sqrt(max(0.0, psi - delta * delta))
        )

    low, high = 1e-9, 1 - 1e-9
    if shortfall(high) <= 0:
        return None
    return brentq(shortfall, low, high)


def paired_comparison(a: dict[str, list[bool]], b: dict[str, list[bool]]) -> dict:
    """Compare success outcomes `a` and `b` (per task, the same seeds in the same order in both).

    Returns the number of pairs, the counts of pairs where both, only a, only b and neither
    succeed, per-task discordant counts, both rates, their difference a − b with its 95% interval,
    the exact McNemar p-value, the detectable difference at 80% power and the verdict: "better" or
    "worse" (for a) when the interval excludes 0, else "inconclusive". Raises ValueError, naming
    the task, when the outcomes do not pair up."""
    for task in [*a, *(task for task in b if task not in a)]:
        if task not in a or task not in b:
            side = "first" if task not in a else "second"
            raise ValueError(f"task {task}: no outcomes in the {side} mode, so nothing to pair")
        if len(a[task]) != len(b[task]):
            raise ValueError(
                f"task {task}: {len(a[task])} outcomes against {len(b[task])}, so they do not pair"
            )
    pairs = [(bool(x), bool(y)) for task in a for x, y in zip(a[task], b[task], strict=True)]
    n = len(pairs)
    if n == 0:
        raise ValueError("no episodes to pair")
    both = sum(x and y for x, y in pairs)
    a_only = sum(x and not y for x, y in pairs)
    b_only = sum(y and not x for x, y in pairs)
    discordant = a_only + b_only
    low, high = _tango_interval(n, a_only, b_only, norm.ppf(1 - ALPHA / 2))
    p_value = binomtest(a_only, discordant, 0.5).pvalue if discordant else 1.0
    verdict = "better" if low > 0 else "worse" if high < 0 else "inconclusive"
    return {
        "pairs": n,
        "both": both,
        "a_only": a_only,
        "b_only": b_only,
        "neither": n - both - discordant,
        "tasks": {
            task: {
                "pairs": len(a[task]),
                "a_only": sum(x and not y for x, y in zip(a[task], b[task], strict=True)),
                "b_only": sum(y and not x for x, y in zip(a[task], b[task], strict=True)),
            }
            for task in a
        },
        "rate_a": (both + a_only) / n,
        "rate_b": (both + b_only) / n,
        "difference": (a_only - b_only) / n,
        "ci95": [low, high],
        "p_value": float(p_value),
        "detectable_difference": detectable_difference(n, discordant / n),
        "verdict": verdict,
    }
