"""inject(): the residual delta is exactly strength * v from start on, per row, padded, cached or not."""

from __future__ import annotations

import contextlib

import pytest
import torch

from mechintro.core.concepts import concept_vectors
from mechintro.core.hooks import hooks_context
from mechintro.core.models import HookNames
from mechintro.core.prompts import left_pad, trial_prompt
from mechintro.core.sampling import sample
from mechintro.core.steering import inject

LAYER = 2


@pytest.fixture(scope="module")
def vecs(tiny):
    return concept_vectors(tiny, ["Bread", "Oceans", "Dust"], layer=LAYER)


@pytest.fixture(scope="module")
def batch(tiny):
    prompts = [
        trial_prompt(tiny, trial=t, variant=v)
        for t, v in ((1, "original"), (2, "neutral_query"), (3, "skeptical"))
    ]
    return prompts, left_pad(prompts, pad_id=tiny.tokenizer.pad_token_id)


@contextlib.contextmanager
def around_injection(model, inj_kwargs):
    """Record resid_post just before and just after the injection hook, for every call."""
    before, after = [], []

    def rec(store):
        def hook(x, hook):
            store.append(x.detach().clone())

        return hook

    name = HookNames.resid_post(inj_kwargs["layer"])
    with (
        hooks_context(model, [(name, rec(before))]),
        inject(model, **inj_kwargs) as inj,
        hooks_context(model, [(name, rec(after))]),
    ):
        yield before, after, inj


def test_delta_is_exact_per_row_in_a_padded_batch(tiny, vecs, batch):
    prompts, b = batch
    strengths = torch.tensor([4.0, -2.5, 8.0])
    kw = dict(vectors=vecs, layer=LAYER, strength=strengths, start=b.starts)
    with torch.no_grad(), around_injection(tiny, kw) as (before, after, _):
        tiny(b.tokens, attention_mask=b.attention_mask)
    delta = after[0] - before[0]
    for i in range(3):
        s = int(b.starts[i])
        assert torch.equal(delta[i, :s], torch.zeros_like(delta[i, :s])), (
            "nothing may change before the start"
        )
        expected = (strengths[i] * vecs[i]).expand(delta.shape[1] - s, -1)
        torch.testing.assert_close(delta[i, s:], expected, rtol=1e-6, atol=1e-5)
        assert s > int(b.pad[i]) or len(prompts[i].tokens) == b.tokens.shape[1]


def test_padded_row_matches_unpadded_single_run(tiny, vecs, batch):
    """The start shift is right: each padded row gives the logits of its prompt run alone."""
    prompts, b = batch
    strengths = torch.tensor([4.0, -2.5, 8.0])
    with torch.no_grad(), inject(tiny, vecs, layer=LAYER, strength=strengths, start=b.starts):
        padded = tiny(b.tokens, attention_mask=b.attention_mask)
    for i, p in enumerate(prompts):
        with (
            torch.no_grad(),
            inject(tiny, vecs[i], layer=LAYER, strength=float(strengths[i]), start=p.injection_start),
        ):
            alone = tiny(p.tokens[None])[0]
        torch.testing.assert_close(padded[i, int(b.pad[i]) :], alone, rtol=1e-4, atol=1e-4)
    # an unshifted start (the bug the paper's code has in one path) injects into real tokens before "Trial"
    unshifted = [p.injection_start for p in prompts]
    with torch.no_grad(), inject(tiny, vecs, layer=LAYER, strength=strengths, start=unshifted):
        wrong = tiny(b.tokens, attention_mask=b.attention_mask)
    row = 1  # the shortest prompt: most padding
    assert not torch.allclose(wrong[row, int(b.pad[row]) :], padded[row, int(b.pad[row]) :], atol=1e-3)


def test_delta_on_every_cached_generation_step(tiny, vecs, batch):
    _, b = batch
    strengths = torch.tensor([1.0, 2.0, 3.0])
    kw = dict(vectors=vecs, layer=LAYER, strength=strengths, start=b.starts)
    with around_injection(tiny, kw) as (before, after, inj):
        out = sample(tiny, b, max_new_tokens=6, seeds=[0, 1, 2], use_cache=True)
    steps = int(out.lengths.max())
    assert len(before) == steps  # one prefill call + one call per further step
    assert [a.shape[1] for a in after] == [b.tokens.shape[1]] + [1] * (steps - 1)
    for t in range(1, steps):
        delta = (after[t] - before[t])[:, 0]
        torch.testing.assert_close(delta, strengths[:, None] * vecs, rtol=1e-6, atol=1e-5)
    assert inj.offset == b.tokens.shape[1] + steps - 1


def test_cached_generation_equals_uncached(tiny, vecs, batch):
    _, b = batch
    kw = dict(layer=LAYER, strength=torch.tensor([6.0, 6.0, -6.0]), start=b.starts)
    with inject(tiny, vecs, **kw):
        cached = sample(tiny, b, max_new_tokens=10, seeds=[5, 6, 7], use_cache=True)
    with inject(tiny, vecs, **kw):
        uncached = sample(tiny, b, max_new_tokens=10, seeds=[5, 6, 7], use_cache=False)
    assert torch.equal(cached.tokens, uncached.tokens)
    assert torch.equal(cached.lengths, uncached.lengths)


def test_zero_strength_is_a_no_op_and_injection_changes_logits(tiny, vecs):
    p = trial_prompt(tiny, trial=1)
    with torch.no_grad():
        clean = tiny(p.tokens[None])
        with inject(tiny, vecs[0], layer=LAYER, strength=0.0, start=p.injection_start):
            zero = tiny(p.tokens[None])
        with inject(tiny, vecs[0], layer=LAYER, strength=4.0, start=p.injection_start):
            steered = tiny(p.tokens[None])
    assert torch.equal(clean, zero)
    assert torch.equal(clean[0, : p.injection_start], steered[0, : p.injection_start])
    assert not torch.allclose(clean[0, -1], steered[0, -1], atol=1e-3)


def test_hooks_are_removed_after_the_context(tiny, vecs):
    p = trial_prompt(tiny, trial=1)
    with torch.no_grad():
        clean = tiny(p.tokens[None])
        with inject(tiny, vecs[0], layer=LAYER, strength=4.0, start=0):
            pass
        assert torch.equal(tiny(p.tokens[None]), clean)


def test_bad_input_names_valid_choices(tiny, vecs):
    p = trial_prompt(tiny, trial=1)
    with pytest.raises(ValueError, match=r"valid layers are 0..3"):
        with inject(tiny, vecs[0], layer=4, strength=1.0, start=0):
            pass
    with pytest.raises(ValueError, match="d_model is 64"):
        with inject(tiny, torch.ones(32), layer=1, strength=1.0, start=0):
            pass
    with pytest.raises(ValueError, match="finite"):
        with inject(tiny, vecs[0], layer=1, strength=float("nan"), start=0):
            pass
    with pytest.raises(ValueError, match=r"\[2\] rows but the batch has 1 rows"):
        with torch.no_grad(), inject(tiny, vecs[:2], layer=1, strength=1.0, start=0):
            tiny(p.tokens[None])
    with pytest.raises(ValueError, match="no hook point"):
        with hooks_context(tiny, [("blocks.0.hook_nonsense", lambda x, hook: x)]):
            pass


def test_cached_decoding_equals_uncached_at_every_step(tiny, vecs, batch):
    """The final-norm output (hence the logits) of every KV-cached decoding step equals an uncached forward
    of the whole sequence, per row of a left-padded injected batch: not just the same sampled tokens."""
    from mechintro.core.hooks import capture

    _, b = batch
    kw = dict(layer=LAYER, strength=torch.tensor([6.0, -4.0, 8.0]), start=b.starts)
    site = "ln_final.hook_out"
    with inject(tiny, vecs, **kw), capture(tiny, site, positions="last", append=True) as steps:
        out = sample(tiny, b, max_new_tokens=6, seeds=[5, 6, 7], use_cache=True)
    n = int(out.lengths.min())
    assert n >= 3 and len(steps.calls[site]) >= n
    full = torch.cat([b.tokens, out.tokens[:, :n]], dim=1)
    mask = torch.cat([b.attention_mask, torch.ones(3, n, dtype=torch.long)], dim=1)
    with torch.no_grad(), inject(tiny, vecs, **kw), capture(tiny, site) as whole:
        tiny(full, attention_mask=mask)
    last = b.tokens.shape[1] - 1
    for t in range(n):
        torch.testing.assert_close(steps.calls[site][t][:, 0], whole[site][:, last + t], rtol=1e-4, atol=1e-4)
