"""geometry: planted answers on synthetic concept vectors, then the model-facing parts on the tiny Gemma 3.

The synthetic "models" are rules of the vector (``detect(labels, V)``): a linear rule (one direction), and an
XOR-like rule that no single direction explains.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.metrics import f1_score
from sklearn.model_selection import StratifiedKFold

from mechintro.behaviour.judges import RuleJudge
from mechintro.behaviour.plan import trial_seed
from mechintro.behaviour.store import TrialStore
from mechintro.core.hooks import hooks_context
from mechintro.core.models import HookNames, spec_for
from mechintro.core.prompts import left_pad, trial_prompt
from mechintro.core.readout import unembedding
from mechintro.core.sampling import sample
from mechintro.core.steering import inject
from mechintro.studies import geometry as geo

D = 10


def _unit(v):
    return v / np.linalg.norm(v)


def _names(n, prefix="c"):
    return [f"{prefix}{i}" for i in range(n)]


def _rates(concepts, values, column="detection_rate"):
    return pd.DataFrame({"concept": concepts, column: np.asarray(values, dtype=float)})


@pytest.fixture(scope="module")
def w():
    return _unit(np.random.default_rng(1).standard_normal(D))


@pytest.fixture(scope="module")
def linear(w):
    """Isotropic vectors around an offset orthogonal to w; success = w·x > 0."""
    rng = np.random.default_rng(2)
    offset = rng.standard_normal(D)
    offset = 3.0 * _unit(offset - (offset @ w) * w)
    x = rng.standard_normal((1500, D)) + offset
    concepts = _names(len(x))
    part = geo.partition(x, concepts, _rates(concepts, x @ w > 0))
    return x, concepts, part


def linear_rule(w):
    return lambda labels, v: (np.asarray(v) @ w > 0).astype(float)


def xor_rule(labels, v):
    v = np.asarray(v)
    return (v[:, 0] * v[:, 1] > 0).astype(float)


# ----------------------------------------------------------------------------------------------- partition


def test_mean_difference_recovers_a_planted_linear_rule_on_isotropic_data(linear, w):
    x, concepts, part = linear
    y = x @ w > 0
    assert part.threshold == 1.0 and (part.success == y).all()
    by_hand = x[y].mean(0) - x[~y].mean(0)
    np.testing.assert_allclose(part.direction, by_hand / np.linalg.norm(by_hand), atol=1e-12)
    np.testing.assert_allclose(part.delta_mu_norm, np.linalg.norm(by_hand), rtol=1e-12)
    assert part.direction @ w > 0.99  # signed: towards success
    assert part.balanced_accuracy > 0.95 and part.projection_balanced_accuracy > 0.93
    frame = part.frame(x)
    np.testing.assert_allclose(frame["projection"], x @ part.direction)
    np.testing.assert_allclose(frame["norm"], np.linalg.norm(x, axis=1))
    assert list(frame["group"].unique()) == ["success", "failure"] or set(frame["group"]) == {
        "success",
        "failure",
    }


def test_lda_recovers_the_planted_w_on_anisotropic_data_where_the_mean_difference_does_not(w):
    rng = np.random.default_rng(3)
    rotation = np.linalg.qr(rng.standard_normal((D, D)))[0]
    x = rng.standard_normal((3000, D)) @ np.diag(np.linspace(0.2, 3.0, D)) @ rotation
    concepts = _names(len(x))
    part = geo.partition(x, concepts, _rates(concepts, x @ w > 0))
    assert part.lda_direction @ w > 0.95
    assert part.direction @ w < 0.9  # the data really is anisotropic: Δμ ∝ Σw, not w
    assert part.balanced_accuracy > 0.95


def test_threshold_sweep_keeps_the_best_lda_split_with_a_big_enough_minority(w):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((600, D))
    s = x @ w
    concepts = _names(len(x))
    # rate >= 0.6 is the planted linear split; rate 1.0 alone is separable too but holds ~10% of concepts;
    # rate >= 0.2 adds a random half of the failures (not separable)
    rates = np.where(s > 1.3, 1.0, np.where(s > 0, 0.6, rng.choice([0.0, 0.2], size=len(s))))
    part = geo.partition(x, concepts, _rates(concepts, rates))
    sweep = part.sweep.set_index("threshold")
    assert list(sweep.index) == [0.2, 0.6, 1.0]
    assert not sweep.loc[1.0, "valid"] and np.isnan(sweep.loc[1.0, "macro_f1"])
    assert sweep.loc[1.0, "minority_share"] == pytest.approx((s > 1.3).mean())
    assert part.threshold == 0.6 and sweep.loc[0.6, "macro_f1"] > sweep.loc[0.2, "macro_f1"] + 0.1
    # the chosen threshold's macro-F1 recomputed fold by fold
    y = rates >= 0.6
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    by_hand = [
        f1_score(
            y[te],
            LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(x[tr], y[tr]).predict(x[te]),
            average="macro",
        )
        for tr, te in folds.split(x, y)
    ]
    assert part.macro_f1 == pytest.approx(np.mean(by_hand), abs=1e-12)
    # with a lower minority bound, the rare separable split competes
    loose = geo.partition(x, concepts, _rates(concepts, rates), min_minority=0.05)
    assert loose.sweep.set_index("threshold").loc[1.0, "valid"]


def test_partition_on_detection_and_identification_rate(w):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, D))
    concepts = _names(len(x))
    table = pd.DataFrame(
        {
            "concept": concepts,
            "detection_rate": np.ones(len(x)),  # everything detected...
            "introspection_rate": (x @ w > 0).astype(float),  # ...but only some named
        }
    )
    with pytest.raises(ValueError, match="does not vary"):
        geo.partition(x, concepts, table)
    part = geo.partition(x, concepts, table, rate="introspection_rate")
    assert part.rate == "introspection_rate" and part.direction @ w > 0.95


@pytest.mark.parametrize(
    "change, match",
    [
        ({"rate": "forced_id_rate"}, r"valid: \['detection_rate', 'introspection_rate'\]"),
        ({"vectors": np.full((40, D), np.nan)}, "NaN"),
        ({"vectors": np.zeros((39, D))}, "need 39 distinct concepts"),
        ({"rates": _rates(_names(39), np.ones(39))}, "no detection_rate for concepts"),
        ({"min_minority": 0.5}, "min_minority"),
    ],
)
def test_partition_rejects_bad_input(change, match):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((40, D))
    kw = {"vectors": x, "concepts": _names(40), "rates": _rates(_names(40), x[:, 0] > 0)} | change
    with pytest.raises(ValueError, match=match):
        geo.partition(kw.pop("vectors"), kw.pop("concepts"), kw.pop("rates"), **kw)


# ----------------------------------------------------------------------------------------------- swaps


def test_swap_vectors_arithmetic_by_hand(w):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((30, D)) * rng.uniform(0.5, 3, size=(30, 1))
    success = x @ w > 0
    for rule in geo.PARTNER_RULES:
        partners = geo.swap_partners(x, success, rule=rule, seed=1)
        assert (success[partners] != success).all()
        if rule == "nearest":
            for i, j in enumerate(partners):
                others = np.flatnonzero(success != success[i])
                cos = [x[i] @ x[k] / np.linalg.norm(x[i]) / np.linalg.norm(x[k]) for k in others]
                assert j == others[int(np.argmax(cos))]
    partners = geo.swap_partners(x, success, rule="random", seed=1)
    p = x @ w
    r = x - np.outer(p, w)
    out, table = geo.swap_vectors(x, w, partners, kind="projection", rescale=False)
    np.testing.assert_allclose(out, r + np.outer(p[partners], w), atol=1e-12)
    out, table = geo.swap_vectors(x, w, partners, kind="residual", rescale=False)
    np.testing.assert_allclose(out, np.outer(p, w) + r[partners], atol=1e-12)
    np.testing.assert_allclose(table["scale"], 1.0)
    out, table = geo.swap_vectors(x, w, partners, kind="projection", rescale=True)
    swapped = r + np.outer(p[partners], w)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), np.linalg.norm(x, axis=1), rtol=1e-12)
    np.testing.assert_allclose(table["swapped_projection"], p[partners], atol=1e-12)
    np.testing.assert_allclose(
        table["final_projection"], p[partners] * np.linalg.norm(x, axis=1) / np.linalg.norm(swapped, axis=1)
    )
    np.testing.assert_allclose(
        table["projection_shift"], table["final_projection"] - table["swapped_projection"]
    )
    with pytest.raises(ValueError, match=r"valid: \['projection', 'residual'\]"):
        geo.swap_vectors(x, w, partners, kind="norm")
    with pytest.raises(ValueError, match=r"valid: \['random', 'nearest'\]"):
        geo.swap_partners(x, success, rule="farthest")


def test_swaps_flip_detection_as_a_linear_rule_predicts(linear, w):
    x, concepts, part = linear
    seen = []

    def detect(labels, v):
        seen.extend(labels)
        return linear_rule(w)(labels, v)

    # with the rule's own direction the prediction is exact: swapping the projection flips every concept,
    # swapping the residual none (the rescale is a positive factor and the rule's cut is at 0)
    exact = geo.swap_experiment(x, replace(part, direction=w), detect=detect)
    assert len(seen) == len(set(seen)) == 5 * len(x)
    rate = exact.set_index(["kind", "partners", "concept"])["rate"]
    original = rate["original", "-"]
    for rule in geo.PARTNER_RULES:
        assert (rate["projection", rule] == 1 - original).all()
        assert (rate["residual", rule] == original).all()
    # with the estimated direction (cos > 0.99 with w), nearly so
    swaps = geo.swap_experiment(x, part, detect=linear_rule(w), rules=("random",))
    mean = swaps.groupby(["group", "kind"])["rate"].mean()
    assert mean["success", "original"] == 1.0 and mean["failure", "original"] == 0.0
    assert mean["success", "projection"] < 0.12 and mean["failure", "projection"] > 0.88
    assert mean["success", "residual"] > 0.88 and mean["failure", "residual"] < 0.12
    tests = geo.paired_tests(swaps).set_index(["group", "kind"])
    row = tests.loc[("success", "projection")]
    before = swaps[(swaps.kind == "original") & (swaps.group == "success")]["rate"].to_numpy()
    after = swaps[(swaps.kind == "projection") & (swaps.group == "success")]["rate"].to_numpy()
    assert row["mean_change"] == pytest.approx(after.mean() - before.mean())
    assert row["wilcoxon_p"] == pytest.approx(stats.wilcoxon(after, before).pvalue)
    assert row["t_p"] < 1e-10


# ------------------------------------------------------------------------------------- XOR, bidirectional


def test_xor_rule_one_direction_cannot_explain_it_and_pairs_are_detected_both_ways(linear, w):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((600, D))
    concepts = _names(len(x))
    part = geo.partition(x, concepts, _rates(concepts, xor_rule(None, x)))
    assert part.balanced_accuracy < 0.6 and part.projection_balanced_accuracy < 0.6
    pairs = geo.bidirectional_pairs(x, part)
    result = geo.bidirectional_experiment(x, concepts, pairs, detect=xor_rule, detected_at=0.5)
    summary = geo.bidirectional_summary(result).set_index("group")
    assert summary.loc["S-S", "share_both"] > 0.3 and summary.loc["S-S", "n_one"] == 0
    # a linear rule never detects both x and -x
    lx, lconcepts, lpart = linear
    lpairs = geo.bidirectional_pairs(lx, lpart)
    lresult = geo.bidirectional_experiment(lx, lconcepts, lpairs, detect=linear_rule(w), detected_at=0.5)
    lsummary = geo.bidirectional_summary(lresult).set_index("group")
    assert (lsummary["n_both"] == 0).all() and lsummary["n_one"].sum() > 50


def test_bidirectional_pairs_are_disjoint_matched_and_greedy_by_cosine(linear):
    x, concepts, part = linear
    x, part_small = x[:200], geo.partition(x[:200], concepts[:200], _rates(concepts[:200], part.rates[:200]))
    tol = 0.3
    pairs = geo.bidirectional_pairs(x, part_small, tolerance=tol)
    p = x @ part_small.direction
    idx = {c: i for i, c in enumerate(concepts[:200])}
    a, b = pairs["a"].map(idx).to_numpy(), pairs["b"].map(idx).to_numpy()
    assert len(set(a) | set(b)) == 2 * len(pairs)  # disjoint
    assert (part_small.success[a] == part_small.success[b]).all()
    assert (pairs["group"] == np.where(part_small.success[a], "S-S", "F-F")).all()
    assert (np.abs(p[a] - p[b]) <= tol * p.std() + 1e-12).all()
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(pairs["cosine"], (unit[a] * unit[b]).sum(1))
    for group, flag in (("S-S", True), ("F-F", False)):  # the first pair is the best matched candidate
        ids = np.flatnonzero(part_small.success == flag)
        best = max(
            (unit[i] @ unit[j], i, j)
            for k, i in enumerate(ids)
            for j in ids[k + 1 :]
            if abs(p[i] - p[j]) <= tol * p.std()
        )
        first = pairs[pairs["group"] == group].iloc[0]
        assert first["cosine"] == pytest.approx(best[0])
    cats = {c: ("even" if i % 2 == 0 else "odd") for i, c in enumerate(concepts[:100])}
    same = geo.bidirectional_pairs(x, part_small, tolerance=tol, categories=cats)
    assert len(same) and (same["a"].map(cats) == same["b"].map(cats)).all()
    assert not set(same["a"]) & set(concepts[100:200])  # concepts without a category are left out


def test_bidirectional_rescale_and_labels(linear, w):
    x, concepts, part = linear
    pairs = geo.bidirectional_pairs(x, part).head(5)
    got = {}

    def detect(labels, v):
        got.update(zip(labels, np.asarray(v), strict=True))
        return np.zeros(len(labels))

    result = geo.bidirectional_experiment(x, concepts, pairs, detect=detect, detected_at=0.5, rescale_to=7.0)
    i = {c: k for k, c in enumerate(concepts)}
    a, b = pairs.iloc[0]["a"], pairs.iloc[0]["b"]
    diff = x[i[a]] - x[i[b]]
    np.testing.assert_allclose(got[f"{a}#minus-{b}"], 7.0 * diff / np.linalg.norm(diff))
    np.testing.assert_allclose(got[f"{b}#minus-{a}"], -7.0 * diff / np.linalg.norm(diff))
    assert result["norm"].iloc[0] == pytest.approx(np.linalg.norm(diff))


# ----------------------------------------------------------------------------------------------- structure


def test_concept_pca_of_normalized_vectors_by_hand():
    rng = np.random.default_rng(9)
    axis = _unit(rng.standard_normal(D))
    other = _unit(rng.standard_normal(D))
    x = 5 * np.outer(rng.standard_normal(200), axis) + rng.standard_normal((200, D)) * 0.5 + 4 * other
    x *= rng.uniform(0.1, 10, size=(200, 1))  # norms that the normalization must remove
    pca = geo.concept_pca(x, _names(200), n_components=3, directions={"axis": axis, "other": other})
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    centred = unit - unit.mean(0)
    sv = np.linalg.svd(centred, compute_uv=False)
    np.testing.assert_allclose(
        pca.summary["explained_variance_ratio"], (sv**2 / (sv**2).sum())[:3], rtol=1e-9
    )
    assert pca.summary["alignment_axis"].iloc[0] > 0.9
    np.testing.assert_allclose(np.abs(pca.scores["pc1"]), np.abs(centred @ pca.components[0]), atol=1e-12)


def test_delta_pcs_project_the_direction_out(linear, w):
    rng = np.random.default_rng(10)
    basis = np.linalg.qr(rng.standard_normal((D, D)))[0].T
    u, e2, e3 = basis[0], basis[1], basis[2]
    n = 400
    success = np.arange(n) < n // 2
    x = (
        np.outer(np.where(success, 2.0, -2.0) + 5 * rng.standard_normal(n), u)  # large variance along u
        + np.outer(3 * rng.standard_normal(n) + 1.0, e2)
        + np.outer(1.5 * rng.standard_normal(n), e3)
        + 0.05 * rng.standard_normal((n, D))
    )
    concepts = _names(n)
    part = geo.partition(x, concepts, _rates(concepts, success), shrinkage=None)
    axes, table = geo.delta_pcs(x, part, k=2)
    np.testing.assert_allclose(axes @ part.direction, 0.0, atol=1e-10)
    assert abs(axes[0] @ e2) > 0.99 and abs(axes[1] @ e3) > 0.95
    assert axes[0] @ x[success].mean(0) > 0  # oriented towards the success vectors
    np.testing.assert_allclose(table["cos_direction"], axes @ part.direction)


def test_direction_sweep_scales_each_unit_direction():
    got = {}

    def detect(labels, v):
        got.update(zip(labels, np.asarray(v), strict=True))
        return np.linalg.norm(v, axis=1)

    dirs = {"a": np.r_[3.0, 4.0], "b": np.r_[0.0, -2.0]}
    out = geo.direction_sweep(dirs, detect=detect, scale=10.0, multiples=[0.5, -1.0])
    np.testing.assert_allclose(got["a#x0.5"], [3.0, 4.0])
    np.testing.assert_allclose(got["b#x-1"], [0.0, 10.0])
    np.testing.assert_allclose(out["rate"], 10.0 * np.abs(out["multiple"]))


# ----------------------------------------------------------------------------------------------- ridge


def test_ridge_recovers_a_planted_linear_rate_and_baselines(w):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((120, D)) + 2.0
    concepts = _names(len(x))
    y = np.clip(0.5 + 0.1 * (x @ w - (x @ w).mean()), 0, 1)
    part = geo.partition(x, concepts, _rates(concepts, y), thresholds=[0.5])
    table = geo.ridge_r2(x, part).set_index("predictor")
    assert table.loc["raw vectors", "r2"] > 0.99
    assert table.loc["norm", "r2"] < 0.5
    # the pooled R² is that of the returned out-of-fold predictions
    result, pred = geo.nested_ridge(y, lambda tr, te: (x[tr], x[te]))
    assert result["r2"] == pytest.approx(1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum())
    # a rate driven by the norm alone: the norm baseline explains it, the projection does not
    y_norm = (np.linalg.norm(x, axis=1) - np.linalg.norm(x, axis=1).min()) / np.ptp(np.linalg.norm(x, axis=1))
    part_n = geo.partition(x, concepts, _rates(concepts, y_norm), thresholds=[0.5])
    by_norm = geo.ridge_r2(x, part_n).set_index("predictor")
    assert by_norm.loc["norm", "r2"] > 0.95


def test_features_are_ranked_inside_each_training_fold():
    """Pure-noise features: ranked inside the folds they predict nothing; ranked on all data they leak."""
    rng = np.random.default_rng(12)
    n = 60
    x = rng.standard_normal((n, 5))
    concepts = _names(n)
    y = rng.uniform(size=n)
    part = geo.partition(x, concepts, _rates(concepts, y), thresholds=[0.5])
    noise = rng.standard_normal((n, 2000))
    table = geo.ridge_r2(x, part, features=noise, counts=(5, 20), leaky=True)
    feats = table[table["predictor"] == "transcoder features"].set_index(["ranking", "n_features"])
    assert (feats.loc["fold", "r2"] < 0.05).all()
    assert (feats.loc["all (leaks)", "r2"] > 0.25).all()


# ----------------------------------------------------------------------------------------------- noise


def test_noise_vectors_are_norm_matched_and_follow_the_concept_covariance():
    rng = np.random.default_rng(13)
    basis = np.linalg.qr(rng.standard_normal((D, D)))[0].T
    mean = 6 * basis[0]
    x = mean + (rng.standard_normal((50, 3)) * [3.0, 2.0, 1.0]) @ basis[1:4]
    norms = np.linalg.norm(x, axis=1)
    iso = geo.noise_vectors(x, kind="isotropic", repeats=4, seed=1)
    cov = geo.noise_vectors(x, kind="covariance", repeats=4, seed=1)
    for v in (iso, cov):
        assert v.shape == (200, D)
        np.testing.assert_allclose(np.linalg.norm(v, axis=1), np.tile(norms, 4), rtol=1e-12)
    outside = basis[[0, *range(4, D)]]  # the mean and everything off the span of the variation
    np.testing.assert_allclose(cov @ outside.T, 0.0, atol=1e-9)
    assert np.abs(iso @ outside.T).mean() > 1.0
    with pytest.raises(ValueError, match=r"valid: \['isotropic', 'covariance'\]"):
        geo.noise_vectors(x, kind="uniform")


def test_noise_experiment_rows_and_labels():
    rng = np.random.default_rng(14)
    x = rng.standard_normal((6, D)) * 3
    seen = []

    def detect(labels, v):
        seen.extend(labels)
        return np.linalg.norm(v, axis=1)

    out = geo.noise_experiment(x, _names(6), detect=detect, repeats=2, multiples=(1.0, 2.0))
    assert len(out) == len(seen) == len(set(seen)) == 6 * 2 + 2 * (6 * 2 * 2)
    assert "c0#rerun" in seen  # the same label as the swap experiment's rerun (the store resumes it)
    np.testing.assert_allclose(out["rate"], out["norm"] * out["multiple"], rtol=1e-12)
    np.testing.assert_allclose(out["norm"], np.tile(np.linalg.norm(x, axis=1), 10), rtol=1e-12)


# ----------------------------------------------------------------------------------------------- outcomes


def test_concept_outcomes_counts_detection_and_identification():
    df = pd.DataFrame(
        {
            "concept": ["a"] * 4 + ["b"] * 3,
            "condition": ["injection"] * 4 + ["injection", "injection", "control"],
            "detected": [True, True, False, True, True, False, True],
            "identified": [True, False, False, pd.NA, False, True, False],  # an odd judge: b names, no detect
            "forced_identified": [pd.NA] * 7,
            "judge_error": [None, None, None, "boom", None, None, None],
        }
    )
    out = geo.concept_outcomes(df).set_index("concept")
    assert out.loc["a", "detection_rate"] == pytest.approx(2 / 3)
    assert out.loc["a", "introspection_rate"] == pytest.approx(1 / 3)
    assert out.loc["b", "detection_rate"] == pytest.approx(1 / 2)
    assert out.loc["b", "introspection_rate"] == 0.0


# ----------------------------------------------------------------------------------------------- on the model


class RecordingJudge(RuleJudge):
    def __init__(self):
        super().__init__()
        object.__setattr__(self, "seen", [])

    def judge(self, *, responses, concepts, forced):
        self.seen.extend(concepts)
        return super().judge(responses=responses, concepts=concepts, forced=forced)


@pytest.fixture(scope="module")
def steer_vecs(tiny):
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, spec_for(tiny).d_model, generator=g) * 3.0


def test_batched_steering_by_explicit_vectors_equals_inject_one_at_a_time(tiny, steer_vecs):
    spec = spec_for(tiny)
    labels = ["Bread#a", "Oceans#b", "Dust#c"]
    df = geo.steer_trials(
        tiny,
        labels,
        steer_vecs,
        judge=RuleJudge(),
        n_trials=2,
        max_new_tokens=6,
        batch_size=4,
        progress=False,
    )
    assert len(df) == 6 and set(df["condition"]) == {"injection"} and list(df["label"].unique()) == labels
    assert df["concept"].str.startswith(tuple(f"{label}#" for label in labels)).all()
    responses = []
    for _, row in df.iterrows():
        i = labels.index(row["label"])
        prompt = trial_prompt(tiny, trial=int(row["trial"]))
        batch = left_pad([prompt], pad_id=tiny.tokenizer.pad_token_id)
        seed = trial_seed(0, row["concept"], int(row["trial"]), int(row["sample"]), "injection")
        with inject(
            tiny, steer_vecs[i], layer=spec.injection_layer, strength=spec.strength, start=batch.starts
        ):
            out = sample(tiny, batch, max_new_tokens=6, seeds=[seed], temperature=1.0)
        assert out.texts(tiny.tokenizer)[0] == row["response"]
        responses.append(row["response"])
    assert len(set(responses)) > 1  # the vectors change what is generated


def test_trial_detector_store_keys_judge_words_and_resume(tiny, steer_vecs, tmp_path):
    judge = RecordingJudge()
    path = tmp_path / "geo.sqlite"
    det = geo.TrialDetector(tiny, judge, n_trials=2, store=path, run={"max_new_tokens": 3, "progress": False})
    rates = det(["Bread#x", "Oceans#y"], steer_vecs[:2])
    assert rates.shape == (2,) and ((rates >= 0) & (rates <= 1)).all()
    assert set(judge.seen) == {"Bread", "Oceans"}  # the judge sees the concept word, not the label
    det(["Bread#x"], steer_vecs[2:3])  # same label, another vector: new trials, not the stored ones
    with TrialStore(path) as store:
        assert len(store.load()) == 6
    judge.seen.clear()
    det(["Bread#x", "Oceans#y"], steer_vecs[:2])  # resumed: nothing new is generated or judged
    assert judge.seen == []
    with TrialStore(path) as store:
        assert len(store.load()) == 6


def test_logit_lens_is_the_models_own_readout(tiny):
    spec = spec_for(tiny)
    g = torch.Generator().manual_seed(1)
    d = torch.randn(2, spec.d_model, generator=g)
    lens = geo.lens_logits(tiny, d)
    # by hand: Gemma's RMSNorm x / sqrt(mean x² + eps) * (1 + w), then W_U
    hf = tiny.original_model
    weight = hf.model.norm.weight.detach().float()
    eps = hf.config.rms_norm_eps
    by_hand = d / torch.sqrt(d.pow(2).mean(-1, keepdim=True) + eps) * (1 + weight)
    torch.testing.assert_close(lens, by_hand @ unembedding(tiny).detach().float(), rtol=1e-4, atol=1e-4)
    # end to end: the model's logits when its last residual stream is d
    tokens = trial_prompt(tiny, trial=1).tokens[None, :5]
    for row in range(2):

        def put(resid, hook, row=row):
            return d[row].to(resid.dtype).expand_as(resid).clone()

        with torch.no_grad(), hooks_context(tiny, [(HookNames.resid_post(spec.n_layers - 1), put)]):
            logits = tiny(tokens)[0, -1]
        torch.testing.assert_close(lens[row], logits.float(), rtol=1e-4, atol=1e-4)
    table = geo.logit_lens(tiny, {"d0": d[0] * 7.0}, k=3)  # directions are taken as unit vectors
    unit = geo.lens_logits(tiny, d[:1] / d[0].norm())[0]
    assert table[table["side"] == "top"]["token_id"].tolist() == unit.topk(3).indices.tolist()
    bottom = unit.topk(3, largest=False).values.tolist()
    assert table[table["side"] == "bottom"]["logit"].tolist() == pytest.approx(bottom, rel=1e-6)


def test_verbalizability_finds_a_planted_word(tiny):
    ids, single = geo.token_variants(tiny, "Bread")
    tok = tiny.tokenizer
    # "Bread" and "▁Bread" are tokens; "bread", "BREAD" are not
    assert single and ids == [tok(w, add_special_tokens=False)["input_ids"][0] for w in ("Bread", " Bread")]
    ids = ids[:1]
    hf = tiny.original_model
    w_u = unembedding(tiny).detach().float()
    gain = 1 + hf.model.norm.weight.detach().float()
    planted = w_u[:, ids[0]] / gain  # after the final norm it points at Bread's unembedding
    other = torch.randn(1, spec_for(tiny).d_model, generator=torch.Generator().manual_seed(2))
    vectors = torch.stack([planted, other[0]])
    table = geo.verbalizability(tiny, vectors, ["Bread", "Oceans"])
    assert table["rank"].tolist()[0] == 0 and table["rank"].tolist()[1] > 0
    lens = geo.lens_logits(tiny, vectors)
    assert table["score"].iloc[0] == float(lens[0, ids[0]])
    oceans = tok(" Oceans", add_special_tokens=False)["input_ids"][0]
    best = max(float(lens[1, i]) for i in geo.token_variants(tiny, "Oceans")[0])
    assert oceans in geo.token_variants(tiny, "Oceans")[0] and table["score"].iloc[1] == best
    assert table["rank"].iloc[1] == int((lens[1] > best).sum())


def test_transcoder_activations_are_downstream_of_the_injection(tiny, tcs, steer_vecs):
    from mechintro.mechanism.features import feature_grid

    spec = spec_for(tiny)
    concepts = ["Bread", "Oceans", "Dust"]
    acts = geo.transcoder_activations(tiny, tcs, concepts, vectors=steer_vecs)
    layers = {int(c.split()[0][1:]) for c in acts.columns}
    assert layers == {layer for layer in tcs if layer > spec.injection_layer}
    grid = feature_grid(
        tiny, tcs, concepts, vectors=steer_vecs, strengths=[spec.strength], layers=sorted(layers)
    )
    layer = max(layers)
    dense = grid.dense(layer)[:, 0, :].numpy()
    cols = [c for c in acts.columns if c.startswith(f"L{layer} ")]
    idx = [int(c.split("F")[1]) for c in cols]
    np.testing.assert_allclose(acts[cols].to_numpy(), dense[:, idx])
    assert (dense[:, [i for i in range(dense.shape[1]) if i not in idx]] == 0).all()
