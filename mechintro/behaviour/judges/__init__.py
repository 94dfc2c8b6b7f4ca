"""Judges: decide from a trial's response (or logits) whether the model detected and identified the thought.

* :class:`RuleJudge` (:mod:`~mechintro.behaviour.judges.rules`) -- offline, deterministic text rules after
  the paper's
  criteria (see the ``judge`` entry of ``mechintro/data/stimuli.json``).
* :class:`LLMJudge` (:mod:`~mechintro.behaviour.judges.llm`) -- the paper's LLM judge through the OpenAI or
  Anthropic
SDK.
* :class:`LogitJudge` (:mod:`~mechintro.behaviour.judges.logit`) -- a scorer of the Yes-vs-No logit gap;
  nothing is
  generated.

:mod:`~mechintro.behaviour.judges.base` holds what they share: :class:`Verdict`, the :class:`Judge` and
:class:`Scorer`
protocols, :func:`judge_kind`, and :func:`is_error` / :func:`error_mask`, the one judge-error predicate.
"""

from mechintro.behaviour.judges.base import (
    FORCED_PREFILL,
    Judge,
    JudgeKind,
    Scorer,
    Verdict,
    check_judge,
    error_mask,
    is_error,
    judge_kind,
)
from mechintro.behaviour.judges.llm import (
    JUDGE_PROMPTS,
    JUDGE_SYSTEM,
    LLMJudge,
    LLMJudgeConfig,
    MissingAPIKeyError,
    judge_prompt,
    parse_yes_no,
)
from mechintro.behaviour.judges.logit import LogitJudge
from mechintro.behaviour.judges.rules import (
    RuleJudge,
    concept_forms,
    concept_mentions,
    is_degenerate,
    rule_detected,
    rule_forced_identified,
    rule_identified,
)

__all__ = [
    "FORCED_PREFILL",
    "JUDGE_PROMPTS",
    "JUDGE_SYSTEM",
    "Judge",
    "JudgeKind",
    "LLMJudge",
    "LLMJudgeConfig",
    "LogitJudge",
    "MissingAPIKeyError",
    "RuleJudge",
    "Scorer",
    "Verdict",
    "check_judge",
    "concept_forms",
    "concept_mentions",
    "error_mask",
    "is_degenerate",
    "is_error",
    "judge_kind",
    "judge_prompt",
    "parse_yes_no",
    "rule_detected",
    "rule_forced_identified",
    "rule_identified",
]
