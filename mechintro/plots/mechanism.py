"""Figures of the mechanism half: one plotly builder per figure, returning a ``Figure`` (nothing is saved).

Save them with :func:`mechintro.plots.save.save_figure`. The inputs are the tidy tables of
:mod:`mechintro.mechanism.patching`, :mod:`mechintro.mechanism.features` and
:mod:`mechintro.mechanism.curves`; 95% intervals are Student-t
across concepts (logit scores, activations) or Wilson (sampled rates).

* :func:`patching_figure` -- per-layer attention/MLP ablation, patching and forced-identification ablation.
* :func:`gates_figure` -- the top gates by DLA score, and one gate's activation against strength.
* :func:`gate_curves_figure` -- progressive gate ablation / patching curves.
* :func:`carriers_figure` -- a gate's top evidence carriers (and suppressors) by attribution.
* :func:`carrier_ablation_figure` -- the gate's activation against strength with carrier sets ablated.
* :func:`base_vs_instruct_figure` -- the gate's activation against strength in two model variants.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from mechintro.core.stats import mean_ci
from mechintro.core.transcoders import parse_feature
from mechintro.mechanism.curves import summarize_gate_curves
from mechintro.mechanism.features import FeatureGrid
from mechintro.mechanism.patching import EXPERIMENTS, summarize_patching
from mechintro.plots.style import STYLE, apply_style, rgba

__all__ = [
    "base_vs_instruct_figure",
    "carrier_ablation_figure",
    "carriers_figure",
    "gate_curves_figure",
    "gates_figure",
    "patching_figure",
]

COLORS = qualitative.D3
"""Categorical colors."""

_EXPERIMENT_TITLES = {
    "ablation": "Ablation in steered runs (Yes-No gap)",
    "patching": "Patching into unsteered runs (Yes-No gap)",
    "forced_ablation": "Forced identification under ablation (P(concept))",
}
_SHORT_TITLES = {
    "ablation": "Ablation (steered runs)",
    "patching": "Patching (unsteered runs)",
    "forced_ablation": "Forced id. under ablation",
}
"""Titles of panels side by side: short enough not to overlap at 900 px."""


def _style(fig: go.Figure, *, title: str, height: int) -> go.Figure:
    return apply_style(fig, title=title, height=height, top=90)


def _line_with_band(
    fig: go.Figure,
    rows: pd.DataFrame,
    *,
    x: str,
    name: str,
    color: str,
    row: int,
    col: int,
    show: bool,
    dash: str | None = None,
) -> None:
    """A mean line (``mean``) with its CI band (``lo``, ``hi``) against ``x``."""
    rows = rows.sort_values(x)
    xs = rows[x].tolist()
    fig.add_trace(
        go.Scatter(
            x=[*xs, *xs[::-1]],
            y=[*rows["hi"], *rows["lo"][::-1]],
            fill="toself",
            mode="lines",
            fillcolor=rgba(color, STYLE.band_opacity),
            line={"width": 0},
            hoverinfo="skip",
            showlegend=False,
            legendgroup=name,
        ),
        row=row,
        col=col,
    )
    fig.add_trace(
        go.Scatter(
            x=xs,
            y=rows["mean"],
            mode="lines+markers",
            marker={"size": 5},
            line={"color": color, "dash": dash},
            name=name,
            legendgroup=name,
            showlegend=show,
        ),
        row=row,
        col=col,
    )


def _baseline(
    fig: go.Figure, stats: pd.Series, xs: Sequence, *, name: str, color: str, row: int, show: bool
) -> None:
    """A horizontal baseline with its CI band across ``xs``."""
    frame = pd.DataFrame(
        {"x": [min(xs), max(xs)], "mean": stats["mean"], "lo": stats["lo"], "hi": stats["hi"]}
    )
    _line_with_band(fig, frame, x="x", name=name, color=color, row=row, col=1, show=show, dash="dash")


# ----------------------------------------------------------------------------------------------- patching


def patching_figure(
    df: pd.DataFrame, *, title: str = "Attention and MLP ablation / patching by layer"
) -> go.Figure:
    """Three rows (ablation, patching, forced ablation): the metric against layer for each component, with
    the steered and unsteered baselines (dashed), mean over concepts with 95% CIs.

    ``df``: the output of :func:`mechintro.mechanism.patching.component_patching`.
    """
    summary = summarize_patching(df)
    experiments = [e for e in EXPERIMENTS if e in set(summary["experiment"])]
    fig = make_subplots(
        rows=len(experiments),
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.08,
        subplot_titles=[_EXPERIMENT_TITLES[e] for e in experiments],
    )
    inter = summary[summary["kind"] == "intervention"]
    xs = inter["layer"].dropna().astype(int).tolist() or [0]
    for r, experiment in enumerate(experiments, start=1):
        rows = summary[summary["experiment"] == experiment]
        for i, (component, group) in enumerate(
            rows[rows["kind"] == "intervention"].groupby("component", sort=True)
        ):
            group = group.assign(layer=group["layer"].astype(int))
            _line_with_band(
                fig,
                group,
                x="layer",
                name=f"{component} intervention",
                color=COLORS[i],
                row=r,
                col=1,
                show=r == 1,
            )
        for kind, color in (("steered", "#444444"), ("unsteered", "#999999")):
            base = rows[rows["kind"] == kind]
            if len(base):
                _baseline(fig, base.iloc[0], xs, name=f"{kind} baseline", color=color, row=r, show=r == 1)
        fig.update_yaxes(
            title_text="P(concept)" if experiment == "forced_ablation" else "Yes-No gap", row=r, col=1
        )
    fig.update_xaxes(tickformat="d")
    fig.update_xaxes(title_text="layer", row=len(experiments), col=1)
    return _style(fig, title=title, height=STYLE.panel_height * len(experiments) + 120)


# ----------------------------------------------------------------------------------------------- gates


def gates_figure(
    gates: pd.DataFrame,
    grid: FeatureGrid,
    *,
    gate: str | None = None,
    top: int = 20,
    title: str = "Gate candidates: direct logit attribution to Yes-No",
) -> go.Figure:
    """Left: the ``top`` gates by DLA score (most negative = promotes "No"). Right: one gate's activation at
    the
    last prompt token against strength (default: the top gate): each concept (thin) and the mean with a 95%
    CI.

    ``gates``: :func:`mechintro.mechanism.features.find_gates`; ``grid``: the
    :class:`~mechintro.mechanism.features.FeatureGrid`.
    """
    if gates.empty:
        raise ValueError("no gate candidates to plot (find_gates returned an empty table)")
    gate = gate or gates["feature"].iloc[0]
    shown = gates.head(top).iloc[::-1]
    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.45, 0.55],
        horizontal_spacing=0.12,
        subplot_titles=[f"Top {len(shown)} gates by DLA score", f"{gate}: activation vs strength"],
    )
    fig.add_trace(
        go.Bar(
            x=shown["dla_score"],
            y=shown["feature"],
            orientation="h",
            marker_color=COLORS[3],
            name="DLA score",
            customdata=shown[["activation_unsteered", "dla_weight", "inverted_v"]].to_numpy(),
            hovertemplate="%{y}: score %{x:.3f}<br>activation %{customdata[0]:.3f}, "
            "weight %{customdata[1]:.3f}<br>inverted-V %{customdata[2]:.2f}<extra></extra>",
            showlegend=False,
        ),
        row=1,
        col=1,
    )
    layer, index = parse_feature(gate)
    acts = grid.dense(layer, [index])[:, :, 0].numpy()
    long = pd.DataFrame(
        [
            {"concept": c, "strength": s, "value": float(acts[i, j])}
            for i, c in enumerate(grid.concepts)
            for j, s in enumerate(grid.strengths)
        ]
    )
    for concept, rows in long.groupby("concept", sort=False):
        fig.add_trace(
            go.Scatter(
                x=rows["strength"],
                y=rows["value"],
                mode="lines",
                line={"width": 0.7, "color": "#bbbbbb"},
                name=concept,
                showlegend=False,
                hovertemplate=f"{concept}: %{{y:.3f}}<extra></extra>",
            ),
            row=1,
            col=2,
        )
    _line_with_band(
        fig,
        mean_ci(long, ["strength"]),
        x="strength",
        name=f"{gate} (mean)",
        color=COLORS[0],
        row=1,
        col=2,
        show=True,
    )
    fig.update_xaxes(title_text="DLA score<br>(unit decoder . (Yes - No) x activation)", row=1, col=1)
    fig.update_xaxes(title_text="injection strength", row=1, col=2)
    fig.update_yaxes(title_text="activation at the last prompt token", row=1, col=2)
    return _style(fig, title=title, height=max(420, 22 * len(shown) + 160))


def gate_curves_figure(
    df: pd.DataFrame, *, title: str = "Progressive gate ablation and patching"
) -> go.Figure:
    """One panel per experiment: detection (or forced-identification) rate -- or the logit score -- against
    the number of top-ranked gates intervened on, with 95% CIs.

    ``df``: :func:`mechintro.mechanism.curves.gate_curves_sampled` or
    :func:`~mechintro.mechanism.curves.gate_curves_logit`.
    """
    summary = summarize_gate_curves(df)
    experiments = [e for e in EXPERIMENTS if e in set(summary["experiment"])]
    fig = make_subplots(
        rows=1,
        cols=len(experiments),
        subplot_titles=[_SHORT_TITLES[e] for e in experiments],
    )
    for c, experiment in enumerate(experiments, start=1):
        rows = summary[summary["experiment"] == experiment]
        _line_with_band(fig, rows, x="k", name=experiment, color=COLORS[c - 1], row=1, col=c, show=True)
        fig.update_xaxes(title_text="number of top gates", row=1, col=c)
        label = rows["rate"].iloc[0] if "rate" in rows else rows["metric"].iloc[0]
        fig.update_yaxes(
            title_text={
                "detected": "detection rate",
                "forced_identified": "forced identification",
                "gap": "Yes-No gap",
                "p_concept": "P(concept)",
            }.get(label, label),
            row=1,
            col=c,
        )
    return _style(fig, title=title, height=STYLE.panel_height + 200)


# ----------------------------------------------------------------------------------------------- carriers


def carriers_figure(carriers: pd.DataFrame, *, top: int = 20, gate: str | None = None) -> go.Figure:
    """The ``top`` evidence carriers (most negative attribution) and suppressors (most positive) of a gate.

    ``carriers``: :func:`mechintro.mechanism.features.find_evidence_carriers`.
    """
    parts = [carriers[carriers["role"] == role].head(top) for role in ("carrier", "suppressor")]
    shown = pd.concat(parts).sort_values("attribution", ascending=False)
    fig = go.Figure()
    name = f" of {gate}" if gate else ""
    if shown.empty:  # an honest empty figure: nothing between the injection layer and the gate qualifies
        fig.add_annotation(
            text="no evidence carriers or suppressors: no active feature between the injection layer and "
            "the gate meets the criteria",
            showarrow=False,
            x=0.5,
            y=0.5,
            xref="paper",
            yref="paper",
        )
        return _style(fig, title=f"Evidence carriers{name}", height=380)
    for i, role in enumerate(("carrier", "suppressor")):
        rows = shown[shown["role"] == role]
        fig.add_trace(
            go.Bar(
                x=rows["attribution"],
                y=rows["feature"],
                orientation="h",
                name=role,
                marker_color=COLORS[i],
                customdata=rows[
                    ["virtual_weight", "activation_default", "spearman_pos", "detection_corr"]
                ].to_numpy(),
                hovertemplate="%{y}: attribution %{x:.3f}<br>virtual weight %{customdata[0]:.3f}, activation "
                "%{customdata[1]:.3f}<br>dose rho %{customdata[2]:.2f}, detection r "
                "%{customdata[3]:.2f}<extra></extra>",
            )
        )
    fig.update_yaxes(categoryorder="array", categoryarray=shown["feature"].tolist()[::-1])
    fig.update_xaxes(title_text="attribution to the gate (virtual weight x activation)")
    return _style(fig, title=f"Evidence carriers{name}", height=max(380, 22 * len(shown) + 160))


def carrier_ablation_figure(df: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """One panel per concept: the gate's activation against strength for each ablated carrier set.

    ``df``: :func:`mechintro.mechanism.curves.carrier_curves`.
    """
    concepts = list(dict.fromkeys(df["concept"]))
    fig = make_subplots(rows=1, cols=len(concepts), subplot_titles=concepts, shared_yaxes=True)
    sets = list(dict.fromkeys(df["carrier_set"]))
    for c, concept in enumerate(concepts, start=1):
        for i, name in enumerate(sets):
            rows = df[(df["concept"] == concept) & (df["carrier_set"] == name)].sort_values("strength")
            n = int(rows["n_ablated"].iloc[0]) if len(rows) else 0
            fig.add_trace(
                go.Scatter(
                    x=rows["strength"],
                    y=rows["gate_activation"],
                    mode="lines+markers",
                    marker={"size": 5},
                    line={
                        "color": COLORS[i % len(COLORS)],
                        "dash": "dot"
                        if name.startswith("bottom")
                        else "dash"
                        if name.startswith("sup")
                        else None,
                    },
                    name=f"{name} ({n} ablated)",
                    legendgroup=name,
                    showlegend=c == 1,
                ),
                row=1,
                col=c,
            )
        fig.update_xaxes(title_text="injection strength", row=1, col=c)
    fig.update_yaxes(title_text="gate activation", row=1, col=1)
    gate = df["gate"].iloc[0] if "gate" in df and len(df) else "the gate"
    return _style(
        fig,
        title=title or f"{gate} with evidence carriers (solid) or suppressors (dashed) ablated",
        height=STYLE.panel_height + 220,
    )


def base_vs_instruct_figure(df: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """The gate's activation against strength per model variant (color), one panel per concept group
    (e.g. success / failure), mean over the group's concepts with 95% CIs.

    ``df``: :func:`mechintro.mechanism.curves.gate_response` outputs concatenated with ``model`` and
    ``group`` columns.
    """
    need = {"model", "group", "concept", "strength", "gate_activation"}
    if missing := sorted(need - set(df.columns)):
        raise ValueError(f"base_vs_instruct_figure needs columns {missing}; it has {sorted(df.columns)}")
    groups = list(dict.fromkeys(df["group"]))
    fig = make_subplots(
        rows=1, cols=len(groups), subplot_titles=[f"{g} concepts" for g in groups], shared_yaxes=True
    )
    summary = mean_ci(df, ["group", "model", "strength"], value="gate_activation")
    for c, group in enumerate(groups, start=1):
        for i, model in enumerate(dict.fromkeys(df["model"])):
            rows = summary[(summary["group"] == group) & (summary["model"] == model)]
            _line_with_band(
                fig, rows, x="strength", name=str(model), color=COLORS[i], row=1, col=c, show=c == 1
            )
        fig.update_xaxes(title_text="injection strength", row=1, col=c)
    fig.update_yaxes(title_text="gate activation", row=1, col=1)
    gate = df["gate"].iloc[0] if "gate" in df and len(df) else "Gate"
    return _style(fig, title=title or f"{gate}: base vs instruct", height=STYLE.panel_height + 220)
