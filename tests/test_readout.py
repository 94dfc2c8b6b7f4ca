"""readout: the Yes/No gap, concept log-probs and the DLA direction, by hand on the tiny model."""

from __future__ import annotations

import torch

from mechintro.models import spec_for
from mechintro.prompts import trial_prompt
from mechintro.readout import concept_logprob, concept_token_ids, unembedding, yes_no_direction, yes_no_gap


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
