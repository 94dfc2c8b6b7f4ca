"""Tiny random models and dictionaries for unit tests (ours and yours); the library itself never imports this
module.

``save_tiny_gemma3(folder)`` writes a random ``Gemma3ForCausalLM`` and a word-level tokenizer whose vocabulary
covers every stimulus (all prompt and persona variants, the 500 concepts, the baseline words, the forced
prefill), so every mechintro code path runs on it exactly as on a real Gemma 3, offline and in seconds.
``save_tiny(family, folder)`` does the same for each supported family (:data:`TINY_FAMILIES`).
``save_random_transcoders(folder)`` writes random JumpReLU skip transcoders in Gemma Scope 2's raw format,
``save_circuit_tracer_transcoders`` in circuit-tracer's per-layer format, ``save_sae_lens_transcoders`` in
sae-lens's folder format.
They live in :mod:`mechintro.organism.tiny`, which the demo and ``--model tiny`` use too.
"""

from mechintro.organism.tiny import (
    RESPONSE_TEXTS,
    TINY_FAMILIES,
    build_subword_tokenizer,
    save_circuit_tracer_transcoders,
    save_random_transcoders,
    save_sae_lens_transcoders,
    save_tiny,
    save_tiny_gemma3,
    stimuli_texts,
    stimuli_words,
)

__all__ = [
    "RESPONSE_TEXTS",
    "TINY_FAMILIES",
    "build_subword_tokenizer",
    "save_circuit_tracer_transcoders",
    "save_random_transcoders",
    "save_sae_lens_transcoders",
    "save_tiny",
    "save_tiny_gemma3",
    "stimuli_texts",
    "stimuli_words",
]
