"""Steering-attribution graphs: which features carry the injected vector to the answer, hop by hop.

An :class:`AttributionGraph` is data first: a nodes frame, an edges frame, a per-layer table of explained
shares and its settings. The Neuronpedia / circuit-tracer JSON (:meth:`AttributionGraph.to_neuronpedia`) and
the plotly figure (:meth:`AttributionGraph.figure`) are views of it.

**Nodes.** The steering vector (``steer``), the metric (``metric``, e.g. the Yes-No gap), dictionary features
at (layer, position), and per (dictionary site, position) of a kept feature its ``error`` and ``skip`` terms.

**Edge weights**, one definition whichever direction finds them, all integrated over the strength grid with
the attribution's quadrature weights (:func:`mechintro.attribution.passes.quadrature_weights`)::

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

**Selection** (every setting a parameter of :func:`attribution_graph`, recorded in :class:`GraphSettings`):
hop 0 keeps the features with positive ISA; then, per parent and per dictionary type, weights above
``rel_threshold`` times that type's largest, at most ``caps[hop]`` per parent (the last cap for deeper
hops); frontier nodes are expanded in both directions to ``depth`` hops; a duplicate edge keeps its largest
``|weight|``.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from mechintro.attribution.passes import (
    Dictionaries,
    Metric,
    Rows,
    Site,
    SteeringAttribution,
    dict_input,
    dictionary_feature_name,
    run_pass,
    steering_attribution,
)
from mechintro.core.html import card
from mechintro.core.models import Model, Transcoders, spec_for
from mechintro.core.prompts import TrialPrompt, trial_prompt
from mechintro.core.readout import unembedding

__all__ = [
    "DIRECTIONS",
    "SIGNS",
    "AttributionGraph",
    "GraphSettings",
    "attribution_graph",
    "graph_figure",
]

Direction = Literal["backward", "forward"]
Sign = Literal["positive", "negative", "absolute"]
DIRECTIONS: tuple[Direction, ...] = ("backward", "forward")
"""Hop directions: backward from a node to the features feeding it, forward to the features it feeds."""
SIGNS: tuple[Sign, ...] = ("positive", "negative", "absolute")
"""Which edge weights selection ranks: the positive ones (default), the negative ones, or all by |weight|."""
NODE_COLUMNS = [
    "node",
    "kind",
    "dictionary",
    "layer",
    "position",
    "feature",
    "name",
    "hop",
    "isa",
    "activation",
    "activation_0",
    "influence",
    "top_tokens",
]
EDGE_COLUMNS = ["source", "target", "weight", "hop", "direction"]
TOP_TOKENS = 5
"""Logit-lens tokens shown per feature."""


@dataclass(frozen=True)
class GraphSettings:
    """How an :class:`AttributionGraph` selects its nodes."""

    depth: int = 2
    """Hops beyond hop 0 (the features attributed to the metric directly)."""
    directions: tuple[Direction, ...] = DIRECTIONS
    """Hop directions from each frontier node."""
    rel_threshold: float = 0.1
    """Per parent and dictionary type, keep weights above this fraction of that type's largest."""
    caps: tuple[int, ...] = (8, 5, 3, 2)
    """At most this many children per parent at hops 0, 1, 2, ...; the last entry for deeper hops."""
    sign: Sign = "positive"
    """Which weights count (see :data:`SIGNS`)."""
    remainders: bool = True
    """Add the error and skip terms of each (site, position) holding a kept feature as nodes."""

    def __post_init__(self) -> None:
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 0:
            raise ValueError(f"depth must be a non-negative integer, got {self.depth!r}")
        bad = [d for d in self.directions if d not in DIRECTIONS]
        if bad or not self.directions:
            raise ValueError(f"unknown hop directions {bad or '(none)'}; valid: {list(DIRECTIONS)}")
        if not 0 <= float(self.rel_threshold) < 1:
            raise ValueError(f"rel_threshold must be in [0, 1), got {self.rel_threshold}")
        if not self.caps or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in self.caps):
            raise ValueError(f"caps must be positive integers, got {self.caps!r}")
        if self.sign not in SIGNS:
            raise ValueError(f"unknown sign {self.sign!r}; valid: {list(SIGNS)}")

    def cap(self, hop: int) -> int:
        return self.caps[min(hop, len(self.caps) - 1)]


# ----------------------------------------------------------------------------------------------- node keys

_FEATURE_KEY = ["dictionary", "layer", "position", "feature"]


def _node_id(kind: str, dictionary: str = "", layer: int = -1, position: int = -1, feature: int = -1) -> str:
    """A readable unique node name: ``"L5 F12 @130"``, ``"error L5 @130"``, ``"steer"``, ``"metric"``."""
    if kind == "feature":
        return f"{dictionary_feature_name(dictionary, layer, feature)} @{position}"
    if kind in ("error", "skip"):
        prefix = {"transcoder": "", "resid_post": "resid ", "attn_z": "attn "}[dictionary]
        return f"{kind} {prefix}L{layer} @{position}"
    return kind


def _select(cands: pd.DataFrame, *, settings: GraphSettings, hop: int) -> pd.DataFrame:
    """The children one parent keeps: sign filter, per-type relative threshold, then the cap."""
    w = cands["weight"].to_numpy(dtype=np.float64)
    score = {"positive": w, "negative": -w, "absolute": np.abs(w)}[settings.sign]
    cands = cands.assign(_score=score)
    cands = cands[cands["_score"] > 0]
    if cands.empty:
        return cands.drop(columns="_score")
    top = cands.groupby("dictionary")["_score"].transform("max")
    cands = cands[cands["_score"] > settings.rel_threshold * top]
    cands = cands.sort_values("_score", ascending=False, kind="stable").head(settings.cap(hop))
    return cands.drop(columns="_score")


# ----------------------------------------------------------------------------------------------- hops


@dataclass
class _Context:
    """What the hops share: the model, dictionaries, prompt and root attribution of one concept."""

    model: Model
    dicts: Dictionaries
    prompt: TrialPrompt
    att: SteeringAttribution
    vector: Tensor
    metric: Metric
    root: pd.DataFrame
    """The root features frame of the concept, with ``w``: the quadrature weight of its strength."""
    by_site: dict[tuple[float, Site], dict[str, np.ndarray]]
    """Root rows per (strength, site): feature, position, ga, sg, w arrays."""
    batch_size: int
    prefix_cache: bool

    @property
    def sites(self) -> list[Site]:
        return list(self.att.settings.sites)


def _context(
    model: Model,
    dicts: Dictionaries,
    att: SteeringAttribution,
    concept: str,
    *,
    batch_size: int,
    prefix_cache: bool,
) -> _Context:
    s = att.settings
    prompt = trial_prompt(model, trial=s.trial, variant=s.variant)
    if tuple(prompt.tokens.tolist()) != s.prompt_tokens:
        raise ValueError("the attribution was computed on another prompt (tokenizer or model changed?)")
    missing = [site for site in s.sites if site not in dicts]
    if missing:
        raise ValueError(f"the attribution used dictionaries at {missing}, which are not given")
    root = att.features[att.features["concept"] == concept].copy()
    root["w"] = root["strength"].map(att.weights)
    by_site: dict[tuple[float, Site], dict[str, np.ndarray]] = {}
    for (strength, kind, layer), part in root.groupby(["strength", "dictionary", "layer"], sort=False):
        by_site[(float(strength), Site(kind, int(layer)))] = {
            k: part[k].to_numpy() for k in ("feature", "position", "ga", "sg", "w", "activation")
        }
    return _Context(
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


def _active(ctx: _Context, node: Mapping[str, Any]) -> pd.DataFrame:
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


def _hop_passes(ctx: _Context, specs: list[_Spec], *, forward: bool, sites: list[Site]):
    """Batched passes over hop rows; yields (the chunk's specs, its :class:`Captured`)."""
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


def _candidates(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """Sum the per-strength terms of each (parent, child) pair: the integral over the grid."""
    if not parts:
        return pd.DataFrame(columns=["parent", *_FEATURE_KEY, "weight"])
    df = pd.concat(parts, ignore_index=True)
    return df.groupby(["parent", *_FEATURE_KEY], as_index=False, sort=False)["weight"].sum()


def backward_hop(ctx: _Context, parents: list[Mapping[str, Any]]) -> pd.DataFrame:
    """Candidate edges ``f -> parent``: for every strength at which the parent is active, one backward pass
    from the parent's pre-activation gives ``∂pre_parent/∂y_f · W_dec[f]`` at every earlier site.

    Returns columns parent (its number in ``parents``), the child's dictionary, layer, position, feature,
    and the integrated weight ``∫ 1[parent] GA_L(parent) (∂pre_parent/∂y_f W_dec[f]) 1[f] SG(f) dα``.
    """
    specs: list[_Spec] = []
    for p, parent in enumerate(parents):
        site = Site(parent["dictionary"], int(parent["layer"]))
        metric = Metric("feature", int(parent["position"]), site=site, index=int(parent["feature"]))
        specs += [(p, float(s), metric, None) for s in _active(ctx, parent)["strength"]]
    upstream = [
        s for s in ctx.sites if any(s.before(Site(q["dictionary"], int(q["layer"]))) for q in parents)
    ]
    if not specs or not upstream:
        return _candidates([])
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
    return _candidates(parts)


def _parent_rows(
    ctx: _Context, chunk: Sequence[_Spec], parents: list[Mapping[str, Any]], column: str
) -> list[tuple[int, int, float, Site, float]]:
    """Per row of a hop pass: (row, parent index, strength, the parent's site, the parent's ``column``
    -- ``"ga"`` or ``"sg"`` -- at that strength)."""
    rows = []
    for r, (p, strength, _, _) in enumerate(chunk):
        parent = parents[p]
        own = _active(ctx, parent)
        value = float(own.loc[own["strength"] == strength, column].iloc[0])
        rows.append((r, p, strength, Site(parent["dictionary"], int(parent["layer"])), value))
    return rows


def forward_hop(ctx: _Context, parents: list[Mapping[str, Any]]) -> pd.DataFrame:
    """Candidate edges ``parent -> g``: for every strength at which the parent is active, one JVP of adding
    ``τ W_dec[parent]`` at the parent's output site and position gives ``∂pre_g/∂τ`` at every later encoder.

    Returns the same columns as :func:`backward_hop` (the child is now downstream).
    """
    specs: list[_Spec] = []
    for p, parent in enumerate(parents):
        site = Site(parent["dictionary"], int(parent["layer"]))
        direction = ctx.dicts[site].W_dec[int(parent["feature"])].detach()
        perturb = (site, int(parent["position"]), direction)
        specs += [(p, float(s), ctx.metric, perturb) for s in _active(ctx, parent)["strength"]]
    downstream = [
        s for s in ctx.sites if any(Site(q["dictionary"], int(q["layer"])).before(s) for q in parents)
    ]
    if not specs or not downstream:
        return _candidates([])
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
    return _candidates(parts)


def _child_frame(
    site: Site, arrays: dict[str, np.ndarray], keep: np.ndarray, parent: int, weight: np.ndarray
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


# ----------------------------------------------------------------------------------------------- building


def _logit_lens(model: Model, dicts: Dictionaries, nodes: pd.DataFrame, k: int = TOP_TOKENS) -> list[str]:
    """Top-``k`` unembedding tokens of each feature node's decoder row (through ``o_proj`` for attention
    SAEs; no final-norm scaling, like the DLA direction)."""
    w_u = unembedding(model).detach()
    tok = model.tokenizer
    out = [""] * len(nodes)
    feats = nodes[nodes["kind"] == "feature"]
    for (kind, layer), part in feats.groupby(["dictionary", "layer"], sort=False):  # one dictionary at a time
        site = Site(kind, int(layer))
        rows = dicts[site].W_dec[torch.tensor(part["feature"].tolist())].detach().to(w_u)
        if site.kind == "attn_z":
            o_proj = model.original_model.model.layers[site.layer].self_attn.o_proj.weight.detach()
            rows = rows @ o_proj.to(w_u).T
        top = torch.topk(rows @ w_u, k, dim=-1).indices.tolist()
        for label, ids in zip(part.index, top, strict=True):
            out[nodes.index.get_loc(label)] = ", ".join(str(t) for t in tok.convert_ids_to_tokens(ids))
    return out


def _influence(att: SteeringAttribution, concept: str) -> dict[tuple, float]:
    """Cumulative share of |ISA| (features, errors and skips together, largest first) at each unit."""
    isa = att.isa()
    isa = isa[isa["concept"] == concept]
    units = [
        (("feature", *k), abs(v))
        for k, v in zip(isa[_FEATURE_KEY].itertuples(index=False, name=None), isa["isa"], strict=True)
    ]
    rem = att.integrated_remainders()
    rem = rem[rem["concept"] == concept]
    for kind in ("error", "skip"):
        keys = rem[["dictionary", "layer", "position"]].itertuples(index=False, name=None)
        units += [((kind, *k, -1), abs(v)) for k, v in zip(keys, rem[kind], strict=True)]
    units.sort(key=lambda u: -u[1])
    total = sum(v for _, v in units) or 1.0
    out, running = {}, 0.0
    for key, v in units:
        running += v
        out[key] = running / total
    return out


def attribution_graph(
    model: Model,
    transcoders: Transcoders | None,
    concept: str,
    depth: int = 2,
    *,
    saes: Any = None,
    strengths: Sequence[float] | Tensor | None = None,
    metric: Any = None,
    integration: str = "trapezoid",
    layer: int | None = None,
    vector: Tensor | None = None,
    trial: int = 1,
    variant: str = "original",
    directions: Sequence[str] = DIRECTIONS,
    rel_threshold: float = 0.1,
    caps: Sequence[int] = (8, 5, 3, 2),
    sign: str = "positive",
    remainders: bool = True,
    batch_size: int = 32,
    prefix_cache: bool = True,
    attribution: SteeringAttribution | None = None,
    progress: bool = True,
) -> AttributionGraph:
    """The steering-attribution graph of one concept: injection -> features -> metric, hop by hop.

    Args:
        Other arguments: ``transcoders``, ``saes``, ``strengths``, ``metric``, ``integration``, ``layer``,
            ``trial``, ``variant``, ``batch_size``, ``prefix_cache`` and ``progress`` are those of
            :func:`mechintro.attribution.passes.steering_attribution` (which runs first, for ``concept``
            alone, unless ``attribution`` is given).
        concept: the injected concept.
        depth: hops beyond hop 0.
        vector: the concept vector (default: computed at the injection layer).
        directions, rel_threshold, caps, sign, remainders: selection (:class:`GraphSettings`).
        attribution: a :class:`SteeringAttribution` that includes ``concept`` (its strengths, metric,
            prompt and vectors are used; ``strengths``/``metric``/... are then ignored).

    Returns an :class:`AttributionGraph`.
    """
    settings = GraphSettings(
        depth=depth,
        directions=tuple(directions),
        rel_threshold=float(rel_threshold),
        caps=tuple(caps),
        sign=sign,  # type: ignore[arg-type]
        remainders=remainders,
    )
    if attribution is None:
        attribution = steering_attribution(
            model,
            transcoders,
            [concept],
            strengths=strengths,
            metric=metric,
            saes=saes,
            integration=integration,  # type: ignore[arg-type]
            layer=layer,
            vectors=None if vector is None else torch.as_tensor(vector)[None],
            trial=trial,
            variant=variant,
            batch_size=batch_size,
            prefix_cache=prefix_cache,
            progress=progress,
        )
    elif concept not in attribution.settings.concepts:
        raise ValueError(
            f"{concept!r} is not in the attribution, which has {list(attribution.settings.concepts)}"
        )
    dicts = Dictionaries(model, transcoders, saes)
    ctx = _context(model, dicts, attribution, concept, batch_size=batch_size, prefix_cache=prefix_cache)

    isa = attribution.isa()
    isa = isa[isa["concept"] == concept].set_index(_FEATURE_KEY)["isa"]
    nodes: dict[str, dict[str, Any]] = {}
    edges: dict[tuple[str, str], dict[str, Any]] = {}

    def add_node(key: tuple, hop: int) -> tuple[str, bool]:
        name = _node_id("feature", *key)
        if name in nodes:
            return name, False
        nodes[name] = dict(zip(_FEATURE_KEY, key, strict=True)) | {"kind": "feature", "hop": hop}
        return name, True

    def add_edge(source: str, target: str, weight: float, hop: int, direction: str) -> None:
        old = edges.get((source, target))
        if old is None or abs(weight) > abs(old["weight"]):
            edges[(source, target)] = {"weight": float(weight), "hop": hop, "direction": direction}

    hop0 = isa.reset_index().rename(columns={"isa": "weight"})
    frontier = []
    for row in _select(hop0, settings=settings, hop=0).itertuples(index=False):
        key = (row.dictionary, int(row.layer), int(row.position), int(row.feature))
        name, _ = add_node(key, 0)
        add_edge(name, "metric", row.weight, 0, "root")
        frontier.append(name)
    for hop in range(1, settings.depth + 1):
        parents = [nodes[name] for name in frontier]
        new: list[str] = []
        for direction in settings.directions:
            hop_fn = backward_hop if direction == "backward" else forward_hop
            cands = hop_fn(ctx, parents) if parents else _candidates([])
            for p, part in cands.groupby("parent", sort=False):
                parent_name = frontier[int(p)]
                for row in _select(part, settings=settings, hop=hop).itertuples(index=False):
                    key = (row.dictionary, int(row.layer), int(row.position), int(row.feature))
                    name, fresh = add_node(key, hop)
                    if fresh:
                        new.append(name)
                    ends = (name, parent_name) if direction == "backward" else (parent_name, name)
                    add_edge(*ends, row.weight, hop, direction)
        frontier = new
    for name, node in list(nodes.items()):
        add_edge(
            "steer", name, float(isa.get(tuple(node[k] for k in _FEATURE_KEY), 0.0)), node["hop"], "steer"
        )
    if settings.remainders:
        _add_remainders(attribution, concept, nodes, add_edge)
    return _assemble(model, dicts, attribution, concept, settings, nodes, edges, isa)


def _add_remainders(att: SteeringAttribution, concept: str, nodes: dict, add_edge: Any) -> None:
    """Error and skip nodes for every (site, position) that holds a kept feature, wired to both ends."""
    rem = att.integrated_remainders()
    rem = rem[rem["concept"] == concept].set_index(["dictionary", "layer", "position"])
    places = {(n["dictionary"], n["layer"], n["position"]) for n in nodes.values() if n["kind"] == "feature"}
    for place in sorted(places, key=lambda k: (k[1], k[2], k[0])):
        if place not in rem.index:
            continue
        for kind in ("error", "skip"):
            value = float(rem.loc[place, kind])
            if value == 0.0:
                continue
            name = _node_id(kind, *place)
            nodes[name] = {"dictionary": place[0], "layer": place[1], "position": place[2], "feature": -1}
            nodes[name] |= {"kind": kind, "hop": 0}
            add_edge("steer", name, value, 0, "steer")
            add_edge(name, "metric", value, 0, "root")


def _assemble(
    model: Model,
    dicts: Dictionaries,
    att: SteeringAttribution,
    concept: str,
    settings: GraphSettings,
    nodes: dict[str, dict[str, Any]],
    edges: dict[tuple[str, str], dict[str, Any]],
    isa: pd.Series,
) -> AttributionGraph:
    s = att.settings
    spec = spec_for(model)
    root = att.features[att.features["concept"] == concept]
    top, bottom = max(s.strengths), min(s.strengths)
    rem = att.integrated_remainders()
    rem = rem[rem["concept"] == concept].set_index(["dictionary", "layer", "position"])
    influence = _influence(att, concept)
    records = []
    for name, n in nodes.items():
        key = (n["dictionary"], n["layer"], n["position"], n["feature"])
        if n["kind"] == "feature":
            value = float(isa.get(key, 0.0))
            acts = root[
                (root["dictionary"] == key[0])
                & (root["layer"] == key[1])
                & (root["position"] == key[2])
                & (root["feature"] == key[3])
            ].set_index("strength")["activation"]
            label = dictionary_feature_name(*key[:2], key[3])
        else:
            value = float(rem.loc[key[:3], n["kind"]])
            acts = pd.Series(dtype=float)
            label = name.rsplit(" @", 1)[0]
        records.append(
            {
                "node": name,
                "kind": n["kind"],
                "dictionary": n["dictionary"],
                "layer": int(n["layer"]),
                "position": int(n["position"]),
                "feature": int(n["feature"]),
                "name": label,
                "hop": int(n["hop"]),
                "isa": value,
                "activation": float(acts.get(top, 0.0)),
                "activation_0": float(acts.get(bottom, 0.0)),
                "influence": influence.get((n["kind"], *key), float("nan")),
            }
        )
    metric_rows = att.metric[att.metric["concept"] == concept].set_index("strength")["value"]
    ends = [
        {
            "node": "steer",
            "kind": "steer",
            "layer": s.layer,
            "position": s.start,
            "name": f"injected: {concept} × α",
        },
        {
            "node": "metric",
            "kind": "metric",
            "layer": spec.n_layers,
            "position": s.metric.position,
            "name": s.metric.label or s.metric.kind,
        },
    ]
    for end in ends:
        end |= {
            "dictionary": "",
            "feature": -1,
            "hop": -1,
            "isa": float("nan"),
            "activation": float("nan"),
            "activation_0": float("nan"),
            "influence": float("nan"),
        }
    frame = pd.DataFrame(ends + records)
    frame["top_tokens"] = _logit_lens(model, dicts, frame)
    edge_frame = pd.DataFrame(
        [{"source": a, "target": b, **e} for (a, b), e in edges.items()], columns=EDGE_COLUMNS
    )
    kept = frame[frame["kind"] == "feature"].assign(concept=concept)
    layers = att.layer_shares(kept=kept)
    layers = layers[layers["concept"] == concept].reset_index(drop=True)
    tok = model.tokenizer
    info = {
        "concept": concept,
        "graph": asdict(settings),
        "attribution": s.to_dict() | {"concepts": [concept]},
        "model": spec.name,
        "n_layers": spec.n_layers,
        "d_vocab": int(model.cfg.d_vocab),
        "prompt": tok.decode(list(s.prompt_tokens)),
        "prompt_token_strings": [tok.decode([t]) for t in s.prompt_tokens],
        "metric_value": {str(k): float(v) for k, v in metric_rows.items()},
        "transcoder_list": _transcoder_list(spec, s.sites),
    }
    info = json.loads(json.dumps(info))  # JSON-native (lists, not tuples): what from_json gives back
    return AttributionGraph(nodes=frame[NODE_COLUMNS], edges=edge_frame, layers=layers, settings=info)


def _transcoder_list(spec: Any, sites: Sequence[Site]) -> list[str]:
    if spec.transcoder_release is None or spec.transcoder_id_pattern is None:
        return []
    release = Path(str(spec.transcoder_release)).name
    return [
        f"{release}/{spec.transcoder_id_pattern.format(layer=s.layer)}"
        for s in sites
        if s.kind == "transcoder"
    ]


# ----------------------------------------------------------------------------------------------- the graph


@dataclass
class AttributionGraph:
    """A steering-attribution graph: nodes, edges, per-layer explained shares and settings.

    * ``nodes``: node (unique name), kind (steer, metric, feature, error, skip), dictionary, layer, position,
      feature (index; -1 for non-features), name, hop, isa (the integrated attribution to the metric),
      activation (at the top strength) and activation_0 (at the lowest), influence (cumulative share of
      |ISA| up to this node, largest first), top_tokens (logit lens of the decoder row).
    * ``edges``: source, target, weight (signed, integrated over strength; a **total effect**, so weights
      do not add along paths), hop, direction (root, steer, backward, forward).
    * ``layers``: per dictionary and layer, the integrated total, features, skip and error terms (summed over
      positions, never across layers) and ``explained = Σ_kept ISA / ∫ total``.
    * ``settings``: the concept, the selection (:class:`GraphSettings`), the attribution's settings, the
      model and prompt, the metric per strength.
    """

    nodes: pd.DataFrame
    edges: pd.DataFrame
    layers: pd.DataFrame
    settings: dict[str, Any]

    def to_json(self, path: str | Path | None = None) -> str:
        """The graph as JSON (frames as column lists; floats round-trip exactly); written to ``path`` if
        given."""
        data = {
            "format": "mechintro.AttributionGraph/1",
            "settings": self.settings,
            **{name: _frame_to_dict(getattr(self, name)) for name in ("nodes", "edges", "layers")},
        }
        text = json.dumps(data, indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, source: str | Path) -> AttributionGraph:
        """Read :meth:`to_json`'s output (a path or the JSON text)."""
        text = str(source)
        if not text.lstrip().startswith("{"):
            text = Path(source).read_text()
        data = json.loads(text)
        if data.get("format") != "mechintro.AttributionGraph/1":
            raise ValueError(f"not a mechintro attribution graph (format {data.get('format')!r})")
        return cls(
            settings=data["settings"], **{n: _frame_from_dict(data[n]) for n in ("nodes", "edges", "layers")}
        )

    def to_neuronpedia(
        self, path: str | Path | None = None, *, slug: str | None = None, scan: str | None = None
    ) -> dict:
        """The graph in circuit-tracer's graph JSON (what Neuronpedia's graph viewer reads); written to
        ``path`` if given. See :func:`neuronpedia_json`."""
        data = neuronpedia_json(self, slug=slug, scan=scan)
        if path is not None:
            Path(path).write_text(json.dumps(data, indent=1))
        return data

    def figure(self, **kwargs: Any) -> Any:
        """An offline interactive plotly figure of the graph (see :func:`graph_figure`)."""
        return graph_figure(self, **kwargs)

    def feature_nodes(self) -> pd.DataFrame:
        return self.nodes[self.nodes["kind"] == "feature"]

    def _repr_html_(self) -> str:
        kinds = self.nodes["kind"].value_counts()
        facts = {
            "concept": self.settings.get("concept"),
            "model": self.settings.get("model"),
            "nodes": ", ".join(f"{n} {k}" for k, n in kinds.items()),
            "edges": len(self.edges),
            "metric by strength": self.settings.get("metric_value", {}),
        }
        top = self.feature_nodes().sort_values("isa", key=np.abs, ascending=False)
        cols = ["name", "layer", "position", "hop", "isa", "influence", "top_tokens"]
        return card(
            "AttributionGraph",
            facts,
            [("feature nodes by |ISA|", top[cols]), ("per-layer explained share", self.layers)],
        )


def _frame_to_dict(df: pd.DataFrame) -> dict[str, Any]:
    return {
        "columns": list(df.columns),
        "dtypes": [str(t) for t in df.dtypes],
        "data": {c: [_plain(v) for v in df[c].tolist()] for c in df.columns},
    }


def _plain(v: Any) -> Any:
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    return v


def _frame_from_dict(data: Mapping[str, Any]) -> pd.DataFrame:
    df = pd.DataFrame({c: data["data"][c] for c in data["columns"]}, columns=data["columns"])
    for column, dtype in zip(data["columns"], data["dtypes"], strict=True):
        # object included: pandas < 2.3 makes an empty list's column float64
        df[column] = df[column].astype(dtype)
    return df


# ----------------------------------------------------------------------------------------------- Neuronpedia

NEURONPEDIA_METADATA = (
    "slug",
    "scan",
    "transcoder_list",
    "prompt_tokens",
    "prompt",
    "node_threshold",
    "schema_version",
)
"""circuit-tracer's graph metadata fields, in its order."""
NEURONPEDIA_QPARAMS = ("pinnedIds", "supernodes", "linkType", "clickedId", "sg_pos")
"""circuit-tracer's query-parameter fields."""
NEURONPEDIA_NODE = (
    "node_id",
    "feature",
    "layer",
    "ctx_idx",
    "feature_type",
    "token_prob",
    "is_target_logit",
    "run_idx",
    "reverse_ctx_idx",
    "jsNodeId",
    "clerp",
    "influence",
    "activation",
)
"""circuit-tracer's node fields, in its order."""
NEURONPEDIA_LINK = ("source", "target", "weight")
"""circuit-tracer's link fields."""
NEURONPEDIA_TYPES = ("cross layer transcoder", "mlp reconstruction error", "embedding", "logit")
"""The node types the frontend knows."""


def cantor(a: int, b: int) -> int:
    """The Cantor pairing of two non-negative integers (how schema version 1 encodes (layer, index))."""
    return (a + b) * (a + b + 1) // 2 + b


def _np_node(**fields: Any) -> dict[str, Any]:
    base = {"token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0, "clerp": ""}
    base |= {"influence": None, "activation": None}
    base |= fields
    return {k: base[k] for k in NEURONPEDIA_NODE}


def _num(v: Any) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def neuronpedia_json(graph: AttributionGraph, *, slug: str | None = None, scan: str | None = None) -> dict:
    """The graph in circuit-tracer's graph-file layout (top level ``metadata``, ``qParams``, ``nodes``,
    ``links``).

    * transcoder features: ``node_id`` ``"{layer}_{index}_{pos}"``, ``feature`` = Cantor(layer, index),
      ``feature_type`` ``"cross layer transcoder"``, ``jsNodeId`` ``"{layer}_{index}-0"``;
    * error and skip terms: ``"mlp reconstruction error"`` nodes with ``feature`` -1 and ids whose index slot
      is negative (``"{layer}_-1_{pos}"`` error, ``"{layer}_-2_{pos}"`` skip), which no feature id can equal;
    * every prompt token: an ``"embedding"`` node ``"E_{token}_{pos}"``;
    * the steering vector: an ``"embedding"`` node at the injection start whose token id is the vocabulary
      size (past every real token), clerp ``"injected: {concept} × α"``;
    * the metric: the ``"logit"`` node (layer ``n_layers + 1``), clerp ``Output "<label>" (p=...)`` with p the
      probability of the plus side within plus-or-minus, ``sigmoid(L)``, at the top strength.

    SAE features (resid_post, attn_z) have no place in a transcoder graph viewer: they are left out with a
    warning, with their links.
    """
    s = graph.settings
    n_layers, vocab = int(s["n_layers"]), int(s["d_vocab"])
    att = s["attribution"]
    metric = Metric.from_dict(att["metric"])
    start = int(att["start"])
    steer_id = f"E_{vocab}_{start}"
    strengths = [float(x) for x in att["strengths"]]
    value = s["metric_value"].get(str(max(strengths)))
    prob = 0.0 if metric.kind == "feature" or value is None else 1.0 / (1.0 + math.exp(-float(value)))
    logit_vocab = metric.positive[0] if metric.positive else vocab + 1
    logit_id = f"{n_layers + 1}_{logit_vocab}_{metric.position}"
    ids: dict[str, str] = {"steer": steer_id, "metric": logit_id}
    nodes = []
    for pos, (token, text) in enumerate(zip(att["prompt_tokens"], s["prompt_token_strings"], strict=True)):
        nodes.append(
            _np_node(
                node_id=f"E_{token}_{pos}",
                feature=pos,
                layer="E",
                ctx_idx=pos,
                feature_type="embedding",
                jsNodeId=f"E_{token}-{pos}",
                clerp=text,
            )
        )
    nodes.append(
        _np_node(
            node_id=steer_id,
            feature=start,
            layer="E",
            ctx_idx=start,
            feature_type="embedding",
            jsNodeId=f"E_{vocab}-{start}",
            clerp=f"injected: {s['concept']} × α",
        )
    )
    label = metric.label or metric.kind
    nodes.append(
        _np_node(
            node_id=logit_id,
            feature=int(logit_vocab),
            layer=str(n_layers + 1),
            ctx_idx=metric.position,
            feature_type="logit",
            token_prob=prob,
            is_target_logit=True,
            jsNodeId=f"L_{logit_vocab}-{metric.position}",
            clerp=f'Output "{label}" (p={prob:.3f})',
        )
    )
    skipped = []
    for row in graph.nodes.itertuples(index=False):
        if row.kind in ("steer", "metric"):
            continue
        if row.dictionary != "transcoder":
            skipped.append(row.node)
            continue
        la, pos = int(row.layer), int(row.position)
        if row.kind == "feature":
            node_id, js = f"{la}_{row.feature}_{pos}", f"{la}_{row.feature}-0"
            clerp = f"{row.name}: ISA {row.isa:+.4g}; → {row.top_tokens}"
            nodes.append(
                _np_node(
                    node_id=node_id,
                    feature=cantor(la, int(row.feature)),
                    layer=str(la),
                    ctx_idx=pos,
                    feature_type="cross layer transcoder",
                    jsNodeId=js,
                    clerp=clerp,
                    influence=_num(row.influence),
                    activation=_num(row.activation),
                )
            )
        else:
            slot = -1 if row.kind == "error" else -2
            node_id, js = f"{la}_{slot}_{pos}", f"{la}_{slot}-{pos}"
            what = "reconstruction error" if row.kind == "error" else "affine skip path"
            nodes.append(
                _np_node(
                    node_id=node_id,
                    feature=-1,
                    layer=str(la),
                    ctx_idx=pos,
                    feature_type="mlp reconstruction error",
                    jsNodeId=js,
                    clerp=f"{what} L{la}: {row.isa:+.4g}",
                    influence=_num(row.influence),
                )
            )
        ids[row.node] = node_id
    if skipped:
        warnings.warn(
            f"{len(skipped)} SAE feature nodes (not transcoder features) are left out of the Neuronpedia "
            f"graph, with their links: {skipped[:5]}",
            stacklevel=2,
        )
    links = [
        {"source": ids[e.source], "target": ids[e.target], "weight": float(e.weight)}
        for e in graph.edges.itertuples(index=False)
        if e.source in ids and e.target in ids
    ]
    kept = graph.nodes[graph.nodes["kind"] == "feature"]["influence"].dropna()
    metadata = {
        "slug": slug or f"{s['model']}-{s['concept']}-steering".replace("/", "-").lower(),
        "scan": scan or s["model"],
        "transcoder_list": list(s.get("transcoder_list", [])),
        "prompt_tokens": list(s["prompt_token_strings"]),
        "prompt": s["prompt"],
        "node_threshold": float(kept.max()) if len(kept) else None,
        "schema_version": 1,
    }
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": qparams, "nodes": nodes, "links": links}


# ----------------------------------------------------------------------------------------------- figure

_STAGE_OFFSET = {"attn_z": -0.3, "transcoder": 0.0, "resid_post": 0.3, "": 0.0}
_KIND_COLORS = {
    "steer": "#7b3294",
    "metric": "#000000",
    "feature": "#4d9221",
    "error": "#999999",
    "skip": "#bdbdbd",
}
_SIGN_COLORS = ("#2166ac", "#b2182b")
"""Positive and negative edge colours."""


def graph_figure(
    graph: AttributionGraph,
    *,
    title: str | None = None,
    width: int = 1100,
    height: int = 720,
    labels: int = 8,
) -> Any:
    """The graph layered by layer (y) and prompt position (x, one column per position that holds a node), the
    metric on top; node size ∝ |ISA|; edges coloured by sign (blue +, red -) and as wide as |weight|, hop
    edges relative to the largest hop edge, steer and metric edges relative to the largest ISA (drawn
    lighter); the ``labels`` largest features are named.

    Hover text: the node, its ISA, its activation at the top and the lowest strength, and its top logit-lens
    tokens. A plain plotly figure: it renders in Jupyter; save the HTML with plotly.js embedded to view it
    offline (``save_figure(..., offline=True)``).
    """
    import plotly.graph_objects as go

    s = graph.settings
    n = graph.nodes.copy()
    n_layers = int(s["n_layers"])
    n["y"] = n["layer"].astype(float) + n["dictionary"].map(_STAGE_OFFSET).fillna(0.0)
    n.loc[n["kind"] == "metric", "y"] = n_layers + 0.5
    n.loc[n["kind"] == "steer", "y"] = float(s["attribution"]["layer"]) + 0.35
    columns = sorted(set(n["position"].astype(int)))
    column = {p: k for k, p in enumerate(columns)}
    n["x"] = n["position"].astype(int).map(column).astype(float)
    for _, cell in n.groupby(["y", "x"]):  # spread the nodes of one (layer, position) cell across its column
        if len(cell) > 1:
            n.loc[cell.index, "x"] += np.linspace(-0.42, 0.42, len(cell))
    where = dict(zip(n["node"], zip(n["x"], n["y"], strict=True), strict=True))
    fig = go.Figure()
    edges = graph.edges
    hop = edges["direction"].isin(["backward", "forward"])
    scale = {
        True: float(edges.loc[hop, "weight"].abs().max()) if hop.any() else 1.0,
        False: float(edges.loc[~hop, "weight"].abs().max()) if (~hop).any() else 1.0,
    }
    for e, is_hop in zip(edges.itertuples(index=False), hop, strict=True):
        if e.source not in where or e.target not in where:
            continue
        (x0, y0), (x1, y1) = where[e.source], where[e.target]
        fig.add_trace(
            go.Scatter(
                x=[x0, x1],
                y=[y0, y1],
                mode="lines",
                line={
                    "color": _SIGN_COLORS[e.weight < 0],
                    "width": 0.5 + 5 * abs(e.weight) / (scale[is_hop] or 1),
                },
                opacity=0.7 if is_hop else 0.18,
                hoverinfo="text",
                showlegend=False,
                text=f"{e.source} → {e.target}<br>weight {e.weight:+.4g} ({e.direction}, hop {e.hop})",
            )
        )
    isa_max = float(n["isa"].abs().max()) if n["isa"].notna().any() else 1.0
    named = set(graph.feature_nodes().sort_values("isa", key=abs, ascending=False)["node"].head(labels))
    n["label_at"] = "top center"
    for _, row in (
        n[n["node"].isin(named)].sort_values("x").groupby("y")
    ):  # alternate so neighbours don't clash
        n.loc[row.index[1::2], "label_at"] = "bottom center"
    for kind, part in n.groupby("kind", sort=False):
        size = np.where(part["isa"].notna(), 8 + 32 * part["isa"].abs() / (isa_max or 1.0), 22)
        fig.add_trace(
            go.Scatter(
                x=part["x"],
                y=part["y"],
                mode="markers+text",
                name=kind,
                marker={
                    "size": size,
                    "color": _KIND_COLORS.get(kind, "#444"),
                    "line": {"width": 1, "color": "white"},
                },
                text=[
                    r.name if r.node in named or r.kind in ("steer", "metric") else ""
                    for r in part.itertuples()
                ],
                textposition=part["label_at"].tolist(),
                textfont={"size": 10},
                hoverinfo="text",
                hovertext=[_hover(r) for r in part.itertuples(index=False)],
            )
        )
    tokens = s["prompt_token_strings"]
    fig.update_layout(
        title=title
        or (
            f"Steering attribution: {s['concept']} → {n.loc[n['kind'] == 'metric', 'name'].iloc[0]} "
            f"(α from {min(s['attribution']['strengths']):g} to {max(s['attribution']['strengths']):g}, "
            f"{s['attribution']['integration']})"
        ),
        template="plotly_white",
        width=width,
        height=height,
        xaxis={
            "title": "prompt position",
            "tickmode": "array",
            "tickvals": list(range(len(columns))),
            "ticktext": [f"{p}: {_show(tokens[p])}" for p in columns],
            "range": [-0.6, len(columns) - 0.4],
        },
        yaxis={"title": "layer", "range": [-0.8, n_layers + 1]},
        legend={"orientation": "h", "y": -0.15},
    )
    fig.add_annotation(
        text="Edge weights are total effects integrated over α: they do not add up along paths.",
        xref="paper",
        yref="paper",
        x=0,
        y=1.04,
        showarrow=False,
        font={"size": 11},
    )
    return fig


def _show(token: str) -> str:
    """A token as a tick label: line breaks and bare spaces made visible."""
    shown = token.replace("\n", "⏎")
    return shown if shown.strip() else repr(token)


def _hover(r: Any) -> str:
    if r.kind == "steer":
        return r.name
    if r.kind == "metric":
        return f"metric: {r.name} at position {r.position}"
    lines = [f"<b>{r.node}</b>", f"ISA {r.isa:+.4g} (hop {r.hop})"]
    if r.kind == "feature":
        lines += [
            f"activation {r.activation:.3g} at top α, {r.activation_0:.3g} at lowest",
            f"logit lens: {r.top_tokens}",
        ]
    return "<br>".join(lines)
