"""features: the batched sparse grid, DLA gate scores, dose-strength statistics and carriers, by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from mechintro.core.concepts import concept_vectors
from mechintro.core.models import spec_for
from mechintro.core.prompts import trial_prompt
from mechintro.core.readout import yes_no_direction
from mechintro.core.steering import inject
from mechintro.core.transcoders import LazyTranscoders, encode_at, from_raw_params, load_transcoders
from mechintro.mechanism.features import (
    FeatureGrid,
    FeatureGridConfig,
    concept_rates,
    dla_scores,
    dose_spearman,
    feature_grid,
    feature_name,
    feature_stats,
    find_evidence_carriers,
    find_gates,
    grid_from_frame,
    inverted_v,
    parse_feature,
    virtual_weights,
)
from mechintro.testing import save_random_transcoders

CONCEPTS = ["Bread", "Oceans", "Dust"]
STRENGTHS = (-4.0, 0.0, 2.0, 4.0)


@pytest.fixture(scope="module")
def tcs(tiny, tmp_path_factory):
    return load_transcoders(tiny, source=save_random_transcoders(tmp_path_factory.mktemp("tcs")))


@pytest.fixture(scope="module")
def vecs(tiny):
    return concept_vectors(tiny, CONCEPTS, layer=spec_for(tiny).injection_layer)


@pytest.fixture(scope="module")
def grid(tiny, tcs, vecs):
    return feature_grid(tiny, tcs, CONCEPTS, vectors=vecs, strengths=STRENGTHS, batch_size=5)


def test_grid_batched_equals_one_forward_per_concept_and_strength(tiny, tcs, vecs, grid):
    p = trial_prompt(tiny, trial=1)
    inj = spec_for(tiny).injection_layer
    assert grid.layers == [0, 1, 2, 3] and grid.strengths == STRENGTHS
    for c in range(len(CONCEPTS)):
        for s in (c % 2, 2 + c % 2):  # six of the twelve cells, every concept and strength
            strength = STRENGTHS[s]
            with inject(tiny, vecs[c], layer=inj, strength=strength, start=p.injection_start):
                alone = encode_at(tiny, tcs, p.tokens)
            for layer in grid.layers:
                torch.testing.assert_close(grid.dense(layer)[c, s], alone[layer][0, 0], rtol=1e-4, atol=1e-4)
    # injection only reaches layers after the injection layer
    torch.testing.assert_close(grid.dense(inj)[:, 0], grid.dense(inj)[:, 1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(grid.dense(3)[:, 0], grid.dense(3)[:, 1])


def test_prefix_cache_is_exact_and_positions(tiny, tcs, vecs, grid):
    """Sharing the KV cache of the un-injected prefix changes nothing; an earlier position works too."""
    full = feature_grid(
        tiny, tcs, CONCEPTS, vectors=vecs, strengths=STRENGTHS, layers=[3], prefix_cache=False
    )
    torch.testing.assert_close(full.dense(3), grid.dense(3), rtol=1e-5, atol=1e-5)
    p = trial_prompt(tiny, trial=1)
    at = p.injection_start + 2
    early = feature_grid(
        tiny, tcs, CONCEPTS[:1], vectors=vecs[:1], strengths=(0.0, 4.0), layers=[3], positions=at
    )
    with inject(tiny, vecs[0], layer=spec_for(tiny).injection_layer, strength=4.0, start=p.injection_start):
        alone = encode_at(tiny, {3: tcs[3]}, p.tokens, positions=[at])[3][0, 0]
    torch.testing.assert_close(early.dense(3)[0, 1], alone, rtol=1e-4, atol=1e-4)


def test_grid_takes_a_config_or_the_keywords(tiny, tcs, vecs, grid):
    """A FeatureGridConfig and the same keywords give the same grid; keywords apply over a config."""
    cfg = FeatureGridConfig(strengths=(4.0, 0.0, -4.0, 2.0), batch_size=5)
    assert cfg.strengths == STRENGTHS  # sorted
    by_config = feature_grid(tiny, tcs, CONCEPTS, vectors=vecs, config=cfg, progress=False)
    for layer in grid.layers:
        assert torch.equal(by_config.dense(layer), grid.dense(layer))
    only_3 = feature_grid(tiny, tcs, CONCEPTS, vectors=vecs, config=cfg, layers=[3], progress=False)
    assert only_3.layers == [3] and torch.equal(only_3.dense(3), grid.dense(3))
    with pytest.raises(TypeError, match="unknown feature_grid settings .*valid"):
        feature_grid(tiny, tcs, CONCEPTS, vectors=vecs, strenghts=STRENGTHS)


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"strengths": (0.0, float("nan"))}, "grid strength must be a finite number"),
        ({"strengths": ()}, "strengths is empty"),
        ({"layers": (1, True)}, "grid layer must be an int"),
        ({"positions": "first"}, "positions must be 'last' or a token index"),
        ({"injection_layer": -1}, "injection_layer must be an int >= 0"),
        ({"default_strength": float("inf")}, "default_strength must be a finite number"),
        ({"trial": 0}, "trial must be an int >= 1"),
        ({"variant": "nope"}, r"unknown prompt variant .*valid: \['original'"),
        ({"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
        ({"prefix_cache": 1}, "prefix_cache must be True or False"),
    ],
)
def test_grid_config_checks_every_field(settings, match):
    with pytest.raises(ValueError, match=match):
        FeatureGridConfig(**settings)


def test_grid_is_sparse_and_round_trips(grid):
    for layer in grid.layers:
        acts = grid.acts[layer]
        assert acts.is_sparse and acts.is_coalesced()
        assert acts._nnz() == int((acts.to_dense() != 0).sum())
        assert (acts.values() != 0).all()
    df = grid.to_frame()
    assert list(df.columns) == ["concept", "strength", "layer", "index", "feature", "activation"]
    assert (df["activation"] != 0).all() and df["feature"].iloc[0] == feature_name(
        df["layer"].iloc[0], df["index"].iloc[0]
    )
    back = grid_from_frame(df)
    assert back.concepts == grid.concepts and back.strengths == grid.strengths
    for layer in grid.layers:
        assert torch.equal(back.dense(layer), grid.dense(layer))
    idx = [3, 0, 7]
    torch.testing.assert_close(grid.dense(2, idx), grid.dense(2)[:, :, idx])
    with pytest.raises(ValueError, match=r"strengths are \[-4.0, 0.0, 2.0, 4.0\]"):
        grid.strength_index(8.0)
    with pytest.raises(ValueError, match=r"layers are \[0, 1, 2, 3\]"):
        grid.dense(9)


def test_lazy_transcoders_load_each_layer_once(tiny, tcs, vecs, grid):
    """Inputs of every chunk are captured first, then each layer is encoded: one load per layer, whatever
    the number of chunks, and the same grid."""
    loads = []

    def load(layer):
        loads.append(layer)
        return tcs[layer]

    lazy = LazyTranscoders(sorted(tcs), load, keep=1)
    again = feature_grid(
        tiny, lazy, CONCEPTS, vectors=vecs, strengths=STRENGTHS, batch_size=5, progress=False
    )
    assert sorted(loads) == sorted(tcs)
    for layer in grid.layers:
        assert torch.equal(again.dense(layer), grid.dense(layer))


def test_grid_summary_counts_and_card(grid):
    summary = grid.summary().set_index("layer")
    for layer in grid.layers:
        dense = grid.dense(layer)
        row = summary.loc[layer]
        assert row["nonzero"] == int((dense != 0).sum())
        assert row["active_any"] == int((dense != 0).any(dim=(0, 1)).sum())
        s0, sd = grid.strength_index(0.0), grid.strength_index(grid.default_strength)
        assert row["active_unsteered"] == int((dense[:, s0] != 0).any(dim=0).sum())
        assert row["active_default"] == int((dense[:, sd] != 0).any(dim=0).sum())
    html = grid._repr_html_()
    assert html.startswith("<div class='mechintro-card'><b>FeatureGrid</b>")
    assert f"<td>{int(summary['nonzero'].iloc[0])}</td>" in html


def test_feature_names():
    assert feature_name(3, 12) == "L3 F12" and parse_feature("L3 F12") == (3, 12) == parse_feature((3, 12))
    with pytest.raises(ValueError, match="looks like 'L3 F12'"):
        parse_feature("layer3/12")


def _grid(acts: dict[int, np.ndarray], strengths, *, inj=0, default=None) -> FeatureGrid:
    """A FeatureGrid from dense [concept, strength, d_sae] arrays."""
    n_c = next(iter(acts.values())).shape[0]
    return FeatureGrid(
        concepts=tuple(f"C{i}" for i in range(n_c)),
        strengths=tuple(strengths),
        acts={la: torch.tensor(a, dtype=torch.float32).to_sparse().coalesce() for la, a in acts.items()},
        injection_layer=inj,
        default_strength=default if default is not None else max(strengths),
    )


def test_dla_scores_sign_and_ranking_on_constructed_decoders(tiny, tcs):
    """dla_weight = unit decoder . (Yes - No); score = weight x unsteered activation; top = most negative."""
    d = yes_no_direction(tiny, spec_for(tiny))
    u = d / d.norm()
    raw = {
        "w_enc": torch.zeros(64, 4),
        "b_enc": torch.zeros(4),
        "b_dec": torch.zeros(64),
        "threshold": torch.zeros(4),
    }
    raw["w_dec"] = torch.stack([-3 * u, u, -0.5 * u, torch.zeros(64)])
    made = {3: from_raw_params(raw, layer=3)}
    a0 = np.array([1.0, 5.0, 4.0, 2.0])  # unsteered activations
    acts = np.tile(a0, (2, 3, 1))
    acts[:, 2] = 0.5 * a0  # strength 2 suppresses every feature
    grid = _grid({3: acts}, (-2.0, 0.0, 2.0), inj=1, default=2.0)
    scores = dla_scores(tiny, made, grid).set_index("feature")
    norm = float(d.norm())
    np.testing.assert_allclose(scores["dla_weight"], [-norm, norm, -norm, 0.0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(scores["dla_score"], scores["dla_weight"] * a0, rtol=1e-6)
    gates = find_gates(tiny, made, grid, k=5)
    assert gates["feature"].tolist() == [
        "L3 F2",
        "L3 F0",
    ]  # F2: -norm x 4 beats F0: -norm x 1; F1 promotes Yes
    assert gates["rank"].tolist() == [1, 2]
    assert {"spearman_pos", "spearman_neg", "inverted_v", "detection_corr", "forced_corr"} <= set(
        gates.columns
    )
    assert find_gates(tiny, made, grid, k=1)["feature"].tolist() == ["L3 F2"]


def test_spearman_and_inverted_v_on_hand_made_tables():
    s = (-2.0, -1.0, 0.0, 1.0, 2.0)
    table = np.array(
        [
            [0, 1, 2, 1, 0],  # inverted V: silenced at both ends
            [0, 0, 0, 1, 2],  # grows with positive injection only
            [3, 2, 1, 2, 3],  # V: not a gate
            [1, 2, 4, 3, 2],  # asymmetric inverted V
        ],
        dtype=float,
    ).T
    acts = np.stack([table, table])  # two identical concepts
    pos, neg = dose_spearman(acts, s)
    np.testing.assert_allclose(pos[[0, 1, 2]], [-1.0, 1.0, 1.0])
    assert neg[0] == pytest.approx(-1.0) and np.isnan(neg[1]) and neg[2] == pytest.approx(1.0)
    score, peak = inverted_v(acts, s)
    assert score[0] == pytest.approx(1.0) and np.isnan(score[1]) and score[2] == pytest.approx(-2.0)
    assert score[3] == pytest.approx((4 - 2) / 4)
    assert peak.tolist() == [True, False, False, True]
    # matches scipy on a random table (pooled pairs; dose = |s| on the negative side)
    rng = np.random.default_rng(0)
    acts = rng.random((3, 5, 2))
    pos, neg = dose_spearman(acts, s)
    x = np.tile([0.0, 1.0, 2.0], 3)
    assert pos[1] == pytest.approx(stats.spearmanr(x, acts[:, 2:, 1].reshape(-1)).statistic)
    assert neg[0] == pytest.approx(
        stats.spearmanr(np.tile([2.0, 1.0, 0.0], 3), acts[:, :3, 0].reshape(-1)).statistic
    )
    with pytest.raises(ValueError, match="needs strength 0"):
        inverted_v(acts, (-2.0, -1.0, 0.5, 1.0, 2.0))


def test_concept_rates_and_behaviour_correlations():
    trials = pd.DataFrame(
        {
            "concept": ["C0"] * 4 + ["C1"] * 4 + ["C2"] * 4 + ["C3"] * 2,
            "condition": ["injection", "injection", "forced", "control"] * 3 + ["injection", "injection"],
            "strength": [2.0, 2.0, 2.0, 0.0] * 3 + [2.0, 2.0],
            "detected": [1, 1, None, 0, 1, 0, None, 0, 0, 0, None, 1, 1, None],
            "forced_identified": [None, None, 1, None, None, None, 0, None, None, None, 0, None, None, None],
            "judge_error": [None] * 13 + ["api timeout"],
        }
    )
    rates = concept_rates(trials).set_index("concept")
    assert rates.loc["C0", "detection_rate"] == 1.0 and rates.loc["C1", "detection_rate"] == 0.5
    assert rates.loc["C2", "detection_rate"] == 0.0 and rates.loc["C1", "forced_id_rate"] == 0.0
    assert rates.loc["C3", "n_injection"] == 1  # the judge error is not an answer
    # a feature whose activation at the default strength tracks detection: correlation 1
    acts = np.zeros((4, 3, 2))
    acts[:, 2, 0] = [3.0, 2.0, 1.0, 3.0]  # follows detection 1, .5, 0, 1
    acts[:, 2, 1] = [1.0, 2.0, 3.0, 1.0]
    acts[:, 1, :] = 1.0
    grid = _grid({2: acts}, (-2.0, 0.0, 2.0), default=2.0)
    out = feature_stats(grid, ["L2 F0", "L2 F1"], behaviour=trials)
    assert out["detection_corr"].tolist() == pytest.approx([1.0, -1.0])
    r = np.corrcoef([1.0, 0.0, 0.0], [3.0, 2.0, 1.0])[0, 1]  # C3 has no forced rate: 3 concepts left
    assert out["forced_corr"].tolist() == pytest.approx([r, -r])
    assert feature_stats(grid, ["L2 F0"])["detection_corr"].isna().all()
    with pytest.raises(ValueError, match="lacks"):
        concept_rates(trials.drop(columns=["condition"]))


def test_carrier_virtual_weight_sign_on_constructed_weights(tiny):
    """Gate encoder e; a decoder row -e suppresses the gate (carrier), +e excites it (suppressor)."""
    g = torch.Generator().manual_seed(0)
    e = torch.randn(64, generator=g)
    zeros = {"b_enc": torch.zeros(3), "b_dec": torch.zeros(64), "threshold": torch.zeros(3)}
    carriers_tc = from_raw_params(
        zeros | {"w_enc": torch.zeros(64, 3), "w_dec": torch.stack([-e, e, -2 * e])}, layer=2
    )
    gate_tc = from_raw_params(
        zeros | {"w_enc": torch.stack([e, torch.zeros(64), torch.zeros(64)], 1), "w_dec": torch.zeros(3, 64)},
        layer=3,
    )
    made = {2: carriers_tc, 3: gate_tc}
    vw = virtual_weights(made, "L3 F0", 2, [0, 1, 2])
    torch.testing.assert_close(vw, torch.stack([-(e @ e), e @ e, -2 * (e @ e)]))
    s = (-2.0, 0.0, 2.0)
    layer2 = np.zeros((4, 3, 3))
    layer2[:, :, 0] = [[0, 1, 2], [0, 1, 3], [0, 1, 1], [0, 1, 2]]  # grows with s; tracks detection
    layer2[:, :, 1] = layer2[:, :, 0]
    layer2[:, :, 2] = [[0, 1, 1], [0, 1, 2], [0, 1, 3], [0, 1, 1]]  # grows with s, anti-tracks detection
    layer3 = np.ones((4, 3, 3))
    grid = _grid({1: np.ones((4, 3, 3)), 2: layer2, 3: layer3}, s, inj=1, default=2.0)
    rates = pd.DataFrame(
        {
            "concept": grid.concepts,
            "detection_rate": [0.5, 0.9, 0.1, 0.5],
            "forced_id_rate": [0.5, 0.9, 0.1, 0.5],
        }
    )
    out = find_evidence_carriers(tiny, made, grid, "L3 F0", behaviour=rates).set_index("feature")
    assert out.loc["L2 F0", "role"] == "carrier" and out.loc["L2 F1", "role"] == "suppressor"
    assert out.loc["L2 F2", "role"] == "carrier"  # nonzero (negative) correlations still count
    a_default = layer2[:, 2, 0].mean()
    assert out.loc["L2 F0", "attribution"] == pytest.approx(float(vw[0]) * a_default, rel=1e-5)
    assert out.loc["L2 F2", "rank"] == 1 and out.loc["L2 F0", "rank"] == 2  # most negative attribution first
    assert set(out["layer"]) == {2}  # only layers strictly between the injection layer and the gate
    no_behaviour = find_evidence_carriers(tiny, made, grid, "L3 F0")
    assert len(no_behaviour) == 3
    strict = find_evidence_carriers(tiny, made, grid, "L3 F0", behaviour=rates, min_abs_corr=0.999)
    assert set(strict["feature"]) == {"L2 F0", "L2 F1"}
    empty = find_evidence_carriers(tiny, made, grid, "L2 F0", behaviour=rates)  # no layer in between
    assert empty.empty and list(empty.columns) == list(out.reset_index().columns)


def test_behaviour_correlation_is_spearman_by_default_and_pearson_on_request():
    """A monotone but non-linear relation: Spearman 1 (the paper's released code), Pearson below 1."""
    rates = pd.DataFrame(
        {
            "concept": ["C0", "C1", "C2", "C3"],
            "detection_rate": [0.0, 0.25, 0.5, 1.0],
            "forced_id_rate": [0.0, 0.2, 0.4, 0.9],
        }
    )
    acts = np.zeros((4, 3, 1))
    acts[:, 2, 0] = [1.0, 2.0, 3.0, 50.0]
    acts[:, 1, :] = 1.0
    grid = _grid({2: acts}, (-2.0, 0.0, 2.0), default=2.0)
    spearman = feature_stats(grid, ["L2 F0"], behaviour=rates)
    pearson = feature_stats(grid, ["L2 F0"], behaviour=rates, correlation="pearson")
    assert spearman["detection_corr"].iloc[0] == pytest.approx(1.0)
    expected = np.corrcoef([0.0, 0.25, 0.5, 1.0], [1.0, 2.0, 3.0, 50.0])[0, 1]
    assert pearson["detection_corr"].iloc[0] == pytest.approx(expected) and expected < 0.95


def test_carriers_per_concept_with_sign_criteria_follow_that_concepts_activation(tiny):
    """concept= uses that concept's activation (the paper's per-(gate, concept) carriers); criteria="sign"
    keeps every active feature, its role by the sign of its attribution alone."""
    g = torch.Generator().manual_seed(0)
    e = torch.randn(64, generator=g)
    zeros = {"b_enc": torch.zeros(3), "b_dec": torch.zeros(64), "threshold": torch.zeros(3)}
    tcs = {
        2: from_raw_params(
            zeros | {"w_enc": torch.zeros(64, 3), "w_dec": torch.stack([-e, e, -2 * e])}, layer=2
        ),
        3: from_raw_params(
            zeros
            | {"w_enc": torch.stack([e, torch.zeros(64), torch.zeros(64)], 1), "w_dec": torch.zeros(3, 64)},
            layer=3,
        ),
    }
    acts = np.zeros((2, 3, 3))
    acts[0, 2] = [1.0, 0.0, 3.0]  # C0 at the default strength: F0 and F2 active
    acts[1, 2] = [0.0, 2.0, 1.0]  # C1: F1 and F2
    acts[:, 0] = [[0.0, 0.0, 5.0], [0.0, 0.0, 5.0]]  # F2 falls with strength (dose rho < 0)
    grid = _grid({2: acts, 3: np.zeros((2, 3, 3))}, (0.0, 1.0, 2.0), default=2.0, inj=1)
    for concept, expected in (
        ("C0", {"L2 F0": "carrier", "L2 F2": "carrier"}),
        ("C1", {"L2 F1": "suppressor", "L2 F2": "carrier"}),
    ):
        df = find_evidence_carriers(tiny, tcs, grid, "L3 F0", concept=concept, criteria="sign")
        assert dict(zip(df["feature"], df["role"], strict=True)) == expected
        vw = (tcs[2].W_dec.detach() @ e).numpy()
        c = ["C0", "C1"].index(concept)
        for row in df.itertuples():
            assert row.attribution == pytest.approx(vw[row.index] * acts[c, 2, row.index], rel=1e-5)
    pooled = find_evidence_carriers(tiny, tcs, grid, "L3 F0")  # dose criteria: F2 falls with strength
    assert "L2 F2" not in set(pooled["feature"])
    with pytest.raises(ValueError, match="not in the grid"):
        find_evidence_carriers(tiny, tcs, grid, "L3 F0", concept="C9")
