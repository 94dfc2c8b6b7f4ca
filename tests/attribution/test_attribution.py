"""Steering attribution: exact identities on a tiny random Gemma 3 in float64, checked against independent
plain computations (finite differences through ordinary forwards, the fundamental theorem, one run per row).

Float64 note: ``load_model(..., dtype=torch.float64)`` stores and multiplies in float64, but two steps
still round to float32: Gemma 3's RMSNorm (``x.float()``) and the bridge's attention softmax
(``softmax(..., dtype=torch.float32)``); and ``inject`` turns a Python-float strength into a float32 tensor.
That puts a ~1e-7 relative noise floor under every function value, so finite differences could only be
trusted to ~1e-5. Here the plain forwards pass float64 strength tensors, and the ``true_float64`` fixture
(tests/conftest.py) makes the norm and the softmax keep float64 inputs in float64 for this module (the same
formulas, restored afterwards). Then finite differences (fourth-order stencil, step 3e-3, truncation
~1e-11) match to a relative 1e-8, and the algebraic identities hold to 1e-10.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from mechintro.attribution.passes import run_pass, steering_attribution
from mechintro.attribution.result import SteeringAttribution
from mechintro.attribution.sites import DictionarySite
from mechintro.attribution.strengths import quadrature_weights, strength_grid
from mechintro.core.concepts import concept_vectors
from mechintro.core.hooks import capture, hooks_context
from mechintro.core.models import HookNames, load_model, spec_for, with_spec
from mechintro.core.prompts import trial_prompt
from mechintro.core.readout import yes_no_gap
from mechintro.core.steering import inject
from mechintro.core.transcoders import load_transcoders, replace_mlps
from mechintro.testing import save_random_transcoders

LAYER = 1
CONCEPTS = ["Bread", "Oceans"]
GRID = [0.0, 1.5, 3.0]
FD_STEP = 3e-3


@pytest.fixture(scope="module")
def m64(tiny_dir, true_float64):
    """The tiny Gemma 3 in float64, injecting at layer 1 (its own object: the spec change stays here)."""
    model = load_model(tiny_dir, device="cpu", dtype=torch.float64)
    with_spec(model, injection_layer=LAYER)
    return model


@pytest.fixture(scope="module")
def tc64(m64, tmp_path_factory):
    tcs = load_transcoders(m64, source=save_random_transcoders(tmp_path_factory.mktemp("tc64"), seed=3))
    return {layer: tc.to(torch.float64) for layer, tc in tcs.items()}


@pytest.fixture(scope="module")
def prompt(m64):
    return trial_prompt(m64, trial=1)


@pytest.fixture(scope="module")
def vecs(m64):
    return concept_vectors(m64, CONCEPTS, layer=LAYER).double()


@pytest.fixture(scope="module")
def att(m64, tc64, vecs):
    return steering_attribution(m64, tc64, CONCEPTS, strengths=GRID, vectors=vecs, batch_size=4)


def random_sae(d_in: int, *, arch: str = "jumprelu", seed: int = 0, hook: str = "", z: bool = False):
    """A sae-lens SAE with random float64 weights (``SAE.from_dict`` plus random tensors)."""
    from sae_lens import SAE

    cfg = {
        "architecture": arch,
        "d_in": d_in,
        "d_sae": 80,
        "dtype": "float64",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "metadata": {"hook_name": hook},
    }
    if z:
        cfg["reshape_activations"] = "hook_z"
    sae = SAE.from_dict(cfg)
    g = torch.Generator().manual_seed(seed)
    state = {
        k: torch.randn(v.shape, generator=g, dtype=torch.float64) * 0.3 for k, v in sae.state_dict().items()
    }
    if "threshold" in state:
        state["threshold"] = state["threshold"].abs() * 0.5
    sae.load_state_dict(state)
    return sae.eval()


def metric_at(model, vector, prompt, alpha, edits=()):
    """L(α) from a plain forward (no attribution machinery), with extra hooks ``edits``."""
    alpha = torch.tensor(alpha, dtype=torch.float64)
    with torch.no_grad(), inject(model, vector, layer=LAYER, strength=alpha, start=prompt.injection_start):
        with hooks_context(model, list(edits)):
            return float(yes_no_gap(model(prompt.tokens[None])[0, -1], spec_for(model)))


def derivative(f, x, h=FD_STEP):
    """Fourth-order central difference."""
    return (-f(x + 2 * h) + 8 * f(x + h) - 8 * f(x - h) + f(x - 2 * h)) / (12 * h)


def top_rows(att, strength, n=6):
    rows = att.features[(att.features["concept"] == "Bread") & (att.features["strength"] == strength)]
    return rows.reindex(rows["sa"].abs().sort_values(ascending=False).index).head(n)


# ----------------------------------------------------------------------------------------------- GA and SG


def test_sg_equals_finite_differences_of_the_pre_activation(m64, tc64, vecs, prompt, att):
    rows = top_rows(att, 1.5)
    assert len(rows) >= 4 and rows["layer"].nunique() >= 2

    def pre(alpha, layer, pos, index):
        name = HookNames.transcoder_in(layer)
        alpha = torch.tensor(alpha, dtype=torch.float64)
        with torch.no_grad(), inject(m64, vecs[0], layer=LAYER, strength=alpha, start=prompt.injection_start):
            with capture(m64, [name], positions=[pos]) as acts:
                m64(prompt.tokens[None])
        tc = tc64[layer]
        return float(acts[name][0, 0] @ tc.W_enc[:, index].detach() + tc.b_enc[index].detach())

    for r in rows.itertuples():
        numeric = derivative(lambda a, r=r: pre(a, r.layer, r.position, r.feature), 1.5)
        assert r.sg == pytest.approx(numeric, rel=1e-8, abs=1e-9), (r.layer, r.feature)


def test_ga_equals_finite_differences_of_the_metric_under_a_decoder_nudge(m64, tc64, vecs, prompt, att):
    """GA(f, t) = the change of L per unit of ε when ε · W_dec[f] is added at f's output site, position t."""
    for r in top_rows(att, 1.5).itertuples():
        direction = tc64[r.layer].W_dec[r.feature].detach()

        def nudged(eps, r=r, direction=direction):
            def hook(y, hook=None):
                y = y.clone()
                y[:, r.position] += eps * direction
                return y

            return metric_at(m64, vecs[0], prompt, 1.5, [(HookNames.transcoder_out(r.layer), hook)])

        assert r.ga == pytest.approx(derivative(nudged, 0.0), rel=1e-8, abs=1e-9), (r.layer, r.feature)


# ------------------------------------------------------------------------------------------ the four terms


def test_with_every_mlp_replaced_error_vanishes_and_features_plus_skip_is_total(m64, tc64, vecs):
    with replace_mlps(m64, tc64):
        rep = steering_attribution(m64, tc64, CONCEPTS, strengths=GRID, vectors=vecs)
    r = rep.remainders
    assert r["total"].abs().max() > 1e-3, "the check needs non-trivial totals"
    assert r["error"].abs().max() <= 1e-12
    np.testing.assert_allclose(r["features"] + r["skip"], r["total"], rtol=0, atol=1e-10)
    assert r["skip"].abs().max() > 1e-4, "the affine skip path carries part of the total"
    np.testing.assert_allclose(r["sa_remainder"], r["total"] - r["features"], rtol=0, atol=1e-15)


def test_without_replacement_the_error_is_what_the_transcoder_misses(m64, tc64, att):
    r = att.remainders
    np.testing.assert_allclose(r["features"] + r["skip"] + r["error"], r["total"], rtol=0, atol=1e-10)
    assert r["error"].abs().max() > 0.05 * r["total"].abs().max(), "random transcoders miss a lot: reported"
    # the frame sums the features frame exactly
    f = att.features.groupby(["concept", "strength", "dictionary", "layer", "position"])["sa"].sum()
    merged = r.set_index(["concept", "strength", "dictionary", "layer", "position"])["features"]
    np.testing.assert_allclose(merged.loc[f.index].to_numpy(), f.to_numpy(), rtol=0, atol=1e-14)


def test_forward_and_reverse_mode_agree_with_each_other_and_with_finite_differences(m64, vecs, prompt, att):
    m = att.metric
    np.testing.assert_allclose(m["slope"], m["slope_reverse"], rtol=1e-10, atol=1e-14)
    for row in m[m["concept"] == "Bread"].itertuples():
        numeric = derivative(lambda a: metric_at(m64, vecs[0], prompt, a), row.strength)
        assert row.slope == pytest.approx(numeric, rel=1e-8)
        assert row.value == pytest.approx(metric_at(m64, vecs[0], prompt, row.strength), abs=1e-12)


def test_positions_before_the_injection_start_have_exactly_zero_tangents(m64, tc64, vecs, prompt):
    from mechintro.attribution.metric import resolve_metric
    from mechintro.attribution.passes import Rows
    from mechintro.attribution.sites import Dictionaries

    dicts = Dictionaries(m64, tc64)
    sites = [DictionarySite("transcoder", 2), DictionarySite("transcoder", 3)]
    metric = resolve_metric(m64).at(len(prompt.tokens), prompt.injection_start)
    rows = Rows(vectors=vecs, strengths=[1.0, 2.5], metrics=[metric] * 2)
    got = run_pass(
        m64,
        prompt,
        rows,
        layer=LAYER,
        sites=sites,
        dicts=dicts,
        tangent="alpha",
        backward=True,
        prefix_cache=False,
        read_from=0,
    )
    start = prompt.injection_start
    assert got.positions[0] == 0
    for site in sites:
        assert torch.equal(got.x_dot[site][:, :start], torch.zeros_like(got.x_dot[site][:, :start]))
        assert torch.equal(got.y_dot[site][:, :start], torch.zeros_like(got.y_dot[site][:, :start]))
        assert got.x_dot[site][:, start].abs().max() > 1e-3, "the injection moves the start position"
    # the metric does depend on earlier positions (through layer 3's attention), so they are not skipped
    # because nothing flows there: only the tangent is zero
    assert got.grad[sites[0]][:, :start].abs().max() > 1e-6
    np.testing.assert_allclose(got.slope.numpy(), got.reverse.numpy(), rtol=1e-10)


def test_frames_hold_only_positions_from_the_injection_start(att, prompt):
    for frame in (att.features, att.remainders):
        assert frame["position"].min() == prompt.injection_start
        assert frame["position"].max() == len(prompt.tokens) - 1
    assert (
        att.remainders.groupby(["concept", "strength", "layer"])
        .size()
        .eq(len(prompt.tokens) - prompt.injection_start)
        .all()
    )


# ----------------------------------------------------------------------------------------------- SAEs


@pytest.mark.parametrize("layer", [LAYER, 2, 3])
def test_a_resid_post_sae_is_an_exact_cut(m64, vecs, layer):
    """Everything the injection does to L passes through resid_post of any later layer: Σ_t total = dL/dα."""
    sae = random_sae(64, arch="standard", seed=layer)
    cut = steering_attribution(
        m64, {}, ["Bread"], saes={("resid_post", layer): sae}, strengths=GRID, vectors=vecs[:1]
    )
    totals = cut.remainders.groupby("strength")["total"].sum()
    slopes = cut.metric.set_index("strength")["slope"]
    np.testing.assert_allclose(totals.loc[slopes.index].to_numpy(), slopes.to_numpy(), rtol=1e-10, atol=1e-13)
    r = cut.remainders
    assert (r["skip"] == 0).all()
    np.testing.assert_allclose(r["features"] + r["error"], r["total"], rtol=0, atol=1e-12)


def test_an_attention_sae_reads_and_writes_the_concatenated_heads(m64, hf_tiny, vecs, prompt):
    """attn_z is the input of o_proj (checked against plain HF); an SAE there obeys the same identities, and
    its GA is the metric's finite-difference response to its decoder row added at that hook."""
    from tests.conftest import hf_capture  # noqa: F401 (conftest helper, for the same plain-HF run)

    tokens = prompt.tokens[None]
    seen = {}
    handle = hf_tiny.model.layers[2].self_attn.o_proj.register_forward_pre_hook(
        lambda mod, args: seen.__setitem__("z", args[0].detach())
    )
    try:
        with torch.no_grad():
            hf_tiny(tokens)
    finally:
        handle.remove()
    m32 = load_model(hf_tiny.config._name_or_path, device="cpu")
    with torch.no_grad(), capture(m32, HookNames.attn_z(2)) as acts:
        m32(tokens)
    z = acts[HookNames.attn_z(2)]
    assert z.shape == (1, len(prompt.tokens), 4, 16)
    torch.testing.assert_close(z.flatten(-2), seen["z"], rtol=1e-5, atol=1e-5)

    for reshaping in (True, False):
        sae = random_sae(64, seed=5, hook="blocks.2.attn.hook_z", z=reshaping)
        res = steering_attribution(m64, {}, ["Bread"], saes=[sae], strengths=GRID, vectors=vecs[:1])
        r = res.remainders
        assert set(r["dictionary"]) == {"attn_z"} and r["total"].abs().max() > 1e-5
        np.testing.assert_allclose(r["features"] + r["error"], r["total"], rtol=0, atol=1e-12)
        row = res.features[res.features["strength"] == 1.5].sort_values("sa", key=abs).iloc[-1]
        direction = sae.W_dec[int(row["feature"])].detach().reshape(4, 16)

        def nudged(eps, row=row, direction=direction):
            def hook(zz, hook=None):
                zz = zz.clone()
                zz[:, int(row["position"])] += eps * direction
                return zz

            return metric_at(m64, vecs[0], prompt, 1.5, [(HookNames.attn_z(2), hook)])

        assert row["ga"] == pytest.approx(derivative(nudged, 0.0), rel=1e-8, abs=1e-10)


# ----------------------------------------------------------------------------------------------- strength


def test_the_trapezoid_integral_of_the_slope_converges_to_the_metric_change(m64, tc64, vecs, prompt):
    top = spec_for(m64).strength
    change = metric_at(m64, vecs[0], prompt, top) - metric_at(m64, vecs[0], prompt, 0.0)
    grid = strength_grid(m64, 33)
    res = steering_attribution(m64, {3: tc64[3]}, ["Bread"], strengths=grid, vectors=vecs[:1], batch_size=33)
    slope = res.metric.set_index("strength")["slope"]
    errors = {}
    for rule in ("trapezoid", "simpson"):
        for n in (5, 9, 17, 33):
            sub = grid[:: (len(grid) - 1) // (n - 1)]
            assert len(sub) == n and sub[-1] == top
            w = quadrature_weights(sub, rule)
            errors[rule, n] = float(w @ slope.loc[list(sub)].to_numpy()) - change
    ratios = [errors["trapezoid", n] / errors["trapezoid", 2 * n - 1] for n in (5, 9, 17)]
    assert all(3.8 < r < 4.2 for r in ratios), (
        ratios
    )  # second order: 4x per doubling (measured 4.02, 4.00, 4.00)
    assert abs(errors["trapezoid", 33]) < 1e-3 * abs(change)
    simpson = [errors["simpson", n] / errors["simpson", 2 * n - 1] for n in (9, 17)]
    assert all(r > 12 for r in simpson), simpson  # fourth order: ~16x (measured 15.4, 15.9)


def test_quadrature_weights():
    x = [0.0, 0.5, 1.5, 2.0, 4.0]
    f = np.sin(np.asarray(x))
    assert quadrature_weights(x) @ f == pytest.approx(np.trapezoid(f, x), abs=1e-15)
    h = 0.25
    np.testing.assert_allclose(
        quadrature_weights([0, 0.25, 0.5, 0.75, 1.0], "simpson"),
        h / 3 * np.array([1, 4, 2, 4, 1]),
        atol=1e-15,
    )
    cubic = np.linspace(0, 2, 7) ** 3
    assert quadrature_weights(np.linspace(0, 2, 7), "simpson") @ cubic == pytest.approx(4.0, abs=1e-12)


def test_strengths_are_kept_exactly(m64, tc64, vecs):
    grid = [0.0, 0.1, 1 / 3, 0.7]
    res = steering_attribution(m64, {3: tc64[3]}, ["Bread"], strengths=grid, vectors=vecs[:1])
    for frame in (res.features, res.remainders, res.metric):
        assert set(frame["strength"]) <= set(grid) and 1 / 3 in set(frame["strength"])
    assert res.settings.strengths == tuple(grid)
    assert strength_grid(m64, 21)[-1] == spec_for(m64).strength and len(strength_grid(m64)) == 21


def test_batched_rows_equal_one_run_per_concept_and_strength(m64, tc64, vecs, att):
    singles = []
    for c, concept in enumerate(CONCEPTS):
        for s in GRID:
            one = steering_attribution(
                m64,
                tc64,
                [concept],
                strengths=[s, s + 1.0],
                vectors=vecs[c : c + 1],
                batch_size=1,
                prefix_cache=False,
            )
            singles.append(one)
    key = ["concept", "strength", "dictionary", "layer", "position", "feature"]
    for name, cols in (
        ("features", ["activation", "ga", "sg", "sa"]),
        ("remainders", ["total", "skip", "error"]),
    ):
        alone = pd.concat([getattr(o, name) for o in singles]).query("strength in @GRID")
        batched = getattr(att, name)
        k = key if name == "features" else key[:-1]
        merged = batched.merge(alone, on=k, suffixes=("", "_one"), how="outer", indicator=True)
        assert (merged["_merge"] == "both").all(), "the same active features"
        for c in cols:
            np.testing.assert_allclose(merged[c], merged[f"{c}_one"], rtol=1e-9, atol=1e-13)


def test_lazy_transcoders_are_used_one_layer_at_a_time(m64, tc64, vecs, att, one_layer_at_a_time):
    """With a lazy mapping that keeps one layer, no other layer's dictionary is still alive (referenced by
    anyone) when the next one loads: peak memory holds one dictionary."""
    lazy, seen = one_layer_at_a_time(tc64)
    res = steering_attribution(m64, lazy, CONCEPTS, strengths=GRID, vectors=vecs, batch_size=4)
    # each of 2 chunks reads layers 2 and 3, and the first pass loads each once more to learn the site it
    # records (a lazy mapping remembers it after that)
    assert len(seen) == 2 * 2 + 2
    assert lazy.known_hooks(2) == (HookNames.transcoder_in(2), HookNames.transcoder_out(2))
    assert max(seen) <= 1
    pd.testing.assert_frame_equal(res.features, att.features)


# ----------------------------------------------------------------------------------------------- options


def test_token_pair_and_feature_metrics(m64, tc64, vecs, prompt):
    tok = m64.tokenizer
    yes, no = tok.convert_tokens_to_ids("Yes"), tok.convert_tokens_to_ids("No")
    pair = steering_attribution(m64, tc64, ["Bread"], strengths=GRID, vectors=vecs[:1], metric=("Yes", "No"))
    with torch.no_grad(), inject(m64, vecs[0], layer=LAYER, strength=1.5, start=prompt.injection_start):
        logits = m64(prompt.tokens[None])[0, -1]
    value = pair.metric.set_index("strength").loc[1.5, "value"]
    assert value == pytest.approx(float(logits[yes] - logits[no]), abs=1e-12)
    np.testing.assert_allclose(pair.metric["slope"], pair.metric["slope_reverse"], rtol=1e-10)

    feat = steering_attribution(m64, tc64, ["Bread"], strengths=GRID, vectors=vecs[:1], metric="L3 F5")
    assert set(feat.features["layer"]) == {2}, "only dictionaries before the metric's feature"
    name = HookNames.transcoder_in(3)
    with torch.no_grad(), inject(m64, vecs[0], layer=LAYER, strength=1.5, start=prompt.injection_start):
        with capture(m64, [name], positions="last") as acts:
            m64(prompt.tokens[None])
    tc = tc64[3]
    by_hand = float(acts[name][0, 0] @ tc.W_enc[:, 5].detach() + tc.b_enc[5].detach())
    assert feat.metric.set_index("strength").loc[1.5, "value"] == pytest.approx(by_hand, abs=1e-12)
    np.testing.assert_allclose(feat.metric["slope"], feat.metric["slope_reverse"], rtol=1e-10)


def test_isa_and_layer_shares(att):
    w = dict(zip(GRID, quadrature_weights(GRID), strict=True))
    isa = att.isa()
    f = att.features
    top = isa.iloc[0]
    rows = f[
        (f["concept"] == top["concept"])
        & (f["layer"] == top["layer"])
        & (f["position"] == top["position"])
        & (f["feature"] == top["feature"])
    ]
    assert top["isa"] == pytest.approx(
        sum(w[s] * sa for s, sa in zip(rows["strength"], rows["sa"], strict=True))
    )
    assert top["n_active"] == len(rows)
    shares = att.layer_shares()
    r = att.remainders
    one = shares[(shares["concept"] == "Bread") & (shares["layer"] == 2)].iloc[0]
    part = r[(r["concept"] == "Bread") & (r["layer"] == 2)]
    total = sum(w[s] * t for s, t in zip(part["strength"], part["total"], strict=True))
    assert one["total"] == pytest.approx(total, rel=1e-12)
    assert one["kept_isa"] == pytest.approx(one["features"], rel=1e-10)
    kept = isa[(isa["concept"] == "Bread")].head(3)
    some = att.layer_shares(kept=kept)
    some_b = some[some["concept"] == "Bread"].set_index("layer")
    for layer, part in kept.groupby("layer"):
        assert some_b.loc[layer, "kept_isa"] == pytest.approx(part["isa"].sum(), rel=1e-12)
        assert some_b.loc[layer, "explained"] == pytest.approx(part["isa"].sum() / some_b.loc[layer, "total"])
    top = att.top(2)
    for concept, part in isa.groupby("concept"):
        want = part.loc[part["isa"].abs().sort_values(ascending=False).index[:2]]
        got = top[top["concept"] == concept]
        assert (
            got[["feature", "layer", "position"]].values.tolist()
            == want[["feature", "layer", "position"]].values.tolist()
        )
    assert "<b>SteeringAttribution</b>" in att._repr_html_()


def test_parquet_round_trip(att, tmp_path):
    att.to_parquet(tmp_path)
    back = SteeringAttribution.from_parquet(tmp_path)
    for name in ("features", "remainders", "metric"):
        pd.testing.assert_frame_equal(getattr(back, name), getattr(att, name))
    assert back.settings == att.settings
    torch.testing.assert_close(back.vectors, att.vectors)


def test_bad_inputs_name_the_valid_choices(m64, tc64, vecs):
    kw = dict(vectors=vecs[:1], strengths=GRID)
    run = lambda **k: steering_attribution(m64, tc64, ["Bread"], **(kw | k))  # noqa: E731
    with pytest.raises(ValueError, match="valid: \\['trapezoid', 'simpson'\\]"):
        run(integration="midpoint")
    with pytest.raises(ValueError, match="strictly increasing"):
        run(strengths=[0.0, 2.0, 1.0])
    with pytest.raises(ValueError, match="finite"):
        run(strengths=[0.0, float("nan")])
    with pytest.raises(ValueError, match="at least 2"):
        run(strengths=[1.0])
    with pytest.raises(ValueError, match="valid layers are 0..3"):
        run(layer=7)
    with pytest.raises(ValueError, match="valid: None"):
        run(metric=42)
    with pytest.raises(ValueError, match="not one"):
        run(metric=("Yes, I detect", "No"))
    with pytest.raises(ValueError, match="has no dictionary"):
        steering_attribution(m64, {3: tc64[3]}, ["Bread"], metric="L2 F3", **kw)
    with pytest.raises(ValueError, match="not after the injection"):
        run(metric="L2 F3", layer=2)
    with pytest.raises(ValueError, match="outside 0..95"):
        run(metric="L3 F400")
    with pytest.raises(ValueError, match="no dictionary between"):
        steering_attribution(m64, {0: tc64[0], 1: tc64[1]}, ["Bread"], **kw)
    with pytest.raises(ValueError, match="SAE sites are resid_post"):
        run(saes={"blocks.2.hook_attn_out": random_sae(64)})
    with pytest.raises(ValueError, match="that site is 64 wide"):
        run(saes={("resid_post", 2): random_sae(32)})
    with pytest.raises(ValueError, match="batch_size"):
        run(batch_size=0)
    with pytest.raises(ValueError, match="d_model is 64"):
        run(vectors=torch.zeros(1, 32))
    with pytest.raises(ValueError, match="no dictionaries given"):
        steering_attribution(m64, {}, ["Bread"], **kw)
    from sae_lens import SAE

    topk = SAE.from_dict(
        {
            "architecture": "topk",
            "d_in": 64,
            "d_sae": 8,
            "k": 2,
            "dtype": "float64",
            "device": "cpu",
            "metadata": {},
        }
    )
    with pytest.raises(ValueError, match="supports \\['standard'"):
        run(saes={("resid_post", 2): topk})
