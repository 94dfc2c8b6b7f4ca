"""Figure 8a-c: concept-space structure.

a. PCA of the L2-normalized concept vectors, coloured by detection: PC1's share of the variance and its
   alignment with Δμ (and with any --direction, e.g. a refusal direction).
b. Verbalizability (the logit-lens score of a concept's own word) against the projection on Δμ (Spearman),
   with the logit lens of Δμ: its top and bottom tokens through the final norm and unembedding.
c. δPCs: project Δμ out of the success vectors, take the top PCs, and steer along each (and along Δμ) at a
   range of strengths.

    python analyses/fig_concept_space.py --model organism
    python analyses/fig_concept_space.py --model organism --direction refusal=refusal.npy
    python analyses/fig_concept_space.py --model tiny --concepts held-out:40 --judge logit --strength 8

The paper's text (Gemma3-27B): PC1 holds 18.4% of the variance.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from mechintro.cli import geometry as g
from mechintro.cli import setup as runs
from mechintro.plots.geometry import concept_pca_figure, direction_sweep_figure, verbalizability_figure
from mechintro.studies import geometry as geo


def load_direction(text: str) -> tuple[str, np.ndarray]:
    """``name=path`` of a ``[d_model]`` vector saved with numpy (.npy) or torch (.pt)."""
    name, _, path = text.partition("=")
    if not name or not path:
        raise SystemExit(f"--direction expects name=path, got {text!r}")
    vec = torch.load(path, map_location="cpu") if Path(path).suffix == ".pt" else np.load(path)
    return name, np.asarray(vec, dtype=np.float64).reshape(-1)


def main(argv: Sequence[str] | None = None) -> None:
    args = g.parser(__doc__).parse_args(argv)
    s = runs.load_setup(args, transcoders=False)
    table = g.rates(s)
    part = g.partition(s, table)
    if part is None:
        return
    frame = part.frame(s.vectors)
    given = dict(load_direction(t) for t in args.direction)
    directions = {"delta_mu": part.direction, "lda": part.lda_direction} | given
    Path(args.out).mkdir(parents=True, exist_ok=True)
    np.save(Path(args.out) / "geometry_delta_mu.npy", part.direction)  # the unit Δμ, [d_model]

    # a. PCA
    pca = geo.concept_pca(s.vectors, s.concepts, directions=directions)
    first = pca.summary.iloc[0]
    print(
        f"PC1 holds {first['explained_variance_ratio']:.1%} of the variance (paper's text: "
        f"{geo.PAPER_TEXT['pc1_share']:.1%}); |cos(PC1, Δμ)| = {first['alignment_delta_mu']:.2f}"
    )
    print(pca.summary.round(3).to_string(index=False))
    runs.save(
        concept_pca_figure(pca.scores, pca.summary, table, rate=args.rate),
        "geometry_pca",
        args.out,
        [("geometry_pca", pca.scores.merge(frame, on="concept")), ("geometry_pca_summary", pca.summary)],
        formats=args.formats,
    )

    # b. verbalizability and the logit lens
    lens = geo.logit_lens(s.model, directions, k=args.lens_k)
    for name in directions:
        rows = lens[lens["direction"] == name]
        top = ", ".join(repr(t) for t in rows[rows["side"] == "top"]["token"])
        bottom = ", ".join(repr(t) for t in rows[rows["side"] == "bottom"]["token"])
        print(f"logit lens of {name}: top {top}; bottom {bottom}")
    verbal = geo.verbalizability(s.model, s.vectors, s.concepts).merge(frame, on="concept")
    rho = stats.spearmanr(verbal["score"], verbal["projection"])
    rho_rate = stats.spearmanr(verbal["score"], verbal["rate"])
    print(
        f"verbalizability vs projection on Δμ: Spearman {rho.statistic:.2f} (p {rho.pvalue:.2g}); "
        f"vs {args.rate}: {rho_rate.statistic:.2f} (p {rho_rate.pvalue:.2g})"
    )
    runs.save(
        verbalizability_figure(verbal, lens, direction="delta_mu"),
        "geometry_verbalizability",
        args.out,
        [("geometry_verbalizability", verbal), ("geometry_logit_lens", lens)],
        formats=args.formats,
    )

    # c. δPCs
    axes, pcs = geo.delta_pcs(s.vectors, part, k=args.k_pcs)
    print(pcs.round(3).to_string(index=False))
    sweep_dirs = {"delta_mu": part.direction} | {
        name: axis for name, axis in zip(pcs["component"], axes, strict=True)
    }
    sweep = geo.direction_sweep(
        sweep_dirs,
        detect=g.detector(s, n_trials=args.sweep_trials),
        scale=g.mean_norm(s),
        multiples=args.sweep_multiples,
    )
    print(sweep.pivot(index="multiple", columns="direction", values="rate").round(2).to_string())
    fig = direction_sweep_figure(sweep, reference=float(table[args.rate].mean()))
    runs.save(
        fig,
        "geometry_delta_pcs",
        args.out,
        [("geometry_delta_pcs", sweep), ("geometry_delta_pc_axes", pcs)],
        formats=args.formats,
    )


if __name__ == "__main__":
    main()
