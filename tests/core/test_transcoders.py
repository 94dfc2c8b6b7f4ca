"""Transcoders: raw Gemma Scope 2 files, sae-lens folders, sae-lens releases (offline cache), wiring,
encode_at."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_capture
from safetensors.torch import save_file

from mechintro.core.models import HookNames
from mechintro.core.prompts import left_pad, trial_prompt
from mechintro.core.transcoders import (
    TranscoderMismatchError,
    encode_at,
    load_folder,
    load_transcoders,
    save_transcoder,
    transcoder_layer,
)

D_SAE = 96


def raw_params(d_in=64, d_out=64, *, seed=0, skip=True):
    g = torch.Generator().manual_seed(seed)
    p = {
        "w_enc": torch.randn(d_in, D_SAE, generator=g) * 0.3,
        "w_dec": torch.randn(D_SAE, d_out, generator=g) * 0.3,
        "b_enc": torch.randn(D_SAE, generator=g) * 0.1,
        "b_dec": torch.randn(d_out, generator=g) * 0.1,
        "threshold": torch.rand(D_SAE, generator=g) * 0.5,
    }
    if skip:
        p["affine_skip_connection"] = torch.randn(d_in, d_out, generator=g) * 0.1
    return p


@pytest.fixture(scope="module")
def raw_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw_tc")
    for layer in range(4):
        (root / f"layer_{layer}").mkdir()
        save_file(raw_params(seed=layer), str(root / f"layer_{layer}" / "params.safetensors"))
    return root


def test_raw_converter_computes_gemma_scope_jumprelu_skip(raw_folder):
    p = raw_params(seed=1)
    tc = load_folder(raw_folder / "layer_1", layer=1)
    x = torch.randn(5, 64)
    pre = x @ p["w_enc"] + p["b_enc"]
    acts = torch.relu(pre) * (pre > p["threshold"])
    torch.testing.assert_close(tc.encode(x), acts)
    torch.testing.assert_close(tc(x), acts @ p["w_dec"] + p["b_dec"] + x @ p["affine_skip_connection"])
    assert type(tc).__name__ == "JumpReLUSkipTranscoder"


def test_wiring_is_ln2_hook_out_to_hook_mlp_out(tiny, raw_folder):
    tcs = load_transcoders(tiny, source=raw_folder)
    assert sorted(tcs) == [0, 1, 2, 3]
    for layer, tc in tcs.items():
        assert tc.cfg.metadata.hook_name == HookNames.transcoder_in(layer) == f"blocks.{layer}.ln2.hook_out"
        assert (
            tc.cfg.metadata.hook_name_out == HookNames.transcoder_out(layer) == f"blocks.{layer}.hook_mlp_out"
        )
        assert tc.cfg.metadata.source_hook_name == f"blocks.{layer}.hook_mlp_in"
        assert transcoder_layer(tc) == layer


def test_encode_at_reads_the_pre_feedforward_norm_output(tiny, hf_tiny, raw_folder):
    """Fails if the input were wired to the pre-norm residual (sae-lens's hook_mlp_in)."""
    tcs = load_transcoders(tiny, source=raw_folder)
    tokens = trial_prompt(tiny, trial=2).tokens
    ours = encode_at(tiny, tcs, tokens)
    names = [f"model.layers.{i}.pre_feedforward_layernorm" for i in range(4)]
    names += [f"model.layers.{i}" for i in range(4)]
    _, hf = hf_capture(hf_tiny, tokens[None], names)
    for layer, tc in tcs.items():
        x = hf[f"model.layers.{layer}.pre_feedforward_layernorm"][:, -1:]
        expected = tc.encode(x)
        assert ours[layer].shape == (1, 1, D_SAE)
        torch.testing.assert_close(ours[layer], expected, rtol=1e-5, atol=1e-5)
        assert (expected > 0).any()
    # the pre-norm residual gives different features: the wiring test above can tell the sites apart
    from mechintro.core.transcoders import transcoder_inputs

    pre = transcoder_inputs(tiny, [1], tokens, positions="last")[1]
    with torch.no_grad():
        from mechintro.core.hooks import hooks_context

        got = {}
        with hooks_context(
            tiny, [(HookNames.mlp_in_prenorm(1), lambda x, hook: got.update(x=x[:, -1:].clone()))]
        ):
            tiny(tokens[None])
    assert not torch.allclose(tcs[1].encode(got["x"]), tcs[1].encode(pre), atol=1e-3)


def test_encode_at_positions_batches_and_sparse(tiny, raw_folder):
    tcs = load_transcoders(tiny, [1, 3], source=raw_folder)
    prompts = [trial_prompt(tiny, trial=1), trial_prompt(tiny, trial=2, variant="neutral_query")]
    b = left_pad(prompts, pad_id=tiny.tokenizer.pad_token_id)
    dense = encode_at(tiny, tcs, b.tokens, attention_mask=b.attention_mask)
    sparse = encode_at(tiny, tcs, b.tokens, attention_mask=b.attention_mask, sparse=True)
    for layer in (1, 3):
        assert sparse[layer].is_sparse
        torch.testing.assert_close(sparse[layer].to_dense(), dense[layer])
        single = encode_at(tiny, {layer: tcs[layer]}, prompts[1].tokens)[layer]
        torch.testing.assert_close(dense[layer][1], single[0], rtol=1e-4, atol=1e-4)
    many = encode_at(tiny, tcs, prompts[0].tokens, positions=[0, -1, 5])
    assert many[1].shape == (1, 3, D_SAE)
    torch.testing.assert_close(many[1][:, 1], dense[1][0, :1, :].squeeze(0)[None], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="outside this forward call"):
        encode_at(tiny, tcs, prompts[0].tokens, positions=[10_000])


def test_sae_lens_folder_round_trip(tiny, raw_folder, tmp_path):
    tcs = load_transcoders(tiny, [2], source=raw_folder)
    save_transcoder(tcs[2], tmp_path / "layer_2")
    from sae_lens import SAE

    plain = SAE.load_from_disk(tmp_path / "layer_2")
    for name, param in tcs[2].state_dict().items():
        assert torch.equal(plain.state_dict()[name], param), name
    again = load_transcoders(tiny, [2], source=tmp_path)[2]
    assert again.cfg.metadata.hook_name == "blocks.2.ln2.hook_out"
    x = torch.randn(3, 64)
    torch.testing.assert_close(again(x), tcs[2](x))


def _fake_hub_cache(root, repo_id, files):
    """Lay out files the way huggingface_hub caches a snapshot."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for rel, tensors in files.items():
        path = repo / "snapshots" / commit / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path))


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return tmp_path


def test_gemma_scope_release_from_local_hub_cache(tiny, offline_hub):
    release, pattern = "gemma-scope-2-270m-it-transcoders-all", "layer_{layer}_width_16k_l0_small_affine"
    files = {
        f"transcoder_all/{pattern.format(layer=layer)}/params.safetensors": raw_params(seed=layer)
        for layer in (0, 1)
    }
    _fake_hub_cache(offline_hub, "google/gemma-scope-2-270m-it", files)
    tcs = load_transcoders(tiny, [0, 1], source=release, id_pattern=pattern)
    assert tcs[1].cfg.metadata.model_name == "google/gemma-3-270m-it"
    assert tcs[1].cfg.metadata.hook_name == "blocks.1.ln2.hook_out"
    torch.testing.assert_close(tcs[1].W_skip, raw_params(seed=1)["affine_skip_connection"].T)
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        load_transcoders(tiny, [2], source=release, id_pattern=pattern)


def test_bad_input_names_valid_choices(tiny, raw_folder, tmp_path):
    with pytest.raises(ValueError, match=r"valid layers are 0..3"):
        load_transcoders(tiny, [7], source=raw_folder)
    with pytest.raises(ValueError, match="gemma-scope-2-27b-it-transcoders-all"):
        load_transcoders(tiny, [0], source="gemma-scope-9-transcoders", id_pattern="layer_{layer}")
    with pytest.raises(ValueError, match="layer_0_width_16k_l0_big"):
        load_transcoders(
            tiny, [0], source="gemma-scope-2-270m-it-transcoders-all", id_pattern="layer_{layer}_x"
        )
    with pytest.raises(ValueError, match="no default transcoders"):
        load_transcoders(tiny)
    (tmp_path / "layer_0").mkdir()
    save_file(raw_params(d_in=32, d_out=32), str(tmp_path / "layer_0" / "params.safetensors"))
    with pytest.raises(TranscoderMismatchError, match="d_model is 64"):
        load_transcoders(tiny, [0], source=tmp_path)


def test_transcoders_for_another_gemma_are_refused(tiny_dir, offline_hub):
    from mechintro.core.models import load_model, with_spec

    model = load_model(tiny_dir)
    with_spec(model, name="google/gemma-3-1b-it")
    release, pattern = "gemma-scope-2-270m-it-transcoders-all", "layer_{layer}_width_16k_l0_small_affine"
    _fake_hub_cache(
        offline_hub,
        "google/gemma-scope-2-270m-it",
        {f"transcoder_all/{pattern.format(layer=0)}/params.safetensors": raw_params(seed=0)},
    )
    with pytest.raises(
        TranscoderMismatchError, match="for google/gemma-3-270m-it, but the model is google/gemma-3-1b-it"
    ):
        load_transcoders(model, [0], source=release, id_pattern=pattern)


def test_replace_mlps_substitutes_the_transcoder_output(tiny, hf_tiny, raw_folder):
    from mechintro.core.hooks import hooks_context
    from mechintro.core.transcoders import replace_mlps

    tcs = load_transcoders(tiny, [1, 2], source=raw_folder)
    tokens = trial_prompt(tiny, trial=3).tokens[None]
    got = {}

    def grab(name):
        return lambda x, hook: got.__setitem__(name, x.detach().clone())

    names = [HookNames.transcoder_in(1), HookNames.transcoder_out(1)]
    with torch.no_grad(), replace_mlps(tiny, tcs), hooks_context(tiny, [(n, grab(n)) for n in names]):
        replaced = tiny(tokens)
    torch.testing.assert_close(got[HookNames.transcoder_out(1)], tcs[1](got[HookNames.transcoder_in(1)]))
    with torch.no_grad():
        clean = tiny(tokens)
    assert not torch.allclose(clean, replaced, atol=1e-3)
    with torch.no_grad():  # hooks are gone afterwards
        torch.testing.assert_close(tiny(tokens), clean)
