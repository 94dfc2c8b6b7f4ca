"""The hops of an attribution graph: the edge weights between dictionary features, found backward from a node
or forward from it.

**Edge weights**, one definition whichever direction finds them, all integrated over the strength grid with
the attribution's quadrature weights (:func:`mechintro.attribution.strengths.quadrature_weights`)::

    w(f -> g)      = ∫ 1[g active] GA_L(g) · (∂pre_g/∂y_f · W_dec[f]) · 1[f active] SG(f) dα
    w(steer -> f)  = ISA(f)           w(f -> metric) = ISA(f) for the hop-0 features

``GA_L(g)`` is g's gradient attribution to the metric and ``SG(f)`` f's steering gradient, both from the root
:func:`mechintro.attribution.passes.steering_attribution`; ``1[f active]`` is part of f's steering attribution
(an inactive feature does not move). The middle factor, the total effect of one unit of f's decoder row on
g's pre-activation through the whole model, is computed

* by a **backward hop** from g: one backward pass from g's pre-activation (per strength), read at f's output
  site, or
* by a **forward hop** from f: one JVP of adding ``τ W_dec[f]`` at f's output site and position, read at
  every later encoder.

Both give the same number (a test checks it). Edges are **total effects**: they do not add up along paths.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from mechintro.attribution.metric import Metric
from mechintro.attribution.passes import Rows, run_pass
from mechintro.attribution.result import SteeringAttribution
from mechintro.attribution.sites import Dictionaries, DictionarySite, dict_input
from mechintro.core.models import Model
from mechintro.core.prompts import TrialPrompt, trial_prompt

__all__ = ["FEATURE_KEY", "HopContext", "backward_hop", "candidates", "forward_hop", "hop_context"]

FEATURE_KEY = ["dictionary", "layer", "position", "feature"]
"""The columns that name a feature node."""


@dataclass
class HopContext:
    """What the hops share: the model, dictionaries, prompt and root attribution of one concept."""

    model: Model
    dicts: Dictionaries
    prompt: TrialPrompt
    att: SteeringAttribution
    vector: Tensor
    metric: Metric
    root: pd.DataFrame
    """The root features frame of the concept, with ``w``: the quadrature weight of its strength."""
    by_site: dict[tuple[float, DictionarySite], dict[str, np.ndarray]]
    """Root rows per (strength, site): feature, position, ga, sg, w arrays."""
    batch_size: int
    prefix_cache: bool

    @property
    def sites(self) -> list[DictionarySite]:
        return list(self.att.settings.sites)


def hop_context(
    model: Model,
    dicts: Dictionaries,
    att: SteeringAttribution,
    concept: str,
    *,
    batch_size: int,
    prefix_cache: bool,
) -> HopContext:
    """The :class:`HopContext` of ``concept`` in ``att``; raises unless ``dicts`` holds every dictionary the
    attribution used and the model still writes the attribution's prompt."""
    s = att.settings
    prompt = trial_prompt(model, trial=s.trial, variant=s.variant)
    if tuple(prompt.tokens.tolist()) != s.prompt_tokens:
        raise ValueError("the attribution was computed on another prompt (tokenizer or model changed?)")
    missing = [site for site in s.sites if site not in dicts]
    if missing:
        raise ValueError(f"the attribution used dictionaries at {missing}, which are not given")
    root = att.features[att.features["concept"] == concept].copy()
    root["w"] = root["strength"].map(att.weights)
    by_site: dict[tuple[float, DictionarySite], dict[str, np.ndarray]] = {}
    for (strength, kind, layer), part in root.groupby(["strength", "dictionary", "layer"], sort=False):
        by_site[(float(strength), DictionarySite(kind, int(layer)))] = {
            k: part[k].to_numpy() for k in ("feature", "position", "ga", "sg", "w", "activation")
        }
    return HopContext(
        model=model,
        dicts=dicts,
        prompt=prompt,
        att=att,
        vector=att.vectors[list(s.concepts).index(concept)],
        metric=s.metric,
        root=root,
        by_site=by_site,
        batch_size=batch_size,
        prefix_cache=prefix_cache,
    )


def _active(ctx: HopContext, node: Mapping[str, Any]) -> pd.DataFrame:
    """The root rows of a feature node: one per strength at which it is active."""
    r = ctx.root
    hit = (
        (r["dictionary"] == node["dictionary"])
        & (r["layer"] == node["layer"])
        & (r["position"] == node["position"])
        & (r["feature"] == node["feature"])
    )
    return r[hit]


_Spec = tuple[int, float, Metric, Any]
"""A hop row: (parent number, strength, metric, perturbation or None)."""


def _hop_passes(ctx: HopContext, specs: list[_Spec], *, forward: bool, sites: list[DictionarySite]):
    """Batched passes over hop rows; yields (the chunk's specs, its
    :class:`~mechintro.attribution.passes.PassTensors`)."""
    for begin in range(0, len(specs), ctx.batch_size):
        chunk = specs[begin : begin + ctx.batch_size]
        rows = Rows(
            vectors=ctx.vector[None].expand(len(chunk), -1),
            strengths=[s for _, s, _, _ in chunk],
            metrics=[m for _, _, m, _ in chunk],
            perturb=[p for _, _, _, p in chunk] if forward else None,
        )
        got = run_pass(
            ctx.model,
            ctx.prompt,
            rows,
            layer=ctx.att.settings.layer,
            sites=sites,
            dicts=ctx.dicts,
            tangent="perturb" if forward else None,
            backward=not forward,
            prefix_cache=ctx.prefix_cache,
        )
        yield chunk, got


def candidates(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """Sum the per-strength terms of each (parent, child) pair: the integral over the grid."""
    if not parts:
        return pd.DataFrame(columns=["parent", *FEATURE_KEY, "weight"])
    df = pd.concat(parts, ignore_index=True)
    return df.groupby(["parent", *FEATURE_KEY], as_index=False, sort=False)["weight"].sum()


def backward_hop(ctx: HopContext, parents: list[Mapping[str, Any]]) -> pd.DataFrame:
    """Candidate edges ``f -> parent``: for every strength at which the parent is active, one backward pass
    from the parent's pre-activation gives ``∂pre_parent/∂y_f · W_dec[f]`` at every earlier site.

    Returns columns parent (its number in ``parents``), the child's dictionary, layer, position, feature,
    and the integrated weight ``∫ 1[parent] GA_L(parent) (∂pre_parent/∂y_f W_dec[f]) 1[f] SG(f) dα``.
    """
    specs: list[_Spec] = []
    for p, parent in enumerate(parents):
        site = DictionarySite(parent["dictionary"], int(parent["layer"]))
        metric = Metric("feature", int(parent["position"]), site=site, index=int(parent["feature"]))
        specs += [(p, float(s), metric, None) for s in _active(ctx, parent)["strength"]]
    upstream = [
        s
        for s in ctx.sites
        if any(s.before(DictionarySite(q["dictionary"], int(q["layer"]))) for q in parents)
    ]
    if not specs or not upstream:
        return candidates([])
    parts = []
    for chunk, got in _hop_passes(ctx, specs, forward=False, sites=upstream):
        first = got.positions[0]
        rows = _parent_rows(ctx, chunk, parents, "ga")  # GA_L(parent) at each row's strength
        for site in upstream:  # one dictionary at a time
            d = ctx.dicts[site]
            for r, p, strength, site_p, c_parent in rows:
                arrays = ctx.by_site.get((strength, site))
                if arrays is None or not site.before(site_p):
                    continue
                keep = arrays["position"] <= parents[p]["position"]
                if not keep.any():
                    continue
                idx = torch.as_tensor(arrays["feature"][keep], device=d.W_dec.device)
                pos = torch.as_tensor(arrays["position"][keep] - first, device=d.W_dec.device)
                g = got.grad[site][r].to(d.W_dec.device, d.W_dec.dtype).flatten(1)[pos]
                jac = (
                    (g * d.W_dec[idx].detach()).sum(-1).double().cpu().numpy()
                )  # ∂pre_parent/∂y_f · W_dec[f]
                weight = arrays["w"][keep] * c_parent * jac * arrays["sg"][keep]
                parts.append(_child_frame(site, arrays, keep, p, weight))
            del d
    return candidates(parts)


def _parent_rows(
    ctx: HopContext, chunk: Sequence[_Spec], parents: list[Mapping[str, Any]], column: str
) -> list[tuple[int, int, float, DictionarySite, float]]:
    """Per row of a hop pass: (row, parent index, strength, the parent's site, the parent's ``column``
    -- ``"ga"`` or ``"sg"`` -- at that strength)."""
    rows = []
    for r, (p, strength, _, _) in enumerate(chunk):
        parent = parents[p]
        own = _active(ctx, parent)
        value = float(own.loc[own["strength"] == strength, column].iloc[0])
        rows.append((r, p, strength, DictionarySite(parent["dictionary"], int(parent["layer"])), value))
    return rows


def forward_hop(ctx: HopContext, parents: list[Mapping[str, Any]]) -> pd.DataFrame:
    """Candidate edges ``parent -> g``: for every strength at which the parent is active, one JVP of adding
    ``τ W_dec[parent]`` at the parent's output site and position gives ``∂pre_g/∂τ`` at every later encoder.

    Returns the same columns as :func:`backward_hop` (the child is now downstream).
    """
    specs: list[_Spec] = []
    for p, parent in enumerate(parents):
        site = DictionarySite(parent["dictionary"], int(parent["layer"]))
        direction = ctx.dicts[site].W_dec[int(parent["feature"])].detach()
        perturb = (site, int(parent["position"]), direction)
        specs += [(p, float(s), ctx.metric, perturb) for s in _active(ctx, parent)["strength"]]
    downstream = [
        s
        for s in ctx.sites
        if any(DictionarySite(q["dictionary"], int(q["layer"])).before(s) for q in parents)
    ]
    if not specs or not downstream:
        return candidates([])
    parts = []
    for chunk, got in _hop_passes(ctx, specs, forward=True, sites=downstream):
        first = got.positions[0]
        rows = _parent_rows(ctx, chunk, parents, "sg")  # SG(parent) at each row's strength
        for site in downstream:  # one dictionary at a time
            d = ctx.dicts[site]
            x, x_dot = (
                dict_input(site, d, t.to(d.W_enc.device, d.W_enc.dtype))
                for t in (got.x[site], got.x_dot[site])
            )
            with torch.no_grad():
                sae_in_dot = torch.func.jvp(d.process_sae_in, (x,), (x_dot,))[1].flatten(2)
            for r, p, strength, site_p, sg_parent in rows:
                arrays = ctx.by_site.get((strength, site))
                if arrays is None or not site_p.before(site):
                    continue
                keep = arrays["position"] >= parents[p]["position"]
                if not keep.any():
                    continue
                idx = torch.as_tensor(arrays["feature"][keep], device=d.W_enc.device)
                pos = torch.as_tensor(arrays["position"][keep] - first, device=d.W_enc.device)
                jac = (sae_in_dot[r][pos] * d.W_enc[:, idx].detach().T).sum(-1).double().cpu().numpy()
                weight = arrays["w"][keep] * arrays["ga"][keep] * jac * sg_parent
                parts.append(_child_frame(site, arrays, keep, p, weight))
            del d
    return candidates(parts)


def _child_frame(
    site: DictionarySite, arrays: dict[str, np.ndarray], keep: np.ndarray, parent: int, weight: np.ndarray
):
    return pd.DataFrame(
        {
            "parent": parent,
            "dictionary": site.kind,
            "layer": site.layer,
            "position": arrays["position"][keep],
            "feature": arrays["feature"][keep],
            "weight": weight,
        }
    )
