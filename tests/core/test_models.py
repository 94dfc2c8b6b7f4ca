"""load_model / spec_for / HookNames against plain HF on a tiny random Gemma 3."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_capture

import mechintro.core.models as mm
from mechintro.core import resources
from mechintro.core.hooks import hooks_context
from mechintro.core.models import HookNames, ModelNotAvailableError, load_model, paper_layer, spec_for
from mechintro.core.prompts import trial_prompt


def _capture(model, tokens, names):
    got = {}

    def grab(name):
        def hook(x, hook):
            got[name] = x.detach().clone()

        return hook

    with torch.no_grad(), hooks_context(model, [(n, grab(n)) for n in names]):
        logits = model(tokens)
    return logits, got


def test_bridge_logits_equal_hf(tiny, hf_tiny):
    tokens = trial_prompt(tiny, trial=4).tokens[None]
    with torch.no_grad():
        ours = tiny(tokens)
        theirs = hf_tiny(tokens).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_transcoder_sites_equal_hf_feedforward_norms(tiny, hf_tiny):
    tokens = trial_prompt(tiny, trial=2).tokens[None]
    n = tiny.cfg.n_layers
    names = [HookNames.transcoder_in(i) for i in range(n)] + [HookNames.transcoder_out(i) for i in range(n)]
    _, ours = _capture(tiny, tokens, names)
    hf_names = [f"model.layers.{i}.pre_feedforward_layernorm" for i in range(n)]
    hf_names += [f"model.layers.{i}.post_feedforward_layernorm" for i in range(n)]
    _, theirs = hf_capture(hf_tiny, tokens, hf_names)
    for i in range(n):
        torch.testing.assert_close(
            ours[f"blocks.{i}.ln2.hook_out"],
            theirs[f"model.layers.{i}.pre_feedforward_layernorm"],
            rtol=0,
            atol=1e-5,
        )
        torch.testing.assert_close(
            ours[f"blocks.{i}.hook_mlp_out"],
            theirs[f"model.layers.{i}.post_feedforward_layernorm"],
            rtol=0,
            atol=1e-5,
        )
        # the pre-norm residual (sae-lens's "hook_mlp_in") is a different site: the norms are not identity
        _, pre = _capture(tiny, tokens, [HookNames.mlp_in_prenorm(i)])
        assert not torch.allclose(
            pre[HookNames.mlp_in_prenorm(i)], ours[f"blocks.{i}.ln2.hook_out"], atol=1e-3
        )


def test_resid_post_equals_hf_decoder_layer_output(tiny, hf_tiny):
    tokens = trial_prompt(tiny, trial=1).tokens[None]
    n = tiny.cfg.n_layers
    _, ours = _capture(tiny, tokens, [HookNames.resid_post(i) for i in range(n)])
    _, theirs = hf_capture(hf_tiny, tokens, [f"model.layers.{i}" for i in range(n)])
    for i in range(n):
        torch.testing.assert_close(
            ours[HookNames.resid_post(i)], theirs[f"model.layers.{i}"], rtol=0, atol=1e-5
        )


def test_every_hook_name_exists(tiny):
    for i in range(tiny.cfg.n_layers):
        for name in (
            HookNames.resid_pre(i),
            HookNames.resid_mid(i),
            HookNames.resid_post(i),
            HookNames.attn_out(i),
            HookNames.mlp_out(i),
            HookNames.transcoder_in(i),
            HookNames.transcoder_out(i),
        ):
            assert name in tiny.hook_dict, name
    assert HookNames.final_norm_out() in tiny.hook_dict
    with pytest.raises(ValueError, match="valid"):
        HookNames.component("bogus", 0)


def test_spec_for_tiny(tiny):
    spec = spec_for(tiny)
    assert (spec.n_layers, spec.d_model) == (4, 64)
    assert spec.injection_layer == paper_layer(4) == 2
    assert spec.strength == 4.0
    decoded = {tiny.tokenizer.decode([i]).strip() for i in spec.yes_ids}
    assert decoded == {"yes", "Yes", "YES"}
    assert {tiny.tokenizer.decode([i]).strip() for i in spec.no_ids} == {"no", "No", "NO"}
    assert len(spec.yes_ids) == 6  # with and without the leading space
    with pytest.raises(ValueError, match="valid layers are 0..3"):
        spec.check_layer(4)


def test_paper_layer_relative_depth():
    assert paper_layer(62) == 37
    assert paper_layer(26) == 16  # gemma-3-1b-it
    assert paper_layer(18) == 11  # gemma-3-270m-it


def test_gemma_scope_release_names_exist_in_sae_lens():
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    for hf_id, n in mm.GEMMA3_LAYERS.items():
        release = mm._gemma_scope_release(hf_id)
        assert release in directory, release
        assert directory[release].model == hf_id
        sae_id = f"layer_{paper_layer(n)}_width_262k_l0_big_affine"
        assert sae_id in directory[release].saes_map
    # the paper's top gate layer
    assert "layer_45_width_262k_l0_big_affine" in directory["gemma-scope-2-27b-it-transcoders-all"].saes_map


def test_hub_id_offline_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotAvailableError, match="HF_HUB_OFFLINE"):
        load_model("google/gemma-3-270m-it")


def test_bad_names_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="registered name"):
        load_model("not a model")
    with pytest.raises(ModelNotAvailableError, match="config.json"):
        load_model(tmp_path)
    monkeypatch.setenv("MECHINTRO_DATA", str(tmp_path))
    monkeypatch.setattr(resources, "package_data", lambda: tmp_path / "package")  # shipped nothing either
    with pytest.raises(ModelNotAvailableError, match="organism train"):
        load_model("organism")
    with pytest.raises(ValueError, match="load_model"):
        spec_for(object())


def test_local_folder_loads_offline(tiny_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_model(str(tiny_dir))
    assert spec_for(model).name == str(tiny_dir)
