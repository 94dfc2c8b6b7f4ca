"""Bidirectional steering (the paper's Figure 7): steer with ``A − B`` and ``B − A`` for nearest-neighbour
pairs within a group matched on their projection; a rule that is linear in one direction can never detect
both (``f(x) = f(−x)`` is needed)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from mechintro.behaviour.metrics import wilson_interval
from mechintro.core import validate
from mechintro.studies.geometry.common import Detect, as_matrix, concept_list, detect_rates
from mechintro.studies.geometry.partitioning import Partition

__all__ = [
    "bidirectional_experiment",
    "bidirectional_pairs",
    "bidirectional_summary",
]


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
    x = as_matrix(vectors, rows=len(part.concepts))
    tolerance = validate.positive_number("tolerance", tolerance, unit="of standard deviations")
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
    x = as_matrix(vectors)
    index = {c: i for i, c in enumerate(concept_list(concepts, x.shape[0]))}
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
    rates = detect_rates(detect, labels, np.concatenate([diff, -diff]))
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
