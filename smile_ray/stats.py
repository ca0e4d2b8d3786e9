"""Paired statistics for comparing arms or methods over shared seeds (pure numpy/scipy).

Agarwal et al. (2021), Bouthillier et al. (2021): mean paired difference with a 95 %
percentile-bootstrap interval (10,000 resamples), the probability of improvement
``P(arm > reference)`` (the Mann-Whitney U statistic over ``n * m``, ties counting half)
and a paired t-test's p-value.
"""
from __future__ import annotations

import numpy as np
from scipy import stats


def paired_stats(reference: list[float], arm: list[float]) -> dict[str, float]:
    """Paired comparison of ``arm`` with ``reference`` over the same seeds (same order)."""
    ref_a, arm_a = np.asarray(reference, float), np.asarray(arm, float)
    diff = arm_a - ref_a
    if np.ptp(diff) == 0:
        low = high = float(diff[0])
    else:
        ci = stats.bootstrap((diff,), np.mean, confidence_level=0.95, n_resamples=10000, method="percentile",
                             random_state=0).confidence_interval
        low, high = float(ci.low), float(ci.high)
    u = stats.mannwhitneyu(arm_a, ref_a, alternative="two-sided").statistic
    p = stats.ttest_rel(arm_a, ref_a).pvalue if np.ptp(diff) > 0 else 1.0
    return {"diff": float(diff.mean()), "ci_low": low, "ci_high": high,
            "p_improve": float(u / (len(arm_a) * len(ref_a))), "p_value": float(p)}


def mean_interval(values: list[float], n_resamples: int = 2000) -> tuple[float, float]:
    """A 95 % percentile-bootstrap interval of the mean (a point when all values agree)."""
    v = np.asarray(values, float)
    if len(v) < 2 or np.ptp(v) == 0:
        return float(v.mean()), float(v.mean())
    ci = stats.bootstrap((v,), np.mean, n_resamples=n_resamples, method="percentile", random_state=0).confidence_interval
    return float(ci.low), float(ci.high)
