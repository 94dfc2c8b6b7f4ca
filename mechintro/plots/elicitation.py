"""Figures of the elicitation experiments: one plotly builder per figure, returning a ``Figure``.

Save them with :func:`mechintro.plots.save.save_figure`. Inputs are the tidy tables of
:mod:`mechintro.studies.bias` and :func:`mechintro.behaviour.metrics.detection_metrics` (rates with ``_lo`` /
``_hi``
95% Wilson bounds); the paper's series come from :func:`mechintro.studies.bias.paper_bias_layer_sweep` and
:func:`~mechintro.studies.bias.paper_bias_injection_sweep`, on a relative-depth axis (layer / n_layers).

* :func:`bias_layer_figure` -- the paper's Figure 16 left: rates against the depth of the bias layer.
* :func:`bias_injection_figure` -- Figure 16 right: rates against the injection layer's depth, per arm.
* :func:`dose_figure` -- TPR against strength without the bias, and each biased arm's dose-equivalent.
* :func:`gains_figure` -- each arm's change in every rate, beside the paper's text.
* :func:`direction_ablation_figure` -- rates against strength with a direction ablated (and controls).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from mechintro.plots.style import METRICS, STYLE

__all__ = [
    "bias_injection_figure",
    "bias_layer_figure",
    "direction_ablation_figure",
    "dose_figure",
    "gains_figure",
]

COLORS = qualitative.D3
NONE_COLOR = "#555555"
SHORT = {"tpr": "TPR", "fpr": "FPR", "introspection": "introspection", "forced_id": "forced identification"}


def _style(fig: go.Figure, *, title: str, height: int) -> go.Figure:
    fig.update_layout(
        template=STYLE.template,
        title={"text": title, "x": 0.01},
        height=height,
        autosize=True,
        font={"family": STYLE.font, "size": STYLE.font_size},
        margin={"l": 70, "r": 30, "t": 100, "b": 60},
    )
    return fig


def _rgba(color: str, alpha: float) -> str:
    r, g, b = (int(color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r}, {g}, {b}, {alpha})"


def _check(df: pd.DataFrame, needed: Sequence[str], *, what: str) -> pd.DataFrame:
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(f"{what} lacks the columns {missing}; it has {sorted(map(str, df.columns))}")
    return df


def _rate_columns(metrics: Sequence[str]) -> list[str]:
    return [f"{m}{s}" for m in metrics for s in ("", "_lo", "_hi")]


def _line(
    fig: go.Figure,
    rows: pd.DataFrame,
    *,
    x: str,
    metric: str,
    name: str,
    color: str,
    row: int,
    col: int,
    show: bool,
    dash: str | None = None,
    group: str | None = None,
) -> None:
    """A line with markers and a 95% band."""
    rows = rows.sort_values(x)
    xs, lo, hi = rows[x].tolist(), rows[f"{metric}_lo"].tolist(), rows[f"{metric}_hi"].tolist()
    group = group or name
    fig.add_trace(
        go.Scatter(
            x=[*xs, *xs[::-1]],
            y=[*hi, *lo[::-1]],
            fill="toself",
            fillcolor=_rgba(color, STYLE.band_opacity),
            line={"width": 0},
            mode="lines",
            hoverinfo="skip",
            showlegend=False,
            legendgroup=group,
        ),
        row=row,
        col=col,
    )
    fig.add_trace(
        go.Scatter(
            x=xs,
            y=rows[metric],
            mode="lines+markers",
            marker={"size": 5},
            line={"color": color, "dash": dash},
            name=name,
            legendgroup=group,
            showlegend=show,
            customdata=list(zip(lo, hi, strict=True)),
            hovertemplate=f"{x} %{{x:.3f}}<br>{metric} %{{y:.3f}} [%{{customdata[0]:.3f}}, "
            "%{customdata[1]:.3f}]<extra>" + name + "</extra>",
        ),
        row=row,
        col=col,
    )


def _hline(fig: go.Figure, y: float, *, color: str, row: int, col: int, text: str | None = None) -> None:
    if math.isfinite(y):
        fig.add_hline(
            y=y,
            line={"color": color, "dash": "dot", "width": 1.5},
            row=row,
            col=col,
            annotation_text=text,
            annotation_font_size=10,
        )


# ----------------------------------------------------------------------------------------------- Figure 16


def bias_layer_figure(
    ours: pd.DataFrame,
    paper: pd.DataFrame,
    *,
    model_name: str = "organism",
    injection_depth: float | None = None,
    metrics: Sequence[str] = ("tpr", "fpr", "introspection", "forced_id"),
    title: str = "A trained bias vector: rates against the layer it is added to (Figure 16 left)",
) -> go.Figure:
    """Rates (one panel each) against the relative depth of the bias layer, ours beside the paper's.

    Args:
        ours: one row per bias layer: ``bias_layer`` (-1 = no bias), ``depth`` and each rate with its bounds.
        paper: :func:`mechintro.studies.bias.paper_bias_layer_sweep` (pooled over its six named cells).
        injection_depth: our injection layer's relative depth (a vertical marker).

    The no-bias rows are drawn as dotted horizontal lines (ours and the paper's).
    """
    for frame, what in ((ours, "ours"), (paper, "paper")):
        _check(frame, ["bias_layer", "depth", *_rate_columns(metrics)], what=f"bias_layer_figure's {what}")
    fig = make_subplots(
        rows=1, cols=len(metrics), subplot_titles=[SHORT[m] for m in metrics], horizontal_spacing=0.06
    )
    sources = (
        (ours, f"ours: {model_name}", COLORS[0], None),
        (paper, "paper: Gemma3-27B-IT (fig2 rows, 6 cells pooled)", COLORS[1], "dash"),
    )
    for col, metric in enumerate(metrics, start=1):
        for frame, name, color, dash in sources:
            biased, none = frame[frame["bias_layer"] >= 0], frame[frame["bias_layer"] < 0]
            _line(
                fig,
                biased,
                x="depth",
                metric=metric,
                name=name,
                color=color,
                row=1,
                col=col,
                show=col == 1,
                dash=dash,
            )
            if len(none):
                _hline(fig, float(none[metric].iloc[0]), color=color, row=1, col=col)
        if injection_depth is not None:
            line = {"color": "#999999", "dash": "dash", "width": 1}
            fig.add_vline(x=injection_depth, line=line, row=1, col=col)
        fig.update_yaxes(range=[-0.02, 1.02], row=1, col=col)
        fig.update_xaxes(title_text="bias layer / n_layers", range=[-0.02, 1.0], row=1, col=col)
    title += (
        "<br><sup>dotted: without the bias; dashed vertical: our injection layer; bands: 95% Wilson</sup>"
    )
    return _style(fig, title=title, height=460)


def bias_injection_figure(
    ours: pd.DataFrame,
    paper: pd.DataFrame,
    *,
    model_name: str = "organism",
    metrics: Sequence[str] = ("tpr", "introspection", "forced_id", "fpr"),
    title: str = "A trained bias vector: rates against the injection layer (Figure 16 right)",
) -> go.Figure:
    """Rates (rows) against the injection layer's relative depth, one line per arm, ours and the paper's.

    Args:
        ours / paper: one row per (arm, injection layer): ``arm`` ("none" or "bias L{b}"), ``bias_layer``
            (-1 for none), ``depth`` (injection layer / n_layers) and each rate with its bounds. ``paper`` is
            :func:`mechintro.studies.bias.paper_bias_injection_sweep` (fig3, its own baseline arm).

    A vertical dotted line in an arm's color marks the depth of its bias layer.
    """
    for frame, what in ((ours, "ours"), (paper, "paper")):
        _check(frame, ["arm", "bias_layer", "depth", *_rate_columns(metrics)], what=f"bias_injection {what}")
    fig = make_subplots(
        rows=len(metrics),
        cols=2,
        shared_yaxes=True,
        vertical_spacing=0.05,
        horizontal_spacing=0.04,
        column_titles=[f"Ours: {model_name}", "Paper: Gemma3-27B-IT (fig3 rows, strength 4)"],
    )
    for col, (frame, source) in enumerate(((ours, "ours"), (paper, "paper")), start=1):
        arms = frame.drop_duplicates("arm").sort_values("bias_layer")[["arm", "bias_layer"]]
        biased = [a for a, b in arms.itertuples(index=False) if b >= 0]
        for arm, bias_layer in arms.itertuples(index=False):
            color = NONE_COLOR if bias_layer < 0 else COLORS[biased.index(arm) % len(COLORS)]
            rows = frame[frame["arm"] == arm]
            n_layers = _n_layers(rows)
            for r, metric in enumerate(metrics, start=1):
                _line(
                    fig,
                    rows,
                    x="depth",
                    metric=metric,
                    name=f"{source}: {arm}",
                    color=color,
                    row=r,
                    col=col,
                    show=r == 1,
                    group=f"{source} {arm}",
                )
                if bias_layer >= 0 and n_layers:
                    line = {"color": color, "dash": "dot", "width": 1}
                    fig.add_vline(x=bias_layer / n_layers, line=line, row=r, col=col)
    for r, metric in enumerate(metrics, start=1):
        fig.update_yaxes(title_text=SHORT[metric], range=[-0.02, 1.02], row=r, col=1)
    fig.update_xaxes(title_text="injection layer / n_layers", range=[-0.02, 1.0], row=len(metrics))
    title += "<br><sup>dotted vertical: the arm's bias layer; bands: 95% intervals</sup>"
    return _style(fig, title=title, height=STYLE.panel_height * len(metrics) + 140)


def _n_layers(rows: pd.DataFrame) -> float:
    """The number of layers implied by depth = layer / n_layers (from a row with layer > 0)."""
    ok = rows[(rows["injection_layer"] > 0)] if "injection_layer" in rows.columns else rows.iloc[:0]
    if not len(ok):
        return 0.0
    first = ok.iloc[0]
    return round(float(first["injection_layer"]) / float(first["depth"]))


# ----------------------------------------------------------------------------------------------- dose, gains


def dose_figure(
    curve: pd.DataFrame,
    arms: pd.DataFrame,
    *,
    title: str = "Dose-equivalent gain: the strength that gives the biased TPR without the bias",
) -> go.Figure:
    """TPR against strength without the bias (line, band), and each biased arm's TPR at its strength.

    Args:
        curve: ``strength``, ``tpr``, ``tpr_lo``, ``tpr_hi`` (no bias).
        arms: one row per biased arm: ``arm``, ``strength`` (where measured), ``tpr`` and
            ``dose_strength`` (:func:`mechintro.studies.bias.dose_equivalent_strength`; inf / NaN allowed).
    """
    _check(curve, ["strength", "tpr", "tpr_lo", "tpr_hi"], what="dose_figure's curve")
    _check(arms, ["arm", "strength", "tpr", "dose_strength"], what="dose_figure's arms")
    fig = go.Figure()
    rows = curve.sort_values("strength")
    xs = rows["strength"].tolist()
    fig.add_trace(
        go.Scatter(
            x=[*xs, *xs[::-1]],
            y=[*rows["tpr_hi"], *rows["tpr_lo"][::-1]],
            fill="toself",
            fillcolor=_rgba(NONE_COLOR, STYLE.band_opacity),
            line={"width": 0},
            hoverinfo="skip",
            showlegend=False,
        )
    )
    fig.add_trace(
        go.Scatter(x=xs, y=rows["tpr"], mode="lines+markers", line={"color": NONE_COLOR}, name="no bias")
    )
    for k, arm in enumerate(arms.itertuples(index=False)):
        color = COLORS[k % len(COLORS)]
        fig.add_trace(
            go.Scatter(
                x=[arm.strength],
                y=[arm.tpr],
                mode="markers",
                marker={"size": 11, "color": color},
                name=f"{arm.arm}: TPR {arm.tpr:.2f} at strength {arm.strength:g}",
            )
        )
        if math.isfinite(arm.dose_strength):
            fig.add_trace(
                go.Scatter(
                    x=[arm.strength, arm.dose_strength],
                    y=[arm.tpr, arm.tpr],
                    mode="lines+markers",
                    line={"color": color, "dash": "dot"},
                    marker={"symbol": "x", "size": 9},
                    name=f"{arm.arm}: dose-equivalent {arm.dose_strength:.2f} "
                    f"(gain {arm.dose_strength - arm.strength:+.2f})",
                )
            )
    fig.update_layout(
        xaxis={"title": "injection strength (no bias)"}, yaxis={"title": "TPR", "range": [-0.02, 1.02]}
    )
    return _style(fig, title=title, height=480)


def gains_figure(
    gains: pd.DataFrame,
    *,
    paper: Mapping[str, float] | None = None,
    metrics: Sequence[str] = ("tpr", "forced_id", "introspection", "fpr"),
    group: str = "arm",
    title: str = "Change with the bias, in points (arm minus no bias, Newcombe 95% intervals)",
) -> go.Figure:
    """Grouped bars: each row of ``gains`` (:func:`mechintro.studies.bias.arm_gains`) is one bar group member,
    one group per metric; ``paper`` (e.g. :data:`mechintro.studies.bias.PAPER_TEXT`) adds the paper's text."""
    _check(gains, [group, *(f"d_{m}{s}" for m in metrics for s in ("", "_lo", "_hi"))], what="gains_figure")
    fig = go.Figure()
    labels = [SHORT[m] for m in metrics]
    for k, row in enumerate(gains.itertuples(index=False)):
        values = [getattr(row, f"d_{m}") for m in metrics]
        lo = [getattr(row, f"d_{m}_lo") for m in metrics]
        hi = [getattr(row, f"d_{m}_hi") for m in metrics]
        fig.add_bar(
            x=labels,
            y=values,
            name=str(getattr(row, group)),
            marker_color=COLORS[k % len(COLORS)],
            error_y={
                "type": "data",
                "array": [h - v for h, v in zip(hi, values, strict=True)],
                "arrayminus": [v - lo_ for v, lo_ in zip(values, lo, strict=True)],
            },
        )
    if paper:
        key = {"fpr": "fpr_after"}
        fig.add_trace(
            go.Scatter(
                x=labels,
                y=[paper.get(key.get(m, m), math.nan) for m in metrics],
                mode="markers",
                marker={"symbol": "diamond-open", "size": 14, "color": "black", "line": {"width": 2}},
                name="paper's text (Gemma3-27B-IT; FPR: its level after, 0%)",
            )
        )
    fig.update_layout(barmode="group", yaxis={"title": "change (absolute points)"})
    return _style(fig, title=title, height=480)


# ----------------------------------------------------------------------------------------------- ablation


def direction_ablation_figure(
    metrics_table: pd.DataFrame,
    *,
    metrics: Sequence[str] = ("tpr", "fpr", "introspection"),
    title: str = 'Ablating the gates\' "say No" direction vs norm-matched random directions',
) -> go.Figure:
    """Rates (one panel each) against injection strength, one line per value of ``ablation``.

    ``metrics_table`` is ``detection_metrics(df, by=("ablation", "strength"))``, ``ablation`` naming the
    direction ablated ("none"; names starting with "random" are drawn dotted). FPR comes from the controls,
    which have no strength, so each line's FPR is flat.
    """
    needed = ["ablation", "strength", *_rate_columns(metrics)]
    _check(metrics_table, needed, what="direction_ablation_figure")
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[METRICS[m].split(":")[0] for m in metrics])
    conditions = list(dict.fromkeys(metrics_table["ablation"]))
    for k, condition in enumerate(conditions):
        rows = metrics_table[metrics_table["ablation"] == condition]
        color = NONE_COLOR if condition == "none" else COLORS[k % len(COLORS)]
        dash = "dot" if condition.startswith("random") else None
        injected = rows[rows["n_injection"] > 0] if "n_injection" in rows.columns else rows
        for col, metric in enumerate(metrics, start=1):
            _line(
                fig,
                injected,
                x="strength",
                metric=metric,
                name=condition,
                color=color,
                row=1,
                col=col,
                show=col == 1,
                dash=dash,
            )
            fig.update_yaxes(range=[-0.02, 1.02], row=1, col=col)
            fig.update_xaxes(title_text="injection strength", row=1, col=col)
    return _style(fig, title=title + "<br><sup>bands: 95% Wilson intervals</sup>", height=440)
