"""The KV cache is filled through the bridge on every path that extends one, at both ends of the transformers
range (the cache argument is ``past_key_values`` before 5.24 and ``cache`` from 5.24 on).

Every test watches the Hugging Face forward calls with its own hook (reading the cache under either name,
independently of mechintro) and asserts that a call which extends a cache finds the prefill's positions in
it, and leaves its own positions there too. Without the bridge shim this fails on 5.24 (the bridge's
attention never fills the cache); with a rename-only fix it fails on 5.23 (``cache=`` is swallowed there).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import pandas as pd
import pytest
import torch

from mechintro.core import fastpath, kvcache
from mechintro.core.concepts import concept_vectors
from mechintro.core.models import spec_for
from mechintro.core.prompts import left_pad, trial_prompt
from mechintro.core.sampling import prefill, prompt_logits, sample
from mechintro.core.steering import inject
from mechintro.core.transcoders import load_transcoders
from mechintro.mechanism.features import feature_grid
from mechintro.organism import train as organism_train
from mechintro.testing import save_random_transcoders


@dataclass
class Call:
    positions: int
    """Input positions of the call."""
    before: int
    """Positions in the call's cache when it started (-1: no cache given)."""
    after: int = -1
    """Positions in it when the call returned."""
    name: str | None = None
    """The argument that carried the cache."""
    takes: str | None = None
    """The cache argument the called forward's signature takes."""


def _given_cache(kwargs: dict):
    for name in ("cache", "past_key_values"):
        if kwargs.get(name) is not None:
            return name, kwargs[name]
    return None, None


def _takes(module) -> str:
    params = inspect.signature(type(module).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@contextlib.contextmanager
def watching(*modules):
    """Record every forward call of the HF ``modules``: its input positions and its cache before and after."""
    calls: list[Call] = []
    pending: list[tuple[Call, object]] = []

    def pre(module, args, kwargs):
        ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        name, cache = _given_cache(kwargs)
        call = Call(
            int(ids.shape[1]), -1 if cache is None else int(cache.get_seq_length()), -1, name, _takes(module)
        )
        calls.append(call)
        pending.append((call, cache))

    def post(module, args, kwargs, out):
        call, cache = pending.pop()
        call.after = -1 if cache is None else int(cache.get_seq_length())

    handles = []
    for m in modules:
        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def assert_extends(calls: list[Call], *, prefilled: int):
    """Some call starts from a cache holding ``prefilled`` positions, and every cached call adds its own."""
    cached = [c for c in calls if c.before >= 0]
    assert cached, f"no call was given a cache: {calls}"
    for c in cached:
        assert c.after == c.before + c.positions, f"a call left the cache short of its positions: {c}"
        assert c.name == c.takes, f"a cache passed under a name the forward does not take (an alias?): {c}"
    assert any(c.before == prefilled for c in cached), (
        f"no call found the {prefilled}-position prefill: {calls}"
    )


def test_the_cache_argument_is_read_off_the_signature(tiny):
    params = inspect.signature(type(tiny.original_model).forward).parameters
    expected = "cache" if "cache" in params else "past_key_values"
    assert kvcache.cache_argument(tiny) == expected
    assert kvcache.cache_kwargs(tiny, "C") == {expected: "C", "use_cache": True}


def test_a_prefill_through_the_bridge_holds_its_positions(tiny):
    tokens = trial_prompt(tiny, trial=1).tokens[None]
    with torch.no_grad(), watching(tiny.original_model) as calls:
        cache = kvcache.new_cache(tiny)
        tiny(tokens[:, :12], **kvcache.cache_kwargs(tiny, cache))
        assert kvcache.cache_length(cache) == 12
        suffix = tiny(tokens[:, 12:], **kvcache.cache_kwargs(tiny, cache))
        full = tiny(tokens)
    assert_extends(calls, prefilled=12)
    torch.testing.assert_close(suffix, full[:, 12:], rtol=1e-4, atol=1e-4)


def test_a_prefill_on_original_model_of_a_bridged_model_holds_its_positions(tiny):
    """The HF module's attention modules are the bridge's once bridged: the cache must fill there too."""
    hf = tiny.original_model
    tokens = trial_prompt(tiny, trial=1).tokens[None]
    cache = kvcache.new_cache(tiny)
    with torch.no_grad():
        hf(input_ids=tokens[:, :12], **kvcache.cache_kwargs(hf, cache))
    assert kvcache.cache_length(cache) == 12


def test_prefill_refuses_a_cache_left_empty(tiny, monkeypatch):
    monkeypatch.setattr(kvcache, "cache_kwargs", lambda model, cache: {"use_cache": True})
    with pytest.raises(RuntimeError, match="holds 0 positions after a prefill of 5"):
        kvcache.prefill(tiny, trial_prompt(tiny, trial=1).tokens[None, :5])


def test_a_cache_under_the_wrong_name_is_refused_not_ignored(tiny):
    """Where the forward takes the other name, the tracker raises rather than reading a cache HF ignores."""
    name = kvcache.cache_argument(tiny)
    if name == "cache":
        assert kvcache.cache_in_call(tiny.original_model, {"past_key_values": "old"}) == "old"  # the alias
    else:
        with pytest.raises(TypeError, match="would be ignored"):
            kvcache.cache_in_call(tiny.original_model, {"cache": object()})


def test_a_forward_without_a_cache_argument():
    linear = torch.nn.Linear(2, 2)
    assert kvcache.cache_in_call(linear, {"cache": "ignored"}) is None
    with pytest.raises(TypeError, match="takes neither 'cache' nor 'past_key_values'"):
        kvcache.cache_argument(linear)


def test_features_prefix_cache_is_filled(tiny, tmp_path):
    tcs = load_transcoders(tiny, source=save_random_transcoders(tmp_path / "tcs"))
    vecs = concept_vectors(tiny, ["Bread", "Oceans"], layer=spec_for(tiny).injection_layer)
    start = trial_prompt(tiny, trial=1).injection_start
    kw = dict(vectors=vecs, strengths=(0.0, 4.0), layers=[1, 3], batch_size=8, progress=False)
    with watching(tiny.original_model) as calls:
        cached = feature_grid(tiny, tcs, ["Bread", "Oceans"], prefix_cache=True, **kw)
    assert_extends(calls, prefilled=start)
    plain = feature_grid(tiny, tcs, ["Bread", "Oceans"], prefix_cache=False, **kw)
    for layer in (1, 3):
        torch.testing.assert_close(
            cached.acts[layer].to_dense(), plain.acts[layer].to_dense(), rtol=1e-4, atol=1e-5
        )


def test_attribution_prefix_cache_is_filled(tiny, tmp_path):
    from mechintro.attribution.passes import steering_attribution

    tcs = load_transcoders(tiny, source=save_random_transcoders(tmp_path / "tcs"))
    vecs = concept_vectors(tiny, ["Bread"], layer=spec_for(tiny).injection_layer)
    start = trial_prompt(tiny, trial=1).injection_start
    kw = dict(strengths=[0.0, 2.0], vectors=vecs, progress=False)
    with watching(tiny.original_model) as calls:
        cached = steering_attribution(tiny, tcs, ["Bread"], prefix_cache=True, **kw)
    assert_extends(calls, prefilled=start)
    plain = steering_attribution(tiny, tcs, ["Bread"], prefix_cache=False, **kw)
    pd.testing.assert_frame_equal(cached.features, plain.features, rtol=1e-4, atol=1e-5)


def test_organism_trainer_prefix_cache_is_filled(tiny):
    batch = organism_train.trial_batch(tiny, [(1, "Yes"), (2, "No")])
    n = len(batch.prefix)
    with torch.no_grad(), watching(tiny.original_model) as calls:
        cache = organism_train.prefix_cache(tiny, batch)
        assert kvcache.cache_length(cache) == n
        logits = organism_train.suffix_logits(tiny, batch, cache)
        full = tiny(torch.cat([batch.prefix[None].expand(2, -1), batch.suffix.tokens], dim=1))
    assert_extends(calls, prefilled=n)
    real = batch.suffix.tokens != tiny.tokenizer.pad_token_id
    torch.testing.assert_close(logits[real], full[:, n:][real], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", ["bridge", "hf"])
def test_the_sampler_and_the_fast_path_extend_the_prefill(tiny, path):
    prompts = [trial_prompt(tiny, trial=t) for t in (1, 2, 3)]
    b = left_pad(prompts, pad_id=tiny.tokenizer.pad_token_id, share_prefix=True)
    assert b.prefix > 0
    modules = [tiny.original_model, fastpath.twin(tiny)]
    vecs = torch.randn(3, spec_for(tiny).d_model, generator=torch.Generator().manual_seed(0))
    with watching(*modules) as calls:
        pre = prefill(tiny, b, path=path)
        assert len(pre.layers) == tiny.cfg.n_layers and pre.layers[0][0].shape[-2] == b.prefix
        with inject(tiny, vecs, layer=1, strength=torch.tensor([4.0, 0.0, -2.0]), start=b.starts):
            first = prompt_logits(tiny, b, prefix=pre, path=path)
            out = sample(tiny, b, max_new_tokens=4, seeds=[0, 1, 2], prefix=pre, path=path, keep_logits=True)
    assert_extends(calls, prefilled=b.prefix)
    decode = [c for c in calls if c.positions == 1 and c.before > b.prefix]
    assert decode, "no decoding step extended the cache one position at a time"
    unshared = left_pad(prompts, pad_id=tiny.tokenizer.pad_token_id)
    with inject(tiny, vecs, layer=1, strength=torch.tensor([4.0, 0.0, -2.0]), start=unshared.starts):
        fresh = prompt_logits(tiny, unshared, path=path)
        again = sample(tiny, unshared, max_new_tokens=4, seeds=[0, 1, 2], use_cache=False, path=path)
    torch.testing.assert_close(first, fresh, rtol=1e-4, atol=1e-4)
    assert torch.equal(out.tokens, again.tokens)
