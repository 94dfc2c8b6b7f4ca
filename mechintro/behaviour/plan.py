"""The plan of a trial run: its settings (:class:`TrialConfig`, :class:`SweepConfig`), the trials they ask
for (:class:`Trial`, :func:`plan_trials`, :class:`TrialGrid`) and the tokenized prompt of each
(:func:`build_prompts`).

Nothing here runs the model: :mod:`mechintro.behaviour.batch` computes one batch of planned trials,
:mod:`mechintro.behaviour.executors` runs the batches, and :mod:`mechintro.behaviour.trials` ties them to the
store.

Trial numbering follows the paper: a concept's ``n_trials`` trials cycle through the trial numbers
(``trials``, 1..10 by default) and ``sample`` counts the repeats, so 100 trials = 10 numbers x 10 samples. A
trial samples with its own seed (:func:`trial_seed`), so its response does not depend on its batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import torch
from jaxtyping import Float
from torch import Tensor

from mechintro.behaviour.judges import check_judge, judge_kind
from mechintro.behaviour.rows import KEY_COLUMNS
from mechintro.core import validate
from mechintro.core.concepts import check_concepts
from mechintro.core.models import Model, spec_for
from mechintro.core.prompts import PERSONAS, VARIANTS, TrialPrompt, category_of, forced_prefill, trial_prompt
from mechintro.core.sampling import trial_seed
from mechintro.core.settings import BATCHING, CONDITIONS, SAMPLING, STORE, TRIALS, check_choices

__all__ = [
    "CONDITIONS",
    "PAPER_TRIALS",
    "RunConfig",
    "RunSettings",
    "SweepConfig",
    "Trial",
    "TrialConfig",
    "TrialGrid",
    "build_prompts",
    "check_vectors",
    "make_config",
    "plan_trials",
    "prompt_key",
    "trial_grid",
    "trial_seed",
]

PAPER_TRIALS = TRIALS.trials
"""The paper's trial numbers (1..10)."""


# ----------------------------------------------------------------------------------------------- configs


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """What every trial run is set with, whatever its grid: how many trials, which conditions, how they are
    sampled and batched, and how the store is used (the shared part of :class:`TrialConfig` and
    :class:`SweepConfig`).

    Defaults come from :mod:`mechintro.core.settings`. A field's ``metadata`` tells
    :mod:`mechintro.cli.options` how its command-line flag is spelled and parsed.
    """

    n_trials: int = field(metadata={"parse": "count"})
    """Trials per concept and condition, cycling through the trial numbers (``sample`` counts the repeats;
    the paper used 100)."""
    forced: bool = field(default=False, metadata={"help": "also run forced-identification trials"})
    """Also run "forced" trials (the forced-identification prefill appended, injected)."""
    controls: bool = True
    """Also run "control" trials (the same prompts, strength 0)."""
    temperature: float = SAMPLING.temperature
    """Sampling temperature (0 = greedy; ignored by a logit judge, which samples nothing)."""
    max_new_tokens: int = field(default=SAMPLING.max_new_tokens, metadata={"parse": "count"})
    """Upper bound on generated tokens per trial (ignored by a logit judge)."""
    seed: int = field(default=SAMPLING.seed, metadata={"parse": "non_negative"})
    """The run's seed; every trial samples with its own seed derived from it (:func:`trial_seed`)."""
    batch_size: int = field(default=BATCHING.batch_size, metadata={"parse": "count"})
    """Rows per batch (the rows do not depend on it)."""
    trials: tuple[int, ...] = TRIALS.trials
    """The trial numbers to cycle through (the paper's 1..10)."""
    progress: bool = field(
        default=True, metadata={"flag": "--quiet", "dest": "quiet", "negate": True, "help": "no progress bar"}
    )
    """Show a progress bar."""
    retry_errors: bool = field(
        default=STORE.retry_errors,
        metadata={"help": "keep stored trials whose judge failed instead of running them again"},
    )
    """Run again the stored trials whose judge failed; False keeps their error rows."""
    lease_s: float = field(default=STORE.lease_s, metadata={"parse": "positive"})
    """Seconds a claimed batch stays reserved for this process in a shared store (renewed while it runs);
    several processes on one store split the batches, and a crashed one's are taken over."""

    def __post_init__(self) -> None:
        """Check every field (errors name it) and store it in its canonical type."""
        set_ = object.__setattr__
        set_(self, "n_trials", validate.count("n_trials", self.n_trials))
        for name in ("forced", "controls", "progress", "retry_errors"):
            set_(self, name, bool(getattr(self, name)))
        temperature = validate.finite_number("temperature", self.temperature)
        if temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        set_(self, "temperature", temperature)
        set_(self, "max_new_tokens", validate.count("max_new_tokens", self.max_new_tokens))
        set_(self, "seed", validate.integer("seed", self.seed, minimum=0))
        set_(self, "batch_size", validate.count("batch_size", self.batch_size))
        set_(self, "trials", _check_trials(self.trials))
        set_(self, "lease_s", validate.positive_number("lease_s", self.lease_s, unit="of seconds"))

    def shared(self) -> dict[str, Any]:
        """The values of the fields every run config has (:class:`RunConfig`'s)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(RunConfig)}


@dataclass(frozen=True, kw_only=True)
class TrialConfig(RunConfig):
    """The settings of :func:`~mechintro.behaviour.trials.run_trials`: one layer, strength, prompt variant and
    persona, and the shared run settings (:class:`RunConfig`)."""

    layer: int | None = None
    """Injection layer (resid_post of this block); None (the default) = the model's injection layer."""
    strength: float | str | None = field(default=None, metadata={"parse": "strength"})
    """Injection strength (it scales the raw concept vector), or the name of one of the model's operating
    points, e.g. saturated; None (the default) = the model's default strength."""
    variant: str = TRIALS.variant
    """Prompt variant (one of mechintro.core.prompts.VARIANTS)."""
    persona: str = TRIALS.persona
    """Persona variant (one of mechintro.core.prompts.PERSONAS)."""

    def __post_init__(self) -> None:
        """Check every field (errors name it)."""
        super().__post_init__()
        if self.layer is not None:
            object.__setattr__(self, "layer", validate.integer("layer", self.layer))
        if self.strength is not None and not isinstance(self.strength, str):
            object.__setattr__(self, "strength", validate.finite_number("strength", self.strength))
        check_choices("prompt variant", [self.variant], VARIANTS)
        check_choices("persona", [self.persona], PERSONAS)

    def sweep_config(self, *, layer: int, strength: float) -> SweepConfig:
        """This run as the one-setting :class:`SweepConfig` at ``layer`` and ``strength``."""
        return SweepConfig(
            **self.shared(),
            layers=(layer,),
            strengths=(strength,),
            variants=(self.variant,),
            personas=(self.persona,),
        )


@dataclass(frozen=True, kw_only=True)
class SweepConfig(RunConfig):
    """The settings of :func:`~mechintro.behaviour.trials.sweep`: the grid of layers x strengths x variants x
    personas, and the shared run settings (:class:`RunConfig`)."""

    layers: tuple[int, ...] | None = None
    """Injection layers, e.g. 0,1,2; None (the default) = the model's injection layer."""
    strengths: tuple[float, ...] | None = None
    """Injection strengths, e.g. 1,2,4,8 (repeats dropped); None (the default) = the model's strength sweep
    (ModelSpec.strength_sweep)."""
    variants: tuple[str, ...] = (TRIALS.variant,)
    """Prompt variants (of mechintro.core.prompts.VARIANTS)."""
    personas: tuple[str, ...] = (TRIALS.persona,)
    """Persona variants (of mechintro.core.prompts.PERSONAS)."""

    def __post_init__(self) -> None:
        """Check every field (errors name it) and store the lists as tuples."""
        super().__post_init__()
        set_ = object.__setattr__
        if self.layers is not None:
            layers = [self.layers] if validate.is_integer(self.layers) else list(self.layers)
            set_(self, "layers", tuple(validate.integer("layer", layer) for layer in layers))
        if self.strengths is not None:
            set_(self, "strengths", tuple(validate.strength_list(self.strengths)))
        set_(self, "variants", tuple(check_choices("prompt variant", self.variants, VARIANTS)))
        set_(self, "personas", tuple(check_choices("persona", self.personas, PERSONAS)))


Config = TypeVar("Config", bound=RunConfig)


def make_config(cls: type[Config], config: Config | None, settings: Mapping[str, Any]) -> Config:
    """The config a call runs with: ``config`` (a ``cls``), with ``settings`` (keywords naming its fields)
    replacing its values; without ``config``, ``cls(**settings)``. An unknown keyword raises naming the
    valid ones."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(settings) - set(names))
    if unknown:
        raise TypeError(f"unknown {cls.__name__} settings {unknown}; valid: {names}")
    if config is None:
        return cls(**settings)
    if not isinstance(config, cls):
        raise TypeError(f"config must be a {cls.__name__}, got {type(config).__name__}")
    return dataclasses.replace(config, **settings) if settings else config


def _check_trials(trials: Iterable[int]) -> tuple[int, ...]:
    trials = list(trials)
    if not trials or len(set(trials)) != len(trials):
        raise ValueError(f"trials must be distinct trial numbers (the paper uses 1..10), got {trials!r}")
    return tuple(validate.integer("a trial number", t, minimum=1) for t in trials)


def check_vectors(model: Model, vectors: Any, concepts: Sequence[str]) -> Float[Tensor, "concept d_model"]:
    """Concept vectors ``[n_concepts, d_model]`` of the model's width, finite, as float32 on the CPU."""
    shape = tuple(torch.as_tensor(vectors).shape)
    if len(shape) != 2 or shape[0] != len(concepts):
        raise ValueError(f"vectors must be [n_concepts={len(concepts)}, d_model], got shape {shape}")
    return validate.vectors(model, vectors, concepts)


# ----------------------------------------------------------------------------------------------- trials


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
class TrialGrid:
    """A validated call: the concepts, the model's layers and strengths it runs, its config, and the settings
    that go into every key."""

    concepts: list[str]
    """The concepts, checked (non-empty, each once)."""
    layers: list[int]
    """Injection layers, checked against the model."""
    strengths: list[float]
    """Injection strengths (the config's, or the model's sweep)."""
    config: SweepConfig
    """Everything else the call was set with."""
    settings: RunSettings
    """What every trial of the call shares (part of each key)."""

    @property
    def scores_logits(self) -> bool:
        """Whether the judge scores logits (nothing is generated)."""
        return self.settings.max_new_tokens == 0

    def plan(self) -> list[Trial]:
        """Every trial of the grid: layer by layer, variant by variant, persona by persona."""
        c = self.config
        return [
            trial
            for layer in self.layers
            for variant in c.variants
            for persona in c.personas
            for trial in plan_trials(
                self.concepts,
                layer=layer,
                strengths=self.strengths,
                variant=variant,
                persona=persona,
                n_trials=c.n_trials,
                trials=c.trials,
                forced=c.forced,
                controls=c.controls,
                deterministic=self.scores_logits,
            )
        ]


def trial_grid(model: Model, concepts: Sequence[str], config: SweepConfig, *, judge: Any) -> TrialGrid:
    """Check what a call needs against the model and the judge before any model work (the judge's
    ``check()`` included): its layers, the judge, the concepts."""
    spec = spec_for(model)
    layers = [spec.injection_layer] if config.layers is None else list(config.layers)
    layers = [spec.check_layer(layer) for layer in layers]
    if not layers or len(set(layers)) != len(layers):
        raise ValueError(f"layers must be distinct, valid layers 0..{spec.n_layers - 1}, got {layers!r}")
    strengths = validate.strength_list(spec.strength_sweep if config.strengths is None else config.strengths)
    name = check_judge(judge)
    logit = judge_kind(judge) == "logits"
    settings = RunSettings(
        model=spec.name,
        seed=config.seed,
        judge=name,
        temperature=0.0 if logit else config.temperature,
        max_new_tokens=0 if logit else config.max_new_tokens,
    )
    return TrialGrid(
        concepts=check_concepts(concepts),
        layers=layers,
        strengths=strengths,
        config=config,
        settings=settings,
    )


# ----------------------------------------------------------------------------------------------- prompts


def prompt_key(trial: Trial) -> tuple:
    """What a trial's prompt depends on (trials with one key share one tokenized prompt)."""
    category = category_of(trial.concept) if trial.variant == "anti_reward" else None
    thoughts = trial.concept if trial.variant == "thoughts_in_context" else None
    return (trial.trial, trial.variant, trial.persona, trial.forced, category, thoughts)


def build_prompts(model: Model, planned: Iterable[Trial]) -> dict[tuple, TrialPrompt]:
    """The tokenized prompt of every planned trial, by :func:`prompt_key` (invalid combinations raise
    here)."""
    prompts: dict[tuple, TrialPrompt] = {}
    for trial in planned:
        key = prompt_key(trial)
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
