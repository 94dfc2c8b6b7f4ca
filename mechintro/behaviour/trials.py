"""Introspection trials: inject a concept, ask "Do you detect an injected thought?", judge, store.

:func:`run_trials` runs one setting (layer, strength, variant, persona); :func:`sweep` runs a grid of them.
Both plan every trial first, skip those already in the store, and run the rest in batches:

* **Batched, with per-row injections.** Every row of a batch carries its own concept vector, strength and
  injection start (through :func:`mechintro.core.steering.inject`); the KV cache is on; injection, control and
  forced trials share batches (a control row is injected with strength 0, which adds exactly nothing).
* **One seed per trial.** A trial samples with the seed :func:`trial_seed` ``(seed, concept, trial, sample,
  condition)``, and :func:`mechintro.core.sampling.sample` draws each row from its own generator, so a trial's
  response does not depend on which trials share its batch (or on ``batch_size``).
* **Store-backed and resumable.** Each batch is judged and written to the
  :class:`~mechintro.behaviour.store.TrialStore`
  as soon as it completes, keyed by the trial's full identity (:data:`mechintro.behaviour.store.KEY_COLUMNS`).
  Re-running the same call skips what is done; a killed run loses at most the batch in flight.

Trial numbering follows the paper: a concept's ``n_trials`` trials cycle through the trial numbers
(``trials``, 1..10 by default) and ``sample`` counts the repeats, so 100 trials = 10 numbers x 10 samples.

With :class:`~mechintro.behaviour.judges.LogitJudge` nothing is generated: each trial is one forward pass
scored by its
Yes-vs-No logit gap (see :func:`logit_scores`), which is deterministic, so only sample 0 of each trial
number is run and the rows record ``temperature=0`` and ``max_new_tokens=0``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from mechintro.behaviour.judges import LogitJudge, Verdict, check_judge, judge_kind
from mechintro.behaviour.store import KEY_COLUMNS, TrialStore
from mechintro.core import validate
from mechintro.core.concepts import check_concepts, concept_vectors
from mechintro.core.models import Model, spec_for
from mechintro.core.prompts import (
    PERSONAS,
    VARIANTS,
    PaddedBatch,
    TrialPrompt,
    category_of,
    forced_prefill,
    left_pad,
    trial_prompt,
)
from mechintro.core.readout import concept_logprob, concept_token_ids, yes_no_gap
from mechintro.core.sampling import Prefix, can_share_prefix, prefill, prompt_logits, sample, trial_seed
from mechintro.core.settings import BATCHING, CONDITIONS, SAMPLING, STORE, TRIALS, check_choices
from mechintro.core.steering import inject

if TYPE_CHECKING:
    from mechintro.behaviour.executors import Executor

__all__ = [
    "CONDITIONS",
    "PAPER_TRIALS",
    "RunSettings",
    "Trial",
    "build_prompts",
    "check_judge",
    "logit_scores",
    "plan_trials",
    "run_trials",
    "sweep",
    "trial_seed",
    "verdict_columns",
]

PAPER_TRIALS = TRIALS.trials
"""The paper's trial numbers (1..10)."""


@dataclass(frozen=True)
class RunSettings:
    """What every trial of one call shares; with a :class:`Trial` it makes the trial's store key."""

    model: str
    """Model identity: ``spec_for(model).name``."""
    seed: int
    """The run's seed, from which every trial's own seed is derived (:func:`trial_seed`)."""
    judge: str
    """The judge's ``name``."""
    temperature: float
    """Sampling temperature (0 = greedy; 0 also for the logit judge, which samples nothing)."""
    max_new_tokens: int
    """Upper bound on generated tokens (0 for the logit judge)."""


@dataclass(frozen=True)
class Trial:
    """One planned trial."""

    concept: str
    """The concept label (control rows keep it too, so each concept has its own controls)."""
    trial: int
    """The trial number written into the prompt ("Trial {trial}")."""
    sample: int
    """Repeat index of this trial number (0-based)."""
    condition: str
    """One of :data:`CONDITIONS`."""
    strength: float
    """Injection strength (0.0 for controls)."""
    layer: int
    """Injection layer (resid_post of this block)."""
    variant: str
    """Prompt variant (:data:`mechintro.core.prompts.VARIANTS`)."""
    persona: str
    """Persona variant (:data:`mechintro.core.prompts.PERSONAS`)."""

    @property
    def forced(self) -> bool:
        return self.condition == "forced"

    def row(self, settings: RunSettings) -> dict[str, Any]:
        """The identity columns of this trial's store row."""
        return asdict(self) | asdict(settings)

    def key(self, settings: RunSettings) -> tuple:
        """The store key, in :data:`mechintro.behaviour.store.KEY_COLUMNS` order."""
        row = self.row(settings)
        return tuple(row[c] for c in KEY_COLUMNS)


# ----------------------------------------------------------------------------------------------- validation


def _check_int(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_strengths(strengths: Iterable[Any]) -> list[float]:
    out = []
    for s in [strengths] if isinstance(strengths, (numbers.Real, str)) else strengths:
        if isinstance(s, (bool, str)) or not isinstance(s, numbers.Real):
            raise ValueError(f"strength must be a finite number, got {s!r} ({type(s).__name__})")
        value = float(s)
        if not math.isfinite(value):
            raise ValueError(f"strength must be a finite number, got {s!r}")
        out.append(value)
    if not out:
        raise ValueError("no strengths given")
    return list(dict.fromkeys(out))


def _check_trials(trials: Iterable[int]) -> list[int]:
    trials = list(trials)
    if not trials or len(set(trials)) != len(trials):
        raise ValueError(f"trials must be distinct trial numbers (the paper uses 1..10), got {trials!r}")
    return [_check_int("a trial number", t, minimum=1) for t in trials]


def _check_vectors(
    model: Model, vectors: Tensor, concepts: Sequence[str]
) -> Float[Tensor, "concept d_model"]:
    vectors = torch.as_tensor(vectors).detach().float().cpu()
    if vectors.ndim != 2 or vectors.shape[0] != len(concepts):
        raise ValueError(
            f"vectors must be [n_concepts={len(concepts)}, d_model], got shape {tuple(vectors.shape)}"
        )
    validate.d_model_of(model, vectors.shape[1], what="vectors")
    if not torch.isfinite(vectors).all():
        raise ValueError("vectors have NaN or inf entries")
    return vectors


# ----------------------------------------------------------------------------------------------- planning


def plan_trials(
    concepts: Sequence[str],
    *,
    layer: int,
    strengths: Sequence[float],
    variant: str,
    persona: str,
    n_trials: int,
    trials: Sequence[int] = PAPER_TRIALS,
    forced: bool = False,
    controls: bool = True,
    deterministic: bool = False,
) -> list[Trial]:
    """Every trial of one (layer, variant, persona): controls once, injection and forced rows per strength.

    ``deterministic=True`` (scoring without sampling) keeps only sample 0 of each trial number.
    """
    trials = list(trials)
    n = min(n_trials, len(trials)) if deterministic else n_trials
    pairs = [(trials[i % len(trials)], i // len(trials)) for i in range(n)]
    conditions = [("control", 0.0)] if controls else []
    conditions += [("injection", s) for s in strengths]
    conditions += [("forced", s) for s in strengths] if forced else []
    return [
        Trial(concept, t, k, condition, float(strength), layer, variant, persona)
        for concept in concepts
        for condition, strength in conditions
        for t, k in pairs
    ]


@dataclass(frozen=True)
class _Grid:
    """A validated call: what to plan and how to run it."""

    concepts: list[str]
    layers: list[int]
    strengths: list[float]
    variants: list[str]
    personas: list[str]
    trials: list[int]
    n_trials: int
    forced: bool
    controls: bool
    settings: RunSettings

    @property
    def scores_logits(self) -> bool:
        return self.settings.max_new_tokens == 0

    def plan(self) -> list[Trial]:
        return [
            trial
            for layer in self.layers
            for variant in self.variants
            for persona in self.personas
            for trial in plan_trials(
                self.concepts,
                layer=layer,
                strengths=self.strengths,
                variant=variant,
                persona=persona,
                n_trials=self.n_trials,
                trials=self.trials,
                forced=self.forced,
                controls=self.controls,
                deterministic=self.scores_logits,
            )
        ]


def _grid(
    model: Model,
    concepts: Sequence[str],
    *,
    layers: Iterable[int],
    strengths: Iterable[float],
    variants: Iterable[str],
    personas: Iterable[str],
    n_trials: int,
    judge: Any,
    forced: bool,
    controls: bool,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    trials: Iterable[int],
) -> _Grid:
    """Validate everything a run needs before any model work (the judge's ``check()`` included)."""
    spec = spec_for(model)
    layers = [spec.check_layer(layer) for layer in ([layers] if isinstance(layers, int) else layers)]
    if not layers or len(set(layers)) != len(layers):
        raise ValueError(f"layers must be distinct, valid layers 0..{spec.n_layers - 1}, got {layers!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    name = check_judge(judge)
    logit = judge_kind(judge) == "logits"
    settings = RunSettings(
        model=spec.name,
        seed=_check_int("seed", seed, minimum=0),
        judge=name,
        temperature=0.0 if logit else float(temperature),
        max_new_tokens=0 if logit else _check_int("max_new_tokens", max_new_tokens, minimum=1),
    )
    return _Grid(
        concepts=check_concepts(concepts),
        layers=layers,
        strengths=_check_strengths(strengths),
        variants=check_choices("prompt variant", variants, VARIANTS),
        personas=check_choices("persona", personas, PERSONAS),
        trials=_check_trials(trials),
        n_trials=_check_int("n_trials", n_trials, minimum=1),
        forced=bool(forced),
        controls=bool(controls),
        settings=settings,
    )


# ----------------------------------------------------------------------------------------------- prompts


def _prompt_key(trial: Trial) -> tuple:
    """What a trial's prompt depends on."""
    category = category_of(trial.concept) if trial.variant == "anti_reward" else None
    thoughts = trial.concept if trial.variant == "thoughts_in_context" else None
    return (trial.trial, trial.variant, trial.persona, trial.forced, category, thoughts)


def build_prompts(model: Model, planned: Iterable[Trial]) -> dict[tuple, TrialPrompt]:
    """The tokenized prompt of every planned trial, by :func:`_prompt_key` (invalid combinations raise
    here)."""
    prompts: dict[tuple, TrialPrompt] = {}
    for trial in planned:
        key = _prompt_key(trial)
        if key not in prompts:
            number, variant, persona, forced, category, thoughts = key
            prompts[key] = trial_prompt(
                model,
                trial=number,
                variant=variant,
                persona=persona,
                prefill=forced_prefill() if forced else None,
                category=category,
                thoughts=thoughts,
            )
    return prompts


# ----------------------------------------------------------------------------------------------- one batch


@dataclass(frozen=True)
class _Batch:
    """The trials of one batch with everything their forward passes need."""

    trials: list[Trial]
    prompts: list[TrialPrompt]
    vectors: Float[Tensor, "batch d_model"]
    strengths: Float[Tensor, " batch"]

    @property
    def layer(self) -> int:
        return self.trials[0].layer


def _make_batch(
    chunk: list[Trial], prompts: Mapping[tuple, TrialPrompt], vectors: Mapping[str, Tensor]
) -> _Batch:
    return _Batch(
        trials=chunk,
        prompts=[prompts[_prompt_key(t)] for t in chunk],
        vectors=torch.stack([vectors[t.concept] for t in chunk]),
        strengths=torch.tensor([t.strength for t in chunk], dtype=torch.float32),
    )


def _padded(model: Model, batch: _Batch) -> tuple[PaddedBatch, Prefix | None]:
    """The batch padded after the prompt prefix its rows share (up to the earliest injection start), and that
    prefix's cache, computed once before the injection is installed (it adds nothing there). Without sharing
    (hooks around the call that are not the same for every row) plain left padding."""
    share = can_share_prefix(model)
    padded = left_pad(batch.prompts, pad_id=model.tokenizer.pad_token_id, share_prefix=share)
    return padded, prefill(model, padded) if padded.prefix else None


def _generate(model: Model, batch: _Batch, settings: RunSettings) -> tuple[list[str], list[int]]:
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
def _scores(model: Model, batch: _Batch) -> tuple[list[float], list[float]]:
    """One injected forward pass: (Yes-No logit gap, P(concept's first token)) at the first response
    position."""
    padded, prefix = _padded(model, batch)
    with inject(model, batch.vectors, layer=batch.layer, strength=batch.strengths, start=padded.starts):
        logits = prompt_logits(model, padded, prefix=prefix)
    logits = logits.float()
    ids = concept_token_ids(model, [t.concept for t in batch.trials])
    gap = yes_no_gap(logits, spec_for(model))
    return gap.cpu().tolist(), concept_logprob(logits, ids).exp().cpu().tolist()


def verdict_columns(verdict: Verdict) -> dict[str, Any]:
    return {
        "detected": verdict.detected,
        "identified": verdict.identified,
        "forced_identified": verdict.forced_identified,
        "judge_error": verdict.error,
    }


@dataclass(frozen=True)
class _Outputs:
    """What the model produced for one batch, before judging: responses, or logit scores."""

    responses: list[str | None]
    """Generated texts (None per row when scoring logits)."""
    lengths: list[int]
    """New tokens per row (0 when scoring logits)."""
    gaps: list[float] | None = None
    """Yes-No logit gaps (logit scoring only)."""
    p_concepts: list[float] | None = None
    """P(concept's first token) (logit scoring only)."""


def _batch_outputs(model: Model, batch: _Batch, *, settings: RunSettings, scores: bool) -> _Outputs:
    """Generate (or, with ``scores``, score the logits of) one batch: the model's part of a batch, which a
    worker process can run without the judge."""
    if scores:
        gaps, p_concepts = _scores(model, batch)
        return _Outputs([None] * len(gaps), [0] * len(gaps), gaps, p_concepts)
    responses, lengths = _generate(model, batch, settings)
    return _Outputs(responses, lengths)


def _judged_rows(
    trials: Sequence[Trial], out: _Outputs, *, judge: Any, settings: RunSettings
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


# ----------------------------------------------------------------------------------------------- running


@contextmanager
def _open_store(store: TrialStore | str | Path | None) -> Iterator[TrialStore]:
    """The given store; a store opened (and closed) here for a path; an in-memory one for None."""
    if isinstance(store, TrialStore):
        yield store
        return
    opened = TrialStore(":memory:" if store is None else store)
    try:
        yield opened
    finally:
        opened.close()


def _chunks(items: list[Trial], size: int) -> Iterator[list[Trial]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _layer_vectors(
    model: Model, grid: _Grid, layer: int, given: Mapping[int, Tensor] | None
) -> dict[str, Float[Tensor, " d_model"]]:
    """Concept -> vector at ``layer``: the given ones, else computed once here."""
    if given is not None and layer in given:
        vectors = _check_vectors(model, given[layer], grid.concepts)
    else:
        vectors = concept_vectors(model, grid.concepts, layer=layer)
    return dict(zip(grid.concepts, vectors, strict=True))


def _execute(
    model: Model,
    grid: _Grid,
    planned: list[Trial],
    prompts: Mapping[tuple, TrialPrompt],
    *,
    judge: Any,
    store: TrialStore,
    batch_size: int,
    vectors: Mapping[int, Tensor] | None,
    progress: bool,
    retry_errors: bool,
    lease_s: float,
    executor: Executor,
) -> None:
    """Run every planned trial that the store does not hold yet, writing each batch as it completes.

    The batches run on ``executor`` (:mod:`mechintro.behaviour.executors`: in this process, or on Ray
    actors); this
    process judges them and is the only writer of the store. Batches are claimed in the store before they
    run, so several processes on one store split the work, and a crashed process's batches are taken over.
    With ``retry_errors`` a stored row whose judge failed is run again.
    """
    from mechintro.behaviour.executors import TrialJob, execute, plan_batches

    s = grid.settings
    done = store.done_keys((t.key(s) for t in planned), retry_errors=retry_errors)
    todo = [t for t in planned if t.key(s) not in done]
    batches = plan_batches(todo, prompts, layers=grid.layers, batch_size=batch_size)
    job = TrialJob(model=model, grid=grid, batches=batches, prompts=prompts, vectors=vectors)
    execute(
        job,
        judge=judge,
        store=store,
        executor=executor,
        progress=progress,
        retry_errors=retry_errors,
        lease_s=lease_s,
    )


def _collect(store: TrialStore, grid: _Grid, planned: list[Trial]) -> pd.DataFrame:
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
        variant=grid.variants,
        persona=grid.personas,
    )
    order = {t.key(s): i for i, t in enumerate(planned)}
    keys = list(zip(*(df[c].tolist() for c in KEY_COLUMNS), strict=True)) if len(df) else []
    position = pd.Series([order.get(k, -1) for k in keys], index=df.index, dtype="int64")
    df = df[position >= 0].assign(_order=position[position >= 0])
    return df.sort_values("_order").drop(columns="_order").reset_index(drop=True)


def _run_grid(
    model: Model,
    grid: _Grid,
    *,
    judge: Any,
    store: TrialStore | str | Path | None,
    batch_size: int,
    vectors: Mapping[int, Tensor] | None,
    progress: bool,
    retry_errors: bool,
    lease_s: float,
    executor: str | Executor,
) -> pd.DataFrame:
    from mechintro.behaviour.executors import resolve_executor

    executor = resolve_executor(executor)  # an unknown executor, or Ray not installed, fails before any work
    _check_int("batch_size", batch_size, minimum=1)
    if not (isinstance(lease_s, (int, float)) and math.isfinite(lease_s) and lease_s > 0):
        raise ValueError(f"lease_s must be a positive number of seconds, got {lease_s!r}")
    for layer in grid.layers:
        if vectors is not None and layer in vectors:
            _check_vectors(model, vectors[layer], grid.concepts)
    planned = grid.plan()
    prompts = build_prompts(model, planned)  # an invalid variant/persona combination raises before any work
    with _open_store(store) as opened:
        _execute(
            model,
            grid,
            planned,
            prompts,
            judge=judge,
            store=opened,
            batch_size=batch_size,
            vectors=vectors,
            progress=progress,
            retry_errors=bool(retry_errors),
            lease_s=float(lease_s),
            executor=executor,
        )
        return _collect(opened, grid, planned)


def run_trials(
    model: Model,
    concepts: Sequence[str],
    *,
    layer: int | None = None,
    strength: float | None = None,
    n_trials: int,
    judge: Any,
    variant: str = TRIALS.variant,
    persona: str = TRIALS.persona,
    forced: bool = False,
    controls: bool = True,
    temperature: float = SAMPLING.temperature,
    max_new_tokens: int = SAMPLING.max_new_tokens,
    seed: int = SAMPLING.seed,
    batch_size: int = BATCHING.batch_size,
    store: TrialStore | str | Path | None = None,
    trials: Sequence[int] = TRIALS.trials,
    vectors: Float[Tensor, "concept d_model"] | None = None,
    progress: bool = True,
    retry_errors: bool = STORE.retry_errors,
    lease_s: float = STORE.lease_s,
    executor: str | Executor = "local",
) -> pd.DataFrame:
    """Run introspection trials for every concept at one layer and strength; one row per trial.

    Args:
        model: a model from :func:`mechintro.load_model` (its ``spec_for(model).name`` goes in the key).
        concepts: concept words.
        layer: injection layer (resid_post of this block); default: the model's (:func:`~mechintro.spec_for`).
        strength: injection strength (scales the raw concept vector); default: the model's.
        n_trials: trials per concept and condition, cycling through ``trials`` (``sample`` = repeat count).
        judge: a text judge (``RuleJudge()``, ``LLMJudge(...)``), or a scorer (``LogitJudge()``) to score
            logits instead of generating. A judge's ``check()``, if it has one, is called before any model
            work (a missing API key fails fast).
        variant / persona: prompt and persona variant; ``anti_reward`` fills ``{category}`` with
            :func:`~mechintro.core.prompts.category_of` (concept), ``thoughts_in_context`` uses the concept.
        forced: also run "forced" trials (the forced-identification prefill appended, injected).
        controls: also run "control" trials (the same prompts, strength 0).
        temperature / max_new_tokens: sampling settings (defaults: :data:`mechintro.core.settings.SAMPLING`).
        seed: the run seed; each trial samples with :func:`~mechintro.core.sampling.trial_seed`.
        batch_size: rows per batch (results do not depend on it).
        store: a :class:`~mechintro.behaviour.store.TrialStore` or a path to one; each batch is written as it
            completes, and trials already stored are skipped.
        trials: trial numbers to cycle through (the paper's 1..10).
        vectors: ``[n_concepts, d_model]`` concept vectors; computed with
            :func:`~mechintro.core.concepts.concept_vectors` at ``layer`` when None.
        progress: show a progress bar.
        retry_errors: run again the stored trials whose judge failed (default); False keeps their error rows.
        lease_s: how long a claimed batch stays reserved for this process in a shared store (renewed while it
            runs); several processes on one store split the batches, and a crashed one's are taken over.
        executor: where the batches run: ``"local"`` (this process, the default), ``"ray"`` (Ray actors, each
            loading the model by its name), or a :class:`~mechintro.behaviour.executors.LocalExecutor` /
            :class:`~mechintro.behaviour.executors.RayExecutor` (address, number of actors, GPUs per
            actor...). This
            process judges every batch and is the only writer of the store; the rows do not depend on the
            executor (per-trial seeds).

    Returns the stored rows of every requested trial (also those done by earlier calls), with the columns
    of :data:`mechintro.behaviour.store.COLUMNS`: model, concept, trial, sample, condition, layer, strength,
    variant,
    persona, seed, judge, max_new_tokens, temperature, response, n_new_tokens, detected, identified,
    forced_identified, judge_error, created_at. Judge errors are rows with ``judge_error`` set.
    """
    spec = spec_for(model)
    layer = spec.injection_layer if layer is None else layer
    strength = spec.strength if strength is None else strength
    return sweep(
        model,
        concepts,
        layers=[layer],
        strengths=[strength],
        n_trials=n_trials,
        judge=judge,
        variants=[variant],
        personas=[persona],
        forced=forced,
        controls=controls,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=seed,
        batch_size=batch_size,
        store=store,
        trials=trials,
        vectors=None if vectors is None else {spec.check_layer(layer): vectors},
        progress=progress,
        retry_errors=retry_errors,
        lease_s=lease_s,
        executor=executor,
    )


def sweep(
    model: Model,
    concepts: Sequence[str],
    *,
    layers: Sequence[int],
    strengths: Sequence[float],
    n_trials: int,
    judge: Any,
    variants: Sequence[str] = (TRIALS.variant,),
    personas: Sequence[str] = (TRIALS.persona,),
    forced: bool = False,
    controls: bool = True,
    temperature: float = SAMPLING.temperature,
    max_new_tokens: int = SAMPLING.max_new_tokens,
    seed: int = SAMPLING.seed,
    batch_size: int = BATCHING.batch_size,
    store: TrialStore | str | Path | None = None,
    trials: Sequence[int] = TRIALS.trials,
    vectors: Mapping[int, Tensor] | None = None,
    progress: bool = True,
    retry_errors: bool = STORE.retry_errors,
    lease_s: float = STORE.lease_s,
    executor: str | Executor = "local",
) -> pd.DataFrame:
    """:func:`run_trials` over layers x strengths x variants x personas, with one progress bar.

    Concept vectors are computed once per layer (or taken from ``vectors``, a ``{layer: [n_concepts,
    d_model]}`` mapping); controls run once per (layer, variant, persona), not per strength (they carry
    strength 0.0). Trials of every strength, variant and persona of a layer share batches. The other
    settings are those of :func:`run_trials` (``executor="ray"`` spreads the batches over Ray actors; see
    :mod:`mechintro.behaviour.executors`). Returns one row per requested trial.
    """
    grid = _grid(
        model,
        concepts,
        layers=layers,
        strengths=strengths,
        variants=variants,
        personas=personas,
        n_trials=n_trials,
        judge=judge,
        forced=forced,
        controls=controls,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=seed,
        trials=trials,
    )
    return _run_grid(
        model,
        grid,
        judge=judge,
        store=store,
        vectors=vectors,
        batch_size=batch_size,
        progress=progress,
        retry_errors=retry_errors,
        lease_s=lease_s,
        executor=executor,
    )


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
      forced
      rows (after "... The thought is about"; NaN elsewhere).

    Returns columns concept, trial, condition, layer, strength, variant, persona, gap, p_concept.
    """
    spec = spec_for(model)
    layer = spec.check_layer(spec.injection_layer if layer is None else layer)
    strength = spec.strength if strength is None else strength
    trials = list(trials)
    grid = _grid(
        model,
        concepts,
        layers=[layer],
        strengths=[strength],
        variants=[variant],
        personas=[persona],
        n_trials=max(1, len(trials)),
        judge=LogitJudge(),
        forced=forced,
        controls=controls,
        temperature=0.0,
        max_new_tokens=1,
        seed=0,
        trials=trials,
    )
    _check_int("batch_size", batch_size, minimum=1)
    planned = grid.plan()
    prompts = build_prompts(model, planned)
    by_concept = _layer_vectors(model, grid, layer, None if vectors is None else {layer: vectors})
    rows = []
    for chunk in _chunks(planned, batch_size):
        gaps, p_concepts = _scores(model, _make_batch(chunk, prompts, by_concept))
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
