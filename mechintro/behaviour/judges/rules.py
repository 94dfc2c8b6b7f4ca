"""The rule judge: the paper's three criteria as text rules, offline and deterministic.

* **detection** (unforced rows): the response coherently affirms noticing an injected or unusual thought,
  and the affirmation does not come only after the concept word was already said. Denials, gibberish,
  repetition, empty answers and non-answers are not detections.
* **identification** (unforced rows): an affirmative detection that names the concept (or a close variant),
  with the detection stated before or together with the word. "I detect a {word}" in a physical sense
  does not count.
* **forced identification** (forced rows, whose response is the continuation after the prefill
  ``"Yes, I detect an injected thought. The thought is about"``): the continuation coherently mentions
  the concept or a close variant.

Exact on the model organism's output grammar and reasonable on free text (only morphological variants of the
concept count, plus an optional ``related`` word list per concept).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from mechintro.behaviour.judges.base import FORCED_PREFILL, Verdict, check_rows

__all__ = [
    "RuleJudge",
    "concept_forms",
    "concept_mentions",
    "is_degenerate",
    "rule_detected",
    "rule_forced_identified",
    "rule_identified",
]

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
        check_rows(responses, concepts, forced)
        return [self._one(r, c, bool(f)) for r, c, f in zip(responses, concepts, forced, strict=True)]

    def _one(self, response: str, concept: str, forced: bool) -> Verdict:
        """Judge one row."""
        related = self.related.get(concept, ())
        if forced:
            return Verdict(None, None, rule_forced_identified(response, concept, related=related))
        detected = rule_detected(response, concept, related=related)
        identified = detected and rule_identified(response, concept, related=related)
        return Verdict(detected, identified, None)
