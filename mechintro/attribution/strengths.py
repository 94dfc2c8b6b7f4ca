"""The strength grid steering attribution integrates over, and its quadrature weights.

The strengths are kept exactly as given, as floats, never as rounded names. ``∫ f dα ≈ Σ_k w_k f(α_k)`` by the
trapezoid rule or composite Simpson (:func:`quadrature_weights`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, TypeAlias

import numpy as np
import torch

from mechintro.core import validate
from mechintro.core.models import Model, spec_for

__all__ = [
    "DEFAULT_GRID_POINTS",
    "INTEGRATIONS",
    "check_grid",
    "check_integration",
    "quadrature_weights",
    "strength_grid",
]

Integration: TypeAlias = Literal["trapezoid", "simpson"]

INTEGRATIONS: tuple[Integration, ...] = ("trapezoid", "simpson")
"""Quadrature rules for integrating over the strength grid."""
DEFAULT_GRID_POINTS = 21
"""Points of the default strength grid, 0 .. s*."""


def strength_grid(
    model: Model, n: int = DEFAULT_GRID_POINTS, *, top: float | None = None
) -> tuple[float, ...]:
    """``n`` evenly spaced strengths from 0 to ``top`` (default: the model's default strength ``s*``)."""
    if not validate.is_integer(n) or n < 2:
        raise ValueError(f"a strength grid needs at least 2 points, got {n!r}")
    top = spec_for(model).strength if top is None else float(top)
    if not math.isfinite(top) or top == 0:
        raise ValueError(f"the top strength must be finite and nonzero, got {top}")
    return tuple(top * k / (n - 1) for k in range(n))


def check_grid(strengths: Any) -> tuple[float, ...]:
    """``strengths`` as a tuple of floats, exactly as given; raises unless finite and strictly increasing."""
    if torch.is_tensor(strengths):
        items = strengths.detach().reshape(-1).tolist()
    elif isinstance(strengths, (Sequence, np.ndarray)) and not isinstance(strengths, str):
        items = list(strengths.tolist() if isinstance(strengths, np.ndarray) else strengths)
    else:
        raise TypeError(f"strengths must be a sequence of numbers, got {strengths!r}")
    validate.strength_tensor(items)  # numbers, finite, non-empty
    grid = tuple(float(s) for s in items)
    if len(grid) < 2:
        raise ValueError(f"integrating over strength needs at least 2 strengths, got {list(grid)}")
    if any(b <= a for a, b in zip(grid, grid[1:], strict=False)):
        raise ValueError(f"strengths must be strictly increasing, got {list(grid)}")
    return grid


def check_integration(rule: Any) -> Integration:
    """``rule`` if it is one of :data:`INTEGRATIONS`; raises naming them otherwise."""
    if rule not in INTEGRATIONS:
        raise ValueError(f"unknown integration {rule!r}; valid: {list(INTEGRATIONS)}")
    return rule


def quadrature_weights(strengths: Sequence[float], rule: Integration = "trapezoid") -> np.ndarray:
    """Weights ``w`` with ``∫ f dα ≈ Σ_k w_k f(α_k)`` over ``[min, max]`` of the grid.

    ``"trapezoid"`` works on any increasing grid. ``"simpson"`` is composite Simpson (scipy's rule, which
    handles uneven spacing and an even number of points); its weights are read off by integrating the unit
    vectors, exact because the rule is linear in ``f``.
    """
    check_integration(rule)
    x = np.asarray(check_grid(strengths), dtype=np.float64)
    if rule == "trapezoid":
        h = np.diff(x)
        w = np.zeros_like(x)
        w[:-1] += h / 2
        w[1:] += h / 2
        return w
    if len(x) < 3:
        raise ValueError(f"Simpson's rule needs at least 3 strengths, got {len(x)}")
    from scipy.integrate import simpson

    eye = np.eye(len(x))
    return np.array([simpson(eye[k], x=x) for k in range(len(x))])
