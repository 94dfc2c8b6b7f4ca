"""The attribution-graph analysis of ``analyses/fig_attribution_graph.py``: graphs of a few held-out concepts
and every number the README reports about them.

For each graph concept: the attribution over the strength grid (default 21 points from 0 to the model's
strength s*), the graph (depth 2, both hop directions), its figure (offline HTML + PNG), its JSON and its
Neuronpedia / circuit-tracer JSON, and the parquet frames of the attribution. Then:

* the fundamental-theorem check: ∫ dL/dα over the grid against L(s*) - L(0);
* per layer, how much of that layer's total the graph's features explain (``Σ_kept ISA / ∫ total``);
* beside find_gates / find_evidence_carriers (on the grid of ``--concepts``): is the top gate in the graph,
  and which carriers of it are on the path;
* a causal check: for the top features by ISA, the measured change of L at s* when each is patched back
  to its unsteered (α = 0) activation at its position, against its ISA (Spearman; reported, not asserted).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from mechintro.attribution.config import AttributionConfig, GraphConfig
from mechintro.attribution.graph import attribution_graph
from mechintro.attribution.passes import steering_attribution
from mechintro.attribution.strengths import strength_grid
from mechintro.cli import setup as runs
from mechintro.cli.options import add_config_arguments, config_from_args
from mechintro.core.concepts import concept_vectors
from mechintro.core.prompts import trial_prompt
from mechintro.core.readout import yes_no_gap
from mechintro.core.steering import inject
from mechintro.mechanism.curves import success_failure
from mechintro.mechanism.features import find_evidence_carriers
from mechintro.mechanism.interventions import intervene
from mechintro.plots.graph import graph_figure

RUN_OPTION_FIELDS = ("layer", "batch_size", "progress")
"""AttributionConfig fields the run options already set: ``--layer`` (the injection layer, through the model's
spec), ``--batch-size`` and ``--quiet``."""


def causal_check(s: runs.Setup, att: Any, concept: str, *, top: int) -> pd.DataFrame:
    """For the ``top`` transcoder features by ISA: ΔL at the top strength when the feature is patched back to
    its activation at the lowest strength (0 if inactive there), at its position, with the injection on."""
    isa = att.isa()
    isa = isa[(isa["concept"] == concept) & (isa["dictionary"] == "transcoder")]
    chosen = isa.reindex(isa["isa"].abs().sort_values(ascending=False).index).head(top)
    settings = att.settings
    low, high = min(settings.strengths), max(settings.strengths)
    f = att.features
    prompt = trial_prompt(s.model, trial=settings.trial, variant=settings.variant)
    vector = att.vectors[list(settings.concepts).index(concept)]
    tokens = prompt.tokens[None].to(s.model.cfg.device)
    inj = dict(layer=settings.layer, strength=high, start=prompt.injection_start)
    with torch.no_grad(), inject(s.model, vector, **inj):
        base = float(yes_no_gap(s.model(tokens)[0, -1], s.spec))
    rows = []
    for r in chosen.itertuples(index=False):
        at_low = f[
            (f["concept"] == concept)
            & (f["strength"] == low)
            & (f["layer"] == r.layer)
            & (f["position"] == r.position)
            & (f["feature"] == r.feature)
        ]["activation"]
        target = float(at_low.iloc[0]) if len(at_low) else 0.0
        with (
            torch.no_grad(),
            inject(s.model, vector, **inj),
            intervene(
                s.model,
                s.transcoders,
                [(r.layer, r.feature)],
                target=target,
                positions=[int(r.position)],
                scale="decoder",
            ),
        ):
            patched = float(yes_no_gap(s.model(tokens)[0, -1], s.spec))
        rows.append(
            {"feature": r.name, "position": int(r.position), "isa": r.isa, "delta_metric": base - patched}
        )
    return pd.DataFrame(rows)


def compare(graph: Any, gates: pd.DataFrame, carriers: dict[str, pd.DataFrame]) -> dict[str, Any]:
    """Is find_gates' top gate in the graph; which of its evidence carriers (each table of ``carriers``: the
    concept-mean set, and the per-(gate, concept) set of the paper's code) are in the graph; and what each
    table calls the features the graph finds feeding that gate."""
    nodes = graph.feature_nodes()
    nodes = nodes[nodes["dictionary"] == "transcoder"]
    names = set(nodes["name"])
    gate = gates["feature"].iloc[0]
    in_graph = nodes[nodes["name"] == gate]
    ranked = nodes.sort_values("isa", ascending=False)["name"].tolist()
    edges = graph.edges
    hops = edges["direction"].isin(["backward", "forward"])
    into_gate = edges[edges["target"].isin(set(in_graph["node"])) & hops]
    out: dict[str, Any] = {
        "top_gate": gate,
        "top_gate_in_graph": bool(len(in_graph)),
        "top_gate_isa_rank": ranked.index(gate) + 1 if gate in ranked else None,
        "top_gate_positions": sorted(int(p) for p in in_graph["position"]),
        "gates_top10_in_graph": [g for g in gates["feature"].head(10) if g in names],
        "graph_features_feeding_the_gate": [
            {"node": src, "weight": float(w)}
            for src, w in zip(into_gate["source"], into_gate["weight"], strict=True)
        ],
    }
    for label, table in carriers.items():
        roles = table.set_index("feature")[["role", "rank"]]
        top = table[table["role"] == "carrier"]["feature"].head(20).tolist()
        out[f"{label}_top20"] = top
        out[f"{label}_top20_in_graph"] = [c for c in top if c in names]
        for row in out["graph_features_feeding_the_gate"]:
            name = row["node"].split(" @")[0]
            row[f"{label}_role"] = (
                f"{roles.loc[name, 'role']} #{int(roles.loc[name, 'rank'])}" if name in roles.index else None
            )
    return out


def parser(doc: str | None = __doc__) -> argparse.ArgumentParser:
    """The script's flags: the mechanism run options, the graph concepts, every
    :class:`~mechintro.attribution.config.AttributionConfig` and
    :class:`~mechintro.attribution.config.GraphConfig` field (derived from the fields, with their docstrings
    as help), the causal check's size and the comparison switch."""
    p = runs.mechanism_parser(doc)
    p.add_argument("--concept", action="append", default=None, help="a graph concept (repeat for several)")
    p.add_argument("--n-graphs", type=int, default=2, help="most- and least-detected concepts graphed (each)")
    add_config_arguments(p.add_argument_group("attribution"), AttributionConfig, exclude=RUN_OPTION_FIELDS)
    add_config_arguments(p.add_argument_group("graph"), GraphConfig)
    p.add_argument("--top", type=int, default=15, help="top features in the causal check")
    p.add_argument(
        "--compare",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compare with find_gates/find_evidence_carriers, which needs the trials of --concepts (default: "
        "on, off when --concept names the graph concepts)",
    )
    return p


def graph_config(args: argparse.Namespace) -> GraphConfig:
    """The graph's settings from the parsed flags; the root attribution's batch size and progress bar come
    from the run options, its injection layer from the model's spec (which ``--layer`` sets)."""
    root = config_from_args(
        AttributionConfig, args, layer=None, batch_size=args.batch_size, progress=not args.quiet
    )
    return config_from_args(GraphConfig, args, root=root)


def main(argv: Sequence[str] | None = None, *, doc: str | None = __doc__) -> dict[str, Any]:
    p = parser(doc)
    args = p.parse_args(argv)
    try:
        cfg = graph_config(args)
    except (TypeError, ValueError) as err:
        p.error(str(err))
    s = runs.load_setup(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = cfg.root.strengths or strength_grid(s.model, cfg.root.points)
    gates = carriers = None
    if not (args.compare if args.compare is not None else args.concept is None):
        concepts = args.concept or s.concepts[: args.n_graphs]
    else:
        rates = runs.behaviour(s)
        feature_grid, gates = runs.grid_and_gates(s, rates)
        carrier_rates = runs.carrier_behaviour(rates)

        def carriers_of(concept: str | None) -> pd.DataFrame:
            return find_evidence_carriers(
                s.model,
                s.transcoders,
                feature_grid,
                gates["feature"].iloc[0],
                behaviour=carrier_rates,
                concept=concept,
                include_other=True,
            )

        carriers = carriers_of(None)
        picked = success_failure(rates, n=args.n_graphs)
        concepts = args.concept or picked["success"] + picked["failure"]
    unknown = [c for c in concepts if c not in s.concepts]
    if unknown:
        vectors = torch.cat([s.vectors, concept_vectors(s.model, unknown, layer=s.spec.injection_layer)])
        known = s.concepts + unknown
    else:
        vectors, known = s.vectors, s.concepts
    rows = [known.index(c) for c in concepts]
    started = time.perf_counter()
    att = steering_attribution(
        s.model, s.transcoders, concepts, config=cfg.root, vectors=vectors[rows], strengths=grid
    )
    seconds_attribution = time.perf_counter() - started
    for path in att.to_parquet(out / "attribution"):
        print(path)
    summary: dict[str, Any] = {
        "model": s.spec.name,
        "strength_top": max(grid),
        "strengths": list(grid),
        "integration": cfg.root.integration,
        "depth": cfg.depth,
        "seconds_attribution": seconds_attribution,
        "concepts": {},
    }
    weights = att.weights
    for concept in concepts:
        started = time.perf_counter()
        graph = attribution_graph(s.model, s.transcoders, concept, config=cfg, attribution=att)
        seconds_graph = time.perf_counter() - started
        slug = concept.replace(" ", "_")
        graph.to_json(out / f"attribution_graph_{slug}.json")
        graph.to_neuronpedia(out / f"attribution_graph_{slug}_neuronpedia.json")
        runs.save(graph_figure(graph), f"attribution_graph_{slug}", out, offline=True)
        m = att.metric[att.metric["concept"] == concept].set_index("strength")
        integral = float(sum(weights[a] * m.loc[a, "slope"] for a in grid))
        change = float(m.loc[max(grid), "value"] - m.loc[min(grid), "value"])
        feats = graph.feature_nodes().sort_values("isa", ascending=False)
        causal = causal_check(s, att, concept, top=args.top)
        rho = (
            float(causal[["isa", "delta_metric"]].corr(method="spearman").iloc[0, 1])
            if len(causal) > 2
            else None
        )
        layers = graph.layers[
            ["dictionary", "layer", "total", "features", "skip", "error", "kept_isa", "explained"]
        ]
        info: dict[str, Any] = {
            "metric_at_0": float(m.loc[min(grid), "value"]),
            "metric_at_top": float(m.loc[max(grid), "value"]),
            "integral_of_slope": integral,
            "metric_change": change,
            "n_feature_nodes": len(feats),
            "n_edges": len(graph.edges),
            "seconds_graph": seconds_graph,
            "top_features": feats[["node", "hop", "isa", "activation", "activation_0", "top_tokens"]]
            .head(10)
            .to_dict("records"),
            "layer_shares": layers.to_dict("records"),
            "causal_spearman": rho,
            "causal": causal.to_dict("records"),
        }
        if gates is not None:
            tables = {"carriers": carriers}
            if concept in feature_grid.concepts:
                tables["concept_carriers"] = carriers_of(concept)
            info["versus_gates_and_carriers"] = compare(graph, gates, tables)
        summary["concepts"][concept] = info
        runs.save(None, "", out, [(f"attribution_causal_{slug}", causal)])
        print(
            f"\n== {concept}: L(0) = {info['metric_at_0']:+.3f}, L(s*) = {info['metric_at_top']:+.3f}; "
            f"∫ dL/dα = {integral:+.4f} vs ΔL = {change:+.4f} ({cfg.root.integration}, {len(grid)} points)"
        )
        print(
            feats[["node", "hop", "isa", "activation", "activation_0", "top_tokens"]]
            .head(12)
            .to_string(index=False)
        )
        print("per layer (never summed across layers): explained = Σ kept ISA / ∫ total")
        print(layers.round(4).to_string(index=False))
        print(
            f"causal check, top {len(causal)} features by |ISA|: Spearman(ISA, ΔL when patched to α=0) = "
            f"{rho if rho is None else round(rho, 3)}"
        )
        if gates is not None:
            print(json.dumps(info["versus_gates_and_carriers"], indent=1))
    path = out / "attribution_summary.json"
    path.write_text(json.dumps(summary, indent=1, default=float))
    print(path)
    return summary
