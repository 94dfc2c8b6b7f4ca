"""What the geometry experiments share: checked inputs (concept vectors, their names, per-concept rates), the
per-concept rates from trials (:func:`concept_outcomes`), and the trial runner that steers with explicit
vectors (:func:`steer_trials`, :class:`TrialDetector`) with the judge wrapper it uses.

Experiments that steer take a ``detect`` callable (:data:`Detect`): labels and vectors in, rates out. On a
model that is a :class:`TrialDetector` (batched trials through :func:`mechintro.behaviour.trials.run_trials`
with explicit vectors, store-backed); in tests it is a planted rule.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from mechintro.behaviour.judges import judge_kind
from mechintro.behaviour.metrics import concept_rates
from mechintro.behaviour.store import TrialStore
from mechintro.core.models import Model, spec_for

__all__ = [
    "PAPER_TEXT",
    "RATE_COLUMNS",
    "Detect",
    "TrialDetector",
    "as_matrix",
    "concept_list",
    "concept_outcomes",
    "detect_rates",
    "label_word",
    "rates_for",
    "rerun_label",
    "steer_trials",
    "unit_vector",
]

concept_outcomes = concept_rates
"""Per-concept rates from trials: :func:`mechintro.behaviour.metrics.concept_rates` (the one per-concept rate
function; judge errors left out of every denominator and counted in ``n_errors``), under the name the geometry
experiments have always used."""

RATE_COLUMNS = ("detection_rate", "introspection_rate")
"""Per-concept rates a partition can be drawn on: P(detected) and P(detected and identified), injected."""
PAPER_TEXT: dict[str, float] = {
    "swap_success_original": 0.661,
    "swap_success_projection": 0.390,
    "swap_success_residual": 0.444,
    "bidirectional_success": 0.233,
    "bidirectional_failure": 0.032,
    "pc1_share": 0.184,
}
"""Numbers quoted from the paper's text (Gemma3-27B; Figures 6, 7, 8a), not from its released data: success
concepts' detection before / after the projection and residual swaps; share of S-S and F-F pairs detected
both ways; PC1's share of the variance of the L2-normalized concept vectors."""

Detect: TypeAlias = Callable[[Sequence[str], np.ndarray], np.ndarray]
"""``detect(labels, vectors)`` -> per-row detection rates ``[n]``: steer with each row of ``vectors``
``[n, d_model]`` (at the model's default strength) and measure. ``labels`` are unique names of the rows,
``"<word>#<what>"``, where ``<word>`` is the concept a judge should look for."""

# ----------------------------------------------------------------------------------------------- inputs


def as_matrix(vectors: Any, *, what: str = "vectors", rows: int | None = None) -> np.ndarray:
    """``vectors`` as a finite float64 ``[n, d]`` array (``rows`` checked when given)."""
    if torch.is_tensor(vectors):
        vectors = vectors.detach().cpu().double().numpy()
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or (rows is not None and x.shape[0] != rows):
        want = f"[{rows}, d_model]" if rows is not None else "[n, d_model]"
        raise ValueError(f"{what} must be {want}, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what} have NaN or inf entries")
    return x


def unit_vector(v: Any, *, what: str = "direction") -> np.ndarray:
    v = np.asarray(v.detach().cpu().double() if torch.is_tensor(v) else v, dtype=np.float64).reshape(-1)
    norm = float(np.linalg.norm(v))
    if not math.isfinite(norm) or norm == 0.0:
        raise ValueError(f"the {what} must be a finite, nonzero vector")
    return v / norm


def concept_list(concepts: Sequence[str], n: int) -> list[str]:
    if isinstance(concepts, str):
        raise TypeError("concepts must be a list of words, not one string")
    concepts = list(concepts)
    if len(concepts) != n or len(set(concepts)) != n:
        raise ValueError(f"need {n} distinct concepts (one per vector), got {len(concepts)}")
    return concepts


def rates_for(rates: Any, concepts: Sequence[str], column: str) -> np.ndarray:
    """The ``column`` rate of each concept, from a per-concept table or a ``{concept: rate}`` mapping."""
    if column not in RATE_COLUMNS:
        raise ValueError(f"unknown rate {column!r}; valid: {list(RATE_COLUMNS)}")
    if isinstance(rates, pd.DataFrame):
        if column not in rates.columns or "concept" not in rates.columns:
            raise ValueError(
                f"the rate table needs columns concept and {column}; it has {list(rates.columns)}"
            )
        table = rates.set_index("concept")[column]
    else:
        table = pd.Series(dict(rates), dtype=float)
    missing = [c for c in concepts if c not in table.index]
    if missing:
        raise ValueError(f"no {column} for concepts {missing[:5]}{'...' if len(missing) > 5 else ''}")
    out = table.reindex(list(concepts)).to_numpy(dtype=np.float64)
    if not np.isfinite(out).all() or (out < 0).any() or (out > 1).any():
        raise ValueError(f"{column} must be finite rates in [0, 1]")
    return out


# ----------------------------------------------------------------------------------------------- steering


def _digest(vector: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(vector, dtype=np.float32).tobytes()).hexdigest()[:10]


def label_word(label: str) -> str:
    """The concept word of a steering label ``"<word>#<what>..."``."""
    return label.split("#", 1)[0]


@dataclass(frozen=True)
class _WordJudge:
    """A judge that sees each label's concept word (the store keeps the full label)."""

    inner: Any

    @property
    def name(self) -> str:
        return str(getattr(self.inner, "name", type(self.inner).__name__))

    def check(self) -> None:
        check = getattr(self.inner, "check", None)
        if callable(check):
            check()

    def judge(self, *, responses: Sequence[str], concepts: Sequence[str], forced: Sequence[bool]) -> list:
        words = [label_word(c) for c in concepts]
        return self.inner.judge(responses=responses, concepts=words, forced=forced)


def steer_trials(
    model: Model,
    labels: Sequence[str],
    vectors: Float[Tensor, "row d_model"] | np.ndarray,
    *,
    judge: Any,
    n_trials: int,
    layer: int | None = None,
    strength: float | None = None,
    store: Any = None,
    **run: Any,
) -> pd.DataFrame:
    """Introspection trials steering with explicit vectors, batched, one "concept" per row of ``vectors``.

    Each row runs under the store label ``"<label>#<hash of the vector>"``, so the store never mixes two
    different vectors (or a steered vector with the plain concept trials), and a rerun with the same vector
    resumes. The judge sees the label's concept word (:func:`label_word`). Only injection trials run (no
    controls, no forced trials). ``run``: the other settings of :func:`mechintro.behaviour.trials.run_trials`
    (temperature, max_new_tokens, seed, batch_size, progress). Returns the trial rows, with ``label`` (the
    given label) beside ``concept`` (the store label).
    """
    from mechintro.behaviour.trials import run_trials

    labels = list(labels)
    x = as_matrix(vectors, rows=len(labels))
    if len(set(labels)) != len(labels):
        raise ValueError("labels must be distinct")
    keys = [f"{label}#{_digest(v)}" for label, v in zip(labels, x, strict=True)]
    spec = spec_for(model)
    judge = judge if judge_kind(judge) == "logits" else _WordJudge(judge)  # a scorer reads no words
    df = run_trials(
        model,
        keys,
        layer=spec.injection_layer if layer is None else layer,
        strength=spec.strength if strength is None else strength,
        n_trials=n_trials,
        judge=judge,
        vectors=torch.as_tensor(x, dtype=torch.float32),
        controls=False,
        forced=False,
        store=store,
        **run,
    )
    to_label = dict(zip(keys, labels, strict=True))
    return df.assign(label=df["concept"].map(to_label))


@dataclass(frozen=True, eq=False)
class TrialDetector:
    """:data:`Detect` on a model: batched, store-backed trials with explicit vectors
    (:func:`steer_trials`)."""

    model: Any
    """A model from :func:`mechintro.load_model`."""
    judge: Any
    """A judge (RuleJudge, LLMJudge, LogitJudge)."""
    n_trials: int = 10
    """Trials per vector."""
    layer: int | None = None
    """Injection layer (default: the model's)."""
    strength: float | None = None
    """Injection strength (default: the model's ``spec_for(model).strength``)."""
    store: TrialStore | str | Path | None = None
    """A :class:`~mechintro.behaviour.store.TrialStore` or path (resumable), or None for an in-memory
    store."""
    rate: str = "detection_rate"
    """Which rate to return (:data:`RATE_COLUMNS`)."""
    run: Mapping[str, Any] = field(default_factory=dict)
    """Other :func:`mechintro.behaviour.trials.run_trials` settings: temperature, max_new_tokens, seed,
    batch_size,
    progress."""

    def trials(self, labels: Sequence[str], vectors: Any) -> pd.DataFrame:
        """The trial rows of steering with ``vectors`` (see :func:`steer_trials`)."""
        if self.rate not in RATE_COLUMNS:
            raise ValueError(f"unknown rate {self.rate!r}; valid: {list(RATE_COLUMNS)}")
        return steer_trials(
            self.model,
            labels,
            vectors,
            judge=self.judge,
            n_trials=self.n_trials,
            layer=self.layer,
            strength=self.strength,
            store=self.store,
            **dict(self.run),
        )

    def __call__(self, labels: Sequence[str], vectors: Any) -> np.ndarray:
        df = self.trials(labels, vectors)
        out = concept_outcomes(df.assign(concept=df["label"]))
        return out.set_index("concept")[self.rate].reindex(list(labels)).to_numpy(dtype=np.float64)


def rerun_label(concept: str, multiple: float = 1.0) -> str:
    """The label of a concept's own vector (times ``multiple``), shared by every experiment's rerun."""
    return f"{concept}#rerun" if multiple == 1.0 else f"{concept}#rerun-x{multiple:g}"


def detect_rates(detect: Detect, labels: list[str], vectors: np.ndarray) -> np.ndarray:
    rates = np.asarray(detect(labels, vectors), dtype=np.float64).reshape(-1)
    if rates.shape[0] != len(labels):
        raise ValueError(f"detect returned {rates.shape[0]} rates for {len(labels)} vectors")
    return rates
