"""The success/failure partition: sweep a threshold on the detection (or detection-and-identification)
rate, keep the one with the best mean macro-F1 of a 5-fold stratified LDA among those whose minority class
holds more than 20% of the concepts; the unit mean-difference direction ``û`` (Δμ), cross-validated balanced
accuracy, silhouette."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Float
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.metrics import balanced_accuracy_score, silhouette_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict, cross_val_score
from torch import Tensor

from mechintro.studies.geometry.common import as_matrix, concept_list, rates_for, unit_vector

__all__ = [
    "Partition",
    "mean_difference",
    "partition",
]


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
        return as_matrix(vectors) @ self.direction

    def frame(self, vectors: Any) -> pd.DataFrame:
        """One row per concept: concept, rate, group, projection (on û), norm, cosine with û."""
        x = as_matrix(vectors, rows=len(self.concepts))
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


def mean_difference(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return x[y].mean(axis=0) - x[~y].mean(axis=0)


def _projection_predictions(x: np.ndarray, y: np.ndarray, folds: StratifiedKFold) -> np.ndarray:
    """Out-of-fold predictions of the one-direction rule (Δμ and the cut learned in the training fold)."""
    pred = np.zeros(len(y), dtype=bool)
    for train, test in folds.split(x, y):
        u = unit_vector(mean_difference(x[train], y[train]), what="fold's mean difference")
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
    x = as_matrix(vectors)
    concepts = concept_list(concepts, x.shape[0])
    r = rates_for(rates, concepts, rate)
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
    delta = mean_difference(x, y)
    lda = _lda(shrinkage).fit(x, y)
    lda_dir = unit_vector(lda.coef_[0], what="LDA coefficient")
    pred = cross_val_predict(_lda(shrinkage), x, y, cv=folds)
    return Partition(
        concepts=tuple(concepts),
        rates=r,
        rate=rate,
        threshold=threshold,
        success=y,
        direction=unit_vector(delta, what="mean difference"),
        delta_mu_norm=float(np.linalg.norm(delta)),
        lda_direction=lda_dir,
        macro_f1=float(best["macro_f1"]),
        balanced_accuracy=float(balanced_accuracy_score(y, pred)),
        projection_balanced_accuracy=float(balanced_accuracy_score(y, _projection_predictions(x, y, folds))),
        silhouette=float(silhouette_score(x, y, metric=silhouette_metric)),
        sweep=sweep.reset_index(drop=True),
    )
