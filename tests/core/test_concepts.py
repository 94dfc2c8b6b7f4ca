"""concept_vectors: batched == one by one == a plain-HF computation."""

from __future__ import annotations

import torch
from conftest import hf_capture

from mechintro.core.concepts import (
    all_concepts,
    baseline_words,
    concept_prompts,
    concept_vectors,
    original_concepts,
)


def test_lists():
    assert len(all_concepts()) == 500 and len(set(all_concepts())) == 500
    assert original_concepts()[-2:] == ["Bread", "Silver"]
    words = baseline_words()
    assert len(words) == 99 and words.count("Butterflies") == 1


def test_batched_equals_one_by_one(tiny):
    concepts = ["Bread", "Oceans", "Avalanches", "Dust", "Algorithms"]
    batched = concept_vectors(tiny, concepts, layer=1, batch_size=4)
    assert batched.dtype == torch.float32 and batched.shape == (5, 64)
    for i, c in enumerate(concepts):
        single = concept_vectors(tiny, [c], layer=1, batch_size=1)
        torch.testing.assert_close(batched[i], single[0], rtol=1e-5, atol=1e-5)


def test_matches_plain_hf_hidden_states(tiny, hf_tiny):
    layer = 2
    words = ["Sand", "Clay", "Fog"]
    ours = concept_vectors(tiny, ["Bread"], layer=layer, baseline=words)[0]

    def last(word):
        tokens = concept_prompts(tiny, [word])[0][None]
        _, got = hf_capture(hf_tiny, tokens, [f"model.layers.{layer}"])
        return got[f"model.layers.{layer}"][0, -1]

    expected = last("Bread") - torch.stack([last(w) for w in words]).mean(0)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_precomputed_baseline_mean(tiny):
    from mechintro.core.concepts import baseline_mean

    mean = baseline_mean(tiny, layer=1, words=["Sand", "Clay"])
    a = concept_vectors(tiny, ["Bread"], layer=1, baseline=mean)
    b = concept_vectors(tiny, ["Bread"], layer=1, baseline=["Sand", "Clay"])
    torch.testing.assert_close(a, b)


def test_left_padded_batches_equal_plain_hf_one_prompt_at_a_time(subword, subword_dir):
    """With a subword tokenizer concept prompts differ in length, so batches are left-padded: each batched
    vector must equal a plain-HF forward of its prompt alone (no padding). Dropping the attention mask, or
    reading a padded position, breaks this."""
    from transformers import Gemma3ForCausalLM

    hf = Gemma3ForCausalLM.from_pretrained(subword_dir, attn_implementation="eager").eval()
    concepts = ["Bread", "Kaleidoscopes", "Dust", "Avalanches", "Sugar", "Amphitheaters"]
    words = ["Sand", "Constellations", "Fog"]
    lengths = {len(p) for p in concept_prompts(subword, concepts + words)}
    assert len(lengths) >= 3, "the test needs prompts of different lengths"
    layer = 2
    ours = concept_vectors(subword, concepts, layer=layer, baseline=words, batch_size=4)

    def alone(word):
        tokens = concept_prompts(subword, [word])[0][None]
        with torch.no_grad():
            out = hf(tokens, output_hidden_states=True)
        return out.hidden_states[layer + 1][0, -1]  # hidden_states[0] is the embedding

    mean = torch.stack([alone(w) for w in words]).mean(0)
    for i, concept in enumerate(concepts):
        torch.testing.assert_close(ours[i], alone(concept) - mean, rtol=1e-4, atol=1e-4)
