"""The released code's models and injection points (src/model_utils.py, experiments/03 and 03c)."""

import pytest

from mechintro.core import models as mm
from mechintro.core.families import family_by_name
from mechintro.core.paper_models import (
    OLMO_SWEEP_FRACTIONS,
    OLMO_SWEEP_STRENGTHS,
    PAPER_MODELS,
    fraction_layer,
    injection_point,
    paper_model,
)
from mechintro.testing import save_tiny


def test_the_layer_is_int_of_fraction_times_layers_clamped():
    assert fraction_layer(0.61, 62) == 37  # Gemma3-27B-IT: the fallback gives the paper's layer too
    assert fraction_layer(0.61, 64) == 39  # OLMo 3 32B: int(39.04)
    assert fraction_layer(0.61, 94) == 57  # Qwen3-235B-A22B: int(57.34), not round()
    assert fraction_layer(0.69, 10) == 6  # int() truncates: round() would give 7
    assert fraction_layer(1.0, 10) == 9 and fraction_layer(-0.1, 10) == 0


def test_every_record_names_a_known_family_and_a_valid_layer():
    for record in PAPER_MODELS:
        family_by_name(record.family)
        assert 0 <= record.injection_layer() < record.n_layers
        assert record.source


def test_gemma3_27b_keeps_layer_37_of_62_at_strength_4_as_the_papers_point():
    layer, strength, provenance = injection_point("google/gemma-3-27b-it", 62)
    assert (layer, strength) == (37, 4.0)
    assert paper_model("gemma3_27b").calibrated and "stimuli.json" in provenance
    # at another depth the fixed layer gives way to the fraction
    assert paper_model("gemma3_27b").injection_layer(32) == fraction_layer(0.61, 32) == 19


def test_olmo_stages_and_their_sweep_are_the_released_codes():
    stages = [(m.key, m.hf_id, m.stage) for m in PAPER_MODELS if m.family == "olmo3"]
    assert stages == [
        ("olmo_base", "allenai/Olmo-3-1125-32B", "Base"),
        ("olmo_sft", "allenai/Olmo-3.1-32B-Instruct-SFT", "SFT"),
        ("olmo_dpo", "allenai/Olmo-3.1-32B-Instruct-DPO", "DPO"),
        ("olmo_instruct", "allenai/Olmo-3.1-32B-Instruct", "Instruct"),
    ]
    assert OLMO_SWEEP_FRACTIONS == (0.4, 0.5, 0.6, 0.7, 0.8) and OLMO_SWEEP_STRENGTHS == (1.0, 2.0, 4.0, 8.0)
    base = paper_model("olmo_base")
    assert not base.chat and paper_model("olmo_dpo").chat
    layer, strength, provenance = injection_point("olmo_dpo", 64)
    assert (layer, strength) == (39, 4.0) and "not a calibrated one" in provenance


def test_qwen3_235b_is_the_moe_instruct_2507_at_the_fallback_point():
    record = paper_model("Qwen/Qwen3-235B-A22B-Instruct-2507")
    assert record.key == "qwen3_235b" and record.family == "qwen3_moe" and not record.calibrated
    assert injection_point(record.hf_id, 94)[:2] == (57, 4.0)


def test_short_names_resolve_to_hub_ids_and_their_depth_is_known_before_loading():
    assert mm._resolve("olmo_sft") == ("allenai/Olmo-3.1-32B-Instruct-SFT", None)
    assert mm.peek_n_layers("qwen3_235b") == 94
    assert paper_model("no_such_model") is None and injection_point("no_such_model", 10) is None


def test_a_model_the_paper_does_not_name_gets_the_relative_depth_and_says_it_is_a_default(tmp_path):
    model = mm.load_model(save_tiny("qwen3", tmp_path / "q", n_layers=4, d_model=32), device="cpu")
    spec = mm.spec_for(model)
    assert spec.injection_layer == mm.paper_layer(4) == 2 and spec.strength == 4.0
    assert not spec.calibrated and "not a calibrated point" in spec.provenance
    assert "default, not a calibrated point" in spec.describe()


def test_the_organisms_recorded_point_is_calibrated():
    spec = mm.spec_for(mm.load_model("organism", device="cpu"))
    assert spec.calibrated and "calibrated on held-out concepts" in spec.provenance
    assert spec.describe().startswith("organism: inject at layer 3 of 8, strength 2.11 (calibrated point")


@pytest.mark.parametrize("name", ["gemma3_27b", "olmo_instruct"])
def test_an_unknown_short_name_lists_the_papers_models(name):
    with pytest.raises(ValueError, match=name):
        mm._resolve("not-a-model")
