"""The one set of argument checks every public function uses: integers (never a bool), counts, layers, finite
and positive numbers, strengths and concept vectors.

Each check returns the value in its canonical type or raises with a message that names the argument, what it
must be, and what it got.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = [
    "InvalidArgument",
    "count",
    "d_model_of",
    "finite_number",
    "integer",
    "is_integer",
    "layer",
    "positive_number",
    "strength_list",
    "strength_tensor",
    "vectors",
]


class InvalidArgument(TypeError, ValueError):
    """An argument of the wrong type or out of range. It is both a ``TypeError`` and a ``ValueError``, so
    callers that caught either before these checks were shared still catch it."""


def is_integer(value: Any) -> bool:
    """Whether ``value`` is an integer (Python, NumPy or 0-d tensor index), and not a bool."""
    if isinstance(value, bool) or (torch.is_tensor(value) and value.dtype == torch.bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def integer(name: str, value: Any, *, minimum: int | None = None, requirement: str | None = None) -> int:
    """``value`` as an ``int``; raise if it is a bool, not an integer, or below ``minimum``.

    ``requirement`` replaces the default wording of what the value must be (``"an int >= minimum"``).
    """
    ok = is_integer(value) and (minimum is None or operator.index(value) >= minimum)
    if not ok:
        must = requirement or ("an integer" if minimum is None else f"an int >= {minimum}")
        raise InvalidArgument(f"{name} must be {must}, got {value!r} ({type(value).__name__})")
    return operator.index(value)


def count(name: str, value: Any) -> int:
    """A positive count (an int >= 1, never a bool)."""
    return integer(name, value, minimum=1)


def layer(value: Any, *, n_layers: int, model: str = "the model") -> int:
    """A layer index of a model with ``n_layers`` layers; the error names the valid range."""
    if not is_integer(value) or not 0 <= operator.index(value) < n_layers:
        raise InvalidArgument(
            f"layer {value!r} does not exist in {model}: valid layers are 0..{n_layers - 1}"
        )
    return operator.index(value)


def finite_number(name: str, value: Any) -> float:
    """A finite real number (never a bool or a string) as a ``float``."""
    if isinstance(value, (bool, str)) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise InvalidArgument(f"{name} must be a finite number, got {value!r}")
    return float(value)


def positive_number(name: str, value: Any, *, unit: str = "") -> float:
    """A finite number > 0 as a ``float`` (``unit`` is named in the error, e.g. ``"of seconds"``)."""
    if isinstance(value, (bool, str)) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
        raise InvalidArgument(f"{name} must be a positive number{' ' + unit if unit else ''}, got {value!r}")
    return float(value)


def strength_list(strengths: Any) -> list[float]:
    """One strength or an iterable of them as distinct finite floats, in the order given."""
    items = [strengths] if isinstance(strengths, (numbers.Real, str)) else list(strengths)
    out = []
    for s in items:
        if isinstance(s, (bool, str)) or not isinstance(s, numbers.Real):
            raise InvalidArgument(f"strength must be a finite number, got {s!r} ({type(s).__name__})")
        if not math.isfinite(s):
            raise InvalidArgument(f"strength must be a finite number, got {s!r}")
        out.append(float(s))
    if not out:
        raise InvalidArgument("no strengths given")
    return list(dict.fromkeys(out))


def strength_tensor(strength: Any) -> Float[Tensor, " rows"]:
    """A scalar, a sequence or a tensor of finite strengths as a 1-D tensor (a tensor keeps its autograd)."""
    if torch.is_tensor(strength):
        if strength.dtype == torch.bool or strength.is_complex():
            raise TypeError(f"strength must be real numbers, got a {strength.dtype} tensor")
        values = strength.reshape(-1)
        values = values if values.is_floating_point() else values.float()
    else:
        items = (
            list(strength) if isinstance(strength, Sequence) and not isinstance(strength, str) else [strength]
        )
        for s in items:
            if isinstance(s, bool) or not isinstance(s, numbers.Real):
                raise TypeError(
                    "strength must be a number, or a sequence or tensor of numbers, got "
                    f"{s!r} ({type(s).__name__})"
                )
        values = torch.tensor([float(s) for s in items], dtype=torch.float32)
    if values.numel() == 0:
        raise ValueError("strength is empty")
    if not torch.isfinite(values.detach()).all():
        bad = [v for v in values.detach().tolist() if not math.isfinite(v)]
        raise ValueError(f"strength must be finite, got {bad}")
    return values


def d_model_of(model: Any, d: int, *, what: str) -> None:
    """Raise if ``d`` is not the model's residual width."""
    d_model = int(model.cfg.d_model)
    if d != d_model:
        raise ValueError(f"{what} has width {d}, but the model's d_model is {d_model}")


def vectors(
    model: Any, values: Any, concepts: Sequence[str] | Iterable[str], *, what: str = "vectors"
) -> Float[Tensor, "concept d_model"]:
    """Concept vectors ``[concept, d_model]`` (one vector ``[d_model]`` for one concept) as finite float32 on
    the CPU, one row per concept, of the model's width."""
    n = len(list(concepts))
    out = torch.as_tensor(values).detach().float().cpu()
    if out.ndim == 1 and n == 1:
        out = out[None]
    if out.ndim != 2 or out.shape[0] != n:
        raise ValueError(f"{what} must be [concept={n}, d_model], got shape {tuple(out.shape)}")
    d_model_of(model, out.shape[1], what=what)
    if not torch.isfinite(out).all():
        raise ValueError(f"{what} have NaN or inf entries")
    return out
