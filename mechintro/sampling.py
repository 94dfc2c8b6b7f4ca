"""Batched, KV-cached sampling with one seed per row.

Each row draws its own uniform numbers from a generator seeded with that row's seed and samples by inverse
CDF, so a row's continuation does not depend on which other rows share its batch. Hooks installed around the
call (``inject``, feature interventions) see the prompt once and then one new position per step.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from mechintro.models import Model
from mechintro.prompts import PaddedBatch


@dataclass(frozen=True)
class Sampled:
    """Generated continuations of a padded batch."""

    tokens: Int[Tensor, "batch new"]
    """New token ids; pad after a row stopped."""
    lengths: Int[Tensor, " batch"]
    """Number of new tokens per row, the stop token included."""

    def texts(self, tokenizer: Any, *, skip_special_tokens: bool = True) -> list[str]:
        return [
            tokenizer.decode(row[:n].tolist(), skip_special_tokens=skip_special_tokens).strip()
            for row, n in zip(self.tokens, self.lengths.tolist(), strict=True)
        ]


def trial_seed(seed: int, concept: str, trial: int, sample: int, condition: str) -> int:
    """A trial's own sampling seed: a 63-bit hash (sha256) of ``(seed, concept, trial, sample, condition)``.

    Stable across processes and Python versions (no salted ``hash()``); independent of layer, strength,
    variant and persona, so those comparisons share random numbers.
    """
    ident = json.dumps([int(seed), concept, int(trial), int(sample), condition]).encode()
    return int.from_bytes(hashlib.sha256(ident).digest()[:8], "big") & (2**63 - 1)


def stop_ids(model: Model) -> list[int]:
    """EOS and end-of-turn ids: generation of a row ends at either."""
    tok = model.tokenizer
    ids = {tok.eos_token_id}
    end = tok.convert_tokens_to_ids("<end_of_turn>")
    if end is not None and end != tok.unk_token_id:
        ids.add(end)
    return sorted(i for i in ids if i is not None)


def row_uniforms(seeds: Sequence[int], steps: int) -> torch.Tensor:
    """``[batch, steps]`` uniforms, row ``i`` from its own generator seeded with ``seeds[i]``."""
    out = torch.empty(len(seeds), steps, dtype=torch.float64)
    for i, seed in enumerate(seeds):
        gen = torch.Generator().manual_seed(int(seed))
        out[i] = torch.rand(steps, generator=gen, dtype=torch.float64)
    return out


def pick(logits: torch.Tensor, u: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """Sample one token per row from ``logits`` [batch, vocab] with uniforms ``u`` [batch] (inverse CDF)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    cdf = probs.cumsum(-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)
    return idx.clamp_max(logits.shape[-1] - 1)


@torch.no_grad()
def sample(
    model: Model,
    batch: PaddedBatch,
    *,
    max_new_tokens: int,
    seeds: Sequence[int],
    temperature: float = 1.0,
    use_cache: bool = True,
) -> Sampled:
    """Sample continuations of every row of ``batch``.

    Args:
        batch: left-padded prompts (see :func:`mechintro.prompts.left_pad`).
        max_new_tokens: upper bound on new tokens per row.
        seeds: one seed per row.
        temperature: softmax temperature; 0 is greedy.
        use_cache: reuse the KV cache (one position per step); False re-runs the whole sequence each step.
    """
    rows = batch.tokens.shape[0]
    if len(seeds) != rows:
        raise ValueError(f"need one seed per row: {rows} rows, {len(seeds)} seeds")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    device = model.cfg.device
    u = row_uniforms(seeds, max_new_tokens).to(device)
    stops = torch.tensor(stop_ids(model), device=device)
    pad_id = model.tokenizer.pad_token_id
    tokens, mask = batch.tokens.to(device), batch.attention_mask.to(device)
    new = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    lengths = torch.zeros(rows, dtype=torch.long, device=device)
    cache = None
    step_input = tokens
    for t in range(max_new_tokens):
        if use_cache:
            logits, cache = model(
                step_input,
                attention_mask=mask,
                past_key_values=cache,
                use_cache=True,
                return_type="logits_and_cache",
            )
        else:
            logits = model(tokens, attention_mask=mask)
        nxt = pick(logits[:, -1, :].float(), u[:, t], temperature=temperature)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        new[:, t] = nxt
        lengths += (~done).long()
        done |= torch.isin(nxt, stops)
        if bool(done.all()):
            break
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        mask = torch.cat([mask, (~done | torch.isin(nxt, stops)).long()[:, None]], dim=1)
        step_input = nxt[:, None]
    return Sampled(tokens=new[:, : int(lengths.max())].cpu(), lengths=lengths.cpu())
