"""Statistics with stated power (MDE) and robust aggregates (IQM, stratified bootstrap),
against closed forms and values computed by hand."""
import numpy as np
import pytest
from scipy import integrate, stats

from smile_ray.stats import iqm, min_detectable_effect, stratified_bootstrap_ci


def power_by_integration(delta, sd, n, alpha=0.05):
    """Power of the two-sided paired t-test, computed without the noncentral t: with
    ``V ~ chi2(n - 1)``, ``T = (Z + nc) / sqrt(V / (n - 1))``, so
    ``P(|T| > c) = E_V[P(Z > c sqrt(V/df) - nc) + P(Z < -c sqrt(V/df) - nc)]``."""
    df, nc = n - 1, delta * np.sqrt(n) / sd
    c = stats.t.ppf(1 - alpha / 2, df)

    def integrand(v):
        s = c * np.sqrt(v / df)
        return (stats.norm.sf(s - nc) + stats.norm.cdf(-s - nc)) * stats.chi2.pdf(v, df)

    return integrate.quad(integrand, 0, np.inf, limit=200)[0]


@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_mde_has_the_stated_power_at_small_n(n):
    diffs = np.arange(n, dtype=float) * 0.7 - 1.0
    mde = min_detectable_effect(diffs)
    assert power_by_integration(mde, diffs.std(ddof=1), n) == pytest.approx(0.8, abs=1e-6)
    # and at another power and level
    mde90 = min_detectable_effect(diffs, power=0.9, alpha=0.01)
    assert mde90 > mde
    assert power_by_integration(mde90, diffs.std(ddof=1), n, alpha=0.01) == pytest.approx(0.9, abs=1e-6)


def test_mde_of_ten_pairs_is_about_one_standard_deviation():
    # the textbook value: a paired t-test on 10 pairs detects d_z = 0.996 with 80 % power
    diffs = [1.0, -1.0] * 5
    assert min_detectable_effect(diffs) / np.std(diffs, ddof=1) == pytest.approx(0.99600, abs=1e-4)


def test_mde_tends_to_the_normal_approximation():
    diffs = np.random.default_rng(0).normal(0.3, 2.0, 20000)
    closed = (stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) * diffs.std(ddof=1) / np.sqrt(len(diffs))
    assert min_detectable_effect(diffs) == pytest.approx(closed, rel=2e-4)


def test_mde_scales_with_the_spread_and_ignores_the_mean():
    diffs = np.array([0.5, 1.5, 2.0, 3.0])
    assert min_detectable_effect(3 * diffs) == pytest.approx(3 * min_detectable_effect(diffs))
    assert min_detectable_effect(diffs + 10) == pytest.approx(min_detectable_effect(diffs))


def test_mde_edge_cases():
    assert np.isnan(min_detectable_effect([1.0]))
    assert min_detectable_effect([2.0, 2.0, 2.0]) == 0.0
    with pytest.raises(ValueError):
        min_detectable_effect([1.0, 2.0], power=0.01)


def test_iqm_by_hand():
    assert iqm([1, 2, 3, 4, 5, 6, 7, 8]) == pytest.approx(4.5)  # middle four: 3, 4, 5, 6
    assert iqm([1, 2, 3, 4, 5, 6, 7, 1000]) == pytest.approx(4.5)  # an outlier is trimmed away
    assert iqm([8, 1, 7, 2]) == pytest.approx(4.5)  # order does not matter; 2 and 7 remain
    assert iqm([1, 2, 3, 4, 100]) == pytest.approx(3.0)  # floor(5/4) = 1 cut from each end
    assert iqm(list(range(10))) == pytest.approx(np.mean([2, 3, 4, 5, 6, 7]))  # floor(10/4) = 2
    np.testing.assert_allclose(iqm(np.array([[1, 2, 3, 4], [10, 20, 30, 40]]), axis=1), [2.5, 25.0])


def test_stratified_bootstrap_keeps_each_strata_share():
    # Each stratum is constant: every stratified resample is the same multiset, so the
    # interval is the point itself (an unstratified bootstrap would vary the shares).
    low, high = stratified_bootstrap_ci({"a": [0.0, 0.0, 0.0], "b": [1.0, 1.0, 1.0, 1.0]}, np.mean)
    assert low == high == pytest.approx(4 / 7)


def test_stratified_bootstrap_of_two_values_by_hand():
    # Resampling [0, 1] twice: mean 0 (p 1/4), 0.5 (p 1/2), 1 (p 1/4): the 2.5th and
    # 97.5th percentiles are 0 and 1; a 40 % interval is 0.5 at both ends.
    assert stratified_bootstrap_ci([[0.0, 1.0]], np.mean) == pytest.approx((0.0, 1.0))
    assert stratified_bootstrap_ci([[0.0, 1.0]], np.mean, confidence=0.4) == pytest.approx((0.5, 0.5))


def test_stratified_bootstrap_is_seeded_and_brackets_the_iqm():
    runs = {"3/class": [60.0, 62.0, 61.5, 63.0, 59.0, 64.0, 60.5, 62.5],
            "10/class": [80.0, 81.0, 79.5, 82.0, 80.5, 78.0, 81.5, 80.0]}
    a = stratified_bootstrap_ci(runs, iqm, seed=3)
    assert a == stratified_bootstrap_ci(runs, iqm, seed=3)
    assert a != stratified_bootstrap_ci(runs, iqm, seed=4)
    point = iqm(np.concatenate(list(runs.values())))
    assert 59.0 < a[0] < point < a[1] < 82.0
    with pytest.raises(ValueError):
        stratified_bootstrap_ci({"a": []})
