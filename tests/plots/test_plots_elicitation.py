"""plots_elicitation: each builder draws what it is given (ours and the paper's rows), and names missing
columns."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from mechintro.plots import elicitation as pe
from mechintro.studies import bias as el


def _rates(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for m in ("tpr", "fpr", "introspection", "forced_id"):
        v = rng.uniform(0.1, 0.9, n)
        out |= {m: v, f"{m}_lo": v - 0.05, f"{m}_hi": v + 0.05}
    return out


def _traces(fig, name_part: str) -> list:
    return [t for t in fig.data if t.name and name_part in t.name]


def test_bias_layer_figure_draws_ours_and_the_papers_rows():
    ours = pd.DataFrame({"bias_layer": [-1, 0, 1, 2], "depth": [math.nan, 0, 0.25, 0.5]} | _rates(4))
    paper = el.paper_bias_layer_sweep()
    fig = pe.bias_layer_figure(ours, paper, injection_depth=0.375)
    mine, theirs = _traces(fig, "ours"), _traces(fig, "paper")
    assert len(mine) == len(theirs) == 4  # one line per rate panel
    assert list(mine[0].x) == [0, 0.25, 0.5] and list(mine[0].y) == list(ours["tpr"][1:])
    assert list(theirs[0].y) == list(paper[paper["bias_layer"] >= 0]["tpr"])
    hlines = [s for s in fig.layout.shapes if s.y0 == s.y1]
    assert {round(s.y0, 6) for s in hlines} >= {round(ours["tpr"][0], 6), round(paper["tpr"][0], 6)}
    with pytest.raises(ValueError, match="depth"):
        pe.bias_layer_figure(ours.drop(columns="depth"), paper)


def test_bias_injection_figure_has_one_line_per_arm_and_rate():
    layers = np.arange(4)
    ours = pd.concat(
        [
            pd.DataFrame(
                {"arm": arm, "bias_layer": b, "injection_layer": layers, "depth": layers / 4}
                | _rates(4, b + 1)
            )
            for arm, b in (("none", -1), ("bias L1", 1), ("bias L3", 3))
        ]
    )
    paper = el.paper_bias_injection_sweep()
    fig = pe.bias_injection_figure(ours, paper)
    assert len(_traces(fig, "ours:")) == 3 * 4 and len(_traces(fig, "paper:")) == 4 * 4
    l3 = [t for t in _traces(fig, "ours: bias L3")][0]
    assert list(l3.y) == list(ours[ours["arm"] == "bias L3"]["tpr"])
    bias_lines = sorted({round(s.x0, 4) for s in fig.layout.shapes if s.x0 == s.x1})
    assert bias_lines == sorted({0.25, 0.75, round(20 / 62, 4), round(29 / 62, 4), round(40 / 62, 4)})


def test_dose_gains_and_ablation_figures():
    curve = pd.DataFrame({"strength": [1.0, 2.0, 3.0], "tpr": [0.0, 0.3, 0.9], "tpr_lo": 0.0, "tpr_hi": 1.0})
    arms = pd.DataFrame(
        {"arm": ["a", "b"], "strength": [2.0, 2.0], "tpr": [0.6, 0.95], "dose_strength": [2.5, math.inf]}
    )
    fig = pe.dose_figure(curve, arms)
    assert (
        len(_traces(fig, "dose-equivalent")) == 1 and "gain +0.50" in _traces(fig, "dose-equivalent")[0].name
    )
    gains = pd.DataFrame(
        {"arm": ["x"]}
        | {
            f"d_{m}{s}": [0.1]
            for m in ("tpr", "fpr", "introspection", "forced_id")
            for s in ("", "_lo", "_hi")
        }
    )
    fig = pe.gains_figure(gains, paper=el.PAPER_TEXT)
    paper = _traces(fig, "paper")[0]
    assert list(paper.y) == [0.747, 0.219, 0.547, 0.0]
    table = pd.DataFrame(
        {
            "ablation": ["none", "none", "random 1", "random 1"],
            "strength": [1.0, 2.0, 1.0, 2.0],
            "n_injection": 10,
        }
        | _rates(4)
    )
    fig = pe.direction_ablation_figure(table)
    assert len(_traces(fig, "none")) == 3 and _traces(fig, "random 1")[0].line.dash == "dot"
    with pytest.raises(ValueError, match="ablation"):
        pe.direction_ablation_figure(table.rename(columns={"ablation": "condition"}))
