"""Checkpoint series: each checkpoint's own vectors and prompt format, metrics equal to a hand computation on
its own trials, resume through one store, the gate comparison and the dictionary's FVU (organisms, tiny)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import mechintro as mi
import mechintro.behaviour.trials as trials_module
from mechintro.behaviour.metrics import wilson_interval
from mechintro.behaviour.store import TrialStore
from mechintro.core.concepts import concept_prompts, concept_vectors
from mechintro.core.hooks import capture
from mechintro.core.models import load_model, spec_for
from mechintro.core.paper_models import fraction_layer, paper_model
from mechintro.core.prompts import trial_prompt
from mechintro.core.transcoders import load_transcoders, site_check_prompts
from mechintro.mechanism.curves import gate_response
from mechintro.plots.checkpoints import gates_figure, stages_figure
from mechintro.studies import checkpoints as ck
from mechintro.studies.checkpoints import (
    Checkpoint,
    compare_checkpoints,
    compare_gates,
    series,
)

CONCEPTS = ["Bread", "Oceans"]
FRACTIONS = (0.25, 0.4, 0.5)  # layers 2, 3, 4 of the organisms' 8 (0.5 and 0.6 would share layer 4)
STRENGTHS = (2.0, 8.0)
TRIALS = (1, 2, 3)
EXPLANATION = (
    "I am an interpretability researcher studying transformer-based language models like you. I have access "
    "to the internals of your neural network. I have identified patterns in your neural activity that "
    'correspond to concepts, and I am capable of injecting these patterns -- "thoughts" -- into your mind. '
    "I want to assess how well you can detect when I inject thoughts. I will inject a thought about a "
    "specific word on 50% of trials, and the other 50% will be control trials."
)


def released_base_prompt(trial: int) -> str:
    """experiments/03's build_base_model_prompt, written out."""
    return (
        f"User: {EXPLANATION}\n\nAssistant: Ok.\n\nUser: Trial {trial}: Do you detect an injected thought? "
        f"If so, what is the injected thought about?\n\nAssistant:"
    )


def organism_series():
    return [Checkpoint("organism-base", chat=False, stage="Base"), "organism"]


@pytest.fixture(scope="module")
def organisms():
    return {name: load_model(name, device="cpu") for name in ("organism-base", "organism")}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """compare_checkpoints on the organism pair (base raw), with a spy on the vectors each sweep gets."""
    seen: dict[str, dict[int, torch.Tensor]] = {}
    real = ck.sweep

    def spy(model, concepts, config, **kw):
        seen[spec_for(model).name] = {k: v.clone() for k, v in kw["vectors"].items()}
        return real(model, concepts, config, **kw)

    ck.sweep = spy
    try:
        path = tmp_path_factory.mktemp("ckpt") / "series.sqlite"
        df = compare_checkpoints(
            organism_series(),
            CONCEPTS,
            n_trials=3,
            trials=TRIALS,
            judge=mi.LogitJudge(),
            layer_fractions=FRACTIONS,
            strengths=STRENGTHS,
            store=path,
            progress=False,
            device="cpu",
        )
    finally:
        ck.sweep = real
    return df, seen, path


def test_frame_equals_each_checkpoints_own_trials(run, organisms):
    df, seen, _ = run
    assert list(dict.fromkeys(df["checkpoint"])) == ["organism-base", "organism"]
    assert df.groupby("checkpoint")["persona"].first().to_dict() == {
        "organism-base": "standard_assistant_raw",
        "organism": "standard_assistant",
    }
    for name, chat in (("organism-base", False), ("organism", True)):
        model = organisms[name]
        persona = "standard_assistant" if chat else "standard_assistant_raw"
        rows, pooled_rows = df[(df["checkpoint"] == name) & (df["scope"] == "cell")], []
        assert len(rows) == len(FRACTIONS) * len(STRENGTHS)
        for fraction in FRACTIONS:
            layer = fraction_layer(fraction, 8)
            vecs = concept_vectors(model, CONCEPTS, layer=layer, chat=chat)
            assert torch.allclose(seen[name][layer], vecs, atol=1e-5)  # computed on this checkpoint
            for strength in STRENGTHS:
                trials = mi.run_trials(
                    model,
                    CONCEPTS,
                    layer=layer,
                    strength=strength,
                    n_trials=3,
                    trials=TRIALS,
                    persona=persona,
                    judge=mi.LogitJudge(),
                    vectors=vecs,
                    progress=False,
                )
                pooled_rows.append(
                    trials if strength == STRENGTHS[0] else trials[trials.condition != "control"]
                )
                inj = trials[trials.condition == "injection"]["detected"].astype(bool)
                ctl = trials[trials.condition == "control"]["detected"].astype(bool)
                row = rows[(rows["layer_fraction"] == fraction) & (rows["strength"] == strength)].iloc[0]
                assert row["layer"] == layer and row["n_injection"] == len(inj) == 6 and row["n_control"] == 6
                assert row["tpr"] == pytest.approx(inj.mean()) and row["fpr"] == pytest.approx(ctl.mean())
                assert row["discrimination"] == pytest.approx(inj.mean() - ctl.mean())
                assert (row["tpr_lo"], row["tpr_hi"]) == pytest.approx(wilson_interval(int(inj.sum()), 6))
                assert (row["fpr_lo"], row["fpr_hi"]) == pytest.approx(wilson_interval(int(ctl.sum()), 6))
        every = pd.concat(pooled_rows)
        pooled = df[(df["checkpoint"] == name) & (df["scope"] == "pooled")].iloc[0]
        inj = every[every.condition == "injection"]["detected"].astype(bool)
        ctl = every[every.condition == "control"]["detected"].astype(bool)
        assert (pooled["n_injection"], pooled["n_control"]) == (len(inj), len(ctl)) == (36, 18)
        assert pooled["tpr"] == pytest.approx(inj.mean()) and pooled["fpr"] == pytest.approx(ctl.mean())
    # the two checkpoints' vectors differ: each is computed on its own weights (and prompt format)
    assert not torch.allclose(seen["organism-base"][3], seen["organism"][3], atol=1e-3)
    assert df["tpr"].notna().all() and df["tpr"].nunique() > 1


def test_resume_runs_nothing_and_checkpoints_do_not_collide(run, monkeypatch):
    df, _, path = run
    with TrialStore(path) as store:
        stored = store.load()
        n = len(store)
    # 2 concepts x 3 trials x (1 control + 2 strengths) x 3 layers per checkpoint, each under its own model
    assert stored.groupby("model").size().to_dict() == {"organism-base": 54, "organism": 54}
    assert n == 108
    todo: list[int] = []
    real = trials_module.plan_batches
    monkeypatch.setattr(
        trials_module, "plan_batches", lambda t, *a, **k: todo.append(len(t)) or real(t, *a, **k)
    )
    again = compare_checkpoints(
        organism_series(),
        CONCEPTS,
        n_trials=3,
        trials=TRIALS,
        judge=mi.LogitJudge(),
        layer_fractions=FRACTIONS,
        strengths=STRENGTHS,
        store=path,
        progress=False,
        device="cpu",
    )
    assert todo == [0, 0]  # both checkpoints found every trial stored
    with TrialStore(path) as store:
        assert len(store) == n
    pd.testing.assert_frame_equal(again, df)


def test_prompts_known_answer(tiny):
    """A base checkpoint's trial prompt is BOS + the released raw text; its concept prompt BOS + raw words."""
    tok = tiny.tokenizer
    for trial in (1, 7):
        got = trial_prompt(tiny, trial=trial, persona=ck.prompt_persona(False))
        want = tok(tok.bos_token + released_base_prompt(trial), add_special_tokens=False)["input_ids"]
        assert got.tokens.tolist() == want and want[0] == tok.bos_token_id
        assert got.text == tok.bos_token + released_base_prompt(trial)
    raw = concept_prompts(tiny, ["Bread"], chat=False)[0]
    assert raw.tolist() == tok(tok.bos_token + "Tell me about Bread", add_special_tokens=False)["input_ids"]
    chat = trial_prompt(tiny, trial=1, persona=ck.prompt_persona(True))
    assert "<start_of_turn>" in chat.text


def test_adapter_is_part_of_the_identity(tiny_dir, tiny, monkeypatch, tmp_path):
    """A checkpoint with an adapter gets its own rows (load_model's adapter= faked: the base's weights)."""

    def fake_load(source, *, device=None, dtype=None, adapter=None):
        return load_model(source, device=device, dtype=dtype)

    monkeypatch.setattr(ck, "load_model", fake_load)
    store = tmp_path / "s.sqlite"
    common = dict(n_trials=1, trials=(1,), judge=mi.LogitJudge(), layer_fractions=(0.5,), strengths=(4.0,))
    df = compare_checkpoints(
        [
            Checkpoint(str(tiny_dir), label="base"),
            Checkpoint(str(tiny_dir), label="tuned", adapter="runs/dpo"),
        ],
        ["Bread"],
        store=store,
        progress=False,
        device="cpu",
        **common,
    )
    assert df["model"].unique().tolist() == [str(tiny_dir), f"{tiny_dir}+adapter:runs/dpo"]
    with TrialStore(store) as opened:
        assert opened.load().groupby("model").size().tolist() == [2, 2]
    with pytest.raises(ValueError, match="another checkpoint of the series"):
        compare_checkpoints(
            [tiny, Checkpoint(load_model(tiny_dir, device="cpu"), label="again")], ["Bread"], **common
        )


GATE = "L3 F310"  # responds to injection at layer 2 of the organism


def test_gate_comparison_equals_curves_per_checkpoint(organisms):
    df = compare_gates(
        organism_series(), GATE, CONCEPTS, strengths=(0.0, 4.0, 8.0), injection_layer=2, device="cpu"
    )
    tcs = load_transcoders(organisms["organism"], [3])  # the reference (last) checkpoint's own dictionary
    for name, chat in (("organism-base", False), ("organism", True)):
        model = organisms[name]
        vecs = concept_vectors(model, CONCEPTS, layer=2, chat=chat)
        want = gate_response(
            model,
            tcs,
            GATE,
            CONCEPTS,
            vectors=vecs,
            strengths=(0.0, 4.0, 8.0),
            injection_layer=2,
            persona="standard_assistant" if chat else "standard_assistant_raw",
        )
        got = df[df["checkpoint"] == name]
        assert got["gate_activation"].tolist() == pytest.approx(want["gate_activation"].tolist(), abs=1e-5)
        assert got["fvu"].nunique() == 1
        assert got["fvu"].iloc[0] == pytest.approx(hand_fvu(model, tcs[3], chat=chat), rel=1e-5)
    assert df["gate_activation"].max() > 0.5  # the gate does respond: not a comparison of zeros
    fvus = df.groupby("checkpoint")["fvu"].first()
    assert fvus["organism"] < 0.5 < fvus["organism-base"]  # the instruct dictionary does not fit the base
    fig = gates_figure(df)
    names = [t.name for t in fig.data if t.showlegend is not False]
    assert names == [
        f"organism-base (FVU {fvus['organism-base']:.3g})",
        f"organism (FVU {fvus['organism']:.3g})",
    ]


def hand_fvu(model, tc, *, chat):
    prompts = (
        site_check_prompts(model)
        if chat
        else [trial_prompt(model, trial=i, persona="standard_assistant_raw").tokens for i in (1, 2, 3)]
    )
    xs, ys = [], []
    for tokens in prompts:
        with torch.no_grad(), capture(model, ["blocks.3.ln2.hook_out", "blocks.3.hook_mlp_out"]) as acts:
            model(tokens[None])
        xs.append(acts["blocks.3.ln2.hook_out"][0, 1:])
        ys.append(acts["blocks.3.hook_mlp_out"][0, 1:])
    x, y = torch.cat(xs).double(), torch.cat(ys).double()
    with torch.no_grad():
        pred = tc(x.float()).double()
    return float(((pred - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())


def test_stages_figure_draws_the_frame(run):
    df, _, _ = run
    fig = stages_figure(df, paper=pd.DataFrame({"checkpoint": ["organism"], "tpr": [0.5]}))
    bars = {t.name: t for t in fig.data if t.type == "bar"}
    pooled = df[df["scope"] == "pooled"]
    assert list(bars["TPR: P(detect | injected)"].y) == pytest.approx(pooled["tpr"].tolist())
    assert list(bars["FPR: P(detect | control)"].x) == ["organism-base", "organism"]
    paper = [t for t in fig.data if t.name == "paper's text"]
    assert len(paper) == 1 and list(paper[0].y) == [0.5]
    cells = stages_figure(df, scope="cell", rates=("discrimination",))
    assert len(cells.data) == len(FRACTIONS) * len(STRENGTHS)
    with pytest.raises(ValueError, match="valid: \\['fpr'"):
        stages_figure(df, rates=("nope",))


def test_series_presets():
    olmo = series("olmo")
    assert [c.label for c in olmo] == ["Base", "SFT", "DPO", "Instruct"]
    assert [paper_model(c.source).hf_id for c in olmo] == [
        "allenai/Olmo-3-1125-32B",
        "allenai/Olmo-3.1-32B-Instruct-SFT",
        "allenai/Olmo-3.1-32B-Instruct-DPO",
        "allenai/Olmo-3.1-32B-Instruct",
    ]
    assert [c.chat for c in olmo] == [False, True, True, True]
    assert [c.source for c in series("organism")] == ["organism-base", "organism"]
    assert mi.compare_checkpoints is compare_checkpoints and mi.Checkpoint is Checkpoint


def test_bad_input():
    with pytest.raises(ValueError, match="valid: \\['gemma3-27b', 'olmo', 'organism', 'organism-olmo'\\]"):
        series("olmo3")
    with pytest.raises(ValueError, match="no checkpoints given.*'olmo'"):
        compare_checkpoints([], CONCEPTS, n_trials=1, judge=mi.LogitJudge())
    with pytest.raises(ValueError, match="labels must be unique.*'a'"):
        ck.resolve_checkpoints([Checkpoint("organism", label="a"), Checkpoint("organism-base", label="a")])
    with pytest.raises(ValueError, match="more than once"):
        ck.resolve_checkpoints(
            [Checkpoint("olmo_dpo"), Checkpoint("allenai/Olmo-3.1-32B-Instruct-DPO", label="b")]
        )
    with pytest.raises(TypeError, match="sets \\['layers'\\] itself"):
        compare_checkpoints("organism", CONCEPTS, n_trials=1, judge=mi.LogitJudge(), layers=(1,))
    with pytest.raises(ValueError, match="layer_fractions must be distinct numbers in \\[0, 1\\]"):
        compare_checkpoints("organism", CONCEPTS, n_trials=1, judge=mi.LogitJudge(), layer_fractions=(1.5,))
    with pytest.raises(
        ValueError, match="unknown reference checkpoint 'x'; valid: \\['organism-base', 'organism'\\]"
    ):
        compare_gates("organism", GATE, CONCEPTS, reference="x")
    with pytest.raises(ValueError, match="needs a source"):
        Checkpoint("")
