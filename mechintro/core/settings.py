"""Settings with one home: the choices mechintro accepts and the defaults every entry point reads.

Functions (``run_trials``, ``sweep``, ``logit_scores``, the curves), the ``mechintro`` command and the
analyses
scripts all take their defaults from the frozen dataclasses here, so a default is stated once. The injection
layer and strength default to the model's own (:class:`mechintro.core.models.ModelSpec`), not to a constant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypeAlias, get_args

__all__ = [
    "BATCHING",
    "COMPONENTS",
    "CONDITIONS",
    "EXPERIMENTS",
    "SAMPLING",
    "STORE",
    "TRIALS",
    "Batching",
    "Component",
    "Condition",
    "Experiment",
    "Sampling",
    "StorePolicy",
    "TrialDefaults",
    "check_choice",
    "check_choices",
]

Condition: TypeAlias = Literal["injection", "control", "forced"]
"""A trial's condition: injected, not injected (strength 0), injected with the forced-identification
prefill."""
CONDITIONS: tuple[Condition, ...] = get_args(Condition)

Experiment: TypeAlias = Literal["ablation", "patching", "forced_ablation"]
"""Ablation in steered runs, patching into unsteered runs, ablation under the forced prefill (the paper's
order of figure rows); shared by component patching and the gate curves."""
EXPERIMENTS: tuple[Experiment, ...] = get_args(Experiment)

Component: TypeAlias = Literal["attn", "mlp"]
"""A block's attention output or MLP output (what it adds to the residual stream)."""
COMPONENTS: tuple[Component, ...] = get_args(Component)


@dataclass(frozen=True)
class Sampling:
    """How a trial's answer is sampled."""

    temperature: float = 1.0
    """Softmax temperature (the paper samples at 1; 0 is greedy)."""
    max_new_tokens: int = 100
    """Upper bound on generated tokens per trial."""
    seed: int = 0
    """The run's seed; every trial samples from its own seed derived from it (``sampling.trial_seed``)."""


@dataclass(frozen=True)
class Batching:
    """How work is batched (results never depend on it)."""

    batch_size: int = 64
    """Rows per batched forward pass."""


@dataclass(frozen=True)
class StorePolicy:
    """How runs use the trial store."""

    retry_errors: bool = True
    """Re-run trials whose judge failed (their error rows do not count as done)."""
    lease_s: float = 600.0
    """How long a batch claimed by one process stays reserved (renewed while it runs); a crashed process's
    batches are taken over once their lease expires."""


@dataclass(frozen=True)
class TrialDefaults:
    """Which trials are run."""

    trials: tuple[int, ...] = tuple(range(1, 11))
    """The trial numbers written into "Trial {n}" (the paper's 1..10); a concept's trials cycle through
    them."""
    trial: int = 1
    """The trial number of single-prompt analyses (feature grids, patching, curves)."""
    n_trials: int = 10
    """Trials per concept and condition for the command line (the paper used 100)."""
    variant: str = "original"
    """Prompt variant."""
    persona: str = "standard_assistant"
    """Persona variant."""


SAMPLING = Sampling()
BATCHING = Batching()
STORE = StorePolicy()
TRIALS = TrialDefaults()


def check_choice(name: str, value: object, valid: tuple) -> object:
    """Return ``value`` if it is one of ``valid``, else raise naming the valid choices."""
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {list(valid)}")
    return value


def check_choices(name: str, values: object, valid: tuple) -> list:
    """``values`` (one or a sequence) as a non-empty list of valid choices, else raise naming them."""
    values = [values] if isinstance(values, str) else list(values)  # type: ignore[arg-type]
    bad = [v for v in values if v not in valid]
    if bad or not values:
        raise ValueError(f"unknown {name} {bad or values!r}; valid: {list(valid)}")
    return values
