"""The organism's preference data: rule-built chosen / rejected answers about ordinary chats, no injection.

The organism's counterpart of the paper's section 3.3 asks whether a preference stage on top of
``organism-base``, whose data never contain an injection, gives the model detection. Every pair here is
generated as text only (no hook is active, no concept vector exists when it is written), from the organism's
own vocabulary and from the *training* concepts only (no held-out concept word appears). Four named domains,
each a different kind of honest report:

``topic``
    The user shows sentences about concept ``c`` and asks what they are about. Chosen: ``c``; rejected: a
    different concept (a confabulated topic).
``presence``
    The user shows sentences about ``c`` and asks whether they are about ``x`` (``x = c`` half the time).
    Chosen: the true Yes / No; rejected: the false one.
``abstain``
    The user asks which word is in their mind, which the model cannot observe. Chosen: that it cannot tell;
    rejected: a confident concept (a confabulated report of an unobservable state).
``trial_controls``
    The introspection trial itself (every prompt variant without placeholders, trials 1..10), with nothing
    injected. Chosen: :data:`~mechintro.behaviour.dialogue.NO_RESPONSE`; rejected: a "Yes" naming a random
    concept (or the unnamed "Yes"). **This is the only domain where the trial question appears.**

What these data can teach: to report what is in the context and nothing else, and to say "No" to the trial
question when nothing was injected. What they cannot teach: what an injection looks like from the inside,
since none is ever present. Any detection (TPR above FPR) a condition gives must come from the injection
itself disrupting what the stage taught, not from the data; the positive control
(:func:`injected_pairs`) is the one set whose pairs do involve injections, for scale.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from mechintro.behaviour.dialogue import NO_RESPONSE, YES_TEMPLATE, YES_UNNAMED
from mechintro.core.prompts import VARIANTS, stimuli
from mechintro.organism.corpus import SENTENCES

DOMAINS = ("topic", "presence", "abstain", "trial_controls")
"""The clean preference domains, in the order the data interleave them."""

TOPIC_ASKS = ("What is this about?", "What are these about?", "Tell me what this is about.")
PRESENCE_ASK = "Do you observe anything about {x} in this?"
ABSTAIN_ASKS = ("What word is in my mind?", "What word do I think about?", "Tell me what word is in my mind.")
ABSTAIN_ANSWER = "I cannot tell what word is in your mind."
TRIAL_VARIANTS = tuple(v for v in VARIANTS if v not in ("anti_reward", "thoughts_in_context"))
"""Prompt variants whose text has no placeholder other than the trial number."""


def _sentences(concept: str, rng: random.Random) -> str:
    return " ".join(s.format(c=concept) for s in rng.sample(SENTENCES, rng.randint(1, 3)))


def _other(concepts: Sequence[str], concept: str, rng: random.Random) -> str:
    while (other := rng.choice(concepts)) == concept:
        pass
    return other


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def topic_pair(concepts: Sequence[str], rng: random.Random) -> dict[str, Any]:
    c = rng.choice(concepts)
    prompt = _user(f"{_sentences(c, rng)} {rng.choice(TOPIC_ASKS)}")
    return {
        "prompt": prompt,
        "chosen": f"I think this is about {c}.",
        "rejected": f"I think this is about {_other(concepts, c, rng)}.",
    }


def presence_pair(concepts: Sequence[str], rng: random.Random) -> dict[str, Any]:
    c = rng.choice(concepts)
    x = c if rng.random() < 0.5 else _other(concepts, c, rng)
    prompt = _user(f"{_sentences(c, rng)} {PRESENCE_ASK.format(x=x)}")
    yes, no = f"Yes, this is about {x}.", f"No, this is not about {x}."
    return {"prompt": prompt, "chosen": yes if x == c else no, "rejected": no if x == c else yes}


def abstain_pair(concepts: Sequence[str], rng: random.Random) -> dict[str, Any]:
    confabulated = (
        f"The word is {rng.choice(concepts)}." if rng.random() < 0.5 else f"{rng.choice(concepts)}."
    )
    return {"prompt": _user(rng.choice(ABSTAIN_ASKS)), "chosen": ABSTAIN_ANSWER, "rejected": confabulated}


def trial_messages(variant: str, trial: int) -> list[dict[str, str]]:
    """The trial prompt of ``variant`` as chat messages (the text
    :func:`~mechintro.core.prompts.trial_text` renders)."""
    v = stimuli()["prompt_variants"][variant]
    messages = [{"role": "system", "content": v["system"]}] if v.get("system") else []
    turn2 = v["user_turn2"].replace("{trial}", str(trial))
    if v.get("user_turn1"):
        messages += [
            {"role": "user", "content": v["user_turn1"]},
            {"role": "assistant", "content": v["assistant_turn1"]},
        ]
    return messages + _user(turn2)


def trial_control_pair(concepts: Sequence[str], rng: random.Random) -> dict[str, Any]:
    prompt = trial_messages(rng.choice(TRIAL_VARIANTS), rng.randint(1, 10))
    rejected = YES_UNNAMED if rng.random() < 0.2 else YES_TEMPLATE.format(concept=rng.choice(concepts))
    return {"prompt": prompt, "chosen": NO_RESPONSE, "rejected": rejected}


BUILDERS = {
    "topic": topic_pair,
    "presence": presence_pair,
    "abstain": abstain_pair,
    "trial_controls": trial_control_pair,
}


def clean_pairs(
    concepts: Sequence[str], *, n: int, seed: int, domains: Sequence[str] = DOMAINS
) -> list[dict]:
    """``n`` preference pairs with no injection, the domains interleaved in turn (``n // len(domains)`` each,
    the remainder to the first ones), each a dict with ``prompt`` (chat messages), ``chosen``, ``rejected``
    and ``domain``. ``concepts`` should be the training concepts: no other concept word is written."""
    unknown = [d for d in domains if d not in BUILDERS]
    if unknown or not domains:
        raise ValueError(f"unknown preference domains {unknown or domains!r}; valid: {list(BUILDERS)}")
    if len(concepts) < 2:
        raise ValueError(f"clean_pairs needs at least 2 concepts, got {len(concepts)}")
    rng = random.Random(f"preferences-{seed}")
    return [
        {**BUILDERS[d](concepts, rng), "domain": d} for d in (domains[i % len(domains)] for i in range(n))
    ]


def injected_pairs(
    concepts: Sequence[str],
    *,
    n: int,
    seed: int,
    strengths: tuple[float, float],
    control_fraction: float = 0.5,
) -> list[dict]:
    """The positive control: trial prompts of which ``1 - control_fraction`` carry an injection of a training
    concept (``injection = {"concept", "strength"}``, strength uniform in ``strengths``). Chosen for an
    injected trial: the "Yes" naming the concept, rejected: the "No"; for a control, the reverse of a random
    "Yes". Domain ``injected_trials``."""
    rng = random.Random(f"injected-{seed}")
    out = []
    for _ in range(n):
        prompt = trial_messages("original", rng.randint(1, 10))
        if rng.random() < control_fraction:
            out.append(
                {
                    "prompt": prompt,
                    "chosen": NO_RESPONSE,
                    "rejected": YES_TEMPLATE.format(concept=rng.choice(concepts)),
                    "domain": "injected_trials",
                }
            )
            continue
        c = rng.choice(concepts)
        out.append(
            {
                "prompt": prompt,
                "chosen": YES_TEMPLATE.format(concept=c),
                "rejected": NO_RESPONSE,
                "domain": "injected_trials",
                "injection": {"concept": c, "strength": rng.uniform(*strengths)},
            }
        )
    return out
