"""Mechanism figures build from small synthetic tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from mechintro.mechanism.features import FeatureGrid
from mechintro.plots import mechanism as pm

CONCEPTS = ["a", "b", "c"]


def _patching_df() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for experiment, metric in (("ablation", "gap"), ("patching", "gap"), ("forced_ablation", "p_concept")):
        for concept in CONCEPTS:
            for kind in ("steered", "unsteered"):
                rows.append(
                    dict(
                        experiment=experiment,
                        kind=kind,
                        layer=pd.NA,
                        component="",
                        concept=concept,
                        trial=1,
                        metric=metric,
                        value=rng.normal(),
                    )
                )
            for layer in (3, 4, 5):
                for component in ("attn", "mlp"):
                    rows.append(
                        dict(
                            experiment=experiment,
                            kind="intervention",
                            layer=layer,
                            component=component,
                            concept=concept,
                            trial=1,
                            metric=metric,
                            value=rng.normal(),
                        )
                    )
    df = pd.DataFrame(rows)
    return df.assign(layer=df["layer"].astype("Int64"))


def test_patching_figure_has_three_rows_with_baselines():
    fig = pm.patching_figure(_patching_df())
    assert isinstance(fig, go.Figure)
    assert [a.text for a in fig.layout.annotations][:3] == [
        pm._EXPERIMENT_TITLES[e] for e in ("ablation", "patching", "forced_ablation")
    ]
    names = {t.name for t in fig.data if t.name}
    assert {"attn intervention", "mlp intervention", "steered baseline", "unsteered baseline"} <= names
    assert len(fig.data) == 3 * (2 + 2) * 2  # per row: 2 components + 2 baselines, each a band and a line


def test_gates_and_carriers_figures():
    acts = torch.zeros(3, 3, 8)
    acts[:, :, 2] = torch.tensor([[1.0, 3.0, 1.0]]).expand(3, -1)
    grid = FeatureGrid(
        concepts=tuple(CONCEPTS),
        strengths=(-4.0, 0.0, 4.0),
        acts={5: acts.to_sparse().coalesce()},
        injection_layer=3,
        default_strength=4.0,
    )
    gates = pd.DataFrame(
        {
            "feature": ["L5 F2", "L5 F1"],
            "dla_score": [-2.0, -1.0],
            "activation_unsteered": [3.0, 1.0],
            "dla_weight": [-0.7, -1.0],
            "inverted_v": [0.67, 0.1],
        }
    )
    fig = pm.gates_figure(gates, grid)
    assert fig.data[0].type == "bar" and list(fig.data[0].y) == ["L5 F1", "L5 F2"]
    assert sum(t.name in CONCEPTS for t in fig.data) == 3
    with pytest.raises(ValueError, match="no gate candidates"):
        pm.gates_figure(gates.iloc[:0], grid)
    carriers = pd.DataFrame(
        {
            "feature": ["L4 F1", "L4 F2", "L4 F3"],
            "role": ["carrier", "carrier", "suppressor"],
            "attribution": [-2.0, -1.0, 0.5],
            "virtual_weight": [-1.0, -0.5, 0.2],
            "activation_default": [2.0] * 3,
            "spearman_pos": [0.9] * 3,
            "detection_corr": [0.5] * 3,
        }
    )
    fig = pm.carriers_figure(carriers, top=1, gate="L5 F2")
    assert [list(t.y) for t in fig.data] == [["L4 F1"], ["L4 F3"]]
    empty = pm.carriers_figure(carriers.iloc[:0], gate="L5 F2")
    assert not empty.data and "no evidence carriers" in empty.layout.annotations[0].text


def test_curve_figures():
    sampled = pd.DataFrame(
        {
            "experiment": ["ablation"] * 4 + ["forced_ablation"] * 4,
            "k": [0, 0, 2, 2] * 2,
            "concept": CONCEPTS[:2] * 4,
            "detected": [True, False, False, False] + [None] * 4,
            "forced_identified": [None] * 4 + [True, True, False, True],
            "judge_error": None,
        }
    )
    fig = pm.gate_curves_figure(sampled)
    assert len(fig.data) == 4 and fig.layout.yaxis.title.text == "detection rate"
    logit = pd.DataFrame(
        {
            "experiment": "patching",
            "k": [0, 1, 0, 1],
            "concept": ["a", "a", "b", "b"],
            "metric": "gap",
            "value": [1.0, 2.0, 3.0, 4.0],
        }
    )
    assert pm.gate_curves_figure(logit).layout.yaxis.title.text == "Yes-No gap"
    curves = pd.DataFrame(
        [
            {
                "concept": c,
                "carrier_set": s,
                "n_ablated": n,
                "strength": x,
                "gate": "L5 F2",
                "gate_activation": 1.0,
            }
            for c in CONCEPTS[:2]
            for s, n in (("none", 0), ("all", 4), ("bottom10", 1))
            for x in (-4.0, 0.0, 4.0)
        ]
    )
    fig = pm.carrier_ablation_figure(curves)
    assert len(fig.data) == 6 and fig.data[2].line.dash == "dot"
    variants = pd.concat(
        [
            curves.assign(model=m, group=g)
            for m in ("organism-base", "organism")
            for g in ("success", "failure")
        ]
    )
    fig = pm.base_vs_instruct_figure(variants)
    assert {t.name for t in fig.data if t.name} == {"organism-base", "organism"}
    with pytest.raises(ValueError, match="needs columns"):
        pm.base_vs_instruct_figure(curves)
