"""Statistics of paired seed differences (method - baseline at the same seed) that a reviewer
accepts: a t interval and test per cell, Holm's correction over a table's cells, and the smallest
effect a table can detect.

    paired([d_1, ..., d_n])          -> dict(mean, std, n, ci=(lo, hi), p)   (95 % t interval, two-sided p)
    holm([p_1, ..., p_m])            -> Holm-adjusted p-values, same order
    min_detectable(std, n, alpha)    -> smallest |mean difference| detected with 80 % power

n < 2 (no spread to estimate): ci and p are NaN, not an error, so a table with a one-seed cell
still renders; holm leaves a NaN p as NaN and does not count it among the m tests.
"""
import math

import numpy as np
from scipy import stats as _st


def paired(diffs, level=0.95):
    """diffs: n paired differences (NaN/None dropped). The paired t-test of mean 0 (the same as
    scipy.stats.ttest_rel(x, y) on the pairs, or ttest_1samp(diffs, 0)) and its t interval."""
    d = np.array([x for x in diffs if x is not None and not math.isnan(x)], dtype=float)
    n = len(d)
    mean = float(d.mean()) if n else float('nan')
    if n < 2:
        return dict(mean=mean, std=float('nan'), n=n, ci=(float('nan'), float('nan')), p=float('nan'))
    std = float(d.std(ddof=1))
    se = std / math.sqrt(n)
    if se == 0:   # all differences equal: no doubt about the mean (p 0, unless it is 0)
        return dict(mean=mean, std=0.0, n=n, ci=(mean, mean), p=1.0 if mean == 0 else 0.0)
    half = float(_st.t.ppf(0.5 + level / 2, n - 1)) * se
    p = float(2 * _st.t.sf(abs(mean) / se, n - 1))
    return dict(mean=mean, std=std, n=n, ci=(mean - half, mean + half), p=p)


def holm(pvalues):
    """Holm's step-down adjustment: sorted p_(1) <= ... <= p_(m), adjusted
    p~_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)); returned in the input order. Rejecting where
    p~ < alpha controls the family-wise error rate at alpha over the m tests. NaN stays NaN."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    order = ok[np.argsort(p[ok], kind='stable')]
    m, running = len(order), 0.0
    for i, k in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[k]))
        out[k] = running
    return out.tolist()


def power(effect, std, n, alpha):
    """Power of the two-sided paired t-test with n pairs at level alpha when the true mean paired
    difference is `effect` and its std `std`: the exact noncentral t (scipy.stats.nct)."""
    df, crit = n - 1, float(_st.t.ppf(1 - alpha / 2, n - 1))
    nc = effect * math.sqrt(n) / std
    low = float(_st.nct.cdf(-crit, df, nc))   # the wrong-sign tail: tiny, and NaN in scipy for large nc
    return float(_st.nct.sf(crit, df, nc)) + (0.0 if math.isnan(low) else low)


def min_detectable(std, n, alpha=0.05, power_=0.8):
    """The smallest mean paired difference that a two-sided paired t-test with n pairs at level
    alpha (pass the corrected one, e.g. 0.05 / m for Holm's first step) detects with power power_,
    from the noncentral t (exact, not the normal approximation). In the units of std. NaN for n < 2."""
    if n < 2 or not std > 0:
        return float('nan') if n < 2 or math.isnan(std) else 0.0
    from scipy.optimize import brentq
    hi = std
    while power(hi, std, n, alpha) < power_:
        hi *= 2
    return float(brentq(lambda e: power(e, std, n, alpha) - power_, 0.0, hi, xtol=1e-10 * std))
