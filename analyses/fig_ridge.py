"""Figure 8d: ridge regression of per-concept detection, nested cross-validation (outer K-fold, inner RidgeCV
over log-spaced alphas). R² against the number of top transcoder features (downstream layers, activation
at the last prompt token with the concept injected at the default strength), ranked inside each training
fold; baselines: the vector norm alone, the scalar projection on Δμ, both, and the raw concept vectors.
With --leaky, the same features ranked on all concepts (which leaks) for comparison.

    python analyses/fig_ridge.py --model organism
    python analyses/fig_ridge.py --model tiny --concepts held-out:40 --judge logit --strength 8
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

from mechintro.cli import geometry as g
from mechintro.cli import setup as runs
from mechintro.plots.geometry import ridge_figure
from mechintro.studies import geometry as geo


def main(argv: Sequence[str] | None = None) -> None:
    args = g.parser(__doc__).parse_args(argv)
    s = runs.load_setup(args)
    part = g.partition(s, g.rates(s))
    if part is None:
        return
    feats = geo.transcoder_activations(
        s.model, s.transcoders, s.concepts, vectors=s.vectors, strength=s.strength, batch_size=args.batch_size
    )
    print(f"{feats.shape[1]} transcoder features active for some concept (layers after {s.layer})")
    ridge = geo.ridge_r2(
        s.vectors,
        part,
        features=feats.to_numpy(),
        counts=args.counts,
        leaky=args.leaky,
        n_splits=args.folds,
        seed=args.seed,
    )
    norm = np.linalg.norm(s.vectors.numpy(), axis=1)
    rho = stats.spearmanr(norm, part.rates)
    print(f"Spearman(vector norm, {part.rate}) = {rho.statistic:.2f} (p {rho.pvalue:.2g})")
    print(ridge.round(3).to_string(index=False))
    runs.save(
        ridge_figure(ridge), "geometry_ridge", args.out, [("geometry_ridge", ridge)], formats=args.formats
    )


if __name__ == "__main__":
    main()
