"""Small statistics shared by the mechanism modules: column-wise correlations and means with 95% CIs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats


def pearson_columns(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation of ``x`` ``[n]`` with every column of ``y`` ``[n, k]``; NaN where either is
    constant."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).reshape(len(x), -1)
    if len(x) < 2:
        return np.full(y.shape[1], np.nan)
    xc, yc = x - x.mean(), y - y.mean(axis=0)
    denom = np.sqrt((xc**2).sum()) * np.sqrt((yc**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (xc @ yc) / denom
    return np.where(denom > 1e-12 * max(1.0, float(np.abs(y).max(initial=0.0))), r, np.nan)


def spearman_columns(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman correlation (Pearson of average ranks) of ``x`` ``[n]`` with every column of ``y`` ``[n,
    k]``."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).reshape(len(x), -1)
    if len(x) < 2:
        return np.full(y.shape[1], np.nan)
    return pearson_columns(stats.rankdata(x), stats.rankdata(y, axis=0))


def mean_ci(
    df: pd.DataFrame, by: Sequence[str], *, value: str = "value", unit: str = "concept", level: float = 0.95
) -> pd.DataFrame:
    """Mean of ``value`` over units (concepts) per ``by`` group, with a Student-t confidence interval.

    Rows of the same unit within a group (several trial numbers of one concept) are averaged first, so the
    interval is across units. Columns: the ``by`` columns, ``mean``, ``lo``, ``hi``, ``sem``, ``n``.
    """
    by = list(by)
    per_unit = df.groupby([*by, unit], dropna=False, sort=True)[value].mean().reset_index()
    grouped = per_unit.groupby(by, dropna=False, sort=True)[value]
    out = grouped.agg(mean="mean", sem="sem", n="count").reset_index()
    q = stats.t.ppf(0.5 + level / 2, np.maximum(out["n"].to_numpy() - 1, 1))
    half = np.where(out["n"] > 1, q * out["sem"].fillna(0.0), 0.0)
    return out.assign(lo=out["mean"] - half, hi=out["mean"] + half)
