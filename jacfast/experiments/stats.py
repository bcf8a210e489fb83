"""Paired comparisons: the same (subset, seed) units for every method, differences against a baseline.

``paired(values, baseline)`` takes ``{method: {unit: value}}`` and returns, for each method, the
mean of ``value[m][u] - value[baseline][u]`` over the units both have, its standard error and a
95% confidence interval from the paired t distribution (n - 1 degrees of freedom).
"""
from __future__ import annotations

import math
import statistics

# two-sided 95% quantiles t_{0.975, df}, df = 1..30 (beyond: the normal 1.96 is within 2%)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` >= 1 degrees of freedom."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def mean_ci(diffs) -> dict:
    """Mean, standard error and paired-t 95% CI of a list of differences (CI NaN below 2 values)."""
    d = [float(v) for v in diffs]
    n = len(d)
    if n == 0:
        raise ValueError("mean_ci needs at least one difference")
    mean = statistics.fmean(d)
    if n < 2:
        return {"mean": mean, "se": math.nan, "ci95": [math.nan, math.nan], "pairs": n, "wins": sum(v > 0 for v in d)}
    se = statistics.stdev(d) / math.sqrt(n)
    h = t975(n - 1) * se
    return {"mean": mean, "se": se, "ci95": [mean - h, mean + h], "pairs": n, "wins": sum(v > 0 for v in d)}


def paired(values: dict, baseline) -> dict:
    """``{method: {unit: value}}`` -> ``{method: mean_ci(value - baseline value)}`` over shared units.

    Methods sharing no unit with the baseline (and the baseline itself) are left out.
    """
    if baseline not in values:
        raise ValueError(f"baseline {baseline!r} has no values (methods: {sorted(values)})")
    base = values[baseline]
    out = {}
    for m, vals in values.items():
        units = [u for u in vals if u in base]
        if m != baseline and units:
            out[m] = {**mean_ci([vals[u] - base[u] for u in units]), "units": [list(u) if isinstance(u, tuple)
                                                                               else u for u in units]}
    return out


def fmt(s: dict, scale: float = 100.0, digits: int = 2) -> str:
    """'+1.23 [-0.40, +2.86]' (mean and 95% CI, times ``scale``)."""
    lo, hi = s["ci95"]
    return f"{scale * s['mean']:+.{digits}f} [{scale * lo:+.{digits}f}, {scale * hi:+.{digits}f}]"


def significant(s: dict) -> bool:
    """Whether the 95% CI excludes 0."""
    lo, hi = s["ci95"]
    return (lo > 0 or hi < 0) and not math.isnan(lo)
