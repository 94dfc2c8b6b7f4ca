"""Steering attribution's identities on every family with mechanism support, in float64, against plain
Hugging Face with hand-written hooks (tests/hf_reference.py).

SG (how fast the injection moves a feature's pre-activation) and GA (what a unit of the feature's decoder row
at its output site does to the metric) equal fourth-order finite differences of plain HF forwards: the
pre-activation read by the raw encoder at ``model.layers[L].mlp``'s input, the nudge added at the output of
the module the family writes its MLP update from (the post-feedforward norm for Gemma 3 / 4 and OLMo 2 / 3,
the MLP for Qwen3 / Llama). With every MLP replaced by its transcoder the error term vanishes and features +
skip = total; without, features + skip + error = total.

Float64 end to end: for this module every family's RMSNorm and the attention softmax keep float64 inputs in
float64 (they round to float32 otherwise), the same formulas otherwise. The prompt is one unpadded row: in
float64 HF's eager attention turns a fully masked pad row into NaN (see tests/core/test_families.py).
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from hf_reference import RawTranscoder, hooked, injection
from transformers import AutoModelForCausalLM

from mechintro.attribution.graph import attribution_graph
from mechintro.attribution.passes import steering_attribution
from mechintro.core.families import FAMILIES
from mechintro.core.models import load_model, spec_for, with_spec
from mechintro.core.prompts import trial_prompt
from mechintro.core.transcoders import load_transcoders, replace_mlps
from mechintro.testing import save_random_transcoders, save_tiny

MECHANISM = [f.name for f in FAMILIES if f.support == "mechanism"]
INJ = 1
GRID = [0.0, 1.5, 3.0]
FD_STEP = 3e-3
NORMS = {
    "gemma3": ("gemma3", "Gemma3RMSNorm"),
    "gemma4_text": ("gemma4", "Gemma4RMSNorm"),
    "qwen3": ("qwen3", "Qwen3RMSNorm"),
    "llama": ("llama", "LlamaRMSNorm"),
    "olmo2": ("olmo2", "Olmo2RMSNorm"),
    "olmo3": ("olmo3", "Olmo3RMSNorm"),
}
"""Each family's RMSNorm class (transformers.models.<module>.modeling_<module>)."""


def _float64_norm(plain, name: str):
    """The norm's own formula, kept in float64 for float64 inputs."""

    def norm(self, x):
        if x.dtype != torch.float64:
            return plain(self, x)
        if name == "gemma3":
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)
        if name == "gemma4_text":
            out = x * torch.pow(x.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
            return out * self.weight if getattr(self, "with_scale", True) else out
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    return norm


@pytest.fixture(scope="module")
def true_float64_all():
    plain_softmax = torch.nn.functional.softmax

    def softmax(x, *args, dtype=None, **kw):
        return plain_softmax(x, *args, dtype=None if x.dtype == torch.float64 else dtype, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "softmax", softmax)
        for name, (module, cls) in NORMS.items():
            klass = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), cls)
            mp.setattr(klass, "forward", _float64_norm(klass.forward, name))
        yield


@pytest.fixture(scope="module", params=MECHANISM)
def fam(request, tmp_path_factory, true_float64_all):
    """(name, float64 model, float64 plain HF, float64 transcoders, raw transcoders, vector, attribution)."""
    name = request.param
    folder = save_tiny(name, tmp_path_factory.mktemp(f"tiny64_{name}"))
    model = load_model(folder, device="cpu", dtype=torch.float64)
    with_spec(model, injection_layer=INJ)
    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float64).eval()
    tc_dir = save_random_transcoders(tmp_path_factory.mktemp(f"tc64_{name}"), seed=3)
    tcs = {la: tc.to(torch.float64) for la, tc in load_transcoders(model, source=tc_dir).items()}
    raw = {la: RawTranscoder.load(tc_dir, la, torch.float64) for la in tcs}
    vec = torch.randn(
        1, int(model.cfg.d_model), generator=torch.Generator().manual_seed(11), dtype=torch.float64
    )
    vec = vec * 3
    att = steering_attribution(model, tcs, ["Bread"], strengths=GRID, vectors=vec, batch_size=4)
    return name, model, hf, tcs, raw, vec, att


def out_module(name: str, layer: int) -> str:
    post = {"gemma3", "gemma4_text", "olmo2", "olmo3"}
    return f"model.layers.{layer}." + ("post_feedforward_layernorm" if name in post else "mlp")


def derivative(f, x, h=FD_STEP):
    """Fourth-order central difference."""
    return (-f(x + 2 * h) + 8 * f(x + h) - 8 * f(x - h) + f(x - 2 * h)) / (12 * h)


def hf_run(model, hf, vec, alpha, hooks=()):
    """The Yes-No gap at the last prompt token of a plain float64 HF run with the injection by hand."""
    p = trial_prompt(model, trial=1)
    spec = spec_for(model)
    strength = torch.tensor(alpha, dtype=torch.float64)
    with torch.no_grad(), hooked(hf, [injection(INJ, vec, strength, p.injection_start), *hooks]):
        last = hf(input_ids=p.tokens[None]).logits[0, -1]
    return float(last[list(spec.yes_ids)].logsumexp(-1) - last[list(spec.no_ids)].logsumexp(-1))


def top_rows(att, strength=1.5, n=2):
    """The ``n`` rows of largest |SA| of every layer at ``strength``."""
    rows = att.features[att.features["strength"] == strength]
    rows = rows.reindex(rows["sa"].abs().sort_values(ascending=False).index)
    return rows.groupby("layer", sort=True).head(n)


def test_sg_and_ga_equal_finite_differences_of_plain_hf(fam):
    name, model, hf, _, raw, vec, att = fam
    rows = top_rows(att)
    assert len(rows) >= 4 and rows["layer"].nunique() >= 2 and (rows["sa"].abs() > 0).all(), name
    for r in rows.itertuples():
        seen: dict = {}
        read = (f"model.layers.{r.layer}.mlp", "input", lambda x, seen=seen: seen.__setitem__("x", x))

        def pre(alpha, r=r, read=read, seen=seen):
            hf_run(model, hf, vec[0], alpha, [read])
            return float(raw[r.layer].pre(seen["x"][0, r.position])[r.feature])

        assert r.sg == pytest.approx(derivative(pre, 1.5), rel=1e-7, abs=1e-9), (name, r.layer, r.feature)
        direction = raw[r.layer].p["w_dec"][r.feature]

        def nudged(eps, r=r, direction=direction):
            def fn(y):
                y = y.clone()
                y[:, r.position] += eps * direction
                return y

            return hf_run(model, hf, vec[0], 1.5, [(out_module(name, r.layer), "output", fn)])

        assert r.ga == pytest.approx(derivative(nudged, 0.0), rel=1e-7, abs=1e-9), (name, r.layer, r.feature)


def test_features_skip_and_error_sum_to_the_total(fam):
    name, model, _, tcs, _, vec, att = fam
    r = att.remainders
    np.testing.assert_allclose(r["features"] + r["skip"] + r["error"], r["total"], rtol=0, atol=1e-10)
    assert r["error"].abs().max() > 1e-6, "random transcoders miss part of the MLP"
    with replace_mlps(model, tcs):
        rep = steering_attribution(model, tcs, ["Bread"], strengths=GRID, vectors=vec).remainders
    assert rep["total"].abs().max() > 1e-3, name
    assert rep["error"].abs().max() <= 1e-11, name
    np.testing.assert_allclose(rep["features"] + rep["skip"], rep["total"], rtol=0, atol=1e-10)
    assert rep["skip"].abs().max() > 1e-5, "the affine skip path carries part of the total"


def test_the_graph_runs_and_its_steer_edges_are_the_attribution(fam):
    name, model, _, tcs, _, vec, _ = fam
    graph = attribution_graph(model, tcs, "Bread", strengths=GRID, vector=vec[0], depth=1, caps=(3, 2))
    nodes, edges = graph.nodes, graph.edges
    feats = graph.feature_nodes()
    assert nodes["node"].is_unique and set(edges["source"]) | set(edges["target"]) <= set(nodes["node"])
    assert 1 <= len(feats[feats["hop"] == 0]) <= 3 and np.isfinite(edges["weight"]).all()
    for node, row in feats.set_index("node").iterrows():
        steer = edges[(edges["source"] == "steer") & (edges["target"] == node)]["weight"]
        assert steer.iloc[0] == row["isa"], (name, node)
