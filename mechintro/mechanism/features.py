"""Transcoder features over (concept x strength) grids: gate candidates, dose-strength statistics, carriers.

The pipeline of the paper's feature analysis:

1. :func:`feature_grid` -- transcoder activations at the last prompt token for every (concept, strength),
   one batched forward per chunk of rows (rows = concepts x strengths, each with its own injection strength),
   every layer captured in that pass, kept sparse (a 262k-wide Gemma Scope layer fits in memory).
2. :func:`dla_scores` / :func:`find_gates` -- gate candidates by direct logit attribution in unsteered trial
   prompts: ``score = (unit decoder direction . (mean Yes unembedding - mean No unembedding)) x activation``,
   with no final-norm scaling (Gemma ties its embeddings; see
   :func:`mechintro.core.readout.yes_no_direction`).
   Candidates are the ``k`` most negative scores, the features that promote "No".
3. :func:`feature_stats` -- per-feature statistics: dose-strength Spearman correlations on each side of zero,
   the inverted-V score, and correlations with each concept's detection and forced-identification rates.
4. :func:`find_evidence_carriers` -- for one gate, the features of the layers between the injection layer and
   the gate's layer that suppress it (negative attribution ``virtual weight x activation``).

Features are named ``"L{layer} F{index}"`` (:func:`feature_name`, :func:`parse_feature`).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, TypeAlias

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechintro.behaviour.metrics import concept_rates
from mechintro.core import kvcache, validate
from mechintro.core.concepts import check_concepts, concept_vectors
from mechintro.core.hooks import Positions, capture, check_layer, check_positions
from mechintro.core.html import card
from mechintro.core.models import Model, Transcoders, spec_for
from mechintro.core.progress import progress_bar
from mechintro.core.prompts import VARIANTS, TrialPrompt, trial_prompt
from mechintro.core.readout import yes_no_direction
from mechintro.core.settings import BATCHING, TRIALS, check_choices
from mechintro.core.stats import pearson_columns, spearman_columns
from mechintro.core.steering import inject
from mechintro.core.transcoders import (
    encode_features,
    feature_name,
    input_candidates,
    parse_feature,
    transcoder_site,
)

__all__ = [
    "STRENGTH_MULTIPLES",
    "FeatureGrid",
    "FeatureGridConfig",
    "concept_rates",
    "default_strengths",
    "dla_scores",
    "dose_spearman",
    "encode_features",
    "feature_grid",
    "feature_name",
    "feature_stats",
    "find_evidence_carriers",
    "find_gates",
    "grid_from_frame",
    "inverted_v",
    "merge_grids",
    "parse_feature",
    "virtual_weights",
]

STRENGTH_MULTIPLES = (-2.0, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 2.0)
"""Default grid strengths as multiples of the model's default strength (the paper's -8..8 at strength 4)."""

# ----------------------------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class FeatureGrid:
    """Transcoder activations at one prompt position for every (concept, strength), stored sparse."""

    concepts: tuple[str, ...]
    """The concepts (first dimension)."""
    strengths: tuple[float, ...]
    """The injection strengths (second dimension), sorted ascending."""
    acts: dict[int, Tensor]
    """``{layer: coalesced sparse COO float32 [concept, strength, d_sae]}``; only nonzero activations
    stored."""
    injection_layer: int
    """The layer the concept vectors were injected at (resid_post)."""
    default_strength: float
    """The strength used for detection correlations and carrier attributions (one of ``strengths``)."""
    trial: int = 1
    """The trial number of the prompt."""
    positions: str | int = "last"
    """``"last"`` (the last prompt token) or an absolute token index."""

    @property
    def layers(self) -> list[int]:
        return sorted(self.acts)

    def d_sae(self, layer: int) -> int:
        return int(self._layer(layer).shape[2])

    def _layer(self, layer: int) -> Tensor:
        if layer not in self.acts:
            raise ValueError(f"the grid has no layer {layer}; its layers are {self.layers}")
        return self.acts[layer]

    def strength_index(self, strength: float) -> int:
        """Index of ``strength`` in :attr:`strengths` (raises naming the valid ones)."""
        for i, s in enumerate(self.strengths):
            if math.isclose(s, float(strength), rel_tol=1e-9, abs_tol=1e-9):
                return i
        raise ValueError(f"strength {strength} is not in the grid; its strengths are {list(self.strengths)}")

    def dense(self, layer: int, features: Sequence[int] | Tensor | None = None) -> Float[Tensor, "c s f"]:
        """Dense activations ``[concept, strength, feature]`` of ``features`` (default: all) of ``layer``."""
        acts = self._layer(layer)
        if features is not None:
            acts = torch.index_select(acts, 2, torch.as_tensor(features, dtype=torch.long))
        return acts.to_dense()

    def active(self, layer: int, *, strength: float | None = None) -> Int[Tensor, " n"]:
        """Sorted indices of the features of ``layer`` active for any concept (at ``strength``, or any)."""
        acts = self._layer(layer)
        idx, values = acts.indices(), acts.values()
        keep = values != 0
        if strength is not None:
            keep &= idx[1] == self.strength_index(strength)
        return torch.unique(idx[2, keep])

    def unsteered(self, layer: int) -> Float[Tensor, " d_sae"]:
        """Mean activation over concepts at strength 0 (every concept shares the unsteered prompt)."""
        zero = self.strength_index(0.0)
        acts = self._layer(layer)
        idx, values = acts.indices(), acts.values()
        keep = idx[1] == zero
        out = torch.zeros(acts.shape[2], dtype=values.dtype)
        out.index_add_(0, idx[2, keep], values[keep])
        return out / len(self.concepts)

    def summary(self) -> pd.DataFrame:
        """Per layer: d_sae, nonzero entries, and features active at any strength, at the default strength
        and unsteered (strength 0, when on the grid)."""
        rows = []
        has_zero = any(s == 0.0 for s in self.strengths)
        for layer in self.layers:
            rows.append(
                {
                    "layer": layer,
                    "d_sae": self.d_sae(layer),
                    "nonzero": int(self.acts[layer].values().ne(0).sum()),
                    "active_any": len(self.active(layer)),
                    "active_default": len(self.active(layer, strength=self.default_strength)),
                    "active_unsteered": len(self.active(layer, strength=0.0)) if has_zero else None,
                }
            )
        return pd.DataFrame(rows)

    def _repr_html_(self) -> str:
        facts = {
            "concepts": list(self.concepts),
            "strengths": list(self.strengths),
            "injection layer": self.injection_layer,
            "default strength": self.default_strength,
            "trial / position": f"{self.trial} / {self.positions}",
        }
        return card("FeatureGrid", facts, [("active features per layer", self.summary())], max_rows=64)

    def to_frame(self) -> pd.DataFrame:
        """Tidy nonzero activations: concept, strength, layer, index, feature, activation (metadata in
        attrs)."""
        frames = []
        for layer in self.layers:
            acts = self.acts[layer]
            c, s, f = acts.indices().numpy()
            frames.append(
                pd.DataFrame(
                    {
                        "concept": np.asarray(self.concepts, dtype=object)[c],
                        "strength": np.asarray(self.strengths)[s],
                        "layer": layer,
                        "index": f,
                        "activation": acts.values().numpy(),
                    }
                )
            )
        df = (
            pd.concat(frames, ignore_index=True)
            if frames
            else pd.DataFrame(columns=["concept", "strength", "layer", "index", "activation"])
        )
        df.insert(4, "feature", [feature_name(la, i) for la, i in zip(df["layer"], df["index"], strict=True)])
        df.attrs = {
            "concepts": list(self.concepts),
            "strengths": list(self.strengths),
            "d_sae": {int(la): self.d_sae(la) for la in self.layers},
            "injection_layer": self.injection_layer,
            "default_strength": self.default_strength,
            "trial": self.trial,
            "positions": self.positions,
        }
        return df


def grid_from_frame(df: pd.DataFrame, **meta: Any) -> FeatureGrid:
    """Rebuild a :class:`FeatureGrid` from :meth:`FeatureGrid.to_frame` (metadata from ``df.attrs`` or
    ``meta``)."""
    info = dict(df.attrs) | meta
    missing = [
        k for k in ("concepts", "strengths", "d_sae", "injection_layer", "default_strength") if k not in info
    ]
    if missing:
        raise ValueError(f"grid_from_frame needs {missing} (in df.attrs or as keyword arguments)")
    concepts, strengths = tuple(info["concepts"]), tuple(float(s) for s in info["strengths"])
    c_of = {c: i for i, c in enumerate(concepts)}
    s_of = {s: i for i, s in enumerate(strengths)}
    acts = {}
    for layer, d_sae in info["d_sae"].items():
        rows = df[df["layer"] == int(layer)]
        idx = torch.tensor(
            np.stack(
                [
                    rows["concept"].map(c_of).to_numpy(dtype=np.int64),
                    rows["strength"].astype(float).map(s_of).to_numpy(dtype=np.int64),
                    rows["index"].to_numpy(dtype=np.int64),
                ]
            ).reshape(3, -1)
        )
        values = torch.tensor(rows["activation"].to_numpy(dtype=np.float32))
        shape = (len(concepts), len(strengths), int(d_sae))
        acts[int(layer)] = torch.sparse_coo_tensor(idx, values, shape, check_invariants=True).coalesce()
    return FeatureGrid(
        concepts=concepts,
        strengths=strengths,
        acts=acts,
        injection_layer=int(info["injection_layer"]),
        default_strength=float(info["default_strength"]),
        trial=int(info.get("trial", 1)),
        positions=info.get("positions", info.get("position", "last")),
    )


def merge_grids(grids: Sequence[FeatureGrid]) -> FeatureGrid:
    """One grid from grids of parts of the concepts and/or layers (a sharded run); exact: the stored
    activations are concatenated, never recomputed.

    The parts must share strengths, injection layer, default strength, trial and position, and cover every
    (concept, layer) cell of the result exactly once. Concepts keep their order of first appearance, so parts
    given in order rebuild the unsharded order.
    """
    grids = list(grids)
    if not grids or not all(isinstance(g, FeatureGrid) for g in grids):
        raise TypeError("merge_grids needs a non-empty sequence of FeatureGrid")
    first = grids[0]
    shared = ("strengths", "injection_layer", "default_strength", "trial", "positions")
    for g in grids[1:]:
        differ = [name for name in shared if getattr(g, name) != getattr(first, name)]
        if differ:
            raise ValueError(f"grids to merge differ in {differ}; only concepts and layers may differ")
    concepts = tuple(dict.fromkeys(c for g in grids for c in g.concepts))
    c_of = {c: i for i, c in enumerate(concepts)}
    layers = sorted({layer for g in grids for layer in g.layers})
    acts = {}
    for layer in layers:
        parts = [g for g in grids if layer in g.acts]
        covered = [c for g in parts for c in g.concepts]
        if sorted(covered) != sorted(concepts):
            twice = sorted({c for c in covered if covered.count(c) > 1})
            missing = sorted(set(concepts) - set(covered))
            raise ValueError(
                f"layer {layer}: the grids must cover every concept once; twice: {twice}, missing: {missing}"
            )
        widths = {g.d_sae(layer) for g in parts}
        if len(widths) != 1:
            raise ValueError(f"layer {layer}: the grids have different transcoder widths {sorted(widths)}")
        indices, values = [], []
        for g in parts:
            part = g.acts[layer]
            idx = part.indices().clone()
            idx[0] = torch.tensor([c_of[c] for c in g.concepts], dtype=torch.long)[idx[0]]
            indices.append(idx)
            values.append(part.values())
        shape = (len(concepts), len(first.strengths), widths.pop())
        acts[layer] = torch.sparse_coo_tensor(
            torch.cat(indices, dim=1), torch.cat(values), shape, check_invariants=True
        ).coalesce()
    return replace(first, concepts=concepts, acts=acts)


def default_strengths(model: Model) -> tuple[float, ...]:
    """:data:`STRENGTH_MULTIPLES` times the model's default strength (-8..8 for the paper's strength 4)."""
    base = spec_for(model).strength
    return tuple(float(base * m) for m in STRENGTH_MULTIPLES)


def grid_position(text: str) -> str | int:
    """An argparse type for the grid's one position: ``last`` or a token index."""
    if text == "last":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'last' or a token index, got {text!r}") from None


@dataclass(frozen=True)
class FeatureGridConfig:
    """Settings of :func:`feature_grid` (which also takes each as a keyword)."""

    strengths: tuple[float, ...] | None = field(default=None, metadata={"flag": "--grid-strengths"})
    """Injection strengths of the grid, sorted ascending (default: the model's strength times
    :data:`STRENGTH_MULTIPLES`, -2..2: the paper's -8..8 at strength 4)."""
    layers: tuple[int, ...] | None = field(default=None, metadata={"flag": "--grid-layers"})
    """Transcoder layers recorded, sorted (default: every loaded transcoder)."""
    positions: str | int = field(
        default="last", metadata={"flag": "--grid-position", "parse": grid_position, "metavar": "POSITION"}
    )
    """The one prompt position read: ``"last"`` (the last prompt token) or an absolute token index (negative
    from the end)."""
    injection_layer: int | None = field(default=None, metadata={"cli": False})
    """The layer the concept vectors are injected at (default: the model's)."""
    default_strength: float | None = field(default=None, metadata={"cli": False})
    """The strength of detection correlations and carrier attributions (default: the model's)."""
    trial: int = field(default=TRIALS.trial, metadata={"flag": "--grid-trial"})
    """The trial number of the grid's prompt."""
    variant: str = field(default=TRIALS.variant, metadata={"flag": "--grid-variant"})
    """The prompt variant of the grid's prompt."""
    batch_size: int = field(default=BATCHING.batch_size, metadata={"cli": False})
    """Rows (concept, strength) per batched forward (results do not depend on it)."""
    prefix_cache: bool = field(default=True, metadata={"flag": "--no-grid-prefix-cache"})
    """Run the prompt before the injection start once per chunk and share its KV cache with the chunk's rows
    (exact: nothing is injected there); False (``--no-grid-prefix-cache``) runs the whole prompt for every
    row."""

    def __post_init__(self) -> None:
        if self.strengths is not None:
            values = [validate.finite_number("a grid strength", s) for s in self.strengths]
            if not values:
                raise ValueError(
                    "strengths is empty: give at least one grid strength, or None for the default"
                )
            object.__setattr__(self, "strengths", tuple(sorted(values)))
        if self.layers is not None:
            layers = sorted(validate.integer("a grid layer", la, minimum=0) for la in self.layers)
            object.__setattr__(self, "layers", tuple(layers))
        if self.positions != "last":
            validate.integer("positions", self.positions, requirement="'last' or a token index")
        if self.injection_layer is not None:
            validate.integer("injection_layer", self.injection_layer, minimum=0)
        if self.default_strength is not None:
            object.__setattr__(
                self, "default_strength", validate.finite_number("default_strength", self.default_strength)
            )
        validate.count("trial", self.trial)
        check_choices("prompt variant", self.variant, VARIANTS)
        validate.count("batch_size", self.batch_size)
        if not isinstance(self.prefix_cache, bool):
            raise ValueError(f"prefix_cache must be True or False, got {self.prefix_cache!r}")


def _grid_config(config: FeatureGridConfig | None, settings: dict[str, Any]) -> FeatureGridConfig:
    """``config`` (default: the defaults) with the keyword ``settings`` applied."""
    valid = [f.name for f in fields(FeatureGridConfig)]
    if unknown := sorted(set(settings) - set(valid)):
        raise TypeError(f"unknown feature_grid settings {unknown}; valid: {valid} (and vectors, progress)")
    for name in ("strengths", "layers"):
        if settings.get(name) is not None:
            settings[name] = tuple(settings[name])
    return replace(config or FeatureGridConfig(), **settings)


def _grid_layers(model: Model, transcoders: Transcoders, layers: Sequence[int] | None) -> list[int]:
    layers = sorted(transcoders) if layers is None else sorted(layers)
    missing = [layer for layer in layers if layer not in transcoders]
    if missing:
        raise ValueError(
            f"no transcoder for layers {missing}; transcoders are loaded for {sorted(transcoders)}"
        )
    for layer in layers:
        check_layer(model, layer)
    if not layers:
        raise ValueError("feature_grid needs at least one layer")
    return layers


def _prompt_position(positions: Positions, seq: int) -> int:
    """The one absolute position a grid reads: ``"last"`` or an index (negative from the end)."""
    position = check_positions(positions)
    if position == "last":
        return seq - 1
    if validate.is_integer(position) and -seq <= position < seq:
        return int(position) % seq
    raise ValueError(
        f"a feature grid reads one position: 'last' or an index in [-{seq}, {seq}), got {positions!r}"
    )


def _encode_sparse(
    tc: Any, inputs: list[Tensor], pairs: Int[Tensor, "row 2"], *, shape: tuple[int, int], chunk: int
) -> Tensor:
    """Encode one layer's captured inputs (chunk by chunk, in the grid's row order) into a sparse
    ``[concept, strength, d_sae]`` tensor of the nonzero activations."""
    idx, vals = [], []
    for rows, x in zip(pairs.split(chunk), inputs, strict=True):
        acts = tc.encode(x.to(tc.W_enc.device, tc.W_enc.dtype)).float().cpu()
        nz = acts.nonzero(as_tuple=True)
        idx.append(torch.stack([rows[nz[0], 0], rows[nz[0], 1], nz[1]]))
        vals.append(acts[nz])
    d_sae = int(tc.cfg.d_sae)
    return torch.sparse_coo_tensor(
        torch.cat(idx, dim=1), torch.cat(vals), (*shape, d_sae), check_invariants=True
    ).coalesce()


def _grid_chunk(
    model: Model,
    prompt: TrialPrompt,
    *,
    pos: int,
    vectors: Tensor,
    strengths: Tensor,
    injection_layer: int,
    layers: Sequence[int],
    prefix_cache: bool,
    transcoders: Transcoders | None = None,
) -> dict[int, dict[str, Float[Tensor, "rows d_model"]]]:
    """Transcoder inputs at ``pos`` of every layer (each where its transcoder in ``transcoders`` reads), for
    rows with their own injection, in one batched pass.

    With ``prefix_cache`` the prompt before ``split = min(injection start, pos)`` -- identical in every row,
    since nothing is injected there -- runs once (one row) and its KV cache is repeated for every row; only
    the rest of the prompt runs batched. Positions stay absolute: the injection and the reader know where the
    suffix call sits from the cache it extends.
    """
    device, n = model.cfg.device, vectors.shape[0]
    split = min(prompt.injection_start, pos) if prefix_cache else 0
    kw: dict[str, Any] = {}
    if split > 0:
        cache = kvcache.prefill(model, prompt.tokens[None, :split].to(device))
        cache.batch_repeat_interleave(n)
        kw = kvcache.cache_kwargs(model, cache)
    tokens = prompt.tokens[None, split:].expand(n, -1).to(device)
    names = {layer: input_candidates(model, transcoders, layer) for layer in layers}
    with (
        inject(model, vectors, layer=injection_layer, strength=strengths, start=prompt.injection_start),
        capture(model, list(dict.fromkeys(h for hs in names.values() for h in hs)), positions=[pos]) as acts,
    ):
        model(tokens, stop_at_layer=max(layers) + 1, **kw)
    return {layer: {h: acts[h][:, 0] for h in hooks} for layer, hooks in names.items()}


@torch.no_grad()
def feature_grid(
    model: Model,
    transcoders: Transcoders,
    concepts: Sequence[str],
    *,
    vectors: Float[Tensor, "concept d_model"] | None = None,
    config: FeatureGridConfig | None = None,
    progress: bool = True,
    **settings: Any,
) -> FeatureGrid:
    """Transcoder activations at one prompt position for every (concept, strength), kept sparse.

    Rows are the (concept, strength) pairs, strength-major, in chunks of ``batch_size``: each chunk is one
    batched forward of the trial prompt with a per-row injection (vector and strength of its row, from the
    injection start), and every layer's transcoder input is captured in that same pass and encoded; only the
    nonzero activations are kept.

    Args:
        concepts: concept words (the grid's first dimension).
        vectors: ``[concept, d_model]`` concept vectors; computed at the injection layer when None.
        config: the settings (:class:`FeatureGridConfig`: strengths, layers, positions, injection_layer,
            default_strength, trial, variant, batch_size, prefix_cache).
        progress: show a progress bar over the rows.
        settings: any field of :class:`FeatureGridConfig` as a keyword (applied over ``config``).

    Every chunk's transcoder inputs are captured first (one position per row: small), then each layer is
    encoded once, so a :class:`~mechintro.core.transcoders.LazyTranscoders` mapping loads each layer once.
    """
    cfg = _grid_config(config, settings)
    positions, trial, variant, batch_size = cfg.positions, cfg.trial, cfg.variant, cfg.batch_size
    spec = spec_for(model)
    injection_layer = (
        spec.injection_layer if cfg.injection_layer is None else check_layer(model, cfg.injection_layer)
    )
    strengths = cfg.strengths if cfg.strengths is not None else tuple(sorted(default_strengths(model)))
    default_strength = spec.strength if cfg.default_strength is None else cfg.default_strength
    layers = _grid_layers(model, transcoders, cfg.layers)
    concepts = check_concepts(concepts)
    if vectors is None:
        vectors = concept_vectors(model, concepts, layer=injection_layer)
    vectors = torch.as_tensor(vectors).float()
    if vectors.shape[0] != len(concepts):
        raise ValueError(f"vectors has {vectors.shape[0]} rows for {len(concepts)} concepts")
    prompt = trial_prompt(model, trial=trial, variant=variant)
    pos = _prompt_position(positions, len(prompt.tokens))
    pairs = torch.tensor([(c, s) for s in range(len(strengths)) for c in range(len(concepts))])
    all_strengths = torch.tensor(strengths, dtype=torch.float32)
    inputs: dict[int, list[dict[str, Tensor]]] = {layer: [] for layer in layers}
    with progress_bar(total=len(pairs), desc="feature grid", unit="row", enabled=progress) as bar:
        for rows in pairs.split(batch_size):
            got = _grid_chunk(
                model,
                prompt,
                pos=pos,
                vectors=vectors[rows[:, 0]],
                strengths=all_strengths[rows[:, 1]],
                injection_layer=injection_layer,
                layers=layers,
                prefix_cache=cfg.prefix_cache,
                transcoders=transcoders,
            )
            for layer in layers:
                inputs[layer].append(got[layer])
            bar.update(len(rows))
    acts_by_layer = {}
    for layer in layers:
        tc = transcoders[layer]  # loaded now: its input hook is known
        read = transcoder_site(model, transcoders, layer)[0]
        chunks = [got[read] for got in inputs.pop(layer)]
        acts_by_layer[layer] = _encode_sparse(
            tc, chunks, pairs, shape=(len(concepts), len(strengths)), chunk=batch_size
        )
        del tc
    return FeatureGrid(
        concepts=tuple(concepts),
        strengths=strengths,
        acts=acts_by_layer,
        injection_layer=injection_layer,
        default_strength=default_strength,
        trial=trial,
        positions=positions,
    )


# ----------------------------------------------------------------------------------------------- statistics


def dose_spearman(
    acts: Float[np.ndarray, "concept strength feature"], strengths: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Dose-strength Spearman correlations ``(positive side, negative side)``, each ``[feature]``.

    Positive side: pairs (concept, s) with ``s >= 0``, activation against ``s``. Negative side: pairs with
    ``s <= 0``, activation against the dose ``|s|``. Both pool every concept (zero included on both sides),
    so a gate suppressed by injection of either sign has both correlations negative, and a feature that
    grows with a positive injection has a positive ``positive side``. NaN where the activation is constant.
    """
    acts = np.asarray(acts, dtype=np.float64)
    s = np.asarray(strengths, dtype=np.float64)
    n_concepts, _, n_features = acts.shape
    out = []
    for side in (s >= 0, s <= 0):
        dose = np.tile(np.abs(s[side]), n_concepts)
        out.append(spearman_columns(dose, acts[:, side, :].reshape(-1, n_features)))
    return out[0], out[1]


def inverted_v(
    acts: Float[np.ndarray, "concept strength feature"], strengths: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Inverted-V score and whether the peak is at zero, each ``[feature]``.

    With ``m(s)`` the mean activation over concepts at strength ``s``::

        inverted_v = (m(0) - max(m(s_min), m(s_max))) / m(0)

    the drop from the unsteered activation to the larger of the two ends of the sweep, relative to the
    unsteered activation. It is 1 when the feature is silenced at both signs, positive only when it is
    suppressed at both ends, and at most 0 when either sign leaves it as active as unsteered (or more).
    NaN when ``m(0) = 0``. ``peak_at_zero`` is True when ``m(0) > 0`` and ``m(0) >= m(s)`` for every ``s``.
    """
    acts = np.asarray(acts, dtype=np.float64)
    s = np.asarray(strengths, dtype=np.float64)
    zero = np.flatnonzero(np.isclose(s, 0.0))
    if len(zero) == 0:
        raise ValueError(f"the inverted-V score needs strength 0 among the strengths {list(strengths)}")
    mean = acts.mean(axis=0)  # [strength, feature]
    m0 = mean[zero[0]]
    ends = np.maximum(mean[int(np.argmin(s))], mean[int(np.argmax(s))])
    with np.errstate(invalid="ignore", divide="ignore"):
        score = np.where(m0 > 0, (m0 - ends) / m0, np.nan)
    peak = (m0 > 0) & (m0[None, :] >= mean - 1e-12 * np.abs(mean).max(initial=1.0)).all(axis=0)
    return score, peak


Correlation: TypeAlias = Literal["spearman", "pearson"]
"""How activations are correlated with behaviour across concepts: Spearman (the paper's released code,
the default) or Pearson."""


def _behaviour_corr(
    grid: FeatureGrid, default_acts: np.ndarray, rates: pd.DataFrame | None, *, correlation: Correlation
) -> dict[str, Any]:
    """Across concepts: activation at the default strength vs detection / forced-identification rate."""
    n = default_acts.shape[1]
    if rates is None:
        return {"detection_corr": np.full(n, np.nan), "forced_corr": np.full(n, np.nan)}
    table = rates.set_index("concept")
    out = {}
    for name, column in (("detection_corr", "detection_rate"), ("forced_corr", "forced_id_rate")):
        rate = table[column].reindex(list(grid.concepts)).to_numpy(dtype=np.float64)
        ok = np.isfinite(rate)
        columns = spearman_columns if correlation == "spearman" else pearson_columns
        out[name] = columns(rate[ok], default_acts[ok]) if ok.sum() >= 3 else np.full(n, np.nan)
    return out


def feature_stats(
    grid: FeatureGrid,
    features: Sequence[tuple[int, int]] | Sequence[str],
    *,
    behaviour: Any = None,
    correlation: Correlation = "spearman",
) -> pd.DataFrame:
    """Every per-feature statistic of the paper, one row per feature (in the given order).

    Columns: feature, layer, index; ``activation_unsteered`` (concept mean at strength 0);
    ``activation_default`` (concept mean at the grid's default strength); ``spearman_pos`` and
    ``spearman_neg`` (:func:`dose_spearman`); ``inverted_v`` and ``peak_at_zero`` (:func:`inverted_v`);
    ``detection_corr`` and ``forced_corr``: the ``correlation`` (Spearman by default, as the paper's released
    code; or Pearson) across concepts between the activation at the default strength and the concept's
    detection / forced-identification rate (:func:`concept_rates` of
    ``behaviour``, from its trials at the grid's default strength; NaN without behaviour or with fewer than
    3 concepts that have a rate). ``behaviour`` may also be a per-concept rates table, used as it is.
    """
    parsed = [parse_feature(f) for f in features]
    rates = None if behaviour is None else concept_rates(behaviour, strength=grid.default_strength)
    zero, default = grid.strength_index(0.0), grid.strength_index(grid.default_strength)
    frames = []
    for layer in sorted({la for la, _ in parsed}):
        idx = [i for la, i in parsed if la == layer]
        acts = grid.dense(layer, idx).double().numpy()
        pos, neg = dose_spearman(acts, grid.strengths)
        score, peak = inverted_v(acts, grid.strengths)
        frame = pd.DataFrame(
            {
                "feature": [feature_name(layer, i) for i in idx],
                "layer": layer,
                "index": idx,
                "activation_unsteered": acts[:, zero].mean(0),
                "activation_default": acts[:, default].mean(0),
                "spearman_pos": pos,
                "spearman_neg": neg,
                "inverted_v": score,
                "peak_at_zero": peak,
            }
        )
        for name, values in _behaviour_corr(grid, acts[:, default], rates, correlation=correlation).items():
            frame[name] = values
        frames.append(frame)
    columns = [
        "feature",
        "layer",
        "index",
        "activation_unsteered",
        "activation_default",
        "spearman_pos",
        "spearman_neg",
        "inverted_v",
        "peak_at_zero",
        "detection_corr",
        "forced_corr",
    ]
    if not frames:
        return pd.DataFrame(columns=columns)
    order = {feature_name(la, i): k for k, (la, i) in enumerate(parsed)}
    out = pd.concat(frames, ignore_index=True)
    return out.sort_values("feature", key=lambda s: s.map(order)).reset_index(drop=True)[columns]


# ----------------------------------------------------------------------------------------------- gates


def _unit_rows(w: Tensor) -> Tensor:
    return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def dla_scores(
    model: Model, transcoders: Transcoders, grid: FeatureGrid, *, layers: Sequence[int] | None = None
) -> pd.DataFrame:
    """Direct logit attribution to Yes-minus-No of every feature active in the unsteered trial prompt.

    ``dla_weight = (W_dec[f] / |W_dec[f]|) . (mean Yes unembedding - mean No unembedding)`` (no final-norm
    scaling, tied embeddings: :func:`mechintro.core.readout.yes_no_direction`), ``activation_unsteered`` = the
    feature's activation at strength 0 (the same prompt for every concept), ``dla_score`` = their product.
    Negative scores promote "No". Columns: feature, layer, index, activation_unsteered, dla_weight, dla_score.
    """
    direction = yes_no_direction(model, spec_for(model)).float().cpu()
    frames = []
    for layer in grid.layers if layers is None else layers:
        a0 = grid.unsteered(layer)
        idx = torch.nonzero(a0, as_tuple=True)[0]
        w_dec = transcoders[layer].W_dec.detach().float().cpu()[idx]
        weight = _unit_rows(w_dec) @ direction
        frames.append(
            pd.DataFrame(
                {
                    "feature": [feature_name(layer, i) for i in idx.tolist()],
                    "layer": layer,
                    "index": idx.numpy(),
                    "activation_unsteered": a0[idx].numpy(),
                    "dla_weight": weight.numpy(),
                    "dla_score": (weight * a0[idx]).numpy(),
                }
            )
        )
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def find_gates(
    model: Model,
    transcoders: Transcoders,
    grid: FeatureGrid,
    *,
    behaviour: Any = None,
    correlation: Correlation = "spearman",
    k: int = 200,
    layers: Sequence[int] | None = None,
) -> pd.DataFrame:
    """Gate candidates: the ``k`` features with the most negative DLA score (promoting "No" unsteered).

    Only layers after the injection layer can respond to the injection, so ``layers`` defaults to the grid's
    layers above ``grid.injection_layer``. Returns one row per candidate, ranked (``rank`` 1 = most negative
    score), with the columns of :func:`dla_scores` and of :func:`feature_stats` (dose-strength Spearman,
    inverted-V, behaviour correlations).
    """
    k = validate.count("k (the number of gate candidates)", k)
    if layers is None:
        layers = [la for la in grid.layers if la > grid.injection_layer]
    scores = dla_scores(model, transcoders, grid, layers=layers)
    if scores.empty:
        return scores
    top = scores[scores["dla_score"] < 0].sort_values("dla_score", kind="stable").head(k)
    stats = feature_stats(grid, top["feature"].tolist(), behaviour=behaviour, correlation=correlation)
    out = top.merge(stats.drop(columns=["layer", "index", "activation_unsteered"]), on="feature", how="left")
    return out.reset_index(drop=True).assign(rank=lambda d: np.arange(1, len(d) + 1))


# ----------------------------------------------------------------------------------------------- carriers


def virtual_weights(
    transcoders: Transcoders, gate: str | tuple[int, int], layer: int, indices: Sequence[int] | Tensor
) -> Float[Tensor, " n"]:
    """``W_enc[:, gate] . W_dec[f]`` for features ``indices`` of ``layer``: the gate pre-activation per unit.

    Raw (not unit-normalized) decoder rows, and no normalization of the gate layer's input norm.
    """
    gate_layer, gate_index = parse_feature(gate)
    enc = transcoders[gate_layer].W_enc.detach().float().cpu()[:, gate_index]
    dec = transcoders[layer].W_dec.detach().float().cpu()[torch.as_tensor(indices, dtype=torch.long)]
    return dec @ enc


CarrierCriteria: TypeAlias = Literal["dose_behaviour", "sign"]
"""``"dose_behaviour"``: a carrier must grow with the injection and (given behaviour) correlate with it;
``"sign"``: every active upstream feature, its role from the sign of its attribution alone (the paper's
released code)."""


def _roles(
    df: pd.DataFrame, *, criteria: CarrierCriteria, use_behaviour: bool, min_abs_corr: float
) -> pd.Series:
    """carrier / suppressor / other (see :func:`find_evidence_carriers`)."""
    ok = pd.Series(True, index=df.index)
    if criteria == "dose_behaviour":
        ok &= df["spearman_pos"] > 0
        if use_behaviour:
            ok &= (df["detection_corr"].abs() > min_abs_corr) & (df["forced_corr"].abs() > min_abs_corr)
    role = np.where(
        ok & (df["attribution"] < 0), "carrier", np.where(ok & (df["attribution"] > 0), "suppressor", "other")
    )
    return pd.Series(role, index=df.index)


def find_evidence_carriers(
    model: Model,
    transcoders: Transcoders,
    grid: FeatureGrid,
    gate: str | tuple[int, int],
    *,
    behaviour: Any = None,
    concept: str | None = None,
    criteria: CarrierCriteria = "dose_behaviour",
    correlation: Correlation = "spearman",
    min_abs_corr: float = 0.0,
    include_other: bool = False,
) -> pd.DataFrame:
    """Evidence carriers of ``gate``: features between the injection layer and the gate that suppress it.

    Candidates are the features of grid layers ``injection_layer < layer < gate layer`` that are active at the
    default strength (for ``concept``, or for some concept). For each: ``virtual_weight`` = gate encoder .
    carrier decoder (:func:`virtual_weights`), ``attribution`` = virtual_weight x the activation at the grid's
    default strength -- the concept-mean activation (``concept=None``, mechintro's default: one carrier set
    per
    gate) or that one concept's (the paper's released code finds carriers per (gate, concept)) -- and every
    statistic of :func:`feature_stats`.

    Roles (``criteria``): with ``"dose_behaviour"`` (default) a **carrier** has ``spearman_pos > 0`` (grows
    with the injection), ``|detection_corr|`` and ``|forced_corr|`` above ``min_abs_corr`` (skipped when
    ``behaviour`` is None) and ``attribution < 0`` (it suppresses the gate); a **suppressor** meets the same
    criteria with ``attribution > 0``. With ``"sign"`` (the paper's code) every candidate is a carrier or a
    suppressor by the sign of its attribution alone. Returns carriers ranked by attribution (most negative
    first), then suppressors (most positive first), then, if ``include_other``, everything else; ``rank``
    counts within a role.
    """
    gate_layer, gate_index = parse_feature(gate)
    if gate_layer not in transcoders:
        raise ValueError(f"no transcoder for the gate's layer {gate_layer}; loaded: {sorted(transcoders)}")
    if criteria not in ("dose_behaviour", "sign"):
        raise ValueError(f"unknown carrier criteria {criteria!r}; valid: ['dose_behaviour', 'sign']")
    if concept is not None and concept not in grid.concepts:
        raise ValueError(f"concept {concept!r} is not in the grid; its concepts are {list(grid.concepts)}")
    layers = [la for la in grid.layers if grid.injection_layer < la < gate_layer and la in transcoders]
    default = grid.strength_index(grid.default_strength)
    frames = []
    for layer in layers:
        idx = grid.active(layer, strength=grid.default_strength)
        if concept is not None:
            acts = grid.dense(layer, idx)[grid.concepts.index(concept), default]
            idx = idx[acts != 0]
        if len(idx) == 0:
            continue
        stats = feature_stats(
            grid, [(layer, int(i)) for i in idx], behaviour=behaviour, correlation=correlation
        )
        if concept is not None:
            stats["activation_default"] = grid.dense(layer, idx)[
                grid.concepts.index(concept), default
            ].numpy()
        weight = virtual_weights(transcoders, (gate_layer, gate_index), layer, idx).numpy()
        frames.append(stats.assign(virtual_weight=weight, attribution=weight * stats["activation_default"]))
    first = ["feature", "layer", "index", "role", "rank", "attribution", "virtual_weight"]
    if not frames:  # the same columns as a non-empty table
        stats = feature_stats(grid, [], behaviour=behaviour, correlation=correlation)
        return pd.DataFrame(columns=first + [c for c in stats.columns if c not in first])
    df = pd.concat(frames, ignore_index=True)
    df["role"] = _roles(df, criteria=criteria, use_behaviour=behaviour is not None, min_abs_corr=min_abs_corr)
    if not include_other:
        df = df[df["role"] != "other"]
    order = {"carrier": 0, "suppressor": 1, "other": 2}
    key = np.where(df["role"] == "suppressor", -df["attribution"], df["attribution"])
    df = df.assign(_r=df["role"].map(order), _k=key).sort_values(["_r", "_k"], kind="stable")
    df["rank"] = df.groupby("role").cumcount() + 1
    df = df.drop(columns=["_r", "_k"]).reset_index(drop=True)
    return df[first + [c for c in df.columns if c not in first]]
