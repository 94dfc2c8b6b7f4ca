"""Steering-attribution graphs: one edge weight whichever direction finds it, a known answer built by
construction and computed by hand, selection, the Neuronpedia export against a hand-written fixture, JSON
round trips and the figure. Float64 end to end (the ``true_float64`` fixture, see tests/conftest.py)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
import torch

from mechintro.attribution.config import GraphConfig
from mechintro.attribution.graph import AttributionGraph, _select, attribution_graph
from mechintro.attribution.hops import backward_hop, forward_hop, hop_context
from mechintro.attribution.neuronpedia import NEURONPEDIA_METADATA, NEURONPEDIA_NODE
from mechintro.attribution.passes import steering_attribution
from mechintro.attribution.sites import Dictionaries
from mechintro.attribution.strengths import quadrature_weights
from mechintro.core.concepts import concept_vectors
from mechintro.core.hooks import capture
from mechintro.core.models import HookNames, load_model, spec_for, with_spec
from mechintro.core.prompts import trial_prompt
from mechintro.core.readout import unembedding, yes_no_direction
from mechintro.core.transcoders import load_transcoders, replace_mlps
from mechintro.testing import save_random_transcoders

GRID = [0.0, 1.0, 2.0, 3.0]


@pytest.fixture(scope="module")
def m64(tiny_dir, true_float64):
    model = load_model(tiny_dir, device="cpu", dtype=torch.float64)
    with_spec(model, injection_layer=0)
    return model


@pytest.fixture(scope="module")
def tc64(m64, tmp_path_factory):
    tcs = load_transcoders(m64, source=save_random_transcoders(tmp_path_factory.mktemp("tc"), seed=3))
    return {layer: tc.to(torch.float64) for layer, tc in tcs.items()}


@pytest.fixture(scope="module")
def attn_sae():
    from tests.attribution.test_attribution import random_sae

    return random_sae(64, seed=9, hook="blocks.2.attn.hook_z", z=True)


@pytest.fixture(scope="module")
def vec(m64):
    return concept_vectors(m64, ["Bread"], layer=0).double()


@pytest.fixture(scope="module")
def graph(m64, tc64, vec):
    return attribution_graph(m64, tc64, "Bread", strengths=GRID, vector=vec[0])


# ----------------------------------------------------------------------------------------------- hops


def test_backward_and_forward_hops_give_the_same_edge_weight(m64, tc64, attn_sae, vec):
    """For pairs (f upstream, g downstream) across transcoders and an attention SAE: the backward pass from
    g's pre-activation and the JVP of f's decoder row give the same integrated weight."""
    saes = {("attn_z", 2): attn_sae}
    att = steering_attribution(m64, tc64, ["Bread"], saes=saes, strengths=GRID, vectors=vec)
    ctx = hop_context(m64, Dictionaries(m64, tc64, saes), att, "Bread", batch_size=8, prefix_cache=True)
    isa = att.isa()
    checked, pairs = 0, set()
    for dictionary, layer in (("transcoder", 3), ("attn_z", 2)):
        parent = isa[(isa["dictionary"] == dictionary) & (isa["layer"] == layer)].iloc[0]
        parent = parent[["dictionary", "layer", "position", "feature"]].to_dict()
        back = backward_hop(ctx, [parent])
        back = back.reindex(back["weight"].abs().sort_values(ascending=False).index).head(4)
        assert len(back) == 4 and back["weight"].abs().min() > 0
        children = back[["dictionary", "layer", "position", "feature"]].to_dict("records")
        fwd = forward_hop(ctx, children)
        for k, child in enumerate(children):
            mine = fwd[fwd["parent"] == k]
            hit = mine[
                (mine["dictionary"] == parent["dictionary"])
                & (mine["layer"] == parent["layer"])
                & (mine["position"] == parent["position"])
                & (mine["feature"] == parent["feature"])
            ]
            assert len(hit) == 1, (child, parent)
            expected = back.iloc[k]["weight"]
            assert hit["weight"].iloc[0] == pytest.approx(expected, rel=1e-9, abs=1e-15)
            checked += 1
            pairs.add((child["dictionary"], child["layer"], parent["dictionary"], parent["layer"]))
    assert checked == 8
    assert len(pairs) >= 3, "pairs across layers and dictionary kinds"
    assert any(a != b for a, _, b, _ in pairs)


# ----------------------------------------------------------------------------------------------- known answer


def _norm(norm, x):
    return x * torch.rsqrt(x.pow(2).mean() + norm.eps) * (1 + norm.weight.detach())


def _norm_jvp(norm, x, u):
    """d N(x)[u] for Gemma's RMSNorm N(x) = x / rms(x) * (1 + w)."""
    r = torch.rsqrt(x.pow(2).mean() + norm.eps)
    return (1 + norm.weight.detach()) * (r * u - x * r**3 * (x @ u) / len(x))


def _norm_vjp(norm, x, u):
    """dN(x)^T u."""
    r = torch.rsqrt(x.pow(2).mean() + norm.eps)
    wu = (1 + norm.weight.detach()) * u
    return r * wu - x * r**3 * (x @ wu) / len(x)


@pytest.fixture(scope="module")
def planted(tiny_dir, true_float64, tmp_path_factory):
    """Layers 2 and 3 of a float64 tiny Gemma 3 without attention output (o_proj = 0) and with their MLPs
    replaced by transcoders; injection at layer 1. Feature 0 of layer 2 is a carrier that fires with the
    injection and writes against the encoder of feature 0 of layer 3, a gate active unsteered that writes
    "No". Every other feature is random with a decoder 20x smaller, and the skip paths are off."""
    model = load_model(tiny_dir, device="cpu", dtype=torch.float64)
    with_spec(model, injection_layer=1)
    hf = model.original_model.model
    tcs = load_transcoders(model, source=save_random_transcoders(tmp_path_factory.mktemp("ka"), seed=11))
    tcs = {layer: tc.to(torch.float64) for layer, tc in tcs.items()}
    p = trial_prompt(model, trial=1)
    v = concept_vectors(model, ["Bread"], layer=1).double()[0]
    with torch.no_grad(), capture(model, [HookNames.resid_post(1)], positions="last") as acts:
        model(p.tokens[None])
    r1 = acts[HookNames.resid_post(1)][0, 0]
    n2, n3 = hf.layers[2].pre_feedforward_layernorm, hf.layers[3].pre_feedforward_layernorm
    t2, t3 = tcs[2], tcs[3]
    with torch.no_grad():
        for layer in (2, 3):
            hf.layers[layer].self_attn.o_proj.weight.zero_()
            tcs[layer].W_skip.zero_()
            tcs[layer].W_dec.mul_(0.05)
        e = _norm_jvp(n2, r1, v)
        t2.W_enc[:, 0] = 2.0 * e / e.norm()  # reads the direction the injection moves the MLP input
        t2.b_enc[0] = -float(t2.W_enc[:, 0] @ _norm(n2, r1)) - 0.5  # off unsteered, on from α ≈ 0.25
        t2.threshold[0] = 0.2
        q = torch.randn(64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        t3.W_enc[:, 0] = 1.5 * q / q.norm()
        r2 = r1 + t2.decode(t2.encode(_norm(n2, r1)))
        t3.b_enc[0] = -float(t3.W_enc[:, 0] @ _norm(n3, r2)) + 2.0  # pre-activation 2 unsteered
        t3.threshold[0] = 0.0
        against = (1 + n3.weight.detach()) * q
        t2.W_dec[0] = -3.0 * against / against.norm()  # the carrier writes against the gate's encoder
        d = yes_no_direction(model, spec_for(model)).double()
        t3.W_dec[0] = -2.0 * d / d.norm()  # the gate writes "No"
    return model, tcs, p, v, r1


def _by_hand(model, tcs, v, r1, alpha):
    """The last position of the planted model at strength α, by explicit formulas: forward values, the
    tangents in α, the gradients of the Yes-No gap; returns what each edge needs at this α."""
    hf = model.original_model.model
    n2, n3, nf = (hf.layers[2].pre_feedforward_layernorm, hf.layers[3].pre_feedforward_layernorm, hf.norm)
    t2, t3 = tcs[2], tcs[3]
    spec = spec_for(model)
    with torch.no_grad():
        a = r1 + alpha * v  # attention of layers 2 and 3 writes nothing
        x2 = _norm(n2, a)
        pre2 = x2 @ t2.W_enc + t2.b_enc
        on2 = pre2 > t2.threshold
        r2 = a + (pre2 * on2) @ t2.W_dec + t2.b_dec
        x3 = _norm(n3, r2)
        pre3 = x3 @ t3.W_enc + t3.b_enc
        on3 = pre3 > t3.threshold
        final = r2 + (pre3 * on3) @ t3.W_dec + t3.b_dec
        logits = _norm(nf, final) @ unembedding(model)
        yes, no = list(spec.yes_ids), list(spec.no_ids)
        gap = logits[yes].logsumexp(0) - logits[no].logsumexp(0)
        # tangents
        sg2 = _norm_jvp(n2, a, v) @ t2.W_enc
        dr2 = v + (sg2 * on2) @ t2.W_dec
        sg3 = _norm_jvp(n3, r2, dr2) @ t3.W_enc
        # gradients of the gap
        dlogits = torch.zeros_like(logits)
        dlogits[yes] = torch.softmax(logits[yes], 0)
        dlogits[no] = -torch.softmax(logits[no], 0)
        g_final = _norm_vjp(nf, final, unembedding(model) @ dlogits)
        ga3 = t3.W_dec @ g_final
        g_r2 = g_final + _norm_vjp(n3, r2, t3.W_enc @ (ga3 * on3))
        ga2 = t2.W_dec @ g_r2
        jac = t3.W_enc[:, 0] @ _norm_jvp(n3, r2, t2.W_dec[0])  # ∂pre_gate/∂(carrier's decoder row)
    return {
        "gap": float(gap),
        "carrier": float(on2[0] * ga2[0] * sg2[0]),
        "gate": float(on3[0] * ga3[0] * sg3[0]),
        "carrier_gate": float(on3[0] * ga3[0] * jac * on2[0] * sg2[0]),
        "carrier_on": bool(on2[0]),
        "gate_on": bool(on3[0]),
    }


def test_known_answer_injection_carrier_gate_no(planted):
    model, tcs, p, v, r1 = planted
    grid = [float(x) for x in np.linspace(0.0, 4.0, 11)]
    with replace_mlps(model, {2: tcs[2], 3: tcs[3]}):
        graph = attribution_graph(model, tcs, "Bread", strengths=grid, vector=v, depth=2)
        with torch.no_grad():
            steered = model(p.tokens[None])[0, -1]  # α = 0: the replaced model as built
    w = quadrature_weights(grid)
    hand = [_by_hand(model, tcs, v, r1, a) for a in grid]
    spec = spec_for(model)
    assert hand[0]["gap"] == pytest.approx(
        float(steered[list(spec.yes_ids)].logsumexp(0) - steered[list(spec.no_ids)].logsumexp(0)), abs=1e-10
    ), "the hand formulas compute the model"
    assert not hand[0]["carrier_on"] and hand[-1]["carrier_on"], "the carrier fires with the injection"
    assert hand[0]["gate_on"] and not hand[-1]["gate_on"], "the injection silences the gate"
    expected = {k: float(w @ [h[k] for h in hand]) for k in ("carrier", "gate", "carrier_gate")}
    assert min(expected.values()) > 0.05

    carrier, gate = "L2 F0 @139", "L3 F0 @139"
    nodes = graph.nodes.set_index("node")
    assert nodes.loc[carrier, "hop"] == 0 and nodes.loc[gate, "hop"] == 0
    top = graph.feature_nodes().sort_values("isa", ascending=False)["node"].tolist()
    assert top[:2] == [carrier, gate], "the planted pair leads; the random features are far behind"
    edges = graph.edges.set_index(["source", "target"])["weight"]
    assert edges[("steer", carrier)] == pytest.approx(expected["carrier"], rel=1e-9)
    assert edges[(carrier, gate)] == pytest.approx(expected["carrier_gate"], rel=1e-9)
    assert edges[(gate, "metric")] == pytest.approx(expected["gate"], rel=1e-9)
    assert edges[(carrier, "metric")] == pytest.approx(expected["carrier"], rel=1e-9)
    assert nodes.loc[gate, "activation_0"] == pytest.approx(2.0, abs=1e-9)
    assert nodes.loc[gate, "activation"] == 0.0 and nodes.loc[carrier, "activation_0"] == 0.0
    assert not (graph.nodes["kind"] == "error").any(), "replaced MLPs: no reconstruction error"
    # the layer table: the carrier's and gate's layers, with their ISA
    layers = graph.layers.set_index("layer")
    assert layers.loc[3, "kept_isa"] == pytest.approx(expected["gate"], rel=1e-9)


# ----------------------------------------------------------------------------------------------- selection


def test_selection_thresholds_per_type_caps_per_parent_and_keeps_the_sign():
    cands = pd.DataFrame(
        {
            "dictionary": ["transcoder"] * 5 + ["resid_post"] * 3,
            "layer": [1, 1, 2, 2, 3, 1, 2, 3],
            "position": 10,
            "feature": range(8),
            "weight": [10.0, 2.0, 0.9, -50.0, 1.5, 0.02, 0.3, 0.001],
        }
    )
    keep = _select(cands, settings=GraphConfig(), hop=1)
    # transcoders: above 0.1 x 10 -> 10, 2, 1.5 (0.9 is below; -50 is negative); resid: above 0.1 x 0.3 -> 0.3
    assert keep["weight"].tolist() == [10.0, 2.0, 1.5, 0.3]
    assert _select(cands, settings=GraphConfig(caps=(8, 2)), hop=3)["weight"].tolist() == [10.0, 2.0]
    assert _select(cands, settings=GraphConfig(sign="negative"), hop=0)["weight"].tolist() == [-50.0]
    absolute = _select(cands, settings=GraphConfig(sign="absolute", rel_threshold=0.0), hop=0)
    assert absolute["weight"].tolist()[:3] == [-50.0, 10.0, 2.0]


def test_graph_structure_and_settings(m64, tc64, vec, graph):
    nodes, edges = graph.nodes, graph.edges
    assert nodes["node"].is_unique
    assert set(edges["source"]) | set(edges["target"]) <= set(nodes["node"])
    assert not edges.duplicated(["source", "target"]).any()
    feats = graph.feature_nodes()
    hop0 = feats[feats["hop"] == 0]
    assert 1 <= len(hop0) <= 8 and (hop0["isa"] > 0).all()
    assert (hop0["isa"] > 0.1 * hop0["isa"].max()).all()
    for hop, cap in ((1, 5), (2, 3)):
        per_parent = (
            edges[(edges["hop"] == hop) & (edges["direction"] == "backward")].groupby("target").size()
        )
        assert (per_parent <= cap).all()
    assert (feats["hop"] <= 2).all() and (feats["hop"] >= 1).any()
    for name, row in feats.set_index("node").iterrows():
        assert edges[(edges["source"] == "steer") & (edges["target"] == name)]["weight"].iloc[0] == row["isa"]
    hop_edges = edges[edges["direction"].isin(["backward", "forward"])]
    assert (hop_edges["weight"] > 0).all() and set(hop_edges["direction"]) == {"backward", "forward"}
    shallow = attribution_graph(m64, tc64, "Bread", depth=0, strengths=GRID, vector=vec[0], caps=(2,))
    assert (shallow.feature_nodes()["hop"] == 0).all() and len(shallow.feature_nodes()) == 2
    assert shallow.settings["graph"]["caps"] == [2] and shallow.settings["graph"]["depth"] == 0
    with pytest.raises(ValueError, match="valid: \\['backward', 'forward'\\]"):
        attribution_graph(m64, tc64, "Bread", strengths=GRID, directions=("sideways",))
    with pytest.raises(ValueError, match="valid: \\['positive', 'negative', 'absolute'\\]"):
        attribution_graph(m64, tc64, "Bread", strengths=GRID, sign="big")
    with pytest.raises(ValueError, match="caps"):
        attribution_graph(m64, tc64, "Bread", strengths=GRID, caps=(0,))
    with pytest.raises(ValueError, match="is not in the attribution"):
        att = steering_attribution(m64, tc64, ["Oceans"], strengths=GRID)
        attribution_graph(m64, tc64, "Bread", attribution=att)


def test_an_edge_found_twice_keeps_its_largest_weight(m64, tc64, vec, graph, monkeypatch):
    """An edge between two frontier nodes is found by the backward hop of one and the forward hop of the
    other, with equal weights. Scale one direction's weights by 3 (which changes no selection) and the graph
    keeps the scaled copy, whichever direction it came from."""
    import mechintro.attribution.graph as graphs

    forward, backward = graphs.forward_hop, graphs.backward_hop
    triple = lambda hop: lambda *a: hop(*a).assign(weight=lambda d: 3 * d["weight"])  # noqa: E731
    monkeypatch.setattr(graphs, "forward_hop", triple(forward))
    a = attribution_graph(m64, tc64, "Bread", strengths=GRID, vector=vec[0], depth=1)
    monkeypatch.setattr(graphs, "forward_hop", forward)
    monkeypatch.setattr(graphs, "backward_hop", triple(backward))
    b = attribution_graph(m64, tc64, "Bread", strengths=GRID, vector=vec[0], depth=1)
    plain = graph.edges[graph.edges["hop"] == 1].set_index(["source", "target"])["weight"]
    ea = a.edges[a.edges["hop"] == 1].set_index(["source", "target"])
    eb = b.edges[b.edges["hop"] == 1].set_index(["source", "target"])
    assert ea.index.equals(eb.index), "scaling one direction selects the same edges"
    twice = ea.index[(ea["direction"] == "forward") & (eb["direction"] == "backward")]
    assert len(twice) >= 1, "edges between hop-0 nodes are found both ways"
    np.testing.assert_allclose(ea.loc[twice, "weight"], 3 * plain.loc[twice], rtol=1e-12)
    np.testing.assert_allclose(eb.loc[twice, "weight"], 3 * plain.loc[twice], rtol=1e-12)


def test_error_and_skip_nodes_carry_the_integrated_remainders(m64, tc64, vec, graph):
    att = steering_attribution(m64, tc64, ["Bread"], strengths=GRID, vectors=vec)
    w = dict(zip(GRID, quadrature_weights(GRID), strict=True))
    r = att.remainders
    rest = graph.nodes[graph.nodes["kind"].isin(["error", "skip"])]
    assert set(rest["kind"]) == {"error", "skip"}
    places = set(zip(graph.feature_nodes()["layer"], graph.feature_nodes()["position"], strict=True))
    assert set(zip(rest["layer"], rest["position"], strict=True)) == places
    for node in rest.itertuples(index=False):
        part = r[(r["layer"] == node.layer) & (r["position"] == node.position)]
        by_hand = sum(w[a] * v for a, v in zip(part["strength"], part[node.kind], strict=True))
        assert node.isa == pytest.approx(by_hand, rel=1e-12)
        e = graph.edges.set_index(["source", "target"])["weight"]
        assert e[("steer", node.node)] == node.isa and e[(node.node, "metric")] == node.isa


def test_layer_shares_of_the_graph(graph):
    layers = graph.layers
    feats = graph.feature_nodes()
    for layer, part in feats.groupby("layer"):
        row = layers[layers["layer"] == layer].iloc[0]
        assert row["kept_isa"] == pytest.approx(part["isa"].sum(), rel=1e-12)
        assert row["explained"] == pytest.approx(row["kept_isa"] / row["total"], rel=1e-12)
    assert set(layers.columns) >= {"total", "features", "skip", "error", "kept_isa", "explained"}


# ----------------------------------------------------------------------------------------------- exports


def _hand_graph() -> AttributionGraph:
    """A small graph written by hand: one feature (layer 3, index 35, position 9), its error term."""
    nodes = pd.DataFrame(
        {
            "node": ["steer", "metric", "L3 F35 @9", "error L3 @9"],
            "kind": ["steer", "metric", "feature", "error"],
            "dictionary": ["", "", "transcoder", "transcoder"],
            "layer": [1, 4, 3, 3],
            "position": [7, 9, 9, 9],
            "feature": [-1, -1, 35, -1],
            "name": ["injected: Bread × α", "Yes − No", "L3 F35", "error L3"],
            "hop": [-1, -1, 0, 0],
            "isa": [float("nan"), float("nan"), 0.5, -0.25],
            "activation": [float("nan"), float("nan"), 1.25, 0.0],
            "activation_0": [float("nan"), float("nan"), 0.5, 0.0],
            "influence": [float("nan"), float("nan"), 0.5, 0.75],
            "top_tokens": ["", "", "Yes, No", ""],
        }
    )
    edges = pd.DataFrame(
        {
            "source": ["steer", "L3 F35 @9", "steer", "error L3 @9"],
            "target": ["L3 F35 @9", "metric", "error L3 @9", "metric"],
            "weight": [0.5, 0.5, -0.25, -0.25],
            "hop": [0, 0, 0, 0],
            "direction": ["steer", "root", "steer", "root"],
        }
    )
    settings = {
        "concept": "Bread",
        "model": "tiny",
        "n_layers": 4,
        "d_vocab": 1000,
        "prompt": "a b c d e f g h i j",
        "prompt_token_strings": list("abcdefghij"),
        "transcoder_list": ["tcs/layer_3"],
        "metric_value": {"0.0": 0.0, "2.0": math.log(3.0)},
        "attribution": {
            "strengths": [0.0, 2.0],
            "start": 7,
            "layer": 1,
            "integration": "trapezoid",
            "prompt_tokens": list(range(10, 20)),
            "metric": {
                "kind": "yes_no",
                "position": 9,
                "positive": [5],
                "negative": [6],
                "site": None,
                "index": None,
                "label": "Yes − No",
            },
        },
        "graph": {},
    }
    return AttributionGraph(nodes=nodes, edges=edges, layers=pd.DataFrame(), settings=settings)


def _token(pos: int, letter: str) -> dict:
    return {
        "node_id": f"E_{10 + pos}_{pos}",
        "feature": pos,
        "layer": "E",
        "ctx_idx": pos,
        "feature_type": "embedding",
        "token_prob": 0.0,
        "is_target_logit": False,
        "run_idx": 0,
        "reverse_ctx_idx": 0,
        "jsNodeId": f"E_{10 + pos}-{pos}",
        "clerp": letter,
        "influence": None,
        "activation": None,
    }


EXPECTED = {
    "metadata": {
        "slug": "tiny-bread",
        "scan": "tiny",
        "transcoder_list": ["tcs/layer_3"],
        "prompt_tokens": list("abcdefghij"),
        "prompt": "a b c d e f g h i j",
        "node_threshold": 0.5,
        "schema_version": 1,
    },
    "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
    "nodes": [_token(i, c) for i, c in enumerate("abcdefghij")]
    + [
        {
            "node_id": "E_1000_7",
            "feature": 7,
            "layer": "E",
            "ctx_idx": 7,
            "feature_type": "embedding",
            "token_prob": 0.0,
            "is_target_logit": False,
            "run_idx": 0,
            "reverse_ctx_idx": 0,
            "jsNodeId": "E_1000-7",
            "clerp": "injected: Bread × α",
            "influence": None,
            "activation": None,
        },
        {
            "node_id": "5_5_9",
            "feature": 5,
            "layer": "5",
            "ctx_idx": 9,
            "feature_type": "logit",
            "token_prob": 0.75,
            "is_target_logit": True,
            "run_idx": 0,
            "reverse_ctx_idx": 0,
            "jsNodeId": "L_5-9",
            "clerp": 'Output "Yes − No" (p=0.750)',
            "influence": None,
            "activation": None,
        },
        {
            "node_id": "3_35_9",
            "feature": 776,
            "layer": "3",
            "ctx_idx": 9,
            "feature_type": "cross layer transcoder",
            "token_prob": 0.0,
            "is_target_logit": False,
            "run_idx": 0,
            "reverse_ctx_idx": 0,
            "jsNodeId": "3_35-0",
            "clerp": "L3 F35: ISA +0.5; → Yes, No",
            "influence": 0.5,
            "activation": 1.25,
        },
        {
            "node_id": "3_-1_9",
            "feature": -1,
            "layer": "3",
            "ctx_idx": 9,
            "feature_type": "mlp reconstruction error",
            "token_prob": 0.0,
            "is_target_logit": False,
            "run_idx": 0,
            "reverse_ctx_idx": 0,
            "jsNodeId": "3_-1-9",
            "clerp": "reconstruction error L3: -0.25",
            "influence": 0.75,
            "activation": None,
        },
    ],
    "links": [
        {"source": "E_1000_7", "target": "3_35_9", "weight": 0.5},
        {"source": "3_35_9", "target": "5_5_9", "weight": 0.5},
        {"source": "E_1000_7", "target": "3_-1_9", "weight": -0.25},
        {"source": "3_-1_9", "target": "5_5_9", "weight": -0.25},
    ],
}
"""circuit-tracer's graph-file layout, written out by hand for :func:`_hand_graph`: Cantor(3, 35) = 776;
p = sigmoid(log 3) = 0.75; the steering vector's token id is the vocabulary size."""


def test_neuronpedia_export_equals_the_hand_written_fixture(tmp_path):
    data = _hand_graph().to_neuronpedia(tmp_path / "g.json", slug="tiny-bread")
    assert data == EXPECTED
    assert json.loads((tmp_path / "g.json").read_text()) == EXPECTED
    for node in data["nodes"]:
        assert tuple(node) == NEURONPEDIA_NODE, "every field, in circuit-tracer's order"
    assert tuple(data["metadata"]) == NEURONPEDIA_METADATA


def test_neuronpedia_export_of_a_real_graph(m64, graph, tmp_path):
    data = graph.to_neuronpedia(tmp_path / "real.json")
    assert json.loads((tmp_path / "real.json").read_text()) == data, "JSON round trip"
    ids = [n["node_id"] for n in data["nodes"]]
    assert len(ids) == len(set(ids))
    assert {
        n["jsNodeId"] for n in data["nodes"] if n["feature_type"] == "mlp reconstruction error"
    }.isdisjoint(n["jsNodeId"] for n in data["nodes"] if n["feature_type"] == "cross layer transcoder")
    assert all(link["source"] in ids and link["target"] in ids for link in data["links"])
    assert len(data["links"]) == len(graph.edges)
    n_tokens = len(data["metadata"]["prompt_tokens"])
    embeddings = [n for n in data["nodes"] if n["feature_type"] == "embedding"]
    assert len(embeddings) == n_tokens + 1
    steer = [n for n in embeddings if n["clerp"] == "injected: Bread × α"]
    vocab = int(m64.cfg.d_vocab)
    assert len(steer) == 1 and steer[0]["node_id"].startswith(f"E_{vocab}_")
    (logit,) = [n for n in data["nodes"] if n["feature_type"] == "logit"]
    assert logit["layer"] == str(spec_for(m64).n_layers + 1) and logit["is_target_logit"]
    p = float(re.fullmatch(r'Output "(.+)" \(p=([0-9.]+)\)', logit["clerp"]).group(2))
    top = graph.settings["metric_value"][str(GRID[-1])]
    assert p == pytest.approx(1 / (1 + math.exp(-top)), abs=5e-4)
    for n in data["nodes"]:
        if n["feature_type"] == "cross layer transcoder":
            layer, index, pos = (int(x) for x in n["node_id"].split("_"))
            assert n["feature"] == (layer + index) * (layer + index + 1) // 2 + index
            assert n["jsNodeId"] == f"{layer}_{index}-0" and n["layer"] == str(layer) and n["ctx_idx"] == pos
        elif n["feature_type"] == "mlp reconstruction error":
            assert n["feature"] == -1 and int(n["node_id"].split("_")[1]) < 0


def test_json_round_trip(graph, tmp_path):
    back = AttributionGraph.from_json(graph.to_json(tmp_path / "graph.json"))
    for name in ("nodes", "edges", "layers"):
        pd.testing.assert_frame_equal(getattr(back, name), getattr(graph, name))
    assert back.settings == graph.settings
    again = AttributionGraph.from_json(tmp_path / "graph.json")
    pd.testing.assert_frame_equal(again.nodes, graph.nodes)
    with pytest.raises(ValueError, match="not a mechintro attribution graph"):
        AttributionGraph.from_json('{"nodes": []}')


def test_json_round_trip_keeps_dtypes_of_empty_frames():
    g = _hand_graph()
    g.edges = g.edges.iloc[:0]
    g.layers = pd.DataFrame(
        {"layer": pd.Series([], dtype="int64"), "explained": pd.Series([], dtype="float64")}
    )
    back = AttributionGraph.from_json(g.to_json())
    for name in ("nodes", "edges", "layers"):
        pd.testing.assert_frame_equal(getattr(back, name), getattr(g, name))


def test_a_lazy_mapping_gives_the_same_graph_holding_one_layer_at_a_time(m64, tc64, vec, one_layer_at_a_time):
    """Hops, metrics and the logit lens read dictionaries one site at a time: with a lazy mapping that keeps
    one layer, no other layer's dictionary is alive when the next loads, and the graph is unchanged."""
    lazy, seen = one_layer_at_a_time(tc64)
    kw = dict(strengths=GRID, vector=vec[0], depth=1, batch_size=64)
    again = attribution_graph(m64, lazy, "Bread", **kw)
    assert max(seen) <= 1 and len(seen) > 6
    eager = attribution_graph(m64, tc64, "Bread", **kw)
    pd.testing.assert_frame_equal(again.nodes, eager.nodes)
    pd.testing.assert_frame_equal(again.edges, eager.edges)


def test_saes_are_left_out_of_the_neuronpedia_export_with_a_warning(m64, tc64, attn_sae, vec):
    g = attribution_graph(
        m64,
        tc64,
        "Bread",
        saes={("attn_z", 2): attn_sae},
        strengths=GRID,
        vector=vec[0],
        depth=1,
        sign="absolute",
    )
    assert (g.feature_nodes()["dictionary"] == "attn_z").any()
    with pytest.warns(UserWarning, match="SAE feature nodes"):
        data = g.to_neuronpedia()
    ids = {n["node_id"] for n in data["nodes"]}
    assert all(link["source"] in ids and link["target"] in ids for link in data["links"])
