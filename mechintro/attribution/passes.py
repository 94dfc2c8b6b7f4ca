"""Steering attribution: which dictionary features carry an injected concept vector to the model's answer.

The injection adds ``α v`` to resid_post of the injection layer from the injection start on
(:func:`mechintro.core.steering.inject`). ``L`` is the metric, read at one prompt position: by default the
Yes-No logsumexp gap at the last prompt token (:func:`mechintro.core.readout.yes_no_gap`, the same token sets
as the DLA target and the ``LogitJudge``); a token pair or a dictionary feature's pre-activation also works
(:class:`mechintro.attribution.metric.Metric`).

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
model's default strength ``s*``), by the trapezoid or Simpson rule
(:func:`mechintro.attribution.strengths.quadrature_weights`). The strengths are kept exactly as given, as
floats, never as rounded names.

**Dictionary sites** (:class:`mechintro.attribution.sites.DictionarySite`): per-layer transcoders
(the MLP's input -> ``hook_mlp_out``, named by the model's family's :class:`mechintro.core.models.HookNames`;
the sae-lens JumpReLU skip transcoders that :func:`mechintro.core.transcoders.load_transcoders` wires), and
any sae-lens SAE with encode and decode at one hook: ``resid_post`` or ``attn_z`` (the concatenated heads
entering the attention output projection, :meth:`mechintro.core.models.HookNames.attn_z`).

Where this differs from the paper's released code: its capture hooks name module attributes that Gemma 3
decoder layers do not have; what they intend -- the transcoder's input and output, i.e. the MLP's
(pre-feedforward-norm) input and its (post-feedforward-norm) output -- is what is read here, through
:class:`mechintro.core.models.HookNames`. Its loop runs one forward, one JVP and one backward per strength and
per concept over the whole prompt; here one pass serves a chunk of (concept, strength) rows, and the
un-injected prefix runs once.

The settings are an :class:`mechintro.attribution.config.AttributionConfig`; the result is a
:class:`mechintro.attribution.result.SteeringAttribution`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.autograd.forward_ad as fwAD
from jaxtyping import Float
from torch import Tensor

from mechintro.attribution.config import AttributionConfig, config_with
from mechintro.attribution.metric import Metric, check_metric, resolve_metric
from mechintro.attribution.result import (
    FEATURE_COLUMNS,
    METRIC_COLUMNS,
    REMAINDER_COLUMNS,
    AttributionSettings,
    SteeringAttribution,
)
from mechintro.attribution.sites import Dictionaries, DictionarySite, dict_input, pre_activation, reconstruct
from mechintro.attribution.strengths import quadrature_weights, strength_grid
from mechintro.core import kvcache, validate
from mechintro.core.concepts import check_concepts, concept_vectors
from mechintro.core.hooks import capture, check_layer, hooks_context
from mechintro.core.models import Model, Transcoders, hook_names, spec_for
from mechintro.core.progress import progress_bar
from mechintro.core.prompts import TrialPrompt, trial_prompt
from mechintro.core.readout import yes_no_gap
from mechintro.core.steering import inject

__all__ = ["PassTensors", "Rows", "attribution_sites", "run_pass", "site_terms", "steering_attribution"]

_DICT_BUDGET = 2**25
"""Entries of one ``[positions, d_sae]`` working matrix when applying a dictionary (128 MiB in float32)."""


# ----------------------------------------------------------------------------------------------- the pass


@dataclass
class Rows:
    """The rows of one batched pass (each its own vector, strength and metric)."""

    vectors: Float[Tensor, "rows d_model"]
    strengths: list[float]
    metrics: list[Metric]
    perturb: list[tuple[DictionarySite, int, Tensor]] | None = None
    """Forward hops: per row, (site, absolute position, direction), added at the site's output as
    ``τ · direction`` with ``τ = 0`` carrying tangent 1."""

    def __len__(self) -> int:
        return len(self.strengths)


@dataclass
class PassTensors:
    """Dense tensors of one pass at positions ``>= start``, ``[rows, positions, *site shape]``."""

    positions: list[int]
    """Absolute positions of the second axis."""
    value: Tensor
    """The metric ``L`` per row."""
    slope: Tensor | None = None
    """``dL/dα`` from the forward-mode tangent (α passes)."""
    reverse: Tensor | None = None
    """``dL/dα`` from the backward pass: ``Σ_{t >= start} v · ∂L/∂resid_post_inj[t]``."""
    x: dict[DictionarySite, Tensor] = field(default_factory=dict)
    """Dictionary inputs."""
    x_dot: dict[DictionarySite, Tensor] = field(default_factory=dict)
    """Their tangents (in α, or in τ for forward hops)."""
    y_dot: dict[DictionarySite, Tensor] = field(default_factory=dict)
    """Tangents of the dictionary output sites."""
    grad: dict[DictionarySite, Tensor] = field(default_factory=dict)
    """``∂L/∂y`` at the dictionary output sites."""


def model_dtype(model: Model) -> torch.dtype:
    return next(model.original_model.parameters()).dtype


def _primal(t: Tensor) -> Tensor:
    return fwAD.unpack_dual(t).primal


def _tangent(t: Tensor) -> Tensor:
    tangent = fwAD.unpack_dual(t).tangent
    return torch.zeros_like(_primal(t)) if tangent is None else tangent


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
                    d, dict_input(site, d, acts[dicts.in_hook(site)][r, m.position - split]), m.index
                )
        del d
    for r, m in enumerate(metrics):
        if m.kind != "feature":
            at = logits[r, m.position - split]
            values[r] = at[list(m.positive)].logsumexp(-1) - at[list(m.negative)].logsumexp(-1)
    return torch.stack(values)


def _perturb_hooks(rows: Rows, split: int, tau: Tensor, dicts: Dictionaries) -> list[tuple[str, Any]]:
    """Forward hops: add ``τ_r · direction_r`` at row ``r``'s (site output, position)."""
    by_hook: dict[str, list[int]] = {}
    for r, (site, _, _) in enumerate(rows.perturb or []):
        by_hook.setdefault(dicts.out_hook(site), []).append(r)

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
    sites: Sequence[DictionarySite],
    dicts: Dictionaries,
    tangent: Literal["alpha", "perturb"] | None,
    backward: bool,
    prefix_cache: bool = True,
    read_from: int | None = None,
) -> PassTensors:
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
    hooks = hook_names(model)
    resid_inj = hooks.resid_post(layer)
    zero_names = list(dict.fromkeys([resid_inj, *(dicts.out_hook(s) for s in sites)])) if backward else []
    read_names = list(
        dict.fromkeys([dicts.in_hook(s) for s in read_sites] + [dicts.out_hook(s) for s in sites])
    )
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
            perturb = _perturb_hooks(rows, split, tau, dicts)
        with (
            torch.enable_grad() if backward else torch.no_grad(),
            inject(model, vectors, layer=layer, strength=strengths, start=start),
            hooks_context(model, [(name, add_zero(name)) for name in zero_names]),
            capture(model, read_names, detach=False) as acts,
            hooks_context(model, perturb),  # after the reads: a feature's output does not feed its own input
        ):
            out = model(tokens, stop_at_layer=stop, **kw)
            value = _metric_values(model, rows.metrics, out if logit_metric else None, acts, split, dicts)
        got = PassTensors(positions=list(range(read_from, seq)), value=_primal(value).detach())
        objective = _primal(value).sum()
        if tangent:
            got.slope = _tangent(value).detach()
        for site in sites:
            got.x[site] = _primal(acts[dicts.in_hook(site)][:, keep:]).detach()
            if tangent:
                got.x_dot[site] = _tangent(acts[dicts.in_hook(site)][:, keep:]).detach()
                got.y_dot[site] = _tangent(acts[dicts.out_hook(site)][:, keep:]).detach()
    if backward:
        names = list(zeros)
        grads = torch.autograd.grad(objective, [zeros[k] for k in names], allow_unused=True)
        by_name = {
            k: torch.zeros_like(zeros[k]) if g is None else g for k, g in zip(names, grads, strict=True)
        }
        for site in sites:
            got.grad[site] = by_name[dicts.out_hook(site)][:, keep:].detach()
        g_inj = by_name[resid_inj][:, start - split :]  # the injection is applied from the start on
        got.reverse = (g_inj * vectors[:, None, :]).sum((1, 2)).detach()
    return got


# ----------------------------------------------------------------------------------------------- dictionaries


def site_terms(
    site: DictionarySite, d: Any, got: PassTensors
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
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


# ----------------------------------------------------------------------------------------------- entry point


def attribution_sites(dicts: Dictionaries, *, layer: int, metric: Metric) -> list[DictionarySite]:
    """The sites the injection reaches (after the injection layer's resid_post) that reach the metric."""
    sites = [s for s in dicts.sites if s.after_injection(layer)]
    if metric.kind == "feature":
        sites = [s for s in sites if s.before(metric.site)]
    if not sites:
        raise ValueError(
            f"no dictionary between the injection (resid_post of layer {layer}) and the metric: dictionaries "
            f"are at {dicts.sites}"
        )
    return sites


def steering_attribution(
    model: Model,
    transcoders: Transcoders | None,
    concepts: Sequence[str] | str,
    *,
    config: AttributionConfig | None = None,
    saes: Any = None,
    vectors: Float[Tensor, "concept d_model"] | None = None,
    **settings: Any,
) -> SteeringAttribution:
    """Steering attribution of the metric to every dictionary feature, for each concept over a strength grid.

    Args:
        transcoders: ``{layer: transcoder}`` (as :func:`mechintro.core.transcoders.load_transcoders` returns;
            a ``lazy=True`` mapping is read one layer at a time), or None with ``saes`` only.
        concepts: concept words (one row block each).
        config: the settings (:class:`~mechintro.attribution.config.AttributionConfig`): the strength grid
            (default 21 points from 0 to the model's strength ``s*``, kept exactly as given), the quadrature
            rule, the metric (default the Yes-No gap at the last prompt token), the injection layer, the
            trial prompt, the batch size, the prefix cache and the progress bar.
        saes: sae-lens SAEs at ``resid_post`` or ``attn_z``: ``{(kind, layer) | hook name: sae}``, or a list
            whose ``cfg.metadata.hook_name`` says where each sits.
        vectors: ``[concept, d_model]`` concept vectors (default:
            :func:`mechintro.core.concepts.concept_vectors` at the injection layer).
        **settings: fields of :class:`~mechintro.attribution.config.AttributionConfig` as keywords
            (``strengths=``, ``metric=``, ``batch_size=``...), replacing ``config``'s.

    Returns a :class:`~mechintro.attribution.result.SteeringAttribution`.
    """
    cfg = config_with(AttributionConfig, config, settings, caller="steering_attribution")
    spec = spec_for(model)
    layer = spec.injection_layer if cfg.layer is None else check_layer(model, cfg.layer)
    concepts = check_concepts([concepts] if isinstance(concepts, str) else concepts)
    grid = strength_grid(model, cfg.points) if cfg.strengths is None else cfg.strengths
    quadrature_weights(grid, cfg.integration)  # validates the rule against the grid
    dicts = Dictionaries(model, transcoders, saes)
    prompt = trial_prompt(model, trial=cfg.trial, variant=cfg.variant)
    target = check_metric(
        model,
        resolve_metric(model, cfg.metric).at(len(prompt.tokens), prompt.injection_start),
        dicts,
        layer=layer,
    )
    sites = attribution_sites(dicts, layer=layer, metric=target)
    if vectors is None:
        vectors = concept_vectors(model, concepts, layer=layer)
    vectors = validate.vectors(model, vectors, concepts)

    pairs = [(c, s) for c in range(len(concepts)) for s in range(len(grid))]
    parts: dict[str, list[pd.DataFrame]] = {"features": [], "remainders": [], "metric": []}
    bar = progress_bar(total=len(pairs), desc="steering attribution", unit="row", enabled=cfg.progress)
    for begin in range(0, len(pairs), cfg.batch_size):
        chunk = pairs[begin : begin + cfg.batch_size]
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
            prefix_cache=cfg.prefix_cache,
        )
        labels = _RowLabels(
            concept=np.array([concepts[c] for c, _ in chunk], dtype=object),
            strength=np.array([grid[s] for _, s in chunk], dtype=np.float64),
            positions=np.asarray(got.positions),
        )
        parts["metric"].append(labels.metric_frame(got))
        for site in sites:  # one dictionary at a time
            f, t = site_terms(site, dicts[site], got)
            parts["features"].append(labels.feature_frame(site, f))
            parts["remainders"].append(labels.remainder_frame(site, t))
        del got
        bar.update(len(chunk))
    bar.close()
    settings_used = AttributionSettings(
        model=spec.name,
        concepts=tuple(concepts),
        strengths=grid,
        integration=cfg.integration,
        layer=layer,
        start=prompt.injection_start,
        trial=cfg.trial,
        variant=cfg.variant,
        metric=target,
        sites=tuple(sites),
        prompt_tokens=tuple(int(t) for t in prompt.tokens.tolist()),
    )
    return SteeringAttribution(
        features=_concat(parts["features"], FEATURE_COLUMNS),
        remainders=_concat(parts["remainders"], REMAINDER_COLUMNS),
        metric=_concat(parts["metric"], METRIC_COLUMNS),
        settings=settings_used,
        vectors=vectors,
    )


@dataclass
class _RowLabels:
    """The (concept, strength) of each row of one pass and its absolute positions: what the frames are
    keyed by."""

    concept: np.ndarray
    strength: np.ndarray
    positions: np.ndarray

    def metric_frame(self, got: PassTensors) -> pd.DataFrame:
        """Per row: the metric, and its slope from the forward tangent and from the backward pass."""
        return pd.DataFrame(
            {
                "concept": self.concept,
                "strength": self.strength,
                "value": got.value.cpu().double().numpy(),
                "slope": got.slope.cpu().double().numpy(),
                "slope_reverse": got.reverse.cpu().double().numpy(),
            }
        )

    def feature_frame(self, site: DictionarySite, f: dict[str, np.ndarray]) -> pd.DataFrame:
        """Per active feature of ``site`` (:func:`site_terms`' first part): activation, GA, SG and SA."""
        n_pos = len(self.positions)
        row, pos = f["row"] // n_pos, f["row"] % n_pos
        return pd.DataFrame(
            {
                "concept": self.concept[row],
                "strength": self.strength[row],
                "dictionary": site.kind,
                "layer": site.layer,
                "position": self.positions[pos],
                "feature": f["index"].astype(np.int64),
                "activation": f["activation"],
                "ga": f["ga"],
                "sg": f["sg"],
                "sa": f["ga"] * f["sg"],
            }
        )

    def remainder_frame(self, site: DictionarySite, t: dict[str, np.ndarray]) -> pd.DataFrame:
        """Per (row, position) of ``site`` (:func:`site_terms`' second part): the four terms."""
        n_pos = len(self.positions)
        flat = np.arange(len(self.concept) * n_pos)
        return pd.DataFrame(
            {
                "concept": self.concept[flat // n_pos],
                "strength": self.strength[flat // n_pos],
                "dictionary": site.kind,
                "layer": site.layer,
                "position": self.positions[flat % n_pos],
                **t,
                "sa_remainder": t["total"] - t["features"],
            }
        )


def _concat(parts: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame(columns=columns)
    return pd.concat(parts, ignore_index=True)[columns]
