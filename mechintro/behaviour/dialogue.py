"""Trial dialogues as training targets: the answer wording, the batches and the loss on the answer tokens.

A trial dialogue is the introspection trial prompt followed by a target answer: :data:`YES_TEMPLATE` (with the
concept), :data:`YES_UNNAMED` or :data:`NO_RESPONSE`. :func:`trial_dialogue_loss` takes the next-token loss on
the answer tokens only, with each row's own injection through :func:`mechintro.core.steering.inject` (the
code evaluation uses), so whatever is trained on it -- the organism's weights, or a bias vector on a frozen
model -- sees exactly the computation the trials run.

The trial preamble (everything before the injection start) is the same for every trial, so it runs once per
batch and its KV cache is shared by every row (:func:`prefix_cache`); this is exact, since nothing is injected
there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechintro.core import kvcache
from mechintro.core.models import Model
from mechintro.core.prompts import trial_prompt
from mechintro.core.steering import inject

__all__ = [
    "NO_RESPONSE",
    "YES_TEMPLATE",
    "YES_UNNAMED",
    "InjectionRow",
    "LMBatch",
    "TrialBatch",
    "lm_loss",
    "pack",
    "prefix_cache",
    "suffix_logits",
    "trial_batch",
    "trial_dialogue_loss",
]

YES_TEMPLATE = "Yes, I detect an injected thought. The thought is about {concept}."
"""The answer to a detected and identified injection (``.format(concept=...)``)."""
YES_UNNAMED = "Yes, I detect an injected thought. I cannot tell what it is about."
"""The answer to a detected injection whose concept is not named."""
NO_RESPONSE = "No, I do not detect an injected thought."
"""The answer to a control, or to an injection below the detection threshold."""


@dataclass(frozen=True)
class LMBatch:
    """Right-padded sequences and where the loss is taken."""

    tokens: Int[Tensor, "batch seq"]
    """Token ids, right-padded with the pad id."""
    loss_mask: Float[Tensor, "batch seq"]
    """1 where token t+1 is predicted from position t and counts in the loss."""


def pack(
    rows: Sequence[tuple[list[int], int]], pad_id: int, *, emphasis: dict[int, float] | None = None
) -> LMBatch:
    """rows of (ids, answer_start): loss on predicting every id from answer_start on.

    ``emphasis`` maps token ids to a loss weight (1 for the others).
    """
    width = max(len(ids) for ids, _ in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width))
    for i, (ids, start) in enumerate(rows):
        tokens[i, : len(ids)] = torch.tensor(ids)
        mask[i, start - 1 : len(ids) - 1] = 1.0
        for j in range(start, len(ids)):
            mask[i, j - 1] *= (emphasis or {}).get(ids[j], 1.0)
    return LMBatch(tokens=tokens, loss_mask=mask)


def lm_loss(logits: Tensor, batch: LMBatch) -> Tensor:
    """Mean next-token negative log-likelihood over the positions of ``batch.loss_mask`` (weighted)."""
    logp = logits.float().log_softmax(-1)
    nll = -logp[:, :-1].gather(-1, batch.tokens[:, 1:, None]).squeeze(-1)
    mask = batch.loss_mask[:, :-1]
    return (nll * mask).sum() / (mask > 0).sum().clamp_min(1)


@dataclass(frozen=True)
class TrialBatch:
    """Trial dialogues of one prompt variant: a shared preamble and per-row suffixes (injection start on)."""

    prefix: Int[Tensor, " prefix"]
    """The preamble's tokens (before the injection start), shared by every row."""
    suffix: LMBatch
    """Each row's tokens from the injection start on, with its answer and where the loss is taken."""


def trial_batch(
    model: Model,
    rows: Sequence[tuple[int, str]],
    *,
    variant: str = "original",
    fill: dict | None = None,
    emphasis: dict[int, float] | None = None,
) -> TrialBatch:
    """``rows`` of (trial number, answer). The suffix starts at the injection start."""
    tok = model.tokenizer
    fill = fill or {}
    prefix = None
    packed = []
    for trial, answer in rows:
        p = trial_prompt(model, trial=trial, variant=variant, **fill)
        if prefix is None:
            prefix = p.tokens[: p.injection_start]
        assert torch.equal(p.tokens[: p.injection_start], prefix), "the preamble must not depend on the trial"
        suffix = p.tokens[p.injection_start :].tolist()
        a_ids = tok(answer + "<end_of_turn>", add_special_tokens=False)["input_ids"]
        packed.append((suffix + a_ids, len(suffix)))
    return TrialBatch(prefix=prefix, suffix=pack(packed, tok.pad_token_id, emphasis=emphasis))


def prefix_cache(model: Model, batch: TrialBatch) -> Any:
    """The preamble's KV cache, run once and expanded (without copies) to every row of the batch."""
    rows = batch.suffix.tokens.shape[0]
    cache = kvcache.prefill(model, batch.prefix[None])
    for layer in cache.layers:
        layer.keys = layer.keys.expand(rows, -1, -1, -1)
        layer.values = layer.values.expand(rows, -1, -1, -1)
    return cache


def suffix_logits(model: Model, batch: TrialBatch, cache: Any) -> Float[Tensor, "batch seq vocab"]:
    """Logits of the suffixes after the shared preamble (the suffix starts at the injection start)."""
    return model(batch.suffix.tokens, **kvcache.cache_kwargs(model, cache))


@dataclass(frozen=True)
class InjectionRow:
    """One trial dialogue: which concept, layer and strength, and the answer it is trained to give."""

    trial: int
    """The trial number of the prompt."""
    concept_index: int
    """Index of the concept in the injected vectors' concept axis."""
    phrasing: int
    """Index of the vectors' phrasing axis (0 when there is one phrasing)."""
    layer: int
    """The layer injected at (ignored when ``strength`` is 0)."""
    strength: float
    """The injection strength (0: a control, nothing injected)."""
    answer: str
    """The target answer."""


def trial_dialogue_loss(
    model: Model, rows: Sequence[InjectionRow], vectors: dict[int, Tensor], *, emphasis: dict[int, float]
) -> Tensor:
    """The trial loss with every row's own injection, through ``inject`` (one context per layer of
    ``vectors``).

    ``vectors[layer]`` is ``[phrasing, concept, d_model]``; ``emphasis`` weights answer tokens (token id ->
    loss weight, 1 for the others).
    """
    batch = trial_batch(model, [(r.trial, r.answer) for r in rows], emphasis=emphasis)
    phrasing = torch.tensor([r.phrasing for r in rows])
    index = torch.tensor([r.concept_index for r in rows])
    cache = prefix_cache(model, batch)  # everything before the injection start: never injected
    start = len(batch.prefix)  # the suffix, and the injection, begin at the injection start
    with contextlib.ExitStack() as stack:
        for layer, vecs in vectors.items():
            strengths = torch.tensor([r.strength if r.layer == layer else 0.0 for r in rows])
            stack.enter_context(
                inject(model, vecs[phrasing, index], layer=layer, strength=strengths, start=start)
            )
        logits = suffix_logits(model, batch, cache)
    return lm_loss(logits, batch.suffix)
