"""The bias vector: trained on a frozen model with training concepts only, exact save/load, composes with
inject / interventions / cached generation; the dose-equivalent gain and the paper's released sweeps.
Directional ablation is tested in tests/mechanism/test_directions.py."""

from __future__ import annotations

import hashlib
import math

import pandas as pd
import pytest
import torch

import mechintro.core.steering as steering
from mechintro.behaviour import dialogue
from mechintro.core import resources
from mechintro.core.concepts import concept_vectors, heldout_concepts, training_concepts
from mechintro.core.fingerprint import weights_fingerprint
from mechintro.core.hooks import hooks_context
from mechintro.core.models import HookNames, load_model, spec_for
from mechintro.core.prompts import left_pad, trial_prompt
from mechintro.core.sampling import sample
from mechintro.core.steering import inject
from mechintro.mechanism.interventions import intervene
from mechintro.studies import bias as el

CONCEPTS = ["Bread", "Oceans", "Dust"]
QUICK = dict(epochs=1, epoch_size=16, batch_size=8, progress=False, log_every=1)


@pytest.fixture(scope="module")
def tiny64(tiny_dir):
    """The tiny model in float64: bias, inject and ablation identities hold to ~1e-12."""
    return load_model(tiny_dir, device="cpu", dtype=torch.float64)


@pytest.fixture(scope="module")
def batch(tiny):
    return left_pad([trial_prompt(tiny, trial=t) for t in (1, 2, 3)], pad_id=tiny.tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def train_words():
    """Training concepts of the shipped split (the tiny model's vocabulary has every concept)."""
    return training_concepts()[:6]


def _artifact(model, layers, vectors):
    spec = spec_for(model)
    settings = el.BiasSettings(
        model=spec.name,
        model_digest="x",
        layers=tuple(layers),
        injection_layers=(spec.injection_layer,),
        strength_range=(1.0, 2.0),
        labels="injected",
        threshold=None,
        control_fraction=0.5,
        epochs=1,
        epoch_size=8,
        batch_size=8,
        lr=1e-3,
        weight_decay=0.0,
        seed=0,
        concepts=("Bread",),
        default_strength=spec.strength,
    )
    return el.BiasVector(vectors=torch.as_tensor(vectors, dtype=torch.float32), settings=settings)


def _logits(model, batch, **kw):
    with torch.no_grad():
        return model(batch.tokens, attention_mask=batch.attention_mask, **kw)


# ----------------------------------------------------------------------------------------------- bias vector


def test_zero_bias_is_a_no_op_in_forward_and_generation(tiny, batch):
    zero = _artifact(tiny, [0, 2], torch.zeros(2, 64))
    plain = _logits(tiny, batch)
    ref = sample(tiny, batch, max_new_tokens=6, seeds=[1, 2, 3])
    with el.bias_vector(tiny, zero):
        same = _logits(tiny, batch)
        out = sample(tiny, batch, max_new_tokens=6, seeds=[1, 2, 3])
    assert torch.equal(same, plain)
    assert torch.equal(out.tokens, ref.tokens)
    some = _artifact(tiny, [2], torch.randn(1, 64))
    with el.bias_vector(tiny, some):
        assert not torch.allclose(_logits(tiny, batch), plain, atol=1e-3)


def test_bias_equals_an_injection_from_position_zero(tiny64):
    """Nothing lies between hook_mlp_out and resid_post: a bias at L is inject(v, layer=L, strength=1,
    start=0)."""
    p = left_pad([trial_prompt(tiny64, trial=t) for t in (1, 4)], pad_id=tiny64.tokenizer.pad_token_id)
    v = torch.randn(64, generator=torch.Generator().manual_seed(0)).double()  # artifacts hold float32
    with el.bias_vector(tiny64, _artifact(tiny64, [1], v[None])):
        biased = _logits(tiny64, p)
    with inject(tiny64, v, layer=1, strength=1.0, start=0):
        injected = _logits(tiny64, p)
    torch.testing.assert_close(biased, injected, rtol=0, atol=1e-10)


def test_bias_composes_with_inject_interventions_and_cached_generation(tiny, tcs, batch):
    spec = spec_for(tiny)
    vecs = concept_vectors(tiny, CONCEPTS, layer=spec.injection_layer)
    art = _artifact(tiny, [1, 3], torch.randn(2, 64, generator=torch.Generator().manual_seed(1)) * 2)
    kw = dict(layer=spec.injection_layer, strength=4.0, start=batch.starts)
    feats = ["L3 F5", "L3 F17"]
    with (
        inject(tiny, vecs, **kw),
        el.bias_vector(tiny, art),
        intervene(tiny, tcs, feats, target=0.0, positions="from_start", start=batch.starts),
    ):
        cached = sample(tiny, batch, max_new_tokens=8, seeds=[4, 5, 6], temperature=1.0)
        uncached = sample(tiny, batch, max_new_tokens=8, seeds=[4, 5, 6], temperature=1.0, use_cache=False)
        both = _logits(tiny, batch)
    assert torch.equal(cached.tokens, uncached.tokens)

    # the same edits written as plain hooks in this test
    def add(v):
        return lambda x, hook: x + v

    plain = [(HookNames.mlp_out(la), add(art.vectors[i])) for i, la in enumerate(art.layers)]
    with (
        inject(tiny, vecs, **kw),
        hooks_context(tiny, plain),
        intervene(tiny, tcs, feats, target=0.0, positions="from_start", start=batch.starts),
    ):
        ref = _logits(tiny, batch)
    torch.testing.assert_close(both, ref, rtol=0, atol=1e-5)


def _weights_hash(model) -> str:
    """A plain SHA-256 of every parameter's bytes (independent of weights_fingerprint)."""
    h = hashlib.sha256()
    for name, p in sorted(model.original_model.state_dict().items()):
        h.update(name.encode() + p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_weights_fingerprint_sees_one_changed_value(tiny_dir):
    model = load_model(tiny_dir, device="cpu")
    full, sampled = weights_fingerprint(model), weights_fingerprint(model, full=False)
    w = model.original_model.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        w[3, 5] += 1e-3  # a value the sampled digest skips; it still moves the tensor's sum
    assert weights_fingerprint(model) != full and weights_fingerprint(model, full=False) != sampled


def test_training_leaves_weights_bit_identical_and_gradients_reach_only_the_bias(tiny, train_words):
    before, digest = _weights_hash(tiny), weights_fingerprint(tiny)
    flags = [p.requires_grad for p in tiny.parameters()]
    art = el.train_bias_vector(tiny, train_words, layer=1, labels="injected", **QUICK)
    assert _weights_hash(tiny) == before
    assert all(p.grad is None for p in tiny.parameters())
    assert [p.requires_grad for p in tiny.parameters()] == flags
    assert not tiny.training
    assert art.vectors.shape == (1, 64) and float(art.vectors.norm()) > 0
    assert len(art.log) == 2 and all(e["grad_norm"] > 0 for e in art.log)
    assert art.settings.model_digest == digest and art.settings.steps == 2


def test_training_never_computes_or_injects_a_heldout_vector(tiny, train_words, monkeypatch):
    """Spies: every token the model reads while training, and every vector handed to inject."""
    tok = tiny.tokenizer
    heldout = heldout_concepts()
    prompt = trial_prompt(tiny, trial=1).tokens.tolist()

    def ids(word):
        return {tok(w, add_special_tokens=False)["input_ids"][0] for w in (word, " " + word)}

    always_there = set(prompt)  # words of the trial prompt itself are not concepts being leaked
    forbidden = set().union(*(ids(c) for c in heldout)) - always_there
    seen: set[int] = set()
    hf = tiny.original_model

    def spy_tokens(module, args, kwargs):
        t = args[0] if args else kwargs.get("input_ids")
        if t is not None:
            seen.update(t.reshape(-1).tolist())

    injected = []
    real_make = steering.make_injection

    def spy_inject(model, vectors, **kw):
        inj = real_make(model, vectors, **kw)
        injected.append((inj.vectors.detach().clone(), inj.strengths.detach().clone()))
        return inj

    monkeypatch.setattr(steering, "make_injection", spy_inject)
    handle = hf.register_forward_pre_hook(spy_tokens, with_kwargs=True)
    try:
        el.train_bias_vector(tiny, train_words, layer=1, labels="injected", seed=3, **QUICK)
    finally:
        handle.remove()
    assert seen and not (seen & forbidden), sorted(seen & forbidden)
    allowed = concept_vectors(tiny, train_words, layer=spec_for(tiny).injection_layer).to(torch.float32)
    rows = [v for vecs, s in injected for v, si in zip(vecs, s.expand(len(vecs)), strict=True) if si != 0]
    assert rows
    for v in rows:
        assert torch.isclose(v.float()[None], allowed, atol=1e-6).all(-1).any()


def test_training_refuses_heldout_concepts_and_bad_settings(tiny, train_words):
    with pytest.raises(ValueError, match="held-out"):
        el.train_bias_vector(tiny, [*train_words, heldout_concepts()[0]], layer=1, labels="injected", **QUICK)
    with pytest.raises(ValueError, match="threshold"):
        el.train_bias_vector(tiny, train_words, layer=1, **QUICK)  # tiny records no detection threshold
    with pytest.raises(ValueError, match="valid"):
        el.train_bias_vector(tiny, train_words, layer=1, labels="always", **QUICK)
    with pytest.raises(ValueError, match="0..3"):
        el.train_bias_vector(tiny, train_words, layer=4, labels="injected", **QUICK)
    with pytest.raises(ValueError, match="'all'"):
        el.train_bias_vector(tiny, train_words, layer="every", labels="injected", **QUICK)
    with pytest.raises(ValueError, match="strength_range"):
        el.train_bias_vector(tiny, train_words, layer=1, labels="injected", strength_range=(3, 1), **QUICK)
    with pytest.raises(ValueError, match="batch_size"):
        el.train_bias_vector(tiny, train_words, layer=1, labels="injected", **(QUICK | {"batch_size": 0}))


@pytest.mark.parametrize("labels", ["instruct", "injected"])
def test_training_rows_follow_the_label_rule(tiny, train_words, monkeypatch, labels):
    drawn = []
    real = dialogue.trial_dialogue_loss

    def spy(model, rows, vectors, **kw):
        drawn.extend(rows)
        return real(model, rows, vectors, **kw)

    monkeypatch.setattr(dialogue, "trial_dialogue_loss", spy)
    art = el.train_bias_vector(
        tiny,
        train_words,
        layer="all",
        labels=labels,
        threshold=2.0,
        strength_range=(0.5, 4.0),
        injection_layers=[1, 2],
        **(QUICK | {"epoch_size": 160, "batch_size": 16}),
    )
    assert art.vectors.shape == (4, 64) and art.settings.threshold == (2.0 if labels == "instruct" else None)
    controls = [r for r in drawn if r.strength == 0]
    injected = [r for r in drawn if r.strength != 0]
    assert len(drawn) == 160 and 50 <= len(controls) <= 110  # p = 0.5
    assert all(r.answer == dialogue.NO_RESPONSE for r in controls)
    assert {r.layer for r in injected} == {1, 2} and all(0.5 <= r.strength <= 4.0 for r in injected)
    for r in injected:
        yes = labels == "injected" or r.strength >= 2.0
        want = (
            dialogue.YES_TEMPLATE.format(concept=train_words[r.concept_index])
            if yes
            else dialogue.NO_RESPONSE
        )
        assert r.answer == want
    assert any(r.answer == dialogue.NO_RESPONSE for r in injected) == (labels == "instruct")


def test_training_is_seeded(tiny, train_words):
    a = el.train_bias_vector(tiny, train_words, layer=2, labels="injected", seed=5, **QUICK)
    b = el.train_bias_vector(tiny, train_words, layer=2, labels="injected", seed=5, **QUICK)
    c = el.train_bias_vector(tiny, train_words, layer=2, labels="injected", seed=6, **QUICK)
    assert torch.equal(a.vectors, b.vectors) and a.log == b.log
    assert not torch.equal(a.vectors, c.vectors)


def test_save_load_round_trip_is_exact(tiny, train_words, tmp_path, batch):
    art = el.train_bias_vector(tiny, train_words, layer=[1, 3], labels="injected", **QUICK)
    back = el.load_bias_vector(art.save(tmp_path / "bias"))
    assert torch.equal(back.vectors, art.vectors) and back.vectors.dtype == torch.float32
    assert back.settings == art.settings and back.log == art.log and back.digest() == art.digest()
    with el.bias_vector(tiny, art):
        a = _logits(tiny, batch)
    with el.bias_vector(tiny, back):
        b = _logits(tiny, batch)
    assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="is missing"):
        el.load_bias_vector(tmp_path / "nothing")


def test_bias_vector_checks_its_input(tiny):
    with pytest.raises(ValueError, match="d_model"):
        with el.bias_vector(tiny, _artifact(tiny, [1], torch.zeros(1, 32))):
            pass
    with pytest.raises(ValueError, match="NaN"):
        with el.bias_vector(tiny, _artifact(tiny, [1], torch.full((1, 64), math.nan))):
            pass
    with pytest.raises(ValueError, match="0..3"):
        with el.bias_vector(tiny, _artifact(tiny, [7], torch.zeros(1, 64))):
            pass
    with pytest.raises(TypeError, match="BiasVector"):
        with el.bias_vector(tiny, torch.zeros(64)):
            pass


# ----------------------------------------------------------------------------------------------- evaluation


def test_bias_trials_use_the_same_vectors_and_keep_the_bias_during_generation(tiny, monkeypatch):
    spec = spec_for(tiny)
    art = _artifact(tiny, [spec.injection_layer], torch.randn(1, 64) * 3)
    calls = []
    real = el.concept_vectors

    def spy(model, concepts, *, layer, **kw):
        calls.append(len(model.hook_dict[HookNames.mlp_out(spec.injection_layer)].fwd_hooks))
        return real(model, concepts, layer=layer, **kw)

    monkeypatch.setattr(el, "concept_vectors", spy)
    kw = dict(n_trials=2, max_new_tokens=5, progress=False, forced=True)
    on = el.bias_trials(tiny, CONCEPTS[:2], bias=art, **kw)
    off = el.bias_trials(tiny, CONCEPTS[:2], bias=None, **kw)
    assert calls == [0, 0]  # vectors computed with no bias hook installed
    assert set(on["arm"]) == {f"bias L{spec.injection_layer}"} and set(off["arm"]) == {"none"}
    assert len(on) == len(off) == 2 * 2 * 3
    assert (on["response"] != off["response"]).any()  # the bias acts during generation


def test_arm_gains_are_differences_with_newcombe_intervals():
    def row(arm, tpr, fpr, intro, forced):
        return {
            "arm": arm,
            "n_injection": 100,
            "n_control": 100,
            "n_forced": 50,
            "tpr": tpr,
            "fpr": fpr,
            "introspection": intro,
            "forced_id": forced,
        }

    metrics = pd.DataFrame([row("none", 0.2, 0.0, 0.1, 0.4), row("bias", 0.7, 0.03, 0.5, 0.5)])
    gains = el.arm_gains(metrics)
    assert len(gains) == 1 and gains.loc[0, "arm"] == "bias"
    assert gains.loc[0, "d_tpr"] == pytest.approx(0.5) and gains.loc[0, "tpr_before"] == 0.2
    assert gains.loc[0, "d_fpr"] == pytest.approx(0.03) and gains.loc[0, "d_forced_id"] == pytest.approx(0.1)
    from mechintro.behaviour.metrics import newcombe_interval

    assert (gains.loc[0, "d_tpr_lo"], gains.loc[0, "d_tpr_hi"]) == pytest.approx(
        newcombe_interval(70, 100, 20, 100)
    )
    with pytest.raises(ValueError, match="arms"):
        el.arm_gains(metrics, baseline="nothing")


def test_dose_equivalent_interpolates_the_rising_branch():
    # TPR = (s - 1) / 2 on [1, 3], then saturates, then falls at high strength
    curve = pd.DataFrame({"strength": [0.0, 1.0, 2.0, 3.0, 4.0, 8.0], "tpr": [0, 0, 0.5, 1.0, 1.0, 0.3]})
    assert el.dose_equivalent_strength(curve, 0.25) == pytest.approx(1.5)
    assert el.dose_equivalent_strength(curve, 0.75) == pytest.approx(2.5)
    assert el.dose_equivalent_strength(curve, 1.0) == pytest.approx(3.0)
    assert el.dose_equivalent_strength(curve, 0.0) == 0.0  # the smallest strength that gives it
    assert el.dose_equivalent_gain(curve, tpr=0.75, strength=2.0) == pytest.approx(0.5)
    assert el.dose_equivalent_gain(curve, tpr=0.25, strength=2.0) == pytest.approx(-0.5)
    assert el.dose_equivalent_gain(curve, tpr=1.0, strength=4.0) == 0.0  # saturated: no change, no gain
    assert el.dose_equivalent_strength(curve, 1.0) == 3.0  # (the smallest strength that gives it)
    noisy = pd.DataFrame({"strength": [1.0, 2.0, 3.0, 4.0], "tpr": [0.0, 0.3, 0.2, 0.6]})
    assert el.dose_equivalent_strength(noisy, 0.45) == pytest.approx(3.5)  # running max: 0.3 at 3
    peaked = pd.DataFrame({"strength": [1.0, 2.0, 3.0], "tpr": [0.1, 0.6, 0.2]})
    assert el.dose_equivalent_strength(peaked, 0.7) == math.inf
    assert math.isnan(el.dose_equivalent_strength(peaked, 0.05))
    with pytest.raises(ValueError, match="one TPR per strength"):
        el.dose_equivalent_strength(pd.concat([curve, curve]), 0.5)
    with pytest.raises(ValueError, match="columns"):
        el.dose_equivalent_strength(curve.rename(columns={"tpr": "rate"}), 0.5)


def test_paper_overlays_come_from_the_named_rows():
    left = el.paper_bias_layer_sweep()
    assert list(left["bias_layer"]) == list(range(-1, 62))
    assert (left["n_cells"] == 6).all() and (left["n_tpr"] == 6000).all()
    raw = pd.read_parquet(resources.reference(el.PAPER_FIG2))
    aggregate = raw[(raw["meta_layer"] == -1) & (raw["injection_layer"] == -1)]
    none = left[left["bias_layer"] == -1].iloc[0]
    assert none["tpr"] == pytest.approx(float(aggregate["detection_hit_rate"].iloc[0]), abs=1e-6)
    l20 = raw[
        (raw["meta_layer"] == 20) & raw["injection_layer"].isin([30, 40, 50]) & raw["strength"].isin([2, 4])
    ]
    assert left.set_index("bias_layer").loc[20, "tpr"] == pytest.approx(l20["detection_hit_rate"].mean())
    # the paper's text (+74.7 detection, +21.9 forced identification, +54.7 introspection, FPR 0) is exactly
    # bias layer 29 minus no bias over these six pooled cells
    l29 = left.set_index("bias_layer").loc[29]
    for rate in ("tpr", "forced_id", "introspection"):
        assert l29[rate] - none[rate] == pytest.approx(el.PAPER_TEXT[rate], abs=5e-4)
    assert l29["fpr"] == el.PAPER_TEXT["fpr_after"] == 0
    right = el.paper_bias_injection_sweep()
    assert sorted(right["arm"].unique()) == ["bias L20", "bias L29", "bias L40", "none"]
    cell = right[(right["injection_layer"] == 37)].set_index("arm")["tpr"]
    assert cell["none"] == pytest.approx(0.226) and cell["bias L29"] == pytest.approx(1.0)
    base = el.paper_default_baselines().set_index("source")["tpr"]
    assert base["fig1_metrics_cache"] == pytest.approx(0.411, abs=5e-4)
    assert base["fig3_metrics_cache (baseline arm)"] == pytest.approx(0.226)
    assert math.isnan(base["fig2_sweep_metrics_cache (meta_layer -1)"])


def test_train_or_load_reuses_only_an_identical_artifact(tiny, train_words, tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    first = el.train_or_load_bias(folder, tiny, train_words, layer=1, labels="injected", **QUICK)
    trained = []
    real = el._train
    monkeypatch.setattr(el, "_train", lambda *a, **k: trained.append(1) or real(*a, **k))
    again = el.train_or_load_bias(folder, tiny, train_words, layer=1, labels="injected", **QUICK)
    assert not trained and torch.equal(again.vectors, first.vectors)
    other = el.train_or_load_bias(
        folder, tiny, train_words, layer=1, labels="injected", **(QUICK | {"seed": 1})
    )
    assert trained == [1] and other.settings.seed == 1
    assert el.load_bias_vector(folder).settings.seed == 1
    with pytest.raises(TypeError, match="valid"):
        el.train_bias_vector(tiny, train_words, layer=1, labels="injected", learning_rate=0.1)


@pytest.mark.slow
def test_organism_quick_bias_raises_the_yes_gap_on_heldout_injections_only():
    """A --quick-sized bias (every injection "Yes") on the organism: held-out injected trials move toward
    "Yes" (logit gap, no sampling), controls stay "No", and the weights are untouched."""
    from mechintro.behaviour.trials import logit_scores

    model = load_model("organism", device="cpu")
    spec = spec_for(model)
    before = _weights_hash(model)
    art = el.train_bias_vector(
        model,
        training_concepts(),
        layer=spec.injection_layer,
        labels="injected",
        epochs=1,
        epoch_size=320,
        lr=1e-2,
        progress=False,
    )
    assert _weights_hash(model) == before
    concepts = heldout_concepts()[:20]
    vecs = concept_vectors(model, concepts, layer=spec.injection_layer)
    kw = dict(layer=spec.injection_layer, strength=spec.strength / 2, vectors=vecs, trials=[1, 2])
    plain = logit_scores(model, concepts, **kw)
    with el.bias_vector(model, art):
        biased = logit_scores(model, concepts, **kw)
    inj = plain["condition"] == "injection"
    moved = biased.loc[inj, "gap"] - plain.loc[inj, "gap"]  # paired: same concept, trial and vector
    assert (moved > 0).all() and moved.mean() > 0.2
    assert (biased.loc[~inj, "gap"] < 0).all()
