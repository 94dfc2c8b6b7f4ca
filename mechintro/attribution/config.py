"""The settings of steering attribution (:class:`AttributionConfig`) and of attribution graphs
(:class:`GraphConfig`): frozen dataclasses with a docstring under every field, checked when built.

:func:`~mechintro.attribution.passes.steering_attribution` and
:func:`~mechintro.attribution.graph.attribution_graph` take ``config=``, or the fields as keywords (which
replace the config's), and the attribution script's flags are derived from the same fields
(:mod:`mechintro.cli.options`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias, TypeVar

from mechintro.attribution.strengths import (
    DEFAULT_GRID_POINTS,
    Integration,
    check_grid,
    check_integration,
    quadrature_weights,
)
from mechintro.core import validate
from mechintro.core.prompts import VARIANTS

__all__ = ["DIRECTIONS", "SIGNS", "AttributionConfig", "GraphConfig", "config_with", "graph_config_with"]

Direction: TypeAlias = Literal["backward", "forward"]
Sign: TypeAlias = Literal["positive", "negative", "absolute"]

DIRECTIONS: tuple[Direction, ...] = ("backward", "forward")
"""Hop directions: backward from a node to the features feeding it, forward to the features it feeds."""
SIGNS: tuple[Sign, ...] = ("positive", "negative", "absolute")
"""Which edge weights selection ranks: the positive ones (default), the negative ones, or all by |weight|."""

Config = TypeVar("Config")


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _names(text: str) -> tuple[str, ...]:
    """An argparse type: a comma-separated list of names."""
    names = tuple(w.strip() for w in text.split(",") if w.strip())
    if not names:
        raise ValueError(f"expected a comma-separated list, got {text!r}")
    return names


@dataclass(frozen=True)
class AttributionConfig:
    """Settings of :func:`~mechintro.attribution.passes.steering_attribution` (and of the root attribution and
    the hop passes of :func:`~mechintro.attribution.graph.attribution_graph`)."""

    strengths: tuple[float, ...] | None = None
    """The strength grid, strictly increasing and kept exactly as given (a sequence or tensor; stored as a
    tuple of floats); default: ``points`` strengths from 0 to the model's strength s*."""
    points: int = DEFAULT_GRID_POINTS
    """Grid points from 0 to s* when no strengths are given."""
    integration: Integration = "trapezoid"
    """The quadrature rule over the strength grid (trapezoid, or composite Simpson)."""
    metric: Any = field(default=None, metadata={"cli": False})
    """What is attributed: None (the Yes-No gap at the last prompt token), a (plus, minus) token pair, a
    feature name ("L5 F12": its pre-activation), or a Metric."""
    layer: int | None = None
    """The injection layer (default: the model's); dictionaries before it are skipped."""
    trial: int = 1
    """The trial number of the prompt."""
    variant: str = "original"
    """The prompt variant."""
    batch_size: int = 32
    """(concept, strength) rows per batched pass (results do not depend on it)."""
    prefix_cache: bool = True
    """Run the un-injected prefix once and share its KV cache across rows (exact)."""
    progress: bool = True
    """Show a progress bar over the (concept, strength) rows."""

    def __post_init__(self) -> None:
        if self.strengths is not None:
            object.__setattr__(self, "strengths", check_grid(self.strengths))
        if not validate.is_integer(self.points) or self.points < 2:
            raise ValueError(f"a strength grid needs at least 2 points, got {self.points!r}")
        check_integration(self.integration)
        if self.strengths is not None:
            quadrature_weights(self.strengths, self.integration)  # the rule fits the grid
        if self.layer is not None:
            validate.integer("layer", self.layer, minimum=0)
        validate.integer("trial", self.trial, minimum=1, requirement="a positive int (the paper's are 1..10)")
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown prompt variant {self.variant!r}; valid: {list(VARIANTS)}")
        validate.integer("batch_size", self.batch_size, minimum=1, requirement="a positive integer")
        _flag("prefix_cache", self.prefix_cache)
        _flag("progress", self.progress)


@dataclass(frozen=True)
class GraphConfig:
    """Settings of :func:`~mechintro.attribution.graph.attribution_graph`: how it selects its nodes, and the
    root attribution it starts from."""

    depth: int = 2
    """Hops beyond hop 0 (the features attributed to the metric directly)."""
    directions: tuple[Direction, ...] = field(default=DIRECTIONS, metadata={"parse": _names})
    """Hop directions from each frontier node (backward, forward)."""
    rel_threshold: float = 0.1
    """Per parent and dictionary type, keep weights above this fraction of that type's largest."""
    caps: tuple[int, ...] = (8, 5, 3, 2)
    """At most this many children per parent at hops 0, 1, 2, ...; the last entry for deeper hops."""
    sign: Sign = "positive"
    """Which edge weights selection ranks: the positive ones, the negative ones, or all by |weight|."""
    remainders: bool = True
    """Add the error and skip terms of each (site, position) holding a kept feature as nodes."""
    root: AttributionConfig = field(default_factory=AttributionConfig, metadata={"cli": False})
    """The root steering attribution's settings (strengths, metric, prompt...), whose batch size and prefix
    cache the hop passes use too."""

    def __post_init__(self) -> None:
        validate.integer("depth", self.depth, minimum=0, requirement="a non-negative integer")
        directions = tuple(self.directions)
        bad = [d for d in directions if d not in DIRECTIONS]
        if bad or not directions:
            raise ValueError(f"unknown hop directions {bad or '(none)'}; valid: {list(DIRECTIONS)}")
        threshold = validate.finite_number("rel_threshold", self.rel_threshold)
        if not 0 <= threshold < 1:
            raise ValueError(f"rel_threshold must be in [0, 1), got {self.rel_threshold}")
        caps = tuple(self.caps)
        if not caps or not all(validate.is_integer(c) and c >= 1 for c in caps):
            raise ValueError(f"caps must be positive integers, got {self.caps!r}")
        if self.sign not in SIGNS:
            raise ValueError(f"unknown sign {self.sign!r}; valid: {list(SIGNS)}")
        _flag("remainders", self.remainders)
        if not isinstance(self.root, AttributionConfig):
            raise TypeError(f"root must be an AttributionConfig, got {type(self.root).__name__}")
        object.__setattr__(self, "directions", directions)
        object.__setattr__(self, "rel_threshold", threshold)
        object.__setattr__(self, "caps", tuple(int(c) for c in caps))

    def cap(self, hop: int) -> int:
        """The most children a parent keeps at ``hop``."""
        return self.caps[min(hop, len(self.caps) - 1)]

    def selection(self) -> dict[str, Any]:
        """The selection settings (every field but ``root``), as a graph records them."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "root"}


def _names_of(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def config_with(
    cls: type[Config], config: Config | None, settings: Mapping[str, Any], *, caller: str
) -> Config:
    """``config`` (default ``cls()``) with the keyword ``settings`` replacing its fields; the config's checks
    run on the result. Raises naming the valid keywords for one that is not a field of ``cls``."""
    if config is not None and not isinstance(config, cls):
        raise TypeError(f"{caller}: config must be of type {cls.__name__}, got {type(config).__name__}")
    unknown = sorted(set(settings) - set(_names_of(cls)))
    if unknown:
        raise TypeError(f"{caller}() got unexpected settings {unknown}; valid: {sorted(_names_of(cls))}")
    base = cls() if config is None else config
    return dataclasses.replace(base, **settings) if settings else base  # type: ignore[type-var]


def graph_config_with(config: GraphConfig | None, settings: Mapping[str, Any], *, caller: str) -> GraphConfig:
    """:func:`config_with` for a :class:`GraphConfig`, whose keywords may also name fields of its ``root``
    :class:`AttributionConfig`."""
    own = {k: v for k, v in settings.items() if k in _names_of(GraphConfig)}
    root = {k: v for k, v in settings.items() if k not in own}
    unknown = sorted(set(root) - set(_names_of(AttributionConfig)))
    if unknown:
        valid = sorted({*_names_of(GraphConfig), *_names_of(AttributionConfig)} - {"root"})
        raise TypeError(f"{caller}() got unexpected settings {unknown}; valid: {valid}")
    base = config_with(GraphConfig, config, own, caller=caller)
    if root:
        base = dataclasses.replace(base, root=config_with(AttributionConfig, base.root, root, caller=caller))
    return base
