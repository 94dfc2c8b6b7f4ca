"""Swaps (the paper's Figure 6): write ``v = (v·û)û + r``; swap the projection (or the residual ``r``) with a
partner from the other group, rescale to ``‖v‖``, rerun the trials, and test the change per concept (paired t,
Wilcoxon)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from mechintro.studies.geometry.common import Detect, as_matrix, detect_rates, rerun_label, unit_vector
from mechintro.studies.geometry.partitioning import Partition

__all__ = [
    "PARTNER_RULES",
    "SWAP_KINDS",
    "paired_tests",
    "swap_experiment",
    "swap_partners",
    "swap_vectors",
]

SWAP_KINDS = ("projection", "residual")
"""What a swap takes from the partner: its projection on û, or its residual orthogonal to û."""
PARTNER_RULES = ("random", "nearest")
"""How a swap partner is drawn from the other group: at random, or the nearest by cosine."""


def swap_partners(vectors: Any, success: np.ndarray, *, rule: str = "random", seed: int = 0) -> np.ndarray:
    """For each concept, the index of a partner in the other group: random, or nearest by cosine."""
    x = as_matrix(vectors)
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
    x = as_matrix(vectors)
    u = unit_vector(direction)
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
    x = as_matrix(vectors, rows=len(part.concepts))
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
        rerun_label(c) if k == "original" else f"{c}#{k}-swap-{r}"
        for c, k, r in zip(frame["concept"], frame["kind"], frame["partners"], strict=True)
    ]
    rates = detect_rates(detect, labels, np.concatenate(rows))
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
