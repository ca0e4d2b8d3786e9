"""Paired statistics for comparing arms or methods over shared seeds (pure numpy/scipy).

Agarwal et al. (2021), Bouthillier et al. (2021): mean paired difference with a 95 %
interval, the probability of improvement
``P(arm > reference)`` (the Mann-Whitney U statistic over ``n * m``, ties counting half)
and a paired t-test's p-value.

The interval: a percentile bootstrap (10,000 resamples) from ``BOOTSTRAP_MIN_N`` pairs
on; below that the bootstrap's resamples take too few distinct values to mean anything
(with 2 pairs its "interval" is just their range), so the Student t-interval of the
mean difference is used instead, which is honest at small n (and wide).
"""
from __future__ import annotations

import numpy as np
from scipy import stats

BOOTSTRAP_MIN_N = 10


def interval_method(n: int) -> str:
    """The name of the 95 % interval used for ``n`` paired values."""
    return "bootstrap" if n >= BOOTSTRAP_MIN_N else "t"


def paired_stats(reference: list[float], arm: list[float]) -> dict[str, float]:
    """Paired comparison of ``arm`` with ``reference`` over the same seeds (same order)."""
    ref_a, arm_a = np.asarray(reference, float), np.asarray(arm, float)
    diff = arm_a - ref_a
    if np.ptp(diff) == 0:
        low = high = float(diff[0])
    elif interval_method(len(diff)) == "t":
        half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
        low, high = float(diff.mean() - half), float(diff.mean() + half)
    else:
        ci = stats.bootstrap((diff,), np.mean, confidence_level=0.95, n_resamples=10000, method="percentile",
                             random_state=0).confidence_interval
        low, high = float(ci.low), float(ci.high)
    u = stats.mannwhitneyu(arm_a, ref_a, alternative="two-sided").statistic
    p = stats.ttest_rel(arm_a, ref_a).pvalue if np.ptp(diff) > 0 else 1.0
    return {"diff": float(diff.mean()), "ci_low": low, "ci_high": high,
            "p_improve": float(u / (len(arm_a) * len(ref_a))), "p_value": float(p)}
