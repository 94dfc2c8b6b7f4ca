"""Behaviour figures. Builders return a ``Figure`` in the shared style (:mod:`mechintro.plots.style`); nothing
is saved here (:func:`mechintro.plots.save.save_figure` writes ``<name>.html`` and ``<name>.png``).

Inputs are the tidy metric tables of :func:`mechintro.behaviour.metrics.detection_metrics` (one row per group;
each rate with ``_lo``/``_hi`` 95% Wilson bounds).

* :func:`layer_sweep_figure`: TPR, FPR, introspection and forced identification vs injection layer, one line
  (with a CI band) per strength; a second column shows the paper's Gemma3-27B-IT series
  (:func:`paper_layer_metrics`).
* :func:`variants_figure` / :func:`personas_figure`: TPR and FPR bars with CI error bars per prompt variant /
  persona variant.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from mechintro.core import resources
from mechintro.core.prompts import PERSONAS, VARIANTS
from mechintro.plots.style import METRICS, STYLE, apply_style, rgba, strength_colors

__all__ = [
    "layer_sweep_figure",
    "paper_layer_metrics",
    "personas_figure",
    "rate_bars_figure",
    "variants_figure",
]

PAPER_FIG1 = "paper_metrics/fig1_metrics_cache.parquet"
PAPER_COLUMNS = {
    "detection_hit_rate": "tpr",
    "detection_false_alarm_rate": "fpr",
    "combined_detection_and_identification_rate": "introspection",
    "forced_identification_accuracy": "forced_id",
}
"""The paper's released metric names -> ours."""


# ----------------------------------------------------------------------------------------------- data


def paper_layer_metrics(path: str | Path | None = None) -> pd.DataFrame:
    """The paper's Gemma3-27B-IT metrics per (layer, strength), with our column names.

    Reads ``paper_metrics/fig1_metrics_cache.parquet`` (package data) (62 layers x strengths 1..5) and returns
    columns layer, strength, and for each of tpr, fpr, introspection, forced_id the rate and its ``_lo`` /
    ``_hi`` 95% bounds, plus n_injection, n_control, n_forced.
    """
    raw = pd.read_parquet(Path(path) if path else resources.reference(PAPER_FIG1))
    bounds = [f"{c}_ci_{s}" for c in PAPER_COLUMNS for s in ("lower", "upper")]
    needed = ["layer_idx", "strength", *PAPER_COLUMNS, *bounds]
    missing = [c for c in needed if c not in raw.columns]
    if missing:
        raise ValueError(f"{path or PAPER_FIG1} lacks the columns {missing}")
    out = pd.DataFrame({"layer": raw["layer_idx"].astype(int), "strength": raw["strength"].astype(float)})
    for theirs, ours in PAPER_COLUMNS.items():
        out[ours] = raw[theirs].astype(float)
        out[f"{ours}_lo"] = raw[f"{theirs}_ci_lower"].astype(float)
        out[f"{ours}_hi"] = raw[f"{theirs}_ci_upper"].astype(float)
    for n in ("n_injection", "n_control", "n_forced"):
        out[n] = raw[n].astype(int)
    return out.sort_values(["strength", "layer"]).reset_index(drop=True)


def _check_metrics(metrics: pd.DataFrame, keys: Sequence[str], *, what: str) -> pd.DataFrame:
    """``metrics`` with one row per ``keys``; raise naming the offending extra grouping otherwise."""
    needed = [*keys, *(f"{m}{s}" for m in METRICS for s in ("", "_lo", "_hi"))]
    missing = [c for c in needed if c not in metrics.columns]
    if missing:
        raise ValueError(f"{what} needs detection_metrics output; missing columns {missing}")
    if metrics.duplicated(list(keys)).any():
        raise ValueError(
            f"{what} needs one metrics row per {list(keys)}; filter the trials first (or group by "
            f"{list(keys)})"
        )
    return metrics


# ----------------------------------------------------------------------------------------------- layer sweep


def _band(x: Sequence, lo: Sequence, hi: Sequence, *, color: str, group: str) -> go.Scatter:
    """A filled CI band between ``lo`` and ``hi`` (gaps where a bound is NaN are bridged)."""
    return go.Scatter(
        x=[*x, *x[::-1]],
        y=[*hi, *lo[::-1]],
        fill="toself",
        fillcolor=rgba(color, STYLE.band_opacity),
        mode="lines",
        line={"width": 0},
        hoverinfo="skip",
        showlegend=False,
        legendgroup=group,
    )


def _add_series(
    fig: go.Figure, metrics: pd.DataFrame, *, col: int, source: str, colors: dict[float, str]
) -> None:
    """Lines with CI bands of every metric (rows) and strength (colors) into column ``col``."""
    for strength, rows in metrics.sort_values("layer").groupby("strength", sort=True):
        color, group = colors[strength], f"{source} {strength:g}"
        x = rows["layer"].tolist()
        for row, metric in enumerate(METRICS, start=1):
            lo, hi = rows[f"{metric}_lo"].tolist(), rows[f"{metric}_hi"].tolist()
            fig.add_trace(_band(x, lo, hi, color=color, group=group), row=row, col=col)
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=rows[metric],
                    mode="lines+markers",
                    marker={"size": 4},
                    line={"color": color},
                    name=f"{source}: strength {strength:g}",
                    legendgroup=group,
                    showlegend=row == 1,
                    customdata=list(zip(lo, hi, strict=True)),
                    hovertemplate=f"layer %{{x}}<br>{metric} %{{y:.3f}} [%{{customdata[0]:.3f}}, "
                    "%{customdata[1]:.3f}]<extra>" + f"{source}, strength {strength:g}</extra>",
                ),
                row=row,
                col=col,
            )


def layer_sweep_figure(
    metrics: pd.DataFrame,
    *,
    paper: pd.DataFrame | None = None,
    model_name: str = "ours",
    title: str = "Detection and identification vs injection layer",
) -> go.Figure:
    """TPR, FPR, introspection and forced identification (rows) vs layer, one line per strength.

    Args:
        metrics: ``detection_metrics(df, by=("layer", "strength"))`` of one model, variant and persona
            (one row per layer and strength; FPR-only rows with no injection trials are dropped).
        paper: the second column's data; default :func:`paper_layer_metrics` (the paper's Gemma3-27B-IT).
        model_name: names the first column.

    Bands are 95% Wilson intervals. The two columns have their own layer axes (62 layers vs ours).
    """
    ours = _check_metrics(metrics, ("layer", "strength"), what="layer_sweep_figure")
    if {"n_injection", "n_forced"} <= set(ours.columns):
        ours = ours[(ours["n_injection"] > 0) | (ours["n_forced"] > 0)]
    paper = paper_layer_metrics() if paper is None else paper
    fig = make_subplots(
        rows=len(METRICS),
        cols=2,
        shared_yaxes=True,
        vertical_spacing=0.05,
        horizontal_spacing=0.04,
        column_titles=[f"Ours: {model_name}", "Paper: Gemma3-27B-IT (released Fig. 1 metrics)"],
    )
    colors = strength_colors([*ours["strength"], *paper["strength"]])  # one color per strength in both
    _add_series(fig, ours, col=1, source="ours", colors=colors)
    _add_series(fig, paper, col=2, source="paper", colors=colors)
    for row, label in enumerate(METRICS.values(), start=1):
        fig.update_yaxes(title_text=label.split(":")[0], range=[-0.02, 1.02], row=row, col=1)
    fig.update_xaxes(title_text="injection layer (resid_post)", row=len(METRICS))
    if len(ours) and ours["layer"].nunique() <= 24:
        fig.update_xaxes(dtick=1, col=1)
    title += "<br><sup>lines: rate; bands: 95% Wilson intervals</sup>"
    return apply_style(fig, title=title, height=STYLE.panel_height * len(METRICS) + 120)


# ----------------------------------------------------------------------------------------------- bars


def rate_bars_figure(
    metrics: pd.DataFrame, *, axis: Literal["variant", "persona"], title: str | None = None
) -> go.Figure:
    """TPR and FPR bars per prompt variant or persona variant, with 95% Wilson error bars.

    ``metrics`` comes from ``detection_metrics(df, by=(axis,))``; bars follow the stimuli's order.
    """
    order = {"variant": VARIANTS, "persona": PERSONAS}
    if axis not in order:
        raise ValueError(f"unknown axis {axis!r}; valid: {sorted(order)}")
    rows = _check_metrics(metrics, (axis,), what=f"the {axis} figure")
    rank = {v: i for i, v in enumerate(order[axis])}
    rows = rows.assign(_rank=rows[axis].map(lambda v: rank.get(v, len(rank)))).sort_values(["_rank", axis])
    fig = go.Figure()
    for metric, color in zip(("tpr", "fpr"), STYLE.bar_colors, strict=True):
        value = rows[metric]
        fig.add_bar(
            x=rows[axis],
            y=value,
            name=METRICS[metric],
            marker_color=color,
            error_y={
                "type": "data",
                "array": rows[f"{metric}_hi"] - value,
                "arrayminus": value - rows[f"{metric}_lo"],
                "thickness": 1.2,
                "color": "#333333",
            },
        )
    fig.update_layout(barmode="group", yaxis={"title": "rate", "range": [0, 1.05]}, xaxis={"title": axis})
    default = {"variant": "Prompt variants: detection", "persona": "Persona variants: detection"}[axis]
    return apply_style(fig, title=title or default, height=460)


def variants_figure(metrics: pd.DataFrame, *, title: str = "Prompt variants: detection") -> go.Figure:
    """TPR and FPR per prompt variant (:func:`rate_bars_figure` with ``axis="variant"``)."""
    return rate_bars_figure(metrics, axis="variant", title=title)


def personas_figure(metrics: pd.DataFrame, *, title: str = "Persona variants: detection") -> go.Figure:
    """TPR and FPR per persona variant (:func:`rate_bars_figure` with ``axis="persona"``)."""
    return rate_bars_figure(metrics, axis="persona", title=title)
