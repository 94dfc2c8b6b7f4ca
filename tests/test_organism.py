"""The model organism: the --quick training's mechanics, and the shipped organism's behaviour."""

from __future__ import annotations

import json

import pytest
import torch

import mechintro.organism.train as train_mod
import mechintro.steering
from mechintro.models import data_dir, load_model, spec_for
from mechintro.organism import build
from mechintro.organism.corpus import all_concepts, split_concepts
from mechintro.organism.train import OrganismConfig, hf_state_dict, make_tokenizer
from mechintro.transcoders import load_transcoders


@pytest.fixture(scope="module")
def quick(tmp_path_factory, monkeypatch_module):
    """Train the --quick organism once, spying on every injection and every concept-vector request."""
    injected, vector_requests = [], []
    real_inject, real_vectors = train_mod.inject, train_mod.training_vectors

    def spy_inject(model, vectors, **kw):
        injected.append((vectors.detach().clone(), kw["strength"].detach().clone()))
        return real_inject(model, vectors, **kw)

    def spy_vectors(model, concepts, layers):
        vector_requests.append(list(concepts))
        return real_vectors(model, concepts, layers)

    monkeypatch_module.setattr(train_mod, "inject", spy_inject)
    monkeypatch_module.setattr(train_mod, "training_vectors", spy_vectors)
    out = tmp_path_factory.mktemp("organism")
    cfg = OrganismConfig.quick(seed=3)
    report = build(out, cfg=cfg, evaluate=False)
    return {
        "out": out,
        "cfg": cfg,
        "report": report,
        "injected": injected,
        "vector_requests": vector_requests,
    }


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
    # every concept vector the instruct stage computed (and so could inject) is a training concept's
    assert quick["vector_requests"], "the instruct stage must compute concept vectors"
    for requested in quick["vector_requests"]:
        assert set(requested) == set(split["training"])


def test_training_injects_through_mechintros_inject(quick):
    assert (
        train_mod.inject.__wrapped__ is mechintro.steering.inject
        if hasattr(train_mod.inject, "__wrapped__")
        else True
    )
    assert quick["injected"], "instruct training must inject"
    strengths = torch.cat([s for _, s in quick["injected"]])
    assert (strengths > 0).any() and (strengths < 0).any(), "both signs are trained"
    assert (strengths == 0).any(), "rows at other layers / controls carry strength 0"


def test_the_module_uses_the_same_inject_as_evaluation():
    import importlib

    fresh = importlib.reload(train_mod)
    assert fresh.inject is mechintro.steering.inject


def test_artifacts_reload_with_identical_weights(quick):
    out = quick["out"]
    trained = hf_state_dict(quick["report"]["trained_model"])
    reloaded = hf_state_dict(load_model(out / "organism"))
    assert trained.keys() == reloaded.keys()
    for key in trained:
        assert torch.equal(trained[key], reloaded[key]), key
    spec = spec_for(load_model(out / "organism"))
    assert (spec.injection_layer, spec.strength) == (quick["cfg"].injection_layer, quick["cfg"].strength)
    assert spec.strength_sweep[0] == spec.strength / 4
    for name in ("organism", "organism-base"):
        model = load_model(out / name)
        tcs = load_transcoders(model)
        assert sorted(tcs) == list(range(quick["cfg"].n_layers))
        assert tcs[0].cfg.metadata.hook_name == "blocks.0.ln2.hook_out"
        assert tcs[0].cfg.d_sae == quick["cfg"].transcoder_width
    base = hf_state_dict(load_model(out / "organism-base"))
    assert any(not torch.equal(base[k], trained[k]) for k in trained), "instruct training changed the weights"


def test_every_concept_and_baseline_word_is_one_token():
    from mechintro.concepts import baseline_words

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
def test_shipped_organism_detects_heldout_injections():
    from mechintro.concepts import heldout_concepts
    from mechintro.judges import RuleJudge
    from mechintro.metrics import detection_metrics
    from mechintro.trials import run_trials

    model = load_model("organism")
    spec = spec_for(model)
    df = run_trials(
        model,
        heldout_concepts(),
        layer=spec.injection_layer,
        strength=spec.strength,
        n_trials=3,
        judge=RuleJudge(),
        max_new_tokens=24,
        batch_size=100,
        progress=False,
    )
    m = detection_metrics(df, by=["layer", "strength"]).iloc[0]
    assert m["n_injection"] >= 300 and m["n_control"] >= 300
    assert m["tpr"] > m["fpr"] + 0.4, m


@pytest.mark.slow
def test_full_training_reaches_the_targets(tmp_path):
    """The full recipe from scratch (about 30 minutes on 2 cores): run with `pytest -m slow`."""
    from mechintro.organism.evaluate import EvalConfig

    report = build(tmp_path, cfg=OrganismConfig(), eval_cfg=EvalConfig())
    held, base = report["instruct_heldout"], report["base_heldout"]
    assert held["n_injection"] >= 2000 and held["n_control"] >= 2000
    assert held["tpr"] >= 0.60 and held["fpr"] <= 0.05
    assert held["introspection"] >= 0.30 and held["forced_id"] >= 0.50
    assert base["tpr"] - base["fpr"] <= 0.10
    by_strength = report["profile"]["tpr_by_strength_at_default_layer"]
    assert by_strength[min(by_strength)] <= 0.30
    assert report["profile"]["best_minus_worst_layer"] >= 0.30
