"""Figure: a gate's activation against injection strength while ablating all, the top 20% or the top 5% of
its evidence carriers, with the weakest 10% as a control, for high- and low-detection concepts.

    python analyses/fig_carrier_ablation.py --model organism
    python analyses/fig_carrier_ablation.py --model tiny --concepts Bread,Oceans,Dust,Peace --judge logit
    --n-trials 1
"""

from __future__ import annotations

from collections.abc import Sequence

from mechintro.cli import setup as runs
from mechintro.mechanism.curves import carrier_curves, success_failure
from mechintro.plots.mechanism import carrier_ablation_figure


def main(argv: Sequence[str] | None = None) -> None:
    p = runs.mechanism_parser(__doc__)
    runs.add_carrier_options(p)
    p.add_argument("--n-concepts", type=int, default=2, help="high- and low-detection concepts shown (each)")
    args = p.parse_args(argv)
    s = runs.load_setup(args)
    rates = runs.behaviour(s)
    grid, gates = runs.grid_and_gates(s, rates)
    gate, carriers = runs.find_carriers(s, grid, gates, rates)
    picked = success_failure(rates, n=args.n_concepts)
    shown = picked["success"] + picked["failure"]
    rows = [s.concepts.index(c) for c in shown]
    df = carrier_curves(
        s.model,
        s.transcoders,
        gate,
        carriers,
        shown,
        vectors=s.vectors[rows],
        strengths=grid.strengths,
        batch_size=args.batch_size,
    )
    print(df.groupby(["carrier_set", "strength"])["gate_activation"].mean().unstack().round(3).to_string())
    runs.save(carrier_ablation_figure(df), "carrier_ablation", args.out, [("carrier_ablation", df)])


if __name__ == "__main__":
    main()
