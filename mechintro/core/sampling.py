"""Batched, KV-cached sampling with one seed per row; the shared prompt prefix; dropping finished rows.

Each row draws its own uniform numbers from a generator seeded with that row's seed and samples by inverse
CDF, so a row's continuation does not depend on which other rows share its batch. Hooks installed around the
call (``inject``, feature interventions) see the prompt once and then one new position per step.

**Paths.** Every forward call goes through :func:`mechintro.core.fastpath.runner`: the plain Hugging Face
modules
with mechintro's hooks replayed on them when only mechintro's hooks are installed (the fast path), else the
bridge. Both get the same inputs (token ids, each token's position in its own prompt, 4D masks), so they give
the same tokens and logits; ``path=`` forces one.

**Shared prefix.** A batch padded with ``left_pad(..., share_prefix=True)`` starts with a prefix that every
row shares (in a trial batch: the prompt up to the injection start). :func:`prefill` runs it once, as a
one-row call, under the hooks active at that moment; :func:`sample` (and :func:`prompt_logits`) then copy its
cache to every row and run only the rows' suffixes. Absolute positions stay column indices of the padded
tensor: the prefix has the same columns in every row, the pads sit between the prefix and each row's suffix,
and the KV cache's length is the column the next call starts at (what
:class:`mechintro.core.hooks.PositionTracker`
reads), so an injection start means the same with and without a shared prefix.

**Finished rows.** A row that emitted a stop token is dropped from the batch (its cache rows with it) when
every active hook set allows it (``rows="tracked"`` or ``"shared"`` in
:func:`mechintro.core.hooks.hooks_context`);
per-row settings are then looked up through the tracker's ``rows``. Otherwise it stays and is fed pads. On a
GPU the better move is to refill a finished row's slot with a waiting trial so that shapes stay fixed (a
static cache, CUDA graphs); that needs a KV cache written at a per-row column and single-slot prefills, which
Hugging Face's caches do not offer. The loop keeps the bookkeeping for it (``active`` maps slots to rows);
on CUDA today finished rows are dropped as on the CPU.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechintro.core.fastpath import Path, Runner, attention_masks, foreign_hooks, new_cache, runner
from mechintro.core.hooks import active_hooks, tracker
from mechintro.core.models import Model
from mechintro.core.prompts import PaddedBatch

__all__ = [
    "Prefix",
    "Sampled",
    "can_drop_rows",
    "can_share_prefix",
    "pick",
    "prefill",
    "prompt_logits",
    "row_uniforms",
    "sample",
    "stop_ids",
    "trial_seed",
]


@dataclass(frozen=True)
class Sampled:
    """Generated continuations of a padded batch."""

    tokens: Int[Tensor, "batch new"]
    """New token ids; pad after a row stopped."""
    lengths: Int[Tensor, " batch"]
    """Number of new tokens per row, the stop token included."""
    logits: Float[Tensor, "batch new vocab"] | None = None
    """With ``keep_logits=True``: each step's next-token logits (float32), NaN once a row has stopped."""
    path: str = ""
    """The path the forward calls took: ``"hf"`` (the fast path) or ``"bridge"``."""

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


def can_share_prefix(model: Model) -> bool:
    """Whether a prefix common to every row may be run once for the batch now: every hook on the model is
    mechintro's and acts the same on every row and position (``rows="shared"``), or there is none."""
    return foreign_hooks(model) == 0 and all(s.rows == "shared" for s in active_hooks(model))


def can_drop_rows(model: Model) -> bool:
    """Whether finished rows may leave the batch now: every hook on the model is mechintro's and looks its
    per-row settings up through the position tracker (``rows="tracked"``) or has none (``"shared"``)."""
    return foreign_hooks(model) == 0 and all(s.rows in ("tracked", "shared") for s in active_hooks(model))


@dataclass(frozen=True)
class Prefix:
    """The KV cache of a batch's shared prefix (:func:`prefill`); reusable, never modified."""

    tokens: Int[Tensor, " prefix"]
    """The prefix's token ids."""
    layers: tuple[tuple[Tensor, Tensor], ...]
    """(keys, values) of every layer, ``[1, kv_heads, prefix, head_dim]``."""


def _check_prefix(batch: PaddedBatch, prefix: Prefix | None) -> None:
    if batch.prefix == 0:
        if prefix is not None:
            raise ValueError("prefix= was given but the batch has no shared prefix (left_pad share_prefix=)")
        return
    if prefix is None:
        raise ValueError(
            f"this batch shares a prefix of {batch.prefix} tokens: compute its cache once with "
            "prefill(model, batch), under the hooks that should act on it, and pass it as prefix="
        )
    if len(prefix.tokens) != batch.prefix or not torch.equal(prefix.tokens, batch.tokens[0, : batch.prefix]):
        raise ValueError("prefix= holds the cache of other tokens than this batch's shared prefix")


def _prefix_cache(prefix: Prefix, rows: int) -> Any:
    """A fresh cache holding the prefix's keys and values for ``rows`` rows."""
    cache = new_cache()
    for i, (k, v) in enumerate(prefix.layers):
        cache.update(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1), i)
    return cache


def _dtype(model: Model) -> torch.dtype:
    return next(model.original_model.parameters()).dtype


@torch.no_grad()
def prefill(model: Model, batch: PaddedBatch, *, path: Path = "auto") -> Prefix:
    """Run the batch's shared prefix once (one row at positions ``0 .. prefix - 1``) and keep its cache.

    Hooks active now act on it as on any call; so that the prefix is the same for every row, only hooks that
    act the same on every row and position may be active (``rows="shared"``: a bias vector, an MLP
    replacement). Install per-row hooks such as ``inject`` after this call (a shared prefix ends at or before
    every injection start, so the injection adds nothing to it).
    """
    if batch.prefix == 0:
        raise ValueError("the batch has no shared prefix (pad it with left_pad(..., share_prefix=True))")
    if not can_share_prefix(model):
        per_row = [s.rows for s in active_hooks(model) if s.rows != "shared"]
        raise ValueError(
            "a shared prefix runs once for every row, so only hooks that act the same on every row and "
            f"position (rows='shared') may be active; active now: {per_row or 'hooks from outside mechintro'}"
        )
    device = model.cfg.device
    tokens = batch.tokens[0, : batch.prefix]
    real = torch.ones(1, batch.prefix, dtype=torch.bool, device=device)
    positions = torch.arange(batch.prefix, device=device)[None]
    cache = new_cache()
    with runner(model, path=path) as run:
        masks = attention_masks(
            model, real=real, positions=positions, queries=batch.prefix, dtype=_dtype(model)
        )
        run(tokens[None].to(device), positions=positions, masks=masks, cache=cache)
    layers = tuple((layer.keys, layer.values) for layer in cache.layers)
    return Prefix(tokens=tokens.clone(), layers=layers)


def _start(model: Model, batch: PaddedBatch, prefix: Prefix | None, *, use_cache: bool) -> tuple[Any, int]:
    """(cache, first column of the first call)."""
    if not use_cache:
        return None, 0
    _check_prefix(batch, prefix)
    if prefix is None:
        return new_cache(), 0
    return _prefix_cache(prefix, batch.tokens.shape[0]), batch.prefix


@torch.no_grad()
def prompt_logits(
    model: Model, batch: PaddedBatch, *, prefix: Prefix | None = None, path: Path = "auto"
) -> Float[Tensor, "batch vocab"]:
    """Next-token logits at the last prompt position of every row (one forward call; after ``prefix``'s cache
    when the batch shares a prefix)."""
    device = model.cfg.device
    cache, first = _start(model, batch, prefix, use_cache=True)
    cache = cache if first else None  # no cache to extend, none to keep
    real, positions = batch.real.to(device), batch.position_ids.to(device)
    with runner(model, path=path) as run:
        queries = real.shape[1] - first
        masks = attention_masks(model, real=real, positions=positions, queries=queries, dtype=_dtype(model))
        return run(
            batch.tokens[:, first:].to(device), positions=positions[:, first:], masks=masks, cache=cache
        )


@dataclass
class _Rows:
    """The running rows of a batch: their tokens, which columns are real, their positions, their cache."""

    active: Int[Tensor, " rows"]
    """Which rows of the batch these are (slot -> row)."""
    tokens: Int[Tensor, "rows seq"]
    real: Tensor
    positions: Int[Tensor, "rows seq"]
    cache: Any

    def append(self, nxt: Int[Tensor, " rows"], running: Tensor) -> None:
        """Add the new column: a row's token is real while the row runs (its stop token included)."""
        self.tokens = torch.cat([self.tokens, nxt[:, None]], dim=1)
        self.real = torch.cat([self.real, running[:, None]], dim=1)
        self.positions = torch.cat([self.positions, self.positions[:, -1:] + running[:, None].long()], dim=1)

    def keep(self, keep: Tensor) -> None:
        """Drop the rows where ``keep`` is False (from the cache too)."""
        self.active, self.tokens = self.active[keep], self.tokens[keep]
        self.real, self.positions = self.real[keep], self.positions[keep]
        if self.cache is not None:
            self.cache.batch_select_indices(keep.nonzero().squeeze(-1))


def _step(run: Runner, model: Model, rows: _Rows, queries: int, dtype: torch.dtype) -> Tensor:
    masks = attention_masks(model, real=rows.real, positions=rows.positions, queries=queries, dtype=dtype)
    ids = rows.tokens[:, -queries:]
    return run(ids, positions=rows.positions[:, -queries:], masks=masks, cache=rows.cache)


@torch.no_grad()
def sample(
    model: Model,
    batch: PaddedBatch,
    *,
    max_new_tokens: int,
    seeds: Sequence[int],
    temperature: float = 1.0,
    use_cache: bool = True,
    prefix: Prefix | None = None,
    path: Path = "auto",
    drop_finished: bool | None = None,
    keep_logits: bool = False,
) -> Sampled:
    """Sample continuations of every row of ``batch``.

    Args:
        batch: padded prompts (:func:`mechintro.core.prompts.left_pad`, with or without a shared prefix).
        max_new_tokens: upper bound on new tokens per row.
        seeds: one seed per row.
        temperature: softmax temperature; 0 is greedy.
        use_cache: reuse the KV cache (one position per step); False re-runs the whole sequence each step.
        prefix: the shared prefix's cache from :func:`prefill`, required when ``batch.prefix > 0`` and the
            cache is used.
        path: ``"auto"`` (the fast path when only mechintro's hooks are installed), ``"hf"`` or ``"bridge"``
            (:func:`mechintro.core.fastpath.choose_path`).
        drop_finished: drop finished rows from the batch; default: when the active hooks allow it
            (:func:`can_drop_rows`). True when they do not raises.
        keep_logits: also return every step's logits (:attr:`Sampled.logits`).
    """
    rows = batch.tokens.shape[0]
    if len(seeds) != rows:
        raise ValueError(f"need one seed per row: {rows} rows, {len(seeds)} seeds")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    drop = can_drop_rows(model) if drop_finished is None else bool(drop_finished)
    if drop and not can_drop_rows(model):
        raise ValueError("drop_finished=True, but a hook set that needs every row is active (rows='fixed')")
    device, dtype = model.cfg.device, _dtype(model)
    u = row_uniforms(seeds, max_new_tokens).to(device)
    stops = torch.tensor(stop_ids(model), device=device)
    pad_id = model.tokenizer.pad_token_id
    cache, first = _start(model, batch, prefix, use_cache=use_cache)
    state = _Rows(
        active=torch.arange(rows, device=device),
        tokens=batch.tokens.to(device),
        real=batch.real.to(device),
        positions=batch.position_ids.to(device),
        cache=cache,
    )
    new = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    lengths = torch.zeros(rows, dtype=torch.long, device=device)
    kept = None
    track = tracker(model)
    with runner(model, path=path) as run, track.selecting(None, full=rows):
        queries = state.tokens.shape[1] - first
        for t in range(max_new_tokens):
            logits = _step(run, model, state, queries if use_cache else state.tokens.shape[1], dtype)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            running = ~done[state.active]
            if keep_logits:
                if kept is None:
                    shape = (rows, max_new_tokens, logits.shape[-1])
                    kept = torch.full(shape, float("nan"), dtype=logits.dtype, device=device)
                kept[state.active[running], t] = logits[running]
            nxt = pick(logits, u[state.active, t], temperature=temperature)
            nxt = torch.where(running, nxt, torch.full_like(nxt, pad_id))
            new[state.active, t] = nxt
            lengths[state.active] += running.long()
            done[state.active] |= running & torch.isin(nxt, stops)
            if bool(done.all()):
                break
            state.append(nxt, running)
            if drop and bool(done[state.active].any()):
                state.keep(~done[state.active])
                track.keep(state.active)
            queries = 1
    n = int(lengths.max())
    logits_out = None if kept is None else kept[:, :n].cpu()
    return Sampled(tokens=new[:, :n].cpu(), lengths=lengths.cpu(), logits=logits_out, path=run.path)
