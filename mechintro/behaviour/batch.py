"""One batch of planned trials: what a worker computes (:func:`batch_outputs`) and what the driver makes of it
(:func:`judged_rows`).

* **Per-row injections.** Every row of a batch carries its own concept vector, strength and injection start
  (through :func:`mechintro.core.steering.inject`); the KV cache is on; injection, control and forced trials
  share batches (a control row is injected with strength 0, which adds exactly nothing).
* **One seed per trial.** A row samples with its trial's seed (:func:`mechintro.core.sampling.trial_seed`)
  from its own generator, so a trial's response does not depend on which trials share its batch.
* **Logit scoring.** With a logit judge nothing is generated: one injected forward pass gives each row's
  Yes-vs-No logit gap and the probability of its concept's first token (:func:`score_batch`).

A worker (this process, or a Ray actor: :mod:`mechintro.behaviour.executors`) runs :func:`batch_outputs`
without the judge; the driver judges the outputs into store rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechintro.behaviour.judges import Verdict
from mechintro.behaviour.plan import RunSettings, Trial, TrialGrid, check_vectors, prompt_key
from mechintro.core.concepts import concept_vectors
from mechintro.core.models import Model, spec_for
from mechintro.core.prompts import PaddedBatch, TrialPrompt, left_pad
from mechintro.core.readout import concept_logprob, concept_token_ids, yes_no_gap
from mechintro.core.sampling import Prefix, can_share_prefix, prefill, prompt_logits, sample, trial_seed
from mechintro.core.steering import inject

__all__ = [
    "Batch",
    "Outputs",
    "batch_outputs",
    "generate_batch",
    "judged_rows",
    "layer_vectors",
    "make_batch",
    "score_batch",
    "verdict_columns",
]


@dataclass(frozen=True)
class Batch:
    """The trials of one batch with everything their forward passes need."""

    trials: list[Trial]
    """The batch's trials (all at one layer)."""
    prompts: list[TrialPrompt]
    """Each trial's tokenized prompt."""
    vectors: Float[Tensor, "batch d_model"]
    """Each trial's concept vector."""
    strengths: Float[Tensor, " batch"]
    """Each trial's injection strength (0 for controls)."""

    @property
    def layer(self) -> int:
        return self.trials[0].layer


def make_batch(
    chunk: list[Trial], prompts: Mapping[tuple, TrialPrompt], vectors: Mapping[str, Tensor]
) -> Batch:
    """The batch of ``chunk``: prompts by :func:`~mechintro.behaviour.plan.prompt_key`, vectors by concept."""
    return Batch(
        trials=chunk,
        prompts=[prompts[prompt_key(t)] for t in chunk],
        vectors=torch.stack([vectors[t.concept] for t in chunk]),
        strengths=torch.tensor([t.strength for t in chunk], dtype=torch.float32),
    )


def layer_vectors(
    model: Model, grid: TrialGrid, layer: int, given: Mapping[int, Tensor] | None
) -> dict[str, Float[Tensor, " d_model"]]:
    """Concept -> vector at ``layer``: the given ones, else computed here."""
    if given is not None and layer in given:
        vectors = check_vectors(model, given[layer], grid.concepts)
    else:
        vectors = concept_vectors(model, grid.concepts, layer=layer)
    return dict(zip(grid.concepts, vectors, strict=True))


def _padded(model: Model, batch: Batch) -> tuple[PaddedBatch, Prefix | None]:
    """The batch padded after the prompt prefix its rows share (up to the earliest injection start), and that
    prefix's cache, computed once before the injection is installed (it adds nothing there). Without sharing
    (hooks around the call that are not the same for every row) plain left padding."""
    share = can_share_prefix(model)
    padded = left_pad(batch.prompts, pad_id=model.tokenizer.pad_token_id, share_prefix=share)
    return padded, prefill(model, padded) if padded.prefix else None


def generate_batch(model: Model, batch: Batch, settings: RunSettings) -> tuple[list[str], list[int]]:
    """Sample every row of ``batch`` under its own injection; (response texts, new-token counts)."""
    padded, prefix = _padded(model, batch)
    seeds = [trial_seed(settings.seed, t.concept, t.trial, t.sample, t.condition) for t in batch.trials]
    with inject(model, batch.vectors, layer=batch.layer, strength=batch.strengths, start=padded.starts):
        out = sample(
            model,
            padded,
            max_new_tokens=settings.max_new_tokens,
            seeds=seeds,
            temperature=settings.temperature,
            prefix=prefix,
        )
    return out.texts(model.tokenizer), out.lengths.tolist()


@torch.no_grad()
def score_batch(model: Model, batch: Batch) -> tuple[list[float], list[float]]:
    """One injected forward pass: (Yes-No logit gap, P(concept's first token)) at the first response
    position."""
    padded, prefix = _padded(model, batch)
    with inject(model, batch.vectors, layer=batch.layer, strength=batch.strengths, start=padded.starts):
        logits = prompt_logits(model, padded, prefix=prefix)
    logits = logits.float()
    ids = concept_token_ids(model, [t.concept for t in batch.trials])
    gap = yes_no_gap(logits, spec_for(model))
    return gap.cpu().tolist(), concept_logprob(logits, ids).exp().cpu().tolist()


@dataclass(frozen=True)
class Outputs:
    """What the model produced for one batch, before judging: responses, or logit scores."""

    responses: list[str | None]
    """Generated texts (None per row when scoring logits)."""
    lengths: list[int]
    """New tokens per row (0 when scoring logits)."""
    gaps: list[float] | None = None
    """Yes-No logit gaps (logit scoring only)."""
    p_concepts: list[float] | None = None
    """P(concept's first token) (logit scoring only)."""


def batch_outputs(model: Model, batch: Batch, *, settings: RunSettings, scores: bool) -> Outputs:
    """Generate (or, with ``scores``, score the logits of) one batch: the model's part of a batch, which a
    worker process can run without the judge."""
    if scores:
        gaps, p_concepts = score_batch(model, batch)
        return Outputs([None] * len(gaps), [0] * len(gaps), gaps, p_concepts)
    responses, lengths = generate_batch(model, batch, settings)
    return Outputs(responses, lengths)


def verdict_columns(verdict: Verdict) -> dict[str, Any]:
    """A verdict as the store's verdict columns."""
    return {
        "detected": verdict.detected,
        "identified": verdict.identified,
        "forced_identified": verdict.forced_identified,
        "judge_error": verdict.error,
    }


def judged_rows(
    trials: Sequence[Trial], out: Outputs, *, judge: Any, settings: RunSettings
) -> list[dict[str, Any]]:
    """Judge one batch's outputs; one store row per trial."""
    forced = [t.forced for t in trials]
    if out.gaps is not None:
        verdicts = judge.score(gaps=out.gaps, p_concepts=out.p_concepts, forced=forced)
    else:
        concepts = [t.concept for t in trials]
        verdicts = judge.judge(responses=out.responses, concepts=concepts, forced=forced)
    if len(verdicts) != len(trials):
        raise ValueError(f"the judge returned {len(verdicts)} verdicts for {len(trials)} trials")
    return [
        t.row(settings) | {"response": r, "n_new_tokens": n} | verdict_columns(v)
        for t, r, n, v in zip(trials, out.responses, out.lengths, verdicts, strict=True)
    ]
