"""Steering-attribution graphs: which features carry the injected vector to the answer, hop by hop.

An :class:`AttributionGraph` is data first: a nodes frame, an edges frame, a per-layer table of explained
shares and its settings. The Neuronpedia / circuit-tracer JSON (:meth:`AttributionGraph.to_neuronpedia`,
:mod:`mechintro.attribution.neuronpedia`) and the plotly figure (:func:`mechintro.plots.graph.graph_figure`)
are views of it.

**Nodes.** The steering vector (``steer``), the metric (``metric``, e.g. the Yes-No gap), dictionary features
at (layer, position), and per (dictionary site, position) of a kept feature its ``error`` and ``skip`` terms.

**Edge weights** (:mod:`mechintro.attribution.hops`): ``w(f -> g)``, the total effect of f on g's
pre-activation times g's gradient attribution and f's steering gradient, integrated over the strength grid;
``w(steer -> f) = ISA(f)`` and ``w(f -> metric) = ISA(f)`` for the hop-0 features. Edges are **total
effects**: they do not add up along paths.

**Selection** (every setting a field of :class:`mechintro.attribution.config.GraphConfig`, recorded in the
graph's settings):
hop 0 keeps the features with positive ISA; then, per parent and per dictionary type, weights above
``rel_threshold`` times that type's largest, at most ``caps[hop]`` per parent (the last cap for deeper
hops); frontier nodes are expanded in both directions to ``depth`` hops; a duplicate edge keeps its largest
``|weight|``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from mechintro.attribution.config import GraphConfig, graph_config_with
from mechintro.attribution.hops import (
    FEATURE_KEY,
    HopContext,
    backward_hop,
    candidates,
    forward_hop,
    hop_context,
)
from mechintro.attribution.neuronpedia import neuronpedia_json
from mechintro.attribution.passes import steering_attribution
from mechintro.attribution.result import SteeringAttribution
from mechintro.attribution.sites import (
    Dictionaries,
    DictionarySite,
    dictionary_feature_name,
    site_label,
)
from mechintro.core.html import card
from mechintro.core.models import Model, Transcoders, spec_for
from mechintro.core.readout import unembedding

__all__ = ["AttributionGraph", "attribution_graph"]

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


# ---------------------------------------------------------------------------------------- nodes and selection


def _node_id(kind: str, dictionary: str = "", layer: int = -1, position: int = -1, feature: int = -1) -> str:
    """A readable unique node name: ``"L5 F12 @130"``, ``"error L5 @130"``, ``"steer"``, ``"metric"``."""
    if kind == "feature":
        return f"{dictionary_feature_name(dictionary, layer, feature)} @{position}"
    if kind in ("error", "skip"):
        return f"{kind} {site_label(dictionary, layer)} @{position}"
    return kind


def _select(cands: pd.DataFrame, *, settings: GraphConfig, hop: int) -> pd.DataFrame:
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


# ----------------------------------------------------------------------------------------------- building


def _logit_lens(model: Model, dicts: Dictionaries, nodes: pd.DataFrame, k: int = TOP_TOKENS) -> list[str]:
    """Top-``k`` unembedding tokens of each feature node's decoder row (through ``o_proj`` for attention
    SAEs; no final-norm scaling, like the DLA direction)."""
    w_u = unembedding(model).detach()
    tok = model.tokenizer
    out = [""] * len(nodes)
    feats = nodes[nodes["kind"] == "feature"]
    for (kind, layer), part in feats.groupby(["dictionary", "layer"], sort=False):  # one dictionary at a time
        site = DictionarySite(kind, int(layer))
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
        for k, v in zip(isa[FEATURE_KEY].itertuples(index=False, name=None), isa["isa"], strict=True)
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
    depth: int | None = None,
    *,
    config: GraphConfig | None = None,
    saes: Any = None,
    vector: Tensor | None = None,
    attribution: SteeringAttribution | None = None,
    **settings: Any,
) -> AttributionGraph:
    """The steering-attribution graph of one concept: injection -> features -> metric, hop by hop.

    Args:
        transcoders / saes: as :func:`mechintro.attribution.passes.steering_attribution` (which runs first,
            for ``concept`` alone, unless ``attribution`` is given).
        concept: the injected concept.
        depth: hops beyond hop 0 (default: the config's, 2).
        config: the settings (:class:`~mechintro.attribution.config.GraphConfig`): the selection (depth,
            directions, rel_threshold, caps, sign, remainders) and, in its ``root``, those of the root
            attribution (strengths, metric, integration, layer, trial, variant) and of every pass
            (batch_size, prefix_cache, progress).
        vector: the concept vector (default: computed at the injection layer).
        attribution: a :class:`~mechintro.attribution.result.SteeringAttribution` that includes ``concept``
            (its strengths, metric, prompt and vectors are used; the root's strengths, metric... are then
            ignored).
        **settings: fields of :class:`~mechintro.attribution.config.GraphConfig` or of its root
            :class:`~mechintro.attribution.config.AttributionConfig` as keywords (``caps=``, ``strengths=``,
            ``batch_size=``...), replacing ``config``'s.

    Returns an :class:`AttributionGraph`.
    """
    if depth is not None:
        settings = {"depth": depth, **settings}
    cfg = graph_config_with(config, settings, caller="attribution_graph")
    if attribution is None:
        attribution = steering_attribution(
            model,
            transcoders,
            [concept],
            config=cfg.root,
            saes=saes,
            vectors=None if vector is None else torch.as_tensor(vector)[None],
        )
    elif concept not in attribution.settings.concepts:
        raise ValueError(
            f"{concept!r} is not in the attribution, which has {list(attribution.settings.concepts)}"
        )
    dicts = Dictionaries(model, transcoders, saes)
    ctx = hop_context(
        model, dicts, attribution, concept, batch_size=cfg.root.batch_size, prefix_cache=cfg.root.prefix_cache
    )
    isa = attribution.isa()
    isa = isa[isa["concept"] == concept].set_index(FEATURE_KEY)["isa"]
    found = _Found()
    _grow(found, ctx, isa, cfg)
    for name, node in list(found.nodes.items()):
        weight = float(isa.get(tuple(node[k] for k in FEATURE_KEY), 0.0))
        found.add_edge("steer", name, weight, node["hop"], "steer")
    if cfg.remainders:
        _add_remainders(attribution, concept, found)
    return _assemble(model, dicts, attribution, concept, cfg, found.nodes, found.edges, isa)


@dataclass
class _Found:
    """The nodes and edges a graph has kept so far, by node name and by (source, target)."""

    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    edges: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    def add_node(self, key: tuple, hop: int) -> tuple[str, bool]:
        """The feature node of ``key`` (dictionary, layer, position, feature), and whether it is new."""
        name = _node_id("feature", *key)
        if name in self.nodes:
            return name, False
        self.nodes[name] = dict(zip(FEATURE_KEY, key, strict=True)) | {"kind": "feature", "hop": hop}
        return name, True

    def add_edge(self, source: str, target: str, weight: float, hop: int, direction: str) -> None:
        """Keep the edge; one found twice keeps its largest ``|weight|``."""
        old = self.edges.get((source, target))
        if old is None or abs(weight) > abs(old["weight"]):
            self.edges[(source, target)] = {"weight": float(weight), "hop": hop, "direction": direction}


def _grow(found: _Found, ctx: HopContext, isa: pd.Series, cfg: GraphConfig) -> None:
    """Hop 0 (the features with the selected ISA, wired to the metric), then ``cfg.depth`` hops from each
    frontier in every direction."""
    hop0 = isa.reset_index().rename(columns={"isa": "weight"})
    frontier = []
    for row in _select(hop0, settings=cfg, hop=0).itertuples(index=False):
        key = (row.dictionary, int(row.layer), int(row.position), int(row.feature))
        name, _ = found.add_node(key, 0)
        found.add_edge(name, "metric", row.weight, 0, "root")
        frontier.append(name)
    for hop in range(1, cfg.depth + 1):
        parents = [found.nodes[name] for name in frontier]
        new: list[str] = []
        for direction in cfg.directions:
            hop_fn = backward_hop if direction == "backward" else forward_hop
            cands = hop_fn(ctx, parents) if parents else candidates([])
            for p, part in cands.groupby("parent", sort=False):
                parent_name = frontier[int(p)]
                for row in _select(part, settings=cfg, hop=hop).itertuples(index=False):
                    key = (row.dictionary, int(row.layer), int(row.position), int(row.feature))
                    name, fresh = found.add_node(key, hop)
                    if fresh:
                        new.append(name)
                    ends = (name, parent_name) if direction == "backward" else (parent_name, name)
                    found.add_edge(*ends, row.weight, hop, direction)
        frontier = new


def _add_remainders(att: SteeringAttribution, concept: str, found: _Found) -> None:
    """Error and skip nodes for every (site, position) that holds a kept feature, wired to both ends."""
    rem = att.integrated_remainders()
    rem = rem[rem["concept"] == concept].set_index(["dictionary", "layer", "position"])
    nodes = found.nodes
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
            found.add_edge("steer", name, value, 0, "steer")
            found.add_edge(name, "metric", value, 0, "root")


def _assemble(
    model: Model,
    dicts: Dictionaries,
    att: SteeringAttribution,
    concept: str,
    settings: GraphConfig,
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
        "graph": settings.selection(),
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


def _transcoder_list(spec: Any, sites: Sequence[DictionarySite]) -> list[str]:
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
    * ``settings``: the concept, the selection (:meth:`GraphConfig.selection`), the attribution's settings,
      the
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
