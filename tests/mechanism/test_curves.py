"""curves: gate curves (logit and sampled), carrier sets and carrier curves, on the tiny model."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from mechintro.behaviour.judges import LogitJudge, RuleJudge
from mechintro.core.concepts import concept_vectors
from mechintro.core.models import spec_for
from mechintro.core.prompts import trial_prompt
from mechintro.core.readout import yes_no_gap
from mechintro.core.steering import inject
from mechintro.mechanism.curves import (
    CARRIER_SETS,
    carrier_curves,
    carrier_sets,
    gate_curves_logit,
    gate_curves_sampled,
    gate_response,
    success_failure,
    summarize_gate_curves,
)
from mechintro.mechanism.interventions import intervene, read_features

CONCEPTS = ["Bread", "Oceans"]
GATES = ["L3 F5", "L3 F17", "L3 F40", "L2 F7"]
INJ = 1


@pytest.fixture(scope="module")
def vecs(tiny):
    return concept_vectors(tiny, CONCEPTS, layer=INJ)


def test_gate_curves_logit_ends_match_direct_runs(tiny, tcs, vecs):
    df = gate_curves_logit(
        tiny,
        tcs,
        GATES,
        CONCEPTS,
        vectors=vecs,
        ks=[0, 2, 4],
        strength=8.0,
        injection_layer=INJ,
        batch_size=4,
    )
    assert set(df["experiment"]) == {"ablation", "patching", "forced_ablation"}
    spec, p = spec_for(tiny), trial_prompt(tiny, trial=1)
    by = df.set_index(["experiment", "k", "concept"])["value"]
    with torch.no_grad():
        clean_gap = float(yes_no_gap(tiny(p.tokens[None])[0, -1], spec))
        control = read_features(tiny, tcs, GATES[:2], p.tokens)
        for c, concept in enumerate(CONCEPTS):
            with inject(tiny, vecs[c], layer=INJ, strength=8.0, start=p.injection_start):
                steered_gap = float(yes_no_gap(tiny(p.tokens[None])[0, -1], spec))
                steered = read_features(tiny, tcs, GATES[:2], p.tokens)
                with intervene(tiny, tcs, GATES[:2], target=control):
                    ablated = float(yes_no_gap(tiny(p.tokens[None])[0, -1], spec))
            with intervene(tiny, tcs, GATES[:2], target=steered):
                patched = float(yes_no_gap(tiny(p.tokens[None])[0, -1], spec))
            assert by["ablation", 0, concept] == pytest.approx(
                steered_gap, abs=1e-4
            )  # k = 0: nothing ablated
            assert by["patching", 0, concept] == pytest.approx(clean_gap, abs=1e-4)
            assert by["ablation", 2, concept] == pytest.approx(ablated, abs=1e-4)
            assert by["patching", 2, concept] == pytest.approx(patched, abs=1e-4)
    summary = summarize_gate_curves(df)
    assert len(summary) == 9 and (summary["n"] == 2).all()
    with pytest.raises(ValueError, match=r"0..4"):
        gate_curves_logit(tiny, tcs, GATES, CONCEPTS, vectors=vecs, ks=[5])


def test_gate_curves_sampled_with_a_judge(tiny, tcs, vecs):
    df = gate_curves_sampled(
        tiny,
        tcs,
        GATES,
        CONCEPTS,
        judge=RuleJudge(),
        vectors=vecs,
        ks=[0, 4],
        n_samples=2,
        experiments=("ablation", "forced_ablation"),
        injection_layer=INJ,
        max_new_tokens=4,
        batch_size=5,
    )
    assert len(df) == 2 * 2 * 2 * 2
    assert set(df["condition"]) == {"injection", "forced"}
    assert df.loc[df["condition"] == "forced", "forced_identified"].notna().all()
    assert df.loc[df["condition"] == "injection", "detected"].notna().all()
    summary = summarize_gate_curves(df)
    assert list(summary.columns) == ["experiment", "k", "rate", "mean", "lo", "hi", "n"]
    assert (summary["n"] == 4).all() and summary["rate"].tolist() == ["detected"] * 2 + [
        "forced_identified"
    ] * 2


def test_gate_curves_with_the_logit_judge_judge_logit_scores(tiny, tcs, vecs):
    kw = dict(vectors=vecs, ks=[0, 4], injection_layer=INJ, strength=8.0)
    scores = gate_curves_logit(tiny, tcs, GATES, CONCEPTS, **kw)
    df = gate_curves_sampled(
        tiny, tcs, GATES, CONCEPTS, judge=LogitJudge(threshold=-0.05, p_threshold=1e-4), **kw
    )
    assert len(df) == len(scores) and (df["sample"] == 0).all()
    gap = scores["experiment"] != "forced_ablation"
    assert df.loc[gap, "detected"].tolist() == (scores.loc[gap, "value"] > -0.05).tolist()
    assert df.loc[~gap, "forced_identified"].tolist() == (scores.loc[~gap, "value"] >= 1e-4).tolist()
    assert df.loc[gap, "forced_identified"].isna().all() and df["identified"].isna().all()


def test_carrier_sets_by_hand():
    carriers = pd.DataFrame(
        {
            "feature": [f"L2 F{i}" for i in range(12)] + ["L2 F98", "L2 F99"],
            "attribution": [-float(i) for i in range(12, 0, -1)] + [5.0, 0.05],
            "role": ["carrier"] * 12 + ["suppressor", "suppressor"],
        }
    )
    sets = carrier_sets(carriers)
    assert sets["none"] == [] and len(sets["all"]) == 12 and "L2 F99" not in sets["all"]
    assert sets["top20"] == ["L2 F0", "L2 F1"]  # max(1, floor(0.2 x 12)) largest |attribution|, the paper's
    assert sets["top5"] == ["L2 F0"]  # max(1, floor(0.6))
    assert sets["suppressors:all"] == ["L2 F98", "L2 F99"] and sets["suppressors:top20"] == ["L2 F98"]
    # the weak control: the floor(10% of 14) = 1 smallest |attribution| among all nonzero attributions
    assert sets["bottom10"] == ["L2 F99"]
    assert carrier_sets(carriers, ["bottom10"], weak_from="carriers")["bottom10"] == ["L2 F11"]
    assert carrier_sets(carriers, ["carriers:all"])["carriers:all"] == sets["all"]
    with pytest.raises(ValueError, match="top<P>"):
        carrier_sets(carriers, ["middle"])
    with pytest.raises(ValueError, match="weak_from"):
        carrier_sets(carriers, weak_from="suppressors")


def test_carrier_curves(tiny, tcs, vecs):
    carriers = pd.DataFrame(
        {"feature": ["L2 F7", "L2 F11", "L2 F30"], "attribution": [-3.0, -2.0, -0.1], "role": "carrier"}
    )
    strengths = (-8.0, 0.0, 8.0)
    df = carrier_curves(
        tiny,
        tcs,
        "L3 F5",
        carriers,
        CONCEPTS,
        vectors=vecs,
        strengths=strengths,
        injection_layer=INJ,
        batch_size=7,
    )
    assert len(df) == len(CONCEPTS) * len(CARRIER_SETS) * 3
    table = df.set_index(["concept", "carrier_set", "strength"])["gate_activation"]
    response = gate_response(
        tiny, tcs, "L3 F5", CONCEPTS, vectors=vecs, strengths=strengths, injection_layer=INJ
    )
    for row in response.itertuples():
        assert table[row.concept, "none", row.strength] == pytest.approx(row.gate_activation, abs=1e-4)
        # ablating to the control activation in the unsteered run changes nothing
        assert table[row.concept, "all", 0.0] == pytest.approx(table[row.concept, "none", 0.0], abs=1e-4)
    assert df.loc[df["carrier_set"] == "top20", "n_ablated"].unique().tolist() == [1]
    steered = df[(df["strength"] == 8.0)]
    assert steered.groupby("carrier_set")["gate_activation"].mean().nunique() > 1


def test_success_failure():
    rates = pd.DataFrame({"concept": list("abcde"), "detection_rate": [0.9, 0.1, 0.5, 0.0, 0.7]})
    assert success_failure(rates, n=2) == {"success": ["a", "e"], "failure": ["d", "b"]}
