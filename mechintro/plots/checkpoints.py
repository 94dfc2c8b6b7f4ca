"""Checkpoint-series figures: detection by training stage (Figure 5), one gate across checkpoints (Figure 14).

* :func:`stages_figure`: from :func:`mechintro.studies.checkpoints.compare_checkpoints`'s frame, grouped bars
  per checkpoint (in series order) of FPR, TPR and introspection (or any rates of the frame), with 95% Wilson
  error bars; ``scope="pooled"`` (default) pools each checkpoint's grid as the released stage plot does,
  ``scope="cell"`` gives one panel per (layer fraction, strength). The paper's numbers, when given, are drawn
  over the bars as black diamonds.
* :func:`gates_figure`: from :func:`mechintro.studies.checkpoints.compare_gates`'s frame, the gate's mean
  activation against strength, one line (with a 95% CI band across concepts) per checkpoint, the
  dictionary's reconstruction error (FVU) in each legend entry.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from mechintro.core.stats import mean_ci
from mechintro.plots.style import STYLE, apply_style, rgba

__all__ = ["RATE_LABELS", "conditions_figure", "gates_figure", "stages_figure"]

RATE_LABELS: dict[str, str] = {
    "fpr": "FPR: P(detect | control)",
    "tpr": "TPR: P(detect | injected)",
    "introspection": "P(detect & identify | injected)",
    "discrimination": "TPR - FPR",
    "forced_id": "Forced identification",
}
"""The rates :func:`stages_figure` can show, and their legend labels."""

_COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f")


def _need(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what} needs the columns {missing}; it has {sorted(map(str, df.columns))}")


def _bars(
    fig: go.Figure, rows: pd.DataFrame, rates: Sequence[str], *, row: int, col: int, show: bool
) -> None:
    for i, rate in enumerate(rates):
        values = rows[rate].astype(float)
        fig.add_trace(
            go.Bar(
                x=rows["checkpoint"],
                y=values,
                name=RATE_LABELS[rate],
                legendgroup=rate,
                showlegend=show,
                marker_color=_COLORS[i % len(_COLORS)],
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": (rows[f"{rate}_hi"].astype(float) - values).tolist(),
                    "arrayminus": (values - rows[f"{rate}_lo"].astype(float)).tolist(),
                },
                customdata=rows[["stage", "n_injection", "n_control"]].to_numpy(),
                hovertemplate="%{x} (%{customdata[0]}): %{y:.3f}<br>n injection %{customdata[1]}, "
                "control %{customdata[2]}<extra></extra>",
            ),
            row=row,
            col=col,
        )


def _paper_points(
    fig: go.Figure,
    paper: pd.DataFrame,
    rates: Sequence[str],
    order: list[str],
    *,
    row: int,
    col: int,
    show: bool,
) -> None:
    key = "checkpoint" if "checkpoint" in paper.columns else "stage"
    for rate in rates:
        if rate not in paper.columns:
            continue
        rows = paper[paper[key].isin(order)]
        fig.add_trace(
            go.Scatter(
                x=rows[key],
                y=rows[rate].astype(float),
                mode="markers",
                name="paper's text",
                legendgroup="paper",
                showlegend=show and rate == next(r for r in rates if r in paper.columns),
                marker={"symbol": "diamond", "color": "black", "size": 9},
                hovertemplate=f"paper's text, {RATE_LABELS[rate]}: %{{y:.3f}}<extra></extra>",
            ),
            row=row,
            col=col,
        )


def stages_figure(
    metrics: pd.DataFrame,
    *,
    rates: Sequence[str] = ("fpr", "tpr", "introspection"),
    scope: str = "pooled",
    paper: pd.DataFrame | None = None,
    title: str | None = None,
) -> go.Figure:
    """Detection by checkpoint: grouped bars of ``rates`` (:data:`RATE_LABELS`) with 95% CI error bars.

    Args:
        metrics: :func:`~mechintro.studies.checkpoints.compare_checkpoints`'s frame.
        rates: the rates to show, e.g. ``("discrimination",)`` for TPR - FPR alone.
        scope: ``"pooled"`` (one panel, each checkpoint's grid pooled) or ``"cell"`` (one panel per layer
            fraction (rows) and strength (columns)).
        paper: the paper's numbers, drawn as black diamonds labelled "paper's text": columns ``checkpoint``
            (or ``stage``, matched to the checkpoint labels) and any of the rates (fractions in [0, 1]).
    """
    unknown = [r for r in rates if r not in RATE_LABELS]
    if unknown or not rates:
        raise ValueError(f"unknown rates {unknown or list(rates)}; valid: {list(RATE_LABELS)}")
    if scope not in ("pooled", "cell"):
        raise ValueError(f"unknown scope {scope!r}; valid: ['cell', 'pooled']")
    need = ["checkpoint", "stage", "scope", "layer_fraction", "layer", "strength", "n_injection", "n_control"]
    _need(metrics, [*need, *(f"{r}{s}" for r in rates for s in ("", "_lo", "_hi"))], "stages_figure")
    if paper is not None:
        _need(paper, [], "paper")
        if not {"checkpoint", "stage"} & set(paper.columns):
            raise ValueError(f"paper needs a 'checkpoint' or 'stage' column; it has {sorted(paper.columns)}")
    order = list(dict.fromkeys(metrics["checkpoint"]))
    df = metrics[metrics["scope"] == scope]
    if scope == "pooled":
        fig = make_subplots(rows=1, cols=1)
        _bars(fig, df, rates, row=1, col=1, show=True)
        if paper is not None:
            _paper_points(fig, paper, rates, order, row=1, col=1, show=True)
        height = STYLE.panel_height + 220
    else:
        fractions = sorted(df["layer_fraction"].dropna().unique()) or [float("nan")]
        strengths = sorted(df["strength"].dropna().unique())
        fig = make_subplots(
            rows=len(fractions),
            cols=len(strengths),
            shared_yaxes=True,
            shared_xaxes=True,
            subplot_titles=[f"fraction {f:g}, strength {s:g}" for f in fractions for s in strengths],
        )
        for r, fraction in enumerate(fractions, start=1):
            for c, strength in enumerate(strengths, start=1):
                at_f = df["layer_fraction"].isna() if pd.isna(fraction) else df["layer_fraction"] == fraction
                cell = df[at_f & (df["strength"] == strength)]
                _bars(fig, cell, rates, row=r, col=c, show=(r, c) == (1, 1))
                if paper is not None:
                    _paper_points(fig, paper, rates, order, row=r, col=c, show=(r, c) == (1, 1))
        height = STYLE.panel_height * len(fractions) + 160
    fig.update_layout(barmode="group")
    fig.update_xaxes(categoryorder="array", categoryarray=order)
    fig.update_yaxes(title_text="rate", col=1)
    return apply_style(fig, title=title or "Detection by training stage", height=height)


def gates_figure(df: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """The gate's mean activation against injection strength per checkpoint (series order), with a 95% CI
    band across concepts; each legend entry gives the dictionary's FVU on that checkpoint.

    ``df``: :func:`~mechintro.studies.checkpoints.compare_gates`'s frame.
    """
    _need(df, ["checkpoint", "concept", "strength", "gate", "gate_activation", "fvu"], "gates_figure")
    order = list(dict.fromkeys(df["checkpoint"]))
    summary = mean_ci(df, ["checkpoint", "strength"], value="gate_activation")
    fvus = df.groupby("checkpoint")["fvu"].first()
    fig = go.Figure()
    for i, name in enumerate(order):
        rows = summary[summary["checkpoint"] == name].sort_values("strength")
        color = _COLORS[(i + 1) % len(_COLORS)]
        x = rows["strength"].tolist()
        fig.add_trace(
            go.Scatter(
                x=x + x[::-1],
                y=rows["hi"].tolist() + rows["lo"].tolist()[::-1],
                fill="toself",
                fillcolor=rgba(color, STYLE.band_opacity),
                line={"width": 0},
                hoverinfo="skip",
                showlegend=False,
                legendgroup=name,
            )
        )
        fig.add_trace(
            go.Scatter(
                x=x,
                y=rows["mean"],
                mode="lines+markers",
                name=f"{name} (FVU {fvus[name]:.3g})",
                legendgroup=name,
                line={"color": color},
            )
        )
    fig.update_xaxes(title_text="injection strength")
    fig.update_yaxes(title_text="gate activation")
    gate = df["gate"].iloc[0] if len(df) else "gate"
    return apply_style(fig, title=title or f"{gate} across checkpoints", height=STYLE.panel_height + 220)


def _paper_range(value: str | float | None) -> tuple[float, float] | None:
    """``"12.8%"`` -> (0.128, 0.128); ``"8.3% to 14.2%"`` -> (0.083, 0.142); None or NaN -> None."""
    if value is None or (isinstance(value, float) and value != value) or not str(value).strip():
        return None
    parts = [float(p.strip().rstrip("%")) / 100 for p in str(value).split(" to ")]
    return (parts[0], parts[-1])


def conditions_figure(metrics: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Table 3 as a figure: TPR - FPR per post-training condition (rows), one bar per strength with its 95%
    Newcombe interval, and the paper's number (a ``paper`` column, e.g. ``"12.8%"`` or ``"8.3% to 14.2%"``)
    as a black diamond or range labelled "paper's text".

    Args:
        metrics: :func:`~mechintro.studies.checkpoints.compare_checkpoints`'s ``scope == "cell"`` rows of the
            conditions, with a ``paper`` column (None where the paper gives no number).
    """
    need = ["checkpoint", "scope", "strength", "discrimination", "discrimination_lo", "discrimination_hi"]
    _need(metrics, need, "conditions_figure")
    cells = metrics[metrics["scope"] == "cell"]
    if cells.empty:
        raise ValueError("conditions_figure needs the frame's scope == 'cell' rows; it has none")
    order = list(dict.fromkeys(cells["checkpoint"]))
    fig = go.Figure()
    for i, (strength, rows) in enumerate(cells.groupby("strength", sort=True)):
        rows = rows.set_index("checkpoint").loc[order].reset_index()
        values = rows["discrimination"].astype(float)
        fig.add_trace(
            go.Bar(
                y=rows["checkpoint"],
                x=values,
                orientation="h",
                name=f"organism, strength {strength:g}",
                marker_color=_COLORS[i % len(_COLORS)],
                error_x={
                    "type": "data",
                    "symmetric": False,
                    "array": (rows["discrimination_hi"].astype(float) - values).tolist(),
                    "arrayminus": (values - rows["discrimination_lo"].astype(float)).tolist(),
                },
                hovertemplate="%{y}: TPR - FPR %{x:.3f}<extra></extra>",
            )
        )
    if "paper" in cells.columns:
        paper = cells.drop_duplicates("checkpoint").set_index("checkpoint")["paper"]
        first = True
        for name in order:
            span = _paper_range(paper.get(name))
            if span is None:
                continue
            fig.add_trace(
                go.Scatter(
                    y=[name, name] if span[0] != span[1] else [name],
                    x=list(span) if span[0] != span[1] else [span[0]],
                    mode="lines+markers",
                    line={"color": "black", "width": 3},
                    marker={"symbol": "diamond", "color": "black", "size": 9},
                    name="paper's text (OLMo 3, Table 3)",
                    legendgroup="paper",
                    showlegend=first,
                    hovertemplate=f"paper's text: {paper.get(name)}<extra></extra>",
                )
            )
            first = False
    fig.add_vline(x=0, line={"color": "grey", "width": 1})
    fig.update_layout(barmode="group", xaxis_title="TPR - FPR", yaxis={"autorange": "reversed"})
    return apply_style(
        fig,
        title=title or "Post-training conditions on the organism: TPR - FPR on held-out concepts",
        height=max(360, 22 * len(order) * max(1, cells["strength"].nunique()) + 160),
    )
