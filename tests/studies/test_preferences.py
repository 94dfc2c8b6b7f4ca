"""Preference pairs: loading with clear errors, seeded shuffles, domain selections."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mechintro.studies.preferences import (
    PreferencePair,
    domain_selections,
    load_pairs,
    pairs_digest,
    reverse,
    select_pairs,
    shuffle_labels,
)


def _pairs(n: int, domains=("code", "math", "chat")) -> tuple[PreferencePair, ...]:
    return tuple(
        PreferencePair(f"p{i}", f"good {i}", f"bad {i}", domains[i % len(domains)]) for i in range(n)
    )


def test_load_pairs_from_jsonl_and_iterables(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": "a", "chosen": "b", "rejected": "c", "domain": "x"},
        {"prompt": "d", "chosen": "e", "rejected": "f"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    pairs = load_pairs(path)
    assert pairs == (PreferencePair("a", "b", "c", "x"), PreferencePair("d", "e", "f", "default"))
    assert load_pairs(rows) == pairs and load_pairs(list(pairs)) == pairs


def test_bad_pairs_are_refused_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"})
        + "\n"
        + json.dumps({"prompt": "a", "chosen": "b"})
        + "\n"
    )
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: the pair has no rejected"):
        load_pairs(path)
    with pytest.raises(ValueError, match=r"pair 0: the pair has no chosen / rejected"):
        load_pairs([{"prompt": "a"}])
    with pytest.raises(ValueError, match="chosen is empty"):
        load_pairs([{"prompt": "a", "chosen": " ", "rejected": "c"}])
    with pytest.raises(ValueError, match="holds no preference pairs"):
        load_pairs([])
    with pytest.raises(FileNotFoundError):
        load_pairs(tmp_path / "missing.jsonl")


def test_shuffle_is_seeded_and_swaps_about_half() -> None:
    pairs = _pairs(1000)
    a, b = shuffle_labels(pairs, seed=3), shuffle_labels(pairs, seed=3)
    assert a == b and a != shuffle_labels(pairs, seed=4)
    swapped = [x != y for x, y in zip(pairs, a, strict=True)]
    # Binomial(1000, 0.5): mean 500, sd 15.8; 4 sd either side
    assert 437 <= sum(swapped) <= 563
    for x, y, s in zip(pairs, a, swapped, strict=True):
        assert (y == x.swapped()) if s else (y == x)
    assert shuffle_labels(pairs, seed=0, p=0.0) == pairs
    assert shuffle_labels(pairs, seed=0, p=1.0) == reverse(pairs)
    assert reverse(reverse(pairs)) == pairs and all(
        p.chosen == q.rejected for p, q in zip(pairs, reverse(pairs), strict=True)
    )


def test_domain_filters_select_what_they_name() -> None:
    pairs = _pairs(30)
    assert {p.domain for p in select_pairs(pairs, domains="math")} == {"math"}
    assert len(select_pairs(pairs, domains=["math", "code"])) == 20
    assert {p.domain for p in select_pairs(pairs, leave_out="math")} == {"code", "chat"}
    assert select_pairs(pairs) == pairs
    sample = select_pairs(pairs, n=7, seed=1)
    assert len(sample) == 7 and set(sample) <= set(pairs) and sample == select_pairs(pairs, n=7, seed=1)
    assert sample != select_pairs(pairs, n=7, seed=2)
    loo = domain_selections(pairs, kind="leave_one_out")
    assert sorted(loo) == ["without_chat", "without_code", "without_math"]
    assert all(
        d not in {p.domain for p in v} for d, v in ((k.removeprefix("without_"), v) for k, v in loo.items())
    )
    single = domain_selections(pairs, kind="single")
    assert {k: {p.domain for p in v} for k, v in single.items()} == {
        f"only_{d}": {d} for d in ("chat", "code", "math")
    }


def test_bad_selections_name_the_valid_domains() -> None:
    pairs = _pairs(6)
    with pytest.raises(
        ValueError, match=r"unknown domain\(s\) \['bio'\]; the pairs' domains are \['chat', 'code'"
    ):
        select_pairs(pairs, domains="bio")
    with pytest.raises(ValueError, match="to leave out"):
        select_pairs(pairs, leave_out=["bio"])
    with pytest.raises(ValueError, match="holds no pairs"):
        select_pairs(pairs, domains="math", leave_out="math")
    with pytest.raises(ValueError, match="valid: \\['leave_one_out', 'single'\\]"):
        domain_selections(pairs, kind="pairs")


def test_digest_tells_orders_and_labels_apart() -> None:
    pairs = _pairs(4)
    assert pairs_digest(pairs) == pairs_digest(list(pairs))
    assert pairs_digest(pairs) != pairs_digest(pairs[::-1]) != pairs_digest(reverse(pairs))
