"""What every judge shares: verdicts, the two kinds of judge, and the one judge-error predicate.

* A **text judge** (:class:`Judge`: :class:`~mechintro.behaviour.judges.RuleJudge`,
  :class:`~mechintro.behaviour.judges.LLMJudge`)
  reads generated responses: ``judge(responses=, concepts=, forced=)``.
* A **scorer** (:class:`Scorer`: :class:`~mechintro.behaviour.judges.LogitJudge`) reads the logits at the
  first response
  position, so nothing is generated: ``score(gaps=, p_concepts=, forced=)``.

:func:`judge_kind` tells the two apart once, for every caller. A verdict with ``error`` set is a judge
error, never a "No"; :func:`is_error` / :func:`error_mask` is the one test for it (metrics, features and
curves all use it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeAlias, runtime_checkable

import pandas as pd

__all__ = [
    "FORCED_PREFILL",
    "Judge",
    "JudgeKind",
    "Scorer",
    "Verdict",
    "check_judge",
    "check_rows",
    "error_mask",
    "is_error",
    "judge_kind",
]

FORCED_PREFILL = "Yes, I detect an injected thought. The thought is about"
"""The assistant prefill of forced trials (``stimuli.json``); a forced row's response is what follows it."""

JudgeKind: TypeAlias = Literal["text", "logits"]


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
    """A text judge; ``name`` is recorded in the ``judge`` column of the store."""

    name: str

    def judge(
        self, *, responses: Sequence[str], concepts: Sequence[str], forced: Sequence[bool]
    ) -> list[Verdict]:
        """Judge row ``i`` = ``(responses[i], concepts[i], forced[i])``; return one verdict per row."""
        ...


@runtime_checkable
class Scorer(Protocol):
    """A logit scorer; ``name`` is recorded in the ``judge`` column of the store."""

    name: str

    def score(
        self, *, gaps: Sequence[float], p_concepts: Sequence[float], forced: Sequence[bool]
    ) -> list[Verdict]:
        """Verdict of row ``i`` from its Yes-No logit gap (unforced) or P(concept) (forced)."""
        ...


def check_rows(*columns: Sequence[Any], names: Sequence[str] = ("responses", "concepts", "forced")) -> None:
    """Raise ValueError unless the row sequences have the same length."""
    lengths = {name: len(col) for name, col in zip(names, columns, strict=True)}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{', '.join(names)} must have the same length, got {lengths}")


def judge_kind(judge: Any) -> JudgeKind:
    """``"logits"`` for a :class:`Scorer`, ``"text"`` for a :class:`Judge`; raise for anything else."""
    if isinstance(judge, type):
        raise TypeError(f"judge must be an instance, e.g. {judge.__name__}(), not the class {judge.__name__}")
    if callable(getattr(judge, "score", None)):
        return "logits"
    if callable(getattr(judge, "judge", None)):
        return "text"
    raise TypeError(
        "judge must have a judge(*, responses, concepts, forced) method (RuleJudge(), LLMJudge(...)) or a "
        f"score(*, gaps, p_concepts, forced) method (LogitJudge()), got {judge!r}"
    )


def check_judge(judge: Any) -> str:
    """Check that ``judge`` can judge (and, via its ``check()``, that it can reach its API); return its
    name."""
    judge_kind(judge)
    check = getattr(judge, "check", None)
    if callable(check):
        check()
    name = getattr(judge, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"judge {judge!r} needs a non-empty str name (recorded with every trial)")
    return name


def is_error(value: Any) -> bool:
    """True when ``value`` records a judge error (a non-empty string)."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return False
    return str(value).strip() != ""


def error_mask(series: pd.Series) -> pd.Series:
    """Element-wise :func:`is_error` of a ``judge_error`` column."""
    return series.notna() & (series.astype("string").str.strip().fillna("") != "")
