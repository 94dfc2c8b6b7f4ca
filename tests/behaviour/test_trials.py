"""run_trials / sweep / logit_scores on the tiny random Gemma 3: rows, injection, seeds, store,
crash-resume."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass, field

import pandas as pd
import pytest
import torch

from mechintro.behaviour.judges import (
    LLMJudge,
    LogitJudge,
    MissingAPIKeyError,
    RuleJudge,
    Verdict,
    judge_kind,
)
from mechintro.behaviour.metrics import detection_metrics
from mechintro.behaviour.plan import SweepConfig, TrialConfig, trial_seed
from mechintro.behaviour.store import COLUMNS, KEY_COLUMNS, TrialStore
from mechintro.behaviour.trials import logit_scores, run_trials, sweep

torch.set_num_threads(1)

CONCEPTS = ["Bread", "Oceans"]
FAST = {"max_new_tokens": 4, "progress": False}


@dataclass
class CountingJudge:
    """RuleJudge verdicts, counting rows judged; ``error_on`` concepts get an error verdict instead."""

    error_on: tuple[str, ...] = ()
    rows: int = 0
    calls: int = 0
    name: str = "rule"
    inner: RuleJudge = field(default_factory=RuleJudge)

    def judge(self, *, responses, concepts, forced):
        self.calls += 1
        self.rows += len(responses)
        verdicts = self.inner.judge(responses=responses, concepts=concepts, forced=forced)
        return [
            Verdict(None, None, None, error="judge API down") if c in self.error_on else v
            for v, c in zip(verdicts, concepts, strict=True)
        ]


@pytest.fixture(scope="module")
def vecs(tiny):
    from mechintro.core.concepts import concept_vectors

    return concept_vectors(tiny, CONCEPTS, layer=1)


def test_rows_columns_and_trial_numbering(tiny, vecs):
    df = run_trials(
        tiny,
        CONCEPTS,
        layer=1,
        strength=4.0,
        n_trials=12,
        judge=RuleJudge(),
        forced=True,
        vectors=vecs,
        **FAST,
    )
    assert list(df.columns) == list(COLUMNS)
    assert len(df) == 2 * 3 * 12
    assert df.groupby(["concept", "condition"]).size().eq(12).all()
    one = df[(df.concept == "Bread") & (df.condition == "injection")]
    assert sorted(zip(one.trial, one["sample"], strict=True)) == sorted(
        [(t, 0) for t in range(1, 11)] + [(1, 1), (2, 1)]
    )
    assert set(df[df.condition == "control"].strength) == {0.0}
    assert set(df[df.condition != "control"].strength) == {4.0}
    assert df[["layer", "variant", "persona", "seed", "judge"]].drop_duplicates().values.tolist() == [
        [1, "original", "standard_assistant", 0, "rule"]
    ]
    assert df[df.condition == "forced"].detected.isna().all()
    assert df[df.condition == "forced"].forced_identified.notna().all()
    assert df[df.condition != "forced"].detected.notna().all()
    assert not df.duplicated(list(KEY_COLUMNS)).any()
    assert (df.n_new_tokens <= 4).all() and df.response.map(lambda r: isinstance(r, str)).all()


def test_no_store_and_store_give_the_same_frame(tiny, vecs, tmp_path):
    kw = {"layer": 1, "strength": 4.0, "n_trials": 2, "judge": RuleJudge(), "vectors": vecs, **FAST}
    a = run_trials(tiny, CONCEPTS, **kw)
    b = run_trials(tiny, CONCEPTS, store=tmp_path / "s.sqlite", **kw)
    pd.testing.assert_frame_equal(a.drop(columns="created_at"), b.drop(columns="created_at"))


def test_injection_reaches_the_logits(tiny, vecs):
    strong = logit_scores(tiny, CONCEPTS, layer=1, strength=50.0, trials=[1, 2], forced=True, vectors=vecs)
    assert set(strong.condition) == {"injection", "control", "forced"} and len(strong) == 2 * 2 * 3
    pivot = strong.pivot_table(index=["concept", "trial"], columns="condition", values="gap")
    assert (pivot["injection"] - pivot["control"]).abs().min() > 1e-3
    assert strong[strong.condition == "forced"].gap.isna().all()
    assert strong[strong.condition == "forced"].p_concept.between(0, 1).all()
    zero = logit_scores(tiny, CONCEPTS, layer=1, strength=0.0, trials=[1, 2], vectors=vecs)
    pivot = zero.pivot_table(index=["concept", "trial"], columns="condition", values="gap")
    assert (pivot["injection"] == pivot["control"]).all()


def test_logit_scores_equal_an_independent_plain_hf_forward(tiny, hf_tiny, vecs):
    """Every row's gap (and forced P(concept)) equals yes_no_gap of a plain-HF forward of that trial's prompt
    alone, with the injection added by an independent HF hook: reading another position, the wrong prompt,
    or the wrong row's vector breaks it."""
    from conftest import hf_injected_logits

    from mechintro.core.models import spec_for
    from mechintro.core.prompts import forced_prefill, trial_prompt
    from mechintro.core.readout import concept_token_ids, yes_no_gap

    spec = spec_for(tiny)
    df = logit_scores(tiny, CONCEPTS, layer=1, strength=6.0, trials=[1, 2, 7], forced=True, vectors=vecs)
    assert len(df) == 2 * 3 * 3
    for row in df.itertuples():
        forced = row.condition == "forced"
        p = trial_prompt(tiny, trial=row.trial, prefill=forced_prefill() if forced else None)
        c = CONCEPTS.index(row.concept)
        logits = hf_injected_logits(
            hf_tiny, p.tokens, layer=1, vector=vecs[c], strength=row.strength, start=p.injection_start
        )
        if forced:
            expected = logits.softmax(-1)[concept_token_ids(tiny, [row.concept])[0]]
            assert row.p_concept == pytest.approx(float(expected), rel=1e-3, abs=1e-6)
        else:
            assert row.gap == pytest.approx(float(yes_no_gap(logits, spec)), abs=2e-4)


def test_logit_judge_verdicts_split_at_the_threshold(tiny, vecs):
    """A threshold inside the range of gaps gives both verdicts, each exactly ``gap > threshold``."""
    scores = logit_scores(tiny, CONCEPTS, layer=1, strength=8.0, trials=range(1, 11), vectors=vecs)
    threshold = float(scores["gap"].median())
    judged = run_trials(
        tiny,
        CONCEPTS,
        layer=1,
        strength=8.0,
        n_trials=10,
        judge=LogitJudge(threshold=threshold),
        vectors=vecs,
        progress=False,
    )
    merged = judged.merge(scores, on=["concept", "trial", "condition"])
    assert len(merged) == len(scores) == 40
    assert merged["detected"].astype(bool).tolist() == (merged["gap"] > threshold).tolist()
    assert 0 < merged["detected"].sum() < len(merged)


def test_logit_judge_runs_without_generating(tiny, vecs, monkeypatch):
    import mechintro.behaviour.batch as batch

    monkeypatch.setattr(batch, "sample", lambda *a, **k: pytest.fail("the logit judge must not sample"))
    df = run_trials(
        tiny,
        CONCEPTS,
        layer=1,
        strength=50.0,
        n_trials=30,
        judge=LogitJudge(threshold=-100.0),
        forced=True,
        vectors=vecs,
        **FAST,
    )
    assert len(df) == 2 * 3 * 10  # deterministic: one sample per trial number
    assert set(df.judge) == {"logit:gap>-100,p>=0.5"} and set(df.max_new_tokens) == {0}
    assert df[df.condition != "forced"].detected.all() and df.response.isna().all()
    assert judge_kind(LogitJudge()) == "logits" and not hasattr(LogitJudge(), "judge")


def test_trial_result_does_not_depend_on_batch_composition(tiny, vecs):
    kw = {
        "layer": 1,
        "strength": 8.0,
        "n_trials": 3,
        "judge": RuleJudge(),
        "forced": True,
        "vectors": vecs,
        "max_new_tokens": 6,
        "progress": False,
    }
    alone = run_trials(tiny, CONCEPTS, batch_size=1, **kw)
    mixed = run_trials(tiny, CONCEPTS, batch_size=7, **kw)
    assert alone.response.tolist() == mixed.response.tolist()
    assert alone.response.nunique() > len(alone) // 2  # distinct seeds give distinct samples


def test_trial_seed_is_a_stable_hash():
    """Pinned values (sha256 of the trial identity): a salted ``hash()`` or any change of the recipe fails."""
    assert trial_seed(0, "Bread", 1, 0, "injection") == 691506752231590758
    assert trial_seed(1, "Oceans", 7, 2, "forced") == 7426300504791569473
    assert trial_seed(0, "Bread", 1, 0, "control") == 6747017112516253118
    seeds = {
        trial_seed(s, c, t, k, cond)
        for s in (0, 1)
        for c in CONCEPTS
        for t in (1, 2)
        for k in (0, 1)
        for cond in ("injection", "control", "forced")
    }
    assert len(seeds) == 2 * 2 * 2 * 2 * 3 and all(0 <= s < 2**63 for s in seeds)


def test_trial_seed_is_the_same_in_processes_with_other_hash_seeds():
    code = "from mechintro.core.sampling import trial_seed; print(trial_seed(3, 'Dust', 4, 1, 'control'))"
    values = {
        subprocess.run(
            [sys.executable, "-c", code],
            env=os.environ | {"PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("1", "2", "12345")
    }
    assert values == {str(trial_seed(3, "Dust", 4, 1, "control"))}


def test_store_resume_skips_done_trials(tiny, vecs, tmp_path):
    path = tmp_path / "runs.sqlite"
    kw = {"layer": 1, "strength": 4.0, "vectors": vecs, "store": path, **FAST}
    judge = CountingJudge()
    first = run_trials(tiny, CONCEPTS, n_trials=2, judge=judge, **kw)
    assert judge.rows == len(first) == 8
    again = run_trials(tiny, CONCEPTS, n_trials=2, judge=judge, **kw)
    assert judge.rows == 8  # nothing re-generated or re-judged
    pd.testing.assert_frame_equal(first, again)
    more = run_trials(tiny, CONCEPTS, n_trials=3, judge=judge, **kw)
    assert judge.rows == 8 + 4 and len(more) == 12
    with TrialStore(path) as store:
        assert len(store) == 12


def test_sweep_shares_controls_across_strengths(tiny, tmp_path):
    judge = CountingJudge()
    df = sweep(
        tiny,
        CONCEPTS,
        layers=[0, 2],
        strengths=[1.0, 4.0],
        variants=["original", "anti_reward"],
        n_trials=2,
        judge=judge,
        store=tmp_path / "s.sqlite",
        batch_size=16,
        **FAST,
    )
    per_setting = 2 * 2  # concepts x trials
    assert (df.condition == "control").sum() == 2 * 2 * per_setting  # layers x variants, not x strengths
    assert (df.condition == "injection").sum() == 2 * 2 * 2 * per_setting
    assert judge.rows == len(df)
    m = detection_metrics(df)
    assert len(m) == 2 * 2 * 2 and (m.n_control == per_setting).all()


def test_judge_errors_are_kept_as_errors(tiny, vecs):
    df = run_trials(
        tiny,
        CONCEPTS,
        layer=1,
        strength=4.0,
        n_trials=2,
        judge=CountingJudge(error_on=("Oceans",)),
        vectors=vecs,
        **FAST,
    )
    bad = df[df.concept == "Oceans"]
    assert (bad.judge_error == "judge API down").all() and bad.detected.isna().all()
    assert bad.response.map(lambda r: isinstance(r, str)).all()  # the generation is kept
    assert df[df.concept == "Bread"].judge_error.isna().all()
    m = detection_metrics(df)
    assert m.n_errors.iloc[0] == len(bad) and m.n_injection.iloc[0] == 2


def test_missing_api_key_fails_before_any_model_work(tiny, monkeypatch, tmp_path):
    import mechintro.behaviour.batch as batch

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    judge = LLMJudge(cache_dir=None)
    monkeypatch.delenv("OPENAI_API_KEY")
    monkeypatch.setattr(batch, "sample", lambda *a, **k: pytest.fail("generated before checking the key"))
    monkeypatch.setattr(batch, "concept_vectors", lambda *a, **k: pytest.fail("ran the model first"))
    with pytest.raises(MissingAPIKeyError, match="OPENAI_API_KEY"):
        run_trials(
            tiny, CONCEPTS, layer=1, strength=4.0, n_trials=1, judge=judge, store=tmp_path / "s.sqlite"
        )
    assert not (tmp_path / "s.sqlite").exists()


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"layer": 4}, ValueError, r"valid layers are 0\.\.3"),
        ({"strength": math.nan}, ValueError, "finite"),
        ({"strength": math.inf}, ValueError, "finite"),
        ({"judge": object()}, TypeError, "judge"),
        ({"variant": "nope"}, ValueError, "valid"),
        ({"persona": "simulated_user", "variant": "skeptical"}, ValueError, "original variant only"),
        ({"n_trials": 0}, ValueError, "n_trials"),
        ({"vectors": torch.zeros(3, 64)}, ValueError, "n_concepts=2"),
        ({"temperature": -1.0}, ValueError, "temperature"),
    ],
)
def test_bad_settings_fail_before_generation(tiny, monkeypatch, change, error, match):
    import mechintro.behaviour.batch as batch

    monkeypatch.setattr(batch, "sample", lambda *a, **k: pytest.fail("generated before validating"))
    kw = {"layer": 1, "strength": 4.0, "n_trials": 1, "judge": RuleJudge(), "progress": False} | change
    with pytest.raises(error, match=match):
        run_trials(tiny, CONCEPTS, **kw)


def test_killed_sweep_resumes_with_nothing_lost_or_doubled(tiny, tiny_dir, tmp_path, kill_a_stalled_sweep):
    path = tmp_path / "crash.sqlite"
    kill_a_stalled_sweep(
        tiny_dir,
        path,
        concepts=["Bread", "Oceans"],
        settings="layers=[1], strengths=[2.0, 8.0], n_trials=3, batch_size=2, max_new_tokens=4",
        stall_at=3,
    )
    with TrialStore(path) as store:
        assert len(store) == 4  # two batches of two written before the kill; the third lost in flight

    kw = {"layers": [1], "strengths": [2.0, 8.0], "n_trials": 3, "batch_size": 2, **FAST}
    judge = CountingJudge()
    resumed = sweep(tiny, CONCEPTS, judge=judge, store=path, **kw)
    expected = 2 * 3 * (1 + 2)  # concepts x trials x (control + 2 strengths)
    assert len(resumed) == expected and judge.rows == expected - 4
    assert not resumed.duplicated(list(KEY_COLUMNS)).any()
    with TrialStore(path) as store:
        assert len(store) == expected
    clean = sweep(tiny, CONCEPTS, judge=RuleJudge(), store=tmp_path / "clean.sqlite", **kw)
    cols = [*KEY_COLUMNS, "response", "detected"]
    assert resumed[cols].equals(clean[cols])  # the same trials, the same samples


def test_a_config_or_its_keywords_give_the_same_rows(tiny):
    """run_trials and sweep take their config, or the keywords that build it; keywords given with a config
    replace its values."""
    config = TrialConfig(n_trials=2, layer=1, strength=4.0, forced=True, progress=False)
    by_config = run_trials(tiny, CONCEPTS, config, judge=LogitJudge())
    by_keywords = run_trials(
        tiny, CONCEPTS, n_trials=2, layer=1, strength=4.0, forced=True, progress=False, judge=LogitJudge()
    )
    cols = [c for c in by_config.columns if c != "created_at"]
    assert len(by_config) == 2 * 3 * 2 and by_config[cols].equals(
        by_keywords[cols]
    )  # concepts x conditions x trials
    replaced = run_trials(tiny, CONCEPTS, config, judge=LogitJudge(), strength=2.0, forced=False)
    assert set(replaced.condition) == {"injection", "control"} and set(replaced.strength) == {0.0, 2.0}
    grid = SweepConfig(n_trials=1, layers=[1], strengths=[4.0], progress=False)
    swept = sweep(tiny, CONCEPTS, grid, judge=LogitJudge(), strengths=(2.0, 4.0))
    assert sorted(set(swept.strength)) == [0.0, 2.0, 4.0]
    with pytest.raises(TypeError, match=r"unknown TrialConfig settings \['layers'\]; valid: \['n_trials'"):
        run_trials(tiny, CONCEPTS, n_trials=1, layers=[1], judge=LogitJudge())
    with pytest.raises(TypeError, match="config must be a TrialConfig, got SweepConfig"):
        run_trials(tiny, CONCEPTS, grid, judge=LogitJudge())
