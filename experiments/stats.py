"""Statistics of the experiments: means over seeds, t-intervals, rank correlation and
quantile bins."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    x = np.asarray(values, np.float64)
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else 0.0


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and the two-sided Student-t confidence interval of the mean (over seeds).

    With one value the interval is the value itself (no spread can be estimated)."""
    from scipy import stats

    x = np.asarray(values, np.float64)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, mean, mean
    half = stats.t.ppf(0.5 + confidence / 2, df=len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return mean, mean - half, mean + half


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (scipy's, ties given averaged ranks); NaN when either side
    is constant (scipy warns about that case; here it is an expected outcome)."""
    from scipy import stats

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(stats.spearmanr(x, y).statistic)


def quantile_bins(values: np.ndarray, num_bins: int) -> np.ndarray:
    """Bin index 0..num_bins-1 of every value, bins holding about equal counts.

    Equal values always share a bin (edges are quantiles, ties go to the lower bin), so with
    heavy ties some bins can be empty."""
    values = np.asarray(values, np.float64)
    edges = np.quantile(values, np.linspace(0, 1, num_bins + 1)[1:-1])
    return np.searchsorted(edges, values, side="left").astype(np.int64)


def binned_means(x: np.ndarray, y: np.ndarray, num_bins: int) -> list[dict[str, float]]:
    """Mean of ``y`` in each quantile bin of ``x``: per bin the x range, mean x, mean y, its
    standard error and the count (empty bins left out)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    bins = quantile_bins(x, num_bins)
    rows = []
    for b in range(num_bins):
        sel = bins == b
        n = int(sel.sum())
        if n == 0:
            continue
        sem = float(y[sel].std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
        rows.append(
            {
                "bin": b,
                "x_min": float(x[sel].min()),
                "x_max": float(x[sel].max()),
                "x_mean": float(x[sel].mean()),
                "y_mean": float(y[sel].mean()),
                "y_sem": sem,
                "count": n,
            }
        )
    return rows


def fmt_mean_sd(values: Sequence[float], digits: int = 3) -> str:
    """'mean ± sd' of values, e.g. '3.412 ± 0.010' (just the mean for one value)."""
    mean, sd = mean_sd(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"
