"""mechintro: concept injection, introspection trials and circuit analysis (arXiv 2603.21396).

The public API is re-exported here; see README.md for a tour.
"""

from mechintro.concepts import (
    all_concepts,
    baseline_words,
    concept_vectors,
    heldout_concepts,
    new_concepts,
    original_concepts,
    training_concepts,
)
from mechintro.judges import LLMJudge, LogitJudge, RuleJudge
from mechintro.metrics import detection_metrics
from mechintro.models import HookNames, ModelSpec, load_model, spec_for
from mechintro.prompts import PERSONAS, VARIANTS, TrialPrompt, forced_prefill, left_pad, trial_prompt
from mechintro.sampling import sample
from mechintro.steering import inject
from mechintro.store import StoreError, TrialStore
from mechintro.transcoders import encode_at, load_transcoders
from mechintro.trials import run_trials, sweep

__all__ = [
    "HookNames",
    "LLMJudge",
    "LogitJudge",
    "RuleJudge",
    "StoreError",
    "TrialStore",
    "detection_metrics",
    "run_trials",
    "sweep",
    "ModelSpec",
    "PERSONAS",
    "TrialPrompt",
    "VARIANTS",
    "all_concepts",
    "baseline_words",
    "concept_vectors",
    "encode_at",
    "forced_prefill",
    "heldout_concepts",
    "inject",
    "left_pad",
    "load_model",
    "load_transcoders",
    "new_concepts",
    "original_concepts",
    "sample",
    "spec_for",
    "training_concepts",
    "trial_prompt",
]
