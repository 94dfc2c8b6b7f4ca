"""Directional ablation: the difference of means, exact projection removal at every position and decoding
step, its order against inject, its checks, the gates' direction and random controls."""

from __future__ import annotations

import contextlib
import math

import pandas as pd
import pytest
import torch

from mechintro.core.concepts import concept_vectors
from mechintro.core.hooks import capture, hooks_context
from mechintro.core.models import HookNames, load_model, spec_for
from mechintro.core.prompts import chat_prompt_tokens, left_pad, trial_prompt
from mechintro.core.sampling import sample
from mechintro.core.steering import inject
from mechintro.mechanism import directions as dr

CONCEPTS = ["Bread", "Oceans", "Dust"]


@pytest.fixture(scope="module")
def tiny64(tiny_dir):
    """The tiny model in float64: ablation identities hold to ~1e-12."""
    return load_model(tiny_dir, device="cpu", dtype=torch.float64)


@pytest.fixture(scope="module")
def batch(tiny):
    return left_pad([trial_prompt(tiny, trial=t) for t in (1, 2, 3)], pad_id=tiny.tokenizer.pad_token_id)


def _logits(model, batch, **kw):
    with torch.no_grad():
        return model(batch.tokens, attention_mask=batch.attention_mask, **kw)


# ----------------------------------------------------------------------------------------------- directions


def test_difference_of_means_matches_one_prompt_at_a_time(tiny):
    """Left-padded batches against one unpadded prompt at a time (float32: the bridge gives NaN at padded
    positions in float64)."""
    a = ["Tell me about Bread", "Describe Oceans and Dust and Trees"]
    b = ["Tell me about Dust", "Tell me about Trial 3"]
    got = dr.difference_of_means(tiny, a, b, layers=[0, 2], position=-2)

    def at(text, layer):
        t = chat_prompt_tokens(tiny, text)
        with torch.no_grad(), capture(tiny, [HookNames.resid_post(layer)]) as acts:
            tiny(t[None])
        return acts[HookNames.resid_post(layer)][0, -2]

    for layer in (0, 2):
        diff = torch.stack([at(t, layer) for t in a]).mean(0) - torch.stack([at(t, layer) for t in b]).mean(0)
        torch.testing.assert_close(got[layer], diff / diff.norm(), rtol=0, atol=1e-5)
        assert float(got[layer].norm()) == pytest.approx(1.0, abs=1e-6)
    first = dr.difference_of_means(tiny, a, b, layers=1, position=5)[1]  # an absolute index
    toks = [chat_prompt_tokens(tiny, t) for t in a + b]
    with torch.no_grad(), capture(tiny, [HookNames.resid_post(1)]) as acts:
        rows = []
        for t in toks:
            tiny(t[None])
            rows.append(acts[HookNames.resid_post(1)][0, 5])
    diff = torch.stack(rows[:2]).mean(0) - torch.stack(rows[2:]).mean(0)
    torch.testing.assert_close(first, diff / diff.norm(), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="outside the shortest"):
        dr.difference_of_means(tiny, a, b, layers=[0], position=-500)
    with pytest.raises(ValueError, match="non-empty"):
        dr.difference_of_means(tiny, [], b, layers=[0])
    with pytest.raises(ValueError, match="same mean"):
        dr.difference_of_means(tiny, a, a, layers=[0])


def _final_projections(model, r, batch, *, n_new, **ablate):
    """|x . r| of the final residual (the final norm's input) at every position of every call."""
    with (
        dr.ablate_directions(model, r, **ablate),
        capture(model, [HookNames.final_norm_in()], append=True) as acts,
    ):
        sample(model, batch, max_new_tokens=n_new, seeds=[0, 1, 2], temperature=1.0)
    calls = acts.calls[HookNames.final_norm_in()]
    return calls, [(c.double() @ r.double()).abs().max().item() for c in calls]


@pytest.mark.parametrize("site", ["resid_post", "writes"])
def test_full_ablation_zeroes_the_projection_at_every_position_and_decoding_step(tiny64, site):
    batch = left_pad([trial_prompt(tiny64, trial=t) for t in (1, 2, 3)], pad_id=tiny64.tokenizer.pad_token_id)
    r = torch.randn(64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    r = r / r.norm()
    _, clean = _final_projections(tiny64, r, batch, n_new=5, weight=0.0)
    calls, ablated = _final_projections(tiny64, r, batch, n_new=5, site=site)
    assert len(calls) == 5 and calls[0].shape[1] == batch.tokens.shape[1] and calls[1].shape[1] == 1
    assert max(ablated) < 1e-9 < min(clean)
    if site == "writes":  # every write is ablated, so every block's output has no component along r
        with (
            dr.ablate_directions(tiny64, r, site="writes"),
            capture(tiny64, [HookNames.resid_post(la) for la in range(4)]) as acts,
        ):
            _logits(tiny64, batch)
        assert max(float((acts[n] @ r).abs().max()) for n in acts) < 1e-9


def test_weight_zero_is_a_no_op(tiny, batch):
    r = torch.randn(64)
    plain = _logits(tiny, batch)
    for site in dr.ABLATION_SITES:
        with dr.ablate_directions(tiny, r, weight=0.0, site=site):
            assert torch.equal(_logits(tiny, batch), plain)
    with dr.ablate_directions(tiny, r, weight=0.5):
        assert not torch.allclose(_logits(tiny, batch), plain, atol=1e-4)


def test_ablation_composes_with_inject_and_cached_generation(tiny64):
    """Against an independent computation: plain hooks removing (x.r)r, written here, after inject."""
    spec = spec_for(tiny64)
    batch = left_pad([trial_prompt(tiny64, trial=t) for t in (1, 2, 3)], pad_id=tiny64.tokenizer.pad_token_id)
    vecs = concept_vectors(tiny64, CONCEPTS, layer=spec.injection_layer).double()
    dirs = {
        la: torch.randn(64, generator=torch.Generator().manual_seed(la), dtype=torch.float64) for la in (1, 2)
    }
    weights = {1: 1.0, 2: 0.5}
    kw = dict(layer=spec.injection_layer, strength=5.0, start=batch.starts)

    def remove(r, w):
        r = r / r.norm()
        return lambda x, hook: x - w * (x @ r)[..., None] * r

    plain = [(HookNames.resid_post(la), remove(dirs[la], weights[la])) for la in (1, 2)]
    with inject(tiny64, vecs, **kw), hooks_context(tiny64, plain):
        ref = _logits(tiny64, batch)
        ref_out = sample(tiny64, batch, max_new_tokens=6, seeds=[7, 8, 9])
    with dr.ablate_directions(tiny64, dirs, weight=weights), inject(tiny64, vecs, **kw):
        got = _logits(tiny64, batch)
        cached = sample(tiny64, batch, max_new_tokens=6, seeds=[7, 8, 9])
        uncached = sample(tiny64, batch, max_new_tokens=6, seeds=[7, 8, 9], use_cache=False)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
    assert torch.equal(cached.tokens, ref_out.tokens) and torch.equal(cached.tokens, uncached.tokens)


@pytest.mark.parametrize("ablation_first", [True, False])
def test_injection_then_ablation_at_a_shared_layer(tiny64, ablation_first):
    """Inject v at L and ablate v/|v| at L: the injection's component is removed whichever context is
    entered first, so the logits equal the ablation alone."""
    spec = spec_for(tiny64)
    layer = spec.injection_layer
    batch = left_pad([trial_prompt(tiny64, trial=t) for t in (1, 2)], pad_id=tiny64.tokenizer.pad_token_id)
    v = concept_vectors(tiny64, ["Bread"], layer=layer)[0].double()
    with dr.ablate_directions(tiny64, v, layers=[layer]):
        alone = _logits(tiny64, batch)
    inj = inject(tiny64, v, layer=layer, strength=8.0, start=batch.starts)
    abl = dr.ablate_directions(tiny64, v, layers=[layer])
    with contextlib.ExitStack() as stack:
        for context in (abl, inj) if ablation_first else (inj, abl):
            stack.enter_context(context)
        both = _logits(tiny64, batch)
    torch.testing.assert_close(both, alone, rtol=0, atol=1e-10)
    with inject(tiny64, v, layer=layer, strength=8.0, start=batch.starts):
        injected = _logits(tiny64, batch)
    assert not torch.allclose(injected, alone, atol=1e-3)


def test_ablation_starts_at_absolute_positions(tiny64):
    batch = left_pad([trial_prompt(tiny64, trial=t) for t in (1, 10)], pad_id=tiny64.tokenizer.pad_token_id)
    r = torch.randn(64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    r = r / r.norm()
    name = HookNames.resid_pre(2)  # block 1's ablated output
    with torch.no_grad(), capture(tiny64, [name]) as clean:
        tiny64(batch.tokens, attention_mask=batch.attention_mask)
    starts = batch.starts + torch.tensor([0, 4])  # a different start per row
    with dr.ablate_directions(tiny64, r, layers=[1], start=starts), capture(tiny64, [name]) as acts:
        _logits(tiny64, batch)
    for row, start in enumerate(starts.tolist()):
        assert torch.equal(acts[name][row, :start], clean[name][row, :start])
        assert float((acts[name][row, start:] @ r).abs().max()) < 1e-9


def test_ablation_checks_its_input(tiny):
    r = torch.randn(64)
    bad = [
        (dict(directions=torch.zeros(64)), ValueError, "zero"),
        (dict(directions=torch.randn(32)), ValueError, "d_model"),
        (dict(directions=torch.full((64,), math.nan)), ValueError, "NaN"),
        (dict(directions=r, site="every"), ValueError, "valid"),
        (dict(directions=r, layers=[9]), ValueError, "0..3"),
        (dict(directions={1: r}, layers=[1, 2]), ValueError, "no direction"),
        (dict(directions=r, layers=[1, 2], weight={1: 1.0}), ValueError, "no weight"),
        (dict(directions=r, layers=[1, 2], weight=[1.0]), ValueError, "2 layers"),
        (dict(directions=r, weight=math.inf), ValueError, "finite"),
        (dict(directions=torch.randn(3, 64), layers=[1, 2]), ValueError, "3 directions"),
        (dict(directions=r, start=1.5), TypeError, "integer"),
    ]
    for kw, err, match in bad:
        with pytest.raises(err, match=match):
            dr.make_ablation(tiny, **kw)
    ab = dr.make_ablation(tiny, {0: r, 3: 2 * r}, weight=[0.5, 1.0])
    assert ab.layers == (0, 3) and ab.weights.tolist() == [0.5, 1.0]
    torch.testing.assert_close(ab.directions[1], r.double() / r.double().norm())
    assert [n for n, _ in ab.hooks] == [HookNames.resid_pre(1), HookNames.final_norm_in()]
    writes = dr.make_ablation(tiny, r, layers=[0, 2], site="writes")
    assert [n for n, _ in writes.hooks] == [
        HookNames.resid_pre(0),
        HookNames.attn_out(0),
        HookNames.mlp_out(0),
        HookNames.attn_out(2),
        HookNames.mlp_out(2),
    ]


def test_gate_direction_is_the_unit_mean_of_unit_decoder_rows(tcs):
    gates = pd.DataFrame({"layer": [3, 2, 3], "index": [5, 7, 11], "rank": [1, 3, 2]})
    got = dr.gate_direction(tcs, gates, k=2)  # ranks 1 and 2: L3 F5 and L3 F11
    rows = [tcs[3].W_dec.detach()[i].float() for i in (5, 11)]
    mean = sum(r / r.norm() for r in rows) / 2
    torch.testing.assert_close(got, mean / mean.norm())
    with pytest.raises(ValueError, match="only 3"):
        dr.gate_direction(tcs, gates, k=4)
    ctl = dr.random_direction(64, seed=1, norm=2.5)
    assert float(ctl.norm()) == pytest.approx(2.5) and torch.equal(
        ctl, dr.random_direction(64, seed=1, norm=2.5)
    )
