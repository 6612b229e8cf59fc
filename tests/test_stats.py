"""metrics/stats.py against scipy's own tests, a hand-computed Holm example, and a Monte Carlo
of the paired t-test's power."""
import math

import numpy as np
import pytest
from scipy import stats as st

from metrics.stats import holm, min_detectable, paired, power

X = np.array([0.031, 0.027, 0.040, 0.022, 0.035])
Y = np.array([0.029, 0.028, 0.033, 0.020, 0.030])


def test_paired_matches_scipy():
    r = paired(list(X - Y))
    assert r['n'] == 5 and r['mean'] == pytest.approx(float(np.mean(X - Y)))
    assert r['p'] == pytest.approx(st.ttest_rel(X, Y).pvalue, rel=1e-10)
    assert r['p'] == pytest.approx(st.ttest_1samp(X - Y, 0).pvalue, rel=1e-10)
    ci = st.ttest_1samp(X - Y, 0).confidence_interval(0.95)
    assert r['ci'] == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert r['std'] == pytest.approx(float(np.std(X - Y, ddof=1)))


def test_paired_edge_cases():
    for few in ([], [0.3], [None, 0.3, float('nan')]):
        r = paired(few)
        assert math.isnan(r['p']) and math.isnan(r['ci'][0]) and r['n'] == len([x for x in few if x == x and x is not None])
    assert paired([0.0, 0.0, 0.0])['p'] == 1.0
    assert paired([0.25, 0.25, 0.25]) == dict(mean=0.25, std=0.0, n=3, ci=(0.25, 0.25), p=0.0)


def test_holm_hand_example():
    # sorted 0.01, 0.02, 0.03, 0.04 (m = 4): 4 * 0.01 = 0.04, 3 * 0.02 = 0.06, 2 * 0.03 = 0.06, 1 * 0.04
    # -> 0.04 (monotone max keeps 0.06, then 0.06); input order kept; a NaN is not a test
    got = holm([0.03, 0.01, float('nan'), 0.04, 0.02])
    assert got[0] == pytest.approx(0.06) and got[1] == pytest.approx(0.04)
    assert math.isnan(got[2]) and got[3] == pytest.approx(0.06) and got[4] == pytest.approx(0.06)
    assert holm([0.5, 0.9]) == [1.0, 1.0]   # capped at 1
    assert holm([]) == []


def test_holm_monotone_and_no_smaller_than_raw():
    p = np.random.default_rng(0).uniform(0, 0.2, 40)
    adj = np.array(holm(p))
    order = np.argsort(p)
    assert np.all(np.diff(adj[order]) >= 0) and np.all(adj >= p) and np.all(adj <= 1)
    assert adj.min() == pytest.approx(min(1, 40 * p.min()))


def test_min_detectable_has_the_power_it_claims():
    n, alpha, std = 5, 0.05 / 10, 0.002
    d = min_detectable(std, n, alpha)
    assert power(d, std, n, alpha) == pytest.approx(0.8, abs=1e-6)
    assert d / std > 2.0   # a corrected test with 5 pairs needs a large effect
    # Monte Carlo: 20000 tables of 5 pairs with true mean d: the t-test rejects in ~80 % of them
    g = np.random.default_rng(1)
    z = g.normal(d, std, (20000, n))
    p = st.ttest_1samp(z, 0, axis=1).pvalue
    assert abs(np.mean(p < alpha) - 0.8) < 0.015
    # more pairs or a looser alpha detect smaller effects; nothing from one pair
    assert min_detectable(std, 10, alpha) < d and min_detectable(std, n, 0.05) < d
    assert math.isnan(min_detectable(std, 1, alpha))
