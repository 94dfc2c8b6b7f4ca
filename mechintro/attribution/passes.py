"""Steering attribution: which dictionary features carry an injected concept vector to the model's answer.

The injection adds ``α v`` to resid_post of the injection layer from the injection start on
(:func:`mechintro.core.steering.inject`). ``L`` is the metric, read at one prompt position: by default the
Yes-No
logsumexp gap at the last prompt token (:func:`mechintro.core.readout.yes_no_gap`, the same token sets as the
DLA
target and the ``LogitJudge``); a token pair or a dictionary feature's pre-activation also works
(:class:`Metric`).

**One pass per chunk of rows.** The rows are (concept, strength) pairs. Each chunk runs one batched forward
in which ``α`` is a forward-mode dual number (tangent 1), so every activation carries ``∂/∂α`` (the JVP rides
along with the forward), then one backward pass from ``Σ_rows L`` to zero tensors added at every dictionary's
output site, which gives ``g = ∂L/∂y`` there. The prompt before the injection start is identical in every row
and has zero tangent, so it runs once and its KV cache is shared. The pass keeps dense tensors at every
dictionary site, only at positions ``t >= start`` (before the start every tangent is exactly 0): the input
``x``, its tangent ``ẋ``, the output tangent ``ẏ`` and the output gradient ``g``.

**Dictionaries afterwards, one site at a time** (so a lazy mapping never holds more than one 262k-wide
layer). For every feature ``f`` active at position ``t``::

    GA(f, t) = g[t] · W_dec[f]             what a unit of f's activation would do to L
    SG(f, t) = W_enc[:, f] · ẋ[t]           how fast the injection moves f's pre-activation (not gated)
    SA(f, t) = GA × SG

and for every (site, position) four terms, with ``ŷ̇`` the dictionary output's own tangent (a JVP of the
dictionary at ``x``)::

    total = g · ẏ     features = Σ_f SA     skip = g · (W_skip ẋ)     error = g · (ẏ - ŷ̇)

so ``total = features + skip + error`` (ReLU and JumpReLU activations move as their pre-activations while
active, and the affine skip path is linear). ``g`` is a *total* gradient: a path through several dictionaries
is counted at each of them, so these terms are **never summed across layers**.

**Integrated over strength.** ``ISA(f, t) = ∫ SA dα`` over the strength grid (default 21 points from 0 to the
model's default strength ``s*``), by the trapezoid or Simpson rule (:func:`quadrature_weights`). The strengths
are kept exactly as given, as floats, never as rounded names.

**Dictionary sites** (:class:`Site`): per-layer transcoders (``ln2.hook_out`` -> ``hook_mlp_out``, the
sae-lens JumpReLU skip transcoders that :func:`mechintro.core.transcoders.load_transcoders` wires), and any
sae-lens SAE with encode and decode at one hook: ``resid_post`` or ``attn_z`` (the concatenated heads
entering the attention output projection, :meth:`mechintro.core.models.HookNames.attn_z`).

Where this differs from the paper's released code: its capture hooks name module attributes that Gemma 3
decoder layers do not have; what they intend -- the transcoder's input and output, i.e. the MLP's
(pre-feedforward-norm) input and its (post-feedforward-norm) output -- is what is read here, through
:class:`mechintro.core.models.HookNames`. Its loop runs one forward, one JVP and one backward per strength and
per concept over the whole prompt; here one pass serves a chunk of (concept, strength) rows, and the
un-injected prefix runs once.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeAlias

import numpy as np
import pandas as pd
import torch
import torch.autograd.forward_ad as fwAD
from jaxtyping import Float
from torch import Tensor

from mechintro.core import kvcache, validate
from mechintro.core.concepts import check_concepts, concept_vectors
from mechintro.core.hooks import capture, check_layer, hooks_context
from mechintro.core.html import card
from mechintro.core.models import HookNames, Model, Transcoders, spec_for
from mechintro.core.progress import progress_bar
from mechintro.core.prompts import TrialPrompt, trial_prompt
from mechintro.core.readout import yes_no_gap
from mechintro.core.steering import inject

__all__ = [
    "DICTIONARY_KINDS",
    "INTEGRATIONS",
    "Metric",
    "Site",
    "SteeringAttribution",
    "dictionary_feature_name",
    "feature_metric",
    "parse_dictionary_feature",
    "quadrature_weights",
    "resolve_metric",
    "steering_attribution",
    "strength_grid",
    "token_metric",
]

DictionaryKind: TypeAlias = Literal["transcoder", "resid_post", "attn_z"]
Integration: TypeAlias = Literal["trapezoid", "simpson"]

DICTIONARY_KINDS: tuple[DictionaryKind, ...] = ("transcoder", "resid_post", "attn_z")
"""Where a dictionary can sit: a per-layer transcoder, or an SAE at resid_post or at the attention's z."""
INTEGRATIONS: tuple[Integration, ...] = ("trapezoid", "simpson")
"""Quadrature rules for integrating over the strength grid."""
DEFAULT_GRID_POINTS = 21
"""Points of the default strength grid, 0 .. s*."""
SUPPORTED_ARCHITECTURES = (
    "standard",
    "jumprelu",
    "transcoder",
    "skip_transcoder",
    "jumprelu_transcoder",
    "jumprelu_skip_transcoder",
)
"""sae-lens architectures whose activation moves as its pre-activation while active (ReLU, JumpReLU)."""
RUNTIME_NORMS = ("none", "expected_average_only_in")
"""``normalize_activations`` settings that are the identity at inference (sae-lens folds the second)."""
_STAGE = {"attn_z": 0, "transcoder": 1, "resid_post": 2}
"""Order of the sites within one block: attention, then the MLP, then the block's output."""
_PREFIX = {"transcoder": "", "resid_post": "resid ", "attn_z": "attn "}
_DICT_BUDGET = 2**25
"""Entries of one ``[positions, d_sae]`` working matrix when applying a dictionary (128 MiB in float32)."""


# ----------------------------------------------------------------------------------------------- sites


@dataclass(frozen=True)
class Site:
    """Where one dictionary sits: its kind and layer (hook names come from :class:`HookNames`)."""

    kind: DictionaryKind
    """``"transcoder"`` (reads ``ln2.hook_out``, writes ``hook_mlp_out``), ``"resid_post"`` or ``"attn_z"``
    (an SAE that encodes and decodes at one hook)."""
    layer: int
    """The block."""

    def __post_init__(self) -> None:
        if self.kind not in DICTIONARY_KINDS:
            raise ValueError(f"unknown dictionary kind {self.kind!r}; valid: {list(DICTIONARY_KINDS)}")

    @property
    def order(self) -> tuple[int, int]:
        """Sort key in computation order (attn_z < transcoder < resid_post within a block)."""
        return (self.layer, _STAGE[self.kind])

    @property
    def in_hook(self) -> str:
        """The hook the dictionary encodes from."""
        if self.kind == "transcoder":
            return HookNames.transcoder_in(self.layer)
        return self.out_hook

    @property
    def out_hook(self) -> str:
        """The hook the dictionary's output (its decoder rows) is written to."""
        if self.kind == "transcoder":
            return HookNames.transcoder_out(self.layer)
        if self.kind == "resid_post":
            return HookNames.resid_post(self.layer)
        return HookNames.attn_z(self.layer)

    def before(self, other: Site) -> bool:
        """Whether this site's output can reach ``other``'s input (strictly earlier in the forward pass)."""
        return self.order < other.order


def dictionary_feature_name(kind: str, layer: int, index: int) -> str:
    """``"L5 F12"`` for a transcoder feature, ``"resid L5 F12"`` / ``"attn L5 F12"`` for SAE features."""
    if kind not in _PREFIX:
        raise ValueError(f"unknown dictionary kind {kind!r}; valid: {list(DICTIONARY_KINDS)}")
    return f"{_PREFIX[kind]}L{int(layer)} F{int(index)}"


def parse_dictionary_feature(name: str) -> tuple[DictionaryKind, int, int]:
    """``(kind, layer, index)`` from :func:`dictionary_feature_name`'s format."""
    text = name.strip()
    kind: DictionaryKind = "transcoder"
    for k, prefix in _PREFIX.items():
        if prefix and text.startswith(prefix):
            kind, text = k, text[len(prefix) :]  # type: ignore[assignment]
    parts = text.split()
    if len(parts) != 2 or not parts[0][:1] == "L" or not parts[1][:1] == "F":
        raise ValueError(f"a feature name looks like 'L3 F12', 'resid L3 F12' or 'attn L3 F12', got {name!r}")
    try:
        return kind, int(parts[0][1:]), int(parts[1][1:])
    except ValueError:
        raise ValueError(f"a feature name looks like 'L3 F12', got {name!r}") from None


def _site_shape(model: Model, site: Site) -> tuple[int, ...]:
    if site.kind == "attn_z":
        return (int(model.cfg.n_heads), int(model.cfg.d_head))
    return (int(model.cfg.d_model),)


def _site_width(model: Model, site: Site) -> int:
    return int(np.prod(_site_shape(model, site)))


def _check_dictionary(model: Model, site: Site, d: Any) -> Any:
    """Raise unless ``d`` (a sae-lens SAE or transcoder) fits ``site`` of ``model``."""
    cfg = getattr(d, "cfg", None)
    if cfg is None or not hasattr(d, "W_enc") or not hasattr(d, "W_dec"):
        raise TypeError(f"the dictionary at {site} is not a sae-lens SAE/transcoder (got {type(d).__name__})")
    arch = str(cfg.architecture())
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"the dictionary at {site} has architecture {arch!r}; steering attribution supports "
            f"{list(SUPPORTED_ARCHITECTURES)}"
        )
    is_transcoder = "transcoder" in arch
    if is_transcoder != (site.kind == "transcoder"):
        raise ValueError(
            f"a {arch} cannot sit at a {site.kind} site: transcoders go in `transcoders`, SAEs in `saes`"
        )
    norm = str(getattr(cfg, "normalize_activations", "none"))
    if norm not in RUNTIME_NORMS:
        raise ValueError(
            f"the dictionary at {site} normalizes its input at run time ({norm!r}); "
            f"valid: {list(RUNTIME_NORMS)}"
        )
    if getattr(d, "use_error_term", False):
        raise ValueError(f"the SAE at {site} has use_error_term=True; load it without the error term")
    width = _site_width(model, site)
    d_out = int(getattr(cfg, "d_out", cfg.d_in))
    if int(cfg.d_in) != width or d_out != width:
        raise ValueError(
            f"the dictionary at {site} maps d_in={int(cfg.d_in)} -> {d_out}, but that site is {width} wide"
        )
    return d


class Dictionaries:
    """``{Site: dictionary}``, read one site at a time (a lazy transcoder mapping loads layers on use)."""

    def __init__(self, model: Model, transcoders: Mapping[int, Any] | None, saes: Any = None) -> None:
        self.model = model
        self._get: dict[Site, Callable[[], Any]] = {}
        for layer in transcoders or {}:
            layer = check_layer(model, layer)
            self._get[Site("transcoder", layer)] = lambda layer=layer: transcoders[layer]  # type: ignore[index]
        for site, sae in _sae_sites(model, saes).items():
            _check_dictionary(model, site, sae)
            self._get[site] = lambda sae=sae: sae
        if not self._get:
            raise ValueError("no dictionaries given: pass transcoders ({layer: transcoder}) and/or saes")

    @property
    def sites(self) -> list[Site]:
        return sorted(self._get, key=lambda s: s.order)

    def __contains__(self, site: Site) -> bool:
        return site in self._get

    def __getitem__(self, site: Site) -> Any:
        if site not in self._get:
            raise KeyError(f"no dictionary at {site}; dictionaries: {self.sites}")
        return _check_dictionary(self.model, site, self._get[site]())


def _sae_sites(model: Model, saes: Any) -> dict[Site, Any]:
    """SAEs keyed by :class:`Site`, ``(kind, layer)`` or hook name, or a list read from their metadata."""
    if saes is None:
        return {}
    if isinstance(saes, Mapping):
        items = list(saes.items())
    else:
        items = [(getattr(getattr(s, "cfg", None), "metadata", {}).get("hook_name"), s) for s in saes]
    out: dict[Site, Any] = {}
    for key, sae in items:
        site = _as_sae_site(model, key)
        if site in out:
            raise ValueError(f"two SAEs given for {site}")
        out[site] = sae
    return out


def _as_sae_site(model: Model, key: Any) -> Site:
    if isinstance(key, Site):
        site = key
    elif isinstance(key, tuple) and len(key) == 2:
        site = Site(key[0], check_layer(model, key[1]))
    elif isinstance(key, str):
        site = None
        for layer in range(int(model.cfg.n_layers)):
            if key == HookNames.resid_post(layer):
                site = Site("resid_post", layer)
            elif key in (HookNames.attn_z(layer), f"blocks.{layer}.attn.hook_z"):
                site = Site("attn_z", layer)
        if site is None:
            raise ValueError(
                f"an SAE at {key!r} cannot be used: SAE sites are resid_post "
                f"({HookNames.resid_post(0)!r}...) and attn_z ({HookNames.attn_z(0)!r} or "
                "'blocks.L.attn.hook_z', the heads before the output projection); pre-norm and "
                "post-norm attention outputs are not"
            )
    else:
        raise TypeError(f"an SAE key is a Site, a (kind, layer) pair or a hook name, got {key!r}")
    if site.kind == "transcoder":
        raise ValueError("SAE sites are 'resid_post' and 'attn_z'; transcoders go in `transcoders`")
    check_layer(model, site.layer)
    return site


# ----------------------------------------------------------------------------------------------- metric


@dataclass(frozen=True)
class Metric:
    """The scalar steering attribution explains, read at one prompt position."""

    kind: Literal["yes_no", "tokens", "feature"]
    """``"yes_no"``: logsumexp over the Yes ids minus over the No ids
    (:func:`mechintro.core.readout.yes_no_gap`);
    ``"tokens"``: the same gap for chosen token ids; ``"feature"``: a dictionary feature's pre-activation."""
    position: int = -1
    """Prompt position it is read at: absolute, or negative from the end (-1 = the last prompt token)."""
    positive: tuple[int, ...] = ()
    """Token ids on the plus side (yes_no, tokens)."""
    negative: tuple[int, ...] = ()
    """Token ids on the minus side (yes_no, tokens)."""
    site: Site | None = None
    """The feature's dictionary site (feature)."""
    index: int | None = None
    """The feature's index in its dictionary (feature)."""
    label: str = ""
    """A name for figures and exports."""

    def at(self, seq: int, start: int) -> Metric:
        """This metric with an absolute position inside a prompt of ``seq`` tokens injected from ``start``."""
        pos = self.position + seq if self.position < 0 else self.position
        if not 0 <= pos < seq:
            raise ValueError(f"metric position {self.position} is outside the prompt (0..{seq - 1})")
        if pos < start:
            raise ValueError(
                f"metric position {pos} is before the injection start {start}: the metric would not "
                "depend on the injection"
            )
        return Metric(self.kind, pos, self.positive, self.negative, self.site, self.index, self.label)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["site"] = None if self.site is None else [self.site.kind, self.site.layer]
        return out

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> Metric:
        site = data.get("site")
        return Metric(
            kind=data["kind"],
            position=int(data["position"]),
            positive=tuple(int(i) for i in data.get("positive", ())),
            negative=tuple(int(i) for i in data.get("negative", ())),
            site=None if site is None else Site(site[0], int(site[1])),
            index=None if data.get("index") is None else int(data["index"]),
            label=str(data.get("label", "")),
        )


def _token_id(model: Model, token: str | int) -> int:
    if isinstance(token, numbers.Integral) and not isinstance(token, bool):
        vocab = int(model.cfg.d_vocab)
        if not 0 <= int(token) < vocab:
            raise ValueError(f"token id {token} is outside the vocabulary 0..{vocab - 1}")
        return int(token)
    if not isinstance(token, str):
        raise TypeError(f"a metric token is a string or an id, got {token!r}")
    ids = model.tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{token!r} is {len(ids)} tokens, not one; pass a single token or its id")
    return int(ids[0])


def token_metric(model: Model, plus: str | int, minus: str | int, *, position: int = -1) -> Metric:
    """``logit(plus) - logit(minus)`` at ``position`` (each a single token: a string or an id)."""
    a, b = _token_id(model, plus), _token_id(model, minus)
    tok = model.tokenizer
    return Metric(
        "tokens",
        position,
        (a,),
        (b,),
        label=f"{tok.convert_ids_to_tokens(a)} − {tok.convert_ids_to_tokens(b)}",
    )


def feature_metric(feature: str | tuple[str, int, int] | tuple[int, int], *, position: int = -1) -> Metric:
    """The pre-activation of a dictionary feature (``"L5 F12"``, ``"resid L5 F3"``, ``(kind, layer, index)``
    or a transcoder ``(layer, index)``) at ``position``."""
    if isinstance(feature, str):
        kind, layer, index = parse_dictionary_feature(feature)
    elif len(feature) == 3:
        kind, layer, index = feature  # type: ignore[misc]
    else:
        kind, (layer, index) = "transcoder", feature  # type: ignore[misc]
    site = Site(kind, int(layer))
    return Metric(
        "feature",
        position,
        site=site,
        index=int(index),
        label=f"pre({dictionary_feature_name(kind, layer, index)})",
    )


def resolve_metric(model: Model, metric: Any = None) -> Metric:
    """A :class:`Metric` from ``None`` (the Yes-No gap), a ``(plus, minus)`` token pair, a feature name, or a
    :class:`Metric`."""
    if metric is None:
        spec = spec_for(model)
        return Metric("yes_no", -1, tuple(spec.yes_ids), tuple(spec.no_ids), label="Yes − No")
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str):
        return feature_metric(metric)
    if isinstance(metric, (tuple, list)) and len(metric) == 2:
        return token_metric(model, metric[0], metric[1])
    raise ValueError(
        f"unknown metric {metric!r}; valid: None (the Yes-No gap), a (plus, minus) token pair, a feature "
        "name like 'L5 F12', or a Metric"
    )


# ----------------------------------------------------------------------------------------------- strengths


def strength_grid(
    model: Model, n: int = DEFAULT_GRID_POINTS, *, top: float | None = None
) -> tuple[float, ...]:
    """``n`` evenly spaced strengths from 0 to ``top`` (default: the model's default strength ``s*``)."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 2:
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


def quadrature_weights(strengths: Sequence[float], rule: Integration = "trapezoid") -> np.ndarray:
    """Weights ``w`` with ``∫ f dα ≈ Σ_k w_k f(α_k)`` over ``[min, max]`` of the grid.

    ``"trapezoid"`` works on any increasing grid. ``"simpson"`` is composite Simpson (scipy's rule, which
    handles uneven spacing and an even number of points); its weights are read off by integrating the unit
    vectors, exact because the rule is linear in ``f``.
    """
    if rule not in INTEGRATIONS:
        raise ValueError(f"unknown integration {rule!r}; valid: {list(INTEGRATIONS)}")
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


# ----------------------------------------------------------------------------------------------- the pass


@dataclass
class Rows:
    """The rows of one batched pass (each its own vector, strength and metric)."""

    vectors: Float[Tensor, "rows d_model"]
    strengths: list[float]
    metrics: list[Metric]
    perturb: list[tuple[Site, int, Tensor]] | None = None
    """Forward hops: per row, (site, absolute position, direction), added at the site's output as
    ``τ · direction`` with ``τ = 0`` carrying tangent 1."""

    def __len__(self) -> int:
        return len(self.strengths)


@dataclass
class Captured:
    """Dense tensors of one pass at positions ``>= start``, ``[rows, positions, *site shape]``."""

    positions: list[int]
    """Absolute positions of the second axis."""
    value: Tensor
    """The metric ``L`` per row."""
    slope: Tensor | None = None
    """``dL/dα`` from the forward-mode tangent (α passes)."""
    reverse: Tensor | None = None
    """``dL/dα`` from the backward pass: ``Σ_{t >= start} v · ∂L/∂resid_post_inj[t]``."""
    x: dict[Site, Tensor] = field(default_factory=dict)
    """Dictionary inputs."""
    x_dot: dict[Site, Tensor] = field(default_factory=dict)
    """Their tangents (in α, or in τ for forward hops)."""
    y_dot: dict[Site, Tensor] = field(default_factory=dict)
    """Tangents of the dictionary output sites."""
    grad: dict[Site, Tensor] = field(default_factory=dict)
    """``∂L/∂y`` at the dictionary output sites."""


def model_dtype(model: Model) -> torch.dtype:
    return next(model.original_model.parameters()).dtype


def _primal(t: Tensor) -> Tensor:
    return fwAD.unpack_dual(t).primal


def _tangent(t: Tensor) -> Tensor:
    tangent = fwAD.unpack_dual(t).tangent
    return torch.zeros_like(_primal(t)) if tangent is None else tangent


def pre_activation(d: Any, x: Tensor, index: int | Tensor) -> Tensor:
    """Pre-activation(s) ``index`` of dictionary ``d`` at ``x``, keeping autograd and forward-mode tangents in
    ``x``. The encoder columns are copied out: the autograd graph never holds a whole 262k-wide encoder."""
    sae_in = d.process_sae_in(x.to(d.W_enc.dtype))
    return sae_in @ d.W_enc[:, index].detach().clone() + d.b_enc[index].detach().clone()


def dict_input(site: Site, d: Any, x: Tensor) -> Tensor:
    """``x`` in the shape ``d`` takes: attention SAEs take the heads flat unless they reshape hook_z."""
    if site.kind == "attn_z" and not getattr(d, "hook_z_reshaping_mode", False):
        return x.flatten(-2)
    return x


def _metric_values(
    model: Model, metrics: list[Metric], logits: Tensor | None, acts: Any, split: int, dicts: Dictionaries
) -> Tensor:
    first = metrics[0]
    if first.kind != "feature" and all(m == first for m in metrics):
        at = logits[:, first.position - split]
        if first.kind == "yes_no":
            return yes_no_gap(at, spec_for(model))
        pos = torch.tensor(first.positive, device=at.device)
        neg = torch.tensor(first.negative, device=at.device)
        return at.index_select(-1, pos).logsumexp(-1) - at.index_select(-1, neg).logsumexp(-1)
    values: list[Tensor | None] = [None] * len(metrics)
    for site in {m.site for m in metrics if m.kind == "feature"}:  # one dictionary at a time
        d = dicts[site]
        for r, m in enumerate(metrics):
            if m.kind == "feature" and m.site == site:
                values[r] = pre_activation(
                    d, dict_input(site, d, acts[site.in_hook][r, m.position - split]), m.index
                )
        del d
    for r, m in enumerate(metrics):
        if m.kind != "feature":
            at = logits[r, m.position - split]
            values[r] = at[list(m.positive)].logsumexp(-1) - at[list(m.negative)].logsumexp(-1)
    return torch.stack(values)


def _perturb_hooks(model: Model, rows: Rows, split: int, tau: Tensor) -> list[tuple[str, Any]]:
    """Forward hops: add ``τ_r · direction_r`` at row ``r``'s (site output, position)."""
    by_hook: dict[str, list[int]] = {}
    for r, (site, _, _) in enumerate(rows.perturb or []):
        by_hook.setdefault(site.out_hook, []).append(r)

    def make(members: list[int]) -> Callable:
        def hook(y: Tensor, hook: Any = None) -> Tensor:
            delta = torch.zeros(y.shape, dtype=y.dtype, device=y.device)
            for r in members:
                _, pos, direction = rows.perturb[r]
                delta[r, pos - split] = direction.to(device=y.device, dtype=y.dtype).reshape(y.shape[2:])
            return y + tau.to(y.dtype).reshape(-1, *([1] * (y.ndim - 1))) * delta

        return hook

    return [(name, make(members)) for name, members in by_hook.items()]


def run_pass(
    model: Model,
    prompt: TrialPrompt,
    rows: Rows,
    *,
    layer: int,
    sites: Sequence[Site],
    dicts: Dictionaries,
    tangent: Literal["alpha", "perturb"] | None,
    backward: bool,
    prefix_cache: bool = True,
    read_from: int | None = None,
) -> Captured:
    """One batched pass over ``rows``: a forward carrying a forward-mode tangent (in the strength α, or in the
    forward-hop perturbation τ), then optionally one backward from ``Σ_rows L`` to every site's output.

    Reads ``sites`` (inputs and output tangents when ``tangent``; output gradients when ``backward``) at
    positions ``>= prompt.injection_start``. With ``prefix_cache`` the prompt before the injection start runs
    once (one row, no tangent, no gradient) and its KV cache is shared by every row: exact, since nothing
    before the start depends on α. ``read_from`` keeps earlier positions too (without the prefix cache; for
    checking that their tangents are exactly 0).
    """
    device, dtype = model.cfg.device, model_dtype(model)
    start, seq, n = prompt.injection_start, len(prompt.tokens), len(rows)
    split = start if prefix_cache else 0
    read_from = start if read_from is None else int(read_from)
    if not split <= read_from <= start:
        raise ValueError(f"read_from must lie in {split}..{start} (the prefix cache covers 0..{split - 1})")
    metric_sites = {m.site for m in rows.metrics if m.kind == "feature"}
    logit_metric = any(m.kind != "feature" for m in rows.metrics)
    read_sites = sorted(set(sites) | metric_sites, key=lambda s: s.order)
    stop = None if logit_metric else max(s.layer for s in read_sites) + 1
    kw: dict[str, Any] = {}
    if split > 0:
        with torch.no_grad():
            cache = kvcache.prefill(model, prompt.tokens[None, :split].to(device))
            cache.batch_repeat_interleave(n)
            kw = kvcache.cache_kwargs(model, cache)
    tokens = prompt.tokens[None, split:].expand(n, -1).to(device)
    keep = read_from - split
    resid_inj = HookNames.resid_post(layer)
    zero_names = list(dict.fromkeys([resid_inj, *(s.out_hook for s in sites)])) if backward else []
    read_names = list(dict.fromkeys([s.in_hook for s in read_sites] + [s.out_hook for s in sites]))
    zeros: dict[str, Tensor] = {}

    def add_zero(name: str) -> Callable:
        def hook(y: Tensor, hook: Any = None) -> Tensor:
            zeros[name] = torch.zeros(y.shape, dtype=y.dtype, device=y.device, requires_grad=True)
            return y + zeros[name]

        return hook

    strengths = torch.tensor(rows.strengths, dtype=dtype, device=device)
    vectors = rows.vectors.to(device=device, dtype=dtype)
    with fwAD.dual_level() if tangent else contextlib.nullcontext():
        perturb: list[tuple[str, Any]] = []
        if tangent == "alpha":
            strengths = fwAD.make_dual(strengths, torch.ones_like(strengths))
        elif tangent == "perturb":
            tau = fwAD.make_dual(torch.zeros_like(strengths), torch.ones_like(strengths))
            perturb = _perturb_hooks(model, rows, split, tau)
        with (
            torch.enable_grad() if backward else torch.no_grad(),
            inject(model, vectors, layer=layer, strength=strengths, start=start),
            hooks_context(model, [(name, add_zero(name)) for name in zero_names]),
            capture(model, read_names, detach=False) as acts,
            hooks_context(model, perturb),  # after the reads: a feature's output does not feed its own input
        ):
            out = model(tokens, stop_at_layer=stop, **kw)
            value = _metric_values(model, rows.metrics, out if logit_metric else None, acts, split, dicts)
        got = Captured(positions=list(range(read_from, seq)), value=_primal(value).detach())
        objective = _primal(value).sum()
        if tangent:
            got.slope = _tangent(value).detach()
        for site in sites:
            got.x[site] = _primal(acts[site.in_hook][:, keep:]).detach()
            if tangent:
                got.x_dot[site] = _tangent(acts[site.in_hook][:, keep:]).detach()
                got.y_dot[site] = _tangent(acts[site.out_hook][:, keep:]).detach()
    if backward:
        names = list(zeros)
        grads = torch.autograd.grad(objective, [zeros[k] for k in names], allow_unused=True)
        by_name = {
            k: torch.zeros_like(zeros[k]) if g is None else g for k, g in zip(names, grads, strict=True)
        }
        for site in sites:
            got.grad[site] = by_name[site.out_hook][:, keep:].detach()
        g_inj = by_name[resid_inj][:, start - split :]  # the injection is applied from the start on
        got.reverse = (g_inj * vectors[:, None, :]).sum((1, 2)).detach()
    return got


# ----------------------------------------------------------------------------------------------- dictionaries


def reconstruct(site: Site, d: Any, x: Tensor) -> Tensor:
    """The dictionary's output at ``x`` (``[n, ...]``), as ``[n, width]``: a transcoder's prediction (its skip
    path included), or an SAE's reconstruction."""
    out = d(x) if site.kind == "transcoder" else d.decode(d.encode(x))
    return out.reshape(len(x), -1)


def site_terms(site: Site, d: Any, got: Captured) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Apply one dictionary to one pass: per active feature (row, position, index, activation, ga, sg) and
    per (row, position) the four terms."""
    x, x_dot, y_dot, grad = got.x[site], got.x_dot[site], got.y_dot[site], got.grad[site]
    n_rows, n_pos = x.shape[:2]
    n = n_rows * n_pos
    dt = d.W_enc.dtype
    dev = d.W_enc.device
    xin = dict_input(site, d, x.to(dev, dt))
    xin = xin.reshape(n, *xin.shape[2:])
    xin_dot = dict_input(site, d, x_dot.to(dev, dt))
    xin_dot = xin_dot.reshape(n, *xin_dot.shape[2:])
    g = grad.to(dev, dt).reshape(n, -1)
    yd = y_dot.to(dev, dt).reshape(n, -1)
    xd_flat = x_dot.to(dev, dt).reshape(n, -1)
    w_skip = getattr(d, "W_skip", None)
    d_sae = int(d.cfg.d_sae)
    feats: dict[str, list[Tensor]] = {k: [] for k in ("row", "index", "activation", "ga", "sg")}
    terms: dict[str, list[Tensor]] = {k: [] for k in ("total", "features", "skip", "error")}
    step = max(1, _DICT_BUDGET // d_sae)
    with torch.no_grad():
        for i in range(0, n, step):
            xi, xdi, gi, ydi = xin[i : i + step], xin_dot[i : i + step], g[i : i + step], yd[i : i + step]
            _, sae_in_dot = torch.func.jvp(d.process_sae_in, (xi,), (xdi,))
            sae_in_dot = sae_in_dot.reshape(len(xi), -1)
            acts = d.encode(xi).reshape(len(xi), d_sae)
            _, out_dot = torch.func.jvp(lambda t: reconstruct(site, d, t), (xi,), (xdi,))
            out_dot = out_dot.reshape(len(xi), -1)
            rows, index = acts.nonzero(as_tuple=True)
            ga = (gi[rows] * d.W_dec[index]).sum(-1)
            sg = (sae_in_dot[rows] * d.W_enc[:, index].T).sum(-1)
            feats["row"].append(rows + i)
            feats["index"].append(index)
            feats["activation"].append(acts[rows, index])
            feats["ga"].append(ga)
            feats["sg"].append(sg)
            terms["total"].append((gi * ydi).sum(-1))
            terms["features"].append(
                torch.zeros(len(xi), dtype=dt, device=xi.device).index_add_(0, rows, ga * sg)
            )
            skip = torch.zeros(len(xi), dtype=dt, device=xi.device)
            if w_skip is not None:
                skip = (gi * (xd_flat[i : i + step] @ w_skip.T)).sum(-1)
            terms["skip"].append(skip)
            terms["error"].append((gi * (ydi - out_dot)).sum(-1))
    as_np = lambda parts: torch.cat(parts).detach().cpu().double().numpy()  # noqa: E731
    f = {k: torch.cat(v).cpu().numpy() for k, v in feats.items() if k in ("row", "index")}
    f |= {k: as_np(v) for k, v in feats.items() if k not in ("row", "index")}
    return f, {k: as_np(v) for k, v in terms.items()}


# ----------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class AttributionSettings:
    """What a :class:`SteeringAttribution` was computed with."""

    model: str
    """The model's name (its spec)."""
    concepts: tuple[str, ...]
    """The concepts, in row order."""
    strengths: tuple[float, ...]
    """The strength grid, exactly as used."""
    integration: Integration
    """The quadrature rule over the grid."""
    layer: int
    """The injection layer (resid_post)."""
    start: int
    """The injection start (absolute prompt position)."""
    trial: int
    """The trial number of the prompt."""
    variant: str
    """The prompt variant."""
    metric: Metric
    """What is attributed (with its absolute position)."""
    sites: tuple[Site, ...]
    """The dictionary sites, in computation order."""
    prompt_tokens: tuple[int, ...]
    """The prompt's token ids."""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["metric"] = self.metric.to_dict()
        out["sites"] = [[s.kind, s.layer] for s in self.sites]
        return out

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> AttributionSettings:
        return AttributionSettings(
            model=str(data["model"]),
            concepts=tuple(data["concepts"]),
            strengths=tuple(float(s) for s in data["strengths"]),
            integration=data["integration"],
            layer=int(data["layer"]),
            start=int(data["start"]),
            trial=int(data["trial"]),
            variant=str(data["variant"]),
            metric=Metric.from_dict(data["metric"]),
            sites=tuple(Site(k, int(la)) for k, la in data["sites"]),
            prompt_tokens=tuple(int(t) for t in data["prompt_tokens"]),
        )


FEATURE_COLUMNS = [
    "concept",
    "strength",
    "dictionary",
    "layer",
    "position",
    "feature",
    "activation",
    "ga",
    "sg",
    "sa",
]
REMAINDER_COLUMNS = [
    "concept",
    "strength",
    "dictionary",
    "layer",
    "position",
    "total",
    "features",
    "skip",
    "error",
    "sa_remainder",
]
METRIC_COLUMNS = ["concept", "strength", "value", "slope", "slope_reverse"]
_KEY = ["concept", "dictionary", "layer", "position", "feature"]


@dataclass
class SteeringAttribution:
    """Steering attribution of one metric over (concept, strength) rows: sparse tidy frames.

    * ``features``: one row per (concept, strength, dictionary, layer, position, feature) **active** there:
      activation, ``ga``, ``sg``, ``sa = ga × sg``.
    * ``remainders``: one row per (concept, strength, dictionary, layer, position): ``total = g·ẏ``,
      ``features = Σ sa``, ``skip``, ``error`` (``total = features + skip + error``) and
      ``sa_remainder = total - features``. Never sum these across layers (``g`` is a total gradient).
    * ``metric``: per (concept, strength): the metric ``value``, its ``slope`` dL/dα from the forward-mode
      tangent and ``slope_reverse`` from the backward pass.
    """

    features: pd.DataFrame
    remainders: pd.DataFrame
    metric: pd.DataFrame
    settings: AttributionSettings
    vectors: Float[Tensor, "concept d_model"] = field(repr=False)
    """The injected concept vectors (float32, CPU), one per concept."""

    @property
    def weights(self) -> dict[float, float]:
        """Quadrature weight of every grid strength (keyed by the exact strength)."""
        w = quadrature_weights(self.settings.strengths, self.settings.integration)
        return dict(zip(self.settings.strengths, w.tolist(), strict=True))

    def integrate(self, frame: pd.DataFrame, columns: Sequence[str], by: Sequence[str]) -> pd.DataFrame:
        """``Σ_k w_k frame[column]`` over the strength grid, grouped by ``by`` (absent rows count as 0)."""
        w = frame["strength"].map(self.weights)
        if w.isna().any():
            bad = sorted(set(frame.loc[w.isna(), "strength"]))[:5]
            raise ValueError(f"strengths {bad} are not on the grid {list(self.settings.strengths)}")
        weighted = frame[list(by)].copy()
        for column in columns:
            weighted[column] = frame[column].to_numpy(dtype=np.float64) * w.to_numpy()
        return weighted.groupby(list(by), sort=False, as_index=False)[list(columns)].sum()

    def isa(self) -> pd.DataFrame:
        """Integrated steering attribution per feature and position: concept, dictionary, layer, position,
        feature, name, isa, n_active (grid points where the feature is active); ranked by isa per concept."""
        df = self.features
        if df.empty:
            return pd.DataFrame(columns=[*_KEY, "name", "isa", "n_active"])
        out = self.integrate(df, ["sa"], _KEY).rename(columns={"sa": "isa"})
        out["n_active"] = df.groupby(_KEY, sort=False).size().to_numpy()
        out.insert(
            5,
            "name",
            [
                dictionary_feature_name(k, la, i)
                for k, la, i in out[["dictionary", "layer", "feature"]].itertuples(index=False)
            ],
        )
        order = {c: i for i, c in enumerate(self.settings.concepts)}
        out = out.assign(_c=out["concept"].map(order)).sort_values(["_c", "isa"], ascending=[True, False])
        return out.drop(columns="_c").reset_index(drop=True)

    def top(self, n: int = 10) -> pd.DataFrame:
        """The ``n`` features with the largest |ISA| per concept (from :meth:`isa`), largest first."""
        isa = self.isa()
        order = isa["isa"].abs().groupby(isa["concept"], sort=False).rank(ascending=False, method="first")
        concepts = {c: i for i, c in enumerate(isa["concept"].unique())}
        out = isa.assign(_r=order, _c=isa["concept"].map(concepts))[order <= n]
        return out.sort_values(["_c", "_r"]).drop(columns=["_r", "_c"]).reset_index(drop=True)

    def _repr_html_(self) -> str:
        s = self.settings
        facts = {
            "model": s.model,
            "concepts": list(s.concepts),
            "strengths": list(s.strengths),
            "integration": s.integration,
            "injection": f"layer {s.layer} from position {s.start}",
            "metric": s.metric.label or s.metric.kind,
            "dictionaries": [f"{site.kind} L{site.layer}" for site in s.sites],
        }
        return card(
            "SteeringAttribution",
            facts,
            [("metric per (concept, strength)", self.metric), ("top features by |ISA|", self.top(5))],
        )

    def integrated_remainders(self) -> pd.DataFrame:
        """``∫ total``, ``∫ features``, ``∫ skip``, ``∫ error`` per (concept, dictionary, layer, position)."""
        cols = ["total", "features", "skip", "error"]
        return self.integrate(self.remainders, cols, ["concept", "dictionary", "layer", "position"])

    def layer_shares(self, kept: pd.DataFrame | None = None) -> pd.DataFrame:
        """Per (concept, dictionary, layer): the integrated terms summed over positions, and how much of the
        layer's total the ``kept`` features explain: ``explained = Σ_kept ISA / ∫ total``.

        ``kept``: rows with concept, dictionary, layer, position, feature (e.g. a graph's feature nodes);
        default every active feature (then ``kept_isa`` is ``∫ features``). Never add these across layers.
        """
        by = ["concept", "dictionary", "layer"]
        terms = self.integrate(self.remainders, ["total", "features", "skip", "error"], by)
        isa = self.isa()
        if kept is not None:
            isa = isa.merge(kept[_KEY].drop_duplicates(), on=_KEY, how="inner")
        kept_isa = isa.groupby(by, as_index=False)["isa"].sum().rename(columns={"isa": "kept_isa"})
        out = terms.merge(kept_isa, on=by, how="left").fillna({"kept_isa": 0.0})
        with np.errstate(divide="ignore", invalid="ignore"):
            out["explained"] = np.where(out["total"] != 0, out["kept_isa"] / out["total"], np.nan)
        return out

    # ------------------------------------------------------------------------------------------ files

    def to_parquet(self, folder: str | Path) -> list[Path]:
        """Write the three frames as parquet, the settings as JSON and the vectors as ``.npy``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for name in ("features", "remainders", "metric"):
            path = folder / f"attribution_{name}.parquet"
            getattr(self, name).to_parquet(path, index=False)
            paths.append(path)
        path = folder / "attribution_settings.json"
        path.write_text(json.dumps(self.settings.to_dict(), indent=1))
        np.save(folder / "attribution_vectors.npy", self.vectors.numpy())
        return [*paths, path, folder / "attribution_vectors.npy"]

    @classmethod
    def from_parquet(cls, folder: str | Path) -> SteeringAttribution:
        """Read what :meth:`to_parquet` wrote."""
        folder = Path(folder)
        frames = {
            n: pd.read_parquet(folder / f"attribution_{n}.parquet")
            for n in ("features", "remainders", "metric")
        }
        settings = AttributionSettings.from_dict(
            json.loads((folder / "attribution_settings.json").read_text())
        )
        vectors = torch.from_numpy(np.load(folder / "attribution_vectors.npy"))
        return cls(settings=settings, vectors=vectors, **frames)


# ----------------------------------------------------------------------------------------------- entry point


def _check_vectors(model: Model, vectors: Any, concepts: Sequence[str]) -> Tensor:
    vectors = torch.as_tensor(vectors).detach().float().cpu()
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or vectors.shape[0] != len(concepts):
        raise ValueError(f"vectors must be [concept={len(concepts)}, d_model], got {tuple(vectors.shape)}")
    validate.d_model_of(model, vectors.shape[1], what="the concept vector")
    if not torch.isfinite(vectors).all():
        raise ValueError("the concept vectors have NaN or inf entries")
    return vectors


def attribution_sites(dicts: Dictionaries, *, layer: int, metric: Metric) -> list[Site]:
    """The sites the injection reaches (after the injection layer's resid_post) that reach the metric."""
    sites = [s for s in dicts.sites if s.order > (layer, _STAGE["transcoder"])]
    if metric.kind == "feature":
        sites = [s for s in sites if s.before(metric.site)]
    if not sites:
        raise ValueError(
            f"no dictionary between the injection (resid_post of layer {layer}) and the metric: dictionaries "
            f"are at {dicts.sites}"
        )
    return sites


def check_metric(model: Model, metric: Metric, dicts: Dictionaries, *, layer: int) -> Metric:
    """Raise unless a feature metric names a loaded dictionary feature after the injection."""
    if metric.kind != "feature":
        for token in (*metric.positive, *metric.negative):
            _token_id(model, token)
        if not metric.positive or not metric.negative:
            raise ValueError("a token metric needs token ids on both sides")
        return metric
    if metric.site not in dicts:
        raise ValueError(
            f"the metric's feature is at {metric.site}, which has no dictionary; loaded: {dicts.sites}"
        )
    d_sae = int(dicts[metric.site].cfg.d_sae)
    if not 0 <= int(metric.index) < d_sae:
        raise ValueError(f"feature index {metric.index} is outside 0..{d_sae - 1} of {metric.site}")
    if metric.site.order <= (layer, _STAGE["transcoder"]):
        raise ValueError(f"the metric's feature at {metric.site} is not after the injection (layer {layer})")
    return metric


def merge_attributions(parts: Sequence[SteeringAttribution]) -> SteeringAttribution:
    """One :class:`SteeringAttribution` from parts over disjoint concepts (e.g. shards run on several
    workers),
    concepts in the parts' order. Every other setting (strengths, metric, dictionaries, prompt...) must
    agree: rows of different settings are not comparable, and merging them raises."""
    parts = list(parts)
    if not parts:
        raise ValueError("nothing to merge: no attribution parts")
    first = parts[0].settings
    for part in parts[1:]:
        mine, theirs = asdict(first), asdict(part.settings)
        differ = sorted(k for k in mine if k != "concepts" and mine[k] != theirs[k])
        if differ:
            raise ValueError(f"attribution parts differ in {differ}; only parts over other concepts merge")
    concepts = [c for part in parts for c in part.settings.concepts]
    repeated = sorted({c for c in concepts if concepts.count(c) > 1})
    if repeated:
        raise ValueError(f"concepts in more than one part: {repeated}")

    def cat(name: str) -> pd.DataFrame:
        return pd.concat([getattr(part, name) for part in parts], ignore_index=True)

    return SteeringAttribution(
        features=cat("features"),
        remainders=cat("remainders"),
        metric=cat("metric"),
        settings=replace(first, concepts=tuple(concepts)),
        vectors=torch.cat([part.vectors for part in parts]),
    )


def steering_attribution(
    model: Model,
    transcoders: Transcoders | None,
    concepts: Sequence[str] | str,
    *,
    strengths: Sequence[float] | Tensor | None = None,
    metric: Any = None,
    saes: Any = None,
    integration: Integration = "trapezoid",
    layer: int | None = None,
    vectors: Float[Tensor, "concept d_model"] | None = None,
    trial: int = 1,
    variant: str = "original",
    batch_size: int = 32,
    prefix_cache: bool = True,
    progress: bool = True,
) -> SteeringAttribution:
    """Steering attribution of ``metric`` to every dictionary feature, for each concept over a strength grid.

    Args:
        transcoders: ``{layer: transcoder}`` (as :func:`mechintro.core.transcoders.load_transcoders` returns;
            a ``lazy=True`` mapping is read one layer at a time), or None with ``saes`` only.
        concepts: concept words (one row block each).
        strengths: the grid, strictly increasing (default :func:`strength_grid`: 21 points from 0 to the
            model's strength ``s*``); kept exactly as given.
        metric: None (the Yes-No gap at the last prompt token), a ``(plus, minus)`` token pair, a feature name
            (``"L5 F12"``: its pre-activation), or a :class:`Metric`.
        saes: sae-lens SAEs at ``resid_post`` or ``attn_z``: ``{(kind, layer) | hook name: sae}``, or a list
            whose ``cfg.metadata.hook_name`` says where each sits.
        integration: ``"trapezoid"`` or ``"simpson"`` (:func:`quadrature_weights`).
        layer: the injection layer (default: the model's); dictionaries before it are skipped.
        vectors: ``[concept, d_model]`` concept vectors (default:
            :func:`mechintro.core.concepts.concept_vectors`).
        trial / variant: the trial prompt.
        batch_size: (concept, strength) rows per pass (results do not depend on it).
        prefix_cache: share the un-injected prefix's KV cache across rows (exact).
        progress: show a progress bar over the (concept, strength) rows.

    Returns a :class:`SteeringAttribution`.
    """
    spec = spec_for(model)
    layer = spec.injection_layer if layer is None else check_layer(model, layer)
    concepts = check_concepts([concepts] if isinstance(concepts, str) else concepts)
    grid = strength_grid(model) if strengths is None else check_grid(strengths)
    quadrature_weights(grid, integration)  # validates the rule against the grid
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    dicts = Dictionaries(model, transcoders, saes)
    prompt = trial_prompt(model, trial=trial, variant=variant)
    target = check_metric(
        model,
        resolve_metric(model, metric).at(len(prompt.tokens), prompt.injection_start),
        dicts,
        layer=layer,
    )
    sites = attribution_sites(dicts, layer=layer, metric=target)
    if vectors is None:
        vectors = concept_vectors(model, concepts, layer=layer)
    vectors = _check_vectors(model, vectors, concepts)

    pairs = [(c, s) for c in range(len(concepts)) for s in range(len(grid))]
    feature_parts: list[pd.DataFrame] = []
    remainder_parts: list[pd.DataFrame] = []
    metric_parts: list[pd.DataFrame] = []
    bar = progress_bar(total=len(pairs), desc="steering attribution", unit="row", enabled=progress)
    for begin in range(0, len(pairs), batch_size):
        chunk = pairs[begin : begin + batch_size]
        row_concept = np.array([concepts[c] for c, _ in chunk], dtype=object)
        row_strength = np.array([grid[s] for _, s in chunk], dtype=np.float64)
        rows = Rows(
            vectors=vectors[[c for c, _ in chunk]],
            strengths=[grid[s] for _, s in chunk],
            metrics=[target] * len(chunk),
        )
        got = run_pass(
            model,
            prompt,
            rows,
            layer=layer,
            sites=sites,
            dicts=dicts,
            tangent="alpha",
            backward=True,
            prefix_cache=prefix_cache,
        )
        metric_parts.append(
            pd.DataFrame(
                {
                    "concept": row_concept,
                    "strength": row_strength,
                    "value": got.value.cpu().double().numpy(),
                    "slope": got.slope.cpu().double().numpy(),
                    "slope_reverse": got.reverse.cpu().double().numpy(),
                }
            )
        )
        positions = np.asarray(got.positions)
        n_pos = len(positions)
        for site in sites:  # one dictionary at a time
            f, t = site_terms(site, dicts[site], got)
            row, pos = f["row"] // n_pos, f["row"] % n_pos
            feature_parts.append(
                pd.DataFrame(
                    {
                        "concept": row_concept[row],
                        "strength": row_strength[row],
                        "dictionary": site.kind,
                        "layer": site.layer,
                        "position": positions[pos],
                        "feature": f["index"].astype(np.int64),
                        "activation": f["activation"],
                        "ga": f["ga"],
                        "sg": f["sg"],
                        "sa": f["ga"] * f["sg"],
                    }
                )
            )
            flat = np.arange(len(chunk) * n_pos)
            remainder_parts.append(
                pd.DataFrame(
                    {
                        "concept": row_concept[flat // n_pos],
                        "strength": row_strength[flat // n_pos],
                        "dictionary": site.kind,
                        "layer": site.layer,
                        "position": positions[flat % n_pos],
                        **t,
                        "sa_remainder": t["total"] - t["features"],
                    }
                )
            )
        del got
        bar.update(len(chunk))
    bar.close()
    settings = AttributionSettings(
        model=spec.name,
        concepts=tuple(concepts),
        strengths=grid,
        integration=integration,
        layer=layer,
        start=prompt.injection_start,
        trial=trial,
        variant=variant,
        metric=target,
        sites=tuple(sites),
        prompt_tokens=tuple(int(t) for t in prompt.tokens.tolist()),
    )
    return SteeringAttribution(
        features=_concat(feature_parts, FEATURE_COLUMNS),
        remainders=_concat(remainder_parts, REMAINDER_COLUMNS),
        metric=_concat(metric_parts, METRIC_COLUMNS),
        settings=settings,
        vectors=vectors,
    )


def _concat(parts: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame(columns=columns)
    return pd.concat(parts, ignore_index=True)[columns]
