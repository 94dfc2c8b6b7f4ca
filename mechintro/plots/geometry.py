"""Figures of the geometry analyses (:mod:`mechintro.studies.geometry`): one plotly builder per figure,
returning a
``Figure`` (save it with :func:`mechintro.plots.save.save_figure`).

The paper's numbers quoted from its text (:data:`mechintro.studies.geometry.PAPER_TEXT`) are drawn as hollow
diamonds labelled "paper (text)"; they are Gemma3-27B's, beside ours.

* :func:`swaps_figure` -- Figure 6: detection of success and failure concepts, original vs projection and
  residual swaps.
* :func:`bidirectional_figure` -- Figure 7: share of S-S and F-F pairs detected both ways (A - B and B - A).
* :func:`concept_pca_figure` -- Figure 8a: the concepts on PC1/PC2 of the L2-normalized vectors, coloured
  by detection.
* :func:`verbalizability_figure` -- Figure 8b: verbalizability against the projection on Δμ, with the logit
  lens of Δμ beside it.
* :func:`direction_sweep_figure` -- Figure 8c: detection when steering along Δμ and the δPCs.
* :func:`ridge_figure` -- Figure 8d: cross-validated R² against the number of transcoder features, with the
  norm, projection and raw-vector baselines.
* :func:`noise_figure` -- detection of concept vectors and of norm-matched random vectors.
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots
from scipy import stats

from mechintro.core.stats import mean_ci
from mechintro.plots.style import STYLE, apply_style
from mechintro.studies.geometry import PAPER_TEXT

__all__ = [
    "bidirectional_figure",
    "concept_pca_figure",
    "direction_sweep_figure",
    "noise_figure",
    "ridge_figure",
    "swaps_figure",
    "verbalizability_figure",
]

COLORS = qualitative.D3
GROUP_COLORS = {"success": "#2ca02c", "failure": "#d62728", "S-S": "#2ca02c", "F-F": "#d62728"}
PAPER_MARKER = {"symbol": "diamond-open", "size": 13, "color": "#222222", "line": {"width": 2}}
PAPER_NAME = "paper (text), Gemma3-27B"


def _style(fig: go.Figure, *, title: str, height: int) -> go.Figure:
    return apply_style(fig, title=title, height=height, top=100)


def _need(df: pd.DataFrame, columns: set[str], what: str) -> None:
    missing = sorted(columns - set(df.columns))
    if missing:
        raise ValueError(f"{what} lacks columns {missing}; it has {sorted(df.columns)}")


# ----------------------------------------------------------------------------------------------- figure 6

KIND_TITLES = {
    "original": "original (rerun)",
    "projection": "projection swapped",
    "residual": "residual swapped",
}


def swaps_figure(
    swaps: pd.DataFrame,
    tests: pd.DataFrame | None = None,
    *,
    paper: Mapping[str, float] = PAPER_TEXT,
    title: str = "Swapping the projection on Δμ or the residual with a concept of the other group",
) -> go.Figure:
    """One panel per partner rule: mean detection (95% CI across concepts) of success and failure concepts,
    original vs swapped; the paper's text numbers for success concepts as diamonds; paired-test p-values
    (``tests``: :func:`mechintro.studies.geometry.paired_tests`) under the panels.

    ``swaps``: :func:`mechintro.studies.geometry.swap_experiment`.
    """
    _need(swaps, {"concept", "group", "kind", "partners", "rate"}, "the swap table")
    rules = [r for r in ("random", "nearest") if r in set(swaps["partners"])] or sorted(
        set(swaps["partners"]) - {"-"}
    )
    if not rules:
        raise ValueError("the swap table has no swapped rows")
    fig = make_subplots(
        rows=1, cols=len(rules), shared_yaxes=True, subplot_titles=[f"{r} partners" for r in rules]
    )
    kinds = [k for k in KIND_TITLES if k in set(swaps["kind"])]
    for c, rule in enumerate(rules, start=1):
        rows = swaps[(swaps["partners"] == rule) | (swaps["kind"] == "original")]
        summary = mean_ci(rows, ["group", "kind"], value="rate")
        for group in ("success", "failure"):
            g = summary[summary["group"] == group].set_index("kind").reindex(kinds)
            fig.add_trace(
                go.Bar(
                    x=[KIND_TITLES[k] for k in kinds],
                    y=g["mean"],
                    error_y={
                        "type": "data",
                        "symmetric": False,
                        "array": g["hi"] - g["mean"],
                        "arrayminus": g["mean"] - g["lo"],
                    },
                    name=f"{group} concepts (ours)",
                    marker_color=GROUP_COLORS[group],
                    legendgroup=group,
                    showlegend=c == 1,
                    hovertext=[f"n = {int(n)}" if n == n else "" for n in g["n"]],
                ),
                row=1,
                col=c,
            )
        fig.add_trace(
            go.Scatter(
                x=[KIND_TITLES[k] for k in kinds],
                y=[paper.get(f"swap_success_{k}") for k in kinds],
                mode="markers",
                marker=PAPER_MARKER,
                name=f"{PAPER_NAME}: success concepts",
                legendgroup="paper",
                showlegend=c == 1,
            ),
            row=1,
            col=c,
        )
        if tests is not None and len(tests):
            t = tests[(tests["partners"] == rule) & (tests["group"] == "success")]
            text = "<br>".join(
                f"success, {k}: change {r.mean_change:+.2f}, t p={r.t_p:.2g}, Wilcoxon p={r.wilcoxon_p:.2g}"
                for k, r in zip(t["kind"], t.itertuples(), strict=True)
            )
            fig.add_annotation(
                text=text,
                xref=f"x{c if c > 1 else ''} domain",
                yref="paper",
                x=0.5,
                y=-0.2,
                yanchor="top",
                showarrow=False,
                font={"size": 10},
            )
    # the legend sits above the subplot titles, with the top margin to hold both
    fig.update_layout(barmode="group", legend={"orientation": "h", "y": 1.1, "yanchor": "bottom", "x": 0.0})
    fig.update_yaxes(title_text="detection rate", range=[0, 1.05], row=1, col=1)
    fig = _style(fig, title=title, height=560)
    fig.update_layout(margin={"b": 130, "t": 150})
    return fig


# ----------------------------------------------------------------------------------------------- figure 7


def bidirectional_figure(
    result: pd.DataFrame,
    summary: pd.DataFrame,
    *,
    detected_at: float | None = None,
    paper: Mapping[str, float] = PAPER_TEXT,
    title: str = "Bidirectional steering: pairs detected with both A − B and B − A",
) -> go.Figure:
    """Left: share of S-S and F-F pairs detected both ways (Wilson 95% CI), the paper's text numbers as
    diamonds. Right: each pair's detection rate with A − B against B − A.

    ``result``: :func:`mechintro.studies.geometry.bidirectional_experiment`; ``summary``:
    :func:`mechintro.studies.geometry.bidirectional_summary`.
    """
    _need(result, {"group", "a", "b", "rate_ab", "rate_ba"}, "the pair table")
    _need(summary, {"group", "share_both", "lo", "hi", "n_pairs", "n_both"}, "the summary")
    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.4, 0.6],
        horizontal_spacing=0.12,
        subplot_titles=["Share of pairs detected both ways", "Per pair: rate(A − B) vs rate(B − A)"],
    )
    s = summary.set_index("group").reindex(["S-S", "F-F"])
    fig.add_trace(
        go.Bar(
            x=list(s.index),
            y=s["share_both"],
            error_y={
                "type": "data",
                "symmetric": False,
                "array": s["hi"] - s["share_both"],
                "arrayminus": s["share_both"] - s["lo"],
            },
            marker_color=[GROUP_COLORS[g] for g in s.index],
            text=[
                f"{int(k)}/{int(n)}" if n == n else "" for k, n in zip(s["n_both"], s["n_pairs"], strict=True)
            ],
            textposition="outside",
            name="ours",
            showlegend=False,
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Scatter(
            x=["S-S", "F-F"],
            y=[paper.get("bidirectional_success"), paper.get("bidirectional_failure")],
            mode="markers",
            marker=PAPER_MARKER,
            name=PAPER_NAME,
        ),
        row=1,
        col=1,
    )
    for group in ("S-S", "F-F"):
        g = result[result["group"] == group]
        fig.add_trace(
            go.Scatter(
                x=g["rate_ab"],
                y=g["rate_ba"],
                mode="markers",
                marker={"color": GROUP_COLORS[group], "size": 8, "opacity": 0.7},
                name=f"{group} pairs",
                hovertext=[f"{a} − {b}" for a, b in zip(g["a"], g["b"], strict=True)],
            ),
            row=1,
            col=2,
        )
    if detected_at is not None:
        fig.add_vline(x=detected_at, line_dash="dot", line_color="#888888", row=1, col=2)
        fig.add_hline(y=detected_at, line_dash="dot", line_color="#888888", row=1, col=2)
    fig.update_yaxes(title_text="share of pairs", range=[0, 1.05], row=1, col=1)
    fig.update_xaxes(title_text="detection rate, A − B", range=[-0.03, 1.03], row=1, col=2)
    fig.update_yaxes(title_text="detection rate, B − A", range=[-0.03, 1.03], row=1, col=2)
    return _style(fig, title=title, height=460)


# ----------------------------------------------------------------------------------------------- figure 8


def concept_pca_figure(
    scores: pd.DataFrame,
    summary: pd.DataFrame,
    rates: pd.DataFrame,
    *,
    rate: str = "detection_rate",
    paper: Mapping[str, float] = PAPER_TEXT,
    title: str = "Concept space: PCA of the L2-normalized concept vectors",
) -> go.Figure:
    """Left: concepts on PC1 and PC2, coloured by ``rate``. Right: each component's share of the variance
    (ours; the paper's PC1 share as a diamond) and its alignment |cos| with each given direction.

    ``scores`` / ``summary``: :class:`mechintro.studies.geometry.ConceptPCA`; ``rates``: concept and ``rate``.
    """
    _need(scores, {"concept", "pc1", "pc2"}, "the PCA scores")
    _need(rates, {"concept", rate}, "the rate table")
    data = scores.merge(rates[["concept", rate]], on="concept", how="left")
    share = summary["explained_variance_ratio"].to_numpy()
    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.6, 0.4],
        horizontal_spacing=0.14,
        subplot_titles=["Concepts on PC1 / PC2", "Variance share and alignment per component"],
    )
    fig.add_trace(
        go.Scatter(
            x=data["pc1"],
            y=data["pc2"],
            mode="markers",
            marker={
                "color": data[rate],
                "colorscale": STYLE.colorscale,
                "cmin": 0,
                "cmax": 1,
                "size": 9,
                "colorbar": {"title": rate.replace("_", " "), "x": 0.55, "len": 0.8},
            },
            hovertext=data["concept"],
            showlegend=False,
        ),
        row=1,
        col=1,
    )
    comps = summary["component"].tolist()
    fig.add_trace(
        go.Bar(x=comps, y=share, name="variance share (ours)", marker_color="#7f7f7f"), row=1, col=2
    )
    fig.add_trace(
        go.Scatter(
            x=comps[:1],
            y=[paper.get("pc1_share")],
            mode="markers",
            marker=PAPER_MARKER,
            name=f"{PAPER_NAME}: PC1 share",
        ),
        row=1,
        col=2,
    )
    aligned = [c for c in summary.columns if c.startswith("alignment_")]
    for i, column in enumerate(aligned):
        fig.add_trace(
            go.Scatter(
                x=comps,
                y=summary[column],
                mode="lines+markers",
                line={"color": COLORS[i + 1]},
                name=f"|cos| with {column.removeprefix('alignment_')}",
            ),
            row=1,
            col=2,
        )
    fig.update_xaxes(title_text=f"PC1 ({share[0]:.1%} of variance)", row=1, col=1)
    fig.update_yaxes(title_text=f"PC2 ({share[1]:.1%})" if len(share) > 1 else "PC2", row=1, col=1)
    fig.update_yaxes(title_text="share / |cos|", range=[0, 1.05], row=1, col=2)
    fig.update_layout(legend={"orientation": "h", "y": -0.18})
    return _style(fig, title=title, height=500)


def verbalizability_figure(
    verbal: pd.DataFrame,
    lens: pd.DataFrame,
    *,
    direction: str | None = None,
    top: int = 8,
    title: str = "Verbalizability against the projection on Δμ",
) -> go.Figure:
    """Left: each concept's verbalizability (the lens logit of its own word) against its projection on Δμ,
    coloured by group, Spearman ρ in the title. Right (the logit-lens inset): the ``top`` top and bottom
    tokens of ``direction`` (default: the first in ``lens``).

    ``verbal``: :func:`mechintro.studies.geometry.verbalizability` merged with the partition frame (concept,
    score, projection, group); ``lens``: :func:`mechintro.studies.geometry.logit_lens`.
    """
    _need(verbal, {"concept", "score", "projection", "group"}, "the verbalizability table")
    _need(lens, {"direction", "side", "rank", "token", "logit"}, "the logit-lens table")
    direction = direction or str(lens["direction"].iloc[0])
    rho = stats.spearmanr(verbal["score"], verbal["projection"])
    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.66, 0.34],
        horizontal_spacing=0.14,
        subplot_titles=[
            f"Spearman ρ = {rho.statistic:.2f} (p = {rho.pvalue:.2g}, n = {len(verbal)})",
            f"Logit lens of {direction}",
        ],
    )
    for group in ("success", "failure"):
        g = verbal[verbal["group"] == group]
        fig.add_trace(
            go.Scatter(
                x=g["projection"],
                y=g["score"],
                mode="markers",
                name=f"{group} concepts",
                marker={"color": GROUP_COLORS[group], "size": 8, "opacity": 0.75},
                hovertext=g["concept"],
            ),
            row=1,
            col=1,
        )
    rows = lens[(lens["direction"] == direction) & (lens["rank"] < top)]
    tops = rows[rows["side"] == "top"].sort_values("logit")
    bottoms = rows[rows["side"] == "bottom"].sort_values("logit")
    both = pd.concat([bottoms, tops])
    fig.add_trace(
        go.Bar(
            y=[f"{t!r}" for t in both["token"]],
            x=both["logit"],
            orientation="h",
            marker_color=["#d62728" if s == "bottom" else "#2ca02c" for s in both["side"]],
            showlegend=False,
        ),
        row=1,
        col=2,
    )
    fig.update_xaxes(title_text="projection on Δμ", row=1, col=1)
    fig.update_yaxes(title_text="verbalizability (lens logit of the own word)", row=1, col=1)
    fig.update_xaxes(title_text="logit", row=1, col=2)
    return _style(fig, title=title, height=520)


def direction_sweep_figure(
    sweep: pd.DataFrame,
    *,
    reference: float | None = None,
    title: str = "Steering along Δμ and the δPCs (success vectors with Δμ projected out)",
) -> go.Figure:
    """Detection rate against the injected norm (in mean concept norms) for each direction; ``reference``
    (e.g. the mean detection of the concept vectors) as a dashed line.

    ``sweep``: :func:`mechintro.studies.geometry.direction_sweep`.
    """
    _need(sweep, {"direction", "multiple", "rate"}, "the sweep table")
    fig = go.Figure()
    for i, (name, g) in enumerate(sweep.groupby("direction", sort=False)):
        g = g.sort_values("multiple")
        fig.add_trace(
            go.Scatter(
                x=g["multiple"],
                y=g["rate"],
                mode="lines+markers",
                name=name,
                line={"color": COLORS[i % len(COLORS)], "dash": "solid" if i == 0 else "dash"},
            )
        )
    if reference is not None:
        fig.add_hline(
            y=reference,
            line_dash="dot",
            line_color="#888888",
            annotation_text="concept vectors (mean)",
            annotation_position="top left",
        )
    fig.update_xaxes(title_text="injected vector, in mean concept norms (× the default strength)")
    fig.update_yaxes(title_text="detection rate", range=[-0.03, 1.05])
    return _style(fig, title=title, height=440)


BASELINES = ("norm", "projection", "norm + projection", "raw vectors")


def ridge_figure(
    ridge: pd.DataFrame, *, title: str = "Ridge regression of per-concept detection (nested CV)"
) -> go.Figure:
    """Cross-validated R² against the number of top transcoder features (ranked inside each training fold;
    ranked on all data, which leaks, dashed when present), with the baselines as horizontal lines.

    ``ridge``: :func:`mechintro.studies.geometry.ridge_r2`.
    """
    _need(ridge, {"predictor", "ranking", "n_features", "r2"}, "the ridge table")
    fig = go.Figure()
    feats = ridge[ridge["predictor"] == "transcoder features"]
    for ranking, dash, color in (("fold", "solid", COLORS[0]), ("all (leaks)", "dash", "#999999")):
        g = feats[feats["ranking"] == ranking].sort_values("n_features")
        if len(g):
            name = "top transcoder features" + ("" if ranking == "fold" else ", ranked on all data (leaks)")
            fig.add_trace(
                go.Scatter(
                    x=g["n_features"],
                    y=g["r2"],
                    mode="lines+markers",
                    name=name,
                    line={"dash": dash, "color": color},
                )
            )
    xs = feats["n_features"].tolist() or [1, 100]
    for i, name in enumerate(b for b in BASELINES if b in set(ridge["predictor"])):
        r2 = float(ridge.loc[ridge["predictor"] == name, "r2"].iloc[0])
        fig.add_trace(
            go.Scatter(
                x=[min(xs), max(xs)],
                y=[r2, r2],
                mode="lines",
                name=f"{name}: R² = {r2:.2f}",
                line={"dash": "dot", "color": COLORS[(i + 1) % len(COLORS)]},
            )
        )
    fig.update_xaxes(title_text="number of transcoder features", type="log")
    fig.update_yaxes(title_text="R² (out-of-fold)")
    return _style(fig, title=title, height=440)


def noise_figure(
    noise: pd.DataFrame, *, title: str = "Concept vectors vs norm-matched random vectors"
) -> go.Figure:
    """Left: detection rate against the vector's norm, concept vectors and each noise kind (at multiple 1,
    or the smallest multiple). Right: mean detection per source and multiple (95% CI).

    ``noise``: :func:`mechintro.studies.geometry.noise_experiment`.
    """
    _need(noise, {"source", "concept", "multiple", "norm", "rate"}, "the noise table")
    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.55, 0.45],
        horizontal_spacing=0.12,
        subplot_titles=["Detection vs norm", "Mean detection by source"],
    )
    multiples = sorted(noise["multiple"].unique())
    shown = 1.0 if 1.0 in multiples else multiples[0]
    sources = list(dict.fromkeys(noise["source"]))
    for i, source in enumerate(sources):
        g = noise[(noise["source"] == source) & (noise["multiple"] == shown)]
        fig.add_trace(
            go.Scatter(
                x=g["norm"],
                y=g["rate"],
                mode="markers",
                name=source,
                legendgroup=source,
                marker={"color": COLORS[i % len(COLORS)], "size": 7, "opacity": 0.6},
                hovertext=g["concept"],
            ),
            row=1,
            col=1,
        )
    repeat = noise["repeat"].astype(str) if "repeat" in noise.columns else "0"
    unit = noise.assign(unit=noise["concept"] + "/" + repeat)
    summary = mean_ci(unit, ["source", "multiple"], value="rate", unit="unit")
    for i, source in enumerate(sources):
        g = summary[summary["source"] == source].sort_values("multiple")
        fig.add_trace(
            go.Scatter(
                x=g["multiple"],
                y=g["mean"],
                mode="lines+markers",
                name=source,
                legendgroup=source,
                showlegend=False,
                line={"color": COLORS[i % len(COLORS)]},
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": g["hi"] - g["mean"],
                    "arrayminus": g["mean"] - g["lo"],
                },
            ),
            row=1,
            col=2,
        )
    fig.update_xaxes(title_text="vector norm", row=1, col=1)
    fig.update_yaxes(title_text="detection rate", range=[-0.03, 1.05], row=1, col=1)
    fig.update_xaxes(title_text="multiple of the default strength", row=1, col=2)
    fig.update_yaxes(range=[-0.03, 1.05], row=1, col=2)
    return _style(fig, title=title, height=440)
