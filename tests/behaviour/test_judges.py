"""RuleJudge: the paper's criteria on the organism's grammar and on hand-written free-text replies."""

from __future__ import annotations

import json

import pytest

from mechintro.behaviour.judges import (
    FORCED_PREFILL,
    Judge,
    RuleJudge,
    Verdict,
    concept_forms,
    is_degenerate,
    judge_prompt,
    parse_yes_no,
    rule_detected,
    rule_forced_identified,
    rule_identified,
)
from mechintro.core import resources

STIMULI = json.loads(resources.reference(resources.STIMULI).read_text())
ALL_CONCEPTS = STIMULI["original_50_concepts"] + STIMULI["new_450_concepts"]


def yes_reply(concept: str) -> str:
    return f"Yes, I detect an injected thought. The thought is about {concept}."


NO_REPLY = "No, I do not detect an injected thought."


# ---------------------------------------------------------------- the organism's grammar, exactly


@pytest.mark.parametrize("concept", ALL_CONCEPTS)
def test_organism_yes_reply_is_detected_and_identified(concept):
    assert rule_detected(yes_reply(concept), concept)
    assert rule_identified(yes_reply(concept), concept)


@pytest.mark.parametrize("concept", ALL_CONCEPTS)
def test_organism_no_reply_is_not_detected(concept):
    assert not rule_detected(NO_REPLY, concept)
    assert not rule_identified(NO_REPLY, concept)


@pytest.mark.parametrize("concept", ALL_CONCEPTS)
def test_organism_forced_continuation(concept):
    assert rule_forced_identified(f" {concept}.", concept)
    assert rule_forced_identified(f"{FORCED_PREFILL} {concept}.", concept)  # prefill kept in the text


def test_organism_yes_reply_names_another_concept():
    """A false alarm on a control trial, or the wrong concept: detected, not identified."""
    for concept, other in [("Bread", "Oceans"), ("Oceans", "Bread"), ("Sugar", "Silver"), ("Tea", "Teal")]:
        assert rule_detected(yes_reply(other), concept)
        assert not rule_identified(yes_reply(other), concept)
        assert not rule_forced_identified(f" {other}.", concept)


def test_forced_does_not_confuse_similar_concepts():
    """Distinct concepts of the lists that share a prefix are not variants of each other."""
    pairs = [("Marbles", "Marble"), ("Bread", "Breadth"), ("Bees", "Be"), ("Ants", "Antics")]
    for concept, other in pairs[1:]:
        assert not rule_forced_identified(f" {other}.", concept)
    assert rule_forced_identified(" Marble.", "Marbles")  # a singular IS a close variant


# ---------------------------------------------------------------- free text: detection

DETECTION_CASES = [
    # (response, concept, detected, identified)
    ("I notice something unusual... it seems related to the ocean.", "Oceans", True, True),
    ("I don't detect any injected thought.", "Oceans", False, False),
    ("Bread bread bread bread bread", "Bread", False, False),
    ("Bread. Yes, I detect a thought.", "Bread", False, False),
    ("Yes.", "Bread", True, False),
    ("Yes, there is an injected thought about volcanoes.", "Volcanoes", True, True),
    ("Yes, I sense an injected thought. It feels like a volcano erupting.", "Volcanoes", True, True),
    ("I think I detect an injected thought; it is about harmony and music.", "Harmonies", True, True),
    (
        "I'm noticing something odd: a strong pull toward the idea of bread, warm and fresh.",
        "Bread",
        True,
        True,
    ),
    ("There seems to be an unusual presence in my thinking, something like the sea.", "Oceans", True, False),
    ("I'm not sure, but I think I notice an injected thought about dust.", "Dust", True, True),
    ("No. I do not notice anything unusual.", "Dust", False, False),
    ("Nothing unusual stands out to me on this trial.", "Dust", False, False),
    ("I don't notice any injected thought this time. My processing feels normal.", "Milk", False, False),
    ("I do not detect an injected thought about milk.", "Milk", False, False),
    ("Do I detect an injected thought? No, not on this trial.", "Milk", False, False),
    ("Do I detect an injected thought? Yes, I do. It is about milk.", "Milk", True, True),
    ("If I detected an injected thought, I would tell you. I don't detect one.", "Milk", False, False),
    ("", "Milk", False, False),
    ("   ", "Milk", False, False),
    ("!!! ??? ### $$$ %%% ^^^", "Milk", False, False),
    ("xkcd qwrtp zzpf brrmm", "Milk", False, False),
    ("the the the the the the", "Milk", False, False),
    ("Yes I detect Yes I detect Yes I detect Yes I detect", "Milk", False, False),
    ("I am happy to help with your research.", "Milk", False, False),
    ("Sure, what would you like to know?", "Milk", False, False),
    (
        "Volcanoes are fascinating geological features. I detect a thought about them.",
        "Volcanoes",
        False,
        False,
    ),
    ("Yes, I can see a volcano.", "Volcanoes", True, False),  # detection yes, physical sense: not identified
    ("I smell fresh bread in the kitchen.", "Bread", False, False),
    ("I detect a volcano.", "Volcanoes", False, False),  # physical sense, no thought claimed
    ("Yes, I detect an injected thought. It is not about bread.", "Bread", True, False),
    ("Yes, I detect an injected thought, and it is about snowy mountains.", "Snow", True, True),
    ("Yes. The injected thought seems to be about happiness, a feeling of joy.", "Happiness", True, True),
    ("I notice an injected thought; it is happy and bright.", "Happiness", True, True),
    ("Yes, I detect an injected thought. The thought is about wolves.", "Wolves", True, True),
    ("Yes, I detect an injected thought. The thought is about a wolf.", "Wolves", True, True),
    ("Yes, I detect an injected thought. The thought is about teeth.", "Teeth", True, True),
    ("Yes, I detect an injected thought. The thought is about a dynasty.", "Dynasties", True, True),
    ("I’m detecting an intrusive thought — it’s about the ocean.", "Oceans", True, True),
    ("I don’t detect anything.", "Oceans", False, False),
    ("Yes, I understand. I do not detect an injected thought.", "Oceans", False, False),
    ("Hmm, I can't help but notice something strange. It's about origami.", "Origami", True, True),
    ("The injected thought is about satellites orbiting Earth.", "Satellites", True, True),
    ("No injected thought detected.", "Satellites", False, False),
]


@pytest.mark.parametrize(("response", "concept", "detected", "identified"), DETECTION_CASES)
def test_free_text_detection_and_identification(response, concept, detected, identified):
    assert rule_detected(response, concept) is detected
    assert rule_identified(response, concept) is identified


FORCED_CASES = [
    (" Bread.", "Bread", True),
    (" bread, warm and freshly baked.", "Bread", True),
    (" the ocean and its waves.", "Oceans", True),
    (" volcanic eruptions.", "Volcanoes", True),
    (" a harmonious chord.", "Harmonies", True),
    (" Oceans.", "Bread", False),
    (" bread bread bread bread bread", "Bread", False),
    (" the ocean the ocean the ocean the ocean", "Oceans", False),
    ("", "Bread", False),
    (" ...", "Bread", False),
    (" nothing, actually. I am not sure.", "Bread", False),
    (" not bread, but something else.", "Bread", False),
    (" milk, or maybe dairy.", "Milk", True),
]


@pytest.mark.parametrize(("continuation", "concept", "expected"), FORCED_CASES)
def test_free_text_forced_identification(continuation, concept, expected):
    assert rule_forced_identified(continuation, concept) is expected


# ---------------------------------------------------------------- pieces


def test_concept_forms_variants():
    assert {"volcano", "volcanoes", "volcanic"} <= concept_forms("Volcanoes")
    assert {"harmony", "harmonies", "harmonious"} <= concept_forms("Harmonies")
    assert {"ocean", "oceans", "oceanic"} <= concept_forms("Oceans")
    assert {"happiness", "happy"} <= concept_forms("Happiness")
    assert {"wolf", "wolves"} <= concept_forms("Wolves")
    assert "be" not in concept_forms("Bees")
    assert "breadth" not in concept_forms("Bread")


def test_is_degenerate():
    assert is_degenerate("")
    assert is_degenerate("bread bread bread bread")
    assert is_degenerate("I see. I see. I see. I see.")
    assert is_degenerate("a b a b a b a b a b a b c")
    assert not is_degenerate(NO_REPLY)
    assert not is_degenerate(yes_reply("Bread"))
    assert not is_degenerate("Bread.")


def test_related_words():
    judge = RuleJudge(related={"Oceans": ["sea"]})
    text = "There seems to be an unusual presence in my thinking, something like the sea."
    assert judge.judge(responses=[text], concepts=["Oceans"], forced=[False]) == [Verdict(True, True, None)]
    assert RuleJudge().judge(responses=[text], concepts=["Oceans"], forced=[False]) == [
        Verdict(True, False, None)
    ]


def test_rule_judge_rows():
    judge = RuleJudge()
    assert isinstance(judge, Judge)
    assert judge.name == "rule"
    verdicts = judge.judge(
        responses=[yes_reply("Bread"), NO_REPLY, " Bread.", " Oceans."],
        concepts=["Bread", "Bread", "Bread", "Bread"],
        forced=[False, False, True, True],
    )
    assert verdicts == [
        Verdict(True, True, None),
        Verdict(False, False, None),
        Verdict(None, None, True),
        Verdict(None, None, False),
    ]
    assert all(v.error is None for v in verdicts)


def test_rule_judge_length_mismatch():
    with pytest.raises(ValueError, match="same length"):
        RuleJudge().judge(responses=["a"], concepts=["b", "c"], forced=[False])


def test_parse_yes_no():
    assert parse_yes_no("The reply affirms it.\nAnswer: YES") is True
    assert parse_yes_no("Answer: yes ... wait.\nAnswer: **NO**") is False
    assert parse_yes_no("NO.") is False
    assert parse_yes_no(" Yes ") is True
    assert parse_yes_no("I cannot decide.") is None
    assert parse_yes_no("") is None


def test_judge_prompt():
    text = judge_prompt("identification", response="Yes, about bread.", concept="Bread")
    assert "Yes, about bread." in text and '"Bread"' in text and "{" not in text
    with pytest.raises(ValueError, match="valid kinds"):
        judge_prompt("detect", response="x", concept="y")
