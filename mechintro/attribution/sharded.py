"""A steering attribution split into concept shards, run on an executor's workers and merged into the result
one call gives (:func:`sharded_steering_attribution`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mechintro.attribution.passes import steering_attribution
from mechintro.attribution.result import SteeringAttribution, merge_attributions
from mechintro.behaviour.executors import Executor, RayExecutor, map_on_model, resolve_executor, split_evenly
from mechintro.core import validate
from mechintro.core.concepts import check_concepts, concept_vectors
from mechintro.core.hooks import check_layer
from mechintro.core.models import Model, spec_for
from mechintro.core.transcoders import load_transcoders

__all__ = ["sharded_steering_attribution"]


def _attribution_part(model: Model, part: dict[str, Any]) -> SteeringAttribution:
    """One shard of :func:`sharded_steering_attribution` (run where the model is)."""
    part = dict(part)
    transcoders = part.pop("transcoders")
    if not isinstance(transcoders, Mapping):  # one layer in memory at a time on the worker
        transcoders = load_transcoders(model, source=transcoders, lazy=True)
    return steering_attribution(model, transcoders, part.pop("concepts"), progress=False, **part)


def sharded_steering_attribution(
    model: Model,
    transcoders: Mapping[int, Any] | str | Path | None,
    concepts: Sequence[str],
    *,
    shards: int,
    executor: str | Executor = "local",
    vectors: Tensor | None = None,
    layer: int | None = None,
    **attribution_kw: Any,
) -> SteeringAttribution:
    """:func:`~mechintro.attribution.passes.steering_attribution` split into ``shards`` concept chunks, run on
    ``executor`` (:func:`~mechintro.behaviour.executors.map_on_model`) and merged
    (:func:`~mechintro.attribution.passes.merge_attributions`).

    Each concept's rows depend only on that concept (its vector, the strength grid, the prompt), so the
    merged result equals one call up to float rounding of different batch shapes. Concept vectors are
    computed once here and sliced, so every shard injects exactly the unsharded vectors.

    Args:
        transcoders: a ``{layer: transcoder}`` mapping (local executor only), or where the workers load them
            from (a sae-lens release or folder, or None for the model's own), lazily, one layer at a time.
        shards: how many concept chunks (at least one concept each).
        Other arguments: those of :func:`~mechintro.attribution.passes.steering_attribution` (``saes``
            must be picklable to travel to Ray actors).
    """
    executor = resolve_executor(executor)
    concepts = check_concepts([concepts] if isinstance(concepts, str) else concepts)
    validate.count("shards", shards)
    if isinstance(transcoders, Mapping) and isinstance(executor, RayExecutor):
        raise TypeError(
            "transcoder objects cannot travel to Ray actors: pass where to load them from (a sae-lens "
            "release, a folder, or None for the model's own)"
        )
    layer = spec_for(model).injection_layer if layer is None else check_layer(model, layer)
    if vectors is None:
        vectors = concept_vectors(model, concepts, layer=layer)
    vectors = torch.as_tensor(vectors).float().cpu()
    if vectors.shape[0] != len(concepts):
        raise ValueError(f"vectors has {vectors.shape[0]} rows for {len(concepts)} concepts")
    parts = [
        {
            "transcoders": transcoders,
            "concepts": [concepts[i] for i in chunk],
            "vectors": vectors[chunk],
            "layer": layer,
            **attribution_kw,
        }
        for chunk in split_evenly(range(len(concepts)), shards)
    ]
    return merge_attributions(map_on_model(_attribution_part, parts, model=model, executor=executor))
