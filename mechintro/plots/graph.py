"""The figure of a steering-attribution graph (:class:`mechintro.attribution.graph.AttributionGraph`): layered
by layer and prompt position, nodes sized by |ISA|, edges coloured by sign."""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go

from mechintro.attribution.graph import AttributionGraph

__all__ = ["graph_figure"]

_STAGE_OFFSET = {"attn_z": -0.3, "transcoder": 0.0, "resid_post": 0.3, "": 0.0}
_KIND_COLORS = {
    "steer": "#7b3294",
    "metric": "#000000",
    "feature": "#4d9221",
    "error": "#999999",
    "skip": "#bdbdbd",
}
_SIGN_COLORS = ("#2166ac", "#b2182b")
"""Positive and negative edge colours."""


def graph_figure(
    graph: AttributionGraph,
    *,
    title: str | None = None,
    width: int | None = None,
    height: int = 720,
    labels: int = 8,
) -> go.Figure:
    """The graph layered by layer (y) and prompt position (x, one column per position that holds a node), the
    metric on top; node size ∝ |ISA|; edges coloured by sign (blue +, red -) and as wide as |weight|, hop
    edges relative to the largest hop edge, steer and metric edges relative to the largest ISA (drawn
    lighter); the ``labels`` largest features are named.

    ``width=None`` (the default) lets the figure fill its container; static exports are
    :attr:`~mechintro.plots.style.Style.width` wide.

    Hover text: the node, its ISA, its activation at the top and the lowest strength, and its top logit-lens
    tokens. A plain plotly figure: it renders in Jupyter; save the HTML with plotly.js embedded to view it
    offline (``save_figure(..., offline=True)``).
    """
    s = graph.settings
    n = graph.nodes.copy()
    n_layers = int(s["n_layers"])
    n["y"] = n["layer"].astype(float) + n["dictionary"].map(_STAGE_OFFSET).fillna(0.0)
    n.loc[n["kind"] == "metric", "y"] = n_layers + 0.5
    n.loc[n["kind"] == "steer", "y"] = float(s["attribution"]["layer"]) + 0.35
    columns = sorted(set(n["position"].astype(int)))
    column = {p: k for k, p in enumerate(columns)}
    n["x"] = n["position"].astype(int).map(column).astype(float)
    for _, cell in n.groupby(["y", "x"]):  # spread the nodes of one (layer, position) cell across its column
        if len(cell) > 1:
            n.loc[cell.index, "x"] += np.linspace(-0.42, 0.42, len(cell))
    where = dict(zip(n["node"], zip(n["x"], n["y"], strict=True), strict=True))
    fig = go.Figure()
    edges = graph.edges
    hop = edges["direction"].isin(["backward", "forward"])
    scale = {
        True: float(edges.loc[hop, "weight"].abs().max()) if hop.any() else 1.0,
        False: float(edges.loc[~hop, "weight"].abs().max()) if (~hop).any() else 1.0,
    }
    for e, is_hop in zip(edges.itertuples(index=False), hop, strict=True):
        if e.source not in where or e.target not in where:
            continue
        (x0, y0), (x1, y1) = where[e.source], where[e.target]
        fig.add_trace(
            go.Scatter(
                x=[x0, x1],
                y=[y0, y1],
                mode="lines",
                line={
                    "color": _SIGN_COLORS[e.weight < 0],
                    "width": 0.5 + 5 * abs(e.weight) / (scale[is_hop] or 1),
                },
                opacity=0.7 if is_hop else 0.18,
                hoverinfo="text",
                showlegend=False,
                text=f"{e.source} → {e.target}<br>weight {e.weight:+.4g} ({e.direction}, hop {e.hop})",
            )
        )
    isa_max = float(n["isa"].abs().max()) if n["isa"].notna().any() else 1.0
    named = set(graph.feature_nodes().sort_values("isa", key=abs, ascending=False)["node"].head(labels))
    for kind, part in n.groupby("kind", sort=False):
        size = np.where(part["isa"].notna(), 8 + 32 * part["isa"].abs() / (isa_max or 1.0), 22)
        fig.add_trace(
            go.Scatter(
                x=part["x"],
                y=part["y"],
                mode="markers+text" if kind in ("steer", "metric") else "markers",
                name=kind,
                marker={
                    "size": size,
                    "color": _KIND_COLORS.get(kind, "#444"),
                    "line": {"width": 1, "color": "white"},
                },
                text=part["name"].tolist() if kind in ("steer", "metric") else None,
                textposition="top center",
                textfont={"size": 10},
                hoverinfo="text",
                hovertext=[_hover(r) for r in part.itertuples(index=False)],
            )
        )
    for r in n[n["node"].isin(named)].itertuples():  # slanted, so that neighbours in a row never overlap
        fig.add_annotation(
            x=r.x,
            y=r.y,
            text=r.name,
            textangle=-35,
            showarrow=False,
            xanchor="left",
            yanchor="bottom",
            xshift=2,
            yshift=4,
            font={"size": 9},
        )
    tokens = s["prompt_token_strings"]
    fig.update_layout(
        title=title
        or (
            f"Steering attribution: {s['concept']} → {n.loc[n['kind'] == 'metric', 'name'].iloc[0]} "
            f"(α from {min(s['attribution']['strengths']):g} to {max(s['attribution']['strengths']):g}, "
            f"{s['attribution']['integration']})"
        ),
        template="plotly_white",
        width=width,
        autosize=width is None,
        height=height,
        xaxis={
            "title": "prompt position",
            "tickmode": "array",
            "tickvals": list(range(len(columns))),
            "ticktext": [f"{p}: {_show(tokens[p])}" for p in columns],
            "range": [-0.6, len(columns) - 0.4],
        },
        yaxis={"title": "layer", "range": [-0.8, n_layers + 1]},
        legend={"orientation": "h", "y": -0.15},
    )
    fig.add_annotation(
        text="Edge weights are total effects integrated over α: they do not add up along paths.",
        xref="paper",
        yref="paper",
        x=0,
        y=1.04,
        showarrow=False,
        font={"size": 11},
    )
    return fig


def _show(token: str) -> str:
    """A token as a tick label: line breaks and bare spaces made visible."""
    shown = token.replace("\n", "⏎")
    return shown if shown.strip() else repr(token)


def _hover(r: Any) -> str:
    if r.kind == "steer":
        return r.name
    if r.kind == "metric":
        return f"metric: {r.name} at position {r.position}"
    lines = [f"<b>{r.node}</b>", f"ISA {r.isa:+.4g} (hop {r.hop})"]
    if r.kind == "feature":
        lines += [
            f"activation {r.activation:.3g} at top α, {r.activation_0:.3g} at lowest",
            f"logit lens: {r.top_tokens}",
        ]
    return "<br>".join(lines)
