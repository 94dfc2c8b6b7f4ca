"""Weight orthogonalization: equal to the runtime ``site="writes"`` ablation at every site and position in
the exact families (float64), saved and reloaded unchanged, the source untouched, a tied unembedding kept,
and every refusal naming its choices."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from mechintro.core.families import UnsupportedArchitectureError
from mechintro.core.hooks import capture
from mechintro.core.models import hook_names, load_model
from mechintro.core.prompts import left_pad, trial_prompt
from mechintro.mechanism.directions import ablate_directions
from mechintro.mechanism.orthogonalize import ORTHOGONALIZE_RECORD, orthogonalize
from mechintro.testing import save_tiny

# Llama with o_proj / down_proj biases; Qwen3 with tied embeddings; Qwen3-MoE (experts' down_proj)
CONFIGS = {
    "llama": {"attention_bias": True, "mlp_bias": True},
    "qwen3": {"tie_word_embeddings": True},
    "qwen3_moe": None,
}
# the experts' grouped matmul has no float64 kernel: the MoE runs in float32 (tolerance to match)
DTYPES = {"llama": torch.float64, "qwen3": torch.float64, "qwen3_moe": torch.float32}
ATOL = {torch.float64: 1e-10, torch.float32: 2e-5}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("ortho")
    return {fam: save_tiny(fam, root / fam, config=cfg) for fam, cfg in CONFIGS.items()}


@pytest.fixture(scope="module")
def models(folders):
    return {fam: load_model(folder, device="cpu", dtype=DTYPES[fam]) for fam, folder in folders.items()}


@pytest.fixture(scope="module")
def direction():
    return torch.randn(64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def _batch(model):
    return left_pad([trial_prompt(model, trial=t) for t in (1, 2)], pad_id=model.tokenizer.pad_token_id)


def _sites(model):
    names = hook_names(model)
    n = int(model.cfg.n_layers)
    sites = [names.resid_pre(la) for la in range(n)] + [names.resid_mid(la) for la in range(n)]
    return sites + [names.resid_post(la) for la in range(n)] + [names.final_norm_in()]


def _run(model, batch, sites):
    with torch.no_grad(), capture(model, sites) as acts:
        logits = model(batch.tokens, attention_mask=batch.attention_mask)
    return {s: acts[s] for s in sites} | {"logits": logits}


@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("layers", [None, [0, 2], [1, 3]], ids=["all", "0-2", "1-3"])
def test_equals_runtime_writes_ablation(models, folders, direction, family, layers):
    """Every residual site (pre, mid, post of every block, the final norm's input) and the logits, at every
    position of a padded batch, equal the runtime ablation's; and differ from the unablated model's."""
    model = models[family]
    batch, sites = _batch(model), _sites(model)
    with ablate_directions(model, direction, layers=layers, weight=1.0, site="writes"):
        want = _run(model, batch, sites)
    plain = orthogonalize(model, direction, layers=layers)
    assert next(plain.parameters()).dtype == DTYPES[family]
    got = _run(load_model(folders[family], device="cpu", dtype=DTYPES[family], hf_model=plain), batch, sites)
    before = _run(model, batch, sites)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=ATOL[DTYPES[family]], msg=key)
    assert (got["logits"] - before["logits"]).abs().max() > 1e-3  # the edit does something


def test_all_layers_leave_no_component(models, folders, direction):
    """Known answer: with every block listed, no residual site carries any component along r."""
    model = models["llama"]
    r = direction / direction.norm()
    bridged = load_model(
        folders["llama"], device="cpu", dtype=torch.float64, hf_model=orthogonalize(model, r)
    )
    acts = _run(bridged, _batch(model), _sites(model))
    for site, x in acts.items():
        if site != "logits":
            assert (x @ r).abs().max() < 1e-10, site


def test_differs_from_resid_post_ablation(models, folders, direction):
    """The checkpoint is the writes-site ablation, not the paper's default site (block 0 and each MLP read
    the stream before ``resid_post`` is ablated)."""
    model = models["llama"]
    batch = _batch(model)
    with torch.no_grad(), ablate_directions(model, direction, site="resid_post"):
        post = model(batch.tokens, attention_mask=batch.attention_mask)
    bridged = load_model(
        folders["llama"], device="cpu", dtype=torch.float64, hf_model=orthogonalize(model, direction)
    )
    with torch.no_grad():
        got = bridged(batch.tokens, attention_mask=batch.attention_mask)
    assert (got - post).abs().max() > 1e-4


def test_saved_and_reloaded(models, folders, direction, tmp_path):
    """``out=`` saves a checkpoint ``load_model`` loads; the record names source, layers and direction."""
    model = models["qwen3"]
    plain = orthogonalize(model, direction, layers=[0, 1], out=tmp_path / "ortho")
    weights = {k: v.clone() for k, v in plain.state_dict().items()}  # before a bridge wraps its modules
    record = json.loads((tmp_path / "ortho" / ORTHOGONALIZE_RECORD).read_text())
    assert record["layers"] == [0, 1] and record["exact"] and record["family"] == "qwen3"
    assert record["source"] == str(folders["qwen3"])
    assert record["direction_sha256"] == plain.mechintro_orthogonalization.direction_sha256
    r = torch.tensor(record["direction"], dtype=torch.float64)
    torch.testing.assert_close(r, direction / direction.norm(), rtol=0, atol=0)
    assert "model.layers.1.self_attn.o_proj.weight" in record["edited"]
    assert "model.layers.2.self_attn.o_proj.weight" not in record["edited"]
    batch = _batch(model)
    reloaded = load_model(tmp_path / "ortho", device="cpu", dtype=torch.float64)
    in_memory = load_model(folders["qwen3"], device="cpu", dtype=torch.float64, hf_model=plain)
    with torch.no_grad():
        a = reloaded(batch.tokens, attention_mask=batch.attention_mask)
        b = in_memory(batch.tokens, attention_mask=batch.attention_mask)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # a folder is a source too: orthogonalizing again along r changes nothing
    again = orthogonalize(str(tmp_path / "ortho"), direction, layers=[0, 1])
    assert again.mechintro_orthogonalization.source == str(tmp_path / "ortho")
    assert set(again.state_dict()) == set(weights)
    for name, value in weights.items():
        torch.testing.assert_close(again.state_dict()[name].double(), value, rtol=0, atol=1e-6, msg=name)


def test_source_unchanged(models, folders, direction):
    """Neither a bridged source nor a plain Hugging Face one is modified."""
    model = models["llama"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    orthogonalize(model, direction)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    hf = AutoModelForCausalLM.from_pretrained(folders["llama"], dtype=torch.float64)
    hf_before = {k: v.clone() for k, v in hf.state_dict().items()}
    out = orthogonalize(hf, direction)
    assert all(torch.equal(v, hf_before[k]) for k, v in hf.state_dict().items())
    assert not torch.equal(out.model.embed_tokens.weight, hf.model.embed_tokens.weight)


def test_tied_unembedding_kept(models, folders, direction, tmp_path):
    """Orthogonalizing a tied embedding unties it: the unembedding keeps the original matrix, also after
    saving and loading."""
    model = models["qwen3"]
    original = AutoModelForCausalLM.from_pretrained(folders["qwen3"], dtype=torch.float64)
    assert original.lm_head.weight is original.model.embed_tokens.weight
    embed = original.model.embed_tokens.weight.detach().clone()
    plain = orthogonalize(model, direction, out=tmp_path / "tied")
    r = direction / direction.norm()
    assert torch.equal(plain.lm_head.weight, embed)
    assert (plain.model.embed_tokens.weight @ r).abs().max() < 1e-12
    assert not plain.config.tie_word_embeddings
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "tied", dtype=torch.float64)
    assert torch.equal(back.lm_head.weight, embed)
    torch.testing.assert_close(
        back.model.embed_tokens.weight, plain.model.embed_tokens.weight, rtol=0, atol=0
    )
    # not listing block 0 leaves the tie (and both matrices) alone
    kept = orthogonalize(model, direction, layers=[1])
    assert kept.lm_head.weight is kept.model.embed_tokens.weight and torch.equal(kept.lm_head.weight, embed)


# ----------------------------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def gemma_hf(tmp_path_factory):
    folder = save_tiny("gemma3", tmp_path_factory.mktemp("gemma"))
    return AutoModelForCausalLM.from_pretrained(folder), folder


def test_post_norm_family_refused(gemma_hf, tmp_path):
    hf, _ = gemma_hf
    with pytest.raises(
        UnsupportedArchitectureError, match="post_attention_layernorm.*post_feedforward_layernorm"
    ):
        orthogonalize(hf, torch.ones(64))
    with pytest.raises(
        UnsupportedArchitectureError, match=r"ablate_directions\(model, direction, site='writes'\)"
    ):
        orthogonalize(hf, torch.ones(64))
    olmo = AutoModelForCausalLM.from_pretrained(save_tiny("olmo3", tmp_path / "olmo3"))
    with pytest.raises(UnsupportedArchitectureError, match="OLMo 3.*post_attention_layernorm"):
        orthogonalize(olmo, torch.ones(64))
    with pytest.raises(ValueError, match=r"unknown post_norm 'maybe'; valid: \['refuse', 'approximate'\]"):
        orthogonalize(hf, torch.ones(64), post_norm="maybe")


def test_post_norm_approximate_is_not_the_ablation(gemma_hf, direction):
    """``post_norm="approximate"`` edits o_proj / down_proj (and the embeddings); the pre-norm projection
    outputs lose r, but the writes after the post-norms do not, and the logits differ from the runtime
    ablation's."""
    hf, folder = gemma_hf
    model = load_model(folder, device="cpu", dtype=torch.float64)
    r = direction / direction.norm()
    plain = orthogonalize(model, r, post_norm="approximate")
    assert not plain.mechintro_orthogonalization.exact
    bridged = load_model(folder, device="cpu", dtype=torch.float64, hf_model=plain)
    names = hook_names(bridged)
    batch = _batch(model)
    sites = [names.o_proj_out(1), names.attn_out(1)]
    with torch.no_grad(), capture(bridged, sites) as acts:
        got = bridged(batch.tokens, attention_mask=batch.attention_mask)
    assert (acts[names.o_proj_out(1)] @ r).abs().max() < 1e-10
    assert (acts[names.attn_out(1)] @ r).abs().max() > 1e-3
    with torch.no_grad(), ablate_directions(model, r, site="writes"):
        want = model(batch.tokens, attention_mask=batch.attention_mask)
    assert (got - want).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weight": 0.5}, r"weight=1\.0.*got weight=0\.5.*ablate_directions"),
        ({"weight": [1.0, 1.0, 1.0, 1.0]}, r"per-layer weights.*ablate_directions"),
        ({"weight": {0: 1.0}}, r"per-layer weights.*ablate_directions"),
        ({"direction": torch.ones(4, 64)}, r"\[layer, d_model\] stack.*ablate_directions"),
        ({"direction": {0: torch.ones(64)}}, r"per-layer directions.*ablate_directions"),
        ({"direction": torch.ones(65)}, r"width 65.*d_model is 64"),
        ({"direction": torch.zeros(64)}, "zero"),
        ({"layers": [0, 9]}, "0..3|0\\.\\.3|range|layer"),
    ],
)
def test_refusals(folders, kwargs, match):
    hf = AutoModelForCausalLM.from_pretrained(folders["llama"])
    direction = kwargs.pop("direction", torch.ones(64))
    with pytest.raises(ValueError, match=match):
        orthogonalize(hf, direction, **kwargs)


def test_plain_model_needs_tokenizer_to_save(folders, tmp_path):
    hf = AutoModelForCausalLM.from_pretrained(folders["llama"])
    with pytest.raises(ValueError, match="tokenizer="):
        orthogonalize(hf, torch.ones(64), out=tmp_path / "x")
