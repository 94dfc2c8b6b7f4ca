"""Every reader takes a transcoder's hooks from the site the dictionary records, not the family's default.

A Gemma 3 dictionary recorded at the residual *before* the pre-feedforward norm (``ln2.hook_in``, the family's
other input candidate) is loaded; the feature grid (eager and lazy), ``read_features``, a feature
intervention, MLP replacement and steering attribution must all encode from ``ln2.hook_in``, which differs
from the default ``ln2.hook_out`` (the norms' weights are random).
"""

from __future__ import annotations

import pytest
import torch

from mechintro.core.hooks import capture
from mechintro.core.models import load_model, spec_for
from mechintro.core.prompts import trial_prompt
from mechintro.core.transcoders import LazyTranscoders, load_transcoders, transcoder_site
from mechintro.testing import save_sae_lens_transcoders, save_tiny_gemma3

LAYERS = (2, 3)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("prenorm_site")
    model = load_model(save_tiny_gemma3(root / "model"), device="cpu")
    source = save_sae_lens_transcoders(
        root / "tcs", d_in=64, d_out=64, d_sae=48, n_layers=4, hook_name="blocks.{layer}.ln2.hook_in"
    )
    tcs = load_transcoders(model, list(LAYERS), source=source, check="hook")
    return model, tcs, source


def _captured(model, tokens, hook, **kw):
    with capture(model, [hook], positions="last") as acts, torch.no_grad():
        model(tokens, **kw)
    return acts[hook][:, 0]


def test_the_recorded_site_is_wired_and_differs_from_the_default(setup):
    model, tcs, _ = setup
    for layer in LAYERS:
        assert tcs[layer].cfg.metadata.site == "mlp_in_prenorm"
        assert transcoder_site(model, tcs, layer) == (
            f"blocks.{layer}.ln2.hook_in",
            f"blocks.{layer}.hook_mlp_out",
        )
    tokens = trial_prompt(model, trial=1).tokens[None]
    pre = _captured(model, tokens, "blocks.2.ln2.hook_in")
    post = _captured(model, tokens, "blocks.2.ln2.hook_out")
    assert not torch.allclose(pre, post, atol=1e-3)


def test_read_features_encodes_at_the_recorded_site(setup):
    from mechintro.mechanism.interventions import read_features

    model, tcs, _ = setup
    tokens = trial_prompt(model, trial=1).tokens
    feats = [(layer, i) for layer in LAYERS for i in range(48)]
    got = read_features(model, tcs, feats, tokens)
    for layer in LAYERS:
        x = _captured(model, tokens[None], f"blocks.{layer}.ln2.hook_in")
        want = tcs[layer].encode(x)
        cols = [k for k, (la, _) in enumerate(feats) if la == layer]
        torch.testing.assert_close(got[:, cols], want, rtol=0, atol=1e-6)
        assert want.abs().sum() > 0


def test_feature_grid_eager_and_lazy_encode_at_the_recorded_site_loading_each_layer_once(setup):
    from mechintro.core.steering import inject
    from mechintro.mechanism.features import feature_grid

    model, tcs, _ = setup
    vecs = torch.randn(2, 64, generator=torch.Generator().manual_seed(0)) * 3
    kw = dict(vectors=vecs, strengths=(0.0, 2.0), batch_size=3, progress=False)
    grid = feature_grid(model, tcs, ["Bread", "Oceans"], **kw)
    prompt = trial_prompt(model, trial=1)
    for layer in LAYERS:
        with inject(
            model, vecs[1], layer=spec_for(model).injection_layer, strength=2.0, start=prompt.injection_start
        ):
            x = _captured(model, prompt.tokens[None], f"blocks.{layer}.ln2.hook_in")
        torch.testing.assert_close(grid.dense(layer)[1, 1], tcs[layer].encode(x)[0], rtol=0, atol=1e-5)
    loads: list[int] = []

    def load(layer):
        loads.append(layer)
        return tcs[layer]

    lazy = feature_grid(model, LazyTranscoders(list(LAYERS), load, keep=1), ["Bread", "Oceans"], **kw)
    assert sorted(loads) == list(LAYERS)
    for layer in LAYERS:
        assert torch.equal(lazy.dense(layer), grid.dense(layer))


def test_an_intervention_and_mlp_replacement_read_the_recorded_site(setup):
    from mechintro.core.transcoders import mlp_replacement_hooks
    from mechintro.mechanism.interventions import make_intervention

    model, tcs, _ = setup
    hooks = make_intervention(model, tcs, [(2, 0)], target=0.0).hooks
    assert [h for h, _ in hooks] == ["blocks.2.ln2.hook_in", "blocks.2.hook_mlp_out"]
    names = [h for h, _ in mlp_replacement_hooks(model, tcs)]
    assert names == [
        "blocks.2.ln2.hook_in",
        "blocks.3.ln2.hook_in",
        "blocks.2.hook_mlp_out",
        "blocks.3.hook_mlp_out",
    ]


def test_attribution_reads_the_recorded_site(setup):
    from mechintro.attribution.passes import steering_attribution

    model, tcs, _ = setup
    att = steering_attribution(model, tcs, "Bread", strengths=[0.0, 1.0], batch_size=4, progress=False)
    rows = att.features[(att.features["layer"] == 3) & (att.features["strength"] == 0.0)]
    last = rows[rows["position"] == rows["position"].max()]
    x = _captured(model, trial_prompt(model, trial=1).tokens[None], "blocks.3.ln2.hook_in")
    want = tcs[3].encode(x)[0]
    assert len(last) > 0
    for row in last.itertuples():
        assert row.activation == pytest.approx(float(want[int(row.feature)]), abs=1e-5)
    rem = att.remainders
    torch.testing.assert_close(
        torch.tensor(rem["total"].to_numpy()),
        torch.tensor((rem["features"] + rem["skip"] + rem["error"]).to_numpy()),
        rtol=0,
        atol=1e-4,
    )
