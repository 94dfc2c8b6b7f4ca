"""patching: exact identities (no-op ablation, full patching = steered) and batched = one-at-a-time."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from mechintro.core.concepts import concept_vectors
from mechintro.core.hooks import hooks_context
from mechintro.core.models import spec_for
from mechintro.core.prompts import trial_prompt
from mechintro.core.readout import yes_no_gap
from mechintro.core.steering import inject
from mechintro.mechanism.patching import (
    PatchingConfig,
    Replacement,
    capture_sites,
    component_patching,
    replacement_hooks,
    summarize_patching,
)

CONCEPTS = ["Bread", "Oceans", "Dust"]
INJ = 1  # inject early so that layers 2 and 3 are patched


@pytest.fixture(scope="module")
def vecs(tiny):
    return concept_vectors(tiny, CONCEPTS, layer=INJ)


def _sites(first: int, n_layers: int = 4) -> list[tuple[int, str]]:
    return [(layer, comp) for layer in range(first, n_layers) for comp in ("attn", "mlp")]


def test_ablating_with_the_steered_runs_own_values_is_a_no_op(tiny, vecs):
    p = trial_prompt(tiny, trial=1)
    pos = slice(p.injection_start, len(p.tokens))
    tokens = p.tokens[None].expand(3, -1)
    kw = dict(layer=INJ, strength=6.0, start=p.injection_start)
    with inject(tiny, vecs, **kw):
        own, steered = capture_sites(tiny, tokens, _sites(INJ + 1), positions=pos)
    rows = torch.arange(3)
    for site in _sites(INJ + 1):  # one site at a time, and all at once
        with (
            torch.no_grad(),
            inject(tiny, vecs, **kw),
            hooks_context(tiny, replacement_hooks(tiny, {site: Replacement(rows, own[site])}, positions=pos)),
        ):
            torch.testing.assert_close(tiny(tokens)[:, -1].float(), steered, rtol=1e-5, atol=1e-5)
    every = {site: Replacement(rows, own[site]) for site in _sites(INJ + 1)}
    with (
        torch.no_grad(),
        inject(tiny, vecs, **kw),
        hooks_context(tiny, replacement_hooks(tiny, every, positions=pos)),
    ):
        torch.testing.assert_close(tiny(tokens)[:, -1].float(), steered, rtol=1e-5, atol=1e-5)


def test_patching_every_component_reproduces_the_steered_logits(tiny, vecs):
    """Unsteered run + every attn/mlp output after the injection layer patched from the steered run: the
    residual stream differs from the steered one by exactly the injection's direct path (strength x v), so
    adding that path at the last layer's resid_post gives the steered logits."""
    p = trial_prompt(tiny, trial=2)
    pos = slice(p.injection_start, len(p.tokens))
    tokens = p.tokens[None].expand(3, -1)
    strength = torch.tensor([4.0, -8.0, 8.0])
    with inject(tiny, vecs, layer=INJ, strength=strength, start=p.injection_start):
        steered_values, _ = capture_sites(tiny, tokens, _sites(0), positions=pos)
        with torch.no_grad():
            steered = tiny(tokens)
    every = {site: Replacement(torch.arange(3), steered_values[site]) for site in _sites(0)}
    with torch.no_grad(), hooks_context(tiny, replacement_hooks(tiny, every, positions=pos)):
        components_only = tiny(tokens)
        with inject(tiny, vecs, layer=3, strength=strength, start=p.injection_start):  # the direct path
            patched = tiny(tokens)
    torch.testing.assert_close(patched, steered, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(components_only[:, -1], steered[:, -1], atol=1e-3)


def test_batched_component_patching_equals_one_forward_per_intervention(tiny, vecs):
    cfg = PatchingConfig(injection_layer=INJ, strength=8.0, trials=(1,), batch_size=4)
    df = component_patching(tiny, CONCEPTS, vectors=vecs, config=cfg)
    spec = spec_for(tiny)
    p = trial_prompt(tiny, trial=1)
    pos = slice(p.injection_start, len(p.tokens))
    clean, clean_logits = capture_sites(tiny, p.tokens[None], _sites(INJ + 1), positions=pos)
    got = df[(df["experiment"] == "ablation") & (df["kind"] == "intervention")]
    assert len(got) == len(_sites(INJ + 1)) * len(CONCEPTS)
    for row in got.sample(5, random_state=0).itertuples():
        site, c = (int(row.layer), row.component), CONCEPTS.index(row.concept)
        with (
            torch.no_grad(),
            inject(tiny, vecs[c], layer=INJ, strength=8.0, start=p.injection_start),
            hooks_context(
                tiny,
                replacement_hooks(tiny, {site: Replacement(torch.tensor([0]), clean[site])}, positions=pos),
            ),
        ):
            alone = yes_no_gap(tiny(p.tokens[None])[0, -1].float(), spec)
        assert row.value == pytest.approx(float(alone), abs=1e-4)
    base = df[df["kind"] == "unsteered"]
    assert base["value"][base["metric"] == "gap"].tolist() == pytest.approx(
        [float(yes_no_gap(clean_logits[0], spec))] * 2 * len(CONCEPTS), abs=1e-5
    )
    assert set(df["experiment"]) == {"ablation", "patching", "forced_ablation"}
    assert set(df.loc[df["experiment"] == "forced_ablation", "metric"]) == {"p_concept"}
    # interventions start after the injection layer
    patch = df[(df["experiment"] == "patching") & (df["kind"] == "intervention")]
    assert patch["layer"].dropna().astype(int).min() == INJ + 1


def test_positions_reference_and_summary(tiny, vecs):
    base = dict(injection_layer=INJ, strength=8.0, experiments=("ablation",), layers=(2,))
    last = component_patching(
        tiny, CONCEPTS[:2], vectors=vecs[:2], config=PatchingConfig(positions="last", **base)
    )
    full = component_patching(tiny, CONCEPTS[:2], vectors=vecs[:2], config=PatchingConfig(**base))
    assert not torch.allclose(torch.tensor(last["value"].to_numpy()), torch.tensor(full["value"].to_numpy()))
    matched = component_patching(
        tiny, CONCEPTS[:2], vectors=vecs[:2], config=PatchingConfig(trials=(1, 2), **base)
    )
    mean = component_patching(
        tiny,
        CONCEPTS[:2],
        vectors=vecs[:2],
        config=PatchingConfig(trials=(1, 2), reference="trial_mean", **base),
    )
    assert len(matched) == len(mean)
    summary = summarize_patching(full)
    row = summary[(summary["kind"] == "intervention") & (summary["component"] == "mlp")].iloc[0]
    values = full[(full["kind"] == "intervention") & (full["component"] == "mlp")]["value"]
    assert (
        row["mean"] == pytest.approx(values.mean()) and row["n"] == 2 and row["lo"] < row["mean"] < row["hi"]
    )
    with pytest.raises(ValueError, match=r"valid: \['attn', 'mlp'\]"):
        PatchingConfig(components=("resid",))
    with pytest.raises(ValueError, match=r"valid: \['from_start', 'last'\]"):
        PatchingConfig(positions="all")


def test_summary_averages_trials_within_a_concept_first():
    df = pd.DataFrame(
        {
            "experiment": "ablation",
            "kind": "intervention",
            "layer": 3,
            "component": "mlp",
            "metric": "gap",
            "concept": ["A", "A", "B"],
            "trial": [1, 2, 1],
            "value": [1.0, 3.0, 4.0],
        }
    )
    row = summarize_patching(df).iloc[0]
    assert row["mean"] == 3.0 and row["n"] == 2  # (2 + 4) / 2
    assert row["hi"] - row["mean"] == pytest.approx(12.7062047 * 1.0)  # t(0.975, 1) x sem (=1)


def _hf_replaced(hf, tokens, *, layer, module, values, start, inject=None):
    """Last-position logits of a plain-HF forward of ``tokens`` ([seq]) where ``model.layers[layer].<module>``
    outputs ``values`` at positions >= start, optionally with an injection (layer, vector, strength): a
    recomputation independent of mechintro's hooks."""
    handles = []

    def replace(_m, _i, out):
        out = out.clone()
        out[:, start:] = values.to(out.dtype)
        return out

    def add(_m, _i, out):
        hidden = out[0] if isinstance(out, tuple) else out
        hidden = hidden.clone()
        hidden[:, inject[0] and start :] += inject[2] * inject[1]
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    modules = dict(hf.named_modules())
    handles.append(modules[f"model.layers.{layer}.{module}"].register_forward_hook(replace))
    if inject is not None:
        handles.append(modules[f"model.layers.{inject[0]}"].register_forward_hook(add))
    try:
        with torch.no_grad():
            return hf(tokens[None]).logits[0, -1].float()
    finally:
        for h in handles:
            h.remove()


def _hf_site(hf, tokens, *, layer, module, start, inject=None):
    """The output of ``model.layers[layer].<module>`` at positions >= start (plain HF)."""
    from conftest import hf_capture

    handles = []
    if inject is not None:

        def add(_m, _i, out):
            hidden = out[0] if isinstance(out, tuple) else out
            hidden = hidden.clone()
            hidden[:, start:] += inject[2] * inject[1]
            return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

        handles.append(dict(hf.named_modules())[f"model.layers.{inject[0]}"].register_forward_hook(add))
    try:
        _, got = hf_capture(hf, tokens[None], [f"model.layers.{layer}.{module}"])
    finally:
        for h in handles:
            h.remove()
    return got[f"model.layers.{layer}.{module}"][0, start:]


MODULES = {"attn": "post_attention_layernorm", "mlp": "post_feedforward_layernorm"}


def test_every_experiments_rows_equal_a_plain_hf_recomputation(tiny, hf_tiny, vecs):
    """Ablation, patching and forced rows each equal an independent plain-HF forward with the one site
    replaced; and the interventions do move the metric (a replacement hook that does nothing fails)."""
    from mechintro.core.prompts import forced_prefill
    from mechintro.core.readout import concept_token_ids

    strength = 8.0
    cfg = PatchingConfig(injection_layer=INJ, strength=strength, trials=(1,), batch_size=5)
    df = component_patching(tiny, CONCEPTS, vectors=vecs, config=cfg)
    spec = spec_for(tiny)
    rows = df[df["kind"] == "intervention"]
    for experiment in ("ablation", "patching", "forced_ablation"):
        forced = experiment == "forced_ablation"
        p = trial_prompt(tiny, trial=1, prefill=forced_prefill() if forced else None)
        start = p.injection_start
        for row in rows[rows["experiment"] == experiment].itertuples():
            c = CONCEPTS.index(row.concept)
            site = dict(layer=int(row.layer), module=MODULES[row.component], start=start)
            steer = (INJ, vecs[c], strength)
            if experiment == "patching":  # unsteered run, the steered value patched in
                values = _hf_site(hf_tiny, p.tokens, inject=steer, **site)
                logits = _hf_replaced(hf_tiny, p.tokens, values=values, **site)
            else:  # steered run, the unsteered value put back
                values = _hf_site(hf_tiny, p.tokens, **site)
                logits = _hf_replaced(hf_tiny, p.tokens, values=values, inject=steer, **site)
            if forced:
                expected = float(logits.softmax(-1)[concept_token_ids(tiny, [row.concept])[0]])
                assert row.value == pytest.approx(expected, rel=1e-3, abs=1e-6), row
            else:
                assert row.value == pytest.approx(float(yes_no_gap(logits, spec)), abs=2e-4), row
        baseline = df[
            (df["experiment"] == experiment)
            & (df["kind"] == ("unsteered" if experiment == "patching" else "steered"))
        ]
        moved = rows[rows["experiment"] == experiment].merge(baseline[["concept", "value"]], on="concept")
        a, b = moved["value_x"].to_numpy(), moved["value_y"].to_numpy()
        change = abs(np.log(a) - np.log(b)) if forced else abs(a - b)  # P(concept) is tiny on a random model
        assert change.max() > 1e-2, f"{experiment} never moved the metric"
