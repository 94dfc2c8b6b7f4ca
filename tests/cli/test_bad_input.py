"""Bad input gets a clear error naming the problem (and the valid choices), never a silent wrong result.

Each case was a silent wrong answer or a deep traceback before (hardening issue): unknown words read as the
unknown token, boolean and unspellable trial numbers, injections that inject nothing, truncated starts, NaN
judge thresholds, a judge class for an instance, swapped or foreign transcoders, float tokens, and
command-line
arguments that only failed after the model loaded.
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch

from mechintro.behaviour.judges import LogitJudge, RuleJudge
from mechintro.behaviour.trials import run_trials
from mechintro.core.concepts import concept_vectors
from mechintro.core.models import data_dir, load_model
from mechintro.core.prompts import trial_prompt, unknown_words
from mechintro.core.steering import inject
from mechintro.core.transcoders import (
    TranscoderMismatchError,
    encode_at,
    load_folder,
    load_transcoders,
    save_transcoder,
)
from mechintro.testing import save_random_transcoders

shipped = pytest.mark.skipif(
    not (data_dir() / "organism" / "config.json").exists(), reason="organism not shipped"
)


# ----------------------------------------------------------------------------------------------- words


def test_a_word_the_tokenizer_cannot_spell_is_refused_by_name(tiny):
    assert unknown_words(tiny, "Tell me about Bread") == []
    assert unknown_words(tiny, "Tell me about Blorptastic and Zorbles") == ["Blorptastic", "Zorbles"]
    with pytest.raises(ValueError, match=r"concept 'Blorptastic' contains \['Blorptastic'\]"):
        concept_vectors(tiny, ["Bread", "Blorptastic"], layer=1)
    with pytest.raises(ValueError, match=r"thoughts= text 'Glorp'"):
        trial_prompt(tiny, trial=1, variant="thoughts_in_context", thoughts="Glorp")
    with pytest.raises(ValueError, match=r"prefill= text .*\['zorbled'\]"):
        trial_prompt(tiny, trial=1, prefill="Yes, I zorbled")
    with pytest.raises(ValueError, match=r"\['Blorptastic'\]"):
        run_trials(
            tiny, ["Blorptastic"], layer=1, strength=4.0, n_trials=1, judge=RuleJudge(), progress=False
        )


@shipped
def test_two_unknown_words_no_longer_collapse_to_one_vector():
    """The bug: on the organism's word-level tokenizer both words became <unk>, giving identical vectors."""
    model = load_model("organism")
    for word in ("Blorptastic", "Snorfle"):
        with pytest.raises(ValueError, match=word):
            concept_vectors(model, [word], layer=3)


def test_multi_token_words_are_valid(tiny):
    """Multi-token concepts are the norm with a subword tokenizer: only unknown pieces are refused."""
    vecs = concept_vectors(tiny, ["Bread Dust", "Oceans"], layer=1)
    assert vecs.shape == (2, 64) and not torch.allclose(vecs[0], vecs[1])


def test_trial_numbers(tiny):
    for bad in (True, 0, -1, 2.0, "1"):
        with pytest.raises(ValueError, match="trial must be a positive int"):
            trial_prompt(tiny, trial=bad)
    assert trial_prompt(tiny, trial=np.int64(3)).trial == 3
    with pytest.raises(ValueError, match=r"\['1000'\]"):  # the tiny vocabulary spells 0..100
        trial_prompt(tiny, trial=1000)


# ----------------------------------------------------------------------------------------------- inject


def test_inject_refuses_starts_that_inject_nothing_or_are_not_integers(tiny):
    p = trial_prompt(tiny, trial=1)
    v = torch.ones(64)
    with pytest.raises(
        ValueError, match=r"past the end of the sequence \(length 140\).*valid starts are 0..139"
    ):
        with torch.no_grad(), inject(tiny, v, layer=1, strength=1.0, start=10**6):
            tiny(p.tokens[None])
    for bad in (2.7, torch.tensor([2.5]), True):
        with pytest.raises(TypeError, match="start must be integer|start must be an integer"):
            with inject(tiny, v, layer=1, strength=1.0, start=bad):
                pass


def test_inject_accepts_numpy_layers_and_refuses_non_numeric_strengths(tiny):
    p = trial_prompt(tiny, trial=1)
    v = torch.ones(64)
    with torch.no_grad():
        with inject(tiny, v, layer=np.int64(1), strength=np.float32(2.0), start=np.int64(p.injection_start)):
            a = tiny(p.tokens[None])
        with inject(tiny, v, layer=1, strength=2.0, start=p.injection_start):
            b = tiny(p.tokens[None])
    assert torch.equal(a, b)
    for bad, error in (
        ("4", TypeError),
        (True, TypeError),
        (float("nan"), ValueError),
        ([1.0, math.inf], ValueError),
    ):
        with pytest.raises(error, match="strength must be"):
            with inject(tiny, v, layer=1, strength=bad, start=0):
                pass


# ----------------------------------------------------------------------------------------------- judges


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threshold": math.nan}, "threshold must be a finite number"),
        ({"threshold": math.inf}, "threshold must be a finite number"),
        ({"p_threshold": 5.0}, r"probability in \[0, 1\]"),
        ({"p_threshold": -0.1}, r"probability in \[0, 1\]"),
        ({"threshold": "0"}, "threshold must be a finite number"),
    ],
)
def test_logit_judge_thresholds(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LogitJudge(**kwargs)


def test_a_judge_class_is_refused_before_any_generation(tiny, monkeypatch):
    import mechintro.behaviour.batch as batch

    monkeypatch.setattr(batch, "sample", lambda *a, **k: pytest.fail("generated before checking the judge"))
    with pytest.raises(TypeError, match=r"instance, e.g. RuleJudge\(\), not the class RuleJudge"):
        run_trials(tiny, ["Bread"], layer=1, strength=4.0, n_trials=1, judge=RuleJudge, progress=False)


def test_a_nan_logit_score_is_an_error_not_a_no():
    verdicts = LogitJudge().score(
        gaps=[1.0, math.nan], p_concepts=[math.nan, math.nan], forced=[False, False]
    )
    assert verdicts[0].detected is True and verdicts[0].error is None
    assert verdicts[1].detected is None and "non-finite" in verdicts[1].error


# ----------------------------------------------------------------------------------------------- transcoders


def test_swapped_layer_folders_are_refused(tiny, tmp_path):
    raw = load_transcoders(tiny, source=save_random_transcoders(tmp_path / "raw"))
    for layer in (0, 1):  # sae-lens folders record their layer; save them under the other layer's name
        save_transcoder(raw[layer], tmp_path / "swapped" / f"layer_{1 - layer}")
    with pytest.raises(TranscoderMismatchError, match="made for layer 1, not layer 0.*swapped"):
        load_transcoders(tiny, [0], source=tmp_path / "swapped")
    assert load_folder(tmp_path / "swapped" / "layer_0", layer=1).cfg.metadata.layer == 1


@shipped
def test_transcoders_of_another_checkpoint_are_refused(tmp_path):
    model = load_model("organism")
    with pytest.raises(TranscoderMismatchError, match="trained on other weights \\(organism-base"):
        load_transcoders(model, [3], source=data_dir() / "organism-base" / "transcoders")
    assert sorted(load_transcoders(model, [3, 5])) == [3, 5]  # its own are fine


def test_encode_at_refuses_no_transcoders_and_float_tokens(tiny, tcs):
    p = trial_prompt(tiny, trial=1)
    for empty in ({}, None, [tcs[0]]):
        with pytest.raises(ValueError, match="no transcoders given"):
            encode_at(tiny, empty, p.tokens)
    with pytest.raises(TypeError, match="integer token ids"):
        encode_at(tiny, tcs, p.tokens.float())


def test_lazy_transcoders_hold_at_most_keep_layers(tiny, tmp_path):
    source = save_random_transcoders(tmp_path / "raw")
    lazy = load_transcoders(tiny, source=source, lazy=True, keep=1)
    assert list(lazy) == [0, 1, 2, 3] and lazy.loaded == []
    eager = load_transcoders(tiny, source=source)
    for layer in (2, 0, 3):
        torch.testing.assert_close(lazy[layer].W_enc, eager[layer].W_enc)
        assert lazy.loaded == [layer]
    with pytest.raises(KeyError, match=r"layers \[0, 1, 2, 3\]"):
        lazy[7]
    shutil.rmtree(source)
    with pytest.raises(FileNotFoundError):
        lazy[1]


@pytest.mark.parametrize(
    ("concepts", "error", "match"),
    [([], ValueError, "concepts is empty"), (["Bread", "Bread"], ValueError, r"more than once: \['Bread'\]")],
)
def test_every_concept_taking_analysis_refuses_empty_or_repeated_concepts(tiny, tcs, concepts, error, match):
    """An empty list is an error, not a crash inside torch; a repeated concept would be counted twice."""
    from mechintro.attribution.passes import steering_attribution
    from mechintro.mechanism.features import feature_grid
    from mechintro.mechanism.patching import component_patching

    calls = [
        lambda: feature_grid(tiny, tcs, concepts, progress=False),
        lambda: component_patching(tiny, concepts, progress=False),
        lambda: steering_attribution(tiny, tcs, concepts, progress=False),
        lambda: run_trials(
            tiny, concepts, layer=1, strength=2.0, n_trials=1, judge=RuleJudge(), progress=False
        ),
    ]
    if not concepts:
        calls.append(lambda: concept_vectors(tiny, concepts, layer=1))
    for call in calls:
        with pytest.raises(error, match=match):
            call()


def test_grid_batch_size_and_gate_count_are_checked(tiny, tcs):
    from mechintro.mechanism.features import feature_grid, find_gates

    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        feature_grid(tiny, tcs, ["Bread"], batch_size=0, progress=False)
    grid = feature_grid(tiny, tcs, ["Bread", "Dust"], strengths=[0.0, 2.0], progress=False)
    with pytest.raises(ValueError, match="k .* must be an int >= 1, got 0"):
        find_gates(tiny, tcs, grid, k=0)
