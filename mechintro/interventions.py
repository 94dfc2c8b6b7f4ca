"""Feature interventions: set transcoder features to target activations, inside the model's own forward.

One intervention serves ablation and patching. For each selected feature ``f`` of layer ``L`` it adds

    (a_target - a_current) * d_f

to ``hook_mlp_out`` of ``L`` (the transcoder output site), where ``a_current`` is the feature's activation
encoded from ``ln2.hook_out`` of ``L`` (the transcoder input site) *in the same forward pass*, so the edit
is correct in any context: under :func:`mechintro.steering.inject`, under other interventions on earlier
layers, and during KV-cached generation, where each call sees one new position.

* **Ablation** uses the control (unsteered) activation as the target; **patching** uses the steered one.
  :func:`read_features` gives either (run it inside ``inject`` for the steered one).
* **Direction** ``d_f`` (``scale``): ``"unit"`` (default, as the paper states it) is the unit-normalized
  decoder row ``W_dec[f] / |W_dec[f]|``; ``"decoder"`` is the raw row ``W_dec[f]``. Only ``"decoder"`` makes
  the edit equal to the transcoder-output change of setting the feature to the target,
  ``tc.decode(a with a_f = a_target) - tc.decode(a)``; with ``"unit"`` the output moves by
  ``|W_dec[f]|^-1`` times that. The two agree when decoder rows have unit norm.
* **What "the feature equals the target" means.** The feature is *read* at the layer's input and the edit is
  *written* at its output, so the edit does not change the layer's own re-encoded activation; what holds
  exactly is the output-side identity above (tested). Features of later layers, and through attention the
  later positions, see the edited residual stream.
* **Positions** (``positions``): ``"last"`` (default) edits one absolute position, the last prompt token:
  ``last=`` if given, else the last position of the first call made under the intervention (the prompt, for
  generation). ``"from_start"`` edits every position ``>= start`` (per row), including each generated token.
  Position tracking follows :class:`mechintro.steering.Injection`: a call with more than one position is a
  fresh forward from position 0; a one-position call after an earlier call is the next decoding step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechintro.features import encode_features, parse_features
from mechintro.models import HookNames
from mechintro.steering import check_layer, hooks_context

__all__ = [
    "POSITIONS",
    "SCALES",
    "FeatureIntervention",
    "feature_directions",
    "intervene",
    "make_intervention",
    "read_features",
]

POSITIONS = ("last", "from_start")
"""Which positions an intervention edits."""

SCALES = ("unit", "decoder")
"""How the decoder row is scaled: unit-normalized (the paper) or raw (an exact activation edit)."""


def feature_directions(
    transcoders: Mapping[int, Any], layer: int, indices: Sequence[int] | Tensor, *, scale: str = "unit"
) -> Float[Tensor, "n d_model"]:
    """Decoder rows of ``indices`` of ``layer``: unit-normalized (``scale="unit"``) or raw (``"decoder"``)."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; valid: {list(SCALES)}")
    tc = transcoders[layer]
    rows = tc.W_dec.detach()[torch.as_tensor(indices, dtype=torch.long, device=tc.W_dec.device)]
    return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12) if scale == "unit" else rows


def _rows(value: Any, n_features: int, *, what: str, dtype: torch.dtype) -> Tensor:
    """A scalar, ``[feature]`` or ``[rows, feature]`` setting as ``[rows|1, feature]``."""
    t = torch.as_tensor(value, dtype=dtype)
    if t.ndim == 0:
        t = t.expand(1, n_features)
    elif t.ndim == 1:
        t = t[None]
    if t.ndim != 2 or t.shape[1] != n_features:
        raise ValueError(
            f"{what} must be a scalar, [n_features={n_features}] or [rows, {n_features}], got "
            f"{tuple(t.shape)}"
        )
    return t


@dataclass
class _LayerPlan:
    layer: int
    columns: Int[Tensor, " n"]
    """Positions of this layer's features in the intervention's feature list."""
    indices: Int[Tensor, " n"]
    """Feature indices within the layer's transcoder."""
    directions: Float[Tensor, "n d_model"]


@dataclass
class FeatureIntervention:
    """A live feature intervention; ``hooks`` composes with ``model.hooks``, :func:`intervene` installs it."""

    transcoders: Mapping[int, Any]
    features: list[tuple[int, int]]
    target: Float[Tensor, "rows feature"]
    """Target activations (rows may be 1: shared by every batch row)."""
    mask: Bool[Tensor, "rows feature"]
    """Which (row, feature) entries are edited (rows may be 1)."""
    positions: str
    starts: Int[Tensor, " rows"]
    last: int | None
    scale: str
    plans: list[_LayerPlan]
    record: bool = False
    """Keep ``current`` (a_current per layer) and ``added`` (the edit per layer) of the latest call."""
    offset: int = 0
    calls: int = 0
    current: dict[int, Tensor] = field(default_factory=dict, repr=False)
    added: dict[int, Tensor] = field(default_factory=dict, repr=False)
    _where: Tensor | None = field(default=None, repr=False)
    _next: int = field(default=0, repr=False)

    @property
    def hooks(self) -> list[tuple[str, Any]]:
        out = []
        for plan in self.plans:
            out.append((HookNames.transcoder_in(plan.layer), self._encode_hook(plan)))
            out.append((HookNames.transcoder_out(plan.layer), self._edit_hook(plan)))
        return out

    def _begin_call(self, batch: int, seq: int, device: torch.device) -> None:
        if seq > 1 or self.calls == 0:
            self.offset = 0
            if self.last is None and self.calls == 0:
                self.last = seq - 1
        else:
            self.offset = self._next
        self._next = self.offset + seq
        self.calls += 1
        positions = torch.arange(self.offset, self.offset + seq, device=device)
        if self.positions == "last":
            self._where = (positions == self.last)[None, :]
        else:
            self._where = positions[None, :] >= self.starts.to(device)[:, None]

    def _check_rows(self, batch: int) -> None:
        rows = {self.target.shape[0], self.mask.shape[0], self.starts.shape[0]} - {1}
        if rows and rows != {batch}:
            raise ValueError(
                f"the intervention has per-row settings for {sorted(rows)} rows but the batch has {batch}"
            )

    def _encode_hook(self, plan: _LayerPlan):
        def hook(x: Float[Tensor, "b s d"], hook: Any = None) -> None:
            if plan is self.plans[0]:
                self._begin_call(x.shape[0], x.shape[1], x.device)
            self._check_rows(x.shape[0])
            self.current[plan.layer] = encode_features(self.transcoders[plan.layer], x, plan.indices)

        return hook

    def _edit_hook(self, plan: _LayerPlan):
        def hook(out: Float[Tensor, "b s d"], hook: Any = None) -> Float[Tensor, "b s d"]:
            current = self.current[plan.layer].to(out.device)  # [b, s, n]
            cols = plan.columns.to(out.device)
            target = self.target.to(out.device)[:, cols][:, None, :]  # [rows|1, 1, n]
            on = self.mask.to(out.device)[:, cols][:, None, :] & self._where[..., None]  # [rows|1, s, n]
            delta = torch.where(
                on,
                target.to(current.dtype) - current,
                torch.zeros((), dtype=current.dtype, device=out.device),
            )
            edit = (delta @ plan.directions.to(device=out.device, dtype=delta.dtype)).to(out.dtype)
            if self.record:
                self.added[plan.layer] = edit.detach()
            else:
                self.current.pop(plan.layer, None)
            return out + edit

        return hook


def make_intervention(
    model: Any,
    transcoders: Mapping[int, Any],
    features: Any,
    *,
    target: float | Sequence[float] | Tensor,
    mask: Tensor | None = None,
    positions: str = "last",
    start: int | Sequence[int] | Tensor | None = None,
    last: int | None = None,
    scale: str = "unit",
    record: bool = False,
) -> FeatureIntervention:
    """Validate the settings and build a :class:`FeatureIntervention` (without installing it).

    Args:
        features: names (``"L3 F12"``), ``(layer, index)`` pairs, or a table with a ``feature`` column.
        target: target activations: a scalar, ``[n_features]`` or ``[batch, n_features]``.
        mask: ``[n_features]`` or ``[batch, n_features]`` booleans: edit only these (default: all).
        positions: ``"last"`` or ``"from_start"`` (see the module docstring).
        start: absolute start position(s) for ``"from_start"`` (scalar or ``[batch]``, already shifted for
            left padding, like ``inject``'s ``start``).
        last: absolute index of the position ``"last"`` edits (default: the last position of the first call).
        scale: ``"unit"`` or ``"decoder"`` (see the module docstring).
        record: keep a_current and the edit of the latest call on the object (for tests and diagnostics).
    """
    if positions not in POSITIONS:
        raise ValueError(f"unknown positions {positions!r}; valid: {list(POSITIONS)}")
    if positions == "from_start" and start is None:
        raise ValueError("positions='from_start' needs start= (the injection start of each row)")
    feats = parse_features(features)
    if not feats:
        raise ValueError("no features to intervene on")
    for layer, index in feats:
        check_layer(model, layer)
        if layer not in transcoders:
            raise ValueError(f"no transcoder for layer {layer}; loaded: {sorted(transcoders)}")
        d_sae = int(transcoders[layer].cfg.d_sae)
        if not 0 <= index < d_sae:
            raise ValueError(f"feature index {index} is outside layer {layer}'s 0..{d_sae - 1}")
    n = len(feats)
    plans = []
    for layer in sorted({la for la, _ in feats}):
        cols = [k for k, (la, _) in enumerate(feats) if la == layer]
        idx = [feats[k][1] for k in cols]
        plans.append(
            _LayerPlan(
                layer,
                torch.tensor(cols),
                torch.tensor(idx),
                feature_directions(transcoders, layer, idx, scale=scale),
            )
        )
    return FeatureIntervention(
        transcoders=transcoders,
        features=feats,
        target=_rows(target, n, what="target", dtype=torch.float32),
        mask=_rows(True if mask is None else mask, n, what="mask", dtype=torch.bool),
        positions=positions,
        starts=torch.as_tensor(0 if start is None else start, dtype=torch.long).reshape(-1),
        last=last,
        scale=scale,
        plans=plans,
        record=record,
    )


@contextlib.contextmanager
def intervene(
    model: Any,
    transcoders: Mapping[int, Any],
    features: Any,
    *,
    target: float | Sequence[float] | Tensor,
    mask: Tensor | None = None,
    positions: str = "last",
    start: int | Sequence[int] | Tensor | None = None,
    last: int | None = None,
    scale: str = "unit",
    record: bool = False,
) -> Iterator[FeatureIntervention]:
    """Set ``features`` to ``target`` by adding ``(a_target - a_current) * d`` at ``hook_mlp_out``.

    See :func:`make_intervention` for the arguments and the module docstring for what is edited where.
    Composes with :func:`mechintro.steering.inject`, with other hooks and with (cached) generation.
    """
    iv = make_intervention(
        model,
        transcoders,
        features,
        target=target,
        mask=mask,
        positions=positions,
        start=start,
        last=last,
        scale=scale,
        record=record,
    )
    with hooks_context(model, iv.hooks):
        yield iv


@torch.no_grad()
def read_features(
    model: Any,
    transcoders: Mapping[int, Any],
    features: Any,
    tokens: Int[Tensor, "batch seq"] | Int[Tensor, " seq"],
    *,
    attention_mask: Tensor | None = None,
    position: int = -1,
) -> Float[Tensor, "batch feature"]:
    """Activations of ``features`` at ``position`` (default: the last token) in one forward of ``tokens``.

    Run it inside ``inject(...)`` for steered activations (patching targets), outside for control ones.
    """
    feats = parse_features(features)
    tokens = tokens[None] if tokens.ndim == 1 else tokens
    got: dict[int, Tensor] = {}
    layers = sorted({la for la, _ in feats})

    def grab(layer: int):
        idx = torch.tensor([i for la, i in feats if la == layer])

        def hook(x: Tensor, hook: Any = None) -> None:
            got[layer] = encode_features(transcoders[layer], x[:, position], idx)

        return hook

    hooks = [(HookNames.transcoder_in(layer), grab(layer)) for layer in layers]
    device = model.cfg.device
    mask = None if attention_mask is None else attention_mask.to(device)
    with hooks_context(model, hooks):
        model(tokens.to(device), attention_mask=mask, stop_at_layer=max(layers) + 1)
    out = torch.empty(tokens.shape[0], len(feats))
    for layer in layers:
        cols = [k for k, (la, _) in enumerate(feats) if la == layer]
        out[:, cols] = got[layer].float().cpu()
    return out
