"""Directions in the residual stream: finding them and ablating them.

**Directional ablation** (:func:`ablate_directions`), the paper's refusal ablation as a general tool: remove
``w (x . r) r`` (``r`` a unit direction) from the residual stream at every listed layer, at every position
``>= start`` and every generated token. :func:`difference_of_means` gives the directions (the paper's
refusal recipe: harmful minus harmless prompts at the position before the end of the chat prompt);
:func:`gate_direction` the "say No" direction the gate candidates write, and :func:`random_direction` a
norm-matched control.

* ``site="resid_post"`` (default, the paper's site) edits each listed block's output. The edit is applied
  where that output enters the next block (``resid_pre`` of ``L + 1``, or the final norm's input for the last
  block), so it always comes **after** every hook at ``resid_post(L)``: an
  :func:`~mechintro.core.steering.inject` at the same layer is applied first and its component along ``r`` is
  removed too, whichever context was entered first. A :func:`~mechintro.core.hooks.capture` at
  ``resid_post(L)`` therefore reads the stream before the ablation; read ``resid_pre(L + 1)`` (or
  :meth:`HookNames.final_norm_in`) for the ablated one.
* ``site="writes"`` edits every write into the residual stream of the listed blocks instead: the attention
  output and the MLP output of block ``L`` (post-norm, what is added), and the embeddings when block 0 is
  listed (with block 0's direction). Injections are not model writes and are not ablated at this site.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechintro.core import validate
from mechintro.core.hooks import PositionTracker, capture, check_layer, hooks_context, position_mask, tracker
from mechintro.core.models import HookNames, Model, Transcoders
from mechintro.core.prompts import chat_prompt_tokens, left_pad

__all__ = [
    "ABLATION_SITES",
    "AblationPoint",
    "DirectionalAblation",
    "ablate_directions",
    "difference_of_means",
    "gate_direction",
    "layer_list",
    "make_ablation",
    "random_direction",
]

AblationPoint: TypeAlias = Literal["resid_post", "writes"]
"""Which hook points an ablation edits: each listed block's output (``"resid_post"``), or every write into
the residual stream of the listed blocks (``"writes"``: attention and MLP outputs, and the embeddings)."""

ABLATION_SITES: tuple[AblationPoint, ...] = ("resid_post", "writes")
"""The valid ``site=`` of :func:`ablate_directions` (see :data:`AblationPoint`)."""


def layer_list(model: Model, layer: Any, *, what: str) -> tuple[int, ...]:
    """A layer, a list of distinct layers, or ``"all"`` (every block) as a tuple of the model's layers."""
    n = int(model.cfg.n_layers)
    if isinstance(layer, str):
        if layer != "all":
            raise ValueError(f"{what} must be a layer, a list of layers or 'all', got {layer!r}")
        return tuple(range(n))
    items = [layer] if not isinstance(layer, (Sequence, Tensor)) else list(layer)
    out = tuple(check_layer(model, la) for la in items)
    if not out or len(set(out)) != len(out):
        raise ValueError(f"{what} must be distinct layers in 0..{n - 1}, got {layer!r}")
    return out


# ----------------------------------------------------------------------------------------------- directions


def _prompt_tokens(model: Model, prompts: Sequence[str | Tensor], *, what: str) -> list[Tensor]:
    if isinstance(prompts, (str, Tensor)) or len(prompts) == 0:
        raise ValueError(f"{what} must be a non-empty list of prompts (strings or token tensors)")
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append(chat_prompt_tokens(model, p))
        else:
            t = torch.as_tensor(p)
            if t.ndim != 1 or t.is_floating_point():
                raise ValueError(
                    f"{what}: a token prompt must be a 1-D integer tensor, got shape {tuple(t.shape)}"
                )
            out.append(t.long())
    return out


def _mean_at(
    model: Model, prompts: list[Tensor], *, layers: Sequence[int], position: int, batch_size: int
) -> dict[int, Float[Tensor, " d_model"]]:
    """Mean resid_post of ``layers`` at ``position`` of each prompt (negative: from its end), float64."""
    names = {HookNames.resid_post(la): la for la in layers}
    sums = {la: torch.zeros(int(model.cfg.d_model), dtype=torch.float64) for la in layers}
    device = model.cfg.device
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        batch = left_pad(chunk, pad_id=model.tokenizer.pad_token_id)
        lengths = torch.tensor([len(t) for t in chunk])
        index = batch.pad + (position if position >= 0 else lengths + position)
        with torch.no_grad(), capture(model, list(names), dtype=torch.float64) as acts:
            model(
                batch.tokens.to(device),
                attention_mask=batch.attention_mask.to(device),
                stop_at_layer=max(layers) + 1,
            )
        rows = torch.arange(len(chunk))
        for name, la in names.items():
            sums[la] += acts[name].cpu()[rows, index].sum(0)
    return {la: s / len(prompts) for la, s in sums.items()}


def difference_of_means(
    model: Model,
    prompts_a: Sequence[str | Tensor],
    prompts_b: Sequence[str | Tensor],
    *,
    layers: int | Sequence[int] | Literal["all"],
    position: int = -2,
    batch_size: int = 32,
) -> dict[int, Float[Tensor, " d_model"]]:
    """One unit direction per layer: mean resid_post over ``prompts_a`` minus over ``prompts_b``, normalized.

    Args:
        prompts_a / prompts_b: strings (rendered as one-turn chat prompts with the generation prompt) or
            token tensors. The paper's refusal recipe: harmful (a) vs harmless (b) requests.
        layers: a layer, a list, or ``"all"``.
        position: a token index of each prompt; negative counts from its end. The default ``-2`` is the
            position before the end of the chat prompt.

    Returns ``{layer: Float[d_model]}`` in float32 on the CPU (means accumulated in float64).
    """
    layers = layer_list(model, layers, what="layers")
    tokens_a = _prompt_tokens(model, prompts_a, what="prompts_a")
    tokens_b = _prompt_tokens(model, prompts_b, what="prompts_b")
    position = validate.integer("position", position)
    shortest = min(len(t) for t in tokens_a + tokens_b)
    if not -shortest <= position < shortest:
        raise ValueError(f"position {position} is outside the shortest prompt ({shortest} tokens)")
    mean_a = _mean_at(model, tokens_a, layers=layers, position=position, batch_size=batch_size)
    mean_b = _mean_at(model, tokens_b, layers=layers, position=position, batch_size=batch_size)
    out = {}
    for la in layers:
        diff = mean_a[la] - mean_b[la]
        norm = float(diff.norm())
        if not math.isfinite(norm):
            raise ValueError(f"the activations at layer {la} are not finite (NaN or inf): no direction")
        if not norm > 0:
            raise ValueError(f"the two prompt sets have the same mean at layer {la}: no direction")
        out[la] = (diff / norm).float()
    return out


def gate_direction(
    transcoders: Transcoders, gates: pd.DataFrame, *, k: int = 10
) -> Float[Tensor, " d_model"]:
    """The "say No" direction of the gates: the unit mean of the top-``k`` gates' unit decoder directions.

    ``gates`` is :func:`mechintro.mechanism.features.find_gates` output (ranked, columns layer, index, rank).
    Decoder
    directions live where the transcoder writes (``hook_mlp_out``), i.e. in the residual stream.
    """
    from mechintro.mechanism.interventions import feature_directions

    k = validate.count("k", k)
    if missing := sorted({"layer", "index"} - set(gates.columns)):
        raise ValueError(f"gates needs find_gates output; it lacks {missing}")
    if len(gates) < k:
        raise ValueError(f"k={k} gates requested but only {len(gates)} are given")
    top = gates.sort_values("rank").head(k) if "rank" in gates.columns else gates.head(k)
    rows = [
        feature_directions(transcoders, int(layer), [int(index)], scale="unit")[0].float().cpu()
        for layer, index in zip(top["layer"], top["index"], strict=True)
    ]
    mean = torch.stack(rows).mean(0)
    return mean / mean.norm().clamp_min(1e-12)


def random_direction(d_model: int, *, seed: int, norm: float = 1.0) -> Float[Tensor, " d_model"]:
    """An isotropic random direction of length ``norm`` (a norm-matched control), seeded."""
    g = torch.Generator().manual_seed(validate.integer("seed", seed))
    v = torch.randn(validate.count("d_model", d_model), generator=g)
    return v / v.norm() * float(norm)


# ----------------------------------------------------------------------------------------------- ablation


@dataclass
class DirectionalAblation:
    """A live directional ablation; ``hooks`` composes with ``model.hooks``, :func:`ablate_directions`
    installs it."""

    layers: tuple[int, ...]
    """The listed blocks."""
    directions: Float[Tensor, "layer d_model"]
    """One unit direction per listed block (float64; cast to the stream's dtype when applied)."""
    weights: Float[Tensor, " layer"]
    """One weight per listed block (1 removes the component entirely)."""
    site: AblationPoint
    """``"resid_post"`` or ``"writes"``."""
    starts: Int[Tensor, " rows"]
    """Absolute positions from which each row is ablated (0: every position)."""
    n_layers: int
    """The model's number of blocks."""
    tracker: PositionTracker = field(repr=False)
    """The model's position tracker (where each forward call sits in the sequence)."""

    def _edit(self, i: int, x: Float[Tensor, "b s d"]) -> Float[Tensor, "b s d"]:
        r = self.directions[i].to(device=x.device, dtype=x.dtype)
        removed = (x @ r)[..., None] * r * self.weights[i].to(device=x.device, dtype=x.dtype)
        if bool((self.starts > 0).any()):
            seq = x.shape[1]
            offset = self.tracker.offset if self.tracker.seq == seq else 0
            starts = self.tracker.select(self.starts, x.shape[0], what="the ablation")
            on = position_mask("from_start", offset=offset, seq=seq, starts=starts, device=x.device)
            removed = removed * on[..., None].to(x.dtype)
        return x - removed

    def _hook(self, i: int):
        def hook(x: Float[Tensor, "b s d"], hook: Any = None) -> Float[Tensor, "b s d"]:
            return self._edit(i, x)

        return hook

    @property
    def hooks(self) -> list[tuple[str, Any]]:
        out = []
        for i, layer in enumerate(self.layers):
            if self.site == "resid_post":
                after = (
                    HookNames.resid_pre(layer + 1) if layer + 1 < self.n_layers else HookNames.final_norm_in()
                )
                out.append((after, self._hook(i)))
            else:
                if layer == 0:
                    out.append((HookNames.resid_pre(0), self._hook(i)))
                out += [(HookNames.attn_out(layer), self._hook(i)), (HookNames.mlp_out(layer), self._hook(i))]
        return out


def _directions(
    model: Model, directions: Any, layers: Any
) -> tuple[tuple[int, ...], Float[Tensor, "layer d_model"]]:
    n = int(model.cfg.n_layers)
    if isinstance(directions, Mapping):
        if not directions:
            raise ValueError("directions is empty")
        keys = tuple(check_layer(model, la) for la in directions)
        chosen = keys if layers is None else layer_list(model, layers, what="layers")
        if missing := sorted(set(chosen) - set(keys)):
            raise ValueError(f"no direction given for layers {missing}; directions cover {sorted(keys)}")
        vecs = torch.stack([torch.as_tensor(directions[la]).detach().double().cpu() for la in chosen])
    else:
        t = torch.as_tensor(directions).detach().double().cpu()
        if t.ndim == 1:
            chosen = tuple(range(n)) if layers is None else layer_list(model, layers, what="layers")
            vecs = t.expand(len(chosen), -1)
        elif t.ndim == 2:
            chosen = tuple(range(n)) if layers is None else layer_list(model, layers, what="layers")
            if t.shape[0] != len(chosen):
                raise ValueError(f"{t.shape[0]} directions for {len(chosen)} layers {list(chosen)}")
            vecs = t
        else:
            raise ValueError(
                "directions must be [d_model], [layer, d_model] or {layer: [d_model]}, got "
                f"{tuple(t.shape)}"
            )
    validate.d_model_of(model, vecs.shape[-1], what="the direction")
    if not torch.isfinite(vecs).all():
        raise ValueError("a direction has NaN or inf entries")
    norms = vecs.norm(dim=-1, keepdim=True)
    if not bool((norms > 0).all()):
        raise ValueError("a direction is zero: there is nothing to project out")
    return chosen, (vecs / norms).contiguous()


def _weights(weight: Any, layers: tuple[int, ...]) -> Float[Tensor, " layer"]:
    if isinstance(weight, Mapping):
        if missing := sorted(set(layers) - set(weight)):
            raise ValueError(f"no weight for layers {missing}; weights cover {sorted(weight)}")
        values = [weight[la] for la in layers]
    elif isinstance(weight, (Sequence, Tensor)) and not isinstance(weight, str):
        values = (
            list(torch.as_tensor(weight).reshape(-1).tolist()) if torch.is_tensor(weight) else list(weight)
        )
        if len(values) != len(layers):
            raise ValueError(f"{len(values)} weights for {len(layers)} layers {list(layers)}")
    else:
        values = [weight] * len(layers)
    return torch.tensor([validate.finite_number("a weight", v) for v in values], dtype=torch.float64)


def make_ablation(
    model: Model,
    directions: Float[Tensor, " d_model"] | Float[Tensor, "layer d_model"] | Mapping[int, Tensor],
    *,
    layers: int | Sequence[int] | Literal["all"] | None = None,
    weight: float | Sequence[float] | Mapping[int, float] = 1.0,
    site: AblationPoint = "resid_post",
    start: int | Sequence[int] | Tensor = 0,
) -> DirectionalAblation:
    """Validate the settings and build a :class:`DirectionalAblation` (without installing it).

    See :func:`ablate_directions` for the arguments.
    """
    if site not in ABLATION_SITES:
        raise ValueError(f"unknown site {site!r}; valid: {list(ABLATION_SITES)}")
    chosen, vecs = _directions(model, directions, layers)
    starts = torch.as_tensor(start)
    if starts.is_floating_point() or starts.dtype == torch.bool:
        raise TypeError(f"start must be integer positions, got {start!r}")
    starts = starts.long().reshape(-1)
    if (starts < 0).any():
        raise ValueError(f"start positions must be >= 0, got {starts.tolist()}")
    return DirectionalAblation(
        layers=chosen,
        directions=vecs,
        weights=_weights(weight, chosen),
        site=site,
        starts=starts,
        n_layers=int(model.cfg.n_layers),
        tracker=tracker(model),
    )


@contextlib.contextmanager
def ablate_directions(
    model: Model,
    directions: Float[Tensor, " d_model"] | Float[Tensor, "layer d_model"] | Mapping[int, Tensor],
    *,
    layers: int | Sequence[int] | Literal["all"] | None = None,
    weight: float | Sequence[float] | Mapping[int, float] = 1.0,
    site: AblationPoint = "resid_post",
    start: int | Sequence[int] | Tensor = 0,
) -> Iterator[DirectionalAblation]:
    """Remove ``w (x . r) r`` from the residual stream at every listed layer (``r`` normalized to length 1).

    Args:
        directions: one ``[d_model]`` direction for every listed layer, ``[layer, d_model]`` one per listed
            layer, or ``{layer: [d_model]}`` (as :func:`difference_of_means` returns).
        layers: the blocks to ablate at; default every block (a shared direction or a full stack), or the
            mapping's keys.
        weight: one weight for all (the paper's default), or one per listed layer (a sequence, or a mapping
            ``{layer: w}`` for per-region weights). 1 removes the component; 0 is a no-op.
        site: ``"resid_post"`` (each block's output; applied after every hook at ``resid_post``, so after an
            injection at the same layer) or ``"writes"`` (attention and MLP outputs, and the embeddings when
            block 0 is listed).
        start: absolute positions (scalar or per row, after left padding, like ``inject``'s) from which to
            ablate; every position (and every generated token) by default.

    Composes with :func:`~mechintro.core.steering.inject`, feature interventions, :func:`bias_vector` and
    KV-cached generation (positions of a decoding step come from the KV cache).
    """
    ablation = make_ablation(model, directions, layers=layers, weight=weight, site=site, start=start)
    # from position 0 the edit is the same at every row and position; per-row starts are looked up by row
    rows = "tracked" if bool((ablation.starts > 0).any()) else "shared"
    with hooks_context(model, ablation.hooks, rows=rows):
        yield ablation
