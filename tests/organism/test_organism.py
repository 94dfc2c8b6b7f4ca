"""The model organism: the --quick training's mechanics, and the shipped organism's behaviour."""

from __future__ import annotations

import json

import pytest
import torch

import mechintro.behaviour.dialogue as dialogue_mod
import mechintro.core.steering
import mechintro.organism.train as train_mod
from mechintro.core.models import data_dir, load_model, spec_for
from mechintro.core.transcoders import load_transcoders
from mechintro.organism import build
from mechintro.organism.corpus import all_concepts, split_concepts
from mechintro.organism.train import OrganismConfig, hf_state_dict, make_tokenizer


def _rows_in(rows: torch.Tensor, allowed: torch.Tensor) -> bool:
    """Whether every row of ``rows`` ([n, d]) equals (exactly) some row of ``allowed`` ([m, d])."""
    return bool((rows[:, None, :] == allowed[None, :, :]).all(-1).any(-1).all())


@pytest.fixture(scope="module")
def quick(tmp_path_factory, monkeypatch_module):
    """Train the --quick organism once, spying on every concept-vector request and every injection of both
    stages that inject: instruct training and the transcoders' activation data."""
    import mechintro.organism.transcoders as tc_mod

    spied = {"requests": [], "injections": [], "latest": None, "signs": set()}
    real = {
        "train_inject": dialogue_mod.inject,
        "train_vectors": train_mod.training_vectors,
        "tc_inject": tc_mod.inject,
        "tc_vectors": tc_mod.concept_vectors,
    }

    def record_vectors(stage, concepts, result):
        spied["requests"].append((stage, list(concepts)))
        tensors = (
            list(result.values()) if isinstance(result, dict) else [result]
        )  # {layer: [phrasing, concept, d]}
        flat = torch.cat([t.reshape(-1, t.shape[-1]) for t in tensors]).detach().clone()
        spied["latest"] = flat if spied["latest"] is None else torch.cat([spied["latest"], flat])
        return result

    def record_injection(stage, vectors, strength):
        rows = torch.as_tensor(vectors).reshape(-1, vectors.shape[-1]).detach()
        strengths = torch.as_tensor(strength).reshape(-1).detach().expand(len(rows))
        injected = rows[strengths != 0]
        spied["injections"].append((stage, len(injected), _rows_in(injected, spied["latest"])))
        spied.setdefault("signs", set()).update(torch.sign(strengths).tolist())

    def train_vectors(model, concepts, layers):
        return record_vectors("instruct", concepts, real["train_vectors"](model, concepts, layers))

    def train_inject(model, vectors, **kw):
        record_injection("instruct", vectors, kw["strength"])
        return real["train_inject"](model, vectors, **kw)

    def tc_vectors(model, concepts, **kw):
        return record_vectors("transcoders", concepts, real["tc_vectors"](model, concepts, **kw))

    def tc_inject(model, vectors, **kw):
        record_injection("transcoders", vectors, kw["strength"])
        return real["tc_inject"](model, vectors, **kw)

    monkeypatch_module.setattr(train_mod, "training_vectors", train_vectors)
    monkeypatch_module.setattr(dialogue_mod, "inject", train_inject)  # the trial-dialogue loss injects
    monkeypatch_module.setattr(tc_mod, "concept_vectors", tc_vectors)
    monkeypatch_module.setattr(tc_mod, "inject", tc_inject)
    out = tmp_path_factory.mktemp("organism")
    cfg = OrganismConfig.quick(seed=3)
    from mechintro.organism.calibrate import CalibrationConfig

    report = build(out, cfg=cfg, evaluate=False, calibration=CalibrationConfig.quick())
    return {"out": out, "cfg": cfg, "report": report, **spied}


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_split_is_recorded_and_respected(quick):
    split = json.loads((quick["out"] / "organism_split.json").read_text())
    assert len(split["training"]) == 400 and len(split["heldout"]) == 100
    assert set(split["training"]) | set(split["heldout"]) == set(all_concepts())
    assert not set(split["training"]) & set(split["heldout"])
    assert split == {"_note": split["_note"], **split_concepts(seed=3)}
    # every concept vector computed in a stage that injects is a training concept's ...
    stages = {stage for stage, _ in quick["requests"]}
    assert stages == {"instruct", "transcoders"}, "both injecting stages must compute concept vectors"
    for stage, requested in quick["requests"]:
        assert set(requested) <= set(split["training"]), f"{stage} computed a held-out concept's vector"
    # ... and every vector injected (nonzero strength) is exactly one of the vectors computed just before
    by_stage = {stage: [ok for s, n, ok in quick["injections"] if s == stage and n] for stage in stages}
    for stage, checks in by_stage.items():
        assert checks and all(checks), f"{stage} injected a vector that is not a training concept's"


def test_training_injects_both_signs_through_mechintros_inject(quick):
    import mechintro.organism.transcoders as tc_mod

    assert quick["injections"], "training must inject"
    assert train_mod.training_vectors.__name__ == "train_vectors", "the spy is in place"
    assert tc_mod.concept_vectors.__name__ == "tc_vectors"
    assert quick["signs"] == {-1.0, 0.0, 1.0}, (
        "both signs are trained; other layers' rows and controls carry 0"
    )


def test_the_module_uses_the_same_inject_as_evaluation():
    import importlib

    fresh = importlib.reload(dialogue_mod)  # the organism's trial-dialogue loss
    assert fresh.inject is mechintro.core.steering.inject


def test_artifacts_reload_with_identical_weights(quick):
    out = quick["out"]
    trained = hf_state_dict(quick["report"]["trained_model"])
    reloaded = hf_state_dict(load_model(out / "organism"))
    assert trained.keys() == reloaded.keys()
    for key in trained:
        assert torch.equal(trained[key], reloaded[key]), key
    spec = spec_for(load_model(out / "organism"))
    point = quick["report"]["operating_point"]  # the calibrated default, recorded in both checkpoints
    assert (spec.injection_layer, spec.strength) == (quick["cfg"].injection_layer, point.strength)
    assert spec.operating_points == {"saturated": 4.0} and spec.resolve_strength("saturated") == 4.0
    assert spec_for(load_model(out / "organism-base")).strength == point.strength
    assert point.strength in spec.strength_sweep and 4.0 in spec.strength_sweep
    assert [c["strength"] for c in point.curve] == [1.0, 2.0, 3.0, 4.0]  # the quick grid, not refined
    for name in ("organism", "organism-base"):
        model = load_model(out / name)
        tcs = load_transcoders(model)
        assert sorted(tcs) == list(range(quick["cfg"].n_layers))
        assert tcs[0].cfg.metadata.hook_name == "blocks.0.ln2.hook_out"
        assert tcs[0].cfg.d_sae == quick["cfg"].transcoder_width
    base = hf_state_dict(load_model(out / "organism-base"))
    assert any(not torch.equal(base[k], trained[k]) for k in trained), "instruct training changed the weights"


def test_every_concept_and_baseline_word_is_one_token():
    from mechintro.core.concepts import baseline_words

    tok = make_tokenizer()
    for word in all_concepts() + baseline_words():
        assert len(tok(" " + word, add_special_tokens=False)["input_ids"]) == 1, word
        assert (
            tok(" " + word, add_special_tokens=False)["input_ids"]
            == tok(word, add_special_tokens=False)["input_ids"]
        )
    assert (
        tok.unk_token_id
        not in tok(
            tok.apply_chat_template(
                [{"role": "user", "content": "Tell me about Bread"}],
                tokenize=False,
                add_generation_prompt=True,
            ),
            add_special_tokens=False,
        )["input_ids"]
    )


shipped = pytest.mark.skipif(
    not (data_dir() / "organism" / "config.json").exists(), reason="organism not shipped"
)


@shipped
def test_shipped_organism_matches_its_report():
    """A fresh held-out run at the report's operating point agrees with data/organism_report.json: each
    reported rate lies in the 99.9% Wilson interval of the new measurement (300 trials per condition)."""
    from mechintro.behaviour.judges import RuleJudge
    from mechintro.behaviour.metrics import detection_metrics, wilson_interval
    from mechintro.behaviour.trials import run_trials
    from mechintro.core.concepts import heldout_concepts

    report = json.loads((data_dir() / "organism_report.json").read_text())
    reported = report["instruct_heldout"]
    model = load_model("organism")
    spec = spec_for(model)
    point = report.get("operating_point", {"layer": spec.injection_layer, "strength": spec.strength})
    df = run_trials(
        model,
        heldout_concepts(),
        layer=point["layer"],
        strength=point["strength"],
        n_trials=3,
        judge=RuleJudge(),
        max_new_tokens=24,
        batch_size=100,
        seed=7,
        progress=False,
    )
    m = detection_metrics(df, by=["layer", "strength"]).iloc[0]
    for rate, n in (("tpr", "n_injection"), ("fpr", "n_control")):
        assert m[n] == 300
        lo, hi = wilson_interval(round(m[rate] * m[n]), int(m[n]), z=3.29)
        assert lo <= reported[rate] <= hi, (rate, m[rate], reported[rate], (lo, hi))


@pytest.mark.slow
def test_full_training_reaches_the_targets(tmp_path):
    """The full recipe from scratch (about 40 minutes on 2 cores, calibration and evaluation included): the
    organism targets at the saturated strength, the operating-point bands at the calibrated default."""
    from mechintro.organism.evaluate import EvalConfig

    report = build(tmp_path, cfg=OrganismConfig(), eval_cfg=EvalConfig())
    held, base, sat = report["instruct_heldout"], report["base_heldout"], report["instruct_heldout_saturated"]
    assert held["n_injection"] >= 2000 and held["n_control"] >= 2000
    assert all(report["bands"]["met"].values()), report["bands"]
    assert (
        sat["tpr"] >= 0.60
        and sat["fpr"] <= 0.05
        and sat["introspection"] >= 0.30
        and sat["forced_id"] >= 0.50
    )
    assert base["tpr"] - base["fpr"] <= 0.10
    by_strength = report["profile"]["tpr_by_strength_at_default_layer"]
    assert by_strength[min(by_strength)] <= 0.30
    assert report["profile"]["best_minus_worst_layer"] >= 0.30


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_seed_meets_the_bands_at_its_own_calibrated_default(tmp_path, seed):
    """Stability: each training seed, calibrated on its own held-out concepts, meets the operating-point
    bands (held-out TPR 0.25-0.6, FPR <= 0.05, >= 15 concepts detected in >= 70% and >= 15 in <= 20% of 20
    trials, introspection lower bound > 0.05). About 45 minutes per seed on 2 cores."""
    from mechintro.organism.calibrate import CalibrationConfig, band_checks, operating_point

    report = build(tmp_path, cfg=OrganismConfig(seed=seed), evaluate=False, calibration=CalibrationConfig())
    split = json.loads((tmp_path / "organism_split.json").read_text())
    point = report["operating_point"]
    measured = operating_point(load_model(tmp_path / "organism"), split["heldout"], strength=point.strength)
    assert all(band_checks(measured).values()), measured


def test_calibration_picks_the_crossing_of_the_monotone_curve():
    """The default strength is where the TPR curve (made monotone) reaches the target, interpolated."""
    from mechintro.organism.calibrate import PAPER_DEFAULT_TPR, _crossing, band_checks

    assert PAPER_DEFAULT_TPR == 0.411
    assert _crossing([1.0, 2.0, 3.0], [0.0, 0.2, 0.6], 0.4) == pytest.approx(2.5)
    assert _crossing([3.0, 1.0, 2.0], [0.6, 0.0, 0.2], 0.4) == pytest.approx(2.5)  # any order
    assert _crossing([1.0, 2.0, 3.0, 4.0], [0.1, 0.5, 0.3, 0.9], 0.4) == pytest.approx(1.75)  # dip ignored
    assert _crossing([1.0, 2.0], [0.5, 0.9], 0.4) == 1.0 and _crossing([1.0, 2.0], [0.1, 0.2], 0.4) == 2.0
    point = {
        "tpr": 0.41,
        "fpr": 0.0,
        "concepts_detected_ge_0.7": 20,
        "concepts_detected_le_0.2": 14,
        "introspection_lo": 0.2,
        "trials_per_concept": 20,
    }
    met = band_checks(point)
    assert met == {
        "tpr": True,
        "fpr": True,
        "concepts_detected_ge_0.7": True,
        "concepts_detected_le_0.2": False,
        "introspection_lo": True,
        "trials_per_concept": True,
    }
