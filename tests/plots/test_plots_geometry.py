"""Geometry figures: built from the tables of mechintro.studies.geometry on synthetic vectors with a planted
rule; the
plotted values are checked against the tables, and the paper's text numbers against PAPER_TEXT."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from scipy import stats

from mechintro.plots import geometry as pg
from mechintro.studies import geometry as geo

D = 8


@pytest.fixture(scope="module")
def planted():
    rng = np.random.default_rng(0)
    w = np.eye(D)[0]
    x = rng.standard_normal((80, D)) + 0.5
    concepts = [f"c{i}" for i in range(len(x))]
    rates = 1 / (1 + np.exp(-4 * x[:, 0]))
    table = pd.DataFrame({"concept": concepts, "detection_rate": np.round(rates, 2)})
    part = geo.partition(x, concepts, table, thresholds=[0.5])

    def detect(labels, v):
        return (np.asarray(v) @ w > 0).astype(float)

    return x, concepts, table, part, detect


def _trace(fig: go.Figure, name: str) -> go.BaseTraceType:
    found = [t for t in fig.data if t.name == name]
    assert len(found) == 1, [t.name for t in fig.data]
    return found[0]


def test_swaps_figure_plots_the_group_means_and_the_papers_text(planted):
    x, _, _, part, detect = planted
    swaps = geo.swap_experiment(x, part, detect=detect)
    tests = geo.paired_tests(swaps)
    fig = pg.swaps_figure(swaps, tests)
    assert isinstance(fig, go.Figure)
    bars = [t for t in fig.data if isinstance(t, go.Bar) and t.name == "success concepts (ours)"]
    assert len(bars) == 2  # one panel per partner rule
    for bar, rule in zip(bars, ("random", "nearest"), strict=True):
        rows = swaps[
            (swaps["group"] == "success") & ((swaps["partners"] == rule) | (swaps["kind"] == "original"))
        ]
        want = rows.groupby("kind")["rate"].mean().reindex(["original", "projection", "residual"])
        np.testing.assert_allclose(bar.y, want.to_numpy())
    paper = [t for t in fig.data if t.name and t.name.startswith(pg.PAPER_NAME)][0]
    assert list(paper.y) == [0.661, 0.390, 0.444]
    assert any("Wilcoxon p=" in a.text for a in fig.layout.annotations)


def test_bidirectional_figure(planted):
    x, concepts, _, part, detect = planted
    pairs = geo.bidirectional_pairs(x, part, tolerance=1.0)
    result = geo.bidirectional_experiment(x, concepts, pairs, detect=detect, detected_at=0.5)
    summary = geo.bidirectional_summary(result)
    fig = pg.bidirectional_figure(result, summary, detected_at=0.5)
    bar = _trace(fig, "ours")
    np.testing.assert_allclose(bar.y, summary.set_index("group").loc[["S-S", "F-F"], "share_both"])
    assert list(_trace(fig, pg.PAPER_NAME).y) == [0.233, 0.032]
    ss = _trace(fig, "S-S pairs")
    np.testing.assert_allclose(ss.x, result[result["group"] == "S-S"]["rate_ab"])


def test_concept_pca_figure_colours_by_rate(planted):
    x, concepts, table, part, _ = planted
    pca = geo.concept_pca(x, concepts, n_components=4, directions={"delta_mu": part.direction})
    fig = pg.concept_pca_figure(pca.scores, pca.summary, table.sample(frac=1, random_state=0))
    scatter = fig.data[0]
    np.testing.assert_allclose(scatter.marker.color, table["detection_rate"])  # merged back in concept order
    np.testing.assert_allclose(
        _trace(fig, "variance share (ours)").y, pca.summary["explained_variance_ratio"]
    )
    assert list(_trace(fig, f"{pg.PAPER_NAME}: PC1 share").y) == [0.184]
    np.testing.assert_allclose(_trace(fig, "|cos| with delta_mu").y, pca.summary["alignment_delta_mu"])


def test_verbalizability_figure_reports_spearman_and_the_lens():
    rng = np.random.default_rng(1)
    verbal = pd.DataFrame(
        {
            "concept": [f"c{i}" for i in range(30)],
            "score": rng.normal(size=30),
            "projection": rng.normal(size=30),
            "group": ["success", "failure"] * 15,
        }
    )
    lens = pd.DataFrame(
        {
            "direction": "delta_mu",
            "side": ["top"] * 3 + ["bottom"] * 3,
            "rank": [0, 1, 2] * 2,
            "token": list("abcxyz"),
            "token_id": range(6),
            "logit": [3.0, 2.0, 1.0, -3.0, -2.0, -1.0],
        }
    )
    fig = pg.verbalizability_figure(verbal, lens, top=2)
    rho = stats.spearmanr(verbal["score"], verbal["projection"]).statistic
    assert f"Spearman ρ = {rho:.2f}" in fig.layout.annotations[0].text
    bars = [t for t in fig.data if isinstance(t, go.Bar)][0]
    assert list(bars.x) == [-3.0, -2.0, 2.0, 3.0]  # the top 2 of each side, bottom first
    with pytest.raises(ValueError, match="lacks columns"):
        pg.verbalizability_figure(verbal.drop(columns="projection"), lens)


def test_direction_sweep_ridge_and_noise_figures(planted):
    x, concepts, _, part, detect = planted
    sweep = geo.direction_sweep(
        {"delta_mu": part.direction, "other": np.eye(D)[1]}, detect=detect, scale=2.0, multiples=[-1, 1]
    )
    fig = pg.direction_sweep_figure(sweep, reference=0.4)
    np.testing.assert_allclose(_trace(fig, "delta_mu").y, [0.0, 1.0])
    ridge = geo.ridge_r2(x, part, features=np.abs(x), counts=(1, 4))
    fig = pg.ridge_figure(ridge)
    norm_r2 = float(ridge.loc[ridge["predictor"] == "norm", "r2"].iloc[0])
    assert list(_trace(fig, f"norm: R² = {norm_r2:.2f}").y) == [norm_r2, norm_r2]
    np.testing.assert_allclose(_trace(fig, "top transcoder features").y, ridge["r2"].iloc[-2:])
    noise = geo.noise_experiment(x, concepts, detect=detect, multiples=(1.0, 2.0))
    fig = pg.noise_figure(noise)
    concept_points = [t for t in fig.data if t.name == "concept" and t.mode == "markers"][0]
    np.testing.assert_allclose(
        concept_points.y, noise[(noise.source == "concept") & (noise.multiple == 1)]["rate"]
    )
    with pytest.raises(ValueError, match="lacks columns"):
        pg.noise_figure(noise.drop(columns="norm"))
