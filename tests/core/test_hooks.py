"""hooks: the position tracker reads the KV cache, capture reads what it is asked for (with autograd and JVPs
when asked), and layer / position arguments are checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechintro.core.concepts import concept_vectors
from mechintro.core.hooks import capture, check_layer, check_positions, position_mask, tracker
from mechintro.core.kvcache import cache_kwargs, prefill
from mechintro.core.models import HookNames
from mechintro.core.prompts import trial_prompt
from mechintro.core.steering import inject

LAYER = 1
SITE = HookNames.resid_post(3)


@pytest.fixture(scope="module")
def setup(tiny):
    return trial_prompt(tiny, trial=1), concept_vectors(tiny, ["Bread", "Oceans"], layer=LAYER)


def test_tracker_reads_the_cache_position_not_the_call_shape(tiny, setup):
    p, _ = setup
    track = tracker(tiny)
    assert tracker(tiny) is track, "one tracker per model"
    with torch.no_grad():
        tiny(p.tokens[None])
        assert (track.offset, track.seq) == (0, len(p.tokens))
        cache = prefill(tiny, p.tokens[None, :50])
        assert (track.offset, track.seq) == (0, 50)
        tiny(p.tokens[None, 50:], **cache_kwargs(tiny, cache))  # a suffix of many positions
        assert (track.offset, track.seq) == (50, len(p.tokens) - 50)


def test_injection_after_a_shared_prefix_cache_equals_the_full_run(tiny, setup):
    """A multi-position call after a cache is not position 0: the old shape heuristic got this wrong."""
    p, vecs = setup
    split = p.injection_start - 3  # the suffix holds 3 un-injected positions, then the injected ones
    kw = dict(layer=LAYER, strength=torch.tensor([6.0, -4.0]), start=p.injection_start)
    with torch.no_grad():
        with inject(tiny, vecs, **kw):
            full = tiny(p.tokens[None].expand(2, -1))
        cache = prefill(tiny, p.tokens[None, :split])
        cache.batch_repeat_interleave(2)
        with inject(tiny, vecs, **kw):
            suffix = tiny(p.tokens[None, split:].expand(2, -1), **cache_kwargs(tiny, cache))
    torch.testing.assert_close(suffix, full[:, split:], rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        cache = prefill(tiny, p.tokens[None, :split])
        cache.batch_repeat_interleave(2)
        with inject(tiny, vecs, **kw | {"start": p.injection_start - split}):
            wrong = tiny(p.tokens[None, split:].expand(2, -1), **cache_kwargs(tiny, cache))
    assert not torch.allclose(wrong, full[:, split:], atol=1e-3), "a start relative to the call is wrong"


def test_capture_positions_and_calls(tiny, setup):
    p, _ = setup
    seq = len(p.tokens)
    with torch.no_grad(), capture(tiny, [SITE]) as everything:
        tiny(p.tokens[None])
    full = everything[SITE]
    assert full.shape == (1, seq, 64) and not full.requires_grad
    for positions, expected in (("last", [seq - 1]), (5, [5]), ([0, -1, 7], [0, seq - 1, 7])):
        with torch.no_grad(), capture(tiny, SITE, positions=positions) as acts:
            tiny(p.tokens[None])
        torch.testing.assert_close(acts[SITE], full[:, expected])
    with torch.no_grad(), capture(tiny, SITE, positions="last", append=True) as acts:
        cache = prefill(tiny, p.tokens[None, :-1])
        tiny(p.tokens[None, -1:], **cache_kwargs(tiny, cache))
    assert len(acts.calls[SITE]) == 2
    torch.testing.assert_close(acts.calls[SITE][0], full[:, [seq - 2]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acts.calls[SITE][1], full[:, [seq - 1]], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"covers positions 0..139"):
        with torch.no_grad(), capture(tiny, SITE, positions=[seq + 3]):
            tiny(p.tokens[None])
    with pytest.raises(KeyError, match="nothing captured"):
        everything["blocks.0.hook_resid_post"]


def test_capture_keeps_autograd_and_forward_mode_tangents(tiny, setup):
    """detach=False: torch.func.jvp through inject + capture equals central finite differences in strength,
    and backward reaches the strength."""
    p, vecs = setup
    tokens = p.tokens[None]

    def site_at(alpha: torch.Tensor) -> torch.Tensor:
        with inject(tiny, vecs[0], layer=LAYER, strength=alpha, start=p.injection_start):
            with capture(tiny, SITE, positions="last", detach=False) as acts:
                tiny(tokens, stop_at_layer=4)
        return acts[SITE]

    alpha = torch.tensor([3.0])
    primal, tangent = torch.func.jvp(site_at, (alpha,), (torch.ones(1),))
    eps = 1e-2
    with torch.no_grad():
        numeric = (site_at(alpha + eps) - site_at(alpha - eps)) / (2 * eps)
    assert tangent.abs().max() > 1e-3
    torch.testing.assert_close(tangent, numeric, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(primal, site_at(alpha).detach())

    strength = torch.tensor([3.0], requires_grad=True)
    site_at(strength).sum().backward()
    tiny.zero_grad(set_to_none=True)  # the shared model leaves this test without gradients
    assert strength.grad is not None and strength.grad.abs() > 0
    with (
        capture(tiny, SITE, positions="last") as detached,
        inject(tiny, vecs[0], layer=LAYER, strength=strength, start=p.injection_start),
    ):
        tiny(tokens, stop_at_layer=4)
    assert not detached[SITE].requires_grad


def test_position_mask():
    assert position_mask("all", offset=3, seq=2).tolist() == [[True, True]]
    assert position_mask("last", offset=3, seq=3).tolist() == [[False, False, True]]
    assert position_mask([4, -1], offset=3, seq=3).tolist() == [[False, True, True]]
    mask = position_mask("from_start", offset=10, seq=3, starts=torch.tensor([9, 11, 13]))
    assert mask.tolist() == [[True, True, True], [False, True, True], [False, False, False]]


def test_bad_layers_and_positions_name_the_choices(tiny):
    assert check_layer(tiny, np.int64(3)) == 3 and check_layer(tiny, torch.tensor(2)) == 2
    for bad in (4, -1, 2.0, True, "1"):
        with pytest.raises(ValueError, match=r"valid layers are 0..3"):
            check_layer(tiny, bad)
    with pytest.raises(ValueError, match="valid: \\['last', 'all', 'from_start'\\]"):
        check_positions("first")
    with pytest.raises(ValueError, match="needs start="):
        check_positions("from_start")
    with pytest.raises(TypeError, match="integer"):
        check_positions(2.5)
    with pytest.raises(ValueError, match="an edit.s choice"):
        with capture(tiny, SITE, positions="from_start"):
            pass
