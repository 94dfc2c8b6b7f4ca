"""The OLMo 3 organism: the recipe trains an Olmo3ForCausalLM whose transcoders read the MLP's own input, and
the shipped one (``organism-olmo``) meets the Gemma organism's bands."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from mechintro.core import resources
from mechintro.core.hooks import capture
from mechintro.core.models import family, hook_names, load_model, spec_for
from mechintro.core.transcoders import load_transcoders
from mechintro.organism import build
from mechintro.organism.calibrate import band_checks
from mechintro.organism.train import OrganismConfig, hf_state_dict

torch.set_num_threads(1)


def _short(seed: int = 3) -> OrganismConfig:
    """The quick OLMo config, cut to a few steps and examples (the code paths of the full recipe)."""
    return dataclasses.replace(
        OrganismConfig.quick(seed=seed, family="olmo3"),
        base_steps=2,
        instruct_steps=2,
        chat_batch=4,
        trial_batch=4,
        transcoder_width=64,
        transcoder_steps=3,
        transcoder_chats=16,
        transcoder_trials=8,
    )


@pytest.fixture(scope="module")
def short(tmp_path_factory):
    out = tmp_path_factory.mktemp("organism-olmo")
    cfg = _short()
    return {"out": out, "cfg": cfg, "report": build(out, cfg=cfg, evaluate=False, calibration=False)}


def _check_olmo_artifacts(out, cfg, trained) -> None:
    """Both checkpoints are plain Olmo3ForCausalLM folders (untied unembedding) that reload with the
    trained weights, record family olmo3, and carry transcoders on ``blocks.L.mlp.hook_in``."""
    for name in ("organism", "organism-base"):
        config = json.loads((out / name / "config.json").read_text())
        assert config["architectures"] == ["Olmo3ForCausalLM"] and config["model_type"] == "olmo3"
        assert config["tie_word_embeddings"] is False
        assert config["layer_types"] == ["sliding_attention"] * 3 + ["full_attention"]
        model = load_model(out / name)
        assert family(model).name == "olmo3" and type(model.original_model).__name__ == "Olmo3ForCausalLM"
        spec = spec_for(model)
        assert spec.extra["organism_config"]["family"] == "olmo3"
        tcs = load_transcoders(model)
        assert sorted(tcs) == list(range(cfg.n_layers))
        for layer, tc in tcs.items():
            assert tc.cfg.metadata.hook_name == f"blocks.{layer}.mlp.hook_in"
            # the file itself says so too (what a sae-lens user reading cfg.json sees)
            saved = json.loads((out / name / "transcoders" / f"layer_{layer}" / "cfg.json").read_text())
            assert saved["metadata"]["hook_name"] == f"blocks.{layer}.mlp.hook_in"
            assert tc.cfg.metadata.hook_name == hook_names(model).transcoder_in(layer)
            assert tc.cfg.d_sae == cfg.transcoder_width
    state = hf_state_dict(load_model(out / "organism"))
    assert state.keys() == trained.keys()
    for key in trained:
        assert torch.equal(state[key], trained[key]), key
    assert not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])


def test_the_short_olmo_recipe_saves_an_olmo3_organism(short):
    trained = hf_state_dict(short["report"]["trained_model"])
    _check_olmo_artifacts(short["out"], short["cfg"], trained)
    split = json.loads((short["out"] / "organism_split.json").read_text())
    assert len(split["training"]) == 400 and len(split["heldout"]) == 100


def test_an_unknown_family_is_refused_naming_the_valid_ones():
    with pytest.raises(ValueError, match=r"'llama'.*valid: \['gemma3', 'olmo3'\]"):
        OrganismConfig(family="llama")
    with pytest.raises(ValueError, match="valid"):
        OrganismConfig.quick(family="olmo")


@pytest.mark.slow
def test_the_quick_olmo_recipe_trains_and_calibrates(tmp_path):
    """The --quick OLMo organism (``mechintro organism train --family olmo --quick``): every stage, the
    quick calibration recorded in both checkpoints."""
    from mechintro.organism.calibrate import CalibrationConfig

    cfg = OrganismConfig.quick(seed=3, family="olmo3")
    report = build(tmp_path, cfg=cfg, evaluate=False, calibration=CalibrationConfig.quick())
    _check_olmo_artifacts(tmp_path, cfg, hf_state_dict(report["trained_model"]))
    point = report["operating_point"]
    for name in ("organism", "organism-base"):
        assert spec_for(load_model(tmp_path / name)).strength == point.strength


# ----------------------------------------------------------------------------------------------- shipped

OLMO = resources.organism_root("organism-olmo")
shipped = pytest.mark.skipif(OLMO is None, reason="the OLMo organism is not shipped")


@shipped
def test_the_shipped_olmo_organism_is_an_olmo3_with_transcoders_on_the_mlp_input():
    """Both shipped checkpoints load as family olmo3; their transcoders are wired to ``mlp.hook_in`` and
    reconstruct ``hook_mlp_out`` from there, not from the other side of the norm (``ln2.hook_out``, which in
    OLMo is the post-feedforward norm's output)."""
    from mechintro.core.prompts import chat_prompt_tokens, left_pad

    assert OLMO == resources.package_data() / "olmo"
    for name in ("organism-olmo", "organism-olmo-base"):
        model = load_model(name)
        assert family(model).name == "olmo3" and type(model.original_model).__name__ == "Olmo3ForCausalLM"
        assert spec_for(model).name == name
        tcs = load_transcoders(model)
        assert sorted(tcs) == list(range(int(model.cfg.n_layers)))
        hooks = hook_names(model)
        layer = spec_for(model).injection_layer + 1
        assert (
            tcs[layer].cfg.metadata.hook_name == f"blocks.{layer}.mlp.hook_in" == hooks.transcoder_in(layer)
        )
        for cfg_json in sorted(resources.organism_checkpoint(name).glob("transcoders/layer_*/cfg.json")):
            recorded = json.loads(cfg_json.read_text())["metadata"]
            assert recorded["hook_name"] == f"blocks.{recorded['layer']}.mlp.hook_in", cfg_json
        prompts = [chat_prompt_tokens(model, f"Tell me about {c}") for c in ("Bread", "Oceans", "Dust")]
        batch = left_pad(prompts, pad_id=model.tokenizer.pad_token_id)
        sites = [hooks.transcoder_in(layer), f"blocks.{layer}.ln2.hook_out", hooks.transcoder_out(layer)]
        with torch.no_grad(), capture(model, sites) as acts:
            model(batch.tokens, attention_mask=batch.attention_mask)
        real = batch.attention_mask.bool()
        x, wrong, y = (acts[s][real].float() for s in sites)
        assert torch.equal(wrong, y), "in OLMo, ln2 is the post-feedforward norm: its output is hook_mlp_out"
        with torch.no_grad():
            fvu = {
                k: float(((tcs[layer](v) - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())
                for k, v in (("right", x), ("wrong", wrong))
            }
        assert fvu["right"] < 0.2 < fvu["wrong"], fvu


@shipped
def test_the_shipped_olmo_organism_meets_the_gemma_organisms_bands():
    """At its calibrated default (held-out concepts, 20 trials each): TPR 0.25-0.6, FPR <= 0.05, >= 15
    concepts detected in >= 70% and >= 15 in <= 20% of trials, introspection lower bound > 0.05; its base
    checkpoint does not discriminate; the report's default is the one both checkpoints record."""
    report = json.loads((OLMO / "organism_report.json").read_text())
    measured = report["bands"]["measured"]
    assert band_checks(measured) == report["bands"]["met"]
    assert all(report["bands"]["met"].values()), report["bands"]
    assert measured["trials_per_concept"] >= 20 and measured["n_concepts"] == 100
    assert report["base_heldout"]["tpr"] - report["base_heldout"]["fpr"] <= 0.10
    strength = report["operating_point"]["strength"]
    for name in ("organism-olmo", "organism-olmo-base"):
        assert spec_for(load_model(name)).strength == strength
    point = json.loads((OLMO / "organism_operating_point.json").read_text())
    assert point["point"]["strength"] == strength and all(point["met"].values())


@shipped
def test_the_olmo_organism_shares_the_gemma_organisms_split():
    """Same seed, same split: the held-out concepts (``--concepts held-out``) are those of both organisms."""
    olmo = json.loads((OLMO / "organism_split.json").read_text())
    gemma = json.loads(resources.organism_file("organism_split.json").read_text())
    assert olmo == gemma


@shipped
@pytest.mark.parametrize(("family_name", "sub"), [("gemma3", ""), ("olmo3", "olmo")])
def test_each_familys_config_is_the_shipped_organisms(family_name, sub):
    """The recipe's Hugging Face config of each family is the shipped organism's ``config.json``, field for
    field (the Gemma one unchanged by the family parameter); only what saving adds differs."""
    from mechintro.organism.train import hf_class, hf_config, make_tokenizer

    config = hf_config(OrganismConfig(family=family_name), make_tokenizer())
    config.architectures = [hf_class(family_name).__name__]
    mine = json.loads(config.to_json_string())
    root = resources.package_data() / sub if sub else resources.package_data()
    saved = json.loads((root / "organism" / "config.json").read_text())
    added_on_save = {"dtype", "transformers_version", "output_attentions"}
    # versions write rope_parameters flat or nested per layer type; compare what each layer type reads
    mine["rope_parameters"], saved["rope_parameters"] = (
        rope_per_layer_type(c["rope_parameters"], c["layer_types"]) for c in (mine, saved)
    )
    assert {k: v for k, v in mine.items() if k not in added_on_save} == {
        k: v for k, v in saved.items() if k not in added_on_save
    }


def rope_per_layer_type(rope: dict, layer_types: list[str]) -> dict[str, dict]:
    """``rope_parameters`` as each layer type reads it: its nested entry where there is one, else the flat
    keys (how versions before per-layer-type rope read every layer)."""
    flat = {k: v for k, v in rope.items() if k not in layer_types}
    return {t: rope.get(t, flat) for t in sorted(set(layer_types))}
