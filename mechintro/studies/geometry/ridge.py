"""Ridge regression of per-concept detection (the paper's Figure 8d): predictors with nested cross-validation;
transcoder features are ranked inside each training fold."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from scipy import stats
from sklearn.linear_model import RidgeCV
from sklearn.metrics import r2_score
from sklearn.model_selection import KFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor

from mechintro.core.models import Model, Transcoders, spec_for
from mechintro.core.stats import pearson_columns
from mechintro.core.transcoders import feature_name
from mechintro.mechanism.features import feature_grid
from mechintro.studies.geometry.common import as_matrix, unit_vector
from mechintro.studies.geometry.partitioning import Partition, mean_difference

__all__ = [
    "RIDGE_ALPHAS",
    "nested_ridge",
    "ridge_r2",
    "transcoder_activations",
]

RIDGE_ALPHAS = tuple(float(a) for a in np.logspace(-4, 5, 19))
"""The inner RidgeCV's alpha grid (log-spaced)."""


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
    x = as_matrix(vectors, rows=len(part.concepts))
    y = part.rates
    norm = np.linalg.norm(x, axis=1)

    def fold_projection(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        labels = y[train] >= part.threshold
        if labels.all() or not labels.any():
            u = np.zeros(x.shape[1])
        else:
            u = unit_vector(mean_difference(x[train], labels), what="fold's mean difference")
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
        f = as_matrix(
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
