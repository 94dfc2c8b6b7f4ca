"""A feature grid split into shards (concept chunks x layer groups), run on an executor's workers and merged
into the grid one call gives (:func:`sharded_feature_grid`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mechintro.behaviour.executors import Executor, RayExecutor, map_on_model, resolve_executor, split_evenly
from mechintro.core import validate
from mechintro.core.concepts import concept_vectors
from mechintro.core.hooks import check_layer
from mechintro.core.models import Model, spec_for
from mechintro.core.transcoders import load_transcoders
from mechintro.mechanism.features import FeatureGrid, feature_grid, merge_grids

__all__ = ["sharded_feature_grid"]


def _grid_part(model: Model, part: dict[str, Any]) -> FeatureGrid:
    """One shard of :func:`sharded_feature_grid` (run where the model is)."""
    part = dict(part)
    transcoders = part.pop("transcoders")
    if not isinstance(transcoders, Mapping):
        transcoders = load_transcoders(model, part["layers"], source=transcoders)
    return feature_grid(model, transcoders, **part)


def sharded_feature_grid(
    model: Model,
    transcoders: Mapping[int, Any] | str | Path | None,
    concepts: Sequence[str],
    *,
    shards: int,
    layer_shards: int = 1,
    executor: str | Executor = "local",
    layers: Sequence[int] | None = None,
    vectors: Tensor | None = None,
    injection_layer: int | None = None,
    **grid_kw: Any,
) -> FeatureGrid:
    """:func:`~mechintro.mechanism.features.feature_grid` split into ``shards`` concept chunks x
    ``layer_shards`` layer groups, run on ``executor`` (:func:`~mechintro.behaviour.executors.map_on_model`),
    and merged (:func:`~mechintro.mechanism.features.merge_grids`) into the grid one call gives.

    Concept vectors are computed once here, over every concept (as one unsharded call does), and each shard
    gets its slice, so every shard injects exactly the unsharded vectors. A grid row depends only on its own
    (concept, strength) forward, so the merged grid equals the unsharded one up to float rounding of
    different batch shapes. ``layer_shards`` splits the transcoder layers: a worker then loads only its
    layers' dictionaries (the memory that limits 262k-wide transcoders), at the price of one forward per
    layer group.

    Args:
        transcoders: a ``{layer: transcoder}`` mapping (local executor only), or where the workers load them
            from: a sae-lens release or folder, or None for the model's own
            (:func:`~mechintro.core.transcoders.load_transcoders`).
        shards / layer_shards: how many concept chunks / layer groups (each at least one item).
        layers: transcoder layers (default: those of the mapping, or every layer of the model).
        Other arguments: those of :func:`~mechintro.mechanism.features.feature_grid`.
    """
    executor = resolve_executor(executor)
    concepts = list(concepts)
    validate.count("shards", shards)
    validate.count("layer_shards", layer_shards)
    if isinstance(transcoders, Mapping) and isinstance(executor, RayExecutor):
        raise TypeError(
            "transcoder objects cannot travel to Ray actors: pass where to load them from (a sae-lens "
            "release, a folder, or None for the model's own)"
        )
    spec = spec_for(model)
    if layers is None:
        layers = sorted(transcoders) if isinstance(transcoders, Mapping) else list(range(spec.n_layers))
    layers = [check_layer(model, layer) for layer in layers]
    injection_layer = spec.injection_layer if injection_layer is None else check_layer(model, injection_layer)
    if vectors is None:
        vectors = concept_vectors(model, concepts, layer=injection_layer)
    vectors = torch.as_tensor(vectors).float().cpu()
    if vectors.shape[0] != len(concepts):
        raise ValueError(f"vectors has {vectors.shape[0]} rows for {len(concepts)} concepts")
    parts = []
    for c in split_evenly(range(len(concepts)), shards):
        for group in split_evenly(layers, layer_shards):
            part = {
                "transcoders": (
                    {la: transcoders[la] for la in group} if isinstance(transcoders, Mapping) else transcoders
                ),
                "concepts": [concepts[i] for i in c],
                "vectors": vectors[list(c)],
                "layers": list(group),
                "injection_layer": injection_layer,
                **grid_kw,
            }
            parts.append(part)
    return merge_grids(map_on_model(_grid_part, parts, model=model, executor=executor))
