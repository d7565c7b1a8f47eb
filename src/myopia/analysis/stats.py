"""Means with confidence intervals: Student-t over seeds, bootstrap over documents."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Two-sided 95% Student-t quantiles t_{0.975, df} for df = 1..30.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042]


def t_quantile_975(df: int) -> float:
    return _T975[df - 1] if 1 <= df <= len(_T975) else 1.96


def mean_ci(values: Sequence[float]) -> dict:
    """Mean and two-sided 95% t-interval over independent runs (no interval for a single run)."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    mean = float(x.mean()) if n else float("nan")
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": n}
    half = t_quantile_975(n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def format_ci(ci: dict, digits: int = 3) -> str:
    if ci.get("low") is None:
        return f"{ci['mean']:.{digits}f}"
    return f"{ci['mean']:.{digits}f} [{ci['low']:.{digits}f}, {ci['high']:.{digits}f}]"


def cluster_bootstrap_ci(values: Sequence[float], clusters: Sequence[int], n_boot: int = 2000, seed: int = 0,
                         level: float = 0.95) -> dict:
    """Mean over units and a percentile-bootstrap interval that resamples whole *clusters*
    (e.g. held-out documents, whose windows are not independent). For a paired comparison pass the
    per-unit differences."""
    x = np.asarray(values, dtype=np.float64)
    c = np.asarray(clusters)
    ids, inverse = np.unique(c, return_inverse=True)
    sums = np.bincount(inverse, weights=x, minlength=len(ids))
    counts = np.bincount(inverse, minlength=len(ids)).astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(ids), size=(n_boot, len(ids)))
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    alpha = (1 - level) / 2
    return {"mean": float(x.mean()), "low": float(np.quantile(means, alpha)),
            "high": float(np.quantile(means, 1 - alpha)), "n": len(x), "clusters": len(ids)}
