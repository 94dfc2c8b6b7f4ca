"""Figure 7: bidirectional steering. Pair success-success and failure-failure concepts (nearest by cosine
within the group, matched on their projection on Δμ), steer with A - B and with B - A, and count the pairs
detected both ways. A rule linear in one direction can never detect both.

    python analyses/fig_bidirectional.py --model organism
    python analyses/fig_bidirectional.py --model organism --same-category   # the original 50 concepts only
    python analyses/fig_bidirectional.py --model tiny --concepts held-out:40 --judge logit --strength 8

The paper's text (Gemma3-27B, not in its released data): 23.3% of S-S pairs against 3.2% of F-F pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

from mechintro.cli import geometry as g
from mechintro.cli import setup as runs
from mechintro.core.prompts import category_of
from mechintro.plots.geometry import bidirectional_figure
from mechintro.studies import geometry as geo


def main(argv: Sequence[str] | None = None) -> None:
    args = g.parser(__doc__).parse_args(argv)
    s = runs.load_setup(args, transcoders=False)
    part = g.partition(s, g.rates(s))
    if part is None:
        return
    categories = None
    if args.same_category:
        categories = {c: category_of(c) for c in s.concepts if category_of(c) != "other"}
        print(f"{len(categories)} of {len(s.concepts)} concepts have a category")
    pairs = geo.bidirectional_pairs(s.vectors, part, tolerance=args.tolerance, categories=categories)
    if pairs.empty:
        print("note: no pairs (try a larger --tolerance)")
        return
    result = geo.bidirectional_experiment(
        s.vectors,
        s.concepts,
        pairs,
        detect=g.detector(s),
        detected_at=part.threshold,
        rescale_to=None if args.no_pair_rescale else g.mean_norm(s),
    )
    summary = geo.bidirectional_summary(result)
    print(f"a direction counts as detected when its {part.rate} >= {part.threshold:g}")
    print(summary.round(3).to_string(index=False))
    paper = geo.PAPER_TEXT
    print(
        f"paper's text (Gemma3-27B): {paper['bidirectional_success']:.1%} of S-S pairs, "
        f"{paper['bidirectional_failure']:.1%} of F-F pairs detected both ways"
    )
    fig = bidirectional_figure(result, summary, detected_at=part.threshold)
    runs.save(
        fig, "geometry_bidirectional", args.out, [("geometry_bidirectional", result)], formats=args.formats
    )


if __name__ == "__main__":
    main()
