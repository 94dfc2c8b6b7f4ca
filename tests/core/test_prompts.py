"""Trial prompts: every variant and persona, the Trial marker, the prefill, left padding."""

from __future__ import annotations

import pytest
import torch

from mechintro.core.prompts import (
    PERSONAS,
    VARIANTS,
    category_of,
    forced_prefill,
    left_pad,
    tokenize_trial,
    trial_prompt,
)


def _after_start(model, prompt):
    return model.tokenizer.decode(prompt.tokens[prompt.injection_start + 1 :].tolist())


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_starts_injection_right_before_trial(tiny, variant):
    p = trial_prompt(tiny, trial=7, variant=variant, category="food", thoughts="Bread")
    assert _after_start(tiny, p).lstrip().startswith("Trial 7")
    before = tiny.tokenizer.decode(p.tokens[: p.injection_start + 1].tolist())
    assert "Trial 7" not in before
    assert p.text.startswith("<bos><start_of_turn>user\n") and p.text.endswith("<start_of_turn>model\n")
    assert tiny.tokenizer.unk_token_id not in p.tokens.tolist()


@pytest.mark.parametrize("persona", PERSONAS)
def test_every_persona_starts_injection_right_before_trial(tiny, persona):
    p = trial_prompt(tiny, trial=3, persona=persona)
    assert _after_start(tiny, p).lstrip().startswith("Trial 3")
    assert p.tokens[0].item() == tiny.tokenizer.bos_token_id
    assert (p.text.count("<start_of_turn>") > 0) == (persona == "standard_assistant")


def test_original_prompt_has_the_papers_turns(tiny):
    p = trial_prompt(tiny, trial=1)
    assert p.text.count("<start_of_turn>user\n") == 2
    assert "<start_of_turn>model\nOk.<end_of_turn>" in p.text
    # injection starts at the newline that closes the second user turn header
    assert tiny.tokenizer.convert_ids_to_tokens([p.tokens[p.injection_start].item()]) == ["\n"]


def test_forced_prefill_is_appended_after_generation_prompt(tiny):
    plain = trial_prompt(tiny, trial=5)
    forced = trial_prompt(tiny, trial=5, prefill=forced_prefill())
    assert forced.text == plain.text + forced_prefill()
    assert forced.injection_start == plain.injection_start
    assert torch.equal(forced.tokens[: len(plain.tokens)], plain.tokens)
    assert tiny.tokenizer.decode(forced.tokens[len(plain.tokens) :].tolist()) == forced_prefill()


def test_variant_placeholders(tiny):
    p = trial_prompt(tiny, trial=2, variant="anti_reward", category=category_of("Bread"))
    assert category_of("Bread") == "food" and "related to food" in p.text
    assert "{" not in p.text
    with pytest.raises(ValueError, match="nature"):
        trial_prompt(tiny, trial=2, variant="anti_reward")
    with pytest.raises(ValueError, match="thoughts="):
        trial_prompt(tiny, trial=2, variant="thoughts_in_context")
    p = trial_prompt(tiny, trial=2, variant="thoughts_in_context", thoughts="Oceans")
    assert "always thinking about Oceans" in p.text


def test_bad_input_names_valid_choices(tiny):
    with pytest.raises(ValueError, match="skeptical"):
        trial_prompt(tiny, trial=1, variant="sceptical")
    with pytest.raises(ValueError, match="story_framing"):
        trial_prompt(tiny, trial=1, persona="pirate")
    with pytest.raises(ValueError, match="original variant only"):
        trial_prompt(tiny, trial=1, variant="skeptical", persona="simulated_user")
    with pytest.raises(ValueError, match="positive int"):
        trial_prompt(tiny, trial=0)


def test_prompt_without_trial_marker_raises(tiny):
    with pytest.raises(ValueError, match="no 'Trial 3' marker"):
        tokenize_trial(tiny, "<bos>Do you detect an injected thought?", trial=3)


def test_left_pad_shifts_starts_by_padding(tiny):
    prompts = [trial_prompt(tiny, trial=1, variant=v) for v in ("original", "neutral_query", "skeptical")]
    batch = left_pad(prompts, pad_id=tiny.tokenizer.pad_token_id)
    width = max(len(p.tokens) for p in prompts)
    for i, p in enumerate(prompts):
        pad = width - len(p.tokens)
        assert batch.pad[i] == pad
        assert batch.starts[i] == p.injection_start + pad
        assert torch.equal(batch.tokens[i, pad:], p.tokens)
        assert batch.attention_mask[i, :pad].sum() == 0 and batch.attention_mask[i, pad:].all()
        assert batch.tokens[i, batch.starts[i] + 1] == p.tokens[p.injection_start + 1]
    assert batch.last == width - 1


def test_counts_and_rendered_text_match_the_stimuli(tiny):
    """10 prompt variants (the paper's 7 + 3 supplementary) and 6 personas, each rendered from the stimuli's
    own text: every turn appears verbatim, in order, with the trial number (and placeholders) filled in."""
    from mechintro.core.prompts import PAPER_VARIANTS, stimuli

    s = stimuli()
    assert len(VARIANTS) == 10 and len(PAPER_VARIANTS) == 7 and set(VARIANTS) == set(s["prompt_variants"])
    assert len(PERSONAS) == 6 and set(PERSONAS) == set(s["persona_variants"])
    fill = {"{trial}": "4", "{category}": "food", "{thoughts}": "Bread"}

    def filled(text):
        for key, value in fill.items():
            text = text.replace(key, value)
        return text.strip()

    for variant, spec in s["prompt_variants"].items():
        text = trial_prompt(tiny, trial=4, variant=variant, category="food", thoughts="Bread").text
        turns = [
            filled(spec[k]) for k in ("system", "user_turn1", "assistant_turn1", "user_turn2") if spec[k]
        ]
        at = 0
        for turn in turns:
            found = text.find(turn, at)
            assert found >= at, f"{variant}: {turn[:40]!r} missing or out of order"
            at = found + len(turn)
        assert text.endswith("<start_of_turn>model\n")
    for persona, spec in s["persona_variants"].items():
        if persona == "standard_assistant":
            continue
        text = trial_prompt(tiny, trial=4, persona=persona).text
        assert text == tiny.tokenizer.bos_token + filled(spec["raw_text"]), persona
