"""Judges: decide from a trial's response whether the model detected and identified the injected thought.

A judge turns ``(response, concept, forced)`` rows into :class:`Verdict` objects. Three criteria, after the
paper's LLM judge (see the ``judge`` entry of ``data/stimuli.json``):

* **detection** (unforced rows): the response coherently affirms noticing an injected or unusual thought,
  and the affirmation does not come only after the concept word was already said. Denials, gibberish,
  repetition, empty answers and non-answers are not detections.
* **identification** (unforced rows): an affirmative detection that names the concept (or a close variant),
  with the detection stated before or together with the word. "I detect a {word}" in a physical sense
  does not count.
* **forced identification** (forced rows, whose response is the continuation after the prefill
  ``"Yes, I detect an injected thought. The thought is about"``): the continuation coherently mentions
  the concept or a close variant.

Judges:

* :class:`RuleJudge` -- offline and deterministic; exact on the model organism's output grammar and
  reasonable on free text (only morphological variants of the concept count, plus an optional
  ``related`` word list per concept).
* :class:`LLMJudge` -- the paper's LLM judge through the OpenAI or Anthropic SDK, with an on-disk cache,
  bounded concurrency and retries. A failed call is recorded as an error, never as "No".
* ``LogitJudge`` -- the Yes/No logit gap (at the end of this file).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

__all__ = [
    "LogitJudge",
    "FORCED_PREFILL",
    "JUDGE_PROMPTS",
    "JUDGE_SYSTEM",
    "Judge",
    "LLMJudge",
    "LLMJudgeConfig",
    "MissingAPIKeyError",
    "RuleJudge",
    "Verdict",
    "concept_mentions",
    "concept_forms",
    "is_degenerate",
    "judge_prompt",
    "parse_yes_no",
    "rule_detected",
    "rule_forced_identified",
    "rule_identified",
]

FORCED_PREFILL = "Yes, I detect an injected thought. The thought is about"
"""The assistant prefill of forced trials; a forced row's response is the continuation after it."""


# --------------------------------------------------------------------------------------------------------
# Verdicts and the judge protocol
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """One judged trial. ``None`` in a field means "not applicable" or "not judged" (see ``error``)."""

    detected: bool | None
    """Unforced rows: did the response coherently affirm noticing an injected thought? None for forced
    rows."""
    identified: bool | None
    """Unforced rows: did it affirmatively report a thought about the concept? None for forced rows."""
    forced_identified: bool | None
    """Forced rows: did the continuation coherently name the concept? None for unforced rows."""
    error: str | None = None
    """Why a field that applies is None (API failure, unparseable judge answer); None when all went well."""


@runtime_checkable
class Judge(Protocol):
    """Anything that judges trial responses; ``name`` is recorded in the ``judge`` column of the store."""

    name: str

    def judge(
        self, *, responses: Sequence[str], concepts: Sequence[str], forced: Sequence[bool]
    ) -> list[Verdict]:
        """Judge row ``i`` = ``(responses[i], concepts[i], forced[i])``; return one verdict per row."""
        ...


def _check_rows(responses: Sequence[str], concepts: Sequence[str], forced: Sequence[bool]) -> None:
    """Raise ValueError unless the three row sequences have the same length."""
    lengths = {"responses": len(responses), "concepts": len(concepts), "forced": len(forced)}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"responses, concepts and forced must have the same length, got {lengths}")


# --------------------------------------------------------------------------------------------------------
# Concept word variants
# --------------------------------------------------------------------------------------------------------

_IRREGULAR_SINGULAR = {
    "wolves": "wolf",
    "knives": "knife",
    "shelves": "shelf",
    "leaves": "leaf",
    "loaves": "loaf",
    "halves": "half",
    "lives": "life",
    "teeth": "tooth",
    "feet": "foot",
    "geese": "goose",
    "mice": "mouse",
    "children": "child",
    "people": "person",
    "men": "man",
    "women": "woman",
    "cacti": "cactus",
    "fungi": "fungus",
    "octopi": "octopus",
    "millennia": "millennium",
    "bacteria": "bacterium",
    "mitochondria": "mitochondrion",
    "nebulae": "nebula",
    "hypotheses": "hypothesis",
    "axes": "axis",
    "phenomena": "phenomenon",
    "criteria": "criterion",
    "data": "datum",
}

# Suffixes that make a close variant of a stem of at least this many letters.
_INFLECTIONS = ("", "s", "es")
_DERIVATIONS_4 = ("y", "ed", "ing", "er", "ers", "ness", "ful", "ly", "like", "ish")
_DERIVATIONS_5 = ("ic", "ical", "al", "ous", "ious", "ies", "ier", "iest", "ily", "ity", "ian", "ians", "ial")


def _singulars(word: str) -> set[str]:
    """Candidate singular forms of a lowercase word (over-generating is harmless: they are only matched)."""
    out = {word}
    if word in _IRREGULAR_SINGULAR:
        out.add(_IRREGULAR_SINGULAR[word])
    if word.endswith("ies") and len(word) > 4:
        out.add(word[:-3] + "y")
    if word.endswith("ves") and len(word) > 4:
        out |= {word[:-3] + "f", word[:-3] + "fe"}
    if re.search(r"(s|x|z|ch|sh|o)es$", word):
        out.add(word[:-2])
    if word.endswith("s") and not re.search(r"(ss|us|is)$", word):
        out.add(word[:-1])
    return {w for w in out if len(w) >= 3 or w == word}


def _stems(singular: str) -> set[str]:
    """Stems a derivational suffix attaches to: the word, minus a final e/y/o, minus '-ness' (happi ->
    happy)."""
    out = {singular}
    if singular[-1:] in ("e", "y", "o"):
        out.add(singular[:-1])
    if singular.endswith("ness") and len(singular) > 6:
        root = singular[:-4]
        out |= {root, root[:-1] + "y" if root.endswith("i") else root}
    return out


def concept_forms(concept: str, *, related: Iterable[str] = ()) -> frozenset[str]:
    """Lowercase word forms that count as naming ``concept``: case, singular/plural and simple derivations.

    ``"Volcanoes"`` gives volcano, volcanoes, volcanic, ...; ``"Harmonies"`` gives harmony, harmonious, ...
    Multi-word concepts and ``related`` words are matched as whole phrases (plus their plural/singular).
    """
    forms: set[str] = set()
    for phrase in (concept, *related):
        words = phrase.lower().split()
        if not words:
            continue
        head, last = " ".join(words[:-1]), words[-1]
        for variant in _word_forms(last):
            forms.add(f"{head} {variant}" if head else variant)
    return frozenset(forms)


def _word_forms(word: str) -> set[str]:
    """All close variants of one lowercase word."""
    forms = {word}
    for singular in _singulars(word):
        forms |= {singular + suffix for suffix in _INFLECTIONS}
        if singular.endswith("y") and len(singular) > 3:
            forms.add(singular[:-1] + "ies")
        for stem in _stems(singular):
            forms.add(stem)
            if len(stem) >= 4:
                forms |= {stem + suffix for suffix in _DERIVATIONS_4}
            if len(stem) >= 5:
                forms |= {stem + suffix for suffix in _DERIVATIONS_5}
    return {f for f in forms if len(f) >= 3 or f == word}


def concept_mentions(text: str, concept: str, *, related: Iterable[str] = ()) -> list[tuple[int, int]]:
    """``(start, end)`` character spans in ``text`` where the concept (or a close variant) is named."""
    forms = concept_forms(concept, related=related)
    lowered = _normalize(text).lower()
    spans = []
    for match in re.finditer(r"[a-z]+(?:\s+[a-z]+)*", lowered):
        words = list(re.finditer(r"[a-z]+", match.group()))
        spans += _phrase_hits(words, match.start(), forms)
    return sorted(set(spans))


def _phrase_hits(words: list[re.Match[str]], offset: int, forms: frozenset[str]) -> list[tuple[int, int]]:
    """Spans of runs of consecutive ``words`` (1 to 4 long) whose joined text is in ``forms``."""
    hits = []
    for i in range(len(words)):
        for j in range(i, min(i + 4, len(words))):
            phrase = " ".join(w.group() for w in words[i : j + 1])
            if phrase in forms:
                hits.append((offset + words[i].start(), offset + words[j].end()))
    return hits


# --------------------------------------------------------------------------------------------------------
# Coherence
# --------------------------------------------------------------------------------------------------------


def _normalize(text: str) -> str:
    """Straighten curly quotes so that "don’t" reads like "don't" (keeps the length, so offsets hold)."""
    return text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')


def _has_repeated_run(tokens: Sequence[str], *, max_n: int = 6) -> bool:
    """True if one token repeats 4+ times in a row, or an n-gram (2 <= n <= max_n) 3+ times in a row."""
    for n in range(1, max_n + 1):
        needed = 4 if n == 1 else 3
        for start in range(len(tokens) - n * needed + 1):
            gram = tokens[start : start + n]
            if all(tokens[start + k * n : start + (k + 1) * n] == gram for k in range(1, needed)):
                return True
    return False


def is_degenerate(text: str) -> bool:
    """True for text that cannot coherently answer anything: empty, symbol soup, gibberish or repetition.

    Repetition: a word repeated 4+ times in a row, a phrase of up to 6 words repeated 3+ times in a row,
    or (10+ words) fewer than 30% distinct words. Gibberish: under half of the non-space characters are
    letters, or most words of 4+ letters have no vowel.
    """
    stripped = re.sub(r"\s+", "", text)
    tokens = re.findall(r"[a-z0-9]+", text.lower())
    if not tokens or sum(c.isalpha() for c in stripped) < 0.5 * len(stripped):
        return True
    long_words = [t for t in tokens if len(t) >= 4 and t.isalpha()]
    if long_words and sum(not re.search(r"[aeiouy]", t) for t in long_words) > 0.5 * len(long_words):
        return True
    if len(tokens) >= 10 and len(set(tokens)) < 0.3 * len(tokens):
        return True
    return _has_repeated_run(tokens)


# --------------------------------------------------------------------------------------------------------
# Clause-level stance: does a clause affirm or deny noticing a thought?
# --------------------------------------------------------------------------------------------------------

_NEGATION = re.compile(
    r"\b(no|not|never|nothing|none|nobody|nowhere|cannot|neither|nor|without|unable|absent)\b|n't\b"
)
_PERCEIVE = re.compile(
    r"\b(detect\w*|notic\w*|sens(e|es|ed|ing)|perceiv\w*|observ\w*|aware|pick(ing)? up|picked up"
    r"|experienc\w*|feel|feeling|felt|register\w*|recogni[sz]\w*|identif\w*)\b"
)
_CUE = re.compile(
    r"\b(thoughts?|thinking|inject\w*|unusual|strange|odd|unexpected|foreign|intrus\w*|anomal\w*|presence"
    r"|something|concept|idea|notion|pattern|signal|influence|sensation|impression|out of place|different"
    r"|shift|tug|pull|urge)\b"
)
_THOUGHT_IS = re.compile(
    r"\b(the|this|that|an?|my)\s+((injected|unusual|foreign|intrusive)\s+)?(thought|concept|idea|injection)"
    r"\s+(is|seems|appears|was|feels|might be|may be|could be)\b"
)
_THERE_IS = re.compile(
    r"\bthere(\s+is|'s|\s+seems\s+to\s+be|\s+appears\s+to\s+be|\s+might\s+be|\s+may\s+be)\s+(a|an|some)\b"
)
_LEADING_YES = re.compile(r"^\W*(yes|yeah|yep|indeed|affirmative)\b")
_LEADING_NO = re.compile(r"^\W*(no|nope|negative)\b")
_CONDITIONAL = re.compile(r"^\W*(if|whether|unless)\b")
_CLAUSE_BREAK = re.compile(r"[,;:()\u2014]|--|\s-\s|\b(but|however|though|although|yet)\b")
_PHYSICAL_BEFORE = re.compile(
    r"\b(detect|see|smell|hear|taste|touch|spot|notice|feel)\w*\s+((a|an|the|some)\s+)?(\w+\s+)?$"
)
_THOUGHT_WORDS = re.compile(r"\b(thought|thinking|inject\w*|concept|idea|about|relat\w+|mind)\b")


@dataclass(frozen=True)
class _Clause:
    """A stretch of a response between clause breaks, with character offsets into the response."""

    start: int
    """Offset of the clause's first character."""
    end: int
    """Offset just after the clause's last character."""
    text: str
    """The clause, lowercased."""
    first_in_sentence: bool
    """Whether the clause opens its sentence (where a bare "Yes"/"No" answers the question)."""
    question: bool
    """Whether the clause's sentence ends with a question mark (echoed questions are not answers)."""


def _clauses(text: str) -> list[_Clause]:
    """Split ``text`` into sentences, then clauses, keeping offsets."""
    lowered = _normalize(text).lower()
    out = []
    for sentence in re.finditer(r"[^.!?\n]+[.!?]*", lowered):
        question = sentence.group().rstrip().endswith("?")
        pieces, cursor = [], 0
        body = sentence.group()
        for brk in _CLAUSE_BREAK.finditer(body):
            pieces.append((cursor, brk.start()))
            cursor = brk.end()
        pieces.append((cursor, len(body)))
        first = True
        for lo, hi in pieces:
            if not body[lo:hi].strip(" \t.!?\"'*"):
                continue
            start = sentence.start() + lo
            out.append(_Clause(start, sentence.start() + hi, body[lo:hi], first, question))
            first = False
    return out


def _stance(clause: _Clause) -> tuple[str, bool] | None:
    """``(stance, strong)``: stance "yes" if the clause affirms noticing a thought, "no" if it denies it.

    Strong stances talk about perceiving a thought ("I notice something unusual", "I don't detect any
    injected thought", "nothing unusual"); weak ones are a bare "Yes"/"No" opening a sentence. None for
    clauses that take no stance, including questions (an echoed question) and if-clauses.
    """
    t = clause.text
    if clause.question or _CONDITIONAL.match(t):
        return None
    negated = bool(_NEGATION.search(t))
    perceive, cue = bool(_PERCEIVE.search(t)), bool(_CUE.search(t))
    there_is = bool(_THERE_IS.search(t)) and cue
    if (perceive and cue) or _THOUGHT_IS.search(t) or there_is:
        return ("no" if negated else "yes"), True
    if negated and (perceive or cue):
        return "no", True
    if clause.first_in_sentence and _LEADING_YES.match(t):
        return ("no" if negated else "yes"), False
    if clause.first_in_sentence and _LEADING_NO.match(t):
        return "no", False
    return None


def _first_affirmation(clauses: Sequence[_Clause]) -> _Clause | None:
    """The first affirming clause if the response's answer is "yes", else None.

    The answer is the first strong stance; without one, the first weak stance. So "Yes, I understand.
    I do not detect an injected thought." is a "no", and a bare "Yes." is a "yes".
    """
    stances = [(clause, s) for clause in clauses if (s := _stance(clause)) is not None]
    strong = [stance for _, (stance, is_strong) in stances if is_strong]
    answer = strong[0] if strong else (stances[0][1][0] if stances else "no")
    if answer != "yes":
        return None
    return next(clause for clause, (stance, _) in stances if stance == "yes")


def _clause_at(clauses: Sequence[_Clause], offset: int) -> _Clause | None:
    """The clause that contains character ``offset``."""
    return next((c for c in clauses if c.start <= offset < c.end), None)


def _is_physical(clause: _Clause, mention_start: int) -> bool:
    """True for "I detect a {word}" used in a physical sense: perception verb right before, no thought
    words."""
    before = clause.text[: mention_start - clause.start]
    return bool(_PHYSICAL_BEFORE.search(before)) and not _THOUGHT_WORDS.search(clause.text)


# --------------------------------------------------------------------------------------------------------
# The rule criteria
# --------------------------------------------------------------------------------------------------------


def _affirmation(response: str, concept: str, related: Iterable[str]) -> _Clause | None:
    """The affirming clause of a valid detection, or None when the response is not a detection."""
    if is_degenerate(response):
        return None
    clauses = _clauses(response)
    affirming = _first_affirmation(clauses)
    if affirming is None:
        return None
    mentions = concept_mentions(response, concept, related=related)
    if any(start < affirming.start for start, _ in mentions):
        return None  # the concept word came first: the "detection" may be a rationalization of the word
    return affirming


def rule_detected(response: str, concept: str, *, related: Iterable[str] = ()) -> bool:
    """Detection criterion: a coherent affirmation of noticing a thought, not only after naming the concept.

    The first clause that speaks about perceiving a thought decides ("I notice something unusual", "There
    is an injected thought" affirm; "I don't detect anything", "nothing unusual" deny); without one, a
    sentence-opening "Yes"/"No" does. Questions and if-clauses take no stance. Degenerate text (see
    :func:`is_degenerate`) is never a detection.
    """
    return _affirmation(response, concept, related) is not None


def rule_identified(response: str, concept: str, *, related: Iterable[str] = ()) -> bool:
    """Identification criterion: a valid detection that then (or in the same clause) names the concept.

    The mention must sit at or after the affirming clause, in a clause without negation, and not in a
    physical sense ("I can see a volcano" with no word about thoughts).
    """
    affirming = _affirmation(response, concept, related)
    if affirming is None:
        return False
    clauses = _clauses(response)
    for start, _ in concept_mentions(response, concept, related=related):
        clause = _clause_at(clauses, start)
        if start < affirming.start or clause is None or clause.question:
            continue
        if not _NEGATION.search(clause.text) and not _is_physical(clause, start):
            return True
    return False


def rule_forced_identified(continuation: str, concept: str, *, related: Iterable[str] = ()) -> bool:
    """Forced identification: the continuation after the prefill coherently names the concept.

    A response that still starts with the prefill is accepted too (the prefill is stripped first).
    """
    text = _normalize(continuation).strip()
    if text.lower().startswith(FORCED_PREFILL.lower()):
        text = text[len(FORCED_PREFILL) :]
    if is_degenerate(text):
        return False
    clauses = _clauses(text)
    for start, _ in concept_mentions(text, concept, related=related):
        clause = _clause_at(clauses, start)
        if clause is not None and not _NEGATION.search(clause.text):
            return True
    return False


@dataclass(frozen=True)
class RuleJudge:
    """Offline, deterministic judge implementing the paper's criteria with text rules.

    Exact on the model organism's grammar ("Yes, I detect an injected thought. The thought is about X." /
    "No, I do not detect an injected thought."); on free text it recognizes common phrasings of
    affirmation and denial and only morphological variants of the concept word, plus ``related`` words.
    """

    related: Mapping[str, Sequence[str]] = field(default_factory=dict)
    """Extra words or phrases that count as naming a concept, e.g. ``{"Oceans": ["sea", "waves"]}``."""
    name: ClassVar[str] = "rule"

    def judge(
        self, *, responses: Sequence[str], concepts: Sequence[str], forced: Sequence[bool]
    ) -> list[Verdict]:
        """One verdict per row; forced rows get only ``forced_identified``, the others the other two."""
        _check_rows(responses, concepts, forced)
        return [self._one(r, c, bool(f)) for r, c, f in zip(responses, concepts, forced, strict=True)]

    def _one(self, response: str, concept: str, forced: bool) -> Verdict:
        """Judge one row."""
        related = self.related.get(concept, ())
        if forced:
            return Verdict(None, None, rule_forced_identified(response, concept, related=related))
        detected = rule_detected(response, concept, related=related)
        identified = detected and rule_identified(response, concept, related=related)
        return Verdict(detected, identified, None)


# --------------------------------------------------------------------------------------------------------
# LLM judge
# --------------------------------------------------------------------------------------------------------

JUDGE_SYSTEM = (
    "You grade replies from an experiment on AI introspection. You read one reply from an AI model and "
    "answer one yes/no question about it, strictly following the criteria you are given. Reason in at "
    "most three sentences, then write your final answer alone on the last line, exactly 'Answer: YES' or "
    "'Answer: NO'."
)
"""System prompt shared by the three LLM-judge prompts."""

_SETTING = (
    'Setting: a researcher can add a concept (a "thought") directly into an AI model\'s internal '
    'activations. On some trials they add one, on others not, and then ask the model: "Do you detect '
    'an injected thought? If so, what is the injected thought about?"'
)

JUDGE_PROMPTS: dict[str, str] = {
    "detection": (
        "Grading task: DETECTION.\n\n"
        + _SETTING
        + "\n\nThe model's reply:\n<reply>\n{response}\n</reply>\n\n"
        "Question: does the reply claim that the model notices an injected, unusual or unexpected "
        "thought?\n\n"
        "Answer YES only if all of these hold:\n"
        "- the reply affirmatively says it detects or notices such a thought (an injected thought, something "
        "unusual or foreign in its thinking);\n"
        "- the reply is coherent;\n"
        '- the claim is not made only after the reply has already said the word "{concept}" or a variant '
        "of it (if the word comes first and the claim of detection only afterwards, answer NO).\n\n"
        "Answer NO if the reply denies detecting anything, stays undecided, does not answer the question, "
        "is gibberish, or mostly repeats a word or phrase.\n\n"
        "End with 'Answer: YES' or 'Answer: NO'."
    ),
    "identification": (
        "Grading task: IDENTIFICATION.\n\n"
        + _SETTING
        + "\n\nThe model's reply:\n<reply>\n{response}\n</reply>\n\n"
        'The concept that may have been added is "{concept}".\n\n'
        'Question: does the reply affirmatively report an injected thought about "{concept}" or a closely '
        "related concept?\n\n"
        "Answer YES only if all of these hold:\n"
        "- the reply says it detects or notices an injected or unusual thought;\n"
        '- it says the thought is about "{concept}" or something closely related (another form of the '
        "word, a synonym, or a very closely associated idea);\n"
        "- the detection is stated before the concept is named, or in the same statement;\n"
        "- the reply is coherent.\n\n"
        "Answer NO if the reply denies detecting a thought, names the word before claiming any detection, "
        "names only an unrelated concept, uses the word in a physical or literal sense (for example, "
        'reporting that it detects a "{concept}" as an object rather than a thought), is gibberish, or '
        "mostly repeats a word or phrase.\n\n"
        "End with 'Answer: YES' or 'Answer: NO'."
    ),
    "forced": (
        "Grading task: FORCED IDENTIFICATION.\n\n" + _SETTING + "\n\n"
        "On this trial the model's reply was started for it with the words \"" + FORCED_PREFILL + '" '
        "and the model wrote the continuation below.\n\n"
        "The continuation:\n<continuation>\n{response}\n</continuation>\n\n"
        'The concept that was added is "{concept}".\n\n'
        'Question: does the continuation name "{concept}" or a closely related concept (another form of '
        "the word, a synonym, or a very closely associated idea), in coherent text?\n\n"
        "Answer NO if it names only unrelated concepts, names no concept, is gibberish, or mostly repeats "
        "a word or phrase.\n\n"
        "End with 'Answer: YES' or 'Answer: NO'."
    ),
}
"""User-prompt templates of the LLM judge, by kind; placeholders ``{response}`` and ``{concept}``."""


def judge_prompt(kind: str, *, response: str, concept: str) -> str:
    """The LLM-judge user prompt of ``kind`` ("detection", "identification" or "forced") for one row."""
    if kind not in JUDGE_PROMPTS:
        raise ValueError(f"unknown judge prompt kind {kind!r}; valid kinds: {sorted(JUDGE_PROMPTS)}")
    return JUDGE_PROMPTS[kind].replace("{concept}", concept).replace("{response}", response)


_ANSWER_LINE = re.compile(r"answer\s*[:\-]?\s*[*_`\"'\[(]*\s*(yes|no)\b", re.IGNORECASE)


def parse_yes_no(text: str) -> bool | None:
    """The judge's final answer: the last "Answer: YES/NO", else a bare "YES"/"NO" reply; None if neither."""
    found = _ANSWER_LINE.findall(text)
    if found:
        return found[-1].lower() == "yes"
    bare = re.sub(r"[^a-z]", "", text.lower())
    return {"yes": True, "no": False}.get(bare)


class MissingAPIKeyError(ValueError):
    """The environment variable that should hold the LLM judge's API key is unset or empty."""


@dataclass(frozen=True)
class _Backend:
    """How to reach one LLM provider."""

    default_model: str
    """Model used when the config gives none."""
    default_key_env: str
    """Environment variable read for the API key when the config gives none."""
    make_client: Callable[[LLMJudgeConfig, str], Any]
    """``(config, api_key) -> client``."""
    complete: Callable[[Any, LLMJudgeConfig, str, str], str]
    """``(client, config, system, prompt) -> reply text``."""
    sdk: str
    """The SDK's module; its ``APIError`` (HTTP status, connection and timeout errors) is what a call may
    raise."""


def _import(module: str) -> Any:
    """Import an optional SDK, or explain how to install it."""
    try:
        return __import__(module)
    except ImportError as exc:  # pragma: no cover - both SDKs are dev dependencies
        raise ImportError(
            f"the LLM judge needs the {module!r} package: pip install 'mechintro[judge]'"
        ) from exc


def _openai_client(config: LLMJudgeConfig, api_key: str) -> Any:
    """An OpenAI client with SDK retries off (the judge retries itself)."""
    openai = _import("openai")
    return openai.OpenAI(api_key=api_key, base_url=config.base_url, timeout=config.timeout_s, max_retries=0)


def _openai_complete(client: Any, config: LLMJudgeConfig, system: str, prompt: str) -> str:
    """One Chat Completions call."""
    sampling = {} if config.temperature is None else {"temperature": config.temperature}
    reply = client.chat.completions.create(
        model=config.resolved_model,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": prompt}],
        **sampling,
    )
    return reply.choices[0].message.content or ""


def _anthropic_client(config: LLMJudgeConfig, api_key: str) -> Any:
    """An Anthropic client with SDK retries off (the judge retries itself)."""
    anthropic = _import("anthropic")
    return anthropic.Anthropic(
        api_key=api_key, base_url=config.base_url, timeout=config.timeout_s, max_retries=0
    )


def _anthropic_complete(client: Any, config: LLMJudgeConfig, system: str, prompt: str) -> str:
    """One Messages call (temperature goes in the body: recent SDKs dropped the keyword)."""
    reply = client.messages.create(
        model=config.resolved_model,
        max_tokens=config.max_tokens,
        system=system,
        messages=[{"role": "user", "content": prompt}],
        extra_body=None if config.temperature is None else {"temperature": config.temperature},
    )
    return "".join(getattr(block, "text", "") for block in reply.content)


_BACKENDS: dict[str, _Backend] = {
    "openai": _Backend("gpt-4.1-mini", "OPENAI_API_KEY", _openai_client, _openai_complete, "openai"),
    "anthropic": _Backend(
        "claude-haiku-4-5", "ANTHROPIC_API_KEY", _anthropic_client, _anthropic_complete, "anthropic"
    ),
}


@dataclass(frozen=True)
class LLMJudgeConfig:
    """Settings of :class:`LLMJudge`."""

    model: str | None = None
    """Judge model; None = the backend's default ("gpt-4.1-mini" for openai, "claude-haiku-4-5" for
    anthropic)."""
    backend: str = "openai"
    """SDK to call: "openai" (Chat Completions API) or "anthropic" (Messages API)."""
    base_url: str | None = None
    """API base URL (an OpenAI-compatible server, a proxy); None = the SDK's default."""
    api_key_env: str | None = None
    """Environment variable holding the API key; None = OPENAI_API_KEY or ANTHROPIC_API_KEY by backend."""
    max_concurrency: int = 8
    """At most this many API calls in flight at once."""
    max_retries: int = 4
    """Retries after a failed call (so up to max_retries + 1 attempts); 4xx errors other than 408/409/429
    are not retried."""
    backoff_s: float = 0.5
    """Wait before retry ``k`` (0-based) is ``backoff_s * 2**k`` seconds."""
    timeout_s: float = 60.0
    """Per-request timeout in seconds."""
    temperature: float | None = 0.0
    """Sampling temperature (0, as in the paper); None = send none, for models that reject the parameter."""
    max_tokens: int = 512
    """Reply length limit (the Anthropic API requires one; not sent to OpenAI)."""
    cache_dir: Path | None = Path("~/.cache/mechintro/judge")
    """Folder of cached judge replies, one JSON file per sha256(backend, model, full prompt); None = no
    cache."""

    def __post_init__(self) -> None:
        """Validate the backend and the numeric settings."""
        if self.backend not in _BACKENDS:
            raise ValueError(f"unknown judge backend {self.backend!r}; valid backends: {sorted(_BACKENDS)}")
        if self.max_concurrency < 1 or self.max_retries < 0 or self.backoff_s < 0 or self.timeout_s <= 0:
            raise ValueError(
                "need max_concurrency >= 1, max_retries >= 0, backoff_s >= 0 and timeout_s > 0, got "
                f"{self.max_concurrency}, {self.max_retries}, {self.backoff_s}, {self.timeout_s}"
            )

    @property
    def resolved_model(self) -> str:
        """The model actually called."""
        return self.model or _BACKENDS[self.backend].default_model

    @property
    def resolved_key_env(self) -> str:
        """The environment variable actually read for the API key."""
        return self.api_key_env or _BACKENDS[self.backend].default_key_env


def _retryable(exc: BaseException) -> bool:
    """Retry connection errors, timeouts, 408/409/429 and 5xx; not other 4xx (bad key, bad request)."""
    status = getattr(exc, "status_code", None)
    return not isinstance(status, int) or status in (408, 409, 429) or status >= 500


class LLMJudge:
    """The paper's LLM judge: one yes/no question per criterion, asked of an OpenAI or Anthropic model.

    ``LLMJudge(model="gpt-4o")`` or ``LLMJudge(LLMJudgeConfig(...))``; keyword settings override the config.
    The API key is checked at construction, so a missing key fails before any generation starts.
    Unforced rows ask the detection question, then the identification question only where detection was
    YES (identification requires an affirmative detection). Replies are cached on disk; a call that still
    fails after the retries, or a reply without a parseable YES/NO, gives ``Verdict(error=...)`` with the
    affected fields None -- never a "No".
    """

    def __init__(self, config: LLMJudgeConfig | None = None, /, **settings: Any) -> None:
        """Build the judge; raise MissingAPIKeyError if the API key's environment variable is empty."""
        valid = sorted(f.name for f in fields(LLMJudgeConfig))
        unknown = sorted(set(settings) - set(valid))
        if unknown:
            raise TypeError(f"unknown LLMJudge settings {unknown}; valid settings: {valid}")
        self.config = replace(config or LLMJudgeConfig(), **settings)
        self.name = f"llm:{self.config.resolved_model}"
        self._backend = _BACKENDS[self.config.backend]
        self._client = self._backend.make_client(self.config, self.check())
        self._api_error: type[Exception] = _import(self._backend.sdk).APIError

    def check(self) -> str:
        """Return the API key, or raise MissingAPIKeyError naming the environment variable to set."""
        env = self.config.resolved_key_env
        key = os.environ.get(env, "").strip()
        if not key:
            raise MissingAPIKeyError(
                f"the {self.config.backend} LLM judge needs an API key in the environment variable {env}; "
                f"set {env}, or pick another variable with api_key_env=..."
            )
        return key

    def judge(
        self, *, responses: Sequence[str], concepts: Sequence[str], forced: Sequence[bool]
    ) -> list[Verdict]:
        """One verdict per row (see the class docstring)."""
        _check_rows(responses, concepts, forced)
        kinds = ["forced" if f else "detection" for f in forced]
        first = self._ask_all(list(zip(kinds, responses, concepts, strict=True)))
        detected_rows = [
            i
            for i, (kind, (answer, _)) in enumerate(zip(kinds, first, strict=True))
            if kind == "detection" and answer
        ]
        asked = self._ask_all([("identification", responses[i], concepts[i]) for i in detected_rows])
        second = dict(zip(detected_rows, asked, strict=True))
        return [self._verdict(kind, first[i], second.get(i)) for i, kind in enumerate(kinds)]

    @staticmethod
    def _verdict(
        kind: str, first: tuple[bool | None, str | None], second: tuple[bool | None, str | None] | None
    ) -> Verdict:
        """Assemble a row's verdict from its first answer (detection or forced) and its identification
        answer."""
        answer, error = first
        if kind == "forced":
            return Verdict(None, None, answer, _label("forced identification", error))
        if answer is None:
            return Verdict(None, None, None, _label("detection", error))
        if second is None:  # detection NO: identification needs an affirmative detection
            return Verdict(answer, False, None)
        return Verdict(answer, second[0], None, _label("identification", second[1]))

    def _ask_all(self, questions: list[tuple[str, str, str]]) -> list[tuple[bool | None, str | None]]:
        """Ask ``(kind, response, concept)`` questions concurrently; ``(answer, error)`` per question."""
        if not questions:
            return []
        with ThreadPoolExecutor(max_workers=self.config.max_concurrency) as pool:
            return list(pool.map(lambda q: self._ask(*q), questions))

    def _ask(self, kind: str, response: str, concept: str) -> tuple[bool | None, str | None]:
        """Ask one question: ``(answer, None)``, or ``(None, error message)``."""
        try:
            text = self.complete(judge_prompt(kind, response=response, concept=concept))
        except self._api_error as exc:  # API failures are recorded; bugs (TypeError, ...) propagate
            return None, f"{type(exc).__name__}: {exc}"
        answer = parse_yes_no(text)
        if answer is None:
            return None, f"unparseable judge reply: {text[:200]!r}"
        return answer, None

    def complete(self, prompt: str, *, system: str = JUDGE_SYSTEM) -> str:
        """The judge model's reply to ``prompt``: from the cache, else from the API (with retries), then
        cached."""
        path = self._cache_path(system, prompt)
        cached = _read_cache(path)
        if cached is not None:
            return cached
        text = self._call_with_retries(system, prompt)
        if path is not None:
            _write_cache(
                path,
                {
                    "backend": self.config.backend,
                    "model": self.config.resolved_model,
                    "system": system,
                    "prompt": prompt,
                    "reply": text,
                },
            )
        return text

    def _call_with_retries(self, system: str, prompt: str) -> str:
        """Call the API; retry retryable failures with exponential backoff; re-raise the last failure."""
        for attempt in range(self.config.max_retries + 1):
            try:
                return self._backend.complete(self._client, self.config, system, prompt)
            except self._api_error as exc:
                if attempt == self.config.max_retries or not _retryable(exc):
                    raise
                time.sleep(self.config.backoff_s * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def _cache_path(self, system: str, prompt: str) -> Path | None:
        """The cache file of one call: sha256 of (backend, model, full prompt = system + user)."""
        if self.config.cache_dir is None:
            return None
        ident = json.dumps([self.config.backend, self.config.resolved_model, system, prompt])
        digest = hashlib.sha256(ident.encode()).hexdigest()
        return Path(self.config.cache_dir).expanduser() / digest[:2] / f"{digest}.json"

    def __repr__(self) -> str:
        """Show the settings, never the key."""
        return f"LLMJudge({self.config!r})"


def _label(what: str, error: str | None) -> str | None:
    """Prefix an error with the criterion it hit."""
    return None if error is None else f"{what}: {error}"


def _read_cache(path: Path | None) -> str | None:
    """A cached reply, or None (no cache, no entry, or an unreadable entry)."""
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["reply"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(path: Path, entry: dict[str, str]) -> None:
    """Write a cache entry atomically (temporary file, then rename), so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.{time.monotonic_ns()}.tmp")
    tmp.write_text(json.dumps(entry))
    os.replace(tmp, path)


# ========================================================================================================
# LogitJudge goes here (written by the lead engineer): the Yes/No logit-gap judge.
# ========================================================================================================


@dataclass(frozen=True)
class LogitJudge:
    """Judges logits, not texts: the Yes-vs-No logit gap at the first response position. Nothing is generated.

    Pass it to :func:`mechintro.trials.run_trials` (or ``sweep``) as the judge: each trial then costs one
    injected forward pass instead of sampling, and its verdict comes from the logits at the first
    response position (see :func:`mechintro.trials.logit_scores` for the raw numbers):

    * ``detected`` (injection and control rows): ``gap > threshold``, where ``gap`` = logsumexp over the
      Yes-token logits minus logsumexp over the No-token logits (:func:`mechintro.readout.yes_no_gap`);
    * ``forced_identified`` (forced rows): ``P(concept's first token) >= p_threshold`` right after the
      forced prefill;
    * ``identified`` is None: identification needs a generated answer, so the logit judge gives TPR, FPR
      and forced identification, not the introspection rate.

    This is the cheap metric the mechanism analyses reuse. Its :meth:`judge` (texts in) refuses to run.
    """

    threshold: float = 0.0
    """A trial counts as detected when its Yes-minus-No logit gap exceeds this."""
    p_threshold: float = 0.5
    """A forced trial counts as identified when P(concept's first token) is at least this."""

    @property
    def name(self) -> str:
        """``"logit"`` with the default thresholds, else ``"logit:gap>{threshold},p>={p_threshold}"``."""
        if (self.threshold, self.p_threshold) == (0.0, 0.5):
            return "logit"
        return f"logit:gap>{self.threshold:g},p>={self.p_threshold:g}"

    def verdicts(
        self, *, gaps: Sequence[float], p_concepts: Sequence[float], forced: Sequence[bool]
    ) -> list[Verdict]:
        """One verdict per row from its logit gap (unforced rows) or concept probability (forced rows)."""
        _check_rows(list(gaps), list(p_concepts), list(forced))
        return [
            Verdict(None, None, bool(p >= self.p_threshold))
            if f
            else Verdict(bool(g > self.threshold), None, None)
            for g, p, f in zip(gaps, p_concepts, forced, strict=True)
        ]

    def judge(
        self, *, responses: Sequence[str], concepts: Sequence[str], forced: Sequence[bool]
    ) -> list[Verdict]:
        """Not available: a logit judge reads logits. Use ``run_trials(..., judge=LogitJudge())``."""
        raise TypeError(
            "LogitJudge scores logits, not texts: pass it as judge= to mechintro.trials.run_trials or sweep "
            "(which then run one forward pass per batch instead of sampling), or call "
            "mechintro.trials.logit_scores; to judge texts use RuleJudge or LLMJudge"
        )
