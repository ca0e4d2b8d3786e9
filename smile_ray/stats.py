"""Paired statistics for comparing arms or methods over shared seeds (pure numpy/scipy).

Agarwal et al. (2021), Bouthillier et al. (2021): mean paired difference with a 95 %
interval, the probability of improvement
``P(arm > reference)`` (the Mann-Whitney U statistic over ``n * m``, ties counting half)
and a paired t-test's p-value.

The interval: a percentile bootstrap (10,000 resamples) from ``BOOTSTRAP_MIN_N`` pairs
on; below that the bootstrap's resamples take too few distinct values to mean anything
(with 2 pairs its "interval" is just their range), so the Student t-interval of the
mean difference is used instead, which is honest at small n (and wide).

Power: :func:`min_detectable_effect`, the smallest mean difference the paired t-test
would detect with 80 % power given the observed spread of the differences, so a table
says not only "no significant difference" but "no difference larger than this".

Robust aggregates (Agarwal et al., 2021, "Deep RL at the edge of the statistical
precipice", and their rliable library): :func:`iqm`, the interquartile mean, and
:func:`stratified_bootstrap_ci`, its interval from resampling runs within each stratum.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy import optimize, stats

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


# ------------------------------------------------------------------ power


def min_detectable_effect(diffs, power: float = 0.8, alpha: float = 0.05) -> float:
    """The smallest mean paired difference that a two-sided paired t-test at level
    ``alpha`` on ``n = len(diffs)`` pairs detects with probability ``power``, taking the
    observed standard deviation ``s`` of the differences as the true one.

    Under a true mean difference ``delta`` the statistic ``T = mean / (s / sqrt(n))``
    follows a noncentral t with ``n - 1`` degrees of freedom and noncentrality
    ``nc = delta * sqrt(n) / sigma``; the power is
    ``P(|T| > t_{1-alpha/2, n-1}) = 1 - F_nct(t_crit; nc) + F_nct(-t_crit; nc)``. We solve
    ``power(nc) = power`` for ``nc`` (it rises monotonically from ``alpha`` at 0) and
    return ``nc * s / sqrt(n)``, in the units of ``diffs``. For large n this tends to
    the normal-approximation ``(z_{1-alpha/2} + z_power) * s / sqrt(n)``.

    ``s`` is itself an estimate, and a poor one from a handful of seeds: the MDE says
    what *this* spread of differences could resolve, not a guarantee. Fewer than two
    pairs have no spread: NaN. Identical differences (``s = 0``) give 0.
    """
    if not 0 < alpha < power < 1:
        raise ValueError(f"need 0 < alpha < power < 1, got alpha={alpha}, power={power}")
    d = np.asarray(diffs, float)
    n = len(d)
    if n < 2:
        return float("nan")
    sd = float(d.std(ddof=1))
    if sd == 0:
        return 0.0
    df = n - 1
    crit = stats.t.ppf(1 - alpha / 2, df)

    def shortfall(nc: float) -> float:
        # The lower tail is below alpha / 2 and vanishes as nc grows; scipy's nct returns
        # NaN for it at some (df, nc) (e.g. df 1, nc 8), where it is negligible: count 0.
        lower = float(stats.nct.cdf(-crit, df, nc))
        return float(stats.nct.sf(crit, df, nc)) + (lower if np.isfinite(lower) else 0.0) - power

    high = 1.0
    while shortfall(high) < 0:
        high *= 2
    nc = optimize.brentq(shortfall, 0.0, high, xtol=1e-12, rtol=1e-12)
    return float(nc * sd / np.sqrt(n))


# ------------------------------------------------------------------ robust aggregates


#: fewest runs in a cell for which the tables print an IQM and its interval: with fewer,
#: the middle 50 % is three runs or fewer and its bootstrap takes a handful of values
IQM_MIN_RUNS = 8


def iqm(values, axis: int | None = None) -> float | np.ndarray:
    """Interquartile mean (Agarwal et al., 2021): the mean of the middle 50 % of the
    runs, ``scipy.stats.trim_mean(values, 0.25)`` exactly as rliable's ``aggregate_iqm``
    computes it. scipy cuts ``floor(0.25 * n)`` runs from each end (no fractional weights
    for the runs straddling the quartiles): of 8 runs it averages the middle 4, of 10 the
    middle 6. ``axis=None`` pools every value; an axis gives one IQM per slice."""
    out = stats.trim_mean(np.asarray(values, float), 0.25, axis=axis)
    return float(out) if np.ndim(out) == 0 else out


def stratified_bootstrap_ci(
    runs_by_task: Mapping[Any, Sequence[float]] | Sequence[Sequence[float]],
    statistic: Callable[..., Any] = iqm,
    *,
    confidence: float = 0.95,
    reps: int = 10000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile interval of ``statistic`` over the pooled runs of several strata
    (tasks, settings, table columns), the stratified bootstrap of Agarwal et al. (2021):
    each of ``reps`` resamples draws, *within each stratum*, as many runs as it has, with
    replacement, and pools them; the interval is the ``(1 - confidence) / 2`` and
    ``(1 + confidence) / 2`` percentiles of the statistic over the resamples. So every
    resample keeps each stratum's share of the runs (a weak setting is never resampled
    away). ``statistic(values, axis=1)`` must reduce a ``(reps, runs)`` array along axis 1
    (``iqm``, ``np.mean``, ``np.median`` do). Seeded: the same input gives the same
    interval.
    """
    strata = list(runs_by_task.values()) if isinstance(runs_by_task, Mapping) else list(runs_by_task)
    strata = [np.asarray(s, float) for s in strata]
    if not strata or any(len(s) == 0 for s in strata):
        raise ValueError("stratified_bootstrap_ci needs at least one run in every stratum")
    g = np.random.default_rng(seed)
    resampled = np.concatenate([s[g.integers(0, len(s), (reps, len(s)))] for s in strata], axis=1)
    values = np.asarray(statistic(resampled, axis=1), float)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)
