"""What run_trials is measured against, shared by the trial benchmarks (trials.py, gpu.py).

* **The paper's way**: plain Hugging Face ``generate`` on a left-padded batch of trial prompts, with a forward
  hook on the injection layer that adds each row's ``strength * vector`` from that row's own injection start
  (every position of the prompt from the start on, then every generated position), sampling, the same stop
  tokens as run_trials.
* **The ceiling**: the same ``generate`` with no hook at all.

Both run the same trials in the same batches as run_trials (:func:`trial_batches`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mechintro.behaviour.plan import Trial, plan_trials
from mechintro.core.prompts import PaddedBatch, left_pad, trial_prompt
from mechintro.core.sampling import stop_ids


@dataclass(frozen=True)
class TrialBatch:
    """One batch of trials as run_trials runs it: padded prompts and one injected vector per row."""

    padded: PaddedBatch
    vectors: torch.Tensor
    """``[rows, d_model]``, each row's concept vector."""
    strength: float


def trial_batches(
    model: Any,
    concepts: Sequence[str],
    vectors: torch.Tensor,
    *,
    layer: int,
    strength: float,
    n_trials: int,
    batch_size: int,
) -> list[TrialBatch]:
    """The injection trials run_trials plans for ``concepts`` (controls off), in its batches.

    run_trials sorts each layer's trials by prompt length (a stable sort of the plan) and cuts batches of
    ``batch_size``; the same is done here, so both ways run the same rows together.
    """
    planned: list[Trial] = plan_trials(
        concepts,
        layer=layer,
        strengths=[strength],
        variant="original",
        persona="standard_assistant",
        n_trials=n_trials,
        controls=False,
    )
    prompts = {n: trial_prompt(model, trial=n) for n in sorted({t.trial for t in planned})}
    rows = sorted(planned, key=lambda t: len(prompts[t.trial].tokens))
    by_concept = dict(zip(concepts, vectors, strict=True))
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        padded = left_pad([prompts[t.trial] for t in chunk], pad_id=model.tokenizer.pad_token_id)
        vecs = torch.stack([by_concept[t.concept] for t in chunk])
        out.append(TrialBatch(padded=padded, vectors=vecs, strength=strength))
    return out


def row_injection_hook(delta: torch.Tensor, starts: torch.Tensor) -> Callable:
    """A forward hook for a decoder layer: adds ``delta[i]`` to row ``i`` at every position ``>= starts[i]``
    of the prompt (a call of several positions) and at every generated position (a call of one)."""

    def hook(_module: Any, _inputs: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        seq = hidden.shape[1]
        if seq > 1:
            on = torch.arange(seq, device=hidden.device)[None, :] >= starts[:, None]
            hidden = hidden + on[..., None].to(hidden.dtype) * delta[:, None, :]
        else:
            hidden = hidden + delta[:, None, :]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return hook


@torch.no_grad()
def hf_generate(
    hf: Any,
    batches: Sequence[TrialBatch],
    *,
    layer: int | None,
    max_new_tokens: int,
    temperature: float,
    stops: Sequence[int],
    pad_id: int,
    seed: int = 0,
    min_new_tokens: int | None = None,
) -> int:
    """Run every batch through ``hf.generate``; with ``layer`` the paper's per-row injection hook is on it,
    without it nothing is hooked (the ceiling). Returns the number of generated tokens (stop tokens included,
    nothing after them)."""
    device = next(hf.parameters()).device
    dtype = next(hf.parameters()).dtype
    torch.manual_seed(seed)
    new_tokens = 0
    for b in batches:
        tokens, mask = b.padded.tokens.to(device), b.padded.attention_mask.to(device)
        handle = None
        if layer is not None:
            delta = (b.strength * b.vectors).to(device=device, dtype=dtype)
            hook = row_injection_hook(delta, b.padded.starts.to(device))
            handle = hf.model.layers[layer].register_forward_hook(hook)
        try:
            out = hf.generate(
                input_ids=tokens,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens,
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None,
                top_k=None,
                top_p=None,
                eos_token_id=list(stops),
                pad_token_id=pad_id,
                return_dict_in_generate=False,
                output_attentions=False,
            )
        finally:
            if handle is not None:
                handle.remove()
        new_tokens += count_new_tokens(out[:, tokens.shape[1] :], stops)
    return new_tokens


def count_new_tokens(new: torch.Tensor, stops: Sequence[int]) -> int:
    """Tokens up to and including each row's first stop token (all of them in a row that never stops)."""
    is_stop = torch.isin(new, torch.tensor(list(stops), device=new.device))
    seen = is_stop.long().cumsum(-1)
    return int(((seen == 0) | (is_stop & (seen == 1))).sum())


def stop_tokens(model: Any) -> list[int]:
    """The stop tokens run_trials uses (EOS and end-of-turn)."""
    return stop_ids(model)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call, synchronizing CUDA around it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def side_by_side(runs: dict[str, Callable[[], int]], *, rounds: int) -> dict[str, dict[str, Any]]:
    """Time every run once per round, in rotating order (so load drift hits each alike), after one warm-up
    each. Returns per run: seconds per round, their median, generated tokens, and per round the ratio of every
    other run's time to this one's."""
    names = list(runs)
    for name in names:
        runs[name]()  # warm-up
    seconds: dict[str, list[float]] = {n: [] for n in names}
    tokens: dict[str, list[int]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            s, n = timed(runs[name])
            seconds[name].append(s)
            tokens[name].append(int(n))
    return {
        n: {
            "seconds": seconds[n],
            "median_s": statistics.median(seconds[n]),
            "new_tokens": tokens[n],
        }
        for n in names
    }


def paired_ratio(result: dict[str, dict[str, Any]], slower: str, faster: str) -> dict[str, float]:
    """``slower``'s time over ``faster``'s, per round (measured side by side): median, min and max."""
    ratios = [a / b for a, b in zip(result[slower]["seconds"], result[faster]["seconds"], strict=True)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "per_round": ratios}
