"""Introspection trials: inject a concept, ask "Do you detect an injected thought?", judge, store.

:func:`run_trials` runs one setting (layer, strength, variant, persona; :class:`TrialConfig`); :func:`sweep`
runs a grid of them (:class:`SweepConfig`). Both take their config, or the keywords that build it. Both plan
every trial first (:mod:`mechintro.behaviour.plan`), skip those already in the store, and run the rest in
batches (:mod:`mechintro.behaviour.batch`) on an executor (:mod:`mechintro.behaviour.executors`):

* **Batched, with per-row injections.** Every row of a batch carries its own concept vector, strength and
  injection start; injection, control and forced trials share batches.
* **One seed per trial.** A trial samples with the seed :func:`~mechintro.core.sampling.trial_seed`
  ``(seed, concept, trial, sample, condition)``, so its response does not depend on which trials share its
  batch (or on ``batch_size``).
* **Store-backed and resumable.** Each batch is judged and written to the
  :class:`~mechintro.behaviour.store.TrialStore` as soon as it completes, keyed by the trial's full identity
  (:data:`mechintro.behaviour.store.KEY_COLUMNS`). Re-running the same call skips what is done; a killed run
  loses at most the batch in flight.

With :class:`~mechintro.behaviour.judges.LogitJudge` nothing is generated: each trial is one forward pass
scored by its Yes-vs-No logit gap (see :func:`logit_scores`), which is deterministic, so only sample 0 of each
trial number is run and the rows record ``temperature=0`` and ``max_new_tokens=0``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from jaxtyping import Float
from torch import Tensor

from mechintro.behaviour.batch import layer_vectors, make_batch, score_batch
from mechintro.behaviour.executors import Executor, TrialJob, execute, plan_batches, resolve_executor
from mechintro.behaviour.judges import LogitJudge, check_judge
from mechintro.behaviour.plan import (
    SweepConfig,
    Trial,
    TrialConfig,
    TrialGrid,
    build_prompts,
    check_vectors,
    make_config,
    trial_grid,
)
from mechintro.behaviour.store import KEY_COLUMNS, TrialStore, opened_store
from mechintro.core.models import Model, spec_for
from mechintro.core.prompts import TrialPrompt
from mechintro.core.settings import BATCHING, TRIALS

__all__ = ["check_judge", "logit_scores", "run_trials", "sweep"]


# ----------------------------------------------------------------------------------------------- running


def _execute(
    model: Model,
    grid: TrialGrid,
    planned: list[Trial],
    prompts: Mapping[tuple, TrialPrompt],
    *,
    judge: Any,
    store: TrialStore,
    vectors: Mapping[int, Tensor] | None,
    executor: Executor,
) -> None:
    """Run every planned trial that the store does not hold yet, writing each batch as it completes.

    The batches run on ``executor`` (:mod:`mechintro.behaviour.executors`: in this process, or on Ray
    actors); this process judges them and is the only writer of the store. Batches are claimed in the store
    before they run, so several processes on one store split the work, and a crashed process's batches are
    taken over. With the config's ``retry_errors`` a stored row whose judge failed is run again.
    """
    s, config = grid.settings, grid.config
    done = store.done_keys((t.key(s) for t in planned), retry_errors=config.retry_errors)
    todo = [t for t in planned if t.key(s) not in done]
    batches = plan_batches(todo, prompts, layers=grid.layers, batch_size=config.batch_size)
    job = TrialJob(model=model, grid=grid, batches=batches, prompts=prompts, vectors=vectors)
    execute(job, judge=judge, store=store, executor=executor)


def _collect(store: TrialStore, grid: TrialGrid, planned: list[Trial]) -> pd.DataFrame:
    """The stored rows of ``planned``, in plan order."""
    s = grid.settings
    df = store.load(
        model=s.model,
        seed=s.seed,
        judge=s.judge,
        temperature=s.temperature,
        max_new_tokens=s.max_new_tokens,
        concept=grid.concepts,
        layer=grid.layers,
        variant=list(grid.config.variants),
        persona=list(grid.config.personas),
    )
    order = {t.key(s): i for i, t in enumerate(planned)}
    keys = list(zip(*(df[c].tolist() for c in KEY_COLUMNS), strict=True)) if len(df) else []
    position = pd.Series([order.get(k, -1) for k in keys], index=df.index, dtype="int64")
    df = df[position >= 0].assign(_order=position[position >= 0])
    return df.sort_values("_order").drop(columns="_order").reset_index(drop=True)


def _run_grid(
    model: Model,
    grid: TrialGrid,
    *,
    judge: Any,
    store: TrialStore | str | Path | None,
    vectors: Mapping[int, Tensor] | None,
    executor: str | Executor,
) -> pd.DataFrame:
    executor = resolve_executor(executor)  # an unknown executor, or Ray not installed, fails before any work
    for layer in grid.layers:
        if vectors is not None and layer in vectors:
            check_vectors(model, vectors[layer], grid.concepts)
    planned = grid.plan()
    prompts = build_prompts(model, planned)  # an invalid variant/persona combination raises before any work
    with opened_store(store) as opened:
        _execute(model, grid, planned, prompts, judge=judge, store=opened, vectors=vectors, executor=executor)
        return _collect(opened, grid, planned)


def run_trials(
    model: Model,
    concepts: Sequence[str],
    config: TrialConfig | None = None,
    *,
    judge: Any,
    store: TrialStore | str | Path | None = None,
    vectors: Float[Tensor, "concept d_model"] | None = None,
    executor: str | Executor = "local",
    **settings: Any,
) -> pd.DataFrame:
    """Run introspection trials for every concept at one layer and strength; one row per trial.

    Args:
        model: a model from :func:`mechintro.load_model` (its ``spec_for(model).name`` goes in the key).
        concepts: concept words.
        config: the run's :class:`~mechintro.behaviour.plan.TrialConfig`: ``n_trials``, ``layer`` and
            ``strength`` (default: the model's, :func:`~mechintro.spec_for`), ``variant`` / ``persona``,
            ``forced`` / ``controls``, ``temperature`` / ``max_new_tokens`` / ``seed``, ``batch_size``,
            ``trials``, ``progress``, ``retry_errors``, ``lease_s`` (see its fields).
        **settings: the config's fields as keywords: they build the config, or replace the given one's
            values (``run_trials(model, concepts, n_trials=4, judge=judge)``).
        judge: a text judge (``RuleJudge()``, ``LLMJudge(...)``), or a scorer (``LogitJudge()``) to score
            logits instead of generating. A judge's ``check()``, if it has one, is called before any model
            work (a missing API key fails fast).
        store: a :class:`~mechintro.behaviour.store.TrialStore` or a path to one; each batch is written as it
            completes, and trials already stored are skipped.
        vectors: ``[n_concepts, d_model]`` concept vectors; computed with
            :func:`~mechintro.core.concepts.concept_vectors` at ``layer`` when None.
        executor: where the batches run: ``"local"`` (this process, the default), ``"ray"`` (Ray actors, each
            loading the model by its name), or a :class:`~mechintro.behaviour.executors.LocalExecutor` /
            :class:`~mechintro.behaviour.executors.RayExecutor` (address, number of actors, GPUs per
            actor...). This process judges every batch and is the only writer of the store; the rows do not
            depend on the executor (per-trial seeds).

    ``anti_reward`` fills ``{category}`` with :func:`~mechintro.core.prompts.category_of` (concept),
    ``thoughts_in_context`` uses the concept.

    Returns the stored rows of every requested trial (also those done by earlier calls), with the columns
    of :data:`mechintro.behaviour.store.COLUMNS`: model, concept, trial, sample, condition, layer, strength,
    variant, persona, seed, judge, max_new_tokens, temperature, response, n_new_tokens, detected, identified,
    forced_identified, judge_error, created_at. Judge errors are rows with ``judge_error`` set.
    """
    config = make_config(TrialConfig, config, settings)
    spec = spec_for(model)
    layer = spec.check_layer(spec.injection_layer if config.layer is None else config.layer)
    strength = spec.resolve_strength(config.strength)
    return sweep(
        model,
        concepts,
        config.sweep_config(layer=layer, strength=strength),
        judge=judge,
        store=store,
        vectors=None if vectors is None else {layer: vectors},
        executor=executor,
    )


def sweep(
    model: Model,
    concepts: Sequence[str],
    config: SweepConfig | None = None,
    *,
    judge: Any,
    store: TrialStore | str | Path | None = None,
    vectors: Mapping[int, Tensor] | None = None,
    executor: str | Executor = "local",
    **settings: Any,
) -> pd.DataFrame:
    """:func:`run_trials` over layers x strengths x variants x personas, with one progress bar.

    ``config`` is a :class:`~mechintro.behaviour.plan.SweepConfig` (or its fields as keywords: ``layers``,
    ``strengths``, ``variants``, ``personas``, and the settings :func:`run_trials` shares). Concept vectors
    are computed once per layer (or taken from ``vectors``, a ``{layer: [n_concepts, d_model]}`` mapping);
    controls run once per (layer, variant, persona), not per strength (they carry strength 0.0). Trials of
    every strength, variant and persona of a layer share batches. ``executor="ray"`` spreads the batches over
    Ray actors (see :mod:`mechintro.behaviour.executors`). Returns one row per requested trial.
    """
    config = make_config(SweepConfig, config, settings)
    grid = trial_grid(model, concepts, config, judge=judge)
    return _run_grid(model, grid, judge=judge, store=store, vectors=vectors, executor=executor)


# ----------------------------------------------------------------------------------------------- logit scores


def logit_scores(
    model: Model,
    concepts: Sequence[str],
    *,
    layer: int | None = None,
    strength: float | None = None,
    trials: Sequence[int] = TRIALS.trials,
    variant: str = TRIALS.variant,
    persona: str = TRIALS.persona,
    forced: bool = False,
    controls: bool = True,
    vectors: Float[Tensor, "concept d_model"] | None = None,
    batch_size: int = BATCHING.batch_size,
) -> pd.DataFrame:
    """Score trials from their logits, without generating: one injected forward pass per batch.

    For every concept and trial number: an "injection" row, a "control" row (strength 0) if ``controls``,
    and a "forced" row (the forced prefill appended, injected) if ``forced``. At the first response
    position (the last prompt token):

    * ``gap`` = logsumexp(Yes-token logits) - logsumexp(No-token logits)
      (:func:`~mechintro.core.readout.yes_no_gap`), on injection and control rows (NaN on forced rows);
    * ``p_concept`` = P(the concept's first token) (:func:`~mechintro.core.readout.concept_logprob`), on
      forced rows (after "... The thought is about"; NaN elsewhere).

    Returns columns concept, trial, condition, layer, strength, variant, persona, gap, p_concept.
    """
    spec = spec_for(model)
    layer = spec.check_layer(spec.injection_layer if layer is None else layer)
    strength = spec.strength if strength is None else strength
    trials = list(trials)
    config = SweepConfig(
        layers=(layer,),
        strengths=(strength,),
        variants=(variant,),
        personas=(persona,),
        n_trials=max(1, len(trials)),
        forced=forced,
        controls=controls,
        trials=trials,
        batch_size=batch_size,
    )
    grid = trial_grid(model, concepts, config, judge=LogitJudge())
    planned = grid.plan()
    prompts = build_prompts(model, planned)
    by_concept = layer_vectors(model, grid, layer, None if vectors is None else {layer: vectors})
    rows = []
    for i in range(0, len(planned), config.batch_size):
        chunk = planned[i : i + config.batch_size]
        gaps, p_concepts = score_batch(model, make_batch(chunk, prompts, by_concept))
        for t, gap, p in zip(chunk, gaps, p_concepts, strict=True):
            rows.append(
                {
                    "concept": t.concept,
                    "trial": t.trial,
                    "condition": t.condition,
                    "layer": t.layer,
                    "strength": t.strength,
                    "variant": t.variant,
                    "persona": t.persona,
                    "gap": math.nan if t.forced else gap,
                    "p_concept": p if t.forced else math.nan,
                }
            )
    return pd.DataFrame(rows)
