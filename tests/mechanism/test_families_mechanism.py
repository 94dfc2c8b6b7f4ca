"""Feature interventions, MLP replacement and the mechanism analyses on every family with mechanism support,
against plain Hugging Face with hand-written hooks (tests/hf_reference.py).

Each family is a tiny random checkpoint (``save_tiny``) with random JumpReLU skip transcoders in Gemma
Scope 2's raw format (``save_random_transcoders``) wired by ``load_transcoders(model, source=folder)``. The
reference reads the transcoder input at ``model.layers[L].mlp``'s input and writes at the output of the
module the family's description names for the MLP sublayer's update (Gemma 3 / 4 and OLMo 2 / 3: the
post-feedforward norm; Qwen3 / Llama: the MLP itself), with the transcoder applied from its raw tensors.
Float32: observed differences are float32 rounding.
"""

from __future__ import annotations

import pytest
import torch
from hf_reference import RawTranscoder, feature_edit, greedy, hooked, injection, replacement
from transformers import AutoModelForCausalLM

from mechintro.core.families import FAMILIES, family_by_name
from mechintro.core.models import load_model, spec_for, with_spec
from mechintro.core.prompts import trial_prompt
from mechintro.core.steering import inject
from mechintro.core.transcoders import load_transcoders, replace_mlps
from mechintro.mechanism.interventions import intervene, read_features
from mechintro.testing import save_random_transcoders, save_tiny

MECHANISM = [f.name for f in FAMILIES if f.support == "mechanism"]
INJ, LAYER = 1, 2
SAME = {"rtol": 0.0, "atol": 1e-4}
"""Float32, the same arithmetic in another order (observed ~1e-6)."""


@pytest.fixture(scope="module", params=MECHANISM)
def fam(request, tmp_path_factory):
    """(family name, model, plain HF model, wired transcoders, raw transcoders, transcoder folder)."""
    name = request.param
    folder = save_tiny(name, tmp_path_factory.mktemp(f"tiny_{name}"))
    model = load_model(folder, device="cpu")
    with_spec(model, injection_layer=INJ)
    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    tc_dir = save_random_transcoders(tmp_path_factory.mktemp(f"tc_{name}"), seed=3)
    tcs = load_transcoders(model, source=tc_dir)
    raw = {layer: RawTranscoder.load(tc_dir, layer) for layer in tcs}
    return name, model, hf, tcs, raw


def out_module(name: str, layer: int) -> str:
    """The HF module whose output is the MLP sublayer's update of the residual (written in the test, not read
    from mechintro: the post-feedforward norm where the family has one after the MLP)."""
    post = {"gemma3", "gemma4_text", "olmo2", "olmo3"}
    return f"model.layers.{layer}." + ("post_feedforward_layernorm" if name in post else "mlp")


def hf_logits(hf, tokens, hooks=()):
    with torch.no_grad(), hooked(hf, hooks):
        return hf(input_ids=tokens).logits


def test_the_written_reference_site_is_the_familys_description(fam):
    name = fam[0]
    assert family_by_name(name).site("mlp_out").module_name(LAYER) == out_module(name, LAYER)


def test_mlp_replacement_equals_hand_written_hf_hooks(fam):
    name, model, hf, tcs, raw = fam
    p = trial_prompt(model, trial=1)
    tokens = p.tokens[None]
    with torch.no_grad(), replace_mlps(model, {LAYER: tcs[LAYER], 3: tcs[3]}):
        ours = model(tokens, return_type="logits")
    hooks = replacement(LAYER, raw[LAYER], out_module(name, LAYER)) + replacement(
        3, raw[3], out_module(name, 3)
    )
    ref = hf_logits(hf, tokens, hooks)
    torch.testing.assert_close(ours, ref, **SAME, msg=lambda m: f"{name}: {m}")
    assert not torch.allclose(ref, hf_logits(hf, tokens), atol=1e-3)


def test_feature_reads_and_interventions_equal_hand_written_hf_hooks(fam):
    """read_features (control and steered) is the raw encoder at HF's ``layers[L].mlp`` input; ablating
    (target 0 at every position), clamping (target 6 from the injection start) and patching (the steered
    activation at the last position) equal the hand-written edit at the family's output module."""
    name, model, hf, tcs, raw = fam
    p = trial_prompt(model, trial=1)
    tokens, seq = p.tokens[None], len(p.tokens)
    vec = torch.randn(int(model.cfg.d_model), generator=torch.Generator().manual_seed(7)) * 4
    inj_hook = injection(INJ, vec, 3.0, p.injection_start)
    seen: dict = {}
    read = [(f"model.layers.{LAYER}.mlp", "input", lambda x: seen.__setitem__("x", x))]
    hf_logits(hf, tokens, read)
    control_acts = raw[LAYER].acts(seen["x"][0, -1])
    index = int(control_acts.argmax())
    assert control_acts[index] > 0
    feature = f"L{LAYER} F{index}"
    control = read_features(model, tcs, [feature], tokens)
    torch.testing.assert_close(control[0, 0], control_acts[index], **SAME)
    hf_logits(hf, tokens, [inj_hook, *read])
    steered_hf = raw[LAYER].acts(seen["x"][0, -1])[index]
    with inject(model, vec, layer=INJ, strength=3.0, start=p.injection_start):
        steered = read_features(model, tcs, [feature], tokens)
    torch.testing.assert_close(steered[0, 0], steered_hf, **SAME)
    assert abs(float(steered_hf - control_acts[index])) > 1e-4, "the injection must move the feature"

    cases = [
        ("ablate", 0.0, "all", 0),
        ("clamp", 6.0, "from_start", p.injection_start),
        ("patch", float(steered_hf), "last", seq - 1),
    ]
    for what, target, positions, from_pos in cases:
        kw = {"start": p.injection_start} if positions == "from_start" else {}
        with torch.no_grad(), intervene(model, tcs, [feature], target=target, positions=positions, **kw):
            ours = model(tokens, return_type="logits")
        edit = feature_edit(
            LAYER, raw[LAYER], out_module(name, LAYER), index=index, target=target, from_pos=from_pos
        )
        ref = hf_logits(hf, tokens, edit)
        torch.testing.assert_close(ours, ref, **SAME, msg=lambda m, w=what: f"{name} {w}: {m}")
        assert not torch.allclose(ref[0, -1], hf_logits(hf, tokens)[0, -1], atol=1e-4), what


@pytest.mark.parametrize("edit", ["replace", "clamp"])
def test_run_trials_on_the_fast_path_honours_the_familys_transcoder_sites(fam, edit):
    """run_trials under an MLP replacement (shared prefix on) or a feature clamp (every position), on the
    fast path: the tokens of plain HF ``generate`` with the injection and the edit as hand-written hooks
    (OLMo's ``mlp.hook_in``, Qwen / Llama's ``ln2.hook_out``, Gemma's sandwich sites)."""
    from mechintro.behaviour.judges import RuleJudge
    from mechintro.behaviour.trials import run_trials
    from mechintro.core.fastpath import choose_path
    from mechintro.core.sampling import can_share_prefix, stop_ids

    name, model, hf, tcs, raw = fam
    concepts, n = ["Bread", "Oceans"], 4
    vectors = torch.randn(2, int(model.cfg.d_model), generator=torch.Generator().manual_seed(8)) * 4
    if edit == "replace":
        ctx = replace_mlps(model, {LAYER: tcs[LAYER]})
    else:
        ctx = intervene(model, tcs, [f"L{LAYER} F5"], target=8.0, positions="all")
    with ctx:
        assert choose_path(model)[0] == "hf", name
        assert can_share_prefix(model) == (edit == "replace")
        df = run_trials(
            model,
            concepts,
            layer=INJ,
            strength=3.0,
            n_trials=1,
            judge=RuleJudge(),
            vectors=vectors,
            max_new_tokens=n,
            temperature=0.0,
            batch_size=4,
            progress=False,
        )
    assert len(df) == 4
    unedited = 0
    for row in df.itertuples():
        p = trial_prompt(model, trial=int(row.trial))

        def hooks(edited: bool, p=p, row=row) -> list:
            out = []
            if row.condition == "injection":
                out.append(injection(INJ, vectors[concepts.index(row.concept)], 3.0, p.injection_start))
            if edited and edit == "replace":
                out += replacement(LAYER, raw[LAYER], out_module(name, LAYER))
            elif edited:
                out += feature_edit(LAYER, raw[LAYER], out_module(name, LAYER), index=5, target=8.0)
            return out

        tokens, _ = greedy(hf, p.tokens, hooks=hooks(True), max_new_tokens=n, stop=stop_ids(model))
        text = model.tokenizer.decode(tokens.tolist(), skip_special_tokens=True).strip()
        assert (row.response, row.n_new_tokens) == (text, len(tokens)), (name, edit, row.condition)
        plain, _ = greedy(hf, p.tokens, hooks=hooks(False), max_new_tokens=n, stop=stop_ids(model))
        unedited += not torch.equal(plain, tokens)
    assert unedited >= 1, f"{name} {edit}: the edit must change some response"


# ------------------------------------------------------------------------------- the analyses, end to end


def hf_gap(model, logits):
    from mechintro.core.readout import yes_no_gap

    return float(yes_no_gap(logits[0, -1], spec_for(model)))


def test_component_patching_rows_equal_plain_hf(fam):
    """Ablating (steered run, the MLP update from the start overwritten by the unsteered run's) and patching
    (the reverse) one layer's MLP: the gaps of hand-written HF runs; the baselines too."""
    from mechintro.mechanism.patching import PatchingConfig, component_patching

    name, model, hf, _, _ = fam
    vec = torch.randn(1, int(model.cfg.d_model), generator=torch.Generator().manual_seed(9)) * 8
    cfg = PatchingConfig(
        layers=(LAYER,),
        components=("mlp",),
        experiments=("ablation", "patching"),
        strength=3.0,
        injection_layer=INJ,
        batch_size=4,
    )
    df = component_patching(model, ["Bread"], vectors=vec, config=cfg, progress=False)
    p = trial_prompt(model, trial=cfg.trials[0])
    tokens, start = p.tokens[None], p.injection_start
    site = out_module(name, LAYER)
    stored: dict = {}

    def keep(key):
        return [(site, "output", lambda y: stored.__setitem__(key, y.clone()))]

    def put(key):
        def fn(y):
            y = y.clone()
            y[:, start:] = stored[key][:, start:]
            return y

        return [(site, "output", fn)]

    unsteered = hf_gap(model, hf_logits(hf, tokens, keep("clean")))
    steered = hf_gap(model, hf_logits(hf, tokens, [injection(INJ, vec[0], 3.0, start), *keep("steered")]))
    ablated = hf_gap(model, hf_logits(hf, tokens, [injection(INJ, vec[0], 3.0, start), *put("clean")]))
    patched = hf_gap(model, hf_logits(hf, tokens, put("steered")))
    got = df.set_index(["experiment", "kind"])["value"]
    assert got["ablation", "steered"] == pytest.approx(steered, abs=2e-5)
    assert got["ablation", "unsteered"] == pytest.approx(unsteered, abs=2e-5)
    assert got["ablation", "intervention"] == pytest.approx(ablated, abs=2e-5)
    assert got["patching", "intervention"] == pytest.approx(patched, abs=2e-5)
    assert abs(patched - unsteered) > 1e-3, (
        name
    )  # the patched MLP update moves the gap well beyond the tolerance
    diff = (stored["steered"] - stored["clean"])[:, start:].abs().max()
    assert diff > 1e-2, (
        name
    )  # what ablation and patching swap does differ (Qwen / Llama: little effect on the gap)


@pytest.fixture(scope="module")
def grid(fam):
    from mechintro.mechanism.features import feature_grid

    name, model, hf, tcs, raw = fam
    vecs = torch.randn(2, int(model.cfg.d_model), generator=torch.Generator().manual_seed(10)) * 4
    g = feature_grid(
        model, tcs, ["Bread", "Oceans"], vectors=vecs, strengths=(0.0, 2.0, 4.0), batch_size=4, progress=False
    )
    return g, vecs


def hf_acts(hf, raw, layer, tokens, hooks=()):
    """The raw transcoder's activations at ``layers[layer].mlp``'s input, last position, in a plain HF run."""
    seen: dict = {}
    hf_logits(
        hf, tokens, [*hooks, (f"model.layers.{layer}.mlp", "input", lambda x: seen.__setitem__("x", x))]
    )
    return raw[layer].acts(seen["x"][0, -1])


def test_feature_grid_equals_the_raw_encoder_on_plain_hf(fam, grid):
    name, model, hf, _, raw = fam
    g, vecs = grid
    p = trial_prompt(model, trial=g.trial)
    assert g.layers == [0, 1, 2, 3] and g.injection_layer == INJ
    for c in range(2):
        for s, strength in enumerate(g.strengths):
            for layer in (LAYER, 3):
                hooks = [
                    injection(INJ, vecs[c], strength, p.injection_start)
                ]  # counts positions: one per run
                ref = hf_acts(hf, raw, layer, p.tokens[None], hooks)
                torch.testing.assert_close(g.dense(layer)[c, s], ref, **SAME, msg=lambda m: f"{name}: {m}")
    assert not torch.allclose(g.dense(3)[:, 0], g.dense(3)[:, 2])


def test_find_gates_dla_is_the_familys_own_unembedding(fam, grid):
    """DLA weights use the family's (untied, except Gemma 3's) unembedding: HF's ``lm_head``."""
    from mechintro.mechanism.features import find_gates

    name, model, hf, _, raw = fam
    gates = find_gates(model, fam[3], grid[0], k=4)
    assert 1 <= len(gates) <= 4 and (gates["dla_score"] < 0).all() and (gates["layer"] > INJ).all()
    w_u = hf.lm_head.weight.detach()
    spec = spec_for(model)
    direction = w_u[list(spec.yes_ids)].mean(0) - w_u[list(spec.no_ids)].mean(0)
    for row in gates.itertuples():
        w = raw[row.layer].p["w_dec"][row.index]
        assert row.dla_weight == pytest.approx(float(w / w.norm() @ direction), rel=1e-4, abs=1e-6), name


def test_carriers_and_gate_curves_equal_plain_hf(fam, grid):
    """Carriers of a layer-3 gate: attribution = the raw virtual weight x the grid's activation; the gate
    curves' ends (k = 0) and the one-gate ablation: hand-written HF runs."""
    from mechintro.mechanism.curves import gate_curves_logit
    from mechintro.mechanism.features import find_evidence_carriers

    name, model, hf, tcs, raw = fam
    g, vecs = grid
    p = trial_prompt(model, trial=g.trial)
    tokens, seq = p.tokens[None], len(p.tokens)
    control = hf_acts(hf, raw, 3, tokens)
    gate = int(control.argmax())
    carriers = find_evidence_carriers(model, tcs, g, f"L3 F{gate}", criteria="sign")
    assert len(carriers) > 0 and set(carriers["layer"]) == {LAYER}
    default = g.strength_index(g.default_strength)
    for row in carriers.head(5).itertuples():
        vw = float(raw[LAYER].p["w_dec"][row.index] @ raw[3].p["w_enc"][:, gate])
        act = float(g.dense(LAYER)[:, default, row.index].mean())
        assert row.virtual_weight == pytest.approx(vw, rel=1e-4, abs=1e-6)
        assert row.attribution == pytest.approx(vw * act, rel=1e-4, abs=1e-6)

    df = gate_curves_logit(
        model,
        tcs,
        [f"L3 F{gate}"],
        ["Bread"],
        vectors=vecs[:1],
        ks=[0, 1],
        experiments=("ablation", "patching"),
        strength=4.0,
        injection_layer=INJ,
        trial=g.trial,
        progress=False,
    )
    by = df.set_index(["experiment", "k"])["value"]
    steer = injection(INJ, vecs[0], 4.0, p.injection_start)
    assert by["ablation", 0] == pytest.approx(hf_gap(model, hf_logits(hf, tokens, [steer])), abs=1e-4)
    assert by["patching", 0] == pytest.approx(hf_gap(model, hf_logits(hf, tokens)), abs=1e-4)
    edit = feature_edit(
        3, raw[3], out_module(name, 3), index=gate, target=float(control[gate]), from_pos=seq - 1
    )
    steer = injection(INJ, vecs[0], 4.0, p.injection_start)
    assert by["ablation", 1] == pytest.approx(hf_gap(model, hf_logits(hf, tokens, [steer, *edit])), abs=1e-4)
