"""Reading the model's answer off its logits, and the matching residual-stream direction.

- :func:`yes_no_gap`: logsumexp over the Yes-token set minus logsumexp over the No-token set.
- :func:`concept_logprob`: log P(first token of the concept) (forced identification).
- :func:`yes_no_direction`: mean Yes unembedding minus mean No unembedding, the direct-logit-attribution
target.
  Like the paper, no final-norm scaling is applied (Gemma ties its embeddings, so the unembedding is W_E).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from mechintro.models import Model, ModelSpec


def yes_no_gap(logits: Float[Tensor, "... vocab"], spec: ModelSpec) -> Float[Tensor, "..."]:
    """logsumexp(logits[Yes ids]) - logsumexp(logits[No ids])."""
    yes = torch.as_tensor(spec.yes_ids, device=logits.device)
    no = torch.as_tensor(spec.no_ids, device=logits.device)
    return logits.index_select(-1, yes).logsumexp(-1) - logits.index_select(-1, no).logsumexp(-1)


def concept_token_ids(model: Model, concepts: list[str]) -> list[int]:
    """First token id of each concept as it would follow a space (" Bread"), the forced-prefill
    continuation."""
    tok = model.tokenizer
    return [int(tok(" " + c, add_special_tokens=False)["input_ids"][0]) for c in concepts]


def concept_logprob(
    logits: Float[Tensor, "batch vocab"], token_ids: list[int] | Tensor
) -> Float[Tensor, " batch"]:
    """log P(token_ids[i]) under row ``i`` of ``logits``."""
    ids = torch.as_tensor(token_ids, device=logits.device).reshape(-1, 1)
    return logits.float().log_softmax(-1).gather(-1, ids).squeeze(-1)


def unembedding(model: Model) -> Float[Tensor, "d_model vocab"]:
    """The unembedding matrix W_U (``[d_model, vocab]``); tied to the embedding for Gemma."""
    return model.original_model.get_output_embeddings().weight.T


def yes_no_direction(model: Model, spec: ModelSpec) -> Float[Tensor, " d_model"]:
    """mean_{Yes ids} W_U[:, id] - mean_{No ids} W_U[:, id], in float32 (no final-norm scaling)."""
    w_u = unembedding(model).detach().float()
    return w_u[:, list(spec.yes_ids)].mean(-1) - w_u[:, list(spec.no_ids)].mean(-1)
