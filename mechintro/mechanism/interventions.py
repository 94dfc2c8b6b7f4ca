"""Feature interventions: set transcoder features to target activations, inside the model's own forward.

One intervention serves ablation and patching. For each selected feature ``f`` of layer ``L`` it adds

    (a_target - a_current) * d_f

to ``hook_mlp_out`` of ``L`` (the transcoder output site), where ``a_current`` is the feature's activation
encoded from the MLP's input of ``L`` (the transcoder input site of the model's family: ``ln2.hook_out`` for
Gemma 3, Qwen3 and Llama, ``mlp.hook_in`` for OLMo 2 / 3) *in the same forward pass*, so the edit
is correct in any context: under :func:`mechintro.core.steering.inject`, under other interventions on earlier
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
* **Positions** (``positions``, :data:`mechintro.core.hooks.Positions`): ``"last"`` (default) edits one
  absolute
  position, the last prompt token: ``last=`` if given, else the last position of the first call made under the
  intervention (the prompt, for generation). ``"from_start"`` edits every position ``>= start`` (per row),
  including each generated token; ``"all"`` every position; ints those absolute positions. Which absolute
  positions a call covers comes from the model's :class:`mechintro.core.hooks.PositionTracker` (the KV cache).
* **Site** (``site``): ``"mlp_out"`` (default, as the paper's text states it) reads the feature at
  the MLP's input (Gemma 3: ``ln2.hook_out``) and writes the edit at ``hook_mlp_out``. ``"mlp_input"`` is what
  the paper's released code does (as issue #8 reports it): the edit, with the raw decoder row by default, is
  added to the MLP's input (Gemma 3: ``ln2.hook_out``, after the pre-feedforward norm) and so passes through
  the MLP.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechintro.core.hooks import (
    Positions,
    PositionTracker,
    as_int,
    capture,
    check_layer,
    check_positions,
    hooks_context,
    position_mask,
    tracker,
)
from mechintro.core.models import Model, Transcoders, require_mechanism
from mechintro.core.transcoders import encode_features, input_candidates, parse_features, transcoder_site

__all__ = [
    "SCALES",
    "SITES",
    "FeatureIntervention",
    "feature_directions",
    "intervene",
    "make_intervention",
    "read_features",
]

Scale: TypeAlias = Literal["unit", "decoder"]
EditSite: TypeAlias = Literal["mlp_out", "mlp_input"]

SCALES: tuple[Scale, ...] = ("unit", "decoder")
"""How the decoder row is scaled: unit-normalized (the paper's text) or raw (an exact activation edit)."""

SITES: tuple[EditSite, ...] = ("mlp_out", "mlp_input")
"""Where the edit is written: the transcoder output (the paper's text) or the MLP input (its released
code)."""


def feature_directions(
    transcoders: Transcoders, layer: int, indices: Sequence[int] | Tensor, *, scale: Scale = "unit"
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
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise ValueError(f"{what} has NaN or inf entries")
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

    transcoders: Transcoders
    features: list[tuple[int, int]]
    target: Float[Tensor, "rows feature"]
    """Target activations (rows may be 1: shared by every batch row)."""
    mask: Bool[Tensor, "rows feature"]
    """Which (row, feature) entries are edited (rows may be 1)."""
    positions: Positions
    starts: Int[Tensor, " rows"]
    last: int | None
    scale: Scale
    site: EditSite
    plans: list[_LayerPlan]
    tracker: PositionTracker
    sites: dict[int, tuple[str, str]]
    """Per layer, ``(input hook, output hook)`` of its transcoder
    (:func:`mechintro.core.transcoders.transcoder_site`: the site the dictionary records, else the family's
    MLP input and MLP sublayer update): where the feature is read and the edit written."""
    record: bool = False
    """Keep ``current`` (a_current per layer) and ``added`` (the edit per layer) of the latest call."""
    calls: int = 0
    current: dict[int, Tensor] = field(default_factory=dict, repr=False)
    added: dict[int, Tensor] = field(default_factory=dict, repr=False)
    _where: Tensor | None = field(default=None, repr=False)

    @property
    def hooks(self) -> list[tuple[str, Any]]:
        out = []
        for plan in self.plans:
            read = self.sites[plan.layer][0]
            if self.site == "mlp_input":
                out.append((read, self._input_hook(plan)))
            else:
                out.append((read, self._encode_hook(plan)))
                out.append((self.sites[plan.layer][1], self._edit_hook(plan)))
        return out

    def _begin_call(self, batch: int, seq: int, device: torch.device) -> None:
        offset = self.tracker.offset if self.tracker.seq == seq else 0
        if self.last is None:
            self.last = offset + seq - 1
        self.calls += 1
        chosen = [self.last] if self.positions == "last" else self.positions
        starts = self._rows(self.starts, batch)
        self._where = position_mask(chosen, offset=offset, seq=seq, starts=starts, device=device)

    def _rows(self, values: Tensor, batch: int) -> Tensor:
        """This call's rows of a per-row setting (all of them unless the sampler dropped finished rows)."""
        return self.tracker.select(values, batch, what="the intervention")

    def _check_rows(self, batch: int) -> None:
        rows = {self.target.shape[0], self.mask.shape[0], self.starts.shape[0]} - {1}
        if len(rows) > 1:
            raise ValueError(f"the intervention's per-row settings disagree on the number of rows: {rows}")
        for values in (self.target, self.mask, self.starts):
            self._rows(values, batch)

    def _read(self, plan: _LayerPlan, x: Float[Tensor, "b s d"]) -> None:
        self._check_rows(x.shape[0])
        if plan is self.plans[0]:
            self._begin_call(x.shape[0], x.shape[1], x.device)
        self.current[plan.layer] = encode_features(self.transcoders[plan.layer], x, plan.indices)

    def _edit(self, plan: _LayerPlan, out: Float[Tensor, "b s d"]) -> Float[Tensor, "b s d"]:
        current = self.current[plan.layer].to(out.device)  # [b, s, n]
        cols = plan.columns.to(out.device)
        batch = out.shape[0]
        target = self._rows(self.target, batch).to(out.device)[:, cols][:, None, :]  # [rows|1, 1, n]
        mask = self._rows(self.mask, batch).to(out.device)
        on = mask[:, cols][:, None, :] & self._where[..., None]  # [rows|1, s, n]
        zero = torch.zeros((), dtype=current.dtype, device=out.device)
        delta = torch.where(on, target.to(current.dtype) - current, zero)
        edit = (delta @ plan.directions.to(device=out.device, dtype=delta.dtype)).to(out.dtype)
        if self.record:
            self.added[plan.layer] = edit.detach()
        else:
            self.current.pop(plan.layer, None)
        return out + edit

    def _encode_hook(self, plan: _LayerPlan):
        def hook(x: Float[Tensor, "b s d"], hook: Any = None) -> None:
            self._read(plan, x)

        return hook

    def _edit_hook(self, plan: _LayerPlan):
        def hook(out: Float[Tensor, "b s d"], hook: Any = None) -> Float[Tensor, "b s d"]:
            return self._edit(plan, out)

        return hook

    def _input_hook(self, plan: _LayerPlan):
        def hook(x: Float[Tensor, "b s d"], hook: Any = None) -> Float[Tensor, "b s d"]:
            self._read(plan, x)
            return self._edit(plan, x)

        return hook


def make_intervention(
    model: Model,
    transcoders: Transcoders,
    features: Any,
    *,
    target: float | Sequence[float] | Tensor,
    mask: Tensor | None = None,
    positions: Positions = "last",
    start: int | Sequence[int] | Tensor | None = None,
    last: int | None = None,
    scale: Scale | None = None,
    site: EditSite = "mlp_out",
    record: bool = False,
) -> FeatureIntervention:
    """Validate the settings and build a :class:`FeatureIntervention` (without installing it).

    Args:
        features: names (``"L3 F12"``), ``(layer, index)`` pairs, or a table with a ``feature`` column.
        target: target activations: a scalar, ``[n_features]`` or ``[batch, n_features]``.
        mask: ``[n_features]`` or ``[batch, n_features]`` booleans: edit only these (default: all).
        positions: ``"last"``, ``"from_start"``, ``"all"`` or absolute indices (see the module docstring).
        start: absolute start position(s) for ``"from_start"`` (scalar or ``[batch]``, already shifted for
            left padding, like ``inject``'s ``start``).
        last: absolute index of the position ``"last"`` edits (default: the last position of the first call).
        scale: ``"unit"`` or ``"decoder"``; default ``"unit"`` at ``site="mlp_out"``, ``"decoder"`` at
            ``"mlp_input"`` (the paper's released code).
        site: ``"mlp_out"`` (the paper's text) or ``"mlp_input"`` (its released code).
        record: keep a_current and the edit of the latest call on the object (for tests and diagnostics).
    """
    require_mechanism(model, "a feature intervention")
    positions = check_positions(positions, starts=start)
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; valid: {list(SITES)}")
    scale = scale if scale is not None else ("decoder" if site == "mlp_input" else "unit")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; valid: {list(SCALES)}")
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
        directions = feature_directions(transcoders, layer, idx, scale=scale)
        plans.append(_LayerPlan(layer, torch.tensor(cols), torch.tensor(idx), directions))
    starts = torch.as_tensor(0 if start is None else start)
    if starts.is_floating_point():
        raise TypeError(f"start must be integer positions, got {start!r}")
    return FeatureIntervention(
        transcoders=transcoders,
        features=feats,
        target=_rows(target, n, what="target", dtype=torch.float32),
        mask=_rows(True if mask is None else mask, n, what="mask", dtype=torch.bool),
        positions=positions,
        starts=starts.long().reshape(-1),
        last=None if last is None else as_int(last, what="last"),
        scale=scale,
        site=site,
        plans=plans,
        tracker=tracker(model),
        sites={p.layer: transcoder_site(model, transcoders, p.layer) for p in plans},
        record=record,
    )


@contextlib.contextmanager
def intervene(
    model: Model,
    transcoders: Transcoders,
    features: Any,
    *,
    target: float | Sequence[float] | Tensor,
    mask: Tensor | None = None,
    positions: Positions = "last",
    start: int | Sequence[int] | Tensor | None = None,
    last: int | None = None,
    scale: Scale | None = None,
    site: EditSite = "mlp_out",
    record: bool = False,
) -> Iterator[FeatureIntervention]:
    """Set ``features`` to ``target`` by adding ``(a_target - a_current) * d`` at ``hook_mlp_out``.

    See :func:`make_intervention` for the arguments and the module docstring for what is edited where.
    Composes with :func:`mechintro.core.steering.inject`, with other hooks and with (cached) generation.
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
        site=site,
        record=record,
    )
    with hooks_context(model, iv.hooks, rows="tracked"):
        yield iv


@torch.no_grad()
def read_features(
    model: Model,
    transcoders: Transcoders,
    features: Any,
    tokens: Int[Tensor, "batch seq"] | Int[Tensor, " seq"],
    *,
    attention_mask: Tensor | None = None,
    positions: Positions = "last",
) -> Float[Tensor, "batch feature"]:
    """Activations of ``features`` at one position (default: the last token) in one forward of ``tokens``.

    Run it inside ``inject(...)`` for steered activations (patching targets), outside for control ones.
    """
    feats = parse_features(features)
    if not feats:
        raise ValueError("no features to read")
    positions = check_positions(positions)
    if not isinstance(positions, int) and positions != "last":
        raise ValueError(f"read_features reads one position ('last' or an index), got {positions!r}")
    tokens = torch.as_tensor(tokens)
    tokens = tokens[None] if tokens.ndim == 1 else tokens
    layers = sorted({la for la, _ in feats})
    hooks = list(dict.fromkeys(h for layer in layers for h in input_candidates(model, transcoders, layer)))
    device = model.cfg.device
    mask = None if attention_mask is None else attention_mask.to(device)
    with capture(model, hooks, positions=positions) as acts:
        model(tokens.to(device), attention_mask=mask, stop_at_layer=max(layers) + 1)
    out = torch.empty(tokens.shape[0], len(feats))
    for layer in layers:
        tc = transcoders[layer]  # loaded now: where it reads is known
        cols = [k for k, (la, _) in enumerate(feats) if la == layer]
        idx = torch.tensor([feats[k][1] for k in cols])
        x = acts[transcoder_site(model, transcoders, layer)[0]][:, 0]
        out[:, cols] = encode_features(tc, x, idx).float().cpu()
        del tc
    return out
