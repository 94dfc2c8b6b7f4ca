"""Concept injection: add ``strength * vector`` to resid_post of one layer from a start position on.

One context manager, :func:`inject`, serves every caller: one vector or one per batch row, scalar or per-row
strengths and starts, plain forwards, uncached generation, KV-cached decoding and suffix runs after a shared
prefix cache.

Positions. ``start`` is an absolute index into the token tensor the model is run on (for a left-padded batch,
:func:`mechintro.core.prompts.left_pad` has already shifted it). Which absolute positions a forward call
covers is
read from the KV cache it extends (:class:`mechintro.core.hooks.PositionTracker`), so a decoding step, a
chunked
prefill or a suffix after a shared prefix cache all get the right positions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechintro.core import validate
from mechintro.core.hooks import PositionTracker, as_int, check_layer, hooks_context, tracker
from mechintro.core.models import HookNames, Model

__all__ = ["Injection", "inject", "make_injection"]


@dataclass
class Injection:
    """A live injection. ``hooks`` composes with ``model.hooks``; :func:`inject` installs it for you."""

    layer: int
    vectors: Float[Tensor, "rows d_model"]
    strengths: Float[Tensor, " rows"]
    starts: Int[Tensor, " rows"]
    positions: PositionTracker = field(default_factory=PositionTracker, repr=False)
    """The model's position tracker (where each forward call sits in the sequence)."""
    calls: int = field(default=0, repr=False)
    """Forward calls the hook has seen."""

    @property
    def hook_name(self) -> str:
        return HookNames.resid_post(self.layer)

    @property
    def hooks(self) -> list[tuple[str, Any]]:
        return [(self.hook_name, self.hook)]

    @property
    def offset(self) -> int:
        """The absolute position right after the latest call (the next decoding step's position)."""
        return self.positions.stop

    def delta(
        self, batch: int, seq: int, *, offset: int, dtype: torch.dtype, device: torch.device
    ) -> Float[Tensor, "b s d"]:
        """What the hook adds to resid_post for a call of ``batch`` rows at positions ``offset .. + seq``.

        The product ``strength * vector`` is taken in ``dtype`` (the model's), as it is added. When the
        sampler has dropped finished rows, the call's rows of each per-row setting are used
        (:meth:`mechintro.core.hooks.PositionTracker.select`).
        """
        rows = {self.vectors.shape[0], self.strengths.shape[0], self.starts.shape[0]} - {1}
        if len(rows) > 1:
            raise ValueError(
                f"the injection's per-row settings disagree on the number of rows: {sorted(rows)}"
            )
        pick = self.positions.select
        vectors = pick(self.vectors, batch, what="the injection")
        strengths = pick(self.strengths, batch, what="the injection")
        starts = pick(self.starts, batch, what="the injection")
        positions = torch.arange(offset, offset + seq, device=device)
        on = positions[None, :] >= starts.to(device)[:, None]  # [rows|1, seq]
        step = strengths.to(device=device, dtype=dtype)[:, None] * vectors.to(device=device, dtype=dtype)
        zero = torch.zeros((), dtype=dtype, device=device)
        return torch.where(on[..., None], step[:, None, :], zero).expand(batch, seq, -1)

    def _check_starts(self, seq: int) -> None:
        """On a call that starts at position 0 (a prompt), every start must lie inside it."""
        too_far = self.starts >= seq
        if bool(too_far.any()):
            bad = sorted({int(s) for s in self.starts[too_far]})
            raise ValueError(
                f"injection start {bad} is past the end of the sequence (length {seq}), so nothing would be "
                f"injected; valid starts are 0..{seq - 1} (absolute positions, after left padding)"
            )

    def hook(self, resid: Float[Tensor, "b s d"], hook: Any = None) -> Float[Tensor, "b s d"]:
        batch, seq, _ = resid.shape
        offset = self.positions.offset if self.positions.seq == seq else 0
        if offset == 0:
            self._check_starts(seq)
        self.calls += 1
        return resid + self.delta(batch, seq, offset=offset, dtype=resid.dtype, device=resid.device)


def _check_starts(start: Any) -> Int[Tensor, " rows"]:
    if torch.is_tensor(start):
        if start.is_floating_point() or start.dtype == torch.bool:
            raise TypeError(f"start must be integer positions, got a {start.dtype} tensor")
        starts = start.reshape(-1).long()
    else:
        items = list(start) if isinstance(start, Sequence) and not isinstance(start, str) else [start]
        starts = torch.tensor([as_int(s, what="start") for s in items], dtype=torch.long)
    if starts.numel() == 0:
        raise ValueError("start is empty")
    if (starts < 0).any():
        raise ValueError(f"start positions must be >= 0, got {starts.tolist()}")
    return starts


def make_injection(
    model: Model,
    vectors: Float[Tensor, " d_model"] | Float[Tensor, "rows d_model"],
    *,
    layer: int,
    strength: float | Sequence[float] | Tensor,
    start: int | Sequence[int] | Tensor,
) -> Injection:
    """Validate the settings and build an :class:`Injection` (without installing it)."""
    layer = check_layer(model, layer)
    vectors = torch.as_tensor(vectors)
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be [d_model] or [rows, d_model], got shape {tuple(vectors.shape)}")
    validate.d_model_of(model, vectors.shape[-1], what="the concept vector")
    if not torch.isfinite(vectors.detach()).all():
        raise ValueError("the concept vector has NaN or inf entries")
    return Injection(
        layer=layer,
        vectors=vectors,
        strengths=validate.strength_tensor(strength),
        starts=_check_starts(start),
        positions=tracker(model),
    )


@contextlib.contextmanager
def inject(
    model: Model,
    vectors: Float[Tensor, " d_model"] | Float[Tensor, "rows d_model"],
    *,
    layer: int,
    strength: float | Sequence[float] | Tensor,
    start: int | Sequence[int] | Tensor,
) -> Iterator[Injection]:
    """Inject ``strength * vector`` into resid_post of ``layer`` at every position ``>= start``.

    Args:
        vectors: ``[d_model]`` for all rows, or ``[batch, d_model]`` one per row.
        layer: block whose output (resid_post) receives the vector.
        strength: scalar or ``[batch]``; may be a tensor that requires grad or carries a forward-mode tangent
            (for attribution).
        start: scalar or ``[batch]`` absolute positions in the (padded) token tensor; each must lie inside the
            prompt.

    Yields the :class:`Injection`.
    """
    injection = make_injection(model, vectors, layer=layer, strength=strength, start=start)
    with hooks_context(model, injection.hooks, rows="tracked"):
        yield injection
