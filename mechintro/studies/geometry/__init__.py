"""Geometry of concept vectors: what separates the concepts a model detects from those it misses.

Everything starts from concept vectors ``V`` (``[concept, d_model]``) and per-concept rates from the trial
store (:func:`concept_outcomes`), and returns tidy DataFrames.

* :func:`partition` -- success/failure split: sweep a threshold on the detection (or detection-and-
  identification) rate, keep the one with the best mean macro-F1 of a 5-fold stratified LDA among those
  whose minority class holds more than 20% of the concepts; the unit mean-difference direction ``û`` (Δμ),
  cross-validated balanced accuracy, silhouette.
* :func:`swap_vectors` / :func:`swap_experiment` / :func:`paired_tests` -- write ``v = (v·û)û + r``; swap
  the projection (or the residual ``r``) with a partner from the other group, rescale to ``‖v‖``, rerun the
  trials, and test the change per concept (paired t, Wilcoxon).
* :func:`bidirectional_pairs` / :func:`bidirectional_experiment` -- steer with ``A − B`` and ``B − A`` for
  nearest-neighbour pairs within a group matched on their projection; a rule that is linear in one direction
  can never detect both (``f(x) = f(−x)`` is needed).
* :func:`concept_pca`, :func:`logit_lens`, :func:`verbalizability`, :func:`delta_pcs` /
  :func:`direction_sweep` -- concept-space structure.
* :func:`nested_ridge` / :func:`ridge_r2` -- per-concept detection regressed on predictors with nested
  cross-validation; transcoder features are ranked inside each training fold.
* :func:`noise_vectors` / :func:`noise_experiment` -- random vectors norm-matched to the concept vectors.

Experiments that steer take a ``detect`` callable (:data:`Detect`): labels and vectors in, rates out. On a
model that is a :class:`TrialDetector` (batched trials through :func:`mechintro.behaviour.trials.run_trials`
with
explicit vectors, store-backed); in tests it is a planted rule.
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
from scipy import stats
from sklearn.decomposition import PCA
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.linear_model import RidgeCV
from sklearn.metrics import balanced_accuracy_score, r2_score, silhouette_score
from sklearn.model_selection import KFold, StratifiedKFold, cross_val_predict, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor

from mechintro.behaviour.judges import judge_kind
from mechintro.behaviour.metrics import wilson_interval
from mechintro.behaviour.store import TrialStore
from mechintro.core.models import Model, Transcoders, spec_for
from mechintro.core.readout import unembedding
from mechintro.core.stats import pearson_columns
from mechintro.core.transcoders import feature_name
from mechintro.mechanism.features import concept_rates, feature_grid

__all__ = [
    "NOISE_KINDS",
    "PAPER_TEXT",
    "PARTNER_RULES",
    "RATE_COLUMNS",
    "RIDGE_ALPHAS",
    "SWAP_KINDS",
    "ConceptPCA",
    "Detect",
    "Partition",
    "TrialDetector",
    "bidirectional_experiment",
    "bidirectional_pairs",
    "bidirectional_summary",
    "concept_outcomes",
    "concept_pca",
    "delta_pcs",
    "direction_sweep",
    "label_word",
    "lens_logits",
    "logit_lens",
    "nested_ridge",
    "noise_experiment",
    "noise_vectors",
    "paired_tests",
    "partition",
    "ridge_r2",
    "swap_experiment",
    "swap_partners",
    "steer_trials",
    "swap_vectors",
    "token_variants",
    "transcoder_activations",
    "verbalizability",
]

RATE_COLUMNS = ("detection_rate", "introspection_rate")
"""Per-concept rates a partition can be drawn on: P(detected) and P(detected and identified), injected."""
SWAP_KINDS = ("projection", "residual")
"""What a swap takes from the partner: its projection on û, or its residual orthogonal to û."""
PARTNER_RULES = ("random", "nearest")
"""How a swap partner is drawn from the other group: at random, or the nearest by cosine."""
NOISE_KINDS = ("isotropic", "covariance")
"""Random directions: uniform on the sphere, or Gaussian with the concept vectors' covariance."""
RIDGE_ALPHAS = tuple(float(a) for a in np.logspace(-4, 5, 19))
"""The inner RidgeCV's alpha grid (log-spaced)."""

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


def _matrix(vectors: Any, *, what: str = "vectors", rows: int | None = None) -> np.ndarray:
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


def _unit(v: Any, *, what: str = "direction") -> np.ndarray:
    v = np.asarray(v.detach().cpu().double() if torch.is_tensor(v) else v, dtype=np.float64).reshape(-1)
    norm = float(np.linalg.norm(v))
    if not math.isfinite(norm) or norm == 0.0:
        raise ValueError(f"the {what} must be a finite, nonzero vector")
    return v / norm


def _concept_list(concepts: Sequence[str], n: int) -> list[str]:
    if isinstance(concepts, str):
        raise TypeError("concepts must be a list of words, not one string")
    concepts = list(concepts)
    if len(concepts) != n or len(set(concepts)) != n:
        raise ValueError(f"need {n} distinct concepts (one per vector), got {len(concepts)}")
    return concepts


def _rates_for(rates: Any, concepts: Sequence[str], column: str) -> np.ndarray:
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


def concept_outcomes(
    behaviour: Any, *, strength: float | None = None, layer: int | None = None
) -> pd.DataFrame:
    """Per-concept rates from trials: :func:`mechintro.mechanism.features.concept_rates` plus
    ``introspection_rate``.

    ``introspection_rate`` = P(detected and identified | injection), judge errors left out. ``behaviour``: a
    :class:`~mechintro.behaviour.store.TrialStore`, a trial DataFrame, or a per-concept table (returned as
    is, with
    ``introspection_rate`` NaN when missing).
    """
    rates = concept_rates(behaviour, strength=strength, layer=layer)
    df = behaviour.load() if hasattr(behaviour, "load") else behaviour
    if "condition" not in df.columns:
        return rates if "introspection_rate" in rates else rates.assign(introspection_rate=np.nan)
    if "judge_error" in df.columns:
        df = df[df["judge_error"].isna() | (df["judge_error"].astype("string").str.strip() == "")]
    for column, value in (("strength", strength), ("layer", layer)):
        if value is not None and column in df.columns:
            df = df[np.isclose(df[column].astype(float), float(value))]
    inj = df[df["condition"] == "injection"].dropna(subset=["detected"])
    both = inj["detected"].astype(bool) & inj["identified"].fillna(False).astype(bool)
    intro = both.groupby(inj["concept"]).mean().rename("introspection_rate").astype(float)
    out = rates.merge(intro.reset_index(), on="concept", how="left")
    return out[
        ["concept", "detection_rate", "introspection_rate", "forced_id_rate", "n_injection", "n_forced"]
    ]


# ----------------------------------------------------------------------------------------------- partition


@dataclass(frozen=True, eq=False)
class Partition:
    """A success/failure split of the concepts and the direction that separates them."""

    concepts: tuple[str, ...] = field(repr=False)
    """The concepts, in the order of the vectors."""
    rates: np.ndarray = field(repr=False)
    """Their rates ``[n]`` (the ``rate`` column)."""
    rate: str
    """Which rate was thresholded (:data:`RATE_COLUMNS`)."""
    threshold: float
    """Success means ``rate >= threshold``."""
    success: np.ndarray = field(repr=False)
    """Boolean ``[n]``."""
    direction: np.ndarray = field(repr=False)
    """Unit mean-difference direction û = Δμ / ‖Δμ‖, Δμ = mean(success) − mean(failure) ``[d]``."""
    delta_mu_norm: float
    """‖Δμ‖."""
    lda_direction: np.ndarray = field(repr=False)
    """Unit LDA coefficient fit on every concept ``[d]`` (sign: towards success)."""
    macro_f1: float
    """Mean macro-F1 of the stratified-K-fold LDA at this threshold."""
    balanced_accuracy: float
    """Balanced accuracy of the cross-validated LDA predictions."""
    projection_balanced_accuracy: float
    """Balanced accuracy of a one-direction rule: Δμ and the cut (midpoint of the class means of the
    projection) learned in each training fold, applied to the held-out fold."""
    silhouette: float
    """Silhouette of the two groups in the vector space."""
    sweep: pd.DataFrame = field(repr=False)
    """Every candidate threshold: threshold, n_success, minority_share, valid, macro_f1, macro_f1_sd."""

    @property
    def groups(self) -> np.ndarray:
        """``"success"`` / ``"failure"`` per concept."""
        return np.where(self.success, "success", "failure")

    def projections(self, vectors: Any) -> np.ndarray:
        """``v · û`` of each row of ``vectors``."""
        return _matrix(vectors) @ self.direction

    def frame(self, vectors: Any) -> pd.DataFrame:
        """One row per concept: concept, rate, group, projection (on û), norm, cosine with û."""
        x = _matrix(vectors, rows=len(self.concepts))
        norm = np.linalg.norm(x, axis=1)
        proj = x @ self.direction
        return pd.DataFrame(
            {
                "concept": list(self.concepts),
                "rate": self.rates,
                "group": self.groups,
                "projection": proj,
                "norm": norm,
                "cosine": proj / np.where(norm > 0, norm, 1.0),
            }
        )

    def summary(self) -> pd.DataFrame:
        """One row: rate, threshold, n, n_success, minority_share, macro_f1, balanced accuracies, silhouette,
        ‖Δμ‖, cosine between û and the LDA direction."""
        n = len(self.concepts)
        k = int(self.success.sum())
        return pd.DataFrame(
            [
                {
                    "rate": self.rate,
                    "threshold": self.threshold,
                    "n": n,
                    "n_success": k,
                    "minority_share": min(k, n - k) / n,
                    "macro_f1": self.macro_f1,
                    "balanced_accuracy": self.balanced_accuracy,
                    "projection_balanced_accuracy": self.projection_balanced_accuracy,
                    "silhouette": self.silhouette,
                    "delta_mu_norm": self.delta_mu_norm,
                    "cos_delta_mu_lda": float(self.direction @ self.lda_direction),
                }
            ]
        )


def _lda(shrinkage: str | float | None) -> LinearDiscriminantAnalysis:
    if shrinkage is None:
        return LinearDiscriminantAnalysis(solver="svd")
    return LinearDiscriminantAnalysis(solver="lsqr", shrinkage=shrinkage)


def _mean_difference(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return x[y].mean(axis=0) - x[~y].mean(axis=0)


def _projection_predictions(x: np.ndarray, y: np.ndarray, folds: StratifiedKFold) -> np.ndarray:
    """Out-of-fold predictions of the one-direction rule (Δμ and the cut learned in the training fold)."""
    pred = np.zeros(len(y), dtype=bool)
    for train, test in folds.split(x, y):
        u = _unit(_mean_difference(x[train], y[train]), what="fold's mean difference")
        p = x[train] @ u
        cut = (p[y[train]].mean() + p[~y[train]].mean()) / 2
        pred[test] = x[test] @ u >= cut
    return pred


def partition(
    vectors: Float[Tensor, "concept d_model"] | np.ndarray,
    concepts: Sequence[str],
    rates: pd.DataFrame | Mapping[str, float],
    *,
    rate: str = "detection_rate",
    thresholds: Sequence[float] | None = None,
    min_minority: float = 0.2,
    n_splits: int = 5,
    shrinkage: str | float | None = "auto",
    silhouette_metric: str = "euclidean",
    seed: int = 0,
) -> Partition:
    """Split the concepts into success (``rate >= t``) and failure at the threshold ``t`` that an LDA
    separates best.

    Args:
        vectors / concepts: the concept vectors and their names (same order).
        rates: a per-concept table with ``concept`` and ``rate`` (:func:`concept_outcomes`), or a mapping.
        rate: ``"detection_rate"`` or ``"introspection_rate"`` (detection and identification).
        thresholds: candidates (default: every distinct rate but the lowest).
        min_minority: a threshold is kept only if the smaller group holds more than this share.
        n_splits: folds of the stratified K-fold (shuffled with ``seed``) that scores each threshold.
        shrinkage: the LDA's covariance shrinkage (``"auto"`` = Ledoit-Wolf, needed when d_model exceeds
            the number of concepts); None for the plain SVD solver.
        silhouette_metric: sklearn metric of the silhouette ("euclidean", "cosine", ...).

    Raises ValueError when no threshold leaves both groups big enough (e.g. at a saturated strength, where
    every concept is detected).
    """
    x = _matrix(vectors)
    concepts = _concept_list(concepts, x.shape[0])
    r = _rates_for(rates, concepts, rate)
    if not 0 <= min_minority < 0.5:
        raise ValueError(f"min_minority must be in [0, 0.5), got {min_minority}")
    n = len(r)
    candidates = sorted(set(np.round(r, 12).tolist()))[1:] if thresholds is None else sorted(thresholds)
    folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    rows = []
    for t in candidates:
        y = r >= t
        k = int(y.sum())
        share = min(k, n - k) / n
        valid = share > min_minority and min(k, n - k) >= n_splits
        f1 = cross_val_score(_lda(shrinkage), x, y, cv=folds, scoring="f1_macro") if valid else np.array([])
        rows.append(
            {
                "threshold": float(t),
                "n_success": k,
                "minority_share": share,
                "valid": valid,
                "macro_f1": float(f1.mean()) if valid else np.nan,
                "macro_f1_sd": float(f1.std()) if valid else np.nan,
            }
        )
    columns = ["threshold", "n_success", "minority_share", "valid", "macro_f1", "macro_f1_sd"]
    sweep = pd.DataFrame(rows, columns=columns).astype({"valid": bool})
    ok = sweep[sweep["valid"]]
    if ok.empty:
        spread = f"rates from {r.min():.2f} to {r.max():.2f}, mean {r.mean():.2f}"
        raise ValueError(
            f"no threshold on {rate} leaves more than {min_minority:.0%} of the {n} concepts in each group "
            f"({spread}): the rate does not vary enough across concepts (near 1 for all at a saturating "
            "strength, near 0 at a weak one; try the calibrated default strength, or more concepts)"
        )
    best = ok.sort_values(["macro_f1", "minority_share"], ascending=False, kind="stable").iloc[0]
    threshold = float(best["threshold"])
    y = r >= threshold
    delta = _mean_difference(x, y)
    lda = _lda(shrinkage).fit(x, y)
    lda_dir = _unit(lda.coef_[0], what="LDA coefficient")
    pred = cross_val_predict(_lda(shrinkage), x, y, cv=folds)
    return Partition(
        concepts=tuple(concepts),
        rates=r,
        rate=rate,
        threshold=threshold,
        success=y,
        direction=_unit(delta, what="mean difference"),
        delta_mu_norm=float(np.linalg.norm(delta)),
        lda_direction=lda_dir,
        macro_f1=float(best["macro_f1"]),
        balanced_accuracy=float(balanced_accuracy_score(y, pred)),
        projection_balanced_accuracy=float(balanced_accuracy_score(y, _projection_predictions(x, y, folds))),
        silhouette=float(silhouette_score(x, y, metric=silhouette_metric)),
        sweep=sweep.reset_index(drop=True),
    )


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
    x = _matrix(vectors, rows=len(labels))
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


def _rerun_label(concept: str, multiple: float = 1.0) -> str:
    """The label of a concept's own vector (times ``multiple``), shared by every experiment's rerun."""
    return f"{concept}#rerun" if multiple == 1.0 else f"{concept}#rerun-x{multiple:g}"


def _detect(detect: Detect, labels: list[str], vectors: np.ndarray) -> np.ndarray:
    rates = np.asarray(detect(labels, vectors), dtype=np.float64).reshape(-1)
    if rates.shape[0] != len(labels):
        raise ValueError(f"detect returned {rates.shape[0]} rates for {len(labels)} vectors")
    return rates


# ----------------------------------------------------------------------------------------------- swaps


def swap_partners(vectors: Any, success: np.ndarray, *, rule: str = "random", seed: int = 0) -> np.ndarray:
    """For each concept, the index of a partner in the other group: random, or nearest by cosine."""
    x = _matrix(vectors)
    success = np.asarray(success, dtype=bool)
    if rule not in PARTNER_RULES:
        raise ValueError(f"unknown partner rule {rule!r}; valid: {list(PARTNER_RULES)}")
    if success.shape != (x.shape[0],) or success.all() or not success.any():
        raise ValueError("success must be a boolean [n] with both groups non-empty")
    rng = np.random.default_rng(seed)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-30)
    out = np.empty(x.shape[0], dtype=np.int64)
    for group in (True, False):
        mine, other = np.flatnonzero(success == group), np.flatnonzero(success != group)
        if rule == "random":
            out[mine] = rng.choice(other, size=len(mine), replace=True)
        else:
            out[mine] = other[np.argmax(unit[mine] @ unit[other].T, axis=1)]
    return out


def swap_vectors(
    vectors: Any, direction: Any, partners: Sequence[int], *, kind: str, rescale: bool = True
) -> tuple[np.ndarray, pd.DataFrame]:
    """Swap the projection on û (``v − (v·û)û + (w·û)û``) or the residual (``(v·û)û + w − (w·û)û``) of each
    vector with its partner ``w``; optionally rescale to ``‖v‖``.

    Returns the swapped vectors ``[n, d]`` and one row per vector: partner (index), projection (v·û),
    partner_projection, swapped_projection (before the rescale), final_projection, norm (‖v‖),
    swapped_norm (before the rescale), scale (the rescale factor, 1 without), projection_shift
    (final − swapped projection: how the rescale moves the projection).
    """
    if kind not in SWAP_KINDS:
        raise ValueError(f"unknown swap kind {kind!r}; valid: {list(SWAP_KINDS)}")
    x = _matrix(vectors)
    u = _unit(direction)
    if u.shape[0] != x.shape[1]:
        raise ValueError(f"the direction has width {u.shape[0]}, the vectors {x.shape[1]}")
    partners = np.asarray(partners, dtype=np.int64)
    if partners.shape != (x.shape[0],) or (partners < 0).any() or (partners >= x.shape[0]).any():
        raise ValueError(f"partners must be [{x.shape[0]}] indices into the vectors")
    p = x @ u
    residual = x - p[:, None] * u[None, :]
    w = partners
    swapped = residual + p[w, None] * u[None, :] if kind == "projection" else p[:, None] * u + residual[w]
    norm, swapped_norm = np.linalg.norm(x, axis=1), np.linalg.norm(swapped, axis=1)
    scale = norm / swapped_norm.clip(1e-30) if rescale else np.ones(len(x))
    out = swapped * scale[:, None]
    sp, fp = swapped @ u, out @ u
    table = pd.DataFrame(
        {
            "partner": w,
            "projection": p,
            "partner_projection": p[w],
            "swapped_projection": sp,
            "final_projection": fp,
            "norm": norm,
            "swapped_norm": swapped_norm,
            "scale": scale,
            "projection_shift": fp - sp,
        }
    )
    return out, table


def swap_experiment(
    vectors: Any,
    part: Partition,
    *,
    detect: Detect,
    kinds: Sequence[str] = SWAP_KINDS,
    rules: Sequence[str] = PARTNER_RULES,
    rescale: bool = True,
    seed: int = 0,
) -> pd.DataFrame:
    """Rerun every concept's own vector ("original") and its swapped versions in one ``detect`` call.

    The rerun of the original is the baseline of :func:`paired_tests`: the groups were selected on the
    partition's rates, so comparing swapped rates against those would mix in regression to the mean.

    Returns one row per (concept, kind, partners): concept, group, kind ("original" or a swap kind),
    partners ("-" or a rule), partner (the partner concept), selection_rate (the partition's rate), rate
    (measured now), and the projection columns of :func:`swap_vectors`.
    """
    x = _matrix(vectors, rows=len(part.concepts))
    concepts = list(part.concepts)
    norm = np.linalg.norm(x, axis=1)
    p = x @ part.direction
    blocks = [
        pd.DataFrame(
            {
                "concept": concepts,
                "kind": "original",
                "partners": "-",
                "partner": "-",
                "projection": p,
                "final_projection": p,
                "norm": norm,
                "scale": 1.0,
                "projection_shift": 0.0,
            }
        )
    ]
    rows = [x]
    for rule in rules:
        partners = swap_partners(x, part.success, rule=rule, seed=seed)
        for kind in kinds:
            swapped, table = swap_vectors(x, part.direction, partners, kind=kind, rescale=rescale)
            table = table.assign(concept=concepts, kind=kind, partners=rule)
            table["partner"] = [concepts[i] for i in partners]
            blocks.append(table)
            rows.append(swapped)
    frame = pd.concat(blocks, ignore_index=True)
    labels = [
        _rerun_label(c) if k == "original" else f"{c}#{k}-swap-{r}"
        for c, k, r in zip(frame["concept"], frame["kind"], frame["partners"], strict=True)
    ]
    rates = _detect(detect, labels, np.concatenate(rows))
    group = dict(zip(concepts, part.groups, strict=True))
    selection = dict(zip(concepts, part.rates, strict=True))
    frame = frame.assign(
        group=frame["concept"].map(group), selection_rate=frame["concept"].map(selection), rate=rates
    )
    first = ["concept", "group", "kind", "partners", "partner", "selection_rate", "rate"]
    return frame[first + [c for c in frame.columns if c not in first]]


def paired_tests(swaps: pd.DataFrame, *, baseline: str = "original") -> pd.DataFrame:
    """Per (group, kind, partners): the swapped rate against the same concepts' ``baseline`` rate.

    Columns: group, kind, partners, n, mean_before, mean_after, mean_change, t, t_p (paired t-test),
    wilcoxon, wilcoxon_p (Wilcoxon signed-rank; NaN when every difference is zero).
    """
    base = swaps[swaps["kind"] == baseline].set_index("concept")["rate"]
    rows = []
    others = swaps[swaps["kind"] != baseline]
    for (group, kind, rule), g in others.groupby(["group", "kind", "partners"], sort=True):
        before = base.reindex(g["concept"]).to_numpy(dtype=np.float64)
        after = g["rate"].to_numpy(dtype=np.float64)
        diff = after - before
        row = {
            "group": group,
            "kind": kind,
            "partners": rule,
            "n": len(g),
            "mean_before": before.mean(),
            "mean_after": after.mean(),
            "mean_change": diff.mean(),
            "t": np.nan,
            "t_p": np.nan,
            "wilcoxon": np.nan,
            "wilcoxon_p": np.nan,
        }
        if len(g) >= 2 and np.any(diff != 0):
            t = stats.ttest_rel(after, before)
            w = stats.wilcoxon(after, before)
            row |= {"t": t.statistic, "t_p": t.pvalue, "wilcoxon": w.statistic, "wilcoxon_p": w.pvalue}
        rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------ bidirectional


def bidirectional_pairs(
    vectors: Any,
    part: Partition,
    *,
    tolerance: float = 0.5,
    categories: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Disjoint pairs within each group (S-S, F-F), nearest by cosine among partners matched on projection.

    A pair is a candidate when its projections on û differ by at most ``tolerance`` standard deviations of
    the projections (so ``A − B`` has little projection on û). Candidates are taken greedily by descending
    cosine, each concept in at most one pair (an approximate mutual nearest neighbour). With ``categories``
    (concept -> category), only concepts of the same category pair, and concepts without one are left out.

    Returns group ("S-S" / "F-F"), a, b, cosine, projection_a, projection_b, category.
    """
    x = _matrix(vectors, rows=len(part.concepts))
    if not (tolerance > 0 and math.isfinite(tolerance)):
        raise ValueError(f"tolerance must be a positive number of standard deviations, got {tolerance}")
    p = x @ part.direction
    unit = x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-30)
    cos = unit @ unit.T
    width = tolerance * float(p.std())
    concepts = list(part.concepts)
    cat = [None if categories is None else categories.get(c) for c in concepts]
    rows = []
    codes = pd.factorize(pd.Series(cat, dtype=object), use_na_sentinel=True)[0]
    allowed = np.abs(p[:, None] - p[None, :]) <= width
    if categories is not None:
        allowed &= (codes[:, None] == codes[None, :]) & (codes[:, None] >= 0)
    for name, flag in (("S-S", True), ("F-F", False)):
        mine = part.success == flag
        ii, jj = np.nonzero(np.triu(allowed & mine[:, None] & mine[None, :], k=1))
        used = np.zeros(len(p), dtype=bool)
        for k in np.argsort(-cos[ii, jj], kind="stable"):
            i, j = int(ii[k]), int(jj[k])
            if used[i] or used[j]:
                continue
            used[[i, j]] = True
            c = cos[i, j]
            rows.append(
                {
                    "group": name,
                    "a": concepts[i],
                    "b": concepts[j],
                    "cosine": float(c),
                    "projection_a": float(p[i]),
                    "projection_b": float(p[j]),
                    "category": cat[i],
                }
            )
    columns = ["group", "a", "b", "cosine", "projection_a", "projection_b", "category"]
    return pd.DataFrame(rows, columns=columns)


def bidirectional_experiment(
    vectors: Any,
    concepts: Sequence[str],
    pairs: pd.DataFrame,
    *,
    detect: Detect,
    detected_at: float,
    rescale_to: float | None = None,
) -> pd.DataFrame:
    """Steer with ``A − B`` and ``B − A`` for every pair (one ``detect`` call).

    Args:
        detected_at: a direction counts as detected when its rate is at least this (e.g. the partition's
            threshold).
        rescale_to: rescale each difference to this norm (e.g. the mean concept norm); None keeps ‖A − B‖.

    Returns the pairs with norm (of the difference before any rescale), rate_ab, rate_ba, ab, ba, both.
    """
    x = _matrix(vectors)
    index = {c: i for i, c in enumerate(_concept_list(concepts, x.shape[0]))}
    missing = sorted({*pairs["a"], *pairs["b"]} - set(index))
    if missing:
        raise ValueError(f"pairs name concepts without vectors: {missing[:5]}")
    if pairs.empty:
        return pairs.assign(norm=[], rate_ab=[], rate_ba=[], ab=[], ba=[], both=[])
    diff = x[pairs["a"].map(index).to_numpy()] - x[pairs["b"].map(index).to_numpy()]
    norm = np.linalg.norm(diff, axis=1)
    if rescale_to is not None:
        diff = diff * (float(rescale_to) / norm.clip(1e-30))[:, None]
    labels = [f"{a}#minus-{b}" for a, b in zip(pairs["a"], pairs["b"], strict=True)]
    labels += [f"{b}#minus-{a}" for a, b in zip(pairs["a"], pairs["b"], strict=True)]
    rates = _detect(detect, labels, np.concatenate([diff, -diff]))
    n = len(pairs)
    ab, ba = rates[:n] >= detected_at, rates[n:] >= detected_at
    return pairs.assign(norm=norm, rate_ab=rates[:n], rate_ba=rates[n:], ab=ab, ba=ba, both=ab & ba)


def bidirectional_summary(result: pd.DataFrame) -> pd.DataFrame:
    """Per group: n_pairs, n_both (detected both ways), share_both with its Wilson 95% interval, n_one."""
    rows = []
    for group in ("S-S", "F-F"):
        g = result[result["group"] == group]
        k, n = int(g["both"].sum()), len(g)
        lo, hi = wilson_interval(k, n)
        share = k / n if n else math.nan
        n_one = int((g["ab"] ^ g["ba"]).sum())
        rows.append(
            {
                "group": group,
                "n_pairs": n,
                "n_both": k,
                "share_both": share,
                "lo": lo,
                "hi": hi,
                "n_one": n_one,
            }
        )
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------- structure


@dataclass(frozen=True, eq=False)
class ConceptPCA:
    """PCA of the L2-normalized concept vectors."""

    scores: pd.DataFrame
    """One row per concept: concept, pc1, pc2, ..."""
    summary: pd.DataFrame
    """One row per component: component, explained_variance_ratio, and ``alignment_<name>`` = |cos| with
    each given direction."""
    components: np.ndarray
    """Unit principal axes ``[k, d]``."""


def concept_pca(
    vectors: Any,
    concepts: Sequence[str],
    *,
    n_components: int = 10,
    directions: Mapping[str, Any] | None = None,
) -> ConceptPCA:
    """PCA of the concept vectors after L2 normalization (each row scaled to norm 1, then centred).

    ``directions``: named directions (e.g. ``{"delta_mu": part.direction, "refusal": r}``) whose alignment
    |cos| with each principal axis goes in the summary.
    """
    x = _matrix(vectors)
    concepts = _concept_list(concepts, x.shape[0])
    k = min(int(n_components), x.shape[0], x.shape[1])
    if k < 1:
        raise ValueError(f"n_components must be >= 1, got {n_components}")
    unit = x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-30)
    pca = PCA(n_components=k).fit(unit)
    scores = pd.DataFrame(pca.transform(unit), columns=[f"pc{i + 1}" for i in range(k)])
    scores.insert(0, "concept", concepts)
    summary = pd.DataFrame(
        {
            "component": [f"PC{i + 1}" for i in range(k)],
            "explained_variance_ratio": pca.explained_variance_ratio_,
        }
    )
    for name, d in (directions or {}).items():
        u = _unit(d, what=f"direction {name!r}")
        if u.shape[0] != x.shape[1]:
            raise ValueError(f"direction {name!r} has width {u.shape[0]}, the vectors {x.shape[1]}")
        summary[f"alignment_{name}"] = np.abs(pca.components_ @ u)
    return ConceptPCA(scores=scores, summary=summary, components=pca.components_.copy())


def lens_logits(
    model: Model, vectors: Float[Tensor, "n d_model"] | np.ndarray, *, final_norm: bool = True
) -> Float[Tensor, "n vocab"]:
    """Logits of residual vectors read as the last layer's output: Gemma 3's final RMSNorm (``x / rms(x) ·
    (1 + w)``, the model's own module), the unembedding, and the final-logit softcap if the config has one.

    The norm divides by ``rms(x)``, so a direction's scale does not matter (up to the norm's epsilon).
    ``final_norm=False`` multiplies by ``W_U`` alone. Returns float32 on the CPU.
    """
    hf = model.original_model
    x = torch.as_tensor(_matrix(vectors), dtype=torch.float32, device=model.cfg.device)
    if x.shape[1] != int(model.cfg.d_model):
        raise ValueError(f"vectors have width {x.shape[1]}, but the model's d_model is {model.cfg.d_model}")
    with torch.no_grad():
        h = hf.model.norm(x) if final_norm else x
        logits = h.float() @ unembedding(model).detach().float()
        cap = getattr(hf.config, "final_logit_softcapping", None)
        if final_norm and cap:
            logits = torch.tanh(logits / cap) * cap
    return logits.cpu()


def logit_lens(
    model: Model, directions: Mapping[str, Any], *, k: int = 10, final_norm: bool = True
) -> pd.DataFrame:
    """Top and bottom ``k`` tokens of each direction through the final norm and unembedding
    (:func:`lens_logits`).

    Returns direction, side ("top"/"bottom"), rank (0 = most extreme), token, token_id, logit.
    """
    names = list(directions)
    if not names:
        raise ValueError("no directions given")
    logits = lens_logits(
        model, np.stack([_unit(directions[n], what=f"direction {n!r}") for n in names]), final_norm=final_norm
    )
    tok = model.tokenizer
    rows = []
    for name, row in zip(names, logits, strict=True):
        for side, largest in (("top", True), ("bottom", False)):
            values, ids = row.topk(min(k, row.shape[0]), largest=largest)
            for rank, (v, i) in enumerate(zip(values.tolist(), ids.tolist(), strict=True)):
                rows.append(
                    {
                        "direction": name,
                        "side": side,
                        "rank": rank,
                        "token": tok.decode([i]),
                        "token_id": i,
                        "logit": v,
                    }
                )
    return pd.DataFrame(rows)


def token_variants(model: Model, concept: str) -> tuple[list[int], bool]:
    """Token ids of the concept's case and space variants (as is, lower, Capitalized, UPPER; with and
    without a leading space) that are single known tokens; ``(ids, True)``. When none is, the first token
    of each variant, ``(ids, False)``."""
    tok = model.tokenizer
    forms = dict.fromkeys(
        prefix + form
        for form in (concept, concept.lower(), concept.capitalize(), concept.upper(), concept.title())
        for prefix in ("", " ")
    )
    single, first = [], []
    for text in forms:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if not ids:
            continue
        if len(ids) == 1 and ids[0] != tok.unk_token_id:
            single.append(int(ids[0]))
        if ids[0] != tok.unk_token_id:
            first.append(int(ids[0]))
    if single:
        return list(dict.fromkeys(single)), True
    if not first:
        raise ValueError(f"no variant of {concept!r} tokenizes to a known token")
    return list(dict.fromkeys(first)), False


def verbalizability(
    model: Model, vectors: Any, concepts: Sequence[str], *, final_norm: bool = True
) -> pd.DataFrame:
    """How strongly each concept vector, read through the logit lens, already says its own word.

    Score = the largest :func:`lens_logits` logit among the concept's token variants (:func:`token_variants`);
    rank = how many vocabulary tokens score higher (0 = the top token). Returns concept, token, token_id,
    score, rank, n_variants, single_token.
    """
    x = _matrix(vectors)
    concepts = _concept_list(concepts, x.shape[0])
    logits = lens_logits(model, x, final_norm=final_norm)
    rows = []
    for concept, row in zip(concepts, logits, strict=True):
        ids, single = token_variants(model, concept)
        scores = row[ids]
        best = int(scores.argmax())
        score = float(scores[best])
        rows.append(
            {
                "concept": concept,
                "token": model.tokenizer.decode([ids[best]]),
                "token_id": ids[best],
                "score": score,
                "rank": int((row > score).sum()),
                "n_variants": len(ids),
                "single_token": single,
            }
        )
    return pd.DataFrame(rows)


def delta_pcs(vectors: Any, part: Partition, *, k: int = 3) -> tuple[np.ndarray, pd.DataFrame]:
    """Top ``k`` principal axes of the success vectors after projecting û out (``v − (v·û)û``).

    Each axis is oriented towards the success vectors' mean (of the projected-out vectors). Returns the unit
    axes ``[k, d]`` (orthogonal to û) and component, explained_variance_ratio, cos_direction (≈ 0).
    """
    x = _matrix(vectors, rows=len(part.concepts))
    s = x[part.success]
    u = part.direction
    s = s - (s @ u)[:, None] * u[None, :]
    k = int(k)
    if not 1 <= k <= min(s.shape):
        raise ValueError(f"k must be in 1..{min(s.shape)} (success concepts, d_model), got {k}")
    pca = PCA(n_components=k).fit(s)
    axes = pca.components_ * np.where(pca.components_ @ s.mean(axis=0) < 0, -1.0, 1.0)[:, None]
    table = pd.DataFrame(
        {
            "component": [f"delta-PC{i + 1}" for i in range(k)],
            "explained_variance_ratio": pca.explained_variance_ratio_,
            "cos_direction": axes @ u,
        }
    )
    return axes, table


def direction_sweep(
    directions: Mapping[str, Any], *, detect: Detect, scale: float, multiples: Sequence[float]
) -> pd.DataFrame:
    """Steer along each unit direction times ``scale * multiple`` (one ``detect`` call).

    With ``detect`` at the default strength ``s``, a multiple ``m`` injects ``s * m * scale`` along the
    direction: with ``scale`` = the mean concept norm, ``m = 1`` is an injection as strong as an average
    concept's. Returns direction, multiple, norm (scale * multiple), rate.
    """
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be a positive number, got {scale}")
    multiples = [float(m) for m in multiples]
    if not multiples or not all(math.isfinite(m) for m in multiples):
        raise ValueError(f"multiples must be finite numbers, got {multiples}")
    rows, vecs = [], []
    for name, d in directions.items():
        u = _unit(d, what=f"direction {name!r}")
        for m in multiples:
            rows.append({"direction": name, "multiple": m, "norm": scale * m})
            vecs.append(u * scale * m)
    if not rows:
        raise ValueError("no directions given")
    frame = pd.DataFrame(rows)
    labels = [f"{d}#x{m:g}" for d, m in zip(frame["direction"], frame["multiple"], strict=True)]
    return frame.assign(rate=_detect(detect, labels, np.stack(vecs)))


# ----------------------------------------------------------------------------------------------- ridge


def nested_ridge(
    y: Sequence[float],
    design: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    *,
    n_splits: int = 5,
    alphas: Sequence[float] = RIDGE_ALPHAS,
    seed: int = 0,
) -> tuple[dict[str, float], np.ndarray]:
    """Outer K-fold; in each training fold, standardize and fit ``RidgeCV`` over ``alphas`` (its efficient
    leave-one-out picks alpha), then predict the held-out fold.

    ``design(train, test)`` returns ``(X_train, X_test)`` built from the training fold only (so any feature
    selection or direction it learns stays inside the fold). Returns ({r2 (of the pooled out-of-fold
    predictions), r2_fold_mean, r2_fold_sd, spearman (out-of-fold), alpha_median}, out-of-fold predictions).
    """
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 1 or not np.isfinite(y).all():
        raise ValueError("y must be a finite 1-D array")
    if not 2 <= n_splits <= len(y):
        raise ValueError(f"n_splits must be in 2..{len(y)}, got {n_splits}")
    pred = np.empty_like(y)
    folds, chosen = [], []
    for train, test in KFold(n_splits=n_splits, shuffle=True, random_state=seed).split(y):
        x_train, x_test = design(train, test)
        x_train, x_test = (
            np.asarray(x_train, float).reshape(len(train), -1),
            np.asarray(x_test, float).reshape(len(test), -1),
        )
        fit = make_pipeline(StandardScaler(), RidgeCV(alphas=alphas)).fit(x_train, y[train])
        pred[test] = fit.predict(x_test)
        folds.append(r2_score(y[test], pred[test]) if len(test) > 1 else np.nan)
        chosen.append(float(fit[-1].alpha_))
    result = {
        "r2": float(r2_score(y, pred)),
        "r2_fold_mean": float(np.nanmean(folds)),
        "r2_fold_sd": float(np.nanstd(folds)),
        "spearman": float(stats.spearmanr(y, pred).statistic) if np.ptp(pred) > 0 else np.nan,
        "alpha_median": float(np.median(chosen)),
    }
    return result, pred


def _top_features(x: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` columns of ``x`` with the largest |Pearson correlation| with ``y``."""
    r = np.nan_to_num(np.abs(pearson_columns(y, x)), nan=-1.0)
    return np.argsort(-r, kind="stable")[:k]


def ridge_r2(
    vectors: Any,
    part: Partition,
    *,
    features: np.ndarray | pd.DataFrame | None = None,
    counts: Sequence[int] = (1, 2, 5, 10, 20, 50, 100),
    leaky: bool = False,
    n_splits: int = 5,
    alphas: Sequence[float] = RIDGE_ALPHAS,
    seed: int = 0,
) -> pd.DataFrame:
    """Cross-validated R² of per-concept rates (``part.rates``) from several predictor sets.

    Predictors: ``norm`` (‖v‖ alone), ``projection`` (v·û with û recomputed from each training fold's
    success/failure split at the partition's threshold), ``norm + projection``, ``raw vectors`` (all
    d_model coordinates), and, with ``features`` (``[concept, feature]`` activations), the top ``n`` features
    for each ``n`` in ``counts``, ranked by |correlation| with the rate **inside each training fold**.
    ``leaky=True`` adds the same with features ranked on all concepts (which leaks the held-out rates into
    the selection and inflates R²), for comparison.

    Returns predictor, ranking ("fold" / "all (leaks)" / "-"), n_features, and the columns of
    :func:`nested_ridge`.
    """
    x = _matrix(vectors, rows=len(part.concepts))
    y = part.rates
    norm = np.linalg.norm(x, axis=1)

    def fold_projection(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        labels = y[train] >= part.threshold
        if labels.all() or not labels.any():
            u = np.zeros(x.shape[1])
        else:
            u = _unit(_mean_difference(x[train], labels), what="fold's mean difference")
        return x[train] @ u, x[test] @ u

    def both(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ptr, pte = fold_projection(train, test)
        return np.c_[norm[train], ptr], np.c_[norm[test], pte]

    sets: list[tuple[str, str, int, Callable]] = [
        ("norm", "-", 1, lambda tr, te: (norm[tr], norm[te])),
        ("projection", "-", 1, fold_projection),
        ("norm + projection", "-", 2, both),
        ("raw vectors", "-", x.shape[1], lambda tr, te: (x[tr], x[te])),
    ]
    if features is not None:
        f = _matrix(
            features.to_numpy() if isinstance(features, pd.DataFrame) else features,
            what="features",
            rows=len(y),
        )
        for n in sorted({min(int(c), f.shape[1]) for c in counts if int(c) >= 1}):

            def in_fold(train: np.ndarray, test: np.ndarray, n: int = n) -> tuple[np.ndarray, np.ndarray]:
                top = _top_features(f[train], y[train], n)
                return f[np.ix_(train, top)], f[np.ix_(test, top)]

            sets.append(("transcoder features", "fold", n, in_fold))
            if leaky:
                top_all = _top_features(f, y, n)
                sets.append(
                    (
                        "transcoder features",
                        "all (leaks)",
                        n,
                        lambda tr, te, t=top_all: (f[np.ix_(tr, t)], f[np.ix_(te, t)]),
                    )
                )
    rows = []
    for name, ranking, n, design in sets:
        result, _ = nested_ridge(y, design, n_splits=n_splits, alphas=alphas, seed=seed)
        rows.append({"predictor": name, "ranking": ranking, "n_features": n} | result)
    return pd.DataFrame(rows)


@torch.no_grad()
def transcoder_activations(
    model: Model,
    transcoders: Transcoders,
    concepts: Sequence[str],
    *,
    vectors: Float[Tensor, "concept d_model"],
    strength: float | None = None,
    layers: Sequence[int] | None = None,
    batch_size: int = 64,
) -> pd.DataFrame:
    """Transcoder activations at the last prompt token with each concept injected at ``strength`` (default:
    the model's), for the layers after the injection layer (default): a ``[concept, feature]`` table of the
    features active for some concept, columns named ``"L{layer} F{index}"``, index = concept."""
    spec = spec_for(model)
    strength = spec.strength if strength is None else float(strength)
    if layers is None:
        layers = [layer for layer in sorted(transcoders) if layer > spec.injection_layer]
    if not layers:
        raise ValueError(
            f"no transcoder layer after the injection layer {spec.injection_layer}; "
            f"loaded: {sorted(transcoders)}"
        )
    grid = feature_grid(
        model,
        transcoders,
        list(concepts),
        vectors=vectors,
        strengths=[strength],
        layers=layers,
        default_strength=strength,
        batch_size=batch_size,
    )
    blocks, names = [], []
    for layer in grid.layers:
        active = grid.active(layer)
        blocks.append(grid.dense(layer, active)[:, 0, :].numpy())
        names += [feature_name(layer, int(i)) for i in active]
    data = np.concatenate(blocks, axis=1) if blocks else np.zeros((len(concepts), 0))
    return pd.DataFrame(data, index=pd.Index(list(concepts), name="concept"), columns=names)


# ----------------------------------------------------------------------------------------------- noise


def noise_vectors(vectors: Any, *, kind: str = "isotropic", repeats: int = 1, seed: int = 0) -> np.ndarray:
    """Random vectors norm-matched to the concept vectors: row ``k`` has the norm of concept ``k % n``.

    ``isotropic``: a Gaussian direction (uniform on the sphere). ``covariance``: a draw from ``N(0, Σ)``
    with ``Σ`` the covariance of the concept vectors (their centred span; ``Σ`` is never formed). Returns
    ``[repeats * n, d]``.
    """
    x = _matrix(vectors)
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; valid: {list(NOISE_KINDS)}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    n, d = x.shape
    rng = np.random.default_rng(seed)
    if kind == "isotropic":
        g = rng.standard_normal((repeats * n, d))
    else:
        if n < 2:
            raise ValueError("the covariance needs at least 2 concept vectors")
        centred = x - x.mean(axis=0)
        g = rng.standard_normal((repeats * n, n)) @ centred / math.sqrt(n - 1)
    norms = np.tile(np.linalg.norm(x, axis=1), repeats)
    return g * (norms / np.linalg.norm(g, axis=1).clip(1e-30))[:, None]


def noise_experiment(
    vectors: Any,
    concepts: Sequence[str],
    *,
    detect: Detect,
    kinds: Sequence[str] = NOISE_KINDS,
    repeats: int = 1,
    multiples: Sequence[float] = (1.0,),
    seed: int = 0,
) -> pd.DataFrame:
    """Concept vectors and norm-matched random vectors of each kind, each times every multiple of the default
    strength (one ``detect`` call).

    Returns source ("concept" or a noise kind), concept (the norm-matched concept), repeat, multiple, norm
    (of the vector before the multiple), rate.
    """
    x = _matrix(vectors)
    concepts = _concept_list(concepts, x.shape[0])
    n = len(concepts)
    blocks, vecs = [], []
    for source in ["concept", *kinds]:
        v = x if source == "concept" else noise_vectors(x, kind=source, repeats=repeats, seed=seed)
        reps = 1 if source == "concept" else repeats
        for m in multiples:
            blocks.append(
                pd.DataFrame(
                    {
                        "source": source,
                        "concept": concepts * reps,
                        "repeat": np.repeat(np.arange(reps), n),
                        "multiple": float(m),
                        "norm": np.linalg.norm(v, axis=1),
                    }
                )
            )
            vecs.append(v * float(m))
    frame = pd.concat(blocks, ignore_index=True)
    labels = [
        _rerun_label(c, m) if s == "concept" else f"{c}#noise-{s}-{r}-x{m:g}"
        for s, c, r, m in zip(
            frame["source"], frame["concept"], frame["repeat"], frame["multiple"], strict=True
        )
    ]
    return frame.assign(rate=_detect(detect, labels, np.concatenate(vecs)))
