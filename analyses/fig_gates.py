"""Figure: the top gate candidates by direct logit attribution (promoting "No" when unsteered), and the top
gate's inverted-V activation against injection strength.

    python analyses/fig_gates.py --model organism
    python analyses/fig_gates.py --model tiny --concepts Bread,Oceans,Dust --judge logit --n-trials 1
"""

from __future__ import annotations

from collections.abc import Sequence

from mechintro.cli import setup as runs
from mechintro.plots.mechanism import gates_figure


def main(argv: Sequence[str] | None = None) -> None:
    p = runs.mechanism_parser(__doc__)
    p.add_argument("--gate", default=None, help="the gate whose activation is shown (default: rank 1)")
    args = p.parse_args(argv)
    s = runs.load_setup(args)
    grid, gates = runs.grid_and_gates(s, runs.behaviour(s))
    print(gates.head(20).to_string(index=False))
    runs.save(gates_figure(gates, grid, gate=args.gate), "gates", args.out, [("gates", gates)])


if __name__ == "__main__":
    main()
