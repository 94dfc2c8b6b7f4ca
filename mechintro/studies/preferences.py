"""Preference pairs for the post-training conditions (:mod:`mechintro.studies.posttrain`): loading,
selecting by domain, and the two label manipulations of the paper's Table 3 (shuffled and reversed).

A pair is a prompt (the user's message, unformatted, or a whole conversation as chat messages ending in a
user turn), a preferred (``chosen``) and a dispreferred (``rejected``) response, a ``domain`` name, and
optionally an ``injection`` (a concept and a strength, for pairs whose prompt is run with a concept injected:
the positive control of the organism's post-training study). Pairs come from a JSONL file (one object a
line with fields ``prompt``, ``chosen``, ``rejected`` and optionally ``domain`` and ``injection``) or any
iterable of such dicts or of :class:`PreferencePair`. Nothing is downloaded.

The released code (``experiments/03f_dpo_mechanism_ablation.py``) reads ``allenai/dolci-instruct-dpo`` and
assigns each pair a domain from its source dataset's name (keyword rules as a fallback); here the domain is
whatever the data say (``"default"`` when absent).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_DOMAIN",
    "PreferencePair",
    "domain_counts",
    "domain_selections",
    "load_pairs",
    "pairs_digest",
    "reverse",
    "select_pairs",
    "shuffle_labels",
]

DEFAULT_DOMAIN = "default"
"""The domain of a pair whose data give none."""


@dataclass(frozen=True)
class PreferencePair:
    """One preference pair."""

    prompt: str | tuple[dict[str, str], ...]
    """The user's message, unformatted, or a conversation: chat messages (``role`` ``system`` / ``user`` /
    ``assistant``, ``content``) ending in a user turn. The chat template or raw format is applied when
    training."""
    chosen: str
    """The preferred response."""
    rejected: str
    """The dispreferred response."""
    domain: str = DEFAULT_DOMAIN
    """A domain name, for the data selections (by domain, leave one out, single domain)."""
    injection: tuple[str, float] | None = None
    """``(concept, strength)``: the prompt and both responses run with that concept's vector injected
    (:class:`mechintro.studies.posttrain.PairInjection` gives the layer and vectors); None: no injection."""

    def swapped(self) -> PreferencePair:
        """The same pair with chosen and rejected exchanged."""
        return replace(self, chosen=self.rejected, rejected=self.chosen)


def _pair(item: Any, where: str) -> PreferencePair:
    if isinstance(item, PreferencePair):
        return item
    if not isinstance(item, Mapping):
        raise TypeError(
            f"{where}: a preference pair is a dict or a PreferencePair, not {type(item).__name__}"
        )
    missing = [k for k in ("chosen", "rejected") if not isinstance(item.get(k), str)]
    if not isinstance(item.get("prompt"), str):
        missing = ["prompt", *missing] if item.get("prompt") is None else missing
    if missing:
        raise ValueError(
            f"{where}: the pair has no {' / '.join(missing)} (a string each); it has {sorted(item)}"
        )
    empty = [k for k in ("chosen", "rejected") if not item[k].strip()]
    if empty:
        raise ValueError(f"{where}: the pair's {' / '.join(empty)} is empty")
    domain = item.get("domain", DEFAULT_DOMAIN)
    if domain is None:
        domain = DEFAULT_DOMAIN
    if not isinstance(domain, str) or not domain:
        raise ValueError(f"{where}: the domain must be a non-empty string, not {domain!r}")
    prompt = item["prompt"] if isinstance(item["prompt"], str) else _messages(item["prompt"], where)
    return PreferencePair(prompt, item["chosen"], item["rejected"], domain, _injection(item, where))


ROLES = ("system", "user", "assistant")


def _messages(prompt: Any, where: str) -> tuple[dict[str, str], ...]:
    """A conversation prompt, checked: a non-empty list of ``{role, content}`` ending in a user turn."""
    if isinstance(prompt, Mapping) or not isinstance(prompt, Sequence) or not prompt:
        raise ValueError(
            f"{where}: the prompt is a string or a non-empty list of chat messages, not {prompt!r}"
        )
    out = []
    for m in prompt:
        if not isinstance(m, Mapping) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(
                f"{where}: a chat message is {{'role': one of {list(ROLES)}, 'content': str}}, not {m!r}"
            )
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise ValueError(f"{where}: the conversation must end in a user turn, not {out[-1]['role']!r}")
    return tuple(out)


def _injection(item: Mapping, where: str) -> tuple[str, float] | None:
    inj = item.get("injection")
    if inj is None:
        return None
    if isinstance(inj, Mapping):
        inj = (inj.get("concept"), inj.get("strength"))
    if (
        not isinstance(inj, Sequence)
        or len(inj) != 2
        or not isinstance(inj[0], str)
        or isinstance(inj[1], bool)
        or not isinstance(inj[1], (int, float))
    ):
        raise ValueError(f"{where}: an injection is {{'concept': str, 'strength': number}}, not {inj!r}")
    return (inj[0], float(inj[1]))


def load_pairs(source: str | os.PathLike | Iterable[Any]) -> tuple[PreferencePair, ...]:
    """Pairs from a JSONL file (a path) or from an iterable of dicts / :class:`PreferencePair`.

    Raises naming the line (file) or the index (iterable) of a pair without ``chosen`` / ``rejected``
    (or ``prompt``), and when there are no pairs at all.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such preference-pair file (JSONL: prompt, chosen, rejected)")
        pairs = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON object ({err})") from None
            pairs.append(_pair(item, f"{path}:{number}"))
        where = str(path)
    else:
        pairs = [_pair(item, f"pair {i}") for i, item in enumerate(source)]
        where = "the iterable"
    if not pairs:
        raise ValueError(f"{where} holds no preference pairs")
    return tuple(pairs)


def domain_counts(pairs: Sequence[PreferencePair]) -> dict[str, int]:
    """``{domain: number of pairs}``, domains sorted by name."""
    return dict(sorted(Counter(p.domain for p in pairs).items()))


def _check_domains(names: Iterable[str], valid: Sequence[str], what: str) -> list[str]:
    names = [names] if isinstance(names, str) else list(names)
    unknown = [d for d in names if d not in valid]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; the pairs' domains are {list(valid)}")
    return names


def select_pairs(
    pairs: Sequence[PreferencePair],
    *,
    domains: str | Sequence[str] | None = None,
    leave_out: str | Sequence[str] | None = None,
    n: int | None = None,
    seed: int = 0,
) -> tuple[PreferencePair, ...]:
    """A data selection: the pairs of ``domains`` (all when None) minus those of ``leave_out``, then ``n`` of
    them drawn without replacement with ``seed`` (all, in their order, when ``n`` is None or at least their
    number).

    Unknown domain names raise naming the valid ones; an empty selection raises.
    """
    pairs = tuple(pairs)
    valid = list(domain_counts(pairs))
    chosen = list(pairs)
    if domains is not None:
        keep = set(_check_domains(domains, valid, "domain(s)"))
        chosen = [p for p in chosen if p.domain in keep]
    if leave_out is not None:
        drop = set(_check_domains(leave_out, valid, "domain(s) to leave out"))
        chosen = [p for p in chosen if p.domain not in drop]
    if not chosen:
        raise ValueError(f"the selection (domains={domains!r}, leave_out={leave_out!r}) holds no pairs")
    if n is not None:
        if n < 1:
            raise ValueError(f"n must be at least 1, not {n}")
        if n < len(chosen):
            picked = sorted(random.Random(seed).sample(range(len(chosen)), n))
            chosen = [chosen[i] for i in picked]
    return tuple(chosen)


def domain_selections(pairs: Sequence[PreferencePair], *, kind: str) -> dict[str, tuple[PreferencePair, ...]]:
    """The paper's domain ablations: ``kind="leave_one_out"`` gives ``{"without_<d>": pairs}`` for every
    domain, ``kind="single"`` gives ``{"only_<d>": pairs}``."""
    valid = list(domain_counts(pairs))
    if kind == "leave_one_out":
        if len(valid) < 2:
            raise ValueError(f"leave-one-domain-out needs at least two domains; the pairs have {valid}")
        return {f"without_{d}": select_pairs(pairs, leave_out=d) for d in valid}
    if kind == "single":
        return {f"only_{d}": select_pairs(pairs, domains=d) for d in valid}
    raise ValueError(f"unknown kind {kind!r}; valid: ['leave_one_out', 'single']")


def shuffle_labels(
    pairs: Sequence[PreferencePair], *, seed: int, p: float = 0.5
) -> tuple[PreferencePair, ...]:
    """Each pair's chosen and rejected exchanged with probability ``p``, independently, with ``seed`` (the
    released code's ``dpo_shuffled``: it draws from Python's global ``random``, unseeded; here a
    ``random.Random(seed)``)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], not {p}")
    rng = random.Random(seed)
    return tuple(pair.swapped() if rng.random() < p else pair for pair in pairs)


def reverse(pairs: Sequence[PreferencePair]) -> tuple[PreferencePair, ...]:
    """Every pair's chosen and rejected exchanged (the released code's ``dpo_reversed``)."""
    return tuple(pair.swapped() for pair in pairs)


def pairs_digest(pairs: Sequence[PreferencePair]) -> str:
    """SHA-256 (hex) over the pairs, in order: which exact data an adapter was trained on."""
    digest = hashlib.sha256()
    for pair in pairs:
        row = [pair.prompt, pair.chosen, pair.rejected, pair.domain]
        if pair.injection is not None:
            row.append(list(pair.injection))
        digest.update(json.dumps(row, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()
