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


def test_headline_table_on_committed_runs(tmp_path):
    """The report's statistics of one table, built from a few of results/steps' committed JSONs
    (8gaussians vanilla and sa, both regimes, 5 seeds), against scipy on the same numbers."""
    import json
    import os
    import shutil
    from experiments.report import HEADLINE, headline_table, load_steps
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'results', 'steps')
    names = [f'steps_8gaussians_{rg}_{m}_s{s}.json' for rg in ('T1000', 'T50') for m in ('vanilla', 'sa')
             for s in range(5)]
    if not all(os.path.isfile(os.path.join(src, f)) for f in names):
        pytest.skip('results/steps not in this checkout')
    os.makedirs(tmp_path / 'steps')
    for f in names:
        shutil.copy(os.path.join(src, f), tmp_path / 'steps' / f)
    runs, _ = load_steps(str(tmp_path))
    rows, note = headline_table(runs, '8gaussians', 'mmd', ['vanilla', 'sa'], 'ddpm')
    assert [(m, es) for m, es, _ in rows] == [('vanilla', True), ('sa', False), ('sa', True)]
    cells = [c for _, _, cs in rows for c in cs if c]
    assert note['m'] == len(cells) == 3 * len(HEADLINE) - 2   # no ES at S = 1000 (vanilla + ES, sa + ES)

    def value(m, rg, s, key, S=10):
        r = json.load(open(tmp_path / 'steps' / f'steps_8gaussians_{rg}_{m}_s{s}.json'))
        return next(x[key] for x in r['rows'] if x['sampler'] == 'ddpm' and x['steps'] == S)
    sa = [value('sa', 'T1000', s, 'mmd') for s in range(5)]
    van = [value('vanilla', 'T1000', s, 'mmd') for s in range(5)]
    c = rows[1][2][0]   # sa, T = 1000, S = 10
    assert c['n'] == 5 and c['mean'] == pytest.approx(np.mean(np.subtract(sa, van)))
    assert c['p'] == pytest.approx(st.ttest_rel(sa, van).pvalue, rel=1e-9)
    ps = [x['p'] for x in cells]
    assert c['p_holm'] == pytest.approx(holm(ps)[cells.index(c)])
    assert all(x['sig'] == (x['p_holm'] < 0.05) for x in cells) and note['marked'] == sum(x['sig'] for x in cells)
    assert note['k_std'] == pytest.approx(min_detectable(1.0, 5, 0.05 / note['m']))


def test_dtype_summary_counts_intervals_and_holm(tmp_path, monkeypatch):
    """protocol.dtype_summary on fake pairs: a metric shifted by a constant plus small noise is
    outside the interval and survives Holm; an unshifted one is neither."""
    import json
    import os
    from experiments import protocol as P
    monkeypatch.setattr(P, 'RES', str(tmp_path))
    os.makedirs(tmp_path / 'dtype')
    os.makedirs(tmp_path / 'steps')
    g = np.random.default_rng(0)
    for s in range(4):
        fp32 = [dict(sampler='ddpm', steps=S, mmd=0.03 + 0.01 * g.normal(), kid=0.1 + 0.01 * g.normal())
                for S in (10, 20)]
        bf16 = [dict(r, mmd=r['mmd'] + 0.01 + 1e-4 * g.normal(), kid=r['kid'] + 0.01 * g.normal()) for r in fp32]
        json.dump(dict(rows=fp32), open(tmp_path / 'steps' / f'steps_8gaussians_T50_vanilla_s{s}.json', 'w'))
        json.dump(dict(rows=bf16, job=dict(dataset='8gaussians', regime='T50', pair=f'steps_8gaussians_T50_vanilla_s{s}')),
                  open(tmp_path / 'dtype' / f'dtype_8gaussians_T50_vanilla_bf16_s{s}.json', 'w'))
    m = P.dtype_summary()['8gaussians_T50']['metrics']
    assert m['mmd']['cells'] == 2 and m['mmd']['ci_excludes_0'] == 2 and m['mmd']['holm_below_0_05'] == 2
    assert m['kid']['holm_below_0_05'] == 0 and 'beyond_2se' not in m['kid']
