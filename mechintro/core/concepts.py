"""Concept lists and concept vectors.

A concept vector is the resid_post activation of the injection layer at the last token of the chat-formatted
prompt "Tell me about {concept}" (with the generation prompt), minus the mean of the same activation over the
baseline words. No normalization (stimuli.json, ``concept_vector_prompt``). With ``chat=False`` the prompt is
the raw text after BOS instead (no chat template), as ``experiments/03_behavioral_robustness.py``
(``extract_concept_vector_base_model``) does for a base checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mechintro.core import resources, validate
from mechintro.core.hooks import capture, check_layer
from mechintro.core.models import HookNames, Model
from mechintro.core.prompts import chat_prompt_tokens, check_spelling, left_pad, stimuli

CONCEPT_PROMPT = "Tell me about {concept}"
SPLIT_FILENAME = "organism_split.json"


def original_concepts() -> list[str]:
    """The 50 concepts of Lindsey (2025)."""
    return list(stimuli()["original_50_concepts"])


def new_concepts() -> list[str]:
    """The 450 concepts the paper added."""
    return list(stimuli()["new_450_concepts"])


def all_concepts() -> list[str]:
    """All 500 concepts, original first."""
    return original_concepts() + new_concepts()


def baseline_words() -> list[str]:
    """The 99 unique baseline words, in released order (the release lists "Butterflies" twice)."""
    return list(dict.fromkeys(stimuli()["baseline_words"]))


def _split() -> dict[str, list[str]]:
    path = resources.organism_file(SPLIT_FILENAME)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: train the organism with `mechintro organism train`")
    return json.loads(path.read_text())


def training_concepts() -> list[str]:
    """The 400 concepts the organism was trained to detect (recorded in ``organism_split.json`` beside it)."""
    return list(_split()["training"])


def heldout_concepts() -> list[str]:
    """The 100 concepts never injected while training the organism."""
    return list(_split()["heldout"])


def concept_set(name: str) -> list[str]:
    """A named concept list: original, new, all, training, held-out, baseline."""
    table = {
        "original": original_concepts,
        "new": new_concepts,
        "all": all_concepts,
        "training": training_concepts,
        "held-out": heldout_concepts,
        "baseline": baseline_words,
    }
    if name not in table:
        raise ValueError(f"unknown concept set {name!r}; valid: {sorted(table)}")
    return table[name]()


def last_token_resid(
    model: Model, prompts: Sequence[Tensor], *, layer: int, batch_size: int = 32
) -> Float[Tensor, "prompt d_model"]:
    """resid_post of ``layer`` at the last token of each prompt, batched with left padding, in float32."""
    layer = check_layer(model, layer)
    pad_id = model.tokenizer.pad_token_id
    name = HookNames.resid_post(layer)
    device = model.cfg.device
    out: list[Tensor] = []
    with torch.no_grad(), capture(model, [name], positions="last", dtype=torch.float32) as acts:
        for i in range(0, len(prompts), batch_size):
            batch = left_pad(prompts[i : i + batch_size], pad_id=pad_id)
            model(
                batch.tokens.to(device),
                attention_mask=batch.attention_mask.to(device),
                stop_at_layer=layer + 1,
            )
            out.append(acts[name][:, 0].cpu())
    return torch.cat(out)


def raw_prompt_tokens(model: Model, text: str) -> Tensor:
    """Tokens of BOS + ``text``, no chat template (how the released code prompts a base checkpoint)."""
    check_spelling(model, text, what="prompt")
    tok = model.tokenizer
    ids = tok((tok.bos_token or "") + text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def concept_prompts(model: Model, words: Sequence[str], *, chat: bool = True) -> list[Tensor]:
    """The tokens of "Tell me about {word}" for each word, in the chat template (``chat=False``: the raw text
    after BOS); a word the tokenizer cannot spell is refused."""
    if isinstance(words, str):
        raise TypeError(f"words must be a list of words, not one string ({words!r})")
    for word in words:
        check_spelling(model, word, what="concept")
    tokens = chat_prompt_tokens if chat else raw_prompt_tokens
    return [tokens(model, CONCEPT_PROMPT.format(concept=w)) for w in words]


def baseline_mean(
    model: Model,
    *,
    layer: int,
    words: Sequence[str] | None = None,
    batch_size: int = 32,
    chat: bool = True,
) -> Float[Tensor, " d_model"]:
    """Mean last-token activation over the baseline words (float32); ``chat`` as in
    :func:`concept_prompts`."""
    words = baseline_words() if words is None else list(words)
    prompts = concept_prompts(model, words, chat=chat)
    return last_token_resid(model, prompts, layer=layer, batch_size=batch_size).mean(0)


def check_concepts(concepts: Sequence[str], *, unique: bool = True) -> list[str]:
    """``concepts`` as a list after checking it: a non-empty list of non-empty words (not one string), each
    listed once when ``unique`` (a repeated concept would be one concept counted twice)."""
    if isinstance(concepts, str) or not all(isinstance(c, str) and c.strip() for c in concepts):
        raise TypeError(f"concepts must be a list of non-empty words, got {concepts!r}")
    concepts = list(concepts)
    if not concepts:
        raise ValueError("concepts is empty")
    repeated = sorted({c for c in concepts if concepts.count(c) > 1}) if unique else []
    if repeated:
        raise ValueError(f"concepts are listed more than once: {repeated}")
    return concepts


def concept_vectors(
    model: Model,
    concepts: Sequence[str],
    *,
    layer: int,
    baseline: Sequence[str] | Tensor | None = None,
    batch_size: int = 32,
    chat: bool = True,
) -> Float[Tensor, "concept d_model"]:
    """Concept vectors at resid_post of ``layer``: activation(concept) minus the baseline mean.

    Args:
        concepts: concept words, each rendered as "Tell me about {concept}" in the chat template.
        layer: the injection layer.
        baseline: the baseline words (default: the paper's 99), or a precomputed ``[d_model]`` mean.
        batch_size: prompts per forward pass (left-padded; the result does not depend on it).
        chat: False renders the prompts as raw text after BOS, no chat template (concepts and baseline
            words alike), as the released ``experiments/03`` does for a base checkpoint.

    Returns a float32 ``[len(concepts), d_model]`` tensor on the CPU.
    """
    concepts = check_concepts(concepts, unique=False)
    if torch.is_tensor(baseline):
        validate.d_model_of(model, baseline.shape[-1], what="the baseline mean")
        mean = baseline.float().cpu()
    else:
        mean = baseline_mean(model, layer=layer, words=baseline, batch_size=batch_size, chat=chat)
    prompts = concept_prompts(model, concepts, chat=chat)
    acts = last_token_resid(model, prompts, layer=layer, batch_size=batch_size)
    return acts - mean
