"""interventions: (a_target - a_current) x d at hook_mlp_out; no-op, exact output-side identity,
generation."""

from __future__ import annotations

import pytest
import torch

from mechintro.core.concepts import concept_vectors
from mechintro.core.hooks import hooks_context
from mechintro.core.models import HookNames, spec_for
from mechintro.core.prompts import left_pad, trial_prompt
from mechintro.core.sampling import sample
from mechintro.core.steering import inject
from mechintro.core.transcoders import transcoder_inputs
from mechintro.mechanism.interventions import feature_directions, intervene, read_features

FEATURES = ["L3 F5", "L3 F17", "L3 F40"]


@pytest.fixture(scope="module")
def setup(tiny):
    spec = spec_for(tiny)
    vecs = concept_vectors(tiny, ["Bread", "Oceans"], layer=spec.injection_layer)
    return spec, vecs, trial_prompt(tiny, trial=1)


def _around(model, layer, before, after):
    """Recorders of mlp_out of ``layer``; install one before and one after the intervention."""

    def rec(store):
        return lambda x, hook: store.append(x.detach().clone())

    name = HookNames.transcoder_out(layer)
    return hooks_context(model, [(name, rec(before))]), hooks_context(model, [(name, rec(after))])


def test_target_equal_to_current_is_a_no_op(tiny, tcs, setup):
    spec, vecs, p = setup
    tokens = p.tokens[None].expand(2, -1)
    kw = dict(layer=spec.injection_layer, strength=6.0, start=p.injection_start)
    with torch.no_grad(), inject(tiny, vecs, **kw):
        plain = tiny(tokens)
        current = read_features(tiny, tcs, FEATURES, tokens)
        with intervene(tiny, tcs, FEATURES, target=current):
            same = tiny(tokens)
        with intervene(
            tiny,
            tcs,
            FEATURES,
            target=0.0,
            mask=torch.zeros(3, dtype=torch.bool),
            positions="from_start",
            start=p.injection_start,
        ):
            masked = tiny(tokens)
        with intervene(tiny, tcs, FEATURES, target=current + 3.0):
            moved = tiny(tokens)
    torch.testing.assert_close(same, plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(masked, plain)
    assert not torch.allclose(moved[:, -1], plain[:, -1], atol=1e-3)
    torch.testing.assert_close(moved[:, :-1], plain[:, :-1])  # "last" edits the last prompt token only


@pytest.mark.parametrize("scale", ["unit", "decoder"])
def test_edit_is_exactly_delta_times_direction(tiny, tcs, setup, scale):
    """mlp_out moves by (a_t - a_c) d; with raw decoder rows that is tc.decode(a with a_f = a_t) -
    tc.decode(a)."""
    spec, vecs, p = setup
    tc = tcs[3]
    idx = torch.tensor([5, 17, 40])
    target = torch.tensor([[0.0, 2.5, 1.0], [4.0, 0.0, 0.5]])
    before, after = [], []
    pre, post = _around(tiny, 3, before, after)
    tokens = p.tokens[None].expand(2, -1)
    with (
        torch.no_grad(),
        inject(tiny, vecs, layer=spec.injection_layer, strength=4.0, start=p.injection_start),
    ):
        x = transcoder_inputs(tiny, [3], tokens, positions="last")[3][:, 0]
        with pre, intervene(tiny, tcs, FEATURES, target=target, scale=scale, record=True) as iv, post:
            tiny(tokens)
    acts = tc.encode(x)
    current = acts[:, idx]
    torch.testing.assert_close(iv.current[3][:, -1], current, rtol=1e-5, atol=1e-5)
    change = after[0] - before[0]
    expected = (target - current) @ feature_directions(tcs, 3, idx, scale=scale)
    torch.testing.assert_close(change[:, -1], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(change[:, :-1], torch.zeros_like(change[:, :-1]))
    set_acts = acts.clone()
    set_acts[:, idx] = target
    decoded = tc.decode(set_acts) - tc.decode(acts)
    if scale == "decoder":
        torch.testing.assert_close(change[:, -1], decoded, rtol=1e-4, atol=1e-5)
    else:  # unit directions: the decoded change scaled down by the decoder-row norms
        norms = tc.W_dec[idx].norm(dim=-1)
        torch.testing.assert_close(
            change[:, -1], ((target - current) / norms) @ tc.W_dec[idx], rtol=1e-4, atol=1e-5
        )
        assert not torch.allclose(change[:, -1], decoded, atol=1e-3)


def test_patching_sets_the_output_side_and_reaches_later_layers(tiny, tcs, setup):
    """Patch a layer-2 feature to its steered value in an unsteered run: the layer-2 output moves by the
    steered-minus-current decoder step, and the layer-3 features (which read the residual) change."""
    spec, vecs, p = setup
    feature = ["L2 F7"]
    with torch.no_grad():
        with inject(tiny, vecs[0], layer=1, strength=8.0, start=p.injection_start):
            steered = read_features(tiny, tcs, feature, p.tokens)
        control = read_features(tiny, tcs, feature, p.tokens)
        assert not torch.allclose(steered, control)
        before, after = [], []
        pre, post = _around(tiny, 2, before, after)
        with pre, intervene(tiny, tcs, feature, target=steered, scale="decoder") as iv, post:
            later = read_features(tiny, tcs, ["L3 F5", "L3 F17"], p.tokens)
    assert iv.calls == 1
    d = tcs[2].W_dec[7]
    torch.testing.assert_close(
        (after[0] - before[0])[0, -1], (steered - control)[0, 0] * d, rtol=1e-4, atol=1e-5
    )
    assert not torch.allclose(later, read_features(tiny, tcs, ["L3 F5", "L3 F17"], p.tokens), atol=1e-4)


@pytest.mark.parametrize("positions", ["last", "from_start"])
def test_composes_with_cached_generation(tiny, tcs, setup, positions):
    spec, vecs, _ = setup
    prompts = [trial_prompt(tiny, trial=1), trial_prompt(tiny, trial=2, variant="neutral_query")]
    b = left_pad(prompts, pad_id=tiny.tokenizer.pad_token_id)
    kw = dict(layer=spec.injection_layer, strength=torch.tensor([6.0, -6.0]), start=b.starts)
    target = torch.tensor([[9.0, 0.0, 9.0], [0.0, 9.0, 0.0]])
    runs = {}
    for cache in (True, False):
        with (
            inject(tiny, vecs, **kw),
            intervene(
                tiny, tcs, FEATURES, target=target, positions=positions, start=b.starts, record=True
            ) as iv,
        ):
            runs[cache] = sample(tiny, b, max_new_tokens=6, seeds=[1, 2], use_cache=cache)
        runs[cache, "iv"] = iv
    assert torch.equal(runs[True].tokens, runs[False].tokens)
    iv = runs[True, "iv"]
    steps = int(runs[True].lengths.max())
    assert iv.calls == steps and iv.last == b.tokens.shape[1] - 1
    edit = iv.added[3]  # the latest call: one decoding step
    if positions == "last":
        assert torch.equal(edit, torch.zeros_like(edit))
    else:
        expected = (target - iv.current[3][:, 0]) @ feature_directions(tcs, 3, [5, 17, 40])
        torch.testing.assert_close(edit[:, 0], expected, rtol=1e-5, atol=1e-5)
        assert edit.abs().sum() > 0
    with inject(tiny, vecs, **kw):
        plain = sample(tiny, b, max_new_tokens=6, seeds=[1, 2])
    assert not torch.equal(plain.tokens, runs[True].tokens) or positions == "last"


def test_bad_settings_name_the_valid_choices(tiny, tcs):
    with pytest.raises(ValueError, match=r"valid: \['last', 'all', 'from_start'\]"):
        with intervene(tiny, tcs, FEATURES, target=0.0, positions="everywhere"):
            pass
    with pytest.raises(ValueError, match="needs start="):
        with intervene(tiny, tcs, FEATURES, target=0.0, positions="from_start"):
            pass
    with pytest.raises(ValueError, match=r"valid: \['unit', 'decoder'\]"):
        with intervene(tiny, tcs, FEATURES, target=0.0, scale="raw"):
            pass
    with pytest.raises(ValueError, match=r"outside layer 3's 0..95"):
        with intervene(tiny, tcs, ["L3 F500"], target=0.0):
            pass
    with pytest.raises(ValueError, match=r"\[rows, 3\]"):
        with intervene(tiny, tcs, FEATURES, target=torch.zeros(2, 2)):
            pass
    with (
        intervene(tiny, tcs, FEATURES, target=torch.zeros(3, 3)),
        pytest.raises(ValueError, match="batch has 2"),
    ):
        tiny(trial_prompt(tiny, trial=1).tokens[None].expand(2, -1))
