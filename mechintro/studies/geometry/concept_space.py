"""Concept-space structure (the paper's Figure 8a-c): PCA of the normalized concept vectors, the logit lens
and verbalizability, and the principal axes of the success vectors with û projected out (δPCs), steered
along."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from sklearn.decomposition import PCA
from torch import Tensor

from mechintro.core import validate
from mechintro.core.models import Model
from mechintro.core.readout import unembedding
from mechintro.studies.geometry.common import Detect, as_matrix, concept_list, detect_rates, unit_vector
from mechintro.studies.geometry.partitioning import Partition

__all__ = [
    "ConceptPCA",
    "concept_pca",
    "delta_pcs",
    "direction_sweep",
    "lens_logits",
    "logit_lens",
    "token_variants",
    "verbalizability",
]


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
    x = as_matrix(vectors)
    concepts = concept_list(concepts, x.shape[0])
    k = min(validate.count("n_components", n_components), x.shape[0], x.shape[1])
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
        u = unit_vector(d, what=f"direction {name!r}")
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
    x = torch.as_tensor(as_matrix(vectors), dtype=torch.float32, device=model.cfg.device)
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
        model,
        np.stack([unit_vector(directions[n], what=f"direction {n!r}") for n in names]),
        final_norm=final_norm,
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
    x = as_matrix(vectors)
    concepts = concept_list(concepts, x.shape[0])
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
    x = as_matrix(vectors, rows=len(part.concepts))
    s = x[part.success]
    u = part.direction
    s = s - (s @ u)[:, None] * u[None, :]
    k = validate.count("k", k)
    if not k <= min(s.shape):
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
    scale = validate.positive_number("scale", scale)
    multiples = [float(m) for m in multiples]
    if not multiples or not all(math.isfinite(m) for m in multiples):
        raise ValueError(f"multiples must be finite numbers, got {multiples}")
    rows, vecs = [], []
    for name, d in directions.items():
        u = unit_vector(d, what=f"direction {name!r}")
        for m in multiples:
            rows.append({"direction": name, "multiple": m, "norm": scale * m})
            vecs.append(u * scale * m)
    if not rows:
        raise ValueError("no directions given")
    frame = pd.DataFrame(rows)
    labels = [f"{d}#x{m:g}" for d, m in zip(frame["direction"], frame["multiple"], strict=True)]
    return frame.assign(rate=detect_rates(detect, labels, np.stack(vecs)))
