"""Dictionaries beyond Gemma Scope 2: circuit-tracer's per-layer files, sae-lens folders and releases, ReLU /
JumpReLU / TopK with and without skips (each equal to a hand computation from the raw tensors, non-square
shapes and a non-symmetric W_skip), the site a dictionary's recorded hook names (checked against plain HF),
the reconstruction check that refuses the wrong side of a norm, dtype, and the memory a layer takes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import hf_capture
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from mechintro.core.dictionary_formats import UnknownFormatError, dictionary_bytes, memory_table
from mechintro.core.dictionary_sites import (
    HF_INPUT,
    HF_OUTPUT,
    TL_INPUT,
    TL_OUTPUT,
    WrongSiteError,
    site_from_recorded,
)
from mechintro.core.families import family_by_name
from mechintro.core.hooks import capture, hooks_context
from mechintro.core.models import family, load_model
from mechintro.core.prompts import trial_prompt
from mechintro.core.transcoders import (
    TranscoderMismatchError,
    encode_at,
    encode_features,
    load_folder,
    load_transcoders,
    replace_mlps,
    save_transcoder,
    site_check_prompts,
    transcoder_hooks,
    transcoder_inputs,
)
from mechintro.testing import (
    save_circuit_tracer_transcoders,
    save_random_transcoders,
    save_sae_lens_transcoders,
    save_tiny,
)

D_MODEL, D_TC = 24, 40  # format tests: non-square (d_model != d_transcoder)
ROOT = Path(__file__).resolve().parents[2]


def _x(n=7, d=D_MODEL, seed=5):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _topk(pre, k):
    keep = torch.zeros_like(pre).scatter_(-1, pre.topk(k, dim=-1).indices, 1.0)
    return pre * keep


# ------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize(
    ("activation", "skip", "k_in_file"),
    [("relu", True, False), ("jumprelu", False, False), ("topk", True, False), ("topk", False, True)],
)
def test_circuit_tracer_file_equals_hand_computation(tmp_path, activation, skip, k_in_file):
    k = 5
    save_circuit_tracer_transcoders(
        tmp_path, d_model=D_MODEL, d_transcoder=D_TC, n_layers=2, activation=activation, k=k,
        k_in_file=k_in_file, skip=skip, seed=2,
    )  # fmt: skip
    raw = load_file(str(tmp_path / "layer_1.safetensors"))
    assert raw["W_enc"].shape == (D_TC, D_MODEL)
    tc = load_folder(tmp_path / "layer_1", layer=1)
    x = _x()
    pre = x @ raw["W_enc"].T + raw["b_enc"]
    if activation == "relu":
        acts = torch.relu(pre)
    elif activation == "jumprelu":
        acts = pre * (pre > raw["activation_function.threshold"])
    else:
        acts = _topk(pre, k)
        assert ((tc.encode(x) != 0).sum(-1) == k).all()
    out = acts @ raw["W_dec"] + raw["b_dec"]
    if skip:
        assert not torch.allclose(raw["W_skip"], raw["W_skip"].T)
        out = out + x @ raw["W_skip"].T
        assert not torch.allclose(tc(x), acts @ raw["W_dec"] + raw["b_dec"] + x @ raw["W_skip"], atol=1e-3)
    torch.testing.assert_close(tc.encode(x), acts)
    torch.testing.assert_close(tc(x), out)
    idx = torch.tensor([3, 0, 17, D_TC - 1])
    torch.testing.assert_close(encode_features(tc, x, idx), acts[:, idx])
    meta = tc.cfg.metadata  # circuit-tracer's mlp.hook_in / mlp.hook_out, read for Gemma 3 (the default)
    assert (meta.site, meta.site_out) == ("mlp_in", "mlp_module_out")
    assert (meta.hook_name, meta.hook_name_out) == ("blocks.1.ln2.hook_out", "blocks.1.mlp.hook_out")
    assert meta.dictionary_format == "circuit_tracer"


@pytest.mark.parametrize(("activation", "skip"), [("relu", True), ("jumprelu", False), ("jumprelu", True)])
def test_sae_lens_folder_equals_hand_computation(tmp_path, activation, skip):
    d_in, d_out = D_MODEL, 16  # d_in != d_out != d_sae
    save_sae_lens_transcoders(
        tmp_path, d_in=d_in, d_out=d_out, d_sae=D_TC, n_layers=1, activation=activation, skip=skip, seed=4
    )
    raw = load_file(str(tmp_path / "layer_0" / "sae_weights.safetensors"))
    tc = load_folder(tmp_path / "layer_0", layer=0)
    x = _x(d=d_in)
    pre = x @ raw["W_enc"] + raw["b_enc"]
    acts = torch.relu(pre) * (pre > raw["threshold"]) if activation == "jumprelu" else torch.relu(pre)
    out = acts @ raw["W_dec"] + raw["b_dec"] + (x @ raw["W_skip"].T if skip else 0)
    torch.testing.assert_close(tc.encode(x), acts)
    torch.testing.assert_close(tc(x), out)
    idx = torch.tensor([1, 30, 2])
    torch.testing.assert_close(encode_features(tc, x, idx), acts[:, idx])
    assert (tc.cfg.metadata.site, tc.cfg.metadata.site_out) == ("mlp_in", "mlp_out")


def test_topk_k_checks_and_round_trip(tmp_path):
    save_circuit_tracer_transcoders(tmp_path / "ct", d_model=D_MODEL, d_transcoder=D_TC, n_layers=1,
                                    activation="topk", k=D_TC + 1)  # fmt: skip
    with pytest.raises(ValueError, match=f"k={D_TC + 1} exceeds the dictionary's width d_sae={D_TC}"):
        load_folder(tmp_path / "ct" / "layer_0", layer=0)
    save_circuit_tracer_transcoders(tmp_path / "ok", d_model=D_MODEL, d_transcoder=D_TC, n_layers=1,
                                    activation="topk", k=3)  # fmt: skip
    tc = load_folder(tmp_path / "ok" / "layer_0", layer=0)
    again = load_folder(save_transcoder(tc, tmp_path / "saved" / "layer_0"), layer=0)
    assert type(again).__name__ == "TopKTranscoder" and again.cfg.k == 3
    x = _x()
    torch.testing.assert_close(again(x), tc(x))
    assert again.cfg.metadata.site_out == "mlp_module_out"


def test_unknown_format_and_cross_layer_sets_are_refused(tmp_path):
    (tmp_path / "layer_0").mkdir()
    with pytest.raises(UnknownFormatError, match=r"gemma_scope_2', 'sae_lens', 'circuit_tracer"):
        load_folder(tmp_path / "layer_0", layer=0)
    clt = tmp_path / "clt"
    clt.mkdir()
    (clt / "config.yaml").write_text(
        "model_kind: cross_layer_transcoder\nfeature_input_hook: hook_resid_mid\n"
    )
    (clt / "layer_0.safetensors").write_bytes(b"")
    with pytest.raises(NotImplementedError, match="Cross-layer transcoders: see docs/families.md"):
        load_folder(clt / "layer_0", layer=0)


# ---------------------------------------------------------------------------------------------- sites


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    folder = save_tiny("qwen3", tmp_path_factory.mktemp("tiny_qwen3"))
    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    return load_model(folder, device="cpu"), hf


@pytest.fixture(scope="module")
def olmo(tmp_path_factory):
    folder = save_tiny("olmo3", tmp_path_factory.mktemp("tiny_olmo3"))
    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    return load_model(folder, device="cpu"), hf


NEAREST = {"hook_mlp_in", "ln2.hook_normalized"}
"""TL names whose bridge tensor is not the site they are read as: ``hook_mlp_in`` (gated off in the
bridge; in TransformerLens the residual before ln2) and ``ln2.hook_normalized`` (TransformerLens's normalized
residual, without the norm's weight under fold_ln)."""


@pytest.mark.parametrize("which", ["gemma3", "qwen3", "olmo3"])
def test_site_tables_name_the_tensor_of_the_site(which, request):
    """Every Hugging Face (module, side) in the tables is, in plain HF, the tensor the bridge gives at the
    site it maps to; every TransformerLens name is that site's bridge tensor (except NEAREST)."""
    if which == "gemma3":
        model, hf = request.getfixturevalue("tiny"), request.getfixturevalue("hf_tiny")
    else:
        model, hf = request.getfixturevalue({"qwen3": "qwen", "olmo3": "olmo"}[which])
    fam, layer = family_by_name(which), 1
    tokens = trial_prompt(model, trial=2).tokens[None]
    hf_tables = {**HF_INPUT[fam.norm_layout], **HF_OUTPUT[fam.norm_layout]}
    tl_tables = {**TL_INPUT[fam.norm_layout], **TL_OUTPUT[fam.norm_layout]}
    sites = sorted(set(hf_tables.values()) | set(tl_tables.values()))
    tl_names = {f"blocks.{layer}.{n}" for n in tl_tables if n not in NEAREST}
    site_hooks = {s: fam.site(s).hook_name(layer) for s in sites}
    with torch.no_grad(), capture(model, sorted(set(site_hooks.values()) | tl_names)) as acts:
        model(tokens)
    got, handles = {}, []
    for module, side in hf_tables:
        mod = hf.get_submodule(f"model.layers.{layer}.{module}")
        if side == "output":
            handles.append(
                mod.register_forward_hook(lambda _m, _i, o, key=(module, side): got.update({key: o}))
            )
        else:
            handles.append(
                mod.register_forward_pre_hook(lambda _m, a, key=(module, side): got.update({key: a[0]}))
            )
    with torch.no_grad():
        hf(tokens)
    for h in handles:
        h.remove()
    for key, site in hf_tables.items():
        torch.testing.assert_close(
            acts[site_hooks[site]], got[key], rtol=0, atol=1e-5, msg=f"{key} -> {site}"
        )
    for name, site in tl_tables.items():
        if name not in NEAREST:
            torch.testing.assert_close(acts[f"blocks.{layer}.{name}"], acts[site_hooks[site]], rtol=0, atol=0)
    # the two input candidates are different tensors, so a wrong choice is visible
    if len(fam.transcoder_in_candidates) == 2:
        a, b = (acts[site_hooks[s]] for s in fam.transcoder_in_candidates)
        assert not torch.allclose(a, b, atol=1e-2)


def test_recorded_names_per_format():
    gemma, qwen3, olmo3 = (family_by_name(n) for n in ("gemma3", "qwen3", "olmo3"))
    # sae-lens's Gemma Scope 2 configs name hook_mlp_in; those dictionaries read the norm's output
    assert site_from_recorded(gemma, "blocks.3.hook_mlp_in", side="input", fmt="gemma_scope_2") == "mlp_in"
    assert site_from_recorded(gemma, "blocks.3.hook_mlp_in", side="input", fmt="sae_lens") == "mlp_in_prenorm"
    assert site_from_recorded(gemma, "pre_feedforward_layernorm.output", side="input") == "mlp_in"
    assert site_from_recorded(gemma, "model.layers.3.mlp", side="input", layer=3) == "mlp_in"
    assert site_from_recorded(gemma, "model.layers.3.mlp", side="output") == "mlp_module_out"
    assert site_from_recorded(qwen3, "model.layers.2.post_attention_layernorm", side="input") == "mlp_in"
    assert site_from_recorded(qwen3, "hook_resid_mid", side="input") == "mlp_in_prenorm"
    assert site_from_recorded(qwen3, "mlp.hook_out", side="output") == "mlp_out"
    assert site_from_recorded(olmo3, "hook_resid_mid", side="input") == "mlp_in"
    assert site_from_recorded(olmo3, "mlp", side="input") == "mlp_in"
    assert site_from_recorded(olmo3, "post_feedforward_layernorm", side="output") == "mlp_out"
    with pytest.raises(
        WrongSiteError, match=r"none of Qwen3 \(dense\)'s input sites \['mlp_in_prenorm', 'mlp_in'\]"
    ):
        site_from_recorded(qwen3, "model.layers.2.pre_feedforward_layernorm.output", side="input")
    with pytest.raises(WrongSiteError, match="none of OLMo 3's input sites"):
        site_from_recorded(olmo3, "blocks.2.ln2.hook_out", side="input")  # OLMo's ln2 is the post-norm
    with pytest.raises(WrongSiteError, match="of layer 2, not layer 3"):
        site_from_recorded(qwen3, "blocks.2.mlp.hook_in", side="input", layer=3)


def test_a_recorded_hugging_face_name_is_read_literally(tiny, tmp_path):
    """sae-lens records Gemma Scope 2's Hugging Face names (hf_hook_name) beside its TL ``hook_mlp_in``."""
    hf = {
        "hf_hook_name": "model.layers.0.pre_feedforward_layernorm.output",
        "hf_hook_name_out": "model.layers.0.post_feedforward_layernorm.output",
    }
    save_sae_lens_transcoders(tmp_path, n_layers=1, hook_name="blocks.{layer}.hook_mlp_in", metadata=hf)
    meta = load_transcoders(tiny, [0], source=tmp_path)[0].cfg.metadata
    assert (meta.site, meta.site_out, meta.source_hook_name) == ("mlp_in", "mlp_out", "blocks.0.hook_mlp_in")


def test_the_recorded_hook_drives_every_reader(tiny, hf_tiny, tmp_path):
    """A dictionary recording the pre-norm residual and the MLP module's output is read and written there by
    transcoder_inputs, encode_at and replace_mlps (the metadata is the one source of the sites)."""
    save_sae_lens_transcoders(tmp_path, n_layers=2, hook_name="blocks.{layer}.hook_resid_mid",
                              hook_name_out="blocks.{layer}.mlp.hook_out")  # fmt: skip
    tcs = load_transcoders(tiny, [1], source=tmp_path, check="hook")
    tc = tcs[1]
    assert (tc.cfg.metadata.site, tc.cfg.metadata.site_out) == ("mlp_in_prenorm", "mlp_module_out")
    assert transcoder_hooks(tc) == ("blocks.1.ln2.hook_in", "blocks.1.mlp.hook_out")
    assert tc.cfg.metadata.source_hook_name == "blocks.1.hook_resid_mid"
    tokens = trial_prompt(tiny, trial=3).tokens
    _, hf = hf_capture(hf_tiny, tokens[None], ["model.layers.1.input_layernorm"])
    pre = {}
    mod = hf_tiny.get_submodule("model.layers.1.pre_feedforward_layernorm")
    h = mod.register_forward_pre_hook(lambda _m, a: pre.update(x=a[0]))
    with torch.no_grad():
        hf_tiny(tokens[None])
    h.remove()
    torch.testing.assert_close(transcoder_inputs(tiny, [1], tokens, transcoders=tcs)[1], pre["x"][:, -1:])
    torch.testing.assert_close(
        encode_at(tiny, tcs, tokens)[1], tc.encode(pre["x"][:, -1:]), rtol=1e-5, atol=1e-5
    )
    got = {}
    names = list(transcoder_hooks(tc))
    with (
        torch.no_grad(),
        replace_mlps(tiny, tcs),
        hooks_context(tiny, [(n, lambda x, hook, n=n: got.__setitem__(n, x.clone())) for n in names]),
    ):
        tiny(tokens[None])
    torch.testing.assert_close(got[names[1]], tc(got[names[0]]))


# ---------------------------------------------------------------------------------- reconstruction


def _fitted(model, layer, site_in, site_out, *, d_sae=384):
    """A ReLU skip transcoder fitted (least squares on random ReLU features, the skip and the bias) from
    ``site_in`` to ``site_out`` on the tokens the reconstruction check reads (all but each prompt's first
    position): it reconstructs those nearly exactly, and nothing read at another site."""
    fam = family(model)
    hin, hout = fam.site(site_in).hook_name(layer), fam.site(site_out).hook_name(layer)
    xs, ys = [], []
    for tokens in site_check_prompts(model):
        with torch.no_grad(), capture(model, [hin, hout]) as acts:
            model(tokens[None])
        xs.append(acts[hin][0, 1:])
        ys.append(acts[hout][0, 1:])
    x, y = torch.cat(xs).double(), torch.cat(ys).double()
    g = torch.Generator().manual_seed(0)
    w_enc = torch.randn(x.shape[1], d_sae, generator=g, dtype=torch.double) / x.shape[1] ** 0.5
    b_enc = torch.randn(d_sae, generator=g, dtype=torch.double) * 0.1
    a = torch.cat([torch.relu(x @ w_enc + b_enc), x, torch.ones(len(x), 1, dtype=torch.double)], 1)
    sol = torch.linalg.lstsq(a, y).solution
    state = {
        "W_enc": w_enc, "b_enc": b_enc, "W_dec": sol[:d_sae], "W_skip": sol[d_sae:-1].T, "b_dec": sol[-1],
    }  # fmt: skip
    return {layer: {k: v.float() for k, v in state.items()}}


def test_reconstruction_check_refuses_the_wrong_side_of_a_norm(tiny, tmp_path):
    state = _fitted(tiny, 1, "mlp_in", "mlp_out")
    right = save_sae_lens_transcoders(
        tmp_path / "right", tensors=state, hook_name="blocks.{layer}.ln2.hook_out"
    )
    tc = load_transcoders(tiny, [1], source=right)[1]  # check="reconstruction" is the default
    assert tc.cfg.metadata.site == "mlp_in"
    wrong = save_sae_lens_transcoders(
        tmp_path / "wrong", tensors=state, hook_name="blocks.{layer}.hook_resid_mid"
    )
    fvu = r"(0\.00\d*|\d(\.\d+)?e-\d+) "
    message = rf"wrong side of a norm.*mlp_in_prenorm -> mlp_out give FVU.*but mlp_in -> mlp_out give {fvu}"
    with pytest.raises(WrongSiteError, match=message):
        load_transcoders(tiny, [1], source=wrong)
    assert load_transcoders(tiny, [1], source=wrong, check="hook")[1].cfg.metadata.site == "mlp_in_prenorm"
    assert (
        load_transcoders(tiny, [1], source=wrong, lazy=True, check="none")[1].cfg.metadata.site
        == "mlp_in_prenorm"
    )
    with pytest.raises(WrongSiteError, match="wrong side"):
        load_transcoders(tiny, [1], source=wrong, lazy=True)[1]
    noisy = {1: dict(state[1], W_dec=state[1]["W_dec"] + 0.3 * torch.randn_like(state[1]["W_dec"]))}
    recorded = save_sae_lens_transcoders(
        tmp_path / "recorded", tensors=noisy, hook_name="blocks.{layer}.ln2.hook_out", metadata={"fvu": 0.001}
    )
    with pytest.raises(WrongSiteError, match=r"far above the 0\.001 it records"):
        load_transcoders(tiny, [1], source=recorded)
    # random dictionaries fit nowhere and are never refused for it
    assert sorted(load_transcoders(tiny, source=save_random_transcoders(tmp_path / "random"))) == [0, 1, 2, 3]


def test_qwen3_circuit_tracer_set_site_and_check(qwen, tmp_path):
    model, hf = qwen
    state = _fitted(model, 1, "mlp_in", "mlp_out")[1]
    raw = {"W_enc": state["W_enc"].T.contiguous(), "W_dec": state["W_dec"], "b_enc": state["b_enc"],
           "b_dec": state["b_dec"], "W_skip": state["W_skip"]}  # fmt: skip
    for name, hook in (("right", "mlp.hook_in"), ("wrong", "hook_resid_mid")):
        save_circuit_tracer_transcoders(tmp_path / name, d_model=64, n_layers=2, feature_input_hook=hook,
                                        model_name="Qwen/Qwen3-0.6B")  # fmt: skip
        save_file({k: v.contiguous() for k, v in raw.items()}, str(tmp_path / name / "layer_1.safetensors"))
    tcs = load_transcoders(model, [1], source=tmp_path / "right")
    assert (tcs[1].cfg.metadata.site, tcs[1].cfg.metadata.site_out) == ("mlp_in", "mlp_out")
    tokens = trial_prompt(model, trial=5).tokens
    _, got = hf_capture(hf, tokens[None], ["model.layers.1.post_attention_layernorm"])
    expected = tcs[1].encode(got["model.layers.1.post_attention_layernorm"][:, -1:])
    torch.testing.assert_close(encode_at(model, tcs, tokens)[1], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(WrongSiteError, match=r"mlp_in_prenorm -> mlp_out give FVU .* but mlp_in -> mlp_out"):
        load_transcoders(model, [1], source=tmp_path / "wrong")


def test_dictionaries_of_another_family_or_width_are_refused(tiny, qwen, tmp_path):
    save_circuit_tracer_transcoders(tmp_path / "llama", n_layers=1, model_name="meta-llama/Llama-3.2-1B")
    other = r"for meta-llama/Llama-3.2-1B \(Llama 3\), but the model is .* \(Gemma 3\)"
    with pytest.raises(TranscoderMismatchError, match=other):
        load_transcoders(tiny, [0], source=tmp_path / "llama")
    save_circuit_tracer_transcoders(tmp_path / "narrow", d_model=48, n_layers=1, model_name="Qwen/Qwen3-0.6B")
    with pytest.raises(TranscoderMismatchError, match=r"d_in=48 -> d_out=48, but the model's d_model is 64"):
        load_transcoders(qwen[0], [0], source=tmp_path / "narrow")
    save_sae_lens_transcoders(tmp_path / "gemma_names", n_layers=1,
                              hook_name="model.layers.{layer}.pre_feedforward_layernorm.output")  # fmt: skip
    with pytest.raises(WrongSiteError, match=r"none of Qwen3 \(dense\)'s input sites"):
        load_transcoders(qwen[0], [0], source=tmp_path / "gemma_names")
    with pytest.raises(ValueError, match=r"unknown check 'fvu'; valid: \['reconstruction', 'hook', 'none'\]"):
        load_transcoders(tiny, [0], source=tmp_path / "llama", check="fvu")


def test_mwhanna_qwen3_release_from_local_hub_cache(qwen, monkeypatch, tmp_path):
    """sae-lens's mwhanna_transcoder releases are circuit-tracer files; read offline, hooks as sae-lens
    records them (mlp.hook_in -> hook_mlp_out)."""
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    repo = tmp_path / "models--mwhanna--qwen3-0.6b-transcoders-lowl0"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    save_circuit_tracer_transcoders(repo / "snapshots" / ("0" * 40), n_layers=2, feature_input_hook=None)
    model, hf = qwen
    tcs = load_transcoders(
        model, [0, 1], source="mwhanna-qwen3-0.6b-transcoders-lowl0", id_pattern="layer_{layer}"
    )
    meta = tcs[1].cfg.metadata
    assert (meta.site, meta.site_out, meta.model_name) == ("mlp_in", "mlp_out", "qwen3-0.6b")
    assert transcoder_hooks(tcs[1]) == ("blocks.1.ln2.hook_out", "blocks.1.hook_mlp_out")
    tokens = trial_prompt(model, trial=1).tokens
    _, got = hf_capture(hf, tokens[None], ["model.layers.1.post_attention_layernorm"])
    expected = tcs[1].encode(got["model.layers.1.post_attention_layernorm"][:, -1:])
    torch.testing.assert_close(encode_at(model, tcs, tokens)[1], expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------- dtype, memory


def test_dtype_and_device(tiny, tmp_path):
    raw = save_random_transcoders(tmp_path / "raw", seed=1)
    ct = save_circuit_tracer_transcoders(tmp_path / "ct", activation="jumprelu", seed=1)
    sl = save_sae_lens_transcoders(tmp_path / "sl", seed=1)
    tokens = trial_prompt(tiny, trial=2).tokens
    for source in (raw, ct, sl):
        f32 = load_transcoders(tiny, [2], source=source, check="hook")
        bf16 = load_transcoders(tiny, [2], source=source, dtype=torch.bfloat16, device="cpu", check="hook")
        assert {p.dtype for p in bf16[2].parameters()} == {torch.bfloat16}, source
        assert {p.dtype for p in f32[2].parameters()} == {torch.float32}, source
        acts = encode_at(tiny, bf16, tokens, positions="all")[2]
        assert acts.dtype == torch.bfloat16
        ref = encode_at(tiny, f32, tokens, positions="all")[2]
        assert (acts.float() - ref).abs().max() < 0.05 * ref.abs().max()
        assert bf16[2].W_enc.device.type == "cpu"


def test_memory_per_layer_from_the_tensors(tmp_path):
    save_random_transcoders(tmp_path / "raw", d_model=D_MODEL, d_sae=D_TC, n_layers=1)
    save_circuit_tracer_transcoders(
        tmp_path / "ct", d_model=D_MODEL, d_transcoder=D_TC, n_layers=1, skip=False
    )
    for dtype in (torch.float32, torch.bfloat16):
        gs = load_folder(tmp_path / "raw" / "layer_0", layer=0, dtype=dtype)
        ct = load_folder(tmp_path / "ct" / "layer_0", layer=0, dtype=dtype)
        size = {n: sum(t.numel() * t.element_size() for t in tc.state_dict().values()) for n, tc in
                (("gs", gs), ("ct", ct))}  # fmt: skip
        assert size["gs"] == dictionary_bytes(D_MODEL, D_TC, dtype=dtype)
        assert size["ct"] == dictionary_bytes(D_MODEL, D_TC, dtype=dtype, skip=False, threshold=False)
    assert dictionary_bytes(5376, 262144, dtype="bfloat16") == 2 * (
        2 * 5376 * 262144 + 2 * 262144 + 5376 + 5376**2
    )
    assert memory_table() in (ROOT / "docs" / "families.md").read_text()
