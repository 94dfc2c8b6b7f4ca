"""Known answer: a planted "say No" gate, suppressed by injection of either sign, found and ablated exactly.

The model is the tiny random Gemma 3 with its last MLP replaced by a transcoder built by construction
(:func:`mechintro.core.transcoders.replace_mlps`). The transcoder's feature 0 is the planted gate:

* encoder: the unit vector along the clean last-token transcoder input ``x0`` (no bias, zero threshold), so
  its activation is ``x0_hat . x``: maximal for the clean prompt, and lower when the injection (of either
  sign) rotates the normalized residual away from ``x0`` -- an inverted V;
* decoder: ``-(yes_no_direction) / |yes_no_direction|``, so it promotes "No" with DLA weight
  ``-|yes_no_direction|``.

The other features of every layer are random and small. find_gates must rank the gate first, and ablating it
in a steered run (setting it back to its control activation) must change the Yes/No gap by the amount
computed by hand through the final RMSNorm and the unembedding from the known last-token residual.
"""

from __future__ import annotations

import pytest
import torch

from mechintro.core.concepts import concept_vectors
from mechintro.core.hooks import hooks_context
from mechintro.core.models import HookNames, spec_for
from mechintro.core.prompts import trial_prompt
from mechintro.core.readout import unembedding, yes_no_direction, yes_no_gap
from mechintro.core.steering import inject
from mechintro.core.transcoders import load_transcoders, replace_mlps, transcoder_inputs
from mechintro.mechanism.features import feature_grid, find_gates
from mechintro.mechanism.interventions import intervene, read_features
from mechintro.testing import save_random_transcoders

CONCEPTS = ["Bread", "Oceans", "Dust", "Trumpets", "Avalanches"]
GATE = "L3 F0"


@pytest.fixture(scope="module")
def planted(tiny, tmp_path_factory):
    """Random small transcoders for every layer, with the planted gate as feature 0 of the last layer."""
    tcs = load_transcoders(tiny, source=save_random_transcoders(tmp_path_factory.mktemp("tcs"), seed=7))
    p = trial_prompt(tiny, trial=1)
    x0 = transcoder_inputs(tiny, [3], p.tokens, positions="last")[3][0, 0]
    d = yes_no_direction(tiny, spec_for(tiny))
    with torch.no_grad():
        for tc in tcs.values():
            tc.W_dec.mul_(0.1)
        tc = tcs[3]
        tc.W_enc[:, 0] = x0 / x0.norm()
        tc.b_enc[0], tc.threshold[0] = 0.0, 0.0
        tc.W_dec[0] = -d / d.norm()
    return tcs


@pytest.fixture(scope="module")
def vecs(tiny):
    return concept_vectors(tiny, CONCEPTS, layer=spec_for(tiny).injection_layer)


def test_find_gates_ranks_the_planted_gate_first(tiny, planted, vecs):
    with replace_mlps(tiny, {3: planted[3]}):
        grid = feature_grid(tiny, planted, CONCEPTS, vectors=vecs)
    gates = find_gates(tiny, planted, grid, k=10)
    top = gates.iloc[0]
    assert top["feature"] == GATE and top["rank"] == 1
    d = yes_no_direction(tiny, spec_for(tiny))
    assert top["dla_weight"] == pytest.approx(-float(d.norm()), rel=1e-5)
    assert top["dla_score"] < 2 * gates["dla_score"].iloc[1]  # well ahead of the runner-up
    # the planted gate is an inverted V: suppressed at both signs
    assert top["spearman_pos"] < -0.5 and top["spearman_neg"] < -0.5
    assert top["inverted_v"] > 0 and top["peak_at_zero"]
    # ... by exactly the amount its construction gives: activation = relu(x0_hat . x) at the last token
    p, spec = trial_prompt(tiny, trial=1), spec_for(tiny)
    x0 = transcoder_inputs(tiny, [3], p.tokens, positions="last")[3][0, 0]
    mean = {}
    for s in grid.strengths:
        with inject(tiny, vecs, layer=spec.injection_layer, strength=s, start=p.injection_start):
            x = transcoder_inputs(tiny, [3], p.tokens[None].expand(len(CONCEPTS), -1), positions="last")[3][
                :, 0
            ]
        mean[s] = torch.relu(x @ (x0 / x0.norm())).mean()
    ends = max(mean[min(grid.strengths)], mean[max(grid.strengths)])
    assert top["inverted_v"] == pytest.approx(float((mean[0.0] - ends) / mean[0.0]), rel=1e-4)


def _rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """Gemma 3's RMSNorm by hand: x / sqrt(mean(x^2) + eps) * (1 + w)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * (1.0 + norm.weight.detach())


@pytest.mark.parametrize("strength", [8.0, -8.0])
def test_ablating_the_gate_changes_the_gap_by_the_hand_computed_amount(tiny, planted, vecs, strength):
    spec, p = spec_for(tiny), trial_prompt(tiny, trial=1)
    inj = dict(layer=spec.injection_layer, strength=strength, start=p.injection_start)
    tokens = p.tokens[None].expand(len(CONCEPTS), -1)
    resid: list[torch.Tensor] = []
    grab = [(HookNames.resid_post(3), lambda x, hook: resid.append(x[:, -1].detach().clone()))]
    with torch.no_grad(), replace_mlps(tiny, {3: planted[3]}):
        control = read_features(tiny, planted, [GATE], p.tokens)  # [1, 1]
        with inject(tiny, vecs, **inj):
            current = read_features(tiny, planted, [GATE], tokens)  # [concept, 1]
            with hooks_context(tiny, grab):
                steered = tiny(tokens)[:, -1]
            with intervene(tiny, planted, [GATE], target=control):
                ablated = tiny(tokens)[:, -1]
    assert (current < control).all(), "injection of either sign suppresses the gate"
    # by hand: the last layer's MLP output (= the final residual) moves by (a_control - a_current) x d_hat
    d = yes_no_direction(tiny, spec)
    d_hat = -d / d.norm()
    moved = resid[0] + (control - current) * d_hat
    w_u = unembedding(tiny).detach()
    norm = tiny.original_model.model.norm
    expected = yes_no_gap(_rms_norm(moved, norm) @ w_u, spec)
    torch.testing.assert_close(_rms_norm(resid[0], norm) @ w_u, steered, rtol=1e-4, atol=1e-4)  # the setting
    torch.testing.assert_close(yes_no_gap(ablated, spec), expected, rtol=1e-4, atol=1e-4)
    change = yes_no_gap(ablated, spec) - yes_no_gap(steered, spec)
    assert (change < 0).all(), "restoring the say-No gate lowers the Yes-No gap"
    # the linear (DLA) part of the change is exact: (a_control - a_current) x d_hat . d
    torch.testing.assert_close(
        (moved - resid[0]) @ d, -(control - current)[:, 0] * d.norm(), rtol=1e-5, atol=1e-6
    )
