"""Reading the model's answer off its logits, and the matching residual-stream direction.

One definition each, shared by the logit judge, component patching, the feature analyses and attribution:

- :func:`yes_no_gap`: logsumexp over the Yes-token set minus logsumexp over the No-token set;
- :func:`concept_logprob`: log P(first token of the concept) (forced identification);
- :func:`yes_no_direction`: mean Yes unembedding minus mean No unembedding, the direct-logit-attribution
  target. Like the paper, no final-norm scaling is applied (Gemma ties its embeddings: the unembedding is
  W_E);
- :func:`detection_log_odds` / :func:`concept_log_odds`: the paper's released per-layer metrics (detection
  probability weighted by first tokens of judged trials; concept token vs the rest), offered as options.

**The Yes and No token sets** are ``yes/Yes/YES`` and ``no/No/NO`` with and without a leading space, each form
kept where it is a single token (:attr:`mechintro.core.models.ModelSpec.yes_ids`), the same sets the paper's
released
code builds for its logit gap. Both spellings are kept because an answer can start with either (Gemma's turn
opens without a space, a sentence-internal "yes" has one); every use above reads the same two sets.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from mechintro.core.models import Model, ModelSpec, spec_for


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


# ----------------------------------------------------------------------------------------------- log-odds


@dataclass(frozen=True)
class DetectionWeights:
    """``P(detected | first response token)`` for the tokens judged trials start with (the paper's
    weights)."""

    token_ids: tuple[int, ...]
    """The scored first tokens."""
    weights: tuple[float, ...]
    """Their detection probability, each in [0, 1]."""
    source: str
    """Where the weights come from: ``"trials"`` or ``"yes_no"`` (Yes ids 1, No ids 0: the fallback)."""


def detection_weights(
    model: Model, trials: pd.DataFrame | None = None, *, min_total: int = 5
) -> DetectionWeights:
    """Detection weights from judged injection trials (stored rows with a response and a verdict).

    ``w(t) = P(detected | the response's first token is t)`` over the tokens seen at least ``min_total`` times
    (the paper's released code uses 5). Without usable trials: Yes ids weigh 1 and No ids 0.
    """
    spec = spec_for(model)
    if trials is not None and len(trials):
        rows = trials[
            (trials["condition"] == "injection") & trials["response"].notna() & trials["detected"].notna()
        ]
        tok = model.tokenizer
        first = [tok(str(r), add_special_tokens=False)["input_ids"][:1] for r in rows["response"]]
        counts: dict[int, list[int]] = {}
        for ids, detected in zip(first, rows["detected"].astype(bool), strict=True):
            if ids:
                hit = counts.setdefault(ids[0], [0, 0])
                hit[0 if detected else 1] += 1
        kept = {t: d / (d + n) for t, (d, n) in counts.items() if d + n >= min_total}
        if kept:
            return DetectionWeights(tuple(kept), tuple(kept.values()), "trials")
    ids = (*spec.yes_ids, *spec.no_ids)
    return DetectionWeights(ids, (1.0,) * len(spec.yes_ids) + (0.0,) * len(spec.no_ids), "yes_no")


def detection_log_odds(logits: Float[Tensor, "... vocab"], weights: DetectionWeights) -> Float[Tensor, "..."]:
    """``log(p / (1 - p))`` with ``p = sum_t softmax(logits)[t] * w(t)`` (the paper's per-layer metric)."""
    probs = logits.float().softmax(-1)
    ids = torch.as_tensor(weights.token_ids, device=logits.device)
    w = torch.as_tensor(weights.weights, device=logits.device, dtype=probs.dtype)
    p = (probs.index_select(-1, ids) * w).sum(-1).clamp(1e-12, 1 - 1e-12)
    return torch.log(p) - torch.log1p(-p)


def concept_log_odds(
    logits: Float[Tensor, "batch vocab"], token_ids: list[int] | Tensor
) -> Float[Tensor, " batch"]:
    """``log P(concept token) - log P(any other token)`` per row (the paper's identification log-odds)."""
    logp = concept_logprob(logits, token_ids).double()
    return (logp - torch.log1p(-logp.exp().clamp(max=1 - 1e-12))).float()
