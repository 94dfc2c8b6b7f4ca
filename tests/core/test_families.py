"""Every supported family, on a tiny random checkpoint saved with ``save_pretrained``, against plain Hugging
Face: logits, every named site of its description, the transcoder input (the MLP's input, never its output),
and ``inject`` in a left-padded batch.

Float32 throughout: transformers' grouped expert product (Qwen3-MoE) has no float64 kernel on CPU, and in
float64 Hugging Face's eager attention turns a fully masked (pad) query row into NaN, which then reaches the
real rows of a left-padded batch through the values (``0 * NaN``); in float32 it does not.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from mechintro.core.families import FAMILIES, UnsupportedArchitectureError, family_by_name, family_of
from mechintro.core.hooks import capture
from mechintro.core.models import HookNames, hook_names, load_model, spec_for
from mechintro.core.steering import inject
from mechintro.testing import TINY_FAMILIES, save_tiny

LAYER = 1
SAME = {"rtol": 0.0, "atol": 1e-5}
"""The same arithmetic on the same weights (float32); observed differences are 0 or float32 rounding."""


def _dtype(name: str) -> torch.dtype:
    return torch.float32


def _tol(name: str) -> dict:
    return SAME


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def pair(request, tmp_path_factory):
    """(family name, mechintro model, plain HF model with the same weights)."""
    name = request.param
    folder = save_tiny(name, tmp_path_factory.mktemp(f"tiny_{name}"))
    model = load_model(folder, device="cpu", dtype=_dtype(name))
    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=_dtype(name)).eval()
    return name, model, hf


def _hf_sites(hf, tokens, sites, *, attention_mask=None):
    """``{site name: tensor}`` from one plain-HF forward, read with torch hooks on the named modules."""
    got, handles = {}, []
    for key, (module, side) in sites.items():
        mod = hf.get_submodule(module)
        if side == "output":

            def after(_m, _i, out, key=key):
                got[key] = (out[0] if isinstance(out, tuple) else out).detach()

            handles.append(mod.register_forward_hook(after))
        else:

            def before(_m, args, kwargs, key=key):
                got[key] = (args[0] if args else kwargs["hidden_states"]).detach()

            handles.append(mod.register_forward_pre_hook(before, with_kwargs=True))
    try:
        with torch.no_grad():
            logits = hf(input_ids=tokens, attention_mask=attention_mask).logits
    finally:
        for h in handles:
            h.remove()
    return logits, got


def _tokens(model, n=9):
    g = torch.Generator().manual_seed(1)
    return torch.randint(10, len(model.tokenizer), (2, n), generator=g)


def test_family_lookup_names_the_supported_families():
    assert family_of({"model_type": "gemma3_text"}).name == "gemma3"
    assert family_of({"architectures": ["Olmo2ForCausalLM"]}).name == "olmo2"
    assert (
        family_of({"model_type": "gemma4", "text_config": {"model_type": "gemma4_text"}}).name
        == "gemma4_text"
    )
    with pytest.raises(UnsupportedArchitectureError, match="supported: Gemma 3.*OLMo 3"):
        family_of({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(UnsupportedArchitectureError, match="unknown family 'mamba'; valid"):
        family_by_name("mamba")
    assert {f.name for f in FAMILIES} == set(TINY_FAMILIES)


def test_gemma3_names_are_unchanged():
    """The class-level names (Gemma 3, the organism) are the strings mechintro always used."""
    assert HookNames.transcoder_in(3) == "blocks.3.ln2.hook_out"
    assert HookNames.transcoder_out(3) == "blocks.3.hook_mlp_out"
    assert HookNames.mlp_in_prenorm(3) == "blocks.3.ln2.hook_in"
    assert HookNames.attn_z(3) == "blocks.3.attn.o.hook_in"
    assert HookNames.component("attn", 2) == "blocks.2.hook_attn_out"
    assert HookNames.final_norm_in() == "ln_final.hook_in"
    assert HookNames.of_family("olmo2").transcoder_in(3) == "blocks.3.mlp.hook_in"


def test_an_unsupported_architecture_is_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel.*supported: Gemma 3"):
        load_model(tmp_path, device="cpu")


def test_logits_equal_plain_hf(pair):
    name, model, hf = pair
    tokens = _tokens(model)
    with torch.no_grad():
        ours = model(tokens, return_type="logits")
        ref = hf(input_ids=tokens).logits
    torch.testing.assert_close(ours, ref, **_tol(name))
    assert spec_for(model).family == name


def test_every_named_site_equals_the_hf_module_it_names(pair):
    name, model, hf = pair
    fam = family_by_name(name)
    tokens = _tokens(model)
    sites = {key: (site.module_name(LAYER), site.side) for key, site in fam.sites.items()}
    _, ref = _hf_sites(hf, tokens, sites)
    hooks = {key: site.hook_name(LAYER) for key, site in fam.sites.items()}
    with capture(model, list(hooks.values()), positions="all") as acts, torch.no_grad():
        model(tokens)
    for key, hook in hooks.items():
        ours = acts[hook]
        ours = ours.flatten(-2) if ours.ndim == 4 else ours  # o_proj_in: the bridge splits the heads
        torch.testing.assert_close(ours, ref[key], **_tol(name), msg=lambda m, key=key: f"{name} {key}: {m}")


def test_transcoder_input_is_the_mlp_input_not_its_output(pair):
    name, model, hf = pair
    fam = family_by_name(name)
    names = hook_names(model)
    if fam.support != "mechanism":
        with pytest.raises(UnsupportedArchitectureError, match="Qwen3-MoE lacks"):
            names.transcoder_in(LAYER)
        return
    tokens = _tokens(model)
    mlp = f"model.layers.{LAYER}.mlp"
    _, ref = _hf_sites(hf, tokens, {"in": (mlp, "input"), "out": (mlp, "output")})
    with capture(model, [names.transcoder_in(LAYER)], positions="all") as acts, torch.no_grad():
        model(tokens)
    x = acts[names.transcoder_in(LAYER)]
    torch.testing.assert_close(x, ref["in"], **_tol(name))
    assert not torch.allclose(x, ref["out"], atol=1e-3)


def test_inject_equals_a_manual_hf_hook_per_row_in_a_left_padded_batch(pair):
    name, model, hf = pair
    dtype = _dtype(name)
    pad = model.tokenizer.pad_token_id
    g = torch.Generator().manual_seed(2)
    lengths, width = [9, 6], 9
    tokens = torch.full((2, width), pad)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, n in enumerate(lengths):
        tokens[row, width - n :] = torch.randint(10, len(model.tokenizer), (n,), generator=g)
        mask[row, width - n :] = 1
    starts = torch.tensor([4, 6])  # absolute positions in the padded batch
    vecs = torch.randn(2, int(model.cfg.d_model), generator=g, dtype=dtype)
    strengths = torch.tensor([3.0, -2.0], dtype=dtype)

    with inject(model, vecs, layer=LAYER, strength=strengths, start=starts), torch.no_grad():
        ours = model(tokens, attention_mask=mask, return_type="logits")
    for row, n in enumerate(lengths):
        pad_n = width - n
        start = int(starts[row]) - pad_n  # the same token, in the row's own unpadded prompt

        def manual(_m, _i, out, row=row, start=start):
            h = out[0] if isinstance(out, tuple) else out
            h = h.clone()
            h[:, start:] += strengths[row] * vecs[row]
            return (h, *out[1:]) if isinstance(out, tuple) else h

        handle = hf.get_submodule(f"model.layers.{LAYER}").register_forward_hook(manual)
        try:
            with torch.no_grad():
                ref = hf(input_ids=tokens[row : row + 1, pad_n:]).logits[0]
        finally:
            handle.remove()
        torch.testing.assert_close(
            ours[row, pad_n:], ref, **_tol(name), msg=lambda m, row=row: f"{name} row {row}: {m}"
        )
        with torch.no_grad():
            plain = hf(input_ids=tokens[row : row + 1, pad_n:]).logits[0]
        assert not torch.allclose(plain, ref, atol=1e-3)  # the injection does change the logits


def test_run_trials_fast_path_equals_the_bridge(pair):
    """The shared-prefix prefill and greedy generation run on every family (Llama and OLMo 2 have no
    ``layer_types``: one mask, not a dict per attention kind), with the same tokens on both paths."""
    from mechintro.behaviour.judges import RuleJudge
    from mechintro.behaviour.trials import run_trials
    from mechintro.core.fastpath import choose_path

    name, model, _ = pair
    vectors = torch.randn(2, int(model.cfg.d_model), generator=torch.Generator().manual_seed(3)) * 4
    kw = dict(layer=LAYER, strength=3.0, n_trials=2, judge=RuleJudge(), vectors=vectors, trials=[1, 10])
    kw |= {"max_new_tokens": 5, "progress": False, "batch_size": 4}
    assert choose_path(model)[0] == "hf"
    fast = run_trials(model, ["Bread", "Oceans"], **kw)
    with model.hooks(fwd_hooks=[(HookNames.resid_pre(0), lambda x, hook=None: None)]):
        assert choose_path(model)[0] == "bridge"
        bridge = run_trials(model, ["Bread", "Oceans"], **kw)
    cols = ["concept", "trial", "condition", "response", "n_new_tokens"]
    assert fast[cols].equals(bridge[cols]), name


# ------------------------------------------------------------------------- against plain HF, step by step


def _trial_prompts(model):
    """Three trial prompts of two lengths (the forced prefill makes one longer), so the batch is padded."""
    from mechintro.core.prompts import forced_prefill, trial_prompt

    return [
        trial_prompt(model, trial=1),
        trial_prompt(model, trial=2, prefill=forced_prefill()),
        trial_prompt(model, trial=10),
    ]


STEP_TOL = {"rtol": 0.0, "atol": 1e-4}
"""Cached steps against plain HF generate (float32): another batch layout and kernel order, the same math;
observed differences ~1e-6."""


@pytest.mark.parametrize("path", ["hf", "bridge"])
def test_inject_equals_a_manual_hf_hook_on_every_cached_step(pair, path):
    """Greedy KV-cached generation of a left-padded batch under per-row ``inject``: every step's logits (and
    so every token) equal plain HF ``generate`` of each row alone with a hand-written hook on
    ``model.layers[L]`` that adds the vector from the row's start on, the generated tokens included."""
    from hf_reference import greedy, injection

    from mechintro.core.prompts import left_pad
    from mechintro.core.sampling import sample, stop_ids

    name, model, hf = pair
    prompts = _trial_prompts(model)
    b = left_pad(prompts, pad_id=model.tokenizer.pad_token_id)
    assert len(set(b.pad.tolist())) > 1, "the batch must be padded"
    g = torch.Generator().manual_seed(4)
    vecs = torch.randn(3, int(model.cfg.d_model), generator=g)
    strengths = torch.tensor([3.0, -2.0, 4.0])
    n = 4
    with inject(model, vecs, layer=LAYER, strength=strengths, start=b.starts):
        out = sample(
            model, b, max_new_tokens=n, seeds=[0, 1, 2], temperature=0.0, path=path, keep_logits=True
        )
    assert out.path == path
    changed = 0
    for row, p in enumerate(prompts):
        hook = injection(LAYER, vecs[row], strengths[row], p.injection_start)
        tokens, logits = greedy(hf, p.tokens, hooks=[hook], max_new_tokens=n, stop=stop_ids(model))
        k = int(out.lengths[row])
        assert k == len(tokens), (name, row)
        assert torch.equal(out.tokens[row, :k], tokens), (name, row)
        torch.testing.assert_close(out.logits[row, :k], logits, **STEP_TOL, msg=lambda m: f"{name}: {m}")
        _, plain_logits = greedy(hf, p.tokens, max_new_tokens=1, stop=stop_ids(model))
        changed += not torch.allclose(plain_logits[0], logits[0], atol=1e-3)
    assert changed == len(prompts), "the injection must change every row's logits"


def test_run_trials_equals_plain_hf_generate_with_a_hand_written_hook(pair):
    """``run_trials`` (greedy, left-padded batches, the shared prompt prefix on, the fast path) gives, row by
    row, the tokens of plain HF ``generate`` of the trial prompt alone with a hand-written injection hook
    (none for controls)."""
    from hf_reference import greedy, injection

    from mechintro.behaviour.judges import RuleJudge
    from mechintro.behaviour.trials import run_trials
    from mechintro.core.fastpath import choose_path
    from mechintro.core.prompts import trial_prompt
    from mechintro.core.sampling import can_share_prefix, stop_ids

    name, model, hf = pair
    concepts = ["Bread", "Oceans"]
    vectors = torch.randn(2, int(model.cfg.d_model), generator=torch.Generator().manual_seed(5)) * 4
    n = 5
    assert choose_path(model)[0] == "hf" and can_share_prefix(model)
    df = run_trials(
        model,
        concepts,
        layer=LAYER,
        strength=3.0,
        n_trials=2,
        trials=[1, 10],
        judge=RuleJudge(),
        vectors=vectors,
        max_new_tokens=n,
        temperature=0.0,
        batch_size=8,
        progress=False,
    )
    assert len(df) == 8 and set(df["condition"]) == {"control", "injection"}
    differs = 0
    for row in df.itertuples():
        p = trial_prompt(model, trial=int(row.trial))
        c = concepts.index(row.concept)
        hooks = [injection(LAYER, vectors[c], 3.0, p.injection_start)] if row.condition == "injection" else []
        tokens, _ = greedy(hf, p.tokens, hooks=hooks, max_new_tokens=n, stop=stop_ids(model))
        text = model.tokenizer.decode(tokens.tolist(), skip_special_tokens=True).strip()
        assert (row.response, row.n_new_tokens) == (text, len(tokens)), (name, row.concept, row.condition)
        if row.condition == "injection":
            control = df[(df["concept"] == row.concept) & (df["trial"] == row.trial)]
            differs += (control["response"] != row.response).any()
    assert differs >= 1, "the injection must change some response"


def test_concept_vectors_equal_plain_hf(pair):
    """resid_post of the layer at the last token of "Tell me about {concept}" (the family's chat template,
    rendered by the tokenizer itself), minus the mean over baseline words: from HF's ``model.layers[L]``."""
    from mechintro.core.concepts import concept_vectors

    name, model, hf = pair
    fam = family_by_name(name)
    words = ["Sand", "Clay", "Fog"]
    ours = concept_vectors(model, ["Bread", "Oceans"], layer=LAYER, baseline=words, batch_size=2)

    def last(word):
        messages = [{"role": "user", "content": f"Tell me about {word}"}]
        text = model.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **fam.chat_template_kwargs
        )
        tokens = torch.tensor(model.tokenizer(text, add_special_tokens=False)["input_ids"])
        _, got = _hf_sites(hf, tokens[None], {"h": (f"model.layers.{LAYER}", "output")})
        return got["h"][0, -1]

    mean = torch.stack([last(w) for w in words]).mean(0)
    expected = torch.stack([last("Bread") - mean, last("Oceans") - mean])
    torch.testing.assert_close(ours, expected, **_tol(name))
    assert ours.abs().max() > 1e-2
