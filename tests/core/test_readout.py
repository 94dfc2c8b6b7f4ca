"""readout: the Yes/No gap, concept log-probs and the DLA direction, by hand on the tiny model."""

from __future__ import annotations

import pytest
import torch

from mechintro.core.models import spec_for
from mechintro.core.prompts import trial_prompt
from mechintro.core.readout import (
    concept_logprob,
    concept_token_ids,
    unembedding,
    yes_no_direction,
    yes_no_gap,
)


def test_yes_no_gap_by_hand(tiny):
    spec = spec_for(tiny)
    logits = torch.zeros(2, tiny.cfg.d_vocab)
    logits[0, spec.yes_ids[0]] = 3.0
    logits[1, spec.no_ids[1]] = 2.0
    n_yes, n_no = len(spec.yes_ids), len(spec.no_ids)
    exp0 = torch.log(torch.tensor(n_yes - 1 + torch.e**3)) - torch.log(torch.tensor(float(n_no)))
    exp1 = torch.log(torch.tensor(float(n_yes))) - torch.log(torch.tensor(n_no - 1 + torch.e**2))
    torch.testing.assert_close(yes_no_gap(logits, spec), torch.stack([exp0, exp1]))


def test_concept_logprob_and_ids(tiny):
    ids = concept_token_ids(tiny, ["Bread", "Oceans"])
    assert tiny.tokenizer.convert_ids_to_tokens(ids) == ["▁Bread", "▁Oceans"]
    logits = torch.randn(2, tiny.cfg.d_vocab)
    expected = torch.stack([logits[i].log_softmax(-1)[ids[i]] for i in range(2)])
    torch.testing.assert_close(concept_logprob(logits, ids), expected)


def test_yes_no_direction_is_the_dla_of_the_gap(tiny):
    """Tied embeddings: W_U = W_E^T, and d·x equals the mean-logit difference of x through W_U."""
    spec = spec_for(tiny)
    w_u = unembedding(tiny)
    torch.testing.assert_close(w_u.T, tiny.original_model.get_input_embeddings().weight)
    x = torch.randn(64)
    logits = x @ w_u
    expected = logits[list(spec.yes_ids)].mean() - logits[list(spec.no_ids)].mean()
    torch.testing.assert_close(yes_no_direction(tiny, spec) @ x, expected.detach(), rtol=1e-5, atol=1e-5)
    # and the model's own final logits at a trial prompt are finite
    with torch.no_grad():
        gap = yes_no_gap(tiny(trial_prompt(tiny, trial=1).tokens[None])[0, -1], spec)
    assert torch.isfinite(gap)


def test_detection_weights_from_judged_trials_and_the_fallback(tiny):
    """w(t) = P(detected | first response token t) over tokens seen >= min_total times; Yes/No without
    trials."""
    import pandas as pd

    from mechintro.core.models import spec_for
    from mechintro.core.readout import (
        DetectionWeights,
        concept_log_odds,
        detection_log_odds,
        detection_weights,
    )

    tok = tiny.tokenizer
    yes, no = (
        tok("Yes", add_special_tokens=False)["input_ids"][0],
        tok("No", add_special_tokens=False)["input_ids"][0],
    )
    rows = (
        [("Yes, I detect", True)] * 4
        + [("Yes, I detect", False)]  # Yes: 4 of 5
        + [("No, I do not", False)] * 5
        + [("No, I do not", True)] * 1  # No: 1 of 6
        + [("Bread", True)] * 2  # seen twice: below min_total, left out
    )
    trials = pd.DataFrame(
        {"condition": "injection", "response": [r for r, _ in rows], "detected": [d for _, d in rows]}
    )
    trials = pd.concat(
        [trials, pd.DataFrame({"condition": ["control"], "response": ["Yes"], "detected": [True]})]
    )
    w = detection_weights(tiny, trials, min_total=5)
    assert w.source == "trials" and dict(zip(w.token_ids, w.weights, strict=True)) == pytest.approx(
        {yes: 0.8, no: 1 / 6}
    )
    fallback = detection_weights(tiny, None)
    spec = spec_for(tiny)
    assert fallback.source == "yes_no" and set(fallback.token_ids) == {*spec.yes_ids, *spec.no_ids}
    logits = torch.randn(3, len(tok))
    p = logits.softmax(-1)[:, yes] * 0.8 + logits.softmax(-1)[:, no] / 6
    torch.testing.assert_close(detection_log_odds(logits, w), torch.log(p / (1 - p)), rtol=1e-4, atol=1e-5)
    one = DetectionWeights((yes,), (1.0,), "test")
    q = logits.softmax(-1)[:, yes]
    torch.testing.assert_close(detection_log_odds(logits, one), torch.log(q / (1 - q)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        concept_log_odds(logits, [yes, no, yes]),
        torch.log(
            logits.softmax(-1)[[0, 1, 2], [yes, no, yes]]
            / (1 - logits.softmax(-1)[[0, 1, 2], [yes, no, yes]])
        ),
        rtol=1e-4,
        atol=1e-5,
    )


def test_patching_reads_the_papers_log_odds_on_request(tiny):
    from mechintro.core.concepts import concept_vectors
    from mechintro.core.prompts import trial_prompt
    from mechintro.core.readout import (
        concept_log_odds,
        concept_token_ids,
        detection_log_odds,
        detection_weights,
    )
    from mechintro.mechanism.patching import PatchingConfig, component_patching

    vecs = concept_vectors(tiny, ["Bread", "Oceans"], layer=1)
    cfg = PatchingConfig(injection_layer=1, strength=6.0, layers=(3,), metric="log_odds")
    df = component_patching(tiny, ["Bread", "Oceans"], vectors=vecs, config=cfg)
    assert set(df["metric"]) == {"detection_log_odds", "concept_log_odds"}
    p = trial_prompt(tiny, trial=1)
    with torch.no_grad():
        clean = tiny(p.tokens[None])[0, -1].float()
    unsteered = df[(df.experiment == "ablation") & (df.kind == "unsteered")]["value"]
    assert unsteered.tolist() == pytest.approx(
        [float(detection_log_odds(clean, detection_weights(tiny)))] * 2, abs=1e-4
    )
    forced = df[(df.experiment == "forced_ablation") & (df.kind == "unsteered")]
    from mechintro.core.prompts import forced_prefill

    fp = trial_prompt(tiny, trial=1, prefill=forced_prefill())
    with torch.no_grad():
        flogits = tiny(fp.tokens[None])[0, -1].float().expand(2, -1)
    expected = concept_log_odds(flogits, concept_token_ids(tiny, ["Bread", "Oceans"]))
    assert forced["value"].tolist() == pytest.approx(expected.tolist(), abs=1e-4)
    with pytest.raises(ValueError, match=r"valid: \['gap', 'log_odds'\]"):
        PatchingConfig(metric="logit")
