"""Concept injection: add ``strength * vector`` to resid_post of one layer from a start position on.

One context manager, :func:`inject`, serves every caller: one vector or one per batch row, scalar or per-row
strengths and starts, plain forwards, uncached generation and KV-cached decoding.

Positions. ``start`` is an absolute index into the token tensor the model is called with (for a left-padded
batch, :func:`mechintro.prompts.left_pad` has already shifted it). The hook tracks where a call sits in the
sequence: a call with more than one position is a fresh forward starting at position 0; a call with exactly
one position after an earlier call is one KV-cached decoding step, at the next position. That is how both
HF/TransformerLens-style cached generation and mechintro's own sampler drive the model. Set
``Injection.offset`` yourself for anything else (for example chunked prefill).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechintro.models import HookNames, check_d_model


def check_layer(model: Any, layer: int) -> int:
    """Return ``layer`` or raise naming the valid range of the model's layers."""
    n = int(model.cfg.n_layers)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
        raise ValueError(f"layer {layer!r} does not exist: valid layers are 0..{n - 1}")
    return layer


def hooks_context(model: Any, fwd_hooks: Sequence[tuple[str, Any]]) -> contextlib.AbstractContextManager:
    """``model.hooks(fwd_hooks)`` after checking every name exists (TransformerLens skips unknown names)."""
    known = model.hook_dict
    for name, _ in fwd_hooks:
        if name not in known:
            close = sorted(k for k in known if k.split(".")[-1] == name.split(".")[-1])[:6]
            raise ValueError(f"no hook point {name!r} in this model; similar names: {close}")
    return model.hooks(fwd_hooks=list(fwd_hooks))


@dataclass
class Injection:
    """A live injection. ``hooks`` composes with ``model.hooks``; :func:`inject` installs it for you."""

    layer: int
    vectors: Float[Tensor, "rows d_model"]
    strengths: Float[Tensor, " rows"]
    starts: Int[Tensor, " rows"]
    offset: int = 0
    """Absolute position of the first position of the next call (maintained automatically)."""
    calls: int = field(default=0, repr=False)

    @property
    def hook_name(self) -> str:
        return HookNames.resid_post(self.layer)

    @property
    def hooks(self) -> list[tuple[str, Any]]:
        return [(self.hook_name, self.hook)]

    def delta(
        self, batch: int, seq: int, *, dtype: torch.dtype, device: torch.device
    ) -> Float[Tensor, "b s d"]:
        """What the hook adds to resid_post for a call of ``batch`` rows at ``self.offset .. + seq``."""
        rows = {self.vectors.shape[0], self.strengths.shape[0], self.starts.shape[0]} - {1}
        if rows and rows != {batch}:
            raise ValueError(
                f"the injection has per-row settings for {sorted(rows)} rows but the batch has {batch} rows"
            )
        positions = torch.arange(self.offset, self.offset + seq, device=device)
        on = positions[None, :] >= self.starts.to(device)[:, None]  # [rows|1, seq]
        step = self.strengths.to(device=device, dtype=dtype)[:, None] * self.vectors.to(
            device=device, dtype=dtype
        )
        return torch.where(
            on[..., None], step[:, None, :], torch.zeros((), dtype=dtype, device=device)
        ).expand(batch, seq, -1)

    def hook(self, resid: Float[Tensor, "b s d"], hook: Any = None) -> Float[Tensor, "b s d"]:
        batch, seq, _ = resid.shape
        if seq > 1 or self.calls == 0:
            self.offset = 0
        out = resid + self.delta(batch, seq, dtype=resid.dtype, device=resid.device)
        self.offset += seq
        self.calls += 1
        return out


def make_injection(
    model: Any,
    vectors: Float[Tensor, " d_model"] | Float[Tensor, "rows d_model"],
    *,
    layer: int,
    strength: float | Sequence[float] | Tensor,
    start: int | Sequence[int] | Tensor,
) -> Injection:
    """Validate the settings and build an :class:`Injection` (without installing it)."""
    check_layer(model, layer)
    vectors = torch.as_tensor(vectors)
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be [d_model] or [rows, d_model], got shape {tuple(vectors.shape)}")
    check_d_model(model, vectors.shape[-1], what="the concept vector")
    if not torch.isfinite(vectors.detach()).all():
        raise ValueError("the concept vector has NaN or inf entries")
    strengths = (
        strength.reshape(-1) if torch.is_tensor(strength) else torch.tensor(strength, dtype=torch.float32)
    )
    strengths = strengths.reshape(-1)
    if not torch.isfinite(strengths.detach()).all():
        raise ValueError(f"strength must be finite, got {strength!r}")
    starts = torch.as_tensor(start, dtype=torch.long).reshape(-1)
    if (starts < 0).any():
        raise ValueError(f"start positions must be >= 0, got {start!r}")
    return Injection(layer=layer, vectors=vectors, strengths=strengths, starts=starts)


@contextlib.contextmanager
def inject(
    model: Any,
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
        strength: scalar or ``[batch]``; may be a tensor that requires grad (for attribution).
        start: scalar or ``[batch]`` absolute positions in the (padded) token tensor.

    Yields the :class:`Injection`, whose ``offset`` tracks cached decoding.
    """
    injection = make_injection(model, vectors, layer=layer, strength=strength, start=start)
    with hooks_context(model, injection.hooks):
        yield injection
