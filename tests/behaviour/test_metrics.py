"""detection_metrics and Wilson intervals against hand-computed values."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from mechintro.behaviour.metrics import detection_metrics, newcombe_interval, wilson_interval

# Wilson bounds, z = 1.959963984540054, z^2 = 3.841458820694124, from
#   center = (p + z^2/2n) / (1 + z^2/n),  half = z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n).
# 7/10: denominator 1.3841458820694124, center 0.8920729410/1.3841458821 = 0.6444934400,
#       half = 1.959964 * sqrt(0.021 + 0.0096036471) / 1.3841458821 = 0.2477152926.
W_7_10 = (0.3967781475, 0.8922087326)
W_0_5 = (0.0, 0.4344824648)
W_5_5 = (0.5655175352, 1.0)
W_3_4 = (0.3006418426, 0.9544127392)
W_1_2 = (0.0945312057, 0.9054687943)
W_2_4 = (0.1500389892, 0.8499610108)
W_0_2 = (0.0, 0.6576197725)
W_1_3 = (0.0614919447, 0.7923403992)
W_2_3 = (0.2076596008, 0.9385080553)
W_0_1 = (0.0, 0.7934506856)


def test_wilson_hand_values():
    for (k, n), expected in {
        (7, 10): W_7_10,
        (0, 5): W_0_5,
        (5, 5): W_5_5,
        (3, 4): W_3_4,
        (1, 3): W_1_3,
    }.items():
        assert wilson_interval(k, n) == pytest.approx(expected, abs=1e-6)


def test_wilson_edge_cases():
    lo, hi = wilson_interval(0, 0)
    assert math.isnan(lo) and math.isnan(hi)
    assert wilson_interval(7, 10, z=1.0) == pytest.approx(
        (0.5424572, 0.8211792), abs=1e-6
    )  # z=1: 0.75/1.1 -+ sqrt(0.0235)/1.1
    for k, n in [(-1, 3), (4, 3), (1, -1)]:
        with pytest.raises(ValueError, match="0 <= k <= n"):
            wilson_interval(k, n)


def test_newcombe_from_wilson():
    # 3/4 - 1/3: d = 0.4166667; lo = d - hypot(0.75 - 0.3006418, 0.7923404 - 0.3333333), hi likewise.
    d = 0.75 - 1 / 3
    lo = d - math.hypot(0.75 - W_3_4[0], W_1_3[1] - 1 / 3)
    hi = d + math.hypot(W_3_4[1] - 0.75, 1 / 3 - W_1_3[0])
    assert newcombe_interval(3, 4, 1, 3) == pytest.approx((lo, hi), abs=1e-6)
    assert newcombe_interval(3, 4, 1, 3) == pytest.approx((-0.2256808, 0.7567877), abs=1e-6)
    assert all(math.isnan(x) for x in newcombe_interval(1, 2, 0, 0))


def trial(
    condition,
    strength,
    detected=None,
    identified=None,
    forced_identified=None,
    *,
    error=None,
    variant="original",
    layer=3,
    concept="Bread",
    judge="rule",
):
    return dict(
        concept=concept,
        trial=1,
        sample=0,
        condition=condition,
        layer=layer,
        strength=strength,
        variant=variant,
        persona="standard_assistant",
        seed=0,
        response="...",
        detected=detected,
        identified=identified,
        forced_identified=forced_identified,
        judge=judge,
        judge_error=error,
    )


T, F = True, False
TRIALS = [
    # strength 4: injection 3/4 detected, 2/4 detected & identified; one judge error (excluded though "True")
    trial("injection", 4.0, T, T),
    trial("injection", 4.0, T, F),
    trial("injection", 4.0, F, F),
    trial("injection", 4.0, T, T),
    trial("injection", 4.0, T, T, error="detection: APIError: 500"),
    trial("forced", 4.0, forced_identified=T),
    trial("forced", 4.0, forced_identified=F),
    trial("forced", 4.0, forced_identified=T),
    # strength 2: injection 1/2 detected, 0/2 identified; no forced rows
    trial("injection", 2.0, T, F),
    trial("injection", 2.0, F, F),
    # controls (strength 0.0), shared by both strengths: 1/3 false alarms, plus one judge error
    trial("control", 0.0, T, F),
    trial("control", 0.0, F, F),
    trial("control", 0.0, F, F),
    trial("control", 0.0, error="detection: unparseable judge reply"),
    # another variant with controls only: an FPR-only group
    trial("control", 0.0, F, F, variant="skeptical"),
    trial("control", 0.0, F, F, variant="skeptical"),
]


def check_rate(row, name, value, bounds):
    if math.isnan(value):
        assert math.isnan(row[name]) and math.isnan(row[f"{name}_lo"]) and math.isnan(row[f"{name}_hi"])
        return
    assert row[name] == pytest.approx(value, abs=1e-9)
    assert (row[f"{name}_lo"], row[f"{name}_hi"]) == pytest.approx(bounds, abs=1e-6)


def test_detection_metrics_hand_computed():
    out = detection_metrics(pd.DataFrame(TRIALS))
    assert list(out[["strength", "variant"]].itertuples(index=False, name=None)) == [
        (0.0, "skeptical"),
        (2.0, "original"),
        (4.0, "original"),
    ]
    skeptical, s2, s4 = (row for _, row in out.iterrows())

    assert (s4.n_injection, s4.n_control, s4.n_forced) == (4, 3, 3)
    assert (s4.n_errors, s4.n_errors_injection, s4.n_errors_control, s4.n_errors_forced) == (2, 1, 1, 0)
    check_rate(s4, "tpr", 3 / 4, W_3_4)
    check_rate(s4, "fpr", 1 / 3, W_1_3)
    check_rate(s4, "introspection", 2 / 4, W_2_4)
    check_rate(s4, "id_given_detection", 2 / 3, W_2_3)
    check_rate(s4, "forced_id", 2 / 3, W_2_3)
    check_rate(s4, "discrimination", 0.75 - 1 / 3, newcombe_interval(3, 4, 1, 3))

    assert (s2.n_injection, s2.n_control, s2.n_forced, s2.n_errors) == (2, 3, 0, 1)
    check_rate(s2, "tpr", 1 / 2, W_1_2)
    check_rate(s2, "fpr", 1 / 3, W_1_3)  # the same controls as strength 4
    check_rate(s2, "introspection", 0.0, W_0_2)
    check_rate(s2, "id_given_detection", 0.0, W_0_1)
    check_rate(s2, "forced_id", math.nan, None)

    assert (skeptical.n_injection, skeptical.n_control, skeptical.n_errors) == (0, 2, 0)
    check_rate(skeptical, "fpr", 0.0, W_0_2)
    check_rate(skeptical, "tpr", math.nan, None)
    check_rate(skeptical, "discrimination", math.nan, None)


def test_verdict_dtypes_from_sqlite_or_parquet():
    """0/1/NaN floats (SQLite) and pandas "boolean" (parquet) give the same numbers as Python bools."""
    df = pd.DataFrame(TRIALS)
    expected = detection_metrics(df)
    as_float = df.assign(
        **{
            c: df[c].map(lambda v: math.nan if v is None else float(v))
            for c in ("detected", "identified", "forced_identified")
        }
    )
    as_boolean = df.astype({c: "boolean" for c in ("detected", "identified", "forced_identified")})
    pd.testing.assert_frame_equal(detection_metrics(as_float), expected)
    pd.testing.assert_frame_equal(detection_metrics(as_boolean), expected)


def test_grouping_without_strength_pools_strengths():
    out = detection_metrics(pd.DataFrame(TRIALS), by=("variant",))
    original = out.set_index("variant").loc["original"]
    assert (original.n_injection, original.n_control) == (6, 3)
    check_rate(original, "tpr", 4 / 6, wilson_interval(4, 6))
    overall = detection_metrics(pd.DataFrame(TRIALS), by=())
    assert len(overall) == 1 and overall.n_control[0] == 5 and overall.fpr[0] == pytest.approx(1 / 5)


def test_by_concept_matches_controls_by_concept():
    rows = [
        trial("injection", 4.0, T, T, concept="Bread"),
        trial("control", 0.0, T, F, concept="Bread"),
        trial("injection", 4.0, T, T, concept="Milk"),
        trial("control", 0.0, F, F, concept="Milk"),
    ]
    out = detection_metrics(pd.DataFrame(rows), by=("concept", "strength")).set_index("concept")
    assert out.loc["Bread", "fpr"] == 1.0 and out.loc["Milk", "fpr"] == 0.0


def test_errors_name_the_choices():
    df = pd.DataFrame(TRIALS)
    with pytest.raises(ValueError, match=r"missing columns \['dose'\]; available columns: \[.*'layer'"):
        detection_metrics(df, by=("dose",))
    with pytest.raises(ValueError, match="valid conditions"):
        detection_metrics(df.assign(condition="baseline"))
    mixed = pd.concat([df, df.assign(judge="llm:gpt-4.1-mini")])
    with pytest.raises(ValueError, match="add 'judge' to by="):
        detection_metrics(mixed)
    assert len(detection_metrics(mixed, by=("judge", "strength", "variant"))) == 6


def test_empty_input():
    out = detection_metrics(pd.DataFrame(TRIALS).iloc[:0])
    assert out.empty and {"layer", "tpr", "fpr_hi", "n_errors"} <= set(out.columns)


# ----------------------------------------------------------------------------------------------- per concept


def _planted_errors() -> pd.DataFrame:
    """Per-concept trials with judge errors planted where they would change every rate if counted as "No".

    Bread: injections detected, detected, missed (named once), two errors (one with a stray Yes verdict),
    forced named, missed, one error. Dust: every injection errored, one forced trial named. Trees: controls
    only (no row). Oceans: an injection with a blank judge_error (not an error) and one with no verdict (left
    out without counting as an error).
    """
    rows = [
        ("Bread", "injection", True, True, pd.NA, None),
        ("Bread", "injection", True, False, pd.NA, None),
        ("Bread", "injection", False, False, pd.NA, None),
        ("Bread", "injection", pd.NA, pd.NA, pd.NA, "timeout"),
        ("Bread", "injection", True, True, pd.NA, "parse error"),
        ("Bread", "forced", pd.NA, pd.NA, True, None),
        ("Bread", "forced", pd.NA, pd.NA, False, None),
        ("Bread", "forced", pd.NA, pd.NA, pd.NA, "timeout"),
        ("Bread", "control", True, pd.NA, pd.NA, "timeout"),
        ("Dust", "injection", pd.NA, pd.NA, pd.NA, "timeout"),
        ("Dust", "injection", pd.NA, pd.NA, pd.NA, "rate limit"),
        ("Dust", "forced", pd.NA, pd.NA, True, None),
        ("Trees", "control", False, pd.NA, pd.NA, None),
        ("Oceans", "injection", True, pd.NA, pd.NA, "  "),
        ("Oceans", "injection", pd.NA, pd.NA, pd.NA, None),
    ]
    columns = ["concept", "condition", "detected", "identified", "forced_identified", "judge_error"]
    return pd.DataFrame(rows, columns=columns).assign(strength=2.0, layer=1)


def test_concept_rates_leave_judge_errors_out_of_every_denominator():
    from mechintro.behaviour.metrics import CONCEPT_RATE_COLUMNS, concept_rates

    out = concept_rates(_planted_errors())
    assert tuple(out.columns) == CONCEPT_RATE_COLUMNS
    assert out["concept"].tolist() == ["Bread", "Dust", "Oceans"]  # Trees has controls only
    got = out.set_index("concept")
    bread, dust, oceans = got.loc["Bread"], got.loc["Dust"], got.loc["Oceans"]
    assert (bread["n_injection"], bread["n_forced"], bread["n_errors"]) == (3, 2, 3)  # controls not counted
    assert bread["detection_rate"] == pytest.approx(2 / 3)
    assert bread["introspection_rate"] == pytest.approx(1 / 3)
    assert bread["forced_id_rate"] == pytest.approx(1 / 2)
    assert (dust["n_injection"], dust["n_forced"], dust["n_errors"]) == (0, 1, 2)
    assert math.isnan(dust["detection_rate"]) and math.isnan(dust["introspection_rate"])
    assert dust["forced_id_rate"] == 1.0
    assert (oceans["n_injection"], oceans["n_errors"]) == (1, 0)  # a blank judge_error is no error
    assert oceans["detection_rate"] == 1.0 and oceans["introspection_rate"] == 0.0  # missing identified: no
    assert math.isnan(oceans["forced_id_rate"]) and oceans["n_forced"] == 0
    assert concept_rates(_planted_errors(), strength=4.0).empty
    assert concept_rates(_planted_errors(), layer=1).equals(out)


def test_concept_rates_is_the_one_per_concept_rate_function():
    """The feature statistics and the geometry experiments count per-concept rates with this one function."""
    from mechintro.behaviour.metrics import concept_rates
    from mechintro.mechanism import features
    from mechintro.studies import geometry

    assert features.concept_rates is concept_rates and geometry.concept_outcomes is concept_rates
    table = concept_rates(_planted_errors())
    assert concept_rates(table) is table  # a per-concept table passes through
    bare = table.drop(columns="introspection_rate")
    assert concept_rates(bare)["introspection_rate"].isna().all()
    with pytest.raises(ValueError, match="lacks"):
        concept_rates(_planted_errors().drop(columns="condition"))
    with pytest.raises(TypeError, match="TrialStore or a DataFrame"):
        concept_rates([1, 2])
