"""The Neuronpedia / circuit-tracer view of an attribution graph: :func:`neuronpedia_json` writes a graph in
circuit-tracer's graph-file layout (what Neuronpedia's graph viewer reads), top level ``metadata``,
``qParams``, ``nodes`` and ``links``, with the field names and order of :data:`NEURONPEDIA_METADATA`,
:data:`NEURONPEDIA_NODE` and :data:`NEURONPEDIA_LINK`.

It reads only a graph's frames and settings (:class:`GraphFrames`), so it does not depend on how the graph
was built (:mod:`mechintro.attribution.graph`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Protocol

import pandas as pd

from mechintro.attribution.metric import Metric

__all__ = [
    "NEURONPEDIA_LINK",
    "NEURONPEDIA_METADATA",
    "NEURONPEDIA_NODE",
    "NEURONPEDIA_QPARAMS",
    "NEURONPEDIA_TYPES",
    "GraphFrames",
    "cantor",
    "neuronpedia_json",
]


class GraphFrames(Protocol):
    """What the export reads of a graph (an :class:`mechintro.attribution.graph.AttributionGraph`)."""

    nodes: pd.DataFrame
    edges: pd.DataFrame
    settings: dict[str, Any]


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


def neuronpedia_json(graph: GraphFrames, *, slug: str | None = None, scan: str | None = None) -> dict:
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
