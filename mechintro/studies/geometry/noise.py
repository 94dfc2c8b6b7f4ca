"""Noise controls: random vectors norm-matched to the concept vectors, isotropic or with the concept vectors'
covariance, steered like the concepts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from mechintro.core import validate
from mechintro.studies.geometry.common import Detect, as_matrix, concept_list, detect_rates, rerun_label

__all__ = [
    "NOISE_KINDS",
    "noise_experiment",
    "noise_vectors",
]

NOISE_KINDS = ("isotropic", "covariance")
"""Random directions: uniform on the sphere, or Gaussian with the concept vectors' covariance."""


def noise_vectors(vectors: Any, *, kind: str = "isotropic", repeats: int = 1, seed: int = 0) -> np.ndarray:
    """Random vectors norm-matched to the concept vectors: row ``k`` has the norm of concept ``k % n``.

    ``isotropic``: a Gaussian direction (uniform on the sphere). ``covariance``: a draw from ``N(0, Σ)``
    with ``Σ`` the covariance of the concept vectors (their centred span; ``Σ`` is never formed). Returns
    ``[repeats * n, d]``.
    """
    x = as_matrix(vectors)
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; valid: {list(NOISE_KINDS)}")
    repeats = validate.count("repeats", repeats)
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
    x = as_matrix(vectors)
    concepts = concept_list(concepts, x.shape[0])
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
        rerun_label(c, m) if s == "concept" else f"{c}#noise-{s}-{r}-x{m:g}"
        for s, c, r, m in zip(
            frame["source"], frame["concept"], frame["repeat"], frame["multiple"], strict=True
        )
    ]
    return frame.assign(rate=detect_rates(detect, labels, np.concatenate(vecs)))
