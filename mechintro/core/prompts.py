"""Trial prompts: the paper's 10 prompt variants and 6 persona variants, the forced prefill, left padding.

A :class:`TrialPrompt` carries its tokens and ``injection_start``: the token immediately before the text
"Trial {trial}", from which the concept is injected through the rest of the prompt and every generated token.
Left padding of a batch (which shifts every absolute position) is done in one place, :func:`left_pad`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from mechintro.core import resources, validate
from mechintro.core.models import Model, chat_text

PAPER_VARIANTS = (
    "original",
    "alternative_path",
    "skeptical",
    "structured_format",
    "anti_reward",
    "unprompted",
    "phenomenology",
)
SUPPLEMENTARY_VARIANTS = ("neutral_query", "wow_insertion", "thoughts_in_context")
VARIANTS = PAPER_VARIANTS + SUPPLEMENTARY_VARIANTS
PERSONAS = (
    "standard_assistant",
    "standard_assistant_raw",
    "simulated_user",
    "character_dialogue",
    "no_chat_format",
    "story_framing",
)


@functools.cache
def stimuli() -> dict[str, Any]:
    """The paper's stimuli (``stimuli.json`` in the package data, copied from ``shared/reference``)."""
    return json.loads(resources.reference(resources.STIMULI).read_text())


def forced_prefill() -> str:
    return stimuli()["forced_identification_prefill"]


def concept_categories() -> dict[str, list[str]]:
    """Category name -> concepts, for the anti-reward variant."""
    return stimuli()["concept_categories_for_anti_reward"]


def category_of(concept: str) -> str:
    """The anti-reward category of ``concept`` ("other" when it has none)."""
    for name, members in concept_categories().items():
        if concept in members:
            return name
    return "other"


def unknown_words(model_or_tokenizer: Any, text: str) -> list[str]:
    """The pieces of ``text`` that the tokenizer can only spell with its unknown token (in order, once each).

    Gemma's own tokenizer falls back to bytes and never needs it; a word-level tokenizer (the organism's)
    does, and two different unknown words would then give the same input.
    """
    tok = getattr(model_or_tokenizer, "tokenizer", model_or_tokenizer)
    unk = getattr(tok, "unk_token_id", None)
    if unk is None:
        return []
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    pairs = zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    found = [text[a:b].strip() or text[a:b] for i, (a, b) in pairs if i == unk]
    return list(dict.fromkeys(found))


def check_spelling(model_or_tokenizer: Any, text: str, *, what: str) -> str:
    """Return ``text``, or raise naming the words of it the tokenizer cannot spell (see
    :func:`unknown_words`)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"the {what} must be non-empty text, got {text!r}")
    bad = unknown_words(model_or_tokenizer, text)
    if bad:
        shown = text if len(text) <= 60 else f"{text[:30]}...{text[-20:]}"
        raise ValueError(
            f"the {what} {shown!r} contains {bad}, which this model's tokenizer can only read as its unknown "
            "token (two such words would be the same input); use words in its vocabulary"
        )
    return text


@dataclass(frozen=True)
class TrialPrompt:
    """One tokenized trial prompt."""

    tokens: Int[Tensor, " seq"]
    """Token ids, BOS first, no padding."""
    injection_start: int
    """Absolute index of the token immediately before the text "Trial {trial}"."""
    text: str
    """The rendered prompt text (special tokens included)."""
    trial: int
    """The trial number."""


def _fill(template: str, **values: Any) -> str:
    for key, value in values.items():
        template = template.replace("{" + key + "}", str(value))
    if "{" in template and "}" in template:
        missing = sorted({p.split("}")[0] for p in template.split("{")[1:] if "}" in p})
        raise ValueError(f"prompt template needs values for {missing}")
    return template


def _variant_messages(variant: str, *, trial: int, category: str | None, thoughts: str | None) -> list[dict]:
    spec = stimuli()["prompt_variants"][variant]
    values: dict[str, Any] = {"trial": trial}
    if variant == "anti_reward":
        valid = sorted(concept_categories())
        if category not in valid:
            raise ValueError(f"the anti_reward variant needs category= one of {valid}, got {category!r}")
        values["category"] = category
    if variant == "thoughts_in_context":
        if not thoughts:
            raise ValueError("the thoughts_in_context variant needs thoughts= (the concept it keeps in mind)")
        values["thoughts"] = thoughts
    messages = []
    if spec["system"]:
        messages.append({"role": "system", "content": _fill(spec["system"], **values)})
    messages += [
        {"role": "user", "content": _fill(spec["user_turn1"], **values)},
        {"role": "assistant", "content": _fill(spec["assistant_turn1"], **values)},
        {"role": "user", "content": _fill(spec["user_turn2"], **values)},
    ]
    return messages


def trial_text(
    model: Model,
    *,
    trial: int,
    variant: str = "original",
    persona: str = "standard_assistant",
    prefill: str | None = None,
    category: str | None = None,
    thoughts: str | None = None,
) -> str:
    """The rendered text of a trial prompt (see :func:`trial_prompt`)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown prompt variant {variant!r}; valid: {list(VARIANTS)}")
    if persona not in PERSONAS:
        raise ValueError(f"unknown persona {persona!r}; valid: {list(PERSONAS)}")
    trial = validate.integer("trial", trial, minimum=1, requirement="a positive int (the paper's are 1..10)")
    for name, value in (("thoughts", thoughts), ("prefill", prefill), ("category", category)):
        if value is not None:
            check_spelling(model, value, what=f"{name}= text")
    if persona == "standard_assistant":
        text = chat_text(model, _variant_messages(variant, trial=trial, category=category, thoughts=thoughts))
        return text + prefill if prefill else text
    if variant != "original":
        raise ValueError(f"persona {persona!r} is defined for the original variant only, not {variant!r}")
    tok = model.tokenizer
    text = (tok.bos_token or "") + _fill(stimuli()["persona_variants"][persona]["raw_text"], trial=trial)
    return text + " " + prefill if prefill else text


def trial_prompt(
    model: Model,
    *,
    trial: int,
    variant: str = "original",
    persona: str = "standard_assistant",
    prefill: str | None = None,
    category: str | None = None,
    thoughts: str | None = None,
) -> TrialPrompt:
    """Build and tokenize one trial prompt.

    Args:
        trial: the trial number written into "Trial {trial}".
        variant: one of :data:`VARIANTS` (the paper's 7 and 3 supplementary), rendered with the chat template.
        persona: one of :data:`PERSONAS`; everything but ``standard_assistant`` is raw text (original
            variant).
        prefill: text appended after the generation prompt (forced identification uses
            :func:`forced_prefill`).
        category: the anti-reward category (see :func:`category_of`).
        thoughts: the concept for the ``thoughts_in_context`` system prompt.
    """
    text = trial_text(
        model,
        trial=trial,
        variant=variant,
        persona=persona,
        prefill=prefill,
        category=category,
        thoughts=thoughts,
    )
    return tokenize_trial(model, text, trial=trial)


def token_at(offsets: Sequence[tuple[int, int]], at: int) -> int:
    """The token holding character ``at`` of a text (by the tokenizer's offsets), or the first token after
    it when ``at`` falls between tokens (a space a token does not include)."""
    holder = next((i for i, (s, e) in enumerate(offsets) if s <= at < e), None)
    if holder is None:
        holder = next(i for i, (s, _) in enumerate(offsets) if s >= at)
    return holder


def tokenize_trial(model: Model, text: str, *, trial: int) -> TrialPrompt:
    """Tokenize ``text`` and locate its injection start; raises if "Trial {trial}" is missing."""
    marker = f"Trial {trial}"
    at = text.rfind(marker)
    if at < 0:
        raise ValueError(
            f"the prompt has no {marker!r} marker, so it has no injection start: {text[:120]!r}..."
        )
    check_spelling(model, text, what=f"trial prompt (trial {trial})")
    enc = model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    holder = token_at(offsets, at)
    if holder == 0:
        raise ValueError(f"{marker!r} is the first token, so no token precedes it")
    return TrialPrompt(
        tokens=torch.tensor(ids, dtype=torch.long), injection_start=holder - 1, text=text, trial=trial
    )


def chat_prompt_tokens(model: Model, user: str, *, system: str | None = None) -> Int[Tensor, " seq"]:
    """Tokens of a one-turn chat prompt with the generation prompt (e.g. "Tell me about {concept}")."""
    check_spelling(model, user, what="prompt")
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}
    ]
    ids = model.tokenizer(chat_text(model, messages), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


# ----------------------------------------------------------------------------------------------- batching


@dataclass(frozen=True)
class PaddedBatch:
    """Padded prompts. Every position in here is absolute in the padded tensor (its column index).

    Plain left padding (``prefix == 0``) puts each row's pads in front of it. With a shared prefix
    (``prefix > 0``), the first ``prefix`` tokens are the same in every row and the pads sit right after them,
    in front of each row's suffix: the prefix then has the same columns in every row, so its KV cache can be
    computed once (:func:`mechintro.core.sampling.prefill`). Either way every row ends at the last column.
    """

    tokens: Int[Tensor, "batch seq"]
    attention_mask: Int[Tensor, "batch seq"]
    pad: Int[Tensor, " batch"]
    """Number of pad tokens of each row (in front of it, or right after the shared prefix)."""
    starts: Int[Tensor, " batch"]
    """Injection starts shifted by each row's padding (0 where the prompt had none)."""
    prefix: int = 0
    """Number of leading tokens shared by every row (before any pad); 0 for plain left padding."""

    @property
    def last(self) -> int:
        """Index of the last prompt token (the same for every row)."""
        return self.tokens.shape[1] - 1

    @property
    def real(self) -> Bool[Tensor, "batch seq"]:
        return self.attention_mask.bool()

    @property
    def position_ids(self) -> Int[Tensor, "batch seq"]:
        """Each token's position in its own unpadded prompt (RoPE positions); a pad repeats the position
        before it (0 in front of a row)."""
        return (self.attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def shared_prefix_length(sequences: Sequence[Tensor], starts: Sequence[int]) -> int:
    """The longest prefix common to every sequence that ends at or before every start and before every last
    token (the part of a batch that a shared prefix cache can hold)."""
    limit = max(0, min([len(t) - 1 for t in sequences] + [int(s) for s in starts]))
    first = sequences[0][:limit]
    n = limit
    for t in sequences[1:]:
        differ = (t[:n] != first[:n]).nonzero()
        if len(differ):
            n = int(differ[0, 0])
    return n


def left_pad(
    sequences: Sequence[Tensor | TrialPrompt],
    *,
    pad_id: int,
    starts: Sequence[int] | None = None,
    share_prefix: bool = False,
) -> PaddedBatch:
    """Left-pad token sequences (or :class:`TrialPrompt` s) into one batch.

    The injection start of each row moves right by that row's padding: this is the one place where padding
    and positions meet. With ``share_prefix`` the pads go after the longest prefix that every row shares and
    that ends at or before every start (:func:`shared_prefix_length`), so a start never moves into the
    prefix and the prefix sits at the same columns in every row (:attr:`PaddedBatch.prefix`).
    """
    if len(sequences) == 0:
        raise ValueError("left_pad needs at least one sequence")
    toks = [s.tokens if isinstance(s, TrialPrompt) else torch.as_tensor(s) for s in sequences]
    if starts is None:
        starts = [s.injection_start if isinstance(s, TrialPrompt) else 0 for s in sequences]
    if len(starts) != len(toks):
        raise ValueError(f"need one start per sequence: {len(toks)} sequences, {len(starts)} starts")
    prefix = shared_prefix_length(toks, starts) if share_prefix else 0
    width = max(len(t) for t in toks)
    tokens = torch.full((len(toks), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(toks), width), dtype=torch.long)
    pad = torch.empty(len(toks), dtype=torch.long)
    for i, t in enumerate(toks):
        pad[i] = width - len(t)
        tokens[i, :prefix] = t[:prefix]
        tokens[i, prefix + pad[i] :] = t[prefix:]
        mask[i, :prefix] = 1
        mask[i, prefix + pad[i] :] = 1
    return PaddedBatch(
        tokens=tokens, attention_mask=mask, pad=pad, starts=pad + torch.as_tensor(starts), prefix=prefix
    )
