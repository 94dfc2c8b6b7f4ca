"""Gemma 4 (text) variants beyond the dense layout: behaviour is exact against plain Hugging Face, and every
mechanism analysis refuses them with an error naming what they have.

Variants (tiny random configs): per-layer embeddings with KV-shared layers (the E2B / E4B layout) and the MoE
branch (the 26B-A4B layout). The dense layout (31B) is in ``test_families.py``.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from mechintro.core.families import UnsupportedArchitectureError
from mechintro.core.models import hook_names, load_model, spec_for
from mechintro.testing import save_random_transcoders, save_tiny

LAYER = 1
VARIANTS = {
    "per-layer embeddings, KV-shared": (
        {"hidden_size_per_layer_input": 16, "num_kv_shared_layers": 2},
        "hidden_size_per_layer_input=16",
    ),
    "MoE branch": (
        {"enable_moe_block": True, "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 32},
        "enable_moe_block=True",
    ),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    overrides, named = VARIANTS[request.param]
    folder = tmp_path_factory.mktemp("gemma4_variant")
    from mechintro.organism.tiny import _word_tokenizer

    config = dict(overrides)
    if "hidden_size_per_layer_input" in config:
        config["vocab_size_per_layer_input"] = len(_word_tokenizer())
    save_tiny("gemma4_text", folder, n_layers=4, d_model=32, n_heads=2, n_kv_heads=1, d_mlp=64, config=config)
    model = load_model(folder, device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    return request.param, named, model, hf, folder


def test_logits_equal_plain_hf(variant):
    _, _, model, hf, _ = variant
    tokens = torch.randint(10, len(model.tokenizer), (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(input_ids=tokens).logits, rtol=0.0, atol=1e-5)


def test_run_trials_equals_plain_hf_generate_with_a_hand_written_hook(variant):
    from hf_reference import greedy, injection

    from mechintro.behaviour.judges import RuleJudge
    from mechintro.behaviour.trials import run_trials
    from mechintro.core.prompts import trial_prompt
    from mechintro.core.sampling import stop_ids

    name, _, model, hf, _ = variant
    vectors = torch.randn(1, int(model.cfg.d_model), generator=torch.Generator().manual_seed(5)) * 4
    kw = dict(layer=LAYER, strength=3.0, n_trials=1, trials=[1], judge=RuleJudge(), vectors=vectors)
    df = run_trials(model, ["Bread"], **kw, max_new_tokens=4, temperature=0.0, batch_size=4, progress=False)
    assert set(df["condition"]) == {"control", "injection"}
    for row in df.itertuples():
        p = trial_prompt(model, trial=int(row.trial))
        hooks = [injection(LAYER, vectors[0], 3.0, p.injection_start)] if row.condition == "injection" else []
        tokens, _ = greedy(hf, p.tokens, hooks=hooks, max_new_tokens=4, stop=stop_ids(model))
        text = model.tokenizer.decode(tokens.tolist(), skip_special_tokens=True).strip()
        assert (row.response, row.n_new_tokens) == (text, len(tokens)), (name, row.condition)
    assert df["response"].nunique() == 2, "the injection must change the response"


def test_every_mechanism_analysis_refuses_the_variant_by_name(variant, tmp_path):
    from mechintro.core.transcoders import load_transcoders
    from mechintro.mechanism.patching import component_patching

    _, named, model, _, _ = variant
    spec = spec_for(model)
    assert spec.family == "gemma4_text" and named in spec.mechanism_problem
    source = save_random_transcoders(tmp_path / "tcs", d_model=32, n_layers=4)
    with pytest.raises(UnsupportedArchitectureError, match=f"loading transcoders .*{named}.*dense layout"):
        load_transcoders(model, source=source)
    with pytest.raises(UnsupportedArchitectureError, match=named):
        hook_names(model).transcoder_in(LAYER)
    with pytest.raises(UnsupportedArchitectureError, match=f"component patching .*{named}"):
        component_patching(model, ["Bread"], progress=False)
