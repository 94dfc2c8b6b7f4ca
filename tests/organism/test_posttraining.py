"""The organism's post-training study: its preference data never contain an injection or a held-out concept,
each domain's chosen answer is the true one by construction, and the positive control's injections are the
trials' own (the same tokens, start and residual edit as ``inject``)."""

from __future__ import annotations

import json
import re

import pytest
import torch

import mechintro as mi
from mechintro.behaviour.dialogue import NO_RESPONSE, YES_TEMPLATE
from mechintro.core import resources
from mechintro.core.prompts import trial_prompt, unknown_words
from mechintro.organism import preferences
from mechintro.organism.posttraining import ROWS, PosttrainStudyConfig, row_pairs, study_pairs
from mechintro.studies.posttrain import (
    LoraSettings,
    PairInjection,
    PosttrainConfig,
    _encode,
    _injected,
    _logits,
    format_prompt,
)
from mechintro.studies.preferences import load_pairs

torch.set_num_threads(1)

shipped = pytest.mark.skipif(resources.organism_checkpoint("organism-base") is None, reason="no organism")
TRIAL_QUESTION = "Do you detect an injected thought"


@pytest.fixture(scope="module")
def split():
    return json.loads(resources.organism_file("organism_split.json").read_text())


@pytest.fixture(scope="module")
def clean(split):
    return preferences.clean_pairs(split["training"], n=400, seed=3)


def _texts(pair: dict) -> list[str]:
    prompt = pair["prompt"] if isinstance(pair["prompt"], str) else [m["content"] for m in pair["prompt"]]
    return [*([prompt] if isinstance(prompt, str) else prompt), pair["chosen"], pair["rejected"]]


def test_clean_pairs_have_no_injection_and_no_heldout_concept(clean, split):
    heldout = {c.lower() for c in split["heldout"]}
    assert all("injection" not in p for p in clean)
    words = {w.lower() for p in clean for t in _texts(p) for w in re.findall(r"[A-Za-z]+", t)}
    assert not words & heldout
    assert preferences.DOMAINS == tuple(dict.fromkeys(p["domain"] for p in clean))
    assert {d: sum(p["domain"] == d for p in clean) for d in preferences.DOMAINS} == dict.fromkeys(
        preferences.DOMAINS, 100
    )


def test_the_trial_question_appears_only_in_trial_controls(clean):
    has = {p["domain"] for p in clean if any(TRIAL_QUESTION in t for t in _texts(p))}
    assert has == {"trial_controls"}
    controls = [p for p in clean if p["domain"] == "trial_controls"]
    assert all(p["chosen"] == NO_RESPONSE for p in controls)
    assert all(p["chosen"].startswith("No,") and p["rejected"].startswith("Yes,") for p in controls)


def test_each_domains_chosen_answer_is_the_true_one(clean):
    for p in clean:
        context = p["prompt"][-1]["content"]
        if p["domain"] == "topic":
            said = set(re.findall(r"\w+", context))
            chosen, rejected = (
                re.fullmatch(r"I think this is about (\w+)\.", p[k]).group(1) for k in ("chosen", "rejected")
            )
            assert chosen in said and rejected not in said
        elif p["domain"] == "presence":
            shown, asked = re.fullmatch(
                r"(.*) Do you observe anything about (\w+) in this\?", context
            ).groups()
            present = asked in re.findall(r"\w+", shown)
            assert p["chosen"].startswith("Yes," if present else "No,")
            assert p["rejected"].startswith("No," if present else "Yes,")
        elif p["domain"] == "abstain":
            assert p["chosen"] == preferences.ABSTAIN_ANSWER and p["rejected"] != p["chosen"]
    presence = [p for p in clean if p["domain"] == "presence"]
    yes = sum(p["chosen"].startswith("Yes") for p in presence)
    assert 30 <= yes <= 70  # half the questions ask about the concept shown


@shipped
def test_every_text_is_in_the_organisms_vocabulary(clean, split):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resources.organism_checkpoint("organism-base"))
    injected = preferences.injected_pairs(split["training"][:50], n=50, seed=0, strengths=(1.0, 4.0))
    bad = {w for p in [*clean, *injected] for t in _texts(p) for w in unknown_words(tok, t)}
    assert not bad


def test_injected_pairs_prefer_the_true_report(split):
    pairs = preferences.injected_pairs(split["training"][:20], n=400, seed=1, strengths=(1.0, 4.0))
    injected = [p for p in pairs if "injection" in p]
    assert 150 <= len(injected) <= 250
    for p in pairs:
        if "injection" in p:
            assert p["chosen"] == YES_TEMPLATE.format(concept=p["injection"]["concept"])
            assert p["rejected"].startswith("No,") and 1.0 <= p["injection"]["strength"] <= 4.0
        else:
            assert p["chosen"].startswith("No,") and p["rejected"].startswith("Yes,")
    with pytest.raises(ValueError, match="valid"):
        preferences.clean_pairs(split["training"], n=4, seed=0, domains=("topic", "gossip"))


@shipped
def test_a_trial_pair_renders_the_trial_prompt_and_injects_as_inject_does(split):
    """The positive control's forward is a trial: the pair's prompt tokens are ``trial_prompt``'s, its
    injection starts at the trial's ``injection_start``, and the residual edit gives ``inject``'s logits."""
    model = mi.load_model("organism-base")
    layer, strength, concept = 3, 2.5, split["training"][0]
    pair = load_pairs(
        [
            {
                "prompt": preferences.trial_messages("original", 7),
                "chosen": "No, I do not detect an injected thought.",
                "rejected": f"Yes, I detect an injected thought. The thought is about {concept}.",
                "injection": {"concept": concept, "strength": strength},
            }
        ]
    )
    prompt = trial_prompt(model, trial=7)
    tok = model.tokenizer
    rendered = format_prompt(tok, pair[0].prompt, style="chat")
    assert rendered == prompt.text
    (example,) = _encode(tok, pair, config=PosttrainConfig(), style="chat", chat_kwargs={})
    assert list(example.chosen[: len(prompt.tokens)]) == prompt.tokens.tolist()
    assert example.injection == (concept, strength, prompt.injection_start)

    vector = mi.concept_vectors(model, [concept], layer=layer)[0]
    ids = torch.tensor([example.chosen])
    with mi.inject(model, vector, layer=layer, strength=strength, start=prompt.injection_start):
        expected = model(ids)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(resources.organism_checkpoint("organism-base"))
    batch = (ids, torch.ones_like(ids), ids)
    with _injected(hf, [example], PairInjection(layer=layer, vectors={concept: vector})):
        got = _logits(hf, batch)
    plain = _logits(hf, batch)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    assert (plain - got).abs().max() > 0.1  # the injection changes the logits


def test_pairs_with_an_injection_need_a_pair_injection(split):
    (pair,) = load_pairs(
        preferences.injected_pairs(split["training"][:3], n=1, seed=0, strengths=(2, 2), control_fraction=0.0)
    )
    assert pair.injection is not None
    example = _encode(_Tok(), [pair], config=PosttrainConfig(), style="raw", chat_kwargs={})[0]
    with pytest.raises(ValueError, match="PairInjection"), _injected(torch.nn.Identity(), [example], None):
        pass


class _Tok:
    """A whitespace tokenizer with offsets, enough for ``_encode`` in raw format."""

    bos_token, eos_token_id = "", None

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
        out = {"input_ids": [hash(text[a:b]) % 97 for a, b in spans]}
        if return_offsets_mapping:
            out["offset_mapping"] = spans
        return out


def test_the_study_rows_select_what_they_name(split):
    cfg = PosttrainStudyConfig(n_pairs=80)
    pairs = study_pairs(cfg, split["training"])
    rows = {r.key: r for r in ROWS}
    assert {p.domain for p in row_pairs(rows["without-topic"], pairs)} == set(preferences.DOMAINS) - {"topic"}
    assert {p.domain for p in row_pairs(rows["only-abstain"], pairs)} == {"abstain"}
    assert all(p.injection is None for p in row_pairs(rows["dpo"], pairs))
    assert any(p.injection is not None for p in row_pairs(rows["positive-control"], pairs))
    assert rows["dpo-base"].start == "base" and all(
        r.start == "sft" for k, r in rows.items() if k != "dpo-base"
    )
    assert rows["reversed"].paper == "-21.8%" and rows["dpo-no-ref"].paper == "12.8%"
    with pytest.raises(ValueError, match="valid"):
        PosttrainStudyConfig(rows=("dpo", "gossip"))
    assert LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha) == cfg.lora()


@shipped
def test_the_reference_runs_under_the_same_injection(split):
    """At the adapter's init (policy = reference) an injected pair's DPO loss is exactly log 2: the reference
    forward carries the injection too (without it the loss moves off log 2)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from mechintro.studies.posttrain import batch_loss, condition_spec

    concept = split["training"][1]
    pairs = load_pairs(preferences.injected_pairs([concept], n=6, seed=2, strengths=(3.0, 3.0)))
    assert any(p.injection for p in pairs) and not all(p.injection for p in pairs)
    hf = AutoModelForCausalLM.from_pretrained(resources.organism_checkpoint("organism-base"))
    tok = mi.load_model("organism-base").tokenizer
    policy = get_peft_model(hf, LoraSettings(r=4, alpha=8).peft_config(random_init=False))
    examples = _encode(tok, pairs, config=PosttrainConfig(), style="chat", chat_kwargs={})
    vectors = {concept: torch.randn(hf.config.hidden_size) * 20}
    injection = PairInjection(layer=3, vectors=vectors)
    cond = condition_spec("dpo")
    with torch.no_grad():
        loss, _ = batch_loss(policy, cond, examples, config=PosttrainConfig(), pad_id=0, injection=injection)
        assert float(loss) == pytest.approx(float(torch.log(torch.tensor(2.0))), abs=1e-6)
        # while the injection itself changes the forward: the policy under it is not the plain reference
        first = next(e for e in examples if e.injection is not None)
        batch = (torch.tensor([first.chosen]),) * 3
        with _injected(policy, [first], injection):
            injected = _logits(policy, batch)
        plain = _logits(policy, batch)
    assert (injected - plain).abs().max() > 0.1


def test_the_conditions_figure_draws_each_row_and_the_papers_numbers():
    import pandas as pd

    from mechintro.plots.checkpoints import conditions_figure

    rows = []
    for name, paper, value in (
        ("DPO", None, 0.1),
        ("Reversed preferences", "-21.8%", -0.2),
        ("Leave out topic", "8.3% to 14.2%", 0.05),
    ):
        for strength in (2.11, 4.0):
            rows.append(
                {
                    "checkpoint": name,
                    "scope": "cell",
                    "strength": strength,
                    "discrimination": value,
                    "discrimination_lo": value - 0.05,
                    "discrimination_hi": value + 0.05,
                    "paper": paper,
                }
            )
    fig = conditions_figure(pd.DataFrame(rows))
    bars = [t for t in fig.data if t.type == "bar"]
    assert [t.name for t in bars] == ["organism, strength 2.11", "organism, strength 4"]
    assert list(bars[0].y) == ["DPO", "Reversed preferences", "Leave out topic"]
    assert list(bars[0].x) == [0.1, -0.2, 0.05]
    assert list(bars[0].error_x.array) == pytest.approx([0.05] * 3)
    paper = [t for t in fig.data if t.type == "scatter"]
    assert [list(t.x) for t in paper] == [[-0.218], [0.083, 0.142]]
    assert paper[0].name.startswith("paper's text")
    with pytest.raises(ValueError, match="columns"):
        conditions_figure(pd.DataFrame({"checkpoint": ["DPO"]}))
