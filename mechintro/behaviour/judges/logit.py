"""The logit judge: a scorer that reads the Yes-vs-No logit gap at the first response position.

Nothing is generated, so a trial costs one injected forward pass:
:func:`mechintro.behaviour.trials.run_trials` (or
``sweep``) with ``judge=LogitJudge()`` scores each batch instead of sampling it, and
:func:`mechintro.behaviour.trials.logit_scores` gives the raw numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from mechintro.behaviour.judges.base import Verdict, check_rows
from mechintro.core import validate

__all__ = ["LogitJudge"]


@dataclass(frozen=True)
class LogitJudge:
    """Verdicts from logits at the first response position (a :class:`~mechintro.behaviour.judges.Scorer`).

    * ``detected`` (injection and control rows): ``gap > threshold``, where ``gap`` = logsumexp over the
      Yes-token logits minus logsumexp over the No-token logits (:func:`mechintro.core.readout.yes_no_gap`);
    * ``forced_identified`` (forced rows): ``P(concept's first token) >= p_threshold`` right after the
      forced prefill;
    * ``identified`` is None: identification needs a generated answer, so the logit judge gives TPR, FPR
      and forced identification, not the introspection rate.
    """

    threshold: float = 0.0
    """A trial counts as detected when its Yes-minus-No logit gap exceeds this (any finite number)."""
    p_threshold: float = 0.5
    """A forced trial counts as identified when P(concept's first token) is at least this (in [0, 1])."""

    def __post_init__(self) -> None:
        for name, value in (("threshold", self.threshold), ("p_threshold", self.p_threshold)):
            validate.finite_number(f"LogitJudge {name}", value)
        if not 0.0 <= self.p_threshold <= 1.0:
            raise ValueError(f"LogitJudge p_threshold is a probability in [0, 1], got {self.p_threshold!r}")

    @property
    def name(self) -> str:
        """``"logit"`` with the default thresholds, else ``"logit:gap>{threshold},p>={p_threshold}"``."""
        if (self.threshold, self.p_threshold) == (0.0, 0.5):
            return "logit"
        return f"logit:gap>{self.threshold:g},p>={self.p_threshold:g}"

    def score(
        self, *, gaps: Sequence[float], p_concepts: Sequence[float], forced: Sequence[bool]
    ) -> list[Verdict]:
        """One verdict per row from its logit gap (unforced rows) or concept probability (forced rows).

        A NaN score (a row whose score could not be computed) is a judge error, never a "No".
        """
        check_rows(list(gaps), list(p_concepts), list(forced), names=("gaps", "p_concepts", "forced"))
        out = []
        for g, p, f in zip(gaps, p_concepts, forced, strict=True):
            value = p if f else g
            if not math.isfinite(value):
                out.append(Verdict(None, None, None, error=f"non-finite logit score {value!r}"))
            elif f:
                out.append(Verdict(None, None, bool(p >= self.p_threshold)))
            else:
                out.append(Verdict(bool(g > self.threshold), None, None))
        return out
