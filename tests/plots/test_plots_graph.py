"""The figure of a steering-attribution graph, built from the real graph of
tests/attribution/test_graphs.py."""

from __future__ import annotations

import numpy as np

from mechintro.plots.graph import graph_figure
from tests.attribution.test_graphs import graph, m64, tc64, vec  # noqa: F401 (its fixtures)


def test_figure(graph):  # noqa: F811 (the imported fixture)
    fig = graph_figure(graph)
    markers = [t for t in fig.data if t.mode in ("markers", "markers+text")]
    features = next(t for t in markers if t.name == "feature")
    feats = graph.feature_nodes()
    assert len(features.x) == len(feats)
    first = feats.iloc[0]
    hover = next(h for h in features.hovertext if first["node"] in h)
    assert f"{first['isa']:+.4g}" in hover and first["top_tokens"] in hover
    sizes = np.asarray(features.marker.size)
    order = np.argsort(feats["isa"].abs().to_numpy())
    assert (np.diff(sizes[order]) >= 0).all() and sizes[order][-1] > 2 * sizes[order][0], (
        "size grows with |ISA|"
    )
    lines = [t for t in fig.data if t.mode == "lines"]
    assert len(lines) == len(graph.edges)
    for trace, weight in zip(lines, graph.edges["weight"], strict=True):
        assert trace.line.color == ("#b2182b" if weight < 0 else "#2166ac")
    assert any("total effects" in a.text for a in fig.layout.annotations)
    assert fig.layout.yaxis.range[1] > graph.settings["n_layers"], "the metric on top"
    metric = next(t for t in markers if t.name == "metric")
    assert metric.y[0] > max(features.y) and list(metric.text) == ["Yes − No"]
    named = [a.text for a in fig.layout.annotations if a.textangle == -35]
    assert 1 <= len(named) <= 8 and feats.sort_values("isa", key=abs).iloc[-1]["name"] in named
    assert fig.layout.width is None and fig.layout.autosize, "the figure fills its container"
    assert graph_figure(graph, width=700).layout.width == 700
