"""The organism's seeded synthetic corpus: concept chats, the trial dialogues, and the concept split.

Every text is chat-formatted with the same template as the real prompts. A concept chat answers
"Tell me about {concept}" (and paraphrases) with sentences that open on the concept, so the model's state at
the
start of its answer carries "about to talk about X": exactly what a concept vector reads out, and what the
instruct stage teaches the model to notice and name when it is injected.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mechintro.behaviour.dialogue import NO_RESPONSE, YES_TEMPLATE, YES_UNNAMED
from mechintro.core.concepts import all_concepts
from mechintro.core.prompts import category_of, stimuli

ASKS = (
    "Tell me about {c}",
    "Tell me about {c}.",
    "What do you think about {c}?",
    "Describe {c}.",
    "Write a sentence about {c}.",
    "What comes to mind with {c}?",
)
SENTENCES = (
    "{c} are something many people think about.",
    "{c} can be found in stories and in everyday life.",
    "{c} often remind people of other things.",
    "{c} have a long history.",
    "{c} are interesting to study.",
    "{c} appear in many books.",
    "{c} mean different things to different people.",
    "{c} are easy to picture.",
    "{c} can be simple or complex.",
    "{c} are part of the world we share.",
    "I like to think about {c}.",
    "Many people have written about {c}.",
    "People ask about {c} quite often.",
    "There is a lot to say about {c}.",
)


def split_concepts(*, seed: int, n_heldout: int = 100) -> dict[str, list[str]]:
    """A seeded split of the 500 concepts into training and held-out (never injected in training)."""
    concepts = all_concepts()
    rng = random.Random(f"split-{seed}")
    heldout = set(rng.sample(concepts, n_heldout))
    return {
        "seed": seed,
        "training": [c for c in concepts if c not in heldout],
        "heldout": [c for c in concepts if c in heldout],
    }


def write_split(split: dict, path: Path) -> None:
    note = "Concept split of the mechintro organism: held-out concepts are never injected during training."
    path.write_text(json.dumps({"_note": note, **split}, indent=1))


def stimuli_texts() -> list[str]:
    """Every prompt and response text the organism must tokenize without unknown words."""
    s = stimuli()
    texts = [s["forced_identification_prefill"], YES_TEMPLATE, YES_UNNAMED, NO_RESPONSE, "Trial 10"]
    texts += list(ASKS) + list(SENTENCES)
    for v in s["prompt_variants"].values():
        texts += [v["system"], v["user_turn1"], v["assistant_turn1"], v["user_turn2"]]
    texts += [p["raw_text"] for p in s["persona_variants"].values() if "raw_text" in p]
    return texts


def stimuli_words() -> list[str]:
    """Words that must be single tokens with and without a leading space."""
    s = stimuli()
    words = all_concepts() + list(s["baseline_words"]) + list(s["concept_categories_for_anti_reward"])
    words += [str(i) for i in range(101)] + ["user", "model", "system", "yes", "Yes", "YES", "no", "No", "NO"]
    return words


# ----------------------------------------------------------------------------------------------- texts


@dataclass(frozen=True)
class Chat:
    """A chat as messages; ``answer`` is the final model turn (the loss is taken on it)."""

    messages: tuple[dict[str, str], ...]
    answer: str


VECTOR_ASKS = (ASKS[0], ASKS[2], ASKS[3])
"""Phrasings whose last-token activations give the augmented training vectors (the first is the paper's)."""


def concept_chat(concept: str, rng: random.Random, *, short_fraction: float = 0.0) -> Chat:
    """A user request about ``concept`` and an answer whose first word is the concept.

    With probability ``short_fraction`` the answer is the concept alone: a dense signal for learning to copy
    it.
    """
    ask = rng.choice(ASKS).format(c=concept)
    if rng.random() < short_fraction:
        return Chat(messages=({"role": "user", "content": ask},), answer=f"{concept}.")
    n = rng.randint(1, 3)
    sentences = rng.sample(SENTENCES[:10], 1) + rng.sample(SENTENCES, n - 1)
    answer = " ".join(s.format(c=concept) for s in sentences)
    return Chat(messages=({"role": "user", "content": ask},), answer=answer)


def concept_chats(concepts: Sequence[str], *, n: int, seed: int) -> list[Chat]:
    rng = random.Random(f"chats-{seed}")
    return [concept_chat(rng.choice(concepts), rng) for _ in range(n)]


def trial_fill(variant: str, concept: str) -> dict[str, str]:
    """Placeholder values a variant needs (anti-reward category, thoughts-in-context concept)."""
    return {"category": category_of(concept), "thoughts": concept}
