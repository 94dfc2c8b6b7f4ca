"""Detection metrics from the tidy trial table: TPR, FPR, discrimination, introspection, forced
identification.

The input has one row per trial (the columns of :class:`mechintro.behaviour.store.TrialStore`); the output
one row
per group of trials, with 95% Wilson intervals. How rows are grouped and counted:

* **Groups** are the distinct values of the ``by`` columns among injection and forced rows.
* **Controls are shared across strengths.** Control rows carry strength 0.0, so a group's FPR comes from
  the control rows that match every ``by`` column *except* ``strength`` (same layer, variant, persona...).
  One set of controls therefore serves every strength of a sweep, and summing ``n_control`` over groups
  counts those controls more than once. Control rows with no matching injection or forced rows get a group
  of their own (their ``strength`` stays 0.0), so FPR-only runs are reported too.
* **Judge errors are not answers.** A row whose ``judge_error`` is set is left out of every denominator
  and counted in ``n_errors_<condition>`` (and in ``n_errors``). Rows whose needed verdict is missing
  without an error (NA ``detected`` on an injection row, say) are left out too.
* ``n_injection``, ``n_control`` and ``n_forced`` count the rows that entered the denominators.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import binomtest

from mechintro.behaviour.judges.base import error_mask
from mechintro.core.settings import CONDITIONS

__all__ = [
    "CONCEPT_RATE_COLUMNS",
    "CONDITIONS",
    "concept_rates",
    "detection_metrics",
    "newcombe_interval",
    "wilson_interval",
]


Z95 = 1.959963984540054
"""The standard normal quantile of 0.975 (two-sided 95%)."""

_VERDICT_COLUMNS = ("detected", "identified", "forced_identified")


def wilson_interval(k: int, n: int, *, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes out of ``n`` trials; ``(nan, nan)`` when ``n == 0``.

    Computed by :func:`scipy.stats.binomtest` (``method="wilson"``) at the confidence level of a two-sided
    ``z`` (``erf(z/√2)``; 0.95 for the default), so the Newcombe interval can pass its own ``z``.
    """
    if isinstance(k, bool) or isinstance(n, bool) or n < 0 or not 0 <= k <= max(n, 0):
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:  # binomtest refuses n = 0
        return (math.nan, math.nan)
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=math.erf(z / math.sqrt(2)), method="wilson")
    return (max(0.0, float(ci.low)), min(1.0, float(ci.high)))


def newcombe_interval(k1: int, n1: int, k2: int, n2: int, *, z: float = Z95) -> tuple[float, float]:
    """Newcombe's hybrid score interval for ``k1/n1 - k2/n2`` (independent samples), built from Wilson's.

    ``lo = d - sqrt((p1 - l1)² + (u2 - p2)²)``, ``hi = d + sqrt((u1 - p1)² + (p2 - l2)²)``;
    ``(nan, nan)`` if either sample is empty.
    """
    if n1 == 0 or n2 == 0:
        return (math.nan, math.nan)
    p1, p2 = k1 / n1, k2 / n2
    (l1, u1), (l2, u2) = wilson_interval(k1, n1, z=z), wilson_interval(k2, n2, z=z)
    d = p1 - p2
    return (d - math.hypot(p1 - l1, u2 - p2), d + math.hypot(u1 - p1, p2 - l2))


def _rate(name: str, k: int, n: int) -> dict[str, float]:
    """``{name, name_lo, name_hi}`` for ``k`` of ``n``."""
    lo, hi = wilson_interval(k, n)
    return {name: k / n if n else math.nan, f"{name}_lo": lo, f"{name}_hi": hi}


def _flag(series: pd.Series) -> pd.Series:
    """A verdict column as nullable booleans (accepts bool, 0/1, None/NaN, pandas "boolean")."""
    return series.astype("boolean")


def _check_columns(df: pd.DataFrame, by: Sequence[str]) -> None:
    """Raise a ValueError naming the missing and available columns, or unknown conditions."""
    needed = [*by, "condition", *_VERDICT_COLUMNS]
    missing = [c for c in dict.fromkeys(needed) if c not in df.columns]
    if missing:
        raise ValueError(f"missing columns {missing}; available columns: {sorted(map(str, df.columns))}")
    unknown = sorted(set(df["condition"].dropna().astype(str)) - set(CONDITIONS))
    if unknown:
        raise ValueError(f"unknown condition values {unknown}; valid conditions: {list(CONDITIONS)}")
    for column in ("judge", "model"):
        if column in df.columns and column not in by and df[column].nunique(dropna=False) > 1:
            raise ValueError(
                f"the trials mix several values of {column!r} ({sorted(df[column].astype(str).unique())}); "
                f"add {column!r} to by=, or filter first"
            )


def _condition_stats(rows: pd.DataFrame, condition: str) -> tuple[pd.DataFrame, int]:
    """The error-free rows of one condition with their needed verdict present, and the error count."""
    rows = rows[rows["condition"] == condition]
    errors = error_mask(rows["judge_error"]) if "judge_error" in rows else pd.Series(False, index=rows.index)
    needed = "forced_identified" if condition == "forced" else "detected"
    valid = rows[~errors & _flag(rows[needed]).notna()]
    return valid, int(errors.sum())


def _group_row(trials: pd.DataFrame, controls: pd.DataFrame) -> dict[str, float]:
    """Counts and rates for one group's injection/forced rows and its matching control rows."""
    inj, inj_err = _condition_stats(trials, "injection")
    ctl, ctl_err = _condition_stats(controls, "control")
    forced, forced_err = _condition_stats(trials, "forced")
    detected = _flag(inj["detected"]).fillna(False).astype(bool)
    identified = _flag(inj["identified"]).fillna(False).astype(bool)
    k_tp, k_fp = int(detected.sum()), int(_flag(ctl["detected"]).fillna(False).astype(bool).sum())
    out: dict[str, float] = {
        "n_injection": len(inj),
        "n_control": len(ctl),
        "n_forced": len(forced),
        "n_errors": inj_err + ctl_err + forced_err,
        "n_errors_injection": inj_err,
        "n_errors_control": ctl_err,
        "n_errors_forced": forced_err,
    }
    out |= _rate("tpr", k_tp, len(inj)) | _rate("fpr", k_fp, len(ctl))
    lo, hi = newcombe_interval(k_tp, len(inj), k_fp, len(ctl))
    diff = out["tpr"] - out["fpr"] if len(inj) and len(ctl) else math.nan
    out |= {"discrimination": diff, "discrimination_lo": lo, "discrimination_hi": hi}
    out |= _rate("introspection", int((detected & identified).sum()), len(inj))
    out |= _rate("id_given_detection", int(identified[detected].sum()), k_tp)
    k_forced = int(_flag(forced["forced_identified"]).fillna(False).astype(bool).sum())
    return out | _rate("forced_id", k_forced, len(forced))


def _key(value: object) -> tuple:
    """A groupby key as a tuple."""
    return value if isinstance(value, tuple) else (value,)


def detection_metrics(
    df: pd.DataFrame, *, by: Sequence[str] = ("layer", "strength", "variant", "persona")
) -> pd.DataFrame:
    """One row per group of trials: counts, judge errors, and rates with 95% Wilson bounds.

    Columns: the ``by`` columns; ``n_injection``, ``n_control``, ``n_forced`` (rows in the denominators);
    ``n_errors`` and ``n_errors_{injection,control,forced}`` (judge errors, left out of denominators);
    ``tpr`` = P(detected | injection); ``fpr`` = P(detected | control), from the controls matching every
    ``by`` column but ``strength`` (see the module docstring); ``discrimination`` = tpr - fpr (Newcombe
    interval from the two Wilson intervals); ``introspection`` = P(detected & identified | injection);
    ``id_given_detection`` = P(identified | injection & detected); ``forced_id`` =
    P(forced_identified | forced); each rate with ``_lo`` and ``_hi``. Empty denominators give NaN.
    If ``df`` mixes several judges or models, ``by`` must include ``judge`` / ``model``.
    """
    by = list(by)
    _check_columns(df, by)
    control_by = [c for c in by if c != "strength"]
    is_control = df["condition"] == "control"
    trials, controls = df[~is_control], df[is_control]
    control_groups = _groups(controls, control_by)
    rows, used = [], set()
    for key, group in _groups(trials, by).items():
        ctl_key = tuple(v for c, v in zip(by, key, strict=True) if c != "strength")
        used.add(ctl_key)
        matched = control_groups.get(ctl_key, controls.iloc[:0])
        rows.append(dict(zip(by, key, strict=True)) | _group_row(group, matched))
    for ctl_key, group in control_groups.items():
        if ctl_key in used:
            continue
        key = dict(zip(control_by, ctl_key, strict=True))  # controls alone: an FPR-only group
        if "strength" in by:
            key["strength"] = group["strength"].iloc[0]
        rows.append({c: key[c] for c in by} | _group_row(trials.iloc[:0], group))
    columns = [*by, *_group_row(df.iloc[:0], df.iloc[:0])]
    out = pd.DataFrame(rows, columns=columns)
    return out.sort_values(by, kind="stable").reset_index(drop=True) if by and len(out) else out


def _groups(df: pd.DataFrame, by: list[str]) -> dict[tuple, pd.DataFrame]:
    """``{key tuple: rows}``; everything under the key ``()`` when ``by`` is empty."""
    if not by:
        return {(): df} if len(df) else {}
    return {_key(k): g for k, g in df.groupby(by, dropna=False, sort=True)}


# ----------------------------------------------------------------------------------------------- per concept

CONCEPT_RATE_COLUMNS = (
    "concept",
    "detection_rate",
    "introspection_rate",
    "forced_id_rate",
    "n_injection",
    "n_forced",
    "n_errors",
)
"""The columns of :func:`concept_rates`."""


def concept_rates(trials: Any, *, strength: float | None = None, layer: int | None = None) -> pd.DataFrame:
    """Per-concept rates from trials, one row per concept, with the judge-error rule of
    :func:`detection_metrics`: a row whose ``judge_error`` is set is left out of every denominator and counted
    in ``n_errors``.

    Args:
        trials: a :class:`~mechintro.behaviour.store.TrialStore` (anything with ``load()``), a trial DataFrame
            (columns concept, condition, detected, forced_identified; optionally identified, judge_error,
            strength, layer), or a per-concept table that already has ``detection_rate`` and
            ``forced_id_rate`` (returned as is, with ``introspection_rate`` NaN when it lacks one).
        strength / layer: keep only trials run at this strength / injection layer (when the column exists).

    Returns :data:`CONCEPT_RATE_COLUMNS`, sorted by concept: ``detection_rate`` = P(detected | injection);
    ``introspection_rate`` = P(detected and identified | injection), a missing ``identified`` verdict counting
    as not identified (NaN without an ``identified`` column); ``forced_id_rate`` = P(forced_identified |
    forced); ``n_injection`` and ``n_forced``, the rows in those denominators; ``n_errors``, the judge errors
    among the concept's injection and forced rows. Rows whose needed verdict is missing without an error are
    left out too. A concept has a row when some injection or forced row of it entered a denominator or
    failed its judge; an empty denominator gives NaN.
    """
    df = trials.load() if hasattr(trials, "load") else trials
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"trials must be a TrialStore or a DataFrame, got {type(trials).__name__}")
    if {"detection_rate", "forced_id_rate"} <= set(df.columns):
        return df if "introspection_rate" in df.columns else df.assign(introspection_rate=math.nan)
    rows, errors = _concept_trial_rows(df, strength=strength, layer=layer)
    valid = rows[~errors]
    inj = valid[valid["condition"] == "injection"].dropna(subset=["detected"])
    forced = valid[valid["condition"] == "forced"].dropna(subset=["forced_identified"])
    n_errors = errors.groupby(rows["concept"]).sum()
    table = (
        _mean_by_concept(inj, inj["detected"], "detection_rate", "n_injection")
        .join(_mean_by_concept(inj, _introspected(inj), "introspection_rate"), how="outer")
        .join(
            _mean_by_concept(forced, forced["forced_identified"], "forced_id_rate", "n_forced"), how="outer"
        )
    )
    concepts = table.index.union(n_errors.index[n_errors > 0])
    table = table.reindex(concepts).rename_axis("concept").assign(n_errors=n_errors.reindex(concepts))
    counts = ["n_injection", "n_forced", "n_errors"]
    table[counts] = table[counts].fillna(0).astype(int)
    return table.reset_index()[list(CONCEPT_RATE_COLUMNS)]


def _concept_trial_rows(
    df: pd.DataFrame, *, strength: float | None, layer: int | None
) -> tuple[pd.DataFrame, pd.Series]:
    """The injection and forced rows (at ``strength`` / ``layer`` when given) and their judge-error mask."""
    need = {"concept", "condition", "detected", "forced_identified"}
    if missing := sorted(need - set(df.columns)):
        raise ValueError(f"the trial table lacks {missing}; it has {sorted(map(str, df.columns))}")
    for column, value in (("strength", strength), ("layer", layer)):
        if value is not None and column in df.columns:
            df = df[np.isclose(df[column].astype(float), float(value))]
    rows = df[df["condition"].isin(("injection", "forced"))]
    if "judge_error" not in rows.columns:
        return rows, pd.Series(False, index=rows.index)
    return rows, error_mask(rows["judge_error"])


def _introspected(inj: pd.DataFrame) -> pd.Series:
    """Detected and identified, per injection row (a missing ``identified`` is not identified); NaN without
    an ``identified`` column."""
    if "identified" not in inj.columns:
        return pd.Series(math.nan, index=inj.index, dtype=float)
    return inj["detected"].astype(bool) & inj["identified"].fillna(False).astype(bool)


def _mean_by_concept(
    rows: pd.DataFrame, values: pd.Series, name: str, count: str | None = None
) -> pd.DataFrame:
    """Per concept of ``rows``: the mean of ``values`` (as floats) as ``name``, and the rows as ``count``."""
    grouped = values.astype(float).groupby(rows["concept"])
    out = grouped.mean().rename(name).to_frame()
    return out.assign(**{count: grouped.size()}) if count else out
