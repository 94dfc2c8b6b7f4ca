"""Noise controls: random vectors norm-matched to the concept vectors (isotropic, and with the concept
vectors' covariance), injected at the same strengths as the concepts. They show what a vector's norm
alone does.

    python analyses/fig_noise_controls.py --model organism
    python analyses/fig_noise_controls.py --model organism --noise-multiples 0.75,1,1.25
    python analyses/fig_noise_controls.py --model tiny --concepts held-out:40 --judge logit --strength 8
"""

from __future__ import annotations

from collections.abc import Sequence

from scipy import stats

from mechintro.cli import geometry as g
from mechintro.cli import setup as runs
from mechintro.plots.geometry import noise_figure
from mechintro.studies import geometry as geo


def main(argv: Sequence[str] | None = None) -> None:
    args = g.parser(__doc__).parse_args(argv)
    s = runs.load_setup(args, transcoders=False)
    g.rates(s)
    noise = geo.noise_experiment(
        s.vectors,
        s.concepts,
        detect=g.detector(s),
        repeats=args.repeats,
        multiples=args.noise_multiples,
        seed=args.seed,
    )
    for (source, multiple), rows in noise.groupby(["source", "multiple"], sort=False):
        rho = stats.spearmanr(rows["norm"], rows["rate"]).statistic
        print(
            f"{source:>10} x{multiple:g}: mean rate {rows['rate'].mean():.3f}, >= 0.5: "
            f"{(rows['rate'] >= 0.5).mean():.2f}, Spearman(norm, rate) {rho:.2f}"
        )
    runs.save(
        noise_figure(noise), "geometry_noise", args.out, [("geometry_noise", noise)], formats=args.formats
    )


if __name__ == "__main__":
    main()
